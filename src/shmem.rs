//! Shared memory: its layout and every access to it.
//!
//! One slot per partition worker: its pid, its latch (so any backend can wake it, see
//! [`crate::wake`]), its state and counters; one slot per Kafka partition a bridge consumes; and
//! the board where every worker shares what it learns of Centrifugo's nodes.

use pgrx::lwlock::PgLwLock;
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::shmem::PGRXSharedMemory;

use outbox_core::endpoints::{NodeBoard, SharedNode, MAX_ENDPOINTS};
use outbox_core::histogram;
use outbox_core::partition::MAX_PARTITIONS;

/// What a partition worker is doing; shown by the status views (one byte in shared memory).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(u8)]
pub enum WorkerState {
    #[default]
    Stopped = 0,
    Idle = 1,
    Sending = 2,
    BackingOff = 3,
    /// The database or the extension is missing: nothing to drain yet.
    Waiting = 4,
    /// Another session holds the partition's lock (Centrifugo's consumer, or anyone with
    /// `pg_advisory_lock`).
    Locked = 5,
}

impl WorkerState {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Stopped => "stopped",
            WorkerState::Idle => "idle",
            WorkerState::Sending => "sending",
            WorkerState::BackingOff => "backing off",
            WorkerState::Waiting => "waiting",
            WorkerState::Locked => "locked",
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            1 => WorkerState::Idle,
            2 => WorkerState::Sending,
            3 => WorkerState::BackingOff,
            4 => WorkerState::Waiting,
            5 => WorkerState::Locked,
            _ => WorkerState::Stopped,
        }
    }
}

const ERROR_TEXT: usize = 200;

/// Delivery counters of one partition worker or one Kafka partition. They survive worker
/// restarts until the server restarts.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct Stats {
    pub delivered: u64,
    pub batches: u64,
    pub retries: u64,
    pub dead_lettered: u64,
    /// Unix time in microseconds; 0: never.
    pub last_success_at: i64,
    pub last_error_at: i64,
    /// Centrifugo error code or HTTP status; -1 for a transport error; 0: none yet.
    pub last_error_code: i32,
    last_error: [u8; ERROR_TEXT],
    /// The current back-off delay, 0 when not backing off.
    pub backoff_ms: u32,
    /// Commit → Centrifugo acknowledgement, counts per bucket (see outbox_core::histogram).
    pub latency: [u64; histogram::BUCKETS],
    /// The endpoint in use (index into `centrifugo.api_url`'s list) and failed requests per
    /// endpoint, as the worker's client counts them since it was built.
    pub endpoint: u8,
    pub endpoint_failures: [u64; MAX_ENDPOINTS],
    /// Which endpoint list the two fields above index (outbox_core::endpoints::list_id; 0: none).
    pub endpoints_id: u64,
    /// From and through which positions (row ids, offsets) commands are resent one per request after a
    /// partial failure (see outbox_core::lane); kept here so a restarted worker goes on with it.
    pub resend: Option<(i64, i64)>,
    /// The most commands a batch carries now, when failures lowered it (0: the configured limit).
    pub batch_limit: u32,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            delivered: 0,
            batches: 0,
            retries: 0,
            dead_lettered: 0,
            last_success_at: 0,
            last_error_at: 0,
            last_error_code: 0,
            last_error: [0; ERROR_TEXT],
            backoff_ms: 0,
            latency: [0; histogram::BUCKETS],
            endpoint: 0,
            endpoint_failures: [0; MAX_ENDPOINTS],
            endpoints_id: 0,
            resend: None,
            batch_limit: 0,
        }
    }
}

pub fn unix_micros() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0)
}

impl Stats {
    /// Records a failure; `message` must already be scrubbed of secrets.
    pub fn record_error(&mut self, code: i32, message: &str) {
        self.last_error_code = code;
        self.last_error_at = unix_micros();
        self.last_error = [0; ERROR_TEXT];
        let mut end = message.len().min(ERROR_TEXT);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        self.last_error[..end].copy_from_slice(&message.as_bytes()[..end]);
    }

    pub fn last_error(&self) -> Option<String> {
        let end = self.last_error.iter().position(|b| *b == 0).unwrap_or(ERROR_TEXT);
        (end > 0).then(|| String::from_utf8_lossy(&self.last_error[..end]).into_owned())
    }

