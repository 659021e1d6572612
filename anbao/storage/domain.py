"""Storage's own vocabulary: the codes its tables hold, why it refuses, and
what it hands back. Nothing here knows the wire protocol; the server maps a
Reason to the wire status of the same name, and encodes the answers.

The integer values are the ones the tables (and the PL/pgSQL functions of
the migrations) hold: they are the database's, and never change.
tests/test_storage_domain.py checks them against the database itself.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

IDEMPOTENCY_KEY_BYTES = 16  # a client's key; idempotency_keys holds it scoped (migration 0015)


class AccountKind(enum.IntEnum):
    EXTERNAL = 0  # the outside world: deposits come from it, withdrawals go to it; the only one below zero
    USER = 1  # a user's wallet (owner_id = user id)
    ESCROW = 2  # a packet's escrow (owner_id = packet id)
    CLEARING = 3  # sets: owed to (positive) or received from (negative) another set (owner_id = its set id)
    SUSPENSE = 4  # sets: credits from another set for a user this set does not know (owner_id 0)


class TransferKind(enum.IntEnum):
    DEPOSIT = 1  # external -> wallet
    WITHDRAW = 2  # wallet -> external
    SEND = 3  # sender's wallet -> the packet's escrow
    GRAB = 4  # escrow -> grabber's wallet (written by the roll-up, migration 0003)
    REFUND = 5  # escrow -> sender's wallet, the remainder of an expired packet
    CROSS_OUT = 6  # escrow -> clearing of the grabber's home set (the roll-up, migration 0007)
    CROSS_IN = 7  # clearing of the sending set -> wallet or suspense (the apply trigger, migration 0007)


class PacketStatus(enum.IntEnum):
    OPEN = 0
    SOLD_OUT = 1
    EXPIRED = 2  # stored by no one today; shown for an open packet past its expiry until its refund commits
    REFUNDED = 3


class Audience(enum.IntEnum):
    OPEN = 0  # any registered user but the sender
    DIRECT = 1  # one named user, one share
    MEMBERS = 2  # the listed users
    GROUP = 3  # a group's members at send time, the sender excepted


class Mode(enum.IntEnum):
    RANDOM = 1
    FIXED = 2


class Operation(enum.IntEnum):
    """The idempotent operations, as idempotency_keys.operation holds them.
    The values are the opcodes the rows were first written with (before
    migration 0004 they were the wire opcodes): they are storage's own codes
    now, and enter the request hash, so they never change."""

    DEPOSIT = 0x11
    WITHDRAW = 0x13
    SEND = 0x20


class Reason(enum.Enum):
    """Why storage refused. Each name is the name of the wire status the
    server answers it with; a stored refusal keeps its name (migration 0004)."""

    UNKNOWN_USER = "UNKNOWN_USER"
    UNKNOWN_GROUP = "UNKNOWN_GROUP"
    INSUFFICIENT_FUNDS = "INSUFFICIENT_FUNDS"
    INVALID = "INVALID"
    IDEMPOTENCY_CONFLICT = "IDEMPOTENCY_CONFLICT"
    NOT_FOUND = "NOT_FOUND"
    DAILY_SEND_AMOUNT_CAP = "DAILY_SEND_AMOUNT_CAP"  # the sender's cents sent this UTC day would pass the cap
    DAILY_SEND_COUNT_CAP = "DAILY_SEND_COUNT_CAP"  # the sender's packets sent this UTC day would pass the cap


class Refused(Exception):
    """A business rule refused the request; nothing was written but the
    idempotency record of this answer."""

    def __init__(self, reason: Reason, message: str):
        assert isinstance(reason, Reason), reason
        super().__init__(message)
        self.reason = reason

    @property
    def message(self) -> str:
        return str(self)


@dataclass(frozen=True)
class PacketRecord:
    """A packet's durable state: what the owner rebuilds its in-memory state
    from. eligible is None for an open packet; claims are every durable
    claim (rolled up or waiting for its roll-up) as (user_id, seq,
    amount_cents); closed means refunded, so no share can be taken;
    max_share_cents is the cap on one share the packet was sent under (0:
    none, a packet from before the cap)."""

    packet_id: int
    sender_id: int
    total_cents: int
    share_count: int
    mode: int
    min_share_cents: int
    expires_at_ms: int
    eligible: list[int] | None
    claims: list[tuple[int, int, int]]
    closed: bool
    max_share_cents: int = 0


class EventKind(enum.IntEnum):
    """What an event of the feed records (event_log.kind, migration 0005)."""

    SENT = 1  # a packet sent: user = sender, amount = total, count = shares
    SHARE_TAKEN = 2  # a share grabbed: user = grabber, seq, amount; count = the packet's shares
    SOLD_OUT = 3  # the packet's last share taken: user = sender, amount = total, elapsed_ms since sending
    REFUNDED = 4  # expired, remainder back to the sender: amount = refunded, seq = shares claimed
    DEPOSIT = 5  # money in: user, amount
    WITHDRAWAL = 6  # money out: user, amount
    CROSS_SET_CREDIT = 7  # another set's grab credited here: user = credited (0: suspense), packet, amount


@dataclass(frozen=True)
class EventPage:
    """What EVENTS reads, in one snapshot: events after the cursor (tuples in
    the feed's row order: number, kind, at_ms, packet_id, user_id, seq,
    count, amount_cents, elapsed_ms, then the transfer it records, 0 if
    none), the last number given and the oldest valid cursor."""

    events: list[tuple]
    head: int
    pruned_through: int


@dataclass(frozen=True)
class SendRequest:
    """One SEND as storage runs it in a batch (packets.Packets.send_batch):
    validated by the server, its packet id composed by the caller.
    members: the member list (audiences DIRECT and MEMBERS), else empty;
    group_id: the group (audience GROUP), else 0. request_hash is what a
    retry of the key must repeat (idempotency.request_hash)."""

    key: bytes
    request_hash: bytes
    packet_id: int
    sender_id: int
    total_cents: int
    count: int
    mode: int
    expires_at_ms: int
    audience: int
    group_id: int
    members: tuple[int, ...]
    greeting: str
    settled: bool = False  # the sender's pending grabs were rolled up first: a short balance is refused


class BatchOutcome(enum.IntEnum):
    """What a batch function (storage/functions: anbao_send_batch,
    anbao_move_batch) did with one keyed request."""

    RAN = 0  # decided now; its answer or refusal is stored under its key
    REPLAYED = 1  # the key's first answer (or refusal), nothing moved
    CONFLICT = 2  # the key was used with other parameters; nothing stored
    SETTLE_FIRST = 3  # short, but the user's pending grabs would cover it; nothing stored
    # Not decided in this batch, nothing stored: send it in the next. Its wallet was locked
    # elsewhere (a roll-up), or the whole batch failed on a key another transaction stored
    # meanwhile (anbao_store_keys, 40001; idempotency.put_back_all).
    PUT_BACK = 4


@dataclass(frozen=True)
class MoveRequest:
    """One DEPOSIT or WITHDRAW as storage runs it in a batch
    (accounts.Accounts.move_batch)."""

    key: bytes
    request_hash: bytes
    user_id: int
    amount_cents: int
    settled: bool = False  # the user's pending grabs were rolled up first: a short balance is refused


@dataclass(frozen=True)
class BatchResult:
    """One keyed request's result in its batch: its outcome, its answer (a
    SEND's {packet_id, balance_cents, expires_at_ms}, a DEPOSIT's or
    WITHDRAW's {balance_cents, transfer_id}) or refusal and message, and for
    a group packet sent now its audience as of the group's version."""

    outcome: BatchOutcome
    answer: dict | None
    refusal: Reason | None
    message: str
    members: list[int] | None = None
    created_ms: int = 0  # a packet sent now: its created_at (ms since the epoch)
