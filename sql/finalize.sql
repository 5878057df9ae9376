-- Runs after every function exists: wake-at-commit trigger and privileges.

-- API: Public
-- Wakes the partition's worker when the inserting transaction commits (no polling), and sends
-- Centrifugo's NOTIFY when centrifugo.partition_notification_channel is set. Attach the same
-- trigger to your own outbox table when centrifugo.outbox_table_name points at it.
CREATE TRIGGER centrifugo_wake_at_commit_trigger
    AFTER INSERT ON centrifugo_outbox
    FOR EACH ROW EXECUTE FUNCTION centrifugo_wake_at_commit();

-- The SQL API is executable by centrifugo_publisher (and superusers), not by PUBLIC.
REVOKE ALL ON FUNCTION
    centrifugo_publish, centrifugo_publish_binary, centrifugo_broadcast, centrifugo_broadcast_binary,
    centrifugo_subscribe, centrifugo_unsubscribe, centrifugo_disconnect, centrifugo_refresh,
    centrifugo_history_remove, centrifugo_command, centrifugo_partition_for
FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    centrifugo_publish, centrifugo_publish_binary, centrifugo_broadcast, centrifugo_broadcast_binary,
    centrifugo_subscribe, centrifugo_unsubscribe, centrifugo_disconnect, centrifugo_refresh,
    centrifugo_history_remove, centrifugo_command, centrifugo_partition_for
TO centrifugo_publisher;

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
    centrifugo_outbox_status_rows, centrifugo_kafka_status_rows, centrifugo_wait_until_running,
    centrifugo_worker_status FROM PUBLIC;
REVOKE ALL ON centrifugo_outbox_status, centrifugo_kafka_status, centrifugo_dead_letter_counts FROM PUBLIC;

-- API: Private
-- Workers waiting for the extension start draining as soon as CREATE EXTENSION commits.
REVOKE ALL ON FUNCTION _centrifugo_wake_workers_at_commit FROM PUBLIC;
SELECT _centrifugo_wake_workers_at_commit();
