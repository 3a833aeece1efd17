//! Server settings (GUCs), all under the `flowfabric.` prefix.

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use std::ffi::CString;

/// How long a retired HMAC kid keeps verifying grants.
pub static KEY_GRACE_MS: GucSetting<i32> = GucSetting::<i32>::new(86_400_000);
/// Whether the background worker runs reconciler passes.
pub static ENABLE_RECONCILER: GucSetting<bool> = GucSetting::<bool>::new(true);
/// Pause between two passes of the background worker.
pub static RECONCILER_INTERVAL_MS: GucSetting<i32> = GucSetting::<i32>::new(1_000);
/// How long finished executions and flows are kept before the reconciler
/// deletes them (0 keeps them forever). i32 milliseconds cap at ~24.8 days,
/// so this one counts seconds.
pub static RETENTION_S: GucSetting<i32> = GucSetting::<i32>::new(7 * 86_400);
/// How long a usage dedup key is remembered.
pub static DEDUP_TTL_S: GucSetting<i32> = GucSetting::<i32>::new(86_400);
/// Whether per-lane counters (ff_metrics) are kept.
pub static METRICS: GucSetting<bool> = GucSetting::<bool>::new(true);
/// Most missed due times of one schedule that a reconciler pass catches up.
pub static SCHEDULE_CATCHUP: GucSetting<i32> = GucSetting::<i32>::new(100);
/// Comma-separated databases the background worker serves.
pub static DATABASE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"postgres"));

pub fn key_grace_ms() -> i64 {
    i64::from(KEY_GRACE_MS.get())
}

pub fn dedup_ttl_ms() -> i64 {
    i64::from(DEDUP_TTL_S.get()) * 1000
}

pub fn retention_ms() -> i64 {
    i64::from(RETENTION_S.get()) * 1000
}

/// Databases listed in `flowfabric.database`, trimmed, without empties.
pub fn databases() -> Vec<String> {
    DATABASE
        .get()
        .map(|s| s.to_string_lossy().split(',').map(|d| d.trim().to_string()).filter(|d| !d.is_empty()).collect())
        .unwrap_or_default()
}

pub fn register() {
    GucRegistry::define_int_guc(
        c"flowfabric.key_grace_ms",
        c"How long a retired HMAC key id keeps verifying claim grants, in milliseconds.",
        c"After rotation the previous kid verifies until retired_at_ms + this; then grants signed with it answer unknown_kid.",
        &KEY_GRACE_MS,
        0,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_bool_guc(
        c"flowfabric.enable_reconciler",
        c"Whether the flowfabric background worker runs reconciler passes.",
        c"Takes effect on reload (SIGHUP). The worker keeps running and idles while off.",
        &ENABLE_RECONCILER,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"flowfabric.retention_s",
        c"How long finished executions and flows are kept before reconcilers delete them, in seconds.",
        c"0 keeps them forever. Applies to terminal executions and to flows whose members all finished.",
        &RETENTION_S,
        0,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"flowfabric.dedup_ttl_s",
        c"How long a usage dedup key (or record_spend idempotency key) is remembered, in seconds.",
        c"A key seen again within this window replays; expired keys are purged by the reconcilers.",
        &DEDUP_TTL_S,
        1,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_bool_guc(
        c"flowfabric.metrics",
        c"Whether flowfabric keeps per-lane counters for ff_metrics.",
        c"Each claim, completion and creation adds to a per-backend counter row; off skips that write.",
        &METRICS,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"flowfabric.schedule_catchup",
        c"Most missed due times of one schedule that a reconciler pass turns into executions.",
        c"After downtime, a schedule runs its latest this-many missed due times and counts the older ones as missed.",
        &SCHEDULE_CATCHUP,
        1,
        100_000,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"flowfabric.reconciler_interval_ms",
        c"Pause between two reconciler passes of the background worker, in milliseconds.",
        c"Takes effect on reload (SIGHUP).",
        &RECONCILER_INTERVAL_MS,
        10,
        3_600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    // A server-start setting can only be defined while shared_preload_libraries
    // load (PostgreSQL refuses it later); it only matters to the worker anyway.
    if !unsafe { pgrx::pg_sys::process_shared_preload_libraries_in_progress } {
        return;
    }
    GucRegistry::define_string_guc(
        c"flowfabric.database",
        c"Comma-separated databases in which the flowfabric background worker runs reconcilers.",
        c"Read at server start; one worker per database. Databases without the extension are skipped.",
        &DATABASE,
        GucContext::Postmaster,
        GucFlags::default(),
    );
}
