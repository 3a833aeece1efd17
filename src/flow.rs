//! Flows: dependency DAGs over executions. Staging is compare-and-swap on
//! the graph revision and refuses cycles; applying an edge blocks its
//! downstream until the edge group fires (see `dispatch`). A flow is `open`
//! until every member is terminal, then `completed`, `failed` or
//! `cancelled`, announced on `ff_flow_events`.
//!
//! Every change to a flow's graph, and the counting and cascade of every
//! member's ending, happens under the flow row's lock (lock order 2, after
//! the execution row a call names), so building a flow while its members run
//! is serialised with the cascade: an edge applied while its upstream ends
//! either sees the ending or is resolved by the cascade that follows it
//! (the member's own rows are ended just before its flow row is taken).

use crate::db::{col, col_req, exec, first_row, now_ms, scratch_for, with_spi, write_in_chunks};
use crate::dispatch::{self, count, Delta, GroupPolicy};
use crate::error::{required, FfError, FfResult, OrRaise};
use crate::exec::{self, pg_uuid, Bucket, Ended, Ending, Outcome, State, Wait};
use crate::ids::{check_text_id, clip, crc16, ExecutionId};
use crate::jsonb::RawJsonb;
use pgrx::prelude::*;
use pgrx::spi::{SpiClient, SpiTupleTable};
use std::collections::{BTreeMap, HashSet};

type Uuid = pgrx::Uuid;

/// The channel flow endings are announced on.
pub const EVENTS_CHANNEL: &str = "ff_flow_events";

fn flow_missing(flow: &Uuid) -> FfError {
    FfError::not_found(format!("flow {flow} does not exist"))
}

/// A flow row locked by this transaction, and the member endings counted
/// under it; `release` writes them back in one update.
#[derive(Debug)]
pub struct FlowLock {
    pub id: Uuid,
    pub partition: i16,
    pub namespace: String,
    pub state: String,
    pub revision: i64,
    pub node_count: i32,
    pub cancel_requested: bool,
    ended: i32,
    failed: i32,
}

impl FlowLock {
    /// The flow row as the lock and the counting statements return it (their
    /// first six columns), with nothing counted yet.
    fn read(flow: &Uuid, row: &SpiTupleTable<'_>) -> FfResult<Self> {
        Ok(FlowLock {
            id: *flow,
            partition: col_req(row, 1)?,
            namespace: col_req(row, 2)?,
            state: col_req(row, 3)?,
            revision: col_req(row, 4)?,
            node_count: col_req(row, 5)?,
            cancel_requested: col_req(row, 6)?,
            ended: 0,
            failed: 0,
        })
    }

    /// Whether the graph may still change.
    pub fn is_open(&self) -> bool {
        self.state == "open" && !self.cancel_requested
    }

    pub fn refuse_unless_open(&self) -> FfResult<()> {
        if self.state != "open" {
            return Err(FfError::wrong_state(format!("flow {} is {}; its graph can no longer change", self.id, self.state)));
        }
        if self.cancel_requested {
            return Err(FfError::wrong_state(format!("flow {} is being cancelled; its graph can no longer change", self.id)));
        }
        Ok(())
    }

    /// Takes members that just became terminal into the flow's counters.
    pub fn record_ended(&mut self, ended: &[Ended]) {
        let (n, failed) = tally(ended);
        self.ended += n;
        self.failed += failed;
    }
}

/// How many members ended, and how many of them fail the flow.
fn tally(ended: &[Ended]) -> (i32, i32) {
    let failed = ended.iter().filter(|e| e.outcome.fails_flow()).count();
    (ended.len() as i32, failed as i32)
}

/// Locks a flow row (lock order 2). `None` when the flow does not exist,
/// or, with `Wait::SkipLocked`, when another transaction holds it.
pub fn lock(c: &mut SpiClient<'_>, flow: &Uuid, wait: Wait) -> FfResult<Option<FlowLock>> {
    let sql = match wait {
        Wait::Yes | Wait::Held => LOCK_FLOW,
        Wait::SkipLocked => LOCK_FLOW_SKIP,
    };
    let t = exec(c, sql, &[(*flow).into()])?;
    first_row(t).map(|row| FlowLock::read(flow, &row)).transpose()
}

macro_rules! lock_flow_sql {
    ($lock:literal) => {
        concat!(
            "SELECT partition_key, namespace, public_flow_state, graph_revision, node_count,
                    cancel_requested_at_ms IS NOT NULL
             FROM ff_flow_core WHERE flow_id = $1 ",
            $lock
        )
    };
}
const LOCK_FLOW: &str = lock_flow_sql!("FOR NO KEY UPDATE");
const LOCK_FLOW_SKIP: &str = lock_flow_sql!("FOR NO KEY UPDATE SKIP LOCKED");

/// Whether a flow exists (no lock).
pub fn exists(c: &mut SpiClient<'_>, flow: &Uuid) -> FfResult<bool> {
    Ok(!exec(c, "SELECT 1 FROM ff_flow_core WHERE flow_id = $1", &[(*flow).into()])?.is_empty())
}

/// Writes member endings into the flow row ($2 ended, $3 of them failing
/// the flow). When the last live member ended, the flow becomes `cancelled`
/// (if ff_cancel_flow asked), `failed` (if a member failed or expired) or
/// `completed`; the last column says it ended in this update (a flow leaves
/// `open` only when its live count reaches zero, and takes no member after).
const COUNT_ENDINGS: &str = "UPDATE ff_flow_core SET live_count = live_count - $2, failed_count = failed_count + $3,
         public_flow_state = CASE WHEN public_flow_state = 'open' AND live_count - $2 <= 0 THEN
             CASE WHEN cancel_requested_at_ms IS NOT NULL THEN 'cancelled'
                  WHEN failed_count + $3 > 0 THEN 'failed' ELSE 'completed' END
             ELSE public_flow_state END,
         terminal_at_ms = CASE WHEN public_flow_state = 'open' AND live_count - $2 <= 0 THEN $4
                               ELSE terminal_at_ms END
     WHERE flow_id = $1
     RETURNING partition_key, namespace, public_flow_state, graph_revision, node_count,
               cancel_requested_at_ms IS NOT NULL,
               public_flow_state <> 'open' AND live_count <= 0 AND live_count + $2 > 0";

/// Counts endings into the flow row and announces the flow's own ending.
fn count_endings(c: &mut SpiClient<'_>, flow: &Uuid, ended: i32, failed: i32, now: i64) -> FfResult<Option<FlowLock>> {
    let t = exec(c, COUNT_ENDINGS, &[(*flow).into(), ended.into(), failed.into(), now.into()])?;
    let Some(row) = first_row(t) else { return Ok(None) };
    let lock = FlowLock::read(flow, &row)?;
    if col_req::<bool>(&row, 7)? {
        announce(c, flow, &lock.state)?;
    }
    Ok(Some(lock))
}

