"""`anbao demo`: a red packet in a group of a few thousand simulated
members, all grabbing at once over a few connections, with a progress bar;
then who got what (the luckiest first), the totals, and the audit.

It talks to a running server through the SDK like any client (it needs the
admin scope: it deposits the sender's money and runs the audit). Every run
uses fresh ids (a random block of 100,000), so runs do not collide.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from collections import Counter

from anbao_client import AnbaoError, Claim, Client, Forbidden, Grabbed, Mode, SoldOut
from anbao_client.protocol import MAX_REGISTER_IDS

from .cliutil import token_from_args, yuan
from .config import Limits

MAX_DEMO_MEMBERS = Limits().max_group_members  # a default server's group bound
ID_BLOCK = 100_000  # a run's ids: base .. base + 99,999
GROUP_CREATE_CHUNK = Limits().max_members  # one frame's worth of member ids


async def run_demo(c: Client, args, out) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    n, shares = args.members, args.shares
    if not 2 <= n <= MAX_DEMO_MEMBERS or not 1 <= shares <= n or args.connections < 1:
        raise SystemExit(f"anbao demo: --members 2..{MAX_DEMO_MEMBERS}, --shares 1..members, --connections >= 1")
    base = (1 + secrets.randbelow(9_999_999)) * ID_BLOCK
    sender, group_id = base, base
    members = list(range(base + 1, base + 1 + n))

    progress = Progress(
        TextColumn("{task.description:<22}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[note]}"),
        TimeElapsedColumn(),
        console=out.console,
        disable=out.json,
    )
    grabbers = [
        await Client.connect(args.host, args.port, token_from_args(args), timeout_ms=args.timeout_ms)
        for _ in range(args.connections)
    ]
    won: dict[int, Grabbed] = {}
    sold_out = 0
    refused: Counter[str] = Counter()
    try:
        with progress:
            t = progress.add_task("registering members", total=n + 1, note="")
            ids = [sender] + members
            for i in range(0, len(ids), MAX_REGISTER_IDS):
                await c.register(ids[i : i + MAX_REGISTER_IDS])
                progress.advance(t, len(ids[i : i + MAX_REGISTER_IDS]))
            await c.deposit(sender, args.amount)
            t = progress.add_task("forming the group", total=n, note=f"group {group_id}")
            await c.group_create(group_id, [sender] + members[: GROUP_CREATE_CHUNK - 1], name="anbao demo")
            progress.advance(t, min(n, GROUP_CREATE_CHUNK - 1))
            for i in range(GROUP_CREATE_CHUNK - 1, n, MAX_REGISTER_IDS):
                await c.group_add(group_id, members[i : i + MAX_REGISTER_IDS])
                progress.advance(t, len(members[i : i + MAX_REGISTER_IDS]))
            sent = await c.send(
                sender,
                args.amount,
                shares,
                mode=Mode.FIXED if args.fixed else Mode.RANDOM,
                group=group_id,
                greeting=args.greeting,
            )
            t = progress.add_task("grabbing, all at once", total=n, note="")

            async def grab(i: int, user: int) -> None:
                nonlocal sold_out
                try:
                    won[user] = await grabbers[i % len(grabbers)].grab(sent.packet_id, user)
                except SoldOut:
                    sold_out += 1
                except AnbaoError as exc:
                    refused[exc.status.name] += 1
                progress.update(t, advance=1, note=f"{len(won)} won, {sold_out} sold out")

            order = members[:]
            random.shuffle(order)
            started = time.perf_counter()
            await asyncio.gather(*(grab(i, u) for i, u in enumerate(order)))
            elapsed_s = time.perf_counter() - started
    finally:
        for g in grabbers:
            await g.close()

    info = await c.packet(sent.packet_id, claims_limit=1)
    claims: list[Claim] = []
    while len(claims) < info.claimed_count:
        claims += (await c.packet(sent.packet_id, claims_offset=len(claims), claims_limit=1000)).claims
    agree = {x.user_id: (x.seq, x.amount_cents) for x in claims} == {u: (g.seq, g.amount_cents) for u, g in won.items()}
    try:
        audit = await c.audit()
    except Forbidden:
        audit = None
    ranked = sorted(claims, key=lambda x: (-x.amount_cents, x.seq))
    top = ranked[: args.top]
    doc = {
        "packet_id": sent.packet_id,
        "group_id": group_id,
        "sender_id": sender,
        "members": n,
        "shares": shares,
        "total_cents": args.amount,
        "claimed_count": len(claims),
        "claimed_cents": sum(x.amount_cents for x in claims),
        "sold_out_answers": sold_out,
        "other_answers": dict(refused),
        "elapsed_ms": round(elapsed_s * 1000, 1),
        "luckiest": {"user_id": ranked[0].user_id, "seq": ranked[0].seq, "amount_cents": ranked[0].amount_cents}
        if ranked
        else None,
        "top": [{"user_id": x.user_id, "seq": x.seq, "amount_cents": x.amount_cents} for x in top],
        "answers_match_database": agree,
        "audit_ok": None if audit is None else audit.ok,
        "audit_violated": None if audit is None else audit.violated,
    }

    table = Table("rank", "user", "share", "amount", "", title=f"who got what (top {len(top)} of {len(claims)})")
    for rank, x in enumerate(top, 1):
        table.add_row(
            str(rank),
            str(x.user_id),
            f"#{x.seq}",
            yuan(x.amount_cents),
            "luckiest" if x.seq == info.luckiest_seq else "",
        )
    if len(ranked) > len(top):
        rest = ranked[len(top) :]
        table.add_row("...", f"{len(rest)} more", "", yuan(sum(x.amount_cents for x in rest)), "")
    table.add_section()
    table.add_row("", "total", f"{len(claims)}/{shares}", yuan(sum(x.amount_cents for x in claims)), "")
    rate = n / elapsed_s if elapsed_s else 0
    lines = [
        f"packet {sent.packet_id}: {yuan(args.amount)} in {shares} "
        f"{'fixed' if args.fixed else 'random'} shares for group {group_id} ({n} members)",
        table,
        f"{n} grabs over {len(grabbers)} connections in {elapsed_s * 1000:.0f} ms ({rate:,.0f} grabs/s):"
        f" {len(won)} got a share, {sold_out} were told sold out"
        + (f", other answers {dict(refused)}" if refused else ""),
        "every acknowledged share is in the database"
        if agree
        else "[red]MISMATCH between the answers and the database[/red]",
        "audit: not run (needs the admin scope)"
        if audit is None
        else f"audit: [green]OK[/green], {len(audit.checks)} invariants hold"
        if audit.ok
        else f"audit: [red]VIOLATED[/red]: {', '.join(audit.violated)}",
    ]
    out.done(doc, lines)
    return 0 if agree and (audit is None or audit.ok) and len(claims) == shares else 1
