//! Dead-letter tools: moving failed commands back into an outbox once the cause is fixed.

use pgrx::prelude::*;

use crate::layout::outbox_specs;
use crate::session;

/// Moves dead letters back into the outbox they came from (Kafka ones into the default outbox),
/// in their original order and partition, and returns how many. Filters combine with AND; no
/// filter replays them all. Only the outboxes of consumers in this database take rows (the others'
/// tables are elsewhere).
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn centrifugo_replay_dead_letters(
    ids: default!(Option<Vec<i64>>, "NULL"),
    method: default!(Option<&str>, "NULL"),
    error_code: default!(Option<i32>, "NULL"),
    error_kind: default!(Option<&str>, "NULL"),
    failed_after: default!(Option<pgrx::datum::TimestampWithTimeZone>, "NULL"),
) -> i64 {
    let dead_letters = session::dead_letters_table();
    let specs = outbox_specs();
    let others: Vec<String> = specs.iter().skip(1).map(|s| s.name()).collect();
    let this_database = Spi::get_one::<String>("SELECT pg_catalog.current_database()::pg_catalog.text")
        .unwrap_or_else(|e| error!("centrifugo_outbox: replay failed: {e}"))
        .unwrap_or_default();
    let mut replayed = 0;
    for (i, spec) in specs.iter().enumerate().filter(|(_, spec)| spec.database() == this_database) {
        // The default outbox takes its own rows, Kafka's, and those of consumers no longer configured.
        let mine = if i == 0 {
            "(d.source = 'kafka' OR d.consumer IS NULL OR NOT (d.consumer = ANY($7)))"
        } else {
            "(d.source = 'outbox' AND d.consumer = $8)"
        };
        let marker = crate::pinned::MARKER;
        let sql = format!(
            "{marker}WITH moved AS (
                 DELETE FROM {dead_letters} d
                 WHERE {mine}
                   AND ($1::bigint[] IS NULL OR d.id = ANY($1))
                   AND ($2::text IS NULL OR d.method = $2)
                   AND ($3::int IS NULL OR d.error_code = $3)
                   AND ($4::text IS NULL OR d.error_kind = $4)
                   AND ($5::timestamptz IS NULL OR d.failed_at > $5)
                 RETURNING d.*),
             inserted AS (
                 INSERT INTO {outbox} (method, payload, partition)
                 SELECT method, payload, CASE WHEN partition BETWEEN 0 AND $6 - 1 THEN partition ELSE 0 END
                 FROM moved ORDER BY id
                 RETURNING 1)
             SELECT count(*) FROM inserted",
            outbox = spec.qualified_table()
        );
        let checked = crate::session::check_outbox_owner(&spec.qualified_table(), pgrx::pg_sys::RowExclusiveLock)
            .unwrap_or_else(|reason| {
                crate::session::refuse(&format!("centrifugo_outbox: not replaying into {reason}"))
            });
        // A superuser's statement stays on the tables checked: the outbox and the dead letters.
        let pinned: Vec<pgrx::pg_sys::Oid> = match checked {
            Some(outbox) => vec![outbox, session::dead_letters_oid()],
            None => Vec::new(),
        };
        replayed += crate::pinned::pinned(&pinned, || {
            Spi::get_one_with_args::<i64>(
                &sql,
                &[
                    ids.clone().into(),
                    method.into(),
                    error_code.into(),
                    error_kind.into(),
                    failed_after.into(),
                    spec.num_partitions().into(),
                    others.clone().into(),
                    spec.name().into(),
                ],
            )
            .unwrap_or_else(|e| error!("centrifugo_outbox: replay into {} failed: {e}", spec.qualified_table()))
        })
        .unwrap_or(0);
    }
    if specs.first().is_some_and(|default| default.database() != this_database) {
        let filters = [
            ids.into(),
            method.into(),
            error_code.into(),
            error_kind.into(),
            failed_after.into(),
            others.clone().into(),
        ];
        tell_about_the_default_consumers_rows(&dead_letters, filters, &specs[0].database());
    }
    replayed
}

/// The default consumer takes the rows of no configured consumer (Kafka's, removed consumers'):
/// when it drains another database, such rows here are not replayed, and the caller is told.
/// `filters`: the replay's five, then the names of the other consumers.
fn tell_about_the_default_consumers_rows(
    dead_letters: &str,
    filters: [pgrx::datum::DatumWithOid<'_>; 6],
    database: &str,
) {
    let marker = crate::pinned::MARKER;
    // Only a hint: a failure to count (a caller who may not read the table) undoes no replay.
    let count = crate::xact::subtransaction(|| {
        crate::pinned::pinned(&[session::dead_letters_oid()], || {
            Spi::get_one_with_args::<i64>(
                &format!(
                    "{marker}SELECT count(*) FROM {dead_letters} d
                 WHERE (d.source = 'kafka' OR d.consumer IS NULL OR NOT (d.consumer = ANY($6)))
                   AND ($1::bigint[] IS NULL OR d.id = ANY($1))
                   AND ($2::text IS NULL OR d.method = $2)
                   AND ($3::int IS NULL OR d.error_code = $3)
                   AND ($4::text IS NULL OR d.error_kind = $4)
                   AND ($5::timestamptz IS NULL OR d.failed_at > $5)"
                ),
                &filters,
            )
        })
    });
    let left = count.ok().and_then(|counted| counted.ok().flatten()).unwrap_or(0);
    if left > 0 {
        notice!(
            "centrifugo_outbox: {left} dead letter(s) of Kafka or of consumers no longer configured are not replayed: \
             the default consumer, which takes them, drains database \"{database}\""
        );
    }
}

/// Deletes dead letters for good and returns how many. Filters combine with AND; at least one is
/// required, so a mistaken call cannot empty the table (use `older_than => '0'` for all).
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn centrifugo_purge_dead_letters(
    older_than: default!(Option<pgrx::datum::Interval>, "NULL"),
    ids: default!(Option<Vec<i64>>, "NULL"),
    error_code: default!(Option<i32>, "NULL"),
    source: default!(Option<&str>, "NULL"),
) -> i64 {
    if older_than.is_none() && ids.is_none() && error_code.is_none() && source.is_none() {
        crate::errors::raise(outbox_core::CommandError::invalid(
            "centrifugo_purge_dead_letters needs a filter: older_than, ids, error_code or source",
        ));
    }
    let dead_letters = session::dead_letters_table();
    let marker = crate::pinned::MARKER;
    crate::pinned::pinned(&[session::dead_letters_oid()], || {
        Spi::get_one_with_args::<i64>(
            &format!(
                "{marker}WITH gone AS (
                 DELETE FROM {dead_letters} d
                 WHERE ($1::interval IS NULL OR d.failed_at < now() - $1)
                   AND ($2::bigint[] IS NULL OR d.id = ANY($2))
                   AND ($3::int IS NULL OR d.error_code = $3)
                   AND ($4::text IS NULL OR d.source = $4)
                 RETURNING 1)
             SELECT count(*) FROM gone"
            ),
            &[older_than.into(), ids.into(), error_code.into(), source.into()],
        )
    })
    .unwrap_or_else(|e| error!("centrifugo_outbox: purge failed: {e}"))
    .unwrap_or(0)
}
