/**
 * One device's connection to one other device of the family: an `RTCPeerConnection` with
 * perfect negotiation (the polite side is the one with the smaller device id), trickle ICE
 * including end-of-candidates, ICE restarts when the connection fails or stays disconnected,
 * one data channel, and the route it took. The mesh (./mesh.ts) owns the links and does the
 * signaling; a link only asks it to send.
 */
import { Emitter } from './events.js';
import { selectedRoute, type SelectedRoute } from './route.js';

export type PeerState =
  /** Negotiating, or restarting ICE. */
  | 'connecting'
  /** The data channel is open. */
  | 'connected'
  /** Not connected within the deadline: the app should sync over HTTP (still retrying). */
  | 'unavailable'
  /** Closed: the device left, or the client closed. */
  | 'closed';

/** What the app's indicator shows for one device. */
export interface PeerStatus {
  deviceId: string;
  state: PeerState;
  /** While connected: the route (`via` is what to show: host, srflx, relay-udp, …). */
  route?: SelectedRoute;
  /** When the state last changed (ms since the epoch). */
  since: number;
}

export interface LinkOptions {
  /** The RTCPeerConnection factory. */
  createPeerConnection: (config: RTCConfiguration) => RTCPeerConnection;
  configuration: RTCConfiguration;
  /** Send an offer/answer (`sdp`) or a candidate (`candidate`, null = end of candidates). */
  signal: (msg: { type: 'offer' | 'answer'; sdp: RTCSessionDescriptionInit } | { type: 'ice-candidate'; candidate: RTCIceCandidateInit | null }) => boolean;
  /** Whether signaling is up (an ICE restart needs it). */
  signalingOpen: () => boolean;
  unavailableAfterMs: number;
  /** A disconnected connection this long is restarted, ms. */
  restartAfterDisconnectedMs: number;
  /** Retry an ICE restart that did not connect after this long, ms. */
  restartRetryMs: number;
  channelLabel: string;
}

export type LinkEvents = {
  status: [PeerStatus];
  /** Connected (again): the route and the time since negotiation (re)started, ms. */
  connected: [route: SelectedRoute | undefined, connectMs: number];
  unavailable: [];
  message: [data: string | ArrayBuffer];
};

export class PeerLink extends Emitter<LinkEvents> {
  readonly pc: RTCPeerConnection;
  /** The polite side yields on offer collisions (perfect negotiation). */
  readonly polite: boolean;
  private channel: RTCDataChannel | null = null;
  private makingOffer = false;
  private ignoreOffer = false;
  private state_: PeerState = 'connecting';
  private since = Date.now();
  private route: SelectedRoute | undefined;
  private startedAt = Date.now();
  private unavailableTimer: ReturnType<typeof setTimeout> | null = null;
  private restartTimer: ReturnType<typeof setTimeout> | null = null;
  private retryMs: number;
  /** Incoming signaling is applied in order: each step awaits the previous one. */
  private queue: Promise<void> = Promise.resolve();
  private closed = false;
  private opening = false;

  constructor(readonly localId: string, readonly deviceId: string, private o: LinkOptions) {
    super();
    this.polite = localId < deviceId;
    this.retryMs = o.restartRetryMs;
    const pc = (this.pc = o.createPeerConnection(o.configuration));
    pc.onicecandidate = (e) => {
      const c = e.candidate;
      o.signal({ type: 'ice-candidate', candidate: c ? (typeof c.toJSON === 'function' ? c.toJSON() : { candidate: c.candidate, sdpMid: c.sdpMid, sdpMLineIndex: c.sdpMLineIndex }) : null });
    };
    pc.onnegotiationneeded = () => void this.offer(false);
    pc.onconnectionstatechange = () => this.onConnectionState();
    pc.ondatachannel = (e) => this.adopt(e.channel);
    // The impolite side opens the channel, so a new pair starts with one offer, not a glare.
    if (!this.polite) this.adopt(pc.createDataChannel(o.channelLabel, { ordered: true }));
    this.armUnavailable();
  }

