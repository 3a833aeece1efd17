//! Thin layer over SPI: every statement goes through a per-backend cache of
//! prepared plans, so a hot call never re-parses or re-plans its SQL.

use crate::error::{FfError, FfResult};
use pgrx::datum::DatumWithOid;
use pgrx::pg_sys::PgOid;
use pgrx::spi::{OwnedPreparedStatement, SpiClient, SpiTupleTable};
use pgrx::{FromDatum, IntoDatum, Spi};
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};

thread_local! {
    static PLANS: RefCell<HashMap<&'static str, std::rc::Rc<OwnedPreparedStatement>>> =
        RefCell::new(HashMap::new());
}

thread_local! {
    /// Whether this backend found the installed schema at this library's version.
    static SCHEMA_MATCHES: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with an SPI connection; SPI failures become `FfError`s.
pub fn with_spi<T>(f: impl FnOnce(&mut SpiClient<'_>) -> FfResult<T>) -> FfResult<T> {
    Spi::connect_mut(|client| {
        check_schema_version(client)?;
        f(client)
    })
}

/// The library only runs against the schema of its own version. Between
/// installing a new package and `ALTER EXTENSION flowfabric UPDATE`, a
/// statement could otherwise name a table the old schema lacks, and the
/// pinned search_path would then find a caller's temporary table of that
/// name. Extension scripts (install and upgrade) may call in meanwhile.
fn check_schema_version(client: &mut SpiClient<'_>) -> FfResult<()> {
    if SCHEMA_MATCHES.with(|m| m.get()) || unsafe { pgrx::pg_sys::creating_extension } {
        return Ok(());
    }
    let installed: Option<String> = client
        .select(
            "SELECT extversion FROM pg_catalog.pg_extension WHERE extname OPERATOR(pg_catalog.=) 'flowfabric'",
            None,
            &[],
        )?
        .first()
        .get(1)?;
    let library = env!("CARGO_PKG_VERSION");
    if installed.as_deref() == Some(library) {
        SCHEMA_MATCHES.with(|m| m.set(true));
        return Ok(());
    }
    Err(FfError::wrong_state(format!(
        "the flowfabric library is version {library} but this database has version {} installed",
        installed.as_deref().unwrap_or("none")
    ))
    .with_detail("run ALTER EXTENSION flowfabric UPDATE (as a superuser) to bring the database to the library's version"))
}

/// Executes `sql` with `args` through a cached prepared plan. The argument
/// types of the first call fix the plan's parameter types, so each call site
/// must always pass the same Rust types.
pub fn exec<'conn>(
    client: &mut SpiClient<'conn>,
    sql: &'static str,
    args: &[DatumWithOid<'_>],
) -> FfResult<SpiTupleTable<'conn>> {
    let plan = cached_plan(client, sql, args)?;
    Ok(client.update(&*plan, None, args)?)
}

fn cached_plan(
    client: &SpiClient<'_>,
    sql: &'static str,
    args: &[DatumWithOid<'_>],
) -> FfResult<std::rc::Rc<OwnedPreparedStatement>> {
    if let Some(plan) = PLANS.with(|p| p.borrow().get(sql).cloned()) {
        return Ok(plan);
    }
    let oids: Vec<PgOid> = args.iter().map(|a| PgOid::from(a.oid())).collect();
    let plan = std::rc::Rc::new(client.prepare_mut(sql, &oids)?.keep());
    PLANS.with(|p| p.borrow_mut().insert(sql, plan.clone()));
    Ok(plan)
}

/// Rows per statement when a call writes many (a submitted flow's nodes,
/// edges and groups; a batch of executions): what one statement's array
/// arguments cost in memory is bounded by this, not by the call.
pub const WRITE_CHUNK: usize = 2_000;

/// Runs `f` in a scratch memory context, freed when it returns, when a call
/// reads or writes `rows` of 100 or more (for fewer, what they leave is
/// small and two contexts would cost a single-row call more than they
/// save). It holds the Postgres memory that many rows leave behind: pgrx
/// builds an array argument with two copies of every element in the current
/// context, and copies each value a row reader returns into the *parent* of
/// the current context. Inside SPI both would otherwise live until the call
/// ends: most of the 9 KB per node a submitted flow took. Two levels, so
/// that both land here. `f` must return only Rust-owned values (or datums
/// moved to the caller's context with `SPI_datumTransfer`), and convert its
/// arguments inside, before the statement (SPI leaves its own context
/// current after every statement).
pub fn scratch_for<R>(rows: usize, f: impl FnOnce() -> R) -> R {
    if rows < 100 {
        return f();
    }
    let mut outer = pgrx::PgMemoryContexts::new("flowfabric scratch");
    // SAFETY: both contexts are valid until dropped; dropping one that is
    // current (an error unwinding through `f`) switches back to its parent.
    unsafe {
        outer.switch_to(|_| {
            let mut inner = pgrx::PgMemoryContexts::new("flowfabric scratch values");
            inner.switch_to(|_| f())
        })
    }
}

/// Writes `items` `WRITE_CHUNK` to a statement: `write` gets each chunk and
/// runs in `scratch_for` it, so what one statement's arguments cost is
/// freed before the next.
pub fn write_in_chunks<T>(items: &[T], mut write: impl FnMut(&[T]) -> FfResult<()>) -> FfResult<()> {
    for chunk in items.chunks(WRITE_CHUNK) {
        scratch_for(chunk.len(), || write(chunk))?;
    }
    Ok(())
}

/// A statement over a set of executions (or edges, or groups) comes in two
/// forms written from one text, `[one, many]`: keyed `= $1` for a single id
/// (index lookups, nothing to start up) and `= ANY ($1)` for several (one
/// index scan over the sorted keys). Returns the form for `ids` and its key
/// argument. The array form never joins the array to a table: joined, a
/// cached generic plan may put the array on the inner side of a nested loop
/// and redo it for every row, which made a cascade quadratic in its width.
/// Rows that need different values go in one statement per value.
pub fn keyed<'a>(forms: [&'static str; 2], ids: &[pgrx::Uuid]) -> (&'static str, DatumWithOid<'a>) {
    match ids {
        [one] => (forms[0], (*one).into()),
        _ => (forms[1], ids.to_vec().into()),
    }
}

