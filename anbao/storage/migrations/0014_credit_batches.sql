-- anbao schema v14: cross-set credits in batches, written by the grab's own
-- commit (issue 20).
--
-- Before v14 a credit was a credits_out row written by the roll-up, behind
-- its deferral, and applied at the destination one row and one trigger
-- call at a time (one subscription: ~10k credits/s; lag p99 > 1 s beside a
-- storm). Now:
--   1. the grab batch's commit (storage/commit.py, one statement) also
--      writes one credit_batches row per destination set, the batch's
--      shares won by that set's users as arrays, with their credit ids
--      (credit_seq) and what RECEIVED_LIST shows (sender, claim time);
--   2. the publication for B carries credit_batches WHERE dest_set = B;
--   3. at B one trigger call per row applies it set-wise, in one statement:
--      a CROSS_IN transfer and its event per credit, the credit's copy in
--      credits_out (what BALANCE, RECEIVED_LIST and the audit read, as
--      before), and each wallet updated once with its sum (a wallet twice in
--      a batch is aggregated first: UPDATE ... FROM would apply one row);
--   4. the roll-up at A still pays escrow -> clearing (CROSS_OUT) and writes
--      the sender's credits_out rows, with the ids the batch already sent
--      and in_batch = true, which the publication no longer carries.
-- Exactly once as before: the row and the replication progress commit in
-- the apply's transaction, and a row already present (a resync backfill,
-- then the stream) is skipped after the lock every inserter takes.
-- A batch committed by a worker still running the old statement (during an
-- upgrade) has no credit_batches row: its roll-up writes credits_out rows
-- with in_batch = false, published and applied one by one as before.

ALTER TABLE credits_out ADD COLUMN in_batch BOOLEAN NOT NULL DEFAULT false;

CREATE TABLE credit_batches (
    src_set    SMALLINT NOT NULL,
    batch_id   BIGINT   NOT NULL,                   -- the grab batch (grab_rollups.batch_id at src_set)
    dest_set   SMALLINT NOT NULL,
    claimed_at TIMESTAMPTZ NOT NULL,                -- the grab batch's commit
    credit_ids BIGINT[]  NOT NULL,
    users      BIGINT[]  NOT NULL,
    amounts    BIGINT[]  NOT NULL,
    packets    BIGINT[]  NOT NULL,
    seqs       INTEGER[] NOT NULL,
    senders    BIGINT[]  NOT NULL,                  -- each packet's sender, for RECEIVED_LIST
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    applied_at TIMESTAMPTZ,                         -- at the destination: clock_timestamp() of the apply
    PRIMARY KEY (src_set, batch_id, dest_set),
    CHECK (src_set <> dest_set),
    CHECK (cardinality(credit_ids) > 0 AND cardinality(users) = cardinality(credit_ids)
           AND cardinality(amounts) = cardinality(credit_ids) AND cardinality(packets) = cardinality(credit_ids)
           AND cardinality(seqs) = cardinality(credit_ids) AND cardinality(senders) = cardinality(credit_ids)),
    -- A NULL element passes `0 < ALL(...)` (the check is then NULL, not
    -- false) and would fail the apply, which stops the subscription and
    -- everything behind it: refused here, at the sender.
    CHECK (array_position(credit_ids, NULL) IS NULL AND array_position(users, NULL) IS NULL
           AND array_position(amounts, NULL) IS NULL AND array_position(packets, NULL) IS NULL
           AND array_position(seqs, NULL) IS NULL AND array_position(senders, NULL) IS NULL),
    CHECK (0 < ALL(amounts))
);
-- As grab_rollups: compressing the arrays costs the commit more CPU than it saves.
ALTER TABLE credit_batches ALTER COLUMN credit_ids SET STORAGE EXTERNAL, ALTER COLUMN users SET STORAGE EXTERNAL,
    ALTER COLUMN amounts SET STORAGE EXTERNAL, ALTER COLUMN packets SET STORAGE EXTERNAL,
    ALTER COLUMN seqs SET STORAGE EXTERNAL, ALTER COLUMN senders SET STORAGE EXTERNAL;

-- ------------------------------------------------------------ the apply
-- Runs in the subscription's apply worker (search_path empty: every name
-- qualified, nextval's too) and in a resync's backfill. It must never
-- fail: an unknown user is credited to suspense. It takes the roll-up's
-- lock, as the per-row apply does, so it never deadlocks with a roll-up on
-- the same wallets, and so "already present" cannot change under it.
CREATE FUNCTION anbao_apply_credit_batch() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, public AS $$
DECLARE
    me SMALLINT := (SELECT i.set_id FROM public.anbao_set_identity i);
    clearing BIGINT;
    suspense BIGINT;
