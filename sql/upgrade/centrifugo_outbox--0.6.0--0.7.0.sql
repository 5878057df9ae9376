-- centrifugo_outbox 0.6.0 → 0.7.0: the status views show `batch_limit`, the most commands a batch
-- carries now when failures lowered it (1 while a command that failed temporarily is resent
-- alone, halved after timeouts; NULL: the configured limit), as a column at the end. The
-- functions behind the views return one more column, so they are made anew; the views are
-- replaced in place, so what operators granted on them stays, and the grants on the old
-- functions are carried over to the new ones. Settings are not stored by the extension: every
-- centrifugo.* setting of 0.6.0 means the same in 0.7.0.

ALTER FUNCTION centrifugo_outbox_status_rows() RENAME TO _centrifugo_outbox_status_rows_0_6_0;
ALTER FUNCTION centrifugo_kafka_status_rows() RENAME TO _centrifugo_kafka_status_rows_0_6_0;

-- centrifugo_outbox::status::centrifugo_outbox_status_rows
CREATE  FUNCTION "centrifugo_outbox_status_rows"() RETURNS TABLE (
	"consumer" TEXT,  /* String */
	"partition" INT,  /* Option < i32 > */
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
	"latency_histogram" jsonb,  /* JsonB */
	"endpoint" TEXT,  /* Option < String > */
	"endpoint_failures" jsonb,  /* JsonB */
	"batch_limit" INT  /* Option < i32 > */
)
STRICT VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
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
	"latency_histogram" jsonb,  /* JsonB */
	"endpoint" TEXT,  /* Option < String > */
	"endpoint_failures" jsonb,  /* JsonB */
	"batch_limit" INT  /* Option < i32 > */
)
STRICT VOLATILE PARALLEL SAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'centrifugo_kafka_status_rows_wrapper';

REVOKE ALL ON FUNCTION centrifugo_outbox_status_rows(), centrifugo_kafka_status_rows() FROM PUBLIC;

-- Whoever was let run the 0.6.0 functions may run the new ones. Only the extension's own
-- functions count (by their membership, not their name: the schema's owner could have made a
-- look-alike with grants of its own).
DO $$
DECLARE
    g record;
BEGIN
    FOR g IN
        SELECT pg_catalog.substr(p.proname, 2, pg_catalog.length(p.proname) OPERATOR(pg_catalog.-) 7) AS new_name,
               a.grantee, a.is_grantable
        FROM pg_catalog.pg_proc p
        JOIN pg_catalog.pg_depend d ON d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_proc'::pg_catalog.regclass
             AND d.objid OPERATOR(pg_catalog.=) p.oid AND d.deptype OPERATOR(pg_catalog.=) 'e'
             AND d.refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_extension'::pg_catalog.regclass
        JOIN pg_catalog.pg_extension e ON e.oid OPERATOR(pg_catalog.=) d.refobjid
             AND e.extname OPERATOR(pg_catalog.=) 'centrifugo_outbox'
        CROSS JOIN LATERAL pg_catalog.aclexplode(p.proacl) a
        WHERE p.proname OPERATOR(pg_catalog.=) ANY (ARRAY['_centrifugo_outbox_status_rows_0_6_0', '_centrifugo_kafka_status_rows_0_6_0'])
          AND p.pronargs OPERATOR(pg_catalog.=) 0
          AND a.privilege_type OPERATOR(pg_catalog.=) 'EXECUTE'
          AND a.grantee OPERATOR(pg_catalog.<>) p.proowner
    LOOP
        EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %I() TO %s%s', g.new_name,
            CASE WHEN g.grantee OPERATOR(pg_catalog.=) 0 THEN 'PUBLIC' ELSE g.grantee::pg_catalog.regrole::pg_catalog.text END,
            CASE WHEN g.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END);
    END LOOP;
END;
$$;

-- API: Public
CREATE OR REPLACE VIEW centrifugo_outbox_status AS SELECT * FROM centrifugo_outbox_status_rows();
CREATE OR REPLACE VIEW centrifugo_kafka_status AS SELECT * FROM centrifugo_kafka_status_rows();

DROP FUNCTION _centrifugo_outbox_status_rows_0_6_0();
DROP FUNCTION _centrifugo_kafka_status_rows_0_6_0();
