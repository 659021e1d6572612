-- How many events a batch row stands for, without expanding it: its grabs,
-- plus one for each of its packets whose last share it carries. Pending, the
-- arrays are scanned in C (`= ANY`) and only a packet whose share count
-- appears among the seqs is checked pair by pair; rolled up, its claims,
-- each packet found by its key. (A join there was planned as a hash of the
-- whole packets table, its estimate taken from the largest batches: 21 ms
-- a batch at 29,000 packets, and growing with the table, whenever the
-- sequencer met a batch rolled up before it was numbered.)
CREATE OR REPLACE FUNCTION anbao_batch_event_count(p_batch BIGINT) RETURNS BIGINT
LANGUAGE sql STABLE AS $$
    SELECT COALESCE(
        (SELECT cardinality(r.packets) + (
             SELECT count(*) FROM packets p
             WHERE p.packet_id = ANY(r.packet_ids) AND p.share_count = ANY(r.seqs)
               AND EXISTS (SELECT 1 FROM unnest(r.packets, r.seqs) AS g(packet_id, seq)
                           WHERE g.packet_id = p.packet_id AND g.seq = p.share_count))
         FROM grab_rollups r WHERE r.batch_id = p_batch),
        (SELECT count(*) + count(*) FILTER (WHERE c.seq = (SELECT p.share_count FROM packets p
                                                            WHERE p.packet_id = c.packet_id))
         FROM claims c WHERE c.batch_id = p_batch))
$$;
