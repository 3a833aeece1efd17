//! Executions: creation and every change of state, in one place.
//!
//! States (FlowFabric's literals, stored as lifecycle_phase /
//! eligibility_state / public_state):
//!
//! | State      | lifecycle | eligibility               | public           |
//! |------------|-----------|---------------------------|------------------|
//! | Waiting    | runnable  | eligible_now              | waiting          |
//! | Delayed    | runnable  | not_eligible_until_time   | delayed          |
//! | Blocked    | runnable  | blocked_by_dependencies   | waiting_children |
//! | Active     | active    | not_applicable            | active           |
//! | Terminal   | terminal  | not_applicable            | completed, failed, cancelled, skipped, expired |
//!
//! Transitions, each a function below: create (to Waiting, Delayed or
//! Blocked), `lease` (Waiting/Delayed -> Active), `block` (Waiting/Delayed ->
//! Blocked), `unblock` (Blocked -> Waiting/Delayed), `promote_due` (Delayed ->
//! Waiting), `requeue` (Active/Terminal -> Waiting/Delayed) and `finish`
//! (any live state -> Terminal, with its completion event).
//!
//! # Lock order
//!
//! Every lock anyone waits for is taken in this order, so no two
//! transactions can wait on each other in a cycle:
//!
//! 1. The execution row a call names: the claim's pick (`SKIP LOCKED`), the
//!    fence of renew / complete / fail, `ff_record_spend`, `ff_cancel_execution`,
//!    `ff_add_execution_to_flow`.
//! 2. The flow row of that execution (`flow::lock`). Everything that changes
//!    a flow's graph, or counts and cascades the ending of one of its
//!    members, holds it (a member's own rows are ended just before).
//! 3. Under the flow row: its edges and edge groups, and its member rows.
//!    Member rows are taken only with `SKIP LOCKED` while the flow row is
//!    held (a member may be held by a worker that waits for the flow row):
//!    the cascade leaves what it skipped to the repair reconciler, and
//!    `ff_apply_dependency_to_child` answers 55P03 (retry).
//! 4. The quota policy row (claims).
//! 5. Budget usage rows: all rows of a budget at once, in ascending
//!    dimension, budgets in ascending id; then the budget's policy row.
//!
//! Rows that belong to one execution (its attempts, grants, ledger rows and
//! quota admission) are only written by whoever holds that execution's row,
//! so ending a lease never waits on a shared row. A transaction holding a
//! flow row never waits on a quota or budget row. Reconcilers never wait at
//! all: every lock they take is `SKIP LOCKED`.
//!
//! The order holds within each call. Across calls in one transaction the
//! documented patterns keep it: claim (its own transaction, or followed by
//! spends on the execution's budgets in ascending id and one completion),
//! and flow building (create, add, stage, apply, set policy). Completing
//! several executions of different flows in one transaction can wait in a
//! cycle with another doing the same in another order: complete each in its
//! own transaction.

use crate::db::{col, col_req, exec, first_row, keyed, now_ms, scratch_for, with_spi, WRITE_CHUNK};
use crate::error::{required, FfError, FfResult, OrRaise};
use crate::ids::{check_text_id, clip, crc16, ExecutionId};
use crate::jsonb::{RawJsonb, RawJsonbArray};
use crate::metrics::{self, Counter, Tally};
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};

pub const MAX_CAPABILITIES: usize = 256;
pub const MAX_CAPABILITY_BYTES: usize = 4096;
pub const MAX_BUDGETS_PER_EXECUTION: usize = 64;
pub const MAX_ATTEMPTS_LIMIT: i32 = 1000;
/// Most executions one `ff_create_executions` call may create.
pub const MAX_BATCH: usize = 100_000;

/// How an execution ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    Success,
    Failed,
    Cancelled,
    Skipped,
    Expired,
}

/// How an upstream's ending counts for the edge groups downstream of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Bucket {
    Success,
    Fail,
    Skip,
}

impl Bucket {
    pub fn as_str(self) -> &'static str {
        match self {
            Bucket::Success => "success",
            Bucket::Fail => "fail",
            Bucket::Skip => "skip",
        }
    }

    /// The bucket of a stored completion outcome: `success` counts as
    /// success, `skipped` as skip, anything else as a failure.
    pub fn of_outcome(outcome: &str) -> Bucket {
        match outcome {
            "success" => Bucket::Success,
            "skipped" => Bucket::Skip,
            _ => Bucket::Fail,
        }
    }

    /// Reads `ff_edge.resolution` (written by `as_str`).
    pub fn parse(resolution: &str) -> Bucket {
        match resolution {
            "success" => Bucket::Success,
            "skip" => Bucket::Skip,
            _ => Bucket::Fail,
        }
    }

    /// The outcome an event of this bucket stands for.
    pub fn outcome(self) -> Outcome {
        match self {
            Bucket::Success => Outcome::Success,
            Bucket::Skip => Outcome::Skipped,
            Bucket::Fail => Outcome::Failed,
        }
    }
}

impl Outcome {
    /// `terminal_outcome` and the completion event's outcome.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Failed => "failed",
            Outcome::Cancelled => "cancelled",
            Outcome::Skipped => "skipped",
            Outcome::Expired => "expired",
        }
    }

    pub fn public_state(self) -> &'static str {
        match self {
            Outcome::Success => "completed",
            other => other.as_str(),
        }
    }

    pub fn bucket(self) -> Bucket {
        Bucket::of_outcome(self.as_str())
    }

    /// Whether this ending makes its flow `failed`.
    pub fn fails_flow(self) -> bool {
        matches!(self, Outcome::Failed | Outcome::Expired)
    }
}

/// Where an execution is; see the table at the top of the module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Waiting,
    Delayed,
    Blocked,
    Active,
    Terminal(Outcome),
}

impl State {
    /// (lifecycle_phase, eligibility_state, public_state)
    pub fn columns(self) -> (&'static str, &'static str, &'static str) {
        match self {
            State::Waiting => ("runnable", "eligible_now", "waiting"),
            State::Delayed => ("runnable", "not_eligible_until_time", "delayed"),
            State::Blocked => ("runnable", "blocked_by_dependencies", "waiting_children"),
            State::Active => ("active", "not_applicable", "active"),
            State::Terminal(o) => ("terminal", "not_applicable", o.public_state()),
        }
    }

    pub fn from_columns(lifecycle: &str, eligibility: &str, outcome: Option<&str>) -> Option<State> {
        Some(match (lifecycle, eligibility) {
            ("runnable", "eligible_now") => State::Waiting,
            ("runnable", "not_eligible_until_time") => State::Delayed,
            ("runnable", "blocked_by_dependencies") => State::Blocked,
            ("active", _) => State::Active,
            ("terminal", _) => State::Terminal(match outcome? {
                "success" => Outcome::Success,
                "failed" => Outcome::Failed,
                "cancelled" => Outcome::Cancelled,
                "skipped" => Outcome::Skipped,
                "expired" => Outcome::Expired,
                _ => return None,
            }),
            _ => return None,
        })
    }

    pub fn is_live(self) -> bool {
        !matches!(self, State::Terminal(_))
    }
}

// ---------------------------------------------------------------------------
// Creation options
// ---------------------------------------------------------------------------

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

/// Backoff between attempts: `base_ms` doubling per attempt up to `max_ms`,
/// with "full jitter" (uniform in [0, backoff]) unless `jitter` is off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub base_ms: i64,
    pub max_ms: i64,
    pub jitter: bool,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { base_ms: 1_000, max_ms: 60_000, jitter: true }
    }
}

impl RetryPolicy {
    pub const LIMIT_MS: i64 = 7 * 86_400_000;

    /// Parses `{"base_ms": n, "max_ms": n, "jitter": bool}`; missing keys
    /// take their defaults, anything else is 22023.
    pub fn parse(v: &Value) -> FfResult<RetryPolicy> {
        let obj = v
            .as_object()
            .ok_or_else(|| FfError::invalid(format!("retry_policy must be a JSON object, got {}", clip(&v.to_string()))))?;
        let mut p = RetryPolicy::default();
        for (k, val) in obj {
            match k.as_str() {
                "base_ms" | "max_ms" => {
                    let n = val.as_i64().filter(|n| (1..=Self::LIMIT_MS).contains(n)).ok_or_else(|| {
                        FfError::invalid(format!(
                            "retry_policy.{k} must be an integer from 1 to {}, got {}",
                            Self::LIMIT_MS,
                            clip(&val.to_string())
                        ))
                    })?;
                    if k == "base_ms" {
                        p.base_ms = n
                    } else {
                        p.max_ms = n
                    }
                }
                "jitter" => {
                    p.jitter = val.as_bool().ok_or_else(|| {
                        FfError::invalid(format!("retry_policy.jitter must be true or false, got {}", clip(&val.to_string())))
                    })?
                }
                other => {
                    return Err(FfError::invalid(format!(
                        "retry_policy has an unknown key \"{}\" (known: base_ms, max_ms, jitter)",
                        clip(other)
                    )))
                }
            }
        }
        if p.max_ms < p.base_ms {
            return Err(FfError::invalid(format!(
                "retry_policy.max_ms ({}) must be >= base_ms ({})",
                p.max_ms, p.base_ms
            )));
        }
        Ok(p)
    }

