"""Runs the handler of every request off the GRAB fast path, and turns its
failure into a typed answer: never INTERNAL for anything a client or a
dependency can cause (see dbhealth)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

from anbao_client.protocol import MESSAGES, Op, Scope, Status

from ..core import codec
from ..engine.waitbound import WaitBound
from ..storage.domain import Refused as StorageRefused
from ..storage.idempotency import scoped_key
from . import dbhealth
from .dbhealth import DbHealth
from .ops import FROM_MEMORY, HANDLERS, LONG_POLLS, Context, Refused
from .sets import SetGate

log = logging.getLogger("anbao.dispatch")

# The operations whose request starts with an idempotency key (the table's
# `k` field), scoped here to the caller before any handler sees it.
KEYED = frozenset(m.op for m in MESSAGES.values() if m.request.fields[:1] and m.request.fields[0][1] == "k")


class Requester(Protocol):
    """The connection a request came on, as far as a handler's answer goes."""

    scope: int | None
    caller: str  # the token's name: the namespace of its idempotency keys

    def answer(self, frame: bytes) -> None: ...


def _first_value(since: OrderedDict[int, int]) -> Callable[[], int]:
    return lambda: next(iter(since.values()))


class Dispatcher:
    def __init__(self, ctx: Context, db: DbHealth, gate: SetGate | None = None):
        self.ctx = ctx
        self.gate = gate
        self.db = db
        self.wid = ctx.worker_id
        self._tasks: set[asyncio.Task[None]] = set()
        tuning = ctx.limits.handlers
        self.max_handlers = tuning.max_handlers_per_operation
        self.busy_answers = 0  # STATS: requests refused BUSY by either bound
        # Per operation, the requests being handled (running, or waiting for
        # a connection or a batch) and when each arrived, oldest first: their
        # count is the one bound, the oldest's age the other's. Long polls
        # wait by design and have their own bounds: no wait bound for them.
        self._handling: dict[int, OrderedDict[int, int]] = {op: OrderedDict() for op in HANDLERS}
        self._wait_bounds = {op: WaitBound.of(tuning) for op in HANDLERS if op not in LONG_POLLS}
        self._oldest_ns = {op: _first_value(self._handling[op]) for op in self._wait_bounds}
        self._ticket = 0

    def dispatch(self, conn: Requester, opcode: int, rid: int, args: tuple[Any, ...]) -> asyncio.Task[None] | None:
        """Runs the request's handler in a task of its own (returned), or
        answers it at once (None): refused, redirected, or BUSY."""
        wid = self.wid
        handler = HANDLERS.get(opcode)
        if handler is None:
            if opcode == Op.HELLO:
                conn.answer(codec.encode_error(opcode, rid, Status.INVALID, wid, "already authenticated"))
            else:
                conn.answer(codec.encode_error(opcode, rid, Status.UNKNOWN_OPCODE, wid, f"opcode 0x{opcode:02x}"))
            return None
        if MESSAGES[Op(opcode)].scope == Scope.ADMIN and conn.scope != Scope.ADMIN:
            conn.answer(codec.encode_error(opcode, rid, Status.FORBIDDEN, wid, "needs the admin scope"))
            return None
        if self.gate is not None:
            redirect = self.gate.redirect(opcode, rid, args)
            if redirect is not None:
                conn.answer(redirect)
                return None
        handling = self._handling[opcode]
        why = self._busy(opcode, len(handling))
        if why:
            # Answered now, not queued: what is served keeps a bounded wait,
            # and this operation's backlog never delays another's.
            self.busy_answers += 1
            conn.answer(codec.encode_error(opcode, rid, Status.BUSY, wid, why))
            return None
        if opcode in KEYED:
            args = (scoped_key(conn.caller, args[0]), *args[1:])
        ticket = self._ticket = self._ticket + 1
        handling[ticket] = time.monotonic_ns()
        task = asyncio.get_running_loop().create_task(self._run(handler, conn, opcode, rid, ticket, args))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _busy(self, opcode: int, handling: int) -> str:
        """Why a new request of this operation is refused BUSY ("" if it is not)."""
        if handling >= self.max_handlers:
            return f"{handling} of these in progress here; retry later"
        bound = self._wait_bounds.get(opcode)
        if bound is None or handling < bound.min_backlog:
            return ""
        if not bound.full(handling, time.monotonic_ns(), self._oldest_ns[opcode]):
            return ""
        return f"{handling} of these waiting here, past {bound.window_ns // 1_000_000} ms; retry later"

    def _finished(self, opcode: int, ticket: int) -> None:
        del self._handling[opcode][ticket]
        bound = self._wait_bounds.get(opcode)
        if bound is not None:
            bound.done(1, time.monotonic_ns())

    def in_progress(self, opcode: int) -> int:
        """Requests of this operation being handled here now."""
        return len(self._handling[opcode])

    @property
    def busy_over_wait(self) -> int:
        """STATS: requests refused BUSY by the wait bound (engine/waitbound.py)."""
        return sum(b.refused for b in self._wait_bounds.values())

    async def _run(self, handler, conn: Requester, opcode: int, rid: int, ticket: int, args: tuple[Any, ...]) -> None:
        try:
            frame = await handler(self.ctx, rid, *args)
            if opcode not in FROM_MEMORY:
                self.db.succeeded()
        except Refused as exc:
            frame = codec.encode_error(opcode, rid, exc.status, self.wid, str(exc))
        except StorageRefused as exc:  # storage's reason: the wire status of the same name
            frame = codec.encode_error(opcode, rid, Status[exc.reason.name], self.wid, str(exc))
        except Exception as exc:
            frame = self._database_error(opcode, rid, exc)
        finally:
            self._finished(opcode, ticket)
        conn.answer(frame)

    def _database_error(self, opcode: int, rid: int, exc: Exception) -> bytes:
        """The typed answer to a handler's failure (see dbhealth)."""
        wid = self.wid
        kind = dbhealth.classify(exc)
        if kind is None:
            log.exception("opcode 0x%02x failed", opcode, exc_info=exc)
            return codec.encode_error(opcode, rid, Status.INTERNAL, wid, "internal error")
        if kind == dbhealth.BAD_VALUE:
            return codec.encode_error(opcode, rid, Status.INVALID, wid, f"a value does not fit: {exc}")
        if kind == dbhealth.ROLLED_BACK:
            return codec.encode_error(
                opcode,
                rid,
                Status.UNAVAILABLE,
                wid,
                f"the database undid it ({type(exc).__name__}); nothing changed, retry",
            )
        self.db.failed(exc)  # logs the outage, not each request
        if kind == dbhealth.BROKE and MESSAGES[Op(opcode)].writes:
            return codec.encode_error(
                opcode,
                rid,
                Status.IN_DOUBT,
                wid,
                "the database connection broke under this"
                " request: it may have been applied; retrying it (same key) is safe",
            )
        return codec.encode_error(opcode, rid, Status.UNAVAILABLE, wid, "database unavailable; nothing changed, retry")

    async def drain(self, timeout_s: float) -> None:
        """Waits for the handlers still running (their answers go out)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout_s)
