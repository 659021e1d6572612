-- SEND by group commit, and group membership by version (issue 17).
--
-- Before this migration a SEND was ten statements, each a round trip, in a
-- transaction of its own, and a SEND to a group copied the group's members
-- into packet_members: about 500 of the ~600 us of PostgreSQL CPU a SEND
-- cost even when group-committed (foreign-key checks ~320 us, rows ~180
-- us). Now:
--
-- * Membership is versioned. groups.version grows by one with every
--   GROUP_ADD and GROUP_REMOVE (in that change's transaction, under the
--   group row's lock). A member's row in group_members says since which
--   version they belong (since_version); GROUP_REMOVE moves the row to
--   group_members_left with the version it ended at (left_version). A
--   packet to a group records the version it was sent at
--   (packets.group_version), and its audience is the group as of that
--   version: nothing is copied, and "membership at send time counts" holds
--   as before. anbao_packet_members is the rule's one home. Group packets
--   sent before this migration keep their packet_members copy
--   (group_version NULL).
--
-- * anbao_send_batch decides and writes a whole batch of SENDs in one
--   statement: one round trip and one commit per batch (see its comment).
--
-- * Packet sequence numbers come in blocks of 1,024 per nextval
--   (packet_block_seq), as grab batch ids do, so a SEND costs no round trip
--   for its id. Blocks start above every packet_seq value already given.

ALTER TABLE groups ADD COLUMN version BIGINT NOT NULL DEFAULT 0;
ALTER TABLE group_members ADD COLUMN since_version BIGINT NOT NULL DEFAULT 0;
CREATE TABLE group_members_left (
    group_id      BIGINT NOT NULL REFERENCES groups,
    user_id       BIGINT NOT NULL,
    since_version BIGINT NOT NULL,
    left_version  BIGINT NOT NULL,
    PRIMARY KEY (group_id, user_id, since_version),
    CHECK (left_version > since_version)
);
ALTER TABLE packets ADD COLUMN group_version BIGINT;
ALTER TABLE packets ADD CONSTRAINT packets_group_version CHECK (group_version IS NULL OR audience = 3);

-- Who may claim packet p_packet besides the open audience: its member list
-- (audiences 1 and 2, and group packets from before this migration), or
-- its group's members as of the version it was sent at, the sender never.
-- One SELECT, so the planner inlines it into a caller's query.
CREATE FUNCTION anbao_packet_members(p_packet BIGINT) RETURNS SETOF BIGINT
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

CREATE SEQUENCE packet_block_seq;
SELECT setval('packet_block_seq', (SELECT last_value FROM packet_seq) / 1024 + 1);

-- The idempotency keys of a batch of keyed writes (anbao_send_batch here,
-- anbao_move_batch in 0013), each step one statement for the whole batch.
-- anbao_claim_keys claims p_keys[i] for every i with p_claim[i], in key
-- order (so two batches never wait on each other's keys in opposite
-- orders), and returns the keys it claimed: the others were stored before
-- (or claimed by a batch in flight, whose commit it waits for).
CREATE FUNCTION anbao_claim_keys(p_operation SMALLINT, p_keys BYTEA[], p_hashes BYTEA[], p_claim BOOLEAN[])
RETURNS BYTEA[] LANGUAGE sql AS $$
    WITH ins AS (
        INSERT INTO idempotency_keys (key, operation, request_hash)
        SELECT t.k, p_operation, t.h FROM unnest(p_keys, p_hashes, p_claim) AS t(k, h, c) WHERE t.c ORDER BY t.k
        ON CONFLICT DO NOTHING RETURNING key)
    SELECT COALESCE(array_agg(ins.key), '{}') FROM ins
$$;

-- The stored answer of every key of the batch not claimed now: (i, 1, its
-- refusal, message and answer) when it was used with these parameters
-- (replayed), (i, 2, 'IDEMPOTENCY_CONFLICT', ...) when with others.
CREATE FUNCTION anbao_stored_answers(p_operation SMALLINT, p_keys BYTEA[], p_hashes BYTEA[], p_claimed BYTEA[])
RETURNS TABLE (i INTEGER, outcome SMALLINT, refusal TEXT, message TEXT, answer JSONB) LANGUAGE sql AS $$
    SELECT k.i,
           CASE WHEN k.same THEN 1 ELSE 2 END::smallint,
           CASE WHEN k.same THEN k.refusal ELSE 'IDEMPOTENCY_CONFLICT' END,
           CASE WHEN k.same THEN COALESCE(k.message, '')
                ELSE 'idempotency key reused with different parameters' END,
           CASE WHEN k.same THEN k.answer END
    FROM (SELECT array_position(p_keys, x.key) AS i, x.refusal, x.message, x.answer,
                 x.operation = p_operation AND x.request_hash = p_hashes[array_position(p_keys, x.key)] AS same
          FROM idempotency_keys x WHERE x.key = ANY(p_keys) AND NOT x.key = ANY(p_claimed)) k
$$;

-- What each request run now answered (or why it was refused), under its key.
CREATE FUNCTION anbao_store_answers(p_keys BYTEA[], p_answers JSONB[], p_refusals TEXT[], p_messages TEXT[])
RETURNS VOID LANGUAGE sql AS $$
    UPDATE idempotency_keys x SET answer = t.a, refusal = t.r, message = t.m
    FROM unnest(p_keys, p_answers, p_refusals, p_messages) AS t(k, a, r, m)
    WHERE x.key = t.k
$$;

-- A batch of SENDs, decided and written in one statement. Element i of
-- every array is one SEND, in arrival order. Per SEND it returns
-- (i, outcome, refusal, message, answer, members):
--   outcome 0: run now; its answer (or refusal and message) is stored under
--              its key, exactly as Idempotency.idempotent stores one.
--   outcome 1: the key was used before with these parameters: the stored
--              answer (or refusal) is returned, nothing moved.
--   outcome 2: the key was used before with other parameters
--              (IDEMPOTENCY_CONFLICT); nothing stored.
--   outcome 3: the sender's posted balance is short but their grabs still
--              waiting for the roll-up would cover it: nothing stored, the
--              key released; the caller settles the sender and sends it
--              again with p_settled true (then a short balance is refused).
--   outcome 4: the sender's wallet is locked by another transaction (a
--              roll-up crediting it, most often): nothing stored, the key
--              not claimed; the caller puts it in its next batch. Unless
--              p_patient, a batch does not wait for a locked wallet (SKIP
--              LOCKED): a roll-up holds its wallets for its whole
--              transaction, and one of them would hold up every SEND of
--              the batch. A patient batch (one carrying a SEND put back
--              before) waits, so every SEND is decided in the end.
-- members: a group packet's audience as of its version (the owner adopts
-- the packet with it), else NULL. created_ms: the packets' created_at, in
-- ms since the epoch, as PACKET shows it.
--
-- Why it cannot deadlock: every batch locks its senders' wallets first, in
-- account-id order (as the roll-up and the other writers do), then claims
-- its keys in key order, in one statement; nothing else it writes is
-- visible to anyone before it commits. Every SEND is decided before it is
-- written, so one refusal never aborts the batch: a batch fails only as a
-- whole (the database's fault), and then nothing in it happened.
CREATE FUNCTION anbao_send_batch(
    p_operation SMALLINT, p_keys BYTEA[], p_hashes BYTEA[], p_packets BIGINT[], p_senders BIGINT[],
    p_totals BIGINT[], p_counts INTEGER[], p_modes SMALLINT[], p_expires_ms BIGINT[], p_audiences SMALLINT[],
    p_groups BIGINT[], p_member_ids BIGINT[], p_member_ends INTEGER[], p_greetings TEXT[], p_settled BOOLEAN[],
    p_min_share_cents BIGINT, p_max_share_cents BIGINT, p_daily_max_cents BIGINT, p_daily_max_packets INTEGER,
    p_utc_day INTEGER, p_patient BOOLEAN)
RETURNS TABLE (i INTEGER, outcome SMALLINT, refusal TEXT, message TEXT, answer JSONB, members BIGINT[],
               created_ms BIGINT)
LANGUAGE plpgsql AS $$
DECLARE
    n INTEGER := cardinality(p_keys);
    w_busy BIGINT[] := '{}';
    replayed BYTEA[] := '{}';
    w_owner BIGINT[];
    w_account BIGINT[];
    w_balance BIGINT[];
    claimed BYTEA[];
    stored RECORD;
    k INTEGER;
    s BIGINT;
    total BIGINT;
    bal BIGINT;
    v_version BIGINT;
    v_audience BIGINT[];
    found_n BIGINT;
    day_row RECORD;
    day_cents BIGINT;
    day_count INTEGER;
    escrow BIGINT;
    m_from INTEGER;
    list BIGINT[];
    out_keys BYTEA[] := '{}';
    out_answers JSONB[] := '{}';
    out_refusals TEXT[] := '{}';
    out_messages TEXT[] := '{}';
BEGIN
    created_ms := (extract(epoch FROM now()) * 1000)::bigint;
    IF p_patient THEN
        SELECT array_agg(a.owner_id ORDER BY a.account_id), array_agg(a.account_id ORDER BY a.account_id),
               array_agg(a.balance_cents ORDER BY a.account_id)
            INTO w_owner, w_account, w_balance
            FROM (SELECT x.owner_id, x.account_id, x.balance_cents FROM accounts x
                  WHERE x.kind = 1 AND x.owner_id = ANY(p_senders) ORDER BY x.account_id FOR NO KEY UPDATE) a;
    ELSE
        SELECT array_agg(a.owner_id ORDER BY a.account_id), array_agg(a.account_id ORDER BY a.account_id),
               array_agg(a.balance_cents ORDER BY a.account_id)
            INTO w_owner, w_account, w_balance
            FROM (SELECT x.owner_id, x.account_id, x.balance_cents FROM accounts x
                  WHERE x.kind = 1 AND x.owner_id = ANY(p_senders) ORDER BY x.account_id
                  FOR NO KEY UPDATE SKIP LOCKED) a;
        -- A sender with a wallet that was not locked: someone else holds it.
        SELECT COALESCE(array_agg(x.owner_id), '{}') INTO w_busy FROM accounts x
            WHERE x.kind = 1 AND x.owner_id = ANY(p_senders) AND NOT x.owner_id = ANY(COALESCE(w_owner, '{}'));
    END IF;
    claimed := anbao_claim_keys(p_operation, p_keys, p_hashes,
                                ARRAY(SELECT NOT t.s = ANY(w_busy) FROM unnest(p_senders) WITH ORDINALITY AS t(s, o)
                                      ORDER BY t.o));
    FOR stored IN SELECT * FROM anbao_stored_answers(p_operation, p_keys, p_hashes, claimed) LOOP
        i := stored.i; outcome := stored.outcome; refusal := stored.refusal; message := stored.message;
        answer := stored.answer; members := NULL;
        replayed := replayed || p_keys[stored.i];
        RETURN NEXT;
    END LOOP;
    m_from := 1;
    FOR k IN 1 .. n LOOP
        i := k; outcome := 0; refusal := NULL; message := ''; answer := NULL; members := NULL;
        list := p_member_ids[m_from : p_member_ends[k]];
        m_from := p_member_ends[k] + 1;
        IF NOT p_keys[k] = ANY(claimed) THEN
            IF p_senders[k] = ANY(w_busy) AND NOT p_keys[k] = ANY(replayed) THEN
                outcome := 4;
                RETURN NEXT;
            END IF;
            CONTINUE;
        END IF;
        s := p_senders[k];
        total := p_totals[k];
        <<decide>>
        DECLARE
            w INTEGER := array_position(w_owner, s);
        BEGIN
            IF w IS NULL THEN
                refusal := 'UNKNOWN_USER'; message := format('unknown sender %s', s);
                EXIT decide;
            END IF;
            bal := w_balance[w];
            IF bal < total THEN
                IF NOT p_settled[k] AND bal + (SELECT COALESCE(sum(g.amount_cents), 0) FROM grab_rollups r
                        CROSS JOIN LATERAL unnest(r.users, r.amounts) AS g(user_id, amount_cents)
                        WHERE s = ANY(r.users) AND g.user_id = s) >= total THEN
                    outcome := 3;
                    DELETE FROM idempotency_keys x WHERE x.key = p_keys[k];
                    EXIT decide;
                END IF;
                refusal := 'INSUFFICIENT_FUNDS'; message := format('balance %s cents below %s cents', bal, total);
                EXIT decide;
            END IF;
            v_version := NULL;
            IF p_audiences[k] = 3 THEN
                SELECT g.version, ARRAY(SELECT m.user_id FROM group_members m
                                        WHERE m.group_id = g.group_id AND m.user_id <> s ORDER BY m.user_id)
                    INTO v_version, v_audience FROM groups g WHERE g.group_id = p_groups[k];
                IF NOT FOUND THEN
                    refusal := 'UNKNOWN_GROUP'; message := format('unknown group %s', p_groups[k]);
                    EXIT decide;
                END IF;
                IF p_counts[k] > cardinality(v_audience) THEN
                    refusal := 'INVALID';
                    message := format('%s shares for %s group members besides the sender: the packet could'
                                      ' never sell out', p_counts[k], cardinality(v_audience));
                    EXIT decide;
                END IF;
            ELSIF cardinality(list) > 0 THEN
                SELECT count(*) INTO found_n FROM (
                    SELECT x.owner_id FROM accounts x WHERE x.kind = 1 AND x.owner_id = ANY(list)
                    UNION SELECT d.user_id FROM user_directory d WHERE d.user_id = ANY(list)) known;
                IF found_n <> cardinality(list) THEN
                    refusal := 'UNKNOWN_USER';
                    message := format('%s member(s) are not registered', cardinality(list) - found_n);
                    EXIT decide;
                END IF;
            END IF;
            IF p_daily_max_cents IS NOT NULL OR p_daily_max_packets IS NOT NULL THEN
                SELECT d.utc_day, d.sent_cents, d.sent_count INTO day_row FROM daily_sends d WHERE d.user_id = s;
                IF FOUND AND day_row.utc_day >= p_utc_day THEN
                    day_cents := day_row.sent_cents + total; day_count := day_row.sent_count + 1;
                ELSE
                    day_cents := total; day_count := 1;
                END IF;
                IF p_daily_max_packets IS NOT NULL AND day_count > p_daily_max_packets THEN
                    refusal := 'DAILY_SEND_COUNT_CAP';
                    message := format('sender %s has sent %s packets today (UTC); the daily cap is %s',
                                      s, day_count - 1, p_daily_max_packets);
                    EXIT decide;
                END IF;
                IF p_daily_max_cents IS NOT NULL AND day_cents > p_daily_max_cents THEN
                    refusal := 'DAILY_SEND_AMOUNT_CAP';
                    message := format('sender %s has sent %s cents today (UTC); %s cents more would pass the'
                                      ' daily cap of %s cents', s, day_cents - total, total, p_daily_max_cents);
                    EXIT decide;
                END IF;
                INSERT INTO daily_sends AS d (user_id, utc_day, sent_cents, sent_count)
                    VALUES (s, GREATEST(p_utc_day, COALESCE(day_row.utc_day, p_utc_day)), day_cents, day_count)
                    ON CONFLICT (user_id) DO UPDATE SET utc_day = EXCLUDED.utc_day,
                        sent_cents = EXCLUDED.sent_cents, sent_count = EXCLUDED.sent_count;
            END IF;
            -- Decided: write it. The escrow is created holding the total,
            -- and the transfer below is what it holds; the audit recomputes
            -- every balance from its transfers.
            INSERT INTO accounts (kind, owner_id, balance_cents) VALUES (2, p_packets[k], total)
                RETURNING account_id INTO escrow;
            INSERT INTO packets (packet_id, sender_id, escrow_account_id, total_cents, share_count, mode,
                                 min_share_cents, audience, greeting, expires_at, group_id, group_version,
                                 max_share_cents)
                VALUES (p_packets[k], s, escrow, total, p_counts[k], p_modes[k], p_min_share_cents,
                        p_audiences[k], p_greetings[k], to_timestamp(p_expires_ms[k]::float8 / 1000),
                        NULLIF(p_groups[k], 0), v_version, p_max_share_cents);
            IF p_audiences[k] IN (1, 2) THEN
                INSERT INTO packet_members (packet_id, user_id) SELECT p_packets[k], unnest(list);
            END IF;
            INSERT INTO transfers (kind, debit_account, credit_account, amount_cents, packet_id)
                VALUES (3, w_account[w], escrow, total, p_packets[k]);
            w_balance[w] := bal - total;
            answer := jsonb_build_object('packet_id', p_packets[k], 'balance_cents', bal - total,
                                         'expires_at_ms', p_expires_ms[k]);
            IF p_audiences[k] = 3 THEN
                members := v_audience;
            END IF;
        END decide;
        IF outcome = 0 THEN
            out_keys := out_keys || p_keys[k];
            out_answers := out_answers || answer;
            out_refusals := out_refusals || refusal;
            out_messages := out_messages || CASE WHEN refusal IS NULL THEN NULL ELSE message END;
        END IF;
        RETURN NEXT;
    END LOOP;
    -- Every sender's balance at once, in account-id order (the locks are held).
    UPDATE accounts a SET balance_cents = t.b
        FROM unnest(w_account, w_balance) AS t(id, b)
        WHERE a.account_id = t.id AND a.balance_cents <> t.b;
    PERFORM anbao_store_answers(out_keys, out_answers, out_refusals, out_messages);
END $$;
