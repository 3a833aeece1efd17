//! Budgets: limits per dimension, usage counters, dedup of reports, a
//! per-execution ledger of spend and reservations, admission at claim time,
//! breach events and resets. Pure evaluation logic first, then the SPI
//! operations, then the SQL-facing wrappers.
//!
//! Locks, in order (see exec.rs for the whole order): the execution row of a
//! spend, a dedup key's row, then a budget's usage rows, all of them at once
//! in ascending dimension (so a transaction that touched a budget never asks
//! for another of its rows later), then the policy row (only to count a
//! breach, and for resets). Budgets in ascending id. A claim with a
//! reservation locks the same usage rows, so reservations are exact;
//! reserved amounts are sums over ledger rows, which only the holder of
//! their execution writes, so ending a lease never waits on a budget.

use crate::db::{col, col_req, exec, first_row, now_ms, with_spi};
use crate::error::{required, FfError, FfResult, OrRaise};
use crate::exec::pg_uuid;
use crate::ids::{check_text_id, clip, crc16, ExecutionId};
use crate::jsonb::RawJsonb;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::JsonB;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;

/// Most dimensions one budget or one report may name.
pub const MAX_DIMENSIONS: usize = 256;

/// The channel budget events are announced on.
pub const EVENTS_CHANNEL: &str = "ff_budget_events";

/// Limits of a budget. A limit of 0 means none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    pub hard: BTreeMap<String, i64>,
    pub soft: BTreeMap<String, i64>,
    pub reset_interval_ms: i64,
}

impl Policy {
    pub fn hard_limit(&self, dim: &str) -> Option<i64> {
        self.hard.get(dim).copied().filter(|l| *l > 0)
    }

    pub fn soft_limit(&self, dim: &str) -> Option<i64> {
        self.soft.get(dim).copied().filter(|l| *l > 0)
    }
}

/// What a budget does about its limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mode {
    /// `strict`: admission refuses and (with `reject`) reports are refused;
    /// `advisory`: nothing is refused, breaches are still counted and announced.
    pub strict: bool,
    /// `reject` (old name `fail`): the report that would cross applies
    /// nothing; `record`: it applies in full and answers `hard_breach`.
    pub reject: bool,
    /// `notify`: soft breaches are announced too (`warn`: outcome only).
    pub notify_soft: bool,
}

impl Default for Mode {
    fn default() -> Self {
        Mode { strict: true, reject: true, notify_soft: false }
    }
}

impl Mode {
    pub fn parse(enforcement_mode: &str, on_hard_limit: &str, on_soft_limit: &str) -> FfResult<Mode> {
        let strict = match enforcement_mode {
            "strict" => true,
            "advisory" => false,
            other => {
                return Err(FfError::invalid(format!(
                    "enforcement_mode must be 'strict' or 'advisory', got \"{}\"",
                    clip(other)
                )))
            }
        };
        let reject = match on_hard_limit {
            "reject" | "fail" => true,
            "record" => false,
            other => {
                return Err(FfError::invalid(format!(
                    "on_hard_limit must be 'reject' (or its old name 'fail') or 'record', got \"{}\"",
                    clip(other)
                )))
            }
        };
        let notify_soft = match on_soft_limit {
            "warn" => false,
            "notify" => true,
            other => {
                return Err(FfError::invalid(format!("on_soft_limit must be 'warn' or 'notify', got \"{}\"", clip(other))))
            }
        };
        Ok(Mode { strict, reject, notify_soft })
    }

    pub fn enforcement_mode(&self) -> &'static str {
        if self.strict {
            "strict"
        } else {
            "advisory"
        }
    }

    pub fn on_hard_limit(&self) -> &'static str {
        if self.reject {
            "reject"
        } else {
            "record"
        }
    }

    pub fn on_soft_limit(&self) -> &'static str {
        if self.notify_soft {
            "notify"
        } else {
            "warn"
        }
    }

    /// Whether a report that would cross a hard limit is refused.
    pub fn refuses_reports(&self) -> bool {
        self.strict && self.reject
    }
}

/// Result of a usage report; also the cached dedup outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    AlreadyApplied,
    SoftBreach { dimension: String, current_usage: i64, soft_limit: i64 },
    HardBreach { dimension: String, current_usage: i64, hard_limit: i64 },
}

pub type OutcomeRow = (String, Option<String>, Option<i64>, Option<i64>);

impl Outcome {
    pub fn to_json(&self) -> Value {
        match self {
            Outcome::Ok => json!({"kind": "Ok"}),
            Outcome::AlreadyApplied => json!({"kind": "AlreadyApplied"}),
            Outcome::SoftBreach { dimension, current_usage, soft_limit } => json!({
                "kind": "SoftBreach", "dimension": dimension,
                "current_usage": current_usage, "soft_limit": soft_limit}),
            Outcome::HardBreach { dimension, current_usage, hard_limit } => json!({
                "kind": "HardBreach", "dimension": dimension,
                "current_usage": current_usage, "hard_limit": hard_limit}),
        }
    }

    /// Reads a cached outcome; the empty placeholder of a report that is
    /// still in flight (or crashed) replays as `AlreadyApplied`.
    pub fn from_json(v: &Value) -> FfResult<Outcome> {
        let field = |k: &str| v.get(k);
        let dim = || field("dimension").and_then(Value::as_str).map(str::to_string);
        let num = |k: &str| field(k).and_then(Value::as_i64);
        let corrupt = || FfError::internal(format!("corrupt cached budget outcome: {}", clip(&v.to_string())));
        match field("kind").and_then(Value::as_str) {
            None if v.as_object().is_some_and(Map::is_empty) => Ok(Outcome::AlreadyApplied),
            Some("Ok") => Ok(Outcome::Ok),
            Some("AlreadyApplied") => Ok(Outcome::AlreadyApplied),
            Some("SoftBreach") => Ok(Outcome::SoftBreach {
                dimension: dim().ok_or_else(corrupt)?,
                current_usage: num("current_usage").ok_or_else(corrupt)?,
                soft_limit: num("soft_limit").ok_or_else(corrupt)?,
            }),
            Some("HardBreach") => Ok(Outcome::HardBreach {
                dimension: dim().ok_or_else(corrupt)?,
                current_usage: num("current_usage").ok_or_else(corrupt)?,
                hard_limit: num("hard_limit").ok_or_else(corrupt)?,
            }),
            _ => Err(corrupt()),
        }
    }

    /// The `(outcome, dimension, current_usage, limit_value)` row.
    pub fn row(&self) -> OutcomeRow {
        match self {
            Outcome::Ok => ("ok".into(), None, None, None),
            Outcome::AlreadyApplied => ("already_applied".into(), None, None, None),
            Outcome::SoftBreach { dimension, current_usage, soft_limit } => {
                ("soft_breach".into(), Some(dimension.clone()), Some(*current_usage), Some(*soft_limit))
            }
            Outcome::HardBreach { dimension, current_usage, hard_limit } => {
                ("hard_breach".into(), Some(dimension.clone()), Some(*current_usage), Some(*hard_limit))
            }
        }
    }
}

/// What a report does: its outcome, and whether its increments apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub outcome: Outcome,
    pub apply: bool,
}

