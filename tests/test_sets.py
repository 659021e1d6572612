"""Two sets on this machine: two embedded PostgreSQL servers (wal_level =
logical) and two `anbao serve` groups, with money crossing sets through
PostgreSQL's logical replication (migration 0007, storage/sets.py). Faults
are real: kill -9 of a postmaster and of a worker by pid, a set's
PostgreSQL stopped and started again. Each fault lands at the step it names,
and the test asserts so before it strikes: the test holds a real lock the
product takes (a wallet row the apply updates, the roll-up's advisory
lock), so the stream stops at a known point with part of the credits
applied. After each run the cross-set audit (`anbao audit --topology`) must
find every credit applied exactly once, and every winner's wallet its share."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time

import asyncpg
import pytest
from helpers import ADMIN_TOKEN, Raw
from polling import eventually
from served import ANBAO
from sets_env import DRAIN_TIMEOUT_S, _cross_users, _directory_has, _drained_audit, _storm_across, _users, two_sets_env

from anbao.server.sets import PEER_READER_NAME
from anbao.storage import embedded
from anbao_client import Client, InsufficientFunds, SetCluster, WrongSet, home_set, set_of, wire

pytestmark = pytest.mark.timeout(120)

two_sets = pytest.fixture(scope="module")(two_sets_env)


async def test_grab_storm_by_members_of_both_sets_crosses_exactly_once(two_sets):
    env = two_sets
    topo, dsns = env["topology"], env["dsns"]
    async with await SetCluster.connect(topo, ADMIN_TOKEN) as sc:
        senders = await _users(sc, 1, 8, 1_000_000)
        members = await _users(sc, 1000, 400)
        sender0 = next(u for u in senders if home_set(u, topo) == 0)
        sender1 = next(u for u in senders if home_set(u, topo) == 1)
        by_set = {s: [u for u in members if home_set(u, topo) == s] for s in (0, 1)}
        assert len(by_set[0]) > 100 and len(by_set[1]) > 100
        await _directory_has(dsns[0], by_set[1])
        await _directory_has(dsns[1], by_set[0])
        before = {u: await sc.balance(u) for u in members}

    # A packet in each set, each grabbed by members of both sets.
    won_all: dict[int, int] = {}
    for sender in (sender0, sender1):
        packet_id, won = await _storm_across(env, sender, members, 300)
        assert len(won) == 300
        for u, g in won.items():
            won_all[u] = won_all.get(u, 0) + g.amount_cents

    result = await _drained_audit(dsns)
    assert result.ok, result.text()
    assert result.totals["credits_sent"] > 0 and result.totals["credits_in_flight"] == 0
    assert result.totals["suspense_cents"] == 0
    # Each credit delivered is one CROSS_SET_CREDIT event in its home set's
    # feed, written by the apply transaction that credited the wallet: a
    # credit batch's one row (kind 8, migration 0019) stands for its credits.
    credit_events = 0
    for dsn in dsns.values():
        conn = await asyncpg.connect(dsn)
        try:
            events, credits = await conn.fetchrow(
                "SELECT (SELECT count(*) FILTER (WHERE kind = 7) + COALESCE(sum(count) FILTER (WHERE kind = 8), 0)"
                " FROM event_log), (SELECT count(*) FROM transfers WHERE kind = 7)"
            )
        finally:
            await conn.close()
        assert events == credits
        credit_events += events
        # Every credit left in its grab's commit (one credit_batches row per
        # batch and destination, migration 0014), none by the roll-up alone.
        conn = await asyncpg.connect(dsn)
        try:
            batched, alone, batches = await conn.fetchrow(
                "SELECT count(*) FILTER (WHERE in_batch), count(*) FILTER (WHERE NOT in_batch),"
                " (SELECT count(*) FROM credit_batches WHERE src_set = (SELECT set_id FROM anbao_set_identity))"
                " FROM credits_out WHERE src_set = (SELECT set_id FROM anbao_set_identity)"
            )
        finally:
            await conn.close()
        assert batched > 0 and alone == 0 and 0 < batches < batched
    assert credit_events == result.totals["credits_sent"]
    async with await SetCluster.connect(topo, ADMIN_TOKEN) as sc:
        for u in members:
            assert await sc.balance(u) == before[u] + won_all.get(u, 0), u
        # A wallet is spendable once its credit is posted: withdraw a share
        # received from the other set, at the home set.
        cross = next(u for u in by_set[1] if u in won_all)
        await sc.withdraw(cross, 1)

    # A raw client at the wrong set gets the typed redirect, naming the set.
    r = await Raw.open(topo.sets[0].port)
    try:
        r.send(wire.balance(7, by_set[1][0]))
        [resp] = await r.answers(1)
        assert resp.status == wire.Status.WRONG_SET
        message, set_id, host, port = wire.wrong_set(resp.body)
        assert (set_id, port) == (1, topo.sets[1].port) and "set 1" in message
    finally:
        r.close()
    c = await SetCluster.connect(topo, ADMIN_TOKEN)
    try:
        with pytest.raises(WrongSet) as e:
            await c.clusters[0].deposit(by_set[1][0], 5)
        assert e.value.set_id == 1
        assert await c.deposit(by_set[1][0], 5)  # SetCluster routes it home
    finally:
        await c.close()

    # The CLI's cross-set audit agrees.
    out = subprocess.run(
        [*ANBAO, "audit", "--topology", str(env["topology_file"]), "--json"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    doc = json.loads(out.stdout)
    assert doc["ok"] and doc["totals"]["credits_in_flight"] == 0


def test_demo_on_running_sets_of_a_topology_file(two_sets):
    """`anbao demo --topology FILE`: the demo across sets that already run."""
    out = subprocess.run(
        [
            *ANBAO,
            "demo",
            "--topology",
            str(two_sets["topology_file"]),
            "--token",
            ADMIN_TOKEN,
            "--members",
            "300",
            "--shares",
            "80",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    doc = json.loads(out.stdout)
    away = sum(n for s, n in doc["winners_by_set"].items() if int(s) != doc["packet_set"])
    assert doc["shares_won"] == 80 and doc["audit_ok"] is True
    assert doc["cross_set_credits"] == away > 0 and doc["credits_match_winners"] is True
    for s in (0, 1):  # both groups still serve
        assert two_sets["served"][s].proc.poll() is None


async def _set_section(topo, s: int, ready=lambda sec: True, timeout_s: float = 30) -> dict:
    """Set `s`'s STATS "set" section, once `ready(section)` holds."""
    deadline = time.monotonic() + timeout_s
    c = await Client.connect(topo.sets[s].host, topo.sets[s].port, ADMIN_TOKEN)
    try:
        while True:
            section = (await c.stats())["set"]
            if section.get("read_at_ms") and ready(section):
                return section
            assert time.monotonic() < deadline, f"set {s}: STATS never showed it: {section}"
            await asyncio.sleep(0.2)
    finally:
        await c.close()


