-- ------------------------------------------------------------ directory
-- Another set's users arrive in the same publication; a backfilled entry
-- may arrive by the stream too. Own users (home_set = me, written by the
-- accounts trigger and anbao_configure_set) pass untouched.
CREATE OR REPLACE FUNCTION anbao_apply_directory() RETURNS trigger
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
