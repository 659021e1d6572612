"""Seeded, bounded fuzzing against a live worker: well-formed requests,
the same mutated (bit flips, cut or grown payloads, other opcodes, lying
lengths) and raw garbage, over many connections. Every complete frame gets
exactly one typed answer (never INTERNAL) under its own request id and
opcode, a bad length gets the fatal frame last, and afterwards the server
still serves and the books balance."""

import asyncio
import os
import random
import struct

from helpers import ADMIN_TOKEN, funded_users

from anbao.config import Limits
from anbao.core import codec
from anbao_client import wire
from anbao_client.wire import Status

SEED = 20_261_125
CONNECTIONS = 60
FRAMES_PER_CONNECTION = 60  # 3,600 frames a run
READ_TIMEOUT_S = 10
MAX_REQUESTS_BEFORE_HELLO = Limits().connection.max_requests_before_hello  # the anbao fixture's


def templates(packet_id: int, users: list[int], group_id: int) -> list[bytes]:
    """One well-formed request of every kind, with ids that exist."""
    a, b = users[0], users[1]
    key = os.urandom(16)
    return [
        wire.ping(1),
        wire.topology(1),
        wire.stats(1),
        wire.balance(1, a),
        wire.register(1, [a, 10**6]),
        wire.deposit(1, key, a, 5),
        wire.withdraw(1, key, a, 5),
        wire.grab(1, packet_id, b),
        wire.packet(1, packet_id, 0, 10),
        wire.statement(1, a, 0, 5),
        wire.sent_list(1, a, 0, 5),
        wire.received_list(1, b, 0, 5),
        wire.send(1, os.urandom(16), a, 10, 2, 1, 0, 0, [], "hi"),
        wire.group_create(1, group_id, "g", [a, b]),
        wire.group_add(1, group_id, [b]),
        wire.group_remove(1, group_id, [b]),
        wire.group_info(1, group_id, 0, 10),
        wire.audit(1),
        wire.hello(1, b"not a token"),
    ]


def mutate(rng: random.Random, frame: bytes, rid: int) -> bytes:
    """The frame under rid, then perhaps broken in one way."""
    body = bytearray(frame[:5] + struct.pack(">I", rid) + frame[9:])
    kind = rng.random()
    if kind < 0.45:
        return bytes(body)  # as it is
    payload = body[9:]
    if kind < 0.6 and payload:
        for _ in range(rng.randint(1, 3)):  # bit flips in the payload
            i = rng.randrange(len(payload))
            payload[i] ^= 1 << rng.randrange(8)
    elif kind < 0.7:
        payload = payload[: rng.randint(0, len(payload))]  # cut short
    elif kind < 0.8:
        payload += bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 12)))  # trailing bytes
    elif kind < 0.9:
        body[4] = rng.randrange(256)  # another opcode
    else:
        payload = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 80)))  # a random payload
    return struct.pack(">I", 5 + len(payload)) + bytes(body[4:9]) + bytes(payload)


def expected(stream: bytes, authenticated: bool) -> tuple[list[tuple[int, int]], set[int]]:
    """(opcode, request id) of every request the server must answer, and
    the statuses its fatal frame may have (none: no fatal frame): the
    decoder's own reading of the stream, and HELLO's rules (at most
    max_requests_before_hello requests before one succeeds)."""
    d = codec.FrameDecoder()
    try:
        frames, fatal = d.feed(stream), set()
    except codec.FramingError as exc:
        frames, fatal = exc.frames, {Status.INVALID, Status.FRAME_TOO_LARGE}
    out = []
    for opcode, rid, args in frames:
        if not authenticated and len(out) == MAX_REQUESTS_BEFORE_HELLO:
            return out, {Status.UNAUTHENTICATED}  # one too many: not answered, the fatal frame instead
        out.append((opcode, rid))
        if not authenticated and opcode == wire.Op.HELLO and type(args) is tuple:
            version, token = args
            if version == wire.PROTOCOL_VERSION:
                if token == ADMIN_TOKEN.encode():
                    authenticated = True
                else:
                    return out, set()  # answered, then the connection closes
    return out, fatal


async def test_fuzzed_frames_get_typed_answers_and_the_server_stays_healthy(anbao):
    rng = random.Random(SEED)
    admin = await anbao.client("admin")
    users = await funded_users(admin, 1, 4, 100_000)
    sent = await admin.send(users[2], 5_000, 50)
    await admin.group_create(900, [users[0]])
    base = templates(sent.packet_id, users, 900)
    totals = {"frames": 0, "fatal": 0, "statuses": {}}
    for c in range(CONNECTIONS):  # bounded
        r, w = await asyncio.open_connection("127.0.0.1", anbao.port)
        authenticated = rng.random() < 0.85
        stream = wire.hello(0xFFFFFFF0, ADMIN_TOKEN.encode()) if authenticated else b""
        parts = []
        for i in range(FRAMES_PER_CONNECTION):
            if rng.random() < 0.008:  # raw garbage: usually a lying length, so the end of the connection
                parts.append(bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 40))))
            else:
                parts.append(mutate(rng, rng.choice(base), 1000 * c + i))
        stream += b"".join(parts)
        want, fatal = expected(stream, False)
        # In pieces of random size, as a network would deliver them.
        pos = 0
        while pos < len(stream):
            n = rng.randint(1, 700)
            w.write(stream[pos : pos + n])
            pos += n
            if rng.random() < 0.2:
                await asyncio.sleep(0)
        # Read until every answer is in, or the server closes.
        data = b""
        frames = wire.FrameBuffer()
        got = []
        while len(got) < len(want) + bool(fatal):
            try:
                chunk = await asyncio.wait_for(r.read(65536), READ_TIMEOUT_S)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
            got += frames.feed(chunk)
        opcode_bytes, at = [], 0
        for _ in got:
            opcode_bytes.append(data[at + 4])
            at += 4 + struct.unpack_from(">I", data, at)[0]
        answers = list(zip(opcode_bytes, got, strict=True))
        if fatal:
            op_byte, last = answers.pop()
            assert (op_byte, last.request_id) == (0x80, 0) and last.status in fatal, (c, last)
            totals["fatal"] += 1
        assert sorted((rid for _, rid in want)) == sorted(a.request_id for _, a in answers), (
            f"connection {c}",
            authenticated,
            fatal,
            want[:5],
            data[:200],
            stream[:120],
        )
        by_rid = {}
        for opcode, rid in want:
            by_rid.setdefault(rid, []).append(opcode)
        for op_byte, a in answers:
            assert a.status in set(Status) and a.status != Status.INTERNAL, (c, a, wire.error_message(a.body))
            req_opcode = by_rid[a.request_id].pop(0) if len(by_rid[a.request_id]) == 1 else None
            if req_opcode is not None:
                assert op_byte == (req_opcode | 0x80 if req_opcode < 0x80 else 0x80), (c, hex(op_byte), req_opcode)
            if a.status not in (Status.OK, Status.ALREADY_CLAIMED):
                assert wire.error_message(a.body) is not None
            totals["statuses"][Status(a.status).name] = totals["statuses"].get(Status(a.status).name, 0) + 1
        totals["frames"] += len(want)
        w.close()
    print("fuzz:", totals)
    assert totals["frames"] > CONNECTIONS * FRAMES_PER_CONNECTION // 2 and totals["fatal"] > 0
    assert await admin.ping() == 0
    assert (await admin.stats())["connections"] >= 1
    await anbao.assert_audit_clean()
