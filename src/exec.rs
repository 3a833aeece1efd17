//! Executions: creation, the states they move through, and the lane
//! notifications that wake workers.
//!
//! States (canonical FlowFabric literals):
//! - runnable + eligible_now (public `waiting`): claimable now;
//! - runnable + not_eligible_until_time (`delayed`): claimable from eligible_at_ms;
//! - runnable + blocked_by_dependencies (`waiting_children`): waits on its edge group;
//! - active + leased (`active`): claimed by a worker until lease_expires_at_ms;
//! - terminal (`completed` / `failed` / `cancelled` / `skipped` / `expired`).

use crate::budget::load_partition_config;
use crate::db::{col_req, exec, first_row, now_ms, with_spi};
use crate::error::{required, FfError, FfResult, OrRaise};
use crate::ids::{check_text_id, clip, ExecutionId};
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
    pub payload: Option<serde_json::Value>,
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
        let cfg = load_partition_config(c)?;
        let partition = match &e.flow_id {
            Some(flow) => cfg.flow_partition(flow),
            None => cfg.solo_partition(&e.lane_id),
        };
        let uuid = e.execution_id.unwrap_or_else(uuid::Uuid::new_v4);
        let now = now_ms();
        let delayed = e.delay_until_ms.is_some_and(|d| d > now);
        let t = exec(
            c,
            "INSERT INTO ff_exec_core (execution_id, partition_key, lane_id, payload, priority,
                 required_capabilities, budget_ids, quota_policy_id, max_attempts, eligible_at_ms,
                 lifecycle_phase, eligibility_state, public_state, attempt_state, created_at_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 'runnable',
                 CASE WHEN $11 THEN 'not_eligible_until_time' ELSE 'eligible_now' END,
                 CASE WHEN $11 THEN 'delayed' ELSE 'waiting' END,
                 'pending_first_attempt', $12)
             ON CONFLICT (execution_id) DO NOTHING
             RETURNING partition_key",
            &[
                pg_uuid(&uuid).into(),
                partition.into(),
                e.lane_id.as_str().into(),
                e.payload.clone().map(JsonB).into(),
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
        if t.is_empty() {
            let t = exec(c, "SELECT partition_key FROM ff_exec_core WHERE execution_id = $1", &[pg_uuid(&uuid).into()])?;
            let row = first_row(t).ok_or_else(|| FfError::internal("execution vanished after a conflict"))?;
            return Ok(ExecutionId { partition: col_req(&row, 1)?, uuid }.to_string());
        }
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

/// Creates an execution on `lane_id`, claimable at once (or at
/// `delay_until_ms`). Returns its `{fp:N}:<uuid>` id.
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(@extschema@, pg_temp)]
#[allow(clippy::too_many_arguments)]
fn ff_create_execution(
    lane_id: Option<String>,
    payload: default!(Option<JsonB>, "NULL"),
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
            payload: payload.map(|j| j.0),
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