/// Decides a report against current usage. The first dimension by name
/// whose new value passes its hard limit is a hard breach: refused whole
/// (reporting the usage before) under `reject`, applied (reporting the new
/// usage) under `record` and on `advisory` budgets. Without a hard breach
/// everything applies and the first dimension over its soft limit is
/// reported.
pub fn evaluate(policy: &Policy, mode: Mode, current: &BTreeMap<String, i64>, deltas: &BTreeMap<String, i64>) -> FfResult<Verdict> {
    let mut new_values = BTreeMap::new();
    for (dim, delta) in deltas {
        let cur = current.get(dim).copied().unwrap_or(0);
        let new = cur.checked_add(*delta).ok_or_else(|| {
            FfError::out_of_range(format!("usage of dimension \"{}\" would overflow bigint", clip(dim)))
        })?;
        new_values.insert(dim.clone(), (cur, new));
    }
    let hard = new_values.iter().find_map(|(dim, (cur, new))| {
        let limit = policy.hard_limit(dim).filter(|l| new > l)?;
        Some((dim, *cur, *new, limit))
    });
    if let Some((dim, cur, new, limit)) = hard {
        // Under `record` every report is booked (it is spend that happened),
        // so `hard_breach` always means booked there and refused under
        // `reject`; admission stops at the limit, so only executions already
        // running can add more, one report each before they stop.
        let refuse = mode.refuses_reports();
        let usage = if refuse { cur } else { new };
        let outcome = Outcome::HardBreach { dimension: dim.clone(), current_usage: usage, hard_limit: limit };
        return Ok(Verdict { outcome, apply: !refuse });
    }
    let soft = new_values.iter().find_map(|(dim, (_, new))| {
        let limit = policy.soft_limit(dim).filter(|l| new > l)?;
        Some(Outcome::SoftBreach { dimension: dim.clone(), current_usage: *new, soft_limit: limit })
    });
    Ok(Verdict { outcome: soft.unwrap_or(Outcome::Ok), apply: true })
}

/// One hard-limited dimension of a strict budget as a claim sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Headroom {
    pub budget_id: String,
    pub dimension: String,
    pub usage: i64,
    pub reserved: i64,
    pub hard_limit: i64,
}

/// Why admission refuses an execution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The budget has no headroom left: nothing naming it can be admitted.
    Exhausted(String),
    /// Only this execution's reserve does not fit; a smaller one may.
    ReserveTooBig(String),
}

/// Claim-time admission: every hard-limited dimension must fit
/// `usage + reserved + reserve <= hard`; a dimension the execution reserves
/// nothing of needs `usage + reserved < hard`. Returns the first refusal.
pub fn refusal(dims: &[Headroom], reserve: &BTreeMap<String, i64>) -> Option<Refusal> {
    dims.iter().find_map(|d| {
        let taken = d.usage.saturating_add(d.reserved);
        if taken >= d.hard_limit {
            return Some(Refusal::Exhausted(d.budget_id.clone()));
        }
        let r = reserve.get(&d.dimension)?;
        (taken.saturating_add(*r) > d.hard_limit).then(|| Refusal::ReserveTooBig(d.budget_id.clone()))
    })
}

/// Parses `{"dim": n, ...}` with non-negative integer values.
pub fn parse_dimensions(v: &Value) -> FfResult<BTreeMap<String, i64>> {
    let obj = v.as_object().ok_or_else(|| {
        FfError::invalid(format!("dimensions must be a JSON object of non-negative integers, got {}", clip(&v.to_string())))
    })?;
    if obj.len() > MAX_DIMENSIONS {
        return Err(FfError::invalid(format!("{} dimensions given; the limit is {MAX_DIMENSIONS}", obj.len())));
    }
    obj.iter()
        .map(|(dim, n)| {
            check_text_id("dimension name", dim)?;
            let value = n.as_i64().filter(|x| *x >= 0).ok_or_else(|| {
                FfError::invalid(format!(
                    "dimension \"{}\" has value {}; expected a non-negative integer",
                    clip(dim),
                    clip(&n.to_string())
                ))
            })?;
            Ok((dim.clone(), value))
        })
        .collect()
}

/// Folds parallel `dimensions[]` / `deltas[]` arrays into a map.
pub fn zip_dimensions(dims: &[Option<String>], deltas: &[Option<i64>]) -> FfResult<BTreeMap<String, i64>> {
    if dims.len() != deltas.len() {
        return Err(FfError::invalid(format!(
            "dimensions has {} elements but deltas has {}",
            dims.len(),
            deltas.len()
        )));
    }
    let mut map = serde_json::Map::new();
    for (d, n) in dims.iter().zip(deltas) {
        let d = required(d.clone(), "dimensions element")?;
        let n = required(*n, "deltas element")?;
        if map.insert(d.clone(), json!(n)).is_some() {
            return Err(FfError::invalid(format!("dimension \"{}\" is listed twice", clip(&d))));
        }
    }
    parse_dimensions(&Value::Object(map))
}

/// Everything `ff_create_budget` accepts, validated.
#[derive(Debug, Clone)]
pub struct NewBudget {
    pub budget_id: String,
    pub policy: Policy,
    pub scope_type: String,
    pub scope_id: String,
    pub mode: Mode,
}

impl NewBudget {
    #[allow(clippy::too_many_arguments)]
    pub fn validate(
        budget_id: &str,
        dimensions: &[Option<String>],
        hard_limits: &[Option<i64>],
        soft_limits: &[Option<i64>],
        reset_interval_ms: i64,
        scope_type: &str,
        scope_id: &str,
        enforcement_mode: &str,
        on_hard_limit: &str,
        on_soft_limit: &str,
    ) -> FfResult<NewBudget> {
        check_text_id("budget_id", budget_id)?;
        if dimensions.len() != hard_limits.len() || dimensions.len() != soft_limits.len() {
            return Err(FfError::invalid(format!(
                "dimensions, hard_limits and soft_limits must have equal lengths (got {}, {}, {})",
                dimensions.len(),
                hard_limits.len(),
                soft_limits.len()
            )));
        }
        if dimensions.len() > MAX_DIMENSIONS {
            return Err(FfError::invalid(format!("{} dimensions given; the limit is {MAX_DIMENSIONS}", dimensions.len())));
        }
        if reset_interval_ms < 0 {
            return Err(FfError::invalid(format!("reset_interval_ms must be >= 0, got {reset_interval_ms}")));
        }
        let mut policy = Policy { reset_interval_ms, ..Policy::default() };
        for ((dim, hard), soft) in dimensions.iter().zip(hard_limits).zip(soft_limits) {
            let dim = check_text_id("dimension name", required(dim.as_deref(), "dimensions element")?)?;
            let hard = non_negative(dim, "hard limit", required(*hard, "hard_limits element")?)?;
            let soft = non_negative(dim, "soft limit", required(*soft, "soft_limits element")?)?;
            if policy.hard.insert(dim.to_string(), hard).is_some() {
                return Err(FfError::invalid(format!("dimension \"{}\" is listed twice", clip(dim))));
            }
            policy.soft.insert(dim.to_string(), soft);
        }
        for (name, value) in [("scope_type", scope_type), ("scope_id", scope_id)] {
            if value.len() > crate::ids::MAX_ID_BYTES {
                return Err(FfError::invalid(format!("{name} is longer than {} bytes", crate::ids::MAX_ID_BYTES)));
            }
        }
        Ok(NewBudget {
            budget_id: budget_id.to_string(),
            policy,
            scope_type: scope_type.to_string(),
            scope_id: scope_id.to_string(),
            mode: Mode::parse(enforcement_mode, on_hard_limit, on_soft_limit)?,
        })
    }

