//! Entry points of earlier versions' SQL functions.
//!
//! A C symbol is never reused with a different SQL signature: 0.3 functions
//! are `sql_*_wrapper`, while 0.1.0 and 0.2.0 bound their SQL to
//! `ff_*_wrapper`. Between installing a new library and `ALTER EXTENSION
//! flowfabric UPDATE`, a database's old functions still call those names;
//! each answers with the version error (55000) instead of unboxing arguments
//! laid out for another signature. The old upgrade scripts also need the
//! names to exist: `CREATE FUNCTION ... LANGUAGE c` checks the symbol.
//!
//! When a later version changes a function's SQL signature, rename its Rust
//! function (and so its symbol) and add the old name here.

use crate::error::{FfError, FfResult};
use pgrx::pg_sys;

/// The answer of every retired entry point.
fn refuse() -> FfResult<()> {
    crate::db::with_spi(|_| Ok(()))?;
    Err(FfError::wrong_state(format!(
        "this function belongs to an earlier flowfabric version's SQL, which the installed library ({}) does not run",
        env!("CARGO_PKG_VERSION")
    ))
    .with_detail(
        "run ALTER EXTENSION flowfabric UPDATE (as a superuser); a new database takes CREATE EXTENSION flowfabric without VERSION",
    ))
}

macro_rules! retired {
    ($($symbol:ident / $finfo:ident),* $(,)?) => {$(
        #[unsafe(no_mangle)]
        pub extern "C-unwind" fn $finfo() -> *const pg_sys::Pg_finfo_record {
            static V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
            &V1
        }

        #[unsafe(no_mangle)]
        #[pgrx::pg_guard]
        pub extern "C-unwind" fn $symbol(_fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
            use crate::error::OrRaise;
            refuse().or_raise();
            pg_sys::Datum::from(0)
        }
    )*};
}

retired! {
    ff_add_execution_to_flow_wrapper / pg_finfo_ff_add_execution_to_flow_wrapper,
    ff_apply_dependency_to_child_wrapper / pg_finfo_ff_apply_dependency_to_child_wrapper,
    ff_cancel_flow_wrapper / pg_finfo_ff_cancel_flow_wrapper,
    ff_claim_for_worker_wrapper / pg_finfo_ff_claim_for_worker_wrapper,
    ff_complete_execution_wrapper / pg_finfo_ff_complete_execution_wrapper,
    ff_create_budget_wrapper / pg_finfo_ff_create_budget_wrapper,
    ff_create_execution_wrapper / pg_finfo_ff_create_execution_wrapper,
    ff_create_flow_wrapper / pg_finfo_ff_create_flow_wrapper,
    ff_create_quota_policy_wrapper / pg_finfo_ff_create_quota_policy_wrapper,
    ff_dispatch_completion_wrapper / pg_finfo_ff_dispatch_completion_wrapper,
    ff_fail_execution_wrapper / pg_finfo_ff_fail_execution_wrapper,
    ff_get_budget_status_wrapper / pg_finfo_ff_get_budget_status_wrapper,
    ff_get_execution_wrapper / pg_finfo_ff_get_execution_wrapper,
    ff_lane_channel_wrapper / pg_finfo_ff_lane_channel_wrapper,
    ff_reconcile_tick_wrapper / pg_finfo_ff_reconcile_tick_wrapper,
    ff_record_spend_wrapper / pg_finfo_ff_record_spend_wrapper,
    ff_release_budget_wrapper / pg_finfo_ff_release_budget_wrapper,
    ff_renew_lease_wrapper / pg_finfo_ff_renew_lease_wrapper,
    ff_report_usage_admin_wrapper / pg_finfo_ff_report_usage_admin_wrapper,
    ff_report_usage_wrapper / pg_finfo_ff_report_usage_wrapper,
    ff_reset_budget_wrapper / pg_finfo_ff_reset_budget_wrapper,
    ff_rotate_hmac_secret_wrapper / pg_finfo_ff_rotate_hmac_secret_wrapper,
    ff_run_reconcilers_wrapper / pg_finfo_ff_run_reconcilers_wrapper,
    ff_set_edge_group_policy_wrapper / pg_finfo_ff_set_edge_group_policy_wrapper,
    ff_stage_dependency_edge_wrapper / pg_finfo_ff_stage_dependency_edge_wrapper,
    ff_verify_grant_wrapper / pg_finfo_ff_verify_grant_wrapper,
}
