//! The Kafka bridge: one background worker per Kafka consumer consumes Centrifugo commands from
//! Kafka topics and hands them to the delivery engine (`outbox_core::engine`), one lane per Kafka
//! partition, with the same client, outcomes, retry policy and dead-letter table as the outbox
//! workers.
//!
//! Per Kafka partition, records are dispatched in offset order (up to `max_poll_records` per
//! batch), one batch at a time; the batches of different partitions are in flight
//! together while librdkafka fetches the next records. A temporary failure pauses only that
//! partition while it backs off. An offset is
//! committed only after its record is done: delivered, or written to the dead letters in a
//! committed transaction. Queues are bounded (`partition_queue_max_size`): a full partition is
//! paused at the broker until it drains. On revocation, what is done is committed and the rest
//! is dropped for the new owner to read again. Offsets never move past an undone record, so a
//! crash redelivers (at least once), and derived idempotency keys stop duplicate publications.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags};
use pgrx::prelude::*;
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig as KafkaConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use outbox_core::client::CentrifugoClient;
use outbox_core::consumers::{parse_consumers_each, ConsumerEntry};
use outbox_core::dispatch::{Failure, Outcome};
use outbox_core::engine::{Engine, Policy, Ready};
use outbox_core::kafka::{flat_tls, parse_record, split_list, KafkaConsumer, RecordPosition, SaslMechanism};
use outbox_core::retry::Backoff;

use crate::gucs;
use crate::shmem::{self, WorkerState};

/// The Kafka consumers to run: the flat `centrifugo.kafka_*` settings (consumer "kafka") and the
/// kafka entries of `centrifugo.consumers`. Computed the same way in the postmaster and workers.
pub fn consumers() -> Result<Vec<KafkaConsumer>, String> {
    let mut out = Vec::new();
    let brokers = split_list(&gucs::kafka::brokers());
    if !brokers.is_empty() {
        let mut c =
            KafkaConsumer::new("kafka", brokers, split_list(&gucs::kafka::topics()), &gucs::kafka::consumer_group());
        c.max_poll_records = gucs::kafka::max_poll_records().max(1) as usize;
        c.fetch_max_bytes = gucs::kafka::fetch_max_bytes() as u64;
        c.fetch_max_wait_ms = gucs::kafka::fetch_max_wait_ms() as u64;
        c.fetch_read_uncommitted = gucs::kafka::fetch_read_uncommitted();
        c.partition_queue_max_size = gucs::kafka::partition_queue_max_size().max(1) as usize;
        c.dial_timeout_ms = gucs::kafka::dial_timeout_ms() as u64;
        c.session_timeout_ms = gucs::kafka::session_timeout_ms() as u64;
        c.max_poll_interval_ms = gucs::kafka::max_poll_interval_ms() as u64;
        c.instance_id = gucs::kafka::instance_id();
        if let Some(m) =
            SaslMechanism::parse(&gucs::kafka::sasl_mechanism()).map_err(|e| format!("centrifugo.kafka_{e}"))?
        {
            c.sasl = Some((m, gucs::kafka::sasl_user(), gucs::kafka::sasl_password()));
        }
        if gucs::kafka::tls() {
            let get = |k: &str| match k {
                "tls_cert" => gucs::kafka::tls_cert(),
                "tls_key" => gucs::kafka::tls_key(),
                "tls_cert_pem" => gucs::kafka::tls_cert_pem(),
                "tls_key_pem" => gucs::kafka::tls_key_pem(),
                "tls_root_ca" => gucs::kafka::tls_root_ca(),
                "tls_root_ca_pem" => gucs::kafka::tls_root_ca_pem(),
                "tls_client_ca" => gucs::kafka::tls_client_ca(),
                "tls_client_ca_pem" => gucs::kafka::tls_client_ca_pem(),
                "server_name" => gucs::kafka::tls_server_name(),
                _ => String::new(),
            };
            c.tls = Some(flat_tls(get, gucs::kafka::tls_insecure_skip_verify()));
        }
        let header = gucs::kafka::method_header();
        if !header.is_empty() {
            c.method_header = header;
        }
        if gucs::kafka::publication_data_mode() {
            c.publication_data_mode = Some(Default::default());
        }
        c.validate()?;
        out.push(c);
    }
    for entry in parse_consumers_each(&gucs::kafka::consumers())?.into_iter().filter_map(|e| e.entry.ok()) {
        if let ConsumerEntry::Kafka(c) = entry {
            if out.iter().any(|o| o.name == c.name) {
                return Err(format!("kafka consumer name \"{}\" is used twice", c.name));
            }
            out.push(c);
        }
    }
    Ok(out)
}

