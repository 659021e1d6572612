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
--              waiting for the roll-up would cover it: nothing stored; the
--              caller settles the sender and sends it
--              again with p_settled true (then a short balance is refused).
--   outcome 4: the sender's wallet is locked by another transaction (a
--              roll-up crediting it, most often): nothing stored; the
--              caller puts it in its next batch. Unless
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
-- user order (accounts in (kind, owner) order, as the roll-up, the credit
-- apply and the other writers lock them), and stores
-- its keys last, in key order, in one statement; nothing else it writes is
-- visible to anyone before it commits. Every SEND is decided before it is
-- written, so one refusal never aborts the batch: a batch fails only as a
-- whole (the database's fault, or 40001 when another batch stored one of
-- its keys meanwhile: the caller runs it again, and that key replays), and
-- then nothing in it happened.
--
-- The loop only decides; the decided SENDs' rows (escrows, packets,
-- transfers, direct audiences' members) are then written one statement per
-- kind for the whole batch, in arrival order: per-statement start-up and
-- the foreign-key checks cost less once per batch than once per SEND
-- (pg_stat_statements, issue 17).
CREATE OR REPLACE FUNCTION anbao_send_batch(
    p_operation SMALLINT, p_keys BYTEA[], p_hashes BYTEA[], p_packets BIGINT[], p_senders BIGINT[],
    p_totals BIGINT[], p_counts INTEGER[], p_modes SMALLINT[], p_expires_ms BIGINT[], p_audiences SMALLINT[],
    p_groups BIGINT[], p_member_ids BIGINT[], p_member_ends INTEGER[], p_greetings TEXT[], p_settled BOOLEAN[],
    p_min_share_cents BIGINT, p_max_share_cents BIGINT, p_daily_max_cents BIGINT, p_daily_max_packets INTEGER,
    p_utc_day INTEGER, p_patient BOOLEAN)
RETURNS TABLE (i INTEGER, outcome SMALLINT, refusal TEXT, message TEXT, answer JSONB, members BIGINT[],
               created_ms BIGINT)
LANGUAGE plpgsql AS $$
DECLARE
    hash_join TEXT;
    merge_join TEXT;
    seq_scan TEXT;
    n INTEGER := cardinality(p_keys);
    w_busy BIGINT[] := '{}';
    replayed BYTEA[] := '{}';
    w_owner BIGINT[];
    w_account BIGINT[];
    w_balance BIGINT[];
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
    m_from INTEGER;
    list BIGINT[];
    out_keys BYTEA[] := '{}';
    out_hashes BYTEA[] := '{}';
    out_answers JSONB[] := '{}';
    out_refusals TEXT[] := '{}';
    out_messages TEXT[] := '{}';
    d_idx INTEGER[] := '{}';        -- the SENDs decided OK, in arrival order
    d_versions BIGINT[] := '{}';    -- their groups' versions (NULL: not to a group)
    d_accounts BIGINT[] := '{}';    -- their senders' wallets
