-- anbao schema v18: a SEND batch writes its SENT events itself, one
-- statement for the batch (issue 17).
--
-- Each SEND's transfer (kind 3) fired transfers_event, a PL/pgSQL call per
-- row that looked up the sender and the packet again and inserted one
-- event row: about 60 µs of a SEND's 400 µs in PostgreSQL on an evening
-- (pg_stat_statements). anbao_send_batch (storage/functions) now inserts
-- the batch's SENT events with its transfers, and says so for its
-- transaction (anbao.sent_events = 'batch'), so that the trigger skips
-- them. Checked in the trigger's WHEN, in C, with no call per row. Said
-- per transaction rather than by kind alone, so either order of this
-- migration and the function's new text (applied after the migrations, in
-- a transaction of their own) leaves no SEND without its event: a batch
-- that does not say it (the text before) still gets the trigger's.
DROP TRIGGER transfers_event ON transfers;
CREATE TRIGGER transfers_event AFTER INSERT ON transfers
    FOR EACH ROW WHEN (NEW.kind IN (1, 2, 5)
                       OR (NEW.kind = 3 AND current_setting('anbao.sent_events', true) IS DISTINCT FROM 'batch'))
    EXECUTE FUNCTION anbao_transfer_event();
ALTER TABLE transfers ENABLE ALWAYS TRIGGER transfers_event;
