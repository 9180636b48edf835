//! Any bytes as a signature header, over any body.
#![no_main]

use baton::forge::signature::{parse, verify};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let split = data.len() / 2;
    let (header, body) = data.split_at(split);
    let _ = parse(header);
    let _ = verify(b"secret", body, Some(header));
});