/// The kafka entries of `centrifugo.consumers` that are refused, with why (each stops only itself).
pub fn refused_entries() -> Vec<String> {
    let Ok(list) = parse_consumers_each(&gucs::kafka::consumers()) else { return Vec::new() };
    list.into_iter().filter_map(|e| e.entry.err()).collect()
}

/// Registers one bridge worker per Kafka consumer; with invalid settings, one worker that logs
/// why and stays down (PostgreSQL itself keeps running).
pub fn register() {
    let consumers = consumers();
    let register_one = |index: i32, name: &str| {
        let title = format!("centrifugo_outbox kafka {name}");
        BackgroundWorkerBuilder::new(&title)
            .set_type(&title)
            .set_library("centrifugo_outbox")
            .set_function("centrifugo_kafka_worker_main")
            .set_argument(index.into_datum())
            .set_extra(name)
            .enable_spi_access()
            .set_start_time(BgWorkerStartTime::RecoveryFinished)
            .set_restart_time(Some(Duration::from_secs(1)))
            .load();
    };
    match consumers {
        Err(_) => register_one(-1, "(invalid settings)"),
        Ok(list) => {
            for (i, c) in list.iter().enumerate() {
                register_one(i as i32, &c.name);
            }
        }
    }
}

/// Events from librdkafka's own threads, handed to the worker's thread (only it may log).
struct BridgeContext {
    events: Mutex<Vec<String>>,
    /// Offsets done per partition (next offset to read), committed synchronously on revocation.
    done: Mutex<HashMap<(String, i32), i64>>,
    revoked: Mutex<Vec<(String, i32)>>,
}

impl BridgeContext {
    fn push(&self, line: String) {
        if let Ok(mut e) = self.events.lock() {
            if e.len() < 1000 {
                e.push(gucs::scrub(&line));
            }
        }
    }
}

impl ClientContext for BridgeContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        if (level as i32) <= (RDKafkaLogLevel::Warning as i32) {
            self.push(format!("librdkafka {fac}: {message}"));
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.push(format!("kafka error: {error}: {reason}"));
    }
}

impl ConsumerContext for BridgeContext {
    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        // A partition paused for a full queue and revoked comes back still paused (librdkafka
        // keeps an application's pause across assignments); its queue is gone, so nothing
        // would resume it.
        if let Rebalance::Assign(tpl) = rebalance {
            if let Err(e) = consumer.resume(tpl) {
                self.push(format!("resume after rebalance failed: {e}"));
            }
        }
    }

    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let mut commit = TopicPartitionList::new();
            let done = self.done.lock().map(|d| d.clone()).unwrap_or_default();
            for e in tpl.elements() {
                let key = (e.topic().to_owned(), e.partition());
                if let Some(next) = done.get(&key) {
                    let _ = commit.add_partition_offset(&key.0, key.1, Offset::Offset(*next));
                }
                if let Ok(mut r) = self.revoked.lock() {
                    r.push(key);
                }
            }
            if commit.count() > 0 {
                if let Err(e) = consumer.commit(&commit, CommitMode::Sync) {
                    self.push(format!("commit before revocation failed: {e}"));
                }
            }
        }
    }
}

/// A Kafka partition: the engine's lane key.
type Partition = (String, i32);

