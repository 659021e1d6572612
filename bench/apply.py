"""The cost of applying a cross-set credit at its destination (issue 11):
the work the subscription's apply worker does per credit, in the ENABLE
ALWAYS trigger anbao_apply_credit (migration 0007 and later), measured on
one database of its own. It inserts credits from "set 0" into "set 1"'s
credits_out as a local session, which fires the same trigger the apply
worker fires, in transactions of `--per-txn` credits (the apply worker
applies each transaction of the sender as one), and prints credits/s and
the backend's CPU per credit. One subscription is one apply worker: this is
the ceiling of credits/s from one set to another on one core, before the
apply worker's own decoding of the stream.

    .venv/bin/python -m bench.apply --credits 50000 --users 10000 --per-txn 500
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import time
from pathlib import Path

import asyncpg

from anbao.localsets import create_db
from anbao.storage import embedded
from anbao.storage import sets as storage_sets
from anbao.storage.migrate import migrate

DB = "anbao_apply"


async def _cpu_s(conn) -> float:
    """CPU seconds used so far by this connection's backend (Linux /proc)."""
    pid = await conn.fetchval("SELECT pg_backend_pid()")
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    import os

    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run(args: argparse.Namespace, root: Path) -> dict:
    server, _ = embedded.start(root, logical=True)
    if args.profile:
        # Every statement the trigger runs, nested ones too (track = all).
        server.psql("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements';")
        server.psql("ALTER SYSTEM SET pg_stat_statements.track = 'all';")
        embedded.pg_ctl_stop(root)
        server, _ = embedded.start(root, logical=True)
    await create_db(server.get_uri("postgres"), DB)
    dsn = server.get_uri(DB)
    await migrate(dsn)
    await storage_sets.configure(dsn, 1, [0])
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "INSERT INTO accounts (kind, owner_id) SELECT 1, u FROM generate_series(1, $1::bigint) u", args.users
        )
        insert = (
            "INSERT INTO credits_out (src_set, credit_id, dest_set, user_id, amount_cents, packet_id, seq, batch_id)"
            " SELECT 0, c, 1, 1 + (c * 7919) % $3::bigint, 100, (1::bigint << 48) | (c / 1000), 1 + c % 1000, c / 500"
            " FROM generate_series($1::bigint, $2::bigint) c"
        )
        await conn.execute(insert, 1, 2000, args.users)  # warm: the accounts and indexes in cache
        if args.profile:
            await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            await conn.execute("SELECT pg_stat_statements_reset()")
        cpu0, t0 = await _cpu_s(conn), time.perf_counter()
        first = 2001
        while first <= 2000 + args.credits:
            last = min(first + args.per_txn - 1, 2000 + args.credits)
            await conn.execute(insert, first, last, args.users)
            first = last + 1
        wall_s, cpu_s = time.perf_counter() - t0, await _cpu_s(conn) - cpu0
        top = []
        if args.profile:
            top = [
                {"us_per_credit": round(r[0] * 1000 / args.credits, 1), "calls": r[1], "query": r[2][:110]}
                for r in await conn.fetch(
                    "SELECT total_exec_time, calls, regexp_replace(query, '\\s+', ' ', 'g') FROM pg_stat_statements"
                    " WHERE toplevel IS false ORDER BY total_exec_time DESC LIMIT 12"
                )
            ]
        applied = await conn.fetchval("SELECT count(*) FROM credits_out WHERE applied_transfer_id IS NOT NULL")
        assert applied == args.credits + 2000, applied
    finally:
        await conn.close()
        embedded.stop(server)
    return {
        "credits": args.credits,
        "per_txn": args.per_txn,
        "credits_per_s": round(args.credits / wall_s),
        "backend_cpu_us_per_credit": round(cpu_s / args.credits * 1e6, 1),
        **({"statements_inside_the_trigger": top} if top else {}),
    }


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.apply", description=__doc__.split("\n\n")[0])
    p.add_argument("--credits", type=int, default=50_000)
    p.add_argument("--users", type=int, default=10_000)
    p.add_argument("--per-txn", type=int, default=500)
    p.add_argument("--profile", action="store_true", help="pg_stat_statements of the trigger's statements")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="anbao-apply-"))
    try:
        print(json.dumps(asyncio.run(run(args, root)), indent=1, ensure_ascii=False))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
