//! Reconcilers: bounded passes that settle what no caller finished. They
//! never wait for a lock (everything they take is SKIP LOCKED), so several
//! runners (the background worker, pg_cron, a manual call) never do the
//! same work twice and never deadlock with callers; what is held elsewhere
//! is left for the next pass. Each item runs in its own subtransaction, so
//! one broken row is counted and logged without aborting the pass.

use crate::budget::{reset_budget_in, LockWait};
use crate::db::{in_subtransaction, now_ms, exec, with_spi};
use crate::dispatch::{self, count, fire, Decision, Delta, Dispatched, GroupPolicy};
use crate::error::{required, FfError, FfResult, OrRaise};
use crate::exec::{self, Ended, Ending, Outcome, RetryPolicy, Wait};
use crate::flow::{self, FlowLock};
use crate::ids::check_text_id;
use crate::metrics;
use crate::schedule;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::JsonB;
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// Most items one reconciler handles per pass.
pub const BATCH: i64 = 1000;

type Uuid = pgrx::Uuid;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TickReport {
    pub scanned: i64,
    pub reconciled: i64,
    pub noop: i64,
    pub filtered: i64,
    pub errors: i64,
    /// Events whose flow another transaction held; the next pass takes them.
    pub busy: i64,
}

/// Runs one item in a subtransaction; an error is logged and counted.
fn guarded<T>(what: &str, errors: &mut i64, f: impl FnOnce() -> FfResult<T>) -> Option<T> {
    match in_subtransaction(f) {
        Ok(Ok(v)) => Some(v),
        Ok(Err(e)) => {
            *errors += 1;
            warning!("flowfabric: {what}: {e}");
            None
        }
        Err(report) => {
            *errors += 1;
            warning!("flowfabric: {what}: {}", report.message());
            None
        }
    }
}

fn uuids(t: pgrx::spi::SpiTupleTable<'_>) -> Vec<Uuid> {
    t.filter_map(|r| r.get::<Uuid>(1).ok().flatten()).collect()
}

fn count_of(t: pgrx::spi::SpiTupleTable<'_>) -> FfResult<i64> {
    Ok(t.first().get::<i64>(1)?.unwrap_or(0))
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
         ORDER BY event_id LIMIT $4",
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
        report.filtered = count_of(t)?;
    }
    for event in events {
        let outcome = guarded(&format!("dispatching completion event {event}"), &mut report.errors, || {
            dispatch::dispatch_event(c, event, Wait::SkipLocked)
        });
        match outcome {
            Some(Dispatched::Advanced(_)) => report.reconciled += 1,
            Some(Dispatched::Noop) => report.noop += 1,
            Some(Dispatched::Busy) => report.busy += 1,
            None => {}
        }
    }
    Ok(report)
}

/// Resets budgets whose next_reset_at_ms is due.
fn reset_due_budgets(c: &mut SpiClient<'_>) -> FfResult<Value> {
    let t = exec(
        c,
        "SELECT budget_id FROM ff_budget_policy WHERE next_reset_at_ms <= $1 ORDER BY next_reset_at_ms LIMIT $2",
        &[now_ms().into(), BATCH.into()],
    )?;
    let due: Vec<String> = t.filter_map(|r| r.get::<String>(1).ok().flatten()).collect();
    let (mut processed, mut errors) = (0, 0);
    for budget in &due {
        if let Some(Some(_)) = guarded(&format!("resetting budget {budget}"), &mut errors, || {
            reset_budget_in(c, budget, true, LockWait::Skip)
        }) {
            processed += 1;
        }
    }
    Ok(json!({"processed": processed, "errors": errors}))
}

/// What the lease reconciler did with one expired lease.
enum Expiry {
    Reclaimed,
    Expired,
    Cancelled,
    Busy,
}

