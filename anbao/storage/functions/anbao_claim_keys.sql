-- Unused by this text's batch functions (they store each key once, with its
-- answer: anbao_store_keys); kept for a server of the text before, during an
-- upgrade. A later migration drops it.
-- As in 0012, and a key is not claimed when an unscoped key stored before
-- migration 0015 (keys scoped to the caller) holds it: that one is replayed or conflicts instead.
CREATE OR REPLACE FUNCTION anbao_claim_keys(p_operation SMALLINT, p_keys BYTEA[], p_hashes BYTEA[],
                                            p_claim BOOLEAN[])
RETURNS BYTEA[] LANGUAGE sql AS $$
    WITH ins AS (
        INSERT INTO idempotency_keys (key, operation, request_hash)
        SELECT t.k, p_operation, t.h FROM unnest(p_keys, p_hashes, p_claim) AS t(k, h, c)
        WHERE t.c AND NOT EXISTS (SELECT 1 FROM idempotency_keys o
                                  WHERE length(t.k) > 16 AND o.key = anbao_unscoped_key(t.k))
        ORDER BY t.k
        ON CONFLICT DO NOTHING RETURNING key)
    SELECT COALESCE(array_agg(ins.key), '{}') FROM ins
$$;
