//! The completion cascade. An execution that ends resolves the applied edges
//! leaving it; each edge group counts the resolution and, the first time
//! its decision is reached, fires: a satisfied group makes its downstream
//! claimable (and with `cancel_remaining` cancels the siblings still
//! running), an impossible one skips its downstream. Skips and cancellations
//! end executions, which resolve their own edges in the next wave.
//!
//! Everything runs under the flow's lock in the caller's transaction, so a
//! cascade is applied whole or not at all, and nothing else changes the
//! flow's graph meanwhile. Members are taken with SKIP LOCKED (a worker may
//! hold one while it waits for the flow): what is skipped leaves its group
//! unsettled, and the repair reconciler finishes it.
//!
//! Each wave is set-based (a few statements however wide) and runs in its
//! own SPI connection, so a cascade of any length uses bounded memory.

use crate::db::{by_value, col, col_req, exec, first_row, keyed, keyed_sql, now_ms, with_spi};
use crate::error::{required, FfError, FfResult, OrRaise};
use crate::exec::{self, Bucket, Ended, Ending, Outcome, Wait};
use crate::flow::{self, FlowLock};
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::JsonB;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};

type Uuid = pgrx::Uuid;

/// How an edge group decides, from `ff_edge_group.policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupPolicy {
    AllOf,
    AnyOf { cancel_remaining: bool },
    Quorum { k: i32, cancel_remaining: bool },
}

impl GroupPolicy {
    /// Parses and validates a policy given by a caller.
    pub fn parse(v: &Value) -> FfResult<GroupPolicy> {
        let kind = v.get("kind").and_then(Value::as_str).ok_or_else(|| {
            FfError::invalid(format!("edge group policy needs a \"kind\" (all_of, any_of, quorum), got {v}"))
        })?;
        let cancel_remaining = match v.get("on_satisfied").map(|s| s.as_str()) {
            None | Some(Some("cancel_remaining")) => true,
            Some(Some("let_run")) => false,
            Some(other) => {
                return Err(FfError::invalid(format!(
                    "on_satisfied must be \"cancel_remaining\" or \"let_run\", got {}",
                    other.map(str::to_string).unwrap_or_else(|| v["on_satisfied"].to_string())
                )))
            }
        };
        match kind {
            "all_of" => Ok(GroupPolicy::AllOf),
            "any_of" => Ok(GroupPolicy::AnyOf { cancel_remaining }),
            "quorum" => {
                let k = v.get("k").and_then(Value::as_i64).filter(|k| (1..=i32::MAX as i64).contains(k));
                let k = k.ok_or_else(|| FfError::invalid(format!("quorum needs an integer \"k\" >= 1, got {v}")))?;
                Ok(GroupPolicy::Quorum { k: k as i32, cancel_remaining })
            }
            other => Err(FfError::invalid(format!("unknown edge group kind \"{other}\""))),
        }
    }

    /// Reads a stored policy; one that does not parse was written around the
    /// API and is reported as corrupt data (XX001).
    pub fn from_stored(v: &Value) -> FfResult<GroupPolicy> {
        GroupPolicy::parse(v).map_err(|e| {
            FfError::new(pgrx::PgSqlErrorCode::ERRCODE_DATA_CORRUPTED, format!("stored edge group policy is corrupt: {}", e.message))
        })
    }

    pub fn to_json(self) -> Value {
        let on = |c: bool| if c { "cancel_remaining" } else { "let_run" };
        match self {
            GroupPolicy::AllOf => serde_json::json!({"kind": "all_of"}),
            GroupPolicy::AnyOf { cancel_remaining } => {
                serde_json::json!({"kind": "any_of", "on_satisfied": on(cancel_remaining)})
            }
            GroupPolicy::Quorum { k, cancel_remaining } => {
                serde_json::json!({"kind": "quorum", "k": k, "on_satisfied": on(cancel_remaining)})
            }
        }
    }
}

/// Inbound edges of one downstream: staged but not applied (`pending`),
/// applied and waiting on their upstream (`running`), and resolved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub pending: i32,
    pub running: i32,
    pub success: i32,
    pub fail: i32,
    pub skip: i32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Pending,
    Satisfied { cancel_remaining: bool },
    Impossible,
}

