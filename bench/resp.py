"""A minimal RESP2 codec (Redis's wire protocol), for the Redis baseline:
the load generator speaks it straight to redis-server, with no adaptor in
between, and the bench's setup and checks use the small blocking client.

Replies decode to Python values: integer -> int, bulk string -> bytes,
nil (bulk or array) -> None, simple string -> str, error -> RespError,
array -> list. Only what the grab script and the setup commands need;
RESP3 is never asked for (no HELLO 3).
"""

from __future__ import annotations

import socket

CRLF = b"\r\n"


class RespError(Exception):
    """An error reply ("-ERR ..."); a value in a reply list, raised by Client.call."""

    def __eq__(self, other) -> bool:
        return isinstance(other, RespError) and self.args == other.args

    def __hash__(self) -> int:
        return hash(self.args)


class _Incomplete(Exception):
    pass


def _bytes(arg) -> bytes:
    if isinstance(arg, bytes):
        return arg
    if isinstance(arg, str):
        return arg.encode()
    if isinstance(arg, int):
        return b"%d" % arg
    raise TypeError(f"RESP argument {arg!r}")


def encode_command(*args) -> bytes:
    """One command as a RESP array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        b = _bytes(a)
        parts.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(parts)


def command_prefix(*args, total: int) -> bytes:
    """The first len(args) arguments of a command of `total` arguments, so
    that a caller appends the rest with encode_arg (the grab encoder builds
    every EVALSHA from a prefix per packet and the user id)."""
    parts = [b"*%d\r\n" % total]
    for a in args:
        b = _bytes(a)
        parts.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(parts)


def encode_arg(arg) -> bytes:
    b = _bytes(arg)
    return b"$%d\r\n%s\r\n" % (len(b), b)


def _parse(buf, pos: int, n: int):
    """(value, position after it) of the reply at pos; _Incomplete if it is not all there."""
    end = buf.find(CRLF, pos)
    if end < 0:
        raise _Incomplete
    t = buf[pos]
    line = bytes(buf[pos + 1 : end])
    if t == 58:  # ':' integer
        return int(line), end + 2
    if t == 36:  # '$' bulk string
        ln = int(line)
        if ln < 0:
            return None, end + 2
        stop = end + 2 + ln
        if stop + 2 > n:
            raise _Incomplete
        if buf[stop : stop + 2] != CRLF:
            raise ValueError("bulk string not followed by CRLF")
        return bytes(buf[end + 2 : stop]), stop + 2
    if t == 43:  # '+' simple string
        return line.decode("utf-8", "replace"), end + 2
    if t == 45:  # '-' error
        return RespError(line.decode("utf-8", "replace")), end + 2
    if t == 42:  # '*' array
        count = int(line)
        if count < 0:
            return None, end + 2
        pos = end + 2
        items = []
        for _ in range(count):
            v, pos = _parse(buf, pos, n)
            items.append(v)
        return items, pos
    raise ValueError(f"not a RESP2 reply: type byte {t!r}")


class ReplyParser:
    """Splits a byte stream into replies, in order (Redis answers a
    connection's commands in the order it sent them)."""

    def __init__(self):
        self._buf = bytearray()

    def feed(self, data: bytes) -> list:
        buf = self._buf
        buf += data
        n = len(buf)
        out = []
        pos = 0
        find = buf.find
        try:
            while pos < n:
                t = buf[pos]
                if t == 58:  # the grab's amount, inline for speed
                    end = find(CRLF, pos)
                    if end < 0:
                        break
                    out.append(int(buf[pos + 1 : end]))
                    pos = end + 2
                    continue
                v, pos = _parse(buf, pos, n)
                out.append(v)
        except _Incomplete:
            pass
        del buf[:pos]
        return out


class Client:
    """A blocking RESP2 client for setup and checks (not for the load)."""

    def __init__(self, host: str, port: int, timeout: float = 60.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.parser = ReplyParser()
        self.replies: list = []

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _read(self, n: int) -> list:
        while len(self.replies) < n:
            data = self.sock.recv(1 << 20)
            if not data:
                raise ConnectionError("redis closed the connection")
            self.replies += self.parser.feed(data)
        out, self.replies = self.replies[:n], self.replies[n:]
        return out

    def call(self, *args):
        self.sock.sendall(encode_command(*args))
        [reply] = self._read(1)
        if isinstance(reply, RespError):
            raise reply
        return reply

    def pipeline(self, commands, chunk: int = 5000) -> list:
        """Sends commands (tuples of arguments) chunk by chunk, each chunk in
        one write, and returns every reply in order (errors as values)."""
        commands = list(commands)
        out = []
        for i in range(0, len(commands), chunk):
            part = commands[i : i + chunk]
            self.sock.sendall(b"".join(encode_command(*c) for c in part))
            out += self._read(len(part))
        return out