    /// FlowFabric's policy JSON.
    pub fn policy_json(&self) -> Value {
        json!({
            "hard_limits": self.policy.hard,
            "soft_limits": self.policy.soft,
            "reset_interval_ms": self.policy.reset_interval_ms,
            "on_hard_limit": self.mode.on_hard_limit(),
            "on_soft_limit": self.mode.on_soft_limit(),
        })
    }
}

fn non_negative(dim: &str, what: &str, v: i64) -> FfResult<i64> {
    if v < 0 {
        Err(FfError::invalid(format!("{what} of dimension \"{}\" must be >= 0, got {v}", clip(dim))))
    } else {
        Ok(v)
    }
}

fn budget_missing(budget_id: &str) -> FfError {
    FfError::not_found(format!("budget \"{}\" does not exist", clip(budget_id)))
}

// ---------------------------------------------------------------------------
// SPI operations
// ---------------------------------------------------------------------------

pub fn create_budget(b: &NewBudget) -> FfResult<&'static str> {
    with_spi(|c| {
        let now = now_ms();
        let next_reset = (b.policy.reset_interval_ms > 0).then(|| now.saturating_add(b.policy.reset_interval_ms));
        let dims: Vec<String> = b.policy.hard.keys().cloned().collect();
        let hard: Vec<i64> = b.policy.hard.values().copied().collect();
        let soft: Vec<i64> = dims.iter().map(|d| b.policy.soft.get(d).copied().unwrap_or(0)).collect();
        let t = exec(
            c,
            "WITH p AS (
                 INSERT INTO ff_budget_policy (budget_id, partition_key, policy_json, scope_type, scope_id,
                     enforcement_mode, on_hard_limit, on_soft_limit, next_reset_at_ms, created_at_ms, updated_at_ms)
                 VALUES ($1, ($2 % (SELECT num_budget_partitions FROM ff_partition_config))::smallint,
                         $3, $4, $5, $6, $7, $8, $9, $10, $10)
                 ON CONFLICT (budget_id) DO NOTHING RETURNING budget_id, partition_key),
             u AS (
                 INSERT INTO ff_budget_usage (budget_id, dimensions_key, partition_key, hard_limit, soft_limit,
                     updated_at_ms)
                 SELECT p.budget_id, d.k, p.partition_key, d.hard, d.soft, $10
                 FROM p, unnest($11::text[], $12::bigint[], $13::bigint[]) AS d(k, hard, soft))
             SELECT count(*) FROM p",
            &[
                b.budget_id.as_str().into(),
                i32::from(crc16(b.budget_id.as_bytes())).into(),
                JsonB(b.policy_json()).into(),
                b.scope_type.as_str().into(),
                b.scope_id.as_str().into(),
                b.mode.enforcement_mode().into(),
                b.mode.on_hard_limit().into(),
                b.mode.on_soft_limit().into(),
                next_reset.into(),
                now.into(),
                dims.into(),
                hard.into(),
                soft.into(),
            ],
        )?;
        let created: i64 = first_row(t).map(|r| col_req(&r, 1)).transpose()?.unwrap_or(0);
        Ok(if created > 0 { "created" } else { "already_satisfied" })
    })
}

/// How a report treats a dedup key it has seen before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replay {
    /// `ff_report_usage`: answer with the outcome cached by the first call.
    CachedOutcome,
    /// `ff_record_spend`: answer `already_applied`.
    AlreadyApplied,
}

/// One usage report. With `spend`, the execution must be active and name
/// the budget; the deltas are booked to its ledger and eat into its
/// reservation. A budget that does not exist is P0002 and nothing is written.
pub fn report_usage(
    budget_id: &str,
    deltas: &BTreeMap<String, i64>,
    dedup_key: Option<&str>,
    replay: Replay,
    spend: Option<&ExecutionId>,
) -> FfResult<Outcome> {
    check_text_id("budget_id", budget_id)?;
    let dedup_key = dedup_key.filter(|k| !k.is_empty());
    if let Some(k) = dedup_key {
        check_text_id("dedup_key", k)?;
    }
    with_spi(|c| {
        let now = now_ms();
        if let Some(id) = spend {
            if read_policy(c, budget_id)?.is_none() {
                return Err(budget_missing(budget_id));
            }
            bind_spend(c, id, budget_id)?;
        }
        if let Some(key) = dedup_key {
            if let Some(seen) = claim_dedup_key(c, budget_id, key, now)? {
                return match replay {
                    Replay::CachedOutcome => Outcome::from_json(&seen),
                    Replay::AlreadyApplied => Ok(Outcome::AlreadyApplied),
                };
            }
        }
        if deltas.len() == 1 && apply_within_limits(c, budget_id, deltas, spend, dedup_key, now)? {
            return Ok(Outcome::Ok);
        }
        report_slow(c, budget_id, deltas, spend, dedup_key, now)
    })
}

/// `ff_record_spend` touches only what its caller holds: the execution must
/// exist, be leased, and name the budget. Locks the execution row (lock
/// order 1), as every writer of its ledger does.
fn bind_spend(c: &mut SpiClient<'_>, id: &ExecutionId, budget_id: &str) -> FfResult<()> {
    let t = exec(
        c,
        "SELECT lifecycle_phase, $3 = ANY (budget_ids) FROM ff_exec_core
         WHERE execution_id = $1 AND partition_key = $2 FOR NO KEY UPDATE",
        &[pg_uuid(&id.uuid).into(), id.partition.into(), budget_id.into()],
    )?;
    let row = first_row(t).ok_or_else(|| FfError::not_found(format!("execution {id} does not exist")))?;
    let phase: String = col_req(&row, 1)?;
    if phase != "active" {
        return Err(FfError::wrong_state(format!("execution {id} is {phase}; spend is recorded only while it is leased")));
    }
    if !col::<bool>(&row, 2)?.unwrap_or(false) {
        return Err(FfError::invalid(format!("execution {id} does not name budget \"{}\" in its budget_ids", clip(budget_id))));
    }
    Ok(())
}

/// The common report in one statement: a budget with one dimension whose
/// new value stays within both limits. Books the ledger and the dedup outcome alongside.
/// False sends the caller down the general path (a breach, a dimension
/// without a usage row yet, an unknown budget).
fn apply_within_limits(
    c: &mut SpiClient<'_>,
    budget_id: &str,
    deltas: &BTreeMap<String, i64>,
    spend: Option<&ExecutionId>,
    dedup_key: Option<&str>,
    now: i64,
) -> FfResult<bool> {
    let Some((dim, delta)) = deltas.iter().next() else { return Ok(false) };
    let t = exec(
        c,
        "WITH u AS (
             UPDATE ff_budget_usage SET current_value = current_value + $3, updated_at_ms = $4
             WHERE budget_id = $1 AND dimensions_key = $2
               AND current_value <= 9223372036854775807 - $3
               AND (hard_limit = 0 OR current_value + $3 <= hard_limit)
               AND (soft_limit = 0 OR current_value + $3 <= soft_limit)
               -- Only for a budget with this one row: locking it is locking all its rows.
               AND NOT EXISTS (SELECT 1 FROM ff_budget_usage o WHERE o.budget_id = $1 AND o.dimensions_key <> $2)
             RETURNING partition_key),
         l AS (
             INSERT INTO ff_budget_usage_by_exec AS l (budget_id, execution_id, dimensions_key, partition_key,
                 delta_total, updated_at_ms)
             SELECT $1, $5, $2, u.partition_key, $3, $4 FROM u WHERE $5::uuid IS NOT NULL
             ON CONFLICT (budget_id, execution_id, dimensions_key) DO UPDATE
                 SET delta_total = l.delta_total + EXCLUDED.delta_total,
                     reserved = greatest(0, l.reserved - EXCLUDED.delta_total),
                     updated_at_ms = EXCLUDED.updated_at_ms),
         d AS (
             UPDATE ff_budget_usage_dedup SET outcome_json = '{\"kind\": \"Ok\"}'
             WHERE $6::text IS NOT NULL AND budget_id = $1 AND dedup_key = $6 AND EXISTS (SELECT FROM u))
         SELECT count(*) FROM u",
        &[
            budget_id.into(),
            dim.as_str().into(),
            (*delta).into(),
            now.into(),
            spend.map(|id| pg_uuid(&id.uuid)).into(),
            dedup_key.into(),
        ],
    )?;
    Ok(first_row(t).map(|r| col::<i64>(&r, 1)).transpose()?.flatten().unwrap_or(0) == 1)
}