def _scrape_gauge(port: int, name: str, **labels) -> float | None:
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def _backlog(section: dict, slot_name: str) -> int | None:
    return next((x["backlog_bytes"] for x in section["slots"] if x["slot_name"] == slot_name), None)


async def test_stats_and_metrics_show_each_sets_replication_and_the_backlog_moves(two_sets):
    """STATS at each set has a "set" section (its slots' backlog and
    wal_status, its subscription, its credits and those in flight to the
    other set), read in the background; the Prometheus endpoint has the
    same gauges. With set 1 stopped, set 0's slot for it keeps a growing
    backlog and its credits in flight are unknown; when set 1 is back, the
    backlog drains to 0 and nothing is in flight."""
    env = two_sets
    topo = env["topology"]
    for s in (0, 1):
        other = 1 - s
        # (a set whose PostgreSQL an earlier test restarted starts its apply worker again first)
        sec = await _set_section(topo, s, lambda x: bool(x["slots"]) and all(y["running"] for y in x["subscriptions"]))
        assert sec["set_id"] == s and sec["error"] == ""
        assert [x["slot_name"] for x in sec["slots"]] == [f"anbao_{s}_to_{other}"]
        assert sec["slots"][0]["wal_status"] in ("reserved", "extended")
        assert [x["subname"] for x in sec["subscriptions"]] == [f"anbao_from_set_{other}"]
        assert sec["subscriptions"][0]["running"] is True
        assert set(sec["credits"]) >= {"sent", "applied", "sent_cents", "applied_cents"}
        assert isinstance(sec["to_sets"][str(other)]["in_flight"], int)
    metrics_port = env["served"][0].metrics_port
    deadline = time.monotonic() + 10  # the worker flushes its gauges every second
    while _scrape_gauge(metrics_port, "anbao_set_slot_backlog_bytes", slot="anbao_0_to_1") is None:
        assert time.monotonic() < deadline, "no backlog gauge in the metrics"
        await asyncio.sleep(0.3)

    sender0, ones = await _cross_users(env, 91_000, 600)
    sent_before = (await _set_section(topo, 0))["credits"]["sent"]

    pg1 = env["pg_dirs"][1]
    await asyncio.to_thread(embedded.pg_ctl_stop, pg1)
    try:
        _, won = await _storm_across(env, sender0, ones, 200)
        assert len(won) == 200
        sec = await _set_section(
            topo,
            0,
            lambda x: (
                x["credits"]["sent"] >= sent_before + 200
                and (_backlog(x, "anbao_0_to_1") or 0) > 0
                and x["to_sets"]["1"]["in_flight"] is None
            ),
        )
        assert "unreachable" in sec["to_sets"]["1"]["error"]
        deadline = time.monotonic() + 10
        while (_scrape_gauge(metrics_port, "anbao_set_slot_backlog_bytes", slot="anbao_0_to_1") or 0) <= 0:
            assert time.monotonic() < deadline, "the backlog gauge never rose"
            await asyncio.sleep(0.3)
        # Sampled on its own clock, as the backlog gauge is: -1 (unreachable) in its turn.
        await eventually(
            lambda: _scrape_gauge(metrics_port, "anbao_set_credits_in_flight", dest_set="1") == -1,
            10,
            "the in-flight gauge to say set 1 is unreachable",
            0.3,
        )
    finally:
        await asyncio.to_thread(embedded.start, pg1, True)
    sec = await _set_section(
        topo,
        0,
        lambda x: _backlog(x, "anbao_0_to_1") == 0 and x["to_sets"]["1"]["in_flight"] == 0,
        timeout_s=DRAIN_TIMEOUT_S,
    )
    assert sec["credits"]["sent"] >= sent_before + 200
    deadline = time.monotonic() + 10
    while _scrape_gauge(metrics_port, "anbao_set_credits_in_flight", dest_set="1") != 0:
        assert time.monotonic() < deadline, "the in-flight gauge never came back to 0"
        await asyncio.sleep(0.3)
    result = await _drained_audit(env["dsns"])
    assert result.ok, result.text()


