"""The cross-set credit lag after a load on several sets (--sets N)."""

from __future__ import annotations

import asyncio
import time

from . import report

CREDIT_DRAIN_TIMEOUT_S = 300.0


async def credit_lag(dsns: dict[int, str], packets: list[int]) -> tuple[dict, list[str]]:
    """After a load on several sets: waits (bounded) until every cross-set
    credit of `packets` is applied at its home set, then the lag of each,
    from its claim's commit (the grab's batch commit, which its OK follows)
    to the apply, split where its set sent it (the same commit for a credit
    batch, migration 0014; the roll-up for a credit sent alone)."""
    from anbao.storage.sets import credit_times

    deadline = time.monotonic() + CREDIT_DRAIN_TIMEOUT_S
    while True:
        credits = await credit_times(dsns, packets)
        pending = [c for c in credits if c.applied is None]
        if not pending or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    done = [c for c in credits if c.applied is not None and c.committed is not None]
    lag = {
        "measured_from": "the claim's commit (its grab batch's commit, the grab's OK follows it by the commit"
        " itself and the answer's way back) to applied_at at the winner's home set; every set's PostgreSQL"
        " on this machine's clock",
        "credits": len(credits),
        "credits_cents": sum(c.amount_cents for c in credits),
        "total": report.percentiles([(c.applied - c.committed) * 1000 for c in done]),
        "before_sent": report.percentiles([(c.created - c.committed) * 1000 for c in done]),
        "replication_and_apply": report.percentiles([(c.applied - c.created) * 1000 for c in done]),
    }
    problems = []
    if pending:
        problems.append(f"{len(pending):,} cross-set credits not applied {CREDIT_DRAIN_TIMEOUT_S:g} s after the load")
    if len(done) != len(credits) - len(pending):
        problems.append(f"{len(credits) - len(pending) - len(done):,} credits without their claim at the packet's set")
    return lag, problems
