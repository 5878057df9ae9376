-- Runs after every function exists: wake-at-commit trigger and privileges.

-- API: Public
-- Wakes the partition's worker when the inserting transaction commits (no polling). Attach the
-- same trigger to your own outbox table when centrifugo.outbox_table_name points at it.
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

-- Dead letters are for operators: superusers, or roles they grant.
REVOKE ALL ON FUNCTION centrifugo_replay_dead_letters FROM PUBLIC;

-- API: Private
-- Workers waiting for the extension start draining as soon as CREATE EXTENSION commits.
REVOKE ALL ON FUNCTION _centrifugo_wake_workers_at_commit FROM PUBLIC;
SELECT _centrifugo_wake_workers_at_commit();
