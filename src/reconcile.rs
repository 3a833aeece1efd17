//! Reconcilers: bounded passes that settle what no caller finished. Each
//! picks its rows with SKIP LOCKED, so several runners (the background
//! worker, pg_cron, a manual call) never do the same work twice, and each
//! item runs in its own subtransaction, so one broken row is counted and
//! logged without aborting the pass.

use crate::budget::reset_budget_in;
use crate::db::{exec, in_subtransaction, now_ms, with_spi};
use crate::dispatch::cascade;
use crate::error::{required, FfError, FfResult, OrRaise};
use crate::exec::{end_attempt, make_terminal, notify_lane, requeue};
use crate::ids::{check_text_id, ExecutionId};
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::JsonB;
use serde_json::{json, Value};
use std::collections::BTreeSet;

/// Most items one reconciler handles per pass.
pub const BATCH: i64 = 1000;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TickReport {
    pub scanned: i64,
    pub reconciled: i64,
    pub noop: i64,
    pub filtered: i64,
    pub errors: i64,
}

/// Runs one item in a subtransaction; an error is logged and counted.
fn guarded(what: &str, errors: &mut i64, f: impl FnOnce() -> FfResult<()>) {
    match in_subtransaction(f) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            *errors += 1;
            warning!("flowfabric: {what}: {e}");
        }
        Err(report) => {
            *errors += 1;
            warning!("flowfabric: {what}: {}", report.message());
        }
    }
}

/// Dispatches completion events still undispatched `stale_threshold_ms`
/// after they were committed, oldest first.
pub fn reconcile_tick(c: &mut SpiClient<'_>, stale_ms: i64, namespace: Option<&str>, tag: Option<&str>) -> FfResult<TickReport> {
    let cutoff = now_ms() - stale_ms;
    let t = exec(
        c,
        "SELECT event_id FROM ff_completion_event
         WHERE dispatched_at_ms IS NULL AND committed_at_ms < $1
           AND ($2::text IS NULL OR namespace = $2) AND ($3::text IS NULL OR instance_tag = $3)
         ORDER BY event_id LIMIT $4 FOR UPDATE SKIP LOCKED",
        &[cutoff.into(), namespace.into(), tag.into(), BATCH.into()],
    )?;
    let events: Vec<i64> = t.filter_map(|r| r.get::<i64>(1).ok().flatten()).collect();
    let mut report = TickReport { scanned: events.len() as i64, ..TickReport::default() };
    if namespace.is_some() || tag.is_some() {
        let t = exec(
            c,
            "SELECT count(*) FROM (SELECT 1 FROM ff_completion_event
                 WHERE dispatched_at_ms IS NULL AND committed_at_ms < $1
                   AND NOT (($2::text IS NULL OR namespace IS NOT DISTINCT FROM $2)
                            AND ($3::text IS NULL OR instance_tag IS NOT DISTINCT FROM $3))
                 LIMIT $4) s",
            &[cutoff.into(), namespace.into(), tag.into(), BATCH.into()],
        )?;
        report.filtered = t.first().get::<i64>(1)?.unwrap_or(0);
    }
    for event in events {
        let mut outcome = None;
        guarded(&format!("dispatching completion event {event}"), &mut report.errors, || {
            outcome = Some(cascade(c, event)?);
            Ok(())
        });
        match outcome {
            Some(Some(_)) => report.reconciled += 1,
            Some(None) => report.noop += 1,
            None => {}
        }
    }
    Ok(report)
}

/// Resets budgets whose next_reset_at_ms is due.
fn reset_due_budgets(c: &mut SpiClient<'_>) -> FfResult<Value> {
    let t = exec(
        c,
        "SELECT budget_id FROM ff_budget_policy WHERE next_reset_at_ms <= $1
         ORDER BY next_reset_at_ms LIMIT $2 FOR NO KEY UPDATE SKIP LOCKED",
        &[now_ms().into(), BATCH.into()],
    )?;
    let due: Vec<String> = t.filter_map(|r| r.get::<String>(1).ok().flatten()).collect();
    let (mut processed, mut errors) = (0, 0);
    for budget in &due {
        guarded(&format!("resetting budget {budget}"), &mut errors, || {
            if reset_budget_in(c, budget, true)?.is_some() {
                processed += 1;
            }
            Ok(())
        });
    }
    Ok(json!({"processed": processed, "errors": errors}))
}

