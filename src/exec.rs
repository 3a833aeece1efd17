//! Executions: creation, the states they move through, and the lane
//! notifications that wake workers.
//!
//! States (canonical FlowFabric literals):
//! - runnable + eligible_now (public `waiting`): claimable now;
//! - runnable + not_eligible_until_time (`delayed`): claimable from eligible_at_ms;
//! - runnable + blocked_by_dependencies (`waiting_children`): waits on its edge group;
//! - active + leased (`active`): claimed by a worker until lease_expires_at_ms;
//! - terminal (`completed` / `failed` / `cancelled` / `skipped` / `expired`).

use crate::db::{col_req, exec, first_row, now_ms, with_spi};
use crate::error::{required, FfError, FfResult, OrRaise};
use crate::ids::{check_text_id, clip, crc16, ExecutionId};
use crate::jsonb::RawJsonb;
use crate::quota;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::JsonB;
use sha2::{Digest, Sha256};

pub const MAX_CAPABILITIES: usize = 256;
pub const MAX_CAPABILITY_BYTES: usize = 4096;
pub const MAX_BUDGETS_PER_EXECUTION: usize = 64;
pub const MAX_ATTEMPTS_LIMIT: i32 = 1000;

/// Validates capability tokens (non-empty, no ',' / whitespace / control
/// characters, at most 256 tokens and 4096 bytes) and returns them sorted and
/// deduplicated. Matching is case-sensitive.
pub fn normalize_capabilities(what: &str, caps: &[Option<String>]) -> FfResult<Vec<String>> {
    if caps.len() > MAX_CAPABILITIES {
        return Err(FfError::invalid(format!("{what} has {} entries; the limit is {MAX_CAPABILITIES}", caps.len())));
    }
    let total: usize = caps.iter().flatten().map(|c| c.len() + 1).sum();
    if total > MAX_CAPABILITY_BYTES {
        return Err(FfError::invalid(format!("{what} is {total} bytes long; the limit is {MAX_CAPABILITY_BYTES}")));
    }
    let mut out = Vec::with_capacity(caps.len());
    for cap in caps {
        let cap = required(cap.as_deref(), &format!("{what} element"))?;
        if cap.is_empty() || cap.chars().any(|ch| ch == ',' || ch.is_whitespace() || ch.is_control()) {
            return Err(FfError::invalid(format!(
                "capability \"{}\" in {what} must be non-empty without ',', spaces or control characters",
                clip(cap)
            )));
        }
        out.push(cap.to_string());
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// The channel a worker LISTENs on for new eligible work of `lane_id`:
/// `ff_lane_<lane>` while that fits a channel name (63 bytes), else
/// `ff_lane_` plus a SHA-256 prefix of the lane.
pub fn lane_channel(lane_id: &str) -> String {
    if lane_id.len() <= 55 && !lane_id.chars().any(char::is_control) {
        format!("ff_lane_{lane_id}")
    } else {
        format!("ff_lane_{}", &hex::encode(Sha256::digest(lane_id.as_bytes()))[..40])
    }
}

/// Announces eligible work on a lane; delivered when the caller commits, and
/// folded into one notification per lane and transaction.
pub fn notify_lane(c: &mut SpiClient<'_>, lane_id: &str) -> FfResult<()> {
    exec(c, "SELECT pg_notify($1, $2)", &[lane_channel(lane_id).into(), lane_id.into()])?;
    Ok(())
}

/// Everything `ff_create_execution` accepts, validated.
#[derive(Debug, Clone)]
pub struct NewExecution {
    pub lane_id: String,
    pub payload: Option<RawJsonb>,
    pub priority: i32,
    pub required_capabilities: Vec<String>,
    pub budget_ids: Vec<String>,
    pub quota_policy_id: Option<String>,
    pub flow_id: Option<uuid::Uuid>,
    pub execution_id: Option<uuid::Uuid>,
    pub delay_until_ms: Option<i64>,
    pub max_attempts: i32,
}

impl NewExecution {
    pub fn validate(mut self) -> FfResult<Self> {
        check_text_id("lane_id", &self.lane_id)?;
        if self.budget_ids.len() > MAX_BUDGETS_PER_EXECUTION {
            return Err(FfError::invalid(format!(
                "{} budget_ids given; the limit is {MAX_BUDGETS_PER_EXECUTION}",
                self.budget_ids.len()
            )));
        }
        for b in &self.budget_ids {
            check_text_id("budget_id", b)?;
        }
        self.budget_ids.sort();
        self.budget_ids.dedup();
        if let Some(q) = &self.quota_policy_id {
            check_text_id("quota_policy_id", q)?;
        }
        if !(1..=MAX_ATTEMPTS_LIMIT).contains(&self.max_attempts) {
            return Err(FfError::invalid(format!(
                "max_attempts must be between 1 and {MAX_ATTEMPTS_LIMIT}, got {}",
                self.max_attempts
            )));
        }
        if let Some(d) = self.delay_until_ms.filter(|d| *d < 0) {
            return Err(FfError::invalid(format!("delay_until_ms must be >= 0, got {d}")));
        }
        Ok(self)
    }
}

/// Inserts the execution, eligible now or at `delay_until_ms`. Creating an
/// id that exists already is a no-op that returns the existing id.
pub fn create_execution(e: &NewExecution) -> FfResult<String> {
    with_spi(|c| {
        // The slot is crc16 % num_flow_partitions, taken inside the INSERT.
        let slot = i32::from(match &e.flow_id {
            Some(flow) => crc16(flow.as_bytes()),
            None => crc16(e.lane_id.as_bytes()),
        });
        let uuid = e.execution_id.unwrap_or_else(uuid::Uuid::new_v4);
        let now = now_ms();
        let delayed = e.delay_until_ms.is_some_and(|d| d > now);
        let t = exec(
            c,
            "INSERT INTO ff_exec_core (execution_id, partition_key, lane_id, payload, priority,
                 required_capabilities, budget_ids, quota_policy_id, max_attempts, eligible_at_ms,
                 lifecycle_phase, eligibility_state, public_state, attempt_state, created_at_ms)
             VALUES ($1, ($2 % (SELECT num_flow_partitions FROM ff_partition_config))::smallint,
                 $3, $4, $5, $6, $7, $8, $9, $10, 'runnable',
                 CASE WHEN $11 THEN 'not_eligible_until_time' ELSE 'eligible_now' END,
                 CASE WHEN $11 THEN 'delayed' ELSE 'waiting' END,
                 'pending_first_attempt', $12)
             ON CONFLICT (execution_id) DO NOTHING
             RETURNING partition_key",
            &[
                pg_uuid(&uuid).into(),
                slot.into(),
                e.lane_id.as_str().into(),
                e.payload.into(),
                e.priority.into(),
                e.required_capabilities.clone().into(),
                e.budget_ids.clone().into(),
                e.quota_policy_id.clone().into(),
                e.max_attempts.into(),
                e.delay_until_ms.unwrap_or(0).into(),
                delayed.into(),
                now.into(),
            ],
        )?;
        let partition: i16 = match first_row(t) {
            Some(row) => col_req(&row, 1)?,
            None => {
                let t = exec(c, "SELECT partition_key FROM ff_exec_core WHERE execution_id = $1", &[pg_uuid(&uuid).into()])?;
                let row = first_row(t).ok_or_else(|| FfError::internal("execution vanished after a conflict"))?;
                return Ok(ExecutionId { partition: col_req(&row, 1)?, uuid }.to_string());
            }
        };
        if !delayed {
            notify_lane(c, &e.lane_id)?;
        }
        Ok(ExecutionId { partition, uuid }.to_string())
    })
}

pub fn pg_uuid(u: &uuid::Uuid) -> pgrx::Uuid {
    pgrx::Uuid::from_bytes(*u.as_bytes())
}

pub fn from_pg_uuid(u: &pgrx::Uuid) -> uuid::Uuid {
    uuid::Uuid::from_bytes(*u.as_bytes())
}

/// Writes the completion event of an execution that just became terminal
/// and returns its id.
pub fn record_completion(c: &mut SpiClient<'_>, execution: &uuid::Uuid, outcome: &str, now: i64) -> FfResult<i64> {
    let t = exec(
        c,
        "INSERT INTO ff_completion_event (partition_key, execution_id, flow_id, outcome, namespace,
             instance_tag, occurred_at_ms)
         SELECT partition_key, execution_id, flow_id, $2, namespace, instance_tag, $3
         FROM ff_exec_core WHERE execution_id = $1
         RETURNING event_id",
        &[pg_uuid(execution).into(), outcome.into(), now.into()],
    )?;
    let row = first_row(t).ok_or_else(|| FfError::internal("completion event for a missing execution"))?;
    col_req(&row, 1)
}

