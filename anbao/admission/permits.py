"""Permit counters: memcached (shared by the workers of a machine) or, when
there is none, one in this process."""
from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("anbao.admission")

# decr stops at zero and cannot say whether it was already zero, so a
# counter stores permits + 1: a decr answering 0 means there was none.
SENTINEL = 1


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


class MemcachedPermits(Permits):
    mode = "memcached"

    def __init__(self, host: str, port: int, set_id: int, pool_size: int = 8, timeout_ms: int = 200):
        import aiomcache
        self._mc = aiomcache.Client(host, port, pool_size=pool_size)
        self._prefix = f"anbao:{set_id}:permits:".encode()
        self._timeout_s = timeout_ms / 1000
        self._background: set[asyncio.Task] = set()
        self.errors = 0
        self.address = f"{host}:{port}"

    def _key(self, packet_id: int) -> bytes:
        return self._prefix + str(packet_id).encode()

    def _failed(self, exc: BaseException) -> None:
        self.errors += 1
        if self.errors == 1 or self.errors % 10_000 == 0:
            log.warning("memcached at %s failing (%r); admitting everything meanwhile (%d errors)",
                        self.address, exc, self.errors)

    async def admit(self, packet_id: int) -> bool:
        try:
            left = await asyncio.wait_for(self._mc.decr(self._key(packet_id)), self._timeout_s)
        except Exception as exc:
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
