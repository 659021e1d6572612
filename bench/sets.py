"""Sets (issue 11): durable grabs/s with 1 set and with 2 sets on this
machine, and the cross-set credit lag under a storm. A focused script, not
the `python -m bench` harness: one load process driving the SDK's
SetCluster over many connections (pure-Python codec: the load generator
shares the machine's cores with the servers and is part of the ceiling).

    .venv/bin/python -m bench.sets --sets 1 --workers 2 --runs 3
    .venv/bin/python -m bench.sets --sets 2 --workers 1 --runs 3

Each run is a storm on `--packets` packets in every set at once (a sender
homed in each set), each packet of `--shares` shares grabbed by as many
members, homed in all the sets: every grab is a durable OK, and a winner
homed in another set than the packet's gets a cross-set credit. Runs use
anbao/localsets.py (embedded PostgreSQL with wal_level = logical and
`anbao serve --topology` per set, in a temporary directory, stopped at the
end; one set is a topology of one). Per run it prints durable grabs/s (OK
answers over the storm's wall time) and, for the credits, the lag from the
grab's OK at the client to `applied_at` at the home set (same clock), p50
and p99, with the part spent before the roll-up sent it (`created_at`).
After the runs: the cross-set audit must be OK."""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import time

import asyncpg

from anbao.localsets import LocalSets, new_root
from anbao.storage.sets import audit_sets, audit_when_drained
from anbao_client import SetCluster, home_set, set_of

DRAIN_TIMEOUT_S = 120


def pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


async def _directory_ready(dsns, topo, users, timeout_s=60) -> None:
    deadline = time.monotonic() + timeout_s
    for s, dsn in dsns.items():
        others = [u for u in users if home_set(u, topo) != s]
        conn = await asyncpg.connect(dsn)
        try:
            while await conn.fetchval(
                "SELECT count(DISTINCT user_id) FROM user_directory WHERE user_id = ANY($1)", others
            ) != len(others):
                assert time.monotonic() < deadline, "directory not replicated"
                await asyncio.sleep(0.2)
        finally:
            await conn.close()


async def one_run(topo, dsns, token, members, senders, args, run: int) -> dict:
    admin = await SetCluster.connect(topo, token)
    try:
        packets = []
        for s, sender in senders.items():
            for _ in range(args.packets):
                sent = await admin.send(sender, args.shares * 10, args.shares)
                assert set_of(sent.packet_id) == s
                packets.append(sent.packet_id)
    finally:
        await admin.close()
    conns = [await SetCluster.connect(topo, token, max_inflight=args.depth * 2) for _ in range(args.connections)]
    work = [(p, u) for p in packets for u in members[: args.shares]]
    import random

    random.Random(run).shuffle(work)
    ok_at: dict[tuple[int, int], float] = {}
    errors: dict[str, int] = {}
    it = iter(work)

    async def worker(sc) -> None:
        for p, u in it:
            try:
                await sc.grab(p, u)
                ok_at[(p, u)] = time.time()
            except Exception as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1

    started = time.perf_counter()
    await asyncio.gather(*(worker(sc) for sc in conns for _ in range(args.depth)))
    elapsed = time.perf_counter() - started
    for sc in conns:
        await sc.close()
    _, drained = await audit_when_drained(dsns, DRAIN_TIMEOUT_S)
    assert drained, "batches or credits did not drain"
    lags, before_send = [], []
    for s, dsn in dsns.items():
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch(
                "SELECT packet_id, user_id, extract(epoch FROM applied_at)::float8 AS applied,"
                " extract(epoch FROM created_at)::float8 AS created FROM credits_out"
                " WHERE dest_set = $1 AND packet_id = ANY($2)",
                s,
                packets,
            )
        finally:
            await conn.close()
        for r in rows:
            t = ok_at[(r["packet_id"], r["user_id"])]
            lags.append((r["applied"] - t) * 1000)
            before_send.append((r["created"] - t) * 1000)
    return {
        "run": run,
        "grabs_ok": len(ok_at),
        "errors": errors,
        "elapsed_s": round(elapsed, 3),
        "durable_grabs_per_s": round(len(ok_at) / elapsed),
        "cross_set_credits": len(lags),
        "credit_lag_ms_p50": pct(lags, 50),
        "credit_lag_ms_p99": pct(lags, 99),
        "credit_lag_ms_max": max(lags) if lags else None,
        "until_rollup_sent_ms_p50": pct(before_send, 50),
        "until_rollup_sent_ms_p99": pct(before_send, 99),
    }


async def bench(local: LocalSets, args) -> dict:
    topo, dsns, token = local.topology(), local.dsns, local.token("admin")
    base = 10_000_000
    members = list(range(base, base + args.shares))
    sc = await SetCluster.connect(topo, token)
    try:
        for i in range(0, len(members), 1000):
            await sc.register(members[i : i + 1000])
        senders = {}
        for s in sorted(topo.sets):
            senders[s] = next(u for u in range(1, 1000) if home_set(u, topo) == s)
            await sc.register([senders[s]])
            await sc.deposit(senders[s], args.shares * 10 * args.packets * (args.runs + 1))
    finally:
        await sc.close()
    await _directory_ready(dsns, topo, members)
    runs = []
    for run in range(args.runs):
        r = await one_run(topo, dsns, token, members, senders, args, run)
        print(json.dumps(r), flush=True)
        runs.append(r)
    audit = await audit_sets(dsns) if len(dsns) > 1 else None
    return {
        "sets": args.sets,
        "workers_per_set": args.workers,
        "packets_per_set": args.packets,
        "shares": args.shares,
        "connections": args.connections,
        "depth": args.depth,
        "runs": runs,
        "durable_grabs_per_s_median": statistics.median(r["durable_grabs_per_s"] for r in runs),
        "audit_ok": None if audit is None else audit.ok,
    }


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.sets", description=__doc__.split("\n\n")[0])
    ap.add_argument("--sets", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1, help="workers per set")
    ap.add_argument("--packets", type=int, default=2, help="packets per set per run")
    ap.add_argument("--shares", type=int, default=5000, help="shares per packet (and members)")
    ap.add_argument("--connections", type=int, default=8, help="SetCluster connections (each to every set)")
    ap.add_argument("--depth", type=int, default=32, help="grabs in flight per connection")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", help="write the result JSON here")
    args = ap.parse_args()
    local = LocalSets(new_root("anbao-bench-sets-"), args.sets, args.workers, say=lambda t: print(t, file=sys.stderr))
    try:
        local.start()
        result = asyncio.run(bench(local, args))
    finally:
        local.stop()
        shutil.rmtree(local.root, ignore_errors=True)
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if result["audit_ok"] in (None, True) and all(not r["errors"] for r in result["runs"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
