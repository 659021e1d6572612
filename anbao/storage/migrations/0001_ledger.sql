-- anbao schema v1: a double-entry ledger, packets, claims, idempotency.
-- Every amount is BIGINT cents. A balance is a cached sum of its transfers
-- (the audit recomputes it); the CHECKs make the database itself refuse an
-- overdraft or an oversold packet, whatever the server believes.

CREATE TABLE accounts (
    account_id    BIGSERIAL PRIMARY KEY,
    kind          SMALLINT NOT NULL CHECK (kind IN (0, 1, 2)),  -- 0 external world, 1 user wallet, 2 packet escrow
    owner_id      BIGINT   NOT NULL,                            -- user id, packet id, or 0 for external
    balance_cents BIGINT   NOT NULL DEFAULT 0,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT accounts_owner_unique UNIQUE (kind, owner_id),
    -- Only the external account may go below zero: it is where deposits come from.
    CONSTRAINT accounts_no_overdraft CHECK (kind = 0 OR balance_cents >= 0)
);
INSERT INTO accounts (kind, owner_id) VALUES (0, 0);

CREATE TABLE transfers (
    transfer_id    BIGSERIAL PRIMARY KEY,
    kind           SMALLINT NOT NULL,   -- 1 deposit, 2 withdraw, 3 send, 4 grab, 5 refund
    debit_account  BIGINT   NOT NULL REFERENCES accounts,
    credit_account BIGINT   NOT NULL REFERENCES accounts,
    amount_cents   BIGINT   NOT NULL CHECK (amount_cents > 0),
    packet_id      BIGINT,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK (debit_account <> credit_account)
);

CREATE SEQUENCE packet_seq;
-- Each worker takes a block of 2^20 batch ids per nextval, so batch ids are
-- unique across workers and restarts without a round trip per batch.
CREATE SEQUENCE grab_batch_block_seq;

CREATE TABLE packets (
    packet_id         BIGINT PRIMARY KEY,
    sender_id         BIGINT   NOT NULL,
    escrow_account_id BIGINT   NOT NULL REFERENCES accounts,
    total_cents       BIGINT   NOT NULL CHECK (total_cents > 0),
    share_count       INTEGER  NOT NULL CHECK (share_count > 0),
    mode              SMALLINT NOT NULL CHECK (mode IN (1, 2)),
    min_share_cents   BIGINT   NOT NULL CHECK (min_share_cents >= 1),
    audience          SMALLINT NOT NULL CHECK (audience IN (0, 1, 2)),
    greeting          TEXT     NOT NULL DEFAULT '',
    status            SMALLINT NOT NULL DEFAULT 0,  -- 0 open, 1 sold out, 2 expired, 3 refunded
    claimed_count     INTEGER  NOT NULL DEFAULT 0,
    claimed_cents     BIGINT   NOT NULL DEFAULT 0,
    refunded_cents    BIGINT   NOT NULL DEFAULT 0,
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at        TIMESTAMPTZ NOT NULL,
    CHECK (total_cents >= share_count * min_share_cents),
    CONSTRAINT packets_no_oversale CHECK (claimed_count <= share_count),
    CONSTRAINT packets_no_overspend CHECK (claimed_cents + refunded_cents <= total_cents)
);

CREATE TABLE packet_members (
    packet_id BIGINT NOT NULL REFERENCES packets,
    user_id   BIGINT NOT NULL,
    PRIMARY KEY (packet_id, user_id)
);

CREATE TABLE claims (
    packet_id    BIGINT  NOT NULL REFERENCES packets,
    seq          INTEGER NOT NULL CHECK (seq >= 1),
    user_id      BIGINT  NOT NULL,
    amount_cents BIGINT  NOT NULL CHECK (amount_cents >= 1),
    batch_id     BIGINT  NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (packet_id, seq),
    CONSTRAINT claims_one_per_user UNIQUE (packet_id, user_id)
);

