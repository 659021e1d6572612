"""The benchmark harness keeps working: every scenario and both baselines at
a tiny size, through the real code path (`python -m bench`, a real `anbao
serve`, real load-generator processes). Speed is never asserted here."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--attempts", "200", "--shares", "50", "--packets", "20", "--packet-shares", "10",
        "--connections", "8", "--procs", "1", "--duration-s", "30"]
RUN_KEYS = {"name", "target", "scenario", "mode", "attempts", "answered", "ok", "ok_per_s", "answers_per_s",
            "rejects_per_s", "latency_ms", "latency_ok_ms", "statuses", "errors", "problems", "valid", "verdict",
            "percentile_curve_ms", "hdr_histogram"}


def bench(tmp_path: Path, *args: str) -> tuple[dict, subprocess.CompletedProcess]:
    p = subprocess.run([sys.executable, "-m", "bench", *args, "--out", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=180)
    label = args[args.index("--label") + 1] if "--label" in args else args[0]
    path = tmp_path / f"{label}.json"
    assert path.exists(), f"no {path}; exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return json.loads(path.read_text()), p


def test_every_scenario_and_both_baselines(tmp_path):
    doc, p = bench(tmp_path, "all", *TINY, "--baseline", "naive,echo")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert {"settings", "environment", "audit", "runs", "ratios", "valid", "definitions"} <= doc.keys()
    assert doc["environment"]["cpu_count"] >= 1 and doc["environment"]["packages"]
    assert doc["audit"]["ok"] is True
    assert doc["valid"] is True
    runs = {r["name"]: r for r in doc["runs"]}
    assert set(runs) == {"anbao storm", "anbao soldout", "anbao spread", "anbao mixed", "naive storm", "echo storm"}
    for r in runs.values():
        assert RUN_KEYS <= r.keys()
        assert r["valid"] and r["verdict"] == "valid" and not r["problems"], r["problems"]
        assert r["answered"] == r["attempts"] == 200
    assert runs["anbao storm"]["ok"] == 50 == runs["naive storm"]["ok"]      # exactly the shares
    assert runs["anbao storm"]["statuses"]["GRAB"] == {"OK": 50, "SOLD_OUT": 150}
    assert runs["anbao soldout"]["ok"] == 0
    assert runs["anbao soldout"]["statuses"]["GRAB"] == {"SOLD_OUT": 200}
    assert runs["anbao spread"]["ok"] == 200
    assert set(runs["anbao mixed"]["statuses"]) <= {"SEND", "GRAB", "PACKET", "BALANCE"}
    assert runs["echo storm"]["ok"] == 200
    assert {q["ratio"] for q in doc["ratios"]} >= {"durable grabs/s, storm: anbao / naive",
                                                   "answers/s, storm: anbao / echo ceiling"}
    png = tmp_path / "all.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "INVALID" not in p.stdout


def test_open_loop_storm(tmp_path):
    doc, p = bench(tmp_path, "storm", *TINY, "--rate", "2000", "--label", "open")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    [run] = doc["runs"]
    assert run["mode"] == "open" and run["rate_per_s"] == 2000
    assert run["ok"] == 50 and run["answered"] == 200 and run["valid"]
    # 200 requests on a 2,000/s timetable take about 0.1 s of wall time: the timetable held.
    assert run["wall_s"] >= 0.09
    assert doc["audit"]["ok"] and (tmp_path / "open.png").exists()


@pytest.mark.parametrize("argv", [["storm", "--server", "10.0.0.1:7878", "--data-dir", "x"],
                                  ["storm", "--depth", "0"], ["storm", "--baseline", "redis"]])
def test_refuses_bad_settings(argv):
    p = subprocess.run([sys.executable, "-m", "bench", *argv], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "error" in p.stderr
