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

use std::collections::HashMap;
use std::time::{Duration, Instant};

use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags};
use pgrx::datum::TimestampWithTimeZone;
use pgrx::pg_sys::PgOid;
use pgrx::prelude::*;
use pgrx::spi::{OwnedPreparedStatement, SpiClient};
use pgrx::PgTryBuilder;

use outbox_core::client::CentrifugoClient;
use outbox_core::consumers::{ConsumerEntry, OutboxConsumer};
use outbox_core::dispatch::{prepare_text, Failure, OutboxKeys, Outcome, Prepared};
use outbox_core::lane::BatchWindow;
use outbox_core::partition::MAX_PARTITIONS;
use outbox_core::retry::{Backoff, Jitter};
use outbox_core::settings::table_name_parts;

use crate::gucs;
use crate::payload::{PayloadDatum, PayloadText, Scratch};
use crate::session::{self, quote_ident, ConnectSlot};
use crate::shmem::{self, WorkerState};
use crate::xact::{self, DbError};

/// An outbox consumer: the default one, defined by the flat `centrifugo.*` settings (reloadable),
/// or a `postgresql` entry of `centrifugo.consumers` (fixed at server start).
#[derive(Debug, Clone)]
pub struct OutboxSpec {
    /// None for the default consumer, whose settings are read live.
    entry: Option<OutboxConsumer>,
}

/// The `postgresql` entries of `centrifugo.consumers` as the settings say now (a reload may
/// change an entry's table, limit, poll interval and channel, or break it), parsed once per
/// value in each process: the outbox trigger asks for every row.
struct LiveEntries {
    json: String,
    /// Err: the text is not a JSON array, and every entry keeps the settings it started with.
    entries: Result<HashMap<String, Result<OutboxConsumer, String>>, String>,
}

fn live_entries<R>(read: impl FnOnce(&LiveEntries) -> R) -> R {
    thread_local! {
        static LIVE: std::cell::RefCell<Option<LiveEntries>> = const { std::cell::RefCell::new(None) };
    }
    let json = gucs::kafka::consumers();
    LIVE.with(|cell| {
        let mut live = cell.borrow_mut();
        if live.as_ref().is_none_or(|l| l.json != json) {
            let entries = outbox_core::consumers::parse_consumers_each(&json).map(|list| {
                // The first entry of a name is the one that counts (a second is refused alone).
                let mut map = HashMap::new();
                for e in list {
                    let entry = match e.entry {
                        Ok(ConsumerEntry::Postgresql(c)) => Ok(c),
                        Ok(ConsumerEntry::Kafka(_)) => continue,
                        Err(why) => Err(why),
                    };
                    map.entry(e.name).or_insert(entry);
                }
                map
            });
            *live = Some(LiveEntries { json, entries });
        }
        read(live.as_ref().expect("set above"))
    })
}

impl OutboxSpec {
    /// This consumer's settings now: None for the default consumer (read from the flat
    /// settings); an entry as the settings say now, its name, database and partition count as
    /// at start (they shape the workers); Err when a reload broke or removed the entry.
    fn current(&self) -> Result<Option<OutboxConsumer>, String> {
        let Some(start) = &self.entry else { return Ok(None) };
        live_entries(|live| {
            match &live.entries {
            Err(_) => Ok(Some(start.clone())),
            Ok(map) => match map.get(&start.name) {
                Some(Ok(now)) => Ok(Some(OutboxConsumer {
                    name: start.name.clone(),
                    database: start.database.clone(),
                    num_partitions: start.num_partitions,
                    ..now.clone()
                })),
                Some(Err(why)) => Err(why.clone()),
                None => Err(format!(
                    "centrifugo.consumers no longer has an enabled entry \"{}\": not draining (its workers go at the next restart)",
                    start.name
                )),
            },
        }
        })
    }

    /// The entry's settings now, or as at start when a reload broke it (for what is not delivery).
    fn settings(&self) -> Option<OutboxConsumer> {
        self.current().unwrap_or_else(|_| self.entry.clone())
    }

