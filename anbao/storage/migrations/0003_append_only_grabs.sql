-- anbao schema v3: the grab commit is append-only; balances are rolled up
-- behind it, exactly once.
--
-- Before v3 one grab batch inserted claims and transfers, updated every
-- touched wallet, the escrow and the packet row, and checked ~3 foreign
-- keys per row: about 20 ms of PostgreSQL CPU per 400 grabs, and the hot
-- packet's escrow and packet rows serialized every batch of that packet.
--
-- From v3 on, what makes a grab durable (and lets it be acknowledged) is
-- one row per batch in grab_rollups, whose arrays hold every claim of the
-- batch (packet, seq, user, amount): the record that proves the grabs.
-- Nothing shared is updated, and no index entry is made per grab. The
-- roll-up (anbao_rollup) later turns each pending batch into its claim
-- rows, transfers, wallet and escrow balances and packet counters, and
-- deletes the grab_rollups row in the same transaction: exactly once,
-- whatever crashes in between.
--
-- While a batch waits for its roll-up, its money is still in the escrow:
-- every balance still equals the sum of its transfers. claims_all (and,
-- for one packet, anbao_claims_of) shows rolled-up and pending claims
-- together; the audit checks both (see audit.py).

-- ------------------------------------------------------------ foreign keys
-- Integrity of these references is kept by the writers (a claim's packet
-- and user are checked before the grab is decided; transfers are written
-- only by functions that look their accounts up) and proved by the audit.
-- On the hot path they cost about 60% of a batch's CPU.
ALTER TABLE claims DROP CONSTRAINT IF EXISTS claims_packet_id_fkey;
ALTER TABLE transfers DROP CONSTRAINT IF EXISTS transfers_debit_account_fkey;
ALTER TABLE transfers DROP CONSTRAINT IF EXISTS transfers_credit_account_fkey;

-- ------------------------------------------------------------ pending roll-ups
-- One row per committed grab batch not yet rolled up. The arrays are the
-- batch itself, one element per grab in the order they were decided;
-- packet_ids is the batch's distinct packets, small, so that finding a
-- packet's pending claims reads no big array.
CREATE TABLE grab_rollups (
    batch_id  BIGINT   PRIMARY KEY,
    worker_id SMALLINT NOT NULL,
    packet_ids BIGINT[] NOT NULL,
    packets   BIGINT[] NOT NULL,
    seqs      INTEGER[] NOT NULL,
    users     BIGINT[] NOT NULL,
    amounts   BIGINT[] NOT NULL,
    committed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK (cardinality(packets) > 0 AND cardinality(seqs) = cardinality(packets)
           AND cardinality(users) = cardinality(packets) AND cardinality(amounts) = cardinality(packets))
);
-- Stored out of line and uncompressed: compressing ~30 bytes a grab costs
-- the commit more CPU than the bytes it saves.
ALTER TABLE grab_rollups ALTER COLUMN packets SET STORAGE EXTERNAL, ALTER COLUMN seqs SET STORAGE EXTERNAL,
    ALTER COLUMN users SET STORAGE EXTERNAL, ALTER COLUMN amounts SET STORAGE EXTERNAL;

-- Every claim, rolled up (claims) or waiting for its roll-up.
CREATE VIEW claims_all AS
    SELECT packet_id, seq, user_id, amount_cents, batch_id, created_at, true AS rolled_up FROM claims
    UNION ALL
    SELECT g.packet_id, g.seq, g.user_id, g.amount_cents, r.batch_id, r.committed_at, false
    FROM grab_rollups r
    CROSS JOIN LATERAL unnest(r.packets, r.seqs, r.users, r.amounts) AS g(packet_id, seq, user_id, amount_cents);

-- One packet's claims, rolled up or pending, by seq: what PACKET shows and
-- what the owner rebuilds the packet's state from.
CREATE FUNCTION anbao_claims_of(p_packet BIGINT)
RETURNS TABLE (seq INTEGER, user_id BIGINT, amount_cents BIGINT, created_at TIMESTAMPTZ)
LANGUAGE sql STABLE AS $$
    SELECT c.seq, c.user_id, c.amount_cents, c.created_at FROM claims c WHERE c.packet_id = p_packet
    UNION ALL
    SELECT g.seq, g.user_id, g.amount_cents, r.committed_at
    FROM grab_rollups r
    CROSS JOIN LATERAL unnest(r.packets, r.seqs, r.users, r.amounts) AS g(packet_id, seq, user_id, amount_cents)
    WHERE r.packet_ids && ARRAY[p_packet] AND g.packet_id = p_packet