/// An expired lease: the attempt ends as a failed one. The execution goes
/// back to the queue (after its backoff) while attempts are left, else it
/// ends `expired`; in a flow being cancelled it ends `cancelled`.
fn expire_one(c: &mut SpiClient<'_>, uuid: &Uuid, now: i64) -> FfResult<Expiry> {
    let t = exec(
        c,
        "SELECT flow_id, attempt_index, attempt_index - attempt_offset < max_attempts,
                retry_base_ms, retry_max_ms, retry_jitter
         FROM ff_exec_core WHERE execution_id = $1 AND lifecycle_phase = 'active' AND lease_expires_at_ms <= $2
         FOR NO KEY UPDATE SKIP LOCKED",
        &[(*uuid).into(), now.into()],
    )?;
    let Some(row) = crate::db::first_row(t) else { return Ok(Expiry::Busy) };
    let flow_id: Option<Uuid> = crate::db::col(&row, 1)?;
    let attempt: i32 = crate::db::col_req(&row, 2)?;
    let attempts_left: bool = crate::db::col(&row, 3)?.unwrap_or(false);
    let retry = RetryPolicy {
        base_ms: crate::db::col_req(&row, 4)?,
        max_ms: crate::db::col_req(&row, 5)?,
        jitter: crate::db::col_req(&row, 6)?,
    };
    let mut lock = match flow_id {
        Some(f) => match flow::lock(c, &f, Wait::SkipLocked)? {
            Some(lock) => Some(lock),
            None if flow::exists(c, &f)? => return Ok(Expiry::Busy),
            None => None,
        },
        None => None,
    };
    let cancelling = lock.as_ref().is_some_and(|l| l.cancel_requested);
    if attempts_left && !cancelling {
        let wait = retry.backoff_ms(attempt + 1, exec::random_unit());
        exec::requeue(c, &exec::from_pg_uuid(uuid), "lease_expired", "lease expired", now + wait, now)?;
        return Ok(Expiry::Reclaimed);
    }
    let (outcome, result) = if cancelling { (Outcome::Cancelled, Expiry::Cancelled) } else { (Outcome::Expired, Expiry::Expired) };
    let ending = Ending { outcome, result: None, error: Some("lease expired"), reason: None, dispatched: true };
    let ended = exec::finish(c, &[*uuid], &ending, Wait::Held, now)?;
    if let Some(mut lock) = lock.take() {
        dispatch::cascade(&mut lock, ended, now)?;
        flow::release(c, lock, now)?;
    }
    Ok(result)
}

fn expire_leases(c: &mut SpiClient<'_>) -> FfResult<Value> {
    let now = now_ms();
    let t = exec(
        c,
        "SELECT execution_id FROM ff_exec_core WHERE lifecycle_phase = 'active' AND lease_expires_at_ms <= $1
         ORDER BY lease_expires_at_ms LIMIT $2",
        &[now.into(), BATCH.into()],
    )?;
    let (mut reclaimed, mut expired, mut cancelled, mut busy, mut errors) = (0, 0, 0, 0, 0);
    for id in uuids(t) {
        match guarded(&format!("expiring the lease of {id}"), &mut errors, || expire_one(c, &id, now)) {
            Some(Expiry::Reclaimed) => reclaimed += 1,
            Some(Expiry::Expired) => expired += 1,
            Some(Expiry::Cancelled) => cancelled += 1,
            Some(Expiry::Busy) => busy += 1,
            None => {}
        }
    }
    Ok(json!({"reclaimed": reclaimed, "expired": expired, "cancelled": cancelled, "busy": busy, "errors": errors}))
}

fn promote_delayed(c: &mut SpiClient<'_>) -> FfResult<Value> {
    Ok(json!({"promoted": exec::promote_due(c, now_ms(), BATCH)?}))
}

/// Runs a purge statement (parameters: cutoff, limit; result: rows deleted).
fn purge(c: &mut SpiClient<'_>, sql: &'static str, cutoff: i64, limit: i64) -> FfResult<i64> {
    count_of(exec(c, sql, &[cutoff.into(), limit.into()])?)
}

