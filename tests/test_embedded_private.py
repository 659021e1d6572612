"""The embedded PostgreSQL is the service's alone (issue 18): its Unix
socket is in a 0700 directory of the user that runs it, however long the
data directory's path, and every connection proves a generated password
(scram-sha-256, kept 0600 in the data directory). Before, a data directory
of about 90 characters or more put the socket in a world-writable
directory, and pg_hba.conf said `trust`: the user nobody connected as
superuser with no password and read `accounts`."""

import os
import pwd
import socket
import stat

import asyncpg
import pytest

from anbao.storage import embedded

pytestmark = pytest.mark.timeout(120)


def connect_as(uid: int, gid: int, path: str) -> int:
    """Connects to the Unix socket at path in a child running as uid;
    returns the errno it met, 0 when it connected."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.setgid(gid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(path)
        except OSError as exc:
            code = exc.errno or 255
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.parametrize("name_bytes", [8, 120])
async def test_the_embedded_postgres_is_private(tmp_path, name_bytes):
    data_dir = tmp_path / ("d" * name_bytes)
    server, dsn = await asyncio_to_thread(embedded.start, data_dir)
    try:
        lines = (data_dir.resolve() / "pgdata" / "postmaster.pid").read_text().splitlines()
        socket_dir = lines[4].strip()
        st = os.stat(socket_dir)
        assert stat.S_IMODE(st.st_mode) == 0o700, f"{socket_dir} is {oct(st.st_mode)}"
        assert st.st_uid == os.stat(data_dir.resolve() / "pgdata").st_uid, "not the postmaster's user's own"
        hba = (data_dir.resolve() / "pgdata" / "pg_hba.conf").read_text()
        assert "trust" not in [w for line in hba.splitlines() if not line.startswith("#") for w in line.split()]
        password = data_dir.resolve() / embedded.PASSWORD_FILE
        assert stat.S_IMODE(password.stat().st_mode) == 0o600
        # The DSN works; without its password, nothing does.
        conn = await asyncpg.connect(dsn)
        assert await conn.fetchval("SELECT current_user") == "postgres"
        await conn.close()
        with pytest.raises((asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError)):
            await asyncpg.connect(f"postgresql://postgres:wrong@/postgres?host={socket_dir}")
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            path = os.path.join(socket_dir, ".s.PGSQL.5432")
            assert connect_as(nobody.pw_uid, nobody.pw_gid, path) != 0, "nobody reached the database's socket"
    finally:
        await asyncio_to_thread(embedded.stop, server)


async def asyncio_to_thread(fn, *args):
    import asyncio

    return await asyncio.to_thread(fn, *args)
