-- A cross-set credit delivered has its event (issue 12 on issue 11): the
-- apply transaction's credit of the wallet (a CROSS_IN transfer, kind 7,
-- written by credits_out_apply in migration 0007) writes a CROSS_SET_CREDIT
-- event (kind 7) in that same transaction, like every other money fact.
--
-- That transaction is the subscription's apply worker: its search_path is
-- empty and it runs with session_replication_role = replica, so the
-- function names its tables with their schema and sets its own
-- search_path, and the trigger is enabled ALWAYS. It must never fail (a
-- failing apply stops the subscription): it only reads by key and inserts.
CREATE OR REPLACE FUNCTION anbao_transfer_event() RETURNS trigger
LANGUAGE plpgsql SET search_path = public, pg_catalog AS $$
DECLARE
    owner BIGINT;
    shares INTEGER := 0;
    claimed INTEGER := 0;
BEGIN
    SELECT a.owner_id INTO owner FROM public.accounts a
        WHERE a.account_id = CASE WHEN NEW.kind IN (2, 3) THEN NEW.debit_account ELSE NEW.credit_account END;
    IF NEW.packet_id IS NOT NULL AND NEW.kind <> 7 THEN
        SELECT pk.share_count, pk.claimed_count INTO shares, claimed
            FROM public.packets pk WHERE pk.packet_id = NEW.packet_id;
    END IF;
    INSERT INTO public.event_log (kind, transfer_id, at, packet_id, user_id, seq, count, amount_cents)
        VALUES (CASE NEW.kind WHEN 1 THEN 5 WHEN 2 THEN 6 WHEN 3 THEN 1 WHEN 7 THEN 7 ELSE 4 END, NEW.transfer_id,
                NEW.created_at, COALESCE(NEW.packet_id, 0), COALESCE(owner, 0),
                CASE WHEN NEW.kind = 5 THEN COALESCE(claimed, 0) ELSE 0 END, COALESCE(shares, 0), NEW.amount_cents);
    RETURN NULL;
END $$;