/// Takes a flow row (lock order 2) by counting the endings of members the
/// caller ended itself: the update that writes them is the lock, where
/// `lock` and then `release` would run two statements while other members'
/// completions queue on the row. `None` when the flow does not exist.
pub fn lock_counting(c: &mut SpiClient<'_>, flow: &Uuid, ended: &[Ended], now: i64) -> FfResult<Option<FlowLock>> {
    let (n, failed) = tally(ended);
    count_endings(c, flow, n, failed, now)
}

/// Writes the endings counted under the lock since it was taken.
pub fn release(c: &mut SpiClient<'_>, lock: FlowLock, now: i64) -> FfResult<()> {
    if lock.ended == 0 {
        return Ok(());
    }
    count_endings(c, &lock.id, lock.ended, lock.failed, now)?;
    Ok(())
}

/// `NOTIFY ff_flow_events` with `{"flow_id","state"}`, delivered at commit.
fn announce(c: &mut SpiClient<'_>, flow: &Uuid, state: &str) -> FfResult<()> {
    let payload = serde_json::json!({"flow_id": flow.to_string(), "state": state});
    exec(c, "SELECT pg_notify($1, $2)", &[EVENTS_CHANNEL.into(), payload.to_string().into()])?;
    Ok(())
}

/// Locks the flow for a call that changes it, or says why it cannot.
fn lock_open(c: &mut SpiClient<'_>, flow: &Uuid) -> FfResult<FlowLock> {
    let lock = lock(c, flow, Wait::Yes)?.ok_or_else(|| flow_missing(flow))?;
    lock.refuse_unless_open()?;
    Ok(lock)
}

pub fn create_flow(flow: &Uuid, kind: &str, namespace: &str) -> FfResult<&'static str> {
    check_text_id("flow_kind", kind)?;
    check_text_id("namespace", namespace)?;
    with_spi(|c| {
        let slot = i32::from(crc16(flow.as_bytes()));
        let t = exec(
            c,
            "INSERT INTO ff_flow_core (flow_id, partition_key, flow_kind, namespace, created_at_ms)
             VALUES ($1, ($2 % (SELECT num_flow_partitions FROM ff_partition_config))::smallint, $3, $4, $5)
             ON CONFLICT (flow_id) DO NOTHING RETURNING 1",
            &[(*flow).into(), slot.into(), kind.into(), namespace.into(), now_ms().into()],
        )?;
        Ok(if t.is_empty() { "already_satisfied" } else { "created" })
    })
}

pub fn add_execution(flow: &Uuid, id: &ExecutionId) -> FfResult<(&'static str, i32)> {
    with_spi(|c| {
        // Lock order: the execution, then the flow.
        let t = exec(
            c,
            "SELECT flow_id, lifecycle_phase, eligibility_state, terminal_outcome FROM ff_exec_core
             WHERE execution_id = $1 AND partition_key = $2 FOR NO KEY UPDATE",
            &[pg_uuid(&id.uuid).into(), id.partition.into()],
        )?;
        let row = first_row(t).ok_or_else(|| FfError::not_found(format!("execution {id} does not exist")))?;
        let member_of: Option<Uuid> = col(&row, 1)?;
        let state = State::from_columns(&col_req::<String>(&row, 2)?, &col_req::<String>(&row, 3)?, col::<String>(&row, 4)?.as_deref());
        let lock = lock(c, flow, Wait::Yes)?.ok_or_else(|| flow_missing(flow))?;
        if let Some(other) = member_of.filter(|f| f != flow) {
            return Err(FfError::wrong_state(format!("execution {id} already belongs to flow {other}")));
        }
        if member_of.is_some() {
            return Ok(("already_member", lock.node_count));
        }
        lock.refuse_unless_open()?;
        if id.partition != lock.partition {
            return Err(FfError::invalid(format!(
                "execution {id} is in partition {} but flow {flow} is in partition {}",
                id.partition, lock.partition
            ))
            .with_detail("create the execution with flow_id => the flow, so it shares the flow's partition"));
        }
        let live = state.is_some_and(State::is_live);
        let failed = matches!(state, Some(State::Terminal(o)) if o.fails_flow());
        exec(
            c,
            "UPDATE ff_exec_core SET flow_id = $2, namespace = $3 WHERE execution_id = $1",
            &[pg_uuid(&id.uuid).into(), (*flow).into(), lock.namespace.as_str().into()],
        )?;
        // A flow is open until every member is terminal: adding a member that
        // already ended to a flow with none live ends the flow.
        let t = exec(
            c,
            "UPDATE ff_flow_core SET graph_revision = graph_revision + 1, node_count = node_count + 1,
                 live_count = live_count + $2, failed_count = failed_count + $3,
                 public_flow_state = CASE WHEN live_count + $2 = 0
                     THEN CASE WHEN failed_count + $3 > 0 THEN 'failed' ELSE 'completed' END
                     ELSE public_flow_state END,
                 terminal_at_ms = CASE WHEN live_count + $2 = 0 THEN $4 ELSE terminal_at_ms END
             WHERE flow_id = $1 RETURNING node_count, public_flow_state",
            &[(*flow).into(), i32::from(live).into(), i32::from(failed).into(), now_ms().into()],
        )?;
        let row = first_row(t).ok_or_else(|| flow_missing(flow))?;
        let state: String = col_req(&row, 2)?;
        if state != "open" {
            announce(c, flow, &state)?;
        }
        Ok(("added", col_req(&row, 1)?))
    })
}

fn require_member(c: &mut SpiClient<'_>, flow: &Uuid, id: &ExecutionId) -> FfResult<()> {
    let t = exec(
        c,
        "SELECT 1 FROM ff_exec_core WHERE execution_id = $1 AND partition_key = $2 AND flow_id = $3",
        &[pg_uuid(&id.uuid).into(), id.partition.into(), (*flow).into()],
    )?;
    if t.is_empty() {
        return Err(FfError::invalid(format!("execution {id} is not a member of flow {flow}")));
    }
    Ok(())
}

