-- Limits of a payment product (issue 12 item 4).
--
-- A packet remembers the maximum per share it was sent under, so that its
-- in-memory state, rebuilt from this row after a restart, draws its
-- remaining shares under the same cap. 0 means no cap: packets sent before
-- this migration (a constant default: no table rewrite).
ALTER TABLE packets ADD COLUMN max_share_cents BIGINT NOT NULL DEFAULT 0
    CONSTRAINT packets_max_share CHECK (max_share_cents = 0
        OR (max_share_cents >= min_share_cents AND total_cents <= max_share_cents::numeric * share_count));

-- What each user sent on their latest UTC day with a SEND: one row per
-- sender, updated in the SEND transaction under the sender's wallet row
-- lock (and this row's), so two concurrent SENDs cannot both pass a daily
-- cap. utc_day is days since 1970-01-01 UTC; a SEND on a later day starts
-- the counts again. A refused SEND is rolled back with its savepoint.
CREATE TABLE daily_sends (
    user_id    BIGINT  PRIMARY KEY,
    utc_day    INTEGER NOT NULL,
    sent_cents BIGINT  NOT NULL CHECK (sent_cents >= 0),
    sent_count INTEGER NOT NULL CHECK (sent_count >= 0)
);
