-- The client's key of a scoped key (its last 16 bytes): where an unscoped
-- key stored before migration 0015 would be.
CREATE OR REPLACE FUNCTION anbao_unscoped_key(p_key BYTEA) RETURNS BYTEA
LANGUAGE sql IMMUTABLE AS $$
    SELECT substring(p_key FROM length(p_key) - 15)
$$;