BEGIN
    created_ms := (extract(epoch FROM now()) * 1000)::bigint;
    IF p_patient THEN
        SELECT array_agg(a.owner_id ORDER BY a.account_id), array_agg(a.account_id ORDER BY a.account_id),
               array_agg(a.balance_cents ORDER BY a.account_id)
            INTO w_owner, w_account, w_balance
            FROM (SELECT x.owner_id, x.account_id, x.balance_cents FROM accounts x
                  WHERE x.kind = 1 AND x.owner_id = ANY(p_senders) ORDER BY x.owner_id FOR NO KEY UPDATE) a;
    ELSE
        SELECT array_agg(a.owner_id ORDER BY a.account_id), array_agg(a.account_id ORDER BY a.account_id),
               array_agg(a.balance_cents ORDER BY a.account_id)
            INTO w_owner, w_account, w_balance
            FROM (SELECT x.owner_id, x.account_id, x.balance_cents FROM accounts x
                  WHERE x.kind = 1 AND x.owner_id = ANY(p_senders) ORDER BY x.owner_id
                  FOR NO KEY UPDATE SKIP LOCKED) a;
        -- A sender with a wallet that was not locked: someone else holds it.
        SELECT COALESCE(array_agg(x.owner_id), '{}') INTO w_busy FROM accounts x
            WHERE x.kind = 1 AND x.owner_id = ANY(p_senders) AND NOT x.owner_id = ANY(COALESCE(w_owner, '{}'));
    END IF;
    -- Keys stored before (committed) are replayed; the others are stored
    -- once, with their answers, at the end (anbao_store_keys).
    FOR stored IN SELECT * FROM anbao_stored_answers(p_operation, p_keys, p_hashes, '{}') LOOP
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
        IF p_keys[k] = ANY(replayed) THEN
            CONTINUE;
        END IF;
        IF p_senders[k] = ANY(w_busy) THEN
            outcome := 4;
            RETURN NEXT;
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
            -- Decided: written with the others after the loop (nothing
            -- decided later reads these rows).
            d_idx := d_idx || k;
            d_versions := d_versions || v_version;
            d_accounts := d_accounts || w_account[w];
            w_balance[w] := bal - total;
            answer := jsonb_build_object('packet_id', p_packets[k], 'balance_cents', bal - total,
                                         'expires_at_ms', p_expires_ms[k]);
            IF p_audiences[k] = 3 THEN
                members := v_audience;
            END IF;
        END decide;
        IF outcome = 0 THEN
            out_keys := out_keys || p_keys[k];
            out_hashes := out_hashes || p_hashes[k];
            out_answers := out_answers || answer;
            out_refusals := out_refusals || refusal;
            out_messages := out_messages || CASE WHEN refusal IS NULL THEN NULL ELSE message END;
        END IF;
        RETURN NEXT;
    END LOOP;
    -- The decided SENDs' rows, each kind in one statement for the batch,
    -- in arrival order: the escrows (created holding their totals), the
    -- packets, the transfers that are what the escrows hold (the audit
    -- recomputes every balance from its transfers) and their SENT events,
    -- then direct audiences' member lists. The events are written here, not
    -- by the transfers' trigger, which this transaction tells to skip them
    -- (migration 0018): one statement instead of a call per SEND.
    IF cardinality(d_idx) > 0 THEN
        PERFORM set_config('anbao.sent_events', 'batch', true);
        WITH e AS (
            INSERT INTO accounts (kind, owner_id, balance_cents)
                SELECT 2, p_packets[t.k], p_totals[t.k] FROM unnest(d_idx) WITH ORDINALITY AS t(k, o)
                ORDER BY t.o
                RETURNING account_id, owner_id),
        pk AS (
            INSERT INTO packets (packet_id, sender_id, escrow_account_id, total_cents, share_count, mode,
                                 min_share_cents, audience, greeting, expires_at, group_id, group_version,
                                 max_share_cents)
                SELECT p_packets[t.k], p_senders[t.k], e.account_id, p_totals[t.k], p_counts[t.k], p_modes[t.k],
                       p_min_share_cents, p_audiences[t.k], p_greetings[t.k],
                       to_timestamp(p_expires_ms[t.k]::float8 / 1000), NULLIF(p_groups[t.k], 0), t.v,
                       p_max_share_cents
                FROM unnest(d_idx, d_versions) WITH ORDINALITY AS t(k, v, o)
                JOIN e ON e.owner_id = p_packets[t.k]
                ORDER BY t.o),
        tr AS (
            INSERT INTO transfers (kind, debit_account, credit_account, amount_cents, packet_id)
                SELECT 3, t.a, e.account_id, p_totals[t.k], p_packets[t.k]
                FROM unnest(d_idx, d_accounts) WITH ORDINALITY AS t(k, a, o)
                JOIN e ON e.owner_id = p_packets[t.k]
                ORDER BY t.o
                RETURNING transfer_id, created_at, packet_id, amount_cents)
        -- As anbao_transfer_event writes a SENT event: kind 1, the sender,
        -- the share count; in arrival order, as the trigger fired.
        INSERT INTO event_log (kind, transfer_id, at, packet_id, user_id, seq, count, amount_cents)
            SELECT 1, tr.transfer_id, tr.created_at, tr.packet_id, p_senders[t.k], 0, p_counts[t.k], tr.amount_cents
            FROM unnest(d_idx) WITH ORDINALITY AS t(k, o)
            JOIN tr ON tr.packet_id = p_packets[t.k]
            ORDER BY t.o;
        INSERT INTO packet_members (packet_id, user_id)
            SELECT p_packets[t.k], m.u FROM unnest(d_idx) AS t(k)
            CROSS JOIN LATERAL unnest(p_member_ids[COALESCE(p_member_ends[t.k - 1], 0) + 1 : p_member_ends[t.k]]) AS m(u)
            WHERE p_audiences[t.k] IN (1, 2);
    END IF;
    -- Every sender's balance at once, in account-id order (the locks are held).
    -- By key, whatever the table's size when this was first planned:
    -- PL/pgSQL keeps the plan, and one made while accounts was small hashed
    -- all of it (a seq scan) for every batch after (tests/test_plans.py). A
    -- merge join would read all of it by its index.
    hash_join := current_setting('enable_hashjoin');
    merge_join := current_setting('enable_mergejoin');
    seq_scan := current_setting('enable_seqscan');
    PERFORM set_config('enable_hashjoin', 'off', true), set_config('enable_mergejoin', 'off', true),
            set_config('enable_seqscan', 'off', true);
    UPDATE accounts a SET balance_cents = t.b
        FROM unnest(w_account, w_balance) AS t(id, b)
        WHERE a.account_id = t.id AND a.balance_cents <> t.b;
    PERFORM set_config('enable_hashjoin', hash_join, true), set_config('enable_mergejoin', merge_join, true),
            set_config('enable_seqscan', seq_scan, true);
    PERFORM anbao_store_keys(p_operation, out_keys, out_hashes, out_answers, out_refusals, out_messages);
END $$;
