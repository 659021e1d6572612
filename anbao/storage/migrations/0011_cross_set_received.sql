-- RECEIVED_LIST across sets (issue 11): at a user's home set it lists the
-- shares they won in other sets' packets too, once each credit arrived.
-- The home set has neither the packet nor the claim, so the credit carries
-- what the list shows: the packet's sender and when the share was claimed
-- (the batch's commit, the moment the grab was acknowledged).
--
-- Filled at the sender, in the roll-up's own INSERT, by a BEFORE trigger:
-- the roll-up function stays as migration 0007 wrote it. The trigger is an
-- ordinary one, so it fires for the roll-up's inserts and not in the
-- apply worker (session_replication_role = replica), and it leaves every
-- row not sent from here alone. Credits sent before this migration have
-- neither column: the list shows sender 0 and the roll-up's time for them.
--
-- Publications carry every column of credits_out, so a set migrated
-- before the sets it sends to makes their apply fail ("missing replicated
-- columns") until they are migrated too; the subscription retries every
-- 5 s and then goes on where it stopped, losing and doubling nothing
-- (docs/DEPLOYMENT.md, "Upgrading").
ALTER TABLE credits_out ADD COLUMN sender_id BIGINT, ADD COLUMN claimed_at TIMESTAMPTZ;

CREATE FUNCTION anbao_credit_describe() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, public AS $$
BEGIN
    IF NEW.src_set = (SELECT set_id FROM public.anbao_set_identity) THEN
        SELECT p.sender_id INTO NEW.sender_id FROM public.packets p WHERE p.packet_id = NEW.packet_id;
        SELECT r.committed_at INTO NEW.claimed_at FROM public.grab_rollups r WHERE r.batch_id = NEW.batch_id;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER credits_out_describe BEFORE INSERT ON credits_out
    FOR EACH ROW EXECUTE FUNCTION anbao_credit_describe();
