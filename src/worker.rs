//! Partition workers: one background worker per outbox partition drains it to Centrifugo.
//!
//! A *round* is one transaction: take the partition's advisory lock (the same key Centrifugo's
//! own consumer uses, so two drainers never interleave a partition), read the next rows in id
//! order, send them as one sequential `/api/batch`, and in the same transaction delete the rows
//! that are done (delivered or moved to the dead letters). While the partition has a backlog a
//! round goes on for several batches, overlapping PostgreSQL work with Centrifugo's: while batch
//! k is in flight, the rows batch k-1 finished are deleted and batch k+1 is read and prepared
//! (still one request in flight). A temporary failure keeps the failed row (the rows after it
//! that Centrifugo ran are done), and the worker backs off. The outbox is read and deleted from
//! as the table's owner in a security-restricted operation, so the owner's triggers never run
//! with the worker's rights.
//!
//! An ERROR inside a round (a lock timeout, a trigger that raises, a full disk) rolls the round
//! back; the worker stays up, shows the error, backs off and tries again, and remembers what
//! Centrifugo already ran so the next round does not send it again. Only a crash before the
//! commit resends a round's rows; their idempotency keys stop Centrifugo from publishing twice.
//!
//! Order is id order among committed rows at the time of the read: a row whose transaction
//! commits after a higher id was already delivered is delivered later, never skipped.

use std::time::{Duration, Instant};

use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags};
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::PgTryBuilder;

use outbox_core::client::CentrifugoClient;
use outbox_core::dispatch::OutboxKeys;
use outbox_core::engine::{Engine, Policy, Retry};
use outbox_core::retry::{Backoff, Jitter};

use crate::gucs;
use crate::layout::{layout_problems, outbox_specs, worker_slots, OutboxSpec};
use crate::outbox_source::{
    apply_settled, as_owner_of, check_table, lock_checked, relation_named, BatchReader, Checked, DeadLetterTarget,
    OutboxTable, RoundSnapshot, RoundStats, Row, Statements,
};
use crate::session::{self, quote_ident, ConnectSlot};
use crate::shmem::{self, WorkerState};
use crate::xact::{self, DbError};

/// Registers one worker per partition of every outbox consumer; called from `_PG_init`.
pub fn register() {
    for problem in layout_problems() {
        warning!("centrifugo_outbox: {problem}");
    }
    // SAFETY: a plain read of a postmaster setting during library load.
    let max_workers = unsafe { pg_sys::max_worker_processes };
    let needed = worker_slots().len() + crate::layout::kafka_workers_needed();
    // PostgreSQL's logical replication launcher takes a slot before any library's workers.
    if needed as i32 >= max_workers {
        warning!(
            "centrifugo_outbox needs {needed} background workers and max_worker_processes is {max_workers} (the logical replication launcher takes one): some partitions will not be drained; raise max_worker_processes (see README, \"Background workers\")"
        );
    }
    let specs = outbox_specs();
    for (slot, (consumer, partition)) in worker_slots().into_iter().enumerate() {
        let spec = &specs[consumer];
        let name = if spec.is_default() {
            format!("centrifugo_outbox partition {partition}")
        } else {
            format!("centrifugo_outbox {} partition {partition}", spec.name())
        };
        BackgroundWorkerBuilder::new(&name)
            .set_type(&name)
            .set_library("centrifugo_outbox")
            .set_function("centrifugo_partition_worker_main")
            .set_argument((slot as i32).into_datum())
            .enable_spi_access()
            // Not on a hot standby: workers start once recovery is over (after promotion).
            .set_start_time(BgWorkerStartTime::RecoveryFinished)
            .set_restart_time(Some(Duration::from_secs(1)))
            .load();
    }
}

/// What the worker does next: the one state machine of delivery.
enum Next {
    /// Wait for a commit wake-up or the poll interval.
    Wait,
    /// More rows may be waiting: drain again at once.
    DrainNow,
    /// A temporary failure: wait this long before resending.
    BackOff(Duration),
}

