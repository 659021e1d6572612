-- anbao schema v19: a credit batch applied at its destination writes one
-- row for the batch, not a copy and an event per credit (issue 20).
--
-- Since 0014 the apply of a credit batch wrote, per credit: its CROSS_IN
-- transfer, its CROSS_SET_CREDIT event row and its copy in credits_out,
-- each with its index entries. bench.apply measured 21 µs a credit, 3.35x
-- the per-row apply; without the copy 4.4x, without the copy and the event
-- 5.3x. The copy and the event held nothing the batch does not: so now the
-- apply (storage/functions/anbao_apply_credit_batch.sql) writes
--   - the CROSS_IN transfers and the wallets, as before;
--   - one credits_in row: the batch's key, and per credit the transfer it
--     gave and whose wallet that was (0: suspense);
--   - one event row of kind 8, naming the credits_in row by its first
--     transfer, counted as one CROSS_SET_CREDIT event per credit and
--     expanded when read (anbao_events_page), as a grab batch's row is;
--   - credit_totals, which counted the copies (0016), itself.
-- Readers take a credit from credits_out (per row, and batches applied
-- before v19) or from credits_in with its credit_batches row:
--   RECEIVED_LIST   the batch whose first transfer is the nearest at or
--                   below the transfer: applies hold the roll-up's lock
--                   while they draw transfer ids, so batches' ranges never
--                   interleave;
--   BALANCE         at home, what each set has applied, from the wallet's
--                   CROSS_IN transfers (every shape has one);
--   the audits, the credit times, the feed.
-- A table of its own, not columns of credit_batches: that table is
-- published, and a subscriber lacking a column its publisher has stops
-- (sets are migrated one at a time).

CREATE TABLE credits_in (
    first_transfer_id BIGINT   PRIMARY KEY,         -- min(transfer_ids); the batch's event row names it
    src_set           SMALLINT NOT NULL,
    batch_id          BIGINT   NOT NULL,            -- with src_set: the credit_batches row applied
    transfer_ids      BIGINT[] NOT NULL,            -- the CROSS_IN transfer of each credit, in the batch's order
    owners            BIGINT[] NOT NULL,            -- whose wallet each credited: the user, or 0 for suspense
    UNIQUE (src_set, batch_id),
    CHECK (cardinality(transfer_ids) > 0 AND cardinality(owners) = cardinality(transfer_ids))
);
ALTER TABLE credits_in ALTER COLUMN transfer_ids SET STORAGE EXTERNAL, ALTER COLUMN owners SET STORAGE EXTERNAL;

-- Every credit this database holds, one row each, whatever its shape: sent
-- from here (credits_out, src_set = this set) or applied here (credits_out
-- per row and before v19; credits_in with its batch since). What the
-- audits and the credit times read.
CREATE VIEW credits_held AS
    SELECT o.src_set, o.credit_id, o.dest_set, o.user_id, o.amount_cents, o.packet_id, o.seq, o.batch_id,
           o.sender_id, o.claimed_at, o.created_at, o.applied_at, o.applied_transfer_id
    FROM credits_out o
    UNION ALL
    SELECT b.src_set, k.credit_id, b.dest_set, k.user_id, k.amount_cents, k.packet_id, k.seq, b.batch_id,
           k.sender_id, b.claimed_at, b.created_at, b.applied_at, k.transfer_id
    FROM credits_in i
    JOIN credit_batches b ON b.src_set = i.src_set AND b.batch_id = i.batch_id
                         AND b.dest_set = (SELECT s.set_id FROM anbao_set_identity s)
    CROSS JOIN LATERAL unnest(b.credit_ids, b.users, b.amounts, b.packets, b.seqs, b.senders, i.transfer_ids)
                       AS k(credit_id, user_id, amount_cents, packet_id, seq, sender_id, transfer_id);

-- event_log.kind 8: a credit batch's row (transfer_id = credits_in.first_transfer_id,
-- count = its credits), read as that many CROSS_SET_CREDIT (7) events.

-- anbao_events_after gave no transfer id per event (events.py took it from
-- the row of a single event); its successor anbao_events_page does.
DROP FUNCTION IF EXISTS anbao_events_after(BIGINT, INTEGER);
DO $$
BEGIN
    IF to_regclass('schema_functions') IS NOT NULL THEN  -- migrate's record of applied texts (storage/migrate.py)
        DELETE FROM schema_functions WHERE name = 'anbao_events_after';
    END IF;
END $$;
