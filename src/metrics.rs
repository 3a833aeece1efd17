//! Cumulative counters for scraping (`ff_metrics`): per lane, how many
//! executions were created, claimed, completed, failed, expired and retried;
//! per reconciler, the totals of its counts. Each backend adds to its own row
//! per lane (its backend id is the slot), so counting never makes two
//! transactions wait for each other. `flowfabric.metrics = off` skips it.

use crate::db::exec;
use crate::error::FfResult;
use crate::guc;
use pgrx::pg_sys;
use pgrx::spi::SpiClient;
use serde_json::Value;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    Created = 0,
    Claimed = 1,
    Completed = 2,
    Failed = 3,
    Expired = 4,
    Retried = 5,
}

/// Counts gathered in one call, added in one statement.
#[derive(Debug, Default)]
pub struct Tally(BTreeMap<String, [i64; 6]>);

impl Tally {
    pub fn add(&mut self, lane: &str, counter: Counter, n: i64) {
        if n != 0 {
            self.0.entry(lane.to_string()).or_default()[counter as usize] += n;
        }
    }

    /// Adds the tally to this backend's rows.
    pub fn flush(self, c: &mut SpiClient<'_>) -> FfResult<()> {
        if self.0.is_empty() {
            return Ok(());
        }
        let Some(slot) = slot() else { return Ok(()) };
        let lanes: Vec<String> = self.0.keys().cloned().collect();
        let column = |i: usize| -> Vec<i64> { self.0.values().map(|v| v[i]).collect() };
        exec(
            c,
            "INSERT INTO ff_lane_counter AS c (lane_id, slot, created, claimed, completed, failed, expired, retried)
             SELECT t.lane, $2, t.cr, t.cl, t.co, t.fa, t.ex, t.re
             FROM unnest($1::text[], $3::bigint[], $4::bigint[], $5::bigint[], $6::bigint[], $7::bigint[], $8::bigint[])
                  AS t(lane, cr, cl, co, fa, ex, re)
             ON CONFLICT (lane_id, slot) DO UPDATE SET
                 created = c.created + EXCLUDED.created, claimed = c.claimed + EXCLUDED.claimed,
                 completed = c.completed + EXCLUDED.completed, failed = c.failed + EXCLUDED.failed,
                 expired = c.expired + EXCLUDED.expired, retried = c.retried + EXCLUDED.retried",
            &[
                lanes.into(),
                slot.into(),
                column(0).into(),
                column(1).into(),
                column(2).into(),
                column(3).into(),
                column(4).into(),
                column(5).into(),
            ],
        )?;
        Ok(())
    }
}

/// This backend's counter slot, or `None` when metrics are off. Hot
/// statements (lease, finish) take it as a parameter and add their own
/// counts in a CTE, which saves the separate upsert a `Tally` costs.
pub fn slot() -> Option<i32> {
    // SAFETY: a plain read of this backend's id.
    guc::METRICS.get().then(|| unsafe { pg_sys::MyBackendId })
}

/// Adds one counter to this backend's row for `lane`.
pub fn count(c: &mut SpiClient<'_>, lane: &str, counter: Counter, n: i64) -> FfResult<()> {
    let mut t = Tally::default();
    t.add(lane, counter, n);
    t.flush(c)
}

/// Adds a reconciler pass's counts (`{"reconciler": {"counter": n}}`) to
/// the totals.
pub fn add_pass(c: &mut SpiClient<'_>, pass: &Value) -> FfResult<()> {
    if !guc::METRICS.get() {
        return Ok(());
    }
    let (mut names, mut counters, mut values) = (Vec::new(), Vec::new(), Vec::new());
    for (reconciler, counts) in pass.as_object().into_iter().flatten() {
        for (counter, v) in counts.as_object().into_iter().flatten() {
            if let Some(n) = v.as_i64().filter(|n| *n != 0) {
                names.push(reconciler.clone());
                counters.push(counter.clone());
                values.push(n);
            }
        }
    }
    if names.is_empty() {
        return Ok(());
    }
    exec(
        c,
        "INSERT INTO ff_reconciler_total AS t (reconciler, counter, value)
         SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[])
         ON CONFLICT (reconciler, counter) DO UPDATE SET value = t.value + EXCLUDED.value",
        &[names.into(), counters.into(), values.into()],
    )?;
    Ok(())
}
