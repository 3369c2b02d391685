// One device of a NAT testbed case in Debian's chromium (tests/nat.rs runs it inside a client
// namespace): examples/web's page on the TypeScript client, served in the namespace by
// examples/web/serve.mjs. Prints the same result as clients/js/test/nat-peer.mjs.
// --ignore-certificate-errors lets Chromium accept the testbed's self-signed `turns:`
// certificate (libwebrtc outside a browser has no such switch: docs/deploy.md).
//   node chromium-peer.mjs <ws-url> <token> <peer-device> <report: yes|no>
import { spawn } from 'node:child_process';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const { chromium } = createRequire(join(here, '../browser/package.json'))('playwright-core');
const [url, token, peer, report] = process.argv.slice(2);
const serve = spawn('node', [join(here, '../../examples/web/serve.mjs'), '0'], { stdio: ['ignore', 'pipe', 'inherit'] });
const base = await new Promise((resolve) => serve.stdout.on('data', (d) => resolve(String(d).match(/http:\/\/[^/]+/)[0])));
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--ignore-certificate-errors', '--disable-features=WebRtcHideLocalIpsWithMdns'],
});
let out;
try {
  const page = await browser.newPage();
  const t0 = Date.now();
  await page.goto(`${base}/?token=${token}&kinlink=${encodeURIComponent(url)}&report=${report === 'yes' ? 1 : 0}`);
  await page.waitForFunction((peer) => window.kin && ['connected', 'unavailable'].includes(window.kin.peer(peer)?.state), peer, { timeout: 60_000 });
  const connectMs = Date.now() - t0;
  const unavailable = await page.evaluate((peer) => window.kin.peer(peer).state === 'unavailable', peer);
  if (!unavailable) {
    await page.waitForFunction((peer) => {
      window.kin.send(peer, 'hello from chromium');
      return window.received.some(([f]) => f === peer);
    }, peer, { timeout: 15_000, polling: 100 });
  }
  await new Promise((r) => setTimeout(r, 1500));
  out = { ok: true, connectMs, unavailable, status: await page.evaluate((peer) => window.kin.peer(peer), peer) };
} catch (e) {
  out = { ok: false, error: String(e) };
} finally {
  await browser.close();
  serve.kill();
}
console.log(JSON.stringify(out));
process.exit(0);
