/**
 * The signaling connection: one WebSocket to kinlink's `/signal`, registered with a token from
 * the app's provider, reconnected with jittered backoff by close code (./reconnect.ts), and the
 * family's presence as kinlink reports it. Knows nothing of WebRTC; ./mesh.ts builds on it.
 */
import { Emitter } from './events.js';
import { Backoff, type BackoffOptions, onClose } from './reconnect.js';
import type { ClientMessage, DeviceInfo, ErrorMessage, IceServer, Relayed, ServerMessage } from './protocol.js';

/** Why the token provider is called. */
export type TokenReason =
  /** The first connection. */
  | 'initial'
  /** kinlink refused the last token (expired, or revoked by a new secret): get a fresh one. */
  | 'refused';

/** Returns a device token (an HS256 JWT the app's backend mints); see docs/protocol.md. */
export type TokenProvider = (ctx: { reason: TokenReason }) => string | Promise<string>;

/** The subset of the WHATWG `WebSocket` the client uses (browsers, React Native, Node ≥ 22). */
export interface WebSocketLike {
  readonly readyState: number;
  onopen: ((ev: any) => void) | null;
  onclose: ((ev: { code: number; reason?: string }) => void) | null;
  onerror: ((ev: any) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
}
export type WebSocketConstructor = new (url: string) => WebSocketLike;

export interface SignalingOptions {
  /** kinlink's signaling URL, e.g. `wss://kin.example.org/signal`. */
  url: string;
  familyId: string;
  userId: string;
  deviceId: string;
  token: TokenProvider;
  /** The WebSocket implementation; default `globalThis.WebSocket`. */
  WebSocket?: WebSocketConstructor;
  backoff?: BackoffOptions;
  /** Give up on a connection attempt that has not registered after this long, ms (default 10000). */
  connectTimeoutMs?: number;
  /** Random source for the jitter (tests make it deterministic). */
  random?: () => number;
}

/**
 * `idle` before `start()`; `connecting` until `registered`; `open`; `reconnecting` while
 * waiting out a backoff; `stopped` after `close()` or a close code that must not be retried.
 */
export type SignalingState = 'idle' | 'connecting' | 'open' | 'reconnecting' | 'stopped';

export type SignalingEvents = {
  state: [SignalingState];
  /** Every successful (re)registration, with the family's other online devices. */
  registered: [devices: DeviceInfo[], iceServers: IceServer[], ttlSecs: number];
  'device-online': [DeviceInfo];
  'device-offline': [deviceId: string];
  /** The presence snapshot after every change. */
  presence: [DeviceInfo[]];
  /** An offer, answer or ice-candidate from another device of the family. */
  relayed: [Relayed];
  'ice-servers': [iceServers: IceServer[], ttlSecs: number];
  /** An `error` from kinlink (the connection may stay open; see the code). */
  'server-error': [ErrorMessage];
  /** The client stopped for good: `close()`, replaced (4409), or a refused fresh token. */
  stopped: [reason: string];
};

const OPEN = 1;

export class SignalingClient extends Emitter<SignalingEvents> {
  private ws: WebSocketLike | null = null;
  private token: string | null = null;
  private state_: SignalingState = 'idle';
  private timer: ReturnType<typeof setTimeout> | null = null;
  private connectTimer: ReturnType<typeof setTimeout> | null = null;
  private openedAt = 0;
  private refusedToken: string | null = null;
  private readonly backoff: Backoff;
  private readonly presence = new Map<string, DeviceInfo>();
  private readonly WS: WebSocketConstructor;

  constructor(readonly options: SignalingOptions) {
    super();
    const WS = options.WebSocket ?? (globalThis as any).WebSocket;
    if (!WS) throw new Error('no WebSocket implementation: pass options.WebSocket');
    this.WS = WS;
    this.backoff = new Backoff(options.backoff, options.random);
  }

  get state(): SignalingState {
    return this.state_;
  }

  /** The family's other online devices, as last reported by kinlink. */
  devices(): DeviceInfo[] {
    return [...this.presence.values()];
  }

  start(): void {
    if (this.state_ !== 'idle') return;
    void this.connect('initial');
  }

  /** Sends a message if registered; returns false (and drops it) otherwise. */
  send(msg: ClientMessage): boolean {
    if (this.state_ !== 'open' || !this.ws || this.ws.readyState !== OPEN) return false;
    this.ws.send(JSON.stringify(msg));
    return true;
  }

  /** Closes for good (code 1000). */
  close(): void {
    this.stop('closed by the app');
  }

  private setState(s: SignalingState): void {
    if (s === this.state_) return;
    this.state_ = s;
    this.emit('state', s);
  }

