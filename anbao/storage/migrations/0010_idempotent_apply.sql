-- anbao schema v10: the apply of another set's rows is idempotent, so a
-- subscription can be re-created from a new slot and the rows it missed
-- sent again (`anbao sets resync`, storage/resync.py, docs/DEPLOYMENT.md).
--
-- When the slot of set A for set B is lost (max_slot_wal_keep_size), B's
-- subscription is re-created without copying data, on a new slot, and B
-- backfills from A what it lacks. A row committed at A after the new slot
-- was made may then arrive twice: once by the backfill, once by the
-- stream. Before v10 the second arrival was a primary-key violation in
-- the apply: the subscription stopped and retried the same transaction
-- forever. Now each apply skips a row already present (the trigger
-- returns NULL), after taking a lock that every inserter of such rows
-- takes too, so "present" cannot change between the check and the insert.
--
-- Why the check after the lock sees a concurrent insert: the apply (and
-- the backfill) run in READ COMMITTED, and a VOLATILE PL/pgSQL function
-- takes a fresh snapshot for each statement; the lock is released only
-- after the holder's commit is visible. So the statement after
-- pg_advisory_xact_lock sees every row whose inserter held the lock before
-- (tests/test_credit_apply.py shows it on two connections). Under
-- REPEATABLE READ that would not hold: keep the subscriber database's
-- default_transaction_isolation at read committed.

-- ------------------------------------------------------------ credits
-- As in 0007, plus the check after the lock; and cheaper per credit (below).
CREATE OR REPLACE FUNCTION anbao_apply_credit() RETURNS trigger
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
    IF EXISTS (SELECT 1 FROM public.credits_out c WHERE c.src_set = NEW.src_set AND c.credit_id = NEW.credit_id) THEN
        RETURN NULL;  -- applied already (by the backfill, or by the stream): never twice
    END IF;
    SELECT a.account_id INTO wallet FROM public.accounts a WHERE a.kind = 1 AND a.owner_id = NEW.user_id;
    IF wallet IS NULL THEN
        INSERT INTO public.accounts (kind, owner_id) VALUES (4, 0) ON CONFLICT DO NOTHING;
        SELECT a.account_id INTO wallet FROM public.accounts a WHERE a.kind = 4 AND a.owner_id = 0;
    END IF;
    -- The clearing account exists after the first credit from a set: look
    -- first (an INSERT ... ON CONFLICT per credit was an eighth of its cost,
    -- bench/apply.py --profile).
    SELECT a.account_id INTO clearing FROM public.accounts a WHERE a.kind = 3 AND a.owner_id = NEW.src_set;
    IF clearing IS NULL THEN
        INSERT INTO public.accounts (kind, owner_id) VALUES (3, NEW.src_set) ON CONFLICT DO NOTHING;
        SELECT a.account_id INTO clearing FROM public.accounts a WHERE a.kind = 3 AND a.owner_id = NEW.src_set;
    END IF;
    INSERT INTO public.transfers (kind, debit_account, credit_account, amount_cents, packet_id)
        VALUES (7, clearing, wallet, NEW.amount_cents, NEW.packet_id)
        RETURNING transfer_id INTO NEW.applied_transfer_id;
    -- Both balances in one statement. Every writer of a clearing account
    -- holds the advisory lock taken above, so locking the two rows in either
    -- order cannot deadlock.
    UPDATE public.accounts
        SET balance_cents = balance_cents + CASE WHEN account_id = wallet THEN NEW.amount_cents ELSE -NEW.amount_cents END
        WHERE account_id IN (clearing, wallet);
    NEW.applied_at := now();
    RETURN NEW;
END $$;

-- ------------------------------------------------------------ directory
-- Another set's users arrive in the same publication; a backfilled entry
-- may arrive by the stream too. Own users (home_set = me, written by the
-- accounts trigger and anbao_configure_set) pass untouched.
CREATE FUNCTION anbao_apply_directory() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, public AS $$
DECLARE
    me SMALLINT := (SELECT set_id FROM public.anbao_set_identity);
BEGIN
    IF me IS NULL OR NEW.home_set = me THEN
        RETURN NEW;
    END IF;
    PERFORM pg_advisory_xact_lock(7020657039737383282);   -- the bytes 'anbaodir'
    IF EXISTS (SELECT 1 FROM public.user_directory d WHERE d.user_id = NEW.user_id AND d.home_set = NEW.home_set) THEN
        RETURN NULL;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER user_directory_apply BEFORE INSERT ON user_directory
    FOR EACH ROW EXECUTE FUNCTION anbao_apply_directory();
ALTER TABLE user_directory ENABLE ALWAYS TRIGGER user_directory_apply;
