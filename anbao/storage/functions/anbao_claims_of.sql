-- One packet's claims, rolled up or pending, by seq: what PACKET shows and
-- what the owner rebuilds the packet's state from.
CREATE OR REPLACE FUNCTION anbao_claims_of(p_packet BIGINT)
RETURNS TABLE (seq INTEGER, user_id BIGINT, amount_cents BIGINT, created_at TIMESTAMPTZ)
LANGUAGE sql STABLE AS $$
    SELECT c.seq, c.user_id, c.amount_cents, c.created_at FROM claims c WHERE c.packet_id = p_packet
    UNION ALL
    SELECT g.seq, g.user_id, g.amount_cents, r.committed_at
    FROM grab_rollups r
    CROSS JOIN LATERAL unnest(r.packets, r.seqs, r.users, r.amounts) AS g(packet_id, seq, user_id, amount_cents)
    WHERE r.packet_ids && ARRAY[p_packet] AND g.packet_id = p_packet
$$;