    /// The ceiling of the wait before attempt `next_attempt` (2-based: the
    /// wait after the first failure is for attempt 2).
    pub fn ceiling_ms(&self, next_attempt: i32) -> i64 {
        let doublings = (next_attempt - 2).clamp(0, 62) as u32;
        self.base_ms.saturating_mul(1_i64.checked_shl(doublings).unwrap_or(i64::MAX)).min(self.max_ms)
    }

    /// The wait before `next_attempt`; `unit` is a uniform random number in
    /// [0, 1) used for the jitter.
    pub fn backoff_ms(&self, next_attempt: i32, unit: f64) -> i64 {
        let ceiling = self.ceiling_ms(next_attempt);
        if self.jitter {
            ((ceiling as f64) * unit.clamp(0.0, 1.0)) as i64
        } else {
            ceiling
        }
    }
}

/// A uniform random number in [0, 1) from the server's strong source.
pub fn random_unit() -> f64 {
    let mut buf = [0u8; 8];
    // SAFETY: buf is a valid writable buffer of the given length.
    let ok = unsafe { pg_sys::pg_strong_random(buf.as_mut_ptr().cast(), buf.len()) };
    if !ok {
        return 0.5;
    }
    (u64::from_le_bytes(buf) >> 11) as f64 / (1u64 << 53) as f64
}

/// Parses a reservation `{"dim": n}` (positive integers).
pub fn parse_reserve(v: &Value) -> FfResult<BTreeMap<String, i64>> {
    let obj = v.as_object().ok_or_else(|| {
        FfError::invalid(format!("budget_reserve must be a JSON object of positive integers, got {}", clip(&v.to_string())))
    })?;
    if obj.len() > crate::budget::MAX_DIMENSIONS {
        return Err(FfError::invalid(format!("budget_reserve names {} dimensions; the limit is {}", obj.len(), crate::budget::MAX_DIMENSIONS)));
    }
    obj.iter()
        .map(|(dim, n)| {
            check_text_id("budget_reserve dimension", dim)?;
            let value = n.as_i64().filter(|x| *x > 0).ok_or_else(|| {
                FfError::invalid(format!(
                    "budget_reserve dimension \"{}\" has value {}; expected a positive integer",
                    clip(dim),
                    clip(&n.to_string())
                ))
            })?;
            Ok((dim.clone(), value))
        })
        .collect()
}

/// Everything `ff_create_execution` accepts except the id and payload,
/// validated. Shared by the batch form and by `ff_submit_flow` nodes.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub lane_id: String,
    pub priority: i32,
    pub required_capabilities: Vec<String>,
    pub budget_ids: Vec<String>,
    pub budget_reserve: BTreeMap<String, i64>,
    pub quota_policy_id: Option<String>,
    pub flow_id: Option<uuid::Uuid>,
    pub delay_until_ms: Option<i64>,
    pub max_attempts: i32,
    pub unique_key: Option<String>,
    pub retry: RetryPolicy,
}

impl Options {
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
        if let Some(k) = &self.unique_key {
            check_text_id("unique_key", k)?;
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
        if !self.budget_reserve.is_empty() && self.budget_ids.is_empty() {
            return Err(FfError::invalid("budget_reserve needs budget_ids to reserve against"));
        }
        Ok(self)
    }

    fn reserve_json(&self) -> Option<pgrx::JsonB> {
        (!self.budget_reserve.is_empty()).then(|| pgrx::JsonB(serde_json::json!(self.budget_reserve)))
    }
}

/// One execution to create.
#[derive(Debug, Clone, Copy)]
pub struct NewRow<'a> {
    pub options: &'a Options,
    pub execution_id: Option<uuid::Uuid>,
    pub payload: Option<RawJsonb>,
    pub node_name: Option<&'a str>,
    /// Created as a member of `options.flow_id` (ff_submit_flow); otherwise
    /// the flow only chooses the partition and membership comes from
    /// ff_add_execution_to_flow.
    pub member: bool,
    /// Created waiting on its edge group (a flow node with inbound edges).
    pub blocked: bool,
}

pub fn pg_uuid(u: &uuid::Uuid) -> pgrx::Uuid {
    pgrx::Uuid::from_bytes(*u.as_bytes())
}

pub fn from_pg_uuid(u: &pgrx::Uuid) -> uuid::Uuid {
    uuid::Uuid::from_bytes(*u.as_bytes())
}

// ---------------------------------------------------------------------------
// Capability sets
// ---------------------------------------------------------------------------

thread_local! {
    /// Requirement set -> id, for sets known to be committed (never a set
    /// this backend inserted in a transaction that might still roll back).
    static CAP_SET_IDS: RefCell<HashMap<Vec<String>, i32>> = RefCell::new(HashMap::new());
    /// Worker capabilities -> (ids of the sets they satisfy, highest set id seen).
    static SATISFIED_SETS: RefCell<HashMap<Vec<String>, (Vec<i32>, i32)>> = RefCell::new(HashMap::new());
}

/// The id of the requirement set `caps` (sorted), created when new.
pub fn cap_set_id(c: &mut SpiClient<'_>, caps: &[String]) -> FfResult<i32> {
    if caps.is_empty() {
        return Ok(1);
    }
    if let Some(id) = CAP_SET_IDS.with(|m| m.borrow().get(caps).copied()) {
        return Ok(id);
    }
    let lookup = "SELECT cap_set_id FROM ff_capability_set WHERE capabilities = $1";
    if let Some(row) = first_row(exec(c, lookup, &[caps.to_vec().into()])?) {
        let id: i32 = col_req(&row, 1)?;
        CAP_SET_IDS.with(|m| m.borrow_mut().insert(caps.to_vec(), id));
        return Ok(id);
    }
    let t = exec(
        c,
        "INSERT INTO ff_capability_set (capabilities) VALUES ($1) ON CONFLICT (capabilities) DO NOTHING
         RETURNING cap_set_id",
        &[caps.to_vec().into()],
    )?;
    if let Some(row) = first_row(t) {
        return col_req(&row, 1); // ours: not cached until it is surely committed
    }
    // A concurrent transaction inserted it and committed while we waited.
    let row = first_row(exec(c, lookup, &[caps.to_vec().into()])?)
        .ok_or_else(|| FfError::internal("capability set vanished after a conflict"))?;
    col_req(&row, 1)
}

/// The highest requirement set id so far.
pub fn newest_set(c: &mut SpiClient<'_>) -> FfResult<i32> {
    let t = exec(c, "SELECT coalesce(max(cap_set_id), 1) FROM ff_capability_set", &[])?;
    Ok(first_row(t).map(|r| col_req(&r, 1)).transpose()?.unwrap_or(1))
}

/// Ids of the requirement sets that `caps` satisfies (subset rule), and the
/// highest set id the answer accounts for. Cached per backend; when the
/// caller saw a set newer than `newest`, pass it to refresh the answer.
pub fn satisfied_sets(c: &mut SpiClient<'_>, caps: &[String], newest: i32) -> FfResult<(Vec<i32>, i32)> {
    if let Some((ids, seen)) = SATISFIED_SETS.with(|m| m.borrow().get(caps).cloned()) {
        if seen >= newest {
            return Ok((ids, seen));
        }
    }
    let t = exec(
        c,
        "SELECT coalesce(array_agg(cap_set_id ORDER BY cap_set_id) FILTER (WHERE capabilities <@ $1), '{}'),
                coalesce(max(cap_set_id), 1)
         FROM ff_capability_set",
        &[caps.to_vec().into()],
    )?;
    let row = first_row(t).ok_or_else(|| FfError::internal("no capability sets"))?;
    let ids: Vec<i32> = col(&row, 1)?.unwrap_or_default();
    let seen: i32 = col_req(&row, 2)?;
    SATISFIED_SETS.with(|m| m.borrow_mut().insert(caps.to_vec(), (ids.clone(), seen)));
    Ok((ids, seen))
}

// ---------------------------------------------------------------------------
// Create
// ---------------------------------------------------------------------------

