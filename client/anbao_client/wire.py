"""Pure-Python codec for the anbao protocol (PROTOCOL.md), driven by its
table (protocol.py): every body is packed and unpacked by the message's
layout there, so this module knows no byte offsets of its own.

The server speaks through its Cython codec; this one lets the SDK install
without a compiler. The tests hold both to the table and to PROTOCOL.md's
hex vectors.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .protocol import (
    DEFAULT_MAX_FRAME_BYTES,
    ERROR,
    ERROR_TAILS,
    FIXED_LETTERS,
    HEADER_BYTES,
    IDEMPOTENCY_KEY_BYTES,
    LENGTH_BYTES,
    MAX_ID,
    MESSAGES,
    PROTOCOL_VERSION,
    RESPONSE_BIT,
    RESPONSE_HEADER_BYTES,
    WRONG_SET_BODY,
    Audience,
    EventKind,
    Layout,
    Mode,
    Op,
    PacketStatus,
    Rows,
    Scope,
    Status,
    TransferKind,
)

__all__ = [
    "DEFAULT_MAX_FRAME_BYTES",
    "IDEMPOTENCY_KEY_BYTES",
    "MAX_ID",
    "PROTOCOL_VERSION",
    "Audience",
    "EventKind",
    "Mode",
    "Op",
    "PacketStatus",
    "Scope",
    "Status",
    "TransferKind",
]

HEADER = struct.Struct(">IBI")  # length, opcode, request id
RESPONSE_HEADER = struct.Struct(">IBIBH")  # + status, worker id
assert HEADER.size == HEADER_BYTES and RESPONSE_HEADER.size == RESPONSE_HEADER_BYTES

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_STRUCTS: dict[str, struct.Struct] = {}


def _fixed(letters: str) -> struct.Struct:
    s = _STRUCTS.get(letters)
    if s is None:
        s = _STRUCTS[letters] = struct.Struct(">" + letters)
    return s


# ---------------------------------------------------------------- bodies


def _pack_value(letter: str, value: Any, out: list[bytes]) -> None:
    if letter in FIXED_LETTERS:
        out.append(_fixed(letter).pack(value))
    elif letter == "k":
        assert isinstance(value, bytes) and len(value) == IDEMPOTENCY_KEY_BYTES
        out.append(value)
    elif letter == "t":
        raw = value.encode("utf-8")
        out.append(_U16.pack(len(raw)) + raw)
    elif letter == "b":
        out.append(_U16.pack(len(value)) + value)
    else:
        assert letter == "j"
        out.append(_U32.pack(len(value)) + value)


def pack(layout: Layout, values: Sequence[Any]) -> bytes:
    """A body from its field values, in layout order (rows: a list)."""
    assert len(values) == len(layout.fields), (layout.names, values)
    out: list[bytes] = []
    for (_, kind), value in zip(layout.fields, values, strict=True):
        if isinstance(kind, Rows):
            out.append(_fixed(kind.count).pack(len(value)))
            single = len(kind.fields) == 1
            for row in value:
                for (_, letter), v in zip(kind.fields, (row,) if single else row, strict=True):
                    _pack_value(letter, v, out)
        else:
            _pack_value(kind, value, out)
    return b"".join(out)


def _unpack_value(letter: str, body: bytes, pos: int) -> tuple[Any, int]:
    if letter in FIXED_LETTERS:
        s = _fixed(letter)
        return s.unpack_from(body, pos)[0], pos + s.size
    if letter == "k":
        end = pos + IDEMPOTENCY_KEY_BYTES
        if end > len(body):
            raise ValueError("body too short")
        return body[pos:end], end
    head = _U32 if letter == "j" else _U16
    (n,) = head.unpack_from(body, pos)
    start = pos + head.size
    if start + n > len(body):
        raise ValueError("body too short")
    raw = body[start : start + n]
    return (raw.decode("utf-8") if letter == "t" else raw), start + n


def unpack(layout: Layout, body: bytes, *, tail_ok: bool = False) -> tuple[Any, ...]:
    """The field values of a body, in layout order; a body that does not
    end where its layout does is an error, unless `tail_ok`: an answer may
    grow fields at its end within a version (PROTOCOL.md "Versioning"),
    which a client that does not know them skips."""
    values: list[Any] = []
    pos = 0
    for _, kind in layout.fields:
        if isinstance(kind, Rows):
            count = _fixed(kind.count)
            (n,) = count.unpack_from(body, pos)
            pos += count.size
            single = len(kind.fields) == 1
            items: list[Any] = []
            for _ in range(n):
                row = []
                for _, letter in kind.fields:
                    v, pos = _unpack_value(letter, body, pos)
                    row.append(v)
                items.append(row[0] if single else tuple(row))
            values.append(items)
        else:
            v, pos = _unpack_value(kind, body, pos)
            values.append(v)
    if pos > len(body) or (pos < len(body) and not tail_ok):
        raise ValueError(f"body of {len(body)} bytes, layout ends at {pos}")
    return tuple(values)


# ---------------------------------------------------------------- requests


def frame(opcode: int, request_id: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(HEADER_BYTES - LENGTH_BYTES + len(payload), opcode, request_id) + payload


# Requests whose layout is all fixed-width fields: header and body in one
# precompiled struct, for clients (the load generator) that send a lot of them.
_FIXED_REQUESTS: dict[int, tuple[struct.Struct, int]] = {}
for _op, _message in MESSAGES.items():
    _fields = _message.request.fields
    if all(isinstance(kind, str) and kind in FIXED_LETTERS for _, kind in _fields):
        _s = struct.Struct(">IBI" + "".join(str(kind) for _, kind in _fields))
        _FIXED_REQUESTS[_op] = (_s, _s.size - LENGTH_BYTES)


def request(op: Op, request_id: int, *values: Any) -> bytes:
    """A request frame, its body laid out by the table."""
    fixed = _FIXED_REQUESTS.get(op)
    if fixed is not None:
        s, length = fixed
        return s.pack(length, op, request_id, *values)
    return frame(op, request_id, pack(MESSAGES[op].request, values))


def hello(request_id: int, token: bytes, version: int = PROTOCOL_VERSION) -> bytes:
    return request(Op.HELLO, request_id, version, token)


def ping(request_id: int) -> bytes:
    return request(Op.PING, request_id)


def register(request_id: int, user_ids: list[int]) -> bytes:
    return request(Op.REGISTER, request_id, user_ids)


def deposit(request_id: int, key: bytes, user_id: int, amount_cents: int) -> bytes:
    return request(Op.DEPOSIT, request_id, key, user_id, amount_cents)


def balance(request_id: int, user_id: int) -> bytes:
    return request(Op.BALANCE, request_id, user_id)


def send(
    request_id: int,
    key: bytes,
    sender_id: int,
    total_cents: int,
    count: int,
    mode: int,
    expiry_seconds: int,
    audience: int,
    members: list[int],
    greeting: str,
) -> bytes:
    return request(
        Op.SEND, request_id, key, sender_id, total_cents, count, mode, expiry_seconds, audience, members, greeting
    )


def withdraw(request_id: int, key: bytes, user_id: int, amount_cents: int) -> bytes:
    return request(Op.WITHDRAW, request_id, key, user_id, amount_cents)


def statement(request_id: int, user_id: int, cursor: int = 0, limit: int = 100) -> bytes:
    return request(Op.STATEMENT, request_id, user_id, cursor, limit)


def audit(request_id: int) -> bytes:
    return request(Op.AUDIT, request_id)


def sent_list(request_id: int, user_id: int, cursor: int = 0, limit: int = 100) -> bytes:
    return request(Op.SENT_LIST, request_id, user_id, cursor, limit)


def received_list(request_id: int, user_id: int, cursor: int = 0, limit: int = 100) -> bytes:
    return request(Op.RECEIVED_LIST, request_id, user_id, cursor, limit)


def group_create(request_id: int, group_id: int, name: str, members: list[int]) -> bytes:
    return request(Op.GROUP_CREATE, request_id, group_id, name, members)


def group_add(request_id: int, group_id: int, user_ids: list[int]) -> bytes:
    return request(Op.GROUP_ADD, request_id, group_id, user_ids)


def group_remove(request_id: int, group_id: int, user_ids: list[int]) -> bytes:
    return request(Op.GROUP_REMOVE, request_id, group_id, user_ids)


def group_info(request_id: int, group_id: int, cursor: int = 0, limit: int = 1000) -> bytes:
    return request(Op.GROUP_INFO, request_id, group_id, cursor, limit)


_GRAB, _GRAB_LENGTH = _FIXED_REQUESTS[Op.GRAB]


def grab(request_id: int, packet_id: int, user_id: int) -> bytes:
    return _GRAB.pack(_GRAB_LENGTH, Op.GRAB.value, request_id, packet_id, user_id)


def topology(request_id: int) -> bytes:
    return request(Op.TOPOLOGY, request_id)


def stats(request_id: int) -> bytes:
    return request(Op.STATS, request_id)


def packet(request_id: int, packet_id: int, claims_offset: int = 0, claims_limit: int = 100) -> bytes:
    return request(Op.PACKET, request_id, packet_id, claims_offset, claims_limit)


def events(request_id: int, cursor: int = 0, limit: int = 1000, wait_ms: int = 0) -> bytes:
    return request(Op.EVENTS, request_id, cursor, limit, wait_ms)


# ---------------------------------------------------------------- responses


@dataclass(frozen=True, slots=True)
class Response:
    opcode: int
    request_id: int
    status: int
    worker_id: int
    body: bytes


def answer(op: Op, body: bytes) -> tuple[Any, ...]:
    """The fields of an OK answer to `op`, in its table layout's order;
    fields a newer server added after them are skipped."""
    return unpack(MESSAGES[op].answer, body, tail_ok=True)


class FrameBuffer:
    """Splits the server's byte stream into Response frames."""

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES):
        self._buf = bytearray()
        self._max = max_frame_bytes

    def feed(self, data: bytes) -> list[Response]:
        self._buf += data
        out = []
        view = memoryview(self._buf)
        pos = 0
        try:
            while len(self._buf) - pos >= LENGTH_BYTES:
                (length,) = _U32.unpack_from(view, pos)
                if length < RESPONSE_HEADER_BYTES - LENGTH_BYTES or length + LENGTH_BYTES > self._max:
                    raise ValueError(f"bad response frame length {length}")
                if len(self._buf) - pos < LENGTH_BYTES + length:
                    break
                _, opcode, rid, status, worker = RESPONSE_HEADER.unpack_from(view, pos)
                body = bytes(view[pos + RESPONSE_HEADER_BYTES : pos + LENGTH_BYTES + length])
                out.append(Response(opcode & ~RESPONSE_BIT, rid, status, worker, body))
                pos += LENGTH_BYTES + length
        finally:
            view.release()
        del self._buf[:pos]
        return out


