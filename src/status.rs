//! What the partition workers report through shared memory, readable from SQL.

use pgrx::prelude::*;

use crate::{gucs, shmem};

/// One row per configured partition: the worker's pid, state and counters since server start.
#[pg_extern(volatile, parallel_safe)]
fn centrifugo_worker_status() -> TableIterator<
    'static,
    (
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
    let rows: Vec<_> = (0..gucs::num_partitions())
        .map(|p| {
            let s = shmem::snapshot(p as usize);
            (
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
