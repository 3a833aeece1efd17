//! `RawJsonb`: a jsonb argument kept as the caller's datum. Payloads and
//! results pass straight through to SPI without a round trip through text
//! and serde (no size or nesting limit of ours), and the few arguments we
//! must inspect are parsed with errors that become 22023, never a panic.

use crate::error::{FfError, FfResult};
use pgrx::callconv::{Arg, ArgAbi, BoxRet, FcInfo};
use pgrx::datum::Datum;
use pgrx::spi::SpiTupleTable;
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

impl RawJsonb {
    /// Column `ordinal` of the current SPI row, handed over as it is stored:
    /// detoasted and copied into the memory context of the function's caller,
    /// so it outlives the SPI connection. No parse, no re-encode, so any
    /// depth and any numeric survive exactly.
    pub fn from_spi(table: &SpiTupleTable<'_>, ordinal: usize) -> FfResult<Option<RawJsonb>> {
        let Some(datum) = table.get_datum_by_ordinal(ordinal)? else { return Ok(None) };
        // SAFETY: the datum is a jsonb varlena of the current SPI row;
        // pg_detoast_datum returns a flat copy (or the datum itself when
        // already flat) and SPI_datumTransfer copies it to the upper context.
        unsafe {
            let flat = pg_sys::pg_detoast_datum(datum.cast_mut_ptr());
            let moved = pg_sys::SPI_datumTransfer(pg_sys::Datum::from(flat), false, -1);
            Ok(Some(RawJsonb(moved)))
        }
    }
}

// SAFETY: the datum is a valid jsonb in a context that outlives the call
// (see `from_spi`, or an argument of the current call).
unsafe impl BoxRet for RawJsonb {
    unsafe fn box_into<'fcx>(self, fcinfo: &mut FcInfo<'fcx>) -> Datum<'fcx> {
        unsafe { fcinfo.return_raw_datum(self.0) }
    }
}

impl FromDatum for RawJsonb {
    unsafe fn from_polymorphic_datum(datum: pg_sys::Datum, is_null: bool, _: pg_sys::Oid) -> Option<Self> {
        (!is_null).then_some(RawJsonb(datum))
    }

    /// What SPI row readers use: a flat copy in `memory_context`, so the
    /// value outlives the SPI connection it was read through.
    unsafe fn from_datum_in_memory_context(
        mut memory_context: pgrx::PgMemoryContexts,
        datum: pg_sys::Datum,
        is_null: bool,
        _typoid: pg_sys::Oid,
    ) -> Option<Self> {
        if is_null {
            return None;
        }
        // SAFETY: the datum is a jsonb varlena; the copy is made in the target context.
        memory_context.switch_to(|_| unsafe {
            Some(RawJsonb(pg_sys::Datum::from(pg_sys::pg_detoast_datum_copy(datum.cast_mut_ptr()))))
        })
    }
}

/// A `jsonb[]` argument kept as the caller's datum; its elements come out
/// as `RawJsonb`s without any parsing.
#[derive(Debug, Clone, Copy)]
pub struct RawJsonbArray(pg_sys::Datum);

impl RawJsonbArray {
    /// The elements in order (`None` for SQL NULLs). They point into the
    /// argument and are valid for the current call.
    pub fn elements(self) -> Vec<Option<RawJsonb>> {
        // SAFETY: the datum is a one-dimensional jsonb[] (the function's
        // declared argument type); deconstruct_array reads it with jsonb's
        // storage parameters (varlena, 4-byte alignment).
        unsafe {
            let array = pg_sys::pg_detoast_datum(self.0.cast_mut_ptr()) as *mut pg_sys::ArrayType;
            let mut values: *mut pg_sys::Datum = std::ptr::null_mut();
            let mut nulls: *mut bool = std::ptr::null_mut();
            let mut n: i32 = 0;
            pg_sys::deconstruct_array(array, pg_sys::JSONBOID, -1, false, pg_sys::TYPALIGN_INT as core::ffi::c_char, &mut values, &mut nulls, &mut n);
            (0..n as usize)
                .map(|i| (!*nulls.add(i)).then(|| RawJsonb(*values.add(i))))
                .collect()
        }
    }
}

impl FromDatum for RawJsonbArray {
    unsafe fn from_polymorphic_datum(datum: pg_sys::Datum, is_null: bool, _: pg_sys::Oid) -> Option<Self> {
        (!is_null).then_some(RawJsonbArray(datum))
    }
}

impl IntoDatum for RawJsonbArray {
    fn into_datum(self) -> Option<pg_sys::Datum> {
        Some(self.0)
    }
    fn type_oid() -> pg_sys::Oid {
        pg_sys::JSONBARRAYOID
    }
}

unsafe impl<'fcx> ArgAbi<'fcx> for RawJsonbArray {
    unsafe fn unbox_arg_unchecked(arg: Arg<'_, 'fcx>) -> Self {
        let index = arg.index();
        unsafe { arg.unbox_arg_using_from_datum() }.unwrap_or_else(|| panic!("argument {index} must not be null"))
    }
}

unsafe impl SqlTranslatable for RawJsonbArray {
    const TYPE_IDENT: &'static str = pgrx::pgrx_resolved_type!(RawJsonbArray);
    const TYPE_ORIGIN: TypeOrigin = TypeOrigin::External;
    const ARGUMENT_SQL: Result<SqlMappingRef, ArgumentError> = Ok(SqlMappingRef::literal("jsonb[]"));
    const RETURN_SQL: Result<ReturnsRef, ReturnsError> = Ok(ReturnsRef::One(SqlMappingRef::literal("jsonb[]")));
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
