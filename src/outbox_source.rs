//! The outbox as a source of the delivery engine: what a partition worker's round reads and
//! writes in PostgreSQL. The per-round bookkeeping statement, the round's snapshot, the cursor
//! that reads a partition's next rows in id order within a byte budget, what each row is for
//! the engine (a command, or a dead letter already), and what is applied once the engine
//! settled a row: its delete (by ctid, in the round's transaction) or its dead letter. Rows
//! are read and deleted as the table's owner in a security-restricted operation.

use pgrx::datum::TimestampWithTimeZone;
use pgrx::pg_sys::PgOid;
use pgrx::prelude::*;
use pgrx::spi::{OwnedPreparedStatement, SpiClient};

use outbox_core::dispatch::{prepare_text, Failure, OutboxKeys, Outcome};
use outbox_core::engine::{Engine, Ready};

use crate::gucs;
use crate::payload::{PayloadDatum, PayloadText, Scratch};
use crate::session::quote_ident;
use crate::shmem;
use crate::xact::{self, DbError};

/// The worker's prepared statements, kept across transactions (PostgreSQL re-plans a kept plan
/// by itself when the table changes; a new table under the same name gets new statements).
#[derive(Default)]
pub struct Statements {
    head: Option<OwnedPreparedStatement>,
    table: Option<TableStatements>,
}

pub struct TableStatements {
    name: String,
    oid: i64,
    /// The select reads the payload as jsonb (made text by the worker, see `payload`), else as text.
    payload_is_jsonb: bool,
    /// `$1` partition, `$2` first id, `$3` limit, `$4` whether commit timestamps are tracked.
    select: OwnedPreparedStatement,
    /// `$1` the ctids of the rows done.
    pub delete: OwnedPreparedStatement,
}

