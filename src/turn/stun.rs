//! STUN (RFC 8489) and TURN (RFC 8656) wire format: a zero-copy parser, a message builder,
//! message integrity and fingerprint, and ChannelData framing.
//!
//! Why our own codec rather than the `stun` crate: the data path (ChannelData, Send and Data
//! indications) must parse and build headers in place without allocating per packet, and the
//! `stun` crate has neither MESSAGE-INTEGRITY-SHA256 nor USERHASH. Interoperability is checked
//! against independent implementations (the `turn` crate's client, coturn's `turnutils_uclient`).
//!
//! Everything here reads untrusted bytes: no indexing without a bounds check, no panics.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use hmac::{Hmac, Mac};

/// The magic cookie, in every STUN header.
pub const MAGIC_COOKIE: u32 = 0x2112_A442;
/// STUN header length.
pub const HEADER_LEN: usize = 20;

/// Methods.
pub mod method {
    /// Binding.
    pub const BINDING: u16 = 0x001;
    /// Allocate.
    pub const ALLOCATE: u16 = 0x003;
    /// Refresh.
    pub const REFRESH: u16 = 0x004;
    /// Send (indication).
    pub const SEND: u16 = 0x006;
    /// Data (indication).
    pub const DATA: u16 = 0x007;
    /// CreatePermission.
    pub const CREATE_PERMISSION: u16 = 0x008;
    /// ChannelBind.
    pub const CHANNEL_BIND: u16 = 0x009;
}

/// Message classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Request.
    Request,
    /// Indication.
    Indication,
    /// Success response.
    Success,
    /// Error response.
    Error,
}

/// Attribute types.
pub mod attr {
    /// MAPPED-ADDRESS.
    pub const MAPPED_ADDRESS: u16 = 0x0001;
    /// USERNAME.
    pub const USERNAME: u16 = 0x0006;
    /// MESSAGE-INTEGRITY.
    pub const MESSAGE_INTEGRITY: u16 = 0x0008;
    /// ERROR-CODE.
    pub const ERROR_CODE: u16 = 0x0009;
    /// UNKNOWN-ATTRIBUTES.
    pub const UNKNOWN_ATTRIBUTES: u16 = 0x000A;
    /// CHANNEL-NUMBER.
    pub const CHANNEL_NUMBER: u16 = 0x000C;
    /// LIFETIME.
    pub const LIFETIME: u16 = 0x000D;
    /// XOR-PEER-ADDRESS.
    pub const XOR_PEER_ADDRESS: u16 = 0x0012;
    /// DATA.
    pub const DATA: u16 = 0x0013;
    /// REALM.
    pub const REALM: u16 = 0x0014;
    /// NONCE.
    pub const NONCE: u16 = 0x0015;
    /// XOR-RELAYED-ADDRESS.
    pub const XOR_RELAYED_ADDRESS: u16 = 0x0016;
    /// REQUESTED-ADDRESS-FAMILY.
    pub const REQUESTED_ADDRESS_FAMILY: u16 = 0x0017;
    /// EVEN-PORT.
    pub const EVEN_PORT: u16 = 0x0018;
    /// REQUESTED-TRANSPORT.
    pub const REQUESTED_TRANSPORT: u16 = 0x0019;
    /// DONT-FRAGMENT.
    pub const DONT_FRAGMENT: u16 = 0x001A;
    /// MESSAGE-INTEGRITY-SHA256.
    pub const MESSAGE_INTEGRITY_SHA256: u16 = 0x001C;
    /// PASSWORD-ALGORITHM.
    pub const PASSWORD_ALGORITHM: u16 = 0x001D;
    /// USERHASH.
    pub const USERHASH: u16 = 0x001E;
    /// XOR-MAPPED-ADDRESS.
    pub const XOR_MAPPED_ADDRESS: u16 = 0x0020;
    /// RESERVATION-TOKEN.
    pub const RESERVATION_TOKEN: u16 = 0x0022;
    /// PRIORITY (ICE).
    pub const PRIORITY: u16 = 0x0024;
    /// USE-CANDIDATE (ICE).
    pub const USE_CANDIDATE: u16 = 0x0025;
    /// PASSWORD-ALGORITHMS.
    pub const PASSWORD_ALGORITHMS: u16 = 0x8002;
    /// ALTERNATE-DOMAIN.
    pub const ALTERNATE_DOMAIN: u16 = 0x8003;
    /// SOFTWARE.
    pub const SOFTWARE: u16 = 0x8022;
    /// FINGERPRINT.
    pub const FINGERPRINT: u16 = 0x8028;