$$;

-- Before v3 every batch was rolled up inside its own commit; its record
-- only served read-back, which v3 does from grab_rollups and the claims.
DROP FUNCTION anbao_commit_grabs(BIGINT, BIGINT[], INTEGER[], BIGINT[], BIGINT[]);
DROP TABLE grab_batches;

-- ------------------------------------------------------------ roll-up
-- Rolls up to p_limit pending batches, oldest first: any, or only those of
-- worker p_worker (worker 0 also takes those of workers >= p_worker_count,
-- left by a larger deployment), or holding p_user's or p_packets' claims.
-- Returns the claims rolled up.
--
-- Roll-ups of one database run one at a time (a transaction-scoped
-- advisory lock): they then never deadlock on each other's wallet, escrow
-- and packet rows, whatever order their UPDATEs take rows in, and need not
-- lock every row up front. The other writers of those rows (SEND,
-- DEPOSIT, WITHDRAW, refunds) hold at most one row a roll-up may want
-- while they wait for another, or none. A reader that needs its own
-- credits rolled up waits for the roll-up under way, then finds its
-- batches done or does them.
CREATE FUNCTION anbao_rollup(p_limit INTEGER, p_user BIGINT, p_packets BIGINT[], p_worker SMALLINT,
                             p_worker_count SMALLINT)
RETURNS INTEGER
LANGUAGE plpgsql AS $$
DECLARE
    ids BIGINT[];
    n INTEGER;
    acc_ids BIGINT[];
    acc_deltas BIGINT[];
    pkt_ids BIGINT[];
    pkt_counts INTEGER[];
    pkt_cents BIGINT[];
BEGIN
    PERFORM pg_advisory_xact_lock(7020657039738302316);   -- the bytes 'anbaorol': one key for every roll-up
    SELECT array_agg(batch_id) INTO ids FROM (
        SELECT r.batch_id FROM grab_rollups r
        WHERE (p_user IS NULL OR p_user = ANY(r.users))
          AND (p_packets IS NULL OR r.packet_ids && p_packets)
          AND (p_worker IS NULL OR r.worker_id = p_worker OR (p_worker = 0 AND r.worker_id >= p_worker_count))
        ORDER BY r.batch_id LIMIT p_limit) s;
    IF ids IS NULL THEN
        RETURN 0;
    END IF;

    IF to_regclass('pg_temp.g_rollup') IS NULL THEN
        CREATE TEMP TABLE g_rollup (
            batch_id BIGINT, ord BIGINT, packet_id BIGINT, seq INTEGER, user_id BIGINT, amount_cents BIGINT,
            escrow BIGINT, wallet BIGINT, committed_at TIMESTAMPTZ) ON COMMIT DELETE ROWS;
    END IF;
    INSERT INTO g_rollup
        SELECT r.batch_id, g.ord, g.packet_id, g.seq, g.user_id, g.amount_cents, p.escrow_account_id, a.account_id,
               r.committed_at
        FROM grab_rollups r
        CROSS JOIN LATERAL unnest(r.packets, r.seqs, r.users, r.amounts)
            WITH ORDINALITY AS g(packet_id, seq, user_id, amount_cents, ord)
        LEFT JOIN packets p ON p.packet_id = g.packet_id
        LEFT JOIN accounts a ON a.kind = 1 AND a.owner_id = g.user_id
        WHERE r.batch_id = ANY(ids);
    GET DIAGNOSTICS n = ROW_COUNT;
    IF EXISTS (SELECT 1 FROM g_rollup WHERE escrow IS NULL OR wallet IS NULL) THEN
        RAISE EXCEPTION 'anbao_rollup: a pending claim names an unknown packet or user (batches %)', ids;
    END IF;

    -- The claims' own constraints (one row per share, one share per user)
    -- are checked here; a batch that broke them stays pending, and the
    -- audit names it.
    INSERT INTO claims (packet_id, seq, user_id, amount_cents, batch_id, created_at)
        SELECT packet_id, seq, user_id, amount_cents, batch_id, committed_at FROM g_rollup;

    -- Transfer ids in the order the grabs were decided, as statements list them.
    INSERT INTO transfers (kind, debit_account, credit_account, amount_cents, packet_id)
        SELECT 4, escrow, wallet, amount_cents, packet_id FROM g_rollup ORDER BY batch_id, ord;

    -- The deltas as arrays, joined by unnest: the planner then looks each
    -- row up by its key. Joined to the temp table (which has no statistics)
    -- it may scan all of accounts instead (seen: 12 ms for 68 wallets).
    SELECT array_agg(id), array_agg(delta) INTO acc_ids, acc_deltas FROM (
        SELECT wallet AS id, sum(amount_cents) AS delta FROM g_rollup GROUP BY wallet
        UNION ALL
        SELECT escrow, -sum(amount_cents) FROM g_rollup GROUP BY escrow) s;
    UPDATE accounts a SET balance_cents = a.balance_cents + d.delta
        FROM unnest(acc_ids, acc_deltas) AS d(id, delta)
        WHERE a.account_id = d.id;

    SELECT array_agg(s.packet_id), array_agg(s.claims_n), array_agg(s.claims_cents)
        INTO pkt_ids, pkt_counts, pkt_cents FROM (
        SELECT g.packet_id, count(*)::int AS claims_n, sum(g.amount_cents)::bigint AS claims_cents
        FROM g_rollup g GROUP BY g.packet_id) s;
    UPDATE packets p SET claimed_count = p.claimed_count + d.claims_n,
                         claimed_cents = p.claimed_cents + d.claims_cents,
                         status = CASE WHEN p.claimed_count + d.claims_n = p.share_count AND p.status = 0
                                       THEN 1 ELSE p.status END
        FROM unnest(pkt_ids, pkt_counts, pkt_cents) AS d(packet_id, claims_n, claims_cents)
        WHERE p.packet_id = d.packet_id;

    DELETE FROM grab_rollups WHERE batch_id = ANY(ids);
    RETURN n;