/// Would an edge `up -> down` close a cycle, i.e. is `up` reachable from
/// `down`? Bidirectional breadth-first search over staged edges, always
/// widening the smaller frontier, so both forward- and backward-built chains
/// stay cheap; one query per level. Edges never cross flows, so the lookups
/// go by execution id alone (given the flow too, the planner may walk the
/// flow's whole key range on every level).
fn closes_cycle(c: &mut SpiClient<'_>, up: &Uuid, down: &Uuid) -> FfResult<bool> {
    let (mut fwd, mut back) = (vec![*down], vec![*up]);
    let mut seen_fwd: HashSet<[u8; 16]> = HashSet::from([*down.as_bytes()]);
    let mut seen_back: HashSet<[u8; 16]> = HashSet::from([*up.as_bytes()]);
    let mut prefer_forward = true;
    while !fwd.is_empty() && !back.is_empty() {
        // Widen the smaller frontier; on a tie alternate, so a chain is
        // walked from whichever end is shorter.
        let forward = fwd.len() < back.len() || (fwd.len() == back.len() && prefer_forward);
        prefer_forward = !prefer_forward;
        let (frontier, seen, other) =
            if forward { (&mut fwd, &mut seen_fwd, &seen_back) } else { (&mut back, &mut seen_back, &seen_fwd) };
        let sql = if forward {
            "SELECT DISTINCT downstream_eid FROM ff_edge WHERE upstream_eid = ANY($1)"
        } else {
            "SELECT DISTINCT upstream_eid FROM ff_edge WHERE downstream_eid = ANY($1)"
        };
        let t = exec(c, sql, &[std::mem::take(frontier).into()])?;
        for row in t {
            let Some(node) = row.get::<Uuid>(1)? else { continue };
            if other.contains(node.as_bytes()) {
                return Ok(true);
            }
            if seen.insert(*node.as_bytes()) {
                frontier.push(node);
            }
        }
    }
    Ok(false)
}

pub struct NewEdge {
    pub flow: Uuid,
    pub edge: Uuid,
    pub upstream: ExecutionId,
    pub downstream: ExecutionId,
    pub expected_revision: i64,
    pub dependency_kind: String,
    pub data_passing_ref: Option<String>,
}

/// The state of a downstream's edge group, if it has one.
fn group_state(c: &mut SpiClient<'_>, flow: &Uuid, down: &Uuid) -> FfResult<Option<(String, i32)>> {
    let t = exec(
        c,
        "SELECT group_state, running_count FROM ff_edge_group WHERE flow_id = $1 AND downstream_eid = $2",
        &[(*flow).into(), (*down).into()],
    )?;
    first_row(t).map(|r| Ok((col_req(&r, 1)?, col_req(&r, 2)?))).transpose()
}

fn refuse_fired(state: Option<&(String, i32)>, downstream: &ExecutionId) -> FfResult<()> {
    match state {
        Some((s, _)) if s != "pending" => Err(FfError::wrong_state(format!(
            "the edge group of {downstream} already fired ({s}); no edge can join it"
        ))),
        _ => Ok(()),
    }
}

pub fn stage_edge(e: &NewEdge) -> FfResult<i64> {
    if e.upstream.uuid == e.downstream.uuid {
        return Err(FfError::invalid(format!("edge {} would make execution {} depend on itself", e.edge, e.upstream)));
    }
    check_text_id("dependency_kind", &e.dependency_kind)?;
    with_spi(|c| {
        let lock = lock_open(c, &e.flow)?;
        if lock.revision != e.expected_revision {
            return Err(FfError::stale(format!(
                "stale graph revision for flow {}: expected {}, current is {}",
                e.flow, e.expected_revision, lock.revision
            )));
        }
        require_member(c, &e.flow, &e.upstream)?;
        require_member(c, &e.flow, &e.downstream)?;
        let t = exec(c, "SELECT 1 FROM ff_edge WHERE flow_id = $1 AND edge_id = $2", &[e.flow.into(), e.edge.into()])?;
        if !t.is_empty() {
            return Err(FfError::duplicate(format!("edge {} already exists in flow {}", e.edge, e.flow)));
        }
        let (up, down) = (pg_uuid(&e.upstream.uuid), pg_uuid(&e.downstream.uuid));
        refuse_fired(group_state(c, &e.flow, &down)?.as_ref(), &e.downstream)?;
        if closes_cycle(c, &up, &down)? {
            return Err(FfError::invalid(format!(
                "edge {} from {} to {} would close a cycle in flow {}",
                e.edge, e.upstream, e.downstream, e.flow
            )));
        }
        let t = exec(
            c,
            "WITH edge AS (
                 INSERT INTO ff_edge (flow_id, edge_id, partition_key, upstream_eid, downstream_eid, dependency_kind,
                     data_passing_ref, created_at_ms)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)),
             grp AS (
                 INSERT INTO ff_edge_group AS g (flow_id, downstream_eid, partition_key, pending_count)
                 VALUES ($1, $5, $3, 1)
                 ON CONFLICT (flow_id, downstream_eid) DO UPDATE SET pending_count = g.pending_count + 1)
             UPDATE ff_flow_core SET graph_revision = graph_revision + 1, edge_count = edge_count + 1
             WHERE flow_id = $1 RETURNING graph_revision",
            &[
                e.flow.into(),
                e.edge.into(),
                lock.partition.into(),
                up.into(),
                down.into(),
                e.dependency_kind.as_str().into(),
                e.data_passing_ref.clone().into(),
                now_ms().into(),
            ],
        )?;
        first_row(t).ok_or_else(|| flow_missing(&e.flow)).and_then(|r| col_req(&r, 1))
    })
}

