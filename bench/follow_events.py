"""The parent half of --follow-events: starts bench/follower.py, the consumer
reading the event feed during the load, and reads what it saw."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg

from .server import AnbaoServer


class EventFollower:
    """A consumer process reading the event feed during the load (bench/follower.py)."""

    def __init__(self, proc: subprocess.Popen, status: Path, after: int):
        self.proc, self.status, self.after = proc, status, after

    @classmethod
    async def start(cls, server: AnbaoServer, dsn: str) -> EventFollower:
        conn = await asyncpg.connect(dsn)
        try:
            after = await conn.fetchval("SELECT numbered_through FROM event_feed")
        finally:
            await conn.close()
        status = Path(tempfile.mkdtemp(prefix="anbao-follower-")) / "status.json"
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.follower",
                server.host,
                str(server.port),
                server.tokens["app"],
                str(after),
                str(status),
            ],
        )
        for _ in range(100):  # bounded: 5 s to connect
            if status.exists():
                break
            await asyncio.sleep(0.05)
        return cls(proc, status, after)

    def _state(self) -> dict:
        try:
            return json.loads(self.status.read_text())
        except (OSError, ValueError):
            return {"events": 0, "last": self.after}

    async def finish(self, dsn: str, timeout_s: float = 60) -> dict:
        """Right after the load: how far behind the feed the follower was,
        and how long it took to reach every event numbered by then."""
        t0 = time.monotonic()
        conn = await asyncpg.connect(dsn)
        try:
            at_end = self._state()
            head = 0
            while time.monotonic() - t0 < timeout_s:
                if not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM event_log WHERE last_no IS NULL)"):
                    head = await conn.fetchval("SELECT numbered_through FROM event_feed")
                    if self._state()["last"] >= head:
                        break
                await asyncio.sleep(0.02)
        finally:
            await conn.close()
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        done = self._state()
        return {
            "events_read": done["events"],
            "events_behind_at_load_end": max(0, head - at_end["last"]),
            "caught_up_s": round(time.monotonic() - t0, 3),
            "caught_up": done["last"] >= head > 0,
        }
