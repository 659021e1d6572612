-- ------------------------------------------------------------ the sequencer
-- Numbers every committed unnumbered row; returns the head (the last
-- number given, as of this run). Rows are numbered in write order (id),
-- except that the batch rows of one worker process (one block of batch
-- ids: batch_id >> 20) take the places of their ids in the order the
-- batches were built: a batch built second may reach PostgreSQL first, but
-- commits only after the first did, so a packet's shares come out in seq
-- order. A packet's SENT is written before any grab of it, and its refund
-- after every grab of it commits, so they come before and after them.
--
-- Planned without hash joins or seq scans of event_log (the SET clauses):
-- PL/pgSQL keeps the plans a connection makes first, and on a new
-- database's few rows the UPDATE below was a hash join over a seq scan of
-- event_log, which a week's retention makes millions of rows
-- (tests/test_plans.py).
CREATE OR REPLACE FUNCTION anbao_number_events() RETURNS BIGINT
LANGUAGE plpgsql SET enable_hashjoin = off SET enable_mergejoin = off SET enable_seqscan = off AS $$
DECLARE
    head BIGINT;
    top BIGINT;
    ids BIGINT[];
    counts BIGINT[];
BEGIN
    PERFORM pg_advisory_xact_lock(7020657039738307955);   -- 'anbaoevs': one sequencer at a time
    SELECT f.numbered_through INTO head FROM event_feed f;
    IF NOT EXISTS (SELECT 1 FROM event_log WHERE last_no IS NULL) THEN
        RETURN head;
    END IF;
    -- The rows to number, in their places (two statements: the UPDATE joins
    -- event_log with arrays, which the planner takes for a few rows and
    -- probes by key; a join with the query below was taken for thousands
    -- and hashed the whole table, 18 ms at 35,000 rows and growing).
    WITH todo AS (
        SELECT e.id, e.batch_id, e.kind, e.count FROM event_log e WHERE e.last_no IS NULL
    ), blk AS (
        -- Per block: its rows by id, and by build order. The k-th built
        -- takes the place of the k-th id: the two lists zipped, in linear
        -- time (a self-join on the ranks was planned as a merge join on the
        -- block alone, quadratic: 18,000 rows for 190 batches after a
        -- 0.3 s pause, 112 ms).
        SELECT array_agg(t.id ORDER BY t.id) AS by_id, array_agg(t.id ORDER BY t.batch_id) AS by_build,
               array_agg(t.batch_id ORDER BY t.batch_id) AS batches
        FROM todo t WHERE t.batch_id IS NOT NULL GROUP BY t.batch_id >> 20
    ), placed AS MATERIALIZED (  -- inlined, each count would be computed twice (filter and list)
        -- A credit batch's row (kind 8, migration 0019) holds its count.
        SELECT t.id, t.id AS place, CASE WHEN t.kind = 8 THEN t.count ELSE 1 END::bigint AS n
        FROM todo t WHERE t.batch_id IS NULL
        UNION ALL
        SELECT z.id, z.place, anbao_batch_event_count(z.batch_id)
        FROM blk CROSS JOIN LATERAL unnest(blk.by_build, blk.by_id, blk.batches) AS z(id, place, batch_id)
    )
    SELECT array_agg(p.id ORDER BY p.place), array_agg(p.n ORDER BY p.place) INTO ids, counts
        FROM placed p WHERE p.n > 0;
    UPDATE event_log e SET first_no = head + x.upto - x.n + 1, last_no = head + x.upto
        FROM (SELECT u.id, u.n, sum(u.n) OVER (ORDER BY u.o) AS upto
              FROM unnest(ids, counts) WITH ORDINALITY AS u(id, n, o)) x
        WHERE e.id = x.id;
    -- (A batch row whose batch holds no claim would stay unnumbered; it
    -- cannot happen, and the audit names such a row.)
    SELECT max(last_no) INTO top FROM event_log;
    IF top > head THEN
        UPDATE event_feed SET numbered_through = top;
        PERFORM pg_notify('anbao_events', top::text);
        head := top;
    END IF;
    RETURN head;
END $$;
