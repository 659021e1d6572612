"""The supervisor: one listening socket per worker (held open for life, so
steering survives restarts), N worker processes, a local memcached, restarts
of dead workers and of that memcached, and a graceful drain on
SIGTERM/SIGINT.

If the supervisor itself is killed (SIGKILL runs no code), its workers get
SIGTERM from the kernel (PR_SET_PDEATHSIG) and drain, and the reaper
(reaper.py) stops the memcached and embedded PostgreSQL it started."""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import multiprocessing as mp
import os
import resource
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import time
from dataclasses import replace
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import ConnectionTuning, Settings
from .listener import open_listeners
from .reaper import Reaper, describe

# The longest path an AF_UNIX socket may have (sun_path is 108 bytes with its NUL).
SUN_PATH_MAX_BYTES = 107
MAX_WORKER_SOCKET_NAME = "worker-1023.sock"


def socket_dir(run_dir: Path) -> Path:
    """Where the workers' private Unix sockets go: run_dir when their paths
    fit AF_UNIX's limit; else a short directory of this user's under /tmp,
    named after run_dir (a long --data-dir made every worker fail to start
    with "AF_UNIX path too long")."""
    if len(str(run_dir / MAX_WORKER_SOCKET_NAME).encode()) <= SUN_PATH_MAX_BYTES:
        return run_dir
    digest = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]
    short = Path("/tmp") / f"anbao-{os.getuid()}-{digest}"
    short.mkdir(mode=0o700, exist_ok=True)
    st = short.stat()
    # Another user's directory of that name must not receive our sockets.
    assert st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) == 0o700, f"{short} is not ours alone"
    return short


class TooFewFiles(RuntimeError):
    """RLIMIT_NOFILE cannot hold max_connections per worker."""


def raise_open_files_limit(tuning: ConnectionTuning) -> int:
    """Raises this process's RLIMIT_NOFILE soft limit to its hard limit (the
    workers inherit it) and returns it; raises TooFewFiles when a worker
    could not hold max_connections plus the files it needs for itself. A
    worker past its limit fails every accept() with EMFILE, and every
    new client of that worker with it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = int(Path("/proc/sys/fs/nr_open").read_text())  # what "unlimited" may be raised to
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    needed = tuning.max_connections + tuning.open_files_reserved_per_worker
    if needed > hard:
        raise TooFewFiles(
            f"max_connections={tuning.max_connections} needs {needed} open files per worker"
            f" (with open_files_reserved_per_worker={tuning.open_files_reserved_per_worker}), and RLIMIT_NOFILE"
            f" allows {hard}: raise the hard limit (ulimit -Hn, systemd LimitNOFILE=) or lower"
            " --limit max_connections"
        )
    return hard


if TYPE_CHECKING:
    from ..metrics import SupervisorMetrics  # imported when used: prometheus_client wants its directory first

log = logging.getLogger("anbao.supervisor")

POLL_S = 0.05
PR_SET_PDEATHSIG = 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_memcached(port: int, timeout_ms: int) -> tuple[subprocess.Popen, str] | None:
    """A local memcached on port (0: a free one), listening within
    timeout_ms; None without the binary."""
    binary = shutil.which("memcached")
    if binary is None:
        return None
    port = port or _free_port()
    args = [binary, "-l", "127.0.0.1", "-p", str(port), "-U", "0", "-m", "64", "-c", "4096", "-t", "1"]
    if os.geteuid() == 0:
        args += ["-u", "nobody"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout_ms / 1000
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"memcached did not start on port {port}")


def die_with_parent(parent_pid: int) -> None:
    """The kernel sends this process SIGTERM when its parent dies, however
    it dies: a worker then drains and exits instead of running on, an
    orphan holding the port and the database."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    if os.getppid() != parent_pid:
        os._exit(1)  # the parent died before prctl took effect


