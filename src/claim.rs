//! The claim pipeline and leases: pick, admit, sign, lease; then renew,
//! complete or fail under the grant (fencing).

use crate::budget::first_exhausted_budget;
use crate::crypto::{grant_id, parse_grant_key, signature_matches, Grant};
use crate::db::{col, col_req, exec, first_row, now_ms, with_spi};
use crate::dispatch::cascade;
use crate::error::{required, FfError, FfResult, OrRaise};
use crate::exec::{end_attempt, from_pg_uuid, make_terminal, normalize_capabilities, pg_uuid, requeue};
use crate::ids::{check_text_id, clip, ExecutionId};
use crate::jsonb::RawJsonb;
use crate::keystore::{no_signing_key, verification_secret, KidRefusal, SigningKey};
use crate::quota;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;

pub const MAX_TTL_MS: i64 = 86_400_000;
/// Candidates refused by budget or quota that one claim looks past before
/// giving up (each refusal also excludes every row sharing that budget or quota).
pub const MAX_REFUSALS: usize = 64;
const RETRY_BASE_MS: i64 = 1_000;
const RETRY_MAX_MS: i64 = 60_000;

/// A grant handed to a worker.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub execution_id: String,
    pub partition_key: String,
    pub grant_key: String,
    pub expires_at_ms: i64,
}

/// Validated worker identity for a claim.
pub struct ClaimRequest {
    pub lane_id: String,
    pub worker_id: String,
    pub worker_instance_id: String,
    pub capabilities: Vec<String>,
    pub grant_ttl_ms: i64,
}

fn check_ttl(name: &str, ttl: i64) -> FfResult<i64> {
    if ttl <= 0 || ttl > MAX_TTL_MS {
        return Err(FfError::invalid(format!("{name} must be between 1 and {MAX_TTL_MS} ms, got {ttl}")));
    }
    Ok(ttl)
}

/// Backoff before retry number `attempt` (1-based): 1 s doubling to 60 s.
pub fn retry_backoff_ms(attempt: i32) -> i64 {
    let shift = attempt.clamp(1, 7) as u32 - 1;
    (RETRY_BASE_MS << shift).min(RETRY_MAX_MS)
}

struct Candidate {
    uuid: uuid::Uuid,
    partition: i16,
    budget_ids: Vec<String>,
    quota_policy_id: Option<String>,
}

/// One indexed pick of the best claimable execution of the lane, skipping
/// rows locked by other claimers and rows whose budget or quota already
/// refused in this claim. The active signing key comes back in the same
/// statement; no key at all fails closed (55000).
///
/// The filters are spelled so the planner sees how many rows pass them (an
/// `eligible_now` row is always due; most rows require no capability): with
/// the opaque forms it guessed a handful of rows and preferred a bitmap
/// scan plus sort over the ordered index scan.
fn pick(
    c: &mut SpiClient<'_>,
    r: &ClaimRequest,
    now: i64,
    refused_budgets: &[String],
    refused_quotas: &[String],
) -> FfResult<(SigningKey, Option<Candidate>)> {
    let t = exec(
        c,
        "SELECT k.kid, k.secret, x.execution_id, x.partition_key, x.budget_ids, x.quota_policy_id
         FROM ff_waitpoint_hmac k LEFT JOIN LATERAL (
             SELECT execution_id, partition_key, budget_ids, quota_policy_id FROM ff_exec_core
             WHERE lane_id = $1 AND lifecycle_phase = 'runnable'
               AND eligibility_state IN ('eligible_now', 'not_eligible_until_time')
               AND (eligibility_state = 'eligible_now' OR eligible_at_ms <= $3)
               AND (required_capabilities = '{}' OR required_capabilities <@ $2)
               AND NOT (budget_ids && $4)
               AND (quota_policy_id IS NULL OR quota_policy_id <> ALL ($5))
             ORDER BY priority DESC, created_at_ms, queue_seq
             LIMIT 1 FOR UPDATE SKIP LOCKED) x ON true
         WHERE k.active",
        &[
            r.lane_id.as_str().into(),
            r.capabilities.clone().into(),
            now.into(),
            refused_budgets.to_vec().into(),
            refused_quotas.to_vec().into(),
        ],
    )?;
    let row = first_row(t).ok_or_else(no_signing_key)?;
    let key = SigningKey { kid: col_req(&row, 1)?, secret: col_req(&row, 2)? };
    let Some(uuid) = col::<pgrx::Uuid>(&row, 3)? else { return Ok((key, None)) };
    Ok((
        key,
        Some(Candidate {
            uuid: from_pg_uuid(&uuid),
            partition: col_req(&row, 4)?,
            budget_ids: col::<Vec<String>>(&row, 5)?.unwrap_or_default(),
            quota_policy_id: col(&row, 6)?,
        }),
    ))
}

