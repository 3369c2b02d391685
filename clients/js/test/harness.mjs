// Shared by the scenario scripts the project suite runs (tests/js_client.rs): device tokens
// minted like an app backend would, clients on libwebrtc (@roamhq/wrtc), and waiting helpers.
import { createHmac } from 'node:crypto';
import wrtc from '@roamhq/wrtc';
import { KinlinkClient } from '../dist/index.js';

export const secret = process.env.KL_TEST_TOKEN_SECRET;
if (!secret) throw new Error('KL_TEST_TOKEN_SECRET is not set');

/** An HS256 device token (what `kinlink token` mints). */
export function mint(fam, user, dev, ttlSecs = 3600) {
  const b64 = (v) => Buffer.from(JSON.stringify(v)).toString('base64url');
  const now = Math.floor(Date.now() / 1000);
  const body = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64({ fam, sub: user, dev, iat: now, exp: now + ttlSecs })}`;
  return `${body}.${createHmac('sha256', secret).update(body).digest('base64url')}`;
}

/** A client of the family on libwebrtc; `extra` overrides options. */
export function device(url, familyId, deviceId, extra = {}) {
  const c = new KinlinkClient({
    url,
    familyId,
    userId: `user-${deviceId}`,
    deviceId,
    token: () => mint(familyId, `user-${deviceId}`, deviceId),
    RTCPeerConnection: wrtc.RTCPeerConnection,
    backoff: { initialMs: 200, maxMs: 2000 },
    ...extra,
  });
  c.seen = new Set();
  c.received = [];
  c.on('presence', (ds) => ds.forEach((d) => c.seen.add(d.deviceId)));
  c.on('message', (from, data) => c.received.push([from, data]));
  return c;
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Polls `cond` every 50 ms; throws `what` after `ms`. */
export async function until(what, cond, ms = 20_000) {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out: ${what}${until.debug ? ' ' + JSON.stringify(until.debug()) : ''}`);
    await sleep(50);
  }
}

/** Every client sends one message to every other and each arrives. */
export async function exchange(clients, tag) {
  for (const a of clients)
    for (const b of clients) if (a !== b && !a.send(b.options.deviceId, `${tag}:${a.options.deviceId}`)) throw new Error(`${a.options.deviceId} cannot send to ${b.options.deviceId}`);
  await until(`${tag} messages`, () => clients.every((c) => clients.every((o) => o === c || c.received.some(([f, d]) => f === o.options.deviceId && d === `${tag}:${f}`))));
}

export function routes(c) {
  return Object.fromEntries(c.status().peers.map((p) => [p.deviceId, p.route?.via ?? p.state]));
}

/** Prints the result line the Rust test reads, and exits (libwebrtc threads keep Node alive). */
export function finish(result) {
  console.log(JSON.stringify(result));
  process.exit(0);
}

export async function main(fn) {
  const timer = setTimeout(() => finish({ ok: false, error: 'scenario timed out' }), 110_000);
  try {
    const r = await fn();
    clearTimeout(timer);
    finish({ ok: true, ...r });
  } catch (e) {
    finish({ ok: false, error: String(e?.stack ?? e) });
  }
}
