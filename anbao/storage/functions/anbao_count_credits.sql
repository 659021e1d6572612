-- ------------------------------------------------------------ credit totals
-- AFTER INSERT ON credits_out, once per statement (ENABLE ALWAYS: the batch
-- apply's copies are written in the apply worker): adds the statement's rows
-- to credit_totals, one upsert per (src_set, dest_set). A row the per-row
-- apply credited (anbao_apply_credit: not in a batch, applied by it) is
-- left out: that function counts it itself, since the apply worker fires
-- no statement trigger for a replicated row.
CREATE OR REPLACE FUNCTION anbao_count_credits() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, public AS $$
BEGIN
    INSERT INTO public.credit_totals AS t (src_set, dest_set, credits, cents, max_apply_lag)
        SELECT a.src_set, a.dest_set, count(*), sum(a.amount_cents), max(a.applied_at - a.created_at)
        FROM added a WHERE a.in_batch OR a.applied_transfer_id IS NULL
        GROUP BY a.src_set, a.dest_set
        ON CONFLICT (src_set, dest_set)
        DO UPDATE SET credits = t.credits + EXCLUDED.credits, cents = t.cents + EXCLUDED.cents,
                      max_apply_lag = GREATEST(t.max_apply_lag, EXCLUDED.max_apply_lag);
    RETURN NULL;
END $$;
