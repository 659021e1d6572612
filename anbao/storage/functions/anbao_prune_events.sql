-- ------------------------------------------------------------ retention
-- Deletes numbered rows from the front: those older than p_before, and
-- enough more that at most p_keep_events events stay. Whole rows only (a
-- batch row straddling the cut stays). Returns pruned_through.
CREATE OR REPLACE FUNCTION anbao_prune_events(p_before TIMESTAMPTZ, p_keep_events BIGINT) RETURNS BIGINT
LANGUAGE plpgsql AS $$
DECLARE
    f RECORD;
    cut BIGINT;
    gone_at TIMESTAMPTZ;
BEGIN
    PERFORM pg_advisory_xact_lock(7020657039738307955);
    SELECT * INTO f FROM event_feed;
    SELECT GREATEST(
        COALESCE((SELECT max(last_no) FROM event_log WHERE last_no IS NOT NULL AND at < p_before), 0),
        COALESCE((SELECT max(last_no) FROM event_log WHERE last_no <= f.numbered_through - p_keep_events), 0))
        INTO cut;
    IF cut <= f.pruned_through THEN
        RETURN f.pruned_through;
    END IF;
    WITH gone AS (DELETE FROM event_log WHERE last_no <= cut RETURNING at)
    SELECT max(at) INTO gone_at FROM gone;
    UPDATE event_feed SET pruned_through = cut, pruned_at = GREATEST(pruned_at, COALESCE(gone_at, pruned_at));
    RETURN cut;
END $$;
