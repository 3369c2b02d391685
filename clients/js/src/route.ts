/**
 * Which route a connected `RTCPeerConnection` took, from `getStats()`: the selected candidate
 * pair's local and remote candidate types, and the local relay's transport. Browsers,
 * react-native-webrtc and node libwebrtc report the same stats.
 */
import type { Route } from './protocol.js';

/** A candidate type, as `p2p-status` carries it. */
export type CandidateType = Exclude<Route, 'http'>;

/** How a connection reaches its peer, for the app's indicator. */
export type Via = 'host' | 'srflx' | 'prflx' | 'relay-udp' | 'relay-tcp' | 'relay-tls';

export interface SelectedRoute {
  /** This end's candidate type (`route` in `p2p-status`). */
  local: CandidateType;
  /** The other end's candidate type (`remoteRoute`). */
  remote: CandidateType;
  /**
   * `relay-*` when either end relays (every byte crosses TURN): this end's TURN transport when
   * it is the one relaying, `relay-udp` when only the peer's end does (we reach its relay
   * over UDP); otherwise the local candidate type.
   */
  via: Via;
}

const types: readonly string[] = ['host', 'srflx', 'prflx', 'relay'];

/** Reads the selected pair from a stats report; undefined while there is none. */
export function selectedRoute(stats: RTCStatsReport): SelectedRoute | undefined {
  let pair: any;
  stats.forEach((s: any) => {
    if (s.type === 'transport' && s.selectedCandidatePairId) pair = stats.get(s.selectedCandidatePairId);
  });
  if (!pair) {
    stats.forEach((s: any) => {
      if (s.type === 'candidate-pair' && s.nominated && s.state === 'succeeded' && (!pair || s.selected)) pair = s;
    });
  }
  if (!pair) return undefined;
  const local: any = stats.get(pair.localCandidateId);
  const remote: any = stats.get(pair.remoteCandidateId);
  const lt = local?.candidateType;
  const rt = remote?.candidateType;
  if (!types.includes(lt) || !types.includes(rt)) return undefined;
  let via: Via;
  if (lt === 'relay') {
    const p = String(local.relayProtocol ?? 'udp').toLowerCase();
    via = p === 'tls' ? 'relay-tls' : p === 'tcp' ? 'relay-tcp' : 'relay-udp';
  } else if (rt === 'relay') {
    via = 'relay-udp';
  } else {
    via = lt as Via;
  }
  return { local: lt, remote: rt, via };
}