fn purge_expired_dedup(c: &mut SpiClient<'_>) -> FfResult<Value> {
    let purged = purge(
        c,
        "WITH gone AS (
             DELETE FROM ff_budget_usage_dedup WHERE ctid = ANY (ARRAY(
                 SELECT ctid FROM ff_budget_usage_dedup WHERE expires_at_ms <= $1
                 LIMIT $2 FOR UPDATE SKIP LOCKED))
             RETURNING 1)
         SELECT count(*) FROM gone",
        now_ms(),
        BATCH * 10,
    )?;
    Ok(json!({"purged": purged}))
}

fn trim_quota_windows(c: &mut SpiClient<'_>) -> FfResult<Value> {
    let trimmed = purge(
        c,
        "WITH gone AS (
             DELETE FROM ff_quota_window WHERE ctid = ANY (ARRAY(
                 SELECT w.ctid FROM ff_quota_window w JOIN ff_quota_policy p USING (quota_policy_id)
                 WHERE w.admitted_at_ms <= $1 - p.requests_per_window_seconds * 1000
                 LIMIT $2 FOR UPDATE OF w SKIP LOCKED))
             RETURNING 1)
         SELECT count(*) FROM gone",
        now_ms(),
        BATCH * 10,
    )?;
    Ok(json!({"trimmed": trimmed}))
}

/// How long a grant row outlives its expiry, so a late call with it is
/// told "stale" rather than "unknown".
pub const GRANT_KEEP_MS: i64 = 600_000;

fn purge_expired_grants(c: &mut SpiClient<'_>) -> FfResult<Value> {
    let purged = purge(
        c,
        "WITH gone AS (
             DELETE FROM ff_claim_grant WHERE ctid = ANY (ARRAY(
                 SELECT ctid FROM ff_claim_grant WHERE expires_at_ms < $1
                 LIMIT $2 FOR UPDATE SKIP LOCKED))
             RETURNING 1)
         SELECT count(*) FROM gone",
        now_ms() - GRANT_KEEP_MS,
        BATCH * 10,
    )?;
    Ok(json!({"purged": purged}))
}

/// Deletes what finished longer than `flowfabric.retention_s` ago: solo
/// executions with their completion event, attempts and ledgers (oldest
/// event first), and flows that reached a terminal state that long ago, with
/// all their members and their members' events. An event goes only with its
/// execution, so every terminal execution that exists keeps its event.
fn purge_retired(c: &mut SpiClient<'_>) -> FfResult<Value> {
    let retention = crate::guc::retention_ms();
    if retention <= 0 {
        return Ok(json!({"executions": 0, "flows": 0, "events": 0}));
    }
    let cutoff = now_ms() - retention;
    let t = exec(
        c,
        "WITH old AS (
             SELECT event_id, execution_id FROM ff_completion_event
             WHERE dispatched_at_ms IS NOT NULL AND occurred_at_ms < $1 AND flow_id IS NULL
             ORDER BY event_id LIMIT $2 FOR UPDATE SKIP LOCKED),
         victims AS (
             SELECT x.execution_id FROM ff_exec_core x JOIN old ON old.execution_id = x.execution_id
             WHERE x.flow_id IS NULL AND x.lifecycle_phase = 'terminal'
             FOR UPDATE OF x SKIP LOCKED),
         ev AS (DELETE FROM ff_completion_event e USING old, victims v
                WHERE e.event_id = old.event_id AND old.execution_id = v.execution_id RETURNING 1),
         led AS (DELETE FROM ff_budget_usage_by_exec l USING victims v WHERE l.execution_id = v.execution_id),
         att AS (DELETE FROM ff_attempt a USING victims v WHERE a.execution_id = v.execution_id),
         gone AS (DELETE FROM ff_exec_core x USING victims v WHERE x.execution_id = v.execution_id RETURNING 1)
         SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM ev)",
        &[cutoff.into(), BATCH.into()],
    )?;
    let row = t.first();
    let executions = row.get::<i64>(1)?.unwrap_or(0);
    let events = row.get::<i64>(2)?.unwrap_or(0);
    let t = exec(
        c,
        "WITH done AS (
             SELECT flow_id FROM ff_flow_core
             WHERE public_flow_state <> 'open' AND terminal_at_ms < $1
             ORDER BY terminal_at_ms LIMIT $2 FOR UPDATE SKIP LOCKED),
         members AS (DELETE FROM ff_exec_core x USING done d WHERE x.flow_id = d.flow_id RETURNING x.execution_id),
         events AS (DELETE FROM ff_completion_event e USING done d WHERE e.flow_id = d.flow_id),
         led AS (DELETE FROM ff_budget_usage_by_exec l USING members m WHERE l.execution_id = m.execution_id),
         att AS (DELETE FROM ff_attempt a USING members m WHERE a.execution_id = m.execution_id),
         gone AS (DELETE FROM ff_flow_core f USING done d WHERE f.flow_id = d.flow_id RETURNING 1)
         SELECT count(*) FROM gone",
        &[cutoff.into(), (BATCH / 10).into()],
    )?;
    Ok(json!({"executions": executions, "flows": count_of(t)?, "events": events}))
}