/// A group's decision. Edges staged but not applied yet count as still
/// waiting, so a group built edge by edge cannot fire before its last edge
/// is applied.
pub fn decide(policy: GroupPolicy, n: Counts) -> Decision {
    let waiting = n.pending + n.running;
    let total = waiting + n.success + n.fail + n.skip;
    let nonsuccess = n.fail + n.skip;
    match policy {
        GroupPolicy::AllOf if total > 0 && n.success == total => Decision::Satisfied { cancel_remaining: false },
        GroupPolicy::AllOf if nonsuccess > 0 => Decision::Impossible,
        GroupPolicy::AnyOf { cancel_remaining } if n.success >= 1 => Decision::Satisfied { cancel_remaining },
        GroupPolicy::AnyOf { .. } if total > 0 && nonsuccess >= total => Decision::Impossible,
        GroupPolicy::Quorum { k, cancel_remaining } if n.success >= k => Decision::Satisfied { cancel_remaining },
        GroupPolicy::Quorum { k, .. } if total - nonsuccess < k => Decision::Impossible,
        _ => Decision::Pending,
    }
}

/// A change to the counters of one group.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Delta {
    pub pending: i32,
    pub running: i32,
    pub success: i32,
    pub fail: i32,
    pub skip: i32,
}

impl Delta {
    /// An edge leaves `from` (pending or running) resolved as `bucket`, or
    /// (with `None`) starts running.
    pub fn resolve(from_pending: bool, bucket: Option<Bucket>) -> Delta {
        let mut d = Delta::default();
        if from_pending {
            d.pending = -1;
        } else {
            d.running = -1;
        }
        match bucket {
            None => d.running += 1,
            Some(Bucket::Success) => d.success = 1,
            Some(Bucket::Fail) => d.fail = 1,
            Some(Bucket::Skip) => d.skip = 1,
        }
        d
    }

    fn only_starts_waiting(&self) -> bool {
        self.success == 0 && self.fail == 0 && self.skip == 0 && self.running > 0
    }

    fn add(&mut self, o: Delta) {
        self.pending += o.pending;
        self.running += o.running;
        self.success += o.success;
        self.fail += o.fail;
        self.skip += o.skip;
    }
}

// Adds one delta ($2..$6: pending, running, success, fail, skip) to the
// groups of the downstreams $1 and returns them (see `keyed`).
const COUNT: [&str; 2] = keyed_sql!(
    "UPDATE ff_edge_group g SET pending_count = g.pending_count + $2, running_count = g.running_count + $3,
         success_count = g.success_count + $4, fail_count = g.fail_count + $5, skip_count = g.skip_count + $6
     WHERE g.downstream_eid ",
    "
     RETURNING g.downstream_eid, g.policy, g.pending_count, g.running_count, g.success_count, g.fail_count,
               g.skip_count, g.group_state"
);

/// The one place edge resolutions are counted, for `apply` and for the
/// cascade alike: adds the deltas to their groups and fires each group that
/// reaches its decision now. Executions the firing ends go to `ended`.
pub fn count(c: &mut SpiClient<'_>, lock: &FlowLock, deltas: &BTreeMap<[u8; 16], (Uuid, Delta)>, now: i64, ended: &mut Vec<Ended>) -> FfResult<()> {
    if deltas.is_empty() {
        return Ok(());
    }
    // One statement per distinct delta: a wave's groups mostly share one
    // (a fan-out's downstreams each gain one success).
    let mut decided = Vec::new();
    for (d, downs) in &by_value(deltas.values().map(|(down, d)| (*d, *down))) {
        let (sql, key) = keyed(COUNT, downs);
        let t = exec(c, sql, &[key, d.pending.into(), d.running.into(), d.success.into(), d.fail.into(), d.skip.into()])?;
        for row in t {
            if row.get::<String>(8)?.as_deref() != Some("pending") {
                continue; // fired already: counters only
            }
            // A group is decided when one of its edges resolves (or on a
            // repair pass's zero delta), never when an edge merely starts
            // waiting: a flow built edge by edge would otherwise look short
            // of its quorum.
            if d.only_starts_waiting() {
                continue;
            }
            let down: Uuid = row.get(1)?.ok_or_else(|| FfError::internal("NULL downstream"))?;
            let policy = GroupPolicy::from_stored(&row.get::<JsonB>(2)?.map(|j| j.0).unwrap_or_default())?;
            let counts = Counts {
                pending: row.get(3)?.unwrap_or(0),
                running: row.get(4)?.unwrap_or(0),
                success: row.get(5)?.unwrap_or(0),
                fail: row.get(6)?.unwrap_or(0),
                skip: row.get(7)?.unwrap_or(0),
            };
            match decide(policy, counts) {
                Decision::Pending => {}
                d => decided.push((down, d)),
            }
        }
    }
    fire(c, lock, &decided, now, ended)
}

