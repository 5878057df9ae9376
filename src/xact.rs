//! Transactions for workers that must outlive an ERROR: a lock timeout, a user's trigger that
//! raises, a full disk. PostgreSQL's own workers recover the same way (autovacuum's sigsetjmp
//! block): abort the transaction, report, carry on. Without this an ERROR ends the worker, the
//! postmaster starts it again, it meets the same ERROR, and so on every second.

use std::fmt;

use pgrx::pg_sys::panic::CaughtError;
use pgrx::prelude::*;
use pgrx::PgTryBuilder;

/// An ERROR caught in a worker, or a Rust panic, as text for the log and the status view.
#[derive(Debug, Clone)]
pub struct DbError {
    /// The five-character SQLSTATE (XX000 for a panic).
    pub sqlstate: String,
    pub message: String,
}

impl fmt::Display for DbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (SQLSTATE {})", self.message, self.sqlstate)
    }
}

impl DbError {
    pub fn new(message: impl Into<String>) -> Self {
        DbError { sqlstate: "XX000".into(), message: message.into() }
    }

    fn caught(error: CaughtError) -> Self {
        let report = match &error {
            CaughtError::PostgresError(r) | CaughtError::ErrorReport(r) | CaughtError::RustPanic { ereport: r, .. } => r,
        };
        DbError { sqlstate: unpack_sqlstate(report.sql_error_code() as i32), message: report.message().to_owned() }
    }
}

impl From<pgrx::spi::Error> for DbError {
    fn from(e: pgrx::spi::Error) -> Self {
        DbError::new(e.to_string())
    }
}

/// PostgreSQL packs a SQLSTATE into an int six bits per character (MAKE_SQLSTATE).
fn unpack_sqlstate(code: i32) -> String {
    (0..5).map(|i| (((code >> (6 * i)) & 0x3F) as u8 + b'0') as char).collect()
}

/// Runs `body` in a transaction of its own and commits it when `body` returns Ok. An Err, an
/// ERROR or a panic inside aborts the transaction instead (locks, snapshots, memory and SPI
/// state are released as after any failed query) and comes back as Err.
pub fn transaction<R>(body: impl FnOnce() -> Result<R, DbError>) -> Result<R, DbError> {
    // SAFETY: called between transactions in a background worker connected to a database.
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    let result = PgTryBuilder::new(std::panic::AssertUnwindSafe(move || {
        let result = body();
        if result.is_ok() {
            // SAFETY: the snapshot pushed above; a commit may raise (deferred constraints), and
            // is then aborted below like any other ERROR.
            unsafe {
                pg_sys::PopActiveSnapshot();
                pg_sys::CommitTransactionCommand();
            }
        }
        result
    }))
    .catch_others(|e| Err(DbError::caught(e)))
    .execute();
    if result.is_err() {
        // SAFETY: pgrx flushed the error state when it caught the ERROR; the transaction is
        // still open (or failed) and this ends it, as PostgreSQL's error recovery does.
        unsafe { pg_sys::AbortCurrentTransaction() };
    }
    result
}

/// Runs `body` in a subtransaction: on an ERROR or panic only what `body` did is rolled back and
/// the error comes back as Err; the surrounding transaction goes on. For the rare statement whose
/// failure has a fallback (PL/pgSQL's EXCEPTION block does the same).
pub fn subtransaction<R>(body: impl FnOnce() -> R) -> Result<R, DbError> {
    // SAFETY: inside a transaction; the memory context and resource owner are restored on
    // both ends, as PL/Python's subtransactions do.
    let (context, owner) = unsafe {
        let saved = (pg_sys::CurrentMemoryContext, pg_sys::CurrentResourceOwner);
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::MemoryContextSwitchTo(saved.0);
        saved
    };
    let result = PgTryBuilder::new(std::panic::AssertUnwindSafe(move || Ok(body()))).catch_others(|e| Err(DbError::caught(e))).execute();
    // SAFETY: ends the subtransaction begun above.
    unsafe {
        if result.is_ok() {
            pg_sys::ReleaseCurrentSubTransaction();
        } else {
            pg_sys::RollbackAndReleaseCurrentSubTransaction();
        }
        pg_sys::MemoryContextSwitchTo(context);
        pg_sys::CurrentResourceOwner = owner;
    }
    result
}

/// Runs `body` as the role `owner` in a security-restricted operation, the way PostgreSQL runs
/// VACUUM, ANALYZE and index builds for a table's owner: triggers, rules, policies and index
/// functions on the owner's table run with the owner's rights, never the worker's, and cannot
/// change the session (SET ROLE, temporary objects, deferred triggers are refused).
pub fn as_owner<R>(owner: pg_sys::Oid, body: impl FnOnce() -> R) -> R {
    let (mut user, mut context) = (pg_sys::Oid::INVALID, 0);
    // SAFETY: plain reads and writes of the backend's current user; an ERROR inside `body`
    // aborts the (sub)transaction, which restores the user and context it started with.
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
        pg_sys::SetUserIdAndSecContext(owner, context | pg_sys::SECURITY_RESTRICTED_OPERATION as i32);
    }
    let result = body();
    // SAFETY: as above.
    unsafe { pg_sys::SetUserIdAndSecContext(user, context) };
    result
}