/// What the bridge keeps of a record while the engine holds it.
struct Record {
    /// The record's timestamp (producer create time), for the latency histogram.
    timestamp_ms: Option<i64>,
    /// The value as it came, for a dead letter's raw_value.
    value: Option<Vec<u8>>,
    /// The method it names, for a dead letter.
    method: String,
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn centrifugo_kafka_worker_main(arg: pg_sys::Datum) {
    // SAFETY: the argument is the consumer index set at registration.
    let index = unsafe { i32::from_datum(arg, false) }.unwrap_or(-1);
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let name = BackgroundWorker::get_extra().to_owned();
    // Found by name: a reload may have reordered, broken or removed the entries.
    let mut said = None;
    let consumer_spec = loop {
        let why = match consumers() {
            Ok(list) if index >= 0 => match list.into_iter().find(|c| c.name == name) {
                Some(spec) => break spec,
                None => refused_entries()
                    .into_iter()
                    .find(|why| why.contains(&format!("\"{name}\"")))
                    .unwrap_or_else(|| format!("centrifugo.consumers no longer has an enabled kafka entry \"{name}\"")),
            },
            Ok(_) => {
                log!("centrifugo_outbox: kafka bridge: the consumer settings changed; waiting for a restart");
                return;
            }
            Err(e) if index < 0 => {
                // Exit code 0: the postmaster does not restart a worker whose settings are wrong.
                warning!("centrifugo_outbox: kafka bridge not started: {e}");
                return;
            }
            Err(e) => e,
        };
        // This consumer alone waits for a reload that mends it; the others run on.
        if said.as_ref() != Some(&why) {
            warning!("centrifugo_outbox: kafka consumer {name} not running: {why}");
            said = Some(why);
        }
        if !BackgroundWorker::wait_latch(Some(Duration::from_secs(1))) || shutdown_requested() {
            return;
        }
        if BackgroundWorker::sighup_received() {
            // SAFETY: reloading the configuration file in a backend, as PostgreSQL's own workers do.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
    };
    crate::session::connect_worker(&gucs::database(), crate::session::ConnectSlot::Kafka(index as usize));
    match run(index as usize, consumer_spec) {
        Ok(()) => log!("centrifugo_outbox: kafka consumer {name} stopped"),
        Err(e) => {
            warning!("centrifugo_outbox: kafka consumer {name} stopped: {e}");
            // A setting or file is wrong: try again in a while, without flooding the log.
            let _ = BackgroundWorker::wait_latch(Some(Duration::from_secs(10)));
        }
    }
    // Exit code 1: restarted after the restart interval unless the server is shutting down.
    // SAFETY: ends the process the way PostgreSQL's own workers do.
    unsafe { pg_sys::proc_exit(1) };
}

/// Whether the postmaster still runs. Its death is otherwise only seen by processes that wait on
/// a latch, and this one waits in librdkafka's poll; an orphan is adopted by another process.
fn postmaster_alive() -> bool {
    // SAFETY: a plain read of a global set at process start.
    std::os::unix::process::parent_id() as i32 == unsafe { pg_sys::PostmasterPid }
}

/// A record's headers, keys as text (bytes that are not UTF-8 replaced: such a key never names
/// the method header), values as bytes. rdkafka's own iterator panics on a key that is not UTF-8.
fn record_headers(msg: &rdkafka::message::BorrowedMessage<'_>) -> Vec<(String, Vec<u8>)> {
    let mut headers = Vec::new();
    let mut list: *mut rdkafka::bindings::rd_kafka_headers_t = std::ptr::null_mut();
    // SAFETY: the message pointer is valid while `msg` lives; the headers list belongs to it.
    if unsafe { rdkafka::bindings::rd_kafka_message_headers(msg.ptr(), &mut list) }
        != rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
    {
        return headers;
    }
    for idx in 0.. {
        let (mut name, mut value, mut size) = (std::ptr::null(), std::ptr::null(), 0usize);
        // SAFETY: out-pointers are locals; name and value point into the message until it is freed.
        let err = unsafe { rdkafka::bindings::rd_kafka_header_get_all(list, idx, &mut name, &mut value, &mut size) };
        if err != rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
            break;
        }
        // SAFETY: a NUL-terminated name and `size` bytes of value (or NULL) owned by the message.
        let key = String::from_utf8_lossy(unsafe { std::ffi::CStr::from_ptr(name) }.to_bytes()).into_owned();
        let value = if value.is_null() {
            Vec::new()
        } else {
            unsafe { std::slice::from_raw_parts(value.cast::<u8>(), size) }.to_vec()
        };
        headers.push((key, value));
    }
    headers
}

fn shutdown_requested() -> bool {
    // SAFETY: a flag set by the SIGTERM handler.
    unsafe { std::ptr::read_volatile(&raw const pg_sys::ShutdownRequestPending) != 0 }
}

fn run(index: usize, spec: KafkaConsumer) -> Result<(), String> {
    // SAFETY: MyProcPid is set for every backend.
    let pid = unsafe { pg_sys::MyProcPid };
    shmem::unassign_kafka(index, 0);
    shmem::set_kafka_name(index, &spec.name);
    // The secrets scrubbed are those of now: a reload that rotates one is followed.
    let scrubbed = gucs::scrub;

    let mut config = KafkaConfig::new();
    for (k, v) in spec.librdkafka_config() {
        config.set(k, v);
    }
    // Group joins and rebalances within seconds rather than tens of seconds, unless the
    // settings say otherwise.
    if spec.session_timeout_ms == 0 {
        config.set("session.timeout.ms", "6000");
    }
    let session_ms = if spec.session_timeout_ms == 0 { 6000 } else { spec.session_timeout_ms };
    config.set("heartbeat.interval.ms", (session_ms / 6).clamp(1, 1000).to_string());
    config.set_log_level(RDKafkaLogLevel::Warning);
    let context = BridgeContext {
        events: Mutex::new(Vec::new()),
        done: Mutex::new(HashMap::new()),
        revoked: Mutex::new(Vec::new()),
    };
    let consumer: BaseConsumer<BridgeContext> =
        config.create_with_context(context).map_err(|e| scrubbed(&format!("cannot create the Kafka client: {e}")))?;
    let topics: Vec<&str> = spec.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics).map_err(|e| scrubbed(&format!("cannot subscribe to {topics:?}: {e}")))?;
    log!(
        "centrifugo_outbox: kafka consumer {} started: brokers {}, topics {}, group {}",
        spec.name,
        spec.brokers.join(","),
        spec.topics.join(","),
        spec.consumer_group
    );

