//! Quota policies: a sliding window of admissions and a concurrency cap,
//! both enforced when a claim admits an execution.

use crate::budget::LockWait;
use crate::db::{col, exec, first_row, now_ms, with_spi};
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
/// `max_concurrent` executions holding a slot. Admission counts toward
/// both; the slot is freed when the lease ends (`exec::finish` / `requeue`
/// delete the execution's own admission row, so they never wait on the
/// policy). The policy row lock serialises concurrent admissions, so the
/// caps are exact. Returns false when refused (or, with `LockWait::Skip`,
/// when another transaction holds the policy).
pub fn admit(c: &mut SpiClient<'_>, quota_policy_id: &str, execution: &pgrx::Uuid, wait: LockWait, now: i64) -> FfResult<bool> {
    // The lock is its own statement: the counts that follow must be read
    // with a snapshot taken after it, which sees every admission committed
    // by the transactions we waited for.
    let lock = match wait {
        LockWait::Wait => "SELECT 1 FROM ff_quota_policy WHERE quota_policy_id = $1 FOR NO KEY UPDATE",
        LockWait::Skip => "SELECT 1 FROM ff_quota_policy WHERE quota_policy_id = $1 FOR NO KEY UPDATE SKIP LOCKED",
    };
    if exec(c, lock, &[quota_policy_id.into()])?.is_empty() {
        return Ok(false);
    }
    let t = exec(
        c,
        "WITH ok AS (
             SELECT p.partition_key FROM ff_quota_policy p
             WHERE p.quota_policy_id = $1
               AND (p.active_concurrency_cap = 0
                    OR (SELECT count(*) FROM ff_quota_admitted a WHERE a.quota_policy_id = $1)
                       < p.active_concurrency_cap)
               AND (p.max_requests_per_window = 0
                    OR (SELECT count(*) FROM ff_quota_window w
                        WHERE w.quota_policy_id = $1 AND w.admitted_at_ms > $3 - p.requests_per_window_seconds * 1000)
                       < p.max_requests_per_window)),
         w AS (
             INSERT INTO ff_quota_window (quota_policy_id, admitted_at_ms, execution_id, partition_key)
             SELECT $1, $3, $2, ok.partition_key FROM ok ON CONFLICT DO NOTHING),
         a AS (
             INSERT INTO ff_quota_admitted (quota_policy_id, execution_id, partition_key, admitted_at_ms)
             SELECT $1, $2, ok.partition_key, $3 FROM ok ON CONFLICT DO NOTHING)
         SELECT EXISTS (SELECT FROM ok)",
        &[quota_policy_id.into(), (*execution).into(), now.into()],
    )?;
    Ok(first_row(t).map(|r| col::<bool>(&r, 1)).transpose()?.flatten().unwrap_or(false))
}

/// Creates a quota policy (0 = unlimited). Idempotent: 'created' or
/// 'already_satisfied'.
#[pg_extern(volatile, parallel_unsafe, security_definer, name = "ff_create_quota_policy")]
#[search_path(@extschema@, pg_temp)]
fn sql_create_quota_policy(
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
