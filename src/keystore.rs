//! The HMAC keystore (`ff_waitpoint_hmac`): rotation, the active signing key,
//! and verification keys with a grace window for retired kids.

use crate::crypto::{check_kid, random_secret};
use crate::db::{col, col_req, exec, first_row, now_ms, with_spi};
use crate::error::{FfError, FfResult, OrRaise};
use crate::guc;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;

pub const MIN_SECRET_BYTES: usize = 16;

/// The key that signs new grants.
pub struct SigningKey {
    pub kid: String,
    pub secret: Vec<u8>,
}

/// Claims fail closed without an active key.
pub fn no_signing_key() -> FfError {
    FfError::wrong_state("the HMAC keystore has no active key; run ff_rotate_hmac_secret(kid)")
}

/// Why a kid cannot verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KidRefusal {
    Unknown,
    PastGrace,
}

/// The secret of `kid` if it may verify now: active, or retired less than
/// `flowfabric.key_grace_ms` ago.
pub fn verification_secret(c: &mut SpiClient<'_>, kid: &str) -> FfResult<Result<Vec<u8>, KidRefusal>> {
    let t = exec(c, "SELECT secret, retired_at_ms FROM ff_waitpoint_hmac WHERE kid = $1", &[kid.into()])?;
    let Some(row) = first_row(t) else { return Ok(Err(KidRefusal::Unknown)) };
    let retired_at: Option<i64> = col(&row, 2)?;
    if retired_at.is_some_and(|at| now_ms() >= at.saturating_add(guc::key_grace_ms())) {
        return Ok(Err(KidRefusal::PastGrace));
    }
    Ok(Ok(col_req(&row, 1)?))
}

/// Installs `kid` as the active key and retires the previous one. Re-running
/// with the active kid and the same secret is a no-op; reusing a kid with a
/// different secret, or a retired kid, is refused (23505).
pub fn rotate(kid: &str, secret: Option<Vec<u8>>) -> FfResult<String> {
    check_kid(kid)?;
    let secret = match secret {
        Some(s) if s.len() < MIN_SECRET_BYTES => {
            return Err(FfError::invalid(format!(
                "secret is {} bytes; at least {MIN_SECRET_BYTES} are required",
                s.len()
            )))
        }
        Some(s) => s,
        None => random_secret()?,
    };
    with_spi(|c| {
        // Rotations queue behind each other; claims (plain reads) are not blocked.
        exec(c, "LOCK TABLE ff_waitpoint_hmac IN SHARE ROW EXCLUSIVE MODE", &[])?;
        let t = exec(c, "SELECT secret = $2, active FROM ff_waitpoint_hmac WHERE kid = $1", &[kid.into(), secret.clone().into()])?;
        if let Some(row) = first_row(t) {
            let same: bool = col_req(&row, 1)?;
            let active: bool = col_req(&row, 2)?;
            if same && active {
                return Ok(kid.to_string());
            }
            return Err(FfError::duplicate(format!("kid \"{kid}\" is already installed; choose a new kid")));
        }
        let now = now_ms();
        exec(c, "UPDATE ff_waitpoint_hmac SET active = false, retired_at_ms = $1 WHERE active", &[now.into()])?;
        exec(
            c,
            "INSERT INTO ff_waitpoint_hmac (kid, secret, rotated_at_ms, active) VALUES ($1, $2, $3, true)",
            &[kid.into(), secret.into(), now.into()],
        )?;
        Ok(kid.to_string())
    })
}

/// Makes `kid` the active signing key (random 32-byte secret by default).
/// Retired kids keep verifying for flowfabric.key_grace_ms. Returns the kid.
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(@extschema@, pg_temp)]
fn ff_rotate_hmac_secret(kid: Option<String>, secret: default!(Option<Vec<u8>>, "NULL")) -> String {
    (|| rotate(&crate::error::required(kid, "kid")?, secret))().or_raise()
}