/// Budgets and the quota policy an execution names must exist (P0002).
pub fn check_references(c: &mut SpiClient<'_>, o: &Options) -> FfResult<()> {
    if !o.budget_ids.is_empty() {
        let t = exec(
            c,
            "SELECT b FROM unnest($1::text[]) b
             WHERE NOT EXISTS (SELECT FROM ff_budget_policy p WHERE p.budget_id = b) LIMIT 1",
            &[o.budget_ids.clone().into()],
        )?;
        if let Some(row) = first_row(t) {
            let missing: String = col_req(&row, 1)?;
            return Err(FfError::not_found(format!("budget \"{}\" does not exist", clip(&missing))));
        }
    }
    if let Some(q) = &o.quota_policy_id {
        let t = exec(c, "SELECT 1 FROM ff_quota_policy WHERE quota_policy_id = $1", &[q.as_str().into()])?;
        if t.is_empty() {
            return Err(FfError::not_found(format!("quota policy \"{}\" does not exist", clip(q))));
        }
    }
    Ok(())
}

/// Inserts executions. Returns each row's id in order: a row whose
/// `execution_id` exists already, or whose `unique_key` has a live
/// execution on the lane, gets that execution's id instead of a new one.
/// Lanes that got claimable work are notified.
pub fn create(c: &mut SpiClient<'_>, rows: &[NewRow<'_>], namespace: Option<&str>) -> FfResult<Vec<ExecutionId>> {
    let mut out: Vec<Option<ExecutionId>> = insert_rows(c, rows, namespace)?;
    // A row skipped for a unique key whose live holder ended before we could
    // read it (its completion committed between our insert and our lookup)
    // has nothing to return: insert it again. Each round either creates it or
    // finds a live holder, unless holders keep ending that fast.
    for _ in 0..UNIQUE_KEY_ROUNDS {
        let again: Vec<usize> = (0..rows.len()).filter(|&i| out[i].is_none()).collect();
        if again.is_empty() {
            break;
        }
        let retried: Vec<NewRow<'_>> = again.iter().map(|&i| rows[i]).collect();
        for (i, id) in again.into_iter().zip(insert_rows(c, &retried, namespace)?) {
            out[i] = id;
        }
    }
    out.into_iter()
        .zip(rows)
        .map(|(id, r)| {
            id.ok_or_else(|| {
                FfError::duplicate(format!(
                    "execution of lane \"{}\" could not be created: {}",
                    clip(&r.options.lane_id),
                    match (r.execution_id, &r.node_name) {
                        (Some(uuid), _) => format!("its id {uuid} collides with an existing row"),
                        (None, Some(name)) => format!("node name \"{}\" is already used in its flow", clip(name)),
                        (None, None) => "its unique key's holders kept ending while it was created; retry".to_string(),
                    }
                ))
            })
        })
        .collect()
}

/// Rounds of re-inserting rows whose unique-key holder ended meanwhile.
const UNIQUE_KEY_ROUNDS: usize = 3;

/// Inserts `rows`, `WRITE_CHUNK` to a statement: the id of each row created
/// or of the execution it collided with (same id, or the live holder of its
/// unique key); `None` when the collision is gone by the time it is looked up.
fn insert_rows(c: &mut SpiClient<'_>, rows: &[NewRow<'_>], namespace: Option<&str>) -> FfResult<Vec<Option<ExecutionId>>> {
    let mut out = Vec::with_capacity(rows.len());
    for chunk in rows.chunks(WRITE_CHUNK) {
        out.extend(insert_chunk(c, chunk, namespace)?);
    }
    Ok(out)
}

/// One INSERT of `rows` (see `insert_rows`).
fn insert_chunk(c: &mut SpiClient<'_>, rows: &[NewRow<'_>], namespace: Option<&str>) -> FfResult<Vec<Option<ExecutionId>>> {
    let now = now_ms();
    let mut cols = Columns::default();
    let mut uuids = Vec::with_capacity(rows.len());
    for r in rows {
        let o = r.options;
        let uuid = r.execution_id.unwrap_or_else(uuid::Uuid::new_v4);
        let slot = match &o.flow_id {
            Some(flow) => crc16(flow.as_bytes()),
            None => crc16(o.lane_id.as_bytes()),
        };
        let delayed = o.delay_until_ms.is_some_and(|d| d > now);
        let state = if r.blocked { State::Blocked } else if delayed { State::Delayed } else { State::Waiting };
        let (phase, eligibility, public) = state.columns();
        cols.ids.push(pg_uuid(&uuid));
        cols.slots.push(i32::from(slot));
        cols.flows.push(o.flow_id.as_ref().filter(|_| r.member).map(pg_uuid));
        cols.names.push(r.node_name.map(str::to_string));
        cols.lanes.push(o.lane_id.clone());
        cols.payloads.push(r.payload);
        cols.priorities.push(o.priority);
        cols.caps.push(o.required_capabilities.join(LIST_SEP));
        cols.cap_sets.push(cap_set_id(c, &o.required_capabilities)?);
        cols.budgets.push(o.budget_ids.join(LIST_SEP));
        cols.reserves.push(o.reserve_json());
        cols.quotas.push(o.quota_policy_id.clone());
        cols.unique_keys.push(o.unique_key.clone());
        cols.max_attempts.push(o.max_attempts);
        cols.retry_base.push(o.retry.base_ms);
        cols.retry_max.push(o.retry.max_ms);
        cols.retry_jitter.push(o.retry.jitter);
        cols.eligible_at.push(o.delay_until_ms.unwrap_or(0));
        cols.phases.push(phase);
        cols.eligibilities.push(eligibility);
        cols.publics.push(public);
        uuids.push(uuid);
    }
    // Capabilities and budget ids travel as text joined by LIST_SEP, because
    // SQL arrays cannot nest.
    let t = scratch_for(rows.len(), || exec(
        c,
        "INSERT INTO ff_exec_core (execution_id, partition_key, flow_id, node_name, lane_id, namespace, payload,
             priority, required_capabilities, cap_set_id, budget_ids, budget_reserve, quota_policy_id, unique_key,
             max_attempts, retry_base_ms, retry_max_ms, retry_jitter, eligible_at_ms,
             lifecycle_phase, eligibility_state, public_state, attempt_state, created_at_ms)
         SELECT r.id, (r.slot % (SELECT num_flow_partitions FROM ff_partition_config))::smallint, r.flow, r.name,
                r.lane, coalesce($22, 'default'), r.payload, r.priority,
                CASE WHEN r.caps = '' THEN '{}'::text[] ELSE string_to_array(r.caps, E'\\x1f') END, r.cap_set,
                CASE WHEN r.budgets = '' THEN '{}'::text[] ELSE string_to_array(r.budgets, E'\\x1f') END,
                r.reserve, r.quota, r.ukey, r.max_attempts, r.rbase, r.rmax, r.rjitter, r.eligible_at,
                r.phase, r.eligibility, r.public, 'pending_first_attempt', $23
         FROM unnest($1::uuid[], $2::int[], $3::uuid[], $4::text[], $5::text[], $6::jsonb[], $7::int[], $8::text[],
                     $9::int[], $10::text[], $11::jsonb[], $12::text[], $13::text[], $14::int[], $15::bigint[],
                     $16::bigint[], $17::bool[], $18::bigint[], $19::text[], $20::text[], $21::text[])
              AS r(id, slot, flow, name, lane, payload, priority, caps, cap_set, budgets, reserve, quota, ukey,
                   max_attempts, rbase, rmax, rjitter, eligible_at, phase, eligibility, public)
         ON CONFLICT DO NOTHING
         RETURNING execution_id, partition_key, lane_id, eligibility_state = 'eligible_now'",
        &[
            cols.ids.clone().into(),
            cols.slots.into(),
            cols.flows.into(),
            cols.names.into(),
            cols.lanes.clone().into(),
            cols.payloads.into(),
            cols.priorities.into(),
            cols.caps.into(),
            cols.cap_sets.into(),
            cols.budgets.into(),
            cols.reserves.into(),
            cols.quotas.into(),
            cols.unique_keys.clone().into(),
            cols.max_attempts.into(),
            cols.retry_base.into(),
            cols.retry_max.into(),
            cols.retry_jitter.into(),
            cols.eligible_at.into(),
            cols.phases.into_iter().map(str::to_string).collect::<Vec<_>>().into(),
            cols.eligibilities.into_iter().map(str::to_string).collect::<Vec<_>>().into(),
            cols.publics.into_iter().map(str::to_string).collect::<Vec<_>>().into(),
            namespace.into(),
            now.into(),
        ],
    ))?;
    let mut created: HashMap<[u8; 16], i16> = HashMap::with_capacity(rows.len());
    let mut notify = BTreeSet::new();
    let mut tally = Tally::default();
    scratch_for(rows.len(), || -> FfResult<()> {
        for row in t {
            let id: pgrx::Uuid = row.get(1)?.ok_or_else(|| FfError::internal("NULL execution id"))?;
            created.insert(*id.as_bytes(), row.get(2)?.unwrap_or(0));
            let lane = row.get::<String>(3)?.unwrap_or_default();
            tally.add(&lane, Counter::Created, 1);
            if row.get::<bool>(4)?.unwrap_or(false) {
                notify.insert(lane);
            }
        }
        Ok(())
    })?;
    tally.flush(c)?;
    let mut out = Vec::with_capacity(rows.len());
    for (i, uuid) in uuids.iter().enumerate() {
        match created.get(uuid.as_bytes()) {
            Some(partition) => out.push(Some(ExecutionId { partition: *partition, uuid: *uuid })),
            None => out.push(existing(c, uuid, &cols.lanes[i], cols.unique_keys[i].as_deref())?),
        }
    }
    for lane in notify {
        notify_lane(c, &lane)?;
    }
    Ok(out)
}

