//! Schedules: a cron expression (five fields, or six with seconds first;
//! times in UTC) that creates an execution at each due time. The
//! reconcilers run them: a runner takes a due schedule's row (others skip
//! it), creates one execution per due time and moves `next_due_at_ms` on,
//! all in one transaction, so each due time runs exactly once however many
//! runners there are, and nothing is lost across a restart. After downtime
//! the latest `flowfabric.schedule_catchup` missed due times run and older
//! ones are counted as missed.

use crate::db::{col, col_req, exec, first_row, now_ms, with_spi};
use crate::error::{required, FfError, FfResult, OrRaise};
use crate::exec::{self, NewRow, Options, RetryPolicy};
use crate::guc;
use crate::ids::{check_text_id, clip};
use crate::jsonb::RawJsonb;
use chrono::{DateTime, TimeZone, Utc};
use croner::parser::{CronParser, Seconds, Year};
use croner::Cron;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use serde_json::{json, Value};

/// Parses a cron expression: five fields, or six with seconds first.
pub fn parse_cron(expr: &str) -> FfResult<Cron> {
    if expr.len() > 256 {
        return Err(FfError::invalid("cron expression is longer than 256 bytes"));
    }
    let fields = expr.split_whitespace().count();
    if !(5..=6).contains(&fields) {
        return Err(FfError::invalid(format!(
            "cron expression \"{}\" has {fields} fields; expected 5 (minute hour day month weekday) or 6 (seconds first)",
            clip(expr)
        )));
    }
    CronParser::builder()
        .seconds(Seconds::Optional)
        .year(Year::Disallowed)
        .build()
        .parse(expr)
        .map_err(|e| FfError::invalid(format!("cron expression \"{}\" is invalid: {e}", clip(expr))))
}

fn to_utc(ms: i64) -> FfResult<DateTime<Utc>> {
    Utc.timestamp_millis_opt(ms).single().ok_or_else(|| FfError::out_of_range(format!("time {ms} is out of range")))
}

/// The first due time strictly after `after_ms`, or `None` when the
/// expression never matches again.
pub fn next_after(cron: &Cron, after_ms: i64) -> FfResult<Option<i64>> {
    // Cron has second granularity: search from the start of this second.
    match cron.find_next_occurrence(&to_utc(after_ms - after_ms.rem_euclid(1000))?, false) {
        Ok(t) => Ok(Some(t.timestamp_millis())),
        Err(_) => Ok(None),
    }
}

/// Most due times one catch-up walks forward before jumping to the latest.
const MAX_WALK: u32 = 1_000_000;

/// Due times from `first` up to `now` (both inclusive): the latest `keep`
/// of them, oldest first, and how many older ones are skipped.
pub fn due_times(cron: &Cron, first: i64, now: i64, keep: usize) -> FfResult<(Vec<i64>, i64)> {
    let mut due = std::collections::VecDeque::new();
    let mut skipped = 0i64;
    let mut at = Some(first);
    // Bounded walk: a seconds schedule down for a year is 31M due times.
    let mut steps = 0u32;
    while let Some(t) = at.filter(|t| *t <= now) {
        due.push_back(t);
        if due.len() > keep {
            due.pop_front();
            skipped += 1;
        }
        steps += 1;
        if steps >= MAX_WALK {
            // Far behind: take the latest due times walking back from now;
            // the skipped count is then a lower bound.
            return Ok((latest_before(cron, now, keep)?, skipped));
        }
        at = next_after(cron, t)?;
    }
    Ok((due.into_iter().collect(), skipped))
}

/// The latest `keep` due times at or before `now`, oldest first.
fn latest_before(cron: &Cron, now: i64, keep: usize) -> FfResult<Vec<i64>> {
    let mut out = Vec::new();
    let mut at = to_utc(now)?;
    let mut inclusive = true;
    while out.len() < keep {
        match cron.find_previous_occurrence(&at, inclusive) {
            Ok(t) => {
                out.push(t.timestamp_millis());
                at = t;
                inclusive = false;
            }
            Err(_) => break,
        }
    }
    out.reverse();
    Ok(out)
}

/// A schedule's definition, validated.
pub struct NewSchedule {
    pub id: String,
    pub cron: String,
    pub options: Options,
    pub payload: Option<RawJsonb>,
    pub reserve: Option<RawJsonb>,
    pub retry: Option<RawJsonb>,
}

