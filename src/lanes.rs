//! Lanes as operators see them: pausing and resuming claims, and listing
//! executions page by page.

use crate::db::{col_req, exec, first_row, now_ms, with_spi};
use crate::error::{required, FfError, FfResult, OrRaise};
use crate::exec::{notify_lane, pg_uuid};
use crate::ids::{check_text_id, ExecutionId};
use crate::jsonb::RawJsonb;
use pgrx::prelude::*;

/// Most rows one `ff_list_executions` page may hold.
pub const MAX_PAGE: i32 = 10_000;

/// Public states a listing may filter on.
const PUBLIC_STATES: [&str; 10] =
    ["waiting", "delayed", "waiting_children", "active", "completed", "failed", "cancelled", "skipped", "expired", "leased"];

/// Pauses or resumes claims on a lane. Returns what changed.
pub fn set_paused(lane: &str, paused: bool) -> FfResult<&'static str> {
    check_text_id("lane_id", lane)?;
    with_spi(|c| {
        let now = now_ms();
        if paused {
            let t = exec(
                c,
                "INSERT INTO ff_lane AS l (lane_id, paused, paused_at_ms, created_at_ms) VALUES ($1, true, $2, $2)
                 ON CONFLICT (lane_id) DO UPDATE SET paused = true, paused_at_ms = $2 WHERE NOT l.paused
                 RETURNING 1",
                &[lane.into(), now.into()],
            )?;
            return Ok(if t.is_empty() { "already_paused" } else { "paused" });
        }
        let t = exec(
            c,
            "UPDATE ff_lane SET paused = false, paused_at_ms = NULL WHERE lane_id = $1 AND paused RETURNING 1",
            &[lane.into()],
        )?;
        if t.is_empty() {
            return Ok("not_paused");
        }
        // Work may have queued while the lane was paused.
        notify_lane(c, lane)?;
        Ok("resumed")
    })
}

/// One page of executions in creation order, after `after` (exclusive).
pub fn list(lane: Option<&str>, public_state: Option<&str>, flow: Option<pgrx::Uuid>, after: Option<&ExecutionId>, max: i32) -> FfResult<Vec<Option<RawJsonb>>> {
    if let Some(l) = lane {
        check_text_id("lane_id", l)?;
    }
    if let Some(s) = public_state.filter(|s| !PUBLIC_STATES.contains(s)) {
        return Err(FfError::invalid(format!(
            "public_state \"{}\" is not one of {}",
            crate::ids::clip(s),
            PUBLIC_STATES.join(", ")
        )));
    }
    if !(1..=MAX_PAGE).contains(&max) {
        return Err(FfError::invalid(format!("max_count must be between 1 and {MAX_PAGE}, got {max}")));
    }
    with_spi(|c| {
        let after_seq: i64 = match after {
            None => 0,
            Some(id) => {
                let t = exec(
                    c,
                    "SELECT queue_seq FROM ff_exec_core WHERE execution_id = $1 AND partition_key = $2",
                    &[pg_uuid(&id.uuid).into(), id.partition.into()],
                )?;
                first_row(t)
                    .map(|r| col_req(&r, 1))
                    .transpose()?
                    .ok_or_else(|| FfError::not_found(format!("execution {id} (after_execution_id) does not exist")))?
            }
        };
        // Keyset pagination on the creation sequence: a page never repeats
        // or skips rows that existed when the previous one was read, however
        // many are inserted meanwhile (new rows sort after them).
        let t = exec(
            c,
            "SELECT jsonb_build_object(
                 'execution_id', format('{fp:%s}:%s', partition_key, execution_id), 'lane_id', lane_id,
                 'flow_id', flow_id, 'node_name', node_name, 'public_state', public_state,
                 'terminal_outcome', terminal_outcome, 'priority', priority, 'attempt_index', attempt_index,
                 'max_attempts', max_attempts, 'last_error', last_error, 'worker_id', current_worker_id,
                 'created_at_ms', created_at_ms, 'eligible_at_ms', eligible_at_ms, 'terminal_at_ms', terminal_at_ms,
                 'payload', payload)
             FROM ff_exec_core
             WHERE queue_seq > $4
               AND ($1::text IS NULL OR lane_id = $1)
               AND ($2::text IS NULL OR public_state = $2)
               AND ($3::uuid IS NULL OR flow_id = $3)
             ORDER BY queue_seq
             LIMIT $5",
            &[lane.into(), public_state.into(), flow.into(), after_seq.into(), i64::from(max).into()],
        )?;
        let mut out = Vec::new();
        for row in t {
            out.push(row.get::<RawJsonb>(1)?);
        }
        Ok(out)
    })
}

/// Stops claims on a lane ('paused' / 'already_paused'); queued work waits.
#[pg_extern(volatile, parallel_unsafe, security_definer, name = "ff_pause_lane")]
#[search_path(@extschema@, pg_temp)]
fn sql_pause_lane(lane_id: Option<String>) -> &'static str {
    (|| set_paused(&required(lane_id, "lane_id")?, true))().or_raise()
}

/// Lets claims on a lane go on ('resumed' / 'not_paused'), waking its workers.
#[pg_extern(volatile, parallel_unsafe, security_definer, name = "ff_resume_lane")]
#[search_path(@extschema@, pg_temp)]
fn sql_resume_lane(lane_id: Option<String>) -> &'static str {
    (|| set_paused(&required(lane_id, "lane_id")?, false))().or_raise()
}

/// Executions in creation order, filtered by lane, public state and flow,
/// one page of at most `max_count` after `after_execution_id`.
#[pg_extern(volatile, parallel_unsafe, security_definer, name = "ff_list_executions")]
#[search_path(@extschema@, pg_temp)]
fn sql_list_executions(
    lane_id: default!(Option<String>, "NULL"),
    public_state: default!(Option<String>, "NULL"),
    flow_id: default!(Option<pgrx::Uuid>, "NULL"),
    after_execution_id: default!(Option<String>, "NULL"),
    max_count: default!(Option<i32>, 100),
) -> SetOfIterator<'static, RawJsonb> {
    let rows = (|| {
        let after = after_execution_id.as_deref().map(ExecutionId::parse).transpose()?;
        list(lane_id.as_deref(), public_state.as_deref(), flow_id, after.as_ref(), required(max_count, "max_count")?)
    })()
    .or_raise();
    SetOfIterator::new(rows.into_iter().flatten())
}