-- One row per committed grab batch: a commit whose outcome is unknown is
-- resolved by looking for its row, never by running the batch again.
CREATE TABLE grab_batches (
    batch_id     BIGINT PRIMARY KEY,
    grabs        INTEGER NOT NULL,
    committed_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE idempotency_keys (
    key          BYTEA    PRIMARY KEY CHECK (length(key) = 16),
    opcode       SMALLINT NOT NULL,
    request_hash BYTEA    NOT NULL,
    status       SMALLINT,          -- NULL while the first request is in progress
    response     BYTEA,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Commits one batch of grabs: claims, their transfers escrow -> grabber, and
-- the balances and packet counters they move. One statement, so one round
-- trip and one transaction; every check that matters is a constraint, so a
-- batch either lands whole or not at all.
CREATE FUNCTION anbao_commit_grabs(p_batch_id BIGINT, p_packet BIGINT[], p_seq INTEGER[],
                                   p_user BIGINT[], p_amount BIGINT[]) RETURNS INTEGER
LANGUAGE plpgsql AS $$
DECLARE
    n INTEGER := cardinality(p_packet);
BEGIN
    IF n = 0 OR cardinality(p_seq) <> n OR cardinality(p_user) <> n OR cardinality(p_amount) <> n THEN
        RAISE EXCEPTION 'anbao_commit_grabs: arrays of unequal length';
    END IF;
    INSERT INTO grab_batches (batch_id, grabs) VALUES (p_batch_id, n);

    IF to_regclass('pg_temp.g_batch') IS NULL THEN
        CREATE TEMP TABLE g_batch (
            packet_id BIGINT, seq INTEGER, user_id BIGINT, amount_cents BIGINT,
            escrow BIGINT, wallet BIGINT) ON COMMIT DELETE ROWS;
    END IF;
    INSERT INTO g_batch
        SELECT g.packet_id, g.seq, g.user_id, g.amount_cents, p.escrow_account_id, a.account_id
        FROM unnest(p_packet, p_seq, p_user, p_amount) AS g(packet_id, seq, user_id, amount_cents)
        JOIN packets p ON p.packet_id = g.packet_id
        JOIN accounts a ON a.kind = 1 AND a.owner_id = g.user_id;
    IF (SELECT count(*) FROM g_batch) <> n THEN
        RAISE EXCEPTION 'anbao_commit_grabs: unknown packet or user in batch %', p_batch_id;
    END IF;

    -- Lock every touched account in id order, so that concurrent batches
    -- (one per worker) can never deadlock on each other's rows.
    PERFORM 1 FROM accounts
        WHERE account_id IN (SELECT escrow FROM g_batch UNION SELECT wallet FROM g_batch)
        ORDER BY account_id FOR UPDATE;

    INSERT INTO claims (packet_id, seq, user_id, amount_cents, batch_id)
        SELECT packet_id, seq, user_id, amount_cents, p_batch_id FROM g_batch;
    INSERT INTO transfers (kind, debit_account, credit_account, amount_cents, packet_id)
        SELECT 4, escrow, wallet, amount_cents, packet_id FROM g_batch ORDER BY packet_id, seq;

    UPDATE accounts a SET balance_cents = a.balance_cents + s.delta
        FROM (SELECT wallet AS id, sum(amount_cents) AS delta FROM g_batch GROUP BY wallet
              UNION ALL
              SELECT escrow, -sum(amount_cents) FROM g_batch GROUP BY escrow) s
        WHERE a.account_id = s.id;

    UPDATE packets p SET claimed_count = p.claimed_count + s.n,
                         claimed_cents = p.claimed_cents + s.amount,
                         status = CASE WHEN p.claimed_count + s.n = p.share_count THEN 1 ELSE p.status END
        FROM (SELECT packet_id, count(*) AS n, sum(amount_cents) AS amount FROM g_batch GROUP BY packet_id) s
        WHERE p.packet_id = s.packet_id;
    RETURN n;
END $$;