pub fn create_schedule(s: &NewSchedule) -> FfResult<&'static str> {
    check_text_id("schedule_id", &s.id)?;
    let cron = parse_cron(&s.cron)?;
    with_spi(|c| {
        exec::check_references(c, &s.options)?;
        let now = now_ms();
        let next = next_after(&cron, now)?
            .ok_or_else(|| FfError::invalid(format!("cron expression \"{}\" never matches a future time", clip(&s.cron))))?;
        let o = &s.options;
        let t = exec(
            c,
            "INSERT INTO ff_schedule AS s (schedule_id, cron, lane_id, payload, priority, required_capabilities, budget_ids,
                 budget_reserve, quota_policy_id, max_attempts, retry_policy, next_due_at_ms, created_at_ms, updated_at_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $13)
             ON CONFLICT (schedule_id) DO UPDATE SET cron = EXCLUDED.cron, lane_id = EXCLUDED.lane_id,
                 payload = EXCLUDED.payload, priority = EXCLUDED.priority,
                 required_capabilities = EXCLUDED.required_capabilities, budget_ids = EXCLUDED.budget_ids,
                 budget_reserve = EXCLUDED.budget_reserve, quota_policy_id = EXCLUDED.quota_policy_id,
                 max_attempts = EXCLUDED.max_attempts, retry_policy = EXCLUDED.retry_policy,
                 next_due_at_ms = EXCLUDED.next_due_at_ms, updated_at_ms = EXCLUDED.updated_at_ms
             WHERE (s.cron, s.lane_id, s.payload, s.priority, s.required_capabilities, s.budget_ids, s.budget_reserve,
                    s.quota_policy_id, s.max_attempts, s.retry_policy)
                   IS DISTINCT FROM
                   (EXCLUDED.cron, EXCLUDED.lane_id, EXCLUDED.payload, EXCLUDED.priority,
                    EXCLUDED.required_capabilities, EXCLUDED.budget_ids, EXCLUDED.budget_reserve,
                    EXCLUDED.quota_policy_id, EXCLUDED.max_attempts, EXCLUDED.retry_policy)
             RETURNING s.created_at_ms = $13",
            &[
                s.id.as_str().into(),
                s.cron.as_str().into(),
                o.lane_id.as_str().into(),
                s.payload.into(),
                o.priority.into(),
                o.required_capabilities.clone().into(),
                o.budget_ids.clone().into(),
                s.reserve.into(),
                o.quota_policy_id.clone().into(),
                o.max_attempts.into(),
                s.retry.into(),
                next.into(),
                now.into(),
            ],
        )?;
        Ok(match first_row(t).map(|r| col::<bool>(&r, 1)).transpose()?.flatten() {
            None => "already_satisfied",
            Some(true) => "created",
            Some(false) => "updated",
        })
    })
}

pub fn drop_schedule(id: &str) -> FfResult<&'static str> {
    check_text_id("schedule_id", id)?;
    with_spi(|c| {
        let t = exec(c, "DELETE FROM ff_schedule WHERE schedule_id = $1 RETURNING 1", &[id.into()])?;
        Ok(if t.is_empty() { "not_found" } else { "dropped" })
    })
}

/// What running one schedule did.
pub struct Ran {
    pub created: i64,
    pub missed: i64,
}

/// Runs one due schedule if this runner can take it (SKIP LOCKED).
pub fn run_one(c: &mut SpiClient<'_>, id: &str, now: i64) -> FfResult<Option<Ran>> {
    let t = exec(
        c,
        "SELECT cron, lane_id, payload, priority, required_capabilities, budget_ids, budget_reserve,
                quota_policy_id, max_attempts, retry_policy, next_due_at_ms
         FROM ff_schedule WHERE schedule_id = $1 AND next_due_at_ms <= $2 FOR UPDATE SKIP LOCKED",
        &[id.into(), now.into()],
    )?;
    let Some(row) = first_row(t) else { return Ok(None) };
    let cron = parse_cron(&col_req::<String>(&row, 1)?)?;
    let options = Options {
        lane_id: col_req(&row, 2)?,
        priority: col_req(&row, 4)?,
        required_capabilities: col::<Vec<String>>(&row, 5)?.unwrap_or_default(),
        budget_ids: col::<Vec<String>>(&row, 6)?.unwrap_or_default(),
        budget_reserve: match row.get::<RawJsonb>(7)? {
            Some(r) => exec::parse_reserve(&r.to_value("budget_reserve")?)?,
            None => Default::default(),
        },
        quota_policy_id: col(&row, 8)?,
        max_attempts: col_req(&row, 9)?,
        retry: match row.get::<RawJsonb>(10)? {
            Some(r) => RetryPolicy::parse(&r.to_value("retry_policy")?)?,
            None => RetryPolicy::default(),
        },
        ..Options::default()
    };
    let payload: Option<RawJsonb> = row.get(3)?;
    let first: i64 = col_req(&row, 11)?;
    let keep = usize::try_from(guc::SCHEDULE_CATCHUP.get()).unwrap_or(1).max(1);
    let (due, missed) = due_times(&cron, first, now, keep)?;
    // Each due time is one execution; its unique key names the due time.
    let per_due: Vec<Options> =
        due.iter().map(|t| Options { unique_key: Some(format!("schedule:{id}:{t}")), ..options.clone() }).collect();
    let rows: Vec<NewRow<'_>> = per_due
        .iter()
        .map(|o| NewRow { options: o, execution_id: None, payload, node_name: None, member: false, blocked: false })
        .collect();
    exec::create(c, &rows, None)?;
    let next = next_after(&cron, now)?;
    exec(
        c,
        "UPDATE ff_schedule SET next_due_at_ms = coalesce($2, 9223372036854775807), last_due_at_ms = $3,
             runs = runs + $4, missed = missed + $5, updated_at_ms = $6
         WHERE schedule_id = $1",
        &[id.into(), next.into(), due.last().copied().into(), (due.len() as i64).into(), missed.into(), now.into()],
    )?;
    Ok(Some(Ran { created: due.len() as i64, missed }))
}