/// Usage rows whose budget no longer exists (deleted by its owner) are
/// deleted; nothing else refers to them.
fn purge_orphans(c: &mut SpiClient<'_>) -> FfResult<Value> {
    let purged = count_of(exec(
        c,
        "WITH gone AS (
             DELETE FROM ff_budget_usage WHERE ctid = ANY (ARRAY(
                 SELECT u.ctid FROM ff_budget_usage u
                 WHERE NOT EXISTS (SELECT FROM ff_budget_policy p WHERE p.budget_id = u.budget_id)
                 LIMIT $1 FOR UPDATE SKIP LOCKED))
             RETURNING 1)
         SELECT count(*) FROM gone",
        &[(BATCH * 10).into()],
    )?)?;
    Ok(json!({"usage_rows": purged}))
}

/// Runs `f` under the lock of each flow in `flows`, skipping flows another
/// transaction holds, one subtransaction per flow. Returns what `f` counted.
fn per_flow(c: &mut SpiClient<'_>, what: &str, flows: Vec<Uuid>, errors: &mut i64, mut f: impl FnMut(&mut SpiClient<'_>, &mut FlowLock, i64) -> FfResult<i64>) -> i64 {
    let mut total = 0;
    let now = now_ms();
    for id in flows {
        let done = guarded(&format!("{what} in flow {id}"), errors, || {
            let Some(mut lock) = flow::lock(c, &id, Wait::SkipLocked)? else { return Ok(0) };
            let n = f(c, &mut lock, now)?;
            flow::release(c, lock, now)?;
            Ok(n)
        });
        total += done.unwrap_or(0);
    }
    total
}

fn flows_of(t: pgrx::spi::SpiTupleTable<'_>) -> Vec<Uuid> {
    let mut v = uuids(t);
    v.dedup();
    v
}

