//! Quota policies: a sliding window of admissions and a concurrency cap,
//! both enforced when a claim admits an execution.

use crate::db::{col_req, exec, first_row, now_ms, with_spi};
use crate::error::{required, FfError, FfResult, OrRaise};
use crate::ids::{check_text_id, crc16};
use pgrx::prelude::*;
use pgrx::spi::SpiClient;

/// A validated quota policy. Zero limits mean "unlimited".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaPolicy {
    pub id: String,
    pub window_seconds: i64,
    pub max_requests_per_window: i64,
    pub max_concurrent: i64,
}

impl QuotaPolicy {
    pub fn validate(id: &str, window_seconds: i64, max_requests: i64, max_concurrent: i64) -> FfResult<Self> {
        check_text_id("quota_policy_id", id)?;
        if window_seconds <= 0 || window_seconds > 365 * 86_400 {
            return Err(FfError::invalid(format!(
                "window_seconds must be between 1 and 31536000, got {window_seconds}"
            )));
        }
        for (name, v) in [("max_requests_per_window", max_requests), ("max_concurrent", max_concurrent)] {
            if v < 0 {
                return Err(FfError::invalid(format!("{name} must be >= 0, got {v}")));
            }
        }
        Ok(QuotaPolicy {
            id: id.to_string(),
            window_seconds,
            max_requests_per_window: max_requests,
            max_concurrent,
        })
    }
}

pub fn create_quota_policy(q: &QuotaPolicy) -> FfResult<&'static str> {
    with_spi(|c| {
        let now = now_ms();
        let t = exec(
            c,
            "INSERT INTO ff_quota_policy (quota_policy_id, partition_key, requests_per_window_seconds,
                 max_requests_per_window, active_concurrency_cap, created_at_ms, updated_at_ms)
             VALUES ($1, ($2 % (SELECT num_quota_partitions FROM ff_partition_config))::smallint,
                     $3, $4, $5, $6, $6)
             ON CONFLICT (quota_policy_id) DO NOTHING RETURNING 1",
            &[
                q.id.as_str().into(),
                i32::from(crc16(q.id.as_bytes())).into(),
                q.window_seconds.into(),
                q.max_requests_per_window.into(),
                q.max_concurrent.into(),
                now.into(),
            ],
        )?;
        Ok(if t.is_empty() { "already_satisfied" } else { "created" })
    })
}

/// Admits one execution under a quota policy: fewer than
/// `max_requests_per_window` admissions in the sliding window and fewer than
/// `max_concurrent` active executions. Admission counts toward both. The
/// policy row lock serialises concurrent claimers of one policy. A policy
/// that does not exist admits everything. Returns false when refused.
pub fn admit(c: &mut SpiClient<'_>, quota_policy_id: &str, execution_id: &str, now: i64) -> FfResult<bool> {
    let t = exec(
        c,
        "SELECT partition_key, requests_per_window_seconds * 1000, max_requests_per_window,
                active_concurrency_cap, active_concurrency
         FROM ff_quota_policy WHERE quota_policy_id = $1 FOR UPDATE",
        &[quota_policy_id.into()],
    )?;
    let Some(row) = first_row(t) else { return Ok(true) };
    let part: i16 = col_req(&row, 1)?;
    let window_ms: i64 = col_req(&row, 2)?;
    let max_requests: i64 = col_req(&row, 3)?;
    let cap: i64 = col_req(&row, 4)?;
    let active: i64 = col_req(&row, 5)?;
    if cap > 0 && active >= cap {
        return Ok(false);
    }
    if max_requests > 0 {
        let t = exec(
            c,
            "SELECT count(*) FROM ff_quota_window WHERE quota_policy_id = $1 AND admitted_at_ms > $2",
            &[quota_policy_id.into(), (now - window_ms).into()],
        )?;
        let in_window: i64 = first_row(t).map(|r| col_req(&r, 1)).transpose()?.unwrap_or(0);
        if in_window >= max_requests {
            return Ok(false);
        }
    }
    exec(
        c,
        "WITH w AS (
             INSERT INTO ff_quota_window (quota_policy_id, admitted_at_ms, execution_id, partition_key)
             VALUES ($1, $3, $2, $4) ON CONFLICT DO NOTHING),
         a AS (
             INSERT INTO ff_quota_admitted (quota_policy_id, execution_id, partition_key, admitted_at_ms)
             VALUES ($1, $2, $4, $3) ON CONFLICT DO NOTHING RETURNING 1)
         UPDATE ff_quota_policy SET active_concurrency = active_concurrency + (SELECT count(*) FROM a),
                updated_at_ms = $3
         WHERE quota_policy_id = $1",
        &[quota_policy_id.into(), execution_id.into(), now.into(), part.into()],
    )?;
    Ok(true)
}

/// Gives back the concurrency slot an execution holds, if any.
pub fn release(c: &mut SpiClient<'_>, quota_policy_id: &str, execution_id: &str, now: i64) -> FfResult<()> {
    exec(
        c,
        "WITH gone AS (
             DELETE FROM ff_quota_admitted WHERE quota_policy_id = $1 AND execution_id = $2 RETURNING 1)
         UPDATE ff_quota_policy SET active_concurrency = greatest(0, active_concurrency - 1), updated_at_ms = $3
         WHERE quota_policy_id = $1 AND EXISTS (SELECT 1 FROM gone)",
        &[quota_policy_id.into(), execution_id.into(), now.into()],
    )?;
    Ok(())
}

/// Creates a quota policy (0 = unlimited). Idempotent: 'created' or
/// 'already_satisfied'.
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(@extschema@, pg_temp)]
fn ff_create_quota_policy(
    quota_policy_id: Option<String>,
    window_seconds: Option<i64>,
    max_requests_per_window: Option<i64>,
    max_concurrent: Option<i64>,
) -> &'static str {
    (|| {
        let q = QuotaPolicy::validate(
            &required(quota_policy_id, "quota_policy_id")?,
            required(window_seconds, "window_seconds")?,
            required(max_requests_per_window, "max_requests_per_window")?,
            required(max_concurrent, "max_concurrent")?,
        )?;
        create_quota_policy(&q)
    })()
    .or_raise()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation() {
        assert!(QuotaPolicy::validate("q", 60, 10, 2).is_ok());
        assert!(QuotaPolicy::validate("q", 0, 10, 2).is_err());
        assert!(QuotaPolicy::validate("q", 60, -1, 2).is_err());
        assert!(QuotaPolicy::validate("", 60, 1, 2).is_err());
    }
}