/// Expired leases: the attempt ends; the execution is claimable again while
/// it has attempts left, else it ends `expired`.
fn expire_leases(c: &mut SpiClient<'_>) -> FfResult<Value> {
    let now = now_ms();
    let t = exec(
        c,
        "SELECT execution_id, partition_key, attempt_index, max_attempts, quota_policy_id
         FROM ff_exec_core WHERE lifecycle_phase = 'active' AND lease_expires_at_ms <= $1
         ORDER BY lease_expires_at_ms LIMIT $2 FOR NO KEY UPDATE SKIP LOCKED",
        &[now.into(), BATCH.into()],
    )?;
    let mut rows = Vec::new();
    for r in t {
        let Some(id) = r.get::<pgrx::Uuid>(1)? else { continue };
        rows.push((
            id,
            r.get::<i16>(2)?.unwrap_or(0),
            r.get::<i32>(3)?.unwrap_or(0),
            r.get::<i32>(4)?.unwrap_or(1),
            r.get::<String>(5)?,
        ));
    }
    let (mut reclaimed, mut expired, mut errors) = (0, 0, 0);
    for (id, part, attempt, max, quota) in rows {
        let uuid = uuid::Uuid::from_bytes(*id.as_bytes());
        let name = ExecutionId { partition: part, uuid };
        guarded(&format!("expiring the lease of {name}"), &mut errors, || {
            end_attempt(c, &uuid, attempt, quota.as_deref(), part, "lease_expired", None, now)?;
            if attempt < max {
                requeue(c, &uuid, "lease expired", 0, now)?;
                reclaimed += 1;
            } else {
                let event = make_terminal(c, &uuid, "expired", "expired", None, Some("lease expired"), now)?;
                cascade(c, event)?;
                expired += 1;
            }
            Ok(())
        });
    }
    Ok(json!({"reclaimed": reclaimed, "expired": expired, "errors": errors}))
}

/// Delayed and backed-off executions whose time has come become
/// `eligible_now` and their lanes are notified.
fn promote_delayed(c: &mut SpiClient<'_>) -> FfResult<Value> {
    let t = exec(
        c,
        "UPDATE ff_exec_core SET eligibility_state = 'eligible_now', public_state = 'waiting'
         WHERE execution_id IN (
             SELECT execution_id FROM ff_exec_core
             WHERE eligibility_state = 'not_eligible_until_time' AND eligible_at_ms <= $1
             ORDER BY eligible_at_ms LIMIT $2 FOR NO KEY UPDATE SKIP LOCKED)
         RETURNING lane_id",
        &[now_ms().into(), BATCH.into()],
    )?;
    let lanes: Vec<String> = t.filter_map(|r| r.get::<String>(1).ok().flatten()).collect();
    let promoted = lanes.len();
    for lane in lanes.into_iter().collect::<BTreeSet<_>>() {
        notify_lane(c, &lane)?;
    }
    Ok(json!({"promoted": promoted}))
}

fn purge_expired_dedup(c: &mut SpiClient<'_>) -> FfResult<Value> {
    let t = exec(
        c,
        "WITH gone AS (
             DELETE FROM ff_budget_usage_dedup WHERE ctid = ANY (ARRAY(
                 SELECT ctid FROM ff_budget_usage_dedup WHERE expires_at_ms <= $1
                 LIMIT $2 FOR UPDATE SKIP LOCKED))
             RETURNING 1)
         SELECT count(*) FROM gone",
        &[now_ms().into(), (BATCH * 10).into()],
    )?;
    Ok(json!({"purged": t.first().get::<i64>(1)?.unwrap_or(0)}))
}

fn trim_quota_windows(c: &mut SpiClient<'_>) -> FfResult<Value> {
    let t = exec(
        c,
        "WITH gone AS (
             DELETE FROM ff_quota_window WHERE ctid = ANY (ARRAY(
                 SELECT w.ctid FROM ff_quota_window w JOIN ff_quota_policy p USING (quota_policy_id)
                 WHERE w.admitted_at_ms <= $1 - p.requests_per_window_seconds * 1000
                 LIMIT $2 FOR UPDATE OF w SKIP LOCKED))
             RETURNING 1)
         SELECT count(*) FROM gone",
        &[now_ms().into(), (BATCH * 10).into()],
    )?;
    Ok(json!({"trimmed": t.first().get::<i64>(1)?.unwrap_or(0)}))
}

/// How long a grant row outlives its expiry, so a late call with it is
/// told "stale" rather than "unknown".
pub const GRANT_KEEP_MS: i64 = 600_000;

fn purge_expired_grants(c: &mut SpiClient<'_>) -> FfResult<Value> {
    let t = exec(
        c,
        "WITH gone AS (
             DELETE FROM ff_claim_grant WHERE ctid = ANY (ARRAY(
                 SELECT ctid FROM ff_claim_grant WHERE expires_at_ms < $1
                 LIMIT $2 FOR UPDATE SKIP LOCKED))
             RETURNING 1)
         SELECT count(*) FROM gone",
        &[(now_ms() - GRANT_KEEP_MS).into(), (BATCH * 10).into()],
    )?;
    Ok(json!({"purged": t.first().get::<i64>(1)?.unwrap_or(0)}))
}

