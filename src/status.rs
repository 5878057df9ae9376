//! What the partition workers report through shared memory, readable from SQL.

use pgrx::prelude::*;

use crate::{shmem, worker};

/// One row per partition worker: its consumer, pid, state and counters since server start.
#[pg_extern(volatile, parallel_safe)]
fn centrifugo_worker_status() -> TableIterator<
    'static,
    (
        name!(consumer, String),
        name!(partition, i32),
        name!(pid, Option<i32>),
        name!(state, String),
        name!(delivered, i64),
        name!(batches, i64),
        name!(retries, i64),
        name!(dead_lettered, i64),
        name!(last_error_code, Option<i32>),
    ),
> {
    let specs = worker::outbox_specs();
    let rows: Vec<_> = worker::worker_slots()
        .into_iter()
        .enumerate()
        .map(|(slot, (consumer, p))| {
            let s = shmem::snapshot(slot);
            (
                specs[consumer].name(),
                p,
                (s.pid != 0).then_some(s.pid),
                s.state().as_str().to_owned(),
                s.delivered as i64,
                s.batches as i64,
                s.retries as i64,
                s.dead_lettered as i64,
                (s.last_error_code != 0).then_some(s.last_error_code),
            )
        })
        .collect();
    TableIterator::new(rows)
}