/// Carries out group decisions on their downstreams (and siblings), records
/// each group's state, and marks it settled when nothing was left undone.
/// Also what the repair reconciler calls for groups left unsettled. Its
/// statements go by execution id alone; `_held` is there so that only a
/// caller holding the flow (the lock order's second step) can call it.
pub fn fire(c: &mut SpiClient<'_>, _held: &FlowLock, decided: &[(Uuid, Decision)], now: i64, ended: &mut Vec<Ended>) -> FfResult<()> {
    if decided.is_empty() {
        return Ok(());
    }
    let mut unsettled: BTreeSet<[u8; 16]> = BTreeSet::new();
    let satisfied: Vec<Uuid> = decided.iter().filter(|(_, d)| matches!(d, Decision::Satisfied { .. })).map(|(u, _)| *u).collect();
    let impossible: Vec<Uuid> = decided.iter().filter(|(_, d)| *d == Decision::Impossible).map(|(u, _)| *u).collect();
    let cancelling: Vec<Uuid> = decided
        .iter()
        .filter(|(_, d)| *d == Decision::Satisfied { cancel_remaining: true })
        .map(|(u, _)| *u)
        .collect();

    for held in exec::unblock(c, &satisfied, now)? {
        unsettled.insert(*held.as_bytes());
    }
    if !impossible.is_empty() {
        let skip = Ending { outcome: Outcome::Skipped, result: None, error: None, reason: Some("dependencies_impossible"), dispatched: true };
        let done = exec::finish(c, &impossible, &skip, Wait::SkipLocked, now)?;
        for held in still_live(c, &impossible, &done)? {
            unsettled.insert(*held.as_bytes());
        }
        ended.extend(done);
    }
    if !cancelling.is_empty() {
        let t = exec(
            c,
            "SELECT e.downstream_eid, e.upstream_eid FROM ff_edge e
             WHERE e.downstream_eid = ANY($1) AND e.edge_state = 'applied' AND e.resolution IS NULL",
            &[cancelling.into()],
        )?;
        let mut siblings: BTreeMap<[u8; 16], Vec<Uuid>> = BTreeMap::new();
        for row in t {
            let (Some(down), Some(up)) = (row.get::<Uuid>(1)?, row.get::<Uuid>(2)?) else { continue };
            siblings.entry(*up.as_bytes()).or_default().push(down);
        }
        let ups: Vec<Uuid> = siblings.keys().map(|b| Uuid::from_bytes(*b)).collect();
        let cancel = Ending { outcome: Outcome::Cancelled, result: None, error: None, reason: Some("sibling_quorum_satisfied"), dispatched: true };
        let done = exec::finish(c, &ups, &cancel, Wait::SkipLocked, now)?;
        for held in still_live(c, &ups, &done)? {
            for down in &siblings[held.as_bytes()] {
                unsettled.insert(*down.as_bytes());
            }
        }
        ended.extend(done);
    }

    // Each group's state, one statement per (state, settled) pair.
    let by_outcome = by_value(decided.iter().map(|(down, d)| {
        let state = if *d == Decision::Impossible { "impossible" } else { "satisfied" };
        ((state, !unsettled.contains(down.as_bytes())), *down)
    }));
    for ((state, settled), downs) in &by_outcome {
        let (sql, key) = keyed(SETTLE, downs);
        exec(c, sql, &[key, (*state).into(), (*settled).into()])?;
    }
    Ok(())
}

const SETTLE: [&str; 2] = keyed_sql!("UPDATE ff_edge_group g SET group_state = $2, settled = $3 WHERE g.downstream_eid ", "");

