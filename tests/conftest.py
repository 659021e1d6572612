"""Fixtures: a real embedded PostgreSQL for the session, a fresh database
per test (cloned from a migrated template), and anbao workers started in
the test's event loop. Nothing is mocked."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import asyncpg
import pytest
import uvloop
from helpers import ADMIN_TOKEN, APP_TOKEN, Anbao, dsn_for

from anbao.config import Limits
from anbao.storage import embedded
from anbao.storage.migrate import migrate

TEMPLATE_DB = "anbao_template"
_db_numbers = itertools.count(1)


pytest_plugins = ["hangwatch"]  # a test idle past its limit ends the run (tests/hangwatch.py)


def pytest_asyncio_loop_factories(config, item):
    # The server runs on uvloop in production; so do the tests.
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture(scope="session")
def pg(tmp_path_factory):
    """(server, base DSN) of an embedded PostgreSQL for the whole session."""
    server, dsn = embedded.start(tmp_path_factory.mktemp("pg"))
    yield server, dsn
    embedded.stop(server)


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
async def own_pg(tmp_path):
    """A PostgreSQL of this test's own, to stop and start."""
    data = tmp_path / "own-pg"
    server, dsn = embedded.start(data)
    await migrate(dsn)
    yield data, server, dsn
    embedded.stop_data_dir(data)


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
def slow_link(fresh_dsn):
    """A slow network between a server and this test's database: set its
    delay_ms to make every commit a real round trip."""
    from slow_link import SlowLink

    link = SlowLink(fresh_dsn).start()
    yield link
    link.stop()


@pytest.fixture
def tokens_file(tmp_path) -> Path:
    path = tmp_path / "tokens.json"
    path.write_text(
        json.dumps({"tokens": [{"scope": "admin", "token": ADMIN_TOKEN}, {"scope": "app", "token": APP_TOKEN}]})
    )
    path.chmod(0o600)
    return path


@pytest.fixture
def limits() -> Limits:
    return Limits()


@pytest.fixture
async def anbao(fresh_dsn, tokens_file, limits):
    server = Anbao(fresh_dsn, tokens_file, limits)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def serve(fresh_dsn, tmp_path, tokens_file):
    """Starts `anbao serve` processes on this test's database; whatever they
    started is killed by pid afterwards."""
    from served import Served

    started = []

    def start(workers=2, extra=(), dsn=fresh_dsn, data_dir=None, port=0, preexec_fn=None):
        s = Served(
            dsn, data_dir or tmp_path / "data", tokens_file, workers, list(extra), port=port, preexec_fn=preexec_fn
        ).start()
        started.append(s)
        return s

    yield start
    for s in started:
        s.kill_everything()
