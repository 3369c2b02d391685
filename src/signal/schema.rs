//! The protocol's JSON Schema, generated from the Rust types (schemars) and checked in as
//! `docs/protocol.schema.json`, so clients can generate their message types from it. A unit
//! test fails when the checked-in file drifts from the types (`UPDATE_SCHEMA=1 cargo test
//! schema` rewrites it); `tests/schema.rs` validates every message a real server sends and
//! accepts against it.
//!
//! Server messages are the serialized types themselves ([`ServerMsg`], and [`Relayed`] for
//! relayed offers, answers and candidates). Client messages are parsed by a hand-written
//! parser for its precise errors ([`super::protocol::parse`]); [`ClientMessage`] is the same
//! shape as typed serde, and the tests check both accept and refuse the same messages.

use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::Value;

use super::protocol::{Relayed, Route, ServerMsg, State};

/// A message a client sends.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum ClientMessage {
    /// Joins the family's presence; the first message on a connection.
    #[serde(rename_all = "camelCase")]
    Register {
        /// Must be the token's `fam`.
        family_id: String,
        /// Must be the token's `sub`.
        user_id: String,
        /// Must be the token's `dev`.
        device_id: String,
        /// The device token, unless it came on the upgrade request (`?token=` or
        /// `Authorization: Bearer`).
        #[serde(default)]
        token: Option<String>,
        /// Echoed in any `error` answering this message.
        #[serde(default, rename = "ref")]
        reference: Option<Value>,
    },
    /// An SDP offer for another device of the family.
    #[serde(rename_all = "camelCase")]
    Offer {
        /// The target device.
        to_device_id: String,
        /// Optional; must be the sender's family.
        #[serde(default)]
        family_id: Option<String>,
        /// The `RTCSessionDescription` (any JSON value, relayed verbatim).
        sdp: Value,
        /// Echoed in any `error` answering this message.
        #[serde(default, rename = "ref")]
        reference: Option<Value>,
    },
    /// An SDP answer for another device of the family.
    #[serde(rename_all = "camelCase")]
    Answer {
        /// The target device.
        to_device_id: String,
        /// Optional; must be the sender's family.
        #[serde(default)]
        family_id: Option<String>,
        /// The `RTCSessionDescription` (any JSON value, relayed verbatim).
        sdp: Value,
        /// Echoed in any `error` answering this message.
        #[serde(default, rename = "ref")]
        reference: Option<Value>,
    },
    /// A trickled ICE candidate; `null` marks the end of candidates.
    #[serde(rename_all = "camelCase")]
    IceCandidate {
        /// The target device.
        to_device_id: String,
        /// Optional; must be the sender's family.
        #[serde(default)]
        family_id: Option<String>,
        /// The `RTCIceCandidateInit` (any JSON value, `null` included, relayed verbatim).
        #[schemars(required)]
        candidate: Value,
        /// Echoed in any `error` answering this message.
        #[serde(default, rename = "ref")]
        reference: Option<Value>,
    },
    /// How this device's connection to a peer turned out, for the fallback-rate metrics.
    #[serde(rename_all = "camelCase")]
    P2pStatus {
        /// The other device.
        peer_device_id: String,
        /// Optional; must be the sender's family.
        #[serde(default)]
        family_id: Option<String>,
        /// The `RTCPeerConnection`'s `connectionState`.
        state: State,
        /// The selected pair's local candidate type, or `http`; required with `connected`.
        #[serde(default)]
        route: Option<Route>,
        /// The selected pair's remote candidate type (not `http`). With it, a one-sided relay
        /// is counted as relay from either side's report at once.
        #[serde(default)]
        remote_route: Option<Route>,
        /// The client's own measure of offer → connected, informational.
        #[serde(default)]
        connect_ms: Option<f64>,
        /// Echoed in any `error` answering this message.
        #[serde(default, rename = "ref")]
        reference: Option<Value>,
    },
}

