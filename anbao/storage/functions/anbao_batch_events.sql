-- ------------------------------------------------------------ a batch's events
-- In a stable order whether the batch is pending or rolled up: by packet,
-- then seq, a sell-out right after the share that sold the packet out.
-- `ord` is 1-based: event number = first_no + ord - 1.
CREATE OR REPLACE FUNCTION anbao_batch_events(p_batch BIGINT)
RETURNS TABLE (ord BIGINT, kind SMALLINT, at TIMESTAMPTZ, packet_id BIGINT, user_id BIGINT, seq INTEGER,
               count INTEGER, amount_cents BIGINT, elapsed_ms BIGINT)
LANGUAGE sql STABLE AS $$
    WITH g AS (
        SELECT x.packet_id, x.seq, x.user_id, x.amount_cents, r.committed_at AS at
        FROM grab_rollups r
        CROSS JOIN LATERAL unnest(r.packets, r.seqs, r.users, r.amounts) AS x(packet_id, seq, user_id, amount_cents)
        WHERE r.batch_id = p_batch
        UNION ALL
        SELECT c.packet_id, c.seq, c.user_id, c.amount_cents, c.created_at FROM claims c WHERE c.batch_id = p_batch
    ), e AS (
        SELECT 2::smallint AS kind, g.at, g.packet_id, g.user_id, g.seq, p.share_count AS count, g.amount_cents,
               0::bigint AS elapsed_ms, 0 AS sub
        FROM g JOIN packets p ON p.packet_id = g.packet_id
        UNION ALL
        SELECT 3::smallint, g.at, g.packet_id, p.sender_id, g.seq, p.share_count, p.total_cents,
               floor(extract(epoch FROM g.at - p.created_at) * 1000)::bigint, 1
        FROM g JOIN packets p ON p.packet_id = g.packet_id
        WHERE g.seq = p.share_count
    )
    SELECT row_number() OVER (ORDER BY e.packet_id, e.seq, e.sub), e.kind, e.at, e.packet_id, e.user_id, e.seq,
           e.count, e.amount_cents, e.elapsed_ms
    FROM e ORDER BY e.packet_id, e.seq, e.sub
$$;
