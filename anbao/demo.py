"""`anbao demo`: a red packet in a group of a few thousand simulated
members, all grabbing at once over a few connections, with a progress bar;
then who got what (the luckiest first), the totals, and the audit.

Meanwhile it follows the event feed (EVENTS) like a chat app's backend
would, and tells the packet's story from the events alone (sent, shares
taken, sold out in N ms, the luckiest), then checks that the story matches
the database (PACKET).

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

from anbao_client import (
    AnbaoError,
    Claim,
    Client,
    CursorExpired,
    Event,
    EventKind,
    Forbidden,
    Grabbed,
    Mode,
    PacketInfo,
    SoldOut,
)
from anbao_client.protocol import MAX_REGISTER_IDS

from .cliutil import token_from_args, yuan
from .config import Limits

MAX_DEMO_MEMBERS = Limits().max_group_members  # a default server's group bound
ID_BLOCK = 100_000  # a run's ids: base .. base + 99,999
GROUP_CREATE_CHUNK = Limits().max_members  # one frame's worth of member ids


STORY_WAIT_S = 30  # how long the story waits for the packet's SOLD_OUT event after the grabs


async def feed_head(c: Client) -> int:
    """The last event number given: where a follower of what happens next starts."""
    try:
        return (await c.events_page(0, limit=1)).head
    except CursorExpired as exc:
        return (await c.events_page(exc.resume_cursor, limit=1)).head


class FeedFollower:
    """Follows the feed from `after` in the background, keeping every event."""

    def __init__(self, c: Client, after: int):
        self.events: list[Event] = []
        self.done = asyncio.Event()
        self.packet_id = 0
        self.task = asyncio.ensure_future(self._run(c, after))

    async def _run(self, c: Client, after: int) -> None:
        async for e in c.events(after=after, wait_ms=1_000):
            self.events.append(e)
            if e.packet_id == self.packet_id and e.kind in (EventKind.SOLD_OUT, EventKind.REFUNDED):
                self.done.set()

    def watch(self, packet_id: int) -> None:
        self.packet_id = packet_id
        if any(e.packet_id == packet_id and e.kind == EventKind.SOLD_OUT for e in self.events):
            self.done.set()

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


def packet_story(events: list[Event], packet_id: int, info: PacketInfo, db_claims: list[Claim]) -> dict:
    """The packet's story told from its events alone, and whether it matches the database."""
    mine = [e for e in events if e.packet_id == packet_id]
    sent = next((e for e in mine if e.kind == EventKind.SENT), None)
    taken = [e for e in mine if e.kind == EventKind.SHARE_TAKEN]
    sold = [e for e in mine if e.kind == EventKind.SOLD_OUT]
    luckiest = min(taken, key=lambda e: (-e.amount_cents, e.seq)) if taken else None
    numbers = [e.number for e in mine]
    story = {
        "events": len(mine),
        "sent_cents": sent.amount_cents if sent else None,
        "shares_taken": len(taken),
        "taken_cents": sum(e.amount_cents for e in taken),
        "sold_out": bool(sold),
        "sold_out_in_ms": sold[0].elapsed_ms if sold else None,
        "luckiest": {"user_id": luckiest.user_id, "seq": luckiest.seq, "amount_cents": luckiest.amount_cents}
        if luckiest
        else None,
        "first_share_ms_after_send": taken[0].at_ms - sent.at_ms if taken and sent else None,
    }
    from_events = {(e.seq, e.user_id, e.amount_cents) for e in taken}
    from_db = {(x.seq, x.user_id, x.amount_cents) for x in db_claims}
    story["matches_database"] = (
        sent is not None
        and sent.amount_cents == info.total_cents
        and sent.count == info.count
        and from_events == from_db
        and len(taken) == len(from_events)
        and len(sold) == (1 if info.claimed_count == info.count else 0)
        and (luckiest is None or luckiest.seq == info.luckiest_seq)
        and numbers == sorted(numbers)
        and [e.seq for e in taken] == sorted(e.seq for e in taken)
    )
    return story


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
    follower = FeedFollower(c, await feed_head(c))
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
            follower.watch(sent.packet_id)
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
        if len(won) == shares:
            try:  # the sell-out's event is numbered within milliseconds of its commit
                await asyncio.wait_for(follower.done.wait(), STORY_WAIT_S)
            except TimeoutError:
                pass
    finally:
        await follower.close()
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
    story = packet_story(follower.events, sent.packet_id, info, claims)
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
        "story": story,
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
        _story_line(story, sent.packet_id),
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
    ok = agree and (audit is None or audit.ok) and len(claims) == shares and story["matches_database"]
    return 0 if ok else 1


def _story_line(story: dict, packet_id: int) -> str:
    """The packet's story from the event feed alone."""
    if not story["events"]:
        return "[red]the event feed told nothing of this packet[/red]"
    parts = [f"from the event feed alone: packet {packet_id} sent ({yuan(story['sent_cents'] or 0)}),"]
    parts.append(f"{story['shares_taken']} shares taken ({yuan(story['taken_cents'])})")
    if story["sold_out"]:
        parts.append(f"sold out in {story['sold_out_in_ms']} ms")
    if story["luckiest"]:
        lk = story["luckiest"]
        parts.append(f"luckiest user {lk['user_id']} with {yuan(lk['amount_cents'])} (share #{lk['seq']})")
    verdict = (
        "[green]matches the database[/green]" if story["matches_database"] else "[red]DIFFERS from the database[/red]"
    )
    return ", ".join(parts) + f"; the story {verdict}"
