-- Who may claim packet p_packet besides the open audience: its member list
-- (audiences 1 and 2, and group packets from before migration 0012), or
-- its group's members as of the version it was sent at, the sender never.
-- One SELECT, so the planner inlines it into a caller's query.
CREATE OR REPLACE FUNCTION anbao_packet_members(p_packet BIGINT) RETURNS SETOF BIGINT
LANGUAGE sql STABLE AS $$
    SELECT m.user_id FROM packet_members m WHERE m.packet_id = p_packet
    UNION ALL
    SELECT gm.user_id FROM packets p JOIN group_members gm ON gm.group_id = p.group_id
    WHERE p.packet_id = p_packet AND p.group_version IS NOT NULL
      AND gm.since_version <= p.group_version AND gm.user_id <> p.sender_id
    UNION ALL
    SELECT gl.user_id FROM packets p JOIN group_members_left gl ON gl.group_id = p.group_id
    WHERE p.packet_id = p_packet AND p.group_version IS NOT NULL
      AND gl.since_version <= p.group_version AND gl.left_version > p.group_version
      AND gl.user_id <> p.sender_id
$$;
