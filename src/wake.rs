//! Wake-at-commit: a row trigger on the outbox marks the partitions a transaction inserted into;
//! a transaction callback, registered once per backend, sets those workers' latches when the
//! transaction commits. A rolled-back transaction wakes nobody. (pg_net does the same in C.)

use std::sync::atomic::{AtomicU64, Ordering};

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::shmem::wake_partitions;

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

unsafe extern "C-unwind" {
    /// commands/async.h (not in pgrx's bindings): queues a NOTIFY sent at commit, as NOTIFY does.
    fn Async_Notify(channel: *const std::ffi::c_char, payload: *const std::ffi::c_char);
}

/// Row trigger on the outbox (and on a user's own outbox table): wakes the partition's worker
/// when the inserting transaction commits, refuses partitions no worker drains, and sends the
/// NOTIFY of Centrifugo's documented trigger (`centrifugo.partition_notification_channel`, the
/// partition number as payload) when that channel is set: one trigger call per row instead of a
/// second, PL/pgSQL one.
#[pg_trigger]
fn centrifugo_wake_at_commit<'a>(
    trigger: &'a pgrx::PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, pgrx::PgTriggerError> {
    // Attached BEFORE, its NULL result would drop every row. (Per statement it has no row and
    // wakes nobody; the workers' poll still finds the rows, as before.)
    if !matches!(trigger.when()?, pgrx::PgTriggerWhen::After) {
        ereport!(
            ERROR,
            PgSqlErrorCode::ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED,
            "centrifugo_wake_at_commit() must run AFTER INSERT ... FOR EACH ROW"
        );
    }
    if let Some(new) = trigger.new() {
        let partition = match new.get_by_name::<i32>("partition") {
            Ok(Some(partition)) => partition,
            // No worker reads `partition = NULL`: such a row would wait forever, unseen.
            Ok(None) => {
                ereport!(
                    ERROR,
                    PgSqlErrorCode::ERRCODE_NOT_NULL_VIOLATION,
                    "an outbox row's partition must not be NULL"
                );
            }
            Err(_) => 0,
        };
        let routing = crate::layout::routing_of_table(|| -> Result<_, pgrx::PgTriggerError> {
            Ok((trigger.table_schema()?, trigger.table_name()?))
        })?;
        let num = routing.num_partitions;
        if !(0..num).contains(&partition) {
            crate::errors::raise(outbox_core::partition::check_partition(partition, num).expect_err("out of range"));
        }
        wake_at_commit(partition);
        for channel in &routing.channels {
            let payload = std::ffi::CString::new(partition.to_string()).expect("digits");
            // SAFETY: NUL-terminated strings that PostgreSQL copies; an ERROR it raises (a channel
            // name too long, as pg_notify() refuses it) crosses back as a Rust panic.
            unsafe { pg_sys::ffi::pg_guard_ffi_boundary(|| Async_Notify(channel.as_ptr(), payload.as_ptr())) };
        }
    }
    Ok(None)
}

/// Wakes every partition worker when the calling transaction commits (run by CREATE EXTENSION,
/// so workers waiting for the extension start draining at once).
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn _centrifugo_wake_workers_at_commit() {
    for (_, partition) in crate::layout::worker_slots() {
        wake_at_commit(partition);
    }
}