/// Ends the running attempt and frees the quota slot the lease held. Its
/// grant row stays until it expires, so a late call with it is told the
/// grant is stale rather than unknown. Shared by every way an execution leaves `active`.
pub fn end_attempt(
    c: &mut SpiClient<'_>,
    uuid: &uuid::Uuid,
    attempt_index: i32,
    quota_policy_id: Option<&str>,
    partition: i16,
    outcome: &str,
    error: Option<&str>,
    now: i64,
) -> FfResult<()> {
    exec(
        c,
        "UPDATE ff_attempt SET outcome = $3, error = $4, terminal_at_ms = $5, lease_expires_at_ms = NULL
         WHERE execution_id = $1 AND attempt_index = $2",
        &[pg_uuid(uuid).into(), attempt_index.into(), outcome.into(), error.into(), now.into()],
    )?;
    if let Some(q) = quota_policy_id {
        quota::release(c, q, &ExecutionId { partition, uuid: *uuid }.to_string(), now)?;
    }
    Ok(())
}

/// Makes an execution terminal with `outcome` and writes its completion
/// event; returns the event id.
pub fn make_terminal(
    c: &mut SpiClient<'_>,
    uuid: &uuid::Uuid,
    outcome: &str,
    public_state: &str,
    result: Option<RawJsonb>,
    error: Option<&str>,
    now: i64,
) -> FfResult<i64> {
    exec(
        c,
        "UPDATE ff_exec_core SET lifecycle_phase = 'terminal', ownership_state = 'unowned',
             eligibility_state = 'not_applicable', attempt_state = 'attempt_terminal',
             public_state = $3, terminal_outcome = $2, result = coalesce($4, result),
             last_error = coalesce($5, last_error), terminal_at_ms = $6, lease_expires_at_ms = NULL,
             current_grant_id = NULL
         WHERE execution_id = $1",
        &[pg_uuid(uuid).into(), outcome.into(), public_state.into(), result.into(), error.into(), now.into()],
    )?;
    record_completion(c, uuid, outcome, now)
}

