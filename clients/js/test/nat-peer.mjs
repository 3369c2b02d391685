// One device of a NAT testbed case (tests/nat.rs runs one in each client namespace): connects
// to its peer, exchanges a message, and prints how it connected, or that it gave up
// ("unavailable", reported to kinlink as http).
//   node nat-peer.mjs <ws-url> <family> <me> <peer> <report: yes|no> [unavailable-after-ms]
import { device, main, until } from './harness.mjs';

const [url, family, me, peer, report, unavailableAfter = '12000'] = process.argv.slice(2);
await main(async () => {
  const c = device(url, family, me, { reportStatus: report === 'yes', unavailableAfterMs: Number(unavailableAfter) });
  const t0 = Date.now();
  let unavailable = false;
  c.on('unavailable', () => (unavailable = true));
  c.start();
  await until('connected or unavailable', () => unavailable || c.status().connected === 1, 60_000);
  const connectMs = Date.now() - t0;
  if (!unavailable) {
    // Both sides send until the other's message arrives (the peer may connect a moment later).
    await until('message from the peer', () => {
      c.send(peer, `hello from ${me}`);
      return c.received.some(([f]) => f === peer);
    }, 15_000);
  }
  // Time for the peer to receive ours, and for p2p-status to reach kinlink.
  await new Promise((r) => setTimeout(r, 1500));
  return { connectMs, unavailable, status: c.peer(peer) };
});