/// Of `asked`, those not in `done` that are still live: held by another
/// transaction, so their part of a decision is left to the repair pass.
fn still_live(c: &mut SpiClient<'_>, asked: &[Uuid], done: &[Ended]) -> FfResult<Vec<Uuid>> {
    let ended: BTreeSet<[u8; 16]> = done.iter().map(|e| *e.uuid.as_bytes()).collect();
    let rest: Vec<Uuid> = asked.iter().filter(|u| !ended.contains(u.as_bytes())).copied().collect();
    if rest.is_empty() {
        return Ok(rest);
    }
    let t = exec(
        c,
        "SELECT execution_id FROM ff_exec_core WHERE execution_id = ANY($1) AND lifecycle_phase <> 'terminal'",
        &[rest.into()],
    )?;
    Ok(t.filter_map(|r| r.get::<Uuid>(1).ok().flatten()).collect())
}

// Resolves the applied, unresolved edges leaving the upstreams $1 as $2
// (see `keyed`).
const RESOLVE: [&str; 2] = keyed_sql!(
    "UPDATE ff_edge e SET resolution = $2
     WHERE e.upstream_eid ",
    " AND e.edge_state = 'applied' AND e.resolution IS NULL
     RETURNING e.downstream_eid"
);

/// One wave: resolves every applied, unresolved edge leaving `wave` and
/// counts them. Returns the number of edges resolved and what ended next.
/// One statement per outcome bucket (a wave's endings mostly share one),
/// so a wave costs the same however large the flow, and grows linearly
/// with its width.
fn step(c: &mut SpiClient<'_>, lock: &FlowLock, wave: &[Ended], now: i64) -> FfResult<(i32, Vec<Ended>)> {
    let by_bucket = by_value(wave.iter().map(|e| (e.outcome.bucket(), e.uuid)));
    // Marking the edge resolved first is what makes a replayed or duplicate
    // ending count each upstream once per group.
    let mut deltas: BTreeMap<[u8; 16], (Uuid, Delta)> = BTreeMap::new();
    let mut resolved = 0;
    for (bucket, ups) in &by_bucket {
        let (sql, key) = keyed(RESOLVE, ups);
        for row in exec(c, sql, &[key, bucket.as_str().into()])? {
            let Some(down) = row.get::<Uuid>(1)? else { continue };
            let delta = Delta::resolve(false, Some(*bucket));
            deltas.entry(*down.as_bytes()).or_insert((down, Delta::default())).1.add(delta);
            resolved += 1;
        }
    }
    let mut next = Vec::new();
    count(c, lock, &deltas, now, &mut next)?;
    Ok((resolved, next))
}

/// Runs the cascade of executions that just ended in the locked flow, to
/// the end, and takes every ending into the flow's counters. Returns the
/// number of edges the first wave resolved.
pub fn cascade(lock: &mut FlowLock, ended: Vec<Ended>, now: i64) -> FfResult<i32> {
    lock.record_ended(&ended);
    run_waves(lock, ended, now)
}

/// Runs the cascade of executions whose endings are already in the flow's
/// counters (counted when the flow was taken, or ended earlier with their
/// edges left unresolved).
pub fn cascade_counted(lock: &mut FlowLock, wave: Vec<Ended>, now: i64) -> FfResult<i32> {
    run_waves(lock, wave, now)
}

fn run_waves(lock: &mut FlowLock, mut wave: Vec<Ended>, now: i64) -> FfResult<i32> {
    let mut first = None;
    while !wave.is_empty() {
        let (resolved, next) = with_spi(|c| step(c, lock, &wave, now))?;
        first.get_or_insert(resolved);
        lock.record_ended(&next);
        wave = next;
    }
    Ok(first.unwrap_or(0))
}

