-- centrifugo_outbox 0.2.0 → 0.3.0: every function pins its search_path and names objects by
-- schema, the old status function is no longer executable by PUBLIC, Kafka dead letters keep the
-- record's bytes. (Delivery changes, exact payloads and the new idempotency keys are in the
-- library; nothing to migrate in the rows.)

-- 0.3.0 sends payloads as the database's text: it needs UTF-8, as a fresh install checks.
DO $$
BEGIN
    IF pg_catalog.getdatabaseencoding() OPERATOR(pg_catalog.<>) 'UTF8' THEN
        RAISE EXCEPTION 'centrifugo_outbox needs a UTF8 database, and this one is %', pg_catalog.getdatabaseencoding()
            USING ERRCODE = 'feature_not_supported',
                  HINT = 'Create the database with ENCODING ''UTF8'' (Centrifugo speaks UTF-8 JSON).';
    END IF;
END;
$$;

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

ALTER TABLE centrifugo_dead_letters ADD COLUMN raw_value bytea;
COMMENT ON COLUMN centrifugo_dead_letters.raw_value IS
    'Kafka dead letters: the record value byte for byte (payload holds it as jsonb when jsonb can, else JSON null).';

-- 0.3.0 refuses a centrifugo_publisher it did not make (see schema.sql); a role that 0.2.0 took
-- over from somebody else is refused here too, before the upgrade completes.
DO $$
DECLARE
    publisher pg_catalog.oid;
    why pg_catalog.text;
BEGIN
    SELECT r.oid,
           CASE WHEN r.rolcanlogin THEN 'it can log in'
                WHEN r.rolsuper OR r.rolcreaterole OR r.rolcreatedb OR r.rolreplication OR r.rolbypassrls
                    THEN 'it has SUPERUSER, CREATEROLE, CREATEDB, REPLICATION or BYPASSRLS'
                WHEN EXISTS (SELECT FROM pg_catalog.pg_auth_members m WHERE m.member OPERATOR(pg_catalog.=) r.oid)
                    THEN 'it is a member of other roles'
                ELSE (SELECT 'role ' OPERATOR(pg_catalog.||) pg_catalog.quote_ident(a.rolname)
                             OPERATOR(pg_catalog.||) ' can administer it (ADMIN OPTION) without being a superuser'
                      FROM pg_catalog.pg_auth_members m JOIN pg_catalog.pg_roles a ON a.oid OPERATOR(pg_catalog.=) m.member
                      WHERE m.roleid OPERATOR(pg_catalog.=) r.oid AND m.admin_option AND NOT a.rolsuper
                      LIMIT 1)
           END
      INTO publisher, why
      FROM pg_catalog.pg_roles r WHERE r.rolname OPERATOR(pg_catalog.=) 'centrifugo_publisher';
    IF why IS NOT NULL THEN
        RAISE EXCEPTION 'centrifugo_outbox: role "centrifugo_publisher" already exists and %', why
            USING ERRCODE = 'duplicate_object',
                  HINT = 'The extension grants its SQL API to this role. Remove what is listed (or drop and re-create the role as NOLOGIN and grant it again) and run ALTER EXTENSION centrifugo_outbox UPDATE again.';
    END IF;
END;
$$;