def error_message(body: bytes) -> str:
    try:
        (message,) = unpack(ERROR, body)
    except (ValueError, struct.error, UnicodeDecodeError):
        try:  # an error body may carry more after its message (ERROR_TAILS)
            (n,) = _U16.unpack_from(body, 0)
            return body[2 : 2 + n].decode("utf-8", "replace")
        except struct.error:
            return body[2:].decode("utf-8", "replace")
    return str(message)


def wrong_set(body: bytes) -> tuple[str, int, str, int] | None:
    """(message, set_id, host, port) of a WRONG_SET answer's body, or None."""
    try:
        message, set_id, host, port = unpack(WRONG_SET_BODY, body)
    except (ValueError, struct.error, UnicodeDecodeError):
        return None
    return str(message), int(set_id), str(host), int(port)


def error_fields(status: int, body: bytes) -> dict[str, Any]:
    """The named fields of an error body after its message, for the
    statuses that have them (protocol.ERROR_TAILS), else {}."""
    layout = ERROR_TAILS.get(Status(status)) if status in Status._value2member_map_ else None
    if layout is None:
        return {}
    try:
        values = unpack(layout, body)
    except (ValueError, struct.error, UnicodeDecodeError):
        return {}
    return dict(zip(layout.names[1:], values[1:], strict=True))