/// The result of one round.
enum Round {
    /// The partition had fewer rows than the limit; all done were removed (after that many
    /// temporary failures).
    Drained { recovered_after: u32 },
    /// A full batch was done; there may be more.
    Full { recovered_after: u32 },
    /// Another session holds the partition's lock: its pid, when PostgreSQL says.
    Locked { holder: Option<i32> },
    /// The outbox table or the extension is missing in the database.
    NotReady(String),
    /// A temporary failure at an outbox row (its id is the position).
    Retry(Retry),
    /// The partition's lane still backs off for this long (after a rolled-back round).
    Wait(Duration),
    /// An ERROR rolled the round back; `ran` commands had already run at Centrifugo.
    Failed { error: DbError, ran: usize },
}

struct Worker {
    slot: usize,
    spec: OutboxSpec,
    partition: i32,
    client: Option<CentrifugoClient>,
    client_error: Option<String>,
    system_id: u64,
    jitter: Jitter,
    /// Consecutive rounds rolled back by an ERROR.
    db_errors: u32,
    /// When partition 0's worker last looked for rows no worker drains.
    stranded_checked_at: Option<Instant>,
    log: RateLimitedLog,
    statements: Statements,
    /// The partition as the engine's one lane: its window, back-off and remembered outcomes.
    engine: Engine<(), Row>,
    /// The outbox table the lane is about (another table under the name starts it afresh).
    table_oid: i64,
    /// Why this consumer's entry is refused since a reload (logged once per reason).
    refused: Option<String>,
    /// The lane's resend and reduced limit as the slot shows them (written when they change).
    shown: (Option<(i64, i64)>, u32),
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn centrifugo_partition_worker_main(arg: pg_sys::Datum) {
    // SAFETY: the argument is the worker's slot, set at registration.
    let slot = unsafe { i32::from_datum(arg, false) }.unwrap_or(0) as usize;
    let (consumer, partition) = worker_slots()[slot];
    let spec = outbox_specs()[consumer].clone();
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    // SAFETY: replaces the SIGTERM handler just installed with one that also stops owner code.
    #[cfg(not(feature = "pg18"))]
    unsafe {
        pg_sys::pqsignal(libc::SIGTERM, Some(xact::on_sigterm))
    };
    #[cfg(feature = "pg18")]
    unsafe {
        pg_sys::pqsignal_be(libc::SIGTERM, Some(xact::on_sigterm))
    };
    shmem::attach_worker(slot, consumer, partition);
    session::connect_worker(&spec.database(), ConnectSlot::Partition(slot));

    // SAFETY: a read of the cluster's identifier from the control file data in shared memory.
    let system_id = unsafe { pg_sys::GetSystemIdentifier() };
    let database = spec.database();
    // What the slot kept from this partition's last worker.
    let resumed = shmem::snapshot(slot).stats;
    // SAFETY: MyProcPid is set for every backend.
    let jitter_seed = u64::from(unsafe { pg_sys::MyProcPid } as u32) << 20 ^ partition as u64;
    let mut worker = Worker {
        slot,
        spec,
        partition,
        client: None,
        client_error: None,
        system_id,
        db_errors: 0,
        stranded_checked_at: None,
        log: RateLimitedLog::default(),
        statements: Statements::default(),
        engine: Engine::new(delivery_policy(1), jitter_seed),
        jitter: Jitter::new(jitter_seed ^ 0x5eed),
        table_oid: 0,
        refused: None,
        shown: (resumed.resend, resumed.batch_limit),
    };
    log!(
        "centrifugo_outbox: consumer {} partition {partition} worker started (database \"{database}\")",
        worker.spec.name()
    );

    // A resend that a restart interrupted goes on: the slot outlives the process.
    worker.engine.open(&(), || resumed.resend);
    let mut next = Next::DrainNow;
    loop {
        let wait = match next {
            Next::DrainNow => None,
            Next::Wait => Some(worker.spec.poll_interval()),
            Next::BackOff(d) => Some(d),
        };
        if let Some(timeout) = wait {
            if !wait_for(timeout, matches!(next, Next::BackOff(_))) {
                break;
            }
        }
        if BackgroundWorker::sighup_received() {
            // SAFETY: reloading the configuration file in a backend, as PostgreSQL's own workers do.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        if shutdown_requested() {
            break;
        }
        next = worker.step();
        // A background worker's table statistics reach the cumulative stats only when it says
        // so (client backends do it when idle): without this, autovacuum would never learn of
        // the outbox rows the workers delete. At most once a second, between transactions.
        // SAFETY: called outside any transaction.
        unsafe { pg_sys::pgstat_report_stat(false) };
    }
    shmem::detach_worker(slot);
    // Exit code 1 makes the postmaster start the worker again after the restart interval, so a
    // pg_terminate_backend() of a worker never stops delivery for good (pg_cron issue #99). At
    // server shutdown the postmaster restarts nothing.
    log!("centrifugo_outbox: partition {partition} worker stopped");
    // SAFETY: ends the process the way PostgreSQL's own workers do.
    unsafe { pg_sys::proc_exit(1) };
}

fn shutdown_requested() -> bool {
    // SAFETY: a flag set by the SIGTERM handler.
    unsafe { std::ptr::read_volatile(&raw const pg_sys::ShutdownRequestPending) != 0 }
}

/// Sleeps on the latch; a back-off sleeps its full time even when commits wake the latch.
/// Returns false when the worker must exit.
fn wait_for(timeout: Duration, full: bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if !BackgroundWorker::wait_latch(Some(remaining.max(Duration::from_millis(1)))) {
            return false;
        }
        if !full || Instant::now() >= deadline || shutdown_requested() {
            return !shutdown_requested();
        }
    }
}

