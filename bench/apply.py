"""The cost of applying cross-set credits at their destination (issues 11
and 20): the work the subscription's apply worker does, measured on one
database of its own, for both shapes of credit in the same run,
alternating rounds:
- `row`, a credits_out row per credit (migration 0007; still how a batch
  committed without a credit batch is sent), applied by the ENABLE ALWAYS
  trigger anbao_apply_credit, in transactions of `--per-txn` credits;
- `batch`, one credit_batches row per grab batch and destination holding
  `--per-batch` credits as arrays (migration 0014), applied set-wise by
  anbao_apply_credit_batch, one row per transaction (a grab commit).
The session runs with session_replication_role = replica, as the apply
worker does (ordinary triggers do not fire; ENABLE ALWAYS ones do), and
every credit writes what the stream's apply writes: per row the transfer,
its event, the credit's copy and the balances; in a batch (migration
0019) the transfers, the balances, and one credits_in row and one event
row for the batch. It prints credits/s and the backend's CPU per credit
for each round, and the medians. One subscription
is one apply worker: this is the ceiling of credits/s from one set to
another on one core, before the apply worker's own decoding of the stream.

    .venv/bin/python -m bench.apply --credits 50000 --users 100000 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import asyncpg

from anbao.localsets import create_db
from anbao.storage import embedded
from anbao.storage import sets as storage_sets
from anbao.storage.migrate import migrate

DB = "anbao_apply"
SHAPES = ("row", "batch")
WARM_CREDITS = 2000


async def _cpu_s(conn) -> float:
    """CPU seconds used so far by this connection's backend (Linux /proc)."""
    pid = await conn.fetchval("SELECT pg_backend_pid()")
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# Credit c: to user 1 + c*7919 mod users, 100 cents, of packet c/1000 (set 0's), share 1 + c mod 1000.
_ROWS = (
    "INSERT INTO credits_out (src_set, credit_id, dest_set, user_id, amount_cents, packet_id, seq, batch_id)"
    " SELECT 0, c, 1, 1 + (c * 7919) % $3::bigint, 100, (1::bigint << 48) | (c / 1000), 1 + c % 1000, c / 500"
    " FROM generate_series($1::bigint, $2::bigint) c"
)
_BATCH = (
    "INSERT INTO credit_batches (src_set, batch_id, dest_set, claimed_at, credit_ids, users, amounts, packets,"
    " seqs, senders) SELECT 0, $1::bigint, 1, now(), array_agg(c ORDER BY c),"
    " array_agg(1 + (c * 7919) % $4::bigint ORDER BY c), array_agg(100::bigint ORDER BY c),"
    " array_agg((1::bigint << 48) | (c / 1000) ORDER BY c), array_agg((1 + c % 1000)::int ORDER BY c),"
    " array_agg(7::bigint ORDER BY c) FROM generate_series($2::bigint, $3::bigint) c"
)


async def _apply(conn, shape: str, first: int, n: int, args) -> None:
    """Credits first..first+n-1, in `shape`'s transactions."""
    last_of_all = first + n - 1
    step = args.per_txn if shape == "row" else args.per_batch
    while first <= last_of_all:
        last = min(first + step - 1, last_of_all)
        if shape == "row":
            await conn.execute(_ROWS, first, last, args.users)
        else:
            await conn.execute(_BATCH, first, first, last, args.users)  # batch id: its first credit's
        first = last + 1


async def _profile(conn, credits: int) -> list[dict]:
    return [
        {"us_per_credit": round(r[0] * 1000 / credits, 1), "calls": r[1], "query": r[2][:110]}
        for r in await conn.fetch(
            "SELECT total_exec_time, calls, regexp_replace(query, '\\s+', ' ', 'g') FROM pg_stat_statements"
            " WHERE toplevel IS false ORDER BY total_exec_time DESC LIMIT 12"
        )
    ]


async def _setup(args, root: Path):
    server, _ = embedded.start(root, logical=True)
    if args.profile:
        # Every statement the triggers run, nested ones too (track = all).
        server.psql("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements';")
        server.psql("ALTER SYSTEM SET pg_stat_statements.track = 'all';")
        embedded.pg_ctl_stop(root)
        server, _ = embedded.start(root, logical=True)
    await create_db(server.get_uri("postgres"), DB)
    dsn = server.get_uri(DB)
    await migrate(dsn)
    await storage_sets.configure(dsn, 1, [0])
    return server, dsn


