"""A client whose chosen source port is the server's port, while nothing
listens there (a server stopping), is connected to itself by TCP's
simultaneous open. It used to read its own HELLO back as the answer: the
token's second byte became the scope ("101 is not a valid Scope" in
test_sigterm_drains_then_exits, once in a few hundred runs). The connect
now fails like a taken port, and a steered connect draws another."""

import socket

import pytest

from anbao_client import Client

pytestmark = pytest.mark.fast


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_a_connection_to_itself_is_refused():
    port = _free_port()
    with pytest.raises(OSError, match="connected to itself"):
        await Client.connect("127.0.0.1", port, "test-app-token-0123456789", local_port=port, timeout_ms=2000)
