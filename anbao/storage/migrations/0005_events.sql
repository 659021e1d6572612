-- anbao schema v5: the event feed (issue 12). Every money fact writes its
-- event row in the transaction that makes the fact, so there is never an
-- event without its fact nor a fact without its event:
--
--   SEND, DEPOSIT, WITHDRAW, refund   a trigger on transfers of those kinds
--                                     (the grab transfers, kind 4, written in
--                                     bulk by the roll-up, skip it by its WHEN)
--   grabs and sell-outs               ONE row per grab batch, written by the
--                                     batch's own INSERT (a CTE, commit.py):
--                                     the hot path gains one small row a batch,
--                                     no row and no index entry per grab.
--
-- A batch row stands for one event per grab of the batch, plus one SOLD_OUT
-- event for each packet whose last share (seq = share_count) it carries. It
-- is expanded when read, from grab_rollups while the batch is pending and
-- from claims (by batch_id) once it is rolled up; both give the same events
-- in the same order (packet, seq; a sell-out right after its last share).
--
-- Numbering. Rows are written unnumbered. One sequencer at a time per
-- database (an advisory lock) gives every row it can see, that is every
-- row whose transaction has committed, the next numbers (a batch row a
-- range: first_no..last_no), in one transaction that also advances
-- event_feed.numbered_through and NOTIFYs the new head. So numbers are
-- dense and stable, and a number becomes visible only together with every
-- smaller one: a reader that has seen N never later meets a number <= N
-- it has not seen. A fact committing after a sequencer run is numbered by a
-- later run, above everything numbered before.
--
-- Retention: the pruner deletes numbered rows from the front only (whole
-- rows, in number order) and records pruned_through: a cursor below it has
-- lost events, and is told to resume from pruned_through.

