"""Permit counters: memcached (shared by the workers of a machine) or, when
there is none, one in this process."""

from __future__ import annotations

import asyncio
import logging
import time

from ..config import AdmissionTuning

log = logging.getLogger("anbao.admission")

# decr stops at zero and cannot say whether it was already zero, so a
# counter stores permits + 1: a decr answering 0 means there was none.
SENTINEL = 1
LOG_INTERVAL_S = 10.0


class Permits:
    mode = "none"

    async def admit(self, packet_id: int) -> bool:
        return True

    def give_back(self, packet_id: int) -> None:
        pass

    def seed(self, packet_id: int, permits: int) -> None:
        """Creates the counter if absent (owner, on adopting a packet)."""

    def reseed(self, packet_id: int, permits: int) -> None:
        """Overwrites the counter (owner, repairing leaks)."""

    def observe(self, packet_id: int, permits: int) -> None:
        """The owner's answer to a relayed grab said how many shares remain."""

    async def close(self) -> None:
        pass


class InProcessPermits(Permits):
    """Without memcached: each worker keeps its own counter for the packets
    it relays, set from the remaining-share count in the owner's answers.
    Workers cannot see each other's attempts, so each may admit up to the
    whole remainder: a looser filter than memcached's, never a tighter one."""

    mode = "in-process"

    def __init__(self, max_packets: int):
        self._permits: dict[int, int] = {}
        self.max_packets = max_packets

    async def admit(self, packet_id: int) -> bool:
        left = self._permits.get(packet_id)
        if left is None:
            return True
        if left <= 0:
            return False
        self._permits[packet_id] = left - 1
        return True

    def give_back(self, packet_id: int) -> None:
        if packet_id in self._permits:
            self._permits[packet_id] += 1

    def seed(self, packet_id: int, permits: int) -> None:
        if packet_id not in self._permits and len(self._permits) < self.max_packets:
            self._permits[packet_id] = permits

    def reseed(self, packet_id: int, permits: int) -> None:
        if packet_id in self._permits or len(self._permits) < self.max_packets:
            self._permits[packet_id] = permits

    observe = reseed


class _EofIsAnError(asyncio.StreamReader):
    """The reader under every aiomcache connection of ours.

    aiomcache reads a reply with readline() until the line ends in CRLF.
    When memcached closes the connection mid-reply, readline() returns b''
    at once, and keeps doing so: `while not line.endswith(b'\r\n')` in
    FlagClient._execute_simple_command then loops without ever yielding to
    the event loop, so no wait_for() timeout can fire and the worker spins at
    100% CPU, serving nobody (aio-libs/aiomcache#502). The bug lives in that
    loop's contract with readline(): EOF is not "no data yet". Raising here
    fixes every command at once (simple commands, get, stats), whatever the
    loop above does with the line."""

    async def readline(self) -> bytes:
        line = await super().readline()
        if not line:
            raise ConnectionResetError("memcached closed the connection mid-reply")
        return line


class _Pool:
    """aiomcache's pool, made to build its connections on _EofIsAnError and
    to drop a connection whose command was cancelled (a timeout) instead of
    reusing it: the late reply would otherwise be read as the next
    command's, e.g. a stale `0` from decr admitting or refusing the wrong grab."""

    @staticmethod
    def install(client) -> None:
        import aiomcache.pool as mcpool

        class Pool(mcpool.MemcachePool):
            async def _create_new_conn(self):
                if self.size() >= self._maxsize:
                    return None
                loop = asyncio.get_running_loop()
                reader = _EofIsAnError(loop=loop)
                transport, protocol = await loop.create_connection(
                    lambda: asyncio.StreamReaderProtocol(reader, loop=loop), self._host, self._port
                )
                writer = asyncio.StreamWriter(transport, protocol, reader, loop)
                if self.size() < self._maxsize:
                    return mcpool.Connection(reader, writer)
                writer.close()
                return None

            def release(self, conn) -> None:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    self._in_use.discard(conn)
                    self._do_close(conn)
                    return
                super().release(conn)

        old = client._pool
        assert isinstance(old, mcpool.MemcachePool) and not old.size(), "replace the pool before first use"
        client._pool = Pool(old._host, old._port, minsize=old._minsize, maxsize=old._maxsize, conn_args=old.conn_args)


def _error_count(errors: int, since_s: float | None) -> str:
    """'1 error' the first time (no interval to speak of yet), then 'N errors in the last S s'."""
    counted = f"{errors} error{'s' if errors != 1 else ''}"
    return counted if since_s is None else f"{counted} in the last {since_s:.0f} s"


class MemcachedPermits(Permits):
    mode = "memcached"

    def __init__(self, host: str, port: int, set_id: int, tuning: AdmissionTuning):
        import aiomcache

        self._mc = aiomcache.Client(host, port, pool_size=tuning.memcached_pool_size)
        _Pool.install(self._mc)
        self._prefix = f"anbao:{set_id}:permits:".encode()
        self._timeout_s = tuning.memcached_timeout_ms / 1000
        self._background: set[asyncio.Task] = set()
        self.errors = 0
        self.last_error = ""
        self._logged_at: float | None = None  # when failures were last logged; None: never yet
        self._errors_at_log = 0
        self.address = f"{host}:{port}"

    def _key(self, packet_id: int) -> bytes:
        return self._prefix + str(packet_id).encode()

    def _failed(self, exc: BaseException) -> None:
        # Logged when failures start and then once per interval, with a
        # count: never once per grab.
        now = time.monotonic()
        self.errors += 1
        self.last_error = repr(exc)[:200]
        if self._logged_at is not None and now - self._logged_at < LOG_INTERVAL_S:
            return
        log.warning(
            "memcached at %s failing (%s); admitting everything meanwhile (%s)",
            self.address,
            self.last_error,
            _error_count(self.errors - self._errors_at_log, None if self._logged_at is None else now - self._logged_at),
        )
        self._logged_at, self._errors_at_log = now, self.errors

    async def admit(self, packet_id: int) -> bool:
        try:
            left = await asyncio.wait_for(self._mc.decr(self._key(packet_id)), self._timeout_s)
        except Exception as exc:
            # No counter yet (aiomcache raises on NOT_FOUND) is normal, not a failure.
            if "NOT_FOUND" not in str(exc):
                self._failed(exc)
            return True
        return left is None or left >= SENTINEL

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(self._quietly(coro))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _quietly(self, coro) -> None:
        try:
            await asyncio.wait_for(coro, self._timeout_s)
        except Exception as exc:
            if "NOT_FOUND" not in str(exc):  # incr of a counter not seeded (or flushed): nothing to give back to
                self._failed(exc)

    def give_back(self, packet_id: int) -> None:
        self._spawn(self._mc.incr(self._key(packet_id)))

    def seed(self, packet_id: int, permits: int) -> None:
        self._spawn(self._mc.add(self._key(packet_id), str(permits + SENTINEL).encode()))

    def reseed(self, packet_id: int, permits: int) -> None:
        self._spawn(self._mc.set(self._key(packet_id), str(permits + SENTINEL).encode()))

    async def close(self) -> None:
        if self._background:
            await asyncio.wait(list(self._background), timeout=1)
        await self._mc.close()
