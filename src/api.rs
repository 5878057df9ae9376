//! The SQL API: one function per state-changing Centrifugo method, plus a generic one. Each
//! builds a payload from its arguments (NULL means "not set"), validates it with `outbox_core`,
//! picks the partition and inserts one outbox row in the caller's transaction, returning its id.
//! Nothing is inserted when validation fails; the error carries a documented SQLSTATE.

use std::ffi::CStr;

use pgrx::callconv::{Arg, ArgAbi};
use pgrx::nullable::Nullable;
use pgrx::pgrx_sql_entity_graph::metadata::{ArgumentError, ReturnsError, ReturnsRef, SqlMappingRef, SqlTranslatable};
use pgrx::prelude::*;

use outbox_core::partition::{choose_partition, partition_for_key};
use outbox_core::settings::check_command_size;
use outbox_core::{Command, CommandError, ErrorClass, Method, PayloadBuilder};

use crate::errors::raise;
use crate::gucs;
use crate::session::refuse;

/// A `jsonb` argument as PostgreSQL prints it, never parsed into a tree: numbers keep every
/// digit, and nesting is as deep as PostgreSQL allows (pgrx's `JsonB` goes through serde_json).
pub struct JsonbText(pub String);

impl FromDatum for JsonbText {
    unsafe fn from_polymorphic_datum(datum: pg_sys::Datum, is_null: bool, _: pg_sys::Oid) -> Option<Self> {
        if is_null {
            return None;
        }
        // SAFETY: the datum is a jsonb (the SQL signature says so); jsonb_out detoasts it and
        // returns a palloc'd C string, freed once copied.
        unsafe {
            let text = pgrx::direct_function_call::<&CStr>(pg_sys::jsonb_out, &[Some(datum)])?;
            let owned = text.to_string_lossy().into_owned();
            pg_sys::pfree(text.as_ptr() as *mut std::ffi::c_void);
            Some(JsonbText(owned))
        }
    }
}

// SAFETY: unboxed through FromDatum above, like pgrx's own JsonB.
unsafe impl<'fcx> ArgAbi<'fcx> for JsonbText {
    unsafe fn unbox_arg_unchecked(arg: Arg<'_, 'fcx>) -> Self {
        let index = arg.index();
        // SAFETY: forwarded from the caller's contract.
        unsafe { arg.unbox_arg_using_from_datum().unwrap_or_else(|| panic!("argument {index} must not be null")) }
    }

    unsafe fn unbox_nullable_arg(arg: Arg<'_, 'fcx>) -> Nullable<Self> {
        // SAFETY: forwarded from the caller's contract.
        unsafe { arg.unbox_arg_using_from_datum().into() }
    }
}

// SAFETY: the SQL type is jsonb, which the FromDatum above reads.
unsafe impl SqlTranslatable for JsonbText {
    const TYPE_IDENT: &'static str = concat!(module_path!(), "::JsonbText");
    const TYPE_ORIGIN: pgrx::pgrx_sql_entity_graph::metadata::TypeOrigin =
        pgrx::pgrx_sql_entity_graph::metadata::TypeOrigin::External;
    const ARGUMENT_SQL: Result<SqlMappingRef, ArgumentError> = Ok(SqlMappingRef::literal("jsonb"));
    const RETURN_SQL: Result<ReturnsRef, ReturnsError> = Ok(ReturnsRef::One(SqlMappingRef::literal("jsonb")));
}

