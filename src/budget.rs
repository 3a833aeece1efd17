//! Budgets: limits per dimension, usage counters, dedup of reports, a
//! per-execution spend ledger, and resets. Pure evaluation logic first, then
//! the SPI operations, then the SQL-facing wrappers.

use crate::db::{col, col_req, exec, first_row, now_ms, with_spi};
use crate::error::{required, FfError, FfResult, OrRaise};
use crate::ids::{check_text_id, clip, crc16, ExecutionId};
use crate::jsonb::RawJsonb;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::JsonB;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;

/// Most dimensions one budget or one report may name.
pub const MAX_DIMENSIONS: usize = 256;

/// Limits of a budget, read from `policy_json`. A limit of 0 means none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    pub hard: BTreeMap<String, i64>,
    pub soft: BTreeMap<String, i64>,
    pub reset_interval_ms: i64,
}

impl Policy {
    pub fn from_json(v: &Value) -> Policy {
        let limits = |key: &str| -> BTreeMap<String, i64> {
            v.get(key)
                .and_then(Value::as_object)
                .map(|m| m.iter().filter_map(|(k, n)| Some((k.clone(), n.as_i64()?))).collect())
                .unwrap_or_default()
        };
        Policy {
            hard: limits("hard_limits"),
            soft: limits("soft_limits"),
            reset_interval_ms: v.get("reset_interval_ms").and_then(Value::as_i64).unwrap_or(0),
        }
    }

    pub fn hard_limit(&self, dim: &str) -> Option<i64> {
        self.hard.get(dim).copied().filter(|l| *l > 0)
    }

    pub fn soft_limit(&self, dim: &str) -> Option<i64> {
        self.soft.get(dim).copied().filter(|l| *l > 0)
    }

    /// Claim-time admission: refused when any hard-limited dimension is
    /// already at or over its limit. Returns the first such dimension.
    pub fn exhausted_dimension<'a>(&self, usage: &'a BTreeMap<String, i64>) -> Option<&'a str> {
        usage
            .iter()
            .find(|(dim, value)| self.hard_limit(dim).is_some_and(|l| **value >= l))
            .map(|(dim, _)| dim.as_str())
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
        let corrupt = || FfError::internal(format!("corrupt cached budget outcome: {v}"));
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

/// Decides a report against the current usage. On a hard breach nothing is
/// applied (`new_values` is empty); otherwise every delta applies and the
/// first soft-breached dimension (by name) is reported.
pub fn evaluate(
    policy: &Policy,
    current: &BTreeMap<String, i64>,
    deltas: &BTreeMap<String, i64>,
) -> FfResult<(Outcome, BTreeMap<String, i64>)> {
    let mut new_values = BTreeMap::new();
    for (dim, delta) in deltas {
        let cur = current.get(dim).copied().unwrap_or(0);
        let new = cur.checked_add(*delta).ok_or_else(|| {
            FfError::out_of_range(format!("usage of dimension \"{}\" would overflow bigint", clip(dim)))
        })?;
        if let Some(hard) = policy.hard_limit(dim).filter(|hard| new > *hard) {
            let outcome = Outcome::HardBreach { dimension: dim.clone(), current_usage: cur, hard_limit: hard };
            return Ok((outcome, BTreeMap::new()));
        }
        new_values.insert(dim.clone(), new);
    }
    Ok((soft_outcome(policy, &new_values), new_values))
}

