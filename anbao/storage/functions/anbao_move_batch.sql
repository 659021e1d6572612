-- DEPOSIT and WITHDRAW by group commit (issue 17).
--
-- Every DEPOSIT and WITHDRAW moves money to or from the one external
-- account, so each held that row's lock until its own commit: one commit
-- (one WAL flush) at a time for the whole database, about 400 a second
-- here; funding 20,000 users took 47 s. anbao_move_batch runs a batch of
-- them in one statement and one commit, and updates the external account
-- once per batch.
--
-- Per request it returns (i, outcome, refusal, message, answer), with the
-- outcomes of anbao_send_batch (migration 0012): 0 run now (its answer or
-- refusal stored under its key), 1 replayed, 2 key conflict, 3 a WITHDRAW
-- short of posted money that the user's grabs still waiting for the
-- roll-up would cover (nothing stored; the caller settles and sends it
-- again with p_settled true). answer: {balance_cents, transfer_id}.
--
-- Locks: the external account (kind 0), then the wallets in user order,
-- then, at the end, the keys in key order (anbao_store_keys): accounts in
-- (kind, owner) order, the order of every other writer, so no deadlock.
-- Every request is decided before it is written; a batch fails only as a
-- whole (40001 when another transaction stored one of its keys meanwhile:
-- the caller runs it again).
CREATE OR REPLACE FUNCTION anbao_move_batch(
    p_operation SMALLINT, p_keys BYTEA[], p_hashes BYTEA[], p_users BIGINT[], p_amounts BIGINT[],
    p_settled BOOLEAN[])
RETURNS TABLE (i INTEGER, outcome SMALLINT, refusal TEXT, message TEXT, answer JSONB)
LANGUAGE plpgsql AS $$
DECLARE
    hash_join TEXT;
    merge_join TEXT;
    seq_scan TEXT;
    n INTEGER := cardinality(p_keys);
    deposit BOOLEAN := p_operation = 17;  -- Operation.DEPOSIT; else WITHDRAW (19)
    external BIGINT;
    external_delta BIGINT := 0;
    w_owner BIGINT[];
    w_account BIGINT[];
    w_balance BIGINT[];
    replayed BYTEA[] := '{}';
    stored RECORD;
    k INTEGER;
    w INTEGER;
    amount BIGINT;
    bal BIGINT;
    tid BIGINT;
    out_keys BYTEA[] := '{}';
    out_hashes BYTEA[] := '{}';
    out_answers JSONB[] := '{}';
    out_refusals TEXT[] := '{}';
    out_messages TEXT[] := '{}';
BEGIN
    ASSERT p_operation IN (17, 19), 'anbao_move_batch: DEPOSIT (17) or WITHDRAW (19)';
    SELECT x.account_id INTO external FROM accounts x WHERE x.kind = 0 FOR NO KEY UPDATE;
    SELECT array_agg(a.owner_id ORDER BY a.account_id), array_agg(a.account_id ORDER BY a.account_id),
           array_agg(a.balance_cents ORDER BY a.account_id)
        INTO w_owner, w_account, w_balance
        FROM (SELECT x.owner_id, x.account_id, x.balance_cents FROM accounts x
              WHERE x.kind = 1 AND x.owner_id = ANY(p_users) ORDER BY x.owner_id FOR NO KEY UPDATE) a;
    -- Keys stored before are replayed; the others are stored once, with
    -- their answers, at the end (anbao_store_keys).
    FOR stored IN SELECT * FROM anbao_stored_answers(p_operation, p_keys, p_hashes, '{}') LOOP
        i := stored.i; outcome := stored.outcome; refusal := stored.refusal; message := stored.message;
        answer := stored.answer;
        replayed := replayed || p_keys[stored.i];
        RETURN NEXT;
    END LOOP;
    FOR k IN 1 .. n LOOP
        i := k; outcome := 0; refusal := NULL; message := ''; answer := NULL;
        CONTINUE WHEN p_keys[k] = ANY(replayed);
        amount := p_amounts[k];
        w := array_position(w_owner, p_users[k]);
        IF w IS NULL THEN
            refusal := 'UNKNOWN_USER'; message := format('unknown user %s', p_users[k]);
        ELSIF deposit THEN
            INSERT INTO transfers (kind, debit_account, credit_account, amount_cents)
                VALUES (1, external, w_account[w], amount) RETURNING transfer_id INTO tid;
            w_balance[w] := w_balance[w] + amount;
            external_delta := external_delta - amount;
            answer := jsonb_build_object('balance_cents', w_balance[w], 'transfer_id', tid);
        ELSE
            bal := w_balance[w];
            IF bal < amount AND NOT p_settled[k] AND bal + (
                    SELECT COALESCE(sum(g.amount_cents), 0) FROM grab_rollups r
                    CROSS JOIN LATERAL unnest(r.users, r.amounts) AS g(user_id, amount_cents)
                    WHERE p_users[k] = ANY(r.users) AND g.user_id = p_users[k]) >= amount THEN
                outcome := 3;
            ELSIF bal < amount THEN
                refusal := 'INSUFFICIENT_FUNDS'; message := format('balance %s cents below %s cents', bal, amount);
            ELSE
                INSERT INTO transfers (kind, debit_account, credit_account, amount_cents)
                    VALUES (2, w_account[w], external, amount) RETURNING transfer_id INTO tid;
                w_balance[w] := bal - amount;
                external_delta := external_delta + amount;
                answer := jsonb_build_object('balance_cents', w_balance[w], 'transfer_id', tid);
            END IF;
        END IF;
        IF outcome = 0 THEN
            out_keys := out_keys || p_keys[k];
            out_hashes := out_hashes || p_hashes[k];
            out_answers := out_answers || answer;
            out_refusals := out_refusals || refusal;
            out_messages := out_messages || CASE WHEN refusal IS NULL THEN NULL ELSE message END;
        END IF;
        RETURN NEXT;
    END LOOP;
    UPDATE accounts a SET balance_cents = a.balance_cents + external_delta
        WHERE a.account_id = external AND external_delta <> 0;
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