/// Inserts a validated command into the outbox and returns its id.
fn enqueue(command: Result<Command, CommandError>, partition: Option<i32>, partition_key: Option<&str>) -> i64 {
    let command = command.unwrap_or_else(|e| raise(e));
    let partition = choose_partition(partition, partition_key, gucs::num_partitions()).unwrap_or_else(|e| raise(e));
    let payload = command.payload_json();
    check_command_size(payload.len(), gucs::max_command_size()).unwrap_or_else(|e| raise(e));
    let outbox = crate::session::qualified_outbox(&gucs::outbox_table_name());
    let checked = crate::session::check_outbox_owner(&outbox, pg_sys::RowExclusiveLock)
        .unwrap_or_else(|reason| refuse(&format!("centrifugo_outbox: not enqueueing into {reason}")));
    let insert = || insert_row(&outbox, checked, command.method.as_str(), payload, partition);
    // An unprivileged caller's INSERT is not pinned, even when it runs inside a pinned statement
    // (a trigger on the dead-letter table that publishes): that pin holds other tables.
    let inserted = crate::pinned::pinned(checked.as_slice(), insert);
    inserted
        .unwrap_or_else(|e| error!("centrifugo_outbox: could not insert into the outbox: {e}"))
        .unwrap_or_else(|| error!("centrifugo_outbox: the outbox insert returned no id"))
}

thread_local! {
    /// The outbox INSERT, planned once per backend and outbox name (PostgreSQL replans it when
    /// the table changes): a call costs what a plain INSERT costs, not a parse and plan each time.
    /// Keyed by the outbox name and, for a superuser's call, the oid checked: such a plan is
    /// only ever analysed while pinned to that oid, so it can only write that table.
    static INSERTS: std::cell::RefCell<Vec<KeptInsert>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// (outbox name, oid checked or 0) and its planned INSERT.
type KeptInsert = ((String, u32), std::rc::Rc<pgrx::spi::OwnedPreparedStatement>);

/// At most this many outbox names keep a planned INSERT per backend (consumers rarely differ).
const KEPT_INSERTS: usize = 8;

fn insert_row(
    outbox: &str,
    checked: Option<pg_sys::Oid>,
    method: &str,
    payload: &str,
    partition: i32,
) -> Result<Option<i64>, pgrx::spi::Error> {
    if checked == Some(pg_sys::Oid::INVALID) {
        // A superuser's call while the table is missing: planned once, under the pin to nothing.
        let marker = crate::pinned::MARKER;
        let sql = format!("{marker}INSERT INTO {outbox} (method, payload, partition) VALUES ($1, $2::pg_catalog.jsonb, $3) RETURNING id");
        return Spi::get_one_with_args::<i64>(&sql, &[method.into(), payload.into(), partition.into()]);
    }
    // 0: an unprivileged caller's plan, never used by a superuser's call (whose oid is never 0).
    let key = (outbox.to_owned(), checked.map_or(0, u32::from));
    Spi::connect_mut(|spi| {
        let known = INSERTS.with(|k| k.borrow().iter().find(|(k, _)| *k == key).map(|(_, s)| s.clone()));
        let statement = match known {
            Some(statement) => statement,
            None => {
                let marker = crate::pinned::MARKER;
                let sql = format!("{marker}INSERT INTO {outbox} (method, payload, partition) VALUES ($1, $2::pg_catalog.jsonb, $3) RETURNING id");
                let text = PgOid::BuiltIn(PgBuiltInOids::TEXTOID);
                let statement = std::rc::Rc::new(
                    spi.prepare_mut(sql.as_str(), &[text, text, PgOid::BuiltIn(PgBuiltInOids::INT4OID)])?.keep(),
                );
                INSERTS.with(|k| {
                    let mut kept = k.borrow_mut();
                    if kept.len() >= KEPT_INSERTS {
                        kept.remove(0);
                    }
                    kept.push((key, statement.clone()));
                });
                statement
            }
        };
        // No borrow of the cache is held while the INSERT runs: its triggers may publish too.
        spi.update(&*statement, None, &[method.into(), payload.into(), partition.into()])?.first().get_one::<i64>()
    })
}

fn require<T>(value: Option<T>, method: Method, name: &str) -> Result<T, CommandError> {
    value.ok_or_else(|| CommandError::new(ErrorClass::NullValue, format!("{method} requires \"{name}\"")))
}

fn channel_list(method: Method, channels: Option<Vec<Option<String>>>) -> Result<Vec<String>, CommandError> {
    let channels = require(channels, method, "channels")?;
    channels
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            c.ok_or_else(|| CommandError::invalid(format!("{method}: \"channels\"[{i}] must be a non-empty string")))
        })
        .collect()
}