/// The outcome of an applied report: the first dimension (by name) whose
/// new value is over its soft limit, else ok.
pub fn soft_outcome(policy: &Policy, new_values: &BTreeMap<String, i64>) -> Outcome {
    new_values
        .iter()
        .find_map(|(dim, new)| {
            let limit = policy.soft_limit(dim).filter(|soft| new > soft)?;
            Some(Outcome::SoftBreach { dimension: dim.clone(), current_usage: *new, soft_limit: limit })
        })
        .unwrap_or(Outcome::Ok)
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
        map.insert(d, json!(n));
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
    pub enforcement_mode: String,
    pub on_hard_limit: String,
    pub on_soft_limit: String,
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
        for (name, value) in [
            ("scope_type", scope_type),
            ("scope_id", scope_id),
            ("enforcement_mode", enforcement_mode),
            ("on_hard_limit", on_hard_limit),
            ("on_soft_limit", on_soft_limit),
        ] {
            if value.len() > crate::ids::MAX_ID_BYTES {
                return Err(FfError::invalid(format!("{name} is longer than {} bytes", crate::ids::MAX_ID_BYTES)));
            }
        }
        Ok(NewBudget {
            budget_id: budget_id.to_string(),
            policy,
            scope_type: scope_type.to_string(),
            scope_id: scope_id.to_string(),
            enforcement_mode: enforcement_mode.to_string(),
            on_hard_limit: on_hard_limit.to_string(),
            on_soft_limit: on_soft_limit.to_string(),
        })
    }

    pub fn policy_json(&self) -> Value {
        json!({
            "hard_limits": self.policy.hard,
            "soft_limits": self.policy.soft,
            "reset_interval_ms": self.policy.reset_interval_ms,
            "on_hard_limit": self.on_hard_limit,
            "on_soft_limit": self.on_soft_limit,
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

// ---------------------------------------------------------------------------
// SPI operations
// ---------------------------------------------------------------------------

pub fn create_budget(b: &NewBudget) -> FfResult<&'static str> {
    with_spi(|c| {
        let now = now_ms();
        let next_reset = (b.policy.reset_interval_ms > 0).then(|| now.saturating_add(b.policy.reset_interval_ms));
        let t = exec(
            c,
            "INSERT INTO ff_budget_policy (budget_id, partition_key, policy_json, scope_type, scope_id,
                 enforcement_mode, next_reset_at_ms, created_at_ms, updated_at_ms)
             VALUES ($1, ($2 % (SELECT num_budget_partitions FROM ff_partition_config))::smallint,
                     $3, $4, $5, $6, $7, $8, $8)
             ON CONFLICT (budget_id) DO NOTHING RETURNING 1",
            &[
                b.budget_id.as_str().into(),
                i32::from(crc16(b.budget_id.as_bytes())).into(),
                JsonB(b.policy_json()).into(),
                b.scope_type.as_str().into(),
                b.scope_id.as_str().into(),
                b.enforcement_mode.as_str().into(),
                next_reset.into(),
                now.into(),
            ],
        )?;
        Ok(if t.is_empty() { "already_satisfied" } else { "created" })
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

/// One usage report: dedup, lock the policy, check every dimension, then
/// apply all increments or none. `ledger` also records the deltas against
/// an execution.
pub fn report_usage(
    budget_id: &str,
    deltas: &BTreeMap<String, i64>,
    dedup_key: Option<&str>,
    replay: Replay,
    ledger: Option<&ExecutionId>,
) -> FfResult<Outcome> {
    check_text_id("budget_id", budget_id)?;
    let dedup_key = dedup_key.filter(|k| !k.is_empty());
    if let Some(k) = dedup_key {
        check_text_id("dedup_key", k)?;
    }
    with_spi(|c| {
        let slot = i32::from(crc16(budget_id.as_bytes()));
        let now = now_ms();
        if let Some(key) = dedup_key {
            if let Some(seen) = claim_dedup_key(c, budget_id, key, slot, now)? {
                return match replay {
                    Replay::CachedOutcome => Outcome::from_json(&seen),
                    Replay::AlreadyApplied => Ok(Outcome::AlreadyApplied),
                };
            }
        }
        let locked = lock_policy(c, budget_id)?;
        // Without a policy row nothing serialises reports of this budget, so
        // only the general path (which locks usage rows in name order) is safe.
        let fast = match &locked {
            Some(policy) => apply_if_within_limits(c, budget_id, deltas, policy, now)?,
            None => None,
        };
        let policy = locked.unwrap_or_default();
        let outcome = match fast {
            Some(new_values) => soft_outcome(&policy, &new_values),
            None => {
                let current = lock_usage(c, budget_id, deltas, slot, now)?;
                let (outcome, _) = evaluate(&policy, &current, deltas)?;
                if !matches!(outcome, Outcome::HardBreach { .. }) {
                    apply_increments(c, budget_id, deltas, now)?;
                }
                outcome
            }
        };
        match &outcome {
            Outcome::HardBreach { dimension, .. } => record_breach(c, budget_id, dimension, now)?,
            _ => {
                if let Some(exec_id) = ledger {
                    add_to_ledger(c, budget_id, exec_id, deltas, slot, now)?;
                }
                if matches!(outcome, Outcome::SoftBreach { .. }) {
                    record_soft_breach(c, budget_id, now)?;
                }
            }
        }
        if let Some(key) = dedup_key {
            exec(
                c,
                "UPDATE ff_budget_usage_dedup SET outcome_json = $3 WHERE budget_id = $1 AND dedup_key = $2",
                &[budget_id.into(), key.into(), JsonB(outcome.to_json()).into()],
            )?;
        }
        Ok(outcome)
    })
}

/// The common case in one statement: when every dimension already has a
/// usage row and no increment would pass a hard limit or overflow, apply
/// them all and return the new values. `None` sends the caller down the
/// general path (missing rows, a breach, an overflow). Only called with the
/// policy row locked, which serialises reports of this budget.
fn apply_if_within_limits(
    c: &mut SpiClient<'_>,
    budget_id: &str,
    deltas: &BTreeMap<String, i64>,
    policy: &Policy,
    now: i64,
) -> FfResult<Option<BTreeMap<String, i64>>> {
    let dims: Vec<String> = deltas.keys().cloned().collect();
    let values: Vec<i64> = deltas.values().copied().collect();
    let hard: Vec<i64> = dims.iter().map(|d| policy.hard_limit(d).unwrap_or(0)).collect();
    let t = exec(
        c,
        "UPDATE ff_budget_usage u SET current_value = u.current_value + d.delta, updated_at_ms = $5
         FROM unnest($2::text[], $3::bigint[]) AS d(k, delta)
         WHERE u.budget_id = $1 AND u.dimensions_key = d.k
           AND (SELECT count(*) FROM ff_budget_usage c
                WHERE c.budget_id = $1 AND c.dimensions_key = ANY ($2)) = cardinality($2)
           AND NOT EXISTS (
               SELECT 1 FROM ff_budget_usage c
               JOIN unnest($2::text[], $3::bigint[], $4::bigint[]) AS x(k, delta, hard) ON c.dimensions_key = x.k
               WHERE c.budget_id = $1
                 AND (c.current_value > 9223372036854775807 - x.delta
                      OR (x.hard > 0 AND c.current_value + x.delta > x.hard)))
         RETURNING u.dimensions_key, u.current_value",
        &[budget_id.into(), dims.into(), values.into(), hard.into(), now.into()],
    )?;
    if t.len() != deltas.len() {
        return Ok(None);
    }
    let mut new_values = BTreeMap::new();
    for row in t {
        new_values.insert(row.get::<String>(1)?.unwrap_or_default(), row.get::<i64>(2)?.unwrap_or(0));
    }
    Ok(Some(new_values))
}

/// Claims a dedup key. Returns `None` when this call owns it (first use, or
/// the old entry expired) and the cached outcome when it was seen before.
/// A concurrent first use of the same key blocks here until it commits.
fn claim_dedup_key(c: &mut SpiClient<'_>, budget_id: &str, key: &str, slot: i32, now: i64) -> FfResult<Option<Value>> {
    let claimed = exec(
        c,
        "INSERT INTO ff_budget_usage_dedup AS d (budget_id, dedup_key, partition_key, outcome_json,
             applied_at_ms, expires_at_ms)
         VALUES ($1, $2, ($3 % (SELECT num_budget_partitions FROM ff_partition_config))::smallint, '{}', $4, $5)
         ON CONFLICT (budget_id, dedup_key) DO UPDATE
             SET outcome_json = '{}', applied_at_ms = EXCLUDED.applied_at_ms,
                 expires_at_ms = EXCLUDED.expires_at_ms
             WHERE d.expires_at_ms <= EXCLUDED.applied_at_ms
         RETURNING 1",
        &[budget_id.into(), key.into(), slot.into(), now.into(), (now + crate::guc::dedup_ttl_ms()).into()],
    )?;
    if !claimed.is_empty() {
        return Ok(None);
    }
    let t = exec(
        c,
        "SELECT outcome_json FROM ff_budget_usage_dedup WHERE budget_id = $1 AND dedup_key = $2",
        &[budget_id.into(), key.into()],
    )?;
    let seen = first_row(t).map(|r| col::<JsonB>(&r, 1)).transpose()?.flatten();
    Ok(Some(seen.map(|j| j.0).unwrap_or_else(|| json!({}))))
}

/// Locks the policy row, serialising reports and resets of one budget.
fn lock_policy(c: &mut SpiClient<'_>, budget_id: &str) -> FfResult<Option<Policy>> {
    let t = exec(
        c,
        "SELECT policy_json FROM ff_budget_policy WHERE budget_id = $1 FOR NO KEY UPDATE",
        &[budget_id.into()],
    )?;
    Ok(first_row(t).map(|r| col_req::<JsonB>(&r, 1)).transpose()?.map(|j| Policy::from_json(&j.0)))
}

/// Makes sure a usage row exists per dimension, locks them in name order and
/// returns their values.
fn lock_usage(
    c: &mut SpiClient<'_>,
    budget_id: &str,
    deltas: &BTreeMap<String, i64>,
    slot: i32,
    now: i64,
) -> FfResult<BTreeMap<String, i64>> {
    let dims: Vec<String> = deltas.keys().cloned().collect();
    exec(
        c,
        "INSERT INTO ff_budget_usage (budget_id, dimensions_key, partition_key, current_value, updated_at_ms)
         SELECT $1, k, ($3 % (SELECT num_budget_partitions FROM ff_partition_config))::smallint, 0, $4
         FROM unnest($2::text[]) AS k
         ON CONFLICT (budget_id, dimensions_key) DO NOTHING",
        &[budget_id.into(), dims.clone().into(), slot.into(), now.into()],
    )?;
    let t = exec(
        c,
        "SELECT dimensions_key, current_value FROM ff_budget_usage
         WHERE budget_id = $1 AND dimensions_key = ANY($2)
         ORDER BY dimensions_key FOR UPDATE",
        &[budget_id.into(), dims.into()],
    )?;
    let mut usage = BTreeMap::new();
    for row in t {
        usage.insert(row.get::<String>(1)?.unwrap_or_default(), row.get::<i64>(2)?.unwrap_or(0));
    }
    Ok(usage)
}

fn apply_increments(c: &mut SpiClient<'_>, budget_id: &str, deltas: &BTreeMap<String, i64>, now: i64) -> FfResult<()> {
    let (dims, values): (Vec<String>, Vec<i64>) = deltas.iter().map(|(k, v)| (k.clone(), *v)).unzip();
    exec(
        c,
        "UPDATE ff_budget_usage u SET current_value = u.current_value + d.delta, updated_at_ms = $4
         FROM unnest($2::text[], $3::bigint[]) AS d(k, delta)
         WHERE u.budget_id = $1 AND u.dimensions_key = d.k",
        &[budget_id.into(), dims.into(), values.into(), now.into()],
    )?;
    Ok(())
}

fn add_to_ledger(
    c: &mut SpiClient<'_>,
    budget_id: &str,
    exec_id: &ExecutionId,
    deltas: &BTreeMap<String, i64>,
    slot: i32,
    now: i64,
) -> FfResult<()> {
    let (dims, values): (Vec<String>, Vec<i64>) = deltas.iter().map(|(k, v)| (k.clone(), *v)).unzip();
    exec(
        c,
        "INSERT INTO ff_budget_usage_by_exec AS l (budget_id, execution_id, dimensions_key, partition_key,
             delta_total, updated_at_ms)
         SELECT $1, $2, d.k, ($5 % (SELECT num_budget_partitions FROM ff_partition_config))::smallint, d.delta, $6
         FROM unnest($3::text[], $4::bigint[]) AS d(k, delta)
         ON CONFLICT (budget_id, execution_id, dimensions_key) DO UPDATE
             SET delta_total = l.delta_total + EXCLUDED.delta_total, updated_at_ms = EXCLUDED.updated_at_ms",
        &[
            budget_id.into(),
            pgrx::Uuid::from_bytes(*exec_id.uuid.as_bytes()).into(),
            dims.into(),
            values.into(),
            slot.into(),
            now.into(),
        ],
    )?;
    Ok(())
}

fn record_breach(c: &mut SpiClient<'_>, budget_id: &str, dimension: &str, now: i64) -> FfResult<()> {
    exec(
        c,
        "UPDATE ff_budget_policy SET breach_count = breach_count + 1, last_breach_at_ms = $3,
             last_breach_dim = $2, updated_at_ms = $3
         WHERE budget_id = $1",
        &[budget_id.into(), dimension.into(), now.into()],
    )?;
    Ok(())
}

fn record_soft_breach(c: &mut SpiClient<'_>, budget_id: &str, now: i64) -> FfResult<()> {
    exec(
        c,
        "UPDATE ff_budget_policy SET soft_breach_count = soft_breach_count + 1, updated_at_ms = $2
         WHERE budget_id = $1",
        &[budget_id.into(), now.into()],
    )?;
    Ok(())
}

/// Zeroes the usage of a budget, clears the last breach and schedules the
/// next reset. `only_if_due` is the reconciler's guard against racing a
/// manual reset: it resets nothing unless the reset is due. Returns the next
/// reset time (0 when none), or `None` when nothing was reset.
pub fn reset_budget_in(c: &mut SpiClient<'_>, budget_id: &str, only_if_due: bool) -> FfResult<Option<i64>> {
    let now = now_ms();
    let t = exec(
        c,
        "SELECT policy_json, next_reset_at_ms FROM ff_budget_policy WHERE budget_id = $1 FOR NO KEY UPDATE",
        &[budget_id.into()],
    )?;
    let Some(row) = first_row(t) else {
        return Err(FfError::not_found(format!("budget \"{}\" does not exist", clip(budget_id))));
    };
    let policy = Policy::from_json(&col_req::<JsonB>(&row, 1)?.0);
    let due_at: Option<i64> = col(&row, 2)?;
    if only_if_due && !due_at.is_some_and(|at| at <= now) {
        return Ok(None);
    }
    let next = (policy.reset_interval_ms > 0).then(|| now.saturating_add(policy.reset_interval_ms));
    exec(
        c,
        "UPDATE ff_budget_usage SET current_value = 0, last_reset_at_ms = $2, updated_at_ms = $2
         WHERE budget_id = $1",
        &[budget_id.into(), now.into()],
    )?;
    exec(
        c,
        "UPDATE ff_budget_policy SET last_breach_at_ms = NULL, last_breach_dim = NULL,
             next_reset_at_ms = $3, updated_at_ms = $2
         WHERE budget_id = $1",
        &[budget_id.into(), now.into(), next.into()],
    )?;
    Ok(Some(next.unwrap_or(0)))
}

pub fn reset_budget(budget_id: &str) -> FfResult<i64> {
    check_text_id("budget_id", budget_id)?;
    with_spi(|c| Ok(reset_budget_in(c, budget_id, false)?.unwrap_or(0)))
}

/// Hands back what one execution spent (clamped at zero) and forgets it.
pub fn release_budget(budget_id: &str, exec_id: &ExecutionId) -> FfResult<()> {
    check_text_id("budget_id", budget_id)?;
    with_spi(|c| {
        let now = now_ms();
        // Same lock order as a report: policy, then usage rows.
        lock_policy(c, budget_id)?;
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
            &[budget_id.into(), pgrx::Uuid::from_bytes(*exec_id.uuid.as_bytes()).into(), now.into()],
        )?;
        Ok(())
    })
}

/// Current usage of a budget by dimension.
pub fn read_usage(c: &mut SpiClient<'_>, budget_id: &str) -> FfResult<BTreeMap<String, i64>> {
    let t = exec(
        c,
        "SELECT dimensions_key, current_value FROM ff_budget_usage WHERE budget_id = $1",
        &[budget_id.into()],
    )?;
    let mut usage = BTreeMap::new();
    for row in t {
        usage.insert(row.get::<String>(1)?.unwrap_or_default(), row.get::<i64>(2)?.unwrap_or(0).max(0));
    }
    Ok(usage)
}

pub fn budget_status(budget_id: &str) -> FfResult<Value> {
    check_text_id("budget_id", budget_id)?;
    with_spi(|c| {
        let t = exec(
            c,
            "SELECT policy_json, scope_type, scope_id, enforcement_mode, breach_count, soft_breach_count,
                    last_breach_at_ms, last_breach_dim, next_reset_at_ms, created_at_ms
             FROM ff_budget_policy WHERE budget_id = $1",
            &[budget_id.into()],
        )?;
        let row = first_row(t)
            .ok_or_else(|| FfError::not_found(format!("budget \"{}\" does not exist", clip(budget_id))))?;
        let policy = col_req::<JsonB>(&row, 1)?.0;
        let ts = |v: Option<i64>| v.map(|n| Value::String(n.to_string())).unwrap_or(Value::Null);
        let mut status = json!({
            "budget_id": budget_id,
            "scope_type": col_req::<String>(&row, 2)?,
            "scope_id": col_req::<String>(&row, 3)?,
            "enforcement_mode": col_req::<String>(&row, 4)?,
            "hard_limits": policy.get("hard_limits").cloned().unwrap_or(json!({})),
            "soft_limits": policy.get("soft_limits").cloned().unwrap_or(json!({})),
            "breach_count": col_req::<i64>(&row, 5)?,
            "soft_breach_count": col_req::<i64>(&row, 6)?,
            "last_breach_at": ts(col(&row, 7)?),
            "last_breach_dim": col::<String>(&row, 8)?,
            "next_reset_at": ts(col(&row, 9)?),
            "created_at": ts(col(&row, 10)?),
        });
        status["usage"] = json!(read_usage(c, budget_id)?);
        Ok(status)
    })
}

/// Claim-time admission: the first of `budget_ids` that has a hard-limited
/// dimension at or over its limit, or `None` when all admit. Reads committed
/// usage without locking, so claims never queue behind reports.
pub fn first_exhausted_budget(c: &mut SpiClient<'_>, budget_ids: &[String]) -> FfResult<Option<String>> {
    let t = exec(
        c,
        "SELECT p.budget_id, p.policy_json,
                coalesce(jsonb_object_agg(u.dimensions_key, u.current_value)
                         FILTER (WHERE u.dimensions_key IS NOT NULL), '{}')
         FROM ff_budget_policy p LEFT JOIN ff_budget_usage u ON u.budget_id = p.budget_id
         WHERE p.budget_id = ANY($1)
         GROUP BY p.budget_id, p.policy_json
         ORDER BY p.budget_id",
        &[budget_ids.to_vec().into()],
    )?;
    for row in t {
        let budget: String = row.get(1)?.unwrap_or_default();
        let policy = Policy::from_json(&row.get::<JsonB>(2)?.map(|j| j.0).unwrap_or_default());
        let usage: BTreeMap<String, i64> = row
            .get::<JsonB>(3)?
            .and_then(|j| serde_json::from_value(j.0).ok())
            .unwrap_or_default();
        if policy.exhausted_dimension(&usage).is_some() {
            return Ok(Some(budget));
        }
    }
    Ok(None)
}

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
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(@extschema@, pg_temp)]
#[allow(clippy::too_many_arguments)]
fn ff_create_budget(
    budget_id: Option<String>,
    dimensions: Option<Vec<Option<String>>>,
    hard_limits: Option<Vec<Option<i64>>>,
    soft_limits: Option<Vec<Option<i64>>>,
    reset_interval_ms: default!(Option<i64>, 0),
    scope_type: default!(Option<String>, "''"),
    scope_id: default!(Option<String>, "''"),
    enforcement_mode: default!(Option<String>, "'strict'"),
    on_hard_limit: default!(Option<String>, "'fail'"),
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
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(@extschema@, pg_temp)]
fn ff_report_usage(budget_id: Option<String>, dimensions: Option<RawJsonb>, dedup_key: default!(Option<String>, "NULL")) -> TableIterator<
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
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(@extschema@, pg_temp)]
fn ff_report_usage_admin(
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

/// Like `ff_report_usage`, and also books the deltas to the execution so
/// `ff_release_budget` can hand them back. A repeated idempotency key
/// returns 'already_applied'.
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(@extschema@, pg_temp)]
fn ff_record_spend(
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
        report_usage(&budget_id, &deltas, idempotency_key.as_deref(), Replay::AlreadyApplied, Some(&exec_id))
    })())
}

