"""Runs one load: spawns the load-generator processes, releases them
together once every connection is open and authenticated, shows a progress
bar, and merges what they send back into one LoadResult."""

from __future__ import annotations

import multiprocessing as mp
import queue
import time
from dataclasses import dataclass, field

from hdrh.histogram import HdrHistogram
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from anbao_client.wire import Op, Status

from . import loadgen

READY_TIMEOUT_S = 120.0
EXTRA_WAIT_S = 60.0  # beyond duration + grace, before the parent gives up on a child


def progress_bar(console: Console, transient: bool = True) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
        transient=transient,
    )


def status_name(status: int) -> str:
    if status == loadgen.UNANSWERED:
        return "UNANSWERED"
    if status == loadgen.BAD_REPLY:
        return "BAD_REPLY"
    try:
        return Status(status).name
    except ValueError:
        return f"STATUS_{status}"


def op_name(op: int) -> str:
    try:
        return Op(op).name
    except ValueError:
        return f"OP_{op:#x}"


@dataclass
class LoadResult:
    target: str  # anbao, redis, naive, echo
    scenario: str
    mode: str  # closed / open
    connections: int
    depth: int
    rate: float | None
    procs: int
    duration_cap_s: float
    planned: int = 0
    sent: int = 0
    answered: int = 0
    ok: int = 0
    ok_amount: int = 0  # redis: cents handed out in the OK answers
    unanswered: int = 0
    capped: bool = False
    wall_s: float = 0.0  # first send to last answer
    ok_span_s: float = 0.0  # first send to last OK answer
    counts: dict = field(default_factory=dict)  # {op: {status: n}}
    hist: HdrHistogram = field(default_factory=loadgen.new_histogram, repr=False)
    hist_ok: HdrHistogram = field(default_factory=loadgen.new_histogram, repr=False)
    hist_op: dict = field(default_factory=dict, repr=False)
    steered_connections: int = 0
    misrouted_connections: int = 0
    loadgen_cpu_s: list = field(default_factory=list)
    max_sched_lag_ms: float = 0.0  # open loop: the worst late wake-up of a load generator
    errors: list = field(default_factory=list)
    by_set: dict = field(default_factory=dict)  # sets: {set: {ok, answered, ok_span_s, wall_s}} from the same t0
    extra: dict = field(default_factory=dict)  # a generator's own counters (the evening's steps), summed

    def status_total(self, name: str) -> int:
        return sum(by_status.get(name, 0) for by_status in self.counts.values())


