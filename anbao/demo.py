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

from .cliutil import token_from_args, usage_error, yuan
from .config import Limits

MAX_DEMO_MEMBERS = Limits().max_group_members  # a default server's group bound
ID_BLOCK = 100_000  # a run's ids: base .. base + 99,999
GROUP_CREATE_CHUNK = Limits().max_members  # one frame's worth of member ids


def check_demo_args(args) -> None:
    """Refuses a demo it cannot run, before it connects or starts anything (exit 2)."""
    if not 2 <= args.members <= MAX_DEMO_MEMBERS or not 1 <= args.shares <= args.members or args.connections < 1:
        raise usage_error(f"demo: --members 2..{MAX_DEMO_MEMBERS}, --shares 1..members, --connections >= 1")


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

    table = Table("rank", "user", "share", "amount", title=f"who got what (top {len(top)} of {len(claims)})")
    for rank, x in enumerate(top, 1):
        lucky = " (luckiest)" if x.seq == info.luckiest_seq else ""
        table.add_row(str(rank), str(x.user_id), f"#{x.seq}", yuan(x.amount_cents) + lucky)
    if len(ranked) > len(top):
        rest = ranked[len(top) :]
        table.add_row("...", f"{len(rest)} more", "", yuan(sum(x.amount_cents for x in rest)))
    table.add_section()
    table.add_row("", "total", f"{len(claims)}/{shares}", yuan(sum(x.amount_cents for x in claims)))
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
    parts = [f"from the event feed alone: packet {packet_id} sent ({yuan(story['sent_cents'] or 0)})"]
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


# ---------------------------------------------------------------- several sets
# `anbao demo --sets 2`: kept apart from run_demo above (its own function,
# its own connections), so the one-set demo changes without touching it.

SETS_DRAIN_TIMEOUT_S = 60  # credits applied and batches rolled up, then the audit


async def _sets_directory_ready(dsns: dict[int, str], topo, users: list[int], timeout_s: float) -> None:
    """Waits until every set knows every other set's users among `users`
    (the directory is replicated: a set refuses a grab by a user it does not
    know yet, UNKNOWN_USER, exactly as for an unregistered one)."""
    from anbao_client import home_set

    from .storage.sets import wait_for_directory

    wanted = {s: [u for u in users if home_set(u, topo) != s] for s in dsns}
    short = await wait_for_directory(dsns, wanted, timeout_s)
    if short is not None:
        s, n, of = short
        raise SystemExit(f"anbao demo: set {s} knows {n} of {of} users of the other sets")


async def _credits_of(dsns: dict[int, str], packet_id: int) -> list[tuple[int, int, int, float]]:
    """The packet's credits as applied at their destinations: (dest set,
    user, amount, lag ms from the roll-up that sent it to the apply)."""
    from .storage.sets import credit_times

    return [
        (c.dest_set, c.user_id, c.amount_cents, (c.applied - c.created) * 1000)
        for c in await credit_times(dsns, [packet_id])
        if c.applied is not None
    ]


