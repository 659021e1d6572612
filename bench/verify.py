"""After a run: what the answers must add up to, checked against what is
durable in the database (bench/scenarios.py makes the plans)."""

from __future__ import annotations

import asyncio
import time

import asyncpg

from .scenarios import Plan


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
        await wait_for_rollup(plan, conns)
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


async def wait_for_rollup(plan: Plan, conns: list, cap_s: float = 300.0) -> None:
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
