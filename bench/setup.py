"""A scenario's set-up through the SDK, before the clock starts: users
registered and funded, packets sent (sold out, for `soldout`), on one
server or on several sets.

User ids (disjoint ranges, so scenarios can share one server):
  1 ..                     grabbers, each attempt of `storm` a distinct one
  800_000_001 ..           users who sell out the `soldout` packet in setup
  900_000_001 ..           senders (one block per scenario)
"""

from __future__ import annotations

import asyncio
import itertools

from rich.console import Console

from anbao_client import Cluster
from anbao_client.routing import home_set, owner_of, set_of

from .runner import progress_bar

GRABBER_FIRST = 1
CLAIMER_FIRST = 800_000_001
SENDER_FIRST = {
    "storm": 900_000_001,
    "soldout": 901_000_001,
    "spread": 902_000_001,
    "mixed": 903_000_001,
    "hot": 904_000_001,
}
CENTS_PER_SHARE = 100
REGISTER_CHUNK = 1024
SETUP_CLUSTERS = 4  # each one connection per worker, steered like the SDK's Cluster
SETUP_CONCURRENCY = 256


def split_evenly(n: int, parts: int) -> list[tuple[int, int]]:
    bounds = [n * i // parts for i in range(parts + 1)]
    return list(itertools.pairwise(bounds))


class Setup:
    """Prepares a server through the SDK (Cluster: one steered connection per
    worker) with an admin token, and knows how to route the load."""

    def __init__(self, console: Console, host: str, port: int, admin_token: str, routing: str = "steered"):
        self.console = console
        self.host, self.port, self.token = host, port, admin_token
        self.routing = routing
        self.clusters: list[Cluster] = []
        self.registered: set[tuple[int, int]] = set()
        self.users = 0  # grabbers registered: GRABBER_FIRST .. GRABBER_FIRST + users - 1
        self.worker_count = 1
        self.steering = 0
        self.setup_steering_ok = True

    async def __aenter__(self) -> Setup:
        self.clusters = [
            await Cluster.connect(self.host, self.port, self.token, timeout_ms=120_000) for _ in range(SETUP_CLUSTERS)
        ]
        topo = self.clusters[0].topology
        self.worker_count, self.steering = topo.worker_count, topo.steering
        if self.worker_count > 1:
            for cl in self.clusters:
                if await cl.steered_workers() != list(range(self.worker_count)):
                    self.setup_steering_ok = False
        return self

    async def __aexit__(self, *exc) -> None:
        for c in self.clusters:
            await c.close()

    @property
    def steer(self) -> bool:
        """Whether the load goes to each packet's owner on steered connections."""
        return self.routing == "steered" and self.worker_count > 1 and bool(self.steering)

    def owner(self, packet_id: int) -> int | None:
        return owner_of(packet_id, self.worker_count) if self.steer else None

    sets = 1

    def route(self, packet_id: int) -> dict:
        """Where a load-generator group for this packet sends (see loadgen)."""
        return {"worker": self.owner(packet_id)}

    def pick_senders(self, first: int, k: int) -> list[int]:
        return list(range(first, first + k))

    def routing_info(self) -> dict:
        return {
            "workers": self.worker_count,
            "routing": "steered to the owner" if self.steer else "any worker",
            "server_steering": self.steering,
            "setup_connections_steered": self.setup_steering_ok,
        }

    async def _each(self, label: str, items, fn) -> list:
        """Runs fn(client, item) over items, many at once, with a progress bar."""
        items = list(items)
        out = [None] * len(items)
        next_i = 0
        with progress_bar(self.console) as bar:
            task = bar.add_task(label, total=len(items), info="setup")

            async def worker(k: int) -> None:
                nonlocal next_i
                client = self.clusters[k % len(self.clusters)]
                while next_i < len(items):
                    i = next_i
                    next_i += 1
                    out[i] = await fn(client, items[i])
                    bar.advance(task)

            await asyncio.gather(*(worker(k) for k in range(min(SETUP_CONCURRENCY, max(1, len(items))))))
        return out

    async def register(self, first: int, n: int) -> None:
        """Through every worker, so that each one knows these users (its
        registered-user cache is warm, as for users who have been around)."""
        if n <= 0 or (first, n) in self.registered:
            return
        await self.register_ids(list(range(first, first + n)))
        self.registered.add((first, n))

    async def register_ids(self, ids: list[int]) -> None:
        chunks = [ids[i : i + REGISTER_CHUNK] for i in range(0, len(ids), REGISTER_CHUNK)]

        async def everywhere(cluster: Cluster, chunk: list[int]) -> None:
            await asyncio.gather(*(c.register(chunk) for c in cluster.clients))

        await self._each(f"register {len(ids):,} users", chunks, everywhere)

    async def fund(self, users: list[int], cents: int) -> None:
        await self._each(f"deposit to {len(users):,} senders", users, lambda c, u: c.clients[0].deposit(u, cents))

    async def send(self, senders: list[int], n: int, total_cents: int, count: int) -> list[int]:
        """n open packets, sender i % len(senders) for the i-th (so that sends
        in flight together debit different wallets), spread over the workers
        (whoever takes a SEND owns the packet)."""

        async def one(c: Cluster, i: int) -> int:
            sent = await c.send(senders[i % len(senders)], total_cents, count)
            return sent.packet_id

        label = f"send {n:,} packet{'s' if n != 1 else ''} of {count:,} shares"
        return await self._each(label, range(n), one)

    async def sell_out(self, packet_id: int, users: list[int]) -> None:  # Cluster.grab goes to the owner
        await self._each(f"sell out packet {packet_id}", users, lambda c, u: c.grab(packet_id, u))


DIRECTORY_TIMEOUT_S = 120.0


class SetsSetup:
    """Setup for several sets: one Setup per set, on its port, and the
    routing of the SDK's SetCluster: a user registered and funded in their
    home set (home_set), a packet sent in its sender's home set, its grabs
    sent to the set that holds it (set_of) and steered to the owner worker
    there. Every set has the same worker count."""

    def __init__(self, console: Console, topology, dsns: dict[int, str], admin_token: str, routing: str = "steered"):
        self.topology, self.dsns = topology, dsns
        self.by_set = {
            s: Setup(console, one.host, one.port, admin_token, routing) for s, one in sorted(topology.sets.items())
        }
        self.users = 0
        self.registered: set[tuple[int, int]] = set()

    async def __aenter__(self) -> SetsSetup:
        try:
            for one in self.by_set.values():
                await one.__aenter__()
        except BaseException:
            await self.__aexit__()
            raise
        counts = {one.worker_count for one in self.by_set.values()}
        assert len(counts) == 1, f"every set has the same worker count, not {counts}"
        return self

    async def __aexit__(self, *exc) -> None:
        for one in self.by_set.values():
            await one.__aexit__(*exc)

    @property
    def _first(self) -> Setup:
        return next(iter(self.by_set.values()))

    @property
    def sets(self) -> int:
        return len(self.by_set)

    @property
    def worker_count(self) -> int:
        return self._first.worker_count

    @property
    def steer(self) -> bool:
        return self._first.steer

    @property
    def setup_steering_ok(self) -> bool:
        return all(one.setup_steering_ok for one in self.by_set.values())

    def home(self, user_id: int) -> int:
        return home_set(user_id, self.topology)

    def owner(self, packet_id: int) -> int | None:
        return self.by_set[set_of(packet_id)].owner(packet_id)

    def route(self, packet_id: int) -> dict:
        s = set_of(packet_id)
        return {"worker": self.owner(packet_id), "port": self.topology.sets[s].port, "set": s}

    def routing_info(self) -> dict:
        return {**self._first.routing_info(), "sets": self.sets, "setup_connections_steered": self.setup_steering_ok}

    def pick_senders(self, first: int, k: int) -> list[int]:
        """k user ids from `first` up, the i-th homed in the (i mod sets)-th
        set: a scenario's packets spread over every set."""
        order = sorted(self.by_set)
        free: dict[int, list[int]] = {s: [] for s in order}
        out: list[int] = []
        u = first
        while len(out) < k:
            want = order[len(out) % len(order)]
            if free[want]:
                out.append(free[want].pop(0))
                continue
            assert u < first + 1000 * (k + len(order)), "no user id homed in every set"
            free[self.home(u)].append(u)
            u += 1
        return out

    def _by_home(self, users: list[int]) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for u in users:
            out.setdefault(self.home(u), []).append(u)
        return out

    async def register(self, first: int, n: int) -> None:
        if n <= 0 or (first, n) in self.registered:
            return
        await self.register_ids(list(range(first, first + n)))
        self.registered.add((first, n))

    async def register_ids(self, ids: list[int]) -> None:
        """Each user at their home set; then waits until every other set's
        directory knows them (a set refuses a grab by a user it does not know)."""
        from anbao.storage.sets import wait_for_directory

        for s, homed in sorted(self._by_home(ids).items()):
            await self.by_set[s].register_ids(homed)
        wanted = {s: [u for u in ids if self.home(u) != s] for s in self.by_set}
        short = await wait_for_directory(self.dsns, wanted, DIRECTORY_TIMEOUT_S)
        if short is not None:
            raise RuntimeError(f"set {short[0]} knows {short[1]:,} of the {short[2]:,} users of the other sets")

    async def fund(self, users: list[int], cents: int) -> None:
        for s, homed in sorted(self._by_home(users).items()):
            await self.by_set[s].fund(homed, cents)

    async def send(self, senders: list[int], n: int, total_cents: int, count: int) -> list[int]:
        """As Setup.send, each packet in its sender's home set."""
        by_set: dict[int, list[int]] = {}
        for i in range(n):
            by_set.setdefault(self.home(senders[i % len(senders)]), []).append(i)
        out = [0] * n
        for s, idx in sorted(by_set.items()):
            got = await self.by_set[s].send([senders[i % len(senders)] for i in idx], len(idx), total_cents, count)
            for i, q in zip(idx, got, strict=True):
                assert set_of(q) == s, f"packet {q} of a sender homed in set {s} is in set {set_of(q)}"
                out[i] = q
        return out


async def register_grabbers(setup: Setup, n: int) -> None:
    await setup.register(GRABBER_FIRST, n)
    setup.users = n
