//! Webhook signatures: `sha256=<hex HMAC-SHA256 of the raw body>`, as GitHub
//! sends them and generic sources send in their configured header. Shared by
//! the forges and by generic sources (`ingress`).

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("missing signature header: give the webhook a secret, the one baton.toml names")]
    Missing,
    #[error("malformed signature: expected sha256=<64 hex digits>")]
    Malformed,
    #[error("signature does not match: the webhook's secret and the one baton.toml names differ, or the body was changed on the way")]
    Mismatch,
}

/// Delivery ids and event names become store keys and log fields: keep them
/// short and printable.
pub(crate) fn valid_token(s: &str) -> bool {
    !s.is_empty() && s.len() <= 200 && s.chars().all(|c| c.is_ascii_graphic())
}

/// The header value for `body` signed with `secret`.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC accepts keys of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Checks a signature header. The comparison is constant-time
/// (`Mac::verify_slice`), so timing reveals nothing about the expected value.
pub fn verify(secret: &[u8], body: &[u8], header: Option<&[u8]>) -> Result<(), SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?;
    let digest = parse(header)?;
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC accepts keys of any length");
    mac.update(body);
    mac.verify_slice(&digest).map_err(|_| SignatureError::Mismatch)
}

/// `sha256=` followed by exactly 64 hex digits (either case).
pub fn parse(header: &[u8]) -> Result<[u8; 32], SignatureError> {
    let hex_part = header.trim_ascii().strip_prefix(b"sha256=").ok_or(SignatureError::Malformed)?;
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_part, &mut out).map_err(|_| SignatureError::Malformed)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    // GitHub's documented example ("Validating webhook deliveries").
    const SECRET: &[u8] = b"It's a Secret to Everybody";
    const PAYLOAD: &[u8] = b"Hello, World!";
    const SIGNATURE: &str = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";

    #[test]
    fn githubs_documented_example() {
        assert_eq!(sign(SECRET, PAYLOAD), SIGNATURE);
        assert_eq!(verify(SECRET, PAYLOAD, Some(SIGNATURE.as_bytes())), Ok(()));
    }

    #[test]
    fn rejects_wrong_missing_and_malformed() {
        assert_eq!(verify(SECRET, b"Hello, World?", Some(SIGNATURE.as_bytes())), Err(SignatureError::Mismatch));
        assert_eq!(verify(b"other", PAYLOAD, Some(SIGNATURE.as_bytes())), Err(SignatureError::Mismatch));
        assert_eq!(verify(SECRET, PAYLOAD, None), Err(SignatureError::Missing));
        for bad in ["", "sha256=", "sha1=757107ea", "sha256=zz", &SIGNATURE[..70], &format!("{SIGNATURE}00")] {
            assert_eq!(verify(SECRET, PAYLOAD, Some(bad.as_bytes())), Err(SignatureError::Malformed), "{bad:?}");
        }
        let upper = format!("sha256={}", SIGNATURE[7..].to_uppercase());
        assert_eq!(verify(SECRET, PAYLOAD, Some(upper.as_bytes())), Ok(()));
    }
}
