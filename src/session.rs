//! What a worker's session and the SQL API resolve names against, made immune to what a database
//! owner can create: the workers pin their session settings (as PostgreSQL's autovacuum does)
//! and every table is named by schema, an unqualified outbox name meaning the extension's schema.

use std::ffi::{CStr, CString};
use std::time::Duration;

use pgrx::bgworkers::BackgroundWorker;
use pgrx::prelude::*;

use crate::gucs;
use crate::shmem::{self, WorkerState};

/// Session settings every worker pins over the database's and the role's defaults
/// (`ALTER DATABASE/ROLE ... SET`, lower sources than a session's). Owner code that changes
/// them (a function's `SET` clause, `set_config`) is undone when it ends (`xact::as_owner`).
/// `search_path` holds nothing an unprivileged role can create in. (No `statement_timeout`:
/// PostgreSQL arms it only for client queries, never in a background worker.)
const PINNED: &[(&CStr, &CStr)] = &[
    (c"search_path", c"pg_catalog, pg_temp"),
    (c"role", c"none"),
    (c"default_transaction_isolation", c"read committed"),
    (c"default_transaction_read_only", c"off"),
    (c"default_transaction_deferrable", c"off"),
    (c"session_replication_role", c"origin"),
    (c"lock_timeout", c"10s"),
    // On, every ERROR a round catches would end the worker instead.
    (c"exit_on_error", c"off"),
    (c"idle_in_transaction_session_timeout", c"0"),
    // Armed in every backend with a transaction, workers included: a database default would end
    // each round after its request was sent, and the round would be resent forever.
    #[cfg(any(feature = "pg17", feature = "pg18"))]
    (c"transaction_timeout", c"0"),
];

/// Pins [`PINNED`]; called once, right after the worker connected, outside any transaction.
pub fn pin_worker_session() {
    for (name, value) in PINNED {
        // SAFETY: outside a transaction, as AutoVacWorkerMain does for search_path; both strings
        // are static and NUL-terminated.
        unsafe {
            pg_sys::SetConfigOption(
                name.as_ptr(),
                value.as_ptr(),
                pg_sys::GucContext::PGC_SUSET,
                pg_sys::GucSource::PGC_S_SESSION,
            )
        };
    }
}

/// Connects the calling worker to `database` as `centrifugo.worker_role` (the bootstrap
/// superuser when empty), then pins its session. A wrong role or database makes PostgreSQL
/// end the process with FATAL before we can say anything, so `slot` counts attempts that never
/// got through: the next attempt first waits (up to 8 s) and says why in the status view,
/// instead of a restart and a log line every second.
pub fn connect_worker(database: &str, slot: ConnectSlot) {
    let role = gucs::worker_role();
    let failed_before = slot.begin_attempt();
    if failed_before > 0 {
        let wait = Duration::from_secs(1 << failed_before.min(3));
        slot.report(&format!(
            "cannot connect to database \"{database}\" as {}: see the server log (retrying every {} s)",
            if role.is_empty() { "the bootstrap superuser".to_owned() } else { format!("role \"{role}\"") },
            wait.as_secs()
        ));
        // Commits set the latch too (the worker is attached for wake-ups): sleep the whole time.
        let deadline = std::time::Instant::now() + wait;
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            // SAFETY: a flag set by the SIGTERM handler.
            let stopping = unsafe { std::ptr::read_volatile(&raw const pg_sys::ShutdownRequestPending) != 0 };
            if stopping || !BackgroundWorker::wait_latch(Some(left.max(Duration::from_millis(1)))) {
                // SAFETY: the postmaster is gone or asked us to stop: leave the way workers do.
                unsafe { pg_sys::proc_exit(0) };
            }
        }
    }
    BackgroundWorker::connect_worker_to_spi(Some(database), (!role.is_empty()).then_some(role.as_str()));
    slot.connected();
    pin_worker_session();
}

/// Where a worker keeps its count of failed connection attempts (shared memory survives the
/// process).
#[derive(Clone, Copy)]
pub enum ConnectSlot {
    Partition(usize),
    #[cfg_attr(not(feature = "kafka"), allow(dead_code))]
    Kafka(usize),
}

impl ConnectSlot {
    fn begin_attempt(self) -> u32 {
        match self {
            ConnectSlot::Partition(i) => {
                let mut before = 0;
                shmem::update(i, |s| {
                    before = s.connect_attempts;
                    s.connect_attempts += 1;
                });
                before
            }
            ConnectSlot::Kafka(i) => shmem::kafka_connect_attempt(i),
        }
    }

