-- BALANCE across sets (issue 11): a wallet's credits still on their way
-- from other sets are read per user, at both ends (storage/sets.py
-- owed_to / balance_at_home): at the sender its credits_out rows for
-- (dest_set, user), at the home set the copies it has applied from each
-- sender. Rows per user are few; without this both were a scan of every
-- credit ever sent. The roll-up pays one index entry per cross-set credit,
-- off the grab path.
CREATE INDEX credits_out_by_user ON credits_out (user_id, dest_set);