    pub fn name(&self) -> String {
        match &self.entry {
            Some(e) => e.name.clone(),
            // Reloadable, but never to the name of another consumer (their locks would collide).
            None => {
                let live = gucs::consumer_name();
                if layout().entries.iter().any(|e| e.name == live) {
                    layout().default_name.clone()
                } else {
                    live
                }
            }
        }
    }
    pub fn database(&self) -> String {
        self.entry.as_ref().and_then(|e| e.database.clone()).unwrap_or_else(gucs::database)
    }
    pub fn table_setting(&self) -> String {
        self.settings().map_or_else(gucs::outbox_table_name, |e| e.table)
    }
    /// The outbox table as a schema-qualified quoted SQL name; unqualified means the extension's
    /// schema (ERROR when the extension is missing). For SQL run in a backend.
    pub fn qualified_table(&self) -> String {
        crate::session::qualified_outbox(&self.table_setting())
    }
    /// The outbox table as (schema, table), the schema None when the setting has none.
    fn table_parts(&self) -> (Option<String>, String) {
        match table_name_parts(&self.table_setting()).unwrap_or_default().as_slice() {
            [schema, table] => (Some(schema.clone()), table.clone()),
            [table] => (None, table.clone()),
            _ => (None, "centrifugo_outbox".to_owned()),
        }
    }
    pub fn num_partitions(&self) -> i32 {
        self.entry.as_ref().map_or_else(gucs::num_partitions, |e| e.num_partitions)
    }
    fn select_limit(&self) -> i32 {
        self.settings().map_or_else(gucs::partition_select_limit, |e| e.select_limit)
    }
    /// The NOTIFY channel the outbox trigger notifies for this consumer; None: none.
    /// The table setting and NOTIFY channel of `settings` (this consumer's, as [`Self::settings`]
    /// gives them: read once by the trigger, which runs for every row).
    fn table_and_channel(settings: Option<OutboxConsumer>) -> (String, Option<std::ffi::CString>) {
        match settings {
            None => (gucs::outbox_table_name(), gucs::partition_notification_channel_c()),
            Some(e) => (e.table, std::ffi::CString::new(e.notification_channel).ok().filter(|c| !c.is_empty())),
        }
    }
    /// Whether the table setting `setting` names the table `schema.table`.
    fn names_table(setting: &str, schema: &str, table: &str) -> bool {
        match table_name_parts(setting) {
            Ok(parts) if parts.len() == 2 => parts[0] == schema && parts[1] == table,
            // Unqualified means the table in the extension's schema.
            Ok(parts) => {
                parts.len() == 1 && parts[0] == table && crate::session::extension_schema().as_deref() == Some(schema)
            }
            Err(_) => false,
        }
    }
    fn poll_interval(&self) -> Duration {
        Duration::from_millis(
            self.settings().map_or_else(|| gucs::partition_poll_interval_ms() as u64, |e| e.poll_interval_ms),
        )
    }
}

/// The outbox consumers as the server started them: fixed in the postmaster (workers and
/// sessions inherit it), so a reload can never change which slot drains what.
struct Layout {
    /// The `postgresql` entries of `centrifugo.consumers` that run.
    entries: Vec<OutboxConsumer>,
    /// The default consumer's name at start.
    default_name: String,
}

fn layout() -> &'static Layout {
    static LAYOUT: std::sync::OnceLock<Layout> = std::sync::OnceLock::new();
    LAYOUT.get_or_init(|| {
        let default_name = gucs::consumer_name();
        let entries = match outbox_core::consumers::parse_consumers_each(&gucs::kafka::consumers()) {
            Ok(list) => list
                .into_iter()
                .filter_map(|e| match e.entry {
                    Ok(ConsumerEntry::Postgresql(c)) if c.name != default_name => Some(c),
                    _ => None,
                })
                .collect(),
            Err(_) => Vec::new(),
        };
        Layout { entries, default_name }
    })
}

/// What the server could not start from the settings, for the log at start and the status view.
pub fn layout_problems() -> Vec<String> {
    let mut problems = Vec::new();
    let started = |name: &str| layout().entries.iter().any(|e| e.name == name);
    match outbox_core::consumers::parse_consumers_each(&gucs::kafka::consumers()) {
        Err(e) if layout().entries.is_empty() => {
            problems.push(format!("centrifugo.consumers is invalid, none of its consumers runs: {e}"))
        }
        Err(e) => problems
            .push(format!("centrifugo.consumers is invalid, its consumers keep the settings they started with: {e}")),
        Ok(list) => {
            for e in list {
                match e.entry {
                    Err(why) if started(&e.name) => problems.push(format!(
                        "centrifugo.consumers entry \"{}\" is refused and does not drain: {why}",
                        e.name
                    )),
                    Err(why) => problems.push(format!("centrifugo.consumers entry \"{}\" does not run: {why}", e.name)),
                    Ok(ConsumerEntry::Postgresql(c)) if c.name == layout().default_name => problems.push(format!(
                        "centrifugo.consumers entry \"{}\" has the name of the default consumer (centrifugo.consumer_name) and does not run",
                        c.name
                    )),
                    Ok(ConsumerEntry::Postgresql(c)) if !started(&c.name) => problems.push(format!(
                        "centrifugo.consumers entry \"{}\" was added or mended after the server started: its workers start at the next restart",
                        c.name
                    )),
                    Ok(_) => {}
                }
            }
        }
    }
    let configured = configured_partitions().len();
    if configured > MAX_PARTITIONS as usize {
        problems.push(format!(
            "{configured} outbox partitions are configured in total, and at most {MAX_PARTITIONS} have a worker: partitions beyond that are not drained"
        ));
    }
    problems
}