    let mut client: Option<CentrifugoClient> = None;
    let mut engine: Engine<Partition, Record> = Engine::new(delivery_policy(&spec), u64::from(pid as u32));
    // Partitions paused at the broker for a full queue.
    let mut paused: HashSet<Partition> = HashSet::new();
    let mut last_status = Instant::now() - Duration::from_secs(10);
    // Partitions assigned, as of the last status update (a blocking call into librdkafka).
    let mut assigned = 1usize;
    let mut last_log: HashMap<&'static str, Instant> = HashMap::new();
    let mut warn = |kind: &'static str, message: String| {
        let now = Instant::now();
        if last_log.get(kind).is_none_or(|t| now.duration_since(*t) >= Duration::from_secs(10)) {
            warning!("centrifugo_outbox: kafka consumer {}: {}", spec.name, message);
            last_log.insert(kind, now);
        }
    };

    while !shutdown_requested() {
        if BackgroundWorker::sighup_received() {
            // SAFETY: reloading the configuration file in a backend, as PostgreSQL's own workers do.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
            // A rotated SASL password or a changed consumers entry: leave the group cleanly (what
            // is done is committed below) and start again with the new settings.
            match consumers() {
                // Unreadable as a whole (not one entry): nothing says what this consumer should
                // be now, so it runs on as it started, as the partition workers do.
                Err(e) => warn("settings", format!("{e}; running on with the settings it started with")),
                Ok(list) if list.iter().find(|c| c.name == spec.name) != Some(&spec) => {
                    log!(
                        "centrifugo_outbox: kafka consumer {}: its settings changed; restarting the bridge",
                        spec.name
                    );
                    break;
                }
                Ok(_) => {}
            }
        }
        let wanted = gucs::client_config();
        if client.as_ref().is_none_or(|c| *c.config() != wanted) {
            client = match CentrifugoClient::new(wanted) {
                Ok(c) => Some(
                    c.with_stop_check(shutdown_requested)
                        .with_node_board(Box::new(shmem::SharedNodeBoard))
                        .carry_over(client.as_ref()),
                ),
                Err(e) => {
                    warn("client", format!("cannot reach Centrifugo: {e}"));
                    None
                }
            };
        }
        for line in std::mem::take(&mut *consumer.context().events.lock().unwrap()) {
            warn("librdkafka", line);
        }
        if last_status.elapsed() >= Duration::from_secs(1) {
            last_status = Instant::now();
            assigned = publish_assignment(&consumer, index, pid).max(1);
        }

        engine.set_policy(delivery_policy(&spec));
        // Poll: wait only when nothing is ready to dispatch.
        // Without a client nothing is dispatched: wait in the poll rather than spin.
        let ready = client.is_some() && engine.any_ready(Instant::now());
        let timeout = if ready { Duration::ZERO } else { Duration::from_millis(100) };
        // A batch's worth per assigned partition, so that several partitions have a batch ready
        // at once. Records come partition by partition (a fetched set at a time), so a poll stops
        // once one queue holds half its bound: a queue that reached the bound would pause its
        // partition, and a paused partition is fetched anew. (A queue that does not drain, its
        // partition backing off, still gains a record per poll: it is paused at its bound.)
        let most = spec.max_poll_records.saturating_mul(assigned);
        let queue_bound = (spec.partition_queue_max_size / 2).max(1);
        let mut poll = Poll { consumer: &consumer, spec: &spec, index, engine: &mut engine, paused: &mut paused };
        poll.records(timeout, most, queue_bound, &mut |e| warn("poll", scrubbed(&format!("poll: {e}"))));

        if !postmaster_alive() {
            // An orphan would go on consuming and committing offsets, and PostgreSQL cannot start
            // again while it lives.
            // SAFETY: ends the process without touching shared state, as PostgreSQL's own
            // processes do when the postmaster is gone.
            unsafe { pg_sys::proc_exit(1) };
        }
        let Some(client) = client.as_ref() else { continue };
        // Every ready partition's batch goes on the wire at once (partitions are independent;
        // within one, a batch waits for the one before it); librdkafka's fetcher keeps reading
        // the next records meanwhile. The consumer is not polled while batches are in flight:
        // a rebalance callback runs inside a poll, and a partition revoked with its batch in
        // flight would be sent again by its new owner while Centrifugo may still be running it.
        let flight = engine.start(client, Instant::now());
        let reports = engine.finish(client, flight, Instant::now());
        for event in client.take_events() {
            log!("centrifugo_outbox: kafka consumer {}: {}", spec.name, scrubbed(&event));
        }
        for report in reports {
            let key = report.lane;
            // A queue emptied is not a partition drained (the next fetch may bring more of the
            // resend): a resend ends at the first record past it.
            let (resend, reduced) = engine.window(&key);
            let applied = apply_settled(&spec.name, &key, &mut engine);
            match applied {
                Ok((done, stats)) => {
                    shmem::update_kafka(index, &key.0, key.1, |s| {
                        s.pid = pid;
                        s.assigned = true;
                        s.stats.record_endpoints(client);
                        s.stats.resend = resend;
                        s.stats.batch_limit = reduced.unwrap_or(0) as u32;
                        s.stats.batches += report.requests;
                        s.stats.dead_lettered += stats.dead;
                        if stats.delivered > 0 {
                            s.stats.record_success(stats.delivered, stats.latencies_ms.iter().copied());
                        }
                        if let Some(f) = &stats.last_dead {
                            s.stats.record_error(f.code.map(|c| c as i32).unwrap_or(0), &scrubbed(&f.message));
                        }
                        if let Some(last) = done {
                            s.committed = last + 1;
                        }
                        s.set_state(if report.retry.is_some() { WorkerState::BackingOff } else { WorkerState::Idle });
                    });
                    if let Some(last) = done {
                        consumer.context().done.lock().unwrap().insert(key.clone(), last + 1);
                        let mut tpl = TopicPartitionList::new();
                        let _ = tpl.add_partition_offset(&key.0, key.1, Offset::Offset(last + 1));
                        if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
                            warn("commit", scrubbed(&format!("offset commit for {}[{}]: {e}", key.0, key.1)));
                        }
                    }
                    // The rest of a batch resent one by one is dispatched again at once.
                    if let Some(retry) = report.retry.filter(|r| !r.failure.is_deferred()) {
                        let failure = &retry.failure;
                        shmem::update_kafka(index, &key.0, key.1, |s| {
                            s.stats.retries += 1;
                            s.stats.backoff_ms = retry.delay.as_millis() as u32;
                            s.stats.record_error(
                                failure.code.map(|c| c as i32).unwrap_or(-1),
                                &scrubbed(&failure.to_string()),
                            );
                        });
                        warn(
                            "retry",
                            scrubbed(&format!(
                                "{}[{}] offset {} ({}): {failure}; retrying in {} ms (attempt {})",
                                key.0,
                                key.1,
                                retry.position,
                                retry.method,
                                retry.delay.as_millis(),
                                retry.attempt
                            )),
                        );
                    }
                }
                Err(e) => {
                    let delay = Duration::from_millis(gucs::retry_backoff_max_ms() as u64);
                    engine.hold(&key, Instant::now() + delay);
                    let why = scrubbed(&format!("cannot write dead letters, partition paused: {e}"));
                    shmem::update_kafka(index, &key.0, key.1, |s| {
                        s.pid = pid;
                        s.stats.resend = resend;
                        s.stats.batch_limit = reduced.unwrap_or(0) as u32;
                        s.stats.backoff_ms = delay.as_millis() as u32;
                        s.stats.record_error(0, &why);
                        s.set_state(WorkerState::BackingOff);
                    });
                    warn("dead letters", why);
                }
            }
            if paused.contains(&key) && engine.len(&key) <= spec.partition_queue_max_size / 2 {
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition(&key.0, key.1);
                if consumer.resume(&tpl).is_ok() {
                    paused.remove(&key);
                }
            }
        }
    }

    // Shutdown: commit what is done, synchronously, then leave the group.
    let done = consumer.context().done.lock().map(|d| d.clone()).unwrap_or_default();
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), next) in done {
        let _ = tpl.add_partition_offset(&topic, partition, Offset::Offset(next));
    }
    if tpl.count() > 0 {
        let _ = consumer.commit(&tpl, CommitMode::Sync);
    }
    consumer.unsubscribe();
    Ok(())
}

