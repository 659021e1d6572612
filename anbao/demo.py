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
from dataclasses import dataclass, field
from typing import Any

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
    OutcomeUnknown,
    PacketInfo,
    SoldOut,
)
from anbao_client.protocol import MAX_REGISTER_IDS

from .cliutil import token_from_args, usage_error, yuan
from .config import Limits

MAX_DEMO_MEMBERS = Limits().rules.max_group_members  # a default server's group bound
ID_BLOCK = 100_000  # a run's ids: base .. base + 99,999
GROUP_CREATE_CHUNK = Limits().wire.max_members  # one frame's worth of member ids


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


@dataclass
class Grabs:
    """What the members' grabs were answered: shares, SOLD_OUT, anything else."""

    won: dict[int, Grabbed] = field(default_factory=dict)
    sold_out: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    elapsed_s: float = 0.0


async def grab_all(grabbers: list, packet_id: int, members: list[int], on_answer=None) -> Grabs:
    """Every member grabs once, all at once, in a random order, spread over
    the grabbers' connections; on_answer(grabs) after each answer."""
    grabs = Grabs()

    async def grab(i: int, user: int) -> None:
        try:
            grabs.won[user] = await grabbers[i % len(grabbers)].grab(packet_id, user)
        except SoldOut:
            grabs.sold_out += 1
        except OutcomeUnknown:
            raise  # no answer is no refusal: the demo stops, as it did before
        except AnbaoError as exc:
            grabs.refused[exc.status.name] += 1
        if on_answer is not None:
            on_answer(grabs)

    order = members[:]
    random.shuffle(order)
    started = time.perf_counter()
    await asyncio.gather(*(grab(i, u) for i, u in enumerate(order)))
    grabs.elapsed_s = time.perf_counter() - started
    return grabs


async def all_claims(c, packet_id: int) -> tuple[PacketInfo, list[Claim]]:
    """The packet and every claim of it, a page at a time."""
    info = await c.packet(packet_id, claims_limit=1)
    claims: list[Claim] = []
    while len(claims) < info.claimed_count:
        claims += (await c.packet(packet_id, claims_offset=len(claims), claims_limit=1000)).claims
    return info, claims


def _demo_ids() -> tuple[int, int, int]:
    """A fresh block of ids for this run: (base, sender, group)."""
    base = (1 + secrets.randbelow(9_999_999)) * ID_BLOCK
    return base, base, base


async def _prepare(c: Client, args, progress, sender: int, group_id: int, members: list[int]):
    """Registers the sender and the members, funds the sender, forms the
    group and sends the packet to it; returns the SEND's answer."""
    n = len(members)
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
    mode = Mode.FIXED if args.fixed else Mode.RANDOM
    return await c.send(sender, args.amount, args.shares, mode=mode, group=group_id, greeting=args.greeting)


def _progress(out):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description:<22}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[note]}"),
        TimeElapsedColumn(),
        console=out.console,
        disable=out.json,
    )


async def run_demo(c: Client, args, out) -> int:
    base, sender, group_id = _demo_ids()
    members = list(range(base + 1, base + 1 + args.members))
    progress = _progress(out)
    grabbers = [
        await Client.connect(args.host, args.port, token_from_args(args), timeout_ms=args.timeout_ms)
        for _ in range(args.connections)
    ]
    follower = FeedFollower(c, await feed_head(c))
    try:
        with progress:
            sent = await _prepare(c, args, progress, sender, group_id, members)
            follower.watch(sent.packet_id)
            t = progress.add_task("grabbing, all at once", total=len(members), note="")

            def advance(g: Grabs) -> None:
                progress.update(t, advance=1, note=f"{len(g.won)} won, {g.sold_out} sold out")

            grabs = await grab_all(grabbers, sent.packet_id, members, advance)
        if len(grabs.won) == args.shares:
            try:  # the sell-out's event is numbered within milliseconds of its commit
                await asyncio.wait_for(follower.done.wait(), STORY_WAIT_S)
            except TimeoutError:
                pass
    finally:
        await follower.close()
        for g in grabbers:
            await g.close()

    info, claims = await all_claims(c, sent.packet_id)
    try:
        audit = await c.audit()
    except Forbidden:
        audit = None
    story = packet_story(follower.events, sent.packet_id, info, claims)
    result = DemoResult(args, sent.packet_id, group_id, sender, info, claims, grabs, story, audit)
    out.done(result.doc(), result.lines(len(grabbers)))
    return 0 if result.ok() else 1


