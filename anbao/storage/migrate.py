"""Versioned SQL migrations, applied in order at start-up and by `anbao migrate`,
then the SQL functions' current texts.

A migration changes tables and data, once. A function's current text has
one home, `functions/<name>.sql` (CREATE OR REPLACE), applied after the
migrations whenever it differs from what the database last applied (its
SHA-256 in schema_functions): a migration adds a function or drops one (or
changes one whose text must commit with the migration, a trigger function
with its trigger), and a later change to it edits its file. The texts in older migrations are the
functions as those migrations left them, for the migrations after them."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import asyncpg

log = logging.getLogger("anbao.migrate")
MIGRATIONS_DIR = Path(__file__).parent / "migrations"
FUNCTIONS_DIR = Path(__file__).parent / "functions"
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
        await apply_functions(conn)
        return version
    finally:
        await conn.close()


def functions() -> list[Path]:
    return sorted(FUNCTIONS_DIR.glob("*.sql"))


async def apply_functions(conn: asyncpg.Connection) -> int:
    """Applies every function file whose text the database has not applied
    yet, in one transaction; returns how many. The caller holds LOCK_KEY."""
    await conn.execute("CREATE TABLE IF NOT EXISTS schema_functions (name TEXT PRIMARY KEY, sha256 BYTEA NOT NULL)")
    applied = {r[0]: bytes(r[1]) for r in await conn.fetch("SELECT name, sha256 FROM schema_functions")}
    todo = []
    for path in functions():
        text = path.read_text()
        sha = hashlib.sha256(text.encode()).digest()
        if applied.get(path.stem) != sha:
            todo.append((path, text, sha))
    if todo:
        async with conn.transaction():
            for path, text, sha in todo:
                await conn.execute(text)
                await conn.execute(
                    "INSERT INTO schema_functions (name, sha256) VALUES ($1, $2)"
                    " ON CONFLICT (name) DO UPDATE SET sha256 = EXCLUDED.sha256",
                    path.stem,
                    sha,
                )
        log.info("applied %d function(s): %s", len(todo), ", ".join(p.stem for p, _, _ in todo))
    return len(todo)
