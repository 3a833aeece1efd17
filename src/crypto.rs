//! HMAC-SHA256 claim-grant signatures in FlowFabric's format, and random
//! secrets from the server's strong random source.
//!
//! Token = `kid ":" hex(HMAC-SHA256(secret, kid ":" message))`.
//! Grant key = `pg:{fp:N}:<uuid>:<expires_at_ms>:<kid>:<hex>` where the message
//! is `{fp:N}|<uuid>|<worker_id>|<worker_instance_id>|<expires_at_ms>`.

use crate::error::{FfError, FfResult};
use crate::ids::{clip, ExecutionId};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

pub const SECRET_BYTES: usize = 32;
pub const MAX_KID_BYTES: usize = 64;

/// `kid:hex` signature of `message` under `secret`.
pub fn sign(secret: &[u8], kid: &str, message: &str) -> String {
    format!("{kid}:{}", hex::encode(mac(secret, kid, message)))
}

fn mac(secret: &[u8], kid: &str, message: &str) -> [u8; 32] {
    // HMAC accepts keys of any length, so new_from_slice cannot fail.
    let mut m = HmacSha256::new_from_slice(secret).unwrap_or_else(|_| unreachable!());
    m.update(kid.as_bytes());
    m.update(b":");
    m.update(message.as_bytes());
    m.finalize().into_bytes().into()
}

/// Constant-time check of a hex signature.
pub fn signature_matches(secret: &[u8], kid: &str, message: &str, hex_sig: &str) -> bool {
    let Ok(given) = hex::decode(hex_sig) else { return false };
    let expected = mac(secret, kid, message);
    given.len() == expected.len() && bool::from(given.ct_eq(&expected))
}

/// Checks a key id: non-empty, short, printable, and free of `:` because
/// grant keys are split on it.
pub fn check_kid(kid: &str) -> FfResult<&str> {
    let ok = !kid.is_empty()
        && kid.len() <= MAX_KID_BYTES
        && kid.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b':');
    if ok {
        Ok(kid)
    } else {
        Err(FfError::invalid(format!(
            "invalid kid \"{}\": 1 to {MAX_KID_BYTES} printable ASCII characters without ':' or spaces",
            clip(kid)
        )))
    }
}

/// The fields of a claim grant, signed and encoded as a grant key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub execution: ExecutionId,
    pub worker_id: String,
    pub worker_instance_id: String,
    pub expires_at_ms: i64,
}

impl Grant {
    pub fn message(&self) -> String {
        format!(
            "{}|{}|{}|{}|{}",
            self.execution.tag(),
            self.execution.uuid.as_hyphenated(),
            self.worker_id,
            self.worker_instance_id,
            self.expires_at_ms
        )
    }

    pub fn key(&self, kid: &str, secret: &[u8]) -> String {
        format!(
            "pg:{}:{}:{}",
            self.execution,
            self.expires_at_ms,
            sign(secret, kid, &self.message())
        )
    }
}

/// A grant key split into its parts; the signature is not checked here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedGrantKey {
    pub execution: ExecutionId,
    pub expires_at_ms: i64,
    pub kid: String,
    pub hex_sig: String,
}

/// Splits `pg:{fp:N}:<uuid>:<expires>:<kid>:<hex>`; `None` when malformed.
pub fn parse_grant_key(key: &str) -> Option<ParsedGrantKey> {
    let rest = key.strip_prefix("pg:")?;
    let mut parts = rest.rsplitn(4, ':');
    let hex_sig = parts.next()?;
    let kid = parts.next()?;
    let expires = parts.next()?;
    let exec = parts.next()?;
    if hex_sig.len() != 64 || !hex_sig.bytes().all(|b| b.is_ascii_hexdigit()) || check_kid(kid).is_err() {
        return None;
    }
    if expires.is_empty() || !expires.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(ParsedGrantKey {
        execution: ExecutionId::parse(exec).ok()?,
        expires_at_ms: expires.parse().ok()?,
        kid: kid.to_string(),
        hex_sig: hex_sig.to_ascii_lowercase(),
    })
}

/// Stable id of a grant: SHA-256 of its key (what `ff_claim_grant` stores).
pub fn grant_id(key: &str) -> Vec<u8> {
    Sha256::digest(key.as_bytes()).to_vec()
}

/// Fresh secret bytes from the server's strong random source.
pub fn random_secret() -> FfResult<Vec<u8>> {
    let mut buf = vec![0u8; SECRET_BYTES];
    // SAFETY: buf is a valid writable buffer of the given length.
    let ok = unsafe { pgrx::pg_sys::pg_strong_random(buf.as_mut_ptr().cast(), buf.len()) };
    if ok {
        Ok(buf)
    } else {
        Err(FfError::internal("could not generate random bytes"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn grant() -> Grant {
        Grant {
            execution: ExecutionId {
                partition: 24,
                uuid: Uuid::parse_str("550e8400-e29b-41d4-a716-446655440000").unwrap(),
            },
            worker_id: "w1".into(),
            worker_instance_id: "w1-i1".into(),
            expires_at_ms: 1_700_000_000_000,
        }
    }

    #[test]
    fn hmac_sha256_rfc4231_case_2() {
        // RFC 4231 test case 2, on the primitive the signatures are built on.
        let mut m = HmacSha256::new_from_slice(b"Jefe").unwrap();
        m.update(b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(m.finalize().into_bytes()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn grant_key_round_trip_and_signature() {
        let g = grant();
        assert_eq!(
            g.message(),
            "{fp:24}|550e8400-e29b-41d4-a716-446655440000|w1|w1-i1|1700000000000"
        );
        let key = g.key("k1", b"secret");
        assert!(key.starts_with("pg:{fp:24}:550e8400-e29b-41d4-a716-446655440000:1700000000000:k1:"));
        let p = parse_grant_key(&key).unwrap();
        assert_eq!(p.execution, g.execution);
        assert_eq!(p.kid, "k1");
        assert!(signature_matches(b"secret", "k1", &g.message(), &p.hex_sig));
        assert!(!signature_matches(b"other", "k1", &g.message(), &p.hex_sig));
        assert!(!signature_matches(b"secret", "k2", &g.message(), &p.hex_sig));
    }

    #[test]
    fn malformed_grant_keys() {
        let key = grant().key("k1", b"s");
        assert!(parse_grant_key(&key[3..]).is_none());
        assert!(parse_grant_key(&key[..key.len() - 1]).is_none());
        assert!(parse_grant_key("pg:{fp:1}:x:1:k:00").is_none());
        assert!(parse_grant_key(&key.replace(":1700000000000:", ":-5:")).is_none());
    }

    #[test]
    fn kid_rules() {
        assert!(check_kid("k-2026").is_ok());
        assert!(check_kid("a:b").is_err());
        assert!(check_kid("").is_err());
        assert!(check_kid("a b").is_err());
    }
}
