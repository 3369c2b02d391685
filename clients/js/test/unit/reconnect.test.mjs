// The reconnect policy of docs/protocol.md, without sockets: `node --test test/unit/`.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Backoff, onClose } from '../../dist/index.js';

const fixed = (r) => () => r;

test('backoff doubles up to the ceiling with full jitter, and resets after a long connection', () => {
  const b = new Backoff({ initialMs: 500, maxMs: 4000, resetAfterMs: 60_000 }, fixed(1));
  assert.deepEqual([b.next(), b.next(), b.next(), b.next(), b.next()], [500, 1000, 2000, 4000, 4000]);
  b.connectionLasted(59_999);
  assert.equal(b.next(), 4000, 'a short connection keeps the backoff');
  b.connectionLasted(60_000);
  assert.equal(b.next(), 500);
  const zero = new Backoff({}, fixed(0));
  assert.equal(zero.next(), 0, 'full jitter reaches 0');
});

test('close codes map to the documented decisions', () => {
  const b = () => new Backoff({ initialMs: 1000, busyMs: 30_000 }, fixed(0.5));
  assert.deepEqual(onClose(4409, b()).action, 'stop', 'replaced: never loop');
  assert.deepEqual(onClose(4410, b()).action, 'stop', 'revoked: a new token must come from signing in again');
  assert.deepEqual(onClose(4001, b()).action, 'reconnect', 'disconnected by an operator: may come back');
  assert.deepEqual(onClose(4403, b()).action, 'stop');
  const refresh = onClose(4401, b());
  assert.equal(refresh.action, 'refresh-token');
  const drain = b();
  assert.deepEqual(onClose(1001, drain), { action: 'reconnect', delayMs: 0, reason: 'server draining' }, 'draining: at once');
  assert.equal(onClose(1001, drain).delayMs, 1000, 'then with backoff');
  for (const code of [1013, 4429]) {
    const d = onClose(code, b());
    assert.equal(d.action, 'reconnect');
    assert.ok(d.delayMs >= 30_000, `${code}: long backoff`);
  }
  for (const code of [1000, 1006, 1009, 4000, 4408]) assert.deepEqual(onClose(code, b()).action, 'reconnect', String(code));
});
