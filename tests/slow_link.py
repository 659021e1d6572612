"""A slow network in front of a real PostgreSQL: a Unix-socket forwarder
whose bytes toward the server wait `delay_ms` first.

A storm on this machine sells a packet out in milliseconds, faster than a
test's own event loop reads its answers, so a fault timed by those answers
can land after the end. Behind a slow link every commit takes a round trip
of real latency, the storm lasts seconds, and a fault lands inside it.

The forwarder runs its own event loop in a thread: the storm keeps the
test's loop busy, and that must not change the latency."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import threading
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

CHUNK_BYTES = 64 * 1024
STOP_BOUND_S = 5.0


def _socket_of(dsn: str) -> tuple[Path, str]:
    parts = urlsplit(dsn)
    host = dict(parse_qsl(parts.query))["host"]
    return Path(host), f".s.PGSQL.{parts.port or 5432}"


class SlowLink:
    def __init__(self, dsn: str, delay_ms: float = 0.0):
        self.delay_ms = delay_ms  # read per chunk: a test may change it mid-run
        self._target_dir, self._name = _socket_of(dsn)
        self._dir = Path(tempfile.mkdtemp(prefix="slow"))  # short: a socket path has 107 bytes
        parts = urlsplit(dsn)
        query = dict(parse_qsl(parts.query)) | {"host": str(self._dir)}
        self.dsn = urlunsplit(parts._replace(query=urlencode(query)))
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="slow-link", daemon=True)

    def start(self) -> SlowLink:
        self._thread.start()
        assert self._ready.wait(STOP_BOUND_S), "the slow link did not start"
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(STOP_BOUND_S)
        shutil.rmtree(self._dir, ignore_errors=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(asyncio.start_unix_server(self._link, path=str(self._dir / self._name)))
        self._ready.set()
        self._loop.run_forever()

    async def _link(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_unix_connection(str(self._target_dir / self._name))
        except OSError:
            client_w.close()
            return
        await asyncio.gather(self._pump(client_r, server_w, slow=True), self._pump(server_r, client_w, slow=False))

    async def _pump(self, r: asyncio.StreamReader, w: asyncio.StreamWriter, slow: bool) -> None:
        try:
            while chunk := await r.read(CHUNK_BYTES):
                if slow and self.delay_ms > 0:
                    await asyncio.sleep(self.delay_ms / 1000)
                w.write(chunk)
                await w.drain()
        except OSError:
            pass
        finally:
            w.close()  # one side's end is the other's: a killed client's backend sees it
