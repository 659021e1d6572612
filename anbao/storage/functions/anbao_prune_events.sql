-- ------------------------------------------------------------ retention
-- Deletes numbered rows from the front: the rows before the first one that
-- is not older than p_before, and enough more that at most p_keep_events
-- events stay. Whole rows only (a batch row straddling the cut stays).
-- Returns pruned_through.
-- The old rows are found from the front, by the first row still young:
-- one index probe when nothing is due. Asking for
-- max(last_no) among the rows older than p_before instead scanned every
-- row of the retention window, each second, under the numbering lock
-- (23 ms at 70,000 rows, growing with the window; pg_stat_statements in
-- the evening, issue 17). Numbers follow commits, so a row's `at` can
-- precede its predecessor's by the commits' skew; such a row then waits
-- for the row before it, and no event younger than p_before is pruned.
CREATE OR REPLACE FUNCTION anbao_prune_events(p_before TIMESTAMPTZ, p_keep_events BIGINT) RETURNS BIGINT
LANGUAGE plpgsql AS $$
DECLARE
    f RECORD;
    cut BIGINT;
    gone_at TIMESTAMPTZ;
BEGIN
    PERFORM pg_advisory_xact_lock(7020657039738307955);
    SELECT * INTO f FROM event_feed;
    -- Rows are whole and numbers dense: the cut is just below the first young row.
    SELECT e.first_no - 1 INTO cut FROM event_log e
        WHERE e.last_no > f.pruned_through AND e.at >= p_before ORDER BY e.last_no LIMIT 1;
    IF cut IS NULL THEN  -- every numbered row is old
        cut := COALESCE((SELECT max(e.last_no) FROM event_log e), f.pruned_through);
    END IF;
    cut := GREATEST(cut, COALESCE((SELECT max(last_no) FROM event_log WHERE last_no <= f.numbered_through - p_keep_events), 0));
    IF cut <= f.pruned_through THEN
        RETURN f.pruned_through;
    END IF;
    WITH gone AS (DELETE FROM event_log WHERE last_no <= cut RETURNING at)
    SELECT max(at) INTO gone_at FROM gone;
    UPDATE event_feed SET pruned_through = cut, pruned_at = GREATEST(pruned_at, COALESCE(gone_at, pruned_at));
    RETURN cut;
END $$;