  get state(): PeerState {
    return this.state_;
  }

  status(): PeerStatus {
    return { deviceId: this.deviceId, state: this.state_, route: this.route, since: this.since };
  }

  /** Sends on the data channel; false when it is not open. */
  send(data: string | ArrayBuffer | ArrayBufferView): boolean {
    const ch = this.channel;
    if (!ch || ch.readyState !== 'open') return false;
    ch.send(data as any);
    return true;
  }

  /** Applies an offer, answer or candidate from the peer, in order. */
  receive(msg: { type: 'offer' | 'answer'; sdp: unknown } | { type: 'ice-candidate'; candidate: unknown }): void {
    this.queue = this.queue.then(() => (msg.type === 'ice-candidate' ? this.onCandidate(msg.candidate) : this.onDescription(msg.sdp))).catch(() => {
      /* a stale or malformed message; ICE restarts recover the connection */
    });
  }

  /** New ICE servers (fresh TURN credentials): used by restarts and by this connection's next gathering. */
  setIceServers(iceServers: RTCIceServer[]): void {
    if (this.closed) return;
    this.pc.setConfiguration({ ...this.pc.getConfiguration(), iceServers });
  }

  /** Restarts ICE (new candidates, new TURN allocations) unless one is under way. */
  restart(): void {
    if (this.closed || !this.o.signalingOpen()) return;
    // A polite side that never got an offer has nothing to restart: it waits for the offer.
    if (this.polite && !this.pc.remoteDescription) return;
    this.startedAt = Date.now();
    void this.offer(true);
    this.scheduleRestartRetry();
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.clearTimers();
    this.channel?.close();
    this.pc.close();
    this.setState('closed');
  }

  private adopt(ch: RTCDataChannel): void {
    if (this.channel && this.channel !== ch) this.channel.close();
    this.channel = ch;
    ch.binaryType = 'arraybuffer';
    ch.onopen = () => void this.onOpen();
    ch.onclose = () => {
      if (this.channel === ch && !this.closed && this.state_ === 'connected') this.setState('connecting');
    };
    ch.onmessage = (e) => this.emit('message', e.data);
    if (ch.readyState === 'open') void this.onOpen();
  }

  private async onOpen(): Promise<void> {
    // The channel's open and the connection's `connected` can both lead here: once.
    if (this.closed || this.opening || this.state_ === 'connected') return;
    this.opening = true;
    this.clearTimers();
    this.retryMs = this.o.restartRetryMs;
    const route = await this.readRoute();
    this.opening = false;
    if (this.closed) return;
    this.route = route;
    this.setState('connected');
    this.emit('connected', this.route, Date.now() - this.startedAt);
  }

  private async readRoute(): Promise<SelectedRoute | undefined> {
    // The selected pair can lag `connected` by a moment on some stacks.
    for (let i = 0; i < 10 && !this.closed; i++) {
      try {
        const r = selectedRoute(await this.pc.getStats());
        if (r) return r;
      } catch {
        /* closed meanwhile */
      }
      await new Promise((r) => setTimeout(r, 50));
    }
    return undefined;
  }

  private async offer(iceRestart: boolean): Promise<void> {
    const pc = this.pc;
    if (this.closed || pc.signalingState !== 'stable' || this.makingOffer) return;
    try {
      this.makingOffer = true;
      const offer = await pc.createOffer(iceRestart ? { iceRestart: true } : undefined);
      if (pc.signalingState !== 'stable') return; // an offer came in meanwhile
      await pc.setLocalDescription(offer);
      const d = pc.localDescription!;
      this.o.signal({ type: 'offer', sdp: { type: d.type, sdp: d.sdp } });
    } catch {
      /* closed, or a collision resolved by the other side's offer */
    } finally {
      this.makingOffer = false;
    }
  }