    /// Comprehension-required attributes this server understands; any other in 0x0000-0x7FFF
    /// gets 420 Unknown Attribute (DONT-FRAGMENT included: the relay cannot honour it).
    pub fn understood(t: u16) -> bool {
        t >= 0x8000
            || matches!(
                t,
                MAPPED_ADDRESS
                    | USERNAME
                    | MESSAGE_INTEGRITY
                    | ERROR_CODE
                    | UNKNOWN_ATTRIBUTES
                    | CHANNEL_NUMBER
                    | LIFETIME
                    | XOR_PEER_ADDRESS
                    | DATA
                    | REALM
                    | NONCE
                    | XOR_RELAYED_ADDRESS
                    | REQUESTED_ADDRESS_FAMILY
                    | EVEN_PORT
                    | REQUESTED_TRANSPORT
                    | MESSAGE_INTEGRITY_SHA256
                    | PASSWORD_ALGORITHM
                    | USERHASH
                    | XOR_MAPPED_ADDRESS
                    | RESERVATION_TOKEN
                    | PRIORITY
                    | USE_CANDIDATE
            )
    }
}

/// Why bytes are not a STUN message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StunError {
    /// Shorter than a header, or than its declared length.
    #[error("truncated")]
    Truncated,
    /// Top bits set, or no magic cookie.
    #[error("not a STUN message")]
    NotStun,
    /// Length not a multiple of 4, or an attribute overruns the message.
    #[error("malformed attributes")]
    BadAttributes,
}

/// A parsed STUN message borrowing the input.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    raw: &'a [u8],
    /// Method (12 bits).
    pub method: u16,
    /// Class.
    pub class: Class,
    /// Transaction id.
    pub tid: [u8; 12],
}

/// The length of the STUN message or ChannelData frame at the start of `buf`, as declared by
/// its header (ChannelData padded to 4 when `stream`), or `None` when fewer than 4 bytes.
pub fn frame_len(buf: &[u8], stream: bool) -> Option<usize> {
    if buf.len() < 4 {
        return None;
    }
    let len = u16::from_be_bytes([buf[2], buf[3]]) as usize;
    if buf[0] & 0xC0 == 0 {
        Some(HEADER_LEN + len)
    } else if stream {
        Some(4 + ((len + 3) & !3))
    } else {
        Some(4 + len)
    }
}