/// The default consumer first, then the `postgresql` entries of `centrifugo.consumers`.
pub fn outbox_specs() -> Vec<OutboxSpec> {
    std::iter::once(OutboxSpec { entry: None })
        .chain(layout().entries.iter().map(|e| OutboxSpec { entry: Some(e.clone()) }))
        .collect()
}

/// Every configured partition as (index into `outbox_specs()`, partition), workers or not.
pub fn configured_partitions() -> Vec<(usize, i32)> {
    outbox_specs().iter().enumerate().flat_map(|(i, spec)| (0..spec.num_partitions()).map(move |p| (i, p))).collect()
}

/// Every partition worker as (index into `outbox_specs()`, partition), at most one per
/// shared-memory slot. A worker's position in this list is its slot.
pub fn worker_slots() -> Vec<(usize, i32)> {
    configured_partitions().into_iter().take(MAX_PARTITIONS as usize).collect()
}

/// What the outbox trigger needs to know of the table a row went into.
pub struct TableRouting {
    /// The most partitions any consumer drains from it.
    pub num_partitions: i32,
    /// The NOTIFY channels of the consumers that drain it (Centrifugo's
    /// `partition_notification_channel`, per consumer), each once.
    pub channels: Vec<std::ffi::CString>,
}

/// The routing of the table `table()` names, as (schema, name). With only the default consumer
/// (the usual case) the answer is its settings whatever the table, so the name is not looked up:
/// this runs for every row. A table no consumer names gets the default consumer's settings.
pub fn routing_of_table<E>(table: impl FnOnce() -> Result<(String, String), E>) -> Result<TableRouting, E> {
    let default_routing = || TableRouting {
        num_partitions: gucs::num_partitions(),
        channels: gucs::partition_notification_channel_c().into_iter().collect(),
    };
    if layout().entries.is_empty() {
        return Ok(default_routing());
    }
    let (schema, table) = table()?;
    let mut routing = TableRouting { num_partitions: 0, channels: Vec::new() };
    for spec in outbox_specs() {
        let (table_setting, channel) = OutboxSpec::table_and_channel(spec.settings());
        if !OutboxSpec::names_table(&table_setting, &schema, &table) {
            continue;
        }
        routing.num_partitions = routing.num_partitions.max(spec.num_partitions());
        if let Some(channel) = channel.filter(|c| !routing.channels.contains(c)) {
            routing.channels.push(channel);
        }
    }
    Ok(if routing.num_partitions == 0 { default_routing() } else { routing })
}