@dataclass
class DemoResult:
    """What the one-set demo found, for --json and for people."""

    args: Any
    packet_id: int
    group_id: int
    sender: int
    info: PacketInfo
    claims: list[Claim]
    grabs: Grabs
    story: dict
    audit: Any  # the AUDIT answer, or None without the admin scope

    @property
    def agree(self) -> bool:
        won = self.grabs.won
        return {x.user_id: (x.seq, x.amount_cents) for x in self.claims} == {
            u: (g.seq, g.amount_cents) for u, g in won.items()
        }

    @property
    def ranked(self) -> list[Claim]:
        return sorted(self.claims, key=lambda x: (-x.amount_cents, x.seq))

    def ok(self) -> bool:
        audit_ok = self.audit is None or self.audit.ok
        return self.agree and audit_ok and len(self.claims) == self.args.shares and self.story["matches_database"]

    def doc(self) -> dict:
        ranked, a, audit = self.ranked, self.args, self.audit
        return {
            "packet_id": self.packet_id,
            "group_id": self.group_id,
            "sender_id": self.sender,
            "members": a.members,
            "shares": a.shares,
            "total_cents": a.amount,
            "claimed_count": len(self.claims),
            "claimed_cents": sum(x.amount_cents for x in self.claims),
            "sold_out_answers": self.grabs.sold_out,
            "other_answers": dict(self.grabs.refused),
            "elapsed_ms": round(self.grabs.elapsed_s * 1000, 1),
            "luckiest": _claim_doc(ranked[0]) if ranked else None,
            "top": [_claim_doc(x) for x in ranked[: a.top]],
            "answers_match_database": self.agree,
            "story": self.story,
            "audit_ok": None if audit is None else audit.ok,
            "audit_violated": None if audit is None else audit.violated,
        }

    def table(self):
        from rich.table import Table

        ranked, claims = self.ranked, self.claims
        top = ranked[: self.args.top]
        table = Table("rank", "user", "share", "amount", title=f"who got what (top {len(top)} of {len(claims)})")
        for rank, x in enumerate(top, 1):
            lucky = " (luckiest)" if x.seq == self.info.luckiest_seq else ""
            table.add_row(str(rank), str(x.user_id), f"#{x.seq}", yuan(x.amount_cents) + lucky)
        if len(ranked) > len(top):
            rest = ranked[len(top) :]
            table.add_row("...", f"{len(rest)} more", "", yuan(sum(x.amount_cents for x in rest)))
        table.add_section()
        table.add_row("", "total", f"{len(claims)}/{self.args.shares}", yuan(sum(x.amount_cents for x in claims)))
        return table

    def lines(self, connections: int) -> list:
        a, g, audit = self.args, self.grabs, self.audit
        rate = a.members / g.elapsed_s if g.elapsed_s else 0
        return [
            f"packet {self.packet_id}: {yuan(a.amount)} in {a.shares} "
            f"{'fixed' if a.fixed else 'random'} shares for group {self.group_id} ({a.members} members)",
            self.table(),
            f"{a.members} grabs over {connections} connections in {g.elapsed_s * 1000:.0f} ms ({rate:,.0f} grabs/s):"
            f" {len(g.won)} got a share, {g.sold_out} were told sold out"
            + (f", other answers {dict(g.refused)}" if g.refused else ""),
            _story_line(self.story, self.packet_id),
            "every acknowledged share is in the database"
            if self.agree
            else "[red]MISMATCH between the answers and the database[/red]",
            "audit: not run (needs the admin scope)"
            if audit is None
            else f"audit: [green]OK[/green], {len(audit.checks)} invariants hold"
            if audit.ok
            else f"audit: [red]VIOLATED[/red]: {', '.join(audit.violated)}",
        ]


