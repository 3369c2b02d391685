// A family of four forms all six connections and exchanges messages; a device of another
// family never appears. Prints {"event":"meshed"}; the Rust test then restarts kinlink on
// the same ports, and every client must reconnect, every pair be established again (a new
// `connected` on both sides) and carry messages.
//   node mesh.mjs <ws-url>
import { device, exchange, main, routes, until } from './harness.mjs';

const url = process.argv[2];
await main(async () => {
  const clients = ['d1', 'd2', 'd3', 'd4'].map((id) => device(url, 'fam-mesh', id));
  const stranger = device(url, 'fam-other', 'd9');
  until.debug = () => clients.map((c) => [c.signaling.state, c.status().peers.map((p) => [p.deviceId, p.state, c.peerConnection(p.deviceId)?.connectionState, c.peerConnection(p.deviceId)?.signalingState])]);
  const connects = new Map(clients.map((c) => [c, []]));
  for (const c of clients) c.on('connected', (id) => connects.get(c).push([id, Date.now()]));
  const t0 = Date.now();
  [...clients, stranger].forEach((c) => c.start());
  await until('all 6 pairs connected', () => clients.every((c) => c.status().connected === 3));
  const meshMs = Date.now() - t0;
  await exchange(clients, 'before');
  const before = clients.map(routes);

  const signalingDropped = new Set();
  for (const c of clients) c.on('signaling', (s) => s !== 'open' && signalingDropped.add(c.options.deviceId));
  const restartAt = Date.now();
  console.log(JSON.stringify({ event: 'meshed' }));
  await until('every client lost signaling', () => signalingDropped.size === 4, 30_000);
  await until('every client re-registered', () => clients.every((c) => c.signaling.state === 'open'), 30_000);
  await until('every pair established again', () =>
    clients.every((c) => clients.every((o) => o === c || connects.get(c).some(([id, t]) => id === o.options.deviceId && t > restartAt))) &&
    clients.every((c) => c.status().connected === 3), 30_000);
  const reconnectMs = Date.now() - restartAt;
  await exchange(clients, 'after');
  return {
    meshMs,
    reconnectMs,
    before,
    after: clients.map(routes),
    strangerSaw: [...stranger.seen],
    familySawStranger: clients.some((c) => c.seen.has('d9')),
    presence: clients.map((c) => c.status().devices.map((d) => d.deviceId).sort()),
  };
});