/// Applies a staged edge: its group now waits for the upstream, and the
/// downstream is blocked until the group fires. An upstream that already
/// ended counts at once. Returns (result, applied edges still waiting).
///
/// Under the flow's lock the upstream's state is final (it can only end
/// while the flow is held). The downstream is taken without waiting: a
/// transaction holding it (a claim in flight, a cancel) may be about to wait
/// for this flow, so a held downstream is 55P03, to retry.
pub fn apply_edge(flow: &Uuid, edge: &Uuid, downstream: &ExecutionId) -> FfResult<(&'static str, i32)> {
    with_spi(|c| {
        let down = pg_uuid(&downstream.uuid);
        let lock = lock(c, flow, Wait::Yes)?.ok_or_else(|| flow_missing(flow))?;
        let t = exec(
            c,
            "SELECT e.downstream_eid, e.upstream_eid, e.edge_state, x.lifecycle_phase, x.terminal_outcome
             FROM ff_edge e JOIN ff_exec_core x ON x.execution_id = e.upstream_eid
             WHERE e.flow_id = $1 AND e.edge_id = $2",
            &[(*flow).into(), (*edge).into()],
        )?;
        let row = first_row(t).ok_or_else(|| FfError::not_found(format!("edge {edge} does not exist in flow {flow}")))?;
        let edge_down: Uuid = col_req(&row, 1)?;
        if edge_down != down {
            return Err(FfError::invalid(format!("edge {edge} leads to {edge_down}, not to {downstream}")));
        }
        let group = group_state(c, flow, &down)?;
        if col_req::<String>(&row, 3)? == "applied" {
            return Ok(("already_applied", group.map(|g| g.1).unwrap_or(0)));
        }
        lock.refuse_unless_open()?;
        refuse_fired(group.as_ref(), downstream)?;
        match exec::block(c, &down)? {
            exec::Blocked::Now(State::Waiting | State::Delayed | State::Blocked) => {}
            exec::Blocked::Now(other) => {
                return Err(FfError::wrong_state(format!(
                    "execution {downstream} has already started ({}); an edge can only be applied to an execution not yet claimed",
                    other.columns().2
                )))
            }
            exec::Blocked::Held => {
                return Err(FfError::new(
                    pgrx::PgSqlErrorCode::ERRCODE_LOCK_NOT_AVAILABLE,
                    format!("execution {downstream} is held by another transaction (a claim or a cancel in flight)"),
                )
                .with_detail("retry the apply; if the other transaction claimed it, the edge can no longer join"))
            }
            exec::Blocked::Missing => return Err(FfError::not_found(format!("execution {downstream} does not exist"))),
        }
        let upstream_ended = col::<String>(&row, 4)?.as_deref() == Some("terminal");
        let bucket = upstream_ended.then(|| Bucket::of_outcome(col::<String>(&row, 5).ok().flatten().as_deref().unwrap_or("")));
        exec(
            c,
            "UPDATE ff_edge SET edge_state = 'applied', applied_at_ms = $3, resolution = $4
             WHERE flow_id = $1 AND edge_id = $2",
            &[(*flow).into(), (*edge).into(), now_ms().into(), bucket.map(Bucket::as_str).into()],
        )?;
        let deltas = BTreeMap::from([(*down.as_bytes(), (down, Delta::resolve(true, bucket)))]);
        let now = now_ms();
        let mut ended = Vec::new();
        count(c, &lock, &deltas, now, &mut ended)?;
        let mut lock = lock;
        dispatch::cascade(&mut lock, ended, now)?;
        release(c, lock, now)?;
        let running = group_state(c, flow, &down)?.map(|g| g.1).unwrap_or(0);
        Ok(("applied", running))
    })
}

pub fn set_group_policy(flow: &Uuid, downstream: &ExecutionId, policy: GroupPolicy) -> FfResult<&'static str> {
    with_spi(|c| {
        let lock = lock_open(c, flow)?;
        require_member(c, flow, downstream)?;
        let down = pg_uuid(&downstream.uuid);
        let t = exec(
            c,
            "SELECT 1 FROM ff_edge_group WHERE flow_id = $1 AND downstream_eid = $2
               AND pending_count + running_count + success_count + fail_count + skip_count > 0",
            &[(*flow).into(), down.into()],
        )?;
        if !t.is_empty() {
            return Err(FfError::wrong_state(format!(
                "the edge group policy of {downstream} is fixed: dependencies are already staged"
            )));
        }
        let t = exec(
            c,
            "INSERT INTO ff_edge_group AS g (flow_id, downstream_eid, partition_key, policy) VALUES ($1, $2, $3, $4)
             ON CONFLICT (flow_id, downstream_eid) DO UPDATE SET policy = EXCLUDED.policy
             WHERE g.policy IS DISTINCT FROM EXCLUDED.policy
             RETURNING 1",
            &[(*flow).into(), down.into(), lock.partition.into(), pgrx::JsonB(policy.to_json()).into()],
        )?;
        Ok(if t.is_empty() { "already_set" } else { "set" })
    })
}

/// Cancels the flow: every live member ends `cancelled` (leases included,
/// their grants become stale) and their cascades run. A member another
/// transaction holds at this moment (a worker inside its claim or complete
/// transaction) is ended by the repair reconciler once released; until then
/// it cannot complete. Returns how many members end cancelled.
pub fn cancel_flow(flow: &Uuid, reason: &str) -> FfResult<i32> {
    with_spi(|c| {
        let now = now_ms();
        let mut lock = lock(c, flow, Wait::Yes)?.ok_or_else(|| flow_missing(flow))?;
        if !lock.is_open() {
            return Ok(0);
        }
        lock.cancel_requested = true;
        let t = exec(
            c,
            "WITH f AS (UPDATE ff_flow_core SET cancel_requested_at_ms = $3, cancel_reason = $2,
                            public_flow_state = CASE WHEN live_count = 0 THEN 'cancelled' ELSE public_flow_state END,
                            terminal_at_ms = CASE WHEN live_count = 0 THEN $3 ELSE terminal_at_ms END
                        WHERE flow_id = $1 RETURNING live_count)
             SELECT x.execution_id FROM ff_exec_core x
             WHERE x.flow_id = $1 AND x.lifecycle_phase <> 'terminal'",
            &[(*flow).into(), reason.into(), now.into()],
        )?;
        let live: Vec<Uuid> = t.filter_map(|r| r.get::<Uuid>(1).ok().flatten()).collect();
        if live.is_empty() {
            announce(c, flow, "cancelled")?;
            return Ok(0);
        }
        let ending = Ending { outcome: Outcome::Cancelled, result: None, error: None, reason: Some(reason), dispatched: true };
        let ended = exec::finish(c, &live, &ending, Wait::SkipLocked, now)?;
        dispatch::cascade(&mut lock, ended, now)?;
        release(c, lock, now)?;
        Ok(live.len() as i32)
    })
}

/// Ends one execution `cancelled` (waiting, delayed, blocked or leased; a
/// lease's grant becomes stale) with its cascade: 'cancelled', or
/// 'already_terminal'. Locks the execution first (waiting for a worker's
/// transaction that holds it), then its flow.
pub fn cancel_execution(id: &ExecutionId, reason: &str) -> FfResult<&'static str> {
    with_spi(|c| {
        let t = exec(
            c,
            "SELECT lifecycle_phase, flow_id, quota_policy_id IS NOT NULL OR budget_reserve IS NOT NULL
             FROM ff_exec_core WHERE execution_id = $1 AND partition_key = $2
             FOR NO KEY UPDATE",
            &[pg_uuid(&id.uuid).into(), id.partition.into()],
        )?;
        let row = first_row(t).ok_or_else(|| FfError::not_found(format!("execution {id} does not exist")))?;
        if col_req::<String>(&row, 1)? == "terminal" {
            return Ok("already_terminal");
        }
        let ending = Ending { outcome: Outcome::Cancelled, result: None, error: None, reason: Some(reason), dispatched: true };
        dispatch::end_held(c, &pg_uuid(&id.uuid), col(&row, 2)?, col(&row, 3)?.unwrap_or(true), &ending, now_ms())?;
        Ok("cancelled")
    })
}

// ---------------------------------------------------------------------------
// SQL API
// ---------------------------------------------------------------------------