impl<'a> Message<'a> {
    /// Parses and validates the header and the attribute layout. Trailing bytes beyond the
    /// declared length are ignored (a datagram carries exactly one message).
    pub fn parse(buf: &'a [u8]) -> Result<Message<'a>, StunError> {
        if buf.len() < HEADER_LEN {
            return Err(StunError::Truncated);
        }
        let typ = u16::from_be_bytes([buf[0], buf[1]]);
        let len = u16::from_be_bytes([buf[2], buf[3]]) as usize;
        if typ & 0xC000 != 0 || u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]) != MAGIC_COOKIE {
            return Err(StunError::NotStun);
        }
        if !len.is_multiple_of(4) {
            return Err(StunError::BadAttributes);
        }
        let raw = buf.get(..HEADER_LEN + len).ok_or(StunError::Truncated)?;
        let mut tid = [0u8; 12];
        tid.copy_from_slice(&raw[8..20]);
        let class = match ((typ >> 7) & 0x2) | ((typ >> 4) & 0x1) {
            0 => Class::Request,
            1 => Class::Indication,
            2 => Class::Success,
            _ => Class::Error,
        };
        let method = (typ & 0x000F) | ((typ & 0x00E0) >> 1) | ((typ & 0x3E00) >> 2);
        let msg = Message { raw, method, class, tid };
        // Validate the attribute walk once so iteration can trust it.
        let mut pos = HEADER_LEN;
        while pos < raw.len() {
            let hdr = raw.get(pos..pos + 4).ok_or(StunError::BadAttributes)?;
            let alen = u16::from_be_bytes([hdr[2], hdr[3]]) as usize;
            let end = pos + 4 + ((alen + 3) & !3);
            if end > raw.len() {
                return Err(StunError::BadAttributes);
            }
            pos = end;
        }
        Ok(msg)
    }

    /// The message bytes.
    pub fn raw(&self) -> &'a [u8] {
        self.raw
    }

    /// Iterates `(type, value, offset of the attribute header)`.
    pub fn attributes(&self) -> impl Iterator<Item = (u16, &'a [u8], usize)> + 'a {
        let raw = self.raw;
        let mut pos = HEADER_LEN;
        std::iter::from_fn(move || {
            let hdr = raw.get(pos..pos + 4)?;
            let t = u16::from_be_bytes([hdr[0], hdr[1]]);
            let alen = u16::from_be_bytes([hdr[2], hdr[3]]) as usize;
            let value = raw.get(pos + 4..pos + 4 + alen)?;
            let at = pos;
            pos += 4 + ((alen + 3) & !3);
            Some((t, value, at))
        })
    }

    /// The first attribute of type `t` before any MESSAGE-INTEGRITY (attributes after it are
    /// not covered by the integrity check and are ignored, per RFC 8489 §14.5), except
    /// FINGERPRINT itself.
    pub fn get(&self, t: u16) -> Option<&'a [u8]> {
        for (at, value, _) in self.attributes() {
            if at == t {
                return Some(value);
            }
            if (at == attr::MESSAGE_INTEGRITY || at == attr::MESSAGE_INTEGRITY_SHA256) && t != attr::FINGERPRINT {
                return None;
            }
        }
        None
    }

    /// ERROR-CODE as its number and reason phrase (the decoding of [`Builder::error`]).
    pub fn error_code(&self) -> Option<(u16, std::borrow::Cow<'a, str>)> {
        let v = self.get(attr::ERROR_CODE).filter(|v| v.len() >= 4)?;
        Some(((v[2] & 0x07) as u16 * 100 + v[3] as u16, String::from_utf8_lossy(&v[4..])))
    }

    /// Every XOR-PEER-ADDRESS (CreatePermission may carry several).
    pub fn xor_peer_addresses(&self) -> impl Iterator<Item = Option<SocketAddr>> + 'a {
        let tid = self.tid;
        let mut seen_integrity = false;
        self.attributes().filter_map(move |(t, v, _)| {
            if t == attr::MESSAGE_INTEGRITY || t == attr::MESSAGE_INTEGRITY_SHA256 {
                seen_integrity = true;
            }
            (!seen_integrity && t == attr::XOR_PEER_ADDRESS).then(|| decode_xor_addr(v, &tid))
        })
    }

    /// Comprehension-required attribute types not understood (for 420).
    pub fn unknown_required(&self) -> Vec<u16> {
        self.attributes().map(|(t, _, _)| t).filter(|t| !attr::understood(*t)).collect()
    }

    /// Verifies MESSAGE-INTEGRITY (HMAC-SHA1) with `key`. False when absent or wrong.
    pub fn verify_integrity(&self, key: &[u8]) -> bool {
        self.verify_mac(attr::MESSAGE_INTEGRITY, key)
    }

    /// Verifies MESSAGE-INTEGRITY-SHA256 with `key`. False when absent or wrong.
    pub fn verify_integrity_sha256(&self, key: &[u8]) -> bool {
        self.verify_mac(attr::MESSAGE_INTEGRITY_SHA256, key)
    }

    fn verify_mac(&self, which: u16, key: &[u8]) -> bool {
        let Some((_, value, at)) = self.attributes().find(|(t, _, _)| *t == which) else { return false };
        // The length field must count up to the end of the integrity attribute.
        let len_through = (at + 4 + value.len() - HEADER_LEN) as u16;
        let mut head = [0u8; 4];
        head[..2].copy_from_slice(&self.raw[..2]);
        head[2..].copy_from_slice(&len_through.to_be_bytes());
        match which {
            attr::MESSAGE_INTEGRITY => {
                let mut mac = Hmac::<sha1::Sha1>::new_from_slice(key).expect("any key length");
                mac.update(&head);
                mac.update(&self.raw[4..at]);
                mac.verify_slice(value).is_ok()
            }
            _ => {
                let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key).expect("any key length");
                mac.update(&head);
                mac.update(&self.raw[4..at]);
                // RFC 8489 §14.6: may be truncated to no fewer than 16 bytes.
                value.len() >= 16 && value.len() <= 32 && mac.verify_truncated_left(value).is_ok()
            }
        }
    }

    /// Whether a FINGERPRINT attribute is present.
    pub fn has_fingerprint(&self) -> bool {
        self.attributes().any(|(t, _, _)| t == attr::FINGERPRINT)
    }

    /// Checks FINGERPRINT if present (true when absent or valid).
    pub fn fingerprint_ok(&self) -> bool {
        match self.attributes().find(|(t, _, _)| *t == attr::FINGERPRINT) {
            None => true,
            Some((_, value, at)) => {
                if value.len() != 4 || at + 8 != self.raw.len() {
                    return false;
                }
                let crc = crc32fast::hash(&self.raw[..at]) ^ 0x5354_554e;
                value == crc.to_be_bytes()
            }
        }
    }
}

