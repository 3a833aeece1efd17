//! flowfabric: a durable execution engine inside PostgreSQL.
//!
//! Each domain has its own module with its pure logic, the SPI operations
//! built on it, and thin `#[pg_extern]` wrappers. Schema SQL lives in `sql/`.

use pgrx::prelude::*;

pub mod bgworker;
pub mod budget;
pub mod claim;
pub mod crypto;
pub mod db;
pub mod dispatch;
pub mod error;
pub mod exec;
pub mod flow;
pub mod guc;
pub mod ids;
pub mod jsonb;
pub mod keystore;
pub mod lanes;
pub mod metrics;
pub mod quota;
pub mod reconcile;
pub mod retired;
pub mod schedule;

#[cfg(any(test, feature = "pg_test"))]
mod pg_tests;

::pgrx::pg_module_magic!(name, version);

extension_sql_file!("../sql/config.sql", name = "config", bootstrap);
extension_sql_file!("../sql/budget.sql", name = "budget_schema", requires = ["config"]);
extension_sql_file!("../sql/exec.sql", name = "exec_schema", requires = ["config"]);
extension_sql_file!("../sql/flow.sql", name = "flow_schema", requires = ["exec_schema"]);
extension_sql_file!("../sql/schedule.sql", name = "schedule_schema", requires = ["config"]);
extension_sql_file!("../sql/ops.sql", name = "ops_schema", requires = ["flow_schema", "budget_schema", "schedule_schema"]);
extension_sql_file!("../sql/triggers.sql", name = "triggers", requires = ["ops_schema"]);
extension_sql_file!("../sql/views.sql", name = "views", requires = ["ops_schema"]);
extension_sql_file!("../sql/finalize.sql", name = "finalize", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    guc::register();
    bgworker::register();
}

/// Hooks for `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    /// Tests call the API unqualified, as a client with `flowfabric` on its
    /// search_path does.
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec!["search_path = 'flowfabric'"]
    }
}
