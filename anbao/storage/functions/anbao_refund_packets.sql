-- ------------------------------------------------------------ refunds
-- As in v2, and it refuses to run while any claim of the packet waits for
-- its roll-up: the remainder is computed from the rolled-up counters, so
-- the caller rolls the packet's batches up first (anbao_rollup with
-- p_packets), in its own transaction.
CREATE OR REPLACE FUNCTION anbao_refund_packets(p_packets BIGINT[])
RETURNS TABLE (packet_id BIGINT, refunded_cents BIGINT, refunded_now BOOLEAN)
LANGUAGE plpgsql AS $$
DECLARE
    pid BIGINT;
    p RECORD;
    wallet BIGINT;
    remainder BIGINT;
BEGIN
    PERFORM 1 FROM accounts
        WHERE account_id IN (SELECT pk.escrow_account_id FROM packets pk WHERE pk.packet_id = ANY(p_packets)
                             UNION
                             SELECT a.account_id FROM packets pk
                             JOIN accounts a ON a.kind = 1 AND a.owner_id = pk.sender_id
                             WHERE pk.packet_id = ANY(p_packets))
        ORDER BY kind, owner_id FOR UPDATE;  -- the one order of accounts' locks: the sender's wallet, then escrows

    FOR pid IN SELECT DISTINCT u FROM unnest(p_packets) AS u ORDER BY u LOOP
        SELECT pk.* INTO p FROM packets pk WHERE pk.packet_id = pid FOR UPDATE;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'anbao_refund_packets: unknown packet %', pid;
        END IF;
        IF EXISTS (SELECT 1 FROM grab_rollups r WHERE pid = ANY(r.packet_ids)) THEN
            RAISE EXCEPTION 'anbao_refund_packets: packet % has claims waiting for their roll-up', pid;
        END IF;
        packet_id := pid;
        refunded_now := false;
        IF p.status = 3 THEN
            refunded_cents := p.refunded_cents;
        ELSIF p.status = 1 THEN
            refunded_cents := 0;
        ELSE
            remainder := p.total_cents - p.claimed_cents - p.refunded_cents;
            IF p.claimed_count >= p.share_count
               OR remainder < p.min_share_cents * (p.share_count - p.claimed_count) THEN
                RAISE EXCEPTION 'anbao_refund_packets: packet % holds % for % unclaimed shares',
                    pid, remainder, p.share_count - p.claimed_count;
            END IF;
            SELECT a.account_id INTO wallet FROM accounts a WHERE a.kind = 1 AND a.owner_id = p.sender_id;
            INSERT INTO transfers (kind, debit_account, credit_account, amount_cents, packet_id)
                VALUES (5, p.escrow_account_id, wallet, remainder, pid);
            UPDATE accounts SET balance_cents = balance_cents - remainder WHERE account_id = p.escrow_account_id;
            UPDATE accounts SET balance_cents = balance_cents + remainder WHERE account_id = wallet;
            UPDATE packets pk SET status = 3, refunded_cents = pk.refunded_cents + remainder
                WHERE pk.packet_id = pid;
            refunded_cents := remainder;
            refunded_now := true;
        END IF;
        RETURN NEXT;
    END LOOP;
END $$;