  private stop(reason: string): void {
    if (this.state_ === 'stopped') return;
    this.clearTimers();
    const ws = this.ws;
    this.ws = null;
    if (ws) {
      ws.onclose = ws.onmessage = ws.onerror = ws.onopen = null;
      try {
        ws.close(1000);
      } catch {
        /* already closed */
      }
    }
    this.setState('stopped');
    this.emit('stopped', reason);
  }

  private clearTimers(): void {
    if (this.timer) clearTimeout(this.timer);
    if (this.connectTimer) clearTimeout(this.connectTimer);
    this.timer = this.connectTimer = null;
  }

  private async connect(reason: TokenReason | null): Promise<void> {
    this.setState('connecting');
    if (reason !== null || this.token === null) {
      try {
        this.token = await this.options.token({ reason: reason ?? 'initial' });
      } catch (e) {
        // The app's backend is unreachable: try again later, as for a network error.
        return this.retry({ action: 'reconnect', delayMs: this.backoff.next(), reason: `token provider failed: ${e}` });
      }
      if (this.state_ === 'stopped') return;
      if (reason === 'refused' && this.token === this.refusedToken) {
        return this.stop('kinlink refused the token and the provider returned the same one');
      }
    }
    const ws = new this.WS(this.options.url);
    this.ws = ws;
    const token = this.token;
    this.connectTimer = setTimeout(() => {
      // Connected but never registered (a proxy that swallowed the upgrade, a stalled server).
      if (this.ws === ws && this.state_ === 'connecting') this.ended(ws, token, 4000);
    }, this.options.connectTimeoutMs ?? 10_000);
    ws.onopen = () => {
      const { familyId, userId, deviceId } = this.options;
      ws.send(JSON.stringify({ type: 'register', familyId, userId, deviceId, token } satisfies ClientMessage));
    };
    ws.onmessage = (ev) => {
      if (this.ws !== ws || typeof ev.data !== 'string') return;
      let msg: ServerMessage;
      try {
        msg = JSON.parse(ev.data);
      } catch {
        return;
      }
      this.onMessage(msg);
    };
    ws.onclose = (ev) => this.ended(ws, token, ev.code || 1006);
    ws.onerror = () => {
      // Browsers follow an error with a close event; some WebSocket implementations (Node 20's)
      // do not when the connection fails to open, so end it ourselves if none comes.
      setTimeout(() => this.ended(ws, token, 1006), 1000);
    };
  }

  /** The socket ended (once per socket): decide by close code. */
  private ended(ws: WebSocketLike, token: string | null, code: number): void {
    if (this.ws !== ws) return;
    this.ws = null;
    ws.onclose = ws.onmessage = ws.onerror = ws.onopen = null;
    try {
      ws.close();
    } catch {
      /* already closed */
    }
    if (this.connectTimer) clearTimeout(this.connectTimer);
    if (this.state_ === 'open') this.backoff.connectionLasted(Date.now() - this.openedAt);
    const decision = onClose(code, this.backoff);
    if (decision.action === 'refresh-token') this.refusedToken = token;
    this.retry(decision);
  }

  private retry(decision: ReturnType<typeof onClose>): void {
    if (this.state_ === 'stopped') return;
    if (decision.action === 'stop') return this.stop(decision.reason);
    this.setState('reconnecting');
    const reason = decision.action === 'refresh-token' ? 'refused' : null;
    this.timer = setTimeout(() => {
      this.timer = null;
      void this.connect(reason);
    }, decision.delayMs);
  }

  private onMessage(msg: ServerMessage): void {
    switch (msg.type) {
      case 'registered': {
        if (this.connectTimer) clearTimeout(this.connectTimer);
        this.openedAt = Date.now();
        this.refusedToken = null;
        // kinlink's list is the presence now: devices that came and went while we were away
        // are not replayed, so reconcile.
        const next = new Map(msg.devices.map((d) => [d.deviceId, d]));
        const gone = [...this.presence.keys()].filter((id) => !next.has(id));
        this.presence.clear();
        for (const [id, d] of next) this.presence.set(id, d);
        this.setState('open');
        for (const id of gone) this.emit('device-offline', id);
        this.emit('registered', msg.devices, msg.iceServers, msg.iceServersTtl);
        this.emit('presence', this.devices());
        break;
      }
      case 'device-online': {
        const d = { deviceId: msg.deviceId, userId: msg.userId };
        this.presence.set(d.deviceId, d);
        this.emit('device-online', d);
        this.emit('presence', this.devices());
        break;
      }
      case 'device-offline':
        if (this.presence.delete(msg.deviceId)) {
          this.emit('device-offline', msg.deviceId);
          this.emit('presence', this.devices());
        }
        break;
      case 'ice-servers':
        this.emit('ice-servers', msg.iceServers, msg.iceServersTtl);
        break;
      case 'error':
        this.emit('server-error', msg);
        break;
      case 'offer':
      case 'answer':
      case 'ice-candidate':
        this.emit('relayed', msg);
        break;
    }
  }
}
