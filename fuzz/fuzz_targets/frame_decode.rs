//! Arbitrary bytes as a stream of frames: decoding must never panic, never
//! allocate beyond MAX_FRAME, and every decoded message must re-encode to a
//! body that decodes to the same message.
#![no_main]

use coda::proto::frame::parse_frame;
use coda::proto::Msg;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok((frame, used)) = parse_frame(rest) {
        assert!(frame.body.len() + 9 <= coda::proto::MAX_FRAME);
        if let Ok(msg) = Msg::decode(&frame) {
            let again = Msg::decode_body(msg.kind(), &msg.encode()).expect("re-decode");
            assert_eq!(again, msg);
        }
        rest = &rest[used..];
    }
});
