// The TypeScript client (clients/js, built) in Debian's chromium: examples/web's page, served
// by examples/web/serve.mjs, opened once per device; prints the pages' result as JSON.
//   node client.mjs <ws-url> <tokenA> <tokenB> [relay]
import { spawn } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const [url, a, b, ...rest] = process.argv.slice(2);
const relay = rest.includes('relay') ? '1' : '0';
const here = dirname(fileURLToPath(import.meta.url));
const serve = spawn('node', [join(here, '../../examples/web/serve.mjs'), '0'], { stdio: ['ignore', 'pipe', 'inherit'] });
const base = await new Promise((resolve) => serve.stdout.on('data', (d) => resolve(String(d).match(/http:\/\/[^/]+/)[0])));
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--allow-loopback-in-peer-connection', '--disable-features=WebRtcHideLocalIpsWithMdns'],
});
const log = [];
try {
  const open = async (token) => {
    const page = await browser.newPage();
    page.on('console', (m) => log.push(m.text()));
    page.on('pageerror', (e) => log.push('pageerror: ' + e.message));
    await page.goto(`${base}/?token=${token}&kinlink=${encodeURIComponent(url)}&relay=${relay}`);
    return page;
  };
  const pages = [await open(a), await open(b)];
  const t0 = Date.now();
  for (const p of pages) await p.waitForFunction(() => window.kin && window.kin.status().connected === 1, null, { timeout: 30_000 });
  const connectMs = Date.now() - t0;
  for (const [i, p] of pages.entries()) await p.evaluate((i) => window.kin.broadcast(`hello from page ${i}`), i);
  for (const p of pages) await p.waitForFunction(() => window.received.length === 1, null, { timeout: 10_000 });
  const out = [];
  for (const p of pages) {
    out.push(await p.evaluate(() => ({ status: window.kin.status(), received: window.received, indicator: document.getElementById('indicator').textContent })));
  }
  console.log(JSON.stringify({ ok: true, connectMs, pages: out, log }));
} catch (e) {
  console.log(JSON.stringify({ ok: false, error: String(e), log }));
} finally {
  await browser.close();
  serve.kill();
}
