"""Fixtures: a real embedded PostgreSQL for the session, a fresh database
per test (cloned from a migrated template), and anbao workers started in
the test's event loop. Nothing is mocked."""
from __future__ import annotations

import asyncio
import itertools
import json
import os
from pathlib import Path

import asyncpg
import pytest
import uvloop

from anbao.auth import TokenBook
from anbao.config import Limits, Settings
from anbao.server.worker import Worker
from anbao.storage import embedded
from anbao.storage.audit import audit
from anbao.storage.migrate import migrate
from anbao_client import Client

TEMPLATE_DB = "anbao_template"
ADMIN_TOKEN = "test-admin-token-0123456789"
APP_TOKEN = "test-app-token-0123456789"
_db_numbers = itertools.count(1)


def pytest_asyncio_loop_factories(config, item):
    # The server runs on uvloop in production; so do the tests.
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture(scope="session")
def pg(tmp_path_factory):
    """(server, base DSN) of an embedded PostgreSQL for the whole session."""
    server, dsn = embedded.start(tmp_path_factory.mktemp("pg"))
    yield server, dsn
    embedded.stop(server)


def dsn_for(pg, database: str) -> str:
    server, _ = pg
    return server.get_uri(database)


@pytest.fixture(scope="session")
async def template_db(pg):
    conn = await asyncpg.connect(dsn_for(pg, "postgres"))
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {TEMPLATE_DB}")
        await conn.execute(f"CREATE DATABASE {TEMPLATE_DB}")
    finally:
        await conn.close()
    await migrate(dsn_for(pg, TEMPLATE_DB))
    return TEMPLATE_DB


@pytest.fixture
async def fresh_dsn(pg, template_db):
    """A database of its own for one test, already migrated."""
    name = f"t_{os.getpid()}_{next(_db_numbers)}"
    conn = await asyncpg.connect(dsn_for(pg, "postgres"))
    try:
        await conn.execute(f"CREATE DATABASE {name} TEMPLATE {template_db}")
    finally:
        await conn.close()
    yield dsn_for(pg, name)


@pytest.fixture
def tokens_file(tmp_path) -> Path:
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"tokens": [{"scope": "admin", "token": ADMIN_TOKEN},
                                           {"scope": "app", "token": APP_TOKEN}]}))
    path.chmod(0o600)
    return path


class Anbao:
    """A worker in this event loop, plus helpers to reach and check it."""

    def __init__(self, dsn: str, tokens_file: Path, limits: Limits):
        self.dsn = dsn
        self.tokens_file = tokens_file
        self.limits = limits
        self.worker: Worker | None = None
        self.port = 0
        self._clients: list[Client] = []

    async def start(self) -> "Anbao":
        settings = Settings(host="127.0.0.1", port=self.port, dsn=self.dsn, tokens_file=self.tokens_file,
                            limits=self.limits)
        self.worker = Worker(settings, self.dsn, TokenBook.load(self.tokens_file))
        await self.worker.start()
        self.port = self.worker.port
        return self

    async def stop(self) -> None:
        for c in self._clients:
            await c.close()
        self._clients.clear()
        if self.worker is not None:
            await self.worker.stop()
            self.worker = None

    async def client(self, scope: str = "app", **kwargs) -> Client:
        c = await Client.connect("127.0.0.1", self.port, ADMIN_TOKEN if scope == "admin" else APP_TOKEN, **kwargs)
        self._clients.append(c)
        return c

    async def assert_audit_clean(self):
        report = await audit(self.dsn)
        assert report.ok, report.text()
        return report

    async def fetchval(self, sql: str, *args):
        conn = await asyncpg.connect(self.dsn)
        try:
            return await conn.fetchval(sql, *args)
        finally:
            await conn.close()


@pytest.fixture
def limits() -> Limits:
    return Limits()


@pytest.fixture
async def anbao(fresh_dsn, tokens_file, limits):
    server = Anbao(fresh_dsn, tokens_file, limits)
    await server.start()
    yield server
    await server.stop()


async def funded_users(admin: Client, first_id: int, n: int, amount_cents: int = 0) -> list[int]:
    ids = list(range(first_id, first_id + n))
    for i in range(0, n, 1024):
        await admin.register(ids[i:i + 1024])
    if amount_cents:
        await asyncio.gather(*(admin.deposit(u, amount_cents) for u in ids))
    return ids


@pytest.fixture
def serve(fresh_dsn, tmp_path, tokens_file):
    """Starts `anbao serve` processes on this test's database; whatever they
    started is killed by pid afterwards."""
    from served import Served
    started = []

    def start(workers=2, extra=(), dsn=fresh_dsn, data_dir=None, port=0):
        s = Served(dsn, data_dir or tmp_path / "data", tokens_file, workers, list(extra), port=port).start()
        started.append(s)
        return s

    yield start
    for s in started:
        s.kill_everything()
