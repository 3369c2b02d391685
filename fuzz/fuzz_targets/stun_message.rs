//! The STUN/TURN message parser and everything that reads a parsed message.
#![no_main]
use kinlink::turn::stun::{decode_xor_addr, Message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Message::parse(data) {
        for (t, v, _) in m.attributes() {
            let _ = decode_xor_addr(v, &m.tid);
            let _ = m.get(t);
        }
        let _ = m.xor_peer_addresses().count();
        let _ = m.unknown_required();
        let _ = m.verify_integrity(b"key");
        let _ = m.verify_integrity_sha256(b"key");
        let _ = m.fingerprint_ok();
    }
});
