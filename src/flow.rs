//! Flows: dependency DAGs over executions. Staging is compare-and-swap on
//! the graph revision and refuses cycles; applying an edge blocks its
//! downstream until the edge group fires (see `dispatch`).

use crate::db::{col, col_req, exec, first_row, now_ms, with_spi};
use crate::dispatch::{bucket, decide, drain, fire, Counts, GroupPolicy};
use crate::error::{required, FfError, FfResult, OrRaise};
use crate::exec::{pg_uuid, terminate};
use crate::ids::{check_text_id, clip, crc16, ExecutionId};
use crate::jsonb::RawJsonb;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::JsonB;
use std::collections::{HashSet, VecDeque};

type Uuid = pgrx::Uuid;

fn flow_missing(flow: &Uuid) -> FfError {
    FfError::not_found(format!("flow {flow} does not exist"))
}

/// Locks a flow row and returns (partition, graph_revision, state, node_count).
fn lock_flow(c: &mut SpiClient<'_>, flow: &Uuid) -> FfResult<(i16, i64, String, i32)> {
    let t = exec(
        c,
        "SELECT partition_key, graph_revision, public_flow_state, node_count FROM ff_flow_core
         WHERE flow_id = $1 FOR UPDATE",
        &[(*flow).into()],
    )?;
    let row = first_row(t).ok_or_else(|| flow_missing(flow))?;
    Ok((col_req(&row, 1)?, col_req(&row, 2)?, col_req(&row, 3)?, col_req(&row, 4)?))
}

