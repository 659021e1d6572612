"""What the tests share, imported by the test files, served.py and
conftest.py alike (no test file imports another test file or conftest):
the tokens the fixtures write, an in-loop worker (Anbao), funded users, a
raw frame connection, an engine answer collector, a grab storm and the
check of its claims against the database."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import asyncpg

from anbao.auth import TokenBook
from anbao.config import Limits, Settings
from anbao.engine.grabs import Replier
from anbao.server.worker import Worker
from anbao.storage.audit import audit
from anbao_client import Client, SoldOut, Unavailable, wire
from anbao_client.errors import AlreadyClaimed
from anbao_client.wire import Status

ADMIN_TOKEN = "test-admin-token-0123456789"
APP_TOKEN = "test-app-token-0123456789"
# The key every roll-up takes (migration 0003), and at a set the apply of a
# credit from another set (0007): holding it holds them all back.
ROLLUP_LOCK_KEY = int.from_bytes(b"anbaorol", "big")


def dsn_for(pg, database: str) -> str:
    server, _ = pg
    return server.get_uri(database)


class Anbao:
    """A worker in this event loop, plus helpers to reach and check it."""

    def __init__(self, dsn: str, tokens_file: Path, limits: Limits, tls: tuple[Path, Path] | None = None, **worker):
        self.dsn = dsn
        self.tokens_file = tokens_file
        self.limits = limits
        self.tls = tls  # (certificate, key): the public port speaks TLS
        self.worker_options = worker  # Worker's keywords (peer_dir, peer_token)
        self.worker: Worker | None = None
        self.port = 0
        self._clients: list[Client] = []

    async def start(self) -> Anbao:
        settings = Settings(
            host="127.0.0.1",
            port=self.port,
            dsn=self.dsn,
            tokens_file=self.tokens_file,
            limits=self.limits,
            tls_cert=self.tls[0] if self.tls else None,
            tls_key=self.tls[1] if self.tls else None,
        )
        self.worker = Worker(settings, self.dsn, TokenBook.load(self.tokens_file), **self.worker_options)
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


async def funded_users(admin: Client, first_id: int, n: int, amount_cents: int = 0) -> list[int]:
    ids = list(range(first_id, first_id + n))
    for i in range(0, n, 1024):
        await admin.register(ids[i : i + 1024])
    if amount_cents:
        await asyncio.gather(*(admin.deposit(u, amount_cents) for u in ids))
    return ids


class Raw:
    """A bare TCP connection speaking frames by hand."""

    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer
        self.frames = wire.FrameBuffer()
        self.got: list[wire.Response] = []

    @classmethod
    async def open(cls, port, hello=True):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        raw = cls(r, w)
        if hello:
            raw.send(wire.hello(1, ADMIN_TOKEN.encode()))
            [h] = await raw.answers(1)
            assert h.status == Status.OK
        return raw

    def send(self, data: bytes):
        self.writer.write(data)

    async def answers(self, n, timeout_s=5.0):
        while len(self.got) < n:
            data = await asyncio.wait_for(self.reader.read(65536), timeout_s)
            if not data:
                break
            self.got += self.frames.feed(data)
        out, self.got = self.got[:n], self.got[n:]
        return out

    async def closed_by_server(self, timeout_s=5.0) -> bool:
        try:
            while True:
                data = await asyncio.wait_for(self.reader.read(65536), timeout_s)
                if not data:
                    return True
                self.got += self.frames.feed(data)
        except (ConnectionResetError, BrokenPipeError):
            return True

    def close(self):
        self.writer.close()


class Collector(Replier):
    """Collects the engine's answers, as a connection would write them."""

    def __init__(self):
        self.frames: dict[int, wire.Response] = {}

    def answer(self, frame: bytes) -> None:
        [r] = wire.FrameBuffer().feed(frame)
        self.frames[r.request_id] = r


async def grab_outcomes(clients: list[Client], packet_id: int, users: list[int], retry_unavailable=False):
    """Grabs once per user, spread over the clients; returns {user: Grabbed}
    for the acknowledged ones and a list of other outcomes."""
    won, other = {}, []

    async def one(i, user):
        c = clients[i % len(clients)]
        for _ in range(50):
            try:
                won[user] = await c.grab(packet_id, user)
                return
            except SoldOut:
                other.append("sold_out")
                return
            except AlreadyClaimed as e:  # a retry of a grab that did land
                won[user] = e.grabbed
                return
            except Unavailable:
                if not retry_unavailable:
                    other.append("unavailable")
                    return
                await asyncio.sleep(0.01)
        other.append("gave_up")

    await asyncio.gather(*(one(i, u) for i, u in enumerate(users)))
    return won, other


