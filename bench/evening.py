"""`python -m bench evening`: a chat app's red-packet evening (issue 17), on
anbao and, in the same run, on Redis with Lua and appendfsync always.

The model (BENCHMARKS.md, "The evening"):
- U users (--users, default 10,000), ids from USER_FIRST, each funded with
  FUND_CENTS by one DEPOSIT (anbao) / SET (Redis) before the clock starts.
- Groups of 20-200 members (uniform), each a random sample of the users;
  as many groups as give every user about MEMBERSHIPS_PER_USER groups, so a
  user is in several groups and some in none. Group ids from GROUP_FIRST.
- One step is one packet's life (bench/evening_load.py draws it): a random
  member of a random group SENDs a random-split packet (mode random) of
  5 + Geometric(p = 1/3) shares, capped at 20 (mean ~7), of 1.00-10.00 per
  share on average, to the group (audience GROUP); shares + 1..5 other
  members GRAB it (it sells out; ~30% of grabs are SOLD_OUT); 3 of the
  grabbers open it (PACKET, claims 0..100); one of them checks BALANCE.
  1 SEND : ~10 GRAB : 3 PACKET : 1 BALANCE.
- --attempts counts steps; the run ends after them or at --duration-s.

Set-up (timed, reported in info.setup_timings_s): REGISTER 1,024 ids per
request through every worker, DEPOSIT one per request with DEPOSIT_IN_FLIGHT
in flight over every setup connection, GROUP_CREATE with the members.

The books afterwards: anbao's `anbao audit` (the caller runs it), the OK
answers against what is durable (packets sent by the evening's users,
their claims), the roll-up drained; on Redis, evening_redis.books.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

import asyncpg

from . import evening_redis, scenarios, verify
from . import setup as bench_setup
from .redis_baseline import RedisServer
from .server import metrics_delta

USER_FIRST = 910_000_001
GROUP_FIRST = 17_000_001
DEFAULT_USERS = 10_000
DEFAULT_STEPS = 1_000_000_000  # without --attempts: bounded by --duration-s
GROUP_MIN, GROUP_MAX = 20, 200
MEMBERSHIPS_PER_USER = 2
FUND_CENTS = 10_000_000  # 100,000.00 each: a SEND refused for lack of money is rare
DEPOSIT_IN_FLIGHT = 1024
GROUPS_IN_FLIGHT = 64
RETRY_MS = 5
RETRYABLE_NAMES = {"BUSY", "RATE_LIMITED", "UNAVAILABLE", "IN_DOUBT"}
ALLOWED = {
    "SEND": {"OK", "INSUFFICIENT_FUNDS", *RETRYABLE_NAMES},
    "GRAB": {"OK", "SOLD_OUT", "ALREADY_CLAIMED", *RETRYABLE_NAMES},
    "PACKET": {"OK", *RETRYABLE_NAMES},
    "BALANCE": {"OK", *RETRYABLE_NAMES},
}
MODEL_INFO = {
    "step": "SEND (random split, audience GROUP) -> shares + 1..5 other members GRAB ->"
    " 3 of the grabbers PACKET (claims 0..100) -> 1 of them BALANCE",
    "shares": "5 + Geometric(p = 1/3) failures, capped at 20 (and at group size - 2): mean ~7",
    "total_cents": "shares x uniform(100 .. 1000)",
    "group_model": f"uniform {GROUP_MIN}-{GROUP_MAX} members, random samples, ~{MEMBERSHIPS_PER_USER} groups a user",
    "attempts": "steps",
    "retries": f"closed loop: BUSY, RATE_LIMITED, UNAVAILABLE, IN_DOUBT counted, sent again after {RETRY_MS} ms;"
    " open loop: counted and dropped",
}


@dataclass
class Model:
    users: list[int]
    groups: dict[int, list[int]]  # group id -> members
    fund_cents: int = FUND_CENTS

    @property
    def deposits_cents(self) -> int:
        return self.fund_cents * len(self.users)


def make_model(n_users: int, seed: int) -> Model:
    rng = random.Random(seed)
    users = list(range(USER_FIRST, USER_FIRST + n_users))
    mean_size = (GROUP_MIN + min(GROUP_MAX, n_users)) / 2
    n_groups = max(1, round(n_users * MEMBERSHIPS_PER_USER / mean_size))
    groups = {}
    for i in range(n_groups):
        size = rng.randint(min(GROUP_MIN, n_users), min(GROUP_MAX, n_users))
        groups[GROUP_FIRST + i] = sorted(rng.sample(users, size))
    return Model(users, groups)


def workloads(model: Model, steps: int, procs: int, workers: list) -> list[list[dict]]:
    """Per load-generator process, one group of connections per worker (None:
    any), each with its share of the steps."""
    out = []
    for lo, hi in bench_setup.split_evenly(steps, procs):
        out.append(
            [
                {"worker": w, "workload": {"kind": "evening", "n": b - a}}
                for w, (a, b) in zip(workers, bench_setup.split_evenly(hi - lo, len(workers)), strict=True)
            ]
        )
    return out


def extra_spec(model: Model, seed: int, shas: dict | None = None) -> dict:
    return {
        "generator": "evening",
        "evening": {
            "groups": [model.groups[g] for g in sorted(model.groups)],
            "group_first": GROUP_FIRST,
            "seed": seed,
            "retry_ms": RETRY_MS,
            "shas": shas,
        },
    }


def model_info(model: Model, steps: int) -> dict:
    sizes = [len(m) for m in model.groups.values()]
    return {
        **MODEL_INFO,
        "users": len(model.users),
        "user_ids": [model.users[0], model.users[-1]],
        "groups": len(sizes),
        "group_members_min_mean_max": [min(sizes), round(sum(sizes) / len(sizes), 1), max(sizes)],
        "fund_cents_per_user": model.fund_cents,
        "steps_planned": steps,
    }


# ---------------------------------------------------------------- anbao set-up


async def fund(setup: bench_setup.Setup, users: list[int], cents: int) -> None:
    """One DEPOSIT per user (its own idempotency key), DEPOSIT_IN_FLIGHT in
    flight over every setup connection."""
    clients = [c for cl in setup.clusters for c in cl.clients if c is not None]
    todo = iter(users)

    async def worker(k: int) -> None:
        client = clients[k % len(clients)]
        for u in todo:
            await client.deposit(u, cents)

    await asyncio.gather(*(worker(k) for k in range(min(DEPOSIT_IN_FLIGHT, len(users)))))


async def create_groups(setup: bench_setup.Setup, groups: dict[int, list[int]]) -> None:
    clients = [c for cl in setup.clusters for c in cl.clients if c is not None]
    todo = iter(sorted(groups.items()))

    async def worker(k: int) -> None:
        client = clients[k % len(clients)]
        for gid, members in todo:
            await client.group_create(gid, members, name=f"evening {gid}")

    await asyncio.gather(*(worker(k) for k in range(min(GROUPS_IN_FLIGHT, len(groups)))))


async def setup_anbao(setup: bench_setup.Setup, model: Model, console) -> dict:
    timings = {}
    t = time.monotonic()
    await setup.register_ids(model.users)
    timings["register_s"] = round(time.monotonic() - t, 2)
    t = time.monotonic()
    with console.status(f"deposit to {len(model.users):,} users, {DEPOSIT_IN_FLIGHT} in flight ..."):
        await fund(setup, model.users, model.fund_cents)
    timings["deposit_s"] = round(time.monotonic() - t, 2)
    t = time.monotonic()
    await create_groups(setup, model.groups)
    timings["groups_s"] = round(time.monotonic() - t, 2)
    timings["total_s"] = round(sum(timings.values()), 2)
    console.print(
        f"evening set-up: {len(model.users):,} users registered in {timings['register_s']} s,"
        f" funded in {timings['deposit_s']} s, {len(model.groups):,} groups in {timings['groups_s']} s"
    )
    return timings


# ---------------------------------------------------------------- checks


def _n(result, op: str, *statuses: str) -> int:
    by = result.counts.get(op, {})
    return sum(by.get(s, 0) for s in statuses)


def status_problems(result) -> list[str]:
    wrong = []
    for op, by_status in result.counts.items():
        for status, n in by_status.items():
            if status not in ALLOWED.get(op, set()) and status != "UNANSWERED":
                wrong.append(f"{n:,} {op} answers with status {status}")
    if result.unanswered:
        wrong.append(f"{result.unanswered:,} requests never answered")
    if not _n(result, "SEND", "OK"):
        wrong.append("no SEND answered OK")
    return wrong


def durable_problems(what: str, result, packets: int, claims: int) -> list[str]:
    """OK answers against what is durable: every OK SEND made a packet and
    every OK GRAB a claim; an answer never read (or IN_DOUBT) may have too."""
    wrong = []
    send_ok = _n(result, "SEND", "OK")
    send_unknown = _n(result, "SEND", "UNANSWERED", "IN_DOUBT")
    if not send_ok <= packets <= send_ok + send_unknown:
        wrong.append(f"{what}: {packets:,} packets durable, {send_ok:,} OK sends answered ({send_unknown:,} unknown)")
    grab_ok = _n(result, "GRAB", "OK")
    grab_unknown = _n(result, "GRAB", "UNANSWERED", "IN_DOUBT", "ALREADY_CLAIMED")
    if not grab_ok <= claims <= grab_ok + grab_unknown:
        wrong.append(f"{what}: {claims:,} claims durable, {grab_ok:,} OK grabs answered ({grab_unknown:,} unknown)")
    return wrong


PACKETS_SQL = "SELECT count(*) FROM packets WHERE sender_id BETWEEN $1 AND $2"
CLAIMS_SQL = (
    "SELECT count(*) FROM claims_all c JOIN packets p ON p.packet_id = c.packet_id WHERE p.sender_id BETWEEN $1 AND $2"
)
UNSOLD_SQL = (
    "SELECT count(*) FROM packets p WHERE p.sender_id BETWEEN $1 AND $2"
    " AND p.share_count <> (SELECT count(*) FROM claims_all c WHERE c.packet_id = p.packet_id)"
)


async def anbao_counts(dsn: str, model: Model) -> dict:
    conn = await asyncpg.connect(dsn)
    try:
        lo, hi = model.users[0], model.users[-1]
        return {
            "packets": await conn.fetchval(PACKETS_SQL, lo, hi),
            "claims": await conn.fetchval(CLAIMS_SQL, lo, hi),
            "packets_not_sold_out": await conn.fetchval(UNSOLD_SQL, lo, hi),
        }
    finally:
        await conn.close()


async def anbao_books(dsn: str, model: Model, result, before: dict, info: dict) -> list[str]:
    after = await anbao_counts(dsn, model)
    packets, claims = after["packets"] - before["packets"], after["claims"] - before["claims"]
    info["durable"] = {"packets": packets, "claims": claims, "packets_not_sold_out": after["packets_not_sold_out"]}
    wrong = durable_problems("anbao", result, packets, claims)
    plan = scenarios.Plan("evening", [], 0)
    conn = await asyncpg.connect(dsn)
    try:
        await verify.wait_for_rollup(plan, [conn])
    finally:
        await conn.close()
    info.update(plan.info)
    return wrong


# ---------------------------------------------------------------- runs


def steps_of(args) -> int:
    return args.attempts if args.attempts is not None else DEFAULT_STEPS


def finish(bench, result, info: dict, problems: list[str], setup_s: float) -> dict:
    info["steps"] = dict(result.extra)
    problems = status_problems(result) + problems
    rec = bench.record(result, info, problems, ALLOWED, setup_s)
    rec["attempts"] = result.extra.get("steps_started", 0)  # steps started (planned: info.steps_planned)
    return rec


async def run_anbao(bench, server) -> Model:
    a, console = bench.args, bench.console
    model = make_model(a.users or DEFAULT_USERS, a.seed)
    steps = steps_of(a)
    async with bench_setup.Setup(console, server.host, server.port, server.tokens["admin"], routing=a.routing) as setup:
        timings = await setup_anbao(setup, model, console)
        workers = list(range(setup.worker_count)) if setup.steer else [None]
        info = {**model_info(model, steps), **setup.routing_info(), "setup_timings_s": timings}
        before = await anbao_counts(server.dsn(), model)
        metrics, cpu_before = server.metrics(), server.cpu_s()
        result = await bench.load(
            target="anbao",
            scenario="evening",
            host=server.host,
            port=server.port,
            token=server.tokens["app"],
            workloads=workloads(model, steps, a.procs, workers),
            worker_count=setup.worker_count if setup.steer else None,
            extra_spec=extra_spec(model, a.seed),
        )
        cpu_after = server.cpu_s()
    if cpu_before and cpu_after:
        info["server_cpu_us_per_answer"] = {
            k: round((cpu_after[k] - cpu_before[k]) * 1e6 / max(1, result.answered), 2) for k in cpu_after
        }
    problems = await anbao_books(server.dsn(), model, result, before, info)
    rec = finish(bench, result, info, problems, timings["total_s"])
    rec["server_metrics"] = metrics_delta(metrics, server.metrics())
    return model


async def run_redis(bench, model: Model) -> None:
    a = bench.args
    steps = steps_of(a)
    srv = RedisServer(a.redis_server)
    try:
        t = time.monotonic()
        evening_redis.prepare(srv, model.users, model.fund_cents, model.groups)
        setup_s = round(time.monotonic() - t, 2)
        info = {
            **model_info(model, steps),
            **srv.info(),
            "setup_timings_s": {"total_s": setup_s},
            "scripts": evening_redis.SCRIPTS,
        }
        result = await bench.load(
            target="redis",
            scenario="evening",
            host=srv.host,
            port=srv.port,
            token="",
            workloads=workloads(model, steps, a.procs, [None]),
            protocol="resp",
            script_sha=evening_redis.SHAS["grab"],
            extra_spec=extra_spec(model, a.seed, evening_redis.SHAS),
        )
        summary, problems = evening_redis.books(srv, model.users, model.deposits_cents)
        info["books"] = summary
        problems += durable_problems("redis", result, summary["packets"], summary["claims"])
        p = srv.persistence()
        if p.get("aof_enabled") != "1" or p.get("aof_last_write_status") != "ok":
            problems.append(f"redis: append-only file not healthy: {p.get('aof_last_write_status')}")
    finally:
        code = srv.stop()
    if code not in (0, None):
        problems.append(f"redis-server exited with {code}")
    finish(bench, result, info, problems, setup_s)