fn json(value: &Option<JsonbText>) -> Option<&str> {
    value.as_ref().map(|j| j.0.as_str())
}

/// The fields shared by publish and broadcast.
fn publication(
    b: PayloadBuilder,
    idempotency_key: Option<&str>,
    tags: Option<JsonbText>,
    skip_history: Option<bool>,
    delta: Option<bool>,
    version: Option<i64>,
    version_epoch: Option<&str>,
) -> Result<PayloadBuilder, CommandError> {
    if let Some(v) = version {
        if v < 0 {
            return Err(CommandError::new(ErrorClass::OutOfRange, format!("version must not be negative, got {v}")));
        }
    }
    Ok(b.field("idempotency_key", idempotency_key)
        .raw("tags", json(&tags))
        .field("skip_history", skip_history)
        .field("delta", delta)
        .field("version", version)
        .field("version_epoch", version_epoch))
}

/// Publishes `data` (any JSON) into `channel`. Returns the outbox id.
#[allow(clippy::too_many_arguments)]
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn centrifugo_publish(
    channel: Option<&str>,
    data: Option<JsonbText>,
    idempotency_key: default!(Option<&str>, "NULL"),
    tags: default!(Option<JsonbText>, "NULL"),
    skip_history: default!(Option<bool>, "NULL"),
    delta: default!(Option<bool>, "NULL"),
    version: default!(Option<i64>, "NULL"),
    version_epoch: default!(Option<&str>, "NULL"),
    partition_key: default!(Option<&str>, "NULL"),
    partition: default!(Option<i32>, "NULL"),
) -> i64 {
    let m = Method::Publish;
    let cmd = (|| {
        let b = PayloadBuilder::new()
            .field("channel", Some(require(channel, m, "channel")?))
            .raw("data", Some(require(json(&data), m, "data")?));
        publication(b, idempotency_key, tags, skip_history, delta, version, version_epoch)?.build(m)
    })();
    enqueue(cmd, partition, partition_key)
}

/// Publishes binary `data` into `channel` (sent as `b64data`). Returns the outbox id.
#[allow(clippy::too_many_arguments)]
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn centrifugo_publish_binary(
    channel: Option<&str>,
    data: Option<&[u8]>,
    idempotency_key: default!(Option<&str>, "NULL"),
    tags: default!(Option<JsonbText>, "NULL"),
    skip_history: default!(Option<bool>, "NULL"),
    delta: default!(Option<bool>, "NULL"),
    version: default!(Option<i64>, "NULL"),
    version_epoch: default!(Option<&str>, "NULL"),
    partition_key: default!(Option<&str>, "NULL"),
    partition: default!(Option<i32>, "NULL"),
) -> i64 {
    let m = Method::Publish;
    let cmd = (|| {
        let b = PayloadBuilder::new()
            .field("channel", Some(require(channel, m, "channel")?))
            .base64("b64data", Some(require(data, m, "data")?));
        publication(b, idempotency_key, tags, skip_history, delta, version, version_epoch)?.build(m)
    })();
    enqueue(cmd, partition, partition_key)
}