/// The whole claim, inside the caller's transaction.
pub fn claim(r: &ClaimRequest) -> FfResult<Option<Claimed>> {
    with_spi(|c| {
        let now = now_ms();
        let (mut refused_budgets, mut refused_quotas) = (Vec::new(), Vec::new());
        while refused_budgets.len() + refused_quotas.len() <= MAX_REFUSALS {
            let (key, cand) = pick(c, r, now, &refused_budgets, &refused_quotas)?;
            let Some(cand) = cand else { return Ok(None) };
            let id = ExecutionId { partition: cand.partition, uuid: cand.uuid };
            if !cand.budget_ids.is_empty() {
                if let Some(budget) = first_exhausted_budget(c, &cand.budget_ids)? {
                    refused_budgets.push(budget);
                    continue;
                }
            }
            if let Some(q) = &cand.quota_policy_id {
                if !quota::admit(c, q, &id.to_string(), now)? {
                    refused_quotas.push(q.clone());
                    continue;
                }
            }
            return lease(c, r, &id, &key.kid, &key.secret, now).map(Some);
        }
        Ok(None)
    })
}

/// Signs the grant, persists it and marks the execution active under it.
fn lease(c: &mut SpiClient<'_>, r: &ClaimRequest, id: &ExecutionId, kid: &str, secret: &[u8], now: i64) -> FfResult<Claimed> {
    let expires = now + r.grant_ttl_ms;
    let grant = Grant {
        execution: *id,
        worker_id: r.worker_id.clone(),
        worker_instance_id: r.worker_instance_id.clone(),
        expires_at_ms: expires,
    };
    let key = grant.key(kid, secret);
    exec(
        c,
        "WITH e AS (
             UPDATE ff_exec_core SET lifecycle_phase = 'active', ownership_state = 'leased',
                 eligibility_state = 'not_applicable', public_state = 'active',
                 attempt_state = 'running_attempt', attempt_index = attempt_index + 1,
                 started_at_ms = coalesce(started_at_ms, $5), lease_expires_at_ms = $6,
                 current_worker_id = $3, current_worker_instance_id = $4, current_grant_id = $7
             WHERE execution_id = $1
             RETURNING attempt_index),
         a AS (
             INSERT INTO ff_attempt (execution_id, attempt_index, partition_key, worker_id,
                 worker_instance_id, lease_expires_at_ms, started_at_ms)
             SELECT $1, e.attempt_index, $2, $3, $4, $6, $5 FROM e)
         INSERT INTO ff_claim_grant (grant_id, partition_key, execution_id, worker_id, worker_instance_id,
             lane_id, kid, grant_ttl_ms, issued_at_ms, expires_at_ms)
         VALUES ($7, $2, $1, $3, $4, $8, $9, $10, $5, $6)",
        &[
            pg_uuid(&id.uuid).into(),
            id.partition.into(),
            r.worker_id.as_str().into(),
            r.worker_instance_id.as_str().into(),
            now.into(),
            expires.into(),
            grant_id(&key).into(),
            r.lane_id.as_str().into(),
            kid.into(),
            r.grant_ttl_ms.into(),
        ],
    )?;
    Ok(Claimed { execution_id: id.to_string(), partition_key: id.tag(), grant_key: key, expires_at_ms: expires })
}

/// `ff_verify_grant`'s answer.
pub fn verify_grant(key: &str) -> FfResult<&'static str> {
    let Some(p) = parse_grant_key(key) else { return Ok("malformed") };
    if p.expires_at_ms <= now_ms() {
        return Ok("expired");
    }
    with_spi(|c| {
        let secret = match verification_secret(c, &p.kid)? {
            Ok(s) => s,
            Err(_) => return Ok("unknown_kid"),
        };
        let t = exec(
            c,
            "SELECT worker_id, worker_instance_id FROM ff_claim_grant
             WHERE execution_id = $1 AND partition_key = $2 AND kind = 'claim'
             ORDER BY issued_at_ms DESC LIMIT 1",
            &[pg_uuid(&p.execution.uuid).into(), p.execution.partition.into()],
        )?;
        let Some(row) = first_row(t) else { return Ok("unknown_grant") };
        let grant = Grant {
            execution: p.execution,
            worker_id: col_req(&row, 1)?,
            worker_instance_id: col_req(&row, 2)?,
            expires_at_ms: p.expires_at_ms,
        };
        Ok(if signature_matches(&secret, &p.kid, &grant.message(), &p.hex_sig) { "ok" } else { "signature_mismatch" })
    })
}

/// The execution as a lease holder sees it, locked for the change that follows.
struct Leased {
    quota_policy_id: Option<String>,
    attempt_index: i32,
    max_attempts: i32,
}