/// What a poll fills: the engine's lanes, the partitions paused for a full queue.
struct Poll<'a> {
    consumer: &'a BaseConsumer<BridgeContext>,
    spec: &'a KafkaConsumer,
    index: usize,
    engine: &'a mut Engine<Partition, Record>,
    paused: &'a mut HashSet<Partition>,
}

impl Poll<'_> {
    /// Reads up to `max` (at least one) records into the partitions' lanes, waiting up to
    /// `timeout` for the first one and stopping once a lane holds `queue_bound` records; drops
    /// the lanes of partitions revoked by each poll (nothing of them is sent or committed any
    /// more: their new owner reads them again). A full lane pauses its partition.
    fn records(
        &mut self,
        mut timeout: Duration,
        max: usize,
        queue_bound: usize,
        poll_failed: &mut dyn FnMut(KafkaError),
    ) {
        for _ in 0..max {
            let polled = self.consumer.poll(timeout);
            // A rebalance inside that poll: drop what was revoked before taking the record, which
            // may already come from the new assignment.
            self.drop_revoked();
            match polled {
                None => break,
                Some(Err(e)) => {
                    poll_failed(e);
                    break;
                }
                Some(Ok(msg)) => {
                    let key = (msg.topic().to_owned(), msg.partition());
                    if self.push(&key, &msg) >= queue_bound {
                        break;
                    }
                }
            }
            timeout = Duration::ZERO;
        }
    }

    /// Hands a record to its partition's lane; returns how many the lane holds.
    fn push(&mut self, key: &Partition, msg: &rdkafka::message::BorrowedMessage<'_>) -> usize {
        let (index, spec) = (self.index, self.spec);
        // A resend that a restart interrupted goes on (offsets outlive the process).
        self.engine.open(key, || shmem::kafka_resend(index, &key.0, key.1));
        let value = msg.payload().map(<[u8]>::to_vec);
        let headers = record_headers(msg);
        let pos = RecordPosition {
            topic: &key.0,
            partition: key.1,
            offset: msg.offset(),
            timestamp_ms: msg.timestamp().to_millis(),
        };
        let (ready, size, method) = match parse_record(spec, value.as_deref(), &headers, &pos) {
            Ok(p) => {
                let (size, method) = (p.payload.len() as i64, p.method.as_str().to_owned());
                (Ready::Send(p), size, method)
            }
            Err(failure) => (
                Ready::Known(Outcome::DeadLetter { failure, payload: None }),
                0,
                record_method(spec, &headers, value.as_deref()),
            ),
        };
        let record = Record { timestamp_ms: pos.timestamp_ms, value, method };
        let held = self.engine.push(key, msg.offset(), 0, ready, size, record);
        if held >= spec.partition_queue_max_size && !self.paused.contains(key) {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(&key.0, key.1);
            if self.consumer.pause(&tpl).is_ok() {
                self.paused.insert(key.clone());
            }
        }
        held
    }

    fn drop_revoked(&mut self) {
        for key in std::mem::take(&mut *self.consumer.context().revoked.lock().unwrap()) {
            let left = self.engine.undone(&key);
            self.engine.remove(&key);
            self.paused.remove(&key);
            self.consumer.context().done.lock().unwrap().remove(&key);
            shmem::update_kafka(self.index, &key.0, key.1, |s| s.assigned = false);
            log!(
                "centrifugo_outbox: kafka consumer {}: {}[{}] revoked; {left} record(s) not done are left to its new owner",
                self.spec.name,
                key.0,
                key.1
            );
        }
    }
}

