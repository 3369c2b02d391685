/**
 * The family mesh: signaling (./signaling.ts) plus one peer link (./peer.ts) per online device
 * of the family, `send(deviceId, data)` over data channels, a status per peer for the app's
 * indicator, and `p2p-status` reports so kinlink's fallback-rate metrics are right.
 *
 * Which connection is current is decided by presence: a device that (re)registers — it
 * appears in `device-online`, or in our own `registered` list after we reconnect — gets a new
 * link on both sides, so both ends always negotiate the same fresh connection. A device that
 * goes offline keeps a link that is still connected (P2P needs no signaling once up).
 */
import { Emitter } from './events.js';
import { PeerLink, type PeerStatus } from './peer.js';
import type { DeviceInfo, ErrorMessage, IceServer, Relayed } from './protocol.js';
import type { SelectedRoute } from './route.js';
import { SignalingClient, type SignalingOptions, type SignalingState } from './signaling.js';

export type PeerConnectionConstructor = new (config: RTCConfiguration) => RTCPeerConnection;

export interface KinlinkOptions extends SignalingOptions {
  /** The RTCPeerConnection implementation; default `globalThis.RTCPeerConnection`. */
  RTCPeerConnection?: PeerConnectionConstructor;
  /** `relay` to use only TURN (privacy, or testing the relay); default `all`. */
  iceTransportPolicy?: RTCIceTransportPolicy;
  /** Rewrites the ICE servers kinlink hands out before use (e.g. keep only `turns:`). */
  iceServers?: (servers: IceServer[]) => RTCIceServer[];
  /** A device not connected this long after its link started is `unavailable`: sync over HTTP. Default 15000 ms. */
  unavailableAfterMs?: number;
  /** Restart ICE when a connection stays `disconnected` this long. Default 5000 ms. */
  restartAfterDisconnectedMs?: number;
  /** Retry an ICE restart that has not connected after this long (doubling up to 60 s). Default 10000 ms. */
  restartRetryMs?: number;
  /** The data channel's label. Default `kinlink`. */
  channelLabel?: string;
  /** Send `p2p-status` reports (kinlink's fallback metrics). Default true. */
  reportStatus?: boolean;
}

export type KinlinkEvents = {
  signaling: [SignalingState];
  presence: [DeviceInfo[]];
  'device-online': [DeviceInfo];
  'device-offline': [deviceId: string];
  /** A peer's status changed. */
  peer: [PeerStatus];
  connected: [deviceId: string, route: SelectedRoute | undefined];
  /** Not connected in time: sync with this device over HTTP (reported to kinlink as `http`). */
  unavailable: [deviceId: string];
  message: [deviceId: string, data: string | ArrayBuffer];
  /** Fresh TURN credentials were pushed and applied. */
  'ice-servers': [RTCIceServer[]];
  'server-error': [ErrorMessage];
  stopped: [reason: string];
};

export interface KinlinkStatus {
  signaling: SignalingState;
  /** The family's other online devices. */
  devices: DeviceInfo[];
  /** One entry per device with a link. */
  peers: PeerStatus[];
  /** How many devices are connected peer to peer ("Connected to 2 devices"). */
  connected: number;
}

export class KinlinkClient extends Emitter<KinlinkEvents> {
  readonly signaling: SignalingClient;
  private readonly links = new Map<string, PeerLink>();
  private iceServers: RTCIceServer[] = [];
  private readonly PC: PeerConnectionConstructor;

  constructor(readonly options: KinlinkOptions) {
    super();
    const PC = options.RTCPeerConnection ?? (globalThis as any).RTCPeerConnection;
    if (!PC) throw new Error('no RTCPeerConnection implementation: pass options.RTCPeerConnection');
    this.PC = PC;
    const s = (this.signaling = new SignalingClient(options));
    s.on('state', (st) => this.emit('signaling', st));
    s.on('presence', (d) => this.emit('presence', d));
    s.on('server-error', (e) => this.emit('server-error', e));
    s.on('stopped', (r) => {
      for (const id of [...this.links.keys()]) this.drop(id);
      this.emit('stopped', r);
    });
    s.on('registered', (devices, ice) => {
      this.iceServers = this.mapIceServers(ice);
      // Our own (re)registration: every listed device gets a fresh link (it sees us come
      // online and does the same).
      const listed = new Set(devices.map((d) => d.deviceId));
      for (const d of devices) this.relink(d.deviceId);
      for (const [id, link] of this.links) if (!listed.has(id) && link.state !== 'connected') this.drop(id);
    });
    s.on('device-online', (d) => {
      this.relink(d.deviceId);
      this.emit('device-online', d);
    });
    s.on('device-offline', (id) => {
      const link = this.links.get(id);
      if (link && link.state !== 'connected') this.drop(id);
      this.emit('device-offline', id);
    });
    s.on('relayed', (m) => this.onRelayed(m));
    s.on('ice-servers', (ice) => {
      this.iceServers = this.mapIceServers(ice);
      for (const link of this.links.values()) link.setIceServers(this.iceServers);
      this.emit('ice-servers', this.iceServers);
    });
  }

