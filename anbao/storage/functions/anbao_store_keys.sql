-- The keys of the requests a batch function ran now, each stored once with
-- its answer (or refusal), in key order, at the batch's end (the order of
-- every batch's locks: wallets first, keys last). A key stored meanwhile by
-- another transaction (still open: this INSERT waits for it, then finds it)
-- fails the whole batch with 40001; the caller runs it again, and that key
-- is then replayed or refused IDEMPOTENCY_CONFLICT by anbao_stored_answers.
-- Keys used to be claimed (inserted) before the batch decided, then updated
-- with the answers: every key written twice (anbao_claim_keys and
-- anbao_store_answers, kept for a server of the text before them during an
-- upgrade).
CREATE OR REPLACE FUNCTION anbao_store_keys(p_operation SMALLINT, p_keys BYTEA[], p_hashes BYTEA[],
                                            p_answers JSONB[], p_refusals TEXT[], p_messages TEXT[])
RETURNS VOID LANGUAGE plpgsql AS $$
DECLARE
    stored INTEGER;
BEGIN
    INSERT INTO idempotency_keys (key, operation, request_hash, answer, refusal, message)
        SELECT t.k, p_operation, t.h, t.a, t.r, t.m
        FROM unnest(p_keys, p_hashes, p_answers, p_refusals, p_messages) AS t(k, h, a, r, m)
        ORDER BY t.k
        ON CONFLICT DO NOTHING;
    GET DIAGNOSTICS stored = ROW_COUNT;
    IF stored <> cardinality(p_keys) THEN
        RAISE EXCEPTION 'anbao_store_keys: % of % keys were stored by another transaction meanwhile',
            cardinality(p_keys) - stored, cardinality(p_keys) USING ERRCODE = '40001';
    END IF;
END $$;