    /// Takes what `client` knows of the endpoints.
    pub fn record_endpoints(&mut self, client: &outbox_core::client::CentrifugoClient) {
        self.endpoint = client.endpoint_in_use() as u8;
        self.endpoints_id = client.endpoints_id();
        self.endpoint_failures = [0; MAX_ENDPOINTS];
        for (stored, failures) in self.endpoint_failures.iter_mut().zip(client.endpoint_failures()) {
            *stored = failures;
        }
    }

    pub fn record_success(&mut self, delivered: u64, latencies_ms: impl IntoIterator<Item = f64>) {
        self.delivered += delivered;
        self.last_success_at = unix_micros();
        self.backoff_ms = 0;
        for ms in latencies_ms {
            self.latency[histogram::bucket(ms)] += 1;
        }
    }
}

/// One partition worker's slot.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C)]
pub struct Slot {
    pub pid: i32,
    /// Which consumer (index into `worker::outbox_specs()`) and partition the slot's worker drains.
    pub consumer: u16,
    pub partition: i32,
    /// Address of the worker's latch (in shared memory), 0 when no worker runs.
    pub latch: usize,
    state: u8,
    /// Connection attempts in a row that never got through (wrong role or database).
    pub connect_attempts: u32,
    /// How often a worker process took this slot since server start (0: never started).
    pub starts: u32,
    pub stats: Stats,
}

impl Slot {
    pub fn state(&self) -> WorkerState {
        WorkerState::from_u8(self.state)
    }
}

const TOPIC_BYTES: usize = 256;

/// `topic` as stored in a slot (cut to the slot's size, NUL-padded).
#[cfg(feature = "kafka")]
fn stored_topic(topic: &str) -> [u8; TOPIC_BYTES] {
    let mut stored = [0; TOPIC_BYTES];
    let n = topic.len().min(TOPIC_BYTES);
    stored[..n].copy_from_slice(&topic.as_bytes()[..n]);
    stored
}

/// One Kafka partition a bridge worker consumes (or consumed).
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct KafkaSlot {
    pub used: bool,
    pub pid: i32,
    pub consumer: u16,
    /// Kafka allows topic names of up to 249 ASCII characters: every valid one fits.
    topic: [u8; TOPIC_BYTES],
    pub partition: i32,
    /// Next offset to read, as committed by the bridge (-1: nothing committed yet).
    pub committed: i64,
    /// The partition's high watermark as last seen by the client (-1: unknown).
    pub high_watermark: i64,
    /// Currently assigned to this worker.
    pub assigned: bool,
    state: u8,
    pub stats: Stats,
}

impl Default for KafkaSlot {
    fn default() -> Self {
        KafkaSlot {
            used: false,
            pid: 0,
            consumer: 0,
            topic: [0; TOPIC_BYTES],
            partition: 0,
            committed: -1,
            high_watermark: -1,
            assigned: false,
            state: 0,
            stats: Stats::default(),
        }
    }
}

impl KafkaSlot {
    pub fn topic(&self) -> String {
        let end = self.topic.iter().position(|b| *b == 0).unwrap_or(self.topic.len());
        String::from_utf8_lossy(&self.topic[..end]).into_owned()
    }
    pub fn state(&self) -> WorkerState {
        WorkerState::from_u8(self.state)
    }
    #[cfg(feature = "kafka")]
    pub fn set_state(&mut self, state: WorkerState) {
        self.state = state as u8;
    }
}

pub const MAX_KAFKA_PARTITIONS: usize = 512;

#[derive(Clone, Copy)]
pub struct KafkaSlots {
    pub slots: [KafkaSlot; MAX_KAFKA_PARTITIONS],
    /// Per bridge worker: connection attempts in a row that never got through.
    connect_attempts: [u32; MAX_KAFKA_CONSUMERS],
    /// Per bridge worker: its consumer's name, as it started (a reload may reorder the entries).
    names: [[u8; 64]; MAX_KAFKA_CONSUMERS],
}

/// Bridge workers beyond this count connect without the back-off of failed attempts.
const MAX_KAFKA_CONSUMERS: usize = 64;

impl Default for KafkaSlots {
    fn default() -> Self {
        KafkaSlots {
            slots: [KafkaSlot::default(); MAX_KAFKA_PARTITIONS],
            connect_attempts: [0; MAX_KAFKA_CONSUMERS],
            names: [[0; 64]; MAX_KAFKA_CONSUMERS],
        }
    }
}

/// Counts a connection attempt of bridge worker `consumer`; returns the failed ones before it.
pub fn kafka_connect_attempt(consumer: usize) -> u32 {
    let mut slots = KAFKA_SLOTS.exclusive();
    slots.connect_attempts.get_mut(consumer).map_or(0, |n| {
        *n += 1;
        *n - 1
    })
}

