"""python -m bench hot|storm|soldout|spread|mixed|all|evening [options]

Starts `anbao serve` on a fresh data directory (or uses --server HOST:PORT
with --data-dir DIR; or, with --sets N, N sets on this machine through
anbao/localsets.py), prepares users and packets through the SDK, drives
load from several load-generator processes, checks that the answers match
what is durable in the database, runs `anbao audit`, runs the baselines
(redis: the same scenarios against a redis-server of its own, AOF fsync
always, with the same load generator speaking RESP), and writes
DIR/LABEL.json and DIR/LABEL.png (--out DIR, default bench/runs: untracked). Exits 1 if any run is INVALID.

`evening` (bench/evening.py) is a chat app's red-packet evening: users in
groups, each step one packet's life (SEND, GRABs, PACKET, BALANCE), with
--baseline redis doing the same business in Lua; not part of `all`.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
from rich.console import Console

from . import baselines, evening, redis_baseline, report, scenarios
from .runner import run_load
from .server import AnbaoServer, SetsServer, is_loopback, metrics_delta

DEFAULTS = {
    "connections": 200,
    "evening_connections": 32,
    "depth": 4,
    "procs": 2,
    "duration_s": 300.0,
    "shares": 10_000,
    "packets": 100_000,
    "packet_shares": 10,
    "hot_packets": 10,
}
BASELINES = ("redis", "naive", "echo")
QUIET_BUSY = 0.15
CREDIT_DRAIN_TIMEOUT_S = 300.0
SETS_SCENARIOS = ("hot", "storm")  # what --sets N > 1 runs
MAX_SETS = 8  # anbao/localsets.py's limit


# A run's files go here unless --out says otherwise: untracked (.gitignore),
# so a user's run never overwrites the committed results in bench/results.
RUNS_DIR = Path(__file__).resolve().parent / "runs"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="wrk/wrk2-style load on anbao's binary protocol, with baselines; see BENCHMARKS.md",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_load_arguments(p)
    _add_run_arguments(p)
    _add_output_and_server_arguments(p)
    args = p.parse_args(argv)
    _check_args(p, args)
    return args


def _add_load_arguments(p: argparse.ArgumentParser) -> None:
    """The scenario, its sizes and the load: connections, depth, rate, time."""
    p.add_argument("scenario", choices=[*scenarios.SCENARIOS, "all", "evening"])
    p.add_argument(
        "--connections",
        type=int,
        default=None,
        help=f"TCP connections in total, split between the load-generator processes (default"
        f" {DEFAULTS['connections']}, evening {DEFAULTS['evening_connections']})",
    )
    p.add_argument(
        "--depth",
        type=int,
        default=DEFAULTS["depth"],
        help="requests in flight per connection (closed loop); the cap per connection in open loop",
    )
    p.add_argument(
        "--attempts",
        type=int,
        default=None,
        help="requests per scenario; when unset: storm 100,000, soldout 200,000,"
        " spread packets x packet-shares, mixed 100,000, hot every share (hot never takes more);"
        " evening: steps (packets' lives), unbounded but for --duration-s when unset",
    )
    p.add_argument(
        "--shares",
        type=int,
        default=DEFAULTS["shares"],
        help="shares of the storm/soldout packet and of each hot packet",
    )
    p.add_argument(
        "--hot-packets", type=int, default=DEFAULTS["hot_packets"], help="packets in hot, each of --shares shares"
    )
    p.add_argument("--packets", type=int, default=DEFAULTS["packets"], help="packets in spread")
    p.add_argument("--packet-shares", type=int, default=DEFAULTS["packet_shares"], help="shares per packet in spread")
    p.add_argument(
        "--users",
        type=int,
        default=None,
        help="grabbers to register; when unset: one per storm attempt, at least 100,000 when needed;"
        f" evening: its users (default {evening.DEFAULT_USERS:,}, at least {evening.GROUP_MIN})",
    )
    p.add_argument(
        "--rate",
        type=float,
        default=None,
        help="open loop (wrk2): requests per second in total, on a timetable; omit for closed loop",
    )
    p.add_argument(
        "--duration-s",
        type=float,
        default=DEFAULTS["duration_s"],
        help="time cap of each load run; it stops by itself at this or when its attempts are done",
    )
    p.add_argument(
        "--routing",
        choices=["steered", "any"],
        default="steered",
        help="steered: like the SDK's Cluster, each connection is steered to a worker by its source"
        " port and every grab goes to its packet's owner; any: plain connections, the kernel"
        " spreads them and the server relays grabs to the owner",
    )


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    """Load-generator processes and the baselines beside anbao."""
    p.add_argument("--procs", type=int, default=DEFAULTS["procs"], help="load-generator processes")
    p.add_argument(
        "--baseline",
        default="",
        help="comma list of baselines to run in the same run: redis (each scenario it has a shape"
        " for: hot, storm, soldout, spread), naive and echo (storm-shaped)",
    )
    p.add_argument(
        "--redis-server",
        default="redis-server",
        metavar="PATH",
        help="the redis-server binary of the redis baseline (Debian's; `make redis` installs it)",
    )
    p.add_argument(
        "--settle-s",
        type=float,
        default=10.0,
        help=f"before each load, wait up to this long for the machine to be under {QUIET_BUSY * 100:.0f}%%"
        " busy (what the previous run left behind: checkpoints, roll-ups); 0: do not wait",
    )
    p.add_argument(
        "--naive-pool",
        type=int,
        default=baselines.NAIVE_POOL_DEFAULT,
        help="PostgreSQL connections of the naive baseline server",
    )
    p.add_argument("--echo-procs", type=int, default=1, help="processes of the echo baseline, on one SO_REUSEPORT port")
    p.add_argument(
        "--out",
        type=Path,
        default=RUNS_DIR,
        help="directory for LABEL.json and LABEL.png (default bench/runs, untracked; the figures"
        " BENCHMARKS.md cites are written to bench/results only on purpose: --out bench/results)",
    )


def _add_output_and_server_arguments(p: argparse.ArgumentParser) -> None:
    """Where the results go, the server under test and its data."""
    p.add_argument("--label", default=None, help="file name stem for the JSON and PNG (default: the scenario)")
    p.add_argument(
        "--server",
        default=None,
        metavar="HOST:PORT",
        help="use this running anbao server (loopback only) instead of starting one; needs --data-dir",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="the server's data directory (tokens.json, embedded PostgreSQL);"
        " without --server, start the server on it instead of a fresh temporary one",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="passed to `anbao serve --workers` when given; with --sets, per set (default: CPUs / sets, at least 1)",
    )
    p.add_argument(
        "--sets",
        type=int,
        default=1,
        help=f"1: one `anbao serve`; 2..{MAX_SETS}: that many sets on this machine (anbao/localsets.py: an"
        " embedded PostgreSQL with wal_level = logical and `anbao serve --topology` each), grabbers and"
        f" senders homed in every set, each grab sent to its packet's set; {' and '.join(SETS_SCENARIOS)} only",
    )
    p.add_argument(
        "--limit",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="passed to `anbao serve --limit` (a config.Limits override), repeatable",
    )
    p.add_argument(
        "--anbao-src",
        type=Path,
        default=None,
        help="run `anbao serve`/`anbao audit` from this source tree (extension built in place,"
        " e.g. a `git archive` of another commit) instead of the installed anbao",
    )
    p.add_argument("--keep-data", action="store_true", help="keep the temporary data directory")
    p.add_argument(
        "--follow-events",
        action="store_true",
        help="run a consumer process following the event feed (EVENTS long polls) during each anbao load,"
        " and record how far behind it was when the load ended",
    )
    p.add_argument("--seed", type=int, default=1, help="seed of the random orders (spread, mixed)")


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuses what argparse cannot, by p.error (exit 2)."""
    args.baselines = [b.strip() for b in args.baseline.split(",") if b.strip() and b.strip() != "none"]
    for b in args.baselines:
        if b not in BASELINES:
            p.error(f"unknown baseline {b!r} ({', '.join(BASELINES)})")
    if "redis" in args.baselines and shutil.which(args.redis_server) is None:
        p.error(f"--baseline redis needs {args.redis_server!r}: not found (`make redis` installs Debian's)")
    _evening_args(p, args)
    if args.hot_packets < 1 or args.shares < 1:
        p.error("--hot-packets and --shares must be positive")
    if args.settle_s < 0:
        p.error("--settle-s must be 0 or more")
    if args.procs < 1 or args.connections < args.procs:
        p.error("need --procs >= 1 and at least one connection per process")
    if not 1 <= args.depth <= 1024:
        p.error("--depth must be 1..1024 (the server pauses a connection past 1024 in flight)")
    if args.duration_s <= 0 or (args.rate is not None and args.rate <= 0):
        p.error("--duration-s and --rate must be positive")
    if args.attempts is not None and args.attempts < 1:
        p.error("--attempts must be positive")
    if not 1 <= args.sets <= MAX_SETS:
        p.error(f"--sets must be 1..{MAX_SETS}")
    if args.sets > 1:
        if args.scenario not in SETS_SCENARIOS:
            p.error(f"--sets {args.sets} runs {', '.join(SETS_SCENARIOS)} only")
        for flag, given in (
            ("--server", args.server),
            ("--data-dir", args.data_dir),
            ("--anbao-src", args.anbao_src),
            ("--follow-events", args.follow_events),
            ("--baseline naive", "naive" in args.baselines),
        ):
            if given:
                p.error(f"--sets {args.sets} does not go with {flag}")
    if args.workers is not None and args.workers < 1:
        p.error("--workers must be positive")
    if args.server:
        host, _, port = args.server.rpartition(":")
        if not host or not port.isdigit():
            p.error("--server takes HOST:PORT")
        if not is_loopback(host):
            p.error(f"load goes to loopback addresses only (127.0.0.1), not {host}")
        if args.data_dir is None:
            p.error("--server needs --data-dir (its tokens.json and database, for the audit)")
        args.server_host, args.server_port = host, int(port)


