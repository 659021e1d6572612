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

-- anbao_claim_keys and anbao_stored_answers find a 16-byte key stored
-- before this migration too: their current texts are
-- storage/functions/anbao_claim_keys.sql and anbao_stored_answers.sql,
-- applied after the migrations (storage/migrate.py).
