//! What the workers report through shared memory, readable from SQL, and the operator's
//! functions around them: waiting until workers run, restarting them.

use std::time::{Duration, Instant};

use pgrx::datum::TimestampWithTimeZone;
use pgrx::prelude::*;
use pgrx::JsonB;

use outbox_core::histogram;

use crate::shmem::{self, Stats};
use crate::worker;

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

fn timestamp(unix_micros: i64) -> Option<TimestampWithTimeZone> {
    (unix_micros > 0).then(|| TimestampWithTimeZone::try_from(unix_micros - PG_EPOCH_OFFSET_MICROS).ok()).flatten()
}

type StatColumns = (i64, i64, i64, i64, Option<TimestampWithTimeZone>, Option<i32>, Option<String>, Option<TimestampWithTimeZone>, i32, JsonB);

fn stat_columns(s: &Stats) -> StatColumns {
    (
        s.delivered as i64,
        s.batches as i64,
        s.retries as i64,
        s.dead_lettered as i64,
        timestamp(s.last_success_at),
        (s.last_error_code != 0).then_some(s.last_error_code),
        s.last_error(),
        timestamp(s.last_error_at),
        s.backoff_ms as i32,
        JsonB(histogram::to_json(&s.latency)),
    )
}

/// One row per partition worker: consumer, pid, state and counters since server start, and the
/// outbox backlog of its partition (when its table is in this database).
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn centrifugo_outbox_status_rows() -> TableIterator<
    'static,
    (
        name!(consumer, String),
        name!(partition, i32),
        name!(pid, Option<i32>),
        name!(state, String),
        name!(backlog, Option<i64>),
        name!(oldest_pending_age, Option<pgrx::datum::Interval>),
        name!(delivered, i64),
        name!(batches, i64),
        name!(retries, i64),
        name!(dead_lettered, i64),
        name!(last_success_at, Option<TimestampWithTimeZone>),
        name!(last_error_code, Option<i32>),
        name!(last_error, Option<String>),
        name!(last_error_at, Option<TimestampWithTimeZone>),
        name!(backoff_ms, i32),
        name!(latency_histogram, JsonB),
    ),
> {
    let specs = worker::outbox_specs();
    let this_db = Spi::connect(|c| c.select("SELECT current_database()::text", None, &[])?.first().get_one::<String>())
        .ok()
        .flatten()
        .unwrap_or_default();
    // SAFETY: a read of the server's recovery state.
    let standby = unsafe { pg_sys::RecoveryInProgress() };
    let rows: Vec<_> = worker::worker_slots()
        .into_iter()
        .enumerate()
        .map(|(slot, (consumer, p))| {
            let spec = &specs[consumer];
            let s = shmem::snapshot(slot);
            let (backlog, oldest) = if spec.database() == this_db {
                backlog(&spec.qualified_table(), p)
            } else {
                (None, None)
            };
            let c = stat_columns(&s.stats);
            (
                spec.name(),
                p,
                (s.pid != 0).then_some(s.pid),
                if standby { "standby".to_owned() } else { s.state().as_str().to_owned() },
                backlog,
                oldest,
                c.0, c.1, c.2, c.3, c.4, c.5, c.6, c.7, c.8, c.9,
            )
        })
        .collect();
    TableIterator::new(rows)
}

/// Read-only queries, so the view also works on a hot standby.
fn backlog(table: &str, partition: i32) -> (Option<i64>, Option<pgrx::datum::Interval>) {
    // Counting rows of a table another role owns could run that role's code as the caller.
    let Ok(checked) = crate::session::check_outbox_owner(table, pg_sys::AccessShareLock) else {
        return (None, None);
    };
    let pinned: Vec<pg_sys::Oid> = checked.into_iter().collect();
    let marker = crate::pinned::MARKER;
    crate::pinned::pinned(&pinned, || Spi::connect(|c| {
        let exists = c.select("SELECT to_regclass($1) IS NOT NULL", None, &[table.into()])?.first().get_one::<bool>()?;
        if exists != Some(true) {
            return Ok((None, None));
        }
        c.select(&format!("{marker}SELECT count(*), now() - min(created_at) FROM {table} WHERE partition = $1"), None, &[partition.into()])?
            .first()
            .get_two::<i64, pgrx::datum::Interval>()
    }))
    .unwrap_or((None, None))
}