/// The general report: usage rows locked in name order, the whole report
/// decided in Rust, then applied, counted and announced.
fn report_slow(
    c: &mut SpiClient<'_>,
    budget_id: &str,
    deltas: &BTreeMap<String, i64>,
    spend: Option<&ExecutionId>,
    dedup_key: Option<&str>,
    now: i64,
) -> FfResult<Outcome> {
    let (policy, mode) = read_policy(c, budget_id)?.ok_or_else(|| budget_missing(budget_id))?;
    let current = lock_usage(c, budget_id, deltas, now)?;
    let verdict = evaluate(&policy, mode, &current, deltas)?;
    if verdict.apply {
        apply_increments(c, budget_id, deltas, spend, now)?;
    }
    match &verdict.outcome {
        Outcome::HardBreach { dimension, current_usage, hard_limit } => {
            count_breach(c, budget_id, "hard_breach", dimension, now)?;
            announce(c, budget_id, "hard_breach", Some(dimension), *current_usage, Some(*hard_limit))?;
        }
        Outcome::SoftBreach { dimension, current_usage, soft_limit } => {
            count_breach(c, budget_id, "soft_breach", dimension, now)?;
            if mode.notify_soft {
                announce(c, budget_id, "soft_breach", Some(dimension), *current_usage, Some(*soft_limit))?;
            }
        }
        _ => {}
    }
    if let Some(key) = dedup_key {
        exec(
            c,
            "UPDATE ff_budget_usage_dedup SET outcome_json = $3 WHERE budget_id = $1 AND dedup_key = $2",
            &[budget_id.into(), key.into(), JsonB(verdict.outcome.to_json()).into()],
        )?;
    }
    Ok(verdict.outcome)
}

/// Limits and mode of a budget (no lock: they never change).
fn read_policy(c: &mut SpiClient<'_>, budget_id: &str) -> FfResult<Option<(Policy, Mode)>> {
    let t = exec(
        c,
        "SELECT p.enforcement_mode, p.on_hard_limit, p.on_soft_limit,
                (p.policy_json ->> 'reset_interval_ms')::bigint,
                coalesce(array_agg(u.dimensions_key) FILTER (WHERE u.hard_limit > 0 OR u.soft_limit > 0), '{}'),
                coalesce(array_agg(u.hard_limit) FILTER (WHERE u.hard_limit > 0 OR u.soft_limit > 0), '{}'),
                coalesce(array_agg(u.soft_limit) FILTER (WHERE u.hard_limit > 0 OR u.soft_limit > 0), '{}')
         FROM ff_budget_policy p LEFT JOIN ff_budget_usage u ON u.budget_id = p.budget_id
         WHERE p.budget_id = $1
         GROUP BY p.budget_id",
        &[budget_id.into()],
    )?;
    let Some(row) = first_row(t) else { return Ok(None) };
    let mode = Mode::parse(&col_req::<String>(&row, 1)?, &col_req::<String>(&row, 2)?, &col_req::<String>(&row, 3)?)?;
    let dims: Vec<String> = col(&row, 5)?.unwrap_or_default();
    let hard: Vec<i64> = col(&row, 6)?.unwrap_or_default();
    let soft: Vec<i64> = col(&row, 7)?.unwrap_or_default();
    let policy = Policy {
        hard: dims.iter().cloned().zip(hard).collect(),
        soft: dims.into_iter().zip(soft).collect(),
        reset_interval_ms: col(&row, 4)?.unwrap_or(0),
    };
    Ok(Some((policy, mode)))
}

/// Claims a dedup key. Returns `None` when this call owns it (first use, or
/// the old entry expired) and the cached outcome when it was seen before.
/// A concurrent first use of the same key blocks here until it commits.
fn claim_dedup_key(c: &mut SpiClient<'_>, budget_id: &str, key: &str, now: i64) -> FfResult<Option<Value>> {
    let claimed = exec(
        c,
        "INSERT INTO ff_budget_usage_dedup AS d (budget_id, dedup_key, partition_key, outcome_json,
             applied_at_ms, expires_at_ms)
         SELECT $1, $2, p.partition_key, '{}', $3, $4 FROM ff_budget_policy p WHERE p.budget_id = $1
         ON CONFLICT (budget_id, dedup_key) DO UPDATE
             SET outcome_json = '{}', applied_at_ms = EXCLUDED.applied_at_ms,
                 expires_at_ms = EXCLUDED.expires_at_ms
             WHERE d.expires_at_ms <= EXCLUDED.applied_at_ms
         RETURNING 1",
        &[budget_id.into(), key.into(), now.into(), (now + crate::guc::dedup_ttl_ms()).into()],
    )?;
    if !claimed.is_empty() {
        return Ok(None);
    }
    let t = exec(
        c,
        "SELECT outcome_json FROM ff_budget_usage_dedup WHERE budget_id = $1 AND dedup_key = $2",
        &[budget_id.into(), key.into()],
    )?;
    match first_row(t) {
        Some(row) => Ok(Some(col::<JsonB>(&row, 1)?.map(|j| j.0).unwrap_or_else(|| json!({})))),
        // Nothing inserted and nothing there: the budget does not exist.
        None => Err(budget_missing(budget_id)),
    }
}

/// Makes sure a usage row exists per reported dimension, locks all the
/// budget's rows in name order and returns the reported ones' values.
fn lock_usage(c: &mut SpiClient<'_>, budget_id: &str, deltas: &BTreeMap<String, i64>, now: i64) -> FfResult<BTreeMap<String, i64>> {
    let dims: Vec<String> = deltas.keys().cloned().collect();
    exec(
        c,
        "INSERT INTO ff_budget_usage (budget_id, dimensions_key, partition_key, updated_at_ms)
         SELECT $1, k, p.partition_key, $3 FROM ff_budget_policy p, unnest($2::text[]) AS k
         WHERE p.budget_id = $1
         ON CONFLICT (budget_id, dimensions_key) DO NOTHING",
        &[budget_id.into(), dims.clone().into(), now.into()],
    )?;
    // All of the budget's rows, in order: see the module's lock order.
    let t = exec(
        c,
        "SELECT dimensions_key, current_value FROM ff_budget_usage WHERE budget_id = $1
         ORDER BY dimensions_key FOR UPDATE",
        &[budget_id.into()],
    )?;
    let mut usage = BTreeMap::new();
    for row in t {
        let dim = row.get::<String>(1)?.unwrap_or_default();
        if deltas.contains_key(&dim) {
            usage.insert(dim, row.get::<i64>(2)?.unwrap_or(0));
        }
    }
    Ok(usage)
}