/// Ends an execution the caller holds (lock order 1, taken by the fence or
/// by a cancel) and, for a flow member, runs its cascade under the flow's
/// lock. A member of a flow being cancelled cannot complete or fail: its
/// lease is as good as stale (55000) and it ends cancelled.
///
/// The execution's own rows are ended before the flow row is taken: they
/// belong to the execution alone (lock order 1), and every completion of a
/// flow's members queues on its flow row until commit, so only the edge and
/// group work stays inside that queue. An edge applied in between reads the
/// upstream as still live and is resolved by this cascade, whose statements
/// start after the flow row is granted (READ COMMITTED sees the edge).
/// `shares`: it names a quota policy or a budget reserve (when unsure, true).
pub fn end_held(c: &mut SpiClient<'_>, uuid: &Uuid, flow: Option<Uuid>, shares: bool, ending: &Ending<'_>, now: i64) -> FfResult<()> {
    let ended = if shares {
        exec::finish(c, &[*uuid], ending, Wait::Held, now)?
    } else {
        exec::finish_unshared(c, uuid, ending, now)?
    };
    let Some(f) = flow else { return Ok(()) };
    let Some(mut lock) = flow::lock_counting(c, &f, &ended, now)? else { return Ok(()) };
    if lock.cancel_requested && ending.outcome != Outcome::Cancelled {
        // Raising undoes the ending and its counting with the rest of the statement.
        return Err(FfError::wrong_state(format!(
            "flow {} is being cancelled; execution {uuid} will end cancelled",
            lock.id
        )));
    }
    cascade_counted(&mut lock, ended, now)?;
    flow::release(c, lock, now)
}

/// What dispatching an event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dispatched {
    /// Its cascade ran; this many edges moved in the first wave.
    Advanced(i32),
    /// It was dispatched already.
    Noop,
    /// Its flow is held by another transaction (reconcilers only).
    Busy,
}

/// Dispatches one completion event written without its cascade (restored,
/// inserted by hand, or left by an older version): claims it once, then
/// runs the cascade of its execution under the flow's lock.
pub fn dispatch_event(c: &mut SpiClient<'_>, event_id: i64, wait: Wait) -> FfResult<Dispatched> {
    let now = now_ms();
    let t = exec(
        c,
        "SELECT execution_id, flow_id, outcome FROM ff_completion_event
         WHERE event_id = $1 AND dispatched_at_ms IS NULL",
        &[event_id.into()],
    )?;
    let Some(row) = first_row(t) else { return Ok(Dispatched::Noop) };
    let upstream: Uuid = col_req(&row, 1)?;
    let flow_id: Option<Uuid> = col(&row, 2)?;
    let outcome = Bucket::of_outcome(&col_req::<String>(&row, 3)?).outcome();
    // Lock order: the flow (events of its members move only under it), then the event.
    let lock = match flow_id {
        Some(f) => match flow::lock(c, &f, wait)? {
            Some(lock) => Some(lock),
            None if wait == Wait::SkipLocked && flow::exists(c, &f)? => return Ok(Dispatched::Busy),
            None => None,
        },
        None => None,
    };
    let claimed = exec(
        c,
        "UPDATE ff_completion_event SET dispatched_at_ms = $2 WHERE event_id = $1 AND dispatched_at_ms IS NULL
         RETURNING 1",
        &[event_id.into(), now.into()],
    )?;
    if claimed.is_empty() {
        return Ok(Dispatched::Noop);
    }
    let Some(mut lock) = lock else { return Ok(Dispatched::Advanced(0)) };
    // The execution ended when its event was written: only its edges move
    // now, not the flow's member counters.
    let wave = vec![Ended { uuid: upstream, flow: Some(lock.id), outcome }];
    let resolved = run_waves(&mut lock, wave, now)?;
    flow::release(c, lock, now)?;
    Ok(Dispatched::Advanced(resolved))
}

pub fn dispatch_completion(event_id: i64) -> FfResult<(&'static str, i32)> {
    with_spi(|c| {
        Ok(match dispatch_event(c, event_id, Wait::Yes)? {
            Dispatched::Advanced(n) => ("advanced", n),
            Dispatched::Noop | Dispatched::Busy => ("noop", 0),
        })
    })
}