/// One row per Kafka partition the bridge consumes or consumed since server start.
#[pg_extern(volatile, parallel_safe)]
#[search_path(pg_catalog, pg_temp)]
fn centrifugo_kafka_status_rows() -> TableIterator<
    'static,
    (
        name!(consumer, String),
        name!(topic, String),
        name!(partition, i32),
        name!(pid, Option<i32>),
        name!(assigned, bool),
        name!(state, String),
        name!(committed_offset, Option<i64>),
        name!(high_watermark, Option<i64>),
        name!(lag, Option<i64>),
        name!(delivered, i64),
        name!(batches, i64),
        name!(retries, i64),
        name!(dead_lettered, i64),
        name!(last_success_at, Option<TimestampWithTimeZone>),
        name!(last_error_code, Option<i32>),
        name!(last_error, Option<String>),
        name!(last_error_at, Option<TimestampWithTimeZone>),
        name!(backoff_ms, i32),
        name!(latency_histogram, JsonB),
    ),
> {
    #[cfg(feature = "kafka")]
    let names: Vec<String> = crate::kafka_worker::consumers().unwrap_or_default().into_iter().map(|c| c.name).collect();
    #[cfg(not(feature = "kafka"))]
    let names: Vec<String> = Vec::new();
    let rows: Vec<_> = shmem::kafka_snapshot()
        .into_iter()
        .map(|k| {
            let c = stat_columns(&k.stats);
            let committed = (k.committed >= 0).then_some(k.committed);
            let hw = (k.high_watermark >= 0).then_some(k.high_watermark);
            let lag = hw.map(|h| (h - committed.unwrap_or(0)).max(0));
            (
                names.get(k.consumer as usize).cloned().unwrap_or_else(|| format!("#{}", k.consumer)),
                k.topic(),
                k.partition,
                (k.pid != 0).then_some(k.pid),
                k.assigned,
                k.state().as_str().to_owned(),
                committed,
                hw,
                lag,
                c.0, c.1, c.2, c.3, c.4, c.5, c.6, c.7, c.8, c.9,
            )
        })
        .collect();
    TableIterator::new(rows)
}

/// Waits until every partition worker runs (and sees the extension), at most `timeout`;
/// returns whether they do. For tests and deployment scripts.
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn centrifugo_wait_until_running(timeout: default!(pgrx::datum::Interval, "'10 seconds'")) -> bool {
    let micros = timeout.as_micros().max(0) as u64;
    let deadline = Instant::now() + Duration::from_micros(micros);
    loop {
        let slots = worker::worker_slots();
        let running = (0..slots.len()).all(|i| {
            let s = shmem::snapshot(i);
            s.pid != 0 && !matches!(s.state(), shmem::WorkerState::Stopped | shmem::WorkerState::Waiting)
        });
        if running {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        // SAFETY: a plain sleep that honours query cancellation.
        unsafe {
            pg_sys::pg_usleep(20_000);
            pg_sys::check_for_interrupts!();
        }
    }
}

/// Restarts every centrifugo_outbox worker (outbox partitions and Kafka bridge): each is
/// terminated and started again by the postmaster after its 1 s restart interval. Returns how
/// many were signalled.
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn centrifugo_restart_workers() -> i64 {
    Spi::get_one::<i64>(
        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity
         WHERE backend_type LIKE 'centrifugo\\_outbox %'",
    )
    .unwrap_or_else(|e| error!("centrifugo_outbox: cannot restart the workers: {e}"))
    .unwrap_or(0)
}

/// The 0.1.0 status function, kept for scripts written against it; `centrifugo_outbox_status`
/// has everything it had and more.
#[pg_extern(volatile, parallel_safe)]
#[search_path(pg_catalog, pg_temp)]
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
                s.stats.delivered as i64,
                s.stats.batches as i64,
                s.stats.retries as i64,
                s.stats.dead_lettered as i64,
                (s.stats.last_error_code != 0).then_some(s.stats.last_error_code),
            )
        })
        .collect();
    TableIterator::new(rows)
}
