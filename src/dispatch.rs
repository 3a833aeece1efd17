//! The completion cascade: a completion event advances the edge groups of
//! its execution's outgoing edges; a group that fires makes its downstream
//! eligible (maybe cancelling still-running siblings) or skips it, and skips
//! and cancellations emit events of their own. Everything runs in the
//! caller's transaction, so a cascade is applied whole or not at all.

use crate::db::{col, col_req, exec, first_row, now_ms, with_spi};
use crate::error::{required, FfError, FfResult, OrRaise};
use crate::exec::{from_pg_uuid, notify_lane, terminate};
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::JsonB;
use serde_json::Value;
use std::collections::VecDeque;

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

    /// Reads a stored policy; anything unreadable counts as all_of.
    pub fn from_stored(v: &Value) -> GroupPolicy {
        GroupPolicy::parse(v).unwrap_or(GroupPolicy::AllOf)
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

/// Counts of a group's applied inbound edges by how their upstream ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub success: i32,
    pub fail: i32,
    pub skip: i32,
    pub running: i32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Pending,
    Satisfied { cancel_remaining: bool },
    Impossible,
}

pub fn decide(policy: GroupPolicy, n: Counts) -> Decision {
    let total = n.success + n.fail + n.skip + n.running;
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

/// The bucket an upstream outcome counts in: success, skip, or fail.
pub fn bucket(outcome: &str) -> &'static str {
    match outcome {
        "success" => "success",
        "skipped" => "skip",
        _ => "fail",
    }
}

/// Counts one resolved edge into its group and fires the group the first
/// time its decision is reached. Events of executions skipped or cancelled
/// by the firing go to `follow_up`.
pub fn resolve_edge(
    c: &mut SpiClient<'_>,
    flow: &pgrx::Uuid,
    downstream: &pgrx::Uuid,
    upstream: &pgrx::Uuid,
    resolution: &str,
    now: i64,
    follow_up: &mut VecDeque<i64>,
) -> FfResult<()> {
    let t = exec(
        c,
        "UPDATE ff_edge_group SET
             success_count = success_count + (CASE WHEN $3 = 'success' THEN 1 ELSE 0 END),
             fail_count = fail_count + (CASE WHEN $3 = 'fail' THEN 1 ELSE 0 END),
             skip_count = skip_count + (CASE WHEN $3 = 'skip' THEN 1 ELSE 0 END),
             running_count = greatest(running_count - 1, 0)
         WHERE flow_id = $1 AND downstream_eid = $2
         RETURNING policy, success_count, fail_count, skip_count, running_count, group_state",
        &[(*flow).into(), (*downstream).into(), resolution.into()],
    )?;
    let Some(row) = first_row(t) else { return Ok(()) };
    let policy = GroupPolicy::from_stored(&col_req::<JsonB>(&row, 1)?.0);
    let counts = Counts { success: col_req(&row, 2)?, fail: col_req(&row, 3)?, skip: col_req(&row, 4)?, running: col_req(&row, 5)? };
    let state: String = col_req(&row, 6)?;
    if state != "pending" {
        return Ok(()); // fired already: counters only
    }
    fire(c, flow, downstream, Some(upstream), decide(policy, counts), now, follow_up)
}

/// Applies a group decision to its downstream execution.
pub fn fire(
    c: &mut SpiClient<'_>,
    flow: &pgrx::Uuid,
    downstream: &pgrx::Uuid,
    trigger: Option<&pgrx::Uuid>,
    decision: Decision,
    now: i64,
    follow_up: &mut VecDeque<i64>,
) -> FfResult<()> {
    match decision {
        Decision::Pending => Ok(()),
        Decision::Satisfied { cancel_remaining } => {
            set_group_state(c, flow, downstream, "satisfied")?;
            let t = exec(
                c,
                "UPDATE ff_exec_core
                 SET eligibility_state = CASE WHEN eligible_at_ms > $2 THEN 'not_eligible_until_time' ELSE 'eligible_now' END,
                     public_state = CASE WHEN eligible_at_ms > $2 THEN 'delayed' ELSE 'waiting' END
                 WHERE execution_id = $1 AND lifecycle_phase = 'runnable'
                   AND eligibility_state = 'blocked_by_dependencies'
                 RETURNING lane_id, eligibility_state = 'eligible_now'",
                &[(*downstream).into(), now.into()],
            )?;
            if let Some(row) = first_row(t) {
                if col_req::<bool>(&row, 2)? {
                    notify_lane(c, &col_req::<String>(&row, 1)?)?;
                }
            }
            if cancel_remaining {
                cancel_siblings(c, flow, downstream, trigger, now, follow_up)?;
            }
            Ok(())
        }
        Decision::Impossible => {
            set_group_state(c, flow, downstream, "impossible")?;
            let reason = Some("dependencies_impossible");
            if let Some(event) = terminate(c, &from_pg_uuid(downstream), "skipped", "skipped", reason, false, now)? {
                follow_up.push_back(event);
            }
            Ok(())
        }
    }
}

fn set_group_state(c: &mut SpiClient<'_>, flow: &pgrx::Uuid, downstream: &pgrx::Uuid, state: &str) -> FfResult<()> {
    exec(
        c,
        "UPDATE ff_edge_group SET group_state = $3 WHERE flow_id = $1 AND downstream_eid = $2",
        &[(*flow).into(), (*downstream).into(), state.into()],
    )?;
    Ok(())
}

