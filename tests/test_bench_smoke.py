"""The benchmark harness keeps working: every scenario and every baseline
(redis, naive, echo) at a tiny size, through the real code path (`python -m
bench`, a real `anbao serve`, a real redis-server, real load-generator
processes). Speed is never asserted here."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "--attempts",
    "200",
    "--shares",
    "50",
    "--packets",
    "20",
    "--packet-shares",
    "10",
    "--connections",
    "8",
    "--procs",
    "1",
    "--duration-s",
    "30",
    "--settle-s",
    "0",
]
BENCH_TIMEOUT_S = 240
# pytest-timeout, when installed, bounds the whole test too; the subprocess timeout always does.
timeout = pytest.mark.timeout(BENCH_TIMEOUT_S + 90) if importlib.util.find_spec("pytest_timeout") else (lambda f: f)
RUN_KEYS = {
    "name",
    "target",
    "scenario",
    "mode",
    "attempts",
    "answered",
    "ok",
    "ok_per_s",
    "answers_per_s",
    "rejects_per_s",
    "latency_ms",
    "latency_ok_ms",
    "statuses",
    "errors",
    "problems",
    "valid",
    "verdict",
    "percentile_curve_ms",
    "hdr_histogram",
}


def bench(tmp_path: Path, *args: str, timeout_s: float = BENCH_TIMEOUT_S) -> tuple[dict, subprocess.CompletedProcess]:
    """Runs the bench in a process group of its own; past timeout_s it gets
    SIGINT (so it stops the servers it started), then SIGKILL."""
    argv = [sys.executable, "-m", "bench", *args, "--out", str(tmp_path)]
    proc = subprocess.Popen(
        argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        pytest.fail(f"bench {' '.join(args)} ran past {timeout_s} s\n{out[-3000:]}\n{err[-3000:]}")
    p = subprocess.CompletedProcess(argv, proc.returncode, out, err)
    label = args[args.index("--label") + 1] if "--label" in args else args[0]
    path = tmp_path / f"{label}.json"
    assert path.exists(), f"no {path}; exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return json.loads(path.read_text()), p


@timeout
def test_every_scenario_and_every_baseline(tmp_path):
    doc, p = bench(tmp_path, "all", *TINY, "--baseline", "redis,naive,echo")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert {"settings", "environment", "audit", "runs", "ratios", "valid", "definitions"} <= doc.keys()
    assert doc["environment"]["cpu_count"] >= 1 and doc["environment"]["packages"]
    assert doc["audit"]["ok"] is True
    assert doc["valid"] is True
    runs = {r["name"]: r for r in doc["runs"]}
    assert set(runs) == {
        "anbao hot",
        "anbao storm",
        "anbao soldout",
        "anbao spread",
        "anbao mixed",
        "redis hot",
        "redis storm",
        "redis soldout",
        "redis spread",
        "naive storm",
        "echo storm",
    }
    for r in runs.values():
        assert RUN_KEYS <= r.keys()
        assert r["valid"] and r["verdict"] == "valid" and not r["problems"], r["problems"]
        assert r["answered"] == r["attempts"] == 200
    assert runs["anbao storm"]["ok"] == 50 == runs["naive storm"]["ok"] == runs["redis storm"]["ok"]
    assert runs["anbao storm"]["statuses"]["GRAB"] == {"OK": 50, "SOLD_OUT": 150}
    assert runs["redis storm"]["statuses"]["GRAB"] == {"OK": 50, "SOLD_OUT": 150}
    assert runs["redis storm"]["ok_amount_cents"] == 50 * 100  # sold out: every cent handed out
    assert runs["anbao hot"]["statuses"]["GRAB"] == {"OK": 200} == runs["redis hot"]["statuses"]["GRAB"]
    assert runs["redis soldout"]["statuses"]["GRAB"] == {"SOLD_OUT": 200}
    assert runs["redis spread"]["statuses"]["GRAB"] == {"OK": 200}
    assert runs["anbao soldout"]["ok"] == 0
    assert runs["anbao soldout"]["statuses"]["GRAB"] == {"SOLD_OUT": 200}
    assert runs["anbao spread"]["ok"] == 200
    assert set(runs["anbao mixed"]["statuses"]) <= {"SEND", "GRAB", "PACKET", "BALANCE"}
    assert runs["echo storm"]["ok"] == 200
    assert {q["ratio"] for q in doc["ratios"]} >= {
        "durable grabs/s, storm: anbao / naive",
        "answers/s, storm: anbao / echo ceiling",
        "durable grabs/s, hot: anbao / redis",
        "durable grabs/s, storm: anbao / redis",
        "p99 latency, storm: anbao / redis (below 1: anbao faster)",
        "answers/s, soldout: anbao / redis",
    }
    assert doc["headline"]["value"] > 0 and doc["headline"]["valid"]
    png = tmp_path / "all.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "INVALID" not in p.stdout


@timeout
def test_hot_against_redis(tmp_path):
    """The headline: hot, 2 packets x 200 shares, every share grabbed, anbao
    and Redis (AOF fsync always) driven by the same load generator."""
    doc, p = bench(
        tmp_path,
        "hot",
        "--hot-packets",
        "2",
        "--shares",
        "200",
        "--connections",
        "8",
        "--procs",
        "1",
        "--duration-s",
        "30",
        "--settle-s",
        "0",
        "--baseline",
        "redis",
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert doc["valid"] is True and doc["audit"]["ok"] is True
    runs = {r["name"]: r for r in doc["runs"]}
    assert set(runs) == {"anbao hot", "redis hot"}
    redis = runs["redis hot"]
    for r in runs.values():
        assert RUN_KEYS <= r.keys()
        assert r["valid"] and r["verdict"] == "valid" and not r["problems"], r["problems"]
        assert r["attempts"] == r["answered"] == r["ok"] == 400
        assert r["statuses"] == {"GRAB": {"OK": 400}}
        assert (r["connections"], r["depth"], r["procs"]) == (8, 4, 1)  # the same load for both
    assert redis["ok_amount_cents"] == 2 * 200 * 100  # every share, every cent
    assert redis["info"]["config"]["appendfsync"] == "always" and redis["info"]["config"]["save"] == ""
    assert redis["info"]["aof_enabled"] == "1"
    ratio = {q["ratio"]: q for q in doc["ratios"]}["durable grabs/s, hot: anbao / redis"]
    assert ratio["value"] > 0
    assert (ratio["numerator"], ratio["denominator"]) == (runs["anbao hot"]["ok_per_s"], redis["ok_per_s"])
    assert doc["headline"]["value"] == ratio["value"]
    assert not Path(f"/proc/{redis['info']['redis_pid']}").exists()  # its redis-server is gone
    assert not Path(redis["info"]["redis_dir"]).exists()


@timeout
def test_open_loop_storm(tmp_path):
    doc, p = bench(tmp_path, "storm", *TINY, "--rate", "2000", "--label", "open")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    [run] = doc["runs"]
    assert run["mode"] == "open" and run["rate_per_s"] == 2000
    assert run["ok"] == 50 and run["answered"] == 200 and run["valid"]
    # 200 requests on a 2,000/s timetable take about 0.1 s of wall time: the timetable held.
    assert run["wall_s"] >= 0.09
    assert doc["audit"]["ok"] and (tmp_path / "open.png").exists()


EVENING_TINY = ["--users", "300", "--connections", "8", "--procs", "2", "--settle-s", "0", "--baseline", "redis"]
EVENING_OPS = ("SEND", "GRAB", "PACKET", "BALANCE", "ALL")


def _evening_books(doc: dict) -> dict:
    """Both runs valid, every operation answered, the books right on both
    sides (anbao: its audit and the OK answers durable; Redis: its own)."""
    assert doc["valid"] is True and doc["audit"]["ok"] is True
    runs = {r["target"]: r for r in doc["runs"]}
    assert set(runs) == {"anbao", "redis"} and all(r["scenario"] == "evening" for r in runs.values())
    for r in runs.values():
        assert r["valid"] and r["verdict"] == "valid" and not r["problems"], r["problems"]
        assert all(r["by_op"][op]["count"] > 0 and r["by_op"][op]["ops_per_s"] > 0 for op in EVENING_OPS)
        assert all(r["by_op"][op]["latency_ms"]["p99"] > 0 for op in EVENING_OPS)
        assert r["by_op"]["GRAB"]["statuses"].get("SOLD_OUT", 0) > 0  # every packet sells out
        assert r["info"]["steps"]["steps_started"] > 0
    anbao, redis = runs["anbao"], runs["redis"]
    assert anbao["info"]["durable"]["claims"] == anbao["statuses"]["GRAB"]["OK"]
    assert anbao["info"]["durable"]["packets"] == anbao["statuses"]["SEND"]["OK"]
    books = redis["info"]["books"]
    assert books["claims"] == redis["statuses"]["GRAB"]["OK"] and books["packets"] == redis["statuses"]["SEND"]["OK"]
    assert books["balances_cents"] + books["escrow_cents"] == books["deposits_cents"] == 300 * 10_000_000
    assert anbao["info"]["setup_timings_s"]["total_s"] > 0
    return runs


@timeout
def test_evening_closed_loop_against_redis(tmp_path):
    """50 steps (packets' lives) on each side: the same steps, so the same
    sends, grabs, opens and balance checks, every packet sold out."""
    doc, p = bench(tmp_path, "evening", *EVENING_TINY, "--attempts", "50", "--duration-s", "60")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    runs = _evening_books(doc)
    for r in runs.values():
        assert r["info"]["steps"] == {
            "steps_started": 50,
            "steps_done": 50,
            "steps_cut": 0,
            "retries": r["info"]["steps"]["retries"],
            "sends_refused": 0,
            "steps_unfinished": 0,
            "slots_unsent": 0,
        }
        assert r["statuses"]["SEND"]["OK"] == 50 and r["statuses"]["BALANCE"]["OK"] == 50
        assert r["statuses"]["PACKET"]["OK"] == 150
    assert runs["anbao"]["statuses"]["GRAB"]["OK"] == runs["redis"]["statuses"]["GRAB"]["OK"]
    assert runs["anbao"]["info"]["durable"]["packets_not_sold_out"] == 0
    assert "ops/s, evening (all operations): anbao / redis" in {q["ratio"] for q in doc["ratios"]}
    assert (tmp_path / "evening.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@timeout
def test_evening_open_loop_against_redis(tmp_path):
    """A short open loop (400 requests/s for 3 s): the timetable held, ended by the clock, books right."""
    doc, p = bench(tmp_path, "evening", *EVENING_TINY, "--rate", "400", "--duration-s", "3", "--label", "ev-open")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    runs = _evening_books(doc)
    for r in runs.values():
        assert r["mode"] == "open" and r["rate_per_s"] == 400
        # Never ahead of the timetable (400/s x 3 s, a slot per worker group at most more); a busy machine may lag.
        assert 100 <= r["answered"] <= 1200 + 4 and r["wall_s"] >= 2.5


SETS_TIMEOUT_S = 90


@pytest.mark.timeout(SETS_TIMEOUT_S + 90) if importlib.util.find_spec("pytest_timeout") else (lambda f: f)
@pytest.mark.parametrize("scenario", ["storm", "hot"])
def test_two_sets(tmp_path, scenario):
    """--sets 2: two sets on this machine (embedded PostgreSQL with logical
    replication and `anbao serve --topology` each), grabbers homed in both,
    a packet in each set; the answers counted per set, every cross-set
    credit applied and timed, and the cross-set audit OK once drained."""
    hot = ["--hot-packets", "2", "--shares", "100"] if scenario == "hot" else []  # every share grabbed
    doc, p = bench(
        tmp_path, scenario, "--sets", "2", "--workers", "1", *TINY, "--procs", "2", *hot, timeout_s=SETS_TIMEOUT_S
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert doc["sets"] == 2 and doc["settings"]["sets"] == 2
    assert doc["valid"] is True and doc["audit"]["ok"] is True and doc["audit"]["drained"] is True
    [run] = doc["runs"]
    assert RUN_KEYS <= run.keys()
    assert run["valid"] and run["verdict"] == "valid" and not run["problems"], run["problems"]
    assert run["answered"] == run["attempts"] == 200
    if scenario == "storm":  # 25 shares in each set, 100 attempts on each
        assert run["statuses"]["GRAB"] == {"OK": 50, "SOLD_OUT": 150}
    else:
        assert run["statuses"]["GRAB"] == {"OK": 200}
    assert set(run["by_set"]) == {"0", "1"}
    assert sum(x["ok"] for x in run["by_set"].values()) == run["ok"]
    assert all(x["ok"] > 0 and x["ok_per_s"] > 0 for x in run["by_set"].values())
    lag = run["info"]["credit_lag_ms"]
    assert 0 < lag["credits"] < run["ok"], lag  # winners homed in the other set, not all of them
    assert lag["credits"] == doc["audit"]["totals"]["credits_applied"] == doc["audit"]["totals"]["credits_sent"]
    assert lag["total"]["count"] == lag["credits"] and lag["total"]["p50"] > 0
    assert lag["before_sent"]["p50"] <= lag["total"]["p50"]
    assert {"workers", "postgres", "set0_workers", "set1_postgres"} <= run["info"]["server_cpu_us_per_answer"].keys()


@pytest.mark.parametrize(
    "argv",
    [
        ["spread", "--sets", "2"],
        ["storm", "--sets", "9"],
        ["hot", "--sets", "2", "--server", "127.0.0.1:7878", "--data-dir", "x"],
        ["storm", "--server", "10.0.0.1:7878", "--data-dir", "x"],
        ["storm", "--depth", "0"],
        ["storm", "--baseline", "mongodb"],
        ["hot", "--hot-packets", "0"],
        ["hot", "--baseline", "redis", "--redis-server", "/nonexistent/redis-server"],
        ["evening", "--baseline", "naive"],
        ["evening", "--users", "5"],
        ["evening", "--sets", "2"],
    ],
)
def test_refuses_bad_settings(argv):
    p = subprocess.run([sys.executable, "-m", "bench", *argv], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "error" in p.stderr


def _module_json(module: str, *args: str, timeout_s: float) -> dict:
    """`python -m module args...` that prints one JSON document and exits 0."""
    p = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout_s
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return json.loads(p.stdout)


def test_apply_cost_of_a_cross_set_credit():
    """bench.apply credits a few hundred wallets through the destination's
    triggers, per row and in credit batches, alternating, and reports both
    rates; it asserts every credit was applied once and every cent arrived."""
    doc = _module_json(
        "bench.apply",
        *("--credits", "600", "--users", "50", "--per-txn", "100", "--per-batch", "200", "--rounds", "2"),
        "--profile",
        timeout_s=150,
    )
    assert [r["shape"] for r in doc["rounds"]] == ["row", "batch", "batch", "row"]
    assert all(r["credits_per_s"] > 0 for r in doc["rounds"]) and doc["batch_over_row"] > 0
    profiles = doc["statements_inside_the_triggers"]
    assert any("transfers" in s["query"] for s in profiles["row"])
    assert any("transfers" in s["query"] for s in profiles["batch"])  # the one statement per batch


def test_apply_through_a_subscription_both_shapes():
    """bench.apply_stream drains a backlog of each shape through a real
    subscription, alternating; it asserts every credit applied once and every
    cent arrived in both pairs of databases."""
    doc = _module_json(
        "bench.apply_stream", "--credits", "400", "--users", "50", "--per-batch", "150", "--rounds", "2", timeout_s=170
    )
    assert [r["shape"] for r in doc["rounds"]] == ["row_main", "batch", "batch", "row_main"]
    assert all(r["credits_per_s"] > 0 and r["receiver_wal_bytes_per_credit"] > 0 for r in doc["rounds"])


def test_a_set_down_then_its_backlog_drains():
    """bench.outage: set 1 stopped while set 0 takes grabs by its users;
    every credit queued is applied once set 1 is back, and it says so."""
    doc = _module_json("bench.outage", "--down-s", "3", "--per-packet", "20", timeout_s=170)
    assert doc["audit_ok"] and doc["grabs_while_down"] > 0
    assert doc["credits_queued"] == doc["grabs_while_down"] == doc["audit"]["credits_applied"]
    assert doc["slot_backlog_peak_bytes"] > 0


def test_send_alone_to_groups():
    """bench.sendalone: SENDs to groups of 20-200 from many connections,
    every one durable (a packet in the database) and the audit clean."""
    doc = _module_json(
        "bench.sendalone", "--users", "300", "--sends", "400", "--connections", "4", "--depth", "4", timeout_s=150
    )
    assert doc["sends_ok"] == doc["packets_in_db"] == 400 and doc["audit_ok"]
    assert doc["statuses"] == {"SEND": {"OK": 400}} and doc["durable_sends_per_s"] > 0
