//! A message type byte plus an arbitrary body: decoding must never panic and
//! must round-trip whatever it accepts.
#![no_main]

use coda::proto::Msg;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some((&kind, body)) = data.split_first() {
        if let Ok(msg) = Msg::decode_body(kind, body) {
            assert_eq!(msg.kind(), kind);
            assert_eq!(msg.encode(), body);
        }
    }
});
