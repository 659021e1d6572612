"""A small synchronous wrapper: the async Client on a private event loop."""
from __future__ import annotations

import asyncio

from .client import Client


class SyncClient:
    def __init__(self, host: str, port: int, token: str | bytes, **kwargs):
        self._loop = asyncio.new_event_loop()
        self._client = self._loop.run_until_complete(Client.connect(host, port, token, **kwargs))

    def __getattr__(self, name):
        method = getattr(self._client, name)
        if not callable(method):
            return method

        def call(*args, **kwargs):
            return self._loop.run_until_complete(method(*args, **kwargs))
        return call

    def close(self) -> None:
        self._loop.run_until_complete(self._client.close())
        self._loop.close()

    def __enter__(self) -> "SyncClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