fn parse_exec(value: Option<String>, name: &str) -> FfResult<ExecutionId> {
    ExecutionId::parse(&required(value, name)?)
}

fn check_reason(reason: Option<String>) -> FfResult<String> {
    let reason = required(reason, "reason")?;
    if reason.len() > 4096 {
        return Err(FfError::invalid("reason is longer than 4096 bytes"));
    }
    Ok(reason)
}

/// Creates a flow (a DAG of executions). Idempotent: 'created' or 'already_satisfied'.
#[pg_extern(volatile, parallel_unsafe, security_definer, name = "ff_create_flow")]
#[search_path(@extschema@, pg_temp)]
fn sql_create_flow(
    flow_id: Option<Uuid>,
    flow_kind: default!(Option<String>, "'dag'"),
    namespace: default!(Option<String>, "'default'"),
) -> &'static str {
    (|| create_flow(&required(flow_id, "flow_id")?, &required(flow_kind, "flow_kind")?, &required(namespace, "namespace")?))()
        .or_raise()
}

/// Adds an execution (created with `flow_id => flow`) to the flow; bumps
/// graph_revision. Returns ('added' | 'already_member', node_count).
#[pg_extern(volatile, parallel_unsafe, security_definer, name = "ff_add_execution_to_flow")]
#[search_path(@extschema@, pg_temp)]
fn sql_add_execution_to_flow(
    flow_id: Option<Uuid>,
    execution_id: Option<String>,
) -> TableIterator<'static, (name!(result, String), name!(node_count, i32))> {
    let (r, n) = (|| add_execution(&required(flow_id, "flow_id")?, &parse_exec(execution_id, "execution_id")?))().or_raise();
    TableIterator::once((r.to_string(), n))
}

/// Stages edge upstream -> downstream if the graph is still at
/// `expected_graph_revision` (else 40001); refuses self-edges, non-members,
/// duplicates (23505) and cycles. Returns the new graph revision.
#[pg_extern(volatile, parallel_unsafe, security_definer, name = "ff_stage_dependency_edge")]
#[search_path(@extschema@, pg_temp)]
#[allow(clippy::too_many_arguments)]
fn sql_stage_dependency_edge(
    flow_id: Option<Uuid>,
    edge_id: Option<Uuid>,
    upstream_execution_id: Option<String>,
    downstream_execution_id: Option<String>,
    expected_graph_revision: Option<i64>,
    dependency_kind: default!(Option<String>, "'success_only'"),
    data_passing_ref: default!(Option<String>, "NULL"),
) -> i64 {
    (|| {
        if let Some(r) = &data_passing_ref {
            if r.len() > 4096 {
                return Err(FfError::invalid(format!("data_passing_ref \"{}\" is longer than 4096 bytes", clip(r))));
            }
        }
        stage_edge(&NewEdge {
            flow: required(flow_id, "flow_id")?,
            edge: required(edge_id, "edge_id")?,
            upstream: parse_exec(upstream_execution_id, "upstream_execution_id")?,
            downstream: parse_exec(downstream_execution_id, "downstream_execution_id")?,
            expected_revision: required(expected_graph_revision, "expected_graph_revision")?,
            dependency_kind: required(dependency_kind, "dependency_kind")?,
            data_passing_ref,
        })
    })()
    .or_raise()
}

/// Applies a staged edge so its downstream waits for it. Returns
/// ('applied' | 'already_applied', applied edges still waiting).
#[pg_extern(volatile, parallel_unsafe, security_definer, name = "ff_apply_dependency_to_child")]
#[search_path(@extschema@, pg_temp)]
fn sql_apply_dependency_to_child(
    flow_id: Option<Uuid>,
    edge_id: Option<Uuid>,
    downstream_execution_id: Option<String>,
) -> TableIterator<'static, (name!(result, String), name!(unsatisfied_count, i32))> {
    let (r, n) = (|| {
        apply_edge(
            &required(flow_id, "flow_id")?,
            &required(edge_id, "edge_id")?,
            &parse_exec(downstream_execution_id, "downstream_execution_id")?,
        )
    })()
    .or_raise();
    TableIterator::once((r.to_string(), n))
}

/// Sets how the inbound edges of a downstream combine: all_of (default),
/// any_of or quorum. Only before any of its edges is staged.
#[pg_extern(volatile, parallel_unsafe, security_definer, name = "ff_set_edge_group_policy")]
#[search_path(@extschema@, pg_temp)]
fn sql_set_edge_group_policy(flow_id: Option<Uuid>, downstream_execution_id: Option<String>, policy: Option<RawJsonb>) -> &'static str {
    (|| {
        let policy = GroupPolicy::parse(&required(policy, "policy")?.to_value("policy")?)?;
        set_group_policy(&required(flow_id, "flow_id")?, &parse_exec(downstream_execution_id, "downstream_execution_id")?, policy)
    })()
    .or_raise()
}

/// Cancels the flow and every live member; returns how many members end
/// cancelled.
#[pg_extern(volatile, parallel_unsafe, security_definer, name = "ff_cancel_flow")]
#[search_path(@extschema@, pg_temp)]
fn sql_cancel_flow(flow_id: Option<Uuid>, reason: default!(Option<String>, "'cancelled'")) -> i32 {
    (|| cancel_flow(&required(flow_id, "flow_id")?, &check_reason(reason)?))().or_raise()
}

/// Cancels one execution with its cascade: 'cancelled' or 'already_terminal'.
#[pg_extern(volatile, parallel_unsafe, security_definer, name = "ff_cancel_execution")]
#[search_path(@extschema@, pg_temp)]
fn sql_cancel_execution(execution_id: Option<String>, reason: default!(Option<String>, "'cancelled'")) -> &'static str {
    (|| cancel_execution(&parse_exec(execution_id, "execution_id")?, &check_reason(reason)?))().or_raise()
}

// ---------------------------------------------------------------------------
// Whole flows: submit, read, inputs
// ---------------------------------------------------------------------------

/// Most nodes and edges one `ff_submit_flow` call may hold.
pub const MAX_SUBMIT_NODES: usize = 100_000;

/// One node of a submitted spec, validated.
struct SpecNode {
    name: Option<String>,
    options: exec::Options,
    policy: Option<GroupPolicy>,
    payload: Option<RawJsonb>,
}

fn spec_error(msg: impl Into<String>) -> FfError {
    FfError::invalid(format!("flow spec: {}", msg.into()))
}

fn json_str(v: &serde_json::Value, what: &str) -> FfResult<String> {
    v.as_str().map(str::to_string).ok_or_else(|| spec_error(format!("{what} must be a string, got {}", clip(&v.to_string()))))
}

fn json_int(v: &serde_json::Value, what: &str) -> FfResult<i64> {
    v.as_i64().ok_or_else(|| spec_error(format!("{what} must be an integer, got {}", clip(&v.to_string()))))
}

