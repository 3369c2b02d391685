// The meal-planning app's planned signaling server (seed plan, "server/signaling.ts") written
// the straightforward way with the `ws` package, plus the same HS256 token check kinlink does,
// so the signaling benchmark has a peer doing equal work: verify, parse, route, relay.
// Benchmark use only: listens on 127.0.0.1, port from PORT (0 = any), prints the address.
import { createHmac, timingSafeEqual } from 'node:crypto';
import { WebSocketServer } from 'ws';

const secret = process.env.TOKEN_SECRET;
const families = new Map(); // familyId -> Map(deviceId -> {ws, userId})

function verify(token) {
  const [h, p, s] = String(token || '').split('.');
  if (!h || !p || !s) return null;
  const header = JSON.parse(Buffer.from(h, 'base64url'));
  if (header.alg !== 'HS256') return null;
  const mac = createHmac('sha256', secret).update(`${h}.${p}`).digest();
  const sig = Buffer.from(s, 'base64url');
  if (sig.length !== mac.length || !timingSafeEqual(sig, mac)) return null;
  const claims = JSON.parse(Buffer.from(p, 'base64url'));
  return claims.exp > Date.now() / 1000 ? claims : null;
}

const wss = new WebSocketServer({ host: '127.0.0.1', port: Number(process.env.PORT || 0), maxPayload: 65536 });
wss.on('listening', () => console.log(`listening ${wss.address().address}:${wss.address().port}`));
wss.on('connection', (ws) => {
  let me = null;
  ws.on('message', (data) => {
    let msg;
    try { msg = JSON.parse(data); } catch { return ws.send(JSON.stringify({ type: 'error', code: 'bad-message' })); }
    if (msg.type === 'register') {
      const c = verify(msg.token);
      if (!c || c.fam !== msg.familyId || c.dev !== msg.deviceId) return ws.close(4401);
      me = { familyId: msg.familyId, deviceId: msg.deviceId, userId: msg.userId };
      let fam = families.get(me.familyId);
      if (!fam) families.set(me.familyId, (fam = new Map()));
      const devices = [...fam.entries()].map(([deviceId, d]) => ({ deviceId, userId: d.userId }));
      const online = JSON.stringify({ type: 'device-online', familyId: me.familyId, deviceId: me.deviceId, userId: me.userId });
      for (const d of fam.values()) d.ws.send(online);
      fam.set(me.deviceId, { ws, userId: me.userId });
      return ws.send(JSON.stringify({ type: 'registered', deviceId: me.deviceId, devices, iceServers: [] }));
    }
    if (!me) return ws.send(JSON.stringify({ type: 'error', code: 'not-registered' }));
    const target = families.get(me.familyId)?.get(msg.toDeviceId);
    if (!target) return ws.send(JSON.stringify({ type: 'error', code: 'peer-offline' }));
    target.ws.send(JSON.stringify({ ...msg, familyId: me.familyId, fromDeviceId: me.deviceId, fromUserId: me.userId }));
  });
  ws.on('close', () => {
    if (!me) return;
    const fam = families.get(me.familyId);
    fam?.delete(me.deviceId);
    const off = JSON.stringify({ type: 'device-offline', familyId: me.familyId, deviceId: me.deviceId });
    for (const d of fam?.values() ?? []) d.ws.send(off);
  });
});
