-- centrifugo_outbox 0.5.0 → 0.6.0: the outbox's wake-at-commit trigger now also sends the NOTIFY
-- of Centrifugo's documented trigger (centrifugo.partition_notification_channel, when set), so
-- the outbox keeps one row trigger instead of two: the PL/pgSQL one is dropped from it. The
-- function centrifugo_notify_partition_change() stays, for tables of your own.
DROP TRIGGER IF EXISTS centrifugo_notify_partition_trigger ON centrifugo_outbox;
