//! The signaling wire format: JSON text frames with a `type` field and camelCase keys.
//! See docs/protocol.md for every message with an example.
//!
//! Parsing goes through one flat borrowed struct and then a typed enum, so that every bad
//! message gets a precise reason ("offer: missing toDeviceId") and the SDP and candidate
//! payloads are carried as raw JSON, never re-parsed or re-ordered.

use std::borrow::Cow;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

pub use super::negotiation::{Route, State};

/// Error codes sent in `error {code}`; the set is documented and stable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorCode {
    /// Missing, invalid or expired token, or ids that do not match it.
    Unauthorized,
    /// Invalid JSON, unknown type, missing or ill-typed field.
    BadMessage,
    /// A relay message before `register`.
    NotRegistered,
    /// A second `register` on the same connection.
    AlreadyRegistered,
    /// A `familyId` other than the sender's.
    FamilyMismatch,
    /// The target device is not online in the sender's family.
    PeerOffline,
    /// The frame exceeded `signal.max_frame_bytes`.
    TooLarge,
    /// The sender exceeded its message rate, or the target's queue is full.
    RateLimited,
    /// The family already has `signal.max_devices_per_family` devices online.
    FamilyFull,
    /// This node has `signal.max_devices` devices registered.
    ServerFull,
    /// The server is draining; reconnect (elsewhere).
    ShuttingDown,
    /// A `p2p-status` about a device this one has no negotiation with (no offer relayed
    /// between them within `signal.negotiation_timeout_secs`).
    NoNegotiation,
    /// The target is on another node and this node has lost Redis (several nodes only):
    /// retry, or fall back; devices on the same node still reach each other.
    ClusterUnavailable,
}

impl ErrorCode {
    /// Every code, for pre-registering metrics at zero.
    pub const ALL: [ErrorCode; 13] = [
        ErrorCode::Unauthorized,
        ErrorCode::BadMessage,
        ErrorCode::NotRegistered,
        ErrorCode::AlreadyRegistered,
        ErrorCode::FamilyMismatch,
        ErrorCode::PeerOffline,
        ErrorCode::TooLarge,
        ErrorCode::RateLimited,
        ErrorCode::FamilyFull,
        ErrorCode::ServerFull,
        ErrorCode::ShuttingDown,
        ErrorCode::NoNegotiation,
        ErrorCode::ClusterUnavailable,
    ];

    /// The wire name, also the metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::BadMessage => "bad-message",
            ErrorCode::NotRegistered => "not-registered",
            ErrorCode::AlreadyRegistered => "already-registered",
            ErrorCode::FamilyMismatch => "family-mismatch",
            ErrorCode::PeerOffline => "peer-offline",
            ErrorCode::TooLarge => "too-large",
            ErrorCode::RateLimited => "rate-limited",
            ErrorCode::FamilyFull => "family-full",
            ErrorCode::ServerFull => "server-full",
            ErrorCode::ShuttingDown => "shutting-down",
            ErrorCode::NoNegotiation => "no-negotiation",
            ErrorCode::ClusterUnavailable => "cluster-unavailable",
        }
    }
}

/// WebSocket close codes kinlink uses, with the reason string sent alongside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseCode {
    /// 1000: idle timeout or the client's own close.
    Normal,
    /// 1001: the server is shutting down; reconnect.
    GoingAway,
    /// 1009: a frame past `signal.hard_max_frame_bytes`.
    TooBig,
    /// 1013: family or server full; try again later.
    TryAgainLater,
    /// 4401: authentication failed.
    Unauthorized,
    /// 4403: `register` named another family than the token's.
    FamilyMismatch,
    /// 4408: no `register` within `signal.register_timeout_secs`.
    RegisterTimeout,
    /// 4409: a newer connection registered the same device.
    Replaced,
    /// 4429: the client kept flooding past the rate limit.
    RateLimited,
    /// 4000: pings went unanswered (the peer is most likely gone and never sees this).
    HeartbeatTimeout,
    /// 4001: an operator ended the session (admin API); the device may reconnect.
    Disconnected,
    /// 4410: the device or its family was revoked: its tokens are refused from now on.
    Revoked,
}

impl CloseCode {
    /// Every code, for pre-registering metrics.
    pub const ALL: [CloseCode; 12] = [
        CloseCode::Normal,
        CloseCode::GoingAway,
        CloseCode::TooBig,
        CloseCode::TryAgainLater,
        CloseCode::Unauthorized,
        CloseCode::FamilyMismatch,
        CloseCode::RegisterTimeout,
        CloseCode::Replaced,
        CloseCode::RateLimited,
        CloseCode::HeartbeatTimeout,
        CloseCode::Disconnected,
        CloseCode::Revoked,
    ];