fn refuse_terminal(flow: &Uuid, state: &str) -> FfResult<()> {
    if state != "open" {
        return Err(FfError::wrong_state(format!("flow {flow} is {state}; its graph can no longer change")));
    }
    Ok(())
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
        let (part, _, state, nodes) = lock_flow(c, flow)?;
        refuse_terminal(flow, &state)?;
        let t = exec(
            c,
            "SELECT flow_id FROM ff_exec_core WHERE execution_id = $1 AND partition_key = $2 FOR NO KEY UPDATE",
            &[pg_uuid(&id.uuid).into(), id.partition.into()],
        )?;
        let row = first_row(t).ok_or_else(|| FfError::not_found(format!("execution {id} does not exist")))?;
        match col::<Uuid>(&row, 1)? {
            Some(f) if f == *flow => return Ok(("already_member", nodes)),
            Some(other) => {
                return Err(FfError::wrong_state(format!("execution {id} already belongs to flow {other}")))
            }
            None => {}
        }
        if id.partition != part {
            return Err(FfError::invalid(format!(
                "execution {id} is in partition {} but flow {flow} is in partition {part}",
                id.partition
            ))
            .with_detail("create the execution with flow_id => the flow, so it shares the flow's partition"));
        }
        exec(
            c,
            "UPDATE ff_exec_core x SET flow_id = f.flow_id, namespace = f.namespace
             FROM ff_flow_core f WHERE f.flow_id = $2 AND x.execution_id = $1",
            &[pg_uuid(&id.uuid).into(), (*flow).into()],
        )?;
        let t = exec(
            c,
            "UPDATE ff_flow_core SET graph_revision = graph_revision + 1, node_count = node_count + 1
             WHERE flow_id = $1 RETURNING node_count",
            &[(*flow).into()],
        )?;
        Ok(("added", first_row(t).map(|r| col_req(&r, 1)).transpose()?.unwrap_or(0)))
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
/// stay cheap; one query per level.
fn closes_cycle(c: &mut SpiClient<'_>, flow: &Uuid, up: &Uuid, down: &Uuid) -> FfResult<bool> {
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
            "SELECT DISTINCT downstream_eid FROM ff_edge WHERE flow_id = $1 AND upstream_eid = ANY($2)"
        } else {
            "SELECT DISTINCT upstream_eid FROM ff_edge WHERE flow_id = $1 AND downstream_eid = ANY($2)"
        };
        let t = exec(c, sql, &[(*flow).into(), std::mem::take(frontier).into()])?;
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

pub fn stage_edge(e: &NewEdge) -> FfResult<i64> {
    if e.upstream.uuid == e.downstream.uuid {
        return Err(FfError::invalid(format!("edge {} would make execution {} depend on itself", e.edge, e.upstream)));
    }
    check_text_id("dependency_kind", &e.dependency_kind)?;
    with_spi(|c| {
        let (part, revision, state, _) = lock_flow(c, &e.flow)?;
        refuse_terminal(&e.flow, &state)?;
        if revision != e.expected_revision {
            return Err(FfError::stale(format!(
                "stale graph revision for flow {}: expected {}, current is {revision}",
                e.flow, e.expected_revision
            )));
        }
        require_member(c, &e.flow, &e.upstream)?;
        require_member(c, &e.flow, &e.downstream)?;
        let t = exec(c, "SELECT 1 FROM ff_edge WHERE flow_id = $1 AND edge_id = $2", &[e.flow.into(), e.edge.into()])?;
        if !t.is_empty() {
            return Err(FfError::duplicate(format!("edge {} already exists in flow {}", e.edge, e.flow)));
        }
        let (up, down) = (pg_uuid(&e.upstream.uuid), pg_uuid(&e.downstream.uuid));
        if closes_cycle(c, &e.flow, &up, &down)? {
            return Err(FfError::invalid(format!(
                "edge {} from {} to {} would close a cycle in flow {}",
                e.edge, e.upstream, e.downstream, e.flow
            )));
        }
        exec(
            c,
            "INSERT INTO ff_edge (flow_id, edge_id, partition_key, upstream_eid, downstream_eid, dependency_kind,
                 data_passing_ref, created_at_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            &[
                e.flow.into(),
                e.edge.into(),
                part.into(),
                up.into(),
                down.into(),
                e.dependency_kind.as_str().into(),
                e.data_passing_ref.clone().into(),
                now_ms().into(),
            ],
        )?;
        let t = exec(
            c,
            "UPDATE ff_flow_core SET graph_revision = graph_revision + 1, edge_count = edge_count + 1
             WHERE flow_id = $1 RETURNING graph_revision",
            &[e.flow.into()],
        )?;
        first_row(t).ok_or_else(|| flow_missing(&e.flow)).and_then(|r| col_req(&r, 1))
    })
}

/// Applies a staged edge: its group now waits for the upstream. An upstream
/// that already ended counts at once. The downstream is blocked until the
/// group fires. Returns (result, unresolved inbound edges of the group).
pub fn apply_edge(flow: &Uuid, edge: &Uuid, downstream: &ExecutionId) -> FfResult<(&'static str, i32)> {
    with_spi(|c| {
        let t = exec(
            c,
            "SELECT e.downstream_eid, e.edge_state, e.upstream_eid, e.partition_key, x.terminal_outcome
             FROM ff_edge e JOIN ff_exec_core x ON x.execution_id = e.upstream_eid
             WHERE e.flow_id = $1 AND e.edge_id = $2 FOR UPDATE OF e",
            &[(*flow).into(), (*edge).into()],
        )?;
        let row = first_row(t).ok_or_else(|| FfError::not_found(format!("edge {edge} does not exist in flow {flow}")))?;
        let down: Uuid = col_req(&row, 1)?;
        if down != pg_uuid(&downstream.uuid) {
            return Err(FfError::invalid(format!("edge {edge} leads to {down}, not to {downstream}")));
        }
        let up: Uuid = col_req(&row, 3)?;
        let part: i16 = col_req(&row, 4)?;
        let upstream_outcome: Option<String> = col(&row, 5)?;
        exec(
            c,
            "INSERT INTO ff_edge_group (flow_id, downstream_eid, partition_key) VALUES ($1, $2, $3)
             ON CONFLICT (flow_id, downstream_eid) DO NOTHING",
            &[(*flow).into(), down.into(), part.into()],
        )?;
        let (policy, mut counts, state) = lock_group(c, flow, &down)?;
        if col_req::<String>(&row, 2)? == "applied" {
            return Ok(("already_applied", counts.running));
        }
        if state != "pending" {
            return Err(FfError::wrong_state(format!(
                "the edge group of {downstream} already fired ({state}); no edge can join it"
            )));
        }
        let resolution = upstream_outcome.as_deref().map(bucket);
        exec(
            c,
            "UPDATE ff_edge SET edge_state = 'applied', applied_at_ms = $3, resolution = $4
             WHERE flow_id = $1 AND edge_id = $2",
            &[(*flow).into(), (*edge).into(), now_ms().into(), resolution.into()],
        )?;
        match resolution {
            Some("success") => counts.success += 1,
            Some("skip") => counts.skip += 1,
            Some(_) => counts.fail += 1,
            None => counts.running += 1,
        }
        exec(
            c,
            "UPDATE ff_edge_group SET success_count = $3, fail_count = $4, skip_count = $5, running_count = $6
             WHERE flow_id = $1 AND downstream_eid = $2",
            &[(*flow).into(), down.into(), counts.success.into(), counts.fail.into(), counts.skip.into(), counts.running.into()],
        )?;
        block_child(c, &down)?;
        // An edge still waiting on its upstream cannot settle the group (with
        // only some edges applied, quorum headroom would look exhausted). One
        // whose upstream already ended is decided now, or nothing ever would.
        if resolution.is_some() {
            let now = now_ms();
            let mut follow_up = VecDeque::new();
            fire(c, flow, &down, Some(&up), decide(policy, counts), now, &mut follow_up)?;
            drain(c, &mut follow_up, now)?;
        }
        Ok(("applied", counts.running))
    })
}

fn lock_group(c: &mut SpiClient<'_>, flow: &Uuid, down: &Uuid) -> FfResult<(GroupPolicy, Counts, String)> {
    let t = exec(
        c,
        "SELECT policy, success_count, fail_count, skip_count, running_count, group_state FROM ff_edge_group
         WHERE flow_id = $1 AND downstream_eid = $2 FOR UPDATE",
        &[(*flow).into(), (*down).into()],
    )?;
    let row = first_row(t).ok_or_else(|| FfError::internal("edge group vanished"))?;
    let policy = GroupPolicy::from_stored(&col_req::<JsonB>(&row, 1)?.0);
    let counts = Counts { success: col_req(&row, 2)?, fail: col_req(&row, 3)?, skip: col_req(&row, 4)?, running: col_req(&row, 5)? };
    Ok((policy, counts, col_req(&row, 6)?))
}

/// A runnable downstream waits for its group; one already claimed keeps
/// running (its lease cannot be taken back).
fn block_child(c: &mut SpiClient<'_>, down: &Uuid) -> FfResult<()> {
    exec(
        c,
        "UPDATE ff_exec_core SET eligibility_state = 'blocked_by_dependencies', public_state = 'waiting_children'
         WHERE execution_id = $1 AND lifecycle_phase = 'runnable'
           AND eligibility_state IN ('eligible_now', 'not_eligible_until_time')",
        &[(*down).into()],
    )?;
    Ok(())
}

pub fn set_group_policy(flow: &Uuid, downstream: &ExecutionId, policy: GroupPolicy) -> FfResult<&'static str> {
    with_spi(|c| {
        let (part, _, state, _) = lock_flow(c, flow)?;
        refuse_terminal(flow, &state)?;
        require_member(c, flow, downstream)?;
        let down = pg_uuid(&downstream.uuid);
        let t = exec(c, "SELECT 1 FROM ff_edge WHERE flow_id = $1 AND downstream_eid = $2 LIMIT 1", &[(*flow).into(), down.into()])?;
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
            &[(*flow).into(), down.into(), part.into(), JsonB(policy.to_json()).into()],
        )?;
        Ok(if t.is_empty() { "already_set" } else { "set" })
    })
}

