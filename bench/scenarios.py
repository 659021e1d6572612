"""The scenarios: their setup through the SDK (before the clock starts),
what each load-generator process grabs, and what the answers must add up to.

User ids (disjoint ranges, so scenarios can share one server):
  1 ..                     grabbers, each attempt of `storm` a distinct one
  800_000_001 ..           users who sell out the `soldout` packet in setup
  900_000_001 ..           senders (one block per scenario)

- hot:     K packets (default 10, --hot-packets) of S shares (default
           10,000, --shares); attempts = every share (default 100,000), each
           from a distinct user, interleaved over the packets (attempt i on
           packet i mod K): every answer should be OK. The headline scenario,
           measured against the Redis baseline.
- storm:   one open packet of S shares (default 10,000); N attempts
           (default 100,000), each from a distinct registered user.
- soldout: one open packet, sold out during setup; N attempts after that
           (the rejection path).
- spread:  P packets (default 100,000) x K shares (default 10), grabbed in a
           random order; attempt i takes a share that exists, so every
           answer should be OK (P x K attempts by default).
- mixed:   SEND (10%), GRAB (60%) on a pool of packets, PACKET queries
           (20%) and BALANCE (10%), interleaved at random.

baseline_plan() gives the same shapes (same users, same order of attempts,
same share counts, packets numbered from 1) for the Redis baseline.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from array import array
from dataclasses import dataclass, field

import asyncpg
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
MIXED_WEIGHTS = {"SEND": 0.10, "GRAB": 0.60, "PACKET": 0.20, "BALANCE": 0.10}
MIXED_POOL_SHARES = 100
MIXED_SENDERS = 200
MIXED_SEND_SHARES = 10
SCENARIOS = ("hot", "storm", "soldout", "spread", "mixed")
DEFAULT_ATTEMPTS = {"storm": 100_000, "soldout": 200_000, "mixed": 100_000}  # spread, hot: every share


@dataclass
class Sizes:
    attempts: int | None = None  # None: each scenario's default
    shares: int = 10_000
    packets: int = 100_000
    packet_shares: int = 10
    users: int | None = None  # registered grabbers; None: as many as the largest need
    hot_packets: int = 10

    def attempts_for(self, scenario: str) -> int:
        if scenario == "hot":  # at most every share: all of them succeed
            every = self.hot_packets * self.shares
            return every if self.attempts is None else min(self.attempts, every)
        if self.attempts is not None:
            return self.attempts
        if scenario == "spread":
            return self.packets * self.packet_shares
        return DEFAULT_ATTEMPTS[scenario]


@dataclass
class Plan:
    scenario: str
    # per load-generator process: groups {"worker": w | None, "workload": {...}}, with sets also "port", "set"
    workloads: list[list[dict]]
    attempts: int
    packets: list[int] = field(default_factory=list)  # the packets whose claims must match the OK answers
    expect_ok: int | None = None  # exact OK count the answers must show, when known
    allowed: dict = field(default_factory=dict)  # op -> statuses that are not errors
    setup_s: float = 0.0
    info: dict = field(default_factory=dict)
    # Baselines (Redis): packet id -> its share count, and who grabbed before the clock started.
    packet_shares: dict = field(default_factory=dict)
    presold: dict = field(default_factory=dict)
    # The packets that must be sold out after the run (all their shares attempted), when it completes.
    sell_out: list[int] = field(default_factory=list)


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


async def prepare(scenario: str, setup: Setup, sizes: Sizes, procs: int, seed: int) -> Plan:
    started = time.monotonic()
    plan = await _PREPARE[scenario](setup, sizes, procs, seed)
    plan.setup_s = round(time.monotonic() - started, 2)
    return plan


def grabbers_needed(sizes: Sizes, scenarios: list[str]) -> int:
    """storm needs one user per attempt; the others cycle through at most
    100,000 (enough that nobody in `spread` grabs the same packet twice)."""
    if sizes.users is not None:
        return sizes.users
    need = min(100_000, max(sizes.attempts_for(s) for s in scenarios))
    for s in ("storm", "hot"):  # one distinct user per attempt
        if s in scenarios:
            need = max(need, sizes.attempts_for(s))
    return max(need, sizes.packet_shares, 1)


async def _storm(setup: Setup, sizes: Sizes, procs: int, seed: int) -> Plan:
    """One packet of S shares; with sets, one packet per set (its sender
    homed there), the S shares and the N attempts split evenly between them
    (the same storm, spread over the sets)."""
    n, shares = sizes.attempts_for("storm"), sizes.shares
    users = setup.users
    if users < n:
        raise ValueError(f"storm needs {n:,} distinct users, only {users:,} registered (--users)")
    if shares < setup.sets:
        raise ValueError(f"storm over {setup.sets} sets needs at least one share per set (--shares)")
    senders = setup.pick_senders(SENDER_FIRST["storm"], setup.sets)
    share_split = [hi - lo for lo, hi in split_evenly(shares, setup.sets)]
    await setup.register_ids(senders)
    await setup.fund(senders, max(share_split) * CENTS_PER_SHARE)
    packets = [
        (await setup.send([sender], 1, k * CENTS_PER_SHARE, k))[0]
        for sender, k in zip(senders, share_split, strict=True)
    ]
    ranges = split_evenly(n, len(packets))
    work = [
        [
            {
                **setup.route(packet),
                "workload": {
                    "kind": "grab_range",
                    "packet_id": packet,
                    "user_first": GRABBER_FIRST,
                    "user_mod": users,
                    "lo": lo + plo,
                    "hi": lo + phi,
                },
            }
            for packet, (lo, hi) in zip(packets, ranges, strict=True)
            for plo, phi in [split_evenly(hi - lo, procs)[p]]
        ]
        for p in range(procs)
    ]
    one = {"packet_id": packets[0], "owner": setup.owner(packets[0])} if len(packets) == 1 else {}
    return Plan(
        "storm",
        work,
        n,
        packets,
        expect_ok=sum(min(hi - lo, k) for (lo, hi), k in zip(ranges, share_split, strict=True)),
        allowed={"GRAB": {"OK", "SOLD_OUT"}},
        sell_out=[q for q, (lo, hi), k in zip(packets, ranges, share_split, strict=True) if hi - lo >= k],
        info={
            **one,
            "packets": len(packets),
            "shares": shares,
            "total_cents": shares * CENTS_PER_SHARE,
            "distinct_users": n,
            **(
                {
                    "by_packet": [
                        {"packet_id": q, "set": set_of(q), "shares": k, "attempts": hi - lo}
                        for q, (lo, hi), k in zip(packets, ranges, share_split, strict=True)
                    ]
                }
                if len(packets) > 1
                else {}
            ),
            **setup.routing_info(),
        },
    )


async def _soldout(setup: Setup, sizes: Sizes, procs: int, seed: int) -> Plan:
    n, shares = sizes.attempts_for("soldout"), sizes.shares
    sender = SENDER_FIRST["soldout"]
    await setup.register(sender, 1)
    await setup.register(CLAIMER_FIRST, shares)
    await setup.fund([sender], shares * CENTS_PER_SHARE)
    [packet] = await setup.send([sender], 1, shares * CENTS_PER_SHARE, shares)
    await setup.sell_out(packet, list(range(CLAIMER_FIRST, CLAIMER_FIRST + shares)))
    work = [
        [
            {
                "worker": setup.owner(packet),
                "workload": {
                    "kind": "grab_range",
                    "packet_id": packet,
                    "user_first": GRABBER_FIRST,
                    "user_mod": setup.users,
                    "lo": lo,
                    "hi": hi,
                },
            }
        ]
        for lo, hi in split_evenly(n, procs)
    ]
    return Plan(
        "soldout",
        work,
        n,
        [packet],
        expect_ok=0,
        allowed={"GRAB": {"SOLD_OUT"}},
        info={
            "packet_id": packet,
            "owner": setup.owner(packet),
            "shares": shares,
            "claimed_in_setup": shares,
            "distinct_users": min(n, setup.users),
            **setup.routing_info(),
        },
    )


async def _spread(setup: Setup, sizes: Sizes, procs: int, seed: int) -> Plan:
    p, k = sizes.packets, sizes.packet_shares
    n = min(sizes.attempts_for("spread"), p * k)
    if setup.users < k:
        raise ValueError(f"spread needs at least {k} registered users")
    n_senders = max(1, min(1000, p // 10))
    senders = list(range(SENDER_FIRST["spread"], SENDER_FIRST["spread"] + n_senders))
    await setup.register(senders[0], n_senders)
    per_sender = -(-p // n_senders)
    await setup.fund(senders, per_sender * k * CENTS_PER_SHARE)
    packets = await setup.send(senders, p, k * CENTS_PER_SHARE, k)
    pidx, usr = spread_pairs(p, k, n, seed, setup.users)
    pkt = [packets[i] for i in pidx]
    work = pair_workloads(pkt, usr, procs, setup.route)
    per_worker = per_owner([owner_of(q, setup.worker_count) for q in pkt], setup.worker_count)
    return Plan(
        "spread",
        work,
        n,
        packets,
        expect_ok=n,
        allowed={"GRAB": {"OK"}},
        info={
            "packets": p,
            "shares_per_packet": k,
            "senders": n_senders,
            "grabs_per_owner": per_worker,
            **setup.routing_info(),
        },
    )


def spread_pairs(p: int, k: int, n: int, seed: int, users: int) -> tuple[list[int], list[int]]:
    """spread's attempts, (packet index, user) each: every (packet, slot)
    pair once, in a random order (seeded), so attempt i takes a share that
    exists, from a user who holds none of that packet yet."""
    order = random.Random(seed).sample(range(p * k), n)
    return [j // k for j in order], [GRABBER_FIRST + j % users for j in order]


def hot_pairs(k: int, n: int) -> tuple[list[int], list[int]]:
    """hot's attempts: attempt i on packet i mod K, by user GRABBER_FIRST + i
    (every user distinct)."""
    return [i % k for i in range(n)], [GRABBER_FIRST + i for i in range(n)]


def per_owner(owners: list[int], worker_count: int) -> list[int]:
    """How many attempts each worker owns."""
    counts = [0] * worker_count
    for w in owners:
        counts[w] += 1
    return counts


def pair_workloads(pkt: list[int], usr: list[int], procs: int, route=None) -> list[list[dict]]:
    """(packet, user) attempts split evenly between the load-generator
    processes, in order; with route (packet -> where its grabs go:
    Setup.route), each process's share split again by where they go (one
    group each, in attempt order)."""
    work = []
    for lo, hi in split_evenly(len(pkt), procs):
        if route is None:
            groups = {(): ({}, array("q", pkt[lo:hi]), array("q", usr[lo:hi]))}
        else:
            groups = {}
            routes: dict[int, dict] = {}
            for i in range(lo, hi):
                where = routes.get(pkt[i]) or routes.setdefault(pkt[i], route(pkt[i]))
                key = tuple(sorted(where.items()))
                if key not in groups:
                    groups[key] = (where, array("q"), array("q"))
                groups[key][1].append(pkt[i])
                groups[key][2].append(usr[i])
        work.append(
            [{**where, "workload": {"kind": "grab_pairs", "packets": a, "users": b}} for where, a, b in groups.values()]
        )
    return work


async def _hot(setup: Setup, sizes: Sizes, procs: int, seed: int) -> Plan:
    k, s = sizes.hot_packets, sizes.shares
    n = sizes.attempts_for("hot")
    if setup.users < n:
        raise ValueError(f"hot needs {n:,} distinct users, only {setup.users:,} registered (--users)")
    senders = setup.pick_senders(SENDER_FIRST["hot"], k)  # with sets: packet i in set i mod sets
    await setup.register_ids(senders)
    await setup.fund(senders, s * CENTS_PER_SHARE)
    packets = await setup.send(senders, k, s * CENTS_PER_SHARE, s)
    pidx, usr = hot_pairs(k, n)
    pkt = [packets[i] for i in pidx]
    owners = [owner_of(q, setup.worker_count) for q in pkt]
    work = pair_workloads(pkt, usr, procs, setup.route)
    return Plan(
        "hot",
        work,
        n,
        packets,
        expect_ok=n,
        allowed={"GRAB": {"OK"}},
        sell_out=packets if n == k * s else [],
        info={
            "packets": k,
            "shares_per_packet": s,
            "total_cents_per_packet": s * CENTS_PER_SHARE,
            "distinct_users": n,
            "order": "attempt i on packet i mod K",
            "grabs_per_owner": per_owner(owners, setup.worker_count),
            **setup.routing_info(),
        },
    )


async def _mixed(setup: Setup, sizes: Sizes, procs: int, seed: int) -> Plan:
    n = sizes.attempts_for("mixed")
    pool = max(1, min(1000, n // 100))
    senders = list(range(SENDER_FIRST["mixed"], SENDER_FIRST["mixed"] + MIXED_SENDERS))
    await setup.register(senders[0], MIXED_SENDERS)
    sends_each = int(n * MIXED_WEIGHTS["SEND"] / MIXED_SENDERS * 2) + 10
    pool_each = -(-pool // MIXED_SENDERS)
    await setup.fund(senders, (sends_each * MIXED_SEND_SHARES + pool_each * MIXED_POOL_SHARES) * CENTS_PER_SHARE)
    packets = await setup.send(senders, pool, MIXED_POOL_SHARES * CENTS_PER_SHARE, MIXED_POOL_SHARES)
    workers = list(range(setup.worker_count)) if setup.steer else [None]
    owned = {w: [q for q in packets if w is None or setup.owner(q) == w] for w in workers}
    work = []
    for i, (lo, hi) in enumerate(split_evenly(n, procs)):
        groups = []
        for j, (a, b) in enumerate(split_evenly(hi - lo, len(workers))):
            w = workers[j]
            groups.append(
                {
                    "worker": w if owned[w] else None,
                    "workload": {
                        "kind": "mixed",
                        "n": b - a,
                        "seed": seed * 1000 + i * 16 + j,
                        "weights": MIXED_WEIGHTS,
                        "senders": senders,
                        "send_cents": MIXED_SEND_SHARES * CENTS_PER_SHARE,
                        "send_shares": MIXED_SEND_SHARES,
                        "grab_packets": owned[w] or packets,
                        "user_first": GRABBER_FIRST,
                        "user_count": setup.users,
                    },
                }
            )
        work.append(groups)
    return Plan(
        "mixed",
        work,
        n,
        packets,
        expect_ok=None,
        allowed={"GRAB": {"OK", "SOLD_OUT", "ALREADY_CLAIMED"}, "SEND": {"OK"}, "PACKET": {"OK"}, "BALANCE": {"OK"}},
        info={
            "weights": MIXED_WEIGHTS,
            "pool_packets": pool,
            "pool_shares": MIXED_POOL_SHARES,
            "senders": MIXED_SENDERS,
            "sender_ids": [senders[0], senders[-1]],
            **setup.routing_info(),
        },
    )


_PREPARE = {"storm": _storm, "soldout": _soldout, "spread": _spread, "mixed": _mixed, "hot": _hot}

BASELINE_SCENARIOS = ("hot", "storm", "soldout", "spread")  # what the Redis baseline can run


def baseline_plan(scenario: str, sizes: Sizes, procs: int, seed: int, users: int) -> Plan:
    """The scenario's shape for a baseline with packets of its own (ids from
    1): the same attempts, users, order and share counts as anbao's plan.
    users: the grabbers anbao registered (storm and soldout cycle through them)."""
    if scenario in ("storm", "soldout"):
        return _baseline_one_packet(scenario, sizes, procs, users)
    if scenario == "hot":
        return _baseline_hot(sizes, procs)
    if scenario == "spread":
        return _baseline_spread(sizes, procs, seed, users)
    raise ValueError(f"no baseline shape for {scenario!r}")


def _baseline_one_packet(scenario: str, sizes: Sizes, procs: int, users: int) -> Plan:
    s = sizes.shares
    n = sizes.attempts_for(scenario)
    if scenario == "storm" and users < n:
        raise ValueError(f"storm needs {n:,} distinct users, only {users:,} (--users)")
    grab_range = {"kind": "grab_range", "packet_id": 1, "user_first": GRABBER_FIRST, "user_mod": users}
    work = [[{"worker": None, "workload": {**grab_range, "lo": lo, "hi": hi}}] for lo, hi in split_evenly(n, procs)]
    if scenario == "storm":
        return Plan(
            "storm",
            work,
            n,
            [1],
            expect_ok=min(n, s),
            allowed={"GRAB": {"OK", "SOLD_OUT"}},
            packet_shares={1: s},
            info={"packets": 1, "shares": s, "total_cents": s * CENTS_PER_SHARE, "distinct_users": n},
        )
    return Plan(
        "soldout",
        work,
        n,
        [1],
        expect_ok=0,
        allowed={"GRAB": {"SOLD_OUT"}},
        packet_shares={1: s},
        presold={1: list(range(CLAIMER_FIRST, CLAIMER_FIRST + s))},
        info={"packets": 1, "shares": s, "claimed_in_setup": s, "distinct_users": min(n, users)},
    )


def _baseline_hot(sizes: Sizes, procs: int) -> Plan:
    s, k = sizes.shares, sizes.hot_packets
    n = sizes.attempts_for("hot")
    pidx, usr = hot_pairs(k, n)
    return Plan(
        "hot",
        pair_workloads([i + 1 for i in pidx], usr, procs),
        n,
        list(range(1, k + 1)),
        expect_ok=n,
        allowed={"GRAB": {"OK"}},
        packet_shares={i: s for i in range(1, k + 1)},
        info={
            "packets": k,
            "shares_per_packet": s,
            "total_cents_per_packet": s * CENTS_PER_SHARE,
            "distinct_users": n,
            "order": "attempt i on packet i mod K",
        },
    )


def _baseline_spread(sizes: Sizes, procs: int, seed: int, users: int) -> Plan:
    p, k = sizes.packets, sizes.packet_shares
    n = min(sizes.attempts_for("spread"), p * k)
    pidx, usr = spread_pairs(p, k, n, seed, users)
    return Plan(
        "spread",
        pair_workloads([i + 1 for i in pidx], usr, procs),
        n,
        list(range(1, p + 1)),
        expect_ok=n,
        allowed={"GRAB": {"OK"}},
        packet_shares={i: k for i in range(1, p + 1)},
        info={"packets": p, "shares_per_packet": k},
    )


# ---------------------------------------------------------------- checks


async def snapshot(plan: Plan, dsn: str | None) -> None:
    """What the database holds before the load, for verify() to subtract."""
    if dsn is None or plan.scenario != "mixed":
        return
    lo, hi = plan.info["sender_ids"]
    conn = await asyncpg.connect(dsn)
    try:
        plan.info["packets_before"] = await conn.fetchval(
            "SELECT count(*) FROM packets WHERE sender_id BETWEEN $1 AND $2", lo, hi
        )
    finally:
        await conn.close()


async def verify(plan: Plan, result, dsns: list[str] | None) -> list[str]:
    """What must add up after a scenario: the answers against the plan, and
    the answers against the claims that are durable in the database (with
    sets, in every set's: a packet's claims are in its own set).

    A run stopped by the --duration-s cap is partial (the report says
    CAPPED): its OK count is only bounded, and a grab accepted just before
    the stop may be durable with its answer never read."""
    wrong = []
    capped = result.capped
    if not capped and (result.unanswered or result.answered != plan.attempts):
        wrong.append(f"{plan.attempts - result.answered:,} of {plan.attempts:,} requests never answered")
    grab_ok = result.counts.get("GRAB", {}).get("OK", 0)
    if plan.expect_ok is not None:
        if not capped and grab_ok != plan.expect_ok:
            wrong.append(f"{grab_ok:,} OK grabs, expected exactly {plan.expect_ok:,}")
        if capped and grab_ok > plan.expect_ok:
            wrong.append(f"{grab_ok:,} OK grabs, more than the {plan.expect_ok:,} possible")
    for op, by_status in result.counts.items():
        allowed = plan.allowed.get(op, set())
        for status, n in by_status.items():
            if status not in allowed and not (capped and status == "UNANSWERED"):
                wrong.append(f"{n:,} {op} answers with status {status}")
    unknown = result.unanswered if capped else 0
    if not dsns:
        return wrong
    claims = not_sold_out = 0
    conns = [await asyncpg.connect(dsn) for dsn in dsns]
    try:
        for conn in conns:
            # Every durable claim: rolled up or waiting for its roll-up (claims
            # alone on a server from before the roll-up, --anbao-src).
            rel = "claims_all" if await conn.fetchval("SELECT to_regclass('claims_all')") else "claims"
            claims += await conn.fetchval(
                f"SELECT count(*) FROM {rel} WHERE packet_id = ANY($1::bigint[])", plan.packets
            )
            if plan.sell_out and not capped:
                # Sold out means every share durably claimed; the packet row's
                # status follows with the roll-up, behind the acknowledgements.
                not_sold_out += await conn.fetchval(
                    "SELECT count(*) FROM packets p WHERE packet_id = ANY($1::bigint[])"
                    f" AND share_count <> (SELECT count(*) FROM {rel} c WHERE c.packet_id = p.packet_id)",
                    plan.sell_out,
                )
            if plan.scenario == "mixed":
                lo, hi = plan.info["sender_ids"]
                sent = await conn.fetchval("SELECT count(*) FROM packets WHERE sender_id BETWEEN $1 AND $2", lo, hi)
                send_ok = result.counts.get("SEND", {}).get("OK", 0)
                new = sent - plan.info["packets_before"]
                if not send_ok <= new <= send_ok + unknown:
                    wrong.append(f"{new:,} packets sent in the database, {send_ok:,} OK sends answered")
        await _wait_for_rollup(plan, conns)
    finally:
        for conn in conns:
            await conn.close()
    already = plan.info.get("claimed_in_setup", 0)
    if not grab_ok <= claims - already <= grab_ok + unknown:
        wrong.append(
            f"{claims - already:,} claims durable in the database, {grab_ok:,} OK grabs answered"
            + (f" ({unknown:,} unanswered)" if unknown else "")
        )
    if not_sold_out:
        wrong.append(f"{not_sold_out} {plan.scenario} packet(s) not sold out after every share was grabbed")
    return wrong


async def _wait_for_rollup(plan: Plan, conns: list, cap_s: float = 300.0) -> None:
    """Grabs are acknowledged when their claims commit; the roll-up into
    balances follows. Records how much was left when the load ended (in
    every set) and how long the roll-up took to drain it (bounded by cap_s)."""
    if await conns[0].fetchval("SELECT to_regclass('grab_rollups')") is None:
        return  # a server from before the roll-up (--anbao-src of an older commit)
    sql = "SELECT COALESCE(sum(cardinality(packets)), 0) FROM grab_rollups"

    async def backlog_now() -> int:
        return sum([await c.fetchval(sql) for c in conns])

    plan.info["rollup_backlog_at_end"] = backlog = await backlog_now()
    started = time.monotonic()
    while backlog and time.monotonic() - started < cap_s:
        await asyncio.sleep(0.05)
        backlog = await backlog_now()
    plan.info["rollup_drain_s"] = round(time.monotonic() - started, 2) if not backlog else None


async def register_grabbers(setup: Setup, n: int) -> None:
    await setup.register(GRABBER_FIRST, n)
    setup.users = n