/// Publishes the same `data` into every channel of `channels`. Returns the outbox id.
#[allow(clippy::too_many_arguments)]
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn centrifugo_broadcast(
    channels: Option<Vec<Option<String>>>,
    data: Option<JsonbText>,
    idempotency_key: default!(Option<&str>, "NULL"),
    tags: default!(Option<JsonbText>, "NULL"),
    skip_history: default!(Option<bool>, "NULL"),
    delta: default!(Option<bool>, "NULL"),
    version: default!(Option<i64>, "NULL"),
    version_epoch: default!(Option<&str>, "NULL"),
    partition_key: default!(Option<&str>, "NULL"),
    partition: default!(Option<i32>, "NULL"),
) -> i64 {
    let m = Method::Broadcast;
    let cmd = (|| {
        let b = PayloadBuilder::new()
            .field("channels", Some(channel_list(m, channels)?))
            .raw("data", Some(require(json(&data), m, "data")?));
        publication(b, idempotency_key, tags, skip_history, delta, version, version_epoch)?.build(m)
    })();
    enqueue(cmd, partition, partition_key)
}

/// Broadcasts binary `data` (sent as `b64data`). Returns the outbox id.
#[allow(clippy::too_many_arguments)]
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn centrifugo_broadcast_binary(
    channels: Option<Vec<Option<String>>>,
    data: Option<&[u8]>,
    idempotency_key: default!(Option<&str>, "NULL"),
    tags: default!(Option<JsonbText>, "NULL"),
    skip_history: default!(Option<bool>, "NULL"),
    delta: default!(Option<bool>, "NULL"),
    version: default!(Option<i64>, "NULL"),
    version_epoch: default!(Option<&str>, "NULL"),
    partition_key: default!(Option<&str>, "NULL"),
    partition: default!(Option<i32>, "NULL"),
) -> i64 {
    let m = Method::Broadcast;
    let cmd = (|| {
        let b = PayloadBuilder::new()
            .field("channels", Some(channel_list(m, channels)?))
            .base64("b64data", Some(require(data, m, "data")?));
        publication(b, idempotency_key, tags, skip_history, delta, version, version_epoch)?.build(m)
    })();
    enqueue(cmd, partition, partition_key)
}

/// Subscribes `user`'s connections to `channel` (server-side subscription). Returns the outbox id.
#[allow(clippy::too_many_arguments)]
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn centrifugo_subscribe(
    user: Option<&str>,
    channel: Option<&str>,
    info: default!(Option<JsonbText>, "NULL"),
    client: default!(Option<&str>, "NULL"),
    session: default!(Option<&str>, "NULL"),
    data: default!(Option<JsonbText>, "NULL"),
    recover_since: default!(Option<JsonbText>, "NULL"),
    expire_at: default!(Option<i64>, "NULL"),
    override_presence: default!(Option<bool>, "NULL"),
    override_join_leave: default!(Option<bool>, "NULL"),
    override_force_recovery: default!(Option<bool>, "NULL"),
    override_force_positioning: default!(Option<bool>, "NULL"),
    override_force_push_join_leave: default!(Option<bool>, "NULL"),
    partition_key: default!(Option<&str>, "NULL"),
    partition: default!(Option<i32>, "NULL"),
) -> i64 {
    let cmd = PayloadBuilder::new()
        .field("user", user)
        .field("channel", channel)
        .raw("info", json(&info))
        .field("client", client)
        .field("session", session)
        .raw("data", json(&data))
        .raw("recover_since", json(&recover_since))
        .field("expire_at", expire_at)
        .override_flag("presence", override_presence)
        .override_flag("join_leave", override_join_leave)
        .override_flag("force_recovery", override_force_recovery)
        .override_flag("force_positioning", override_force_positioning)
        .override_flag("force_push_join_leave", override_force_push_join_leave)
        .build(Method::Subscribe);
    enqueue(cmd, partition, partition_key)
}

/// Unsubscribes `user` (optionally one client or session) from `channel`. Returns the outbox id.
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn centrifugo_unsubscribe(
    user: Option<&str>,
    channel: Option<&str>,
    client: default!(Option<&str>, "NULL"),
    session: default!(Option<&str>, "NULL"),
    partition_key: default!(Option<&str>, "NULL"),
    partition: default!(Option<i32>, "NULL"),
) -> i64 {
    let cmd = PayloadBuilder::new()
        .field("user", user)
        .field("channel", channel)
        .field("client", client)
        .field("session", session)
        .build(Method::Unsubscribe);
    enqueue(cmd, partition, partition_key)
}