impl Worker {
    /// One pass of the state machine: a round, and what it means for the next wait.
    fn step(&mut self) -> Next {
        // A reload that broke (or removed) this consumer's entry stops only this consumer.
        match self.spec.current() {
            Err(why) => {
                if self.refused.as_deref() != Some(why.as_str()) {
                    warning!(
                        "centrifugo_outbox: consumer {} partition {}: not draining: {why}",
                        self.spec.name(),
                        self.partition
                    );
                    self.refused = Some(why.clone());
                }
                shmem::update(self.slot, |s| s.stats.record_error(0, &why));
                shmem::set_state(self.slot, WorkerState::Waiting);
                return Next::Wait;
            }
            Ok(_) if self.refused.take().is_some() => {
                log!(
                    "centrifugo_outbox: consumer {} partition {}: settings valid again, draining",
                    self.spec.name(),
                    self.partition
                );
            }
            Ok(_) => {}
        }
        self.refresh_client();
        if self.partition == 0 && self.stranded_checked_at.is_none_or(|t| t.elapsed() >= STRANDED_CHECK_EVERY) {
            self.stranded_checked_at = Some(Instant::now());
            self.warn_about_stranded_rows();
        }
        shmem::set_state(self.slot, WorkerState::Sending);
        let round = match &self.client {
            Some(_) => self.round(),
            None => Round::NotReady(self.client_error.clone().unwrap_or_default()),
        };
        self.show_window();
        if let Some(client) = &self.client {
            for event in client.take_events() {
                log!(
                    "centrifugo_outbox: consumer {} partition {}: {}",
                    self.spec.name(),
                    self.partition,
                    gucs::scrub(&event)
                );
            }
            shmem::update(self.slot, |s| s.stats.record_endpoints(client));
        }
        match round {
            Round::Drained { recovered_after } => {
                self.recovered(recovered_after);
                shmem::set_state(self.slot, WorkerState::Idle);
                Next::Wait
            }
            Round::Locked { holder } => {
                let who =
                    holder.map_or_else(|| "another session".to_owned(), |pid| format!("the session with pid {pid}"));
                let reason = format!(
                    "partition lock held by {who} (Centrifugo's own consumer, or pg_advisory_lock on the partition's key); waiting for it"
                );
                self.log.warn(&self.spec.name(), self.partition, "locked", &reason);
                shmem::update(self.slot, |s| s.stats.record_error(0, &reason));
                shmem::set_state(self.slot, WorkerState::Locked);
                Next::Wait
            }
            Round::Full { recovered_after } => {
                self.recovered(recovered_after);
                Next::DrainNow
            }
            Round::NotReady(reason) => {
                let reason = gucs::scrub(&reason);
                self.log.warn(&self.spec.name(), self.partition, &reason, &format!("not draining: {reason}"));
                shmem::update(self.slot, |s| s.stats.record_error(0, &reason));
                shmem::set_state(self.slot, WorkerState::Waiting);
                Next::Wait
            }
            // The rest of a batch resent one by one: sent by the next round, at once.
            Round::Retry(retry) if retry.failure.is_deferred() => Next::DrainNow,
            Round::Wait(delay) => {
                shmem::set_state(self.slot, WorkerState::BackingOff);
                Next::BackOff(delay)
            }
            Round::Retry(Retry { position: id, method, failure, delay, attempt }) => {
                shmem::update(self.slot, |s| {
                    s.stats.retries += 1;
                    s.stats.backoff_ms = delay.as_millis() as u32;
                    s.stats
                        .record_error(failure.code.map(|c| c as i32).unwrap_or(-1), &gucs::scrub(&failure.to_string()));
                });
                shmem::set_state(self.slot, WorkerState::BackingOff);
                self.log.warn(
                    &self.spec.name(),
                    self.partition,
                    "retry",
                    &gucs::scrub(&format!(
                        "outbox id {id} ({method}): {failure}; retrying in {} ms (attempt {attempt})",
                        delay.as_millis(),
                    )),
                );
                Next::BackOff(delay)
            }
            Round::Failed { error, ran } => {
                self.db_errors += 1;
                let delay = retry_backoff().delay(self.db_errors, self.jitter.next_fraction());
                let error = gucs::scrub(&error.to_string());
                shmem::update(self.slot, |s| {
                    s.stats.backoff_ms = delay.as_millis() as u32;
                    s.stats.record_error(0, &format!("database error, round rolled back: {error}"));
                });
                shmem::set_state(self.slot, WorkerState::BackingOff);
                let ran = if ran > 0 {
                    format!(" ({ran} command(s) Centrifugo already ran are not sent again)")
                } else {
                    String::new()
                };
                self.log.warn(
                    &self.spec.name(),
                    self.partition,
                    "database error",
                    &format!(
                        "round rolled back by an error: {error}{ran}; retrying in {} ms (attempt {})",
                        delay.as_millis(),
                        self.db_errors
                    ),
                );
                Next::BackOff(delay)
            }
        }
    }