    fn connected(self) {
        match self {
            ConnectSlot::Partition(i) => shmem::update(i, |s| s.connect_attempts = 0),
            ConnectSlot::Kafka(i) => shmem::kafka_connected(i),
        }
    }

    fn report(self, message: &str) {
        if let ConnectSlot::Partition(i) = self {
            shmem::update(i, |s| {
                s.stats.record_error(0, message);
            });
            shmem::set_state(i, WorkerState::Waiting);
        }
    }
}

/// The extension's schema in the current database (unquoted); None when it is not installed.
pub fn extension_schema() -> Option<String> {
    thread_local! {
        /// The extension's oid and schema oid as installed now. Its schema's name is read on each
        /// call: a schema can be renamed. The SQL API asks on every call, and the extension's oid
        /// is a catalog scan (pg_extension has no syscache before PostgreSQL 16), so the pair is
        /// kept until a pg_proc invalidation: DROP EXTENSION drops the extension's functions,
        /// ALTER EXTENSION changes them, and other backends see that at their next transaction.
        static KNOWN: std::cell::Cell<Option<(pg_sys::Oid, pg_sys::Oid)>> = const { std::cell::Cell::new(None) };
    }
    if !KNOWN_VALID.load(std::sync::atomic::Ordering::Relaxed) {
        KNOWN.set(None);
    }
    let namespace = match KNOWN.get() {
        Some((_, namespace)) => namespace,
        None => {
            watch_pg_proc();
            // Valid from before the lookup: an invalidation while it runs makes the next call look again.
            KNOWN_VALID.store(true, std::sync::atomic::Ordering::Relaxed);
            // SAFETY: a catalog index lookup by name; InvalidOid when the extension is missing.
            let extension = unsafe { pg_sys::get_extension_oid(c"centrifugo_outbox".as_ptr(), true) };
            if extension == pg_sys::Oid::INVALID {
                return None;
            }
            // A read-only query: it also runs on a hot standby (status views).
            let namespace = Spi::connect(|c| {
                c.select(
                    "SELECT extnamespace::pg_catalog.int8 FROM pg_catalog.pg_extension WHERE oid OPERATOR(pg_catalog.=) $1::pg_catalog.int8::pg_catalog.oid",
                    None,
                    &[i64::from(u32::from(extension)).into()],
                )?
                .first()
                .get_one::<i64>()
            })
            .ok()
            .flatten()
            .map(|oid| pg_sys::Oid::from(oid as u32))?;
            if KNOWN_VALID.load(std::sync::atomic::Ordering::Relaxed) {
                KNOWN.set(Some((extension, namespace)));
            }
            namespace
        }
    };
    // SAFETY: a syscache lookup; a palloc'd copy of the name, or NULL when the schema is gone.
    let name = unsafe { pg_sys::get_namespace_name(namespace) };
    // SAFETY: a NUL-terminated string from get_namespace_name.
    (!name.is_null()).then(|| unsafe { CStr::from_ptr(name) }.to_string_lossy().into_owned())
}

/// Whether the extension's oid and schema kept by [`extension_schema`] may still be used.
static KNOWN_VALID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Registers (once per process) the pg_proc invalidation callback that drops what
/// [`extension_schema`] keeps.
fn watch_pg_proc() {
    static REGISTERED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    #[pg_guard]
    unsafe extern "C-unwind" fn forget(_arg: pg_sys::Datum, _cache: std::ffi::c_int, _hash: u32) {
        KNOWN_VALID.store(false, std::sync::atomic::Ordering::Relaxed);
    }
    if !REGISTERED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        // SAFETY: a callback with no argument, for the life of the process.
        unsafe {
            pg_sys::CacheRegisterSyscacheCallback(
                pg_sys::SysCacheIdentifier::PROCOID as std::ffi::c_int,
                Some(forget),
                pg_sys::Datum::from(0usize),
            )
        };
    }
}

fn require_extension_schema() -> String {
    extension_schema().unwrap_or_else(|| error!("centrifugo_outbox: the extension is not installed in this database"))
}

/// An identifier quoted for SQL, always (even when PostgreSQL would not need it).
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The dead-letter table, schema-qualified and quoted.
pub fn dead_letters_table() -> String {
    format!("{}.centrifugo_dead_letters", quote_ident(&require_extension_schema()))
}

