//! What the workers report through shared memory, readable from SQL, and the operator's
//! functions around them: waiting until workers run, restarting them.

use std::time::{Duration, Instant};

use pgrx::datum::TimestampWithTimeZone;
use pgrx::prelude::*;
use pgrx::JsonB;

use outbox_core::histogram;

use crate::layout;
use crate::shmem::{self, Stats};

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

fn timestamp(unix_micros: i64) -> Option<TimestampWithTimeZone> {
    (unix_micros > 0).then(|| TimestampWithTimeZone::try_from(unix_micros - PG_EPOCH_OFFSET_MICROS).ok()).flatten()
}

type StatColumns = (
    i64,
    i64,
    i64,
    i64,
    Option<TimestampWithTimeZone>,
    Option<i32>,
    Option<String>,
    Option<TimestampWithTimeZone>,
    i32,
    JsonB,
    Option<String>,
    JsonB,
    Option<i32>,
);

/// The endpoints of `centrifugo.api_url` as this session reads the setting (after a reload the
/// workers read it too), shown without credentials.
fn endpoints() -> Vec<String> {
    outbox_core::endpoints::parse_api_urls(&crate::gucs::api_url())
        .unwrap_or_default()
        .iter()
        .map(|u| outbox_core::endpoints::display_url(u))
        .collect()
}

/// The counters of `s`; `endpoints` names the endpoint in use when `running`, and the failures
/// (when the worker's counters are about this very list: not while a reload is under way).
fn stat_columns(s: &Stats, endpoints: &[String], running: bool) -> StatColumns {
    let same_list = s.endpoints_id == outbox_core::endpoints::list_id(endpoints);
    let endpoints = if same_list { endpoints } else { &[] };
    let failures = endpoints
        .iter()
        .zip(s.endpoint_failures)
        .map(|(url, n)| (url.clone(), serde_json::Value::from(n)))
        .collect::<serde_json::Map<_, _>>();
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
        running.then(|| endpoints.get(s.endpoint as usize).cloned()).flatten(),
        JsonB(serde_json::Value::Object(failures)),
        (s.batch_limit > 0).then_some(s.batch_limit as i32),
    )
}

/// The columns of a status row before the counters: consumer, partition, pid, state, backlog,
/// age of the oldest pending row.
type RowHead = (String, Option<i32>, Option<i32>, String, Option<i64>, Option<pgrx::datum::Interval>);

/// A `centrifugo_outbox_status` row: its head, then the counters.
#[allow(clippy::type_complexity)] // the view's columns, in order
fn outbox_row(
    head: RowHead,
    c: StatColumns,
) -> (
    String,
    Option<i32>,
    Option<i32>,
    String,
    Option<i64>,
    Option<pgrx::datum::Interval>,
    i64,
    i64,
    i64,
    i64,
    Option<TimestampWithTimeZone>,
    Option<i32>,
    Option<String>,
    Option<TimestampWithTimeZone>,
    i32,
    JsonB,
    Option<String>,
    JsonB,
    Option<i32>,
) {
    let (consumer, partition, pid, state, backlog, oldest) = head;
    (
        consumer, partition, pid, state, backlog, oldest, c.0, c.1, c.2, c.3, c.4, c.5, c.6, c.7, c.8, c.9, c.10, c.11,
        c.12,
    )
}

/// One row per partition worker: consumer, pid, state and counters since server start, and the
/// outbox backlog of its partition (when its table is in this database).
#[allow(clippy::type_complexity)] // a pgrx table of named columns
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn centrifugo_outbox_status_rows() -> TableIterator<
    'static,
    (
        name!(consumer, String),
        name!(partition, Option<i32>),
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
        name!(endpoint, Option<String>),
        name!(endpoint_failures, JsonB),
        name!(batch_limit, Option<i32>),
    ),