    /// The numeric code.
    pub fn code(self) -> u16 {
        match self {
            CloseCode::Normal => 1000,
            CloseCode::GoingAway => 1001,
            CloseCode::TooBig => 1009,
            CloseCode::TryAgainLater => 1013,
            CloseCode::Unauthorized => 4401,
            CloseCode::FamilyMismatch => 4403,
            CloseCode::RegisterTimeout => 4408,
            CloseCode::Replaced => 4409,
            CloseCode::RateLimited => 4429,
            CloseCode::HeartbeatTimeout => 4000,
            CloseCode::Disconnected => 4001,
            CloseCode::Revoked => 4410,
        }
    }

    /// Bounded label for `kinlink_signal_connections_closed_total{reason}` and the close frame.
    pub fn reason(self) -> &'static str {
        match self {
            CloseCode::Normal => "idle",
            CloseCode::GoingAway => "shutdown",
            CloseCode::TooBig => "too_large",
            CloseCode::TryAgainLater => "full",
            CloseCode::Unauthorized => "unauthorized",
            CloseCode::FamilyMismatch => "family_mismatch",
            CloseCode::RegisterTimeout => "register_timeout",
            CloseCode::Replaced => "replaced",
            CloseCode::RateLimited => "rate_limited",
            CloseCode::HeartbeatTimeout => "heartbeat_timeout",
            CloseCode::Disconnected => "disconnected",
            CloseCode::Revoked => "revoked",
        }
    }
}

/// Relayed message kinds; also the `type` label of the relay metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RelayKind {
    /// SDP offer.
    Offer,
    /// SDP answer.
    Answer,
    /// Trickled ICE candidate.
    IceCandidate,
}

impl RelayKind {
    /// Every kind, for pre-registering metrics.
    pub const ALL: [RelayKind; 3] = [RelayKind::Offer, RelayKind::Answer, RelayKind::IceCandidate];

    /// The wire `type`.
    pub fn as_str(self) -> &'static str {
        match self {
            RelayKind::Offer => "offer",
            RelayKind::Answer => "answer",
            RelayKind::IceCandidate => "ice-candidate",
        }
    }

    /// The payload field: `sdp` or `candidate`.
    fn payload_field(self) -> &'static str {
        match self {
            RelayKind::Offer | RelayKind::Answer => "sdp",
            RelayKind::IceCandidate => "candidate",
        }
    }
}

/// A client message, validated.
#[derive(Debug)]
pub enum ClientMsg<'a> {
    /// `register {familyId, userId, deviceId, token?}`
    Register {
        /// Family the device claims.
        family_id: Cow<'a, str>,
        /// User the device claims.
        user_id: Cow<'a, str>,
        /// The device's id.
        device_id: Cow<'a, str>,
        /// Token, unless it came on the upgrade request.
        token: Option<Cow<'a, str>>,
    },
    /// `offer`, `answer` or `ice-candidate` to another device of the family.
    Relay {
        /// Which one.
        kind: RelayKind,
        /// Target device.
        to_device_id: Cow<'a, str>,
        /// Optional; must equal the sender's family when present.
        family_id: Option<Cow<'a, str>>,
        /// `sdp` or `candidate`, verbatim.
        payload: &'a RawValue,
    },
    /// `p2p-status {peerDeviceId, state, route?, connectMs?}`: how this device's connection
    /// to a peer turned out.
    P2pStatus {
        /// The other device.
        peer_device_id: Cow<'a, str>,
        /// Optional; must equal the sender's family when present.
        family_id: Option<Cow<'a, str>>,
        /// `connected`, `failed` or `closed`.
        state: State,
        /// Local candidate type of the selected pair, or `http`.
        route: Option<Route>,
        /// Remote candidate type of the selected pair, when the client knows it.
        remote_route: Option<Route>,
        /// The client's own measure; informational (the server measures offer → connected).
        connect_ms: Option<f64>,
    },
}