/// Subtracts an execution's recorded spend from the budget (clamped at 0)
/// and deletes its ledger. Idempotent.
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(@extschema@, pg_temp)]
fn ff_release_budget(budget_id: Option<String>, execution_id: Option<String>) {
    (|| {
        let budget_id = required(budget_id, "budget_id")?;
        let exec_id = ExecutionId::parse(&required(execution_id, "execution_id")?)?;
        release_budget(&budget_id, &exec_id)
    })()
    .or_raise()
}

/// Zeroes all usage of a budget and reschedules its next reset; returns
/// next_reset_at_ms (0 when none). Unknown budget: P0002.
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(@extschema@, pg_temp)]
fn ff_reset_budget(budget_id: Option<String>) -> i64 {
    (|| reset_budget(&required(budget_id, "budget_id")?))().or_raise()
}

/// Limits, usage and breach counters of a budget as jsonb. Unknown budget: P0002.
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(@extschema@, pg_temp)]
fn ff_get_budget_status(budget_id: Option<String>) -> JsonB {
    JsonB((|| budget_status(&required(budget_id, "budget_id")?))().or_raise())
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

    #[test]
    fn hard_breach_applies_nothing_and_reports_usage_before() {
        let p = policy(&[("tokens", 100)], &[]);
        let (o, applied) = evaluate(&p, &map(&[("tokens", 90)]), &map(&[("a", 1), ("tokens", 20)])).unwrap();
        assert_eq!(o, Outcome::HardBreach { dimension: "tokens".into(), current_usage: 90, hard_limit: 100 });
        assert!(applied.is_empty());
    }

    #[test]
    fn exactly_at_hard_limit_is_allowed() {
        let p = policy(&[("tokens", 100)], &[]);
        let (o, applied) = evaluate(&p, &map(&[("tokens", 90)]), &map(&[("tokens", 10)])).unwrap();
        assert_eq!(o, Outcome::Ok);
        assert_eq!(applied, map(&[("tokens", 100)]));
    }

    #[test]
    fn first_soft_breach_by_name_with_new_value() {
        let p = policy(&[], &[("b", 5), ("a", 5)]);
        let (o, _) = evaluate(&p, &map(&[]), &map(&[("b", 6), ("a", 7)])).unwrap();
        assert_eq!(o, Outcome::SoftBreach { dimension: "a".into(), current_usage: 7, soft_limit: 5 });
    }

    #[test]
    fn zero_limit_means_unlimited() {
        let p = policy(&[("t", 0)], &[("t", 0)]);
        let (o, _) = evaluate(&p, &map(&[("t", i64::MAX - 1)]), &map(&[("t", 1)])).unwrap();
        assert_eq!(o, Outcome::Ok);
    }

    #[test]
    fn overflow_is_an_error() {
        let err = evaluate(&Policy::default(), &map(&[("t", i64::MAX)]), &map(&[("t", 1)])).unwrap_err();
        assert_eq!(err.code, pgrx::PgSqlErrorCode::ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE);
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

    #[test]
    fn admission_refuses_at_or_over_hard_limit() {
        let p = policy(&[("t", 10), ("r", 0)], &[]);
        assert_eq!(p.exhausted_dimension(&map(&[("t", 9), ("r", 1000)])), None);
        assert_eq!(p.exhausted_dimension(&map(&[("t", 10)])), Some("t"));
    }

    #[test]
    fn create_budget_validation() {
        let d = |v: &[&str]| v.iter().map(|s| Some(s.to_string())).collect::<Vec<_>>();
        let n = |v: &[i64]| v.iter().map(|x| Some(*x)).collect::<Vec<_>>();
        let ok = NewBudget::validate("b", &d(&["t"]), &n(&[10]), &n(&[5]), 0, "", "", "strict", "fail", "warn");
        assert!(ok.is_ok());
        for (dims, hard, soft, reset) in [
            (d(&["t"]), n(&[10, 1]), n(&[5]), 0),
            (d(&["t", "t"]), n(&[1, 1]), n(&[1, 1]), 0),
            (d(&["t"]), n(&[-1]), n(&[5]), 0),
            (d(&["t"]), n(&[1]), n(&[1]), -5),
        ] {
            assert!(NewBudget::validate("b", &dims, &hard, &soft, reset, "", "", "strict", "fail", "warn").is_err());
        }
    }
}