/// Encodes a message type from method and class.
pub fn message_type(method: u16, class: Class) -> u16 {
    let c = match class {
        Class::Request => 0,
        Class::Indication => 1,
        Class::Success => 2,
        Class::Error => 3,
    };
    (method & 0x000F) | ((method & 0x0070) << 1) | ((method & 0x0F80) << 2) | ((c & 1) << 4) | ((c & 2) << 7)
}

/// Decodes an XOR-MAPPED/PEER/RELAYED-ADDRESS value.
pub fn decode_xor_addr(v: &[u8], tid: &[u8; 12]) -> Option<SocketAddr> {
    if v.len() < 4 {
        return None;
    }
    let port = u16::from_be_bytes([v[2], v[3]]) ^ (MAGIC_COOKIE >> 16) as u16;
    let cookie = MAGIC_COOKIE.to_be_bytes();
    match v[1] {
        0x01 if v.len() == 8 => {
            let mut ip = [0u8; 4];
            for i in 0..4 {
                ip[i] = v[4 + i] ^ cookie[i];
            }
            Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port))
        }
        0x02 if v.len() == 20 => {
            let mut ip = [0u8; 16];
            for i in 0..16 {
                let k = if i < 4 { cookie[i] } else { tid[i - 4] };
                ip[i] = v[4 + i] ^ k;
            }
            Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port))
        }
        _ => None,
    }
}

/// Writes an XOR address value into `out` (8 or 20 bytes); returns the length.
pub fn encode_xor_addr(addr: SocketAddr, tid: &[u8; 12], out: &mut [u8; 20]) -> usize {
    let cookie = MAGIC_COOKIE.to_be_bytes();
    out[0] = 0;
    out[2..4].copy_from_slice(&(addr.port() ^ (MAGIC_COOKIE >> 16) as u16).to_be_bytes());
    match addr.ip() {
        IpAddr::V4(ip) => {
            out[1] = 0x01;
            for (i, b) in ip.octets().iter().enumerate() {
                out[4 + i] = b ^ cookie[i];
            }
            8
        }
        IpAddr::V6(ip) => {
            out[1] = 0x02;
            for (i, b) in ip.octets().iter().enumerate() {
                let k = if i < 4 { cookie[i] } else { tid[i - 4] };
                out[4 + i] = b ^ k;
            }
            20
        }
    }
}

/// Builds a STUN message into a `Vec`.
pub struct Builder {
    buf: Vec<u8>,
    tid: [u8; 12],
}

impl Builder {
    /// Starts a message.
    pub fn new(method: u16, class: Class, tid: [u8; 12]) -> Self {
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(&message_type(method, class).to_be_bytes());
        buf.extend_from_slice(&[0, 0]);
        buf.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
        buf.extend_from_slice(&tid);
        Builder { buf, tid }
    }

    /// Appends an attribute with padding.
    pub fn attr(&mut self, t: u16, value: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(&t.to_be_bytes());
        self.buf.extend_from_slice(&(value.len() as u16).to_be_bytes());
        self.buf.extend_from_slice(value);
        let pad = (4 - value.len() % 4) % 4;
        self.buf.extend_from_slice(&[0u8; 3][..pad]);
        self
    }

    /// Appends an XOR-encoded address attribute.
    pub fn xor_addr(&mut self, t: u16, addr: SocketAddr) -> &mut Self {
        let mut v = [0u8; 20];
        let n = encode_xor_addr(addr, &self.tid, &mut v);
        self.attr(t, &v[..n])
    }

