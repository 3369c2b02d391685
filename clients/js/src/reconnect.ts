/**
 * What to do when the signaling connection ends, by close code: the policy of
 * docs/protocol.md ("Reconnecting"). Pure, so it is tested without sockets.
 */

/** The decision for one close. */
export type CloseDecision =
  /** Reconnect after `delayMs`. */
  | { action: 'reconnect'; delayMs: number; reason: string }
  /** Ask the token provider for a fresh token, then reconnect (after `delayMs`). */
  | { action: 'refresh-token'; delayMs: number; reason: string }
  /** Stop: reconnecting would loop (replaced) or cannot succeed (a bug in the app). */
  | { action: 'stop'; reason: string };

export interface BackoffOptions {
  /** First backoff ceiling, ms (default 1000). */
  initialMs?: number;
  /** Largest backoff ceiling, ms (default 30000). */
  maxMs?: number;
  /** Floor for "server or family full" (1013) and "flooding" (4429), ms (default 30000). */
  busyMs?: number;
  /** A connection up this long resets the backoff, ms (default 60000). */
  resetAfterMs?: number;
}

/**
 * Exponential backoff with full jitter: the n-th retry waits a random time in
 * [0, min(max, initial·2ⁿ)], so a node's devices, all dropped at once by a restart, do not
 * come back at once.
 */
export class Backoff {
  readonly initialMs: number;
  readonly maxMs: number;
  readonly busyMs: number;
  readonly resetAfterMs: number;
  private attempt = 0;

  constructor(o: BackoffOptions = {}, private random: () => number = Math.random) {
    this.initialMs = o.initialMs ?? 1000;
    this.maxMs = o.maxMs ?? 30_000;
    this.busyMs = o.busyMs ?? 30_000;
    this.resetAfterMs = o.resetAfterMs ?? 60_000;
  }

  /** The next delay, and one more attempt counted. */
  next(): number {
    const ceiling = Math.min(this.maxMs, this.initialMs * 2 ** Math.min(this.attempt, 30));
    this.attempt += 1;
    return Math.round(this.random() * ceiling);
  }

  /** A connection stayed up `upMs`: reset once it passes `resetAfterMs`. */
  connectionLasted(upMs: number): void {
    if (upMs >= this.resetAfterMs) this.attempt = 0;
  }

  reset(): void {
    this.attempt = 0;
  }

  get attempts(): number {
    return this.attempt;
  }
}

/** The decision for a close with `code` (1006 when the socket ended without a close frame). */
export function onClose(code: number, backoff: Backoff): CloseDecision {
  switch (code) {
    case 1001: // draining for a deploy: another replica takes us at once
      return backoff.attempts === 0
        ? (backoff.next(), { action: 'reconnect', delayMs: 0, reason: 'server draining' })
        : { action: 'reconnect', delayMs: backoff.next(), reason: 'server draining' };
    case 1013:
    case 4429:
      return { action: 'reconnect', delayMs: backoff.busyMs + backoff.next(), reason: code === 1013 ? 'server or family full' : 'rate limited' };
    case 4401:
      return { action: 'refresh-token', delayMs: backoff.next(), reason: 'token refused or expired' };
    case 4403:
      return { action: 'stop', reason: 'register named another family than the token (an app bug)' };
    case 4409:
      return { action: 'stop', reason: 'replaced by a newer connection of this device' };
    case 4410: // a new token would come from the backend only after the user signs in again
      return { action: 'stop', reason: 'revoked: this device (or its family) was signed out by an operator' };
    default: // 1000 idle, 1006 network, 1009 too large, 4000 heartbeat, 4001 disconnected by an operator, 4408 register timeout, others
      return { action: 'reconnect', delayMs: backoff.next(), reason: `closed ${code}` };
  }
}
