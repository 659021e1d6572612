"""A database failure is logged once per interval on every path (issue
18): the engine's "loading packet N failed", logged once per grab, put
1,300 warnings in the log during a 5 s PostgreSQL stop."""

import asyncio
import logging

import pytest
from helpers import Anbao

from anbao.config import Limits
from anbao_client import Unavailable

pytestmark = pytest.mark.timeout(60)


async def test_failed_packet_loads_are_logged_once_per_interval(fresh_dsn, tokens_file, caplog):
    server = await Anbao(fresh_dsn, tokens_file, Limits.of(db_down_log_interval_ms=60_000)).start()
    try:
        app = await server.client("app")
        # A real failure of every packet load: the table it reads is gone.
        await server.fetchval("ALTER TABLE packets RENAME TO packets_away")
        caplog.set_level(logging.WARNING, logger="anbao.grabs")
        for packet_id in range(1, 51):  # 50 packets, each loaded (and failing) once
            with pytest.raises(Unavailable):
                await asyncio.wait_for(app.grab(packet_id, 7), 5)
        loads = [r for r in caplog.records if r.name == "anbao.grabs" and "loading packet" in r.msg]
        assert len(loads) == 1, f"{len(loads)} warnings for one failure"
        await server.fetchval("ALTER TABLE packets_away RENAME TO packets")
    finally:
        await server.stop()