pub fn kafka_connected(consumer: usize) {
    if let Some(n) = KAFKA_SLOTS.exclusive().connect_attempts.get_mut(consumer) {
        *n = 0;
    }
}

// SAFETY: plain old data.
unsafe impl PGRXSharedMemory for KafkaSlots {}

// SAFETY: the name is unique to this extension.
pub static KAFKA_SLOTS: PgLwLock<KafkaSlots> = unsafe { PgLwLock::new(c"centrifugo_outbox_kafka_slots") };

/// Applies `update` to the slot of (consumer, topic, partition), taking a free slot for a
/// partition not seen before (when all are taken, the partition is not reported).
#[cfg(feature = "kafka")]
pub fn update_kafka(consumer: usize, topic: &str, partition: i32, update: impl FnOnce(&mut KafkaSlot)) {
    let mut slots = KAFKA_SLOTS.exclusive();
    // Compared as stored, so that a name cut to fit still finds its slot (never a new one each time).
    let stored = stored_topic(topic);
    let found = kafka_slot_of(&slots, consumer, &stored, partition);
    let index = match found.or_else(|| slots.slots.iter().position(|s| !s.used)) {
        Some(i) => i,
        None => return,
    };
    let slot = &mut slots.slots[index];
    if !slot.used {
        *slot = KafkaSlot::default();
        slot.used = true;
        slot.consumer = consumer as u16;
        slot.partition = partition;
        slot.topic = stored;
    }
    update(slot);
}

/// Where a resend of `topic`[`partition`] by bridge `consumer` stood when its worker last reported.
#[cfg(feature = "kafka")]
pub fn kafka_resend(consumer: usize, topic: &str, partition: i32) -> Option<(i64, i64)> {
    let slots = KAFKA_SLOTS.share();
    kafka_slot_of(&slots, consumer, &stored_topic(topic), partition).and_then(|i| slots.slots[i].stats.resend)
}

/// The index of the slot of (consumer, topic as stored, partition), if it has one.
#[cfg(feature = "kafka")]
fn kafka_slot_of(slots: &KafkaSlots, consumer: usize, stored: &[u8; TOPIC_BYTES], partition: i32) -> Option<usize> {
    slots
        .slots
        .iter()
        .position(|s| s.used && s.consumer as usize == consumer && s.partition == partition && s.topic == *stored)
}

/// Marks every partition of a bridge worker as unassigned (at start and after revocation).
#[cfg(feature = "kafka")]
pub fn unassign_kafka(consumer: usize, pid: i32) {
    let mut slots = KAFKA_SLOTS.exclusive();
    for slot in slots.slots.iter_mut().filter(|s| s.used && s.consumer as usize == consumer) {
        if pid == 0 || slot.pid == pid {
            slot.assigned = false;
            slot.state = WorkerState::Stopped as u8;
        }
    }
}

/// Records the consumer name bridge worker `consumer` runs (names are at most 63 bytes).
#[cfg(feature = "kafka")]
pub fn set_kafka_name(consumer: usize, name: &str) {
    if let Some(stored) = KAFKA_SLOTS.exclusive().names.get_mut(consumer) {
        *stored = [0; 64];
        let n = name.len().min(63);
        stored[..n].copy_from_slice(&name.as_bytes()[..n]);
    }
}

/// The consumer name bridge worker `consumer` last ran, if it ever started.
pub fn kafka_name(consumer: usize) -> Option<String> {
    let slots = KAFKA_SLOTS.share();
    let stored = slots.names.get(consumer)?;
    let end = stored.iter().position(|b| *b == 0).unwrap_or(stored.len());
    (end > 0).then(|| String::from_utf8_lossy(&stored[..end]).into_owned())
}

pub fn kafka_snapshot() -> Vec<KafkaSlot> {
    KAFKA_SLOTS.share().slots.iter().filter(|s| s.used).copied().collect()
}

#[derive(Clone, Copy)]
pub struct Slots {
    pub slots: [Slot; MAX_PARTITIONS as usize],
}

impl Default for Slots {
    fn default() -> Self {
        Slots { slots: [Slot::default(); MAX_PARTITIONS as usize] }
    }
}

// SAFETY: plain old data, no pointers into process-local memory (the latch lives in shared memory).
unsafe impl PGRXSharedMemory for Slots {}

// SAFETY: the name is unique to this extension.
pub static SLOTS: PgLwLock<Slots> = unsafe { PgLwLock::new(c"centrifugo_outbox_slots") };