  /** Connects and registers; reconnects by itself until `close()`. */
  start(): void {
    this.signaling.start();
  }

  /** Closes every peer connection and the signaling connection. */
  close(): void {
    this.signaling.close();
  }

  /** Sends to one device over its data channel; false when it is not connected. */
  send(deviceId: string, data: string | ArrayBuffer | ArrayBufferView): boolean {
    return this.links.get(deviceId)?.send(data) ?? false;
  }

  /** Sends to every connected device; returns how many it went to. */
  broadcast(data: string | ArrayBuffer | ArrayBufferView): number {
    let n = 0;
    for (const link of this.links.values()) if (link.send(data)) n++;
    return n;
  }

  status(): KinlinkStatus {
    const peers = [...this.links.values()].map((l) => l.status());
    return { signaling: this.signaling.state, devices: this.signaling.devices(), peers, connected: peers.filter((p) => p.state === 'connected').length };
  }

  peer(deviceId: string): PeerStatus | undefined {
    return this.links.get(deviceId)?.status();
  }

  /** The underlying connection to a device, for stats or media (advanced). */
  peerConnection(deviceId: string): RTCPeerConnection | undefined {
    return this.links.get(deviceId)?.pc;
  }

  private mapIceServers(ice: IceServer[]): RTCIceServer[] {
    if (this.options.iceServers) return this.options.iceServers(ice);
    return ice.map((s) => ({ urls: s.urls, ...(s.username ? { username: s.username } : {}), ...(s.credential ? { credential: s.credential } : {}) }));
  }

  private onRelayed(m: Relayed): void {
    const link = this.links.get(m.fromDeviceId) ?? this.relink(m.fromDeviceId);
    if (m.type === 'ice-candidate') link.receive({ type: 'ice-candidate', candidate: m.candidate });
    else link.receive({ type: m.type, sdp: m.sdp });
  }

  private drop(deviceId: string): void {
    const link = this.links.get(deviceId);
    if (!link) return;
    this.links.delete(deviceId);
    link.close();
  }

  /** Replaces the link to a device with a fresh one. */
  private relink(deviceId: string): PeerLink {
    this.drop(deviceId);
    const o = this.options;
    const link = new PeerLink(o.deviceId, deviceId, {
      createPeerConnection: (config) => new this.PC(config),
      configuration: { iceServers: this.iceServers, iceTransportPolicy: o.iceTransportPolicy ?? 'all' },
      signal: (msg) => this.signaling.send({ ...msg, toDeviceId: deviceId } as any),
      signalingOpen: () => this.signaling.state === 'open',
      unavailableAfterMs: o.unavailableAfterMs ?? 15_000,
      restartAfterDisconnectedMs: o.restartAfterDisconnectedMs ?? 5_000,
      restartRetryMs: o.restartRetryMs ?? 10_000,
      channelLabel: o.channelLabel ?? 'kinlink',
    });
    this.links.set(deviceId, link);
    const current = () => this.links.get(deviceId) === link;
    link.on('status', (st) => current() && this.emit('peer', st));
    link.on('message', (data) => current() && this.emit('message', deviceId, data));
    link.on('connected', (route, ms) => {
      if (!current()) return;
      if (route) this.report({ peerDeviceId: deviceId, state: 'connected', route: route.local, remoteRoute: route.remote, connectMs: ms });
      this.emit('connected', deviceId, route);
    });
    link.on('unavailable', () => {
      if (!current()) return;
      this.report({ peerDeviceId: deviceId, state: 'failed', route: 'http' });
      this.emit('unavailable', deviceId);
    });
    this.emit('peer', link.status());
    return link;
  }

  private report(m: { peerDeviceId: string; state: 'connected' | 'failed'; route: RoutePick; remoteRoute?: RoutePick; connectMs?: number }): void {
    if (this.options.reportStatus === false) return;
    this.signaling.send({ type: 'p2p-status', ...m });
  }
}

type RoutePick = 'host' | 'srflx' | 'prflx' | 'relay' | 'http';