  private async onDescription(raw: unknown): Promise<void> {
    const desc = raw as RTCSessionDescriptionInit;
    if (!desc || (desc.type !== 'offer' && desc.type !== 'answer') || typeof desc.sdp !== 'string' || this.closed) return;
    const pc = this.pc;
    const collision = desc.type === 'offer' && (this.makingOffer || pc.signalingState !== 'stable');
    this.ignoreOffer = !this.polite && collision;
    if (this.ignoreOffer) return;
    if (desc.type === 'answer' && pc.signalingState !== 'have-local-offer') return; // stale answer
    if (collision) await pc.setLocalDescription({ type: 'rollback' });
    await pc.setRemoteDescription({ type: desc.type, sdp: desc.sdp });
    if (desc.type === 'offer') {
      const answer = await pc.createAnswer();
      await pc.setLocalDescription(answer);
      const d = pc.localDescription!;
      this.o.signal({ type: 'answer', sdp: { type: d.type, sdp: d.sdp } });
    }
  }

  private async onCandidate(raw: unknown): Promise<void> {
    if (this.closed) return;
    try {
      if (raw === null || raw === undefined || (raw as RTCIceCandidateInit).candidate === '') {
        // End of candidates: lets ICE fail fast instead of waiting for more.
        await this.pc.addIceCandidate(undefined as any).catch(() => undefined);
      } else {
        await this.pc.addIceCandidate(raw as RTCIceCandidateInit);
      }
    } catch (e) {
      if (!this.ignoreOffer) throw e;
    }
  }

  private onConnectionState(): void {
    if (this.closed) return;
    const s = this.pc.connectionState;
    if (s === 'connected') {
      // After an ICE restart the channel stayed open: connected again with a new route.
      if (this.channel?.readyState === 'open' && this.state_ !== 'connected') void this.onOpen();
    } else if (s === 'failed') {
      if (this.state_ === 'connected') this.setState('connecting');
      this.armUnavailable();
      this.restart();
    } else if (s === 'disconnected') {
      // Often transient (a Wi-Fi hand-over); restart only if it lasts.
      if (this.restartTimer) clearTimeout(this.restartTimer);
      this.restartTimer = setTimeout(() => {
        this.restartTimer = null;
        if (!this.closed && this.pc.connectionState === 'disconnected') {
          if (this.state_ === 'connected') this.setState('connecting');
          this.armUnavailable();
          this.restart();
        }
      }, this.o.restartAfterDisconnectedMs);
    }
  }

  /** Retries the restart while not connected (the offer or answer may have been lost). */
  private scheduleRestartRetry(): void {
    if (this.restartTimer) clearTimeout(this.restartTimer);
    this.restartTimer = setTimeout(() => {
      this.restartTimer = null;
      if (!this.closed && this.state_ !== 'connected' && this.pc.connectionState !== 'connected') this.restart();
    }, this.retryMs);
    // Doubling up to a minute: a peer that cannot be reached is not hammered.
    this.retryMs = Math.min(this.retryMs * 2, 60_000);
  }

  private armUnavailable(): void {
    if (this.unavailableTimer || this.state_ === 'unavailable') return;
    this.unavailableTimer = setTimeout(() => {
      this.unavailableTimer = null;
      if (this.closed || this.state_ === 'connected') return;
      this.setState('unavailable');
      this.emit('unavailable');
    }, this.o.unavailableAfterMs);
  }

  private clearTimers(): void {
    if (this.unavailableTimer) clearTimeout(this.unavailableTimer);
    if (this.restartTimer) clearTimeout(this.restartTimer);
    this.unavailableTimer = this.restartTimer = null;
  }

  private setState(s: PeerState): void {
    if (s === this.state_) return;
    this.state_ = s;
    this.since = Date.now();
    if (s !== 'connected') this.route = undefined;
    this.emit('status', this.status());
  }
}