/// Fencing: the grant must be well-formed, for this execution, one we
/// issued (its row is kept until it expires), correctly signed by a kid
/// that may still verify, the grant currently in force, and unexpired.
/// Forgeries are 28000; grants we issued that are no longer current are
/// 55000.
fn fence(c: &mut SpiClient<'_>, id: &ExecutionId, grant_key: &str, now: i64) -> FfResult<Leased> {
    let p = parse_grant_key(grant_key)
        .ok_or_else(|| FfError::invalid(format!("malformed grant key \"{}\"", clip(grant_key))))?;
    if p.execution != *id {
        return Err(FfError::unauthorized(format!("grant was issued for execution {}, not {id}", p.execution)));
    }
    let secret = verification_secret(c, &p.kid)?.map_err(|why| {
        FfError::unauthorized(match why {
            KidRefusal::Unknown => format!("grant signed with unknown kid \"{}\"", p.kid),
            KidRefusal::PastGrace => format!("grant signed with kid \"{}\", retired past its grace window", p.kid),
        })
    })?;
    let gid = grant_id(grant_key);
    let t = exec(
        c,
        "SELECT worker_id, worker_instance_id FROM ff_claim_grant WHERE grant_id = $1 AND execution_id = $2",
        &[gid.clone().into(), pg_uuid(&id.uuid).into()],
    )?;
    let row = first_row(t)
        .ok_or_else(|| FfError::unauthorized(format!("grant for execution {id} was not issued by this engine (or expired long ago)")))?;
    let grant = Grant {
        execution: *id,
        worker_id: col_req(&row, 1)?,
        worker_instance_id: col_req(&row, 2)?,
        expires_at_ms: p.expires_at_ms,
    };
    if !signature_matches(&secret, &p.kid, &grant.message(), &p.hex_sig) {
        return Err(FfError::unauthorized(format!("grant signature does not match for execution {id}")));
    }
    let t = exec(
        c,
        "SELECT lifecycle_phase, current_grant_id, lease_expires_at_ms, quota_policy_id, attempt_index, max_attempts
         FROM ff_exec_core WHERE execution_id = $1 AND partition_key = $2 FOR NO KEY UPDATE",
        &[pg_uuid(&id.uuid).into(), id.partition.into()],
    )?;
    let row = first_row(t).ok_or_else(|| FfError::not_found(format!("execution {id} does not exist")))?;
    let phase: String = col_req(&row, 1)?;
    let current: Option<Vec<u8>> = col(&row, 2)?;
    if phase != "active" || current.as_deref() != Some(gid.as_slice()) {
        return Err(FfError::wrong_state(format!(
            "grant is stale: execution {id} is {phase} and no longer leased under this grant"
        )));
    }
    let lease_expires: i64 = col(&row, 3)?.unwrap_or(0);
    if lease_expires <= now {
        return Err(FfError::wrong_state(format!("lease of execution {id} expired at {lease_expires}")));
    }
    Ok(Leased { quota_policy_id: col(&row, 4)?, attempt_index: col_req(&row, 5)?, max_attempts: col_req(&row, 6)? })
}

pub fn renew_lease(id: &ExecutionId, grant_key: &str, ttl_ms: i64) -> FfResult<i64> {
    check_ttl("ttl_ms", ttl_ms)?;
    with_spi(|c| {
        let now = now_ms();
        let lease = fence(c, id, grant_key, now)?;
        let expires = now + ttl_ms;
        exec(
            c,
            "WITH a AS (UPDATE ff_attempt SET lease_expires_at_ms = $3, lease_epoch = lease_epoch + 1
                        WHERE execution_id = $1 AND attempt_index = $2),
                  g AS (UPDATE ff_claim_grant SET expires_at_ms = $3 WHERE grant_id = $4)
             UPDATE ff_exec_core SET lease_expires_at_ms = $3 WHERE execution_id = $1",
            &[pg_uuid(&id.uuid).into(), lease.attempt_index.into(), expires.into(), grant_id(grant_key).into()],
        )?;
        Ok(expires)
    })
}

pub fn complete(id: &ExecutionId, grant_key: &str, result: Option<RawJsonb>) -> FfResult<()> {
    with_spi(|c| {
        let now = now_ms();
        let lease = fence(c, id, grant_key, now)?;
        end_attempt(c, &id.uuid, lease.attempt_index, lease.quota_policy_id.as_deref(), id.partition, "success", None, now)?;
        let event = make_terminal(c, &id.uuid, "success", "completed", result, None, now)?;
        cascade(c, event)?;
        Ok(())
    })
}

