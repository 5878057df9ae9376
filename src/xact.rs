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
            CaughtError::PostgresError(r) | CaughtError::ErrorReport(r) | CaughtError::RustPanic { ereport: r, .. } => {
                r
            }
        };
        DbError { sqlstate: unpack_sqlstate(report.sql_error_code() as i32), message: report.message().to_owned() }
    }
}

impl From<pgrx::spi::Error> for DbError {
    fn from(e: pgrx::spi::Error) -> Self {
        DbError::new(e.to_string())
    }
}

/// Whether `error` is jsonb refusing its input (a data exception: `\u0000`, a lone surrogate,
/// a number out of range; or nesting too deep), as opposed to a failure of the database.
pub fn refused_as_jsonb(error: &DbError) -> bool {
    error.sqlstate.starts_with("22") || error.sqlstate == "54001"
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
    let result = PgTryBuilder::new(std::panic::AssertUnwindSafe(move || Ok(body())))
        .catch_others(|e| Err(DbError::caught(e)))
        .execute();
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
///
/// Settings the owner's code changes (`set_config`, `SET LOCAL`) are undone when `body` ends,
/// as PostgreSQL does around those operations. While `body` runs, a SIGTERM terminates the
/// worker (see [`on_sigterm`]): an owner's trigger that never returns, or catches a cancel,
/// cannot keep it from stopping.
pub fn as_owner<R>(owner: pg_sys::Oid, body: impl FnOnce() -> R) -> R {
    struct Leave;
    impl Drop for Leave {
        fn drop(&mut self) {
            IN_OWNER_CODE.store(false, std::sync::atomic::Ordering::SeqCst);
        }
    }
    let (mut user, mut context) = (pg_sys::Oid::INVALID, 0);
    // SAFETY: plain reads and writes of the backend's current user and GUC nesting; an ERROR
    // inside `body` aborts the (sub)transaction, which restores the user, the context and the
    // settings it started with.
    let nest_level = unsafe {
        pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
        pg_sys::SetUserIdAndSecContext(owner, context | pg_sys::SECURITY_RESTRICTED_OPERATION as i32);
        pg_sys::NewGUCNestLevel()
    };
    IN_OWNER_CODE.store(true, std::sync::atomic::Ordering::SeqCst);
    let leave = Leave;
    // A SIGTERM that came just before the flag was set.
    // SAFETY: a flag set by the SIGTERM handler.
    if unsafe { std::ptr::read_volatile(&raw const pg_sys::ShutdownRequestPending) } != 0 {
        terminate_at_next_interrupt_check();
    }
    let result = body();
    drop(leave);
    // SAFETY: as above.
    unsafe {
        pg_sys::AtEOXact_GUC(false, nest_level);
        pg_sys::SetUserIdAndSecContext(user, context);
    }
    result
}

/// Set while a table owner's code may run (inside [`as_owner`]).
static IN_OWNER_CODE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Makes the next CHECK_FOR_INTERRUPTS end the process with FATAL, as PostgreSQL's own `die`
/// handler does: unlike a query cancel, no EXCEPTION block can catch it.
fn terminate_at_next_interrupt_check() {
    // SAFETY: plain writes of sig_atomic_t flags.
    unsafe {
        pg_sys::ProcDiePending = 1;
        pg_sys::InterruptPending = 1;
    }
}

/// The partition workers' SIGTERM handler: ask the worker to stop after its round (as pgrx's
/// handler does); if an owner's code is running, terminate the worker at once instead of
/// waiting for that code (the round is rolled back; the next worker sends its commands again).
pub unsafe extern "C-unwind" fn on_sigterm(_signal: std::ffi::c_int) {
    // SAFETY: async-signal-safe writes of flags PostgreSQL's own handlers write, and SetLatch,
    // which is safe in a signal handler; errno is kept for the interrupted code (Linux).
    unsafe {
        let saved_errno = *libc::__errno_location();
        pg_sys::ShutdownRequestPending = 1;
        if IN_OWNER_CODE.load(std::sync::atomic::Ordering::SeqCst) {
            terminate_at_next_interrupt_check();
        }
        pg_sys::SetLatch(pg_sys::MyLatch);
        *libc::__errno_location() = saved_errno;
    }
}
