-- Runs last: the SQL API is executable by centrifugo_publisher (and superusers), not by PUBLIC.
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