/// A rejected client message: the code and a human-readable reason, plus the client's `ref`
/// (when it could be read) to correlate the error with the request.
#[derive(Debug)]
pub struct ParseError<'a> {
    /// Always [`ErrorCode::BadMessage`] today; kept for symmetry with other errors.
    pub code: ErrorCode,
    /// What was wrong.
    pub message: String,
    /// The client's `ref`, echoed back.
    pub reference: Option<&'a RawValue>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Incoming<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow)]
    family_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    user_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    device_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    token: Option<Cow<'a, str>>,
    #[serde(borrow)]
    to_device_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    sdp: Option<&'a RawValue>,
    // `null` is a candidate too (end of candidates, what a naive `onicecandidate` sends):
    // present-but-null must not read as missing.
    #[serde(borrow, default, deserialize_with = "present")]
    candidate: Option<&'a RawValue>,
    #[serde(borrow)]
    peer_device_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    state: Option<Cow<'a, str>>,
    #[serde(borrow)]
    route: Option<Cow<'a, str>>,
    #[serde(borrow)]
    remote_route: Option<Cow<'a, str>>,
    connect_ms: Option<f64>,
    #[serde(rename = "ref", borrow)]
    reference: Option<&'a RawValue>,
}

/// A field that is present, whatever its JSON value (`null` included).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&'de RawValue>::deserialize(d).map(Some)
}

/// Parses one text frame.
pub fn parse<'a>(text: &'a str) -> Result<ClientMsg<'a>, ParseError<'a>> {
    parse_with_ref(text).map(|(msg, _)| msg)
}

/// Parses one text frame and returns the client's `ref` with it, so every answer to the
/// message (an error from a later stage too) can echo it.
pub fn parse_with_ref<'a>(text: &'a str) -> Result<(ClientMsg<'a>, Option<&'a RawValue>), ParseError<'a>> {
    let bad = |message: String, reference| ParseError { code: ErrorCode::BadMessage, message, reference };
    let msg: Incoming<'a> = match serde_json::from_str(text) {
        Ok(m) => m,
        Err(e) => {
            return Err(bad(format!("invalid message: {e}"), None));
        }
    };
    let reference = msg.reference;
    let kind_owned = msg.kind;
    let Some(kind) = kind_owned.as_deref() else {
        return Err(bad("missing `type`".into(), reference));
    };
    let need = |field: Option<Cow<'a, str>>, name: &str| -> Result<Cow<'a, str>, ParseError<'a>> {
        field.ok_or_else(|| ParseError {
            code: ErrorCode::BadMessage,
            message: format!("{kind}: missing `{name}`"),
            reference,
        })
    };
    let parsed = match kind {
        "register" => Ok(ClientMsg::Register {
            family_id: need(msg.family_id, "familyId")?,
            user_id: need(msg.user_id, "userId")?,
            device_id: need(msg.device_id, "deviceId")?,
            token: msg.token,
        }),
        "offer" | "answer" | "ice-candidate" => {
            let kind = match kind {
                "offer" => RelayKind::Offer,
                "answer" => RelayKind::Answer,
                _ => RelayKind::IceCandidate,
            };
            let to_device_id = need(msg.to_device_id, "toDeviceId")?;
            let payload = match kind {
                RelayKind::Offer | RelayKind::Answer => msg.sdp,
                RelayKind::IceCandidate => msg.candidate,
            };
            let payload = payload.ok_or_else(|| {
                bad(format!("{}: missing `{}`", kind.as_str(), kind.payload_field()), reference)
            })?;
            Ok(ClientMsg::Relay { kind, to_device_id, family_id: msg.family_id, payload })
        }
        "p2p-status" => {
            let peer_device_id = need(msg.peer_device_id, "peerDeviceId")?;
            let state = match need(msg.state, "state")?.as_ref() {
                "connected" => State::Connected,
                "failed" => State::Failed,
                "closed" => State::Closed,
                other => return Err(bad(format!("p2p-status: unknown state `{}` (connected, failed, closed)", clip(other)), reference)),
            };
            let route = match msg.route.as_deref() {
                None => None,
                Some("host") => Some(Route::Host),
                Some("srflx") => Some(Route::Srflx),
                Some("prflx") => Some(Route::Prflx),
                Some("relay") => Some(Route::Relay),
                Some("http") => Some(Route::Http),
                Some(other) => {
                    return Err(bad(format!("p2p-status: unknown route `{}` (host, srflx, prflx, relay, http)", clip(other)), reference))
                }
            };
            let remote_route = match msg.remote_route.as_deref() {
                None => None,
                Some("host") => Some(Route::Host),
                Some("srflx") => Some(Route::Srflx),
                Some("prflx") => Some(Route::Prflx),
                Some("relay") => Some(Route::Relay),
                Some(other) => {
                    return Err(bad(format!("p2p-status: unknown remoteRoute `{}` (host, srflx, prflx, relay)", clip(other)), reference))
                }
            };
            if msg.connect_ms.is_some_and(|ms| !(0.0..=86_400_000.0).contains(&ms)) {
                return Err(bad("p2p-status: `connectMs` out of range".into(), reference));
            }
            Ok(ClientMsg::P2pStatus { peer_device_id, family_id: msg.family_id, state, route, remote_route, connect_ms: msg.connect_ms })
        }
        other => Err(bad(format!("unknown message type `{}`", clip(other)), reference)),
    };
    parsed.map(|msg| (msg, reference))
}