/// Fails the running attempt: retried after a backoff while attempts are
/// left and the error is retryable, terminal `failed` otherwise.
pub fn fail(id: &ExecutionId, grant_key: &str, error: &str, retryable: bool) -> FfResult<&'static str> {
    with_spi(|c| {
        let now = now_ms();
        let lease = fence(c, id, grant_key, now)?;
        end_attempt(c, &id.uuid, lease.attempt_index, lease.quota_policy_id.as_deref(), id.partition, "failed", Some(error), now)?;
        if retryable && lease.attempt_index < lease.max_attempts {
            requeue(c, &id.uuid, error, now + retry_backoff_ms(lease.attempt_index), now)?;
            Ok("retry_scheduled")
        } else {
            let event = make_terminal(c, &id.uuid, "failed", "failed", None, Some(error), now)?;
            cascade(c, event)?;
            Ok("failed")
        }
    })
}

// ---------------------------------------------------------------------------
// SQL API
// ---------------------------------------------------------------------------

/// Claims the best eligible execution of a lane for a worker: zero or one
/// row with the signed grant the worker must present to renew, complete or
/// fail it.
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(@extschema@, pg_temp)]
fn ff_claim_for_worker(
    lane_id: Option<String>,
    worker_id: Option<String>,
    worker_instance_id: Option<String>,
    capabilities: default!(Option<Vec<Option<String>>>, "'{}'"),
    grant_ttl_ms: default!(Option<i64>, 30000),
) -> TableIterator<
    'static,
    (
        name!(execution_id, String),
        name!(partition_key, String),
        name!(grant_key, String),
        name!(expires_at_ms, i64),
    ),
> {
    let claimed = (|| {
        let r = ClaimRequest {
            lane_id: check_text_id("lane_id", &required(lane_id, "lane_id")?)?.to_string(),
            worker_id: check_text_id("worker_id", &required(worker_id, "worker_id")?)?.to_string(),
            worker_instance_id: check_text_id("worker_instance_id", &required(worker_instance_id, "worker_instance_id")?)?
                .to_string(),
            capabilities: normalize_capabilities("capabilities", &required(capabilities, "capabilities")?)?,
            grant_ttl_ms: check_ttl("grant_ttl_ms", required(grant_ttl_ms, "grant_ttl_ms")?)?,
        };
        if r.worker_id.contains('|') || r.worker_instance_id.contains('|') {
            return Err(FfError::invalid("worker_id and worker_instance_id must not contain '|'"));
        }
        claim(&r)
    })()
    .or_raise();
    TableIterator::new(claimed.map(|g| (g.execution_id, g.partition_key, g.grant_key, g.expires_at_ms)))
}

/// Checks a grant key: 'ok', 'malformed', 'expired', 'unknown_kid',
/// 'unknown_grant' or 'signature_mismatch'.
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(@extschema@, pg_temp)]
fn ff_verify_grant(grant_key: Option<String>) -> &'static str {
    (|| verify_grant(&required(grant_key, "grant_key")?))().or_raise()
}

fn parse_exec(execution_id: Option<String>) -> FfResult<ExecutionId> {
    ExecutionId::parse(&required(execution_id, "execution_id")?)
}

/// Extends the lease of a claimed execution; returns the new expiry (ms).
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(@extschema@, pg_temp)]
fn ff_renew_lease(execution_id: Option<String>, grant_key: Option<String>, ttl_ms: Option<i64>) -> i64 {
    (|| renew_lease(&parse_exec(execution_id)?, &required(grant_key, "grant_key")?, required(ttl_ms, "ttl_ms")?))()
        .or_raise()
}

/// Completes a claimed execution with an optional result; writes its
/// 'success' completion event in the same transaction.
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(@extschema@, pg_temp)]
fn ff_complete_execution(execution_id: Option<String>, grant_key: Option<String>, result: default!(Option<RawJsonb>, "NULL")) {
    (|| complete(&parse_exec(execution_id)?, &required(grant_key, "grant_key")?, result))().or_raise()
}

/// Fails the running attempt. Retryable failures with attempts left return
/// to the queue after a backoff ('retry_scheduled'); otherwise the execution
/// ends 'failed' with a completion event.
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(@extschema@, pg_temp)]
fn ff_fail_execution(
    execution_id: Option<String>,
    grant_key: Option<String>,
    error: Option<String>,
    retryable: default!(Option<bool>, true),
) -> &'static str {
    (|| {
        let error = required(error, "error")?;
        if error.len() > 65_536 {
            return Err(FfError::invalid(format!("error text is {} bytes; the limit is 65536", error.len())));
        }
        fail(&parse_exec(execution_id)?, &required(grant_key, "grant_key")?, &error, required(retryable, "retryable")?)
    })()
    .or_raise()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(retry_backoff_ms(1), 1_000);
        assert_eq!(retry_backoff_ms(2), 2_000);
        assert_eq!(retry_backoff_ms(6), 32_000);
        assert_eq!(retry_backoff_ms(7), 60_000);
        assert_eq!(retry_backoff_ms(100), 60_000);
    }
}