    /// Appends a 32-bit attribute (LIFETIME).
    pub fn u32_attr(&mut self, t: u16, v: u32) -> &mut Self {
        self.attr(t, &v.to_be_bytes())
    }

    /// Appends ERROR-CODE.
    pub fn error(&mut self, code: u16, reason: &str) -> &mut Self {
        let mut v = Vec::with_capacity(4 + reason.len());
        v.extend_from_slice(&[0, 0, (code / 100) as u8, (code % 100) as u8]);
        v.extend_from_slice(reason.as_bytes());
        self.attr(attr::ERROR_CODE, &v)
    }

    fn set_len(&mut self, extra: usize) {
        let len = (self.buf.len() - HEADER_LEN + extra) as u16;
        self.buf[2..4].copy_from_slice(&len.to_be_bytes());
    }

    /// Appends MESSAGE-INTEGRITY (HMAC-SHA1) keyed with `key`.
    pub fn integrity(&mut self, key: &[u8]) -> &mut Self {
        self.set_len(24);
        let mut mac = Hmac::<sha1::Sha1>::new_from_slice(key).expect("any key length");
        mac.update(&self.buf);
        let tag = mac.finalize().into_bytes();
        self.attr(attr::MESSAGE_INTEGRITY, &tag)
    }

    /// Appends MESSAGE-INTEGRITY-SHA256 keyed with `key`.
    pub fn integrity_sha256(&mut self, key: &[u8]) -> &mut Self {
        self.set_len(36);
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key).expect("any key length");
        mac.update(&self.buf);
        let tag = mac.finalize().into_bytes();
        self.attr(attr::MESSAGE_INTEGRITY_SHA256, &tag)
    }

    /// Appends FINGERPRINT and returns the message.
    pub fn finish_with_fingerprint(mut self) -> Vec<u8> {
        self.set_len(8);
        let crc = crc32fast::hash(&self.buf) ^ 0x5354_554e;
        self.attr(attr::FINGERPRINT, &crc.to_be_bytes());
        self.buf
    }

    /// Returns the message without FINGERPRINT.
    pub fn finish(mut self) -> Vec<u8> {
        self.set_len(0);
        self.buf
    }
}

/// Channel numbers accepted: RFC 5766's 0x4000 through 0x7FFF. RFC 8656 narrowed new
/// bindings to 0x4FFF, but deployed clients still use the old range: coturn's pick a number
/// from all of it (0x7FFF included, one bind in 16,384) and coturn accepts all of it.
pub const CHANNELS: std::ops::RangeInclusive<u16> = 0x4000..=0x7FFF;