impl Statements {
    /// The per-transaction bookkeeping in one statement: where the extension lives, the outbox
    /// table's oid, kind and owner (whose rights its rows are read and deleted with), the partition lock (the key Centrifugo's consumer uses), whether commit
    /// timestamps are tracked, and a plan fix: the (partition, id) index is always right for
    /// "the next rows of this partition", even before a freshly filled queue table has statistics.
    pub fn head(&mut self, spi: &SpiClient<'_>) -> Result<&OwnedPreparedStatement, pgrx::spi::Error> {
        if self.head.is_none() {
            let text = PgOid::BuiltIn(PgBuiltInOids::TEXTOID);
            // $1 the table's schema (NULL: the extension's), $2 the table, $3 the lock key.
            self.head = Some(
                spi.prepare(
                    "SELECT ext.nspname::pg_catalog.text, t.oid::pg_catalog.int8, t.relkind::pg_catalog.text,
                            t.relowner::pg_catalog.int8,
                            pg_catalog.pg_try_advisory_xact_lock(pg_catalog.hashtext($3)),
                            pg_catalog.current_setting('track_commit_timestamp')::pg_catalog.bool,
                            pg_catalog.set_config('enable_seqscan', 'off', true),
                            pg_catalog.set_config('enable_bitmapscan', 'off', true),
                            pg_catalog.set_config('enable_sort', 'off', true),
                            (SELECT d.oid::pg_catalog.int8 FROM pg_catalog.pg_class d
                             WHERE d.relnamespace OPERATOR(pg_catalog.=) ext.oid AND d.relname OPERATOR(pg_catalog.=) 'centrifugo_dead_letters'),
                            t.relhassubclass,
                            (SELECT a.atttypid OPERATOR(pg_catalog.=) 'pg_catalog.jsonb'::pg_catalog.regtype FROM pg_catalog.pg_attribute a
                             WHERE a.attrelid OPERATOR(pg_catalog.=) t.oid AND a.attname OPERATOR(pg_catalog.=) 'payload')
                     FROM (SELECT 1) AS one
                     LEFT JOIN (SELECT n.oid, n.nspname FROM pg_catalog.pg_extension e
                                JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) e.extnamespace
                                WHERE e.extname OPERATOR(pg_catalog.=) 'centrifugo_outbox') AS ext ON true
                     LEFT JOIN (pg_catalog.pg_class t JOIN pg_catalog.pg_namespace tn ON tn.oid OPERATOR(pg_catalog.=) t.relnamespace)
                            ON tn.nspname OPERATOR(pg_catalog.=) coalesce($1, ext.nspname) AND t.relname OPERATOR(pg_catalog.=) $2",
                    &[text, text, text],
                )?
                .keep(),
            );
        }
        Ok(self.head.as_ref().expect("prepared above"))
    }

    pub fn for_table(
        &mut self,
        spi: &SpiClient<'_>,
        name: &str,
        oid: i64,
        payload_is_jsonb: bool,
    ) -> Result<&TableStatements, pgrx::spi::Error> {
        if !self
            .table
            .as_ref()
            .is_some_and(|t| t.name == name && t.oid == oid && t.payload_is_jsonb == payload_is_jsonb)
        {
            self.table = None;
            let oids = |list: &[PgBuiltInOids]| list.iter().map(|o| PgOid::BuiltIn(*o)).collect::<Vec<_>>();
            let marker = crate::pinned::MARKER;
            // The commit time of each row, for the latency histogram: exact with
            // track_commit_timestamp = on, else created_at (the inserting transaction's start).
            // Read through a cursor (see `BatchReader::read`): rows past the byte budget are
            // never made text. A jsonb payload is made text by the worker (see `payload`).
            // Prepared as "mutating" so that each read takes a fresh snapshot: the first one must
            // see what a drainer that held the lock before us committed.
            let payload = if payload_is_jsonb { "payload" } else { "payload::pg_catalog.text" };
            let select = spi
                .prepare_mut(
                    &format!(
                        "{marker}SELECT id, method, {payload},
                                coalesce(CASE WHEN $4 THEN pg_catalog.pg_xact_commit_timestamp(xmin) END, created_at), ctid, created_at,
                                xmin
                         FROM ONLY {name} WHERE partition OPERATOR(pg_catalog.=) $1 AND id OPERATOR(pg_catalog.>=) $2 ORDER BY id LIMIT $3"
                    ),
                    &oids(&[PgBuiltInOids::INT4OID, PgBuiltInOids::INT8OID, PgBuiltInOids::INT8OID, PgBuiltInOids::BOOLOID]),
                )?
                .keep();
            // By ctid, read in this transaction: no index descent per row. A ctid cannot point
            // to another row meanwhile (vacuum keeps what our snapshot may see), and a row
            // updated meanwhile has a new ctid, so it stays and is sent again: never lost.
            let delete = spi
                .prepare_mut(
                    &format!("{marker}DELETE FROM ONLY {name} WHERE ctid OPERATOR(pg_catalog.=) ANY($1)"),
                    &oids(&[PgBuiltInOids::TIDARRAYOID]),
                )?
                .keep();
            self.table = Some(TableStatements { name: name.to_owned(), oid, payload_is_jsonb, select, delete });
        }
        Ok(self.table.as_ref().expect("prepared above"))
    }
}

/// The outbox table a round drains, as checked by [`check_table`].
pub struct OutboxTable {
    /// Schema-qualified and quoted.
    pub name: String,
    pub oid: i64,
    /// Whose rights its rows are read and deleted with.
    pub owner: pg_sys::Oid,
    /// Commit timestamps are tracked (exact latencies).
    pub exact_commit_ts: bool,
    /// Its payload column is jsonb (made text by the worker, see `payload`).
    pub payload_is_jsonb: bool,
    /// The dead-letter table of the extension, quoted, and its oid.
    pub dead_letters: String,
    pub dead_letters_oid: pg_sys::Oid,
}

/// What a round may do, by [`check_table`].
pub enum Checked {
    Ready(OutboxTable),
    /// Another session holds the partition's lock: its pid, when PostgreSQL says.
    Locked {
        holder: Option<i32>,
    },
    /// Why the partition cannot be drained now (no extension, no table, a table of a kind
    /// rows cannot be deleted from by ctid, one replaced while it was checked).
    NotReady(String),
}