async def assert_claims_match(anbao, packet_id, won, count, total):
    conn = await asyncpg.connect(anbao.dsn)
    try:
        rows = await conn.fetch("SELECT user_id, seq, amount_cents FROM claims_all WHERE packet_id = $1", packet_id)
    finally:
        await conn.close()
    in_db = {r["user_id"]: (r["seq"], r["amount_cents"]) for r in rows}
    assert len(rows) == count, "oversale or undersale"
    assert sorted(s for s, _ in in_db.values()) == list(range(1, count + 1))
    assert sum(a for _, a in in_db.values()) == total
    for user, g in won.items():
        assert in_db.get(user) == (g.seq, g.amount_cents), f"acknowledged grab of user {user} not durable"


async def refuse_batches_of(conn, victim: int, sleep_s: float) -> None:
    """A real fault at COMMIT: a deferred trigger makes any batch holding the
    victim's grab fail when it commits, after sleep_s (so the batches built
    behind it are in flight meanwhile), until a table `let_in` exists."""
    await conn.execute(f"""
        CREATE FUNCTION refuse_victim() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF {int(victim)} = ANY(NEW.users) AND NOT EXISTS (SELECT 1 FROM pg_class WHERE relname = 'let_in') THEN
                PERFORM pg_sleep({float(sleep_s)});
                RAISE EXCEPTION 'refused at commit for the test';
            END IF;
            RETURN NEW;
        END $$;
        CREATE CONSTRAINT TRIGGER refuse AFTER INSERT ON grab_rollups DEFERRABLE INITIALLY DEFERRED
            FOR EACH ROW EXECUTE FUNCTION refuse_victim();""")


async def database_at_version(pg, name: str, version: int) -> str:
    """A fresh database `name` migrated by hand up to schema `version` (an
    old server's schema, for upgrade tests); returns its DSN."""
    from anbao.storage import migrate

    root = await asyncpg.connect(dsn_for(pg, "postgres"))
    try:
        await root.execute(f"DROP DATABASE IF EXISTS {name}")
        await root.execute(f"CREATE DATABASE {name}")
    finally:
        await root.close()
    dsn = dsn_for(pg, name)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY,"
            " applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
        for v, path in migrate.migrations()[:version]:
            await conn.execute(Path(path).read_text())
            await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", v)
    finally:
        await conn.close()
    return dsn


def kill_postgres(pgdata: Path) -> None:
    """kill -9 of the postmaster on pgdata, then of every process it started
    (as the kernel's OOM killer or a crash would leave them)."""
    from anbao.storage import embedded

    pm = embedded.postmaster(pgdata.resolve())
    assert pm is not None, f"no postmaster on {pgdata}"
    children = pm.children()
    for p in [pm, *children]:
        try:
            p.kill()
        except Exception:  # gone already
            pass


async def explain_into(conn: asyncpg.Connection, plans: list[str], *, generic: bool = False) -> None:
    """conn sends the plan of every statement it runs, nested ones
    included, as a NOTICE appended to plans (auto_explain, JSON). generic:
    each planned as a connection keeps it after its first five calls
    (plan_cache_mode)."""
    conn.add_log_listener(lambda _c, msg: plans.append(msg.message))
    for setting in ("log_min_duration = 0", "log_nested_statements = on", "log_level = notice", "log_format = json"):
        await conn.execute(f"SET auto_explain.{setting}")
    if generic:
        await conn.execute("SET plan_cache_mode = force_generic_plan")
    await conn.execute("LOAD 'auto_explain'")


def plans_of(plans: list[str], marker: str) -> list[dict]:
    """The JSON plans (explain_into) of the statements whose text holds marker."""
    return [json.loads(p[p.index("{") :]) for p in plans if marker in p and "{" in p]


def plan_nodes(plan: dict):
    """Every node of a JSON plan, depth first."""
    yield plan
    for child in plan.get("Plans", []):
        yield from plan_nodes(child)
