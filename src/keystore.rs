//! The HMAC keystore (`ff_waitpoint_hmac`): rotation, the active signing key,
//! and verification keys with a grace window for retired kids.

use crate::crypto::{check_kid, random_secret};
use crate::db::{col_req, exec, first_row, now_ms, with_spi};
use crate::error::{FfError, FfResult, OrRaise};
use crate::guc;
use pgrx::prelude::*;

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

/// A kid's secret if it may verify at `now`: active, or retired less than
/// `flowfabric.key_grace_ms` ago.
pub fn verification_secret(secret: Vec<u8>, retired_at_ms: Option<i64>, now: i64) -> Result<Vec<u8>, KidRefusal> {
    if retired_at_ms.is_some_and(|at| now >= at.saturating_add(guc::key_grace_ms())) {
        return Err(KidRefusal::PastGrace);
    }
    Ok(secret)
}

/// Whether the role calling us is a superuser. Inside a SECURITY DEFINER
/// function the current user is the extension's owner, so ask about the
/// outer user (the session's role, after any SET ROLE).
fn caller_is_superuser() -> bool {
    // SAFETY: plain reads of backend globals and the role cache.
    unsafe { pg_sys::superuser_arg(pg_sys::GetOuterUserId()) }
}

/// Installs `kid` as the active key and retires the previous one. Re-running
/// with the active kid and the same secret is a no-op; reusing a kid with a
/// different secret, or a retired kid, is refused (23505).
pub fn rotate(kid: &str, secret: Option<Vec<u8>>) -> FfResult<String> {
    check_kid(kid)?;
    let secret = match secret {
        Some(_) if !caller_is_superuser() => {
            return Err(FfError::new(
                pgrx::PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
                "only a superuser may install a secret of its choosing",
            )
            .with_detail("flowfabric_admin rotates to a random secret: call ff_rotate_hmac_secret(kid) without one"))
        }
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

/// Makes `kid` the active signing key (random 32-byte secret by default; an
/// explicit secret only from a superuser, 42501 otherwise). Retired kids
/// keep verifying for flowfabric.key_grace_ms. Returns the kid.
#[pg_extern(volatile, parallel_unsafe, security_definer, name = "ff_rotate_hmac_secret")]
#[search_path(@extschema@, pg_temp)]
fn sql_rotate_hmac_secret(kid: Option<String>, secret: default!(Option<Vec<u8>>, "NULL")) -> String {
    (|| rotate(&crate::error::required(kid, "kid")?, secret))().or_raise()
}
