"""One `python -m bench` run: the server under test, every run on anbao and
its audit, the baselines, and the run's JSON document."""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
from rich.console import Console

from . import baselines, evening, redis_baseline, report, scenarios, verify
from . import setup as bench_setup
from .args import QUIET_BUSY
from .credit_lag import credit_lag
from .follow_events import EventFollower
from .runner import run_load
from .server import AnbaoServer, SetsServer, metrics_delta


async def _pg_info(dsn: str) -> dict:
    conn = await asyncpg.connect(dsn)
    try:
        info = {"version": await conn.fetchval("SELECT version()")}
        for name in ("fsync", "synchronous_commit", "shared_buffers", "max_connections", "wal_level"):
            info[name] = await conn.fetchval(f"SELECT current_setting('{name}')")
        return info
    finally:
        await conn.close()


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
            setup_cm = bench_setup.SetsSetup(
                console, server.topology(), server.dsns, server.tokens["admin"], routing=a.routing
            )
            port = min(server.ports.values())  # every load group names its set's port
        else:
            dsns = [server.dsn()]
            setup_cm = bench_setup.Setup(console, server.host, server.port, server.tokens["admin"], routing=a.routing)
            port = server.port
        async with setup_cm as setup:
            if not setup.setup_steering_ok:
                console.print(
                    "[yellow]warning: connections do not reach the worker their source port asks for;"
                    " the server relays, so results are right but slower[/]"
                )
            t = time.monotonic()
            users = self.users = scenarios.grabbers_needed(self.sizes, names)
            await bench_setup.register_grabbers(setup, users)
            console.print(f"registered {users:,} grabbers in {time.monotonic() - t:.1f} s")
            for name in names:
                plan = await scenarios.prepare(name, setup, self.sizes, a.procs, a.seed)
                console.print(f"[bold]{name}[/]: set up in {plan.setup_s:.1f} s; {plan.attempts:,} attempts")
                await verify.snapshot(plan, dsns[0])
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
                problems = await verify.verify(plan, result, dsns)
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
                    srv, plan.packet_shares, bench_setup.CENTS_PER_SHARE, a.seed, plan.presold
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
                problems = await verify.verify(plan, result, None)
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
        total = shares * bench_setup.CENTS_PER_SHARE
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
            for lo, hi in bench_setup.split_evenly(n, a.procs)
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
            for lo, hi in bench_setup.split_evenly(n, a.procs)
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