> {
    let specs = layout::outbox_specs();
    let endpoints = endpoints();
    let this_db = Spi::connect(|c| c.select("SELECT current_database()::text", None, &[])?.first().get_one::<String>())
        .ok()
        .flatten()
        .unwrap_or_default();
    // SAFETY: reads of the server's recovery state and start time.
    let (standby, started_at) = unsafe { (pg_sys::RecoveryInProgress(), pg_sys::PgStartTime) };
    // SAFETY: as above.
    let up_for_secs = (unsafe { pg_sys::GetCurrentTimestamp() } - started_at) / 1_000_000;
    let slots = layout::worker_slots();
    let mut rows: Vec<_> = slots
        .iter()
        .enumerate()
        .map(|(slot, &(consumer, p))| {
            let spec = &specs[consumer];
            let s = shmem::snapshot(slot);
            let (backlog, oldest) =
                if spec.database() == this_db { backlog(&spec.qualified_table(), p) } else { (None, None) };
            let mut stats = s.stats;
            let mut state = if standby { "standby".to_owned() } else { s.state().as_str().to_owned() };
            // Registered but never started, long after the server did: PostgreSQL ran out of
            // background worker slots (it only logs "too many background workers").
            if !standby && s.starts == 0 && up_for_secs >= 10 {
                state = "not started".to_owned();
                stats.record_error(0, &worker_budget_message(slots.len()));
            }
            let c = stat_columns(&stats, &endpoints, s.pid != 0);
            outbox_row((spec.name(), Some(p), (s.pid != 0).then_some(s.pid), state, backlog, oldest), c)
        })
        .collect();
    // What the settings leave without a worker, and rows no worker will ever read.
    let problem_row = |consumer: String, partition: Option<i32>, state: &str, backlog: Option<i64>, why: &str| {
        let mut stats = Stats::default();
        stats.record_error(0, why);
        let c = stat_columns(&stats, &[], false);
        outbox_row((consumer, partition, None, state.to_owned(), backlog, None), c)
    };
    for problem in layout::layout_problems() {
        rows.push(problem_row("(settings)".to_owned(), None, "invalid settings", None, &problem));
    }
    for &(consumer, p) in layout::configured_partitions().iter().skip(slots.len()) {
        let spec = &specs[consumer];
        let backlog = if spec.database() == this_db { backlog(&spec.qualified_table(), p).0 } else { None };
        let why = format!(
            "no worker: at most {} outbox partitions have a worker in total",
            outbox_core::partition::MAX_PARTITIONS
        );
        rows.push(problem_row(spec.name(), Some(p), "no worker", backlog, &why));
    }
    for spec in specs.iter().filter(|s| s.database() == this_db) {
        for (p, count) in stranded(&spec.qualified_table(), spec.num_partitions()) {
            let why = match p {
                Some(p) => format!(
                    "rows in partition {p}, outside 0..{} (num_partitions = {}): no worker drains them; raise num_partitions or move them",
                    spec.num_partitions() - 1,
                    spec.num_partitions()
                ),
                None => "rows with a NULL partition (written before the outbox trigger existed, or with it disabled): no worker reads them; set their partition".to_owned(),
            };
            rows.push(problem_row(spec.name(), p, "stranded", Some(count), &why));
        }
    }
    TableIterator::new(rows)
}

/// Why a registered worker may never have started.
fn worker_budget_message(partition_workers: usize) -> String {
    // SAFETY: a plain read of a postmaster setting.
    let max = unsafe { pg_sys::max_worker_processes };
    format!(
        "never started: centrifugo_outbox needs {} background workers ({partition_workers} partition workers and {} Kafka bridge workers) besides those of other extensions and parallel queries, and max_worker_processes is {max}",
        partition_workers + crate::layout::kafka_workers_needed(),
        crate::layout::kafka_workers_needed()
    )
}

/// Partitions of `table` outside 0..num_partitions that hold rows, with their row counts; None
/// for rows with a NULL partition (no worker reads `partition = NULL`).
fn stranded(table: &str, num_partitions: i32) -> Vec<(Option<i32>, i64)> {
    let Ok(checked) = crate::session::check_outbox_owner(table, pg_sys::AccessShareLock) else {
        return Vec::new();
    };
    if crate::session::table_oid(table).is_none() || !readable(table) {
        return Vec::new();
    }
    let pinned: Vec<pg_sys::Oid> = checked.into_iter().collect();
    let marker = crate::pinned::MARKER;
    crate::pinned::pinned(&pinned, || {
        Spi::connect(|c| {
            c.select(
                &format!(
                    "{marker}SELECT partition, count(*) FROM {table} WHERE partition IS NULL OR partition < 0 OR partition >= $1 GROUP BY partition ORDER BY partition NULLS FIRST"
                ),
                None,
                &[num_partitions.into()],
            )?
            .map(|row| Ok::<_, pgrx::spi::Error>((row.get::<i32>(1)?, row.get::<i64>(2)?.unwrap_or(0))))
            .collect::<Result<Vec<_>, _>>()
        })
    })
    .unwrap_or_default()
}

