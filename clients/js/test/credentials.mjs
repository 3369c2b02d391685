// Credentials: the first token expires a few seconds in; kinlink closes with 4401, the client
// asks the provider for a fresh one ("refused"), reconnects and meshes again. Then kinlink
// pushes fresh TURN credentials (ice-servers) and the client applies them to the live
// connection with setConfiguration.
//   node credentials.mjs <ws-url> <first-token-ttl-secs>
import { device, exchange, main, mint, until } from './harness.mjs';

const [url, ttl] = process.argv.slice(2);
await main(async () => {
  const asked = [];
  const provider = (id) => ({ reason }) => {
    asked.push([id, reason]);
    return mint('fam-cred', `user-${id}`, id, reason === 'initial' ? Number(ttl) : 3600);
  };
  const clients = ['a', 'b'].map((id) => device(url, 'fam-cred', id, { token: provider(id) }));
  const pushed = [];
  clients[0].on('ice-servers', (s) => pushed.push(s));
  clients.forEach((c) => c.start());
  await until('pair connected', () => clients.every((c) => c.status().connected === 1));
  const userOf = () => clients[0].peerConnection('b').getConfiguration().iceServers.find((s) => s.username)?.username;
  const firstUser = userOf();
  await until('tokens refreshed through the provider', () => clients.every((c) => asked.some(([id, r]) => id === c.options.deviceId && r === 'refused')), 30_000);
  await until('re-registered and connected again', () => clients.every((c) => c.signaling.state === 'open' && c.status().connected === 1), 30_000);
  await exchange(clients, 'fresh-token');
  const afterRefresh = userOf();
  await until('ice-servers pushed', () => pushed.length > 0, 40_000);
  const pushedUser = pushed[0].find((s) => s.username)?.username;
  await until('pushed credentials applied to the live connection', () => userOf() === pushedUser, 5_000);
  await exchange(clients, 'after-push');
  return { asked, firstUser, afterRefresh, pushedUser, applied: userOf() };
});
