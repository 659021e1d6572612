"""Real `anbao serve` processes for the cluster and fault tests, and the
helpers those tests share: a retrying grabber, a storm, the claims in the
database. Processes are ended by pid, never by name."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import asyncpg
import psutil
from helpers import ADMIN_TOKEN, funded_users

from anbao_client import Client, Cluster, SoldOut, Unavailable
from anbao_client.errors import AlreadyClaimed, Busy, ConnectionLost, InDoubt, RequestTimeout

RETRYABLE = (ConnectionLost, RequestTimeout, Unavailable, Busy, InDoubt, OSError)
ANBAO = [sys.executable, "-m", "anbao.cli"]
BANNER_TIMEOUT_S = 60


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """`anbao serve` on a database (an external DSN, or the embedded one in
    data_dir when dsn is None)."""

    def __init__(
        self,
        dsn: str | None,
        data_dir: Path,
        tokens_file: Path | None,
        workers: int,
        extra: list[str],
        port: int = 0,
        metrics: bool = True,
        preexec_fn=None,
    ):
        self.preexec_fn = preexec_fn  # run in the child before `anbao serve` (a lower rlimit, say)
        self.dsn, self.data_dir, self.workers = dsn, data_dir, workers
        self.metrics_port = free_port() if metrics else 0
        self.args = [
            *ANBAO,
            "serve",
            "--data-dir",
            str(data_dir),
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--metrics-port",
            str(self.metrics_port),
            *extra,
        ]
        if dsn is not None:
            self.args += ["--dsn", dsn]
        if tokens_file is not None:
            self.args += ["--tokens-file", str(tokens_file)]
        self.proc = None
        self.port = None
        self.banner = ""
        self.output: list[str] = []
        self._drain = None

    def start(self) -> Served:
        self.proc = subprocess.Popen(
            self.args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=self.preexec_fn
        )
        deadline = time.monotonic() + BANNER_TIMEOUT_S
        lines = []
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            assert line, "server exited:\n" + "".join(lines)
            lines.append(line)
            if "stop with Ctrl-C" in line:
                break
        self.banner = "".join(lines)
        self.port = int(re.search(r"serving on [\d.]+:(\d+)", self.banner).group(1))
        self.output = lines

        # Keep draining the output so the server never blocks on a full pipe
        # (a daemon thread: a process that outlives the test holding the
        # pipe must not hold up the test run's exit).
        def drain():
            for line in self.proc.stdout:
                self.output.append(line)

        self._drain = threading.Thread(target=drain, daemon=True)
        self._drain.start()
        return self

    def log(self) -> str:
        return "".join(self.output)

    def run_info(self) -> dict:
        return json.loads((self.data_dir / "run" / "workers.json").read_text())

    def stop(self, sig=signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(60)

    def kill_everything(self) -> None:
        """What the test started, by pid: the supervisor, then whatever it
        recorded (workers, reaper, memcached), each only if it is still the
        process that was recorded."""
        children = []
        if self.proc.poll() is None:
            try:
                children = [
                    {"pid": c.pid, "started": c.create_time()}
                    for c in psutil.Process(self.proc.pid).children(recursive=True)
                ]
            except psutil.NoSuchProcess:
                pass
            self.proc.kill()
            self.proc.wait(10)
        for entry in children:  # a worker started after workers.json was last written, say
            kill_recorded(entry)
        try:
            info = self.run_info()
        except (OSError, ValueError):
            return
        for entry in recorded_processes(info):
            kill_recorded(entry)
        # Workers recorded by pid alone (a server older than worker_processes):
        # only if the pid still runs this server's command line.
        for pid in info.get("workers", {}).values():
            try:
                if psutil.Process(pid).cmdline()[: len(self.args)] == self.args:
                    os.kill(pid, signal.SIGKILL)
            except (psutil.NoSuchProcess, ProcessLookupError):
                pass


def recorded_processes(info: dict) -> list[dict]:
    out = list(info.get("worker_processes", {}).values())
    for name in ("memcached_process", "reaper_process"):
        if info.get(name):
            out.append(info[name])
    return out


def is_recorded_alive(entry: dict) -> bool:
    try:
        p = psutil.Process(entry["pid"])
        return abs(p.create_time() - entry["started"]) < 0.05 and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def kill_recorded(entry: dict) -> None:
    if is_recorded_alive(entry):
        try:
            os.kill(entry["pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass


async def audit_clean(dsn: str):
    from anbao.storage.audit import audit

    report = await audit(dsn)
    assert report.ok, report.text()


async def claims_of(dsn: str, packet_id: int) -> dict:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT user_id, seq, amount_cents FROM claims_all WHERE packet_id = $1", packet_id)
    finally:
        await conn.close()
    return {r["user_id"]: (r["seq"], r["amount_cents"]) for r in rows}


class Grabber:
    """A plain client that reconnects and retries until it has an answer
    that is final: a share (OK or ALREADY_CLAIMED with the first share), or
    SOLD_OUT. Retrying is safe: (packet, user) is the grab's idempotency key."""

    def __init__(self, port: int, token: str, routed: bool, timeout_ms: int = 5_000, local_port_for=None):
        self.port, self.token, self.routed, self.timeout_ms = port, token, routed, timeout_ms
        self.local_port_for = local_port_for  # () -> a source port steering to one worker, or None
        self.client = None
        # Many grabs share this client: one of them reconnects at a time,
        # and a grab that failed drops only the client it used, never the
        # one another grab has made since (that closed healthy connections
        # under the grabs using them, each failure making more).
        self._connecting = asyncio.Lock()

    async def _client(self):
        async with self._connecting:
            if self.client is None:
                if self.routed:
                    self.client = await Cluster.connect("127.0.0.1", self.port, self.token, timeout_ms=self.timeout_ms)
                else:
                    local = self.local_port_for() if self.local_port_for else None
                    self.client = await Client.connect(
                        "127.0.0.1", self.port, self.token, timeout_ms=self.timeout_ms, local_port=local
                    )
            return self.client

    async def _drop(self, failed) -> None:
        if failed is not None and self.client is failed:
            self.client = None
            await failed.close()

    async def grab(self, packet_id: int, user_id: int, deadline: float, answers: list | None = None):
        while time.monotonic() < deadline:
            c = None
            try:
                c = await self._client()
                g = await c.grab(packet_id, user_id)
                if answers is not None:
                    answers.append(("ok", g))
                return "ok", g
            except SoldOut:
                if answers is not None:
                    answers.append(("sold_out", None))
                return "sold_out", None
            except AlreadyClaimed as e:
                if answers is not None:
                    answers.append(("ok", e.grabbed))
                return "ok", e.grabbed
            except RETRYABLE as e:
                if answers is not None:
                    answers.append((type(e).__name__, None))
                if isinstance(e, (ConnectionLost, OSError)):
                    await self._drop(c)
                await asyncio.sleep(0.05)
        return "gave_up", None

    async def close(self):
        if self.client is not None:
            await self.client.close()


