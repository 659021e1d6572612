"""A set down for minutes (issue 11): set 1's PostgreSQL is stopped for
`--down-s` while set 0 goes on taking grabs of its packets by set 1's users.
Their credits queue in set 0's WAL, held by the slot of set 1's subscription.
Then set 1 starts again and the backlog drains. Prints (JSON) the grabs taken
during the outage, the slot's backlog at its peak, the credits queued, how
long after set 1's start every one was applied, and the cross-set audit.

    .venv/bin/python -m bench.outage --down-s 150

Two sets of anbao/localsets.py in a temporary directory, stopped at the end
(by pid); every loop is bounded by --down-s and DRAIN_TIMEOUT_S."""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import time

import asyncpg

from anbao.localsets import LocalSets, new_root
from anbao.storage import embedded
from anbao.storage.sets import audit_when_drained, credits_between, replication_on, wait_for_directory
from anbao_client import SetCluster, home_set

DRAIN_TIMEOUT_S = 600
SLOT = "anbao_0_to_1"


async def _backlog_bytes(conn) -> int:
    slots = (await replication_on(conn, timeout=5))["slots"]
    return next((x["backlog_bytes"] or 0 for x in slots if x["slot_name"] == SLOT), 0)


async def run(ls: LocalSets, args: argparse.Namespace) -> dict:
    topo, dsns = ls.topology(), ls.dsns
    async with await SetCluster.connect(topo, ls.token("admin"), timeout_ms=10_000) as sc:
        ids = list(range(1, 41)) + list(range(1000, 1000 + 4 * args.per_packet))
        await sc.register(ids)
        senders = [u for u in ids[:40] if home_set(u, topo) == 0]
        await asyncio.gather(*(sc.deposit(u, 10**11) for u in senders))
        ones = [u for u in ids[40:] if home_set(u, topo) == 1][: args.per_packet]
        assert len(ones) == args.per_packet, "too few members homed in set 1"
        short = await wait_for_directory({0: dsns[0]}, {0: ones}, 60)
        assert short is None, f"set 0 does not know set 1's members: {short}"

        conn0 = await asyncpg.connect(dsns[0])
        try:
            sent_before = await credits_between(conn0, 0, 1)
            embedded.pg_ctl_stop(ls.pg_dirs[1])
            down_at = time.monotonic()
            grabs = packets = peak = 0
            while time.monotonic() - down_at < args.down_s:
                sent = await sc.send(senders[packets % len(senders)], 100 * args.per_packet, args.per_packet)
                won = await asyncio.gather(*(sc.grab(sent.packet_id, u) for u in ones), return_exceptions=True)
                errors = [w for w in won if isinstance(w, BaseException)]
                assert not errors, f"grabs failed while set 1 was down: {errors[:3]}"
                grabs += len(won)
                packets += 1
                peak = max(peak, await _backlog_bytes(conn0))
                await asyncio.sleep(args.pause_s)
            down_s = time.monotonic() - down_at
            # The roll-up writes the last credits after the grabs: wait for it.
            queued = sent_before
            for _ in range(600):
                queued = await credits_between(conn0, 0, 1)
                if queued - sent_before == grabs:
                    break
                await asyncio.sleep(0.1)
            peak = max(peak, await _backlog_bytes(conn0))

            up_at = time.monotonic()  # from the start command: PostgreSQL's own start counts
            embedded.start(ls.pg_dirs[1], True)
            conn1 = await asyncpg.connect(dsns[1])
            try:
                while await credits_between(conn1, 0, 1) < queued:
                    assert time.monotonic() - up_at < DRAIN_TIMEOUT_S, "the backlog did not drain"
                    await asyncio.sleep(0.1)
                drain_s = time.monotonic() - up_at
            finally:
                await conn1.close()
            backlog_after = await _backlog_bytes(conn0)
        finally:
            await conn0.close()
    audit, drained = await audit_when_drained(dsns, DRAIN_TIMEOUT_S)
    return {
        "down_s": round(down_s, 1),
        "packets_sent_while_down": packets,
        "grabs_while_down": grabs,
        "credits_queued": queued - sent_before,
        "slot_backlog_peak_bytes": peak,
        "drain_s_from_start_command": round(drain_s, 2),
        "slot_backlog_after_bytes": backlog_after,
        "audit_ok": bool(drained and audit is not None and audit.ok),
        "audit": audit.totals if audit is not None else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.outage", description=__doc__.split("\n\n")[0])
    p.add_argument("--down-s", type=float, default=150.0, help="how long set 1's PostgreSQL stays stopped")
    p.add_argument("--per-packet", type=int, default=50, help="shares per packet, each grabbed by a user of set 1")
    p.add_argument("--pause-s", type=float, default=0.2, help="pause between packets")
    args = p.parse_args()
    root = new_root("anbao-outage-")
    ls = LocalSets(root, count=2, workers=1)
    try:
        ls.start()
        doc = asyncio.run(run(ls, args))
    finally:
        ls.stop()
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(doc, indent=1))
    raise SystemExit(0 if doc["audit_ok"] else 1)


if __name__ == "__main__":
    main()