/// Dispatches a completion event: advances the edge groups downstream of
/// its execution, and the whole cascade that follows, in the caller's
/// transaction. 'noop' when it was already dispatched.
#[pg_extern(volatile, parallel_unsafe, security_definer, name = "ff_dispatch_completion")]
#[search_path(@extschema@, pg_temp)]
fn sql_dispatch_completion(
    event_id: Option<i64>,
) -> TableIterator<'static, (name!(outcome, String), name!(advanced, i32))> {
    let (outcome, n) = (|| dispatch_completion(required(event_id, "event_id")?))().or_raise();
    TableIterator::once((outcome.to_string(), n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn n(success: i32, fail: i32, skip: i32, running: i32) -> Counts {
        Counts { pending: 0, running, success, fail, skip }
    }

    #[test]
    fn all_of() {
        assert_eq!(decide(GroupPolicy::AllOf, n(2, 0, 0, 1)), Decision::Pending);
        assert_eq!(decide(GroupPolicy::AllOf, n(3, 0, 0, 0)), Decision::Satisfied { cancel_remaining: false });
        assert_eq!(decide(GroupPolicy::AllOf, n(2, 0, 1, 0)), Decision::Impossible);
        assert_eq!(decide(GroupPolicy::AllOf, n(0, 1, 0, 2)), Decision::Impossible);
        assert_eq!(decide(GroupPolicy::AllOf, n(0, 0, 0, 0)), Decision::Pending);
    }

    #[test]
    fn staged_edges_count_as_waiting() {
        let staged = Counts { pending: 1, ..n(1, 0, 0, 0) };
        assert_eq!(decide(GroupPolicy::AllOf, staged), Decision::Pending);
        let q = GroupPolicy::Quorum { k: 2, cancel_remaining: false };
        assert_eq!(decide(q, Counts { pending: 1, ..n(1, 1, 0, 0) }), Decision::Pending);
        assert_eq!(decide(q, Counts { pending: 0, ..n(1, 1, 0, 0) }), Decision::Impossible);
    }

    #[test]
    fn any_of() {
        let p = GroupPolicy::AnyOf { cancel_remaining: true };
        assert_eq!(decide(p, n(0, 2, 0, 1)), Decision::Pending);
        assert_eq!(decide(p, n(1, 2, 0, 0)), Decision::Satisfied { cancel_remaining: true });
        assert_eq!(decide(p, n(0, 2, 1, 0)), Decision::Impossible);
    }

    #[test]
    fn quorum() {
        let p = GroupPolicy::Quorum { k: 2, cancel_remaining: false };
        assert_eq!(decide(p, n(1, 0, 0, 2)), Decision::Pending);
        assert_eq!(decide(p, n(2, 0, 0, 1)), Decision::Satisfied { cancel_remaining: false });
        assert_eq!(decide(p, n(1, 1, 0, 1)), Decision::Pending);
        assert_eq!(decide(p, n(1, 2, 0, 0)), Decision::Impossible);
        let p35 = GroupPolicy::Quorum { k: 3, cancel_remaining: true };
        assert_eq!(decide(p35, n(0, 3, 0, 2)), Decision::Impossible);
    }

    #[test]
    fn deltas_move_one_edge() {
        assert_eq!(Delta::resolve(true, None), Delta { pending: -1, running: 1, ..Delta::default() });
        assert_eq!(Delta::resolve(false, Some(Bucket::Skip)), Delta { running: -1, skip: 1, ..Delta::default() });
        assert_eq!(Delta::resolve(true, Some(Bucket::Success)), Delta { pending: -1, success: 1, ..Delta::default() });
    }

    #[test]
    fn policy_parsing() {
        assert_eq!(GroupPolicy::parse(&json!({"kind": "all_of"})).unwrap(), GroupPolicy::AllOf);
        assert_eq!(
            GroupPolicy::parse(&json!({"kind": "any_of"})).unwrap(),
            GroupPolicy::AnyOf { cancel_remaining: true }
        );
        assert_eq!(
            GroupPolicy::parse(&json!({"kind": "quorum", "k": 2, "on_satisfied": "let_run"})).unwrap(),
            GroupPolicy::Quorum { k: 2, cancel_remaining: false }
        );
        for bad in [json!({}), json!({"kind": "xor"}), json!({"kind": "quorum"}), json!({"kind": "quorum", "k": 0}),
                    json!({"kind": "any_of", "on_satisfied": "explode"}), json!([1])] {
            assert!(GroupPolicy::parse(&bad).is_err(), "{bad}");
        }
        let p = GroupPolicy::Quorum { k: 3, cancel_remaining: true };
        assert_eq!(GroupPolicy::parse(&p.to_json()).unwrap(), p);
        assert_eq!(
            GroupPolicy::from_stored(&json!({"kind": "nope"})).unwrap_err().code,
            pgrx::PgSqlErrorCode::ERRCODE_DATA_CORRUPTED
        );
    }
}
