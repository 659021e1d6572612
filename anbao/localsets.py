"""Several sets on this machine, for `anbao demo --sets N` and the sets
benchmark: one embedded PostgreSQL (wal_level = logical) and one `anbao
serve` group per set, all under one directory, with a topology file and a
tokens file of their own. What it starts it stops, by pid, even on error
(the supervisors, then whatever they recorded, then each postmaster).

The same steps as a real deployment (docs/DEPLOYMENT.md): every set
migrated and configured (publications) before any serves, so each `serve`
subscribes to the others at once."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import asyncpg

from .auth import ensure_tokens_file, token_for
from .storage import embedded
from .storage import sets as storage_sets
from .storage.migrate import migrate

DB = "anbao"
BANNER_TIMEOUT_S = 90  # a serve group: migrate, subscribe, fork its workers
STOP_TIMEOUT_S = 30  # SIGTERM to exit (workers drain first); then SIGKILL
POLL_S = 0.05


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def create_db(admin_uri: str, name: str = DB) -> None:
    """Database `name` on the server of `admin_uri`, unless it exists."""
    conn = await asyncpg.connect(admin_uri)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()


async def _prepare(dsns: dict[int, str]) -> None:
    for s, dsn in sorted(dsns.items()):
        await migrate(dsn)
        await storage_sets.configure(dsn, s, [p for p in dsns if p != s])


def _alive(pid: int, started: float) -> bool:
    import psutil

    try:
        p = psutil.Process(pid)
        return abs(p.create_time() - started) < 0.05 and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class LocalSets:
    """`count` sets under `root`; `workers` per set. Use as a context
    manager, or start() then stop() (stop is safe after a failed start)."""

    def __init__(
        self,
        root: Path,
        count: int = 2,
        workers: int = 1,
        admission: str = "in-process",
        say=lambda text: None,
        extra_serve_args: list[str] | None = None,
        metrics: bool = False,
    ):
        assert 1 <= count <= 8 and workers >= 1
        self.root = Path(root).resolve()
        self.count, self.workers, self.admission, self.say = count, workers, admission, say
        self.extra = list(extra_serve_args or [])
        self.pg_dirs = {s: self.root / f"set{s}pg" for s in range(count)}
        self.dsns: dict[int, str] = {}
        self.ports: dict[int, int] = {}
        self.metrics = metrics  # a Prometheus endpoint per set, on a free port (metrics_ports)
        self.metrics_ports: dict[int, int] = {}
        self.procs: dict[int, subprocess.Popen] = {}
        self._pg_started: list[int] = []
        self.topology_file = self.root / "topology.json"
        self.tokens_file = self.root / "tokens.json"

    # ------------------------------------------------------------ start

    def start(self) -> LocalSets:
        self.root.mkdir(parents=True, exist_ok=True)
        ensure_tokens_file(self.tokens_file)
        for s in range(self.count):
            self.say(f"set {s}: starting PostgreSQL (wal_level = logical) in {self.pg_dirs[s]}")
            server, _ = embedded.start(self.pg_dirs[s], logical=True)
            self._pg_started.append(s)
            asyncio.run(create_db(server.get_uri("postgres")))
            self.dsns[s] = server.get_uri(DB)
            self.ports[s] = free_port()
            if self.metrics:
                self.metrics_ports[s] = free_port()
        doc = {"sets": [{"id": s, "host": "127.0.0.1", "port": self.ports[s], "dsn": self.dsns[s]} for s in self.dsns]}
        self.topology_file.touch(mode=0o600)  # its DSNs carry the databases' passwords
        self.topology_file.chmod(0o600)
        self.topology_file.write_text(json.dumps(doc, indent=2))
        self.say(f"migrating {self.count} sets and creating their publications")
        asyncio.run(_prepare(self.dsns))
        for s in range(self.count):
            self._serve(s)
        return self

    def _serve(self, s: int) -> None:
        run = self.root / f"run{s}"
        run.mkdir(parents=True, exist_ok=True)
        log = run / "serve.log"
        args = [
            sys.executable,
            "-m",
            "anbao.cli",
            "serve",
            "--data-dir",
            str(run),
            "--port",
            str(self.ports[s]),
            "--workers",
            str(self.workers),
            "--metrics-port",
            str(self.metrics_ports.get(s, 0)),
            "--topology",
            str(self.topology_file),
            "--set",
            str(s),
            "--admission",
            self.admission,
            "--tokens-file",
            str(self.tokens_file),
            *self.extra,
        ]
        self.say(f"set {s}: anbao serve on 127.0.0.1:{self.ports[s]} ({self.workers} worker(s))")
        with open(log, "wb") as out:
            self.procs[s] = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + BANNER_TIMEOUT_S
        while time.monotonic() < deadline:
            text = log.read_text(errors="replace")
            if "stop with Ctrl-C" in text:
                return
            if self.procs[s].poll() is not None:
                raise RuntimeError(f"set {s}: anbao serve exited ({self.procs[s].returncode}):\n{text[-3000:]}")
            time.sleep(POLL_S)
        raise RuntimeError(f"set {s}: anbao serve not up after {BANNER_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")

    # ------------------------------------------------------------ use

    def token(self, scope: str = "admin") -> str:
        return token_for(self.tokens_file, scope)

    def topology(self):
        from anbao_client.routing import SetTopology

        return SetTopology.load(self.topology_file)

    def run_file(self, s: int) -> Path:
        """Set s's supervisor's record of its processes (workers.json)."""
        return self.root / f"run{s}" / "run" / "workers.json"

    def pgdata(self, s: int) -> Path:
        return self.pg_dirs[s] / "pgdata"

    def run_info(self, s: int) -> dict:
        return json.loads(self.run_file(s).read_text())

    # ------------------------------------------------------------ stop

    def stop(self) -> None:
        """Each supervisor by pid (SIGTERM: its workers drain; SIGKILL past
        STOP_TIMEOUT_S), then any process it recorded that still runs, then
        each PostgreSQL this started."""
        for s, proc in self.procs.items():
            try:
                info = self.run_info(s)
            except (OSError, ValueError):
                info = {}
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
            recorded = list(info.get("worker_processes", {}).values())
            recorded += [info[k] for k in ("memcached_process", "reaper_process") if info.get(k)]
            for entry in recorded:
                if _alive(entry["pid"], entry["started"]):
                    try:
                        os.kill(entry["pid"], signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        self.procs.clear()
        for s in reversed(self._pg_started):
            embedded.stop_data_dir(self.pg_dirs[s])
        self._pg_started.clear()

    def __enter__(self) -> LocalSets:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


def new_root(prefix: str = "anbao-sets-") -> Path:
    import tempfile

    return Path(tempfile.mkdtemp(prefix=prefix + secrets.token_hex(2) + "-"))