/// The `[one, many]` forms for `keyed` of a statement whose key condition
/// sits between `$head` and `$tail`.
macro_rules! keyed_sql {
    ($head:literal, $tail:literal) => {
        [concat!($head, "= $1", $tail), concat!($head, "= ANY ($1)", $tail)]
    };
}
pub(crate) use keyed_sql;

/// Ids grouped by the value their rows take, for one `keyed` statement per
/// value.
pub fn by_value<K: Ord>(pairs: impl IntoIterator<Item = (K, pgrx::Uuid)>) -> BTreeMap<K, Vec<pgrx::Uuid>> {
    let mut groups: BTreeMap<K, Vec<pgrx::Uuid>> = BTreeMap::new();
    for (value, id) in pairs {
        groups.entry(value).or_default().push(id);
    }
    groups
}

/// Typed read of column `ordinal` (1-based) of the current row.
pub fn col<T: FromDatum + IntoDatum>(table: &SpiTupleTable<'_>, ordinal: usize) -> FfResult<Option<T>> {
    Ok(table.get::<T>(ordinal)?)
}

/// Like `col`, for columns that are NOT NULL by schema.
pub fn col_req<T: FromDatum + IntoDatum>(table: &SpiTupleTable<'_>, ordinal: usize) -> FfResult<T> {
    col(table, ordinal)?.ok_or_else(|| FfError::internal(format!("unexpected NULL in column {ordinal}")))
}

/// The first row of a result, positioned for `col`, or `None` when empty.
pub fn first_row<'conn>(table: SpiTupleTable<'conn>) -> Option<SpiTupleTable<'conn>> {
    if table.is_empty() {
        None
    } else {
        Some(table.first())
    }
}

/// Wall-clock time in unix milliseconds (what every `_ms` column holds).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Runs `f` in its own subtransaction. On an error inside, only the
/// subtransaction rolls back and the error report comes back as `Err`, so the
/// caller's transaction goes on (like a PL/pgSQL EXCEPTION block).
pub fn in_subtransaction<T>(f: impl FnOnce() -> T) -> Result<T, pgrx::pg_sys::panic::ErrorReportWithLevel> {
    use pgrx::pg_sys;
    use pgrx::pg_sys::panic::CaughtError;
    // SAFETY: standard internal-subtransaction protocol (see pl_exec.c):
    // remember the memory context and resource owner, and restore both after
    // the subtransaction ends either way.
    unsafe {
        let ctx = pg_sys::CurrentMemoryContext;
        let owner = pg_sys::CurrentResourceOwner;
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::MemoryContextSwitchTo(ctx);
        let outcome = pgrx::PgTryBuilder::new(std::panic::AssertUnwindSafe(move || Ok(f())))
            .catch_others(|e| match e {
                CaughtError::PostgresError(r) | CaughtError::ErrorReport(r) | CaughtError::RustPanic { ereport: r, .. } => {
                    Err(r)
                }
            })
            .execute();
        match outcome {
            Ok(_) => pg_sys::ReleaseCurrentSubTransaction(),
            Err(_) => pg_sys::RollbackAndReleaseCurrentSubTransaction(),
        }
        pg_sys::MemoryContextSwitchTo(ctx);
        pg_sys::CurrentResourceOwner = owner;
        outcome
    }
}

/// Runs `f` in a subtransaction that is kept only when `f` succeeds with
/// `Ok(Ok(_))`. A refusal (`Ok(Err(_))`) or an error rolls it back, and with
/// it every row lock `f` took, so a refused claim candidate leaves nothing
/// behind. Errors are passed on unchanged (PostgreSQL errors re-raised with
/// their SQLSTATE).
pub fn attempt<T, E>(f: impl FnOnce() -> FfResult<Result<T, E>>) -> FfResult<Result<T, E>> {
    use pgrx::pg_sys;
    use pgrx::pg_sys::panic::CaughtError;
    // SAFETY: the internal-subtransaction protocol, as in `in_subtransaction`.
    unsafe {
        let ctx = pg_sys::CurrentMemoryContext;
        let owner = pg_sys::CurrentResourceOwner;
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::MemoryContextSwitchTo(ctx);
        let outcome = pgrx::PgTryBuilder::new(std::panic::AssertUnwindSafe(move || Ok(f())))
            .catch_others(|e| match e {
                CaughtError::PostgresError(r) | CaughtError::ErrorReport(r) | CaughtError::RustPanic { ereport: r, .. } => {
                    Err(r)
                }
            })
            .execute();
        let keep = matches!(outcome, Ok(Ok(Ok(_))));
        if keep {
            pg_sys::ReleaseCurrentSubTransaction();
        } else {
            pg_sys::RollbackAndReleaseCurrentSubTransaction();
        }
        pg_sys::MemoryContextSwitchTo(ctx);
        pg_sys::CurrentResourceOwner = owner;
        match outcome {
            Ok(result) => result,
            // Re-raise as pgrx raises errors: a panic carrying the report,
            // turned back into the same ERROR at the function boundary.
            Err(report) => std::panic::panic_any(report),
        }
    }
}
