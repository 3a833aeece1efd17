//! One error type for the whole extension. Every failure a caller can see is
//! an `FfError` carrying a SQLSTATE; the `#[pg_extern]` wrappers raise it with
//! `ereport`, so no Rust panic ever reaches the server.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FfError {
    pub code: PgSqlErrorCode,
    pub message: String,
    pub detail: Option<String>,
}

pub type FfResult<T> = Result<T, FfError>;

impl FfError {
    pub fn new(code: PgSqlErrorCode, message: impl Into<String>) -> Self {
        FfError { code, message: message.into(), detail: None }
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// 22023: an argument has a value the function cannot accept.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, message)
    }

    /// 22004: a required argument is NULL.
    pub fn null_arg(name: &str) -> Self {
        Self::new(
            PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
            format!("argument \"{name}\" must not be NULL"),
        )
    }

    /// 22003: arithmetic on a counter would overflow bigint.
    pub fn out_of_range(message: impl Into<String>) -> Self {
        Self::new(PgSqlErrorCode::ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE, message)
    }

    /// P0002: the named object does not exist.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(PgSqlErrorCode::ERRCODE_NO_DATA_FOUND, message)
    }

    /// 23505: the object already exists.
    pub fn duplicate(message: impl Into<String>) -> Self {
        Self::new(PgSqlErrorCode::ERRCODE_UNIQUE_VIOLATION, message)
    }

    /// 40001: a compare-and-swap lost (stale graph revision); retry after re-reading.
    pub fn stale(message: impl Into<String>) -> Self {
        Self::new(PgSqlErrorCode::ERRCODE_T_R_SERIALIZATION_FAILURE, message)
    }

    /// 55000: the object is not in a state that allows the operation.
    pub fn wrong_state(message: impl Into<String>) -> Self {
        Self::new(PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE, message)
    }

    /// 28000: a grant or key does not authorise the caller.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(PgSqlErrorCode::ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION, message)
    }

    /// XX000: an engine invariant broke; never caused by caller input.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, message)
    }

    /// Raises the error in the server; the caller's (sub)transaction aborts,
    /// so nothing this call wrote survives.
    pub fn raise(self) -> ! {
        let mut report = ErrorReport::new(self.code, self.message, "flowfabric");
        if let Some(detail) = self.detail {
            report = report.set_detail(detail);
        }
        report.report(PgLogLevel::ERROR);
        unreachable!("ereport(ERROR) returned")
    }
}

impl fmt::Display for FfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<pgrx::spi::Error> for FfError {
    fn from(e: pgrx::spi::Error) -> Self {
        FfError::internal(format!("SPI failure: {e}"))
    }
}

/// Unwraps a result inside a `#[pg_extern]` wrapper, raising the error.
pub trait OrRaise<T> {
    fn or_raise(self) -> T;
}

impl<T> OrRaise<T> for FfResult<T> {
    fn or_raise(self) -> T {
        match self {
            Ok(v) => v,
            Err(e) => e.raise(),
        }
    }
}

/// Turns a nullable SQL argument into a value, or a 22004 error naming it.
pub fn required<T>(value: Option<T>, name: &str) -> FfResult<T> {
    value.ok_or_else(|| FfError::null_arg(name))
}
