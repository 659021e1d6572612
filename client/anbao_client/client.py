"""The asyncio client: one TCP connection, many requests in flight on it.

Answers may arrive in any order; each is matched to its request by id.
"""

from __future__ import annotations

import asyncio
import errno
import random
import socket
import ssl as ssl_module
from collections.abc import Callable, Collection
from typing import TypeVar

from . import wire
from .checks import check_int
from .errors import Busy, ConnectionLost, InDoubt, NotAnbao, RequestTimeout, RetryLater, error_for
from .operations import Operations, Request, new_idempotency_key
from .protocol import NO_OPCODE, OPCODE_OFFSET
from .wire import Status

__all__ = ["Client", "new_idempotency_key"]

T = TypeVar("T")

DEFAULT_TIMEOUT_MS = 10_000
MAX_INFLIGHT_DEFAULT = 4096
IN_DOUBT_FIRST_PAUSE_S = 0.05  # then doubling, up to the next
IN_DOUBT_MAX_PAUSE_S = 0.5
# BUSY says the server is overloaded and did nothing: the request is sent
# again, after a pause drawn between half and all of one that starts here
# and doubles, for at most busy_retry_ms in all; then Busy reaches the
# caller. Random pauses keep clients turned away together from coming back
# together. RATE_LIMITED is not retried: it is this caller's own quota, the
# caller's to pace.
BUSY_RETRY_MS = 2_000
BUSY_FIRST_PAUSE_S = 0.005
BUSY_MAX_PAUSE_S = 0.25

# HELLO's request id, "\r\n\r\n": a line-oriented server met by mistake
# (HTTP, such as the metrics port; memcached; redis) sees a line end and
# answers at once, in its own language, which the client then recognises
# as not the protocol instead of waiting out its timeout. The anbao server
# gives request ids no meaning but to match answers.
HELLO_REQUEST_ID = 0x0D0A0D0A

# `build` functions: a request id in, the whole request frame out.
Build = Callable[[int], bytes]


class _Protocol(asyncio.Protocol):
    def __init__(self, client: Client) -> None:
        self._client = client
        self._frames = wire.FrameBuffer()
        self._seen_frame = False

    def data_received(self, data: bytes) -> None:
        try:
            responses = self._frames.feed(data)
        except ValueError as exc:
            first = self._client.hello is None and not self._seen_frame
            self._client._fail_all(_not_anbao(data) if first else ConnectionLost(str(exc)))
            if self._client._transport is not None:
                self._client._transport.close()
            return
        self._seen_frame = self._seen_frame or bool(responses)
        for r in responses:
            self._client._deliver(r)

    def connection_lost(self, exc: Exception | None) -> None:
        # Who closed it matters to whoever reads the message: a close()
        # is the client's own doing, not the server's.
        why = str(exc) if exc else "client is closed" if self._client._closing else "connection closed by server"
        self._client._fail_all(ConnectionLost(why))


def _not_anbao(data: bytes) -> NotAnbao:
    """The error for a first answer that is no frame of the protocol."""
    head = data[:48]
    what = "an HTTP server (the metrics port?)" if b"HTTP/" in head or b"<!DOCTYPE" in head.upper() else "a server"
    return NotAnbao(f"{what} answered, not in the anbao protocol: {head!r}")