/// The round's bookkeeping in one statement (see [`Statements::head`]): where the extension
/// lives, the outbox table `table_schema.table_name` (None: the extension's schema) and what it
/// is, and the partition lock `lock_key`, which it takes. The table is then locked and checked
/// again under the lock, so the statements that follow are about the table checked.
pub fn check_table(
    spi: &SpiClient<'_>,
    statements: &mut Statements,
    table_schema: &Option<String>,
    table_name: &str,
    lock_key: &str,
    database: &str,
) -> Result<Checked, DbError> {
    let head = statements.head(spi)?;
    let head = spi.select(head, None, &[table_schema.clone().into(), table_name.into(), lock_key.into()])?;
    let head = head.first();
    let not_ready = |reason: String| Ok(Checked::NotReady(reason));
    let Some(schema) = head.get::<String>(1)? else {
        return not_ready(format!("extension centrifugo_outbox is not installed in database \"{database}\""));
    };
    let table = format!("{}.{}", quote_ident(table_schema.as_deref().unwrap_or(&schema)), quote_ident(table_name));
    let Some(table_oid) = head.get::<i64>(2)? else {
        return not_ready(format!("outbox table {table} does not exist"));
    };
    // Rows are deleted by ctid, which is unique only within one table: a partitioned
    // table or one with inheritance children would lose other partitions' rows.
    match head.get::<String>(3)?.as_deref() {
            Some("r") if head.get::<bool>(11)? != Some(true) => {}
            Some("r") => {
                return not_ready(format!(
                    "outbox table {table} has inheritance children, which are not supported (if it no longer has any, ANALYZE it)"
                ))
            }
            Some("p") => return not_ready(format!("outbox table {table} is partitioned, which is not supported")),
            _ => return not_ready(format!("outbox {table} is not a table")),
        }
    if head.get::<bool>(5)? != Some(true) {
        let holder = spi
                .select(
                    "SELECT l.pid FROM pg_catalog.pg_locks l
                     WHERE l.locktype OPERATOR(pg_catalog.=) 'advisory' AND l.granted AND l.objsubid OPERATOR(pg_catalog.=) 1
                       AND l.database OPERATOR(pg_catalog.=) (SELECT oid FROM pg_catalog.pg_database WHERE datname OPERATOR(pg_catalog.=) pg_catalog.current_database())
                       AND ((l.classid::pg_catalog.int8 OPERATOR(pg_catalog.<<) 32) OPERATOR(pg_catalog.|) l.objid::pg_catalog.int8)
                           OPERATOR(pg_catalog.=) pg_catalog.hashtext($1)::pg_catalog.int8
                     LIMIT 1",
                    None,
                    &[lock_key.into()],
                )?
                .first()
                .get_one::<i32>()?;
        return Ok(Checked::Locked { holder });
    }
    // The checks above were about the table that had this name then.
    let owner =
        match lock_checked(table_schema.as_deref().unwrap_or(&schema), table_name, table_oid, pg_sys::RowExclusiveLock)
        {
            Ok(owner) => owner,
            Err(what) => {
                return not_ready(format!("outbox table {table} {what} while the worker checked it; checking again"))
            }
        };
    let exact_commit_ts = head.get::<bool>(6)?.unwrap_or(false);
    let payload_is_jsonb = head.get::<bool>(12)? == Some(true);
    let dead_letters = format!("{}.centrifugo_dead_letters", quote_ident(&schema));
    let dead_letters_oid = pg_sys::Oid::from(head.get::<i64>(10)?.unwrap_or(0) as u32);
    Ok(Checked::Ready(OutboxTable {
        name: table,
        oid: table_oid,
        owner,
        exact_commit_ts,
        payload_is_jsonb,
        dead_letters,
        dead_letters_oid,
    }))
}

/// One outbox row as read.
pub struct Row {
    pub id: i64,
    pub ctid: pg_sys::ItemPointerData,
    pub method: String,
    /// Empty when the payload was not made text.
    pub payload: String,
    /// A jsonb payload not made text (see `payload`): the dead letter's reason, and the value.
    pub dead_letter: Option<(String, pg_sys::Datum)>,
    /// Unix microseconds.
    pub committed_at: i64,
    /// Unix microseconds; with the id, what makes the row's idempotency key unique.
    pub created_at: i64,
}

