//! ChannelData framing, on datagrams and on streams.
#![no_main]
use kinlink::turn::stun::{frame_len, parse_channel_data};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = parse_channel_data(data);
    let _ = frame_len(data, true);
    let _ = frame_len(data, false);
});
