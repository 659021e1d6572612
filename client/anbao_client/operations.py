"""Every operation of the SDK, declared once.

`Operations` is a mixin, as redis-py's command mixins are over
`execute_command` and TigerBeetle's Python client's state machine mixin is
over `_submit`: each method checks its arguments, lays out a `Request` (the
operation, its fields in the protocol table's order, how its answer
decodes) and hands it to `_submit`. A client implements only `_submit`,
its routing: Client sends on its one connection, Cluster picks the
packet's owner, SetCluster the set (protocol.Route says which, per
message). SyncClient runs the same methods on a private loop.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Generic, Protocol, TypeVar

from . import wire
from .checks import check, check_int
from .errors import AlreadyClaimed, OutcomeUnknown, RateLimited, RetryLater
from .protocol import MAX_EVENTS_PAGE, MAX_PAGE_ROWS, MESSAGES, Op, Route
from .wire import Status

T = TypeVar("T")

EVENTS_WAIT_MS = 30_000  # how long one EVENTS long poll waits for news
EVENTS_RECONNECT_FIRST_PAUSE_S = 0.05  # then doubling, up to the next
EVENTS_RECONNECT_MAX_PAUSE_S = 2.0

_OK_ONLY = (Status.OK,)
# Where each routed request carries its key, among its fields.
_KEY_AT: dict[Op, int] = {op: m.request.names.index(m.route_field) for op, m in MESSAGES.items() if m.route_field}


def new_idempotency_key() -> bytes:
    return os.urandom(wire.IDEMPOTENCY_KEY_BYTES)


@dataclass(frozen=True, slots=True)
class Request(Generic[T]):
    """One operation's request, as every client routes and sends it."""

    op: Op
    values: tuple[Any, ...]  # the request's fields, in the protocol table's order
    decode: Callable[[wire.Response], T]  # an OK answer (or one in `ok`) to the result
    ok: tuple[int, ...] = _OK_ONLY  # the statuses that are no error
    # Its retry returns the first answer (GRAB, and the keyed DEPOSIT,
    # WITHDRAW, SEND): an IN_DOUBT answer is retried until a definite one.
    retry_in_doubt: bool = False
    long_poll_ms: int = 0  # EVENTS' wait: added to its timeout, and sent once (events() paces retries)

    @property
    def route(self) -> Route:
        return MESSAGES[self.op].route

    @property
    def key(self) -> Any:
        """The value that routes it (a packet id, a user id or REGISTER's ids)."""
        return self.values[_KEY_AT[self.op]]

    def with_key(self, key: Any) -> Request[T]:
        """The same request for another key (REGISTER's ids of one set)."""
        at = _KEY_AT[self.op]
        return replace(self, values=(*self.values[:at], key, *self.values[at + 1 :]))


class Feed(Protocol):
    """A connection of its own that events() reads the feed on (a Client)."""

    async def events_page(
        self, after: int = 0, *, limit: int = MAX_EVENTS_PAGE, wait_ms: int = 0
    ) -> wire.EventsPage: ...

    async def close(self) -> None: ...


def _body(decode: Callable[[bytes], T]) -> Callable[[wire.Response], T]:
    return lambda r: decode(r.body)


def _grabbed(r: wire.Response) -> wire.Grabbed:
    g = wire.decode_grab(r)
    if g.already_claimed:
        err = AlreadyClaimed("user already holds a share of this packet", worker_id=r.worker_id)
        err.grabbed = g
        raise err
    return g


def _stats(r: wire.Response) -> dict[str, Any]:
    figures: dict[str, Any] = json.loads(wire.decode_stats(r.body))
    return figures


def _worker_id(r: wire.Response) -> int:
    return r.worker_id