/// Puts an execution back in the queue, claimable from `eligible_at_ms`
/// (delayed until then); its lane is notified when it is claimable now,
/// otherwise delayed promotion notifies when the time comes.
pub fn requeue(c: &mut SpiClient<'_>, uuid: &uuid::Uuid, error: &str, eligible_at_ms: i64, now: i64) -> FfResult<()> {
    let t = exec(
        c,
        "UPDATE ff_exec_core SET lifecycle_phase = 'runnable', ownership_state = 'unowned',
             eligibility_state = CASE WHEN $3 > $4 THEN 'not_eligible_until_time' ELSE 'eligible_now' END,
             public_state = CASE WHEN $3 > $4 THEN 'delayed' ELSE 'waiting' END,
             attempt_state = 'pending_retry_attempt', eligible_at_ms = $3, last_error = $2,
             lease_expires_at_ms = NULL, current_worker_id = NULL, current_worker_instance_id = NULL,
             current_grant_id = NULL
         WHERE execution_id = $1
         RETURNING lane_id",
        &[pg_uuid(uuid).into(), error.into(), eligible_at_ms.into(), now.into()],
    )?;
    let lane: Option<String> = first_row(t).map(|r| col_req(&r, 1)).transpose()?;
    match lane {
        Some(lane) if eligible_at_ms <= now => notify_lane(c, &lane),
        _ => Ok(()),
    }
}

/// Ends a non-terminal execution with `outcome` whatever it was doing,
/// ending its attempt if it was claimed. Returns the completion event, or
/// `None` when it was already terminal (or, with `skip_locked`, locked by a
/// transaction that is about to settle it).
pub fn terminate(
    c: &mut SpiClient<'_>,
    uuid: &uuid::Uuid,
    outcome: &str,
    public_state: &str,
    reason: Option<&str>,
    skip_locked: bool,
    now: i64,
) -> FfResult<Option<i64>> {
    let sql = if skip_locked {
        "SELECT lifecycle_phase, attempt_index, quota_policy_id, partition_key FROM ff_exec_core
         WHERE execution_id = $1 FOR NO KEY UPDATE SKIP LOCKED"
    } else {
        "SELECT lifecycle_phase, attempt_index, quota_policy_id, partition_key FROM ff_exec_core
         WHERE execution_id = $1 FOR NO KEY UPDATE"
    };
    let t = exec(c, sql, &[pg_uuid(uuid).into()])?;
    let Some(row) = first_row(t) else { return Ok(None) };
    let phase: String = col_req(&row, 1)?;
    if phase == "terminal" {
        return Ok(None);
    }
    if phase == "active" {
        let attempt: i32 = col_req(&row, 2)?;
        let quota: Option<String> = crate::db::col(&row, 3)?;
        end_attempt(c, uuid, attempt, quota.as_deref(), col_req(&row, 4)?, outcome, reason, now)?;
    }
    exec(c, "UPDATE ff_exec_core SET cancellation_reason = $2 WHERE execution_id = $1", &[pg_uuid(uuid).into(), reason.into()])?;
    make_terminal(c, uuid, outcome, public_state, None, None, now).map(Some)
}

