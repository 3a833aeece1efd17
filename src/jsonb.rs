//! `RawJsonb`: a jsonb argument kept as the caller's datum. Payloads and
//! results pass straight through to SPI without a round trip through text
//! and serde (no size or nesting limit of ours), and the few arguments we
//! must inspect are parsed with errors that become 22023, never a panic.

use crate::error::{FfError, FfResult};
use pgrx::callconv::{Arg, ArgAbi};
use pgrx::pg_sys;
use pgrx::pgrx_sql_entity_graph::metadata::{
    ArgumentError, ReturnsError, ReturnsRef, SqlMappingRef, SqlTranslatable, TypeOrigin,
};
use pgrx::{FromDatum, IntoDatum};
use serde_json::Value;

/// A jsonb value owned by the current function call.
#[derive(Debug, Clone, Copy)]
pub struct RawJsonb(pg_sys::Datum);

impl RawJsonb {
    /// The value as `serde_json`; deeply nested or otherwise unreadable
    /// input is a 22023 error naming `what`.
    pub fn to_value(self, what: &str) -> FfResult<Value> {
        // SAFETY: the datum is a valid jsonb for the duration of the call;
        // jsonb_out returns a palloc'd C string in the current context.
        let text = unsafe { pgrx::direct_function_call::<&core::ffi::CStr>(pg_sys::jsonb_out, &[Some(self.0)]) }
            .ok_or_else(|| FfError::internal("jsonb_out returned NULL"))?;
        let parsed = text
            .to_str()
            .map_err(|_| FfError::invalid(format!("{what} is not valid UTF-8")))
            .and_then(|t| serde_json::from_str(t).map_err(|e| FfError::invalid(format!("{what} is not usable JSON: {e}"))));
        // SAFETY: the string came from palloc and nothing refers to it any more.
        unsafe { pg_sys::pfree(text.as_ptr() as *mut core::ffi::c_void) };
        parsed
    }
}

impl FromDatum for RawJsonb {
    unsafe fn from_polymorphic_datum(datum: pg_sys::Datum, is_null: bool, _: pg_sys::Oid) -> Option<Self> {
        (!is_null).then_some(RawJsonb(datum))
    }
}

impl IntoDatum for RawJsonb {
    fn into_datum(self) -> Option<pg_sys::Datum> {
        Some(self.0)
    }
    fn type_oid() -> pg_sys::Oid {
        pg_sys::JSONBOID
    }
}

unsafe impl<'fcx> ArgAbi<'fcx> for RawJsonb {
    unsafe fn unbox_arg_unchecked(arg: Arg<'_, 'fcx>) -> Self {
        let index = arg.index();
        unsafe { arg.unbox_arg_using_from_datum() }.unwrap_or_else(|| panic!("argument {index} must not be null"))
    }
}

unsafe impl SqlTranslatable for RawJsonb {
    const TYPE_IDENT: &'static str = pgrx::pgrx_resolved_type!(RawJsonb);
    const TYPE_ORIGIN: TypeOrigin = TypeOrigin::External;
    const ARGUMENT_SQL: Result<SqlMappingRef, ArgumentError> = Ok(SqlMappingRef::literal("jsonb"));
    const RETURN_SQL: Result<ReturnsRef, ReturnsError> = Ok(ReturnsRef::One(SqlMappingRef::literal("jsonb")));
}
