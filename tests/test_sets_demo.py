"""`anbao demo --sets 2`: the demo starts two sets itself (two embedded
PostgreSQL servers with wal_level = logical, two `anbao serve` groups) in
a temporary directory, runs a packet grabbed by members homed in both
sets, waits for the cross-set credits, audits across the sets, and stops
everything it started. Real processes, nothing mocked."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import psutil
import pytest
from served import ANBAO

pytestmark = pytest.mark.timeout(90)

MEMBERS, SHARES = 400, 150


@pytest.fixture
def short_tmp():
    """A short directory of its own for the demo's sets: PostgreSQL's and
    the workers' Unix sockets live under it, and pytest's tmp_path can be
    deeper than a socket path may be."""
    path = Path(tempfile.mkdtemp(prefix="ad-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_demo_across_two_sets_started_here(short_tmp):
    tmp_path = short_tmp
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # where the demo makes its directory
    out = subprocess.run(
        [*ANBAO, "demo", "--sets", "2", "--members", str(MEMBERS), "--shares", str(SHARES), "--json"],
        capture_output=True,
        text=True,
        timeout=80,
        env=env,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    doc = json.loads(out.stdout)
    assert doc["shares_won"] == SHARES and doc["claimed_cents"] == doc["total_cents"]
    assert doc["audit_ok"] is True and doc["drained"] is True and doc["audit_violations"] == []
    # Members homed in both sets, and winners from both.
    assert set(doc["members_by_set"]) == {"0", "1"} and min(doc["members_by_set"].values()) > MEMBERS // 4
    away = sum(n for s, n in doc["winners_by_set"].items() if int(s) != doc["packet_set"])
    assert sum(doc["winners_by_set"].values()) == SHARES
    # One credit per winner homed in the other set, each applied once, for its share.
    assert doc["cross_set_credits"] == away > 0 and doc["credits_match_winners"] is True
    totals = doc["audit_totals"]
    assert totals["credits_sent"] >= away and totals["credits_in_flight"] == 0 and totals["suspense_cents"] == 0
    assert doc["answers_match_database"] is True
    # Everything it started is stopped, and its directory removed.
    left = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        if any(str(tmp_path) in arg for arg in p.info["cmdline"] or []):
            left.append(p.info)
    assert not left, left
    assert not [x for x in tmp_path.iterdir() if x.name.startswith("anbao-sets-")]


def test_demo_sets_refuses_a_bad_count(tmp_path):
    out = subprocess.run([*ANBAO, "demo", "--sets", "9", "--json"], capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "--sets 2..4" in out.stderr
