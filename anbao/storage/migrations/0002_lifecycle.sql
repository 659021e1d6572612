-- anbao schema v2: the money lifecycle. Groups, packets sent to a group,
-- exactly-once expiry refunds, and the indexes the history queries need.

-- ------------------------------------------------------------------ groups
-- The chat app's groups, mirrored under the chat app's own ids (as users
-- are). Membership is what SEND snapshots into packet_members: a packet to
-- a group belongs to the members at the moment it was sent.
CREATE TABLE groups (
    group_id   BIGINT PRIMARY KEY CHECK (group_id > 0),
    name       TEXT NOT NULL DEFAULT '',
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE group_members (
    group_id BIGINT NOT NULL REFERENCES groups,
    user_id  BIGINT NOT NULL,
    added_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, user_id)
);

-- ------------------------------------------------------------------ packets
ALTER TABLE packets DROP CONSTRAINT packets_audience_check;
ALTER TABLE packets ADD CONSTRAINT packets_audience_check CHECK (audience IN (0, 1, 2, 3));  -- 3 group
ALTER TABLE packets ADD COLUMN group_id BIGINT REFERENCES groups;
ALTER TABLE packets ADD CONSTRAINT packets_group_audience CHECK ((audience = 3) = (group_id IS NOT NULL));
ALTER TABLE packets ADD CONSTRAINT packets_status_known CHECK (status IN (0, 1, 2, 3));
-- A refunded packet has given out everything it held: claimed + refunded = total.
ALTER TABLE packets ADD CONSTRAINT packets_refund_settles
    CHECK (status <> 3 OR claimed_cents + refunded_cents = total_cents);

-- The expiry sweeper's question, "which open packets are past expiry?",
-- answered from a small index that only holds packets still open.
CREATE INDEX packets_open_by_expiry ON packets (expires_at) WHERE status IN (0, 2);
-- A user's sent packets, newest first.
CREATE INDEX packets_by_sender ON packets (sender_id, packet_id);

-- ------------------------------------------------------------------ history
-- A user's statement reads the transfers that touch their wallet, newest
-- first. Credits: deposits, grabs, refunds. Debits of a wallet are only
-- withdrawals and sends (kinds 2, 3), so the debit index leaves out the
-- grab transfers (which debit an escrow) and costs the grab path nothing.
CREATE INDEX transfers_by_credit ON transfers (credit_account, transfer_id);
CREATE INDEX transfers_wallet_debits ON transfers (debit_account, transfer_id) WHERE kind IN (2, 3);
-- The audit and the packet view look refunds up by packet.
CREATE INDEX transfers_refunds ON transfers (packet_id) WHERE kind = 5;

-- ------------------------------------------------------------------ refunds
-- Refunds the unclaimed remainder of each packet to its sender: one
-- transfer escrow -> sender wallet, and status 3. Exactly once: a packet
-- already refunded (status 3) is left alone and reported with what it was
-- refunded then, so a second sweeper, a retry after an unknown outcome or a
-- restart can call this again safely. A sold-out packet has nothing left and
-- keeps status 1.
--
-- The owner calls this only after every grab it accepted for the packet has
-- committed, so the claims here are all the claims there will ever be; the
-- CHECK packets_no_overspend refuses any claim that would land afterwards.
CREATE FUNCTION anbao_refund_packets(p_packets BIGINT[])
RETURNS TABLE (packet_id BIGINT, refunded_cents BIGINT, refunded_now BOOLEAN)
LANGUAGE plpgsql AS $$
DECLARE
    pid BIGINT;
    p RECORD;
    wallet BIGINT;
    remainder BIGINT;
BEGIN
    -- Every account involved, in id order, before any packet row: the order
    -- the grab batches lock in, so a refund and a batch never deadlock.
    PERFORM 1 FROM accounts
        WHERE account_id IN (SELECT pk.escrow_account_id FROM packets pk WHERE pk.packet_id = ANY(p_packets)
                             UNION
                             SELECT a.account_id FROM packets pk
                             JOIN accounts a ON a.kind = 1 AND a.owner_id = pk.sender_id
                             WHERE pk.packet_id = ANY(p_packets))
        ORDER BY account_id FOR UPDATE;

    FOR pid IN SELECT DISTINCT u FROM unnest(p_packets) AS u ORDER BY u LOOP
        SELECT pk.* INTO p FROM packets pk WHERE pk.packet_id = pid FOR UPDATE;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'anbao_refund_packets: unknown packet %', pid;
        END IF;
        packet_id := pid;
        refunded_now := false;
        IF p.status = 3 THEN
            refunded_cents := p.refunded_cents;      -- refunded before: never twice
        ELSIF p.status = 1 THEN
            refunded_cents := 0;                     -- sold out: nothing left to return
        ELSE
            remainder := p.total_cents - p.claimed_cents - p.refunded_cents;
            -- An open packet still holds at least the minimum for each unclaimed share.
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