END $$;

-- ------------------------------------------------------------ refunds
-- As in v2, and it refuses to run while any claim of the packet waits for
-- its roll-up: the remainder is computed from the rolled-up counters, so
-- the caller rolls the packet's batches up first (anbao_rollup with
-- p_packets), in its own transaction.
CREATE OR REPLACE FUNCTION anbao_refund_packets(p_packets BIGINT[])
RETURNS TABLE (packet_id BIGINT, refunded_cents BIGINT, refunded_now BOOLEAN)
LANGUAGE plpgsql AS $$
DECLARE
    pid BIGINT;
    p RECORD;
    wallet BIGINT;
    remainder BIGINT;
BEGIN
    PERFORM 1 FROM accounts
        WHERE account_id IN (SELECT pk.escrow_account_id FROM packets pk WHERE pk.packet_id = ANY(p_packets)
                             UNION
                             SELECT a.account_id FROM packets pk
                             JOIN accounts a ON a.kind = 1 AND a.owner_id = pk.sender_id
                             WHERE pk.packet_id = ANY(p_packets))
        ORDER BY account_id FOR UPDATE;

    FOR pid IN SELECT DISTINCT u FROM unnest(p_packets) AS u ORDER BY u LOOP
        SELECT pk.* INTO p FROM packets pk WHERE pk.packet_id = pid FOR UPDATE;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'anbao_refund_packets: unknown packet %', pid;
        END IF;
        IF EXISTS (SELECT 1 FROM grab_rollups r WHERE pid = ANY(r.packet_ids)) THEN
            RAISE EXCEPTION 'anbao_refund_packets: packet % has claims waiting for their roll-up', pid;
        END IF;
        packet_id := pid;
        refunded_now := false;
        IF p.status = 3 THEN
            refunded_cents := p.refunded_cents;
        ELSIF p.status = 1 THEN
            refunded_cents := 0;
        ELSE
            remainder := p.total_cents - p.claimed_cents - p.refunded_cents;
            IF p.claimed_count >= p.share_count
               OR remainder < p.min_share_cents * (p.share_count - p.claimed_count) THEN
                RAISE EXCEPTION 'anbao_refund_packets: packet % holds % for % unclaimed shares',
                    pid, remainder, p.share_count - p.claimed_count;
            END IF;
            SELECT a.account_id INTO wallet FROM accounts a WHERE a.kind = 1 AND a.owner_id = p.sender_id;
            INSERT INTO transfers (kind, debit_account, credit_account, amount_cents, packet_id)
                VALUES (5, p.escrow_account_id, wallet, remainder, pid);
            UPDATE accounts SET balance_cents = balance_cents - remainder WHERE account_id = p.escrow_account_id;
            UPDATE accounts SET balance_cents = balance_cents + remainder WHERE account_id = wallet;
            UPDATE packets pk SET status = 3, refunded_cents = pk.refunded_cents + remainder
                WHERE pk.packet_id = pid;
            refunded_cents := remainder;
            refunded_now := true;
        END IF;
        RETURN NEXT;
    END LOOP;
END $$;