async def run_sets_demo(topo, dsns: dict[int, str], token: str, args, out) -> int:
    """The demo across the sets of `topo`: a sender homed in the first set,
    members homed in every set, one packet in the sender's set grabbed by
    all at once; a winner homed elsewhere is paid by a cross-set credit
    (logical replication). Then who got what, the credits, the audit."""
    from rich.table import Table

    from anbao_client import SetCluster, home_set, set_of

    n, shares = args.members, args.shares
    base = (1 + secrets.randbelow(9_999_999)) * ID_BLOCK
    first_set = min(topo.sets)
    sender = next(u for u in range(base, base + ID_BLOCK) if home_set(u, topo) == first_set)
    group_id = base
    members = [u for u in range(base, base + ID_BLOCK) if u != sender][:n]
    say = (lambda text: None) if out.json else out.console.print

    sc = await SetCluster.connect(topo, token, timeout_ms=args.timeout_ms)
    grabbers = [await SetCluster.connect(topo, token, timeout_ms=args.timeout_ms) for _ in range(args.connections)]
    won: dict[int, Grabbed] = {}
    sold_out = 0
    refused: Counter[str] = Counter()
    try:
        say(f"registering {n + 1} users at their home sets")
        ids = [sender] + members
        for i in range(0, len(ids), MAX_REGISTER_IDS):
            await sc.register(ids[i : i + MAX_REGISTER_IDS])
        await sc.deposit(sender, args.amount)
        say("waiting for each set's directory to know the other sets' users")
        await _sets_directory_ready(dsns, topo, ids, SETS_DRAIN_TIMEOUT_S)
        await sc.group_create(group_id, [sender] + members[: GROUP_CREATE_CHUNK - 1], name="anbao demo (sets)")
        for i in range(GROUP_CREATE_CHUNK - 1, n, MAX_REGISTER_IDS):
            await sc.group_add(group_id, members[i : i + MAX_REGISTER_IDS])
        sent = await sc.send(
            sender,
            args.amount,
            shares,
            mode=Mode.FIXED if args.fixed else Mode.RANDOM,
            group=group_id,
            greeting=args.greeting,
        )
        packet_set = set_of(sent.packet_id)
        say(f"packet {sent.packet_id} in set {packet_set}: {n} members grabbing at once")

        async def grab(i: int, user: int) -> None:
            nonlocal sold_out
            try:
                won[user] = await grabbers[i % len(grabbers)].grab(sent.packet_id, user)
            except SoldOut:
                sold_out += 1
            except AnbaoError as exc:
                refused[exc.status.name] += 1

        order = members[:]
        random.shuffle(order)
        started = time.perf_counter()
        await asyncio.gather(*(grab(i, u) for i, u in enumerate(order)))
        elapsed_s = time.perf_counter() - started

        info = await sc.packet(sent.packet_id, claims_limit=1)
        claims: list[Claim] = []
        while len(claims) < info.claimed_count:
            claims += (await sc.packet(sent.packet_id, claims_offset=len(claims), claims_limit=1000)).claims
        say("waiting for the cross-set credits to be applied")
        from .storage.sets import audit_when_drained

        audit, drained = await audit_when_drained(dsns, SETS_DRAIN_TIMEOUT_S)
        assert audit is not None, "several sets: there is always a cross-set audit"
        credits = await _credits_of(dsns, sent.packet_id)
    finally:
        for g in [sc, *grabbers]:
            await g.close()

    agree = {x.user_id: (x.seq, x.amount_cents) for x in claims} == {u: (g.seq, g.amount_cents) for u, g in won.items()}
    home = {u: home_set(u, topo) for u in members}
    away = {u for u in won if home[u] != packet_set}
    credited = {u: amount for _, u, amount, _ in credits}
    credits_match = credited == {u: won[u].amount_cents for u in away}
    lags = sorted(lag for *_, lag in credits)
    ranked = sorted(claims, key=lambda x: (-x.amount_cents, x.seq))
    top = ranked[: args.top]
    doc = {
        "sets": sorted(topo.sets),
        "packet_id": sent.packet_id,
        "packet_set": packet_set,
        "group_id": group_id,
        "sender_id": sender,
        "members": n,
        "members_by_set": dict(Counter(home.values())),
        "shares": shares,
        "total_cents": args.amount,
        "shares_won": len(claims),
        "claimed_cents": sum(x.amount_cents for x in claims),
        "winners_by_set": dict(Counter(home[u] for u in won)),
        "cross_set_credits": len(credits),
        "cross_set_cents": sum(credited.values()),
        "credits_match_winners": credits_match,
        "credit_lag_ms_p50": round(lags[len(lags) // 2], 1) if lags else None,
        "credit_lag_ms_max": round(lags[-1], 1) if lags else None,
        "sold_out_answers": sold_out,
        "other_answers": dict(refused),
        "elapsed_ms": round(elapsed_s * 1000, 1),
        "top": [
            {"user_id": x.user_id, "home_set": home[x.user_id], "seq": x.seq, "amount_cents": x.amount_cents}
            for x in top
        ],
        "answers_match_database": agree,
        "drained": drained,
        "audit_ok": audit.ok,
        "audit_violations": list(audit.violations),
        "audit_totals": audit.totals,
    }

    table = Table(
        "rank", "user", "home", "share", "amount", "note", title=f"who got what (top {len(top)} of {len(claims)})"
    )
    for rank, x in enumerate(top, 1):
        crossed = home[x.user_id] != packet_set
        table.add_row(
            str(rank),
            str(x.user_id),
            f"set {home[x.user_id]}",
            f"#{x.seq}",
            yuan(x.amount_cents),
            ", ".join(["luckiest"] * (x.seq == info.luckiest_seq) + [f"credited to set {home[x.user_id]}"] * crossed),
        )
    if len(ranked) > len(top):
        rest = ranked[len(top) :]
        table.add_row("...", f"{len(rest)} more", "", "", yuan(sum(x.amount_cents for x in rest)), "")
    table.add_section()
    table.add_row("", "total", "", f"{len(claims)}/{shares}", yuan(sum(x.amount_cents for x in claims)), "")
    by_set = ", ".join(f"set {s}: {c}" for s, c in sorted(doc["winners_by_set"].items()))
    lines = [
        f"packet {sent.packet_id} (set {packet_set}): {yuan(args.amount)} in {shares} "
        f"{'fixed' if args.fixed else 'random'} shares for group {group_id} ({n} members over sets "
        + ", ".join(f"{s}: {c}" for s, c in sorted(doc["members_by_set"].items()))
        + ")",
        table,
        f"{n} grabs over {len(grabbers)} connections in {elapsed_s * 1000:.0f} ms: {len(won)} got a share"
        f" ({by_set}), {sold_out} were told sold out" + (f", other answers {dict(refused)}" if refused else ""),
        f"cross-set credits: {len(credits)} applied ({yuan(sum(credited.values()))}) for {len(away)} winners"
        f" homed outside set {packet_set}"
        + (f"; roll-up to apply p50 {doc['credit_lag_ms_p50']} ms, max {doc['credit_lag_ms_max']} ms" if lags else "")
        + ("" if credits_match else " [red]MISMATCH with the winners[/red]"),
        "every acknowledged share is in the database"
        if agree
        else "[red]MISMATCH between the answers and the database[/red]",
        f"audit across {len(dsns)} sets: [green]OK[/green] (conservation over all sets, every credit applied once)"
        if audit.ok
        else f"audit across sets: [red]VIOLATED[/red]: {', '.join(audit.violations) or 'a set'}",
    ]
    if not drained:
        lines.append(f"[red]credits still in flight after {SETS_DRAIN_TIMEOUT_S} s[/red]")
    out.done(doc, lines)
    ok = agree and audit.ok and drained and credits_match and len(claims) == shares
    return 0 if ok else 1
