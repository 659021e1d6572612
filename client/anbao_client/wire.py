"""Pure-Python codec for anbao protocol v1 (see PROTOCOL.md).

The server speaks through its Cython codec (anbao/_fastpath.pyx); this is a
second, independent implementation so the SDK installs without a compiler.
The tests hold both to the hex vectors in PROTOCOL.md.
"""
from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

PROTOCOL_VERSION = 1
HEADER = struct.Struct(">IBI")            # length, opcode, request id
RESPONSE_HEADER = struct.Struct(">IBIBH")  # + status, worker id
RESPONSE_BIT = 0x80
DEFAULT_MAX_FRAME_BYTES = 65536
IDEMPOTENCY_KEY_BYTES = 16
MAX_ID = 2**63 - 1


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
    TOPOLOGY = 0x50
    STATS = 0x51
    SENT_LIST = 0x24
    RECEIVED_LIST = 0x25
    GROUP_CREATE = 0x30
    GROUP_ADD = 0x31
    GROUP_REMOVE = 0x32
    GROUP_INFO = 0x33


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
    IN_DOUBT = 18
    INTERNAL = 255


class Mode(enum.IntEnum):
    RANDOM = 1
    FIXED = 2


class Audience(enum.IntEnum):
    OPEN = 0      # any registered user
    DIRECT = 1    # one named user, one share
    MEMBERS = 2   # the member list given at send time
    GROUP = 3     # a group's members (but the sender) at send time


class PacketStatus(enum.IntEnum):
    OPEN = 0
    SOLD_OUT = 1
    EXPIRED = 2
    REFUNDED = 3


class TransferKind(enum.IntEnum):
    DEPOSIT = 1    # external -> wallet
    WITHDRAW = 2   # wallet -> external
    SEND = 3       # sender's wallet -> packet escrow
    GRAB = 4       # escrow -> grabber's wallet
    REFUND = 5     # escrow -> sender's wallet, the remainder after expiry


class Scope(enum.IntEnum):
    APP = 1
    ADMIN = 2
    PEER = 3      # another worker of the same set, relaying GRABs


