/**
 * kinlink's client: signaling, family presence and a WebRTC data-channel mesh, with HTTP
 * fallback reporting. No runtime dependencies; the platform's `WebSocket` and
 * `RTCPeerConnection` are injectable (browsers, React Native with react-native-webrtc, Node
 * with @roamhq/wrtc). See README.md.
 */
export { KinlinkClient, type KinlinkOptions, type KinlinkEvents, type KinlinkStatus, type PeerConnectionConstructor } from './mesh.js';
export { SignalingClient, type SignalingOptions, type SignalingEvents, type SignalingState, type TokenProvider, type TokenReason, type WebSocketLike, type WebSocketConstructor } from './signaling.js';
export { PeerLink, type PeerState, type PeerStatus } from './peer.js';
export { selectedRoute, type SelectedRoute, type CandidateType, type Via } from './route.js';
export { Backoff, onClose, type BackoffOptions, type CloseDecision } from './reconnect.js';
export { Emitter } from './events.js';
export * from './protocol.js';