/// What applying one partition's settled records did, for the shared-memory counters.
#[derive(Default)]
struct DispatchStats {
    delivered: u64,
    dead: u64,
    latencies_ms: Vec<f64>,
    last_dead: Option<Failure>,
}

/// How batches are made and failures waited out, as the settings say now. Strict order: one
/// record per batch.
fn delivery_policy(spec: &KafkaConsumer) -> Policy {
    Policy {
        batch: if gucs::strict_order() { 1 } else { spec.max_poll_records },
        budget: gucs::batch_max_bytes(),
        backoff: Backoff {
            base: Duration::from_millis(gucs::retry_backoff_base_ms() as u64),
            max: Duration::from_millis(gucs::retry_backoff_max_ms() as u64),
        },
    }
}

/// Makes what the engine settled in one partition durable: its dead letters are written in one
/// transaction, and only then are those records done (delivered ones are done at once, but the
/// done prefix waits for the dead letters before them). Returns the offset through which the
/// partition is done (what may be committed), and what it did. Err: the dead letters could not
/// be written; nothing is applied, and nothing is sent again.
fn apply_settled(
    consumer: &str,
    key: &Partition,
    engine: &mut Engine<Partition, Record>,
) -> Result<(Option<i64>, DispatchStats), String> {
    let mut stats = DispatchStats::default();
    let mut dead = Vec::new();
    let acked_ms = shmem::unix_micros() / 1000;
    for settled in engine.unapplied(key) {
        let record = settled.item;
        match settled.outcome {
            Outcome::Delivered => {
                stats.delivered += 1;
                if let Some(ts) = record.timestamp_ms {
                    stats.latencies_ms.push((acked_ms - ts).max(0) as f64);
                }
            }
            Outcome::DeadLetter { failure, payload } => {
                stats.dead += 1;
                stats.last_dead = Some(failure.clone());
                let payload = match (payload, settled.command) {
                    (Some(p), _) => p.clone(),
                    (None, Some(command)) => command.payload.clone(),
                    (None, None) => raw_payload(record.value.as_deref()),
                };
                dead.push(KafkaDeadLetter {
                    offset: settled.position,
                    method: record.method.clone(),
                    payload,
                    raw: record.value.clone(),
                    failure: failure.clone(),
                    attempts: settled.attempts,
                });
            }
            Outcome::Retry(_) => {}
        }
    }
    if !dead.is_empty() {
        insert_dead_letters(consumer, key, &dead)?;
    }
    Ok((engine.applied_durably(key), stats))
}