CREATE TABLE event_log (
    id           BIGSERIAL PRIMARY KEY,                 -- write order, not the event number
    first_no     BIGINT,                                -- the row's first event number; NULL until numbered
    last_no      BIGINT,                                -- its last (= first_no for every row but a batch's)
    kind         SMALLINT NOT NULL,                     -- 0 a grab batch (expanded when read), else an event kind
    batch_id     BIGINT,                                -- kind 0: the grab batch
    transfer_id  BIGINT,                                -- the transfer this event records, if any
    at           TIMESTAMPTZ NOT NULL DEFAULT now(),    -- the fact's transaction time
    packet_id    BIGINT NOT NULL DEFAULT 0,
    user_id      BIGINT NOT NULL DEFAULT 0,
    seq          INTEGER NOT NULL DEFAULT 0,
    count        INTEGER NOT NULL DEFAULT 0,
    amount_cents BIGINT NOT NULL DEFAULT 0,
    elapsed_ms   BIGINT NOT NULL DEFAULT 0,
    CHECK ((kind = 0) = (batch_id IS NOT NULL)),
    CHECK ((first_no IS NULL) = (last_no IS NULL) AND first_no <= last_no)
);
-- Event kinds (the protocol table's EventKind): 1 packet sent, 2 share
-- taken, 3 sold out, 4 expired and refunded, 5 deposit, 6 withdrawal,
-- 7 cross-set credit (reserved for sets).
CREATE UNIQUE INDEX event_log_by_number ON event_log (last_no);
CREATE INDEX event_log_unnumbered ON event_log (id) WHERE last_no IS NULL;
CREATE UNIQUE INDEX event_log_batches ON event_log (batch_id) WHERE batch_id IS NOT NULL;
CREATE UNIQUE INDEX event_log_transfers ON event_log (transfer_id) WHERE transfer_id IS NOT NULL;

-- Expanding a rolled-up batch reads its claims by batch id.
CREATE INDEX claims_by_batch ON claims (batch_id);

CREATE TABLE event_feed (
    one              BOOLEAN PRIMARY KEY DEFAULT true CHECK (one),
    numbered_through BIGINT NOT NULL DEFAULT 0,   -- the last event number given
    pruned_through   BIGINT NOT NULL DEFAULT 0,   -- every event up to it is pruned: the oldest valid cursor
    pruned_at        TIMESTAMPTZ NOT NULL DEFAULT '-infinity'  -- the newest `at` pruned (the audit checks facts after it)
);
INSERT INTO event_feed DEFAULT VALUES;

-- Every fact recorded before this migration gets its event now, so the
-- audit's fact/event agreement holds from the first day.
INSERT INTO event_log (kind, transfer_id, at, packet_id, user_id, seq, count, amount_cents)
    SELECT CASE t.kind WHEN 1 THEN 5 WHEN 2 THEN 6 WHEN 3 THEN 1 ELSE 4 END, t.transfer_id, t.created_at,
           COALESCE(t.packet_id, 0),
           (SELECT a.owner_id FROM accounts a
            WHERE a.account_id = CASE WHEN t.kind IN (2, 3) THEN t.debit_account ELSE t.credit_account END),
           COALESCE(CASE WHEN t.kind = 5 THEN p.claimed_count END, 0),
           COALESCE(p.share_count, 0), t.amount_cents
    FROM transfers t LEFT JOIN packets p ON p.packet_id = t.packet_id
    WHERE t.kind IN (1, 2, 3, 5) ORDER BY t.transfer_id;
INSERT INTO event_log (kind, batch_id, at)
    SELECT 0, b.batch_id, min(b.at) FROM (
        SELECT batch_id, created_at AS at FROM claims
        UNION ALL SELECT batch_id, committed_at FROM grab_rollups) b
    GROUP BY b.batch_id ORDER BY b.batch_id;

-- ------------------------------------------------------------ facts -> events
CREATE FUNCTION anbao_transfer_event() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    owner BIGINT;
    shares INTEGER := 0;
    claimed INTEGER := 0;
BEGIN
    SELECT a.owner_id INTO owner FROM accounts a
        WHERE a.account_id = CASE WHEN NEW.kind IN (2, 3) THEN NEW.debit_account ELSE NEW.credit_account END;
    IF NEW.packet_id IS NOT NULL THEN
        SELECT pk.share_count, pk.claimed_count INTO shares, claimed FROM packets pk WHERE pk.packet_id = NEW.packet_id;
    END IF;
    INSERT INTO event_log (kind, transfer_id, at, packet_id, user_id, seq, count, amount_cents)
        VALUES (CASE NEW.kind WHEN 1 THEN 5 WHEN 2 THEN 6 WHEN 3 THEN 1 ELSE 4 END, NEW.transfer_id, NEW.created_at,
                COALESCE(NEW.packet_id, 0), owner, CASE WHEN NEW.kind = 5 THEN COALESCE(claimed, 0) ELSE 0 END,
                COALESCE(shares, 0), NEW.amount_cents);
    RETURN NULL;
END $$;

CREATE TRIGGER transfers_event AFTER INSERT ON transfers
    FOR EACH ROW WHEN (NEW.kind IN (1, 2, 3, 5)) EXECUTE FUNCTION anbao_transfer_event();

-- ------------------------------------------------------------ a batch's events
-- In a stable order whether the batch is pending or rolled up: by packet,
-- then seq, a sell-out right after the share that sold the packet out.
-- `ord` is 1-based: event number = first_no + ord - 1.
CREATE FUNCTION anbao_batch_events(p_batch BIGINT)
RETURNS TABLE (ord BIGINT, kind SMALLINT, at TIMESTAMPTZ, packet_id BIGINT, user_id BIGINT, seq INTEGER,
               count INTEGER, amount_cents BIGINT, elapsed_ms BIGINT)
LANGUAGE sql STABLE AS $$
    WITH g AS (
        SELECT x.packet_id, x.seq, x.user_id, x.amount_cents, r.committed_at AS at
        FROM grab_rollups r
        CROSS JOIN LATERAL unnest(r.packets, r.seqs, r.users, r.amounts) AS x(packet_id, seq, user_id, amount_cents)
        WHERE r.batch_id = p_batch
        UNION ALL
        SELECT c.packet_id, c.seq, c.user_id, c.amount_cents, c.created_at FROM claims c WHERE c.batch_id = p_batch
    ), e AS (
        SELECT 2::smallint AS kind, g.at, g.packet_id, g.user_id, g.seq, p.share_count AS count, g.amount_cents,
               0::bigint AS elapsed_ms, 0 AS sub
        FROM g JOIN packets p ON p.packet_id = g.packet_id
        UNION ALL
        SELECT 3::smallint, g.at, g.packet_id, p.sender_id, g.seq, p.share_count, p.total_cents,
               floor(extract(epoch FROM g.at - p.created_at) * 1000)::bigint, 1
        FROM g JOIN packets p ON p.packet_id = g.packet_id
        WHERE g.seq = p.share_count
    )
    SELECT row_number() OVER (ORDER BY e.packet_id, e.seq, e.sub), e.kind, e.at, e.packet_id, e.user_id, e.seq,
           e.count, e.amount_cents, e.elapsed_ms
    FROM e ORDER BY e.packet_id, e.seq, e.sub
$$;

-- How many events a batch row stands for, without expanding it: its grabs,
-- plus one for each of its packets whose last share it carries. Pending, the
-- arrays are scanned in C (`= ANY`) and only a packet whose share count
-- appears among the seqs is checked pair by pair; rolled up, its claims.
CREATE FUNCTION anbao_batch_event_count(p_batch BIGINT) RETURNS BIGINT
LANGUAGE sql STABLE AS $$
    SELECT COALESCE(
        (SELECT cardinality(r.packets) + (
             SELECT count(*) FROM packets p
             WHERE p.packet_id = ANY(r.packet_ids) AND p.share_count = ANY(r.seqs)
               AND EXISTS (SELECT 1 FROM unnest(r.packets, r.seqs) AS g(packet_id, seq)
                           WHERE g.packet_id = p.packet_id AND g.seq = p.share_count))
         FROM grab_rollups r WHERE r.batch_id = p_batch),
        (SELECT count(*) + count(*) FILTER (WHERE c.seq = p.share_count)
         FROM claims c JOIN packets p ON p.packet_id = c.packet_id WHERE c.batch_id = p_batch))
$$;

-- ------------------------------------------------------------ the sequencer
-- Numbers every committed unnumbered row; returns the head (the last
-- number given, as of this run). Rows are numbered in write order (id),
-- except that the batch rows of one worker process (one block of batch
-- ids: batch_id >> 20) take the places of their ids in the order the
-- batches were built: a batch built second may reach PostgreSQL first, but
-- commits only after the first did, so a packet's shares come out in seq
-- order. A packet's SENT is written before any grab of it, and its refund
-- after every grab of it commits, so they come before and after them.
CREATE FUNCTION anbao_number_events() RETURNS BIGINT
LANGUAGE plpgsql AS $$
DECLARE
    head BIGINT;
    top BIGINT;
BEGIN
    PERFORM pg_advisory_xact_lock(7020657039738307955);   -- 'anbaoevs': one sequencer at a time
    SELECT f.numbered_through INTO head FROM event_feed f;
    IF NOT EXISTS (SELECT 1 FROM event_log WHERE last_no IS NULL) THEN
        RETURN head;
    END IF;
    WITH todo AS (
        SELECT e.id, e.batch_id FROM event_log e WHERE e.last_no IS NULL
    ), b AS (
        SELECT t.id, t.batch_id >> 20 AS blk,
               row_number() OVER (PARTITION BY t.batch_id >> 20 ORDER BY t.id) AS by_id,
               row_number() OVER (PARTITION BY t.batch_id >> 20 ORDER BY t.batch_id) AS by_build
        FROM todo t WHERE t.batch_id IS NOT NULL
    ), placed AS (
        SELECT t.id, t.id AS place, 1::bigint AS n FROM todo t WHERE t.batch_id IS NULL
        UNION ALL
        SELECT b1.id, b2.id, anbao_batch_event_count(e.batch_id)
        FROM b b1 JOIN b b2 ON b2.blk = b1.blk AND b2.by_id = b1.by_build
        JOIN event_log e ON e.id = b1.id
    ), numbered AS (
        SELECT p.id, p.n, head + sum(p.n) OVER (ORDER BY p.place) AS last FROM placed p
    )
    UPDATE event_log e SET first_no = x.last - x.n + 1, last_no = x.last
        FROM numbered x WHERE e.id = x.id AND x.n > 0;
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

-- ------------------------------------------------------------ reading
-- The events after p_cursor, at most p_limit, in number order. The same
-- events as anbao_batch_events gives batch by batch (the audit holds them
-- to it), expanded here for all the page's batches in one pass: one join
-- per table and one sort, not a function call and a sort per batch.
CREATE FUNCTION anbao_events_after(p_cursor BIGINT, p_limit INTEGER)
RETURNS TABLE (no BIGINT, kind SMALLINT, at_ms BIGINT, packet_id BIGINT, user_id BIGINT, seq INTEGER,
               count INTEGER, amount_cents BIGINT, elapsed_ms BIGINT)
LANGUAGE sql STABLE AS $$
    WITH e AS (
        -- The rows holding numbers p_cursor + 1 .. p_cursor + p_limit (numbers
        -- are dense): at most p_limit rows, and only they are expanded.
        SELECT * FROM (SELECT * FROM event_log WHERE last_no > p_cursor ORDER BY last_no LIMIT p_limit) w
        WHERE w.first_no <= p_cursor + p_limit
    ), g AS (
        SELECT e.first_no, x.packet_id, x.seq, x.user_id, x.amount_cents, r.committed_at AS at
        FROM e JOIN grab_rollups r ON r.batch_id = e.batch_id
        CROSS JOIN LATERAL unnest(r.packets, r.seqs, r.users, r.amounts) AS x(packet_id, seq, user_id, amount_cents)
        UNION ALL
        SELECT e.first_no, c.packet_id, c.seq, c.user_id, c.amount_cents, c.created_at
        FROM e JOIN claims c ON c.batch_id = e.batch_id
    ), x AS (
        SELECT g.first_no, 2::smallint AS kind, g.at, g.packet_id, g.user_id, g.seq, p.share_count AS count,
               g.amount_cents, 0::bigint AS elapsed_ms, 0 AS sub
        FROM g JOIN packets p ON p.packet_id = g.packet_id
        UNION ALL
        SELECT g.first_no, 3::smallint, g.at, g.packet_id, p.sender_id, g.seq, p.share_count, p.total_cents,
               floor(extract(epoch FROM g.at - p.created_at) * 1000)::bigint, 1
        FROM g JOIN packets p ON p.packet_id = g.packet_id
        WHERE g.seq = p.share_count
    ), numbered AS (
        SELECT x.first_no + row_number() OVER (PARTITION BY x.first_no ORDER BY x.packet_id, x.seq, x.sub) - 1 AS no,
               x.kind, x.at, x.packet_id, x.user_id, x.seq, x.count, x.amount_cents, x.elapsed_ms
        FROM x
        UNION ALL
        SELECT e.first_no, e.kind, e.at, e.packet_id, e.user_id, e.seq, e.count, e.amount_cents, e.elapsed_ms
        FROM e WHERE e.batch_id IS NULL
    )
    SELECT n.no, n.kind, floor(extract(epoch FROM n.at) * 1000)::bigint, n.packet_id, n.user_id, n.seq, n.count,
           n.amount_cents, n.elapsed_ms
    FROM numbered n WHERE n.no > p_cursor ORDER BY n.no LIMIT p_limit
$$;

-- ------------------------------------------------------------ retention
-- Deletes numbered rows from the front: those older than p_before, and
-- enough more that at most p_keep_events events stay. Whole rows only (a
-- batch row straddling the cut stays). Returns pruned_through.
CREATE FUNCTION anbao_prune_events(p_before TIMESTAMPTZ, p_keep_events BIGINT) RETURNS BIGINT
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