/// Rows read in id order.
pub struct Read {
    pub rows: Vec<Row>,
    /// The limit was reached: the partition may have more.
    pub full: bool,
    /// Rows were left for the next round (committed after the round's snapshot).
    pub deferred: bool,
}

pub struct BatchReader<'s> {
    pub statements: &'s TableStatements,
    /// What the round may send: rows committed before it began (see [`RoundSnapshot`]).
    pub snapshot: &'s RoundSnapshot,
    pub partition: i32,
    pub exact_commit_ts: bool,
    pub keys: OutboxKeys,
    /// The table's owner, as whom rows are read, and the table.
    pub owner: pg_sys::Oid,
    pub table_oid: i64,
    /// Rows whose payload text is longer are dead letters (0: no limit).
    pub max_command_size: i32,
}

/// The snapshot a round takes once it holds the partition's lock: every read of the round sends
/// only rows it sees. Each read runs with a fresh snapshot (it must see what was committed before
/// the lock), so without this a read ahead could see a transaction that committed after the
/// previous read (a low id, skipped since the reads go on from the last id) together with a
/// later transaction of the same writer (a higher id), and send the later one first.
pub struct RoundSnapshot(pg_sys::Snapshot);

impl RoundSnapshot {
    pub fn take() -> Self {
        // SAFETY: inside the round's transaction; registered with its resource owner, so an
        // ERROR releases it with the transaction, and unregistered by `drop` otherwise.
        RoundSnapshot(unsafe { pg_sys::RegisterSnapshot(pg_sys::GetTransactionSnapshot()) })
    }

    /// The transaction id the next transaction will get (low 32 bits): read after a cursor is
    /// opened, every row that cursor returns has an older `xmin`.
    fn next_xid() -> u32 {
        // SAFETY: reads shared memory under its lock; callable in any transaction.
        unsafe { pg_sys::ReadNextFullTransactionId() }.value as u32
    }

    /// Whether a committed row with `xmin` is visible to the snapshot, `next_xid` being
    /// [`Self::next_xid`] read after the row's cursor was opened. Only xids from the snapshot's
    /// xmin up to `next_xid` are asked about: anything else finished before the snapshot, and a
    /// frozen row keeps its original xmin, which may be more than 2^31 xids old and so would
    /// look like a future one to a comparison modulo 2^32.
    fn sees(&self, xmin: u32, next_xid: u32) -> bool {
        // SAFETY: the snapshot is registered for as long as `self` lives.
        let snapshot_xmin = unsafe { (*self.0).xmin }.into_inner();
        let recent = xmin >= pg_sys::FirstNormalTransactionId.into_inner()
            && xmin.wrapping_sub(snapshot_xmin) < next_xid.wrapping_sub(snapshot_xmin);
        // SAFETY: as above.
        !recent || !unsafe { pg_sys::XidInMVCCSnapshot(pg_sys::TransactionId::from(xmin), self.0) }
    }
}

impl Drop for RoundSnapshot {
    fn drop(&mut self) {
        // During an ERROR's unwinding the transaction's abort releases it instead.
        if !std::thread::panicking() {
            // SAFETY: registered by `take`, unregistered once.
            unsafe { pg_sys::UnregisterSnapshot(self.0) };
        }
    }
}

/// PostgreSQL's epoch (2000-01-01) in Unix microseconds.
const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