def _claim_doc(x: Claim) -> dict:
    return {"user_id": x.user_id, "seq": x.seq, "amount_cents": x.amount_cents}


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
    user, amount, lag ms from its sending (the grab's commit) to the apply)."""
    from .storage.sets import credit_times

    return [
        (c.dest_set, c.user_id, c.amount_cents, (c.applied - c.created) * 1000)
        for c in await credit_times(dsns, [packet_id])
        if c.applied is not None
    ]


async def _sets_prepare(sc, dsns: dict[int, str], topo, args, say, sender: int, group_id: int, members: list[int]):
    """Registers everyone at their home sets, funds the sender, waits for the
    directories, forms the group and sends the packet; returns the SEND's answer."""
    say(f"registering {len(members) + 1} users at their home sets")
    ids = [sender] + members
    for i in range(0, len(ids), MAX_REGISTER_IDS):
        await sc.register(ids[i : i + MAX_REGISTER_IDS])
    await sc.deposit(sender, args.amount)
    say("waiting for each set's directory to know the other sets' users")
    await _sets_directory_ready(dsns, topo, ids, SETS_DRAIN_TIMEOUT_S)
    await sc.group_create(group_id, [sender] + members[: GROUP_CREATE_CHUNK - 1], name="anbao demo (sets)")
    for i in range(GROUP_CREATE_CHUNK - 1, len(members), MAX_REGISTER_IDS):
        await sc.group_add(group_id, members[i : i + MAX_REGISTER_IDS])
    mode = Mode.FIXED if args.fixed else Mode.RANDOM
    return await sc.send(sender, args.amount, args.shares, mode=mode, group=group_id, greeting=args.greeting)


async def run_sets_demo(topo, dsns: dict[int, str], token: str, args, out) -> int:
    """The demo across the sets of `topo`: a sender homed in the first set,
    members homed in every set, one packet in the sender's set grabbed by
    all at once; a winner homed elsewhere is paid by a cross-set credit
    (logical replication). Then who got what, the credits, the audit."""
    from anbao_client import SetCluster, home_set, set_of

    from .storage.sets import audit_when_drained

    base = (1 + secrets.randbelow(9_999_999)) * ID_BLOCK
    first_set = min(topo.sets)
    sender = next(u for u in range(base, base + ID_BLOCK) if home_set(u, topo) == first_set)
    group_id = base
    members = [u for u in range(base, base + ID_BLOCK) if u != sender][: args.members]
    say = (lambda text: None) if out.json else out.console.print

    sc = await SetCluster.connect(topo, token, timeout_ms=args.timeout_ms)
    grabbers = [await SetCluster.connect(topo, token, timeout_ms=args.timeout_ms) for _ in range(args.connections)]
    try:
        sent = await _sets_prepare(sc, dsns, topo, args, say, sender, group_id, members)
        say(f"packet {sent.packet_id} in set {set_of(sent.packet_id)}: {len(members)} members grabbing at once")
        grabs = await grab_all(grabbers, sent.packet_id, members)
        info, claims = await all_claims(sc, sent.packet_id)
        say("waiting for the cross-set credits to be applied")
        audit, drained = await audit_when_drained(dsns, SETS_DRAIN_TIMEOUT_S)
        assert audit is not None, "several sets: there is always a cross-set audit"
        credits = await _credits_of(dsns, sent.packet_id)
    finally:
        for g in [sc, *grabbers]:
            await g.close()
    home = {u: home_set(u, topo) for u in members}
    result = SetsResult(args, sorted(topo.sets), sent.packet_id, group_id, sender, info, claims, grabs, home)
    result.audit, result.drained, result.credits = audit, drained, credits
    out.done(result.doc(), result.lines(len(grabbers)))
    return 0 if result.ok() else 1


class SetsResult(DemoResult):
    """What the demo across sets found: the one-set demo's findings, where
    each user's wallet lives (`home`), the cross-set credits (dest set, user,
    cents, lag ms) and the audit across the sets (no event-feed story)."""

    def __init__(self, args, sets, packet_id, group_id, sender, info, claims, grabs, home) -> None:
        from anbao_client import set_of

        super().__init__(args, packet_id, group_id, sender, info, claims, grabs, {}, None)
        self.sets: list[int] = sets
        self.home: dict[int, int] = home
        self.credits: list[tuple[int, int, int, float]] = []
        self.drained = False
        self.packet_set = set_of(packet_id)

    @property
    def away(self) -> set[int]:
        return {u for u in self.grabs.won if self.home[u] != self.packet_set}

    @property
    def credited(self) -> dict[int, int]:
        return {u: amount for _, u, amount, _ in self.credits}

    @property
    def credits_match(self) -> bool:
        return self.credited == {u: self.grabs.won[u].amount_cents for u in self.away}

    @property
    def lags(self) -> list[float]:
        return sorted(lag for *_, lag in self.credits)

    def ok(self) -> bool:
        whole = len(self.claims) == self.args.shares
        return self.agree and self.audit.ok and self.drained and self.credits_match and whole

    def doc(self) -> dict:
        a, g, lags, audit = self.args, self.grabs, self.lags, self.audit
        return {
            "sets": self.sets,
            "packet_id": self.packet_id,
            "packet_set": self.packet_set,
            "group_id": self.group_id,
            "sender_id": self.sender,
            "members": a.members,
            "members_by_set": dict(Counter(self.home.values())),
            "shares": a.shares,
            "total_cents": a.amount,
            "shares_won": len(self.claims),
            "claimed_cents": sum(x.amount_cents for x in self.claims),
            "winners_by_set": dict(Counter(self.home[u] for u in g.won)),
            "cross_set_credits": len(self.credits),
            "cross_set_cents": sum(self.credited.values()),
            "credits_match_winners": self.credits_match,
            "credit_lag_ms_p50": round(lags[len(lags) // 2], 1) if lags else None,
            "credit_lag_ms_max": round(lags[-1], 1) if lags else None,
            "sold_out_answers": g.sold_out,
            "other_answers": dict(g.refused),
            "elapsed_ms": round(g.elapsed_s * 1000, 1),
            "top": [{**_claim_doc(x), "home_set": self.home[x.user_id]} for x in self.ranked[: a.top]],
            "answers_match_database": self.agree,
            "drained": self.drained,
            "audit_ok": audit.ok,
            "audit_violations": list(audit.violations),
            "audit_totals": audit.totals,
        }

    def table(self):
        from rich.table import Table

        ranked, claims, home = self.ranked, self.claims, self.home
        top = ranked[: self.args.top]
        title = f"who got what (top {len(top)} of {len(claims)})"
        table = Table("rank", "user", "home", "share", "amount", "note", title=title)
        for rank, x in enumerate(top, 1):
            notes = ["luckiest"] * (x.seq == self.info.luckiest_seq)
            notes += [f"credited to set {home[x.user_id]}"] * (home[x.user_id] != self.packet_set)
            row = (str(rank), str(x.user_id), f"set {home[x.user_id]}", f"#{x.seq}", yuan(x.amount_cents))
            table.add_row(*row, ", ".join(notes))
        if len(ranked) > len(top):
            rest = ranked[len(top) :]
            table.add_row("...", f"{len(rest)} more", "", "", yuan(sum(x.amount_cents for x in rest)), "")
        table.add_section()
        total = yuan(sum(x.amount_cents for x in claims))
        table.add_row("", "total", "", f"{len(claims)}/{self.args.shares}", total, "")
        return table

    def lines(self, connections: int) -> list:
        a, g, doc, audit = self.args, self.grabs, self.doc(), self.audit
        by_set = ", ".join(f"set {s}: {c}" for s, c in sorted(doc["winners_by_set"].items()))
        members_by_set = ", ".join(f"{s}: {c}" for s, c in sorted(doc["members_by_set"].items()))
        lags = f"; roll-up to apply p50 {doc['credit_lag_ms_p50']} ms, max {doc['credit_lag_ms_max']} ms"
        lines = [
            f"packet {self.packet_id} (set {self.packet_set}): {yuan(a.amount)} in {a.shares} "
            f"{'fixed' if a.fixed else 'random'} shares for group {self.group_id} ({a.members} members over sets "
            f"{members_by_set})",
            self.table(),
            f"{a.members} grabs over {connections} connections in {g.elapsed_s * 1000:.0f} ms: {len(g.won)} got a"
            f" share ({by_set}), {g.sold_out} were told sold out"
            + (f", other answers {dict(g.refused)}" if g.refused else ""),
            f"cross-set credits: {len(self.credits)} applied ({yuan(sum(self.credited.values()))}) for"
            f" {len(self.away)} winners homed outside set {self.packet_set}"
            + (lags if self.lags else "")
            + ("" if self.credits_match else " [red]MISMATCH with the winners[/red]"),
            "every acknowledged share is in the database"
            if self.agree
            else "[red]MISMATCH between the answers and the database[/red]",
            f"audit across {len(self.sets)} sets: [green]OK[/green] (conservation over all sets, every credit"
            " applied once)"
            if audit.ok
            else f"audit across sets: [red]VIOLATED[/red]: {', '.join(audit.violations) or 'a set'}",
        ]
        if not self.drained:
            lines.append(f"[red]credits still in flight after {SETS_DRAIN_TIMEOUT_S} s[/red]")
        return lines