/// The outbox table setting `setting` as a schema-qualified quoted name (the extension's schema
/// when unqualified).
pub fn qualified_outbox(setting: &str) -> String {
    thread_local! {
        /// The last (setting, schema) and their qualified name: the SQL API asks on every call,
        /// and the schema is still looked up each time (it can be renamed).
        static LAST: std::cell::RefCell<Option<(String, String, String)>> = const { std::cell::RefCell::new(None) };
    }
    let schema = require_extension_schema();
    if let Some(known) = LAST.with(|last| {
        last.borrow().as_ref().filter(|(s, sc, _)| s == setting && *sc == schema).map(|(_, _, q)| q.clone())
    }) {
        return known;
    }
    let qualified = outbox_core::settings::qualified_table_name(setting, &schema)
        .unwrap_or_else(|e| error!("centrifugo_outbox: centrifugo.outbox_table_name: {e}"));
    LAST.with(|last| *last.borrow_mut() = Some((setting.to_owned(), schema, qualified.clone())));
    qualified
}

/// Makes sure the outbox `qualified` may be touched by a calling superuser: it is a table (not
/// a view or anything that runs code on read), and a superuser owns it (else its owner's triggers, rules and functions would run as superuser). Locks it by
/// oid in `lock_mode` first and checks its name again, so it cannot be swapped meanwhile.
/// Ok(None) when the caller is no superuser or the table does not exist (the statement that
/// follows says so); Ok(Some(oid)) for a table checked, to run the statement
/// [`pinned`](crate::pinned::pinned) to it.
pub fn check_outbox_owner(qualified: &str, lock_mode: u32) -> Result<Option<pg_sys::Oid>, String> {
    // Only a superuser's session gains rights by running another role's code; an application's
    // role (the usual caller, on the publish path) pays nothing.
    if !could_gain_superuser() {
        return Ok(None);
    }
    // Missing now: pinned to nothing, so whatever appears under the name meanwhile is refused.
    let Some(oid) = table_oid(qualified) else { return Ok(Some(pg_sys::Oid::INVALID)) };
    // SAFETY: a lock taken in the current transaction, released at its end.
    unsafe { pg_sys::LockRelationOid(oid, lock_mode as pg_sys::LOCKMODE) };
    if table_oid(qualified) != Some(oid) {
        return Err(format!("{qualified} was replaced meanwhile"));
    }
    let Some((kind, owner)) = relation_class(oid) else { return Err(format!("{qualified} was dropped meanwhile")) };
    if kind != b'r' {
        return Err(format!("{qualified} is not a plain table"));
    }
    // SAFETY: a catalog-cached check of a role.
    if !unsafe { pg_sys::superuser_arg(owner) } {
        // SAFETY: a catalog-cached read of the role's name (NULL if it is gone).
        let name = unsafe {
            let name = pg_sys::GetUserNameFromId(owner, true);
            if name.is_null() {
                String::new()
            } else {
                CStr::from_ptr(name).to_string_lossy().into_owned()
            }
        };
        return Err(format!(
            "{qualified} is owned by role \"{name}\", which is not a superuser: a superuser's session would run its triggers, rules and functions with superuser rights (SET ROLE does not prevent that: the owner's code could RESET ROLE); connect as a role without superuser rights"
        ));
    }
    Ok(Some(oid))
}

/// Whether code the current statement runs could act with superuser rights: the current user
/// is a superuser, or the session's user is one and only a `SET ROLE` stands between (the code
/// could `RESET ROLE`). Inside a SECURITY DEFINER function or a security-restricted operation
/// PostgreSQL refuses role changes, so there the current user alone counts.
pub fn could_gain_superuser() -> bool {
    // SAFETY: catalog-cached checks of the current and the session user, and plain reads of the
    // backend's security context.
    unsafe {
        pg_sys::superuser()
            || (pg_sys::superuser_arg(pg_sys::GetSessionUserId())
                && !pg_sys::InLocalUserIdChange()
                && !pg_sys::InSecurityRestrictedOperation())
    }
}

/// The extension's dead-letter table by oid, found from the extension's namespace oid (never by
/// a name somebody could swap); InvalidOid when the extension is missing.
pub fn dead_letters_oid() -> pg_sys::Oid {
    Spi::connect(|c| {
        c.select(
            "SELECT d.oid::pg_catalog.int8 FROM pg_catalog.pg_extension e
             JOIN pg_catalog.pg_class d ON d.relnamespace OPERATOR(pg_catalog.=) e.extnamespace
             WHERE e.extname OPERATOR(pg_catalog.=) 'centrifugo_outbox' AND d.relname OPERATOR(pg_catalog.=) 'centrifugo_dead_letters'",
            None,
            &[],
        )?
        .first()
        .get_one::<i64>()
    })
    .ok()
    .flatten()
    .map_or(pg_sys::Oid::INVALID, |oid| pg_sys::Oid::from(oid as u32))
}