async def run(args: argparse.Namespace, root: Path) -> dict:
    server, dsn = await _setup(args, root)
    conn = await asyncpg.connect(dsn)
    rounds: list[dict] = []
    profiles: dict[str, list] = {}
    try:
        await conn.execute("SET session_replication_role = replica")
        await conn.execute(
            "INSERT INTO accounts (kind, owner_id) SELECT 1, u FROM generate_series(1, $1::bigint) u", args.users
        )
        next_credit = 1
        for shape in SHAPES:  # warm: the accounts and indexes in cache
            await _apply(conn, shape, next_credit, WARM_CREDITS, args)
            next_credit += WARM_CREDITS
        if args.profile:
            await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        for i in range(args.rounds):
            for shape in SHAPES if i % 2 == 0 else SHAPES[::-1]:
                if args.profile:
                    await conn.execute("SELECT pg_stat_statements_reset()")
                cpu0, t0 = await _cpu_s(conn), time.perf_counter()
                await _apply(conn, shape, next_credit, args.credits, args)
                wall_s, cpu_s = time.perf_counter() - t0, await _cpu_s(conn) - cpu0
                next_credit += args.credits
                rounds.append(
                    {
                        "round": i + 1,
                        "shape": shape,
                        "credits_per_s": round(args.credits / wall_s),
                        "backend_cpu_us_per_credit": round(cpu_s / args.credits * 1e6, 1),
                    }
                )
                if args.profile and i == 0:
                    profiles[shape] = await _profile(conn, args.credits)
        total = next_credit - 1
        # Each credit applied once, in its shape: a copy per row, a batch's in credits_in (0019).
        applied, in_batch, wallets = await conn.fetchrow(
            "SELECT count(*), count(*) FILTER (WHERE NOT EXISTS (SELECT 1 FROM credits_out o"
            "  WHERE o.src_set = h.src_set AND o.credit_id = h.credit_id)),"
            " (SELECT sum(balance_cents) FROM accounts WHERE kind = 1) FROM credits_held h"
            " WHERE applied_transfer_id IS NOT NULL"
        )
        assert applied == total and wallets == 100 * total, (applied, total, wallets)
        assert in_batch == (WARM_CREDITS + args.rounds * args.credits), in_batch
    finally:
        await conn.close()
        embedded.stop(server)
    return _summary(args, rounds, profiles)


def _summary(args, rounds: list[dict], profiles: dict) -> dict:
    med = {
        shape: {
            k: statistics.median(r[k] for r in rounds if r["shape"] == shape)
            for k in ("credits_per_s", "backend_cpu_us_per_credit")
        }
        for shape in SHAPES
    }
    return {
        "credits_per_round": args.credits,
        "users": args.users,
        "row_per_txn": args.per_txn,
        "batch_credits_per_row": args.per_batch,
        "rounds": rounds,
        "median": med,
        "batch_over_row": round(med["batch"]["credits_per_s"] / med["row"]["credits_per_s"], 2),
        "spread": {
            shape: [
                min(r["credits_per_s"] for r in rounds if r["shape"] == shape),
                max(r["credits_per_s"] for r in rounds if r["shape"] == shape),
            ]
            for shape in SHAPES
        },
        **({"statements_inside_the_triggers": profiles} if profiles else {}),
    }


def shape_arguments(p: argparse.ArgumentParser, destination: str) -> None:
    """The options bench.apply and bench.apply_stream share: the two credit
    shapes' sizes and the rounds that alternate them."""
    p.add_argument("--credits", type=int, default=50_000, help="credits per round and shape")
    p.add_argument("--users", type=int, default=100_000, help=f"wallets at {destination}")
    p.add_argument("--per-txn", type=int, default=500, help="row shape: credits per transaction")
    p.add_argument("--per-batch", type=int, default=1000, help="batch shape: credits per credit_batches row")
    p.add_argument("--rounds", type=int, default=5, help="rounds, each shape once a round, alternating order")


def run_in_scratch(run_fn, args: argparse.Namespace, prefix: str) -> None:
    """Runs `run_fn(args, root)` in a scratch directory it then removes, and
    prints its result as JSON."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        print(json.dumps(asyncio.run(run_fn(args, root)), indent=1, ensure_ascii=False))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.apply", description=__doc__.split("\n\n")[0])
    shape_arguments(p, "the destination")
    p.add_argument("--profile", action="store_true", help="pg_stat_statements of the triggers' statements")
    run_in_scratch(run, p.parse_args(), "anbao-apply-")


if __name__ == "__main__":
    main()