impl BatchReader<'_> {
    /// The next rows of the partition with `id >= from`, at most `limit` and, past the first
    /// row, at most `budget` bytes of payload text.
    pub fn read(&self, spi: &SpiClient<'_>, from: i64, limit: usize, budget: i64) -> Result<Read, DbError> {
        let limit = limit as i64;
        let args = [self.partition.into(), from.into(), limit.into(), self.exact_commit_ts.into()];
        // Fetches of 16 rows, then more while the rows are small: the scan stops at the budget
        // (a fetched row is made text only if it fits, by its detoasted size and then by its
        // text), and the first row always comes, however large.
        let mut rows_per_fetch: libc::c_long = 16;
        let (mut fetched, mut deferred) = (0i64, false);
        let (rows, over_budget) = as_owner_of(self.owner, self.table_oid, || -> Result<(Vec<Row>, bool), DbError> {
            let mut cursor = spi.try_open_cursor(&self.statements.select, &args)?;
            let mut scratch = Scratch::new();
            let next_xid = RoundSnapshot::next_xid();
            let (mut rows, mut bytes) = (Vec::new(), 0i64);
            loop {
                let chunk = cursor.fetch(rows_per_fetch)?;
                if chunk.is_empty() {
                    return Ok((rows, false));
                }
                fetched += chunk.len() as i64;
                // Grow while a fetch of twice as many rows of the size seen so far stays within budget.
                let average = bytes / (rows.len() as i64).max(1);
                if (2 * rows_per_fetch as i64) * average.max(1) < budget - bytes {
                    rows_per_fetch = (rows_per_fetch * 2).min(1024);
                }
                for row in chunk {
                    // A row committed after the round began waits for the next round,
                    // which reads the partition from its start: were it sent now, a row
                    // of an earlier transaction with a lower id, invisible to the round's
                    // first read, would go after it.
                    let xmin = row.get::<pg_sys::TransactionId>(7)?.map_or(0, |x| x.into_inner());
                    let payload = row.get::<PayloadDatum>(3)?;
                    let raw_size = payload.as_ref().map_or(0, |p| p.raw_size() as i64);
                    if !self.snapshot.sees(xmin, next_xid) {
                        deferred = true;
                        // Read all the same: it counts against the budget.
                        bytes += raw_size;
                        if bytes > budget {
                            return Ok((rows, true));
                        }
                        continue;
                    }
                    if !rows.is_empty() && bytes + raw_size > budget {
                        return Ok((rows, true));
                    }
                    let row = self.row(&row, payload, &mut scratch)?;
                    let size = row.payload.len() as i64;
                    if !rows.is_empty() && bytes + size > budget {
                        return Ok((rows, true));
                    }
                    bytes += size;
                    rows.push(row);
                }
            }
        })?;
        // The limit was reached, or the budget or the snapshot left rows behind: there may be more.
        Ok(Read { full: over_budget || deferred || fetched >= limit, deferred, rows })
    }

    fn row(
        &self,
        row: &pgrx::spi::SpiHeapTupleData<'_>,
        payload: Option<PayloadDatum>,
        scratch: &mut Scratch,
    ) -> Result<Row, DbError> {
        let max_command_size = self.max_command_size.max(0) as usize;
        let (payload, dead_letter) = match payload.map(|p| p.text(scratch, max_command_size)).transpose()? {
            None => (String::new(), None),
            Some(PayloadText::Text(text)) => (text, None),
            Some(PayloadText::DeadLetter { why, jsonb }) => (String::new(), Some((why, jsonb))),
        };
        Ok(Row {
            id: row.get::<i64>(1)?.unwrap_or(0),
            ctid: row.get::<pg_sys::ItemPointerData>(5)?.unwrap_or_default(),
            method: row.get::<String>(2)?.unwrap_or_default(),
            payload,
            dead_letter,
            committed_at: row
                .get::<TimestampWithTimeZone>(4)?
                .map_or(0, |t| pg_sys::TimestampTz::from(t) + PG_EPOCH_UNIX_MICROS),
            created_at: row
                .get::<TimestampWithTimeZone>(6)?
                .map_or(0, |t| pg_sys::TimestampTz::from(t) + PG_EPOCH_UNIX_MICROS),
        })
    }

    /// What `row` is for the engine: a command to send, or a dead letter already.
    pub fn ready(&self, row: &Row) -> Ready {
        // The SQL API refuses both at call time; a plain INSERT is caught here.
        if let Some((why, _)) = &row.dead_letter {
            return Ready::Known(Outcome::DeadLetter { failure: Failure::malformed(why.clone()), payload: None });
        }
        let size = outbox_core::settings::compact_json_len(&row.payload);
        if self.max_command_size > 0 && size > self.max_command_size as usize {
            let failure = Failure::malformed(format!(
                "payload of {size} bytes exceeds centrifugo.max_command_size ({} bytes)",
                self.max_command_size
            ));
            return Ready::Known(Outcome::DeadLetter { failure, payload: None });
        }
        match prepare_text(&row.method, &row.payload, || self.keys.key(row.id, row.created_at)) {
            Ok(p) => Ready::Send(p),
            Err(failure) => Ready::Known(Outcome::DeadLetter { failure, payload: None }),
        }
    }
}