@dataclass(frozen=True, slots=True)
class Hello:
    version: int
    scope: Scope
    worker_count: int
    max_frame_bytes: int
    max_inflight: int
    max_queued_grabs: int  # the owner worker's GRAB queue; past it, GRAB answers BUSY
    # The event feed's limits: rows an EVENTS page holds at most, the
    # longest wait_ms honoured, and what is retained (ms, events).
    events_max_page: int = 0
    events_max_wait_ms: int = 0
    events_retention_ms: int = 0
    events_retention_max_events: int = 0


def decode_hello(body: bytes) -> Hello:
    # Answers only grow at their end within a version: read the fields we
    # know and ignore any that follow; a server from before a field was
    # announced (max_queued_grabs, the feed's limits) ends before it: read
    # as 0 (unknown).
    fields = MESSAGES[Op.HELLO].answer
    size = _fixed(fields.head).size
    body = body[:size] + bytes(max(0, size - len(body)))
    v, scope, *rest = unpack(fields, body)
    return Hello(v, Scope(scope), *rest)


@dataclass(frozen=True, slots=True)
class Deposited:
    balance_cents: int
    transfer_id: int


@dataclass(frozen=True, slots=True)
class Withdrawn:
    balance_cents: int
    transfer_id: int


def decode_deposited(body: bytes) -> Deposited:
    return Deposited(*answer(Op.DEPOSIT, body))