    /// Rows in partitions no worker drains (num_partitions lowered, a negative partition written
    /// by a plain INSERT) are logged by partition 0's worker at start and every few minutes;
    /// the status view lists them too.
    fn warn_about_stranded_rows(&mut self) {
        let num_partitions = self.spec.num_partitions();
        let (table_schema, table_name) = self.spec.table_parts();
        let found = xact::transaction(|| {
            let schema = crate::session::extension_schema().unwrap_or_default();
            let schema = table_schema.clone().unwrap_or(schema);
            let Some(oid) = relation_named(&schema, &table_name) else { return Ok(None) };
            let table = format!("{}.{}", quote_ident(&schema), quote_ident(&table_name));
            let Ok(owner) = lock_checked(&schema, &table_name, oid, pg_sys::AccessShareLock) else { return Ok(None) };
            let marker = crate::pinned::MARKER;
            let sql = format!(
                "{marker}SELECT count(partition), min(partition), max(partition), count(*) FILTER (WHERE partition IS NULL) FROM {table}
                 WHERE partition IS NULL OR partition OPERATOR(pg_catalog.<) 0 OR partition OPERATOR(pg_catalog.>=) $1"
            );
            let counts = as_owner_of(owner, oid, || {
                Spi::connect(|c| {
                    let row = c.select(&sql, None, &[num_partitions.into()])?.first();
                    Ok::<_, pgrx::spi::Error>((
                        row.get::<i64>(1)?.unwrap_or(0),
                        row.get::<i32>(2)?,
                        row.get::<i32>(3)?,
                        row.get::<i64>(4)?.unwrap_or(0),
                        table.clone(),
                    ))
                })
            })?;
            Ok(Some(counts))
        });
        let Ok(Some((count, low, high, null_count, table))) = found else { return };
        if null_count > 0 {
            warning!(
                "centrifugo_outbox: consumer {}: {null_count} row(s) of {table} have a NULL partition (written before the outbox trigger existed, or with it disabled): no worker reads them; set their partition (see centrifugo_outbox_status)",
                self.spec.name()
            );
        }
        if let (Some(low), Some(high)) = (low, high) {
            if count > 0 {
                warning!(
                    "centrifugo_outbox: consumer {}: {count} row(s) of {table} are in partitions {low}..{high}, outside 0..{} (num_partitions = {num_partitions}): no worker drains them; raise num_partitions or move them (see centrifugo_outbox_status)",
                    self.spec.name(),
                    num_partitions - 1
                );
            }
        }
    }