/// Where dead letters of this consumer go.
pub struct DeadLetterTarget<'a> {
    pub dead_letters: &'a str,
    pub oid: pg_sys::Oid,
    /// The outbox's payload column is jsonb: its text always goes back into jsonb.
    pub payload_is_jsonb: bool,
    pub consumer: &'a str,
    pub partition: i32,
    /// Set while a dead letter is written.
    pub writing: &'a std::cell::Cell<bool>,
}

/// Applies what the engine settled in the partition's lane: the ctids of delivered and
/// dead-lettered rows join `done` (deleted in this transaction), dead letters are written.
/// Centrifugo ran every command of a batch, so a command that succeeded after a failed one is
/// done too: resending it would run it twice.
pub fn apply_settled(
    spi: &mut SpiClient<'_>,
    engine: &mut Engine<(), Row>,
    done: &mut Vec<pg_sys::ItemPointerData>,
    stats: &mut RoundStats,
    target: &DeadLetterTarget<'_>,
) -> Result<(), DbError> {
    let acked_at = shmem::unix_micros();
    for settled in engine.unapplied(&()) {
        let row = settled.item;
        match settled.outcome {
            Outcome::Delivered => {
                stats.delivered += 1;
                stats.latencies_ms.push((acked_at - row.committed_at).max(0) as f64 / 1000.0);
            }
            Outcome::DeadLetter { failure, payload: replacement } => {
                let payload = replacement.as_deref().unwrap_or(&row.payload);
                let dead = DeadRow {
                    outbox_id: row.id,
                    method: &row.method,
                    payload,
                    // A replacement (the channels of a broadcast that failed) is what is kept.
                    jsonb_not_made_text: row
                        .dead_letter
                        .as_ref()
                        .filter(|_| replacement.is_none())
                        .map(|(_, jsonb)| *jsonb),
                    failure,
                    attempts: settled.attempts,
                    created_at: row.created_at,
                };
                // An ERROR inside unwinds past this: the flag tells the round's report what failed.
                target.writing.set(true);
                insert_dead_letter(spi, target, &dead)?;
                target.writing.set(false);
                stats.dead += 1;
                stats.last_dead = Some(failure.clone());
            }
            Outcome::Retry(_) => continue,
        }
        done.push(row.ctid);
    }
    engine.applied(&());
    Ok(())
}

/// The oid of table `name` in schema `schema` as the catalog caches see it now.
pub fn relation_named(schema: &str, name: &str) -> Option<i64> {
    crate::session::relation_named(schema, name).map(|oid| i64::from(u32::from(oid)))
}

/// Locks table `oid` (named `schema.name` when it was looked up) so that nobody can drop it and
/// put a table of their own under the name while our statements run (a schema's owner may drop
/// any table in it), then checks the name still means it and returns its owner as of now
/// (ALTER TABLE ... OWNER waits for the lock). Err says what happened meanwhile.
pub fn lock_checked(schema: &str, name: &str, oid: i64, mode: u32) -> Result<pg_sys::Oid, &'static str> {
    // SAFETY: a lock taken in the current transaction, released at its end.
    unsafe { pg_sys::LockRelationOid(pg_sys::Oid::from(oid as u32), mode as pg_sys::LOCKMODE) };
    // By the catalog caches, which the lock just brought up to date (an SQL query would see the
    // transaction's first snapshot), and without to_regclass(), which needs USAGE on the schema.
    if relation_named(schema, name) != Some(oid) {
        return Err("was replaced");
    }
    relation_owner(oid).ok_or("was dropped")
}

/// The owner of relation `oid` as the catalog caches see it now.
fn relation_owner(oid: i64) -> Option<pg_sys::Oid> {
    crate::session::relation_class(pg_sys::Oid::from(oid as u32)).map(|(_, owner)| owner)
}

