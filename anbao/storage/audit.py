"""The audit: recomputes the money invariants of docs/ARCHITECTURE.md (I1-I5, I13 and
the refund half of I14) from the tables.

A committed grab is first an element of its batch's grab_rollups row, and
only later (the roll-up) a claim row, a transfer and balance changes;
until then its money is still in the packet's escrow. So balances, packet
counters and transfers are checked against the rolled-up claims, the rules
every claim obeys (one per user, numbered 1..n, eligible, at least the
minimum) against all of them (claims_all), and no claim may be both.

Each check is one query that returns the rows that break it, so a clean
ledger returns nothing and a broken one names what is wrong. All of them
read one snapshot, so a live server cannot make two checks disagree.

"Every expired packet refunded" needs a grace: a live server refunds a
packet within about one sweep interval of its expiry (plus the batch in
flight), and holds refunds back while its database is away. A packet past
expiry by more than the grace and still not refunded is a violation; with a
grace of 0 (after the refunds are known to be done) every one is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import asyncpg

from .domain import AccountKind as A
from .domain import Audience
from .domain import PacketStatus as P
from .domain import TransferKind as T

CHECKS: list[tuple[str, str]] = [
    (
        "balance equals the sum of its transfers",
        """SELECT a.account_id, a.kind, a.owner_id, a.balance_cents,
               COALESCE(c.s, 0) - COALESCE(d.s, 0) AS from_transfers
        FROM accounts a
        LEFT JOIN (SELECT credit_account AS id, sum(amount_cents) AS s FROM transfers GROUP BY 1) c
               ON c.id = a.account_id
        LEFT JOIN (SELECT debit_account AS id, sum(amount_cents) AS s FROM transfers GROUP BY 1) d
               ON d.id = a.account_id
        WHERE a.balance_cents <> COALESCE(c.s, 0) - COALESCE(d.s, 0)""",
    ),
    (
        "no wallet or escrow below zero",
        "SELECT account_id, kind, owner_id, balance_cents FROM accounts"
        f" WHERE kind NOT IN ({A.EXTERNAL:d}, {A.CLEARING:d}) AND balance_cents < 0",
    ),
    (
        "all balances sum to deposits minus withdrawals",
        f"""SELECT inside, deposits - withdrawals AS expected FROM (
          SELECT (SELECT COALESCE(sum(balance_cents), 0) FROM accounts WHERE kind <> {A.EXTERNAL:d}) AS inside,
                 (SELECT COALESCE(sum(amount_cents), 0) FROM transfers WHERE kind = {T.DEPOSIT:d}) AS deposits,
                 (SELECT COALESCE(sum(amount_cents), 0) FROM transfers WHERE kind = {T.WITHDRAW:d}) AS withdrawals) t
        WHERE inside <> deposits - withdrawals
           OR (SELECT sum(balance_cents) FROM accounts) <> 0""",
    ),
    (
        "packet counters equal its rolled-up claims; all its claims never above its count, numbered 1..n",
        """SELECT p.packet_id, p.share_count, p.claimed_count, p.claimed_cents, r.n AS rolled_n, r.s AS rolled_s,
               a.n AS all_n, a.max_seq
        FROM packets p
        LEFT JOIN (SELECT packet_id, count(*) AS n, sum(amount_cents) AS s FROM claims GROUP BY 1) r
               ON r.packet_id = p.packet_id
        LEFT JOIN (SELECT packet_id, count(*) AS n, max(seq) AS max_seq FROM claims_all GROUP BY 1) a
               ON a.packet_id = p.packet_id
        WHERE p.claimed_count <> COALESCE(r.n, 0) OR p.claimed_cents <> COALESCE(r.s, 0)
           OR COALESCE(a.n, 0) > p.share_count OR COALESCE(a.max_seq, 0) <> COALESCE(a.n, 0)""",
    ),
    (
        "no claim is both rolled up and waiting for its roll-up",
        """SELECT c.packet_id, c.seq, c.batch_id, r.batch_id AS pending_batch
        FROM grab_rollups r
        CROSS JOIN LATERAL unnest(r.packets, r.seqs) AS g(packet_id, seq)
        JOIN claims c ON c.packet_id = g.packet_id AND c.seq = g.seq""",
    ),
    (
        "escrow holds exactly total - claimed - refunded",
        """SELECT p.packet_id, p.total_cents, p.claimed_cents, p.refunded_cents, a.balance_cents
        FROM packets p JOIN accounts a ON a.account_id = p.escrow_account_id
        WHERE a.balance_cents <> p.total_cents - p.claimed_cents - p.refunded_cents""",
    ),
    (
        "a sold-out packet gave out its whole total; a refunded one claimed + refunded = total",
        f"""SELECT packet_id, status, total_cents, claimed_cents, refunded_cents FROM packets
        WHERE (claimed_count = share_count AND claimed_cents + refunded_cents <> total_cents)
           OR (status = {P.REFUNDED:d} AND claimed_cents + refunded_cents <> total_cents)
           OR (status = {P.SOLD_OUT:d} AND claimed_count <> share_count)""",
    ),
    (
        "every share at least the minimum, and the sender funded the escrow exactly once",
        f"""SELECT p.packet_id, 'share below minimum' AS what FROM packets p JOIN claims_all c USING (packet_id)
        WHERE c.amount_cents < p.min_share_cents
        UNION ALL
        SELECT p.packet_id, 'send transfers: ' || COALESCE(t.n, 0) FROM packets p
        LEFT JOIN (SELECT packet_id, count(*) AS n, sum(amount_cents) AS s FROM transfers WHERE kind = {T.SEND:d}
                   GROUP BY 1) t ON t.packet_id = p.packet_id
        WHERE COALESCE(t.n, 0) <> 1 OR t.s <> p.total_cents""",
    ),
    (
        "grab transfers (to a wallet here or to another set) match the rolled-up claims one for one",
        f"""SELECT c.packet_id, c.n, c.s, t.n AS transfers, t.s AS transferred FROM
          (SELECT packet_id, count(*) AS n, sum(amount_cents) AS s FROM claims GROUP BY 1) c
        FULL JOIN (SELECT packet_id, count(*) AS n, sum(amount_cents) AS s FROM transfers
                   WHERE kind IN ({T.GRAB:d}, {T.CROSS_OUT:d}) GROUP BY 1) t ON t.packet_id = c.packet_id
        WHERE c.n IS DISTINCT FROM t.n OR c.s IS DISTINCT FROM t.s""",
    ),
    (
        "every expired packet refunded (after the grace)",
        f"""SELECT packet_id, status, expires_at, total_cents - claimed_cents - refunded_cents AS unrefunded_cents
        FROM packets
        WHERE status IN ({P.OPEN:d}, {P.EXPIRED:d})
          AND expires_at < now() - make_interval(secs => :grace_ms / 1000.0)""",
    ),
    (
        "a refunded packet has exactly one refund, of its remainder, to its sender",
        f"""SELECT COALESCE(p.packet_id, t.packet_id) AS packet_id, p.status, p.refunded_cents, t.n, t.s
        FROM packets p
        FULL JOIN (SELECT packet_id, count(*) AS n, sum(amount_cents) AS s FROM transfers WHERE kind = {T.REFUND:d}
                   GROUP BY 1) t ON t.packet_id = p.packet_id
        WHERE p.packet_id IS NULL OR COALESCE(t.s, 0) <> p.refunded_cents
           OR (p.status = {P.REFUNDED:d}) <> (COALESCE(t.n, 0) = 1) OR COALESCE(t.n, 0) > 1""",
    ),
    (
        "every transfer moves between the accounts its kind allows",
        f"""SELECT t.transfer_id, t.kind, t.packet_id, d.kind AS debit_kind, c.kind AS credit_kind
        FROM transfers t
        LEFT JOIN accounts d ON d.account_id = t.debit_account   -- no foreign keys: a dangling id shows here
        LEFT JOIN accounts c ON c.account_id = t.credit_account
        LEFT JOIN packets p ON p.packet_id = t.packet_id
        WHERE ((t.kind = {T.DEPOSIT:d} AND d.kind = {A.EXTERNAL:d} AND c.kind = {A.USER:d} AND t.packet_id IS NULL)
            OR (t.kind = {T.WITHDRAW:d} AND d.kind = {A.USER:d} AND c.kind = {A.EXTERNAL:d} AND t.packet_id IS NULL)
            OR (t.kind = {T.SEND:d} AND d.kind = {A.USER:d} AND d.owner_id = p.sender_id
                           AND c.account_id = p.escrow_account_id)
            OR (t.kind = {T.GRAB:d} AND d.account_id = p.escrow_account_id AND c.kind = {A.USER:d})
            OR (t.kind = {T.REFUND:d} AND d.account_id = p.escrow_account_id AND c.kind = {A.USER:d}
                           AND c.owner_id = p.sender_id)
            OR (t.kind = {T.CROSS_OUT:d} AND d.account_id = p.escrow_account_id AND c.kind = {A.CLEARING:d})
            OR (t.kind = {T.CROSS_IN:d} AND d.kind = {A.CLEARING:d} AND c.kind IN ({A.USER:d}, {A.SUSPENSE:d})
                           AND t.packet_id IS NOT NULL)) IS NOT TRUE""",
    ),
    (
        "outbound credits match the transfers to clearing one for one; each inbound credit applied once",
        f"""SELECT 'out' AS side, o.dest_set AS peer, o.n, o.s, t.n AS transfers, t.s AS transferred FROM
          (SELECT c.dest_set, count(*) AS n, sum(c.amount_cents) AS s FROM credits_out c
           WHERE c.src_set = (SELECT set_id FROM anbao_set_identity) GROUP BY 1) o
        FULL JOIN (SELECT a.owner_id AS dest_set, count(*) AS n, sum(t.amount_cents) AS s FROM transfers t
                   JOIN accounts a ON a.account_id = t.credit_account WHERE t.kind = {T.CROSS_OUT:d} GROUP BY 1) t
               ON t.dest_set = o.dest_set
        WHERE o.n IS DISTINCT FROM t.n OR o.s IS DISTINCT FROM t.s
        UNION ALL
        SELECT 'in', c.src_set, c.credit_id, c.amount_cents, t.transfer_id, t.amount_cents FROM credits_held c
        LEFT JOIN transfers t ON t.transfer_id = c.applied_transfer_id AND t.kind = {T.CROSS_IN:d}
        WHERE c.dest_set = (SELECT set_id FROM anbao_set_identity)
          AND (t.transfer_id IS NULL OR t.amount_cents <> c.amount_cents)
        UNION ALL
        SELECT 'in-transfers', NULL, i.n, i.s, c.n, c.s FROM
          (SELECT count(*) AS n, COALESCE(sum(amount_cents), 0) AS s FROM transfers WHERE kind = {T.CROSS_IN:d}) i,
          (SELECT count(*) AS n, COALESCE(sum(amount_cents), 0) AS s FROM credits_held
           WHERE dest_set = (SELECT set_id FROM anbao_set_identity)) c
        WHERE i.n <> c.n OR i.s <> c.s""",
    ),
    (
        "credit_totals match the credits held, pair by pair",
        """SELECT COALESCE(t.src_set, c.src_set) AS src_set, COALESCE(t.dest_set, c.dest_set) AS dest_set,
               t.credits, c.n, t.cents, c.s, t.max_apply_lag, c.lag
        FROM credit_totals t
        FULL JOIN (SELECT src_set, dest_set, count(*) AS n, sum(amount_cents) AS s,
                          max(applied_at - created_at) AS lag
                   FROM credits_held GROUP BY src_set, dest_set) c
               ON c.src_set = t.src_set AND c.dest_set = t.dest_set
        WHERE t.credits IS DISTINCT FROM c.n OR t.cents IS DISTINCT FROM c.s
           OR t.max_apply_lag IS DISTINCT FROM c.lag""",
    ),
    (
        "every idempotency key holds its answer",
        "SELECT encode(key, 'hex') AS key, operation FROM idempotency_keys WHERE answer IS NULL AND refusal IS NULL",
    ),
    (
        "no user claims a packet twice",
        "SELECT packet_id, user_id, count(*) FROM claims_all GROUP BY 1, 2 HAVING count(*) > 1",
    ),
    (
        "only eligible users claimed",
        f"""SELECT c.packet_id, c.user_id FROM claims_all c JOIN packets p USING (packet_id)
        WHERE (p.audience <> {Audience.OPEN:d} AND NOT EXISTS (SELECT 1 FROM anbao_packet_members(c.packet_id) m(u)
                                                WHERE m.u = c.user_id))
           OR c.user_id = p.sender_id""",
    ),
    (
        "no share above its packet's maximum",
        """SELECT c.packet_id, c.seq, c.amount_cents, p.max_share_cents
        FROM claims_all c JOIN packets p USING (packet_id)
        WHERE p.max_share_cents > 0 AND c.amount_cents > p.max_share_cents""",
    ),
    # The event feed (migration 0005): facts and events agree, both ways.
    # Facts older than the newest pruned event (event_feed.pruned_at) may
    # have lost their events to retention.
    (
        "every deposit, withdrawal, send, refund and cross-set credit has its event",
        f"""SELECT t.transfer_id, t.kind FROM transfers t
        WHERE t.kind IN ({T.DEPOSIT:d}, {T.WITHDRAW:d}, {T.SEND:d}, {T.REFUND:d}, {T.CROSS_IN:d})
          AND t.created_at > (SELECT pruned_at FROM event_feed)
          AND NOT EXISTS (SELECT 1 FROM event_log e WHERE e.transfer_id = t.transfer_id)
          AND NOT EXISTS (SELECT 1 FROM credits_in i   -- a credit batch's one row (0019): an anti-join
                          JOIN event_log e ON e.kind = 8 AND e.transfer_id = i.first_transfer_id
                          CROSS JOIN LATERAL unnest(i.transfer_ids) AS x(transfer_id)
                          WHERE x.transfer_id = t.transfer_id)""",
    ),
    (
        "every grab batch has its event (so every claim its share-taken event)",
        """SELECT b.batch_id FROM (SELECT batch_id, min(created_at) AS at FROM claims_all GROUP BY 1) b
        WHERE b.at > (SELECT pruned_at FROM event_feed)
          AND NOT EXISTS (SELECT 1 FROM event_log e WHERE e.batch_id = b.batch_id)""",
    ),
    (
        "no event without its fact",
        """SELECT e.id, e.kind, e.transfer_id, e.batch_id FROM event_log e
        WHERE (e.transfer_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM transfers t WHERE t.transfer_id = e.transfer_id))
           OR (e.batch_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM claims c WHERE c.batch_id = e.batch_id)
                                      AND NOT EXISTS (SELECT 1 FROM grab_rollups r WHERE r.batch_id = e.batch_id))
           OR (e.batch_id IS NULL AND e.transfer_id IS NULL)
           OR (e.kind = 8 AND NOT EXISTS (SELECT 1 FROM credits_in i WHERE i.first_transfer_id = e.transfer_id))""",
    ),
    (
        "events are numbered 1..n without gap or repeat, a batch as many as its events",
        """SELECT e.id, e.first_no, e.last_no, e.prev_last FROM (
            SELECT id, first_no, last_no, batch_id, kind, transfer_id,
                   lag(last_no, 1, (SELECT pruned_through FROM event_feed)) OVER (ORDER BY last_no) AS prev_last
            FROM event_log WHERE last_no IS NOT NULL) e
        WHERE e.first_no <> e.prev_last + 1
           OR e.last_no - e.first_no + 1 <> CASE WHEN e.kind = 8 THEN (SELECT cardinality(i.transfer_ids)
                                                                        FROM credits_in i
                                                                        WHERE i.first_transfer_id = e.transfer_id)
                                                 WHEN e.batch_id IS NULL THEN 1
                                                 ELSE (SELECT count(*) FROM anbao_batch_events(e.batch_id)) END
           OR e.last_no > (SELECT numbered_through FROM event_feed)
        UNION ALL
        SELECT NULL, NULL, f.numbered_through, NULL FROM event_feed f
        WHERE f.numbered_through <> COALESCE((SELECT max(last_no) FROM event_log), f.pruned_through)""",
    ),
]


MAX_ROWS_SHOWN = 20
_MOVED_CENTS = "SELECT COALESCE(sum(amount_cents), 0)::bigint FROM transfers WHERE kind = {kind:d}"


@dataclass
class AuditReport:
    counts: dict = field(default_factory=dict)
    violations: dict = field(default_factory=dict)  # check name -> offending rows (first 20)
    refund_grace_ms: int = 0

    @property
    def ok(self) -> bool:
        return not self.violations

    @property
    def check_names(self) -> list[str]:
        return [name for name, _ in CHECKS]

    def text(self) -> str:
        lines = [
            "anbao audit: "
            + ("OK" if self.ok else f"{len(self.violations)} invariant(s) VIOLATED")
            + f" ({len(CHECKS)} checks, refund grace {self.refund_grace_ms / 1000:g} s)"
        ]
        lines += [f"  {k:>22}: {v}" for k, v in self.counts.items()]
        for name, _ in CHECKS:
            mark = "FAIL" if name in self.violations else "ok"
            lines.append(f"  [{mark:>4}] {name}")
            for row in self.violations.get(name, []):
                lines.append(f"         {row}")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {
            "ok": self.ok,
            "counts": self.counts,
            "violations": self.violations,
            "checks": self.check_names,
            "refund_grace_ms": self.refund_grace_ms,
        }


async def audit(dsn: str, refund_grace_ms: int | None = None) -> AuditReport:
    """Runs every check; refund_grace_ms defaults to the server's (config.ExpiryTuning)."""
    if refund_grace_ms is None:
        from ..config import ExpiryTuning

        refund_grace_ms = ExpiryTuning().refund_grace_ms
    assert refund_grace_ms >= 0
    conn = await asyncpg.connect(dsn)
    try:
        report = AuditReport(refund_grace_ms=refund_grace_ms)
        # One snapshot for every check, so a live server cannot make two
        # checks disagree with each other.
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            for name, sql in [
                ("accounts", f"SELECT count(*) FROM accounts WHERE kind = {A.USER:d}"),
                ("packets", "SELECT count(*) FROM packets"),
                ("claims", "SELECT count(*) FROM claims_all"),
                ("claims_awaiting_rollup", "SELECT COALESCE(sum(cardinality(packets)), 0)::bigint FROM grab_rollups"),
                ("transfers", "SELECT count(*) FROM transfers"),
                ("deposited_cents", _MOVED_CENTS.format(kind=T.DEPOSIT)),
                ("withdrawn_cents", _MOVED_CENTS.format(kind=T.WITHDRAW)),
                ("refunded_packets", f"SELECT count(*) FROM packets WHERE status = {P.REFUNDED:d}"),
                ("refunded_cents", "SELECT COALESCE(sum(refunded_cents), 0)::bigint FROM packets"),
                ("groups", "SELECT count(*) FROM groups"),
                ("events_numbered", "SELECT numbered_through FROM event_feed"),
                ("events_pruned", "SELECT pruned_through FROM event_feed"),
                ("event_rows_unnumbered", "SELECT count(*) FROM event_log WHERE last_no IS NULL"),
            ]:
                report.counts[name] = await conn.fetchval(sql)
            for name, sql in CHECKS:
                sql = sql.replace(":grace_ms", str(int(refund_grace_ms)))
                rows = await conn.fetch(sql + f" LIMIT {MAX_ROWS_SHOWN}")
                if rows:
                    report.violations[name] = [dict(r) for r in rows]
        return report
    finally:
        await conn.close()