def _evening_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.connections is None:
        args.connections = DEFAULTS["evening_connections" if args.scenario == "evening" else "connections"]
    if args.scenario != "evening":
        return
    if set(args.baselines) - {"redis"}:
        p.error("evening has a redis baseline only")
    if args.users is not None and args.users < evening.GROUP_MIN:
        p.error(f"evening needs --users >= {evening.GROUP_MIN} (the smallest group)")


async def _pg_info(dsn: str) -> dict:
    conn = await asyncpg.connect(dsn)
    try:
        info = {"version": await conn.fetchval("SELECT version()")}
        for name in ("fsync", "synchronous_commit", "shared_buffers", "max_connections", "wal_level"):
            info[name] = await conn.fetchval(f"SELECT current_setting('{name}')")
        return info
    finally:
        await conn.close()


class EventFollower:
    """A consumer process reading the event feed during the load (bench/follower.py)."""

    def __init__(self, proc: subprocess.Popen, status: Path, after: int):
        self.proc, self.status, self.after = proc, status, after

    @classmethod
    async def start(cls, server: AnbaoServer, dsn: str) -> EventFollower:
        conn = await asyncpg.connect(dsn)
        try:
            after = await conn.fetchval("SELECT numbered_through FROM event_feed")
        finally:
            await conn.close()
        status = Path(tempfile.mkdtemp(prefix="anbao-follower-")) / "status.json"
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.follower",
                server.host,
                str(server.port),
                server.tokens["app"],
                str(after),
                str(status),
            ],
        )
        for _ in range(100):  # bounded: 5 s to connect
            if status.exists():
                break
            await asyncio.sleep(0.05)
        return cls(proc, status, after)

    def _state(self) -> dict:
        try:
            return json.loads(self.status.read_text())
        except (OSError, ValueError):
            return {"events": 0, "last": self.after}

    async def finish(self, dsn: str, timeout_s: float = 60) -> dict:
        """Right after the load: how far behind the feed the follower was,
        and how long it took to reach every event numbered by then."""
        t0 = time.monotonic()
        conn = await asyncpg.connect(dsn)
        try:
            at_end = self._state()
            head = 0
            while time.monotonic() - t0 < timeout_s:
                if not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM event_log WHERE last_no IS NULL)"):
                    head = await conn.fetchval("SELECT numbered_through FROM event_feed")
                    if self._state()["last"] >= head:
                        break
                await asyncio.sleep(0.02)
        finally:
            await conn.close()
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        done = self._state()
        return {
            "events_read": done["events"],
            "events_behind_at_load_end": max(0, head - at_end["last"]),
            "caught_up_s": round(time.monotonic() - t0, 3),
            "caught_up": done["last"] >= head > 0,
        }