fn json_strings(v: &serde_json::Value, what: &str) -> FfResult<Vec<Option<String>>> {
    let items = v.as_array().ok_or_else(|| spec_error(format!("{what} must be an array of strings")))?;
    items.iter().map(|i| json_str(i, what).map(Some)).collect()
}

/// Reads one node (everything but its payload, which stays a jsonb datum).
fn spec_node(i: usize, fields: &serde_json::Value, flow: &uuid::Uuid, payload: Option<RawJsonb>) -> FfResult<SpecNode> {
    let obj = fields.as_object().ok_or_else(|| spec_error(format!("node {i} must be an object")))?;
    let at = |k: &str| format!("nodes[{i}].{k}");
    let mut o = exec::Options { flow_id: Some(*flow), max_attempts: 1, ..exec::Options::default() };
    let (mut name, mut policy, mut lane) = (None, None, None);
    for (k, v) in obj {
        match k.as_str() {
            "name" => name = Some(check_text_id("node name", &json_str(v, &at(k))?)?.to_string()),
            "lane" => lane = Some(json_str(v, &at(k))?),
            "priority" => {
                o.priority = i32::try_from(json_int(v, &at(k))?).map_err(|_| spec_error(format!("{} is out of range", at(k))))?
            }
            "required_capabilities" => {
                o.required_capabilities = exec::normalize_capabilities(&at(k), &json_strings(v, &at(k))?)?
            }
            "budget_ids" => o.budget_ids = json_strings(v, &at(k))?.into_iter().flatten().collect(),
            "budget_reserve" => o.budget_reserve = exec::parse_reserve(v)?,
            "quota_policy_id" => o.quota_policy_id = Some(json_str(v, &at(k))?),
            "max_attempts" => {
                o.max_attempts = i32::try_from(json_int(v, &at(k))?).map_err(|_| spec_error(format!("{} is out of range", at(k))))?
            }
            "delay_until_ms" => o.delay_until_ms = Some(json_int(v, &at(k))?),
            "retry_policy" => o.retry = exec::RetryPolicy::parse(v)?,
            "policy" => policy = Some(GroupPolicy::parse(v)?),
            other => {
                return Err(spec_error(format!(
                    "nodes[{i}] has an unknown key \"{}\" (known: name, lane, payload, priority, required_capabilities, \
                     budget_ids, budget_reserve, quota_policy_id, max_attempts, delay_until_ms, retry_policy, policy)",
                    clip(other)
                )))
            }
        }
    }
    o.lane_id = lane.ok_or_else(|| spec_error(format!("nodes[{i}] needs a \"lane\"")))?;
    Ok(SpecNode { name, options: o.validate()?, policy, payload })
}

/// Edges by node index; every name must exist, no edge twice.
fn spec_edges(v: Option<&serde_json::Value>, names: &BTreeMap<String, usize>) -> FfResult<Vec<(usize, usize, String)>> {
    let Some(v) = v.filter(|v| !v.is_null()) else { return Ok(Vec::new()) };
    let items = v.as_array().ok_or_else(|| spec_error("\"edges\" must be an array"))?;
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(items.len());
    for (i, e) in items.iter().enumerate() {
        let obj = e.as_object().ok_or_else(|| spec_error(format!("edges[{i}] must be an object")))?;
        let end = |k: &str| -> FfResult<usize> {
            let name = json_str(obj.get(k).ok_or_else(|| spec_error(format!("edges[{i}] needs \"{k}\"")))?, &format!("edges[{i}].{k}"))?;
            names.get(&name).copied().ok_or_else(|| spec_error(format!("edges[{i}].{k} names an unknown node \"{}\"", clip(&name))))
        };
        let (from, to) = (end("from")?, end("to")?);
        let kind = match obj.get("kind") {
            Some(k) => check_text_id("edge kind", &json_str(k, &format!("edges[{i}].kind"))?)?.to_string(),
            None => "success_only".to_string(),
        };
        if let Some(bad) = obj.keys().find(|k| !["from", "to", "kind"].contains(&k.as_str())) {
            return Err(spec_error(format!("edges[{i}] has an unknown key \"{}\" (known: from, to, kind)", clip(bad))));
        }
        if !seen.insert((from, to)) {
            return Err(spec_error(format!("edges[{i}] repeats an edge already given")));
        }
        out.push((from, to, kind));
    }
    Ok(out)
}

/// Kahn's algorithm: `Some(node)` on a node of a cycle, in O(nodes + edges).
pub fn find_cycle(nodes: usize, edges: &[(usize, usize)]) -> Option<usize> {
    let mut indegree = vec![0usize; nodes];
    let mut out: Vec<Vec<usize>> = vec![Vec::new(); nodes];
    for &(a, b) in edges {
        out[a].push(b);
        indegree[b] += 1;
    }
    let mut ready: Vec<usize> = (0..nodes).filter(|&n| indegree[n] == 0).collect();
    let mut done = 0;
    while let Some(n) = ready.pop() {
        done += 1;
        for &m in &out[n] {
            indegree[m] -= 1;
            if indegree[m] == 0 {
                ready.push(m);
            }
        }
    }
    (done < nodes).then(|| (0..nodes).find(|&n| indegree[n] > 0)).flatten()
}

