-- centrifugo_outbox schema: the Centrifugo-compatible outbox table and its NOTIFY trigger.
-- API: Public  objects are for applications and operators; their shape is a compatibility promise.
-- API: Private objects start with "_" and may change between versions.

-- Payloads travel to Centrifugo as UTF-8 JSON text exactly as jsonb prints them: the database
-- must be UTF-8 for that text to be the bytes sent.
DO $$
BEGIN
    IF pg_catalog.getdatabaseencoding() OPERATOR(pg_catalog.<>) 'UTF8' THEN
        RAISE EXCEPTION 'centrifugo_outbox needs a UTF8 database, and this one is %', pg_catalog.getdatabaseencoding()
            USING ERRCODE = 'feature_not_supported',
                  HINT = 'Create the database with ENCODING ''UTF8'' (Centrifugo speaks UTF-8 JSON).';
    END IF;
END;
$$;

-- API: Public
-- Exactly the columns and defaults of Centrifugo's outbox table, so the seed INSERT works and
-- Centrifugo's own PostgreSQL consumer can drain this table too (drop-in both ways).
CREATE TABLE centrifugo_outbox (
    id         BIGSERIAL PRIMARY KEY,
    method     text        NOT NULL,
    payload    JSONB       NOT NULL,
    partition  INTEGER     NOT NULL DEFAULT 0,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
COMMENT ON TABLE centrifugo_outbox IS
    'Centrifugo server API commands waiting for delivery; drained in id order per partition.';

-- Draining reads "the next rows of partition P in id order".
CREATE INDEX centrifugo_outbox_partition_id_idx ON centrifugo_outbox (partition, id);

-- A queue table: rows are deleted soon after insert, so vacuum it eagerly.
ALTER TABLE centrifugo_outbox SET (
    autovacuum_vacuum_scale_factor = 0.0,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_insert_scale_factor = 0.0,
    autovacuum_vacuum_insert_threshold = 10000
);

-- API: Public
-- Centrifugo's documented trigger function: NOTIFY <channel> with the partition number as text.
-- The channel is the trigger's first argument when given (for a table of your own), otherwise
-- centrifugo.partition_notification_channel; an empty channel sends nothing. The outbox's own
-- trigger (centrifugo_wake_at_commit) sends the same NOTIFY for that setting: this function is
-- for a table of your own that wants another channel.
CREATE FUNCTION centrifugo_notify_partition_change() RETURNS trigger
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

-- API: Public
-- Applications get the SQL API through this role instead of PUBLIC.
-- The role is cluster-wide: a second database's CREATE EXTENSION finds the one the first made.
-- One made by somebody else (anyone with CREATEROLE can) is refused while it could hand the SQL
-- API to others: it may log in, has role attributes, belongs to other roles, or a role that is
-- not a superuser may administer it.
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
    IF publisher IS NULL THEN
        CREATE ROLE centrifugo_publisher NOLOGIN;
    ELSIF why IS NOT NULL THEN
        RAISE EXCEPTION 'centrifugo_outbox: role "centrifugo_publisher" already exists and %', why
            USING ERRCODE = 'duplicate_object',
                  HINT = 'The extension grants its SQL API to this role. Drop the role (or remove what is listed) and run CREATE EXTENSION again.';
    END IF;
END;
$$;
-- INSERT ... RETURNING id needs SELECT on id; payloads of other rows stay unreadable.
GRANT INSERT, SELECT (id) ON centrifugo_outbox TO centrifugo_publisher;
GRANT USAGE ON SEQUENCE centrifugo_outbox_id_seq TO centrifugo_publisher;

-- API: Public
-- Commands that cannot be delivered, with the reason; nothing is dropped silently.
-- Replay with centrifugo_replay_dead_letters(...).
CREATE TABLE centrifugo_dead_letters (
    id              BIGSERIAL PRIMARY KEY,
    source          text        NOT NULL CHECK (source IN ('outbox', 'kafka')),
    consumer        text,
    outbox_id       bigint,
    method          text        NOT NULL,
    payload         JSONB       NOT NULL,
    partition       integer,
    kafka_topic     text,
    kafka_partition integer,
    kafka_offset    bigint,
    error_kind      text        NOT NULL CHECK (error_kind IN ('centrifugo', 'http', 'malformed')),
    error_code      integer,
    error_message   text        NOT NULL,
    attempts        integer     NOT NULL DEFAULT 1,
    enqueued_at     timestamptz,
    failed_at       timestamptz NOT NULL DEFAULT now(),
    raw_value       bytea
);
COMMENT ON TABLE centrifugo_dead_letters IS
    'Centrifugo commands that failed for good: error_kind/error_code/error_message say why.';
COMMENT ON COLUMN centrifugo_dead_letters.raw_value IS
    'Kafka dead letters: the record value byte for byte (payload holds it as jsonb when jsonb can, else JSON null).';
CREATE INDEX centrifugo_dead_letters_failed_at_idx ON centrifugo_dead_letters (failed_at);

-- pg_dump leaves out the rows of an extension's tables unless they are marked: pending commands
-- and dead letters must survive a dump and restore.
SELECT pg_catalog.pg_extension_config_dump('centrifugo_outbox', '');
SELECT pg_catalog.pg_extension_config_dump('centrifugo_outbox_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('centrifugo_dead_letters', '');
SELECT pg_catalog.pg_extension_config_dump('centrifugo_dead_letters_id_seq', '');
