// Opens kinlink's /check page in Debian's chromium and prints the page's result as JSON.
//   node check.mjs single <base-url> [relay]      one page plays both devices (demo tokens)
//   node check.mjs pair <base-url> <tokenA> <tokenB> [relay]   one page per device
// Loopback WebRTC needs flags (docs/check.md): --allow-loopback-in-peer-connection gathers
// 127.0.0.1 host candidates; WebRtcHideLocalIpsWithMdns off keeps real addresses instead of
// mDNS names nobody here can resolve; --ignore-certificate-errors accepts the test's
// self-signed certificate for turns:.
import { chromium } from 'playwright-core';

const [mode, base, ...rest] = process.argv.slice(2);
const relay = rest.includes('relay') ? '1' : '0';
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: [
    '--no-sandbox',
    '--allow-loopback-in-peer-connection',
    '--disable-features=WebRtcHideLocalIpsWithMdns',
    '--ignore-certificate-errors',
  ],
});
const deadline = 60_000;
const log = [];

async function open(url) {
  const page = await browser.newPage();
  page.on('console', (m) => log.push(m.text()));
  page.on('pageerror', (e) => log.push('pageerror: ' + e.message));
  await page.goto(url);
  return page;
}

async function result(page) {
  await page.waitForFunction(() => window.kinlinkCheckResult && window.kinlinkCheckResult.done, null, { timeout: deadline });
  return page.evaluate(() => window.kinlinkCheckResult);
}

try {
  let out;
  if (mode === 'single') {
    const page = await open(`${base}/check?auto=1&relay=${relay}`);
    out = await result(page);
  } else {
    const [a, b] = rest;
    const claims = (t) => JSON.parse(Buffer.from(t.split('.')[1], 'base64url'));
    const pa = await open(`${base}/check?token=${a}&peer=${claims(b).dev}&role=offer&relay=${relay}`);
    const pb = await open(`${base}/check?token=${b}&peer=${claims(a).dev}&role=answer&relay=${relay}`);
    out = { offer: await result(pa), answer: await result(pb) };
  }
  console.log(JSON.stringify({ ok: true, result: out, log }));
} catch (e) {
  console.log(JSON.stringify({ ok: false, error: String(e), log }));
} finally {
  await browser.close();
}