/// Schedules due now, oldest first (no locks; `run_one` takes each).
pub fn due_now(c: &mut SpiClient<'_>, now: i64, limit: i64) -> FfResult<Vec<String>> {
    let t = exec(
        c,
        "SELECT schedule_id FROM ff_schedule WHERE next_due_at_ms <= $1 ORDER BY next_due_at_ms LIMIT $2",
        &[now.into(), limit.into()],
    )?;
    Ok(t.filter_map(|r| r.get::<String>(1).ok().flatten()).collect())
}

/// A summary for `ff_run_reconcilers()`.
pub fn summary(ran: i64, created: i64, missed: i64, errors: i64) -> Value {
    json!({"schedules": ran, "created": created, "missed": missed, "errors": errors})
}

/// Creates (or redefines) a schedule: each due time of `cron` (UTC; five
/// fields, or six with seconds first) creates one execution on `lane_id`
/// with these options. Returns 'created', 'updated' or 'already_satisfied'.
#[pg_extern(volatile, parallel_unsafe, security_definer, name = "ff_create_schedule")]
#[search_path(@extschema@, pg_temp)]
#[allow(clippy::too_many_arguments)]
fn sql_create_schedule(
    schedule_id: Option<String>,
    cron: Option<String>,
    lane_id: Option<String>,
    payload: default!(Option<RawJsonb>, "NULL"),
    priority: default!(Option<i32>, 0),
    required_capabilities: default!(Option<Vec<Option<String>>>, "'{}'"),
    budget_ids: default!(Option<Vec<Option<String>>>, "'{}'"),
    quota_policy_id: default!(Option<String>, "NULL"),
    max_attempts: default!(Option<i32>, 1),
    budget_reserve: default!(Option<RawJsonb>, "NULL"),
    retry_policy: default!(Option<RawJsonb>, "NULL"),
) -> &'static str {
    (|| {
        let options = exec::options_from_args(
            lane_id, priority, required_capabilities, budget_ids, quota_policy_id, None, None, max_attempts,
            budget_reserve, None, retry_policy,
        )?;
        create_schedule(&NewSchedule {
            id: required(schedule_id, "schedule_id")?,
            cron: required(cron, "cron")?,
            options,
            payload,
            reserve: budget_reserve,
            retry: retry_policy,
        })
    })()
    .or_raise()
}

/// Removes a schedule: 'dropped' or 'not_found'. Executions it created stay.
#[pg_extern(volatile, parallel_unsafe, security_definer, name = "ff_drop_schedule")]
#[search_path(@extschema@, pg_temp)]
fn sql_drop_schedule(schedule_id: Option<String>) -> &'static str {
    (|| drop_schedule(&required(schedule_id, "schedule_id")?))().or_raise()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;

    #[test]
    fn five_and_six_fields() {
        assert!(parse_cron("*/5 * * * *").is_ok());
        assert!(parse_cron("*/2 * * * * *").is_ok());
        for bad in ["", "* * * *", "* * * * * * *", "61 * * * *", "a b c d e", "* * * * * 2030"] {
            assert!(parse_cron(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn next_due_times_are_utc() {
        let every_5 = parse_cron("*/5 * * * *").unwrap();
        // 2026-01-01T00:00:00Z = 1767225600000
        let start = 1_767_225_600_000;
        assert_eq!(next_after(&every_5, start).unwrap(), Some(start + 5 * MIN));
        assert_eq!(next_after(&every_5, start + 1).unwrap(), Some(start + 5 * MIN));
        let seconds = parse_cron("*/2 * * * * *").unwrap();
        assert_eq!(next_after(&seconds, start).unwrap(), Some(start + 2_000));
        let nine_utc = parse_cron("0 9 * * *").unwrap();
        assert_eq!(next_after(&nine_utc, start).unwrap(), Some(start + 9 * 60 * MIN));
    }

    #[test]
    fn catch_up_keeps_the_latest_and_counts_the_rest() {
        let every_min = parse_cron("* * * * *").unwrap();
        let start = 1_767_225_600_000;
        let (due, missed) = due_times(&every_min, start, start + 10 * MIN, 3).unwrap();
        assert_eq!(due, vec![start + 8 * MIN, start + 9 * MIN, start + 10 * MIN]);
        assert_eq!(missed, 8);
        let (due, missed) = due_times(&every_min, start, start + 30_000, 3).unwrap();
        assert_eq!((due, missed), (vec![start], 0));
    }
}