/// Parses a ChannelData header: `(channel, payload)`.
pub fn parse_channel_data(buf: &[u8]) -> Option<(u16, &[u8])> {
    if buf.len() < 4 {
        return None;
    }
    let channel = u16::from_be_bytes([buf[0], buf[1]]);
    let len = u16::from_be_bytes([buf[2], buf[3]]) as usize;
    if !CHANNELS.contains(&channel) {
        return None;
    }
    buf.get(4..4 + len).map(|p| (channel, p))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 5769 §2.1 "Sample Request" (short-term credential), as the RFC prints it.
    const RFC5769_REQUEST: &str = "
        00 01 00 58 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
        80 22 00 10 53 54 55 4e 20 74 65 73 74 20 63 6c 69 65 6e 74
        00 24 00 04 6e 00 01 ff
        80 29 00 08 93 2f f9 b1 51 26 3b 36
        00 06 00 09 65 76 74 6a 3a 68 36 76 59 20 20 20
        00 08 00 14 9a ea a7 0c bf d8 cb 56 78 1e f2 b5 b2 d3 f2 49 c1 b5 71 a2
        80 28 00 04 e5 7a 3b cf";

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| c.is_ascii_hexdigit()).collect();
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    #[test]
    fn rfc5769_request_vector() {
        let raw = hex(RFC5769_REQUEST);
        let m = Message::parse(&raw).unwrap();
        assert_eq!((m.method, m.class), (method::BINDING, Class::Request));
        assert_eq!(m.get(attr::USERNAME), Some(&b"evtj:h6vY"[..]));
        assert!(m.verify_integrity(b"VOkJxbRl1RmTxUk/WvJxBt"));
        assert!(!m.verify_integrity(b"wrong"));
        assert!(m.fingerprint_ok());
        assert_eq!(m.get(attr::SOFTWARE), Some(&b"STUN test client"[..]));
    }

    #[test]
    fn rfc5769_ipv6_response_address() {
        // §2.3: XOR-MAPPED-ADDRESS 2001:db8:1234:5678:11:2233:4455:6677 port 32853.
        let raw = hex("010100482112a442b7e7a701bc34d686fa87dfae8022000b7465737420766563746f7220002000140002a1470113a9faa5d3f179bc25f4b5bed2b9d900080014a382954e4be67bf11784c97c8292c275bfe3ed4180280004c8fb0b4c");
        let m = Message::parse(&raw).unwrap();
        assert_eq!(m.class, Class::Success);
        let addr = decode_xor_addr(m.get(attr::XOR_MAPPED_ADDRESS).unwrap(), &m.tid).unwrap();
        assert_eq!(addr, "[2001:db8:1234:5678:11:2233:4455:6677]:32853".parse().unwrap());
        assert!(m.verify_integrity(b"VOkJxbRl1RmTxUk/WvJxBt"));
        assert!(m.fingerprint_ok());
    }

    #[test]
    fn build_then_parse_round_trip() {
        let tid = [7u8; 12];
        let mut b = Builder::new(method::ALLOCATE, Class::Error, tid);
        b.error(401, "Unauthorized").attr(attr::REALM, b"kinlink").xor_addr(attr::XOR_PEER_ADDRESS, "[::1]:9".parse().unwrap());
        b.integrity(b"key").integrity_sha256(b"key");
        let raw = b.finish_with_fingerprint();
        let m = Message::parse(&raw).unwrap();
        assert_eq!((m.method, m.class, m.tid), (method::ALLOCATE, Class::Error, tid));
        assert!(m.verify_integrity(b"key"));
        assert!(m.verify_integrity_sha256(b"key"));
        assert!(m.fingerprint_ok());
        assert_eq!(m.get(attr::ERROR_CODE).unwrap()[2..4], [4, 1]);
        assert_eq!(m.error_code(), Some((401, "Unauthorized".into())));
        assert_eq!(m.xor_peer_addresses().collect::<Vec<_>>(), vec![Some("[::1]:9".parse().unwrap())]);
        for method in 0..0x1000u16 {
            for class in [Class::Request, Class::Indication, Class::Success, Class::Error] {
                let raw = Builder::new(method, class, tid).finish();
                let m = Message::parse(&raw).unwrap();
                assert_eq!((m.method, m.class), (method, class));
            }
        }
    }

    #[test]
    fn malformed_inputs_are_errors_not_panics() {
        assert_eq!(Message::parse(&[0; 10]).unwrap_err(), StunError::Truncated);
        let mut raw = Builder::new(method::BINDING, Class::Request, [1; 12]).finish();
        raw[4] = 0;
        assert_eq!(Message::parse(&raw).unwrap_err(), StunError::NotStun);
        // Attribute overrunning the message.
        let mut raw = Builder::new(method::BINDING, Class::Request, [1; 12]).finish();
        raw.extend_from_slice(&[0x00, 0x06, 0x00, 0x40, b'a', b'b', b'c', b'd']);
        raw[3] = 8;
        assert_eq!(Message::parse(&raw).unwrap_err(), StunError::BadAttributes);
        assert_eq!(parse_channel_data(&[0x40, 0x00, 0x00, 0x05, 1, 2]), None);
        assert_eq!(parse_channel_data(&[0x40, 0x01, 0x00, 0x02, 1, 2]), Some((0x4001, &[1u8, 2][..])));
        assert_eq!(parse_channel_data(&[0x7F, 0xFF, 0x00, 0x00]), Some((0x7FFF, &[][..])));
        assert_eq!(parse_channel_data(&[0x80, 0x00, 0x00, 0x00]), None);
        assert_eq!(parse_channel_data(&[0x3F, 0xFF, 0x00, 0x00]), None);
        assert_eq!(frame_len(&[0x40, 0x00, 0x00, 0x05], true), Some(12));
        assert_eq!(frame_len(&[0x40, 0x00, 0x00, 0x05], false), Some(9));
    }
}
