-- Idempotency keys scoped to the caller (issue 18 item 7), as payment APIs
-- scope them to the account: an app's SEND refused under key K no longer
-- makes an admin's DEPOSIT under K an IDEMPOTENCY_CONFLICT.
--
-- The caller is the token's name in the tokens file (anbao/auth.py Caller;
-- by default its scope's name), never the secret. The server hands storage
-- the scoped key (anbao/storage/idempotency.py scoped_key): the name's
-- UTF-8 bytes, a NUL byte, then the client's 16 bytes. So the batch
-- functions (anbao_send_batch in 0012, anbao_move_batch in 0013) claim,
-- store and release (caller, key) in the one key column, unchanged.
--
-- Keys stored before this migration are 16 bytes: unscoped, the caller who
-- stored them unknown. They stay as they are and are found by every
-- caller's request with that key: a request acknowledged before the
-- upgrade still replays, whichever token retries it, and a key used before
-- the upgrade stays one key for every caller. A scoped key is never 16
-- bytes long (the name is not empty), so the two never collide.

ALTER TABLE idempotency_keys DROP CONSTRAINT idempotency_keys_key_check;
ALTER TABLE idempotency_keys ADD CONSTRAINT idempotency_keys_key_check
    CHECK (length(key) = 16 OR (length(key) BETWEEN 18 AND 16 + 1 + 64
                                AND get_byte(key, length(key) - 17) = 0));

-- The client's key of a scoped key (its last 16 bytes): where an unscoped
-- key stored before this migration would be.
CREATE FUNCTION anbao_unscoped_key(p_key BYTEA) RETURNS BYTEA
LANGUAGE sql IMMUTABLE AS $$
    SELECT substring(p_key FROM length(p_key) - 15)
$$;

-- As in 0012, and a key is not claimed when an unscoped key stored before
-- this migration holds it: that one is replayed or conflicts instead.
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

-- As in 0012, finding each key not claimed now under its scoped key, or
-- else under its unscoped key stored before this migration.
CREATE OR REPLACE FUNCTION anbao_stored_answers(p_operation SMALLINT, p_keys BYTEA[], p_hashes BYTEA[],
                                                p_claimed BYTEA[])
RETURNS TABLE (i INTEGER, outcome SMALLINT, refusal TEXT, message TEXT, answer JSONB) LANGUAGE sql AS $$
    SELECT k.i,
           CASE WHEN k.same THEN 1 ELSE 2 END::smallint,
           CASE WHEN k.same THEN k.refusal ELSE 'IDEMPOTENCY_CONFLICT' END,
           CASE WHEN k.same THEN COALESCE(k.message, '')
                ELSE 'idempotency key reused with different parameters' END,
           CASE WHEN k.same THEN k.answer END
    FROM (SELECT t.i, x.refusal, x.message, x.answer,
                 x.operation = p_operation AND x.request_hash = p_hashes[t.i] AS same
          FROM unnest(p_keys) WITH ORDINALITY AS t(k, i)
          CROSS JOIN LATERAL (
              SELECT y.* FROM idempotency_keys y
              WHERE y.key = t.k OR (length(t.k) > 16 AND y.key = anbao_unscoped_key(t.k))
              ORDER BY length(y.key) DESC LIMIT 1) x
          WHERE NOT t.k = ANY(p_claimed)) k
$$;