/// Registers one worker per partition of every outbox consumer; called from `_PG_init`.
pub fn register() {
    for problem in layout_problems() {
        warning!("centrifugo_outbox: {problem}");
    }
    // SAFETY: a plain read of a postmaster setting during library load.
    let max_workers = unsafe { pg_sys::max_worker_processes };
    let needed = worker_slots().len() + crate::kafka_workers_needed();
    // PostgreSQL's logical replication launcher takes a slot before any library's workers.
    if needed as i32 >= max_workers {
        warning!(
            "centrifugo_outbox needs {needed} background workers and max_worker_processes is {max_workers} (the logical replication launcher takes one): some partitions will not be drained; raise max_worker_processes (see README, \"Background workers\")"
        );
    }
    let specs = outbox_specs();
    for (slot, (consumer, partition)) in worker_slots().into_iter().enumerate() {
        let spec = &specs[consumer];
        let name = if spec.entry.is_none() {
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
    /// The partition had fewer rows than the limit; all done were removed.
    Drained,
    /// A full batch was done; there may be more.
    Full,
    /// Another session holds the partition's lock: its pid, when PostgreSQL says.
    Locked { holder: Option<i32> },
    /// The outbox table or the extension is missing in the database.
    NotReady(String),
    /// A temporary failure at outbox row `id`.
    Retry { id: i64, method: String, failure: Failure },
    /// An ERROR rolled the round back; `ran` commands had already run at Centrifugo.
    Failed { error: DbError, ran: usize },
}

/// An outbox row's identity across rounds: its id and created_at (Unix µs).
type RowKey = (i64, i64);

/// Outcomes of commands Centrifugo ran in a round that an ERROR rolled back afterwards: the next
/// rounds apply them without sending the commands again.
#[derive(Default)]
struct Settled {
    table_oid: i64,
    outcomes: HashMap<RowKey, Outcome>,
}

struct Worker {
    slot: usize,
    spec: OutboxSpec,
    partition: i32,
    client: Option<CentrifugoClient>,
    client_error: Option<String>,
    system_id: u64,
    jitter: Jitter,
    /// Consecutive temporary failures, and the row they are about.
    attempts: u32,
    failing_row: Option<i64>,
    /// Consecutive rounds rolled back by an ERROR.
    db_errors: u32,
    /// When partition 0's worker last looked for rows no worker drains.
    stranded_checked_at: Option<Instant>,
    log: RateLimitedLog,
    statements: Statements,
    settled: Settled,
    /// Delivered and dead-lettered rows of the current round, with their outcomes.
    applied: Vec<(RowKey, Outcome)>,
    /// Why this consumer's entry is refused since a reload (logged once per reason).
    refused: Option<String>,
    /// How many rows the next batch may carry after failures (see `outbox_core::lane`).
    window: BatchWindow,
    /// The window's resend and reduced limit as the slot shows them (written when they change).
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
    let mut worker = Worker {
        slot,
        spec,
        partition,
        client: None,
        client_error: None,
        system_id,
        // SAFETY: MyProcPid is set for every backend.
        jitter: Jitter::new(u64::from(unsafe { pg_sys::MyProcPid } as u32) << 20 ^ partition as u64),
        attempts: 0,
        failing_row: None,
        db_errors: 0,
        stranded_checked_at: None,
        log: RateLimitedLog::default(),
        statements: Statements::default(),
        settled: Settled::default(),
        applied: Vec::new(),
        refused: None,
        // A resend that a restart interrupted goes on: the slot outlives the process.
        window: BatchWindow::resuming(resumed.resend),
        shown: (resumed.resend, resumed.batch_limit),
    };
    log!(
        "centrifugo_outbox: consumer {} partition {partition} worker started (database \"{database}\")",
        worker.spec.name()
    );

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
        let shown = (self.window.resend(), self.window.reduced(self.configured_limit() as usize).unwrap_or(0) as u32);
        if shown != self.shown {
            self.shown = shown;
            shmem::update(self.slot, |s| (s.stats.resend, s.stats.batch_limit) = shown);
        }
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
            Round::Drained => {
                self.recovered();
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
            Round::Full => {
                self.recovered();
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
            Round::Retry { failure, .. } if failure.is_deferred() => Next::DrainNow,
            Round::Retry { id, method, failure } => {
                self.failing_row = Some(id);
                self.attempts += 1;
                let backoff = Backoff {
                    base: Duration::from_millis(gucs::retry_backoff_base_ms() as u64),
                    max: Duration::from_millis(gucs::retry_backoff_max_ms() as u64),
                };
                let delay = backoff.delay(self.attempts, self.jitter.next_fraction());
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
                        "outbox id {id} ({method}): {failure}; retrying in {} ms (attempt {})",
                        delay.as_millis(),
                        self.attempts
                    )),
                );
                Next::BackOff(delay)
            }
            Round::Failed { error, ran } => {
                self.db_errors += 1;
                let backoff = Backoff {
                    base: Duration::from_millis(gucs::retry_backoff_base_ms() as u64),
                    max: Duration::from_millis(gucs::retry_backoff_max_ms() as u64),
                };
                let delay = backoff.delay(self.db_errors, self.jitter.next_fraction());
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

    fn recovered(&mut self) {
        if self.attempts > 0 {
            log!(
                "centrifugo_outbox: consumer {} partition {} delivering again after {} retries",
                self.spec.name(),
                self.partition,
                self.attempts
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
        self.attempts = 0;
        self.db_errors = 0;
        self.failing_row = None;
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
        let configured = self.configured_limit();
        let limit = self.window.limit_now(configured as usize) as i32;
        let (table_schema, table_name) = self.spec.table_parts();
        let consumer_name = self.spec.name();
        let database = self.spec.database();
        let client = self.client.as_ref().expect("client checked by the caller");
        let system_id = self.system_id;
        let statements = &mut self.statements;
        let settled = &mut self.settled;
        let applied = &mut self.applied;
        let window = &mut self.window;
        let slot = self.slot;
        let writing_dead_letter = std::cell::Cell::new(false);
        applied.clear();
        // Attempts already made for the row that has been failing, if it fails for good now.
        let (failing_row, attempts) = (self.failing_row, self.attempts);
        let result = xact::transaction(|| {
            Spi::connect_mut(|spi| -> Result<(Round, RoundStats), DbError> {
                let lock_key = format!("centrifugo_partition_lock_{consumer_name}{partition}");
                let head = statements.head(spi)?;
                let head =
                    spi.select(head, None, &[table_schema.clone().into(), table_name.clone().into(), lock_key.into()])?;
                let head = head.first();
                let not_ready = |reason: String| Ok((Round::NotReady(reason), RoundStats::default()));
                let Some(schema) = head.get::<String>(1)? else {
                    return not_ready(format!(
                        "extension centrifugo_outbox is not installed in database \"{database}\""
                    ));
                };
                let table =
                    format!("{}.{}", quote_ident(table_schema.as_deref().unwrap_or(&schema)), quote_ident(&table_name));
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
                            &[format!("centrifugo_partition_lock_{consumer_name}{partition}").into()],
                        )?
                        .first()
                        .get_one::<i32>()?;
                    return Ok((Round::Locked { holder }, RoundStats::default()));
                }
                // The checks above were about the table that had this name then.
                let owner = match lock_checked(
                    table_schema.as_deref().unwrap_or(&schema),
                    &table_name,
                    table_oid,
                    pg_sys::RowExclusiveLock,
                ) {
                    Ok(owner) => owner,
                    Err(what) => {
                        return not_ready(format!(
                            "outbox table {table} {what} while the worker checked it; checking again"
                        ))
                    }
                };
                let exact_commit_ts = head.get::<bool>(6)?.unwrap_or(false);
                // Parsed as the owner too: the worker needs no rights on the table or its schema.
                let payload_is_jsonb = head.get::<bool>(12)? == Some(true);
                let table_statements =
                    as_owner_of(owner, table_oid, || statements.for_table(spi, &table, table_oid, payload_is_jsonb))?;
                if settled.table_oid != table_oid {
                    settled.outcomes.clear();
                    if settled.table_oid != 0 {
                        window.reset();
                    }
                    settled.table_oid = table_oid;
                }
                let dead_letters = format!("{}.centrifugo_dead_letters", quote_ident(&schema));
                let dead_letters_oid = pg_sys::Oid::from(head.get::<i64>(10)?.unwrap_or(0) as u32);
                let snapshot = RoundSnapshot::take();
                let reader = BatchReader {
                    statements: table_statements,
                    snapshot: &snapshot,
                    client,
                    partition,
                    limit,
                    exact_commit_ts,
                    keys: OutboxKeys::new(system_id, table_oid as u32),
                    owner,
                    table_oid,
                    settled: &settled.outcomes,
                    max_command_size: gucs::max_command_size(),
                };
                // What one batch may hold, the next one read ahead included.
                let budget = gucs::batch_max_bytes();
                let budget = client.batch_bytes_cap(limit as usize).map_or(budget, |cap| budget.min(cap));

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
                    dead_letters: &dead_letters,
                    oid: dead_letters_oid,
                    consumer: &consumer_name,
                    partition,
                    payload_is_jsonb,
                    writing: &writing_dead_letter,
                };
                let mut any_deferred = false;
                let mut batch = reader.read(spi, i64::MIN, budget)?;
                let round = loop {
                    any_deferred |= batch.deferred;
                    if batch.rows.is_empty() {
                        break if any_deferred { Round::Full } else { Round::Drained };
                    }
                    // Past the rows resent one by one: the next round reads full batches again.
                    let first = batch.rows[0].id;
                    if window.limit(configured as usize, first) > limit as usize {
                        break Round::Full;
                    }
                    // None after the largest id there can be: nothing can follow it.
                    let next_from = batch.rows.last().and_then(|r| r.id.checked_add(1));
                    let in_flight_bytes: i64 = batch.rows.iter().map(|r| r.payload.len() as i64).sum();
                    let mut in_flight =
                        (!batch.commands.is_empty()).then(|| client.start_body(std::mem::take(&mut batch.body)));
                    // While Centrifugo works on this batch: delete what the previous one finished,
                    // and read and prepare the next rows (after this batch: not deleted yet).
                    let next_from =
                        next_from.filter(|_| batch.full && started.elapsed() < DRAIN_BUDGET && !shutdown_requested());
                    let mut on_error = std::panic::AssertUnwindSafe((
                        client,
                        &mut in_flight,
                        &mut batch,
                        &mut stats,
                        &mut *applied,
                        &mut *window,
                    ));
                    let overlap =
                        PgTryBuilder::new(std::panic::AssertUnwindSafe(|| -> Result<Option<Batch>, DbError> {
                            delete(spi, &mut done)?;
                            Ok(match next_from {
                                Some(from) => Some(reader.read(spi, from, budget - in_flight_bytes)?),
                                None => None,
                            })
                        }))
                        .catch_others(move |error| {
                            // The batch is on its way and will run: learn what became of each command
                            // before the ERROR rolls the round back, so that none is sent again.
                            let (client, in_flight, batch, stats, applied, window) = &mut *on_error;
                            if let Some(in_flight) = in_flight.take() {
                                let outcomes = client.finish(in_flight, &batch.commands, &mut stats.batches);
                                batch.record(outcomes);
                                batch.remember_outcomes(applied);
                                note_outcomes(window, slot, batch);
                            }
                            error.rethrow()
                        })
                        .execute();
                    if let Some(in_flight) = in_flight.take() {
                        batch.record(client.finish(in_flight, &batch.commands, &mut stats.batches));
                        note_outcomes(window, slot, &batch);
                    }
                    let next = match overlap {
                        Ok(next) => next,
                        Err(e) => {
                            batch.remember_outcomes(applied);
                            return Err(e);
                        }
                    };
                    let attempts_of = |id| if failing_row == Some(id) { attempts + 1 } else { 1 };
                    let retry = apply_outcomes(
                        spi,
                        &batch,
                        &mut done,
                        &mut stats,
                        &dead_letter_target,
                        attempts_of,
                        &mut *applied,
                    )?;
                    if let Some(retry) = retry {
                        break retry;
                    }
                    if !batch.full {
                        break if any_deferred { Round::Full } else { Round::Drained };
                    }
                    match next {
                        Some(next) => batch = next,
                        None => break Round::Full,
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
                for (key, _) in self.applied.drain(..) {
                    self.settled.outcomes.remove(&key);
                }
                if matches!(round, Round::Drained) {
                    self.settled.outcomes.clear();
                    self.window.drained();
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
                let ran = self.applied.len();
                self.settled.outcomes.extend(self.applied.drain(..));
                self.statements = Statements::default();
                Round::Failed { error, ran }
            }
        }
    }
}

/// How often partition 0's worker looks for rows in partitions no worker drains.
const STRANDED_CHECK_EVERY: Duration = Duration::from_secs(300);

/// How long one transaction keeps sending batches while the partition has more. Bounds what a
/// crash makes us resend (the idempotency keys absorb it) and how long the transaction holds its
/// snapshot; long enough that commits and the first index descent are paid once per many batches.
const DRAIN_BUDGET: Duration = Duration::from_millis(50);

/// The worker's prepared statements, kept across transactions (PostgreSQL re-plans a kept plan
/// by itself when the table changes; a new table under the same name gets new statements).
#[derive(Default)]
struct Statements {
    head: Option<OwnedPreparedStatement>,
    table: Option<TableStatements>,
}

struct TableStatements {
    name: String,
    oid: i64,
    /// The select reads the payload as jsonb (made text by the worker, see `payload`), else as text.
    payload_is_jsonb: bool,
    /// `$1` partition, `$2` first id, `$3` limit, `$4` whether commit timestamps are tracked.
    select: OwnedPreparedStatement,
    /// `$1` the ctids of the rows done.
    delete: OwnedPreparedStatement,
}

impl Statements {
    /// The per-transaction bookkeeping in one statement: where the extension lives, the outbox
    /// table's oid, kind and owner (whose rights its rows are read and deleted with), the partition lock (the key Centrifugo's consumer uses), whether commit
    /// timestamps are tracked, and a plan fix: the (partition, id) index is always right for
    /// "the next rows of this partition", even before a freshly filled queue table has statistics.
    fn head(&mut self, spi: &SpiClient<'_>) -> Result<&OwnedPreparedStatement, pgrx::spi::Error> {
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

    fn for_table(
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

/// One outbox row as read.
struct Row {
    id: i64,
    ctid: pg_sys::ItemPointerData,
    method: String,
    /// Empty when the payload was not made text.
    payload: String,
    /// A jsonb payload not made text (see `payload`): the dead letter's reason, and the value.
    dead_letter: Option<(String, pg_sys::Datum)>,
    /// Unix microseconds.
    committed_at: i64,
    /// Unix microseconds; with the id, what makes the row's idempotency key unique.
    created_at: i64,
}

/// Rows read in id order, parsed: the commands to send, and the rows that are dead letters
/// already (malformed).
struct Batch {
    rows: Vec<Row>,
    /// One per row: known before sending for malformed rows, filled in from the reply otherwise.
    outcomes: Vec<Option<Outcome>>,
    /// Which rows `commands` are.
    sendable: Vec<usize>,
    commands: Vec<Prepared>,
    /// The `/api/batch` request body of `commands`, made ahead of sending.
    body: outbox_core::client::Body,
    /// The limit was reached: the partition may have more.
    full: bool,
    /// Rows were left for the next round (committed after the round's snapshot).
    deferred: bool,
}

impl Batch {
    /// Takes Centrifugo's per-command outcomes of `commands`.
    fn record(&mut self, per_command: Vec<Outcome>) {
        for (i, outcome) in self.sendable.iter().zip(per_command) {
            self.outcomes[*i] = Some(outcome);
        }
    }

    /// Adds the rows that are done (delivered or dead letters) to `applied`.
    fn remember_outcomes(&self, applied: &mut Vec<(RowKey, Outcome)>) {
        for (row, outcome) in self.rows.iter().zip(&self.outcomes) {
            if let Some(outcome @ (Outcome::Delivered | Outcome::DeadLetter { .. })) = outcome {
                applied.push(((row.id, row.created_at), outcome.clone()));
            }
        }
    }
}

struct BatchReader<'s> {
    statements: &'s TableStatements,
    /// What the round may send: rows committed before it began (see [`RoundSnapshot`]).
    snapshot: &'s RoundSnapshot,
    /// Makes each batch's request while the previous one is in flight.
    client: &'s CentrifugoClient,
    partition: i32,
    limit: i32,
    exact_commit_ts: bool,
    keys: OutboxKeys,
    /// The table's owner, as whom rows are read, and the table.
    owner: pg_sys::Oid,
    table_oid: i64,
    /// Outcomes already known from a round that was rolled back: not sent again.
    settled: &'s HashMap<RowKey, Outcome>,
    /// Rows whose payload text is longer are dead letters (0: no limit).
    max_command_size: i32,
}

/// The snapshot a round takes once it holds the partition's lock: every read of the round sends
/// only rows it sees. Each read runs with a fresh snapshot (it must see what was committed before
/// the lock), so without this a read ahead could see a transaction that committed after the
/// previous read (a low id, skipped since the reads go on from the last id) together with a
/// later transaction of the same writer (a higher id), and send the later one first.
struct RoundSnapshot(pg_sys::Snapshot);

impl RoundSnapshot {
    fn take() -> Self {
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
    /// The next rows of the partition with `id >= from`, at most the limit and, past the first
    /// row, at most `budget` bytes of payload text.
    fn read(&self, spi: &SpiClient<'_>, from: i64, budget: i64) -> Result<Batch, DbError> {
        let args = [self.partition.into(), from.into(), i64::from(self.limit).into(), self.exact_commit_ts.into()];
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
        let mut batch = Batch {
            // The limit was reached, or the budget or the snapshot left rows behind: there may be more.
            full: over_budget || deferred || fetched >= i64::from(self.limit),
            deferred,
            outcomes: Vec::with_capacity(rows.len()),
            sendable: Vec::with_capacity(rows.len()),
            commands: Vec::with_capacity(rows.len()),
            body: Default::default(),
            rows,
        };
        self.prepare(&mut batch);
        Ok(batch)
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

    /// Prepares the batch's rows: outcomes already known, dead letters found before sending,
    /// and the request body of the rest.
    fn prepare(&self, batch: &mut Batch) {
        for (i, row) in batch.rows.iter().enumerate() {
            if let Some(outcome) = self.settled.get(&(row.id, row.created_at)) {
                batch.outcomes.push(Some(outcome.clone()));
                continue;
            }
            // The SQL API refuses both at call time; a plain INSERT is caught here.
            if let Some((why, _)) = &row.dead_letter {
                let failure = Failure::malformed(why.clone());
                batch.outcomes.push(Some(Outcome::DeadLetter { failure, payload: None }));
                continue;
            }
            let size = outbox_core::settings::compact_json_len(&row.payload);
            if self.max_command_size > 0 && size > self.max_command_size as usize {
                let failure = Failure::malformed(format!(
                    "payload of {size} bytes exceeds centrifugo.max_command_size ({} bytes)",
                    self.max_command_size
                ));
                batch.outcomes.push(Some(Outcome::DeadLetter { failure, payload: None }));
                continue;
            }
            match prepare_text(&row.method, &row.payload, || self.keys.key(row.id, row.created_at)) {
                Ok(p) => {
                    batch.outcomes.push(None);
                    batch.sendable.push(i);
                    batch.commands.push(p);
                }
                Err(failure) => batch.outcomes.push(Some(Outcome::DeadLetter { failure, payload: None })),
            }
        }
        batch.body = self.client.body(&batch.commands);
    }
}

/// Takes what became of `batch` into the partition's window as soon as it is known (before
/// anything that may raise an ERROR), and keeps a resend it starts or widens in the slot, so a
/// rolled-back round or a terminated worker goes on with it.
fn note_outcomes(window: &mut BatchWindow, slot: usize, batch: &Batch) {
    let (Some(first), Some(last)) = (batch.rows.first(), batch.rows.last()) else { return };
    let before = window.resend();
    window.record(batch.sendable.iter().map(|&i| batch.outcomes[i].as_ref()), first.id, last.id);
    let after = window.resend();
    if after != before {
        shmem::update(slot, |s| s.stats.resend = after);
    }
}

/// Where dead letters of this consumer go.
struct DeadLetterTarget<'a> {
    dead_letters: &'a str,
    oid: pg_sys::Oid,
    /// The outbox's payload column is jsonb: its text always goes back into jsonb.
    payload_is_jsonb: bool,
    consumer: &'a str,
    partition: i32,
    /// Set while a dead letter is written.
    writing: &'a std::cell::Cell<bool>,
}

/// Applies every outcome of a batch: the ctids of delivered and dead-lettered rows join `done`
/// (and `applied`), rows that failed temporarily stay for a resend. Centrifugo ran every command of the batch, so
/// a command that succeeded after a failed one is done too: resending it would run it twice.
/// Returns the first temporary failure, if any. `attempts_of` gives a row's attempt count for
/// its dead letter.
fn apply_outcomes(
    spi: &mut SpiClient<'_>,
    batch: &Batch,
    done: &mut Vec<pg_sys::ItemPointerData>,
    stats: &mut RoundStats,
    target: &DeadLetterTarget<'_>,
    attempts_of: impl Fn(i64) -> u32,
    applied: &mut Vec<(RowKey, Outcome)>,
) -> Result<Option<Round>, DbError> {
    // First, in case a dead-letter insert fails: the round will be rolled back, and these ran.
    batch.remember_outcomes(applied);
    let acked_at = shmem::unix_micros();
    let mut retry = None;
    for (row, outcome) in batch.rows.iter().zip(&batch.outcomes) {
        match outcome.as_ref().expect("every row has an outcome") {
            Outcome::Delivered => {
                stats.delivered += 1;
                stats.latencies_ms.push((acked_at - row.committed_at).max(0) as f64 / 1000.0);
                done.push(row.ctid);
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
                    attempts: attempts_of(row.id),
                    created_at: row.created_at,
                };
                // An ERROR inside unwinds past this: the flag tells the round's report what failed.
                target.writing.set(true);
                insert_dead_letter(spi, target, &dead)?;
                target.writing.set(false);
                stats.dead += 1;
                stats.last_dead = Some(failure.clone());
                done.push(row.ctid);
            }
            Outcome::Retry(failure) => {
                if retry.is_none() {
                    retry = Some(Round::Retry { id: row.id, method: row.method.clone(), failure: failure.clone() });
                }
            }
        }
    }
    Ok(retry)
}

/// The oid of table `name` in schema `schema` as the catalog caches see it now.
fn relation_named(schema: &str, name: &str) -> Option<i64> {
    crate::session::relation_named(schema, name).map(|oid| i64::from(u32::from(oid)))
}

/// Locks table `oid` (named `schema.name` when it was looked up) so that nobody can drop it and
/// put a table of their own under the name while our statements run (a schema's owner may drop
/// any table in it), then checks the name still means it and returns its owner as of now
/// (ALTER TABLE ... OWNER waits for the lock). Err says what happened meanwhile.
fn lock_checked(schema: &str, name: &str, oid: i64, mode: u32) -> Result<pg_sys::Oid, &'static str> {
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
fn as_owner_of<R>(owner: pg_sys::Oid, table_oid: i64, body: impl FnOnce() -> R) -> R {
    crate::pinned::pinned(&[pg_sys::Oid::from(table_oid as u32)], || xact::as_owner(owner, body))
}

/// What one round did, for the shared-memory counters.
#[derive(Default)]
struct RoundStats {
    delivered: u64,
    dead: u64,
    batches: u64,
    latencies_ms: Vec<f64>,
    last_dead: Option<Failure>,
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