/// Joins a list of ids for one SQL text value; ids never contain control
/// characters (`check_text_id`, `normalize_capabilities`).
const LIST_SEP: &str = "\u{1f}";

#[derive(Default)]
struct Columns {
    ids: Vec<pgrx::Uuid>,
    slots: Vec<i32>,
    flows: Vec<Option<pgrx::Uuid>>,
    names: Vec<Option<String>>,
    lanes: Vec<String>,
    payloads: Vec<Option<RawJsonb>>,
    priorities: Vec<i32>,
    caps: Vec<String>,
    cap_sets: Vec<i32>,
    budgets: Vec<String>,
    reserves: Vec<Option<pgrx::JsonB>>,
    quotas: Vec<Option<String>>,
    unique_keys: Vec<Option<String>>,
    max_attempts: Vec<i32>,
    retry_base: Vec<i64>,
    retry_max: Vec<i64>,
    retry_jitter: Vec<bool>,
    eligible_at: Vec<i64>,
    phases: Vec<&'static str>,
    eligibilities: Vec<&'static str>,
    publics: Vec<&'static str>,
}

/// The execution a skipped insert collided with: the same id, or the live
/// execution holding the unique key.
fn existing(c: &mut SpiClient<'_>, uuid: &uuid::Uuid, lane: &str, unique_key: Option<&str>) -> FfResult<Option<ExecutionId>> {
    let t = exec(
        c,
        "SELECT execution_id, partition_key FROM ff_exec_core WHERE execution_id = $1
         UNION ALL
         (SELECT execution_id, partition_key FROM ff_exec_core
          WHERE $3::text IS NOT NULL AND lane_id = $2 AND unique_key = $3 AND lifecycle_phase <> 'terminal')
         LIMIT 1",
        &[pg_uuid(uuid).into(), lane.into(), unique_key.into()],
    )?;
    let Some(row) = first_row(t) else { return Ok(None) };
    Ok(Some(ExecutionId { uuid: from_pg_uuid(&col_req(&row, 1)?), partition: col_req(&row, 2)? }))
}

// ---------------------------------------------------------------------------
// Lease
// ---------------------------------------------------------------------------

/// One execution to lease under a signed grant.
pub struct LeaseRow {
    pub uuid: uuid::Uuid,
    pub grant_id: Vec<u8>,
    pub grant_key: String,
}

/// What a lease hands the worker.
pub struct Leased {
    pub id: ExecutionId,
    pub lane_id: String,
    pub attempt: i32,
    pub payload: Option<RawJsonb>,
    pub grant_key: String,
}

/// Waiting/Delayed -> Active for rows the caller picked and locked: starts
/// an attempt and stores each grant.
#[allow(clippy::too_many_arguments)]
pub fn lease(
    c: &mut SpiClient<'_>,
    rows: Vec<LeaseRow>,
    worker_id: &str,
    worker_instance_id: &str,
    kid: &str,
    ttl_ms: i64,
    expires_at_ms: i64,
    now: i64,
) -> FfResult<Vec<Leased>> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<pgrx::Uuid> = rows.iter().map(|r| pg_uuid(&r.uuid)).collect();
    let grants: Vec<Vec<u8>> = rows.iter().map(|r| r.grant_id.clone()).collect();
    let (sql, ids, grants): (&'static str, DatumWithOid<'_>, DatumWithOid<'_>) = if rows.len() == 1 {
        (LEASE_ONE, ids[0].into(), grants[0].clone().into())
    } else {
        (LEASE_MANY, ids.into(), grants.into())
    };
    let t = exec(
        c,
        sql,
        &[
            ids,
            grants,
            worker_id.into(),
            worker_instance_id.into(),
            now.into(),
            expires_at_ms.into(),
            kid.into(),
            ttl_ms.into(),
            metrics::slot().into(),
        ],
    )?;
    let mut keys: HashMap<[u8; 16], String> = rows.into_iter().map(|r| (*r.uuid.as_bytes(), r.grant_key)).collect();
    let mut out = Vec::new();
    for row in t {
        let uuid: pgrx::Uuid = row.get(1)?.ok_or_else(|| FfError::internal("NULL execution id"))?;
        out.push(Leased {
            id: ExecutionId { uuid: from_pg_uuid(&uuid), partition: row.get(2)?.unwrap_or(0) },
            lane_id: row.get(3)?.unwrap_or_default(),
            attempt: row.get(4)?.unwrap_or(0),
            payload: row.get::<RawJsonb>(5)?,
            grant_key: keys.remove(uuid.as_bytes()).unwrap_or_default(),
        });
    }
    Ok(out)
}

// The lease of `lease`: $1 the execution ids, $2 their grant ids (one
// each), $9 this backend's counter slot (NULL when metrics are off). One
// claim leases one row, and a statement written for one key plans as index
// lookups; the batch form's unnest, hash join and grouped count cost more
// to start up than the one row costs to write, on every claim.
// A grant id is the hash of the grant key, which signs (execution, worker,
// instance, expiry, kid): the same worker instance leasing the same
// execution again with the same expiry millisecond (a short lease after a
// long one, say) signs the very same key. The earlier row then describes
// the new lease instead of failing the claim with 23505; the two keys are
// one string, so no caller could tell them apart anyway.
macro_rules! lease_sql {
    (with: $with:literal, grant: $grant:literal, from: $from:literal, count: $count:literal) => {
        concat!(
            $with,
            "
         e AS (
             UPDATE ff_exec_core x SET lifecycle_phase = 'active', ownership_state = 'leased',
                 eligibility_state = 'not_applicable', public_state = 'active',
                 attempt_state = 'running_attempt', attempt_index = x.attempt_index + 1,
                 started_at_ms = coalesce(x.started_at_ms, $5), lease_expires_at_ms = $6,
                 current_worker_id = $3, current_worker_instance_id = $4, current_grant_id = ",
            $grant,
            "
             ",
            $from,
            "
             RETURNING x.execution_id, x.partition_key, x.lane_id, x.attempt_index, x.payload, ",
            $grant,
            " AS grant_id),
         a AS (
             INSERT INTO ff_attempt (execution_id, attempt_index, partition_key, worker_id,
                 worker_instance_id, lease_expires_at_ms, started_at_ms)
             SELECT e.execution_id, e.attempt_index, e.partition_key, $3, $4, $6, $5 FROM e),
         g AS (
             INSERT INTO ff_claim_grant (grant_id, partition_key, execution_id, worker_id, worker_instance_id,
                 lane_id, kid, grant_ttl_ms, issued_at_ms, expires_at_ms)
             SELECT e.grant_id, e.partition_key, e.execution_id, $3, $4, e.lane_id, $7, $8, $5, $6 FROM e
             ON CONFLICT (grant_id) DO UPDATE SET lane_id = EXCLUDED.lane_id, grant_ttl_ms = EXCLUDED.grant_ttl_ms,
                 issued_at_ms = EXCLUDED.issued_at_ms, expires_at_ms = EXCLUDED.expires_at_ms),
         m AS (
             INSERT INTO ff_lane_counter AS c (lane_id, slot, claimed)
             ",
            $count,
            "
             ON CONFLICT (lane_id, slot) DO UPDATE SET claimed = c.claimed + EXCLUDED.claimed)
         SELECT execution_id, partition_key, lane_id, attempt_index, payload FROM e"
        )
    };
}
const LEASE_ONE: &str = lease_sql!(
    with: "WITH",
    grant: "$2::bytea",
    from: "WHERE x.execution_id = $1",
    count: "SELECT lane_id, $9, 1 FROM e WHERE $9 IS NOT NULL"
);
const LEASE_MANY: &str = lease_sql!(
    with: "WITH l AS (SELECT * FROM unnest($1::uuid[], $2::bytea[]) AS l(execution_id, grant_id)),",
    grant: "l.grant_id",
    from: "FROM l WHERE x.execution_id = l.execution_id AND x.execution_id = ANY ($1)",
    count: "SELECT lane_id, $9, count(*) FROM e WHERE $9 IS NOT NULL GROUP BY lane_id"
);

/// Extends the lease of an execution the caller holds (after the fence).
pub fn extend_lease(c: &mut SpiClient<'_>, uuid: &uuid::Uuid, attempt: i32, grant_id: &[u8], expires: i64) -> FfResult<()> {
    exec(
        c,
        "WITH a AS (UPDATE ff_attempt SET lease_expires_at_ms = $3, lease_epoch = lease_epoch + 1
                    WHERE execution_id = $1 AND attempt_index = $2),
              g AS (UPDATE ff_claim_grant SET expires_at_ms = $3 WHERE grant_id = $4)
         UPDATE ff_exec_core SET lease_expires_at_ms = $3 WHERE execution_id = $1",
        &[pg_uuid(uuid).into(), attempt.into(), expires.into(), grant_id.to_vec().into()],
    )?;
    Ok(())
}

