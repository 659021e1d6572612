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


def _pytest_with_a_2_s_limit(tmp_path, test_file: str, *extra: str, env=None) -> subprocess.CompletedProcess:
    """The project's pytest configuration, on one file of tmp_path, with a
    2 s test limit."""
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(tmp_path)]
        + ["-p", "no:cacheprovider", *extra, "-o", "timeout=2", str(tmp_path / test_file)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_a_hung_test_fails_alone_with_its_stack(tmp_path):
    (tmp_path / "test_hung.py").write_text(HUNG)
    run = _pytest_with_a_2_s_limit(tmp_path, "test_hung.py")
    out = run.stdout + run.stderr
    assert run.returncode == 1, out
    assert "Timeout" in out and "test_spins_like_aiomcache_502" in out
    assert "1 failed, 1 passed" in out, "the run goes on after the hung test"


IDLE = """
import asyncio


async def test_idle_in_the_loop_forever():
    # Idle, not spinning: no Python runs, so no alarm can fail it.
    await asyncio.Event().wait()
"""


def test_a_test_idle_forever_ends_the_run_with_every_stack(tmp_path):
    """pytest-timeout cannot fail a test idle in uvloop; tests/hangwatch.py
    ends the run past the limit and its margin, with every thread's stack."""
    import os

    (tmp_path / "test_idle.py").write_text(IDLE)
    (tmp_path / "conftest.py").write_text(
        "import uvloop\n\n\ndef pytest_asyncio_loop_factories(config, item):\n"
        "    return {'uvloop': uvloop.new_event_loop}  # as the suite runs, and where the alarm cannot land\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), "ANBAO_HANG_MARGIN_S": "1"}
    run = _pytest_with_a_2_s_limit(tmp_path, "test_idle.py", "-p", "hangwatch", env=env)
    assert run.returncode != 0
    assert "Timeout (" in run.stderr and "pytest_runtest_call" in run.stderr, run.stderr[-2000:]