/// The method a record that does not parse names, for its dead letter (header, then value).
fn record_method(spec: &KafkaConsumer, headers: &[(String, Vec<u8>)], value: Option<&[u8]>) -> String {
    headers
        .iter()
        .find(|(k, _)| *k == spec.method_header)
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        .or_else(|| {
            value
                .and_then(|v| serde_json::from_slice::<serde_json::Value>(v).ok())
                .and_then(|v| v.get("method").and_then(|m| m.as_str()).map(str::to_owned))
        })
        .unwrap_or_else(|| "unknown".into())
}

/// The high watermark librdkafka last saw in a fetch response (no network round trip; -1 when
/// unknown). rdkafka has no safe wrapper for this call.
fn cached_high_watermark(consumer: &BaseConsumer<BridgeContext>, topic: &str, partition: i32) -> i64 {
    let Ok(topic) = std::ffi::CString::new(topic) else { return -1 };
    let (mut low, mut high) = (-1i64, -1i64);
    // SAFETY: the client pointer is valid while `consumer` lives; the out-pointers are locals.
    let err = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(
            consumer.client().native_ptr(),
            topic.as_ptr(),
            partition,
            &mut low,
            &mut high,
        )
    };
    if err == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
        high
    } else {
        -1
    }
}

/// Publishes this worker's current assignment and the client's cached high watermarks; returns
/// how many partitions are assigned.
fn publish_assignment(consumer: &BaseConsumer<BridgeContext>, index: usize, pid: i32) -> usize {
    let Ok(assignment) = consumer.assignment() else { return 0 };
    for e in assignment.elements() {
        let high = cached_high_watermark(consumer, e.topic(), e.partition());
        shmem::update_kafka(index, e.topic(), e.partition(), |s| {
            s.pid = pid;
            s.assigned = true;
            if high >= 0 {
                s.high_watermark = high;
            }
            if s.state() == WorkerState::Stopped {
                s.set_state(WorkerState::Idle);
            }
        });
    }
    assignment.count()
}