// ---------------------------------------------------------------------------
// Waiting on dependencies
// ---------------------------------------------------------------------------

/// What `block` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blocked {
    /// Its state before (Waiting/Delayed/Blocked are now Blocked; an
    /// execution that started or ended is left alone).
    Now(State),
    /// Another transaction holds its row.
    Held,
    Missing,
}

/// Waiting/Delayed -> Blocked for the downstream of an applied edge. The
/// caller holds the flow, so the row is taken without waiting.
pub fn block(c: &mut SpiClient<'_>, uuid: &pgrx::Uuid) -> FfResult<Blocked> {
    let t = exec(
        c,
        "SELECT lifecycle_phase, eligibility_state, terminal_outcome FROM ff_exec_core
         WHERE execution_id = $1 FOR NO KEY UPDATE SKIP LOCKED",
        &[(*uuid).into()],
    )?;
    let Some(row) = first_row(t) else {
        let exists = !exec(c, "SELECT 1 FROM ff_exec_core WHERE execution_id = $1", &[(*uuid).into()])?.is_empty();
        return Ok(if exists { Blocked::Held } else { Blocked::Missing });
    };
    let phase: String = col_req(&row, 1)?;
    let eligibility: String = col_req(&row, 2)?;
    let outcome: Option<String> = col(&row, 3)?;
    let Some(state) = State::from_columns(&phase, &eligibility, outcome.as_deref()) else {
        return Err(FfError::internal(format!("execution {uuid} has an unknown state {phase}/{eligibility}")));
    };
    if matches!(state, State::Waiting | State::Delayed) {
        exec(
            c,
            "UPDATE ff_exec_core SET eligibility_state = 'blocked_by_dependencies', public_state = 'waiting_children'
             WHERE execution_id = $1",
            &[(*uuid).into()],
        )?;
    }
    Ok(Blocked::Now(state))
}

// Blocked -> Waiting (or Delayed) for the downstreams $1 not held
// elsewhere (see `db::keyed`): the many form updates the rows it locked by
// an array of their ids, evaluated once, rather than joining them.
macro_rules! unblock_sql {
    (key: $key:literal, rows: $rows:literal) => {
        concat!(
            "WITH mine AS (SELECT execution_id FROM ff_exec_core
                       WHERE execution_id ",
            $key,
            " AND lifecycle_phase = 'runnable'
                         AND eligibility_state = 'blocked_by_dependencies'
                       FOR NO KEY UPDATE SKIP LOCKED)
         UPDATE ff_exec_core x
         SET eligibility_state = CASE WHEN x.eligible_at_ms > $2 THEN 'not_eligible_until_time' ELSE 'eligible_now' END,
             public_state = CASE WHEN x.eligible_at_ms > $2 THEN 'delayed' ELSE 'waiting' END
         ",
            $rows,
            "
         RETURNING x.execution_id, x.lane_id, x.eligibility_state = 'eligible_now'"
        )
    };
}
const UNBLOCK: [&str; 2] = [
    unblock_sql!(key: "= $1", rows: "FROM mine WHERE x.execution_id = mine.execution_id AND x.execution_id = $1"),
    unblock_sql!(key: "= ANY ($1)", rows: "WHERE x.execution_id = ANY (ARRAY(SELECT execution_id FROM mine))"),
];

/// Blocked -> Waiting (or Delayed until eligible_at_ms) for downstreams
/// whose group was satisfied. Rows held by another transaction are skipped
/// and returned, for the repair pass. Notifies the lanes of what became
/// claimable.
pub fn unblock(c: &mut SpiClient<'_>, uuids: &[pgrx::Uuid], now: i64) -> FfResult<Vec<pgrx::Uuid>> {
    if uuids.is_empty() {
        return Ok(Vec::new());
    }
    let (sql, key) = keyed(UNBLOCK, uuids);
    let t = exec(c, sql, &[key, now.into()])?;
    let mut done = BTreeSet::new();
    let mut lanes = BTreeSet::new();
    for row in t {
        if let Some(id) = row.get::<pgrx::Uuid>(1)? {
            done.insert(*id.as_bytes());
        }
        if row.get::<bool>(3)?.unwrap_or(false) {
            lanes.insert(row.get::<String>(2)?.unwrap_or_default());
        }
    }
    for lane in lanes {
        notify_lane(c, &lane)?;
    }
    let rest: Vec<pgrx::Uuid> = uuids.iter().filter(|u| !done.contains(u.as_bytes())).copied().collect();
    if rest.is_empty() {
        return Ok(rest);
    }
    // Of the others, those still blocked are held elsewhere; the rest were
    // released or ended already.
    let t = exec(
        c,
        "SELECT execution_id FROM ff_exec_core WHERE execution_id = ANY($1)
           AND eligibility_state = 'blocked_by_dependencies'",
        &[rest.into()],
    )?;
    Ok(t.filter_map(|r| r.get::<pgrx::Uuid>(1).ok().flatten()).collect())
}

/// Delayed -> Waiting for executions whose time has come (a reconciler:
/// never waits on a lock). Returns how many.
pub fn promote_due(c: &mut SpiClient<'_>, now: i64, limit: i64) -> FfResult<i64> {
    let t = exec(
        c,
        "UPDATE ff_exec_core SET eligibility_state = 'eligible_now', public_state = 'waiting'
         WHERE execution_id IN (
             SELECT execution_id FROM ff_exec_core
             WHERE eligibility_state = 'not_eligible_until_time' AND eligible_at_ms <= $1
             ORDER BY eligible_at_ms LIMIT $2 FOR NO KEY UPDATE SKIP LOCKED)
         RETURNING lane_id",
        &[now.into(), limit.into()],
    )?;
    let lanes: Vec<String> = t.filter_map(|r| r.get::<String>(1).ok().flatten()).collect();
    let promoted = lanes.len() as i64;
    for lane in lanes.into_iter().collect::<BTreeSet<_>>() {
        notify_lane(c, &lane)?;
    }
    Ok(promoted)
}

// ---------------------------------------------------------------------------
// Endings
// ---------------------------------------------------------------------------

/// An execution that just became terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ended {
    pub uuid: pgrx::Uuid,
    pub flow: Option<pgrx::Uuid>,
    pub outcome: Outcome,
}

/// How a call takes the execution rows it changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Wait for rows another transaction holds: only for the execution row a
    /// call names (lock order 1).
    Yes,
    /// Skip rows another transaction holds: under a flow row and in reconcilers.
    SkipLocked,
    /// The caller locked the rows in an earlier statement (the fence, a cancel).
    Held,
}

/// What a terminal transition records.
#[derive(Debug, Clone, Copy)]
pub struct Ending<'a> {
    pub outcome: Outcome,
    pub result: Option<RawJsonb>,
    pub error: Option<&'a str>,
    pub reason: Option<&'a str>,
    /// The cascade runs in this call, so the event is written dispatched.
    pub dispatched: bool,
}

/// Any live state -> Terminal for `uuids`: ends a running attempt (freeing
/// its quota slot and its budget reservation), writes one completion event
/// each, and returns what ended. Already-terminal rows, and with
/// `Wait::SkipLocked` rows held elsewhere, are left out. Flow members must
/// be ended under their flow's lock (`flow::lock`), which also takes the
/// returned endings into the flow's counters and runs their cascade.
pub fn finish(c: &mut SpiClient<'_>, uuids: &[pgrx::Uuid], e: &Ending<'_>, wait: Wait, now: i64) -> FfResult<Vec<Ended>> {
    finish_with(c, uuids, e, wait, now, FINISH)
}