fn apply_increments(c: &mut SpiClient<'_>, budget_id: &str, deltas: &BTreeMap<String, i64>, spend: Option<&ExecutionId>, now: i64) -> FfResult<()> {
    let (dims, values): (Vec<String>, Vec<i64>) = deltas.iter().map(|(k, v)| (k.clone(), *v)).unzip();
    exec(
        c,
        "WITH u AS (
             UPDATE ff_budget_usage u SET current_value = u.current_value + d.delta, updated_at_ms = $4
             FROM unnest($2::text[], $3::bigint[]) AS d(k, delta)
             WHERE u.budget_id = $1 AND u.dimensions_key = d.k
             RETURNING u.dimensions_key, u.partition_key, d.delta)
         INSERT INTO ff_budget_usage_by_exec AS l (budget_id, execution_id, dimensions_key, partition_key,
             delta_total, updated_at_ms)
         SELECT $1, $5, u.dimensions_key, u.partition_key, u.delta, $4 FROM u WHERE $5::uuid IS NOT NULL
         ON CONFLICT (budget_id, execution_id, dimensions_key) DO UPDATE
             SET delta_total = l.delta_total + EXCLUDED.delta_total,
                 reserved = greatest(0, l.reserved - EXCLUDED.delta_total),
                 updated_at_ms = EXCLUDED.updated_at_ms",
        &[budget_id.into(), dims.into(), values.into(), now.into(), spend.map(|id| pg_uuid(&id.uuid)).into()],
    )?;
    Ok(())
}

/// Counts a breach on the policy row (after the usage rows, in lock order).
fn count_breach(c: &mut SpiClient<'_>, budget_id: &str, kind: &str, dimension: &str, now: i64) -> FfResult<()> {
    exec(
        c,
        "UPDATE ff_budget_policy SET
             breach_count = breach_count + (CASE WHEN $2 = 'hard_breach' THEN 1 ELSE 0 END),
             soft_breach_count = soft_breach_count + (CASE WHEN $2 = 'soft_breach' THEN 1 ELSE 0 END),
             last_breach_at_ms = CASE WHEN $2 = 'hard_breach' THEN $4 ELSE last_breach_at_ms END,
             last_breach_dim = CASE WHEN $2 = 'hard_breach' THEN $3 ELSE last_breach_dim END,
             updated_at_ms = $4
         WHERE budget_id = $1",
        &[budget_id.into(), kind.into(), dimension.into(), now.into()],
    )?;
    Ok(())
}

/// `NOTIFY ff_budget_events` with `{"budget_id","event","dimension","usage","limit"}`,
/// delivered when the caller commits.
pub fn announce(c: &mut SpiClient<'_>, budget_id: &str, event: &str, dimension: Option<&str>, usage: i64, limit: Option<i64>) -> FfResult<()> {
    let payload = json!({"budget_id": budget_id, "event": event, "dimension": dimension, "usage": usage, "limit": limit});
    exec(c, "SELECT pg_notify($1, $2)", &[EVENTS_CHANNEL.into(), payload.to_string().into()])?;
    Ok(())
}

/// How a lock that another transaction holds is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockWait {
    Wait,
    /// Treat a row held elsewhere as unavailable (reconcilers; a claim that
    /// already holds resource locks for an earlier candidate).
    Skip,
}

/// Zeroes the usage of a budget, clears the last breach and schedules the
/// next reset, announcing it. `only_if_due` is the reconciler's guard
/// against racing a manual reset. Returns the next reset time (0 when
/// none), or `None` when nothing was reset (not due, or, with
/// `LockWait::Skip`, rows held elsewhere).
pub fn reset_budget_in(c: &mut SpiClient<'_>, budget_id: &str, only_if_due: bool, wait: LockWait) -> FfResult<Option<i64>> {
    let now = now_ms();
    let lock_usage = match wait {
        LockWait::Wait => "SELECT count(*) FROM (SELECT 1 FROM ff_budget_usage WHERE budget_id = $1
                           ORDER BY dimensions_key FOR UPDATE) l",
        LockWait::Skip => "SELECT count(*) FROM (SELECT 1 FROM ff_budget_usage WHERE budget_id = $1
                           ORDER BY dimensions_key FOR UPDATE SKIP LOCKED) l",
    };
    let lock_policy = match wait {
        LockWait::Wait => "SELECT policy_json, next_reset_at_ms, (SELECT count(*) FROM ff_budget_usage u WHERE u.budget_id = $1)
                           FROM ff_budget_policy WHERE budget_id = $1 FOR NO KEY UPDATE",
        LockWait::Skip => "SELECT policy_json, next_reset_at_ms, (SELECT count(*) FROM ff_budget_usage u WHERE u.budget_id = $1)
                           FROM ff_budget_policy WHERE budget_id = $1 FOR NO KEY UPDATE SKIP LOCKED",
    };
    let locked: i64 = first_row(exec(c, lock_usage, &[budget_id.into()])?).map(|r| col_req(&r, 1)).transpose()?.unwrap_or(0);
    let Some(row) = first_row(exec(c, lock_policy, &[budget_id.into()])?) else {
        return match wait {
            LockWait::Wait => Err(budget_missing(budget_id)),
            LockWait::Skip => Ok(None),
        };
    };
    let total: i64 = col_req(&row, 3)?;
    if locked < total {
        return Ok(None); // a report holds one of its rows; the next pass resets it
    }
    let interval = col_req::<JsonB>(&row, 1)?.0.get("reset_interval_ms").and_then(Value::as_i64).unwrap_or(0);
    let due_at: Option<i64> = col(&row, 2)?;
    if only_if_due && !due_at.is_some_and(|at| at <= now) {
        return Ok(None);
    }
    let next = (interval > 0).then(|| now.saturating_add(interval));
    exec(
        c,
        "WITH u AS (UPDATE ff_budget_usage SET current_value = 0, last_reset_at_ms = $2, updated_at_ms = $2
                    WHERE budget_id = $1)
         UPDATE ff_budget_policy SET last_breach_at_ms = NULL, last_breach_dim = NULL,
             next_reset_at_ms = $3, updated_at_ms = $2
         WHERE budget_id = $1",
        &[budget_id.into(), now.into(), next.into()],
    )?;
    announce(c, budget_id, "reset", None, 0, None)?;
    Ok(Some(next.unwrap_or(0)))
}

pub fn reset_budget(budget_id: &str) -> FfResult<i64> {
    check_text_id("budget_id", budget_id)?;
    with_spi(|c| Ok(reset_budget_in(c, budget_id, false, LockWait::Wait)?.unwrap_or(0)))
}