def decode_withdrawn(body: bytes) -> Withdrawn:
    return Withdrawn(*answer(Op.WITHDRAW, body))


@dataclass(frozen=True, slots=True)
class Sent:
    packet_id: int
    sender_balance_cents: int
    expires_at_ms: int


def decode_sent(body: bytes) -> Sent:
    return Sent(*answer(Op.SEND, body))


@dataclass(frozen=True, slots=True)
class Grabbed:
    amount_cents: int
    seq: int
    remaining_count: int
    worker_id: int
    already_claimed: bool = False


def decode_grab(r: Response) -> Grabbed:
    amount, seq, remaining = answer(Op.GRAB, r.body)
    return Grabbed(amount, seq, remaining, r.worker_id, r.status == Status.ALREADY_CLAIMED)


@dataclass(frozen=True, slots=True)
class Claim:
    seq: int
    user_id: int
    amount_cents: int


@dataclass(frozen=True, slots=True)
class PacketInfo:
    sender_id: int
    total_cents: int
    count: int
    mode: Mode
    status: PacketStatus
    audience: Audience
    created_at_ms: int
    expires_at_ms: int
    claimed_cents: int
    claimed_count: int
    refunded_cents: int
    luckiest_seq: int  # 0 until the packet is sold out
    greeting: str
    claims: list[Claim]
    group_id: int = 0  # the group of a packet sent to a group (audience 3), else 0

    @property
    def remaining_cents(self) -> int:
        return self.total_cents - self.claimed_cents - self.refunded_cents

    @property
    def luckiest(self) -> Claim | None:
        return next((c for c in self.claims if c.seq == self.luckiest_seq), None)


def decode_packet(body: bytes) -> PacketInfo:
    try:
        fields = answer(Op.PACKET, body)
    except (ValueError, struct.error):
        # A server from before group_id was added ends the answer with the
        # claims: read the group as 0 (unknown).
        fields = answer(Op.PACKET, body + bytes(_U64.size))
    (sender, total, count, mode, status, audience, created, expires, claimed_cents, claimed_count, refunded,
     luckiest, greeting, claims, group_id) = fields  # fmt: skip
    return PacketInfo(
        sender,
        total,
        count,
        Mode(mode),
        PacketStatus(status),
        Audience(audience),
        created,
        expires,
        claimed_cents,
        claimed_count,
        refunded,
        luckiest,
        greeting,
        [Claim(*c) for c in claims],
        group_id,
    )


@dataclass(frozen=True, slots=True)
class Topology:
    worker_id: int  # the worker that answered
    worker_count: int
    shard_count: int
    steering: int  # protocol.Steering
    set_id: int


def decode_topology(r: Response) -> Topology:
    return Topology(r.worker_id, *answer(Op.TOPOLOGY, r.body))


