CREATE OR REPLACE FUNCTION anbao_directory_add() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, public AS $$
DECLARE
    me SMALLINT := (SELECT set_id FROM public.anbao_set_identity);
BEGIN
    IF me IS NOT NULL AND NEW.kind = 1 THEN
        INSERT INTO public.user_directory (user_id, home_set) VALUES (NEW.owner_id, me) ON CONFLICT DO NOTHING;
    END IF;
    RETURN NULL;
END $$;