/// What the workers know of the endpoints of one `centrifugo.api_url` list together.
#[derive(Clone, Copy, Default)]
pub struct NodeBoardState {
    list_id: u64,
    /// Counts every report, so a generation is never repeated, even across lists.
    reports: u64,
    nodes: [SharedNode; MAX_ENDPOINTS],
}

// SAFETY: plain data.
unsafe impl PGRXSharedMemory for NodeBoardState {}

// SAFETY: the name is unique to this extension.
static NODE_BOARD: PgLwLock<NodeBoardState> = unsafe { PgLwLock::new(c"centrifugo_outbox_node_board") };

/// The shared-memory board every worker's client shares node health on.
pub struct SharedNodeBoard;

impl NodeBoard for SharedNodeBoard {
    fn read(&self, list_id: u64) -> Option<[SharedNode; MAX_ENDPOINTS]> {
        let board = NODE_BOARD.share();
        (board.list_id == list_id).then_some(board.nodes)
    }

    fn write(&self, list_id: u64, endpoint: usize, down_until: i64) -> u64 {
        let mut board = NODE_BOARD.exclusive();
        if board.list_id != list_id {
            // Another list (a reload changed it): what was known is about other nodes.
            board.list_id = list_id;
            board.nodes = [SharedNode::default(); MAX_ENDPOINTS];
        }
        board.reports += 1;
        let generation = board.reports;
        if let Some(node) = board.nodes.get_mut(endpoint) {
            *node = SharedNode { generation, down_until };
        }
        generation
    }
}

pub fn init() {
    pgrx::pg_shmem_init!(NODE_BOARD);
    pgrx::pg_shmem_init!(SLOTS);
    pgrx::pg_shmem_init!(KAFKA_SLOTS);
}

/// Registers the calling worker in its slot.
pub fn attach_worker(index: usize, consumer: usize, partition: i32) {
    let mut slots = SLOTS.exclusive();
    let slot = &mut slots.slots[index];
    slot.consumer = consumer as u16;
    slot.starts = slot.starts.saturating_add(1);
    slot.partition = partition;
    // SAFETY: MyProcPid and MyLatch are set for every backend process.
    unsafe {
        slot.pid = pg_sys::MyProcPid;
        slot.latch = pg_sys::MyLatch as usize;
    }
    // Not draining until it is connected and has run a round.
    slot.state = WorkerState::Waiting as u8;
    drop(slots);
    // A FATAL (a database that does not exist yet, a terminated connection attempt) ends the
    // process without reaching the worker's own exit path: clear the slot then too, so the
    // status view never shows a dead process as idle or sending.
    // SAFETY: registers a callback PostgreSQL runs while the process still has shared memory.
    unsafe { pg_sys::before_shmem_exit(Some(detach_at_exit), pg_sys::Datum::from(index)) };
}

#[pg_guard]
unsafe extern "C-unwind" fn detach_at_exit(_code: std::ffi::c_int, index: pg_sys::Datum) {
    detach_worker(index.value());
}

/// Clears the slot when the worker exits, so nobody sets a stale latch.
pub fn detach_worker(index: usize) {
    let mut slots = SLOTS.exclusive();
    let slot = &mut slots.slots[index];
    slot.pid = 0;
    slot.latch = 0;
    slot.state = WorkerState::Stopped as u8;
}

pub fn set_state(index: usize, state: WorkerState) {
    SLOTS.exclusive().slots[index].state = state as u8;
}

/// Applies `update` to a slot under the exclusive lock.
pub fn update(index: usize, update: impl FnOnce(&mut Slot)) {
    update(&mut SLOTS.exclusive().slots[index]);
}

pub fn snapshot(index: usize) -> Slot {
    SLOTS.share().slots[index]
}

/// Wakes the workers of the marked partitions, of every consumer (a spurious wake-up of another
/// consumer's worker costs one empty round).
pub fn wake_partitions(low: u64, high: u64) {
    let slots = SLOTS.share();
    for slot in slots.slots.iter() {
        let p = slot.partition as u32;
        let bit = if p < 64 { low >> p & 1 } else { high >> (p - 64) & 1 };
        // A worker backing off sleeps its full time whatever commits (and then reads everything
        // committed): waking it would only cost both processes a context switch per commit.
        if bit == 1 && slot.latch != 0 && slot.state() != WorkerState::BackingOff {
            // SAFETY: the address is a PGPROC latch in shared memory, valid for the server's life.
            unsafe { pg_sys::SetLatch(slot.latch as *mut pg_sys::Latch) };
        }
    }
}
