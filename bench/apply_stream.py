"""What one subscription applies, through real logical replication
(issue 20): two embedded PostgreSQL servers, set 0 publishing and set 1
subscribed (storage/sets.py, as `anbao migrate/serve --topology` makes
them), `--users` wallets at set 1. Two pairs of databases on those two
servers, one per shape of credit (bench/apply.py):
- `row_main`: both at schema 0013, the per-row apply as it was before
  this issue (credits_out rows, the ENABLE ALWAYS trigger, the event
  trigger), in transactions of `--per-txn` credits;
- `batch`: both at the current schema, credit_batches rows of
  `--per-batch` credits, applied set-wise.
Each round writes a backlog of `--credits` credits at set 0 while set 1's
subscription is disabled, then enables it and times the drain: from the
apply worker's start until set 1's replication origin has passed the
backlog's end. The rounds alternate the shapes, so both see the same
machine. Reports credits/s, the apply worker's CPU per credit (Linux
/proc) and the WAL set 1 wrote per credit, per round and as medians.

    .venv/bin/python -m bench.apply_stream --credits 50000 --users 100000 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from pathlib import Path

import asyncpg

from anbao.localsets import create_db
from anbao.storage import embedded
from anbao.storage import sets as storage_sets
from anbao.storage.migrate import migrate, migrations

from .apply import WARM_CREDITS, _apply, run_in_scratch, shape_arguments

DB = "anbao_apply_stream"
DRAIN_TIMEOUT_S = 120.0  # a round of 50,000 credits drains in seconds; past this it says what it saw
POLL_S = 0.01
COUNT_EVERY_S = 0.5  # the applied credits counted, besides the LSN


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


MAIN_VERSION = 13  # the schema before credit batches (migration 0014)
STREAM_SHAPES = {"row_main": "row", "batch": "batch"}  # shape here -> what bench.apply writes


def _migrate_to(version: int):
    async def go(dsn: str) -> None:
        conn = await asyncpg.connect(dsn)
        try:
            for _, path in migrations()[:version]:
                await conn.execute(path.read_text())
        finally:
            await conn.close()

    return go


async def _pair(servers, users: int, shape: str) -> dict[int, str]:
    """Set 0 and set 1 databases for `shape`, set 1 subscribed to set 0."""
    dsns = {}
    for s in (0, 1):
        await create_db(servers[s].get_uri("postgres"), f"{DB}_{shape}")
        dsns[s] = servers[s].get_uri(f"{DB}_{shape}")
        await (migrate if shape == "batch" else _migrate_to(MAIN_VERSION))(dsns[s])
    for s in (0, 1):
        if shape == "batch":
            await storage_sets.configure(dsns[s], s, [1 - s])
            continue
        conn = await asyncpg.connect(dsns[s])
        try:  # as storage/sets.py configure() did at schema 0013
            await conn.execute(f"SELECT anbao_configure_set({s}::smallint, ARRAY[{1 - s}]::smallint[])")
            await conn.execute(
                f"CREATE PUBLICATION {storage_sets.publication(1 - s)} FOR TABLE public.credits_out"
                f" WHERE (dest_set = {1 - s}), public.user_directory WHERE (home_set = {s}) WITH (publish = 'insert')"
            )
        finally:
            await conn.close()
    conn = await asyncpg.connect(dsns[1])
    try:
        await conn.execute(
            "INSERT INTO accounts (kind, owner_id) SELECT 1, u FROM generate_series(1, $1::bigint) u", users
        )
        version = int(await conn.fetchval("SHOW server_version_num"))
        # one slot per pair: both pairs' set 0 are on one server
        await conn.execute(
            storage_sets.create_subscription_sql(0, 1, dsns[0], version, slot_name=f"'anbao_0_to_1_{shape}'")
        )
    finally:
        await conn.close()
    return dsns


async def _setup(root: Path, users: int) -> tuple[list, dict[str, dict[int, str]]]:
    servers = [embedded.start(root / f"set{s}", logical=True)[0] for s in (0, 1)]
    return servers, {shape: await _pair(servers, users, shape) for shape in STREAM_SHAPES}


async def _worker_pid(dest) -> int | None:
    return await dest.fetchval(
        "SELECT st.pid FROM pg_stat_subscription st JOIN pg_subscription s ON s.oid = st.subid"
        f" WHERE s.subname = $1 AND st.relid IS NULL AND s.{storage_sets.SUBSCRIPTION_OF_THIS_DATABASE}",
        storage_sets.subscription(0),
    )


async def _applied_to(dest):
    return await dest.fetchval(
        "SELECT o.remote_lsn FROM pg_replication_origin_status o JOIN pg_subscription s"
        " ON o.external_id = 'pg_' || s.oid WHERE s.subname = $1"
        f" AND s.{storage_sets.SUBSCRIPTION_OF_THIS_DATABASE}",
        storage_sets.subscription(0),
    )


# The credits applied at set 1: schema 0013 kept a copy of each in
# credits_out; since 0019 a batch keeps one credits_in row.
_APPLIED = {
    "row_main": "SELECT count(*) FROM credits_out WHERE src_set = 0 AND applied_transfer_id IS NOT NULL",
    "batch": "SELECT COALESCE(sum(cardinality(transfer_ids)), 0) FROM credits_in WHERE src_set = 0",
}


async def _applied_credits(dest, shape: str) -> int:
    return await dest.fetchval(_APPLIED[shape])


async def _round(src, dest, shape: str, first: int, args) -> dict:
    """One backlog of `shape` written at set 0 while set 1's subscription is
    off, then drained; returns its figures."""
    name = storage_sets.subscription(0)
    expected = first - 1 + args.credits  # credit ids run from 1, round after round
    await dest.execute(f"ALTER SUBSCRIPTION {name} DISABLE")
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while await _worker_pid(dest) is not None:
        assert time.monotonic() < deadline, "the apply worker never stopped"
        await asyncio.sleep(POLL_S)
    await _apply(src, STREAM_SHAPES[shape], first, args.credits, args)
    end = await src.fetchval("SELECT pg_current_wal_lsn()")
    wal0 = await dest.fetchval("SELECT pg_current_wal_lsn()")
    await dest.execute(f"ALTER SUBSCRIPTION {name} ENABLE")
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while (pid := await _worker_pid(dest)) is None:
        assert time.monotonic() < deadline, "the apply worker never started"
        await asyncio.sleep(POLL_S)
    t0 = time.perf_counter()
    cpu = 0.0
    next_count = time.monotonic() + COUNT_EVERY_S
    while True:
        cpu = _cpu_s(pid)  # read while it lives; it is the worker's whole life
        got = await _applied_to(dest)
        if got is not None and got >= end:
            break
        # The LSN alone may wait forever: WAL written at set 0 after the
        # backlog's last commit (the other pair's, a checkpoint's) can put
        # `end` past every commit this subscription will ever apply.
        if time.monotonic() >= next_count:
            if await _applied_credits(dest, shape) >= expected:
                break
            next_count = time.monotonic() + COUNT_EVERY_S
        assert time.monotonic() < deadline, f"set 1 applied to {got}, not {end}, in {DRAIN_TIMEOUT_S:g} s"
        await asyncio.sleep(POLL_S)
    wall_s = time.perf_counter() - t0
    wal = await dest.fetchval("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1)::bigint", wal0)
    return {
        "shape": shape,
        "credits_per_s": round(args.credits / wall_s),
        "apply_worker_cpu_us_per_credit": round(cpu / args.credits * 1e6, 1),
        "receiver_wal_bytes_per_credit": round(wal / args.credits),
    }


async def run(args: argparse.Namespace, root: Path) -> dict:
    _, pairs = await _setup(root, args.users)
    conns = {shape: (await asyncpg.connect(d[0]), await asyncpg.connect(d[1])) for shape, d in pairs.items()}
    shapes = list(STREAM_SHAPES)
    rounds: list[dict] = []
    try:
        first = {shape: 1 for shape in shapes}
        for shape in shapes:  # warm: the wallets and indexes in cache, the worker's relation maps built
            warm = argparse.Namespace(**{**vars(args), "credits": WARM_CREDITS})
            await _round(*conns[shape], shape, first[shape], warm)
            first[shape] += WARM_CREDITS
        for i in range(args.rounds):
            for shape in shapes if i % 2 == 0 else shapes[::-1]:
                rounds.append({"round": i + 1, **await _round(*conns[shape], shape, first[shape], args)})
                first[shape] += args.credits
        for shape, (_, dest) in conns.items():
            applied = await _applied_credits(dest, shape)
            wallets = await dest.fetchval("SELECT sum(balance_cents) FROM accounts WHERE kind = 1")
            assert applied == first[shape] - 1 and wallets == 100 * applied, (shape, applied, wallets)
    finally:
        for pair in conns.values():
            for conn in pair:
                await conn.close()
        for s in (0, 1):
            embedded.stop_data_dir(root / f"set{s}")
    keys = ("credits_per_s", "apply_worker_cpu_us_per_credit", "receiver_wal_bytes_per_credit")
    med = {s: {k: statistics.median(r[k] for r in rounds if r["shape"] == s) for k in keys} for s in shapes}
    return {
        "credits_per_round": args.credits,
        "users": args.users,
        "row_per_txn": args.per_txn,
        "batch_credits_per_row": args.per_batch,
        "rounds": rounds,
        "median": med,
        "batch_over_row_main": round(med["batch"]["credits_per_s"] / med["row_main"]["credits_per_s"], 2),
        "spread_credits_per_s": {
            s: [f(r["credits_per_s"] for r in rounds if r["shape"] == s) for f in (min, max)] for s in shapes
        },
    }


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.apply_stream", description=__doc__.split("\n\n")[0])
    shape_arguments(p, "set 1")
    run_in_scratch(run, p.parse_args(), "anbao-apply-stream-")


if __name__ == "__main__":
    main()