async def test_balance_at_home_shows_what_other_sets_owe_until_it_arrives(two_sets):
    """BALANCE at the home set says what is posted and, apart, what another
    set owes the user and has not credited yet (the share is acknowledged
    there at once); WITHDRAW spends only what is posted; a set that cannot
    be asked is counted, not waited for; once the credits arrive they move
    from in flight into the balance, never counted twice."""
    env = two_sets
    topo, dsns = env["topology"], env["dsns"]
    async with await SetCluster.connect(topo, ADMIN_TOKEN) as sc:
        users = await _users(sc, 70_000, 40, 50_000)
        sender0 = next(u for u in users if home_set(u, topo) == 0)
        ones = [u for u in users if home_set(u, topo) == 1][:3]
        await _directory_has(dsns[0], ones)
        before = {u: await sc.balance_detail(u) for u in ones}
        assert all(b == wire.Balance(50_000, 0, 0) for b in before.values()), before

        conn1 = await asyncpg.connect(dsns[1])
        try:
            await conn1.execute("ALTER SUBSCRIPTION anbao_from_set_0 DISABLE")  # credits from set 0 wait
            sent = await sc.send(sender0, 9_000, 3, mode=wire.Mode.FIXED)
            won = {u: (await sc.grab(sent.packet_id, u)).amount_cents for u in ones}
            assert won == {u: 3_000 for u in ones}
            # At once (the grabs may still wait for set 0's roll-up), and after it wrote the credits.
            for _ in range(2):
                for u in ones:
                    assert await sc.balance_detail(u) == wire.Balance(50_000, 3_000, 0)
                deadline = time.monotonic() + 20
                conn0 = await asyncpg.connect(dsns[0])
                try:
                    while await conn0.fetchval("SELECT count(*) FROM grab_rollups") and time.monotonic() < deadline:
                        await asyncio.sleep(0.1)
                    assert await conn0.fetchval(
                        "SELECT count(*) FROM credits_out WHERE packet_id = $1", sent.packet_id
                    ) == len(ones)
                finally:
                    await conn0.close()
            with pytest.raises(InsufficientFunds):
                await sc.withdraw(ones[0], 50_001)

            # Set 0 hanging (its backends serving set 1 stopped), then down:
            # BALANCE at set 1 still answers, and says set 0 was not reached.
            conn0 = await asyncpg.connect(dsns[0])
            try:
                stopped = [
                    r["pid"]
                    for r in await conn0.fetch(
                        "SELECT pid FROM pg_stat_activity WHERE application_name = $1", PEER_READER_NAME
                    )
                ]
                assert stopped, "set 1 holds no connection to set 0"
                for pid in stopped:
                    os.kill(pid, signal.SIGSTOP)
                try:
                    assert await sc.balance_detail(ones[0]) == wire.Balance(50_000, 0, 1)
                    assert await sc.balance_detail(ones[1]) == wire.Balance(50_000, 0, 1)  # not asked again
                finally:
                    for pid in stopped:
                        os.kill(pid, signal.SIGCONT)
            finally:
                await conn0.close()
            await asyncio.to_thread(embedded.pg_ctl_stop, env["pg_dirs"][0])
            try:
                assert await sc.balance_detail(ones[0]) == wire.Balance(50_000, 0, 1)
            finally:
                await asyncio.to_thread(embedded.start, env["pg_dirs"][0], True)
        finally:
            await conn1.execute("ALTER SUBSCRIPTION anbao_from_set_0 ENABLE")
            await conn1.close()

        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while time.monotonic() < deadline:
            now = {u: await sc.balance_detail(u) for u in ones}
            assert all(b.balance_cents + b.in_flight_cents in (53_000, 50_000) for b in now.values()), now
            if all(b == wire.Balance(53_000, 0, 0) for b in now.values()):
                break
            await asyncio.sleep(0.2)
        else:
            raise AssertionError(f"the credits did not arrive: {now}")
        # The home set lists the share won in set 0, with its sender and seq.
        seqs = []
        for u in ones:
            [share] = [x for x in (await sc.received(u)).items if x.packet_id == sent.packet_id]
            assert (share.sender_id, share.amount_cents) == (sender0, 3_000)
            assert share.claimed_at_ms > 0
            seqs.append(share.seq)
        assert sorted(seqs) == [1, 2, 3]
        assert (await sc.withdraw(ones[0], 53_000)).balance_cents == 0
    result = await _drained_audit(dsns)
    assert result.ok, result.text()