async def storm(
    port: int,
    packet_id: int,
    users: list[int],
    grabbers: list[Grabber],
    timeout_s: float = 90,
    outcomes: list[str] | None = None,
):
    """Every user grabs once; returns (won, outcomes). `outcomes`, if given,
    fills as answers arrive, so a fault can be timed by the storm's progress."""
    deadline = time.monotonic() + timeout_s
    won: dict[int, Any] = {}
    outcomes = [] if outcomes is None else outcomes

    async def one(i, u):
        outcome, g = await grabbers[i % len(grabbers)].grab(packet_id, u, deadline)
        outcomes.append(outcome)
        if g is not None:
            won[u] = g

    await asyncio.gather(*(one(i, u) for i, u in enumerate(users)))
    return won, outcomes


async def setup_packet(port: int, n_users: int, total: int, count: int, *, members=None, first_user: int = 1000):
    admin = await Cluster.connect("127.0.0.1", port, ADMIN_TOKEN)
    (sender,) = await funded_users(admin, 1, 1, 10_000_000)
    users = await funded_users(admin, first_user, n_users)
    sent = await admin.send(sender, total, count, members=members(users) if members else None)
    return admin, users, sent


async def steered_client(port: int, token: str, worker_id: int, worker_count: int, **kwargs) -> Client:
    """A plain client whose connection the kernel hands to one chosen worker."""
    from anbao_client.routing import local_port_for

    for _ in range(20):
        try:
            return await Client.connect(
                "127.0.0.1", port, token, local_port=local_port_for(worker_id, worker_count), **kwargs
            )
        except OSError:
            continue
    raise OSError("no free source port")


def postgres_backends(dsn: str) -> list[int]:
    """pids of the PostgreSQL backends serving this database, but the caller's."""

    async def q():
        conn = await asyncpg.connect(dsn)
        try:
            return [
                r[0]
                for r in await conn.fetch(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    " AND backend_type = 'client backend'"
                )
            ]
        finally:
            await conn.close()

    return q()


class Hung:
    """PostgreSQL stopped (SIGSTOP): the postmaster, so no new connection
    gets through, and the backends serving the test's database, so every
    commit and query in flight hangs, as in a database stall."""

    def __init__(self, dsn):
        self.dsn = dsn
        self.pids: list[int] = []

    async def __aenter__(self):
        backends = await postgres_backends(self.dsn)
        assert backends, "no backends to stop"
        self.pids = [psutil.Process(backends[0]).ppid()] + backends
        for pid in self.pids:
            os.kill(pid, signal.SIGSTOP)
        return self

    async def resume(self):
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        self.pids = []

    async def __aexit__(self, *exc):
        await self.resume()


async def answered(outcomes: list, n: int, bound_s: float = 6.0) -> int:
    """Waits (at most bound_s) until a storm has n answers; returns how many
    it has then, so a fault can be timed by the storm's progress."""
    for _ in range(int(bound_s / 0.002)):
        if len(outcomes) >= n:
            break
        await asyncio.sleep(0.002)
    return len(outcomes)


async def restarted(served: Served, n: int = 1, bound_s: float = 10.0) -> dict:
    """The run info once the supervisor has recorded n worker restarts (at
    most bound_s): a storm may end before it sees a death, since the other
    worker answers every user from the committed claim list (I9)."""
    for _ in range(int(bound_s / 0.05)):
        info = served.run_info()
        if info["restarts"] >= n:
            return info
        await asyncio.sleep(0.05)
    return served.run_info()
