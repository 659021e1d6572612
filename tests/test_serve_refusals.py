"""What `anbao serve` refuses at start, and what it sets up before its
workers run (issue 18): a port another server listens on, a
max_connections the open-files limit cannot hold, the open-files limit
itself, and the metrics endpoint's own host."""

import asyncio
import resource
import subprocess
import sys

import pytest
from polling import eventually
from served import ANBAO

pytestmark = pytest.mark.timeout(120)

REFUSAL_TIMEOUT_S = 30


async def refused(args: list[str]) -> subprocess.CompletedProcess:
    """Runs `anbao serve` with args; it must exit 2 by itself."""
    done = await asyncio.to_thread(
        subprocess.run,
        [*ANBAO, "serve", *args],
        capture_output=True,
        text=True,
        timeout=REFUSAL_TIMEOUT_S,
    )
    assert done.returncode == 2, f"exit {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


async def test_a_second_server_on_a_served_port_refuses_to_start(serve, fresh_dsn, tmp_path, tokens_file):
    """Before, a second `anbao serve` on another data directory joined the
    first's SO_REUSEPORT group, printed "anbao serving on ...", and never
    got a connection."""
    first = serve(workers=1)
    done = await refused(
        ["--data-dir", str(tmp_path / "other"), "--dsn", fresh_dsn, "--tokens-file", str(tokens_file)]
        + ["--port", str(first.port), "--workers", "1", "--metrics-port", "0"]
    )
    assert f"127.0.0.1:{first.port} is already served by pid" in done.stderr
    assert "anbao" in done.stderr and "serving on" not in done.stdout
    assert first.proc.poll() is None, "the first server serves on"


async def test_max_connections_beyond_the_open_files_limit_is_refused(fresh_dsn, tmp_path, tokens_file):
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        pytest.skip("no hard limit on open files here")
    done = await refused(
        ["--data-dir", str(tmp_path / "d"), "--dsn", fresh_dsn, "--tokens-file", str(tokens_file)]
        + ["--port", "0", "--workers", "1", "--metrics-port", "0", "--limit", f"max_connections={hard}"]
    )
    assert f"max_connections={hard} needs" in done.stderr and f"RLIMIT_NOFILE allows {hard}" in done.stderr


async def test_the_open_files_limit_is_raised_to_the_hard_limit(serve):
    """A server started under a low soft limit (a shell's 1,024) raises it
    for itself and its workers. Before, a worker stayed at the soft limit
    and reset new clients with EMFILE far below max_connections."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = 1024
    if hard == resource.RLIM_INFINITY or hard <= low:
        pytest.skip("the hard limit leaves nothing to raise")

    def lower():
        resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))

    s = serve(workers=1, preexec_fn=lower, extra=["--limit", f"max_connections={low}"])
    pids = [s.proc.pid, *s.run_info()["workers"].values()]
    for pid in pids:
        await eventually(lambda pid=pid: soft_open_files(pid) == hard, 10, f"pid {pid} at {hard} open files")


def soft_open_files(pid: int) -> int:
    for line in open(f"/proc/{pid}/limits").read().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError(sys.exc_info())


async def test_the_metrics_endpoint_has_its_own_host(serve):
    """Served on another --host, the unauthenticated metrics endpoint stays
    on 127.0.0.1 (--metrics-host). Before, it bound --host: with --host
    0.0.0.0 it was public."""
    import urllib.request

    import psutil

    s = serve(workers=1, extra=["--host", "127.0.0.2"])
    listening = [
        c.laddr
        for c in psutil.Process(s.proc.pid).net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == s.metrics_port
    ]
    assert [a.ip for a in listening] == ["127.0.0.1"]
    with urllib.request.urlopen(f"http://127.0.0.1:{s.metrics_port}/metrics", timeout=10) as r:
        assert b"anbao_" in r.read()
