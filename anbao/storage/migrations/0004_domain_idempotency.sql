-- anbao schema v4: an idempotency key holds storage's own answer, not the
-- wire bytes of the reply. The server encodes the answer afresh on every
-- replay, so a protocol change no longer changes what an old key replays.
--
-- Before: opcode (the wire opcode), status (the wire status, 0 = OK) and
-- response (the wire answer body: for OK DEPOSIT 0x11 and WITHDRAW 0x13,
-- balance_cents i64 and transfer_id u64, big-endian; for OK SEND 0x20,
-- packet_id u64, sender_balance_cents i64, expires_at_ms i64; for a refusal,
-- the UTF-8 message).
-- After: operation (the same codes, storage's own now, anbao/storage/
-- domain.py Operation; they enter the request hash, so they never change),
-- answer (a JSON object of ints), or refusal (the name of the reason,
-- domain.py Reason, which is the name of the wire status it is answered
-- with) and message.

ALTER TABLE idempotency_keys RENAME COLUMN opcode TO operation;
ALTER TABLE idempotency_keys ADD COLUMN answer JSONB, ADD COLUMN refusal TEXT, ADD COLUMN message TEXT;

-- Every stored row must be one this migration knows how to read; anything
-- else stops the upgrade (the whole migration rolls back) rather than
-- replaying something other than what was first answered.
DO $$
DECLARE
    bad RECORD;
BEGIN
    SELECT encode(key, 'hex') AS key, operation, status, length(response) AS bytes INTO bad
    FROM idempotency_keys
    WHERE status IS NOT NULL AND NOT (
           (status = 0 AND operation IN (17, 19) AND length(response) = 16)
        OR (status = 0 AND operation = 32 AND length(response) = 24)
        OR (status IN (5, 6, 11, 12, 13, 17) AND response IS NOT NULL))
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'idempotency key % (operation %, status %, % bytes): no known answer layout',
            bad.key, bad.operation, bad.status, bad.bytes;
    END IF;
END $$;

-- An i64 (signed) and a u64 (unsigned) from 8 big-endian bytes at `at` (1-based).
CREATE FUNCTION pg_temp.be_i64(b BYTEA, at INTEGER) RETURNS BIGINT LANGUAGE sql IMMUTABLE AS $$
    SELECT ('x' || encode(substring(b FROM at FOR 8), 'hex'))::bit(64)::bigint
$$;
CREATE FUNCTION pg_temp.be_u64(b BYTEA, at INTEGER) RETURNS NUMERIC LANGUAGE sql IMMUTABLE AS $$
    SELECT pg_temp.be_i64(b, at)::numeric
           + CASE WHEN pg_temp.be_i64(b, at) < 0 THEN 18446744073709551616 ELSE 0 END
$$;

UPDATE idempotency_keys SET answer = CASE
        WHEN operation IN (17, 19) THEN jsonb_build_object(
            'balance_cents', pg_temp.be_i64(response, 1),
            'transfer_id', pg_temp.be_u64(response, 9))
        ELSE jsonb_build_object(
            'packet_id', pg_temp.be_u64(response, 1),
            'balance_cents', pg_temp.be_i64(response, 9),
            'expires_at_ms', pg_temp.be_i64(response, 17))
    END
WHERE status = 0;

UPDATE idempotency_keys SET
    refusal = CASE status
        WHEN 5 THEN 'INSUFFICIENT_FUNDS'
        WHEN 6 THEN 'INVALID'
        WHEN 11 THEN 'NOT_FOUND'
        WHEN 12 THEN 'UNKNOWN_USER'
        WHEN 13 THEN 'IDEMPOTENCY_CONFLICT'
        WHEN 17 THEN 'UNKNOWN_GROUP'
    END,
    message = convert_from(response, 'UTF8')
WHERE status <> 0;

DROP FUNCTION pg_temp.be_u64(BYTEA, INTEGER);
DROP FUNCTION pg_temp.be_i64(BYTEA, INTEGER);

ALTER TABLE idempotency_keys DROP COLUMN status, DROP COLUMN response;
-- An answer or a refusal with its message, never both; neither only while
-- the first request is in progress (its transaction not committed).
ALTER TABLE idempotency_keys
    ADD CONSTRAINT idempotency_answer_or_refusal CHECK (answer IS NULL OR refusal IS NULL),
    ADD CONSTRAINT idempotency_refusal_message CHECK ((refusal IS NULL) = (message IS NULL)),
    ADD CONSTRAINT idempotency_answer_object CHECK (answer IS NULL OR jsonb_typeof(answer) = 'object');