def decode_register(body: bytes) -> int:
    (created,) = answer(Op.REGISTER, body)
    return int(created)


@dataclass(frozen=True, slots=True)
class Balance:
    """BALANCE's answer. `balance_cents`: posted, plus grabs in this set
    still rolling up; what WITHDRAW and SEND can spend. `in_flight_cents`:
    shares won in other sets on their way here, not spendable until they
    arrive (0 with one set). `sets_unreached`: other sets that could not be
    asked, whose credits on their way are not in `in_flight_cents`."""

    balance_cents: int
    in_flight_cents: int
    sets_unreached: int


def decode_balance_detail(body: bytes) -> Balance:
    return Balance(*answer(Op.BALANCE, body))


def decode_balance(body: bytes) -> int:
    return decode_balance_detail(body).balance_cents


def decode_stats(body: bytes) -> bytes:
    (document,) = answer(Op.STATS, body)
    return bytes(document)


# ---------------------------------------------------------------- lifecycle answers


@dataclass(frozen=True, slots=True)
class StatementEntry:
    transfer_id: int
    kind: TransferKind
    amount_cents: int  # signed: + into the wallet, - out of it
    packet_id: int  # 0 for deposits and withdrawals
    at_ms: int


@dataclass(frozen=True, slots=True)
class Statement:
    balance_cents: int
    entries: list[StatementEntry]  # newest first
    next_cursor: int  # 0: no older entries


@dataclass(frozen=True, slots=True)
class SentPacket:
    packet_id: int
    total_cents: int
    count: int
    claimed_count: int
    claimed_cents: int
    refunded_cents: int
    status: PacketStatus
    audience: Audience
    created_at_ms: int
    expires_at_ms: int


@dataclass(frozen=True, slots=True)
class ReceivedShare:
    packet_id: int
    sender_id: int
    seq: int
    amount_cents: int
    claimed_at_ms: int


@dataclass(frozen=True, slots=True)
class Page:
    items: list[Any]
    next_cursor: int  # 0: this was the last page


@dataclass(frozen=True, slots=True)
class GroupCreated:
    created: bool  # False: the id existed, nothing changed
    member_count: int


@dataclass(frozen=True, slots=True)
class GroupChange:
    changed: int  # members added (GROUP_ADD) or removed (GROUP_REMOVE)
    member_count: int


@dataclass(frozen=True, slots=True)
class GroupInfo:
    name: str
    member_count: int
    members: list[int]  # this page, in id order
    next_cursor: int


@dataclass(frozen=True, slots=True)
class AuditResult:
    ok: bool
    counts: dict[str, int]  # name -> value
    checks: dict[str, int]  # invariant -> offending rows found (0: it holds; at most 20 counted)

    @property
    def violated(self) -> list[str]:
        return [name for name, n in self.checks.items() if n]


def decode_statement(body: bytes) -> Statement:
    balance_cents, cursor, rows = answer(Op.STATEMENT, body)
    return Statement(balance_cents, [StatementEntry(t, TransferKind(k), a, p, ms) for t, k, a, p, ms in rows], cursor)


def decode_sent_list(body: bytes) -> Page:
    cursor, rows = answer(Op.SENT_LIST, body)
    items = [
        SentPacket(pid, total, count, cc, cents, refunded, PacketStatus(st), Audience(aud), created, expires)
        for pid, total, count, cc, cents, refunded, st, aud, created, expires in rows
    ]
    return Page(items, cursor)


def decode_received_list(body: bytes) -> Page:
    cursor, rows = answer(Op.RECEIVED_LIST, body)
    return Page([ReceivedShare(*r) for r in rows], cursor)


def decode_group_created(body: bytes) -> GroupCreated:
    created, n = answer(Op.GROUP_CREATE, body)
    return GroupCreated(bool(created), n)


def decode_group_change(body: bytes) -> GroupChange:
    return GroupChange(*answer(Op.GROUP_ADD, body))


def decode_group_info(body: bytes) -> GroupInfo:
    n, cursor, name, members = answer(Op.GROUP_INFO, body)
    return GroupInfo(name, n, members, cursor)