class Client(Operations):
    """One connection. Use `await Client.connect(host, port, token)`; close
    with `await c.close()`. Its operations are Operations'."""

    def __init__(self, timeout_ms: int, max_inflight: int, busy_retry_ms: int = BUSY_RETRY_MS) -> None:
        # Checked, not asserted: they come from the caller (and asserts vanish under -O).
        for name, value, least in (("timeout_ms", timeout_ms, 1), ("max_inflight", max_inflight, 1)):
            check_int(name, value, "I")
            if value < least:
                raise ValueError(f"{name} must be at least {least}, not {value}")
        check_int("busy_retry_ms", busy_retry_ms, "I")
        self.timeout_ms = timeout_ms
        self.busy_retry_ms = busy_retry_ms
        self._pending: dict[int, asyncio.Future[wire.Response]] = {}
        self._next_id = 1
        self._transport: asyncio.Transport | None = None
        self._closed_error: Exception | None = None
        self._closing = False
        self._slots = asyncio.Semaphore(max_inflight)
        self.hello: wire.Hello | None = None
        # How to open another connection like this one (events() follows on its own).
        self._address: tuple[str, int, bytes, ssl_module.SSLContext | None] | None = None

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        token: str | bytes,
        *,
        timeout_ms: int = DEFAULT_TIMEOUT_MS,
        max_inflight: int = MAX_INFLIGHT_DEFAULT,
        ssl: ssl_module.SSLContext | None = None,
        local_port: int | None = None,
        busy_retry_ms: int = BUSY_RETRY_MS,
    ) -> Client:
        """busy_retry_ms: how long a request answered BUSY is sent again,
        backing off, before Busy reaches the caller (0: at once)."""
        if not isinstance(token, str | bytes):
            raise TypeError(f"token must be a str or bytes, not {type(token).__name__}")
        check_int("port", port, "H")
        self = cls(timeout_ms, max_inflight, busy_retry_ms)
        loop = asyncio.get_running_loop()
        local_addr = (host, local_port) if local_port else None
        transport, _ = await asyncio.wait_for(
            loop.create_connection(lambda: _Protocol(self), host, port, ssl=ssl, local_addr=local_addr),
            timeout_ms / 1000,
        )
        self._transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and transport.get_extra_info("sockname") == transport.get_extra_info("peername"):
            # A chosen source port equal to a server port that nobody listens
            # on (a server stopping) connects the socket to itself: TCP's
            # simultaneous open. The client would read its own HELLO back as
            # the answer. Refused like a taken port, so a steered connect
            # draws another.
            transport.close()
            self._transport = None
            raise OSError(errno.EADDRNOTAVAIL, f"connected to itself on {host}:{port}")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        token_bytes = token.encode() if isinstance(token, str) else token
        self._address = (host, port, token_bytes, ssl)
        self._next_id = HELLO_REQUEST_ID
        r = await self._call(lambda rid: wire.hello(rid, token_bytes))
        self._next_id = 1
        self.hello = wire.decode_hello(r.body)
        return self

    async def close(self) -> None:
        self._closing = True
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        await asyncio.sleep(0)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------ plumbing

    def _take_id(self) -> int:
        rid = self._next_id
        while rid in self._pending:
            rid = rid % 0xFFFFFFFF + 1
        self._next_id = rid % 0xFFFFFFFF + 1
        return rid

    async def _call(
        self, build: Build, *, ok: Collection[int] = (Status.OK,), retry_in_doubt: bool = False
    ) -> wire.Response:
        """_call_settled, sent again while the server answers BUSY (nothing
        was done), backing off, for at most busy_retry_ms."""
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + self.busy_retry_ms / 1000
        pause_s = BUSY_FIRST_PAUSE_S
        while True:
            try:
                return await self._call_settled(build, ok=ok, retry_in_doubt=retry_in_doubt)
            except Busy:
                wait_s = pause_s * random.uniform(0.5, 1.0)
                if loop.time() + wait_s >= give_up_at:
                    raise
            await asyncio.sleep(wait_s)
            pause_s = min(pause_s * 2, BUSY_MAX_PAUSE_S)

    async def _call_settled(
        self, build: Build, *, ok: Collection[int] = (Status.OK,), retry_in_doubt: bool = False
    ) -> wire.Response:
        """Sends one request and waits for its answer; statuses outside `ok`
        raise their typed error.

        retry_in_doubt: for requests whose retry returns the first answer
        (GRAB, and the keyed DEPOSIT, WITHDRAW, SEND: `build` repeats the
        same key), an IN_DOUBT answer is retried here, with a growing pause,
        until a definite answer or until timeout_ms has passed since the
        first send; only then does InDoubt reach the caller. Once in doubt,
        RetryLater answers to the retries are retried too: they say the
        retry moved nothing, not what the first attempt did."""
        if not retry_in_doubt:
            return await self._call_once(build, ok)
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + self.timeout_ms / 1000
        pause_s = IN_DOUBT_FIRST_PAUSE_S
        doubt: InDoubt | None = None
        while True:
            try:
                return await self._call_once(build, ok)
            except InDoubt as exc:
                doubt = exc
            except RetryLater as exc:
                if doubt is None:
                    raise
                doubt.__context__ = exc
            if loop.time() + pause_s >= give_up_at:
                assert doubt is not None
                raise doubt
            await asyncio.sleep(pause_s)
            pause_s = min(pause_s * 2, IN_DOUBT_MAX_PAUSE_S)

    async def _call_once(self, build: Build, ok: Collection[int], timeout_ms: int | None = None) -> wire.Response:
        if self._closed_error is not None:
            raise self._closed_error
        if self._transport is None:
            raise ConnectionLost("client is closed")
        async with self._slots:
            rid = self._take_id()
            # Built before its answer is awaited: a request that cannot be
            # built leaves nothing pending (no future failed later, unseen).
            request = build(rid)
            fut: asyncio.Future[wire.Response] = asyncio.get_running_loop().create_future()
            self._pending[rid] = fut
            self._transport.write(request)
            wait_ms = timeout_ms or self.timeout_ms
            try:
                r = await asyncio.wait_for(fut, wait_ms / 1000)
            except TimeoutError:
                raise RequestTimeout(f"no answer in {wait_ms} ms (request {rid})") from None
            finally:
                self._pending.pop(rid, None)
        if r.opcode != request[OPCODE_OFFSET] and r.opcode != NO_OPCODE:
            # An answer to another operation under this request id: nothing
            # on this connection can be trusted any more.
            lost = ConnectionLost(f"request {rid} (opcode 0x{request[OPCODE_OFFSET]:02x}) answered as 0x{r.opcode:02x}")
            self._fail_all(lost)
            if self._transport is not None:
                self._transport.close()
            raise lost
        if r.status not in ok:
            raise error_for(r.status, wire.error_message(r.body), r.worker_id, **wire.error_fields(r.status, r.body))
        return r

    def _deliver(self, r: wire.Response) -> None:
        fut = self._pending.pop(r.request_id, None)
        if fut is not None and not fut.done():
            fut.set_result(r)

    def _fail_all(self, exc: Exception) -> None:
        self._closed_error = exc
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(exc)

    # ------------------------------------------------------------ routing: this one connection

    async def _submit(self, request: Request[T]) -> T:
        op, values = request.op, request.values

        def build(rid: int) -> bytes:
            return wire.request(op, rid, *values)

        if request.long_poll_ms:
            r = await self._call_once(build, request.ok, self.timeout_ms + request.long_poll_ms)
        else:
            r = await self._call(build, ok=request.ok, retry_in_doubt=request.retry_in_doubt)
        return request.decode(r)

    async def _open_feed(self) -> Client:
        assert self._address is not None, "events() needs a client made by connect()"
        host, port, token, ssl = self._address
        return await Client.connect(host, port, token, timeout_ms=self.timeout_ms, ssl=ssl)

    async def topology(self) -> wire.Topology:
        """What this connection's worker says of the workers behind the port
        (a question about the connection, so Client's alone)."""
        return wire.decode_topology(await self._call(wire.topology))
