-- anbao schema v16: the credits' totals that STATS reads, kept as they are
-- written (issue 20).
--
-- Before v16 every worker's set watch (server/sets.py SetWatch) counted and
-- summed the whole of credits_out once a second, every credit ever sent or
-- applied, and asked each other set to count its copies the same way. A
-- reading grew with the set's history: at a few million credits it
-- outgrew its 2 s bound, and STATS said the set was unreachable while the
-- workers spent their CPU scanning. Now credit_totals holds, per
-- (src_set, dest_set), what this database's credits_out holds for that
-- pair (how many, how many cents, and at the destination the longest time
-- from a credit's creation to its apply), kept in each writer's own
-- transaction:
--   - a statement trigger on credits_out adds every statement's rows (the
--     roll-up's outbound copies, the batch apply's copies, a backfill's);
--   - the per-row apply (anbao_apply_credit) adds the credit it applies,
--     since the apply worker fires no statement trigger for a replicated
--     row; the statement trigger leaves those rows out.
-- The audit holds credit_totals equal to credits_out.
--
-- The table is locked first: a writer waiting on it runs, once this
-- commits, with the trigger and with anbao_apply_credit's new text (here,
-- not only in storage/functions, for that reason), so no credit is written
-- between the backfill and what counts it.

LOCK TABLE credits_out IN SHARE ROW EXCLUSIVE MODE;

CREATE TABLE credit_totals (
    src_set       SMALLINT NOT NULL,
    dest_set      SMALLINT NOT NULL,
    credits       BIGINT   NOT NULL,
    cents         BIGINT   NOT NULL,
    max_apply_lag INTERVAL,               -- at the destination: the longest created_at -> applied_at
    PRIMARY KEY (src_set, dest_set)
);

INSERT INTO credit_totals (src_set, dest_set, credits, cents, max_apply_lag)
    SELECT src_set, dest_set, count(*), sum(amount_cents), max(applied_at - created_at)
    FROM credits_out GROUP BY src_set, dest_set;

-- ------------------------------------------------------------ credit totals
-- AFTER INSERT ON credits_out, once per statement (ENABLE ALWAYS: the batch
-- apply's copies are written in the apply worker): adds the statement's rows
-- to credit_totals, one upsert per (src_set, dest_set). A row the per-row
-- apply credited (anbao_apply_credit: not in a batch, applied by it) is
-- left out: that function counts it itself, since the apply worker fires
-- no statement trigger for a replicated row.
CREATE OR REPLACE FUNCTION anbao_count_credits() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, public AS $$
BEGIN
    INSERT INTO public.credit_totals AS t (src_set, dest_set, credits, cents, max_apply_lag)
        SELECT a.src_set, a.dest_set, count(*), sum(a.amount_cents), max(a.applied_at - a.created_at)
        FROM added a WHERE a.in_batch OR a.applied_transfer_id IS NULL
        GROUP BY a.src_set, a.dest_set
        ON CONFLICT (src_set, dest_set)
        DO UPDATE SET credits = t.credits + EXCLUDED.credits, cents = t.cents + EXCLUDED.cents,
                      max_apply_lag = GREATEST(t.max_apply_lag, EXCLUDED.max_apply_lag);
    RETURN NULL;
END $$;

CREATE TRIGGER credits_out_totals AFTER INSERT ON credits_out REFERENCING NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION anbao_count_credits();
ALTER TABLE credits_out ENABLE ALWAYS TRIGGER credits_out_totals;

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
