//! Shared memory and wake-at-commit.
//!
//! One slot per partition worker: its pid, its latch (so any backend can wake it), its state and
//! counters. A row trigger on the outbox marks the partitions a transaction inserted into; a
//! transaction callback, registered once per backend, sets those workers' latches when the
//! transaction commits. A rolled-back transaction wakes nobody. (pg_net does the same in C.)

use std::sync::atomic::{AtomicU64, Ordering};

use pgrx::lwlock::PgLwLock;
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::shmem::PGRXSharedMemory;

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
}

impl WorkerState {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Stopped => "stopped",
            WorkerState::Idle => "idle",
            WorkerState::Sending => "sending",
            WorkerState::BackingOff => "backing off",
            WorkerState::Waiting => "waiting",
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            1 => WorkerState::Idle,
            2 => WorkerState::Sending,
            3 => WorkerState::BackingOff,
            4 => WorkerState::Waiting,
            _ => WorkerState::Stopped,
        }
    }
}

/// One partition worker's slot. Counters survive worker restarts until the server restarts.
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
    pub delivered: u64,
    pub batches: u64,
    pub retries: u64,
    pub dead_lettered: u64,
    pub last_error_code: i32,
}

impl Slot {
    pub fn state(&self) -> WorkerState {
        WorkerState::from_u8(self.state)
    }
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

pub fn init() {
    pgrx::pg_shmem_init!(SLOTS);
}

/// Registers the calling worker in its slot.
pub fn attach_worker(index: usize, consumer: usize, partition: i32) {
    let mut slots = SLOTS.exclusive();
    let slot = &mut slots.slots[index];
    slot.consumer = consumer as u16;
    slot.partition = partition;
    // SAFETY: MyProcPid and MyLatch are set for every backend process.
    unsafe {
        slot.pid = pg_sys::MyProcPid;
        slot.latch = pg_sys::MyLatch as usize;
    }
    slot.state = WorkerState::Idle as u8;
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

/// Partitions this backend's current transaction inserted into (bit i = partition i).
static PENDING_LOW: AtomicU64 = AtomicU64::new(0);
static PENDING_HIGH: AtomicU64 = AtomicU64::new(0);
static CALLBACK_REGISTERED: AtomicU64 = AtomicU64::new(0);

/// Remembers that the current transaction wrote to `partition`; its worker wakes at commit.
pub fn wake_at_commit(partition: i32) {
    let p = partition as u32;
    if p < 64 {
        PENDING_LOW.fetch_or(1 << p, Ordering::Relaxed);
    } else {
        PENDING_HIGH.fetch_or(1 << (p - 64), Ordering::Relaxed);
    }
    if CALLBACK_REGISTERED.swap(1, Ordering::Relaxed) == 0 {
        // SAFETY: registering a transaction callback with no argument; it lives as long as the backend.
        unsafe { pg_sys::RegisterXactCallback(Some(on_xact_event), std::ptr::null_mut()) };
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_xact_event(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    use pg_sys::XactEvent::*;
    match event {
        XACT_EVENT_COMMIT | XACT_EVENT_PARALLEL_COMMIT => {
            let low = PENDING_LOW.swap(0, Ordering::Relaxed);
            let high = PENDING_HIGH.swap(0, Ordering::Relaxed);
            if low | high != 0 {
                wake_partitions(low, high);
            }
        }
        // Aborted work wakes nobody; a prepared transaction is found by the poll after COMMIT PREPARED.
        XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT | XACT_EVENT_PREPARE => {
            PENDING_LOW.store(0, Ordering::Relaxed);
            PENDING_HIGH.store(0, Ordering::Relaxed);
        }
        _ => {}
    }
}

/// Wakes the workers of the marked partitions, of every consumer (a spurious wake-up of another
/// consumer's worker costs one empty round).
fn wake_partitions(low: u64, high: u64) {
    let slots = SLOTS.share();
    for slot in slots.slots.iter() {
        let p = slot.partition as u32;
        let bit = if p < 64 { low >> p & 1 } else { high >> (p - 64) & 1 };
        if bit == 1 && slot.latch != 0 {
            // SAFETY: the address is a PGPROC latch in shared memory, valid for the server's life.
            unsafe { pg_sys::SetLatch(slot.latch as *mut pg_sys::Latch) };
        }
    }
}

/// Row trigger on the outbox (and on a user's own outbox table): wakes the partition's worker
/// when the inserting transaction commits, and refuses partitions no worker drains.
#[pg_trigger]
fn centrifugo_wake_at_commit<'a>(
    trigger: &'a pgrx::PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, pgrx::PgTriggerError> {
    if let Some(new) = trigger.new() {
        let partition = new.get_by_name::<i32>("partition").ok().flatten().unwrap_or(0);
        let num = crate::worker::partitions_of_table(&trigger.table_schema()?, &trigger.table_name()?);
        if !(0..num).contains(&partition) {
            crate::errors::raise(
                outbox_core::partition::check_partition(partition, num).expect_err("out of range"),
            );
        }
        wake_at_commit(partition);
    }
    Ok(None)
}

/// Wakes every partition worker when the calling transaction commits (run by CREATE EXTENSION,
/// so workers waiting for the extension start draining at once).
#[pg_extern(volatile, parallel_unsafe)]
fn _centrifugo_wake_workers_at_commit() {
    for (_, partition) in crate::worker::worker_slots() {
        wake_at_commit(partition);
    }
}