/// `INSERT` column list and values of the dead letters' `raw_value` (`$11`), or nothing when the
/// table is older than the library (0.3.0 added it; the library may be updated before `ALTER
/// EXTENSION ... UPDATE` runs, and dead letters must still be written meanwhile).
pub fn raw_value_column(dead_letters: pg_sys::Oid) -> (&'static str, &'static str) {
    // SAFETY: a catalog cache lookup; a missing or dropped column gives InvalidAttrNumber (0).
    let present = unsafe { pg_sys::get_attnum(dead_letters, c"raw_value".as_ptr()) } != 0;
    if present {
        (", raw_value", ", $11")
    } else {
        ("", "")
    }
}

/// A relation's schema and name as the catalog caches are asked for them.
type SchemaAndName = (CString, CString);

/// The oid `qualified` names now, if any.
pub fn table_oid(qualified: &str) -> Option<pg_sys::Oid> {
    // The name as `qualified_table_name` writes it ("schema"."table"), looked up in the catalog
    // caches rather than by a query: the SQL API asks on every call.
    thread_local! {
        /// The last name looked up, split, with its parts as C strings cut as the parser cuts them.
        static LAST: std::cell::RefCell<Option<(String, Option<SchemaAndName>)>> = const { std::cell::RefCell::new(None) };
    }
    let known =
        LAST.with(|last| last.borrow().as_ref().filter(|(q, _)| q == qualified).map(|(_, parts)| parts.clone()));
    let parts = known.unwrap_or_else(|| {
        let parts = outbox_core::settings::table_name_parts(qualified).ok().and_then(|parts| match parts.as_slice() {
            [schema, table] => Some((identifier(schema)?, identifier(table)?)),
            _ => None,
        });
        LAST.with(|last| *last.borrow_mut() = Some((qualified.to_owned(), parts.clone())));
        parts
    });
    let (schema, table) = parts?;
    relation_named_c(&schema, &table)
}

/// The relation `schema.name` names now, by the catalog caches (which a lock just taken brings
/// up to date; an SQL query would see the transaction's first snapshot) and without
/// to_regclass(), which needs USAGE on the schema.
pub fn relation_named(schema: &str, name: &str) -> Option<pg_sys::Oid> {
    relation_named_c(&identifier(schema)?, &identifier(name)?)
}

/// `name` as the parser keeps it: longer than NAMEDATALEN - 1 bytes, it is cut (at a character).
fn identifier(name: &str) -> Option<CString> {
    let mut buffer = CString::new(name).ok()?.into_bytes_with_nul();
    // SAFETY: in-place truncation of a NUL-terminated buffer we own.
    unsafe { pg_sys::truncate_identifier(buffer.as_mut_ptr().cast(), name.len() as i32, false) };
    CStr::from_bytes_until_nul(&buffer).ok().map(CStr::to_owned)
}

fn relation_named_c(schema: &CStr, name: &CStr) -> Option<pg_sys::Oid> {
    // SAFETY: catalog cache lookups with NUL-terminated names; missing objects give InvalidOid.
    let oid = unsafe {
        let namespace = pg_sys::get_namespace_oid(schema.as_ptr(), true);
        if namespace == pg_sys::Oid::INVALID {
            return None;
        }
        pg_sys::get_relname_relid(name.as_ptr(), namespace)
    };
    (oid != pg_sys::Oid::INVALID).then_some(oid)
}

/// The kind (`relkind`) and owner of relation `oid` as the catalog caches see it now.
pub fn relation_class(oid: pg_sys::Oid) -> Option<(u8, pg_sys::Oid)> {
    // SAFETY: a syscache lookup by oid; the tuple is released before returning.
    unsafe {
        let tuple = pg_sys::SearchSysCache1(pg_sys::SysCacheIdentifier::RELOID as i32, pg_sys::Datum::from(oid));
        if tuple.is_null() {
            return None;
        }
        let class = pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_class>(tuple);
        let found = ((*class).relkind as u8, (*class).relowner);
        pg_sys::ReleaseSysCache(tuple);
        Some(found)
    }
}

/// Raises ERROR 42501 (insufficient_privilege) with `message`.
pub fn refuse(message: &str) -> ! {
    pgrx::pg_sys::panic::ErrorReport::new(
        pgrx::pg_sys::errcodes::PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
        message.to_owned(),
        "",
    )
    .report(pgrx::PgLogLevel::ERROR);
    unreachable!("ERROR does not return")
}
