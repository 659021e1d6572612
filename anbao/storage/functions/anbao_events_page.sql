-- ------------------------------------------------------------ reading
-- The events after p_cursor, at most p_limit, in number order, each with
-- the transfer it records (0: a share, whose transfer its roll-up writes
-- later). A grab batch's events are the same as anbao_batch_events gives
-- batch by batch (the audit holds them to it), and a credit batch's
-- (kind 8, migration 0019) one CROSS_SET_CREDIT per credit in the batch's
-- order; both expanded here for all the page's rows in one pass: one join
-- per table and one sort, not a function call and a sort per batch.
CREATE OR REPLACE FUNCTION anbao_events_page(p_cursor BIGINT, p_limit INTEGER)
RETURNS TABLE (no BIGINT, kind SMALLINT, at_ms BIGINT, packet_id BIGINT, user_id BIGINT, seq INTEGER,
               count INTEGER, amount_cents BIGINT, elapsed_ms BIGINT, transfer_id BIGINT)
LANGUAGE sql STABLE AS $$
    WITH e AS (
        -- The rows holding numbers p_cursor + 1 .. p_cursor + p_limit (numbers
        -- are dense): at most p_limit rows, and only they are expanded.
        SELECT * FROM (SELECT * FROM event_log WHERE last_no > p_cursor ORDER BY last_no LIMIT p_limit) w
        WHERE w.first_no <= p_cursor + p_limit
    ), g AS (
        SELECT e.first_no, x.packet_id, x.seq, x.user_id, x.amount_cents, r.committed_at AS at
        FROM e JOIN grab_rollups r ON r.batch_id = e.batch_id
        CROSS JOIN LATERAL unnest(r.packets, r.seqs, r.users, r.amounts) AS x(packet_id, seq, user_id, amount_cents)
        UNION ALL
        SELECT e.first_no, c.packet_id, c.seq, c.user_id, c.amount_cents, c.created_at
        FROM e JOIN claims c ON c.batch_id = e.batch_id
    ), x AS (
        SELECT g.first_no, 2::smallint AS kind, g.at, g.packet_id, g.user_id, g.seq, p.share_count AS count,
               g.amount_cents, 0::bigint AS elapsed_ms, 0 AS sub
        FROM g JOIN packets p ON p.packet_id = g.packet_id
        UNION ALL
        SELECT g.first_no, 3::smallint, g.at, g.packet_id, p.sender_id, g.seq, p.share_count, p.total_cents,
               floor(extract(epoch FROM g.at - p.created_at) * 1000)::bigint, 1
        FROM g JOIN packets p ON p.packet_id = g.packet_id
        WHERE g.seq = p.share_count
    ), numbered AS (
        SELECT x.first_no + row_number() OVER (PARTITION BY x.first_no ORDER BY x.packet_id, x.seq, x.sub) - 1 AS no,
               x.kind, x.at, x.packet_id, x.user_id, x.seq, x.count, x.amount_cents, x.elapsed_ms, 0::bigint AS transfer_id
        FROM x
        UNION ALL
        SELECT e.first_no + k.ord - 1, 7::smallint, e.at, k.packet_id, k.owner, 0, 0, k.amount_cents, 0::bigint,
               k.transfer_id
        FROM e JOIN credits_in i ON i.first_transfer_id = e.transfer_id
        JOIN credit_batches b ON b.src_set = i.src_set AND b.batch_id = i.batch_id
                             AND b.dest_set = (SELECT s.set_id FROM anbao_set_identity s)
        CROSS JOIN LATERAL unnest(i.transfer_ids, i.owners, b.packets, b.amounts)
                           WITH ORDINALITY AS k(transfer_id, owner, packet_id, amount_cents, ord)
        WHERE e.kind = 8
        UNION ALL
        SELECT e.first_no, e.kind, e.at, e.packet_id, e.user_id, e.seq, e.count, e.amount_cents, e.elapsed_ms,
               COALESCE(e.transfer_id, 0)
        FROM e WHERE e.batch_id IS NULL AND e.kind <> 8
    )
    SELECT n.no, n.kind, floor(extract(epoch FROM n.at) * 1000)::bigint, n.packet_id, n.user_id, n.seq, n.count,
           n.amount_cents, n.elapsed_ms, n.transfer_id
    FROM numbered n WHERE n.no > p_cursor ORDER BY n.no LIMIT p_limit
$$;