/// The backstop for flows: finishes what a cascade had to leave to others
/// and repairs anything that should never happen. Counts:
/// - `members_cancelled`: live members of cancelled flows (held by a worker when the flow was cancelled);
/// - `groups_settled`: decided groups whose downstream or siblings were held when they fired;
/// - `edges_resolved`: applied edges whose upstream ended without resolving them (never expected);
/// - `groups_decided`: waiting groups with nothing left to wait for (never expected).
fn repair_graph(c: &mut SpiClient<'_>) -> FfResult<Value> {
    let mut errors = 0;
    let flows = flows_of(exec(
        c,
        "SELECT flow_id FROM ff_flow_core WHERE cancel_requested_at_ms IS NOT NULL AND public_flow_state = 'open'
         ORDER BY flow_id LIMIT $1",
        &[BATCH.into()],
    )?);
    let members_cancelled = per_flow(c, "cancelling members", flows, &mut errors, |c, lock, now| {
        let t = exec(
            c,
            "SELECT x.execution_id, f.cancel_reason FROM ff_exec_core x JOIN ff_flow_core f ON f.flow_id = x.flow_id
             WHERE x.flow_id = $1 AND x.lifecycle_phase <> 'terminal'",
            &[lock.id.into()],
        )?;
        let mut live = Vec::new();
        let mut reason = None;
        for row in t {
            live.extend(row.get::<Uuid>(1)?);
            reason = row.get::<String>(2)?;
        }
        let ending = Ending { outcome: Outcome::Cancelled, result: None, error: None, reason: reason.as_deref(), dispatched: true };
        let ended = exec::finish(c, &live, &ending, Wait::SkipLocked, now)?;
        let n = ended.len() as i64;
        dispatch::cascade(lock, ended, now)?;
        Ok(n)
    });

    let flows = flows_of(exec(
        c,
        "SELECT flow_id FROM ff_edge_group WHERE group_state <> 'pending' AND NOT settled ORDER BY flow_id LIMIT $1",
        &[BATCH.into()],
    )?);
    let groups_settled = per_flow(c, "settling edge groups", flows, &mut errors, |c, lock, now| {
        let t = exec(
            c,
            "SELECT downstream_eid, group_state, policy FROM ff_edge_group
             WHERE flow_id = $1 AND group_state <> 'pending' AND NOT settled",
            &[lock.id.into()],
        )?;
        let mut decided = Vec::new();
        for row in t {
            let Some(down) = row.get::<Uuid>(1)? else { continue };
            let decision = if row.get::<String>(2)?.as_deref() == Some("impossible") {
                Decision::Impossible
            } else {
                let policy = GroupPolicy::from_stored(&row.get::<JsonB>(3)?.map(|j| j.0).unwrap_or_default())?;
                let cancel_remaining = !matches!(
                    policy,
                    GroupPolicy::AllOf | GroupPolicy::AnyOf { cancel_remaining: false } | GroupPolicy::Quorum { cancel_remaining: false, .. }
                );
                Decision::Satisfied { cancel_remaining }
            };
            decided.push((down, decision));
        }
        let mut ended = Vec::new();
        fire(c, lock, &decided, now, &mut ended)?;
        dispatch::cascade(lock, ended, now)?;
        Ok(decided.len() as i64)
    });

    let t = exec(
        c,
        "SELECT DISTINCT e.flow_id FROM ff_edge e JOIN ff_exec_core x ON x.execution_id = e.upstream_eid
         WHERE e.edge_state = 'applied' AND e.resolution IS NULL AND x.lifecycle_phase = 'terminal'
         LIMIT $1",
        &[BATCH.into()],
    )?;
    let edges_resolved = per_flow(c, "resolving edges", flows_of(t), &mut errors, |c, lock, now| {
        let t = exec(
            c,
            "SELECT DISTINCT e.upstream_eid, x.terminal_outcome FROM ff_edge e
             JOIN ff_exec_core x ON x.execution_id = e.upstream_eid
             WHERE e.flow_id = $1 AND e.edge_state = 'applied' AND e.resolution IS NULL AND x.lifecycle_phase = 'terminal'",
            &[lock.id.into()],
        )?;
        let mut wave = Vec::new();
        for row in t {
            let Some(up) = row.get::<Uuid>(1)? else { continue };
            let outcome = exec::Bucket::of_outcome(&row.get::<String>(2)?.unwrap_or_default()).outcome();
            wave.push(Ended { uuid: up, flow: Some(lock.id), outcome });
        }
        let n = wave.len() as i64;
        dispatch::cascade_counted(lock, wave, now)?;
        Ok(n)
    });

    let flows = flows_of(exec(
        c,
        "SELECT flow_id FROM ff_edge_group
         WHERE group_state = 'pending' AND pending_count = 0 AND running_count = 0
           AND success_count + fail_count + skip_count > 0
         ORDER BY flow_id LIMIT $1",
        &[BATCH.into()],
    )?);
    let groups_decided = per_flow(c, "deciding edge groups", flows, &mut errors, |c, lock, now| {
        let t = exec(
            c,
            "SELECT downstream_eid FROM ff_edge_group
             WHERE flow_id = $1 AND group_state = 'pending' AND pending_count = 0 AND running_count = 0
               AND success_count + fail_count + skip_count > 0",
            &[lock.id.into()],
        )?;
        // A zero delta re-reads each group and fires it if it is decided.
        let deltas: BTreeMap<[u8; 16], (Uuid, Delta)> =
            uuids(t).into_iter().map(|d| (*d.as_bytes(), (d, Delta::default()))).collect();
        let mut ended = Vec::new();
        count(c, lock, &deltas, now, &mut ended)?;
        dispatch::cascade(lock, ended, now)?;
        Ok(deltas.len() as i64)
    });

    Ok(json!({
        "members_cancelled": members_cancelled,
        "groups_settled": groups_settled,
        "edges_resolved": edges_resolved,
        "groups_decided": groups_decided,
        "errors": errors,
    }))
}