class Operations:
    """The operations every client offers; a client implements `_submit`
    (where a request goes) and `_open_feed` (a connection of its own for
    the event feed)."""

    async def _submit(self, request: Request[T]) -> T:
        raise NotImplementedError

    async def _open_feed(self) -> Feed:
        raise NotImplementedError

    async def ping(self) -> int:
        """The id of the worker that answered."""
        return await self._submit(Request(Op.PING, (), _worker_id))

    async def register(self, user_ids: list[int]) -> int:
        """Opens wallets for these user ids; returns how many were new."""
        check(Op.REGISTER, user_ids=user_ids)
        return await self._submit(Request(Op.REGISTER, (user_ids,), _body(wire.decode_register)))

    async def deposit(self, user_id: int, amount_cents: int, *, key: bytes | None = None) -> wire.Deposited:
        """Admin scope: money into a wallet from the outside world."""
        k = new_idempotency_key() if key is None else key
        check(Op.DEPOSIT, key=k, user_id=user_id, amount_cents=amount_cents)
        values = (k, user_id, amount_cents)
        return await self._submit(Request(Op.DEPOSIT, values, _body(wire.decode_deposited), retry_in_doubt=True))

    async def withdraw(self, user_id: int, amount_cents: int, *, key: bytes | None = None) -> wire.Withdrawn:
        """Admin scope: money out of a wallet to the outside world. Above the
        balance it raises InsufficientFunds and nothing moves."""
        k = new_idempotency_key() if key is None else key
        check(Op.WITHDRAW, key=k, user_id=user_id, amount_cents=amount_cents)
        values = (k, user_id, amount_cents)
        return await self._submit(Request(Op.WITHDRAW, values, _body(wire.decode_withdrawn), retry_in_doubt=True))

    async def balance(self, user_id: int) -> int:
        """What the user can spend: `balance_detail(...).balance_cents`."""
        return (await self.balance_detail(user_id)).balance_cents

    async def balance_detail(self, user_id: int) -> wire.Balance:
        """The balance, and with several sets what is on its way from them."""
        check(Op.BALANCE, user_id=user_id)
        return await self._submit(Request(Op.BALANCE, (user_id,), _body(wire.decode_balance_detail)))

    async def statement(self, user_id: int, *, cursor: int = 0, limit: int = 100) -> wire.Statement:
        """The wallet's balance and its transfers, newest first; pass
        `next_cursor` back for the next (older) page."""
        check(Op.STATEMENT, user_id=user_id, cursor=cursor, limit=limit)
        return await self._submit(Request(Op.STATEMENT, (user_id, cursor, limit), _body(wire.decode_statement)))

    async def sent(self, user_id: int, *, cursor: int = 0, limit: int = 100) -> wire.Page:
        """The packets a user sent, newest first (items: SentPacket)."""
        check(Op.SENT_LIST, user_id=user_id, cursor=cursor, limit=limit)
        return await self._submit(Request(Op.SENT_LIST, (user_id, cursor, limit), _body(wire.decode_sent_list)))

    async def received(self, user_id: int, *, cursor: int = 0, limit: int = 100) -> wire.Page:
        """The shares a user grabbed, newest first (items: ReceivedShare).
        With several sets it is asked at the user's home set: a share of
        another set's packet shows once its credit arrived (BALANCE's
        in_flight_cents counts it before)."""
        check(Op.RECEIVED_LIST, user_id=user_id, cursor=cursor, limit=limit)
        values = (user_id, cursor, limit)
        return await self._submit(Request(Op.RECEIVED_LIST, values, _body(wire.decode_received_list)))

    async def group_create(self, group_id: int, members: Sequence[int] = (), *, name: str = "") -> wire.GroupCreated:
        """Creates a group under the chat app's id; an id that exists is left
        unchanged (created False), so a retry is safe."""
        check(Op.GROUP_CREATE, group_id=group_id, name=name, members=members)
        values = (group_id, name, list(members))
        return await self._submit(Request(Op.GROUP_CREATE, values, _body(wire.decode_group_created)))

    async def group_add(self, group_id: int, user_ids: Sequence[int]) -> wire.GroupChange:
        check(Op.GROUP_ADD, group_id=group_id, user_ids=user_ids)
        return await self._submit(Request(Op.GROUP_ADD, (group_id, list(user_ids)), _body(wire.decode_group_change)))

    async def group_remove(self, group_id: int, user_ids: Sequence[int]) -> wire.GroupChange:
        check(Op.GROUP_REMOVE, group_id=group_id, user_ids=user_ids)
        values = (group_id, list(user_ids))
        return await self._submit(Request(Op.GROUP_REMOVE, values, _body(wire.decode_group_change)))

    async def group_info(self, group_id: int, *, cursor: int = 0, limit: int = MAX_PAGE_ROWS) -> wire.GroupInfo:
        check(Op.GROUP_INFO, group_id=group_id, cursor=cursor, limit=limit)
        return await self._submit(Request(Op.GROUP_INFO, (group_id, cursor, limit), _body(wire.decode_group_info)))

    async def audit(self) -> wire.AuditResult:
        """Admin scope: the server checks every money invariant on its
        database (with several sets, each set on its own, combined)."""
        return await self._submit(Request(Op.AUDIT, (), _body(wire.decode_audit)))

    async def stats(self) -> dict[str, Any]:
        """The answering worker's figures (with several workers, the first's:
        ask `cluster.clients[i]` for each)."""
        return await self._submit(Request(Op.STATS, (), _stats))

    async def send(
        self,
        sender_id: int,
        total_cents: int,
        count: int,
        *,
        mode: wire.Mode = wire.Mode.RANDOM,
        members: list[int] | None = None,
        to_user: int | None = None,
        group: int | None = None,
        greeting: str = "",
        expiry_seconds: int = 0,
        key: bytes | None = None,
    ) -> wire.Sent:
        """Sends a packet: to one user (to_user), to a member list (members),
        to a group's members at this moment (group), or, with none of these,
        to any registered user."""
        k = new_idempotency_key() if key is None else key
        if sum(x is not None for x in (to_user, members, group)) > 1:
            raise ValueError("send takes one audience: to_user, members or group")
        check(Op.SEND, key=k, sender_id=sender_id, total_cents=total_cents, count=count, mode=mode)
        check(Op.SEND, expiry_seconds=expiry_seconds, greeting=greeting)
        if members is not None:
            check(Op.SEND, members=members)
        for name, one in (("to_user", to_user), ("group", group)):
            if one is not None:
                check_int(name, one, "Q")
        audience: wire.Audience
        ids: list[int]
        if to_user is not None:
            audience, ids = wire.Audience.DIRECT, [to_user]
        elif members is not None:
            audience, ids = wire.Audience.MEMBERS, list(members)
        elif group is not None:
            audience, ids = wire.Audience.GROUP, [group]
        else:
            audience, ids = wire.Audience.OPEN, []
        values = (k, sender_id, total_cents, count, mode, expiry_seconds, audience, ids, greeting)
        return await self._submit(Request(Op.SEND, values, _body(wire.decode_sent), retry_in_doubt=True))

    async def grab(self, packet_id: int, user_id: int) -> wire.Grabbed:
        """Takes a share. A retry after an unknown outcome is safe: it raises
        AlreadyClaimed carrying the first grab's share (`.grabbed`). An
        IN_DOUBT answer (the owner worker died with the grab) is retried
        here; ALREADY_CLAIMED after it means this very grab landed."""
        check(Op.GRAB, packet_id=packet_id, user_id=user_id)
        return await self._submit(
            Request(Op.GRAB, (packet_id, user_id), _grabbed, (Status.OK, Status.ALREADY_CLAIMED), True)
        )

    async def packet(self, packet_id: int, *, claims_offset: int = 0, claims_limit: int = 100) -> wire.PacketInfo:
        check(Op.PACKET, packet_id=packet_id, claims_offset=claims_offset, claims_limit=claims_limit)
        values = (packet_id, claims_offset, claims_limit)
        return await self._submit(Request(Op.PACKET, values, _body(wire.decode_packet)))

    # ------------------------------------------------------------ the event feed

    async def events_page(self, after: int = 0, *, limit: int = MAX_EVENTS_PAGE, wait_ms: int = 0) -> wire.EventsPage:
        """One EVENTS request: the events numbered after `after` (at most
        `limit`); with wait_ms, the server waits that long for one when there
        is none yet (a long poll; this request's timeout is extended by it).
        A cursor older than retention raises CursorExpired (`.resume_cursor`).
        With several sets, the first set's feed: each set numbers its own."""
        check(Op.EVENTS, after=after, limit=limit, wait_ms=wait_ms)
        values = (after, limit, wait_ms)
        return await self._submit(Request(Op.EVENTS, values, _body(wire.decode_events), long_poll_ms=wait_ms))

    async def events(
        self, after: int = 0, *, follow: bool = True, limit: int = MAX_EVENTS_PAGE, wait_ms: int = EVENTS_WAIT_MS
    ) -> AsyncGenerator[wire.Event, None]:
        """Every event numbered after `after`, in order, each once:
        `async for event in client.events(after=cursor)`. With follow (the
        default) it never ends: it long-polls for new events. Without, it
        ends at the head of the feed.

        It reads on a connection of its own and survives its loss: after a
        RetryLater (but RateLimited, the caller's to pace) or an
        OutcomeUnknown it reconnects (pausing a little longer each time) and
        resumes from the last event it yielded. Keep `event.number` as your
        cursor. CursorExpired (the events after your cursor were pruned: see
        `.resume_cursor`) is raised, never skipped silently."""
        cursor = after
        conn: Feed | None = None
        pause_s = EVENTS_RECONNECT_FIRST_PAUSE_S
        try:
            while True:
                try:
                    if conn is None:
                        conn = await self._open_feed()
                    page = await conn.events_page(cursor, limit=limit, wait_ms=wait_ms if follow else 0)
                except RateLimited:
                    raise
                except (RetryLater, OutcomeUnknown, OSError, TimeoutError):
                    if conn is not None:
                        await conn.close()
                        conn = None
                    await asyncio.sleep(pause_s)
                    pause_s = min(pause_s * 2, EVENTS_RECONNECT_MAX_PAUSE_S)
                    continue
                pause_s = EVENTS_RECONNECT_FIRST_PAUSE_S
                for event in page.events:
                    cursor = event.number
                    yield event
                if not page.events and not follow:
                    return
        finally:
            if conn is not None:
                await conn.close()


# The operations: every public method of the mixin (tests/test_sdk_operations.py
# holds each client to them).
OPERATIONS: tuple[str, ...] = tuple(name for name in vars(Operations) if not name.startswith("_"))