def frame(opcode: int, request_id: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(5 + len(payload), opcode, request_id) + payload


# ---------------------------------------------------------------- requests

def hello(request_id: int, token: bytes, version: int = PROTOCOL_VERSION) -> bytes:
    return frame(Op.HELLO, request_id, struct.pack(">HH", version, len(token)) + token)


def ping(request_id: int) -> bytes:
    return frame(Op.PING, request_id)


def register(request_id: int, user_ids: list[int]) -> bytes:
    return frame(Op.REGISTER, request_id,
                 struct.pack(">H", len(user_ids)) + b"".join(struct.pack(">Q", u) for u in user_ids))


def deposit(request_id: int, key: bytes, user_id: int, amount_cents: int) -> bytes:
    assert len(key) == IDEMPOTENCY_KEY_BYTES
    return frame(Op.DEPOSIT, request_id, key + struct.pack(">Qq", user_id, amount_cents))


def balance(request_id: int, user_id: int) -> bytes:
    return frame(Op.BALANCE, request_id, struct.pack(">Q", user_id))


def send(request_id: int, key: bytes, sender_id: int, total_cents: int, count: int,
         mode: int, expiry_seconds: int, audience: int, members: list[int], greeting: str) -> bytes:
    assert len(key) == IDEMPOTENCY_KEY_BYTES
    g = greeting.encode("utf-8")
    payload = (key + struct.pack(">QqIBIBI", sender_id, total_cents, count, mode, expiry_seconds,
                                 audience, len(members))
               + b"".join(struct.pack(">Q", m) for m in members)
               + struct.pack(">H", len(g)) + g)
    return frame(Op.SEND, request_id, payload)


def withdraw(request_id: int, key: bytes, user_id: int, amount_cents: int) -> bytes:
    assert len(key) == IDEMPOTENCY_KEY_BYTES
    return frame(Op.WITHDRAW, request_id, key + struct.pack(">Qq", user_id, amount_cents))


def statement(request_id: int, user_id: int, cursor: int = 0, limit: int = 100) -> bytes:
    return frame(Op.STATEMENT, request_id, struct.pack(">QQH", user_id, cursor, limit))


def audit(request_id: int) -> bytes:
    return frame(Op.AUDIT, request_id)


def sent_list(request_id: int, user_id: int, cursor: int = 0, limit: int = 100) -> bytes:
    return frame(Op.SENT_LIST, request_id, struct.pack(">QQH", user_id, cursor, limit))


def received_list(request_id: int, user_id: int, cursor: int = 0, limit: int = 100) -> bytes:
    return frame(Op.RECEIVED_LIST, request_id, struct.pack(">QQH", user_id, cursor, limit))


def _text(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack(">H", len(b)) + b


def _ids16(ids: list[int]) -> bytes:
    return struct.pack(">H", len(ids)) + b"".join(struct.pack(">Q", u) for u in ids)


def group_create(request_id: int, group_id: int, name: str, members: list[int]) -> bytes:
    return frame(Op.GROUP_CREATE, request_id, struct.pack(">Q", group_id) + _text(name) + _ids16(members))


def group_add(request_id: int, group_id: int, user_ids: list[int]) -> bytes:
    return frame(Op.GROUP_ADD, request_id, struct.pack(">Q", group_id) + _ids16(user_ids))


def group_remove(request_id: int, group_id: int, user_ids: list[int]) -> bytes:
    return frame(Op.GROUP_REMOVE, request_id, struct.pack(">Q", group_id) + _ids16(user_ids))


def group_info(request_id: int, group_id: int, cursor: int = 0, limit: int = 1000) -> bytes:
    return frame(Op.GROUP_INFO, request_id, struct.pack(">QQH", group_id, cursor, limit))


def grab(request_id: int, packet_id: int, user_id: int) -> bytes:
    return frame(Op.GRAB, request_id, struct.pack(">QQ", packet_id, user_id))


def topology(request_id: int) -> bytes:
    return frame(Op.TOPOLOGY, request_id)


def stats(request_id: int) -> bytes:
    return frame(Op.STATS, request_id)


def packet(request_id: int, packet_id: int, claims_offset: int = 0, claims_limit: int = 100) -> bytes:
    return frame(Op.PACKET, request_id, struct.pack(">QIH", packet_id, claims_offset, claims_limit))


# ---------------------------------------------------------------- responses

@dataclass(frozen=True, slots=True)
class Response:
    opcode: int
    request_id: int
    status: int
    worker_id: int
    body: bytes


@dataclass(frozen=True, slots=True)
class Hello:
    version: int
    scope: Scope
    worker_count: int
    max_frame_bytes: int
    max_inflight: int
    max_queued_grabs: int    # the owner worker's GRAB queue; past it, GRAB answers BUSY


@dataclass(frozen=True, slots=True)
class Deposited:
    balance_cents: int
    transfer_id: int


@dataclass(frozen=True, slots=True)
class Withdrawn:
    balance_cents: int
    transfer_id: int


@dataclass(frozen=True, slots=True)
class Sent:
    packet_id: int
    sender_balance_cents: int
    expires_at_ms: int


@dataclass(frozen=True, slots=True)
class Grabbed:
    amount_cents: int
    seq: int
    remaining_count: int
    worker_id: int
    already_claimed: bool = False


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
    luckiest_seq: int           # 0 until the packet is sold out
    greeting: str
    claims: list[Claim]

    @property
    def remaining_cents(self) -> int:
        return self.total_cents - self.claimed_cents - self.refunded_cents

    @property
    def luckiest(self) -> Claim | None:
        return next((c for c in self.claims if c.seq == self.luckiest_seq), None)


@dataclass(frozen=True, slots=True)
class Topology:
    worker_id: int          # the worker that answered
    worker_count: int
    shard_count: int
    steering: int           # 1: reuseport BPF on the TCP source port, modulo worker_count
    set_id: int


def decode_topology(r: "Response") -> Topology:
    return Topology(r.worker_id, *struct.unpack(">HHBH", r.body))


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
            while len(self._buf) - pos >= 4:
                (length,) = struct.unpack_from(">I", view, pos)
                if length < 8 or length + 4 > self._max:
                    raise ValueError(f"bad response frame length {length}")
                if len(self._buf) - pos < 4 + length:
                    break
                _, opcode, rid, status, worker = RESPONSE_HEADER.unpack_from(view, pos)
                body = bytes(view[pos + RESPONSE_HEADER.size: pos + 4 + length])
                out.append(Response(opcode & ~RESPONSE_BIT, rid, status, worker, body))
                pos += 4 + length
        finally:
            view.release()
        del self._buf[:pos]
        return out


def error_message(body: bytes) -> str:
    if len(body) < 2:
        return ""
    (n,) = struct.unpack_from(">H", body)
    return body[2:2 + n].decode("utf-8", "replace")


def decode_hello(body: bytes) -> Hello:
    # Answers only grow at their end within a version: read the fields we
    # know, ignore any that follow; a server from before max_queued_grabs
    # was announced says 0 (unknown).
    v, scope, workers, max_frame, max_inflight = struct.unpack_from(">HBHII", body)
    (max_queued_grabs,) = struct.unpack_from(">I", body, 13) if len(body) >= 17 else (0,)
    return Hello(v, Scope(scope), workers, max_frame, max_inflight, max_queued_grabs)


def decode_grab(r: Response) -> Grabbed:
    amount, seq, remaining = struct.unpack(">qII", r.body)
    return Grabbed(amount, seq, remaining, r.worker_id, r.status == Status.ALREADY_CLAIMED)


_PACKET_HEAD = struct.Struct(">QqIBBBqqqIqI")


def decode_packet(body: bytes) -> PacketInfo:
    head = _PACKET_HEAD.unpack_from(body)
    pos = _PACKET_HEAD.size
    (glen,) = struct.unpack_from(">H", body, pos)
    greeting = body[pos + 2: pos + 2 + glen].decode("utf-8")
    pos += 2 + glen
    (n,) = struct.unpack_from(">H", body, pos)
    pos += 2
    claims = [Claim(*struct.unpack_from(">IQq", body, pos + 20 * i)) for i in range(n)]
    assert pos + 20 * n == len(body), "PACKET body length mismatch"
    (sender, total, count, mode, state, audience, created, expires,
     claimed_cents, claimed_count, refunded, luckiest) = head
    return PacketInfo(sender, total, count, Mode(mode), PacketStatus(state), Audience(audience),
                      created, expires, claimed_cents, claimed_count, refunded, luckiest,
                      greeting, claims)


# ---------------------------------------------------------------- lifecycle answers

@dataclass(frozen=True, slots=True)
class StatementEntry:
    transfer_id: int
    kind: TransferKind
    amount_cents: int        # signed: + into the wallet, - out of it
    packet_id: int           # 0 for deposits and withdrawals
    at_ms: int


@dataclass(frozen=True, slots=True)
class Statement:
    balance_cents: int
    entries: list[StatementEntry]   # newest first
    next_cursor: int                # 0: no older entries


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
    items: list
    next_cursor: int                # 0: this was the last page


@dataclass(frozen=True, slots=True)
class GroupCreated:
    created: bool                   # False: the id existed, nothing changed
    member_count: int


@dataclass(frozen=True, slots=True)
class GroupChange:
    changed: int                    # members added (GROUP_ADD) or removed (GROUP_REMOVE)
    member_count: int


@dataclass(frozen=True, slots=True)
class GroupInfo:
    name: str
    member_count: int
    members: list[int]              # this page, in id order
    next_cursor: int


@dataclass(frozen=True, slots=True)
class AuditResult:
    ok: bool
    counts: dict                    # name -> value
    checks: dict                    # invariant -> offending rows found (0: it holds; at most 20 counted)

    @property
    def violated(self) -> list[str]:
        return [name for name, n in self.checks.items() if n]


def _rows(body: bytes, pos: int, row: struct.Struct) -> tuple[list[tuple], int]:
    (n,) = struct.unpack_from(">H", body, pos)
    pos += 2
    rows = [row.unpack_from(body, pos + row.size * i) for i in range(n)]
    return rows, pos + row.size * n


def _read_text(body: bytes, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from(">H", body, pos)
    return body[pos + 2: pos + 2 + n].decode("utf-8"), pos + 2 + n


def decode_withdrawn(body: bytes) -> Withdrawn:
    return Withdrawn(*struct.unpack(">qQ", body))


_STATEMENT_ROW = struct.Struct(">QBqQq")


def decode_statement(body: bytes) -> Statement:
    balance, cursor = struct.unpack_from(">qQ", body)
    rows, end = _rows(body, 16, _STATEMENT_ROW)
    assert end == len(body), "STATEMENT body length mismatch"
    return Statement(balance, [StatementEntry(t, TransferKind(k), a, p, ms) for t, k, a, p, ms in rows], cursor)


_SENT_ROW = struct.Struct(">QqIIqqBBqq")


def decode_sent_list(body: bytes) -> Page:
    (cursor,) = struct.unpack_from(">Q", body)
    rows, end = _rows(body, 8, _SENT_ROW)
    assert end == len(body), "SENT_LIST body length mismatch"
    items = [SentPacket(pid, total, count, cc, cents, refunded, PacketStatus(st), Audience(aud), created, expires)
             for pid, total, count, cc, cents, refunded, st, aud, created, expires in rows]
    return Page(items, cursor)


_RECEIVED_ROW = struct.Struct(">QQIqq")


def decode_received_list(body: bytes) -> Page:
    (cursor,) = struct.unpack_from(">Q", body)
    rows, end = _rows(body, 8, _RECEIVED_ROW)
    assert end == len(body), "RECEIVED_LIST body length mismatch"
    return Page([ReceivedShare(*r) for r in rows], cursor)


def decode_group_created(body: bytes) -> GroupCreated:
    created, n = struct.unpack(">BI", body)
    return GroupCreated(bool(created), n)


def decode_group_change(body: bytes) -> GroupChange:
    return GroupChange(*struct.unpack(">II", body))


def decode_group_info(body: bytes) -> GroupInfo:
    n, cursor = struct.unpack_from(">IQ", body)
    name, pos = _read_text(body, 12)
    rows, end = _rows(body, pos, struct.Struct(">Q"))
    assert end == len(body), "GROUP_INFO body length mismatch"
    return GroupInfo(name, n, [r[0] for r in rows], cursor)


def decode_audit(body: bytes) -> AuditResult:
    ok = body[0]
    (n,) = struct.unpack_from(">H", body, 1)
    pos = 3
    counts, checks = {}, {}
    for _ in range(n):
        kind = body[pos]
        name, pos = _read_text(body, pos + 1)
        (value,) = struct.unpack_from(">q", body, pos)
        pos += 8
        (checks if kind == 1 else counts)[name] = value
    assert pos == len(body), "AUDIT body length mismatch"
    return AuditResult(bool(ok), counts, checks)
