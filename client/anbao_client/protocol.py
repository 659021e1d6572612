"""The anbao protocol, version 1, as data: the one table of it.

Every opcode, status and enum, and one named layout per request and per
answer, live here and nowhere else. The SDK's codec (wire.py) packs and
unpacks by these layouts; the server's Python side takes its opcodes,
statuses, offsets and answer layouts from here; the server's Cython codec
keeps hand-written decoders for speed and is held to this table by
tests/test_protocol_table.py, which round-trips every message through both
codecs. PROTOCOL.md is the prose of this table and its vectors check both.

Adding an opcode: its `Message` below (with its `Route`), its handler on
the server, its operation in operations.py, and its section in PROTOCOL.md.
The table test fails until the Cython codec decodes it.

Layout letters (all integers big-endian):
    B u8   H u16   I u32   Q u64   q i64
    k  a 16-byte idempotency key
    t  text: u16 byte length, then UTF-8
    b  bytes: u16 length, then the bytes
    j  blob: u32 length, then the bytes (STATS' JSON document)
A `Rows` field is a count (H u16 or I u32) followed by that many rows; a row
of one field is read as a plain value, a row of several as a tuple.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

PROTOCOL_VERSION = 1

# ---------------------------------------------------------------- framing

LENGTH_BYTES = 4  # u32: the bytes that follow it
HEADER_BYTES = 9  # u32 length, u8 opcode, u32 request id
RESPONSE_HEADER_BYTES = 12  # + u8 status, u16 worker id
OPCODE_OFFSET = 4
REQUEST_ID_OFFSET = 5
STATUS_OFFSET = 9
WORKER_OFFSET = 10
RESPONSE_BIT = 0x80  # set in the opcode byte of every answer
NO_OPCODE = 0  # the opcode of an answer to no request (a framing error)
DEFAULT_MAX_FRAME_BYTES = 65536

# ---------------------------------------------------------------- field limits

IDEMPOTENCY_KEY_BYTES = 16
MAX_ID = 2**63 - 1  # every id lives in a PostgreSQL BIGINT; 0 is no id
MAX_TOKEN_BYTES = 256
MAX_REGISTER_IDS = 1024
MAX_GREETING_BYTES = 256
MAX_GROUP_NAME_BYTES = 128
MAX_CLAIMS_PAGE = 1000
MAX_ERROR_MESSAGE_BYTES = 1024
# A default server's pages (the server's WireLimits take these defaults, so
# the two agree unless an operator changes them, and HELLO says so):
# EVENTS rows per answer (57 bytes each, and an 8-byte transfer id: a page
# fits in the default frame), and rows per STATEMENT, SENT_LIST,
# RECEIVED_LIST or GROUP_INFO answer.
MAX_EVENTS_PAGE = 1000
MAX_PAGE_ROWS = 1000

# ---------------------------------------------------------------- enums


class Op(enum.IntEnum):
    HELLO = 0x01
    PING = 0x02
    REGISTER = 0x10
    DEPOSIT = 0x11
    BALANCE = 0x12
    WITHDRAW = 0x13
    STATEMENT = 0x14
    AUDIT = 0x15
    SEND = 0x20
    GRAB = 0x21
    PACKET = 0x22
    SENT_LIST = 0x24
    RECEIVED_LIST = 0x25
    GROUP_CREATE = 0x30
    GROUP_ADD = 0x31
    GROUP_REMOVE = 0x32
    GROUP_INFO = 0x33
    TOPOLOGY = 0x50
    STATS = 0x51
    EVENTS = 0x60  # the event feed (long poll)


class Status(enum.IntEnum):
    OK = 0
    SOLD_OUT = 1
    ALREADY_CLAIMED = 2
    EXPIRED = 3
    NOT_ELIGIBLE = 4
    INSUFFICIENT_FUNDS = 5
    INVALID = 6
    BUSY = 7
    UNAVAILABLE = 8
    UNAUTHENTICATED = 9
    FORBIDDEN = 10
    NOT_FOUND = 11
    UNKNOWN_USER = 12
    IDEMPOTENCY_CONFLICT = 13
    UNSUPPORTED_VERSION = 14
    UNKNOWN_OPCODE = 15
    FRAME_TOO_LARGE = 16
    UNKNOWN_GROUP = 17
    IN_DOUBT = 18  # the request may have been applied: a retry (same key) is safe
    CURSOR_EXPIRED = 19  # EVENTS: the cursor is older than retention; the body says where to resume
    # Limits of a payment product (PROTOCOL.md "Limits"); each names its limit.
    SHARE_ABOVE_MAX = 20  # SEND: a share would exceed the maximum per share
    DAILY_SEND_AMOUNT_CAP = 21  # SEND: the sender's cents sent this UTC day would pass the cap
    DAILY_SEND_COUNT_CAP = 22  # SEND: the sender's packets sent this UTC day would pass the cap
    COOLING_DOWN = 23  # GRAB: too many refused grabs lately; a fresh grab waits out the cool-down
    RATE_LIMITED = 24  # any request: the token's request rate is past its ceiling; nothing done, retry later
    WRONG_SET = 25  # the user's home or the packet is another set: the body names it (WRONG_SET_BODY)
    INTERNAL = 255


class Scope(enum.IntEnum):
    APP = 1  # send, grab, query
    ADMIN = 2  # also money in and out, and the audit
    PEER = 3  # another worker of the same set, relaying GRABs


class Mode(enum.IntEnum):
    RANDOM = 1
    FIXED = 2


class Audience(enum.IntEnum):
    OPEN = 0  # any registered user
    DIRECT = 1  # one named user, one share
    MEMBERS = 2  # the member list given at send time
    GROUP = 3  # a group's members (but the sender) at send time


class PacketStatus(enum.IntEnum):
    OPEN = 0
    SOLD_OUT = 1
    EXPIRED = 2  # past expiry, remainder not yet refunded
    REFUNDED = 3


class TransferKind(enum.IntEnum):
    DEPOSIT = 1  # external -> wallet
    WITHDRAW = 2  # wallet -> external
    SEND = 3  # sender's wallet -> packet escrow
    GRAB = 4  # escrow -> grabber's wallet
    REFUND = 5  # escrow -> sender's wallet, the remainder after expiry
    CROSS_OUT = 6  # escrow -> the grabber's home set (a grab by a user of another set)
    CROSS_IN = 7  # another set's grab, credited to this wallet (or to suspense)


class EventKind(enum.IntEnum):
    """What an EVENTS row records; every row has every field, 0 where it
    does not apply (PROTOCOL.md, EVENTS)."""

    SENT = 1  # packet sent: user = sender, amount = total, count = shares
    SHARE_TAKEN = 2  # share grabbed: user = grabber, seq, amount; count = the packet's shares
    SOLD_OUT = 3  # last share taken: user = sender, amount = total, seq = count = shares, elapsed_ms since SENT
    REFUNDED = 4  # expired, remainder back to the sender: user = sender, amount = refunded, seq = shares claimed
    DEPOSIT = 5  # money in: user, amount
    WITHDRAWAL = 6  # money out: user, amount
    CROSS_SET_CREDIT = 7  # another set's grab credited at the grabber's home: user (0: suspense), packet, amount


class Route(enum.IntEnum):
    """Where a client sends a request (the SDK's routing key); the request
    field that carries the key is Message.route_field."""

    ANY = 0  # any worker of any set: a connection's own question, or one set answers for all
    PACKET = 1  # the packet's owner: its set (in the id), then its worker (routing.owner_of)
    USER = 2  # the user's home set (routing.home_set); REGISTER's ids each to their own
    NEW_PACKET = 3  # SEND: the sender's home set, any worker there (the one that takes it owns the packet)
    EVERY_SET = 4  # groups, mirrored in every set; AUDIT, each set of its own database


ROUTE_FIELDS: dict[Route, tuple[str, ...]] = {
    Route.PACKET: ("packet_id",),
    Route.USER: ("user_id", "user_ids"),
    Route.NEW_PACKET: ("sender_id",),
}


class Steering(enum.IntEnum):
    NONE = 0  # one worker: any connection reaches it
    SOURCE_PORT = 1  # reuseport BPF: worker = (TCP source port >> 1) % worker_count


# ---------------------------------------------------------------- layouts

FIXED_LETTERS = "BHIQq"
LETTERS = FIXED_LETTERS + "ktbj"


@dataclass(frozen=True, slots=True)
class Rows:
    """A counted list: `count` is H or I; each row is `fields` (name -> letter)."""

    count: str
    fields: tuple[tuple[str, str], ...]

    @property
    def letters(self) -> str:
        return "".join(letter for _, letter in self.fields)


def rows(count: str, /, **fields: str) -> Rows:
    assert count in "HI" and fields and all(len(v) == 1 and v in LETTERS for v in fields.values())
    return Rows(count, tuple(fields.items()))


@dataclass(frozen=True, slots=True)
class Layout:
    """A message body: named fields in order, at most one of them `Rows`."""

    fields: tuple[tuple[str, str | Rows], ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.fields)

    @property
    def head(self) -> str:
        """The letters of the fixed fields before the rows (all of them
        without rows)."""
        out = []
        for _, kind in self.fields:
            if isinstance(kind, Rows):
                break
            out.append(kind)
        return "".join(out)

    @property
    def rows(self) -> Rows | None:
        return next((kind for _, kind in self.fields if isinstance(kind, Rows)), None)

    @property
    def tail(self) -> Layout | None:
        """The fields after the list: fields an answer grew at its end after
        its list (PACKET's group_id, EVENTS' transfer_ids), None if none."""
        if self.rows is None or len(self.fields) == len(self.head) + 1:
            return None
        after = self.fields[len(self.head) + 1 :]
        assert all(isinstance(k, str) and k in FIXED_LETTERS for _, k in after) or (
            len(after) == 1 and isinstance(after[0][1], Rows)
        ), "after the list: fixed fields, or one more list"
        return Layout(after)


def layout(**fields: str | Rows) -> Layout:  # noqa: D103 - kwargs keep their order
    kinds = list(fields.values())
    # A second list only ever comes last: a list an answer grew at its end.
    assert sum(isinstance(k, Rows) for k in kinds) <= 1 or (
        sum(isinstance(k, Rows) for k in kinds) == 2 and isinstance(kinds[-1], Rows)
    ), "one list a message, and at most one more at its end"
    assert all(isinstance(k, Rows) or (len(k) == 1 and k in LETTERS) for k in kinds), kinds
    return Layout(tuple(fields.items()))


EMPTY = layout()


@dataclass(frozen=True, slots=True)
class Message:
    """One operation: its request and its OK answer (errors all share ERROR)."""

    op: Op
    request: Layout
    answer: Layout
    scope: Scope = Scope.APP  # the least scope that may send it
    writes: bool = False  # it changes state: a connection broken under it leaves it IN_DOUBT
    route: Route = Route.ANY  # where a client sends it
    doc: str = field(default="", compare=False)

    @property
    def route_field(self) -> str:
        """The request field whose value routes it ("" when the route needs none)."""
        names = self.request.names
        return next((name for name in ROUTE_FIELDS.get(self.route, ()) if name in names), "")


ERROR = layout(message="t")  # the body of every answer whose status is not OK
# WRONG_SET, the typed redirect: ERROR's message, then the set that holds the
# request's user or packet and where that set's workers listen (PROTOCOL.md).
WRONG_SET_BODY = layout(message="t", set_id="H", host="t", port="H")
# Statuses whose error body carries more after the message, at its end.
ERROR_TAILS: dict[Status, Layout] = {
    Status.CURSOR_EXPIRED: layout(message="t", resume_cursor="Q"),  # the oldest cursor still valid
    Status.WRONG_SET: WRONG_SET_BODY,
}

_PAGE = layout(user_id="Q", cursor="Q", limit="H")
_IDS16 = rows("H", user_id="Q")

MESSAGES: dict[Op, Message] = {
    m.op: m
    for m in (
        Message(
            Op.HELLO,
            layout(version="H", token="b"),
            layout(
                version="H",
                scope="B",
                worker_count="H",
                max_frame_bytes="I",
                max_inflight="I",
                max_queued_grabs="I",
                # The event feed's limits (EVENTS): rows a page, the longest
                # wait, and what is retained (ms, and events).
                events_max_page="H",
                events_max_wait_ms="I",
                events_retention_ms="Q",
                events_retention_max_events="Q",
            ),
            doc="the first request of a connection: version and token",
        ),
        Message(Op.PING, EMPTY, EMPTY),
        Message(Op.REGISTER, layout(user_ids=_IDS16), layout(created="H"), writes=True, route=Route.USER),
        Message(
            Op.DEPOSIT,
            layout(key="k", user_id="Q", amount_cents="q"),
            layout(balance_cents="q", transfer_id="Q"),
            scope=Scope.ADMIN,
            writes=True,
            route=Route.USER,
        ),
        Message(
            Op.BALANCE,
            layout(user_id="Q"),
            layout(balance_cents="q", in_flight_cents="q", sets_unreached="H"),
            route=Route.USER,
        ),
        Message(
            Op.WITHDRAW,
            layout(key="k", user_id="Q", amount_cents="q"),
            layout(balance_cents="q", transfer_id="Q"),
            scope=Scope.ADMIN,
            writes=True,
            route=Route.USER,
        ),
        Message(
            Op.STATEMENT,
            _PAGE,
            layout(
                balance_cents="q",
                next_cursor="Q",
                entries=rows("H", transfer_id="Q", kind="B", amount_cents="q", packet_id="Q", at_ms="q"),
            ),
            route=Route.USER,
        ),
        Message(
            Op.AUDIT,
            EMPTY,
            layout(ok="B", results=rows("H", is_check="B", name="t", value="q")),
            scope=Scope.ADMIN,
            route=Route.EVERY_SET,
        ),
        Message(
            Op.SEND,
            layout(
                key="k",
                sender_id="Q",
                total_cents="q",
                count="I",
                mode="B",
                expiry_seconds="I",
                audience="B",
                members=rows("I", user_id="Q"),
                greeting="t",
            ),
            layout(packet_id="Q", sender_balance_cents="q", expires_at_ms="q"),
            writes=True,
            route=Route.NEW_PACKET,
        ),
        Message(
            Op.GRAB,
            layout(packet_id="Q", user_id="Q"),
            layout(amount_cents="q", seq="I", remaining_count="I"),
            route=Route.PACKET,
        ),
        Message(
            Op.PACKET,
            layout(packet_id="Q", claims_offset="I", claims_limit="H"),
            layout(
                sender_id="Q",
                total_cents="q",
                count="I",
                mode="B",
                status="B",
                audience="B",
                created_at_ms="q",
                expires_at_ms="q",
                claimed_cents="q",
                claimed_count="I",
                refunded_cents="q",
                luckiest_seq="I",
                greeting="t",
                claims=rows("H", seq="I", user_id="Q", amount_cents="q"),
                group_id="Q",
            ),
            route=Route.PACKET,
        ),
        Message(
            Op.SENT_LIST,
            _PAGE,
            layout(
                next_cursor="Q",
                packets=rows(
                    "H",
                    packet_id="Q",
                    total_cents="q",
                    count="I",
                    claimed_count="I",
                    claimed_cents="q",
                    refunded_cents="q",
                    status="B",
                    audience="B",
                    created_at_ms="q",
                    expires_at_ms="q",
                ),
            ),
            route=Route.USER,
        ),
        Message(
            Op.RECEIVED_LIST,
            _PAGE,
            layout(
                next_cursor="Q",
                shares=rows("H", packet_id="Q", sender_id="Q", seq="I", amount_cents="q", claimed_at_ms="q"),
            ),
            route=Route.USER,
        ),
        Message(
            Op.GROUP_CREATE,
            layout(group_id="Q", name="t", members=_IDS16),
            layout(created="B", member_count="I"),
            writes=True,
            route=Route.EVERY_SET,
        ),
        Message(
            Op.GROUP_ADD,
            layout(group_id="Q", user_ids=_IDS16),
            layout(changed="I", member_count="I"),
            writes=True,
            route=Route.EVERY_SET,
        ),
        Message(
            Op.GROUP_REMOVE,
            layout(group_id="Q", user_ids=_IDS16),
            layout(changed="I", member_count="I"),
            writes=True,
            route=Route.EVERY_SET,
        ),
        Message(
            Op.GROUP_INFO,
            layout(group_id="Q", cursor="Q", limit="H"),
            layout(member_count="I", next_cursor="Q", name="t", members=rows("H", user_id="Q")),
        ),
        Message(
            Op.TOPOLOGY,
            EMPTY,
            layout(worker_count="H", shard_count="H", steering="B", set_id="H"),
        ),
        Message(Op.STATS, EMPTY, layout(document="j")),
        Message(
            Op.EVENTS,
            layout(cursor="Q", limit="H", wait_ms="I"),
            layout(
                next_cursor="Q",
                head="Q",
                events=rows(
                    "H",
                    number="Q",
                    kind="B",
                    at_ms="q",
                    packet_id="Q",
                    user_id="Q",
                    seq="I",
                    count="I",
                    amount_cents="q",
                    elapsed_ms="q",
                ),
                # Grown at the end within version 1: each row's transfer (0:
                # none, a share's is written by its roll-up), in row order.
                transfer_ids=rows("H", transfer_id="Q"),
            ),
            doc="the events numbered after the cursor; waits up to wait_ms for one",
        ),
    )
}

assert set(MESSAGES) == set(Op), "every opcode has its message"
assert all(m.route_field or m.route not in ROUTE_FIELDS for m in MESSAGES.values()), "a routed request has its key"


def field_offset(message_layout: Layout, name: str) -> int:
    """Where a field of a layout's fixed head starts, counted from the body."""
    sizes = {"B": 1, "H": 2, "I": 4, "Q": 8, "q": 8, "k": IDEMPOTENCY_KEY_BYTES}
    pos = 0
    for field_name, kind in message_layout.fields:
        if field_name == name:
            return pos
        assert isinstance(kind, str) and kind in sizes, "only fixed fields before it"
        pos += sizes[kind]
    raise KeyError(name)


def opcode_name(opcode: int) -> str:
    """A metric label: the operation's name, `framing` for NO_OPCODE."""
    if opcode == NO_OPCODE:
        return "framing"
    try:
        return Op(opcode).name.lower()
    except ValueError:
        return f"0x{opcode:02x}"
