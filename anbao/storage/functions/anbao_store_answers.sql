-- Unused by this text's batch functions (they store each key once, with its
-- answer: anbao_store_keys); kept for a server of the text before, during an
-- upgrade. A later migration drops it.
-- What each request run now answered (or why it was refused), under its key.
CREATE OR REPLACE FUNCTION anbao_store_answers(p_keys BYTEA[], p_answers JSONB[], p_refusals TEXT[], p_messages TEXT[])
RETURNS VOID LANGUAGE sql AS $$
    UPDATE idempotency_keys x SET answer = t.a, refusal = t.r, message = t.m
    FROM unnest(p_keys, p_answers, p_refusals, p_messages) AS t(k, a, r, m)
    WHERE x.key = t.k
$$;