    fn recovered(&mut self, retries: u32) {
        if retries > 0 {
            log!(
                "centrifugo_outbox: consumer {} partition {} delivering again after {retries} retries",
                self.spec.name(),
                self.partition,
            );
        }
        if self.db_errors > 0 {
            log!(
                "centrifugo_outbox: consumer {} partition {} working again after {} failed rounds",
                self.spec.name(),
                self.partition,
                self.db_errors
            );
        }
        self.db_errors = 0;
    }

    fn show_window(&mut self) {
        show_window(&self.engine, self.slot, &mut self.shown);
    }

    /// Rebuilds the HTTP client when its settings changed (after a reload).
    fn refresh_client(&mut self) {
        let config = gucs::client_config();
        if self.client.as_ref().is_some_and(|c| *c.config() == config) {
            return;
        }
        match CentrifugoClient::new(config) {
            // A SIGTERM ends a wait for Centrifugo's reply (the batch is resent by the next start).
            Ok(client) => {
                let client = client
                    .with_stop_check(shutdown_requested)
                    .with_node_board(Box::new(shmem::SharedNodeBoard))
                    .carry_over(self.client.as_ref());
                self.client = Some(client);
                self.client_error = None;
            }
            Err(e) => {
                self.client = None;
                self.client_error = Some(e);
            }
        }
    }

    /// The rows a batch carries when nothing failed. Strict order: one command per request, so
    /// a failed command holds back every later one.
    fn configured_limit(&self) -> i32 {
        if gucs::strict_order() {
            1
        } else {
            self.spec.select_limit()
        }
    }