/// Cancels every non-terminal member, then lets their events cascade.
pub fn cancel_flow(flow: &Uuid, reason: &str) -> FfResult<i32> {
    with_spi(|c| {
        let (_, _, state, _) = lock_flow(c, flow)?;
        if state == "cancelled" {
            return Ok(0);
        }
        let now = now_ms();
        exec(
            c,
            "UPDATE ff_flow_core SET public_flow_state = 'cancelled', cancel_reason = $2, terminal_at_ms = $3
             WHERE flow_id = $1",
            &[(*flow).into(), reason.into(), now.into()],
        )?;
        let t = exec(
            c,
            "SELECT execution_id FROM ff_exec_core WHERE flow_id = $1 AND lifecycle_phase <> 'terminal'
             ORDER BY execution_id",
            &[(*flow).into()],
        )?;
        let members: Vec<Uuid> = t.filter_map(|r| r.get::<Uuid>(1).ok().flatten()).collect();
        let mut events = VecDeque::new();
        for m in &members {
            let m = uuid::Uuid::from_bytes(*m.as_bytes());
            if let Some(ev) = terminate(c, &m, "cancelled", "cancelled", Some(reason), false, now)? {
                events.push_back(ev);
            }
        }
        let cancelled = events.len() as i32;
        drain(c, &mut events, now)?;
        Ok(cancelled)
    })
}

