//! Any bytes through a generic source's normalizer and delivery-id hashing.
#![no_main]

use baton::config::{Secret, Source};
use baton::event::generic::{body_delivery_id, normalize};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let source = Source {
        name: "ci".into(),
        secret: Secret::new("s"),
        signature_header: "X-Signature-256".into(),
        delivery_header: None,
        action_field: Some("build.status".into()),
        repo_field: Some("repo.0.name".into()),
    };
    let id = body_delivery_id(data);
    let _ = normalize(&source, &id, data);
});
