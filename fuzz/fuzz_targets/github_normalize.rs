//! Any bytes, under any known event name, through the GitHub normalizer and
//! the rule matcher: errors are fine, panics are not.
#![no_main]

use baton::forge::github::{normalize, KNOWN_EVENTS};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else { return };
    let name = KNOWN_EVENTS[pick as usize % KNOWN_EVENTS.len()];
    if let Ok(event) = normalize(name, "fuzz", body) {
        let _ = serde_json::to_string(&event);
    }
});