/// A client-chosen word echoed in an error, cut short so an error never amplifies its input.
fn clip(word: &str) -> String {
    word.chars().take(32).collect()
}

/// One online device, as listed in `registered`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceInfo {
    /// Device id.
    pub device_id: String,
    /// Its user.
    pub user_id: String,
}

/// One `RTCIceServer`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct IceServer {
    /// STUN/TURN URLs.
    pub urls: Vec<String>,
    /// TURN REST username.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// TURN REST password.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

/// Messages the server sends.
#[derive(Debug, Serialize, JsonSchema)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum ServerMsg<'a> {
    /// Reply to `register`.
    #[serde(rename_all = "camelCase")]
    Registered {
        /// The registered device.
        device_id: &'a str,
        /// The family's other online devices.
        devices: &'a [DeviceInfo],
        /// STUN/TURN servers with fresh credentials.
        ice_servers: &'a [IceServer],
        /// Seconds the TURN credentials stay valid.
        ice_servers_ttl: u64,
    },
    /// A fresh ICE servers block, pushed before the previous credentials expire.
    #[serde(rename_all = "camelCase")]
    IceServers {
        /// STUN/TURN servers with fresh credentials.
        ice_servers: &'a [IceServer],
        /// Seconds the TURN credentials stay valid.
        ice_servers_ttl: u64,
    },
    /// Another device of the family came online.
    #[serde(rename_all = "camelCase")]
    DeviceOnline {
        /// Family id.
        family_id: &'a str,
        /// The device.
        device_id: &'a str,
        /// Its user.
        user_id: &'a str,
    },
    /// A device of the family went offline.
    #[serde(rename_all = "camelCase")]
    DeviceOffline {
        /// Family id.
        family_id: &'a str,
        /// The device.
        device_id: &'a str,
    },
    /// Something the client sent was refused.
    Error {
        /// Documented code.
        code: ErrorCode,
        /// Human-readable reason.
        message: &'a str,
        /// The client's `ref`, when it sent one.
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        #[schemars(with = "Option<serde_json::Value>")]
        reference: Option<&'a RawValue>,
    },
}

impl ServerMsg<'_> {
    /// Serializes to a text frame. Our types always serialize.
    pub fn to_text(&self) -> String {
        serde_json::to_string(self).expect("server messages serialize")
    }
}

/// The relayed form of `offer`/`answer`/`ice-candidate`, as the target receives it.
#[derive(Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Relayed<'a> {
    /// `offer`, `answer` or `ice-candidate`.
    #[serde(rename = "type")]
    kind: RelayKind,
    /// The sender's family (also the receiver's).
    family_id: &'a str,
    /// The sending device.
    from_device_id: &'a str,
    /// The sending device's user.
    from_user_id: &'a str,
    /// The receiving device.
    to_device_id: &'a str,
    /// With `offer` and `answer`: the sender's SDP, verbatim.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<serde_json::Value>")]
    sdp: Option<&'a RawValue>,
    /// With `ice-candidate`: the sender's candidate, verbatim (`null` at the end of candidates).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<serde_json::Value>")]
    candidate: Option<&'a RawValue>,
}

