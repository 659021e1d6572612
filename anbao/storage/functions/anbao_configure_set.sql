-- ------------------------------------------------------------ configuration
-- Called by `anbao migrate/serve --topology`: this database is set p_me;
-- p_peers are the other sets. Creates the clearing accounts and puts every
-- local user in the directory (users registered before the topology).
-- Publications and subscriptions are made by storage/sets.py (they name
-- connection strings, which SQL functions should not hold).
CREATE OR REPLACE FUNCTION anbao_configure_set(p_me SMALLINT, p_peers SMALLINT[]) RETURNS VOID
LANGUAGE plpgsql AS $$
DECLARE
    was SMALLINT := (SELECT set_id FROM anbao_set_identity);
BEGIN
    IF was IS NOT NULL AND was <> p_me THEN
        RAISE EXCEPTION 'anbao: this database is set %, not set %', was, p_me;
    END IF;
    INSERT INTO anbao_set_identity (set_id) VALUES (p_me) ON CONFLICT DO NOTHING;
    INSERT INTO accounts (kind, owner_id) SELECT 3, s FROM unnest(p_peers) AS s WHERE s <> p_me
        ON CONFLICT DO NOTHING;
    INSERT INTO user_directory (user_id, home_set) SELECT owner_id, p_me FROM accounts WHERE kind = 1
        ON CONFLICT DO NOTHING;
END $$;