class Bench:
    def __init__(self, args: argparse.Namespace, console: Console):
        self.args = args
        self.console = console
        self.loop = asyncio.get_running_loop()
        self.runs: list[dict] = []
        self.sizes = scenarios.Sizes(
            attempts=args.attempts,
            shares=args.shares,
            packets=args.packets,
            packet_shares=args.packet_shares,
            users=args.users,
            hot_packets=args.hot_packets,
        )
        self.users = 0  # grabbers registered on anbao (the baselines reuse the ids)
        self.busy_before: float | None = None

    async def load(self, **kw):
        a = self.args
        self.busy_before = await self.loop.run_in_executor(None, self.settle)
        call = functools.partial(
            run_load, self.console, connections=a.connections, depth=a.depth, rate=a.rate, duration_s=a.duration_s, **kw
        )
        return await self.loop.run_in_executor(None, call)

    def settle(self) -> float | None:
        """Waits (up to --settle-s) for the machine to go quiet; returns how
        busy it was in the last half second before the load."""
        deadline = time.monotonic() + self.args.settle_s
        while True:
            busy = report.cpu_busy(0.5)
            if busy is None or busy < QUIET_BUSY or time.monotonic() >= deadline:
                return busy

    def record(self, result, info: dict, problems: list[str], allowed: dict, setup_s: float) -> dict:
        rec = report.run_record(result, info, problems, allowed, setup_s)
        rec["cpu_busy_before_load"] = self.busy_before
        self.runs.append(rec)
        self._line(rec)
        if self.busy_before is not None and self.busy_before >= QUIET_BUSY:
            self.console.print(
                f"  [yellow]warning: the machine was {self.busy_before:.0%} busy just before this"
                f" load (--settle-s {self.args.settle_s:g} ran out); other load disturbs it[/]"
            )
        return rec

    async def anbao(self, server: AnbaoServer | SetsServer, names: list[str]) -> None:
        a, console = self.args, self.console
        sets = isinstance(server, SetsServer)
        if sets:
            dsns = list(server.dsns.values())
            setup_cm = scenarios.SetsSetup(
                console, server.topology(), server.dsns, server.tokens["admin"], routing=a.routing
            )
            port = min(server.ports.values())  # every load group names its set's port
        else:
            dsns = [server.dsn()]
            setup_cm = scenarios.Setup(console, server.host, server.port, server.tokens["admin"], routing=a.routing)
            port = server.port
        async with setup_cm as setup:
            if not setup.setup_steering_ok:
                console.print(
                    "[yellow]warning: connections do not reach the worker their source port asks for;"
                    " the server relays, so results are right but slower[/]"
                )
            t = time.monotonic()
            users = self.users = scenarios.grabbers_needed(self.sizes, names)
            await scenarios.register_grabbers(setup, users)
            console.print(f"registered {users:,} grabbers in {time.monotonic() - t:.1f} s")
            for name in names:
                plan = await scenarios.prepare(name, setup, self.sizes, a.procs, a.seed)
                console.print(f"[bold]{name}[/]: set up in {plan.setup_s:.1f} s; {plan.attempts:,} attempts")
                await scenarios.snapshot(plan, dsns[0])
                before = server.metrics()
                follower = await EventFollower.start(server, dsns[0]) if a.follow_events and not sets else None
                cpu_before = server.cpu_s()
                result = await self.load(
                    target="anbao",
                    scenario=name,
                    host=server.host,
                    port=port,
                    token=server.tokens["app"],
                    workloads=plan.workloads,
                    worker_count=setup.worker_count if setup.steer else None,
                )
                cpu_after = server.cpu_s()
                if cpu_before and cpu_after:
                    # Per answer: what each part of the server spent during the load
                    # (the roll-up that drains after it is not included); with sets,
                    # each set's own parts per that set's answers.
                    of_set = {f"set{s}_": x["answered"] for s, x in result.by_set.items()}
                    plan.info["server_cpu_us_per_answer"] = {
                        k: round(
                            (cpu_after[k] - cpu_before[k])
                            * 1e6
                            / max(1, next((n for pre, n in of_set.items() if k.startswith(pre)), result.answered)),
                            2,
                        )
                        for k in cpu_after
                    }
                if follower is not None:
                    plan.info["event_follower"] = await follower.finish(dsns[0])
                    console.print(f"  event follower: {plan.info['event_follower']}")
                problems = await scenarios.verify(plan, result, dsns)
                if sets:
                    plan.info["credit_lag_ms"], why = await credit_lag(server.dsns, plan.packets)
                    problems += why
                rec = self.record(result, plan.info, problems, plan.allowed, plan.setup_s)
                rec["server_metrics"] = metrics_delta(before, server.metrics())

    async def redis(self, names: list[str]) -> None:
        """Each scenario Redis has a shape for, on a redis-server of its own
        (fresh, AOF fsync always), driven by the same load generator."""
        a, console = self.args, self.console
        for name in names:
            if name not in scenarios.BASELINE_SCENARIOS:
                console.print(f"  redis {name}: no Redis shape for this scenario, skipped")
                continue
            plan = scenarios.baseline_plan(
                name, self.sizes, a.procs, a.seed, self.users or scenarios.grabbers_needed(self.sizes, names)
            )
            t = time.monotonic()
            srv = redis_baseline.RedisServer(a.redis_server)
            try:
                totals = redis_baseline.prepare(
                    srv, plan.packet_shares, scenarios.CENTS_PER_SHARE, a.seed, plan.presold
                )
                setup_s = round(time.monotonic() - t, 2)
                info = {
                    **plan.info,
                    **srv.info(),
                    "redis_pid": srv.pid,
                    "redis_dir": str(srv.dir),
                    "script": redis_baseline.GRAB_SCRIPT,
                    "script_sha": redis_baseline.GRAB_SHA,
                    "cents_handed_out_in_ok_answers": None,
                }
                result = await self.load(
                    target="redis",
                    scenario=name,
                    host=srv.host,
                    port=srv.port,
                    token="",
                    workloads=plan.workloads,
                    protocol="resp",
                    script_sha=redis_baseline.GRAB_SHA,
                )
                problems = await scenarios.verify(plan, result, None)
                problems += redis_baseline.verify(
                    srv,
                    totals,
                    plan.packet_shares,
                    result.ok,
                    result.ok_amount,
                    result.unanswered,
                    result.capped,
                    plan.presold,
                )
                info["cents_handed_out_in_ok_answers"] = result.ok_amount
            finally:
                code = srv.stop()
            if code not in (0, None):
                problems.append(f"redis-server exited with {code}")
            self.record(result, info, problems, plan.allowed, setup_s)

    async def naive(self, server: AnbaoServer) -> None:
        a = self.args
        n, shares = self.sizes.attempts_for("storm"), self.sizes.shares
        total = shares * scenarios.CENTS_PER_SHARE
        dsn = server.dsn(baselines.NAIVE_DATABASE)
        t = time.monotonic()
        await baselines.naive_prepare(server.dsn("postgres"), dsn, n, shares, total)
        setup_s = round(time.monotonic() - t, 2)
        work = [
            [
                {
                    "worker": None,
                    "workload": {
                        "kind": "grab_range",
                        "packet_id": baselines.NAIVE_PACKET_ID,
                        "user_first": 1,
                        "user_mod": n,
                        "lo": lo,
                        "hi": hi,
                    },
                }
            ]
            for lo, hi in scenarios.split_evenly(n, a.procs)
        ]
        srv = baselines.BaselineServer("naive", dsn=dsn, pool_size=a.naive_pool)
        try:
            result = await self.load(
                target="naive", scenario="storm", host=srv.host, port=srv.port, token="naive", workloads=work
            )
        finally:
            srv.stop()
        capped = result.capped
        problems = []
        if not capped and (result.unanswered or result.answered != n):
            problems.append(f"{n - result.answered:,} of {n:,} requests never answered")
        if not capped and result.ok != min(n, shares):
            problems.append(f"{result.ok:,} OK grabs, expected exactly {min(n, shares):,}")
        allowed = {"GRAB": {"OK", "SOLD_OUT"}}
        for status, k in result.counts.get("GRAB", {}).items():
            if status not in allowed["GRAB"] and not (capped and status == "UNANSWERED"):
                problems.append(f"{k:,} GRAB answers with status {status}")
        problems += await baselines.naive_verify(dsn, result.ok, result.unanswered if capped else 0, shares, total)
        await baselines.naive_drop(server.dsn("postgres"))  # leave a reused server as we found it
        self.record(
            result,
            {
                "database": baselines.NAIVE_DATABASE,
                "pool_size": a.naive_pool,
                "shares": shares,
                "total_cents": total,
                "distinct_users": n,
                "transaction": "SELECT ... FOR UPDATE on the packet row, check,"
                " insert claim + transfer, credit wallet, update packet, COMMIT",
            },
            problems,
            allowed,
            setup_s,
        )

    async def echo(self) -> None:
        a = self.args
        n = self.sizes.attempts_for("storm")
        work = [
            [
                {
                    "worker": None,
                    "workload": {
                        "kind": "grab_range",
                        "packet_id": 1,
                        "user_first": 1,
                        "user_mod": n,
                        "lo": lo,
                        "hi": hi,
                    },
                }
            ]
            for lo, hi in scenarios.split_evenly(n, a.procs)
        ]
        srv = baselines.BaselineServer("echo", processes=a.echo_procs)
        try:
            result = await self.load(
                target="echo", scenario="storm", host=srv.host, port=srv.port, token="echo", workloads=work
            )
        finally:
            srv.stop()
        problems = []
        if not result.capped and (result.answered != n or result.ok != n):
            problems.append(f"echo answered {result.answered:,} of {n:,} ({result.ok:,} OK)")
        self.record(
            result,
            {"server": "uvloop + anbao.core.codec frame codec, no work", "processes": a.echo_procs},
            problems,
            {"GRAB": {"OK"}},
            0.0,
        )

    def _line(self, r: dict) -> None:
        lat = r["latency_ms"]
        verdict = {"valid": "[green]valid[/]", "CAPPED": "[yellow]CAPPED[/] (hit --duration-s; partial)"}.get(
            r["verdict"], "[bold red]INVALID[/] " + "; ".join(r["problems"])
        )
        self.console.print(
            f"  {r['name']}: {r['answered']:,} answers in {r['wall_s']:.2f} s,"
            f" {r['ok']:,} OK ({r['ok_per_s']:,.0f} durable OK/s),"
            f" {r['answers_per_s']:,.0f} answers/s, p50 {lat['p50']} ms,"
            f" p99 {lat['p99']} ms, p99.9 {lat['p99.9']} ms  {verdict}"
        )


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


