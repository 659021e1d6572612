-- As in 0010, plus: the CROSS_SET_CREDIT event is written here (the transfers trigger no longer fires for kind 7:
-- the batch apply writes its events set-wise); since 0016 it adds the credit to credit_totals.
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
    INSERT INTO public.credit_totals AS t (src_set, dest_set, credits, cents, max_apply_lag)
        VALUES (NEW.src_set, NEW.dest_set, 1, NEW.amount_cents, NEW.applied_at - NEW.created_at)
        ON CONFLICT (src_set, dest_set)
        DO UPDATE SET credits = t.credits + 1, cents = t.cents + EXCLUDED.cents,
                      max_apply_lag = GREATEST(t.max_apply_lag, EXCLUDED.max_apply_lag);
    RETURN NEW;
END $$;