/// Creates an execution on `lane_id`, claimable at once (or at
/// `delay_until_ms`). Returns its `{fp:N}:<uuid>` id.
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(@extschema@, pg_temp)]
#[allow(clippy::too_many_arguments)]
fn ff_create_execution(
    lane_id: Option<String>,
    payload: default!(Option<RawJsonb>, "NULL"),
    priority: default!(Option<i32>, 0),
    required_capabilities: default!(Option<Vec<Option<String>>>, "'{}'"),
    budget_ids: default!(Option<Vec<Option<String>>>, "'{}'"),
    quota_policy_id: default!(Option<String>, "NULL"),
    flow_id: default!(Option<pgrx::Uuid>, "NULL"),
    execution_id: default!(Option<pgrx::Uuid>, "NULL"),
    delay_until_ms: default!(Option<i64>, "NULL"),
    max_attempts: default!(Option<i32>, 1),
) -> String {
    (|| {
        let budget_ids = required(budget_ids, "budget_ids")?
            .into_iter()
            .map(|b| required(b, "budget_ids element"))
            .collect::<FfResult<Vec<_>>>()?;
        let e = NewExecution {
            lane_id: required(lane_id, "lane_id")?,
            payload,
            priority: required(priority, "priority")?,
            required_capabilities: normalize_capabilities(
                "required_capabilities",
                &required(required_capabilities, "required_capabilities")?,
            )?,
            budget_ids,
            quota_policy_id,
            flow_id: flow_id.as_ref().map(from_pg_uuid),
            execution_id: execution_id.as_ref().map(from_pg_uuid),
            delay_until_ms,
            max_attempts: required(max_attempts, "max_attempts")?,
        }
        .validate()?;
        create_execution(&e)
    })()
    .or_raise()
}

pub fn execution_info(id: &ExecutionId) -> FfResult<serde_json::Value> {
    with_spi(|c| {
        let t = exec(
            c,
            "SELECT jsonb_build_object(
                 'execution_id', $3::text, 'lane_id', lane_id, 'flow_id', flow_id, 'namespace', namespace,
                 'priority', priority, 'required_capabilities', required_capabilities, 'budget_ids', budget_ids,
                 'quota_policy_id', quota_policy_id, 'lifecycle_phase', lifecycle_phase,
                 'ownership_state', ownership_state, 'eligibility_state', eligibility_state,
                 'public_state', public_state, 'attempt_state', attempt_state,
                 'terminal_outcome', terminal_outcome, 'attempt_index', attempt_index,
                 'max_attempts', max_attempts, 'payload', payload, 'result', result, 'last_error', last_error,
                 'cancellation_reason', cancellation_reason, 'worker_id', current_worker_id,
                 'lease_expires_at_ms', lease_expires_at_ms, 'eligible_at_ms', eligible_at_ms,
                 'created_at_ms', created_at_ms, 'started_at_ms', started_at_ms, 'terminal_at_ms', terminal_at_ms)
             FROM ff_exec_core WHERE execution_id = $1 AND partition_key = $2",
            &[pg_uuid(&id.uuid).into(), id.partition.into(), id.to_string().into()],
        )?;
        let row = first_row(t).ok_or_else(|| FfError::not_found(format!("execution {id} does not exist")))?;
        Ok(col_req::<JsonB>(&row, 1)?.0)
    })
}

/// State, payload, result and lease of one execution as jsonb (what a
/// worker reads after a claim). Unknown execution: P0002.
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(@extschema@, pg_temp)]
fn ff_get_execution(execution_id: Option<String>) -> JsonB {
    JsonB((|| execution_info(&ExecutionId::parse(&required(execution_id, "execution_id")?)?))().or_raise())
}

/// The NOTIFY channel announcing new eligible work on a lane (LISTEN on it).
#[pg_extern(immutable, parallel_safe)]
fn ff_lane_channel(lane_id: &str) -> String {
    lane_channel(lane_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_are_sorted_deduplicated_and_checked() {
        let caps = |v: &[&str]| v.iter().map(|s| Some(s.to_string())).collect::<Vec<_>>();
        assert_eq!(normalize_capabilities("c", &caps(&["gpu", "cuda", "gpu"])).unwrap(), vec!["cuda", "gpu"]);
        for bad in [caps(&[""]), caps(&["a,b"]), caps(&["a b"]), vec![None]] {
            assert!(normalize_capabilities("c", &bad).is_err());
        }
        let many: Vec<Option<String>> = (0..300).map(|i| Some(format!("c{i}"))).collect();
        assert!(normalize_capabilities("c", &many).is_err());
        assert!(normalize_capabilities("c", &[Some("x".repeat(5000))]).is_err());
    }

    #[test]
    fn lane_channels_fit_a_channel_name() {
        assert_eq!(lane_channel("default"), "ff_lane_default");
        let long = lane_channel(&"l".repeat(200));
        assert!(long.len() <= 63 && long.starts_with("ff_lane_"));
    }
}
