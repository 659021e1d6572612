CREATE OR REPLACE FUNCTION anbao_credit_describe() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, public AS $$
BEGIN
    IF NEW.src_set = (SELECT set_id FROM public.anbao_set_identity) THEN
        SELECT p.sender_id INTO NEW.sender_id FROM public.packets p WHERE p.packet_id = NEW.packet_id;
        SELECT r.committed_at INTO NEW.claimed_at FROM public.grab_rollups r WHERE r.batch_id = NEW.batch_id;
    END IF;
    RETURN NEW;
END $$;