def split_connections(total: int, weights: list[int]) -> list[int]:
    """total connections over groups in proportion to their work, each at least one."""
    whole = sum(weights)
    out = [max(1, total * w // whole) for w in weights]
    i = 0
    while sum(out) < total:
        out[i % len(out)] += 1
        i += 1
    return out


def run_load(
    console: Console,
    *,
    target: str,
    scenario: str,
    host: str,
    port: int,
    token: str,
    workloads: list[list[dict]],
    connections: int,
    depth: int,
    rate: float | None,
    duration_s: float,
    worker_count: int | None = None,
    grace_s: float = 10.0,
    protocol: str = "anbao",
    script_sha: str | None = None,
    extra_spec: dict | None = None,
) -> LoadResult:
    """workloads: per load-generator process, its groups, each
    {"worker": owning worker or None, "workload": description}, and with
    sets {"port": its set's port, "set": its set} (counted per set too).
    connections and rate are totals, split between processes and groups.
    protocol: "anbao" (binary frames) or "resp" (Redis, EVALSHA script_sha).
    extra_spec: more keys for every process's spec (the evening: its
    "generator" and "evening" model)."""
    procs = len(workloads)
    assert procs >= 1 and connections >= procs, "need at least one connection per load-generator process"
    ctx = mp.get_context("spawn")
    ready_q, result_q = ctx.Queue(), ctx.Queue()
    go = ctx.Event()
    progress = ctx.Array("q", 2 * procs, lock=False)
    shared = {
        "host": host,
        "port": port,
        "token": token,
        "depth": depth,
        "duration_s": duration_s,
        "grace_s": grace_s,
        "worker_count": worker_count,
        "protocol": protocol,
        "script_sha": script_sha,
        **(extra_spec or {}),
    }
    children, planned = _start_generators(ctx, workloads, connections, rate, shared, (ready_q, go, progress, result_q))
    mode = "open" if rate else "closed"
    result = LoadResult(target, scenario, mode, connections, depth, rate, len(children), duration_s, planned=planned)
    what = f"{target} {scenario}"
    try:
        _await_ready(what, ready_q, children)
        with progress_bar(console) as bar:
            task = bar.add_task(what, total=planned, info="")
            go.set()
            raw = _collect(what, result_q, children, progress, duration_s + grace_s + EXTRA_WAIT_S, bar, task)
    finally:
        go.set()
        for p in children:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
    _merge(result, [raw[s] for s in sorted(raw)])
    return result


def _start_generators(ctx, workloads, connections, rate, shared: dict, channels) -> tuple[list, int]:
    """One process per workload slot with its share of the connections and
    of the rate; returns (the processes, the attempts they plan)."""
    procs = len(workloads)
    planned = 0
    children: list = []
    everything = sum(loadgen._planned(g["workload"]) for groups in workloads for g in groups) or 1
    for slot, groups in enumerate(workloads):
        conns = connections // procs + (1 if slot < connections % procs else 0)
        groups = [g for g in groups if loadgen._planned(g["workload"]) > 0]
        weights = [loadgen._planned(g["workload"]) for g in groups]
        planned += sum(weights)
        if not groups:
            continue
        split = split_connections(conns, weights)
        spec = {
            **shared,
            "rate": (rate * sum(weights) / everything) if rate else None,
            "groups": [
                {**{k: g.get(k) for k in ("worker", "port", "set")}, "connections": n, "workload": g["workload"]}
                for g, n in zip(groups, split, strict=True)
            ],
        }
        ready_q, go, progress, result_q = channels
        p = ctx.Process(
            target=loadgen.process_main,
            args=(spec, len(children), ready_q, go, progress, result_q),
            name=f"bench-loadgen-{slot}",
            daemon=True,
        )
        p.start()
        children.append(p)
    return children, planned


def _await_ready(what: str, ready_q, children: list) -> None:
    ready = 0
    deadline = time.monotonic() + READY_TIMEOUT_S
    while ready < len(children):
        try:
            kind, slot, payload = ready_q.get(timeout=0.5)
        except queue.Empty:
            if time.monotonic() > deadline or any(p.exitcode not in (None, 0) for p in children):
                raise RuntimeError(f"{what}: load generators did not get ready") from None
            continue
        if kind == "error":
            raise RuntimeError(f"{what}: load generator {slot} failed:\n{payload}")
        ready += 1


def _collect(what: str, result_q, children: list, progress, limit_s: float, bar, task) -> dict:
    """Every process's result, showing progress; bounded by limit_s."""
    raw: dict = {}
    started = time.monotonic()
    deadline = started + limit_s
    while len(raw) < len(children):
        try:
            kind, slot, payload = result_q.get(timeout=0.1)
            if kind == "error":
                raise RuntimeError(f"{what}: load generator {slot} failed:\n{payload}")
            raw[slot] = payload
        except queue.Empty:
            pass
        answered = sum(progress[0::2])
        ok = sum(progress[1::2])
        elapsed = time.monotonic() - started
        bar.update(task, completed=answered, info=f"ok {ok:,}  {answered / elapsed if elapsed > 0 else 0:,.0f}/s")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: load generators overran their time limit")
        if len(raw) < len(children) and all(p.exitcode is not None for p in children):
            try:  # a result may still sit in the pipe
                kind, slot, payload = result_q.get(timeout=2)
                raw[slot] = payload
                continue
            except queue.Empty:
                raise RuntimeError(f"{what}: a load generator exited without a result") from None
    return raw


def _merge(result: LoadResult, parts: list[dict]) -> None:
    t0 = min(p["t0"] for p in parts)
    last_answer = max((p["last_answer"] for p in parts if p["last_answer"]), default=t0)
    last_ok = max((p["last_ok"] for p in parts if p["last_ok"]), default=t0)
    result.wall_s = last_answer - t0
    result.ok_span_s = last_ok - t0
    for p in parts:
        result.sent += p["sent"]
        result.answered += p["answered"]
        result.ok += p["ok"]
        result.ok_amount += p.get("ok_amount", 0)
        result.unanswered += p["unanswered"]
        result.capped |= p["capped"]
        result.hist.decode_and_add(p["hist"])
        result.hist_ok.decode_and_add(p["hist_ok"])
        for op, enc in p["hist_op"].items():
            name = op_name(op)
            if name not in result.hist_op:
                result.hist_op[name] = loadgen.new_histogram()
            result.hist_op[name].decode_and_add(enc)
        for key, n in p["counts"].items():
            by_status = result.counts.setdefault(op_name(key >> 9), {})
            name = status_name(key & 0x1FF)
            by_status[name] = by_status.get(name, 0) + n
        result.steered_connections += p["steered_connections"]
        result.misrouted_connections += p["misrouted_connections"]
        result.loadgen_cpu_s.append(round(p["cpu_s"], 2))
        result.max_sched_lag_ms = max(result.max_sched_lag_ms, round(p["max_sched_lag_s"] * 1000, 3))
        result.errors += p["errors"]
        for k, n in p.get("extra", {}).items():
            result.extra[k] = result.extra.get(k, 0) + n
        for tag, t in p.get("by_tag", {}).items():
            one = result.by_set.setdefault(tag, {"ok": 0, "answered": 0, "ok_span_s": 0.0, "wall_s": 0.0})
            one["ok"] += t["ok"]
            one["answered"] += t["answered"]
            if t["last_ok"] is not None:
                one["ok_span_s"] = max(one["ok_span_s"], t["last_ok"] - t0)
            if t["last_answer"] is not None:
                one["wall_s"] = max(one["wall_s"], t["last_answer"] - t0)