/// Builds a whole flow in one call: nodes, edges and group policies, all or
/// nothing. Re-submitting the same `flow_id` with the same spec returns the
/// first answer; with another spec it is 23505.
pub fn submit_flow(spec: RawJsonb) -> FfResult<RawJsonb> {
    with_spi(|c| {
        // The skeleton is read through SQL so payloads stay jsonb datums
        // (any depth, any numeric); only the small fields are parsed here.
        let t = exec(
            c,
            "SELECT jsonb_typeof($1), $1 - 'nodes', jsonb_typeof($1 -> 'nodes'),
                    encode(sha256(convert_to($1::text, 'UTF8')), 'hex')",
            &[spec.into()],
        )?;
        let row = first_row(t).ok_or_else(|| FfError::internal("no row"))?;
        if col::<String>(&row, 1)?.as_deref() != Some("object") {
            return Err(spec_error("the spec must be a JSON object"));
        }
        if col::<String>(&row, 3)?.as_deref() != Some("array") {
            return Err(spec_error("\"nodes\" must be an array of node objects"));
        }
        let top = col::<pgrx::JsonB>(&row, 2)?.map(|j| j.0).unwrap_or_default();
        let digest: String = col_req(&row, 4)?;
        if let Some(bad) = top.as_object().and_then(|o| o.keys().find(|k| !["flow_id", "namespace", "edges"].contains(&k.as_str()))) {
            return Err(spec_error(format!("unknown key \"{}\" (known: flow_id, namespace, nodes, edges)", clip(bad))));
        }
        let flow = match top.get("flow_id") {
            None | Some(serde_json::Value::Null) => uuid::Uuid::new_v4(),
            Some(v) => crate::ids::parse_uuid(&json_str(v, "flow_id")?).ok_or_else(|| spec_error("flow_id must be a uuid"))?,
        };
        let namespace = match top.get("namespace") {
            Some(v) => check_text_id("namespace", &json_str(v, "namespace")?)?.to_string(),
            None => "default".to_string(),
        };
        if let Some(answer) = resubmission(c, &pg_uuid(&flow), &digest)? {
            return Ok(answer);
        }
        let t = exec(
            c,
            "SELECT n - 'payload', n -> 'payload' FROM jsonb_array_elements($1 -> 'nodes') WITH ORDINALITY AS x(n, i)
             ORDER BY i",
            &[spec.into()],
        )?;
        let mut nodes = Vec::new();
        let count = t.len();
        for (i, row) in t.enumerate() {
            if i >= MAX_SUBMIT_NODES {
                return Err(spec_error(format!("more than {MAX_SUBMIT_NODES} nodes")));
            }
            // The payload is copied to the caller's context (it is inserted
            // later); what reading the rest leaves behind is freed at once.
            let payload = row.get::<RawJsonb>(2)?;
            let fields = scratch_for(count, || row.get::<pgrx::JsonB>(1))?.map(|j| j.0).unwrap_or_default();
            nodes.push(spec_node(i, &fields, &flow, payload)?);
        }
        let mut names = BTreeMap::new();
        for (i, n) in nodes.iter().enumerate() {
            if let Some(name) = &n.name {
                if names.insert(name.clone(), i).is_some() {
                    return Err(spec_error(format!("node name \"{}\" is used twice", clip(name))));
                }
            }
        }
        let edges = spec_edges(top.get("edges"), &names)?;
        let pairs: Vec<(usize, usize)> = edges.iter().map(|(a, b, _)| (*a, *b)).collect();
        if let Some(n) = find_cycle(nodes.len(), &pairs) {
            let label = nodes[n].name.clone().unwrap_or_else(|| format!("#{n}"));
            return Err(spec_error(format!("the edges form a cycle through node \"{}\"", clip(&label))));
        }
        let Some(answer) = insert_flow(c, &flow, &namespace, &nodes, &edges, &names)? else {
            // Someone submitted this flow id at the same moment: same spec, same answer.
            return resubmission(c, &pg_uuid(&flow), &digest)?
                .ok_or_else(|| FfError::internal("flow vanished after a conflict"));
        };
        // Sent as text and cast inside the statement, so what parsing it
        // costs (several times its size for a large flow) is freed with the
        // statement's memory.
        let t = exec(
            c,
            "UPDATE ff_flow_core SET submit_digest = $2, submit_answer = $3::jsonb WHERE flow_id = $1
             RETURNING submit_answer",
            &[pg_uuid(&flow).into(), digest.into(), answer.to_string().into()],
        )?;
        let row = first_row(t).ok_or_else(|| FfError::internal("no row"))?;
        RawJsonb::from_spi(&row, 1)?.ok_or_else(|| FfError::internal("NULL answer"))
    })
}

/// The stored answer when this flow was submitted before with this spec;
/// 23505 when it exists otherwise.
fn resubmission(c: &mut SpiClient<'_>, flow: &Uuid, digest: &str) -> FfResult<Option<RawJsonb>> {
    let t = exec(c, "SELECT submit_digest, submit_answer FROM ff_flow_core WHERE flow_id = $1", &[(*flow).into()])?;
    let Some(row) = first_row(t) else { return Ok(None) };
    if col::<String>(&row, 1)?.as_deref() == Some(digest) {
        return RawJsonb::from_spi(&row, 2);
    }
    Err(FfError::duplicate(format!("flow {flow} already exists with a different spec")))
}

/// Inserts the flow row, its executions (blocked when they have inbound
/// edges), edges and groups, set-based; returns the answer.
fn insert_flow(
    c: &mut SpiClient<'_>,
    flow: &uuid::Uuid,
    namespace: &str,
    nodes: &[SpecNode],
    edges: &[(usize, usize, String)],
    names: &BTreeMap<String, usize>,
) -> FfResult<Option<serde_json::Value>> {
    let now = now_ms();
    let flow_pg = pg_uuid(flow);
    let revision = (nodes.len() + edges.len()) as i64;
    let t = exec(
        c,
        "INSERT INTO ff_flow_core (flow_id, partition_key, namespace, graph_revision, node_count, edge_count,
             live_count, created_at_ms)
         VALUES ($1, ($2 % (SELECT num_flow_partitions FROM ff_partition_config))::smallint, $3, $4, $5, $6, $5, $7)
         ON CONFLICT (flow_id) DO NOTHING RETURNING partition_key",
        &[
            flow_pg.into(),
            i32::from(crc16(flow.as_bytes())).into(),
            namespace.into(),
            revision.into(),
            (nodes.len() as i32).into(),
            (edges.len() as i32).into(),
            now.into(),
        ],
    )?;
    let Some(partition) = first_row(t).map(|r| col_req::<i16>(&r, 1)).transpose()? else {
        // A concurrent submission of the same id committed while we waited.
        return Ok(None);
    };
    let mut indegree = vec![0; nodes.len()];
    for (_, to, _) in edges {
        indegree[*to] += 1;
    }
    let mut checked = HashSet::new();
    for n in nodes {
        if checked.insert((n.options.budget_ids.clone(), n.options.quota_policy_id.clone())) {
            exec::check_references(c, &n.options)?;
        }
    }
    let rows: Vec<exec::NewRow<'_>> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| exec::NewRow {
            options: &n.options,
            execution_id: None,
            payload: n.payload,
            node_name: n.name.as_deref(),
            member: true,
            blocked: indegree[i] > 0,
        })
        .collect();
    let ids = exec::create(c, &rows, Some(namespace))?;
    if ids.len() != nodes.len() {
        return Err(FfError::internal("flow nodes were not all created"));
    }
    let uuids: Vec<Uuid> = ids.iter().map(|id| pg_uuid(&id.uuid)).collect();
    write_in_chunks(edges, |chunk| {
        let edge_ids: Vec<Uuid> = chunk.iter().map(|_| pg_uuid(&uuid::Uuid::new_v4())).collect();
        let ups: Vec<Uuid> = chunk.iter().map(|(a, _, _)| uuids[*a]).collect();
        let downs: Vec<Uuid> = chunk.iter().map(|(_, b, _)| uuids[*b]).collect();
        let kinds: Vec<String> = chunk.iter().map(|(_, _, k)| k.clone()).collect();
        exec(
            c,
            "INSERT INTO ff_edge (flow_id, edge_id, partition_key, upstream_eid, downstream_eid, dependency_kind,
                 edge_state, created_at_ms, applied_at_ms)
             SELECT $1, e.id, $2, e.up, e.down, e.kind, 'applied', $7, $7
             FROM unnest($3::uuid[], $4::uuid[], $5::uuid[], $6::text[]) AS e(id, up, down, kind)",
            &[flow_pg.into(), partition.into(), edge_ids.into(), ups.into(), downs.into(), kinds.into(), now.into()],
        )?;
        Ok(())
    })?;
    // A group for each node with inbound edges (all running) or an explicit policy.
    let grouped: Vec<usize> = (0..nodes.len()).filter(|&i| indegree[i] > 0 || nodes[i].policy.is_some()).collect();
    write_in_chunks(&grouped, |chunk| {
        let downs: Vec<Uuid> = chunk.iter().map(|&i| uuids[i]).collect();
        let policies: Vec<pgrx::JsonB> = chunk
            .iter()
            .map(|&i| pgrx::JsonB(nodes[i].policy.unwrap_or(GroupPolicy::AllOf).to_json()))
            .collect();
        let running: Vec<i32> = chunk.iter().map(|&i| indegree[i]).collect();
        exec(
            c,
            "INSERT INTO ff_edge_group (flow_id, downstream_eid, partition_key, policy, running_count)
             SELECT $1, g.down, $2, g.policy, g.running
             FROM unnest($3::uuid[], $4::jsonb[], $5::int[]) AS g(down, policy, running)",
            &[flow_pg.into(), partition.into(), downs.into(), policies.into(), running.into()],
        )?;
        Ok(())
    })?;
    let executions: serde_json::Map<String, serde_json::Value> =
        names.iter().map(|(name, &i)| (name.clone(), serde_json::Value::String(ids[i].to_string()))).collect();
    Ok(Some(serde_json::json!({
        "flow_id": flow.to_string(),
        "graph_revision": revision,
        "executions": executions,
        "execution_ids": ids.iter().map(ExecutionId::to_string).collect::<Vec<_>>(),
    })))
}

