-- ------------------------------------------------------------ roll-up
-- As in 0007, plus: a claim sent in a credit batch (by its grab commit)
-- goes to that batch's destination, and its credits_out row takes the
-- batch's credit id, sender and claim time, with in_batch = true.
--
-- Roll-ups run side by side (they used to run one at a time per
-- database, each waiting for the whole pass of any other). What a roll-up
-- takes, it locks, always in this order, so two never wait on each other
-- in a cycle: its batch rows (batch id order, FOR UPDATE: a batch another
-- roll-up holds is waited for, and then gone), the credit totals (by the
-- credits_out trigger), the accounts ((kind, owner) order: wallets by user,
-- then escrows, then clearing), the packets (packet id order). Every other
-- writer that waits on accounts locks them in that order too (a credit
-- apply updates its wallets by user, then clearing and suspense), and the
-- SEND batch does not wait (SKIP LOCKED). The advisory
-- key is now taken shared: a credit apply (anbao_apply_credit_batch) takes
-- it alone, so an apply and a roll-up still never run at once.
--
-- Plans: no hash or merge join, no seq scan of a table that has an index to
-- use (the function's SET clauses). PL/pgSQL keeps the plans it makes on a
-- connection's first passes, and a plan made while a table was small (a new
-- database's first seconds) scanned all of it on every pass after: the
-- packets' UPDATE was a hash join over a seq scan of packets, 1 ms a pass at
-- 5,000 packets and 8-14 ms at 30,000, 20 s into an evening (auto_explain);
-- the lookup of the claims' packets, planned on a few packets, hashed all
-- of them the same way. Every statement here reaches rows by key, so its
-- cost follows the pass, not the tables (tests/test_rollup.py reads the
-- plans made on a few packets).
CREATE OR REPLACE FUNCTION anbao_rollup(p_limit INTEGER, p_user BIGINT, p_packets BIGINT[], p_worker SMALLINT,
                                        p_worker_count SMALLINT)
RETURNS INTEGER
LANGUAGE plpgsql SET enable_hashjoin = off SET enable_mergejoin = off SET enable_seqscan = off AS $$
DECLARE
    ids BIGINT[];
    n INTEGER;
    acc_ids BIGINT[];
    acc_deltas BIGINT[];
    pkt_ids BIGINT[];
    pkt_counts INTEGER[];
    pkt_cents BIGINT[];
    me SMALLINT;
BEGIN
    PERFORM pg_advisory_xact_lock_shared(7020657039738302316);   -- the bytes 'anbaorol'
    SELECT array_agg(batch_id ORDER BY batch_id) INTO ids FROM (
        SELECT r.batch_id FROM grab_rollups r
        WHERE (p_user IS NULL OR p_user = ANY(r.users))
          AND (p_packets IS NULL OR r.packet_ids && p_packets)
          AND (p_worker IS NULL OR r.worker_id = p_worker OR (p_worker = 0 AND r.worker_id >= p_worker_count))
        ORDER BY r.batch_id LIMIT p_limit FOR UPDATE) s;
    IF ids IS NULL THEN
        RETURN 0;
    END IF;

    IF to_regclass('pg_temp.g_rollup14') IS NULL THEN
        CREATE TEMP TABLE g_rollup14 (
            batch_id BIGINT, ord BIGINT, packet_id BIGINT, seq INTEGER, user_id BIGINT, amount_cents BIGINT,
            escrow BIGINT, wallet BIGINT, committed_at TIMESTAMPTZ, dest_set SMALLINT, credit_id BIGINT,
            sender_id BIGINT) ON COMMIT DELETE ROWS;
    END IF;
    INSERT INTO g_rollup14
        SELECT r.batch_id, g.ord, g.packet_id, g.seq, g.user_id, g.amount_cents, p.escrow_account_id, a.account_id,
               r.committed_at, NULL, NULL, NULL
        FROM grab_rollups r
        CROSS JOIN LATERAL unnest(r.packets, r.seqs, r.users, r.amounts)
            WITH ORDINALITY AS g(packet_id, seq, user_id, amount_cents, ord)
        LEFT JOIN packets p ON p.packet_id = g.packet_id
        LEFT JOIN accounts a ON a.kind = 1 AND a.owner_id = g.user_id
        WHERE r.batch_id = ANY(ids);
    GET DIAGNOSTICS n = ROW_COUNT;
    me := (SELECT set_id FROM anbao_set_identity);
    IF me IS NOT NULL THEN
        -- Sent already, by the grab commit: the credit batch decides. Each
        -- claim (packet, seq) is in at most one credit batch.
        -- Materialized first: left in the join, the planner unnests every
        -- credit batch once per claim (a pass of 100,000 claims took 20 s).
        WITH k AS MATERIALIZED (
            SELECT cb.batch_id, cb.dest_set, x.credit_id, x.packet_id, x.seq, x.sender_id, c.account_id AS clearing
            FROM credit_batches cb
            CROSS JOIN LATERAL unnest(cb.credit_ids, cb.packets, cb.seqs, cb.senders)
                AS x(credit_id, packet_id, seq, sender_id)
            JOIN accounts c ON c.kind = 3 AND c.owner_id = cb.dest_set
            WHERE cb.src_set = me AND cb.batch_id = ANY(ids))
        UPDATE g_rollup14 g SET dest_set = k.dest_set, credit_id = k.credit_id, sender_id = k.sender_id,
                                wallet = k.clearing
            FROM k
            WHERE k.batch_id = g.batch_id AND k.packet_id = g.packet_id AND k.seq = g.seq;
    END IF;
    IF EXISTS (SELECT 1 FROM g_rollup14 WHERE wallet IS NULL) THEN
        -- Grabbers homed in another set, committed without a credit batch
        -- (by a worker older than v14): their share goes to that set.
        UPDATE g_rollup14 g SET dest_set = d.home_set, wallet = c.account_id
            FROM user_directory d, accounts c
            WHERE g.wallet IS NULL AND d.user_id = g.user_id AND d.home_set <> me
              AND c.kind = 3 AND c.owner_id = d.home_set;
    END IF;
    IF EXISTS (SELECT 1 FROM g_rollup14 WHERE escrow IS NULL OR wallet IS NULL) THEN
        RAISE EXCEPTION 'anbao_rollup: a pending claim names an unknown packet or user (batches %)', ids;
    END IF;

    INSERT INTO claims (packet_id, seq, user_id, amount_cents, batch_id, created_at)
        SELECT packet_id, seq, user_id, amount_cents, batch_id, committed_at FROM g_rollup14;

    INSERT INTO transfers (kind, debit_account, credit_account, amount_cents, packet_id)
        SELECT CASE WHEN dest_set IS NULL THEN 4 ELSE 6 END, escrow, wallet, amount_cents, packet_id
        FROM g_rollup14 ORDER BY batch_id, ord;

    IF me IS NOT NULL THEN
        INSERT INTO credits_out (src_set, credit_id, dest_set, user_id, amount_cents, packet_id, seq, batch_id,
                                 in_batch, sender_id, claimed_at)
            SELECT me, COALESCE(credit_id, nextval('credit_seq')), dest_set, user_id, amount_cents, packet_id, seq,
                   batch_id, credit_id IS NOT NULL, sender_id, CASE WHEN credit_id IS NOT NULL THEN committed_at END
            FROM g_rollup14 WHERE dest_set IS NOT NULL ORDER BY batch_id, ord;
    END IF;

    -- The accounts in (kind, owner) order, known without reading them: a
    -- grabber's wallet (1, user), an escrow (2, packet), a clearing
    -- account (3, set). The UPDATE locks each as it reaches it, so it is
    -- made to reach them in that order: a nested loop driven by the sorted
    -- list (no hash or merge join, see the plans below: either would take
    -- them in another order; the plans are read in tests/test_rollup.py).
    -- A lock of them all first, in that order, then the UPDATE, wrote each
    -- row twice: 3.9 ms a pass of the evening (pg_stat_statements).
    SELECT array_agg(s.id ORDER BY s.kind, s.owner), array_agg(s.delta ORDER BY s.kind, s.owner)
        INTO acc_ids, acc_deltas FROM (
        SELECT g.wallet AS id, CASE WHEN g.dest_set IS NULL THEN 1 ELSE 3 END AS kind,
               CASE WHEN g.dest_set IS NULL THEN g.user_id ELSE g.dest_set END AS owner,
               sum(g.amount_cents) AS delta
        FROM g_rollup14 g GROUP BY 1, 2, 3
        UNION ALL
        SELECT g.escrow, 2, g.packet_id, -sum(g.amount_cents) FROM g_rollup14 g GROUP BY g.escrow, g.packet_id) s;
    -- The packets in packet id order, each with its claims of this pass.
    SELECT array_agg(s.packet_id ORDER BY s.packet_id), array_agg(s.claims_n ORDER BY s.packet_id),
           array_agg(s.claims_cents ORDER BY s.packet_id)
        INTO pkt_ids, pkt_counts, pkt_cents FROM (
        SELECT g.packet_id, count(*)::int AS claims_n, sum(g.amount_cents)::bigint AS claims_cents
        FROM g_rollup14 g GROUP BY g.packet_id) s;
    UPDATE accounts a SET balance_cents = a.balance_cents + d.delta
        FROM unnest(acc_ids, acc_deltas) AS d(id, delta)
        WHERE a.account_id = d.id;
    -- Locked by this UPDATE, in packet id order, as the accounts above.
    UPDATE packets p SET claimed_count = p.claimed_count + d.claims_n,
                         claimed_cents = p.claimed_cents + d.claims_cents,
                         status = CASE WHEN p.claimed_count + d.claims_n = p.share_count AND p.status = 0
                                       THEN 1 ELSE p.status END
        FROM unnest(pkt_ids, pkt_counts, pkt_cents) AS d(packet_id, claims_n, claims_cents)
        WHERE p.packet_id = d.packet_id;

    DELETE FROM grab_rollups WHERE batch_id = ANY(ids);
    RETURN n;
END $$;