/// `finish` for one execution the caller holds that names no quota policy
/// and no budget reserve (the fence read says so).
pub fn finish_unshared(c: &mut SpiClient<'_>, uuid: &pgrx::Uuid, e: &Ending<'_>, now: i64) -> FfResult<Vec<Ended>> {
    finish_with(c, &[*uuid], e, Wait::Held, now, FINISH_UNSHARED)
}

/// `forms`: the statement for one execution, then for many.
fn finish_with(
    c: &mut SpiClient<'_>,
    uuids: &[pgrx::Uuid],
    e: &Ending<'_>,
    wait: Wait,
    now: i64,
    forms: [&'static str; 2],
) -> FfResult<Vec<Ended>> {
    if uuids.is_empty() {
        return Ok(Vec::new());
    }
    // Lock first, then end in a new statement: its snapshot, taken after the
    // locks, sees the attempt, quota slot and reservation of a claim that
    // committed while we waited or as we skipped past it (one statement
    // would lock the claim's row but miss the rows it inserted).
    let locked: Vec<pgrx::Uuid> = match wait {
        Wait::Held => uuids.to_vec(),
        Wait::Yes | Wait::SkipLocked => {
            let sql = if wait == Wait::Yes { LOCK_LIVE } else { LOCK_LIVE_SKIP };
            let t = exec(c, sql, &[uuids.to_vec().into()])?;
            t.filter_map(|r| r.get::<pgrx::Uuid>(1).ok().flatten()).collect()
        }
    };
    if locked.is_empty() {
        return Ok(Vec::new());
    }
    let (sql, keys) = keyed(forms, &locked);
    let t = exec(
        c,
        sql,
        &[
            keys,
            e.outcome.as_str().into(),
            e.outcome.public_state().into(),
            e.result.into(),
            e.error.into(),
            e.reason.into(),
            now.into(),
            e.dispatched.into(),
            metrics::slot().into(),
        ],
    )?;
    let mut out = Vec::new();
    for row in t {
        let Some(uuid) = row.get::<pgrx::Uuid>(1)? else { continue };
        out.push(Ended { uuid, flow: row.get(2)?, outcome: e.outcome });
    }
    Ok(out)
}

const LOCK_LIVE: &str = "SELECT execution_id FROM ff_exec_core
    WHERE execution_id = ANY($1) AND lifecycle_phase <> 'terminal' FOR NO KEY UPDATE";
const LOCK_LIVE_SKIP: &str = "SELECT execution_id FROM ff_exec_core
    WHERE execution_id = ANY($1) AND lifecycle_phase <> 'terminal' FOR NO KEY UPDATE SKIP LOCKED";

// Ends executions this transaction holds. The attempt, the quota slot and
// the reservation are released only for executions that were active; the
// lane counters ($9: this backend's slot, NULL when metrics are off) count
// completions, failures and expiries.
//
// Two forms (see `db::keyed`). For one execution every table is joined to
// `old` and also keyed `= $1`: the statement is planned once per session
// (sql/finalize.sql), perhaps while a table is nearly empty, and only a key
// condition keeps the plan a lookup as the table grows. For many, nothing
// is joined: `old` is read once, and each release goes by `active`, the
// array of the ids that were active, built once, so the statement grows
// linearly with the number of executions it ends. Its attempt release
// closes the open attempt of each (an active execution has exactly one).
macro_rules! ending_set {
    () => {
        "lifecycle_phase = 'terminal', ownership_state = 'unowned',
             eligibility_state = 'not_applicable', attempt_state = 'attempt_terminal',
             public_state = $3, terminal_outcome = $2, result = coalesce($4, x.result),
             last_error = coalesce($5, x.last_error), cancellation_reason = coalesce($6, x.cancellation_reason),
             terminal_at_ms = $7, lease_expires_at_ms = NULL, current_grant_id = NULL"
    };
}
macro_rules! ending_tail {
    ($count:expr) => {
        concat!(
            "
     ev AS (
         INSERT INTO ff_completion_event (partition_key, execution_id, flow_id, outcome, namespace,
             instance_tag, occurred_at_ms, dispatched_at_ms)
         SELECT partition_key, execution_id, flow_id, $2, namespace, instance_tag, $7,
                CASE WHEN $8 THEN $7 END
         FROM ended),
     m AS (
         INSERT INTO ff_lane_counter AS c (lane_id, slot, completed, failed, expired)
         ",
            $count,
            "
         ON CONFLICT (lane_id, slot) DO UPDATE SET completed = c.completed + EXCLUDED.completed,
             failed = c.failed + EXCLUDED.failed, expired = c.expired + EXCLUDED.expired)
     SELECT execution_id, flow_id FROM ended"
        )
    };
}
macro_rules! finish_one_sql {
    (releases: $releases:expr) => {
        concat!(
            "WITH old AS (
         SELECT execution_id, lifecycle_phase AS was, attempt_index, quota_policy_id FROM ff_exec_core
         WHERE execution_id = $1 AND lifecycle_phase <> 'terminal'),
     ended AS (
         UPDATE ff_exec_core x SET ",
            ending_set!(),
            "
         FROM old WHERE x.execution_id = old.execution_id AND x.execution_id = $1
         RETURNING x.execution_id, x.partition_key, x.flow_id, x.namespace, x.instance_tag, x.lane_id,
                   old.was, old.attempt_index, old.quota_policy_id),
     att AS (
         UPDATE ff_attempt a SET outcome = $2, error = $5, terminal_at_ms = $7, lease_expires_at_ms = NULL
         FROM ended e WHERE e.was = 'active' AND a.execution_id = e.execution_id
           AND a.attempt_index = e.attempt_index AND a.execution_id = $1),",
            $releases,
            ending_tail!(count_one!())
        )
    };
}
macro_rules! releases_one {
    () => {
        "
     quota AS (
         DELETE FROM ff_quota_admitted q USING ended e
         WHERE e.was = 'active' AND q.quota_policy_id = e.quota_policy_id AND q.execution_id = e.execution_id
           AND q.execution_id = $1),
     reserve AS (
         UPDATE ff_budget_usage_by_exec l SET reserved = 0, updated_at_ms = $7
         FROM ended e WHERE e.was = 'active' AND l.execution_id = e.execution_id AND l.reserved > 0
           AND l.execution_id = $1),"
    };
}
macro_rules! finish_many_sql {
    () => {
        concat!(
            "WITH old AS MATERIALIZED (
         SELECT execution_id, lifecycle_phase AS was, quota_policy_id FROM ff_exec_core
         WHERE execution_id = ANY ($1) AND lifecycle_phase <> 'terminal'),
     active AS MATERIALIZED (SELECT ARRAY(SELECT execution_id FROM old WHERE was = 'active') AS ids),
     ended AS (
         UPDATE ff_exec_core x SET ",
            ending_set!(),
            "
         WHERE x.execution_id = ANY ($1) AND x.lifecycle_phase <> 'terminal'
         RETURNING x.execution_id, x.partition_key, x.flow_id, x.namespace, x.instance_tag, x.lane_id),
     att AS (
         UPDATE ff_attempt a SET outcome = $2, error = $5, terminal_at_ms = $7, lease_expires_at_ms = NULL
         WHERE a.execution_id = ANY ((SELECT ids FROM active)::uuid[]) AND a.outcome IS NULL),
     quota AS (
         DELETE FROM ff_quota_admitted q
         WHERE q.quota_policy_id = ANY (ARRAY(SELECT DISTINCT quota_policy_id FROM old
                                             WHERE was = 'active' AND quota_policy_id IS NOT NULL))
           AND q.execution_id = ANY ((SELECT ids FROM active)::uuid[])),
     reserve AS (
         UPDATE ff_budget_usage_by_exec l SET reserved = 0, updated_at_ms = $7
         WHERE l.execution_id = ANY ((SELECT ids FROM active)::uuid[]) AND l.reserved > 0),",
            ending_tail!(count_many!())
        )
    };
}
// How the lane counters count what ended: grouped for many rows; for one
// key (at most one row) without the aggregate, whose start-up would cost
// more than the row.
macro_rules! count_many {
    () => {
        "SELECT lane_id, $9, count(*) FILTER (WHERE $2 = 'success'), count(*) FILTER (WHERE $2 = 'failed'),
                count(*) FILTER (WHERE $2 = 'expired')
         FROM ended WHERE $9 IS NOT NULL AND $2 IN ('success', 'failed', 'expired') GROUP BY lane_id"
    };
}
macro_rules! count_one {
    () => {
        "SELECT lane_id, $9, ($2 = 'success')::int, ($2 = 'failed')::int, ($2 = 'expired')::int
         FROM ended WHERE $9 IS NOT NULL AND $2 IN ('success', 'failed', 'expired')"
    };
}
// A single ending (a completion, a failure) uses the one-key form: `= $1`
// plans as index lookups joined by nested loops, where the array form
// starts up bitmap scans on every call.
const FINISH: [&str; 2] = [finish_one_sql!(releases: releases_one!()), finish_many_sql!()];
// For an execution that names no quota policy and no budget reserve, so
// holds neither: without those two releases the statement opens and locks
// six relations fewer, which keeps a completion's relation locks closer to
// the backend's fast-path slots (16). Only ever one execution
// (`finish_unshared`); the many slot is the full form.
const FINISH_UNSHARED: [&str; 2] = [finish_one_sql!(releases: ""), FINISH[1]];

