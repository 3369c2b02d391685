// Two devices of one family, in one Node process, find each other through kinlink and
// exchange messages over a WebRTC data channel (libwebrtc via @roamhq/wrtc).
//
//   cargo run --release                                   # kinlink on defaults
//   (cd clients/js && npm ci && npm run build) && (cd examples/node && npm install)
//   A=$(cargo run -q --release -- token --family demo --user ana --device laptop)
//   B=$(cargo run -q --release -- token --family demo --user rui --device phone)
//   node --experimental-websocket examples/node/two-devices.mjs "$A" "$B" [ws://localhost:8080/signal]
//   (Node 22+: no flag needed.)
import wrtc from '@roamhq/wrtc';
import { KinlinkClient } from '@kinlink/client';

const [tokenA, tokenB, url = 'ws://localhost:8080/signal'] = process.argv.slice(2);
if (!tokenB) {
  console.error('usage: two-devices.mjs <token of device A> <token of device B> [signal url]');
  process.exit(2);
}
const claims = (t) => JSON.parse(Buffer.from(t.split('.')[1], 'base64url'));

function device(token) {
  const c = claims(token);
  const kin = new KinlinkClient({
    url, familyId: c.fam, userId: c.sub, deviceId: c.dev,
    token: () => token,
    RTCPeerConnection: wrtc.RTCPeerConnection,
  });
  kin.on('device-online', (d) => console.log(`${c.dev}: ${d.deviceId} is online`));
  kin.on('connected', (id, route) => console.log(`${c.dev}: connected to ${id} via ${route?.via}`));
  kin.on('unavailable', (id) => console.log(`${c.dev}: ${id} unavailable, would sync over HTTP`));
  kin.on('message', (from, data) => console.log(`${c.dev}: message from ${from}: ${data}`));
  kin.on('stopped', (why) => console.log(`${c.dev}: stopped: ${why}`));
  kin.start();
  return { kin, id: c.dev };
}

const a = device(tokenA);
const b = device(tokenB);
const deadline = Date.now() + 20_000;
while (!(a.kin.send(b.id, `hello from ${a.id}`) && b.kin.send(a.id, `hello from ${b.id}`))) {
  if (Date.now() > deadline) {
    console.log('not connected within 20 s');
    process.exit(1);
  }
  await new Promise((r) => setTimeout(r, 100));
}
await new Promise((r) => setTimeout(r, 500));
console.log(`${a.id}: ${JSON.stringify(a.kin.status().peers)}`);
a.kin.close();
b.kin.close();
process.exit(0);
