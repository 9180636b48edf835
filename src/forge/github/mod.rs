//! GitHub as a forge: its webhook headers and payloads (`event.rs`), its
//! credentials — a token or an App's installation tokens — (`auth.rs`), its
//! REST calls for every output (`api.rs`) and the App's redelivery of missed
//! webhooks (`catchup.rs`). Nothing GitHub-specific lives outside this folder.

pub mod api;
pub mod auth;
pub mod catchup;
pub mod event;

pub use api::Client;
pub use event::{normalize, normalize_value, KNOWN_EVENTS};