    /// One transaction: lock, then batch after batch while the partition has more and the
    /// transaction is young: send a batch, read and prepare the next one while Centrifugo works
    /// on it, apply the replies; finally delete every row that is done. The outbox is read and
    /// deleted from as its owner (see `xact::as_owner`).
    fn round(&mut self) -> Round {
        let partition = self.partition;
        self.engine.set_policy(delivery_policy(self.configured_limit() as usize));
        self.engine.restart(&());
        let (table_schema, table_name) = self.spec.table_parts();
        let consumer_name = self.spec.name();
        let database = self.spec.database();
        let client = self.client.as_ref().expect("client checked by the caller");
        let system_id = self.system_id;
        let statements = &mut self.statements;
        let engine = &mut self.engine;
        let known_table = &mut self.table_oid;
        let slot = self.slot;
        let shown = &mut self.shown;
        let writing_dead_letter = std::cell::Cell::new(false);
        let lock_key = format!("centrifugo_partition_lock_{consumer_name}{partition}");
        let poll_interval = self.spec.poll_interval();
        let result = xact::transaction(|| {
            Spi::connect_mut(|spi| -> Result<(Round, RoundStats), DbError> {
                let table = match check_table(spi, statements, &table_schema, &table_name, &lock_key, &database)? {
                    Checked::Ready(table) => table,
                    Checked::Locked { holder } => return Ok((Round::Locked { holder }, RoundStats::default())),
                    Checked::NotReady(reason) => return Ok((Round::NotReady(reason), RoundStats::default())),
                };
                let OutboxTable { oid: table_oid, owner, exact_commit_ts, .. } = table;
                // Parsed as the owner too: the worker needs no rights on the table or its schema.
                let table_statements = as_owner_of(owner, table_oid, || {
                    statements.for_table(spi, &table.name, table_oid, table.payload_is_jsonb)
                })?;
                // Another table under the name: nothing known of the old one applies to it.
                if *known_table != table_oid {
                    if *known_table != 0 {
                        engine.reset(&());
                    }
                    *known_table = table_oid;
                }
                let snapshot = RoundSnapshot::take();
                let reader = BatchReader {
                    statements: table_statements,
                    snapshot: &snapshot,
                    partition,
                    exact_commit_ts,
                    keys: OutboxKeys::new(system_id, table_oid as u32),
                    owner,
                    table_oid,
                    max_command_size: gucs::max_command_size(),
                };
                let read = |spi: &SpiClient<'_>, engine: &mut Engine<(), Row>, from: i64, budget: i64| {
                    let read = reader.read(spi, from, engine.read_limit(&()), budget)?;
                    let last = read.rows.last().map(|r| r.id);
                    for row in read.rows {
                        let (ready, size) = (reader.ready(&row), row.payload.len() as i64);
                        engine.push(&(), row.id, row.created_at, ready, size, row);
                    }
                    Ok::<_, DbError>((last, read.full, read.deferred))
                };
                // What one batch may hold, the next one read ahead included.
                let budget = engine.policy().budget;
                let budget = client.batch_bytes_cap(engine.read_limit(&())).map_or(budget, |cap| budget.min(cap));

                let started = Instant::now();
                let mut stats = RoundStats::default();
                // The ctids of rows done but not deleted yet: deleted while the next request is in flight.
                let mut done: Vec<pg_sys::ItemPointerData> = Vec::new();
                let delete = |spi: &mut SpiClient<'_>,
                              done: &mut Vec<pg_sys::ItemPointerData>|
                 -> Result<(), DbError> {
                    if !done.is_empty() {
                        let ctids = std::mem::take(done);
                        as_owner_of(owner, table_oid, || spi.update(&table_statements.delete, None, &[ctids.into()]))?;
                    }
                    Ok(())
                };
                let dead_letter_target = DeadLetterTarget {
                    dead_letters: &table.dead_letters,
                    oid: table.dead_letters_oid,
                    consumer: &consumer_name,
                    partition,
                    payload_is_jsonb: table.payload_is_jsonb,
                    writing: &writing_dead_letter,
                };
                let mut any_deferred = false;
                let mut applied_unsent = false;
                let (mut last, mut full, deferred) = read(spi, engine, i64::MIN, budget)?;
                any_deferred |= deferred;
                // Where a read goes on from, if it may: only after a read that hit its limit, and
                // while the round is young.
                let read_on = |last: Option<i64>, full: bool| {
                    last.and_then(|id| id.checked_add(1))
                        .filter(|_| full && started.elapsed() < DRAIN_BUDGET && !shutdown_requested())
                };
                let round = loop {
                    if engine.len(&()) == 0 {
                        // Everything read was settled already (dead letters before sending,
                        // outcomes remembered from a rolled-back round): read on, but only once
                        // those rows are gone. A round that cannot delete then fails before it
                        // sends anything new (so what is remembered stays within what was read).
                        let Some(from) = read_on(last, full) else {
                            let recovered_after = stats.recovered_after;
                            break if any_deferred || full {
                                Round::Full { recovered_after }
                            } else {
                                Round::Drained { recovered_after }
                            };
                        };
                        delete(spi, &mut done)?;
                        let deferred;
                        (last, full, deferred) = read(spi, engine, from, budget)?;
                        any_deferred |= deferred;
                        continue;
                    }
                    // The last dispatch only applied commands settled before they were sent (dead
                    // letters, remembered outcomes): their rows go before anything after them is sent.
                    if applied_unsent {
                        delete(spi, &mut done)?;
                    }
                    let flight = engine.start(client, Instant::now());
                    // Still backing off (nothing went): wait for it, reading nothing ahead.
                    if flight.is_empty() {
                        let wait =
                            engine.ready_at(&()).map_or(poll_interval, |t| t.saturating_duration_since(Instant::now()));
                        break Round::Wait(wait);
                    }
                    // While Centrifugo works on this batch: delete what the previous one finished,
                    // and read and prepare the next rows (after this batch: not deleted yet).
                    // None after the largest id there can be: nothing can follow it.
                    let next_from = read_on(last, full);
                    let in_flight_bytes = flight.bytes(&());
                    let overlap = PgTryBuilder::new(std::panic::AssertUnwindSafe(|| {
                        Ok((|| {
                            delete(spi, &mut done)?;
                            let Some(from) = next_from else { return Ok(None) };
                            let next = read(spi, engine, from, budget - in_flight_bytes)?;
                            engine.prepare(client);
                            Ok::<_, DbError>(Some(next))
                        })())
                    }))
                    // The batch is on its way and will run: learn what became of each command
                    // (below) before the ERROR rolls the round back, so that none is sent again.
                    .catch_others(|error| Err(Box::new(error)))
                    .execute();
                    let reports = engine.finish(client, flight, Instant::now());
                    // Known before anything that may raise: a rolled-back round keeps its resend.
                    show_window(engine, slot, shown);
                    let next = match overlap {
                        Ok(next) => next?,
                        Err(error) => (*error).rethrow(),
                    };
                    let report = reports.into_iter().next();
                    applied_unsent = report.as_ref().is_some_and(|r| r.requests == 0);
                    if let Some(report) = &report {
                        stats.batches += report.requests;
                        stats.recovered_after = stats.recovered_after.max(report.recovered_after);
                    }
                    apply_settled(spi, engine, &mut done, &mut stats, &dead_letter_target)?;
                    if let Some(retry) = report.and_then(|r| r.retry) {
                        break Round::Retry(retry);
                    }
                    // Drained only when nothing is left to send (the read may have been split).
                    if !full && engine.waiting(&()) == 0 {
                        break if any_deferred {
                            Round::Full { recovered_after: stats.recovered_after }
                        } else {
                            Round::Drained { recovered_after: stats.recovered_after }
                        };
                    }
                    match next {
                        Some((next_last, next_full, deferred)) => {
                            (last, full) = (next_last, next_full);
                            any_deferred |= deferred;
                        }
                        // The rest of the last read goes next (it did not fit in one batch, or
                        // waited behind a command settled before it was sent).
                        None if !full || engine.waiting(&()) > 0 => {}
                        None => break Round::Full { recovered_after: stats.recovered_after },
                    }
                };
                delete(spi, &mut done)?;
                Ok((round, stats))
            })
        });
        match result {
            Ok((round, stats)) => {
                // Rows done in this round are gone: nothing to remember about them. A drained
                // partition has nothing left that an earlier failed round could have sent.
                self.engine.committed(&());
                if matches!(round, Round::Drained { .. }) {
                    self.engine.drained(&());
                }
                // A round of malformed rows only sends nothing but still dead-letters them.
                if stats.batches > 0 || stats.dead > 0 || stats.delivered > 0 {
                    shmem::update(self.slot, |s| {
                        s.stats.batches += stats.batches;
                        s.stats.dead_lettered += stats.dead;
                        if stats.delivered > 0 {
                            s.stats.record_success(stats.delivered, stats.latencies_ms.iter().copied());
                        }
                        if let Some(f) = &stats.last_dead {
                            s.stats.record_error(f.code.map(|c| c as i32).unwrap_or(0), &gucs::scrub(&f.message));
                        }
                    });
                }
                if let Some(f) = &stats.last_dead {
                    self.log.warn(
                        &self.spec.name(),
                        self.partition,
                        "dead letter",
                        &gucs::scrub(&format!(
                            "moved {} command(s) to centrifugo_dead_letters, the last: {f}",
                            stats.dead
                        )),
                    );
                }
                round
            }
            Err(mut error) => {
                if writing_dead_letter.get() {
                    error.message = format!("cannot write a dead letter: {}", error.message);
                }
                // Rolled back: the rows stay. What Centrifugo ran is remembered (bounded by one
                // round's rows) and applied by the next round without sending it again.
                let ran = self.engine.rolled_back(&());
                self.statements = Statements::default();
                Round::Failed { error, ran }
            }
        }
    }
}