/// Hands back what one execution spent (clamped at zero) and forgets it.
/// Locks in order: the execution (when it still exists), then usage rows.
pub fn release_budget(budget_id: &str, exec_id: &ExecutionId) -> FfResult<()> {
    check_text_id("budget_id", budget_id)?;
    with_spi(|c| {
        let now = now_ms();
        if read_policy(c, budget_id)?.is_none() {
            return Err(budget_missing(budget_id));
        }
        let uuid = pg_uuid(&exec_id.uuid);
        exec(c, "SELECT 1 FROM ff_exec_core WHERE execution_id = $1 FOR NO KEY UPDATE", &[uuid.into()])?;
        exec(
            c,
            "SELECT 1 FROM ff_budget_usage WHERE budget_id = $1 ORDER BY dimensions_key FOR UPDATE",
            &[budget_id.into()],
        )?;
        exec(
            c,
            "WITH released AS (
                 DELETE FROM ff_budget_usage_by_exec
                 WHERE budget_id = $1 AND execution_id = $2
                 RETURNING dimensions_key, delta_total)
             UPDATE ff_budget_usage u
                SET current_value = GREATEST(0, u.current_value - r.delta_total), updated_at_ms = $3
               FROM released r
              WHERE u.budget_id = $1 AND u.dimensions_key = r.dimensions_key",
            &[budget_id.into(), uuid.into(), now.into()],
        )?;
        Ok(())
    })
}

pub fn budget_status(budget_id: &str) -> FfResult<RawJsonb> {
    check_text_id("budget_id", budget_id)?;
    with_spi(|c| {
        let t = exec(
            c,
            "SELECT jsonb_build_object(
                 'budget_id', p.budget_id, 'scope_type', p.scope_type, 'scope_id', p.scope_id,
                 'enforcement_mode', p.enforcement_mode, 'on_hard_limit', p.on_hard_limit,
                 'on_soft_limit', p.on_soft_limit,
                 'usage', coalesce((SELECT jsonb_object_agg(u.dimensions_key, u.current_value)
                                    FROM ff_budget_usage u WHERE u.budget_id = p.budget_id), '{}'),
                 'reserved', coalesce((SELECT jsonb_object_agg(r.dimensions_key, r.total) FROM (
                                           SELECT l.dimensions_key, sum(l.reserved) AS total
                                           FROM ff_budget_usage_by_exec l
                                           WHERE l.budget_id = p.budget_id AND l.reserved > 0
                                           GROUP BY l.dimensions_key) r), '{}'),
                 'hard_limits', coalesce(p.policy_json -> 'hard_limits', '{}'),
                 'soft_limits', coalesce(p.policy_json -> 'soft_limits', '{}'),
                 'breach_count', p.breach_count, 'soft_breach_count', p.soft_breach_count,
                 'last_breach_at', p.last_breach_at_ms::text, 'last_breach_dim', p.last_breach_dim,
                 'next_reset_at', p.next_reset_at_ms::text, 'created_at', p.created_at_ms::text)
             FROM ff_budget_policy p WHERE p.budget_id = $1",
            &[budget_id.into()],
        )?;
        let row = first_row(t).ok_or_else(|| budget_missing(budget_id))?;
        RawJsonb::from_spi(&row, 1)?.ok_or_else(|| FfError::internal("jsonb_build_object returned NULL"))
    })
}

/// Claim-time admission of one execution under the strict budgets it names
/// (`budget_ids` sorted). Without a reservation it reads committed usage
/// and reservations without locking, so claims never queue behind reports.
/// With one, it locks the hard-limited usage rows (ascending) so concurrent
/// reservations are exact, and books the reservation to the execution's
/// ledger. Returns the first budget that refuses, `Ok(None)` when admitted.
pub fn admit(
    c: &mut SpiClient<'_>,
    budget_ids: &[String],
    reserve: &BTreeMap<String, i64>,
    execution: &pgrx::Uuid,
    wait: LockWait,
    now: i64,
) -> FfResult<Result<(), Refusal>> {
    if budget_ids.is_empty() {
        return Ok(Ok(()));
    }
    if !reserve.is_empty() {
        let lock = match wait {
            LockWait::Wait => LOCK_HARD_LIMITED,
            LockWait::Skip => LOCK_HARD_LIMITED_SKIP,
        };
        let t = exec(c, lock, &[budget_ids.to_vec().into()])?;
        let locked: i64 = first_row(t).map(|r| col_req(&r, 1)).transpose()?.unwrap_or(0);
        let t = exec(c, COUNT_HARD_LIMITED, &[budget_ids.to_vec().into()])?;
        let total: i64 = first_row(t).map(|r| col_req(&r, 1)).transpose()?.unwrap_or(0);
        if locked < total {
            // Held elsewhere and we may not wait: try this one again later.
            return Ok(Err(Refusal::ReserveTooBig(budget_ids[0].clone())));
        }
    }
    let t = exec(
        c,
        "SELECT u.budget_id, u.dimensions_key, u.current_value, u.hard_limit,
                coalesce((SELECT sum(l.reserved) FROM ff_budget_usage_by_exec l
                          WHERE l.budget_id = u.budget_id AND l.dimensions_key = u.dimensions_key
                            AND l.reserved > 0), 0)::bigint
         FROM ff_budget_usage u JOIN ff_budget_policy p ON p.budget_id = u.budget_id
         WHERE u.budget_id = ANY($1) AND p.enforcement_mode = 'strict' AND u.hard_limit > 0
         ORDER BY u.budget_id, u.dimensions_key",
        &[budget_ids.to_vec().into()],
    )?;
    let mut dims = Vec::new();
    for row in t {
        dims.push(Headroom {
            budget_id: row.get(1)?.unwrap_or_default(),
            dimension: row.get(2)?.unwrap_or_default(),
            usage: row.get(3)?.unwrap_or(0),
            hard_limit: row.get(4)?.unwrap_or(0),
            reserved: row.get(5)?.unwrap_or(0),
        });
    }
    if let Some(refused) = refusal(&dims, reserve) {
        return Ok(Err(refused));
    }
    let held: Vec<&Headroom> = dims.iter().filter(|d| reserve.contains_key(&d.dimension)).collect();
    if !held.is_empty() {
        let budgets: Vec<String> = held.iter().map(|d| d.budget_id.clone()).collect();
        let dimensions: Vec<String> = held.iter().map(|d| d.dimension.clone()).collect();
        let amounts: Vec<i64> = held.iter().map(|d| reserve[&d.dimension]).collect();
        exec(
            c,
            "INSERT INTO ff_budget_usage_by_exec AS l (budget_id, execution_id, dimensions_key, partition_key,
                 reserved, updated_at_ms)
             SELECT r.b, $4, r.d, u.partition_key, r.amount, $5
             FROM unnest($1::text[], $2::text[], $3::bigint[]) AS r(b, d, amount)
             JOIN ff_budget_usage u ON u.budget_id = r.b AND u.dimensions_key = r.d
             ON CONFLICT (budget_id, execution_id, dimensions_key) DO UPDATE
                 SET reserved = EXCLUDED.reserved, updated_at_ms = EXCLUDED.updated_at_ms",
            &[budgets.into(), dimensions.into(), amounts.into(), (*execution).into(), now.into()],
        )?;
    }
    Ok(Ok(()))
}

// The rows of the strict budgets a reservation is checked against: all of
// each budget's rows, in lock order.
const LOCK_HARD_LIMITED: &str = "SELECT count(*) FROM (
    SELECT 1 FROM ff_budget_usage u JOIN ff_budget_policy p ON p.budget_id = u.budget_id
    WHERE u.budget_id = ANY($1) AND p.enforcement_mode = 'strict'
    ORDER BY u.budget_id, u.dimensions_key FOR UPDATE OF u) l";
const LOCK_HARD_LIMITED_SKIP: &str = "SELECT count(*) FROM (
    SELECT 1 FROM ff_budget_usage u JOIN ff_budget_policy p ON p.budget_id = u.budget_id
    WHERE u.budget_id = ANY($1) AND p.enforcement_mode = 'strict'
    ORDER BY u.budget_id, u.dimensions_key FOR UPDATE OF u SKIP LOCKED) l";
