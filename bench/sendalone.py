"""python -m bench.sendalone: SEND alone, to groups of 20-200 members.

Issue 17's target: at least 10,000 durable SENDs/s (goal 30,000) with
membership at send time still what counts. Starts `anbao serve` on a fresh
data directory (or, with --src DIR, the server of another source tree, for
a before/after in one run), registers and funds --users users, puts them in
groups of 20-200 members (each user in several), then drives SENDs from
--connections x --depth in flight (closed loop) or at --rate (open loop):
each from a random member of a random group, a random packet of 5-20
shares of 1.00 on average, to the whole group. Every SEND has its own key.
Afterwards `anbao audit` must pass, and every OK SEND must be a packet in
the database. Prints and writes a JSON summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

import asyncpg
from rich.console import Console

from anbao_client import Cluster, wire

from .runner import run_load
from .server import AnbaoServer

USER_FIRST = 1_000_000
GROUP_FIRST = 50_000
MIN_GROUP_MEMBERS = 20
MAX_GROUP_MEMBERS = 200
MIN_SHARES = 5
MAX_SHARES = 20
CENTS_PER_SHARE = 100
SETUP_CONCURRENCY = 64


class GroupSends:
    """Workload (loadgen): n SENDs, each from a random member of a random
    group to that group."""

    def __init__(self, n: int, seed: int, groups: list[list[int]]):
        self.left = n
        self.total = n
        self.rng = random.Random(seed)
        self.groups = groups  # [group_id, member, member, ...]

    def take(self, rid: int):
        if self.left <= 0:
            return None
        self.left -= 1
        rng = self.rng
        g = rng.choice(self.groups)
        # Every share must be claimable: at most the members besides the sender.
        shares = rng.randint(MIN_SHARES, min(MAX_SHARES, len(g) - 2))
        frame = wire.send(
            rid,
            rng.randbytes(wire.IDEMPOTENCY_KEY_BYTES),
            g[1 + rng.randrange(len(g) - 1)],
            shares * CENTS_PER_SHARE,
            shares,
            wire.Mode.RANDOM,
            0,
            wire.Audience.GROUP,
            [g[0]],
            "",
        )
        return frame, wire.Op.SEND


def make_groups(users: int, seed: int) -> list[list[int]]:
    """Groups of 20-200 members (uniform), until each user is in about
    five: [group_id, members...]."""
    rng = random.Random(seed)
    ids = list(range(USER_FIRST, USER_FIRST + users))
    groups: list[list[int]] = []
    placed = 0
    while placed < 5 * users:
        size = min(users, rng.randint(MIN_GROUP_MEMBERS, MAX_GROUP_MEMBERS))
        groups.append([GROUP_FIRST + len(groups), *rng.sample(ids, size)])
        placed += size
    return groups


async def _each(items: list, fn) -> None:
    it = iter(items)

    async def worker() -> None:
        for item in it:
            await fn(item)

    await asyncio.gather(*(worker() for _ in range(SETUP_CONCURRENCY)))


async def prepare(server: AnbaoServer, users: int, groups: list[list[int]], fund_cents: int) -> float:
    """Registers, funds and groups the users; returns the seconds it took."""
    t0 = time.monotonic()
    cl = await Cluster.connect(server.host, server.port, server.tokens["admin"], timeout_ms=120_000)
    try:
        ids = list(range(USER_FIRST, USER_FIRST + users))
        chunks = [ids[i : i + 1000] for i in range(0, users, 1000)]
        await _each(chunks, lambda chunk: asyncio.gather(*(c.register(chunk) for c in cl.clients)))
        await _each(ids, lambda u: cl.clients[u % len(cl.clients)].deposit(u, fund_cents))
        await _each(groups, lambda g: cl.clients[0].group_create(g[0], g[1:]))
    finally:
        await cl.close()
    return time.monotonic() - t0


async def packets_in_db(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval("SELECT count(*) FROM packets")
    finally:
        await conn.close()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.sendalone", description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=10_000)
    p.add_argument("--sends", type=int, default=100_000, help="SENDs in total")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--rate", type=float, default=None, help="open loop: SENDs per second; omit for closed loop")
    p.add_argument("--duration-s", type=float, default=60.0)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--seed", type=int, default=17)
    p.add_argument("--src", type=Path, default=None, help="run the server of this source tree (a before/after)")
    p.add_argument("--out", type=Path, default=None, help="write the summary here (JSON)")
    return p.parse_args(argv)


def summary(result, setup_s: float, in_db: int, audit: dict) -> dict:
    hist = result.hist_op.get("SEND", result.hist)
    span = result.ok_span_s or result.wall_s or 1.0
    return {
        "mode": result.mode,
        "sends_ok": result.ok,
        "statuses": result.counts,
        "durable_sends_per_s": round(result.ok / span),
        "p50_ms": hist.get_value_at_percentile(50) / 1000,
        "p99_ms": hist.get_value_at_percentile(99) / 1000,
        "p999_ms": hist.get_value_at_percentile(99.9) / 1000,
        "setup_s": round(setup_s, 1),
        "packets_in_db": in_db,
        "audit_ok": bool(audit.get("ok")),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(stderr=True)
    groups = make_groups(args.users, args.seed)
    fund_cents = (args.sends // args.users + 10) * MAX_SHARES * CENTS_PER_SHARE * 2
    server = AnbaoServer.start(workers=args.workers, src=args.src)
    try:
        setup_s = asyncio.run(prepare(server, args.users, groups, fund_cents))
        per_proc = [args.sends // args.procs + (i < args.sends % args.procs) for i in range(args.procs)]
        workloads = [
            [
                {
                    "worker": None,
                    "workload": {"kind": "group_sends", "n": n, "seed": args.seed * 100 + i, "groups": groups},
                }
            ]
            for i, n in enumerate(per_proc)
        ]
        result = run_load(
            console,
            target="anbao",
            scenario="sends",
            host=server.host,
            port=server.port,
            token=server.tokens["app"],
            workloads=workloads,
            connections=args.connections,
            depth=args.depth,
            rate=args.rate,
            duration_s=args.duration_s,
        )
        in_db = asyncio.run(packets_in_db(server.dsn()))
        audit = server.audit()
    finally:
        server.stop()
        server.remove_data()
    out = summary(result, setup_s, in_db, audit)
    out.update(users=args.users, groups=len(groups), connections=args.connections, depth=args.depth)
    print(json.dumps(out, indent=2))
    if args.out is not None:
        args.out.write_text(json.dumps(out, indent=2) + "\n")
    return 0 if out["audit_ok"] and in_db == result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
