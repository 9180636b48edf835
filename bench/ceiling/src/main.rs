//! The ceiling: an axum handler that only checks the HMAC and answers 202.
//! What any webhook server on this machine could at best reach.

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use hmac::{Hmac, Mac};
use sha2::Sha256;

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:9901".into());
    let secret: &'static [u8] =
        Box::leak(args.next().unwrap_or_else(|| "secret".into()).into_bytes().into_boxed_slice());
    let app = axum::Router::new()
        .route(
            "/webhooks/github",
            post(move |headers: HeaderMap, body: Bytes| async move {
                let sig = headers.get("x-hub-signature-256").map(|v| v.as_bytes()).unwrap_or_default();
                let Some(hex_part) = sig.strip_prefix(b"sha256=") else { return StatusCode::UNAUTHORIZED };
                let Ok(digest) = hex::decode(hex_part) else { return StatusCode::UNAUTHORIZED };
                let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("any key length");
                mac.update(&body);
                match mac.verify_slice(&digest) {
                    Ok(()) => StatusCode::ACCEPTED,
                    Err(_) => StatusCode::UNAUTHORIZED,
                }
            }),
        )
        .layer(axum::extract::DefaultBodyLimit::max(25 * 1024 * 1024));
    let listener = tokio::net::TcpListener::bind(&listen).await.expect("bind");
    axum::serve(listener, app).await.expect("serve");
}