/// Cancels the still-running upstreams of a satisfied group. A sibling
/// locked by a transaction that is completing it right now is left to that
/// transaction (waiting for it could deadlock).
fn cancel_siblings(
    c: &mut SpiClient<'_>,
    flow: &pgrx::Uuid,
    downstream: &pgrx::Uuid,
    trigger: Option<&pgrx::Uuid>,
    now: i64,
    follow_up: &mut VecDeque<i64>,
) -> FfResult<()> {
    let t = exec(
        c,
        "SELECT e.upstream_eid FROM ff_edge e JOIN ff_exec_core x ON x.execution_id = e.upstream_eid
         WHERE e.flow_id = $1 AND e.downstream_eid = $2 AND e.edge_state = 'applied'
           AND e.resolution IS NULL AND x.lifecycle_phase <> 'terminal'
           AND e.upstream_eid IS DISTINCT FROM $3
         ORDER BY e.upstream_eid",
        &[(*flow).into(), (*downstream).into(), trigger.copied().into()],
    )?;
    let siblings: Vec<pgrx::Uuid> = t.filter_map(|r| r.get::<pgrx::Uuid>(1).ok().flatten()).collect();
    let reason = Some("sibling_quorum_satisfied");
    for s in siblings {
        if let Some(event) = terminate(c, &from_pg_uuid(&s), "cancelled", "cancelled", reason, true, now)? {
            follow_up.push_back(event);
        }
    }
    Ok(())
}

/// Dispatches one completion event: claims it (once), then resolves each
/// applied, unresolved outgoing edge of its execution. Returns the number of
/// edges advanced, or `None` when the event was already dispatched.
fn dispatch_one(c: &mut SpiClient<'_>, event_id: i64, now: i64, follow_up: &mut VecDeque<i64>) -> FfResult<Option<i32>> {
    let t = exec(
        c,
        "UPDATE ff_completion_event SET dispatched_at_ms = $2
         WHERE event_id = $1 AND dispatched_at_ms IS NULL
         RETURNING execution_id, flow_id, outcome",
        &[event_id.into(), now.into()],
    )?;
    let Some(row) = first_row(t) else { return Ok(None) };
    let upstream: pgrx::Uuid = col_req(&row, 1)?;
    let Some(flow) = col::<pgrx::Uuid>(&row, 2)? else { return Ok(Some(0)) };
    let resolution = bucket(&col_req::<String>(&row, 3)?);
    // Marking the edge resolved first is what makes a replayed or duplicate
    // event count each upstream once per group.
    let t = exec(
        c,
        "UPDATE ff_edge SET resolution = $3
         WHERE flow_id = $1 AND upstream_eid = $2 AND edge_state = 'applied' AND resolution IS NULL
         RETURNING downstream_eid",
        &[flow.into(), upstream.into(), resolution.into()],
    )?;
    let mut downstreams: Vec<pgrx::Uuid> = t.filter_map(|r| r.get::<pgrx::Uuid>(1).ok().flatten()).collect();
    // Lock groups in one order so concurrent cascades cannot deadlock on them.
    downstreams.sort_by_key(|u| *u.as_bytes());
    for d in &downstreams {
        resolve_edge(c, &flow, d, &upstream, resolution, now, follow_up)?;
    }
    Ok(Some(downstreams.len() as i32))
}

/// Dispatches an event and, transitively, every event its cascade emits.
/// Returns what happened to the first event.
pub fn cascade(c: &mut SpiClient<'_>, event_id: i64) -> FfResult<Option<i32>> {
    let now = now_ms();
    let mut follow_up = VecDeque::new();
    let first = dispatch_one(c, event_id, now, &mut follow_up)?;
    drain(c, &mut follow_up, now)?;
    Ok(first)
}

/// Dispatches queued events until the cascade settles.
pub fn drain(c: &mut SpiClient<'_>, queue: &mut VecDeque<i64>, now: i64) -> FfResult<()> {
    while let Some(next) = queue.pop_front() {
        dispatch_one(c, next, now, queue)?;
    }
    Ok(())
}

pub fn dispatch_completion(event_id: i64) -> FfResult<(&'static str, i32)> {
    with_spi(|c| {
        Ok(match cascade(c, event_id)? {
            Some(n) => ("advanced", n),
            None => ("noop", 0),
        })
    })
}

/// Dispatches a completion event: advances the edge groups downstream of
/// its execution, and the whole cascade that follows, in the caller's
/// transaction. 'noop' when it was already dispatched.
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(@extschema@, pg_temp)]
fn ff_dispatch_completion(
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
        Counts { success, fail, skip, running }
    }

    #[test]
    fn all_of() {
        assert_eq!(decide(GroupPolicy::AllOf, n(2, 0, 0, 1)), Decision::Pending);
        assert_eq!(decide(GroupPolicy::AllOf, n(3, 0, 0, 0)), Decision::Satisfied { cancel_remaining: false });
        assert_eq!(decide(GroupPolicy::AllOf, n(2, 0, 1, 0)), Decision::Impossible);
        assert_eq!(decide(GroupPolicy::AllOf, n(0, 1, 0, 2)), Decision::Impossible);
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
    }

    #[test]
    fn buckets() {
        assert_eq!(bucket("success"), "success");
        assert_eq!(bucket("skipped"), "skip");
        assert_eq!(bucket("cancelled"), "fail");
        assert_eq!(bucket("expired"), "fail");
    }
}