/// Whether the calling role may read `table` (an existing one).
fn readable(table: &str) -> bool {
    // A read-only query: the view also works on a hot standby.
    Spi::connect(|c| {
        c.select("SELECT has_table_privilege(to_regclass($1), 'SELECT')", None, &[table.into()])?
            .first()
            .get_one::<bool>()
    })
    .ok()
    .flatten()
    .unwrap_or(false)
}

/// Read-only queries, so the view also works on a hot standby.
fn backlog(table: &str, partition: i32) -> (Option<i64>, Option<pgrx::datum::Interval>) {
    // Counting rows of a table another role owns could run that role's code as the caller.
    let Ok(checked) = crate::session::check_outbox_owner(table, pg_sys::AccessShareLock) else {
        return (None, None);
    };
    let pinned: Vec<pg_sys::Oid> = checked.into_iter().collect();
    let marker = crate::pinned::MARKER;
    crate::pinned::pinned(&pinned, || {
        Spi::connect(|c| {
            // A role granted the status view but not the outbox sees no backlog (rather than an error).
            let exists = c
                .select(
                    "SELECT to_regclass($1) IS NOT NULL AND has_table_privilege(to_regclass($1), 'SELECT')",
                    None,
                    &[table.into()],
                )?
                .first()
                .get_one::<bool>()?;
            if exists != Some(true) {
                return Ok((None, None));
            }
            c.select(
                &format!("{marker}SELECT count(*), now() - min(created_at) FROM {table} WHERE partition = $1"),
                None,
                &[partition.into()],
            )?
            .first()
            .get_two::<i64, pgrx::datum::Interval>()
        })
    })
    .unwrap_or((None, None))
}

/// One row per Kafka partition the bridge consumes or consumed since server start.
#[allow(clippy::type_complexity)] // a pgrx table of named columns
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
        name!(endpoint, Option<String>),
        name!(endpoint_failures, JsonB),
        name!(batch_limit, Option<i32>),
    ),
> {
    let endpoints = endpoints();
    #[cfg(feature = "kafka")]
    let names: Vec<String> = crate::kafka_worker::consumers().unwrap_or_default().into_iter().map(|c| c.name).collect();
    #[cfg(not(feature = "kafka"))]
    let names: Vec<String> = Vec::new();
    let rows: Vec<_> = shmem::kafka_snapshot()
        .into_iter()
        .map(|k| {
            let c = stat_columns(&k.stats, &endpoints, k.pid != 0 && k.assigned);
            let committed = (k.committed >= 0).then_some(k.committed);
            let hw = (k.high_watermark >= 0).then_some(k.high_watermark);
            let lag = hw.map(|h| (h - committed.unwrap_or(0)).max(0));
            (
                // The name it ran under: the live list may have been reordered by a reload.
                shmem::kafka_name(k.consumer as usize)
                    .or_else(|| names.get(k.consumer as usize).cloned())
                    .unwrap_or_else(|| format!("#{}", k.consumer)),
                k.topic(),
                k.partition,
                (k.pid != 0).then_some(k.pid),
                k.assigned,
                k.state().as_str().to_owned(),
                committed,
                hw,
                lag,
                c.0,
                c.1,
                c.2,
                c.3,
                c.4,
                c.5,
                c.6,
                c.7,
                c.8,
                c.9,
                c.10,
                c.11,
                c.12,
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
        let slots = layout::worker_slots();
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
#[allow(clippy::type_complexity)] // a pgrx table of named columns
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
    let specs = layout::outbox_specs();
    let rows: Vec<_> = layout::worker_slots()
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