/// A flow and its members as jsonb.
pub fn flow_info(flow: &Uuid) -> FfResult<RawJsonb> {
    with_spi(|c| {
        let t = exec(
            c,
            "SELECT jsonb_build_object(
                 'flow_id', f.flow_id, 'state', f.public_flow_state, 'namespace', f.namespace,
                 'graph_revision', f.graph_revision, 'cancel_reason', f.cancel_reason,
                 'created_at_ms', f.created_at_ms, 'terminal_at_ms', f.terminal_at_ms,
                 'counts', coalesce((SELECT jsonb_object_agg(s.public_state, s.n) FROM (
                     SELECT public_state, count(*) AS n FROM ff_exec_core WHERE flow_id = f.flow_id
                     GROUP BY public_state) s), '{}'),
                 'nodes', coalesce((SELECT jsonb_agg(jsonb_build_object(
                         'name', x.node_name,
                         'execution_id', format('{fp:%s}:%s', x.partition_key, x.execution_id),
                         'public_state', x.public_state, 'terminal_outcome', x.terminal_outcome)
                         ORDER BY x.queue_seq)
                     FROM ff_exec_core x WHERE x.flow_id = f.flow_id), '[]'))
             FROM ff_flow_core f WHERE f.flow_id = $1",
            &[(*flow).into()],
        )?;
        let row = first_row(t).ok_or_else(|| flow_missing(flow))?;
        RawJsonb::from_spi(&row, 1)?.ok_or_else(|| FfError::internal("NULL flow"))
    })
}

/// `{upstream name (or id when unnamed): result}` for each applied inbound
/// edge whose upstream succeeded; results exactly as stored.
pub fn inputs(id: &ExecutionId) -> FfResult<RawJsonb> {
    with_spi(|c| {
        let t = exec(
            c,
            "SELECT (SELECT coalesce(jsonb_object_agg(
                         coalesce(u.node_name, format('{fp:%s}:%s', u.partition_key, u.execution_id)),
                         coalesce(u.result, 'null'::jsonb)), '{}')
                     FROM ff_edge e JOIN ff_exec_core u ON u.execution_id = e.upstream_eid
                     WHERE e.downstream_eid = x.execution_id AND e.edge_state = 'applied'
                       AND u.terminal_outcome = 'success')
             FROM ff_exec_core x WHERE x.execution_id = $1 AND x.partition_key = $2",
            &[pg_uuid(&id.uuid).into(), id.partition.into()],
        )?;
        let row = first_row(t).ok_or_else(|| FfError::not_found(format!("execution {id} does not exist")))?;
        RawJsonb::from_spi(&row, 1)?.ok_or_else(|| FfError::internal("NULL inputs"))
    })
}

/// Builds a whole flow from a JSON spec in one atomic call; returns
/// `{"flow_id", "graph_revision", "executions": {name: id}, "execution_ids": [...]}`.
#[pg_extern(volatile, parallel_unsafe, security_definer, name = "ff_submit_flow")]
#[search_path(@extschema@, pg_temp)]
fn sql_submit_flow(spec: Option<RawJsonb>) -> RawJsonb {
    (|| submit_flow(required(spec, "spec")?))().or_raise()
}

/// A flow's state, counts by public state and its nodes.
#[pg_extern(volatile, parallel_unsafe, security_definer, name = "ff_get_flow")]
#[search_path(@extschema@, pg_temp)]
fn sql_get_flow(flow_id: Option<Uuid>) -> RawJsonb {
    (|| flow_info(&required(flow_id, "flow_id")?))().or_raise()
}

/// The results of an execution's succeeded upstreams, by upstream name.
#[pg_extern(volatile, parallel_unsafe, security_definer, name = "ff_get_inputs")]
#[search_path(@extschema@, pg_temp)]
fn sql_get_inputs(execution_id: Option<String>) -> RawJsonb {
    (|| inputs(&parse_exec(execution_id, "execution_id")?))().or_raise()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cycles_are_found_in_linear_time_shapes() {
        assert_eq!(find_cycle(3, &[(0, 1), (1, 2)]), None);
        assert!(find_cycle(3, &[(0, 1), (1, 2), (2, 0)]).is_some());
        assert!(find_cycle(1, &[(0, 0)]).is_some());
        let chain: Vec<(usize, usize)> = (0..99_999).map(|i| (i, i + 1)).collect();
        assert_eq!(find_cycle(100_000, &chain), None);
        let mut looped = chain.clone();
        looped.push((99_999, 50_000));
        assert!(find_cycle(100_000, &looped).is_some());
    }
}
