"""The suite cannot hang CI: every test has a time limit (pytest-timeout,
configured in pyproject.toml), and a test past it fails with a stack dump
while the run goes on. Checked by running a hung test in a pytest of its own."""

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

HUNG = """
import asyncio


async def test_spins_like_aiomcache_502():
    # An event loop that never yields: no wait_for can fire.
    while True:
        pass


def test_after_it_runs():
    assert True
"""


def test_every_test_has_a_time_limit():
    ini = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert 60 <= int(ini["timeout"]) <= 600, "a few minutes: the storm tests take seconds"
    assert ini["timeout_method"] in ("signal", "thread")


def test_a_hung_test_fails_alone_with_its_stack(tmp_path):
    (tmp_path / "test_hung.py").write_text(HUNG)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-c",
            str(ROOT / "pyproject.toml"),
            "--rootdir",
            str(tmp_path),
            "-p",
            "no:cacheprovider",
            "-o",
            "timeout=2",
            str(tmp_path / "test_hung.py"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    out = run.stdout + run.stderr
    assert run.returncode == 1, out
    assert "Timeout" in out and "test_spins_like_aiomcache_502" in out
    assert "1 failed, 1 passed" in out, "the run goes on after the hung test"