/// Active -> Waiting (or Delayed until `eligible_at_ms`) for an execution
/// the caller holds: ends the running attempt and frees its quota slot and
/// reservation. The lane is notified when it is claimable now; delayed
/// promotion notifies when the time comes.
pub fn requeue(c: &mut SpiClient<'_>, uuid: &uuid::Uuid, outcome: &str, error: &str, eligible_at_ms: i64, now: i64) -> FfResult<()> {
    let t = exec(
        c,
        "WITH old AS (SELECT execution_id, attempt_index, quota_policy_id FROM ff_exec_core
                      WHERE execution_id = $1 AND lifecycle_phase = 'active'),
              att AS (UPDATE ff_attempt a SET outcome = $5, error = $2, terminal_at_ms = $4, lease_expires_at_ms = NULL
                      FROM old WHERE a.execution_id = old.execution_id AND a.attempt_index = old.attempt_index
                        AND a.execution_id = $1),
              quota AS (DELETE FROM ff_quota_admitted q USING old
                        WHERE q.quota_policy_id = old.quota_policy_id AND q.execution_id = old.execution_id
                          AND q.execution_id = $1),
              reserve AS (UPDATE ff_budget_usage_by_exec l SET reserved = 0, updated_at_ms = $4
                          FROM old WHERE l.execution_id = old.execution_id AND l.reserved > 0
                            AND l.execution_id = $1)
         UPDATE ff_exec_core x SET lifecycle_phase = 'runnable', ownership_state = 'unowned',
             eligibility_state = CASE WHEN $3 > $4 THEN 'not_eligible_until_time' ELSE 'eligible_now' END,
             public_state = CASE WHEN $3 > $4 THEN 'delayed' ELSE 'waiting' END,
             attempt_state = 'pending_retry_attempt', eligible_at_ms = $3, last_error = $2,
             lease_expires_at_ms = NULL, current_worker_id = NULL, current_worker_instance_id = NULL,
             current_grant_id = NULL
         FROM old WHERE x.execution_id = old.execution_id
         RETURNING x.lane_id",
        &[pg_uuid(uuid).into(), error.into(), eligible_at_ms.into(), now.into(), outcome.into()],
    )?;
    let Some(lane) = first_row(t).map(|r| col_req::<String>(&r, 1)).transpose()? else { return Ok(()) };
    metrics::count(c, &lane, Counter::Retried, 1)?;
    if eligible_at_ms <= now {
        notify_lane(c, &lane)?;
    }
    Ok(())
}

/// Terminal (failed, expired or cancelled) -> Waiting for a solo execution:
/// `ff_retry_execution`. With `reset_attempts` it gets its full
/// `max_attempts` again; otherwise exactly one more attempt. Attempts keep
/// their numbers; `attempt_offset` is where the current allowance starts.
pub fn revive(c: &mut SpiClient<'_>, id: &ExecutionId, reset_attempts: bool) -> FfResult<&'static str> {
    let t = exec(
        c,
        "SELECT lifecycle_phase, terminal_outcome, flow_id FROM ff_exec_core
         WHERE execution_id = $1 AND partition_key = $2 FOR NO KEY UPDATE",
        &[pg_uuid(&id.uuid).into(), id.partition.into()],
    )?;
    let row = first_row(t).ok_or_else(|| FfError::not_found(format!("execution {id} does not exist")))?;
    let phase: String = col_req(&row, 1)?;
    let outcome: Option<String> = col(&row, 2)?;
    if let Some(flow) = col::<pgrx::Uuid>(&row, 3)? {
        return Err(FfError::wrong_state(format!(
            "execution {id} belongs to flow {flow}; flow members retry through max_attempts, and a failed flow is submitted again"
        )));
    }
    match (phase.as_str(), outcome.as_deref()) {
        ("terminal", Some("failed" | "expired" | "cancelled")) => {}
        ("terminal", Some(other)) => {
            return Err(FfError::wrong_state(format!("execution {id} ended {other}; only failed, expired or cancelled ones can be retried")))
        }
        _ => return Ok("already_live"),
    }
    let t = exec(
        c,
        "UPDATE ff_exec_core SET lifecycle_phase = 'runnable', eligibility_state = 'eligible_now',
             public_state = 'waiting', attempt_state = 'pending_retry_attempt', terminal_outcome = NULL,
             terminal_at_ms = NULL, eligible_at_ms = 0, cancellation_reason = NULL,
             attempt_offset = CASE WHEN $2 THEN attempt_index ELSE attempt_index - max_attempts + 1 END
         WHERE execution_id = $1
         RETURNING lane_id",
        &[pg_uuid(&id.uuid).into(), reset_attempts.into()],
    )?;
    if let Some(row) = first_row(t) {
        let lane: String = col_req(&row, 1)?;
        metrics::count(c, &lane, Counter::Retried, 1)?;
        notify_lane(c, &lane)?;
    }
    Ok("requeued")
}

// ---------------------------------------------------------------------------
// Notifications
// ---------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------

/// An execution as jsonb, built in SQL: payload and result are embedded as
/// stored (no round trip through serde, so any depth and any numeric survive).
pub fn execution_info(id: &ExecutionId) -> FfResult<RawJsonb> {
    with_spi(|c| {
        let t = exec(
            c,
            "SELECT jsonb_build_object(
                 'execution_id', $3::text, 'lane_id', lane_id, 'flow_id', flow_id, 'node_name', node_name,
                 'namespace', namespace, 'priority', priority, 'required_capabilities', required_capabilities,
                 'budget_ids', budget_ids, 'budget_reserve', budget_reserve, 'quota_policy_id', quota_policy_id,
                 'unique_key', unique_key, 'lifecycle_phase', lifecycle_phase,
                 'ownership_state', ownership_state, 'eligibility_state', eligibility_state,
                 'public_state', public_state, 'attempt_state', attempt_state,
                 'terminal_outcome', terminal_outcome, 'attempt_index', attempt_index,
                 'max_attempts', max_attempts,
                 'retry_policy', jsonb_build_object('base_ms', retry_base_ms, 'max_ms', retry_max_ms, 'jitter', retry_jitter),
                 'payload', payload, 'result', result, 'last_error', last_error,
                 'cancellation_reason', cancellation_reason, 'worker_id', current_worker_id,
                 'lease_expires_at_ms', lease_expires_at_ms, 'eligible_at_ms', eligible_at_ms,
                 'created_at_ms', created_at_ms, 'started_at_ms', started_at_ms, 'terminal_at_ms', terminal_at_ms)
             FROM ff_exec_core WHERE execution_id = $1 AND partition_key = $2",
            &[pg_uuid(&id.uuid).into(), id.partition.into(), id.to_string().into()],
        )?;
        let row = first_row(t).ok_or_else(|| FfError::not_found(format!("execution {id} does not exist")))?;
        RawJsonb::from_spi(&row, 1)?.ok_or_else(|| FfError::internal("jsonb_build_object returned NULL"))
    })
}

// ---------------------------------------------------------------------------
// SQL API
// ---------------------------------------------------------------------------

fn text_list(v: Option<Vec<Option<String>>>, name: &str) -> FfResult<Vec<String>> {
    required(v, name)?.into_iter().map(|b| required(b, &format!("{name} element"))).collect()
}