/// The whole schema document: `ClientMessage` and `ServerMessage` (every message the server
/// sends, relayed ones included) under `$defs`.
pub fn document() -> Value {
    let generator = schemars::generate::SchemaSettings::draft2020_12().into_generator();
    let mut generator = generator;
    let client = generator.subschema_for::<ClientMessage>();
    let server = generator.subschema_for::<ServerMsg<'static>>();
    let relayed = generator.subschema_for::<Relayed<'static>>();
    let mut defs = serde_json::Map::new();
    for (name, schema) in generator.take_definitions(true) {
        defs.insert(name, schema);
    }
    defs.insert(
        "ServerMessage".into(),
        serde_json::json!({
            "description": "A message the server sends: a reply, presence, pushed credentials, an error, or a relayed offer/answer/candidate.",
            "anyOf": [server, relayed],
        }),
    );
    serde_json::json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://github.com/kinlink/kinlink/blob/main/docs/protocol.schema.json",
        "title": "kinlink signaling protocol",
        "description": "Text frames on /signal: JSON objects with a `type`. Generated from kinlink's Rust types; see docs/protocol.md.",
        "anyOf": [client, {"$ref": "#/$defs/ServerMessage"}],
        "$defs": defs,
    })
}

/// The schema as checked in: pretty JSON with a final newline.
pub fn document_text() -> String {
    serde_json::to_string_pretty(&document()).expect("a schema serializes") + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_is_checked_in_and_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/protocol.schema.json");
        let want = document_text();
        if std::env::var_os("UPDATE_SCHEMA").is_some() {
            std::fs::write(path, &want).unwrap();
        }
        let have = std::fs::read_to_string(path).unwrap_or_default();
        assert!(have == want, "docs/protocol.schema.json is out of date with the Rust types: run UPDATE_SCHEMA=1 cargo test --lib schema");
    }

    /// The hand-written parser and the typed shape accept and refuse the same messages.
    #[test]
    fn parser_and_schema_types_agree() {
        let accepted = [
            r#"{"type":"register","familyId":"f","userId":"u","deviceId":"d"}"#,
            r#"{"type":"register","familyId":"f","userId":"u","deviceId":"d","token":"t","ref":1}"#,
            r#"{"type":"offer","toDeviceId":"b","sdp":{"type":"offer","sdp":"v=0"}}"#,
            r#"{"type":"answer","toDeviceId":"b","familyId":"f","sdp":"x","ref":"a"}"#,
            r#"{"type":"ice-candidate","toDeviceId":"b","candidate":{"candidate":"c"}}"#,
            r#"{"type":"ice-candidate","toDeviceId":"b","candidate":null}"#,
            r#"{"type":"p2p-status","peerDeviceId":"b","state":"connected","route":"relay","connectMs":12}"#,
            r#"{"type":"p2p-status","peerDeviceId":"b","state":"connected","route":"srflx","remoteRoute":"relay"}"#,
            r#"{"type":"p2p-status","peerDeviceId":"b","state":"failed"}"#,
            r#"{"type":"offer","toDeviceId":"b","sdp":"x","extra":"ignored"}"#,
        ];
        for m in accepted {
            assert!(super::super::protocol::parse(m).is_ok(), "parser refuses {m}");
            assert!(serde_json::from_str::<ClientMessage>(m).is_ok(), "typed shape refuses {m}");
        }
        let refused = [
            r#"{"type":"register","familyId":"f","userId":"u"}"#,
            r#"{"type":"offer","toDeviceId":"b"}"#,
            r#"{"type":"ice-candidate","toDeviceId":"b"}"#,
            r#"{"type":"p2p-status","peerDeviceId":"b","state":"meh"}"#,
            r#"{"type":"p2p-status","peerDeviceId":"b","state":"connected","route":"tcp"}"#,
            r#"{"type":"p2p-status","peerDeviceId":"b","state":"connected","route":"host","remoteRoute":"udp"}"#,
            r#"{"type":"dance"}"#,
            r#"{"familyId":"f"}"#,
            r#"{"type":"register","familyId":5,"userId":"u","deviceId":"d"}"#,
        ];
        for m in refused {
            assert!(super::super::protocol::parse(m).is_err(), "parser accepts {m}");
            assert!(serde_json::from_str::<ClientMessage>(m).is_err(), "typed shape accepts {m}");
        }
    }
}
