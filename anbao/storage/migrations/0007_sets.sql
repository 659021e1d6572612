-- anbao schema v7: sets. Money that crosses sets goes through PostgreSQL's
-- own logical replication (docs/DEPLOYMENT.md, ARCHITECTURE.md#sets).
--
-- A set is one PostgreSQL database plus its workers. Every user has a home
-- set (client/anbao_client/routing.py home_set): the wallet lives there.
-- A packet lives in its sender's home set. When a grab in set A is by a
-- user homed in set B:
--   1. the grab is decided and committed in A as always (one grab_rollups
--      row per batch: durable before the OK, the hot path unchanged);
--   2. A's roll-up (anbao_rollup, exactly once) pays the share from the
--      escrow to A's clearing account "owed to set B" (transfer kind 6)
--      and inserts a credits_out row, in the same transaction;
--   3. A's publication anbao_to_set_B carries credits_out rows
--      WHERE (dest_set = B) to B's subscription anbao_from_set_A;
--   4. on B's copy an ENABLE ALWAYS trigger credits the wallet (kind 7,
--      from B's clearing account "from set A") inside the apply
--      transaction, whose replication progress commits with it: exactly
--      once through a crash of either side. It never fails: a user B does
--      not know is credited to B's suspense account, which the audit shows.
--
-- Nothing here runs on a deployment of one set: anbao_set_identity stays
-- empty, no account of kind 3 or 4 exists, and the roll-up's new branch is
-- taken only for a claim whose user has no wallet here.

-- ------------------------------------------------------------ accounts
-- 3 clearing: one per other set (owner_id = that set's id). Positive:
--   owed to it (credits sent, in flight or applied there); negative: what
--   it has sent here. Summed over all sets, the clearing accounts hold
--   exactly the credits still in flight.
-- 4 suspense: one (owner_id 0); credits for a user this set does not know.
ALTER TABLE accounts DROP CONSTRAINT accounts_kind_check;
ALTER TABLE accounts ADD CONSTRAINT accounts_kind_check CHECK (kind IN (0, 1, 2, 3, 4));
ALTER TABLE accounts DROP CONSTRAINT accounts_no_overdraft;
ALTER TABLE accounts ADD CONSTRAINT accounts_no_overdraft CHECK (kind IN (0, 3) OR balance_cents >= 0);

-- ------------------------------------------------------------ identity
-- Which set this database is; written by `anbao migrate/serve --topology`.
CREATE TABLE anbao_set_identity (
    one_row BOOLEAN PRIMARY KEY DEFAULT true CHECK (one_row),
    set_id  SMALLINT NOT NULL CHECK (set_id >= 0)
);

-- ------------------------------------------------------------ user directory
-- Every user a set knows: its own (home_set = this set, added by REGISTER
-- through the trigger below) and, replicated from every other set's
-- publication, theirs. A grab by a user homed elsewhere is accepted only
-- when that user is in the directory, so an acknowledged grab always has
-- a wallet waiting at its destination (and a stale or misrouted id lands
-- in suspense there, never in an error). The key includes home_set so
-- that replicating a row can never conflict with a local one.
CREATE TABLE user_directory (
    user_id  BIGINT   NOT NULL,
    home_set SMALLINT NOT NULL,
    PRIMARY KEY (user_id, home_set)
);

CREATE FUNCTION anbao_directory_add() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, public AS $$
DECLARE
    me SMALLINT := (SELECT set_id FROM public.anbao_set_identity);
BEGIN
    IF me IS NOT NULL AND NEW.kind = 1 THEN
        INSERT INTO public.user_directory (user_id, home_set) VALUES (NEW.owner_id, me) ON CONFLICT DO NOTHING;
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER accounts_directory AFTER INSERT ON accounts
    FOR EACH ROW WHEN (NEW.kind = 1) EXECUTE FUNCTION anbao_directory_add();

-- ------------------------------------------------------------ credits
-- Outbound credits (src_set = this set), and at the destination the
-- replicated copies (dest_set = this set), with the transfer that credited
-- them. Never updated or deleted: the publication carries inserts only.
CREATE SEQUENCE credit_seq;
CREATE TABLE credits_out (
    src_set      SMALLINT NOT NULL,
    credit_id    BIGINT   NOT NULL,
    dest_set     SMALLINT NOT NULL,
    user_id      BIGINT   NOT NULL,
    amount_cents BIGINT   NOT NULL CHECK (amount_cents > 0),
    packet_id    BIGINT   NOT NULL,
    seq          INTEGER  NOT NULL,
    batch_id     BIGINT   NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    applied_transfer_id BIGINT,  -- at the destination: the kind-7 transfer that credited it
    applied_at   TIMESTAMPTZ,
    PRIMARY KEY (src_set, credit_id),
    CHECK (src_set <> dest_set)
);
CREATE INDEX credits_out_by_dest ON credits_out (dest_set, src_set);

-- The apply: runs at the destination inside the subscription's apply
-- transaction (search_path empty there: every name is qualified, and the
-- function sets its own). It must never fail, or the subscription would
-- stop and retry forever: an unknown user is credited to suspense. It
-- takes the roll-up's advisory lock, so it never deadlocks with a roll-up
-- on the same wallets.
CREATE FUNCTION anbao_apply_credit() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, public AS $$
DECLARE
    me SMALLINT := (SELECT set_id FROM public.anbao_set_identity);
    wallet BIGINT;
    clearing BIGINT;
BEGIN
    IF me IS NULL OR NEW.dest_set <> me OR NEW.src_set = me OR NEW.applied_transfer_id IS NOT NULL THEN
        RETURN NEW;  -- an outbound credit written here by the roll-up
    END IF;
    PERFORM pg_advisory_xact_lock(7020657039738302316);   -- anbao_rollup's key
    SELECT a.account_id INTO wallet FROM public.accounts a WHERE a.kind = 1 AND a.owner_id = NEW.user_id;
    IF wallet IS NULL THEN
        INSERT INTO public.accounts (kind, owner_id) VALUES (4, 0) ON CONFLICT DO NOTHING;
        SELECT a.account_id INTO wallet FROM public.accounts a WHERE a.kind = 4 AND a.owner_id = 0;
    END IF;
    INSERT INTO public.accounts (kind, owner_id) VALUES (3, NEW.src_set) ON CONFLICT DO NOTHING;
    SELECT a.account_id INTO clearing FROM public.accounts a WHERE a.kind = 3 AND a.owner_id = NEW.src_set;
    INSERT INTO public.transfers (kind, debit_account, credit_account, amount_cents, packet_id)
        VALUES (7, clearing, wallet, NEW.amount_cents, NEW.packet_id)
        RETURNING transfer_id INTO NEW.applied_transfer_id;
    UPDATE public.accounts SET balance_cents = balance_cents - NEW.amount_cents WHERE account_id = clearing;
    UPDATE public.accounts SET balance_cents = balance_cents + NEW.amount_cents WHERE account_id = wallet;
    NEW.applied_at := now();
    RETURN NEW;
END $$;
CREATE TRIGGER credits_out_apply BEFORE INSERT ON credits_out
    FOR EACH ROW EXECUTE FUNCTION anbao_apply_credit();
-- Fires in the apply worker too (session_replication_role = replica).
ALTER TABLE credits_out ENABLE ALWAYS TRIGGER credits_out_apply;
-- The directory's copy of another set's users must not re-run the local
-- trigger (it only fires on accounts); nothing to enable there.

-- ------------------------------------------------------------ roll-up
-- As in v3, plus: a claim whose user has no wallet here but is in the
-- directory as homed in another set is paid to the clearing account of
-- that set (transfer kind 6) and becomes a credits_out row, in the same
-- transaction that rolls the batch up. With no such claim (one set), the
-- function does exactly what v3's did.
CREATE OR REPLACE FUNCTION anbao_rollup(p_limit INTEGER, p_user BIGINT, p_packets BIGINT[], p_worker SMALLINT,
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
    me SMALLINT;
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

    IF to_regclass('pg_temp.g_rollup7') IS NULL THEN
        CREATE TEMP TABLE g_rollup7 (
            batch_id BIGINT, ord BIGINT, packet_id BIGINT, seq INTEGER, user_id BIGINT, amount_cents BIGINT,
            escrow BIGINT, wallet BIGINT, committed_at TIMESTAMPTZ, dest_set SMALLINT) ON COMMIT DELETE ROWS;
    END IF;
    INSERT INTO g_rollup7
        SELECT r.batch_id, g.ord, g.packet_id, g.seq, g.user_id, g.amount_cents, p.escrow_account_id, a.account_id,
               r.committed_at, NULL
        FROM grab_rollups r
        CROSS JOIN LATERAL unnest(r.packets, r.seqs, r.users, r.amounts)
            WITH ORDINALITY AS g(packet_id, seq, user_id, amount_cents, ord)
        LEFT JOIN packets p ON p.packet_id = g.packet_id
        LEFT JOIN accounts a ON a.kind = 1 AND a.owner_id = g.user_id
        WHERE r.batch_id = ANY(ids);
    GET DIAGNOSTICS n = ROW_COUNT;
    IF EXISTS (SELECT 1 FROM g_rollup7 WHERE wallet IS NULL) THEN
        -- Grabbers homed in another set: their share goes to that set.
        me := (SELECT set_id FROM anbao_set_identity);
        UPDATE g_rollup7 g SET dest_set = d.home_set, wallet = c.account_id
            FROM user_directory d, accounts c
            WHERE g.wallet IS NULL AND d.user_id = g.user_id AND d.home_set <> me
              AND c.kind = 3 AND c.owner_id = d.home_set;
    END IF;
    IF EXISTS (SELECT 1 FROM g_rollup7 WHERE escrow IS NULL OR wallet IS NULL) THEN
        RAISE EXCEPTION 'anbao_rollup: a pending claim names an unknown packet or user (batches %)', ids;
    END IF;

    INSERT INTO claims (packet_id, seq, user_id, amount_cents, batch_id, created_at)
        SELECT packet_id, seq, user_id, amount_cents, batch_id, committed_at FROM g_rollup7;

    INSERT INTO transfers (kind, debit_account, credit_account, amount_cents, packet_id)
        SELECT CASE WHEN dest_set IS NULL THEN 4 ELSE 6 END, escrow, wallet, amount_cents, packet_id
        FROM g_rollup7 ORDER BY batch_id, ord;

    IF me IS NOT NULL THEN
        INSERT INTO credits_out (src_set, credit_id, dest_set, user_id, amount_cents, packet_id, seq, batch_id)
            SELECT me, nextval('credit_seq'), dest_set, user_id, amount_cents, packet_id, seq, batch_id
            FROM g_rollup7 WHERE dest_set IS NOT NULL ORDER BY batch_id, ord;
    END IF;

    SELECT array_agg(id), array_agg(delta) INTO acc_ids, acc_deltas FROM (
        SELECT wallet AS id, sum(amount_cents) AS delta FROM g_rollup7 GROUP BY wallet
        UNION ALL
        SELECT escrow, -sum(amount_cents) FROM g_rollup7 GROUP BY escrow) s;
    UPDATE accounts a SET balance_cents = a.balance_cents + d.delta
        FROM unnest(acc_ids, acc_deltas) AS d(id, delta)
        WHERE a.account_id = d.id;

    SELECT array_agg(s.packet_id), array_agg(s.claims_n), array_agg(s.claims_cents)
        INTO pkt_ids, pkt_counts, pkt_cents FROM (
        SELECT g.packet_id, count(*)::int AS claims_n, sum(g.amount_cents)::bigint AS claims_cents
        FROM g_rollup7 g GROUP BY g.packet_id) s;
    UPDATE packets p SET claimed_count = p.claimed_count + d.claims_n,
                         claimed_cents = p.claimed_cents + d.claims_cents,
                         status = CASE WHEN p.claimed_count + d.claims_n = p.share_count AND p.status = 0
                                       THEN 1 ELSE p.status END
        FROM unnest(pkt_ids, pkt_counts, pkt_cents) AS d(packet_id, claims_n, claims_cents)
        WHERE p.packet_id = d.packet_id;

    DELETE FROM grab_rollups WHERE batch_id = ANY(ids);
    RETURN n;
END $$;

-- ------------------------------------------------------------ configuration
-- Called by `anbao migrate/serve --topology`: this database is set p_me;
-- p_peers are the other sets. Creates the clearing accounts and puts every
-- local user in the directory (users registered before the topology).
-- Publications and subscriptions are made by storage/sets.py (they name
-- connection strings, which SQL functions should not hold).
CREATE FUNCTION anbao_configure_set(p_me SMALLINT, p_peers SMALLINT[]) RETURNS VOID
LANGUAGE plpgsql AS $$
DECLARE
    was SMALLINT := (SELECT set_id FROM anbao_set_identity);
BEGIN
    IF was IS NOT NULL AND was <> p_me THEN
        RAISE EXCEPTION 'anbao: this database is set %, not set %', was, p_me;
    END IF;
    INSERT INTO anbao_set_identity (set_id) VALUES (p_me) ON CONFLICT DO NOTHING;
    INSERT INTO accounts (kind, owner_id) SELECT 3, s FROM unnest(p_peers) AS s WHERE s <> p_me
        ON CONFLICT DO NOTHING;
    INSERT INTO user_directory (user_id, home_set) SELECT owner_id, p_me FROM accounts WHERE kind = 1
        ON CONFLICT DO NOTHING;
END $$;