/// Turns the SQL arguments shared by `ff_create_execution` and
/// `ff_create_executions` into validated options.
#[allow(clippy::too_many_arguments)]
pub fn options_from_args(
    lane_id: Option<String>,
    priority: Option<i32>,
    required_capabilities: Option<Vec<Option<String>>>,
    budget_ids: Option<Vec<Option<String>>>,
    quota_policy_id: Option<String>,
    flow_id: Option<pgrx::Uuid>,
    delay_until_ms: Option<i64>,
    max_attempts: Option<i32>,
    budget_reserve: Option<RawJsonb>,
    unique_key: Option<String>,
    retry_policy: Option<RawJsonb>,
) -> FfResult<Options> {
    Options {
        lane_id: required(lane_id, "lane_id")?,
        priority: required(priority, "priority")?,
        required_capabilities: normalize_capabilities(
            "required_capabilities",
            &required(required_capabilities, "required_capabilities")?,
        )?,
        budget_ids: text_list(budget_ids, "budget_ids")?,
        budget_reserve: match budget_reserve {
            Some(r) => parse_reserve(&r.to_value("budget_reserve")?)?,
            None => BTreeMap::new(),
        },
        quota_policy_id,
        flow_id: flow_id.as_ref().map(from_pg_uuid),
        delay_until_ms,
        max_attempts: required(max_attempts, "max_attempts")?,
        unique_key,
        retry: match retry_policy {
            Some(r) => RetryPolicy::parse(&r.to_value("retry_policy")?)?,
            None => RetryPolicy::default(),
        },
    }
    .validate()
}

/// Creates an execution on `lane_id`, claimable at once (or at
/// `delay_until_ms`). Returns its `{fp:N}:<uuid>` id; an existing
/// `execution_id`, or a live execution of the lane with the same
/// `unique_key`, is returned instead of creating another.
#[pg_extern(volatile, parallel_unsafe, security_definer, name = "ff_create_execution")]
#[search_path(@extschema@, pg_temp)]
#[allow(clippy::too_many_arguments)]
fn sql_create_execution(
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
    budget_reserve: default!(Option<RawJsonb>, "NULL"),
    unique_key: default!(Option<String>, "NULL"),
    retry_policy: default!(Option<RawJsonb>, "NULL"),
) -> String {
    (|| {
        let o = options_from_args(
            lane_id, priority, required_capabilities, budget_ids, quota_policy_id, flow_id, delay_until_ms,
            max_attempts, budget_reserve, unique_key, retry_policy,
        )?;
        with_spi(|c| {
            check_references(c, &o)?;
            let row = NewRow { options: &o, execution_id: execution_id.as_ref().map(from_pg_uuid), payload, node_name: None, member: false, blocked: false };
            let ids = create(c, &[row], None)?;
            ids.first().map(|id| id.to_string()).ok_or_else(|| FfError::internal("no execution created"))
        })
    })()
    .or_raise()
}

/// Creates one execution per payload, all with the same options, in one
/// statement; returns their ids in the order of `payloads`.
#[pg_extern(volatile, parallel_unsafe, security_definer, name = "ff_create_executions")]
#[search_path(@extschema@, pg_temp)]
#[allow(clippy::too_many_arguments)]
fn sql_create_executions(
    lane_id: Option<String>,
    payloads: Option<RawJsonbArray>,
    priority: default!(Option<i32>, 0),
    required_capabilities: default!(Option<Vec<Option<String>>>, "'{}'"),
    budget_ids: default!(Option<Vec<Option<String>>>, "'{}'"),
    quota_policy_id: default!(Option<String>, "NULL"),
    flow_id: default!(Option<pgrx::Uuid>, "NULL"),
    delay_until_ms: default!(Option<i64>, "NULL"),
    max_attempts: default!(Option<i32>, 1),
    budget_reserve: default!(Option<RawJsonb>, "NULL"),
    unique_key: default!(Option<String>, "NULL"),
    retry_policy: default!(Option<RawJsonb>, "NULL"),
) -> Vec<String> {
    (|| {
        let payloads = required(payloads, "payloads")?.elements();
        if payloads.len() > MAX_BATCH {
            return Err(FfError::invalid(format!("{} payloads given; the limit is {MAX_BATCH}", payloads.len())));
        }
        let o = options_from_args(
            lane_id, priority, required_capabilities, budget_ids, quota_policy_id, flow_id, delay_until_ms,
            max_attempts, budget_reserve, unique_key, retry_policy,
        )?;
        with_spi(|c| {
            check_references(c, &o)?;
            let rows: Vec<NewRow<'_>> = payloads
                .iter()
                .map(|p| NewRow { options: &o, execution_id: None, payload: *p, node_name: None, member: false, blocked: false })
                .collect();
            Ok(create(c, &rows, None)?.iter().map(ExecutionId::to_string).collect())
        })
    })()
    .or_raise()
}

/// State, payload, result and lease of one execution as jsonb (what a
/// worker reads after a claim). Unknown execution: P0002.
#[pg_extern(volatile, parallel_unsafe, security_definer, name = "ff_get_execution")]
#[search_path(@extschema@, pg_temp)]
fn sql_get_execution(execution_id: Option<String>) -> RawJsonb {
    (|| execution_info(&ExecutionId::parse(&required(execution_id, "execution_id")?)?))().or_raise()
}

/// Puts a failed, expired or cancelled solo execution back in the queue:
/// 'requeued', or 'already_live' when it has not ended.
#[pg_extern(volatile, parallel_unsafe, security_definer, name = "ff_retry_execution")]
#[search_path(@extschema@, pg_temp)]
fn sql_retry_execution(execution_id: Option<String>, reset_attempts: default!(Option<bool>, true)) -> &'static str {
    (|| {
        let id = ExecutionId::parse(&required(execution_id, "execution_id")?)?;
        let reset = required(reset_attempts, "reset_attempts")?;
        with_spi(|c| revive(c, &id, reset))
    })()
    .or_raise()
}

/// The NOTIFY channel announcing new eligible work on a lane (LISTEN on it).
#[pg_extern(immutable, parallel_safe, name = "ff_lane_channel")]
fn sql_lane_channel(lane_id: &str) -> String {
    lane_channel(lane_id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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

    #[test]
    fn states_map_to_flowfabric_columns_and_back() {
        for s in [
            State::Waiting,
            State::Delayed,
            State::Blocked,
            State::Active,
            State::Terminal(Outcome::Success),
            State::Terminal(Outcome::Failed),
            State::Terminal(Outcome::Cancelled),
            State::Terminal(Outcome::Skipped),
            State::Terminal(Outcome::Expired),
        ] {
            let (phase, eligibility, _) = s.columns();
            let outcome = match s {
                State::Terminal(o) => Some(o.as_str()),
                _ => None,
            };
            assert_eq!(State::from_columns(phase, eligibility, outcome), Some(s));
        }
        assert_eq!(State::Terminal(Outcome::Success).columns().2, "completed");
    }

    #[test]
    fn buckets() {
        assert_eq!(Outcome::Success.bucket(), Bucket::Success);
        assert_eq!(Outcome::Skipped.bucket(), Bucket::Skip);
        for o in [Outcome::Failed, Outcome::Cancelled, Outcome::Expired] {
            assert_eq!(o.bucket(), Bucket::Fail);
        }
        assert_eq!(Bucket::of_outcome("anything"), Bucket::Fail);
        assert!(Outcome::Expired.fails_flow() && !Outcome::Cancelled.fails_flow() && !Outcome::Skipped.fails_flow());
    }

    #[test]
    fn retry_policy_parsing_and_backoff() {
        assert_eq!(RetryPolicy::parse(&json!({})).unwrap(), RetryPolicy::default());
        let p = RetryPolicy::parse(&json!({"base_ms": 500, "max_ms": 3000, "jitter": false})).unwrap();
        assert_eq!((p.backoff_ms(2, 0.3), p.backoff_ms(3, 0.3), p.backoff_ms(4, 0.3), p.backoff_ms(9, 0.3)), (500, 1000, 2000, 3000));
        let j = RetryPolicy { jitter: true, ..p };
        assert_eq!(j.backoff_ms(3, 0.5), 500);
        assert!(j.backoff_ms(3, 0.999) < 1000);
        assert_eq!(RetryPolicy::default().ceiling_ms(200), 60_000);
        for bad in [json!([]), json!({"base_ms": 0}), json!({"max_ms": -1}), json!({"jitter": "yes"}),
                    json!({"base_ms": 5000, "max_ms": 10}), json!({"bse_ms": 5}), json!({"base_ms": 1.5})] {
            assert!(RetryPolicy::parse(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn reserves_are_positive_integers() {
        assert_eq!(parse_reserve(&json!({"tokens": 800})).unwrap().get("tokens"), Some(&800));
        for bad in [json!({"tokens": 0}), json!({"tokens": -1}), json!({"tokens": "1"}), json!([1]), json!({"": 1})] {
            assert!(parse_reserve(&bad).is_err(), "{bad}");
        }
    }
}
