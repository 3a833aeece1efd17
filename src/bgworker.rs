//! Background workers. With the library in `shared_preload_libraries`, a
//! launcher (connected to no database, only the shared catalogs) starts one
//! reconciler per database listed in `flowfabric.database` as soon as that
//! database exists, and starts it again if it stops. A database created
//! later is picked up within one interval, quietly. Each reconciler runs
//! `ff_run_reconcilers()` every `flowfabric.reconciler_interval_ms` in its
//! own transaction; errors are logged and recorded in `ff_reconciler_status`
//! and the worker goes on.

use crate::db::in_subtransaction;
use crate::guc;
use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BackgroundWorkerStatus, BgWorkerStartTime, DynamicBackgroundWorker,
    SignalWakeFlags,
};
use pgrx::prelude::*;
use pgrx::JsonB;
use std::collections::HashMap;
use std::time::Duration;

/// Registers the launcher; only possible while shared_preload_libraries load.
pub fn register() {
    if !unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        return;
    }
    BackgroundWorkerBuilder::new("flowfabric launcher")
        .set_type("flowfabric launcher")
        .set_library("flowfabric")
        .set_function("ff_launcher_main")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(Duration::from_secs(5)))
        .load();
}

fn interval() -> Duration {
    Duration::from_millis(guc::RECONCILER_INTERVAL_MS.get().max(10) as u64)
}

/// The names of the databases that accept connections. The launcher is
/// connected to no database, so it reads the shared catalog pg_database with
/// a plain heap scan, as PostgreSQL's own autovacuum launcher does: a lookup
/// through its name index could need pg_class, which only a connection to a
/// database can read (right after a start, before the shared relation cache
/// is written, that failed with FATAL).
fn database_names() -> Vec<String> {
    BackgroundWorker::transaction(|| unsafe {
        // SAFETY: pg_database is a shared, always-built catalog relation;
        // the scan runs inside a transaction, and every tuple it returns is
        // a pg_database row, read only before the next heap_getnext.
        let lock = pg_sys::AccessShareLock as pg_sys::LOCKMODE;
        let rel = pg_sys::table_open(pg_sys::DatabaseRelationId, lock);
        let scan = pg_sys::table_beginscan_catalog(rel, 0, std::ptr::null_mut());
        let mut names = Vec::new();
        loop {
            let tuple = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
            if tuple.is_null() {
                break;
            }
            let form = pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_database>(tuple);
            if (*form).datallowconn {
                names.push(std::ffi::CStr::from_ptr((*form).datname.data.as_ptr()).to_string_lossy().into_owned());
            }
        }
        pg_sys::table_endscan(scan);
        pg_sys::table_close(rel, lock);
        names
    })
}

fn launch(db: &str) -> Option<DynamicBackgroundWorker> {
    BackgroundWorkerBuilder::new(&format!("flowfabric reconciler [{db}]"))
        .set_type("flowfabric reconciler")
        .set_library("flowfabric")
        .set_function("ff_reconciler_main")
        .set_extra(db)
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(None)
        .load_dynamic()
        .ok()
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn ff_launcher_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    BackgroundWorker::connect_worker_to_spi(None, None);
    let mut running: HashMap<String, DynamicBackgroundWorker> = HashMap::new();
    let mut waiting_logged: Vec<String> = Vec::new();
    loop {
        if BackgroundWorker::sighup_received() {
            // SAFETY: the documented way for a worker to apply a reload.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        let mut existing: Option<Vec<String>> = None;
        for db in guc::databases() {
            let alive = running.get(&db).is_some_and(|w| !matches!(w.pid(), Err(BackgroundWorkerStatus::Stopped)));
            if alive {
                continue;
            }
            running.remove(&db);
            if !existing.get_or_insert_with(database_names).contains(&db) {
                if !waiting_logged.contains(&db) {
                    log!("flowfabric launcher: database \"{db}\" does not exist yet; waiting for it");
                    waiting_logged.push(db);
                }
                continue;
            }
            match launch(&db) {
                Some(worker) => {
                    running.insert(db, worker);
                }
                None => warning!("flowfabric launcher: could not start a reconciler for \"{db}\" (max_worker_processes?)"),
            }
        }
        if !BackgroundWorker::wait_latch(Some(interval())) {
            break;
        }
    }
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn ff_reconciler_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let db = BackgroundWorker::get_extra().to_string();
    BackgroundWorker::connect_worker_to_spi(Some(&db), None);
    log!("flowfabric reconciler started in database \"{db}\"");
    loop {
        if !BackgroundWorker::wait_latch(Some(interval())) {
            break;
        }
        if BackgroundWorker::sighup_received() {
            // SAFETY: the documented way for a worker to apply a reload.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        if guc::ENABLE_RECONCILER.get() {
            BackgroundWorker::transaction(one_pass);
        }
    }
    log!("flowfabric reconciler in database \"{db}\" stopping");
}

/// Every statement the worker runs resolves names only through pg_catalog
/// and the extension's own schema: the worker is a superuser, and any other
/// schema on its path (public, say) could hold a look-alike operator that
/// would then run with its rights. Set first thing in every transaction.
const PINNED_PATH: &str = "SET LOCAL search_path = flowfabric, pg_temp";

fn extension_installed() -> bool {
    Spi::get_one::<bool>(
        "SELECT EXISTS (SELECT FROM pg_catalog.pg_extension
                        WHERE extname OPERATOR(pg_catalog.=) 'flowfabric')",
    )
    .ok()
    .flatten()
    .unwrap_or(false)
}

fn one_pass() {
    if Spi::run(PINNED_PATH).is_err() || !extension_installed() {
        return;
    }
    let pass = in_subtransaction(|| Spi::get_one::<JsonB>("SELECT ff_run_reconcilers()"));
    let (counts, error) = match pass {
        Ok(Ok(counts)) => (counts.map(|j| j.0), None),
        Ok(Err(e)) => (None, Some(e.to_string())),
        Err(report) => (None, Some(report.message().to_string())),
    };
    if let Some(e) = &error {
        warning!("flowfabric reconciler pass failed: {e}");
    }
    record_status(counts, error);
}

fn record_status(counts: Option<serde_json::Value>, error: Option<String>) {
    let sql = "INSERT INTO ff_reconciler_status AS s (runner, pid, last_pass_at_ms, passes, last_counts,
             last_error, last_error_at_ms, errors)
         VALUES ('bgworker', pg_backend_pid(), (extract(epoch FROM clock_timestamp()) * 1000)::bigint, 1, $1,
                 $2, CASE WHEN $2 IS NULL THEN NULL ELSE (extract(epoch FROM clock_timestamp()) * 1000)::bigint END,
                 CASE WHEN $2 IS NULL THEN 0 ELSE 1 END)
         ON CONFLICT (runner) DO UPDATE SET pid = EXCLUDED.pid, last_pass_at_ms = EXCLUDED.last_pass_at_ms,
             passes = s.passes + 1, last_counts = coalesce(EXCLUDED.last_counts, s.last_counts),
             last_error = coalesce(EXCLUDED.last_error, s.last_error),
             last_error_at_ms = coalesce(EXCLUDED.last_error_at_ms, s.last_error_at_ms),
             errors = s.errors + EXCLUDED.errors";
    let recorded = in_subtransaction(|| Spi::run_with_args(sql, &[counts.map(JsonB).into(), error.into()]));
    if !matches!(recorded, Ok(Ok(()))) {
        warning!("flowfabric reconciler could not record its status");
    }
}
