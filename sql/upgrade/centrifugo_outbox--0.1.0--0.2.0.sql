-- centrifugo_outbox 0.1.0 → 0.2.0: operators' status views, Kafka partition status, dead-letter
-- purge and counts, worker control, and pg_dump of pending commands and dead letters.
-- (The function definitions are those pgrx generates for 0.2.0.)

-- centrifugo_outbox::status::centrifugo_outbox_status_rows
CREATE  FUNCTION "centrifugo_outbox_status_rows"() RETURNS TABLE (
	"consumer" TEXT,  /* String */
	"partition" INT,  /* i32 */
	"pid" INT,  /* Option < i32 > */
	"state" TEXT,  /* String */
	"backlog" bigint,  /* Option < i64 > */
	"oldest_pending_age" interval,  /* Option < pgrx :: datum :: Interval > */
	"delivered" bigint,  /* i64 */
	"batches" bigint,  /* i64 */
	"retries" bigint,  /* i64 */
	"dead_lettered" bigint,  /* i64 */
	"last_success_at" timestamp with time zone,  /* Option < TimestampWithTimeZone > */
	"last_error_code" INT,  /* Option < i32 > */
	"last_error" TEXT,  /* Option < String > */
	"last_error_at" timestamp with time zone,  /* Option < TimestampWithTimeZone > */
	"backoff_ms" INT,  /* i32 */
	"latency_histogram" jsonb  /* JsonB */
)
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'centrifugo_outbox_status_rows_wrapper';

-- centrifugo_outbox::status::centrifugo_kafka_status_rows
CREATE  FUNCTION "centrifugo_kafka_status_rows"() RETURNS TABLE (
	"consumer" TEXT,  /* String */
	"topic" TEXT,  /* String */
	"partition" INT,  /* i32 */
	"pid" INT,  /* Option < i32 > */
	"assigned" bool,  /* bool */
	"state" TEXT,  /* String */
	"committed_offset" bigint,  /* Option < i64 > */
	"high_watermark" bigint,  /* Option < i64 > */
	"lag" bigint,  /* Option < i64 > */
	"delivered" bigint,  /* i64 */
	"batches" bigint,  /* i64 */
	"retries" bigint,  /* i64 */
	"dead_lettered" bigint,  /* i64 */
	"last_success_at" timestamp with time zone,  /* Option < TimestampWithTimeZone > */
	"last_error_code" INT,  /* Option < i32 > */
	"last_error" TEXT,  /* Option < String > */
	"last_error_at" timestamp with time zone,  /* Option < TimestampWithTimeZone > */
	"backoff_ms" INT,  /* i32 */
	"latency_histogram" jsonb  /* JsonB */
)
STRICT VOLATILE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'centrifugo_kafka_status_rows_wrapper';

-- centrifugo_outbox::status::centrifugo_wait_until_running
CREATE  FUNCTION "centrifugo_wait_until_running"(
	"timeout" interval DEFAULT '10 seconds' /* pgrx :: datum :: Interval */
) RETURNS bool /* bool */
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'centrifugo_wait_until_running_wrapper';

-- centrifugo_outbox::status::centrifugo_restart_workers
CREATE  FUNCTION "centrifugo_restart_workers"() RETURNS bigint /* i64 */
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'centrifugo_restart_workers_wrapper';

-- centrifugo_outbox::dead_letters::centrifugo_purge_dead_letters
CREATE  FUNCTION "centrifugo_purge_dead_letters"(
	"older_than" interval DEFAULT NULL, /* Option < pgrx :: datum :: Interval > */
	"ids" bigint[] DEFAULT NULL, /* :: std :: option :: Option < Vec < i64 > > */
	"error_code" INT DEFAULT NULL, /* Option < i32 > */
	"source" TEXT DEFAULT NULL /* Option < & str > */
) RETURNS bigint /* i64 */
VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'centrifugo_purge_dead_letters_wrapper';

-- API: Public
-- Operators' views. One row per partition worker / per Kafka partition; counters since server start.
CREATE VIEW centrifugo_outbox_status AS SELECT * FROM centrifugo_outbox_status_rows();
CREATE VIEW centrifugo_kafka_status AS SELECT * FROM centrifugo_kafka_status_rows();
CREATE VIEW centrifugo_dead_letter_counts AS
    SELECT source, consumer, method, error_kind, error_code, count(*) AS dead_letters,
           min(failed_at) AS first_failed_at, max(failed_at) AS last_failed_at
    FROM centrifugo_dead_letters
    GROUP BY source, consumer, method, error_kind, error_code;

-- Status, dead letters and worker control are for operators: superusers, or roles they grant.
REVOKE ALL ON FUNCTION centrifugo_replay_dead_letters, centrifugo_purge_dead_letters, centrifugo_restart_workers,
    centrifugo_outbox_status_rows, centrifugo_kafka_status_rows, centrifugo_wait_until_running FROM PUBLIC;
REVOKE ALL ON centrifugo_outbox_status, centrifugo_kafka_status, centrifugo_dead_letter_counts FROM PUBLIC;

-- API: Private
-- Workers waiting for the extension start draining as soon as CREATE EXTENSION commits.
REVOKE ALL ON FUNCTION _centrifugo_wake_workers_at_commit FROM PUBLIC;
SELECT _centrifugo_wake_workers_at_commit();

-- pg_dump leaves out the rows of an extension's tables unless they are marked.
SELECT pg_catalog.pg_extension_config_dump('centrifugo_outbox', '');
SELECT pg_catalog.pg_extension_config_dump('centrifugo_outbox_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('centrifugo_dead_letters', '');
SELECT pg_catalog.pg_extension_config_dump('centrifugo_dead_letters_id_seq', '');
