"""Versioned SQL migrations, applied in order at start-up and by `anbao migrate`."""

from __future__ import annotations

import logging
from pathlib import Path

import asyncpg

log = logging.getLogger("anbao.migrate")
MIGRATIONS_DIR = Path(__file__).parent / "migrations"
LOCK_KEY = 0x616E62616F  # "anbao": one migrator at a time across workers


def migrations() -> list[tuple[int, Path]]:
    out = sorted((int(p.name.split("_", 1)[0]), p) for p in MIGRATIONS_DIR.glob("*.sql"))
    # Numbers are unique and start at 1; a gap is allowed, since a number may
    # be reserved for work on another branch (each one is applied once, in
    # number order, whenever it is missing).
    versions = [v for v, _ in out]
    assert versions and versions[0] == 1 and len(set(versions)) == len(versions), "migrations are numbered 1.., once"
    return out


async def migrate(dsn: str) -> int:
    """Applies what is missing; returns the schema version now in force."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
        done = {r[0] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        version = max(done, default=0)
        for v, path in migrations():
            if v in done:
                continue
            async with conn.transaction():
                await conn.execute(path.read_text())
                await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", v)
            log.info("applied migration %s", path.name)
            version = max(version, v)
        return version
    finally:
        await conn.close()