/// Runs `body` as the outbox's owner (see `xact::as_owner`), its statements held to the table
/// checked (see `pinned`).
pub fn as_owner_of<R>(owner: pg_sys::Oid, table_oid: i64, body: impl FnOnce() -> R) -> R {
    crate::pinned::pinned(&[pg_sys::Oid::from(table_oid as u32)], || xact::as_owner(owner, body))
}

/// What one round did, for the shared-memory counters.
#[derive(Default)]
pub struct RoundStats {
    pub delivered: u64,
    pub dead: u64,
    pub batches: u64,
    pub latencies_ms: Vec<f64>,
    pub last_dead: Option<Failure>,
    /// Temporary failures the round's first answered batch ended.
    pub recovered_after: u32,
}

/// One outbox row on its way to the dead letters.
struct DeadRow<'a> {
    outbox_id: i64,
    method: &'a str,
    payload: &'a str,
    /// Instead of `payload`: a jsonb value not made text (see `payload`), valid until the round's
    /// transaction ends.
    jsonb_not_made_text: Option<pg_sys::Datum>,
    failure: &'a Failure,
    attempts: u32,
    /// The row's created_at (Unix µs), already read: a lookup by id alone could find several rows.
    created_at: i64,
}

fn insert_dead_letter(
    spi: &mut SpiClient<'_>,
    target: &DeadLetterTarget<'_>,
    row: &DeadRow<'_>,
) -> Result<(), DbError> {
    let DeadLetterTarget { dead_letters, oid, consumer, partition, payload_is_jsonb, .. } = *target;
    // A payload that is not JSON at all is kept as a JSON string, so nothing is lost.
    let payload_json = if serde_json::from_str::<&serde_json::value::RawValue>(row.payload).is_ok() {
        row.payload.to_owned()
    } else {
        serde_json::Value::String(row.payload.to_owned()).to_string()
    };
    let marker = crate::pinned::MARKER;
    let (raw_column, raw_value) = crate::session::raw_value_column(oid);
    let insert = format!(
        "{marker}INSERT INTO {dead_letters} (source, consumer, outbox_id, method, payload, partition, error_kind, error_code, error_message, attempts, enqueued_at{raw_column})
         VALUES ('outbox', $9, $1, $2, $3::pg_catalog.jsonb, $4, $5, $6, $7, $8, $10{raw_value})"
    );
    let args = |payload: pgrx::datum::DatumWithOid<'static>,
                raw: Option<Vec<u8>>|
     -> Vec<pgrx::datum::DatumWithOid<'static>> {
        vec![
            row.outbox_id.into(),
            row.method.to_owned().into(),
            payload,
            partition.into(),
            row.failure.kind.as_str().into(),
            row.failure.code.map(|c| c as i32).into(),
            gucs::scrub(&row.failure.message).into(),
            (row.attempts as i32).into(),
            consumer.to_owned().into(),
            TimestampWithTimeZone::try_from(row.created_at - PG_EPOCH_UNIX_MICROS).ok().into(),
            raw.into(),
        ]
    };
    if let Some(jsonb) = row.jsonb_not_made_text {
        // SAFETY: a jsonb value copied into the transaction's memory (see `DeadRow`).
        let payload = unsafe { pgrx::datum::DatumWithOid::new(jsonb, pg_sys::JSONBOID) };
        crate::pinned::pinned(&[oid], || spi.update(&insert, None, &args(payload, None)))?;
        return Ok(());
    }
    // The outbox's payload is jsonb, so this holds: a table of one's own may have json or text
    // with what jsonb refuses (`\u0000`, huge numbers). Then the bytes go to raw_value.
    if payload_is_jsonb {
        crate::pinned::pinned(&[oid], || spi.update(&insert, None, &args(payload_json.into(), None)))?;
        return Ok(());
    }
    let exact = xact::subtransaction(|| {
        crate::pinned::pinned(&[oid], || spi.update(&insert, None, &args(payload_json.into(), None)).map(|_| ()))
    });
    match exact {
        Ok(result) => result?,
        Err(e) if xact::refused_as_jsonb(&e) => {
            crate::pinned::pinned(&[oid], || {
                spi.update(&insert, None, &args("null".to_owned().into(), Some(row.payload.as_bytes().to_vec())))
            })?;
        }
        Err(e) => return Err(e),
    }
    Ok(())
}
