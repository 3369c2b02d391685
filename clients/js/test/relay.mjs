// Relay-only: two devices with iceTransportPolicy "relay", given only kinlink's TURN URLs of
// one transport, connect through kinlink's relay and exchange messages.
//   node relay.mjs <ws-url> <udp|tcp|tls>
import { device, exchange, main, until } from './harness.mjs';

const [url, transport] = process.argv.slice(2);
const only = (servers) =>
  servers
    .map((s) => ({ ...s, urls: s.urls.filter((u) => (transport === 'tls' ? u.startsWith('turns:') : u.startsWith('turn:') && u.endsWith(`transport=${transport}`))) }))
    .filter((s) => s.urls.length > 0);
await main(async () => {
  const opts = { iceTransportPolicy: 'relay', iceServers: only };
  const clients = ['a', 'b'].map((id) => device(url, `fam-relay-${transport}`, id, opts));
  const t0 = Date.now();
  clients.forEach((c) => c.start());
  await until('relayed pair connected', () => clients.every((c) => c.status().connected === 1), 30_000);
  const connectMs = Date.now() - t0;
  await exchange(clients, 'relayed');
  return { connectMs, peers: clients.map((c) => c.status().peers[0]) };
});