/// Builds the frame the target of a relay receives.
pub fn relayed_text(kind: RelayKind, family: &str, from_dev: &str, from_user: &str, to: &str, payload: &RawValue) -> String {
    let (sdp, candidate) = match kind {
        RelayKind::Offer | RelayKind::Answer => (Some(payload), None),
        RelayKind::IceCandidate => (None, Some(payload)),
    };
    let msg = Relayed {
        kind,
        family_id: family,
        from_device_id: from_dev,
        from_user_id: from_user,
        to_device_id: to,
        sdp,
        candidate,
    };
    serde_json::to_string(&msg).expect("relayed messages serialize")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_seed_shapes() {
        let m = parse(r#"{"type":"register","familyId":"f","userId":"u","deviceId":"d"}"#).unwrap();
        match m {
            ClientMsg::Register { family_id, user_id, device_id, token: None } => {
                assert_eq!((&*family_id, &*user_id, &*device_id), ("f", "u", "d"))
            }
            other => panic!("{other:?}"),
        }
        // Escaped ids (some serializers write `\/`) are decoded, not refused.
        let m = parse(r#"{"type":"register","familyId":"f\/1","userId":"u","deviceId":"d"}"#).unwrap();
        assert!(matches!(m, ClientMsg::Register { family_id, .. } if family_id == "f/1"));
        // The seed sends the RTCSessionDescription object as `sdp`, without familyId.
        let m = parse(r#"{"type":"offer","toDeviceId":"b","sdp":{"type":"offer","sdp":"v=0\r\n"}}"#).unwrap();
        match m {
            ClientMsg::Relay { kind: RelayKind::Offer, to_device_id, family_id: None, payload } => {
                assert_eq!(to_device_id, "b");
                assert_eq!(payload.get(), r#"{"type":"offer","sdp":"v=0\r\n"}"#)
            }
            other => panic!("{other:?}"),
        }
        let m = parse(r#"{"type":"ice-candidate","familyId":"f","toDeviceId":"b","candidate":{"candidate":"x","sdpMid":"0"}}"#)
            .unwrap();
        assert!(matches!(m, ClientMsg::Relay { kind: RelayKind::IceCandidate, family_id: Some(f), .. } if f == "f"));
    }

    #[test]
    fn bad_messages_say_why() {
        let e = parse("{nope").unwrap_err();
        assert_eq!(e.code, ErrorCode::BadMessage);
        assert!(e.message.starts_with("invalid message"));
        let e = parse(r#"{"type":"dance","ref":7}"#).unwrap_err();
        assert_eq!(e.message, "unknown message type `dance`");
        assert_eq!(e.reference.unwrap().get(), "7");
        let e = parse(r#"{"type":"offer","sdp":"x"}"#).unwrap_err();
        assert_eq!(e.message, "offer: missing `toDeviceId`");
        let e = parse(r#"{"type":"ice-candidate","toDeviceId":"b"}"#).unwrap_err();
        assert_eq!(e.message, "ice-candidate: missing `candidate`");
        let e = parse(r#"{"familyId":"f"}"#).unwrap_err();
        assert_eq!(e.message, "missing `type`");
        let e = parse(r#"{"type":"register","familyId":5,"userId":"u","deviceId":"d"}"#).unwrap_err();
        assert!(e.message.contains("invalid type"), "{}", e.message);
        assert!(parse("[]").is_err());
        assert!(parse("null").is_err());
    }

    #[test]
    fn p2p_status_is_parsed_and_checked() {
        let m = parse(r#"{"type":"p2p-status","peerDeviceId":"b","state":"connected","route":"relay","connectMs":812}"#).unwrap();
        match m {
            ClientMsg::P2pStatus { peer_device_id, family_id: None, state: State::Connected, route: Some(Route::Relay), remote_route: None, connect_ms } => {
                assert_eq!(peer_device_id, "b");
                assert_eq!(connect_ms, Some(812.0));
            }
            other => panic!("{other:?}"),
        }
        let m = parse(r#"{"type":"p2p-status","peerDeviceId":"b","state":"failed"}"#).unwrap();
        assert!(matches!(m, ClientMsg::P2pStatus { state: State::Failed, route: None, .. }));
        let e = parse(r#"{"type":"p2p-status","peerDeviceId":"b","state":"meh"}"#).unwrap_err();
        assert_eq!(e.message, "p2p-status: unknown state `meh` (connected, failed, closed)");
        let e = parse(r#"{"type":"p2p-status","peerDeviceId":"b","state":"connected","route":"tcp"}"#).unwrap_err();
        assert!(e.message.starts_with("p2p-status: unknown route `tcp`"));
        let e = parse(r#"{"type":"p2p-status","state":"connected"}"#).unwrap_err();
        assert_eq!(e.message, "p2p-status: missing `peerDeviceId`");
        let e = parse(r#"{"type":"p2p-status","peerDeviceId":"b","state":"closed","connectMs":-1}"#).unwrap_err();
        assert_eq!(e.message, "p2p-status: `connectMs` out of range");
    }

    #[test]
    fn relayed_frame_carries_payload_verbatim() {
        let payload = RawValue::from_string(r#"{"type":"answer","sdp":"v=0"}"#.into()).unwrap();
        let t = relayed_text(RelayKind::Answer, "f", "a", "ua", "b", &payload);
        assert_eq!(
            t,
            r#"{"type":"answer","familyId":"f","fromDeviceId":"a","fromUserId":"ua","toDeviceId":"b","sdp":{"type":"answer","sdp":"v=0"}}"#
        );
        let err = ServerMsg::Error { code: ErrorCode::PeerOffline, message: "m", reference: None }.to_text();
        assert_eq!(err, r#"{"type":"error","code":"peer-offline","message":"m"}"#);
    }
}