def _audit_failure(audit: dict) -> str:
    if audit.get("violations"):
        return "anbao audit found a money-invariant violation: " + ", ".join(audit["violations"])
    lines = str(audit.get("error") or "").strip().splitlines()
    return f"anbao audit could not check the ledger (exit {audit.get('exit_code')})" + (
        f": {lines[-1][:200]}" if lines else ""
    )


async def orchestrate(args: argparse.Namespace, console: Console) -> dict:
    names = list(scenarios.SCENARIOS) if args.scenario == "all" else [args.scenario]  # evening: bench/evening.py
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    git_at_start = report.git_state()
    bench = Bench(args, console)
    loadavg = [round(x, 2) for x in os.getloadavg()]
    busy = report.cpu_busy(1.0)
    if busy is not None and busy > 0.15:
        console.print(
            f"[yellow]warning: the machine was {busy:.0%} busy before the bench started;"
            f" other load disturbs every figure[/]"
        )
    server = await _start_server(args, console)
    audit, pg = await _run(args, console, bench, server, names)
    started = {"at": started_at, "busy": busy, "loadavg": loadavg, "git": git_at_start}
    return _document(args, bench, server, audit, pg, started)


async def _start_server(args: argparse.Namespace, console: Console) -> AnbaoServer | SetsServer:
    """The server under test: sets of our own, a running one, or one of our own."""
    server: AnbaoServer | SetsServer
    if args.sets > 1:
        workers = args.workers or max(1, (os.cpu_count() or 1) // args.sets)
        with console.status(f"starting {args.sets} sets (embedded PostgreSQL, logical replication) ..."):
            server = await asyncio.get_running_loop().run_in_executor(
                None,
                functools.partial(
                    SetsServer.start, args.sets, workers, [a for lim in args.limit for a in ("--limit", lim)]
                ),
            )
        console.print(f"started: {server.banner}  (data in {server.local.root})")
    elif args.server:
        server = AnbaoServer.attach(args.server_host, args.server_port, args.data_dir, src=args.anbao_src)
        console.print(f"using the running server at {server.host}:{server.port}")
    else:
        with console.status("starting anbao serve (embedded PostgreSQL) ..."):
            server = AnbaoServer.start(
                args.data_dir,
                workers=args.workers,
                src=args.anbao_src,
                extra=[a for lim in args.limit for a in ("--limit", lim)],
            )
        console.print(f"started: {server.banner}  (data in {server.data_dir})")
    return server


async def _run(
    args: argparse.Namespace, console: Console, bench: Bench, server, names: list[str]
) -> tuple[dict | None, dict | None]:
    """Every run on anbao, its audit, then the baselines; stops what it started. Returns (audit, pg)."""
    audit = None
    pg = None
    try:
        if isinstance(server, SetsServer):
            pg = {f"set {s}": await _pg_info(dsn) for s, dsn in sorted(server.dsns.items())}
        else:
            pg = await _pg_info(server.dsn())
        model = (
            await evening.run_anbao(bench, server) if args.scenario == "evening" else await bench.anbao(server, names)
        )
        with console.status("anbao audit ..."):
            audit = await server.audit() if isinstance(server, SetsServer) else server.audit()
        if not audit["ok"]:
            why = _audit_failure(audit)
            for r in bench.runs:
                r["problems"].append(why)
                r["valid"] = False
                r["verdict"] = "INVALID"
        if "redis" in args.baselines:
            await (evening.run_redis(bench, model) if model else bench.redis(names))
        if "naive" in args.baselines:
            await bench.naive(server)
        if "echo" in args.baselines:
            await bench.echo()
    finally:
        if server.owned:
            with console.status("stopping anbao serve ..."):
                code = server.stop()
            if code not in (0, None):
                console.print(f"[yellow]anbao serve exited with {code}; log in {server.log_path}[/]")
            if not args.keep_data and args.data_dir is None:
                server.remove_data()
            elif isinstance(server, SetsServer):
                console.print(f"kept the sets' data in {server.local.root}")
    return audit, pg


def _document(args: argparse.Namespace, bench: Bench, server, audit, pg, started: dict) -> dict:
    """The run's JSON document: settings, environment, definitions, the runs and their ratios."""
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings["command"] = "python -m bench " + " ".join(sys.argv[1:])
    doc = {
        "benchmark": "anbao bench",
        "started_at": started["at"],
        "sets": args.sets,
        "settings": settings,
        "environment": {
            **report.environment(server.banner or f"attached to {server.host}:{server.port}", pg),
            "cpu_busy_before_start": started["busy"],
            "loadavg_before_start": started["loadavg"],
            "git_at_start": started["git"],
            "anbao_source": str(args.anbao_src) if args.anbao_src else "installed (this repository)",
        },
        "definitions": {
            "durable OK/s": "OK answers / seconds from the first request sent to the last OK answer;"
            " anbao and naive answer OK only after the claim is committed, redis after the"
            " append-only file is fsynced (appendfsync always)",
            "answers/s": "all answers / seconds from the first request sent to the last answer",
            "rejects/s": "SOLD_OUT, ALREADY_CLAIMED, EXPIRED, NOT_ELIGIBLE answers / the same wall time",
            "latency": "closed loop: from the moment each request was written; open loop: from its scheduled"
            " send time (coordinated omission corrected)",
            **(
                {
                    "by_set": "each set's OK answers / seconds from the first request sent (to any set) to its"
                    " last OK answer",
                    "credit_lag_ms": "per cross-set credit: total = claim commit -> applied_at at the home set;"
                    " before_sent = claim commit -> the credit's sending at the packet's set (0 for a credit batch,"
                    " written by the grab's commit; else the roll-up that wrote it);"
                    " replication_and_apply = created_at -> applied_at",
                    "server_cpu_us_per_answer": "CPU of every set's workers and PostgreSQL (walsenders and apply"
                    " workers included) during the load / all answers; setN_*: that set's / its answers",
                }
                if args.sets > 1
                else {}
            ),
        },
        "audit": audit,
        "runs": bench.runs,
        "ratios": report.ratios(bench.runs),
        "headline": report.headline(bench.runs),
    }
    doc["valid"] = bool(bench.runs) and all(r["valid"] for r in bench.runs) and bool(audit and audit["ok"])
    return doc


def main(argv: list[str] | None = None) -> int:
    import uvloop

    args = parse_args(argv)
    if args.anbao_src is not None:
        # The baselines' codec and the embedded-PostgreSQL helper come from the same tree.
        args.anbao_src = args.anbao_src.resolve()
        sys.path.insert(0, str(args.anbao_src))
        if (args.anbao_src / "client" / "anbao_client").is_dir():  # and the SDK the load generators use
            sys.path.insert(0, str(args.anbao_src / "client"))
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # a log file gets the whole table
    doc = uvloop.run(orchestrate(args, console))
    args.out.mkdir(parents=True, exist_ok=True)
    label = args.label or args.scenario
    json_path, png_path = args.out / f"{label}.json", args.out / f"{label}.png"
    report.print_report(console, doc)
    doc["files"] = {"json": str(json_path), "png": str(png_path)}
    report.write_json(json_path, doc)
    mode = "closed loop" if args.rate is None else f"open loop, {args.rate:,.0f} requests/s"
    report.write_plot(png_path, doc["runs"], f"latency by percentile: {label}, {mode}")
    console.print(f"wrote {json_path} and {png_path}")
    return 0 if doc["valid"] else 1


if __name__ == "__main__":
    sys.exit(main())