BEGIN
    IF me IS NULL OR NEW.dest_set <> me OR NEW.src_set = me THEN
        RETURN NEW;  -- written here by a grab commit: an outbound batch
    END IF;
    PERFORM pg_catalog.pg_advisory_xact_lock(7020657039738302316);   -- anbao_rollup's key
    IF EXISTS (SELECT 1 FROM public.credit_batches c
               WHERE c.src_set = NEW.src_set AND c.batch_id = NEW.batch_id AND c.dest_set = NEW.dest_set) THEN
        RETURN NULL;  -- applied already (by a backfill, or by the stream): never twice
    END IF;
    SELECT a.account_id INTO clearing FROM public.accounts a WHERE a.kind = 3 AND a.owner_id = NEW.src_set;
    IF clearing IS NULL THEN
        INSERT INTO public.accounts (kind, owner_id) VALUES (3, NEW.src_set) ON CONFLICT DO NOTHING;
        SELECT a.account_id INTO clearing FROM public.accounts a WHERE a.kind = 3 AND a.owner_id = NEW.src_set;
    END IF;
    SELECT a.account_id INTO suspense FROM public.accounts a WHERE a.kind = 4 AND a.owner_id = 0;
    IF suspense IS NULL THEN
        INSERT INTO public.accounts (kind, owner_id) VALUES (4, 0) ON CONFLICT DO NOTHING;
        SELECT a.account_id INTO suspense FROM public.accounts a WHERE a.kind = 4 AND a.owner_id = 0;
    END IF;
    NEW.applied_at := pg_catalog.clock_timestamp();
    -- One statement: the transfers get ids in the batch's order, so the
    -- events and the copies name them.
    WITH c AS MATERIALIZED (
        SELECT s.*, pg_catalog.nextval('public.transfers_transfer_id_seq'::pg_catalog.regclass) AS transfer_id
        FROM (SELECT k.ord, k.credit_id, k.user_id, k.amount_cents, k.packet_id, k.seq, k.sender_id,
                     COALESCE(a.account_id, suspense) AS wallet, COALESCE(a.owner_id, 0) AS owner
              FROM unnest(NEW.credit_ids, NEW.users, NEW.amounts, NEW.packets, NEW.seqs, NEW.senders)
                   WITH ORDINALITY AS k(credit_id, user_id, amount_cents, packet_id, seq, sender_id, ord)
              LEFT JOIN public.accounts a ON a.kind = 1 AND a.owner_id = k.user_id
              ORDER BY k.ord) s
    ), t AS (
        INSERT INTO public.transfers (transfer_id, kind, debit_account, credit_account, amount_cents, packet_id)
        SELECT c.transfer_id, 7, clearing, c.wallet, c.amount_cents, c.packet_id FROM c ORDER BY c.ord
    ), e AS (
        INSERT INTO public.event_log (kind, transfer_id, at, packet_id, user_id, amount_cents)
        SELECT 7, c.transfer_id, now(), c.packet_id, c.owner, c.amount_cents FROM c ORDER BY c.ord
    ), o AS (
        INSERT INTO public.credits_out (src_set, credit_id, dest_set, user_id, amount_cents, packet_id, seq, batch_id,
                                        created_at, applied_transfer_id, applied_at, sender_id, claimed_at, in_batch)
        SELECT NEW.src_set, c.credit_id, NEW.dest_set, c.user_id, c.amount_cents, c.packet_id, c.seq, NEW.batch_id,
               NEW.created_at, c.transfer_id, NEW.applied_at, c.sender_id, NEW.claimed_at, true
        FROM c ORDER BY c.ord
    ), d AS (
        SELECT c.wallet AS id, sum(c.amount_cents)::bigint AS delta FROM c GROUP BY c.wallet
        UNION ALL
        SELECT clearing, -sum(c.amount_cents)::bigint FROM c
    )
    UPDATE public.accounts a SET balance_cents = a.balance_cents + d.delta FROM d WHERE a.account_id = d.id;
    RETURN NEW;
END $$;
CREATE TRIGGER credit_batches_apply BEFORE INSERT ON credit_batches
    FOR EACH ROW EXECUTE FUNCTION anbao_apply_credit_batch();
ALTER TABLE credit_batches ENABLE ALWAYS TRIGGER credit_batches_apply;

-- ------------------------------------------------------------ credits_out
-- No trigger call per credit for a copy written by the batch apply (applied
-- already) nor for the sender's own in_batch row written by the roll-up
-- (never published: the publications' filter changes below, in this same
-- transaction, before any such row exists).
DROP TRIGGER credits_out_apply ON credits_out;
CREATE TRIGGER credits_out_apply BEFORE INSERT ON credits_out
    FOR EACH ROW WHEN (NEW.applied_transfer_id IS NULL AND NOT NEW.in_batch) EXECUTE FUNCTION anbao_apply_credit();
ALTER TABLE credits_out ENABLE ALWAYS TRIGGER credits_out_apply;
DROP TRIGGER credits_out_describe ON credits_out;
CREATE TRIGGER credits_out_describe BEFORE INSERT ON credits_out
    FOR EACH ROW WHEN (NOT NEW.in_batch) EXECUTE FUNCTION anbao_credit_describe();