const COUNT_HARD_LIMITED: &str = "SELECT count(*) FROM ff_budget_usage u JOIN ff_budget_policy p ON p.budget_id = u.budget_id
    WHERE u.budget_id = ANY($1) AND p.enforcement_mode = 'strict'";

// ---------------------------------------------------------------------------
// SQL API
// ---------------------------------------------------------------------------

// pgrx reads the column names from each signature, so the row type is
// spelled out in full on every function that returns it.
fn outcome_table(o: FfResult<Outcome>) -> TableIterator<'static, OutcomeRow> {
    TableIterator::once(o.or_raise().row())
}

/// Creates a budget with per-dimension hard and soft limits (0 = no limit).
/// Idempotent: returns 'created' or 'already_satisfied'.
#[pg_extern(volatile, parallel_unsafe, security_definer, name = "ff_create_budget")]
#[search_path(@extschema@, pg_temp)]
#[allow(clippy::too_many_arguments)]
fn sql_create_budget(
    budget_id: Option<String>,
    dimensions: Option<Vec<Option<String>>>,
    hard_limits: Option<Vec<Option<i64>>>,
    soft_limits: Option<Vec<Option<i64>>>,
    reset_interval_ms: default!(Option<i64>, 0),
    scope_type: default!(Option<String>, "''"),
    scope_id: default!(Option<String>, "''"),
    enforcement_mode: default!(Option<String>, "'strict'"),
    on_hard_limit: default!(Option<String>, "'reject'"),
    on_soft_limit: default!(Option<String>, "'warn'"),
) -> &'static str {
    let run = || -> FfResult<&'static str> {
        let b = NewBudget::validate(
            &required(budget_id, "budget_id")?,
            &required(dimensions, "dimensions")?,
            &required(hard_limits, "hard_limits")?,
            &required(soft_limits, "soft_limits")?,
            required(reset_interval_ms, "reset_interval_ms")?,
            &scope_type.unwrap_or_default(),
            &scope_id.unwrap_or_default(),
            &required(enforcement_mode, "enforcement_mode")?,
            &required(on_hard_limit, "on_hard_limit")?,
            &required(on_soft_limit, "on_soft_limit")?,
        )?;
        create_budget(&b)
    };
    run().or_raise()
}

/// Reports usage `{"dim": n}` against a budget; see the README for the
/// outcome rules. A repeated `dedup_key` replays the first outcome.
#[pg_extern(volatile, parallel_unsafe, security_definer, name = "ff_report_usage")]
#[search_path(@extschema@, pg_temp)]
fn sql_report_usage(budget_id: Option<String>, dimensions: Option<RawJsonb>, dedup_key: default!(Option<String>, "NULL")) -> TableIterator<
    'static,
    (
        name!(outcome, String),
        name!(dimension, Option<String>),
        name!(current_usage, Option<i64>),
        name!(limit_value, Option<i64>),
    ),
> {
    outcome_table((|| {
        let budget_id = required(budget_id, "budget_id")?;
        let deltas = parse_dimensions(&required(dimensions, "dimensions")?.to_value("dimensions")?)?;
        report_usage(&budget_id, &deltas, dedup_key.as_deref(), Replay::CachedOutcome, None)
    })())
}

/// `ff_report_usage` with parallel arrays instead of a JSON object.
#[pg_extern(volatile, parallel_unsafe, security_definer, name = "ff_report_usage_admin")]
#[search_path(@extschema@, pg_temp)]
fn sql_report_usage_admin(
    budget_id: Option<String>,
    dimensions: Option<Vec<Option<String>>>,
    deltas: Option<Vec<Option<i64>>>,
    dedup_key: default!(Option<String>, "NULL"),
) -> TableIterator<
    'static,
    (
        name!(outcome, String),
        name!(dimension, Option<String>),
        name!(current_usage, Option<i64>),
        name!(limit_value, Option<i64>),
    ),
> {
    outcome_table((|| {
        let budget_id = required(budget_id, "budget_id")?;
        let deltas = zip_dimensions(&required(dimensions, "dimensions")?, &required(deltas, "deltas")?)?;
        report_usage(&budget_id, &deltas, dedup_key.as_deref(), Replay::CachedOutcome, None)
    })())
}

/// Like `ff_report_usage` for an execution the caller holds (active, and
/// naming the budget): also books the deltas to its ledger, reducing its
/// reservation. A repeated idempotency key returns 'already_applied'.
#[pg_extern(volatile, parallel_unsafe, security_definer, name = "ff_record_spend")]
#[search_path(@extschema@, pg_temp)]
fn sql_record_spend(
    budget_id: Option<String>,
    execution_id: Option<String>,
    deltas: Option<RawJsonb>,
    idempotency_key: Option<String>,
) -> TableIterator<
    'static,
    (
        name!(outcome, String),
        name!(dimension, Option<String>),
        name!(current_usage, Option<i64>),
        name!(limit_value, Option<i64>),
    ),
> {
    outcome_table((|| {
        let budget_id = required(budget_id, "budget_id")?;
        let exec_id = ExecutionId::parse(&required(execution_id, "execution_id")?)?;
        let deltas = parse_dimensions(&required(deltas, "deltas")?.to_value("deltas")?)?;
        let key = required(idempotency_key, "idempotency_key")?;
        report_usage(&budget_id, &deltas, Some(&key), Replay::AlreadyApplied, Some(&exec_id))
    })())
}

/// Subtracts an execution's recorded spend from the budget (clamped at 0)
/// and deletes its ledger. Idempotent.
#[pg_extern(volatile, parallel_unsafe, security_definer, name = "ff_release_budget")]
#[search_path(@extschema@, pg_temp)]
fn sql_release_budget(budget_id: Option<String>, execution_id: Option<String>) {
    (|| {
        let budget_id = required(budget_id, "budget_id")?;
        let exec_id = ExecutionId::parse(&required(execution_id, "execution_id")?)?;
        release_budget(&budget_id, &exec_id)
    })()
    .or_raise()
}

/// Zeroes all usage of a budget and reschedules its next reset; returns
/// next_reset_at_ms (0 when none). Unknown budget: P0002.
#[pg_extern(volatile, parallel_unsafe, security_definer, name = "ff_reset_budget")]
#[search_path(@extschema@, pg_temp)]
fn sql_reset_budget(budget_id: Option<String>) -> i64 {
    (|| reset_budget(&required(budget_id, "budget_id")?))().or_raise()
}