// ---------------------------------------------------------------------------
// SQL API
// ---------------------------------------------------------------------------

fn parse_exec(value: Option<String>, name: &str) -> FfResult<ExecutionId> {
    ExecutionId::parse(&required(value, name)?)
}

/// Creates a flow (a DAG of executions). Idempotent: 'created' or 'already_satisfied'.
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(@extschema@, pg_temp)]
fn ff_create_flow(
    flow_id: Option<Uuid>,
    flow_kind: default!(Option<String>, "'dag'"),
    namespace: default!(Option<String>, "'default'"),
) -> &'static str {
    (|| create_flow(&required(flow_id, "flow_id")?, &required(flow_kind, "flow_kind")?, &required(namespace, "namespace")?))()
        .or_raise()
}

/// Adds an execution (created with `flow_id => flow`) to the flow; bumps
/// graph_revision. Returns ('added' | 'already_member', node_count).
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(@extschema@, pg_temp)]
fn ff_add_execution_to_flow(
    flow_id: Option<Uuid>,
    execution_id: Option<String>,
) -> TableIterator<'static, (name!(result, String), name!(node_count, i32))> {
    let (r, n) = (|| add_execution(&required(flow_id, "flow_id")?, &parse_exec(execution_id, "execution_id")?))().or_raise();
    TableIterator::once((r.to_string(), n))
}

/// Stages edge upstream -> downstream if the graph is still at
/// `expected_graph_revision` (else 40001); refuses self-edges, non-members,
/// duplicates (23505) and cycles. Returns the new graph revision.
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(@extschema@, pg_temp)]
#[allow(clippy::too_many_arguments)]
fn ff_stage_dependency_edge(
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
/// ('applied' | 'already_applied', unresolved inbound edges).
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(@extschema@, pg_temp)]
fn ff_apply_dependency_to_child(
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
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(@extschema@, pg_temp)]
fn ff_set_edge_group_policy(flow_id: Option<Uuid>, downstream_execution_id: Option<String>, policy: Option<RawJsonb>) -> &'static str {
    (|| {
        let policy = GroupPolicy::parse(&required(policy, "policy")?.to_value("policy")?)?;
        set_group_policy(&required(flow_id, "flow_id")?, &parse_exec(downstream_execution_id, "downstream_execution_id")?, policy)
    })()
    .or_raise()
}

/// Cancels the flow and every non-terminal member; returns how many
/// executions were cancelled.
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(@extschema@, pg_temp)]
fn ff_cancel_flow(flow_id: Option<Uuid>, reason: default!(Option<String>, "'cancelled'")) -> i32 {
    (|| {
        let reason = required(reason, "reason")?;
        if reason.len() > 4096 {
            return Err(FfError::invalid("reason is longer than 4096 bytes"));
        }
        cancel_flow(&required(flow_id, "flow_id")?, &reason)
    })()
    .or_raise()
}