/// Disconnects `user`'s connections (optionally one client or session). Returns the outbox id.
#[allow(clippy::too_many_arguments)]
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn centrifugo_disconnect(
    user: Option<&str>,
    client: default!(Option<&str>, "NULL"),
    session: default!(Option<&str>, "NULL"),
    whitelist: default!(Option<Vec<Option<String>>>, "NULL"),
    code: default!(Option<i32>, "NULL"),
    reason: default!(Option<&str>, "NULL"),
    partition_key: default!(Option<&str>, "NULL"),
    partition: default!(Option<i32>, "NULL"),
) -> i64 {
    let cmd = (|| {
        if code.is_some_and(|c| c < 0) {
            return Err(CommandError::new(ErrorClass::OutOfRange, "disconnect code must not be negative"));
        }
        let disconnect = match (code, reason) {
            (None, None) => None,
            (c, r) => Some(serde_json::json!({ "code": c.unwrap_or(0), "reason": r.unwrap_or("") })),
        };
        let whitelist = whitelist.map(|w| w.into_iter().flatten().collect::<Vec<_>>());
        PayloadBuilder::new()
            .field("user", user)
            .field("client", client)
            .field("session", session)
            .field("whitelist", whitelist)
            .field("disconnect", disconnect)
            .build(Method::Disconnect)
    })();
    enqueue(cmd, partition, partition_key)
}

/// Refreshes `user`'s connections (prolong or expire them). Returns the outbox id.
#[allow(clippy::too_many_arguments)]
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn centrifugo_refresh(
    user: Option<&str>,
    client: default!(Option<&str>, "NULL"),
    session: default!(Option<&str>, "NULL"),
    expired: default!(Option<bool>, "NULL"),
    expire_at: default!(Option<i64>, "NULL"),
    info: default!(Option<JsonbText>, "NULL"),
    partition_key: default!(Option<&str>, "NULL"),
    partition: default!(Option<i32>, "NULL"),
) -> i64 {
    let cmd = PayloadBuilder::new()
        .field("user", user)
        .field("client", client)
        .field("session", session)
        .field("expired", expired)
        .field("expire_at", expire_at)
        .raw("info", json(&info))
        .build(Method::Refresh);
    enqueue(cmd, partition, partition_key)
}

/// Removes the history of `channel`. Returns the outbox id.
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn centrifugo_history_remove(
    channel: Option<&str>,
    partition_key: default!(Option<&str>, "NULL"),
    partition: default!(Option<i32>, "NULL"),
) -> i64 {
    let cmd = PayloadBuilder::new().field("channel", channel).build(Method::HistoryRemove);
    enqueue(cmd, partition, partition_key)
}

/// Enqueues any state-changing command as Centrifugo's outbox row would hold it. Returns the outbox id.
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn centrifugo_command(
    method: Option<&str>,
    payload: Option<JsonbText>,
    partition_key: default!(Option<&str>, "NULL"),
    partition: default!(Option<i32>, "NULL"),
) -> i64 {
    let cmd = (|| {
        let method = method.ok_or_else(|| CommandError::new(ErrorClass::NullValue, "method must not be NULL"))?;
        let method = Method::parse(method)?;
        let payload =
            payload.ok_or_else(|| CommandError::new(ErrorClass::NullValue, format!("{method} requires a payload")))?;
        Command::new(method, &payload.0)
    })();
    enqueue(cmd, partition, partition_key)
}

/// The partition `key` maps to under the current `centrifugo.num_partitions` (see README, "Partitions").
#[pg_extern(stable, parallel_safe, strict)]
#[search_path(pg_catalog, pg_temp)]
fn centrifugo_partition_for(key: &str) -> i32 {
    partition_for_key(key, gucs::num_partitions())
}
