"""The scenarios: what each load-generator process grabs, and what the
answers must add up to (their set-up through the SDK is bench/setup.py, the
checks after the run bench/verify.py).

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

import random
import time
from array import array
from dataclasses import dataclass, field

from anbao_client.routing import owner_of, set_of

from .setup import CENTS_PER_SHARE, CLAIMER_FIRST, GRABBER_FIRST, SENDER_FIRST, Setup, split_evenly

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
