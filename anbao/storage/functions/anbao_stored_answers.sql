-- As in 0012, finding each key not claimed now under its scoped key, or
-- else under its unscoped key stored before migration 0015. Today's batch
-- functions claim no key first and pass p_claimed empty; it stays for a
-- server of the text before, during an upgrade.
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