/// A record value as JSON for the dead letters: itself, verbatim, when it is JSON, else a JSON
/// string of its text.
fn raw_payload(value: Option<&[u8]>) -> String {
    let bytes = value.unwrap_or_default();
    match std::str::from_utf8(bytes) {
        Ok(text) if serde_json::from_str::<&serde_json::value::RawValue>(text).is_ok() => text.to_owned(),
        _ => serde_json::Value::String(String::from_utf8_lossy(bytes).into_owned()).to_string(),
    }
}

/// A record on its way to the dead letters.
struct KafkaDeadLetter {
    offset: i64,
    method: String,
    /// JSON text for the payload column.
    payload: String,
    /// The record's value as it came, for raw_value.
    raw: Option<Vec<u8>>,
    failure: Failure,
    attempts: u32,
}

/// Writes a partition's dead letters in one transaction. A payload jsonb refuses (a `\u0000`
/// escape, a lone surrogate, a number beyond numeric's range, nesting too deep) is stored as JSON
/// null: raw_value keeps the bytes either way. Any other ERROR rolls back and comes back as Err
/// (the partition backs off and tries again) instead of ending the worker.
fn insert_dead_letters(consumer: &str, key: &(String, i32), rows: &[KafkaDeadLetter]) -> Result<(), String> {
    let (topic, partition) = (key.0.as_str(), key.1);
    crate::xact::transaction(|| {
        Spi::connect_mut(|spi| -> Result<(), crate::xact::DbError> {
            let Some(schema) = crate::session::extension_schema() else {
                return Err(crate::xact::DbError::new(format!(
                    "extension centrifugo_outbox is not installed in database \"{}\"",
                    gucs::database()
                )));
            };
            let dead_letters = format!("{}.centrifugo_dead_letters", crate::session::quote_ident(&schema));
            let oid = crate::session::dead_letters_oid();
            let (raw_column, raw_value) = crate::session::raw_value_column(oid);
            let insert = format!(
                "{}INSERT INTO {dead_letters}
                     (source, consumer, method, payload, kafka_topic, kafka_partition, kafka_offset, error_kind, error_code, error_message, attempts{raw_column})
                 VALUES ('kafka', $10, $1, $2::pg_catalog.jsonb, $3, $4, $5, $6, $7, $8, $9{raw_value})",
                crate::pinned::MARKER
            );
            for row in rows {
                let args = |payload: &str| -> Vec<pgrx::datum::DatumWithOid<'_>> {
                    vec![
                        row.method.as_str().into(),
                        payload.to_owned().into(),
                        topic.into(),
                        partition.into(),
                        row.offset.into(),
                        row.failure.kind.as_str().into(),
                        row.failure.code.map(|c| c as i32).into(),
                        gucs::scrub(&row.failure.message).into(),
                        (row.attempts as i32).into(),
                        consumer.into(),
                        row.raw.clone().into(),
                    ]
                };
                let exact = crate::xact::subtransaction(|| crate::pinned::pinned(&[oid], || spi.update(&insert, None, &args(&row.payload)).map(|_| ())));
                match exact {
                    Ok(result) => result?,
                    Err(e) if crate::xact::refused_as_jsonb(&e) => {
                        crate::pinned::pinned(&[oid], || spi.update(&insert, None, &args("null")))?;
                    }
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        })
    })
    .map_err(|e| e.to_string())
}