/// Writes the lane's resend and reduced batch size to the slot when they changed (a restarted
/// worker goes on with the resend).
fn show_window(engine: &Engine<(), Row>, slot: usize, shown: &mut (Option<(i64, i64)>, u32)) {
    let (resend, reduced) = engine.window(&());
    let now = (resend, reduced.unwrap_or(0) as u32);
    if now != *shown {
        *shown = now;
        shmem::update(slot, |s| (s.stats.resend, s.stats.batch_limit) = now);
    }
}

/// How batches are made and failures waited out, as the settings say now.
fn delivery_policy(batch: usize) -> Policy {
    Policy { batch, budget: gucs::batch_max_bytes(), backoff: retry_backoff() }
}

fn retry_backoff() -> Backoff {
    Backoff {
        base: Duration::from_millis(gucs::retry_backoff_base_ms() as u64),
        max: Duration::from_millis(gucs::retry_backoff_max_ms() as u64),
    }
}

/// How often partition 0's worker looks for rows in partitions no worker drains.
const STRANDED_CHECK_EVERY: Duration = Duration::from_secs(300);

/// How long one transaction keeps sending batches while the partition has more. Bounds what a
/// crash makes us resend (the idempotency keys absorb it) and how long the transaction holds its
/// snapshot; long enough that commits and the first index descent are paid once per many batches.
const DRAIN_BUDGET: Duration = Duration::from_millis(50);

/// At most one warning of a kind per 10 seconds per worker, with a count of the ones held back,
/// so a dead Centrifugo does not flood the log; a new kind of problem is logged at once. The
/// kind is what tells problems apart (a not-ready reason is its own kind; a retry's attempt
/// count is not).
#[derive(Default)]
struct RateLimitedLog {
    last: Option<(Instant, String)>,
    suppressed: u64,
}

impl RateLimitedLog {
    fn warn(&mut self, consumer: &str, partition: i32, kind: &str, message: &str) {
        let now = Instant::now();
        if self.last.as_ref().is_some_and(|(t, k)| k == kind && now.duration_since(*t) < Duration::from_secs(10)) {
            self.suppressed += 1;
            return;
        }
        let held = std::mem::take(&mut self.suppressed);
        let tail = if held > 0 { format!(" ({held} similar messages suppressed)") } else { String::new() };
        warning!("centrifugo_outbox: consumer {consumer} partition {partition}: {message}{tail}");
        self.last = Some((now, kind.to_owned()));
    }
}