def _permits(settings: Settings, admission: str, memcached: str | None):
    """The worker's admission, as the supervisor chose it (imported here:
    the worker's process, after the fork)."""
    from ..admission import InProcessPermits, MemcachedPermits, Permits

    if admission == "memcached":
        assert memcached is not None  # the supervisor runs memcached admission only with an address
        host, port = memcached.rsplit(":", 1)
        return MemcachedPermits(host, int(port), settings.set_id, settings.limits.admission)
    if admission == "in-process":
        return InProcessPermits(settings.limits.commit.max_packets_in_memory)
    return Permits()


def _worker_main(
    settings: Settings,
    dsn: str,
    tokens_path: str,
    sock: socket.socket,
    peer_dir: str,
    peer_token: bytes,
    admission: str,
    memcached: str | None,
    with_metrics: bool,
    ready,
    committing,
    supervisor_pid: int,
    not_ours: list,
    close_fds: list[int],
) -> None:
    """Runs in the forked child."""
    die_with_parent(supervisor_pid)
    # The fork copied every descriptor of the supervisor. The other workers'
    # listening sockets and the reaper's pipe are not ours to hold open: an
    # orphaned copy of a listener keeps taking connections nobody accepts.
    for other in not_ours:
        other.close()
    for fd in close_fds:
        os.close(fd)

    import asyncio
    import gc

    import uvloop

    from ..auth import TokenBook
    from .worker import Worker

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the supervisor, which drains us in order

    async def main() -> None:
        permits = _permits(settings, admission, memcached)
        metrics = None
        if with_metrics:
            from ..metrics import WorkerMetrics

            metrics = WorkerMetrics(settings.worker_id)
        worker = Worker(
            settings,
            dsn,
            TokenBook.load(Path(tokens_path)),
            listen_sock=sock,
            peer_dir=Path(peer_dir),
            peer_token=peer_token,
            permits=permits,
            metrics=metrics,
            committing=committing,
        )
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await worker.start()
        # What start-up made (modules, tables, pools) lives as long as the
        # process. Frozen, a full collection no longer walks it: on an evening,
        # 40-50k objects and a 30-80 ms stop of the loop (every request waits)
        # became 11-12k objects and 10 ms (BENCHMARKS.md, issue 17).
        gc.freeze()
        ready.send((settings.worker_id, os.getpid()))
        ready.close()
        await stop.wait()
        await worker.stop(drain_timeout_s=settings.limits.process.worker_drain_timeout_ms / 1000 - 5)

    uvloop.run(main())


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        dsn: str,
        tokens_path: Path,
        memcached: str | None,
        admission: str = "memcached",
        metrics_port: int = 0,
        reaper: Reaper | None = None,
        metrics_host: str = "127.0.0.1",
    ):
        assert admission in ("memcached", "in-process", "off")
        self.reaper = reaper
        self.entries: dict[int, dict] = {}  # worker slot -> its pid and start time
        self._memcached_entry: dict | None = None
        self._memcached_restarted_at = -1e9
        self.memcached_restarts = 0
        self.settings = settings
        self.tuning = settings.limits.process
        self.dsn = dsn
        self.tokens_path = tokens_path
        self.memcached = memcached if admission == "memcached" else None
        self.admission = admission
        self.run_dir = Path(settings.data_dir) / "run"
        self.procs: dict[int, mp.context.ForkProcess] = {}
        self.restarts: dict[int, list[float]] = {}
        self.total_restarts = 0
        self._stopping = False
        self._ctx = mp.get_context("fork")
        # Each worker says it is ready on a pipe of its own. A shared Queue
        # has one write lock for every writer: a worker killed with it held
        # (its feeder thread between sending and releasing) left every later
        # worker's ready message waiting forever, and the supervisor with it.
        self._ready: dict[int, Connection] = {}
        self._memcached_proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.metrics_port = metrics_port
        # Its own host, not the protocol's: the endpoint has no authentication,
        # so serving on 0.0.0.0 must not publish it too.
        self.metrics_host = metrics_host
        self._metrics: SupervisorMetrics | None = None

    def start(self) -> None:
        n = self.settings.worker_count
        self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.peer_dir = socket_dir(self.run_dir)
        if self.metrics_port:
            from .. import metrics

            metrics.prepare_dir(self.run_dir)
            self._metrics_server = metrics.serve_endpoint(self.metrics_port, self.metrics_host)
            self._metrics = metrics.SupervisorMetrics()
        if self.admission == "memcached" and self.memcached is None:
            started = start_memcached(0, self.tuning.memcached_start_timeout_ms)
            if started is None:
                log.warning(
                    "no memcached binary and no --memcached address: admission falls back to an "
                    "in-process counter per worker"
                )
                self.admission = "in-process"
            else:
                self._memcached_proc, self.memcached = started
                self._note_memcached()
        # One byte per worker in memory shared across the fork: set while the
        # worker last had grab batches committing (CLOCK_MONOTONIC, one clock
        # for every process of the machine), so that every worker's roll-up
        # yields to any worker's grabs (they share one PostgreSQL).
        self._committing = self._ctx.RawArray("d", n)
        self.socks = open_listeners(self.settings.host, self.settings.port, n)
        self.port = self.socks[0].getsockname()[1]
        self.peer_token = secrets.token_hex(32).encode()
        for i in range(n):
            self._spawn(i)
        self._await_ready(set(range(n)))
        self._write_pids()

    def _note_memcached(self) -> None:
        assert self._memcached_proc is not None  # just started
        self._memcached_entry = describe(self._memcached_proc.pid)
        if self.reaper is not None:
            self.reaper.watch("memcached", self._memcached_entry)

    def _spawn(self, i: int) -> None:
        assert self.port is not None  # start() bound the listeners first
        settings = replace(self.settings, worker_id=i, port=self.port)
        ready, says_ready = self._ctx.Pipe(duplex=False)
        p = self._ctx.Process(
            target=_worker_main,
            name=f"anbao-worker-{i}",
            args=(
                settings,
                self.dsn,
                str(self.tokens_path),
                self.socks[i],
                str(self.peer_dir),
                self.peer_token,
                self.admission,
                self.memcached,
                bool(self.metrics_port),
                says_ready,
                self._committing,
                os.getpid(),
                [s for j, s in enumerate(self.socks) if j != i],
                [self.reaper.fd] if self.reaper is not None else [],
            ),
        )
        p.start()
        says_ready.close()  # the worker's end
        assert p.pid is not None  # started
        old = self._ready.pop(i, None)
        if old is not None:
            old.close()
        self._ready[i] = ready
        self.procs[i] = p
        self.entries[i] = describe(p.pid)
        if self.reaper is not None:
            self.reaper.watch(f"worker-{i}", self.entries[i])

    def _await_ready(self, waiting: set[int]) -> None:
        deadline = time.monotonic() + self.tuning.worker_ready_timeout_ms / 1000
        while waiting and not self._stopping:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"workers {sorted(waiting)} did not start")
            for conn in wait([self._ready[i] for i in waiting], timeout=min(left, 1)):
                assert isinstance(conn, Connection)  # wait() gives back what it was given
                try:
                    wid, _ = conn.recv()
                except (EOFError, OSError):
                    continue  # its worker exited without saying it: found below
                waiting.discard(wid)
            for i in waiting:
                if not self.procs[i].is_alive():
                    raise RuntimeError(f"worker {i} exited during start (code {self.procs[i].exitcode})")

    def _write_pids(self) -> None:
        doc = {
            "supervisor": os.getpid(),
            "port": self.port,
            "memcached": self.memcached,
            "metrics_port": self.metrics_port,
            "workers": {str(i): p.pid for i, p in self.procs.items()},
            "restarts": self.total_restarts,
            "memcached_restarts": self.memcached_restarts,
            # pid and start time: what the next start checks before stopping anything left over
            "supervisor_process": describe(os.getpid()),
            "worker_processes": {str(i): e for i, e in self.entries.items()},
            "memcached_process": self._memcached_entry if self._memcached_proc is not None else None,
            "reaper_process": self.reaper.entry if self.reaper is not None else None,
        }
        # The record is for the next start and for operators: a write that
        # fails is said, never a reason to stop supervising.
        try:
            self._ensure_run_dir()
            tmp = self.run_dir / "workers.json.tmp"
            tmp.write_text(json.dumps(doc))
            tmp.replace(self.run_dir / "workers.json")
        except OSError as exc:
            log.error("could not record the run in %s: %r", self.run_dir, exc)

    def _ensure_run_dir(self) -> None:
        """The run directory, made again if an operator deleted it under us:
        a replacement worker's socket and metrics files and the record of
        the run live there."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self._metrics is not None:
            (self.run_dir / "metrics").mkdir(exist_ok=True)

    def request_stop(self, *_) -> None:
        self._stopping = True

    def run_forever(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        # Whatever ends the loop, the workers are stopped: a supervisor that
        # raised and left them would wait at exit, forever, for children it
        # no longer supervises (multiprocessing joins them).
        try:
            self._supervise()
        finally:
            self.stop()

    def _supervise(self) -> None:
        while not self._stopping:
            time.sleep(POLL_S)
            if self._memcached_proc is not None and self._memcached_proc.poll() is not None:
                self._restart_memcached()
            for i, p in list(self.procs.items()):
                if p.is_alive() or self._stopping:
                    continue
                p.join()
                self._ensure_run_dir()
                # Slot i is reaped before its replacement starts: one live owner per shard.
                log.error("worker %d (pid %d) died with code %s; restarting", i, p.pid, p.exitcode)
                now = time.monotonic()
                window_s = self.tuning.worker_restart_window_ms / 1000
                recent = [t for t in self.restarts.get(i, []) if now - t < window_s]
                if len(recent) >= self.tuning.max_worker_restarts_per_window:
                    time.sleep(1.0)  # a crash loop: slow down rather than spin
                self.restarts[i] = recent + [now]
                self.total_restarts += 1
                if self._metrics is not None:
                    from .. import metrics

                    assert p.pid is not None  # started by _spawn
                    metrics.worker_died(p.pid)
                    self._metrics.restarts.labels(str(i)).inc()
                self._spawn(i)
                # Recorded before the wait for readiness: a client served by
                # the replacement must find the restart (and its pid) said.
                self._write_pids()
                try:
                    self._await_ready({i})
                except RuntimeError as exc:
                    log.error("%s", exc)

    def _restart_memcached(self) -> None:
        """The memcached this supervisor started died: start it again on the
        same port, so every worker finds it where it was. Its counters are
        gone; admission fails open until the owners reseed them (each second)."""
        now = time.monotonic()
        pause_s = self.tuning.memcached_restart_pause_ms / 1000
        if now - self._memcached_restarted_at < pause_s:
            return
        self._memcached_restarted_at = now
        dead = self._memcached_proc
        assert dead is not None and self.memcached is not None  # run_forever saw the one we started exit
        port = int(self.memcached.rsplit(":", 1)[1])
        log.error("memcached (pid %d) exited with code %s; restarting it on port %d", dead.pid, dead.returncode, port)
        try:
            started = start_memcached(port, self.tuning.memcached_start_timeout_ms)
        except RuntimeError as exc:
            log.error("%s; admission fails open; trying again in %.0f s", exc, pause_s)
            return
        if started is None:
            log.error("the memcached binary is gone; admission fails open from now on")
            self._memcached_proc = None
            return
        self._memcached_proc, _ = started
        self.memcached_restarts += 1
        self._note_memcached()
        self._write_pids()

    def stop(self) -> None:
        for p in self.procs.values():
            if p.is_alive():
                p.terminate()  # SIGTERM: the worker stops accepting, commits and answers, then exits
        deadline = time.monotonic() + self.tuning.worker_drain_timeout_ms / 1000
        for p in self.procs.values():
            p.join(max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                log.error("worker pid %d did not drain in time; killing it", p.pid)
                p.kill()
                p.join()
        if self._memcached_proc is not None:
            self._memcached_proc.terminate()
            self._memcached_proc.wait(10)
        if self.reaper is not None:
            for i in self.entries:
                self.reaper.unwatch(f"worker-{i}")
            self.reaper.unwatch("memcached")
        for s in getattr(self, "socks", []):
            s.close()
        peer_dir = getattr(self, "peer_dir", self.run_dir)
        if peer_dir != self.run_dir:
            shutil.rmtree(peer_dir, ignore_errors=True)
