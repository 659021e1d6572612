"""Each SQL function's current text has one home, anbao/storage/functions/
(issue 21 item 5): the database holds exactly those functions, each as its
file says, and a file that changes is applied again at the next migrate."""

import re

import asyncpg

from anbao.storage import migrate as migrate_mod


def _body(path) -> str:
    text = path.read_text()
    return text[text.index("$$") + 2 : text.rindex("$$")]


async def _functions(conn) -> dict[str, str]:
    rows = await conn.fetch(
        "SELECT p.proname, p.prosrc FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
        " WHERE n.nspname = 'public' AND p.proname LIKE 'anbao%'"
    )
    return {r[0]: r[1] for r in rows}


async def test_the_database_holds_each_function_as_its_file_says(fresh_dsn):
    files = {p.stem: p for p in migrate_mod.functions()}
    conn = await asyncpg.connect(fresh_dsn)
    try:
        live = await _functions(conn)
    finally:
        await conn.close()
    assert set(live) == set(files), "a function without its file, or a file without its function"
    for name, path in files.items():
        assert live[name] == _body(path), f"{name} is not as {path.name} says"
        assert re.match(r"(--[^\n]*\n)*CREATE OR REPLACE FUNCTION " + name + r"\(", path.read_text()), path.name


async def test_a_function_whose_text_changed_is_applied_again(fresh_dsn):
    conn = await asyncpg.connect(fresh_dsn)
    try:
        # As if the file had changed since the database applied it: another
        # body in force, and another text recorded.
        await conn.execute(
            "CREATE OR REPLACE FUNCTION anbao_unscoped_key(p_key BYTEA) RETURNS BYTEA LANGUAGE sql IMMUTABLE"
            " AS $$ SELECT p_key $$"
        )
        await conn.execute("UPDATE schema_functions SET sha256 = '\\x00' WHERE name = 'anbao_unscoped_key'")
        assert await conn.fetchval("SELECT anbao_unscoped_key('\\x01020304'::bytea)") == b"\x01\x02\x03\x04"
    finally:
        await conn.close()
    await migrate_mod.migrate(fresh_dsn)
    conn = await asyncpg.connect(fresh_dsn)
    try:
        key = bytes(range(20))
        assert await conn.fetchval("SELECT anbao_unscoped_key($1)", key) == key[-16:]
        # Applied once: the next migrate finds every text applied.
        assert await migrate_mod.apply_functions(conn) == 0
    finally:
        await conn.close()