/// Deletes what finished longer than `flowfabric.retention_ms` ago: solo
/// executions, and whole flows once every member is that old, with their
/// attempts, dispatched events, ledgers, grants, edges and groups.
fn purge_retired(c: &mut SpiClient<'_>) -> FfResult<Value> {
    let retention = crate::guc::retention_ms();
    if retention <= 0 {
        return Ok(json!({"executions": 0, "flows": 0}));
    }
    let cutoff = now_ms() - retention;
    let t = exec(
        c,
        "WITH victims AS (
             SELECT execution_id FROM ff_exec_core
             WHERE lifecycle_phase = 'terminal' AND flow_id IS NULL AND terminal_at_ms < $1
             LIMIT $2 FOR UPDATE SKIP LOCKED),
         ev AS (DELETE FROM ff_completion_event e USING victims v
                WHERE e.execution_id = v.execution_id AND e.dispatched_at_ms IS NOT NULL),
         led AS (DELETE FROM ff_budget_usage_by_exec l USING victims v WHERE l.execution_id = v.execution_id),
         gr AS (DELETE FROM ff_claim_grant g USING victims v WHERE g.execution_id = v.execution_id),
         att AS (DELETE FROM ff_attempt a USING victims v WHERE a.execution_id = v.execution_id),
         gone AS (DELETE FROM ff_exec_core x USING victims v WHERE x.execution_id = v.execution_id RETURNING 1)
         SELECT count(*) FROM gone",
        &[cutoff.into(), BATCH.into()],
    )?;
    let executions = t.first().get::<i64>(1)?.unwrap_or(0);
    let t = exec(
        c,
        "WITH done AS (
             SELECT f.flow_id FROM ff_flow_core f
             WHERE f.created_at_ms < $1
               AND NOT EXISTS (SELECT 1 FROM ff_exec_core x WHERE x.flow_id = f.flow_id
                               AND (x.lifecycle_phase <> 'terminal' OR x.terminal_at_ms >= $1))
             LIMIT $2 FOR UPDATE SKIP LOCKED),
         members AS (DELETE FROM ff_exec_core x USING done d WHERE x.flow_id = d.flow_id RETURNING x.execution_id),
         ev AS (DELETE FROM ff_completion_event e USING done d
                WHERE e.flow_id = d.flow_id AND e.dispatched_at_ms IS NOT NULL),
         led AS (DELETE FROM ff_budget_usage_by_exec l USING members m WHERE l.execution_id = m.execution_id),
         gr AS (DELETE FROM ff_claim_grant g USING members m WHERE g.execution_id = m.execution_id),
         att AS (DELETE FROM ff_attempt a USING members m WHERE a.execution_id = m.execution_id),
         gone AS (DELETE FROM ff_flow_core f USING done d WHERE f.flow_id = d.flow_id RETURNING 1)
         SELECT count(*) FROM gone",
        &[cutoff.into(), (BATCH / 10).into()],
    )?;
    Ok(json!({"executions": executions, "flows": t.first().get::<i64>(1)?.unwrap_or(0)}))
}

/// Stale threshold the dependency reconciler uses inside a full pass:
/// events normally dispatch inline, so anything older is a leftover.
pub const PASS_STALE_MS: i64 = 1_000;

/// One pass of every reconciler, with per-reconciler counts.
pub fn run_reconcilers(c: &mut SpiClient<'_>) -> FfResult<Value> {
    let tick = reconcile_tick(c, PASS_STALE_MS, None, None)?;
    Ok(json!({
        "dependency": {"scanned": tick.scanned, "reconciled": tick.reconciled, "noop": tick.noop, "errors": tick.errors},
        "budget_reset": reset_due_budgets(c)?,
        "lease_expiry": expire_leases(c)?,
        "delayed_promotion": promote_delayed(c)?,
        "dedup_purge": purge_expired_dedup(c)?,
        "quota_window_trim": trim_quota_windows(c)?,
        "grant_purge": purge_expired_grants(c)?,
        "retention_purge": purge_retired(c)?,
    }))
}

/// Dispatches completion events undispatched for longer than
/// `stale_threshold_ms`, oldest first, at most 1000 per call; one failing
/// event counts in `errors` and does not stop the others.
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(@extschema@, pg_temp)]
fn ff_reconcile_tick(
    stale_threshold_ms: default!(Option<i64>, 1000),
    namespace: default!(Option<String>, "NULL"),
    instance_tag: default!(Option<String>, "NULL"),
) -> TableIterator<
    'static,
    (
        name!(scanned, i64),
        name!(reconciled, i64),
        name!(noop, i64),
        name!(filtered, i64),
        name!(errors, i64),
    ),
> {
    let r = (|| {
        let stale = required(stale_threshold_ms, "stale_threshold_ms")?;
        if stale < 0 {
            return Err(FfError::invalid(format!("stale_threshold_ms must be >= 0, got {stale}")));
        }
        for (name, v) in [("namespace", &namespace), ("instance_tag", &instance_tag)] {
            if let Some(v) = v {
                check_text_id(name, v)?;
            }
        }
        with_spi(|c| reconcile_tick(c, stale, namespace.as_deref(), instance_tag.as_deref()))
    })()
    .or_raise();
    TableIterator::once((r.scanned, r.reconciled, r.noop, r.filtered, r.errors))
}

/// One pass of every reconciler (dependency, budget reset, lease expiry,
/// delayed promotion, dedup purge, quota window trim, expired grant purge,
/// retention purge) with their counts.
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(@extschema@, pg_temp)]
fn ff_run_reconcilers() -> JsonB {
    JsonB(with_spi(run_reconcilers).or_raise())
}
