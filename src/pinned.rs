//! Keeps a statement on the tables that were checked. Statements name tables by schema, and a
//! schema's owner can rename the schema and put another table under the old name at any moment
//! (that takes no lock on the tables inside); PostgreSQL would then parse a kept statement again
//! and run it on the new table, triggers, rules and views included, with the rights of whoever
//! runs it. Statements that carry [`MARKER`] are checked as they are parsed, before anything of
//! the table can run: while [`pinned`] is active, every table they name must be one of its oids.

use std::cell::RefCell;
use std::ffi::CStr;

use pgrx::prelude::*;
use pgrx::PgList;

/// Opens every statement checked here.
pub const MARKER: &str = "/* centrifugo_outbox: checked tables only */ ";

static mut PREVIOUS_HOOK: pg_sys::post_parse_analyze_hook_type = None;

thread_local! {
    /// The oids the marked statements may name; empty: none pinned.
    static PINNED: RefCell<Vec<pg_sys::Oid>> = const { RefCell::new(Vec::new()) };
}

/// Installs the parse-analysis check; from `_PG_init`.
pub fn init() {
    // SAFETY: hooks are installed once, at library load, chaining the previous one.
    unsafe {
        PREVIOUS_HOOK = pg_sys::post_parse_analyze_hook;
        pg_sys::post_parse_analyze_hook = Some(check_marked_statement);
    }
}

/// Runs `body` with marked statements held to `tables`.
pub fn pinned<R>(tables: &[pg_sys::Oid], body: impl FnOnce() -> R) -> R {
    struct Restore(Vec<pg_sys::Oid>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let before = std::mem::take(&mut self.0);
            PINNED.with(|p| *p.borrow_mut() = before);
        }
    }
    let _restore = Restore(PINNED.with(|p| std::mem::replace(&mut *p.borrow_mut(), tables.to_vec())));
    body()
}

#[pg_guard]
unsafe extern "C-unwind" fn check_marked_statement(
    pstate: *mut pg_sys::ParseState,
    query: *mut pg_sys::Query,
    jstate: *mut pg_sys::JumbleState,
) {
    // SAFETY: PostgreSQL passes valid pointers; the previous hook gets the same ones.
    unsafe {
        if let Some(previous) = PREVIOUS_HOOK {
            previous(pstate, query, jstate);
        }
        if pstate.is_null() || query.is_null() || (*pstate).p_sourcetext.is_null() {
            return;
        }
        if !CStr::from_ptr((*pstate).p_sourcetext).to_bytes().starts_with(MARKER.as_bytes()) {
            return;
        }
        let allowed = PINNED.with(|p| p.borrow().clone());
        if allowed.is_empty() {
            return;
        }
        if !names_only(query, &allowed) {
            pgrx::pg_sys::panic::ErrorReport::new(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                "centrifugo_outbox: a table this statement names was replaced (its schema renamed?) after it was checked; the statement was not run",
                "",
            )
            .report(PgLogLevel::ERROR);
        }
    }
}

/// Whether every relation `query` names, in subqueries in FROM and in WITH included, is one of
/// `allowed` (the marked statements have no sublinks in their conditions).
///
/// # Safety
/// `query` is a valid analysed Query.
unsafe fn names_only(query: *mut pg_sys::Query, allowed: &[pg_sys::Oid]) -> bool {
    // SAFETY: walks lists of the valid Query tree PostgreSQL just built.
    unsafe {
        for rte in PgList::<pg_sys::RangeTblEntry>::from_pg((*query).rtable).iter_ptr() {
            let ok = match (*rte).rtekind {
                pg_sys::RTEKind::RTE_RELATION => allowed.contains(&(*rte).relid),
                pg_sys::RTEKind::RTE_SUBQUERY => (*rte).subquery.is_null() || names_only((*rte).subquery, allowed),
                _ => true,
            };
            if !ok {
                return false;
            }
        }
        for cte in PgList::<pg_sys::CommonTableExpr>::from_pg((*query).cteList).iter_ptr() {
            let inner = (*cte).ctequery;
            if !inner.is_null() && (*inner).type_ == pg_sys::NodeTag::T_Query && !names_only(inner.cast(), allowed) {
                return false;
            }
        }
        true
    }
}