def decode_audit(body: bytes) -> AuditResult:
    ok, results = answer(Op.AUDIT, body)
    counts: dict[str, int] = {}
    checks: dict[str, int] = {}
    for is_check, name, value in results:
        (checks if is_check else counts)[name] = value
    return AuditResult(bool(ok), counts, checks)


# ---------------------------------------------------------------- the event feed


@dataclass(frozen=True, slots=True)
class Event:
    """One event of the feed. Every field is there for every kind, 0 where
    it does not apply (PROTOCOL.md, EVENTS): amounts in cents, times in ms."""

    number: int  # the event's place in the feed: pass it back as the cursor
    kind: EventKind | int  # an int only for a kind newer than this SDK: skip it (its number still counts)
    at_ms: int  # when its fact committed (the transaction's time), ms since the epoch
    packet_id: int
    user_id: int  # the grabber (SHARE_TAKEN), the sender (SENT, SOLD_OUT, REFUNDED), the wallet's owner
    seq: int  # SHARE_TAKEN: the share's number; SOLD_OUT: the last share; REFUNDED: shares claimed
    count: int  # the packet's share count
    amount_cents: int  # the share, the total (SENT, SOLD_OUT), the refund, the deposit or withdrawal
    elapsed_ms: int  # SOLD_OUT: from SENT to the last share
    # The transfer it records, as STATEMENT lists it and DEPOSIT/WITHDRAW
    # answer it (SENT, REFUNDED, DEPOSIT, WITHDRAWAL, CROSS_SET_CREDIT); 0
    # for SHARE_TAKEN and SOLD_OUT, and from a server that does not say.
    transfer_id: int = 0


@dataclass(frozen=True, slots=True)
class EventsPage:
    events: list[Event]
    next_cursor: int  # the last event's number, or the cursor sent when there is none
    head: int  # the last number given when this was read: next_cursor < head means more to read now

    @property
    def behind(self) -> int:
        """Events numbered after this page when it was read."""
        return self.head - self.next_cursor


# EVENTS pages are read by the thousand: the table's fixed-width head and
# row, each as one precompiled struct.
_EVENTS_LAYOUT = MESSAGES[Op.EVENTS].answer
_EVENTS_ROWS = _EVENTS_LAYOUT.rows
assert _EVENTS_ROWS is not None and all(c in FIXED_LETTERS for c in _EVENTS_LAYOUT.head + _EVENTS_ROWS.letters)
_EVENTS_HEAD = struct.Struct(">" + _EVENTS_LAYOUT.head + _EVENTS_ROWS.count)
_EVENTS_ROW = struct.Struct(">" + _EVENTS_ROWS.letters)
_events_tail = _EVENTS_LAYOUT.tail
assert _events_tail is not None and _events_tail.names == ("transfer_ids",)
_EVENTS_TAIL: Layout = _events_tail  # the rows' transfer ids, grown at the answer's end
_EVENT_KINDS: dict[int, EventKind] = {k.value: k for k in EventKind}


def decode_events(body: bytes) -> EventsPage:
    cursor, head, n = _EVENTS_HEAD.unpack_from(body, 0)
    start = _EVENTS_HEAD.size
    end = start + n * _EVENTS_ROW.size
    if len(body) < end:
        raise ValueError(f"EVENTS body of {len(body)} bytes for {n} rows")
    # A server from before transfer_ids ends after the rows: read them as 0.
    transfer_ids = [0] * n
    if len(body) > end:
        (transfer_ids,) = unpack(_EVENTS_TAIL, body[end:], tail_ok=True)
        if len(transfer_ids) != n:
            raise ValueError(f"EVENTS: {len(transfer_ids)} transfer ids for {n} rows")
    events = [
        Event(number, _EVENT_KINDS.get(k, k), at, packet, user, seq, count, amount, elapsed, t)
        for (number, k, at, packet, user, seq, count, amount, elapsed), t in zip(
            _EVENTS_ROW.iter_unpack(memoryview(body)[start:end]), transfer_ids, strict=True
        )
    ]
    return EventsPage(events, cursor, head)