/// Due schedules: one execution per due time (see `schedule`).
fn run_schedules(c: &mut SpiClient<'_>) -> FfResult<Value> {
    let now = now_ms();
    let (mut ran, mut created, mut missed, mut errors) = (0, 0, 0, 0);
    for id in schedule::due_now(c, now, BATCH / 10)? {
        if let Some(Some(r)) = guarded(&format!("running schedule {id}"), &mut errors, || schedule::run_one(c, &id, now)) {
            ran += 1;
            created += r.created;
            missed += r.missed;
        }
    }
    Ok(schedule::summary(ran, created, missed, errors))
}

/// Stale threshold the dependency reconciler uses inside a full pass:
/// events normally dispatch inline, so anything older is a leftover.
pub const PASS_STALE_MS: i64 = 1_000;

/// One pass of every reconciler, with per-reconciler counts.
pub fn run_reconcilers(c: &mut SpiClient<'_>) -> FfResult<Value> {
    let tick = reconcile_tick(c, PASS_STALE_MS, None, None)?;
    let pass = json!({
        "dependency": {"scanned": tick.scanned, "reconciled": tick.reconciled, "noop": tick.noop,
                       "busy": tick.busy, "errors": tick.errors},
        "budget_reset": reset_due_budgets(c)?,
        "lease_expiry": expire_leases(c)?,
        "delayed_promotion": promote_delayed(c)?,
        "graph_repair": repair_graph(c)?,
        "dedup_purge": purge_expired_dedup(c)?,
        "quota_window_trim": trim_quota_windows(c)?,
        "grant_purge": purge_expired_grants(c)?,
        "retention_purge": purge_retired(c)?,
        "orphan_purge": purge_orphans(c)?,
        "schedules": run_schedules(c)?,
    });
    metrics::add_pass(c, &pass)?;
    Ok(pass)
}

/// Dispatches completion events undispatched for longer than
/// `stale_threshold_ms`, oldest first, at most 1000 per call; one failing
/// event counts in `errors` and does not stop the others.
#[pg_extern(volatile, parallel_unsafe, security_definer, name = "ff_reconcile_tick")]
#[search_path(@extschema@, pg_temp)]
fn sql_reconcile_tick(
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
/// delayed promotion, graph repair, dedup purge, quota window trim, expired
/// grant purge, retention purge, orphan purge, schedules) with their counts.
#[pg_extern(volatile, parallel_unsafe, security_definer, name = "ff_run_reconcilers")]
#[search_path(@extschema@, pg_temp)]
fn sql_run_reconcilers() -> JsonB {
    JsonB(with_spi(run_reconcilers).or_raise())
}
