//! In-database tests (`#[pg_test]`): each runs inside a transaction that is
//! rolled back afterwards, and talks to the extension through SQL only.

mod budget;
mod claim;
mod flow;
mod json;
mod reconcile;
mod schema;
mod surface;

use pgrx::prelude::*;

/// Runs `sql` and returns the SQLSTATE it failed with, or `None` when it
/// succeeded. The statement runs in a subtransaction so the test goes on.
pub fn sqlstate_of(sql: &str) -> Option<String> {
    match crate::db::in_subtransaction(|| Spi::run(sql)) {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(format!("spi: {e}")),
        Err(report) => Some(format!("{:?}", report.sql_error_code())),
    }
}

/// The first column of the first row of a query; `None` for no row or NULL.
pub fn one<T: FromDatum + IntoDatum>(sql: &str) -> Option<T> {
    Spi::connect_mut(|c| {
        let t = c.update(sql, None, &[]).expect("query failed");
        if t.is_empty() {
            None
        } else {
            t.first().get::<T>(1).expect("column 1")
        }
    })
}

/// Asserts that `sql` fails with SQLSTATE `code` (as `ERRCODE_...` name).
pub fn assert_fails(sql: &str, code: &str) {
    let got = sqlstate_of(sql);
    assert_eq!(got.as_deref(), Some(code), "expected {sql} to fail with {code}");
}
