-- ------------------------------------------------------------ the apply
-- Runs in the subscription's apply worker (search_path empty: every name
-- qualified, nextval's too) and in a resync's backfill. It must never
-- fail: an unknown user is credited to suspense. It takes the roll-up's
-- lock, as the per-row apply does, so it never deadlocks with a roll-up on
-- the same wallets, and so "already present" cannot change under it.
CREATE OR REPLACE FUNCTION anbao_apply_credit_batch() RETURNS trigger
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