/// Limits, usage, reservations and breach counters of a budget as jsonb.
/// Unknown budget: P0002.
#[pg_extern(volatile, parallel_unsafe, security_definer, name = "ff_get_budget_status")]
#[search_path(@extschema@, pg_temp)]
fn sql_get_budget_status(budget_id: Option<String>) -> RawJsonb {
    (|| budget_status(&required(budget_id, "budget_id")?))().or_raise()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(hard: &[(&str, i64)], soft: &[(&str, i64)]) -> Policy {
        Policy {
            hard: hard.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            soft: soft.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            reset_interval_ms: 0,
        }
    }

    fn map(pairs: &[(&str, i64)]) -> BTreeMap<String, i64> {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    const REJECT: Mode = Mode { strict: true, reject: true, notify_soft: false };
    const RECORD: Mode = Mode { strict: true, reject: false, notify_soft: false };
    const ADVISORY: Mode = Mode { strict: false, reject: true, notify_soft: false };

    #[test]
    fn reject_applies_nothing_and_reports_usage_before() {
        let p = policy(&[("tokens", 100)], &[]);
        let v = evaluate(&p, REJECT, &map(&[("tokens", 90)]), &map(&[("a", 1), ("tokens", 20)])).unwrap();
        assert_eq!(v.outcome, Outcome::HardBreach { dimension: "tokens".into(), current_usage: 90, hard_limit: 100 });
        assert!(!v.apply);
    }

    #[test]
    fn record_books_reports_past_the_limit_too() {
        let p = policy(&[("tokens", 100)], &[]);
        let v = evaluate(&p, RECORD, &map(&[("tokens", 110)]), &map(&[("tokens", 5)])).unwrap();
        assert_eq!(v.outcome, Outcome::HardBreach { dimension: "tokens".into(), current_usage: 115, hard_limit: 100 });
        assert!(v.apply);
    }

    #[test]
    fn record_and_advisory_apply_and_report_the_new_usage() {
        let p = policy(&[("tokens", 100)], &[]);
        for mode in [RECORD, ADVISORY] {
            let v = evaluate(&p, mode, &map(&[("tokens", 90)]), &map(&[("tokens", 20)])).unwrap();
            assert_eq!(v.outcome, Outcome::HardBreach { dimension: "tokens".into(), current_usage: 110, hard_limit: 100 });
            assert!(v.apply);
        }
    }

    #[test]
    fn exactly_at_hard_limit_is_allowed() {
        let p = policy(&[("tokens", 100)], &[]);
        let v = evaluate(&p, REJECT, &map(&[("tokens", 90)]), &map(&[("tokens", 10)])).unwrap();
        assert_eq!(v, Verdict { outcome: Outcome::Ok, apply: true });
    }

    #[test]
    fn first_soft_breach_by_name_with_new_value() {
        let p = policy(&[], &[("b", 5), ("a", 5)]);
        let v = evaluate(&p, REJECT, &map(&[]), &map(&[("b", 6), ("a", 7)])).unwrap();
        assert_eq!(v.outcome, Outcome::SoftBreach { dimension: "a".into(), current_usage: 7, soft_limit: 5 });
    }

    #[test]
    fn zero_limit_means_unlimited() {
        let p = policy(&[("t", 0)], &[("t", 0)]);
        let v = evaluate(&p, REJECT, &map(&[("t", i64::MAX - 1)]), &map(&[("t", 1)])).unwrap();
        assert_eq!(v.outcome, Outcome::Ok);
    }

    #[test]
    fn overflow_is_an_error() {
        let err = evaluate(&Policy::default(), REJECT, &map(&[("t", i64::MAX)]), &map(&[("t", 1)])).unwrap_err();
        assert_eq!(err.code, pgrx::PgSqlErrorCode::ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE);
    }

    #[test]
    fn modes_parse_and_refuse_unknown_values() {
        assert_eq!(Mode::parse("strict", "fail", "warn").unwrap(), REJECT);
        assert_eq!(Mode::parse("strict", "record", "notify").unwrap().on_soft_limit(), "notify");
        assert!(!Mode::parse("advisory", "reject", "warn").unwrap().refuses_reports());
        for (e, h, s) in [("lenient", "reject", "warn"), ("strict", "block", "warn"), ("strict", "reject", "page")] {
            let err = Mode::parse(e, h, s).unwrap_err();
            assert_eq!(err.code, pgrx::PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE);
        }
    }

    #[test]
    fn outcome_json_round_trip() {
        for o in [
            Outcome::Ok,
            Outcome::AlreadyApplied,
            Outcome::SoftBreach { dimension: "d".into(), current_usage: 3, soft_limit: 2 },
            Outcome::HardBreach { dimension: "d".into(), current_usage: 3, hard_limit: 4 },
        ] {
            assert_eq!(Outcome::from_json(&o.to_json()).unwrap(), o);
        }
        assert_eq!(Outcome::from_json(&json!({})).unwrap(), Outcome::AlreadyApplied);
        assert!(Outcome::from_json(&json!({"kind": "Weird"})).is_err());
        assert_eq!(Outcome::SoftBreach { dimension: "d".into(), current_usage: 3, soft_limit: 2 }.to_json(),
            json!({"kind":"SoftBreach","dimension":"d","current_usage":3,"soft_limit":2}));
    }

    #[test]
    fn dimensions_must_be_non_negative_integers() {
        assert_eq!(parse_dimensions(&json!({"a": 1, "b": 0})).unwrap(), map(&[("a", 1), ("b", 0)]));
        for bad in [json!([1]), json!(5), json!({"a": -1}), json!({"a": 1.5}), json!({"a": "1"}), json!({"a": null}), json!({"": 1})] {
            let err = parse_dimensions(&bad).unwrap_err();
            assert_eq!(err.code, pgrx::PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, "{bad}");
        }
    }

    fn room(budget: &str, dim: &str, usage: i64, reserved: i64, hard: i64) -> Headroom {
        Headroom { budget_id: budget.into(), dimension: dim.into(), usage, reserved, hard_limit: hard }
    }

    #[test]
    fn admission_counts_reservations() {
        let dims = [room("a", "tokens", 9_000, 5_000, 15_000), room("b", "tokens", 0, 0, 100)];
        assert_eq!(refusal(&dims, &map(&[("tokens", 100)])), None);
        assert_eq!(refusal(&dims, &map(&[("tokens", 101)])), Some(Refusal::ReserveTooBig("b".into())));
        assert_eq!(refusal(&dims, &map(&[("tokens", 1_001)])), Some(Refusal::ReserveTooBig("a".into())));
        // No reserve: refused only at or over the limit, reservations included.
        assert_eq!(refusal(&[room("a", "t", 9, 0, 10)], &map(&[])), None);
        assert_eq!(refusal(&[room("a", "t", 9, 1, 10)], &map(&[])), Some(Refusal::Exhausted("a".into())));
        assert_eq!(refusal(&[room("a", "t", 10, 0, 10)], &map(&[("t", 5)])), Some(Refusal::Exhausted("a".into())));
    }

    #[test]
    fn create_budget_validation() {
        let d = |v: &[&str]| v.iter().map(|s| Some(s.to_string())).collect::<Vec<_>>();
        let n = |v: &[i64]| v.iter().map(|x| Some(*x)).collect::<Vec<_>>();
        let ok = NewBudget::validate("b", &d(&["t"]), &n(&[10]), &n(&[5]), 0, "", "", "strict", "fail", "warn").unwrap();
        assert_eq!(ok.policy_json()["on_hard_limit"], json!("reject"));
        for (dims, hard, soft, reset) in [
            (d(&["t"]), n(&[10, 1]), n(&[5]), 0),
            (d(&["t", "t"]), n(&[1, 1]), n(&[1, 1]), 0),
            (d(&["t"]), n(&[-1]), n(&[5]), 0),
            (d(&["t"]), n(&[1]), n(&[1]), -5),
        ] {
            assert!(NewBudget::validate("b", &dims, &hard, &soft, reset, "", "", "strict", "reject", "warn").is_err());
        }
        assert!(NewBudget::validate("b", &d(&["t"]), &n(&[1]), &n(&[1]), 0, "", "", "sometimes", "reject", "warn").is_err());
    }
}