-- As in 0010, plus: the CROSS_SET_CREDIT event is written here (the transfers trigger no longer fires for kind 7:
-- the batch apply writes its events set-wise). Here, not only in storage/functions: the apply worker must never
-- see the trigger change without this function's, or a credit would go without its event.
CREATE OR REPLACE FUNCTION anbao_apply_credit() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, public AS $$
DECLARE
    me SMALLINT := (SELECT set_id FROM public.anbao_set_identity);
    wallet BIGINT;
    owner BIGINT := NEW.user_id;
    clearing BIGINT;
BEGIN
    IF me IS NULL OR NEW.dest_set <> me OR NEW.src_set = me OR NEW.applied_transfer_id IS NOT NULL THEN
        RETURN NEW;  -- an outbound credit written here by the roll-up
    END IF;
    PERFORM pg_advisory_xact_lock(7020657039738302316);   -- anbao_rollup's key
    IF EXISTS (SELECT 1 FROM public.credits_out c WHERE c.src_set = NEW.src_set AND c.credit_id = NEW.credit_id) THEN
        RETURN NULL;  -- applied already (by the backfill, or by the stream): never twice
    END IF;
    SELECT a.account_id INTO wallet FROM public.accounts a WHERE a.kind = 1 AND a.owner_id = NEW.user_id;
    IF wallet IS NULL THEN
        INSERT INTO public.accounts (kind, owner_id) VALUES (4, 0) ON CONFLICT DO NOTHING;
        SELECT a.account_id INTO wallet FROM public.accounts a WHERE a.kind = 4 AND a.owner_id = 0;
        owner := 0;
    END IF;
    SELECT a.account_id INTO clearing FROM public.accounts a WHERE a.kind = 3 AND a.owner_id = NEW.src_set;
    IF clearing IS NULL THEN
        INSERT INTO public.accounts (kind, owner_id) VALUES (3, NEW.src_set) ON CONFLICT DO NOTHING;
        SELECT a.account_id INTO clearing FROM public.accounts a WHERE a.kind = 3 AND a.owner_id = NEW.src_set;
    END IF;
    INSERT INTO public.transfers (kind, debit_account, credit_account, amount_cents, packet_id)
        VALUES (7, clearing, wallet, NEW.amount_cents, NEW.packet_id)
        RETURNING transfer_id INTO NEW.applied_transfer_id;
    INSERT INTO public.event_log (kind, transfer_id, at, packet_id, user_id, amount_cents)
        VALUES (7, NEW.applied_transfer_id, now(), NEW.packet_id, owner, NEW.amount_cents);
    UPDATE public.accounts
        SET balance_cents = balance_cents + CASE WHEN account_id = wallet THEN NEW.amount_cents ELSE -NEW.amount_cents END
        WHERE account_id IN (clearing, wallet);
    NEW.applied_at := now();
    RETURN NEW;
END $$;

DROP TRIGGER transfers_event ON transfers;
CREATE TRIGGER transfers_event AFTER INSERT ON transfers
    FOR EACH ROW WHEN (NEW.kind IN (1, 2, 3, 5)) EXECUTE FUNCTION anbao_transfer_event();
ALTER TABLE transfers ENABLE ALWAYS TRIGGER transfers_event;

-- ------------------------------------------------------------ roll-up
-- A claim sent in a credit batch (by its grab commit) goes to that batch's
-- destination, and its credits_out row takes the batch's credit id, sender
-- and claim time, with in_batch = true: anbao_rollup's current text is
-- storage/functions/anbao_rollup.sql, applied after the migrations. Only
-- this version's workers write credit batches, and each serves only after
-- migrate has applied it.

-- ------------------------------------------------------------ publications
-- Each publication for another set B (storage/sets.py publication_tables
-- says the same): the credit batches for B, the per-row credits still
-- written without one, and this set's users. A subscription made before
-- v14 receives credit_batches only after ALTER SUBSCRIPTION ... REFRESH
-- PUBLICATION at B (`anbao serve/migrate --topology` does it).
DO $$
DECLARE
    p RECORD;
    me SMALLINT := (SELECT set_id FROM anbao_set_identity);
BEGIN
    FOR p IN SELECT pubname, substring(pubname FROM '^anbao_to_set_([0-9]+)$')::int AS dest
             FROM pg_publication WHERE pubname ~ '^anbao_to_set_[0-9]+$' LOOP
        EXECUTE format('ALTER PUBLICATION %I SET TABLE public.credit_batches WHERE (dest_set = %s),'
                       ' public.credits_out WHERE (dest_set = %s AND NOT in_batch),'
                       ' public.user_directory WHERE (home_set = %s)', p.pubname, p.dest, p.dest, me);
    END LOOP;
END $$;
