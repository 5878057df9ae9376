-- centrifugo_outbox 0.2.0 → 0.3.0: every function pins its search_path and names objects by
-- schema, the old status function is no longer executable by PUBLIC. (Delivery changes, exact
-- payloads and the new idempotency keys are in the library; nothing to migrate in the tables.)

-- Every function written in Rust runs with search_path pinned, as a fresh 0.3.0 install has it.
DO $$
DECLARE
    f pg_catalog.regprocedure;
BEGIN
    FOR f IN
        SELECT p.oid::pg_catalog.regprocedure
        FROM pg_catalog.pg_proc p
        JOIN pg_catalog.pg_depend d ON d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_proc'::pg_catalog.regclass
             AND d.objid OPERATOR(pg_catalog.=) p.oid AND d.deptype OPERATOR(pg_catalog.=) 'e'
        JOIN pg_catalog.pg_extension e ON e.oid OPERATOR(pg_catalog.=) d.refobjid
        WHERE e.extname OPERATOR(pg_catalog.=) 'centrifugo_outbox'
          AND p.prolang OPERATOR(pg_catalog.=) (SELECT oid FROM pg_catalog.pg_language WHERE lanname OPERATOR(pg_catalog.=) 'c')
          AND p.prorettype OPERATOR(pg_catalog.<>) 'pg_catalog.trigger'::pg_catalog.regtype
    LOOP
        EXECUTE pg_catalog.format('ALTER FUNCTION %s SET search_path TO pg_catalog, pg_temp', f);
    END LOOP;
END;
$$;

CREATE OR REPLACE FUNCTION centrifugo_notify_partition_change() RETURNS trigger
LANGUAGE plpgsql AS $$
-- Every name is qualified: this runs with the inserting session's search_path.
DECLARE
    channel pg_catalog.text := coalesce(TG_ARGV[0], pg_catalog.current_setting('centrifugo.partition_notification_channel', true), '');
BEGIN
    IF channel OPERATOR(pg_catalog.<>) '' THEN
        PERFORM pg_catalog.pg_notify(channel, NEW.partition::pg_catalog.text);
    END IF;
    RETURN NEW;
END;
$$;

REVOKE ALL ON FUNCTION centrifugo_worker_status FROM PUBLIC;