# ---------------------------------------------------------------- resync
# A slot lost past max_slot_wal_keep_size, and `anbao sets resync`
# (storage/resync.py): a new slot, the subscription re-created without
# copying data, the credits the receiver lacks backfilled, each applied once.


async def test_set_cluster_offers_every_operation_of_the_sdk(two_sets):
    """SetCluster has the operations every client has (issue 21): ping,
    the first set's event feed, SEND with its named options, and one
    AuditResult combining each set's."""
    topo = two_sets["topology"]
    async with await SetCluster.connect(topo, ADMIN_TOKEN) as sc:
        assert await sc.ping() == 0  # one worker in each set
        first = min(sc.clusters)
        users = await _users(sc, 95_000, 8, 10_000)
        sender = next(u for u in users if home_set(u, topo) == first)
        start = (await sc.events_page(0, limit=1)).head
        members = [u for u in users if u != sender][:4]
        sent = await sc.send(sender, 600, 2, mode=wire.Mode.FIXED, greeting="hi", members=members)
        assert set_of(sent.packet_id) == first

        async def sent_event() -> wire.Event:
            async for e in sc.events(after=start):
                if e.kind == wire.EventKind.SENT and e.packet_id == sent.packet_id:
                    return e
            raise AssertionError("the feed ended")

        event = await asyncio.wait_for(sent_event(), 20)
        assert (event.user_id, event.amount_cents, event.count) == (sender, 600, 2)
        audit = await sc.audit()
        each = [await c.audit() for c in sc.clusters.values()]
        assert isinstance(audit, wire.AuditResult)
        assert set(audit.checks) == {name for a in each for name in a.checks}
        assert set(audit.counts) == {name for a in each for name in a.counts}
