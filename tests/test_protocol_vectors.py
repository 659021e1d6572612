"""PROTOCOL.md's hex vectors, checked against both codecs: the server's
Cython one and the SDK's pure-Python one."""

import dataclasses
import enum
import json
import re
from pathlib import Path

import pytest

from anbao.core import codec
from anbao.server import answers
from anbao_client import wire
from anbao_client.protocol import Status

DOC = Path(__file__).resolve().parent.parent / "PROTOCOL.md"
KEY16 = bytes(range(16))


def _vectors():
    blocks = re.findall(r"```vector\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) >= 34, "PROTOCOL.md lost its vectors"
    return [json.loads(b) for b in blocks]


def _value(v):
    if v == "key16":
        return KEY16
    if isinstance(v, str) and v.startswith("b:"):
        return v[2:].encode()
    if isinstance(v, str) and v.startswith("hex:"):
        return bytes.fromhex(v[4:])
    if isinstance(v, list):
        return [_value(x) for x in v]
    return v


def _plain(v):
    """A decoded answer as the document writes it: dataclasses as dicts, enums as numbers."""
    if dataclasses.is_dataclass(v):
        return {f.name: _plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, enum.Enum):
        return v.value
    return v


def _tuplify(v):
    return tuple(_tuplify(x) for x in v) if isinstance(v, (list, tuple)) else v


VECTORS = _vectors()


@pytest.mark.parametrize("vec", [v for v in VECTORS if v["kind"] == "request"], ids=lambda v: v["name"])
def test_request_vector(vec):
    raw = bytes.fromhex(vec["hex"])
    fn, args = vec["sdk"]
    assert getattr(wire, fn)(*_value(args)) == raw, "SDK encoder disagrees with the document"
    opcode, rid, fields = vec["server"]
    [(got_op, got_rid, got_args)] = codec.FrameDecoder().feed(raw)
    assert (got_op, got_rid) == (opcode, rid)
    assert _tuplify(got_args) == _tuplify(_value(fields)), "server decoder disagrees with the document"


@pytest.mark.parametrize("vec", [v for v in VECTORS if v["kind"] == "response"], ids=lambda v: v["name"])
def test_response_vector(vec):
    raw = bytes.fromhex(vec["hex"])
    fn, args = vec["server"]
    args = _value(args)
    if fn == "ok":
        op, rid, worker, fields = args
        encoded = answers.ok(
            op,
            rid,
            worker,
            *[_tuplify(f) if isinstance(f, list) and f and isinstance(f[0], list) else f for f in fields],
        )
    elif fn == "error":  # an error whose body carries fields after its message (ERROR_TAILS)
        encoded = answers.error(*args)
    else:
        encoded = getattr(codec, fn)(*args)
    assert encoded == raw, "server encoder disagrees with the document"
    [r] = wire.FrameBuffer().feed(raw)
    want = vec["sdk"]
    assert (r.opcode, r.request_id, r.status, r.worker_id) == (
        want["opcode"],
        want["request_id"],
        want["status"],
        want["worker_id"],
    )
    if "hello" in want:
        h = wire.decode_hello(r.body)
        assert {k: getattr(h, k) for k in want["hello"]} == want["hello"]
    if "grab" in want:
        g = wire.decode_grab(r)
        assert {k: getattr(g, k) for k in want["grab"]} == want["grab"]
        assert g.already_claimed == (r.status == wire.Status.ALREADY_CLAIMED)
    if "stats" in want:
        assert json.loads(wire.decode_stats(r.body)) == want["stats"]
    if "topology" in want:
        t = wire.decode_topology(r)
        assert {k: getattr(t, k) for k in want["topology"]} == want["topology"]
    if "message" in want:
        assert wire.error_message(r.body) == want["message"]
    if "error_fields" in want:
        assert wire.error_fields(r.status, r.body) == want["error_fields"]
    if "sent" in want:
        assert dataclasses.asdict(wire.decode_sent(r.body)) == want["sent"]
    if "decoded" in want:
        decoder, fields = want["decoded"]
        assert _plain(getattr(wire, decoder)(r.body)) == fields, "SDK decoder disagrees with the document"
    if "packet" in want:
        p = wire.decode_packet(r.body)
        for k, v in want["packet"].items():
            got = getattr(p, k)
            if k == "claims":
                got = [[c.seq, c.user_id, c.amount_cents] for c in got]
            assert got == v, k


def test_every_message_has_vectors():
    """PROTOCOL.md shows every operation's request and OK answer bytes."""
    requests = {bytes.fromhex(v["hex"])[4] for v in VECTORS if v["kind"] == "request"}
    answered = {
        bytes.fromhex(v["hex"])[4] & 0x7F
        for v in VECTORS
        if v["kind"] == "response" and bytes.fromhex(v["hex"])[9] == 0
    }
    missing = {op.name for op in wire.Op if op not in requests} | {
        op.name + " answer" for op in wire.Op if op not in answered
    }
    assert not missing, f"no vector for {sorted(missing)}"


def test_frames_split_anywhere_decode_the_same():
    stream = b"".join(bytes.fromhex(v["hex"]) for v in VECTORS if v["kind"] == "request")
    whole = codec.FrameDecoder().feed(stream)
    for cut in range(1, len(stream), 7):
        d = codec.FrameDecoder()
        assert d.feed(stream[:cut]) + d.feed(stream[cut:]) == whole
    one_by_one = codec.FrameDecoder()
    assert [f for i in range(len(stream)) for f in one_by_one.feed(stream[i : i + 1])] == whole


@pytest.mark.parametrize(
    "payload,what",
    [
        (bytes.fromhex("00000000000000010000000000000002ff"), "trailing bytes"),
        (bytes.fromhex("000000000000000100000000000000"), "too short"),
        (bytes.fromhex("00000000000000000000000000000002"), "out of range"),
        (bytes.fromhex("80000000000000010000000000000002"), "out of range"),
    ],
)
def test_bad_grab_payload_is_a_typed_error(payload, what):
    [(op, rid, err)] = codec.FrameDecoder().feed(wire.frame(wire.Op.GRAB, 9, payload))
    assert (op, rid) == (wire.Op.GRAB, 9)
    assert isinstance(err, codec.BadRequest) and err.status == Status.INVALID and what in str(err)


def test_negative_and_zero_amounts_are_rejected_by_the_decoder():
    for amount in (0, -1, -(2**63)):
        [(_, _, err)] = codec.FrameDecoder().feed(wire.deposit(1, KEY16, 5, amount))
        assert isinstance(err, codec.BadRequest) and "positive" in str(err)


def test_unknown_opcode_and_framing_errors():
    [(op, rid, err)] = codec.FrameDecoder().feed(wire.frame(0x7E, 3, b"xyz"))
    assert err.status == Status.UNKNOWN_OPCODE
    with pytest.raises(codec.FramingError) as e:
        codec.FrameDecoder(1024).feed((2000).to_bytes(4, "big") + b"\x21")
    assert e.value.status == Status.FRAME_TOO_LARGE
    with pytest.raises(codec.FramingError):
        codec.FrameDecoder().feed(b"\x00\x00\x00\x02\x21\x00")


def test_every_operation_has_vectors():
    """Every opcode has a request vector; every one whose answer is more
    than a few integers has an answer vector too."""
    requests = {bytes.fromhex(v["hex"])[4] for v in VECTORS if v["kind"] == "request"}
    answers = {v["sdk"]["opcode"] for v in VECTORS if v["kind"] == "response"}
    assert set(wire.Op) <= requests, set(wire.Op) - requests
    plain_integers = {wire.Op.PING, wire.Op.REGISTER, wire.Op.DEPOSIT, wire.Op.BALANCE}
    assert set(wire.Op) - plain_integers <= answers, set(wire.Op) - plain_integers - answers


def _section(title: str) -> str:
    text = DOC.read_text()
    start = text.index(title)
    end = text.find("\n## ", start + len(title))
    return text[start : end if end >= 0 else len(text)]


def test_the_operations_table_is_one_table_with_every_opcode():
    """It broke after STATS, and WITHDRAW .. GROUP_INFO rendered as loose text."""
    lines = _section("## Operations").split("\n")
    first = next(i for i, line in enumerate(lines) if line.startswith("| opcode"))
    table = []
    for line in lines[first:]:
        if not line.startswith("|"):
            break
        table.append(line)
    opcodes = [int(row.split("|")[1], 16) for row in table[2:]]
    assert sorted(opcodes) == sorted(int(op) for op in wire.Op), "every opcode, once, in the one table"
    stray = [line for line in lines[first + len(table) :] if line.startswith("| 0x")]
    assert not stray, f"rows outside the table: {stray}"


def test_the_status_table_has_every_status():
    rows = [line for line in _section("## Status codes").split("\n") if line.startswith("| ") and "|---" not in line]
    codes = {int(r.split("|")[1]): r.split("|")[2].strip() for r in rows[1:]}
    assert codes == {s.value: s.name for s in wire.Status}


def test_the_conversation_rules_are_written_down():
    """What a client written from PROTOCOL.md alone needs and did not find."""
    doc = DOC.read_text()
    assert "(opcode 0, request id" not in doc, "the fatal frame's opcode byte is 0x80"
    for needed in (
        "opcode byte `0x80`",
        "**Request ids.**",
        "**Pipelined behind HELLO.**",
        "**A second HELLO**",
        "**A refused HELLO.**",
        "### Tokens",
        "`max_queued_grabs`",
        "may not grab it: `NOT_ELIGIBLE`",
        "IN_DOUBT",
        "**A client that does not read**",
    ):
        assert needed in doc, needed


def _prose_examples() -> list[str]:
    """PROTOCOL.md's paragraphs outside the vector blocks that spell bytes
    out in backticks (four hex tokens or more)."""
    prose = re.sub(r"```vector\n.*?```", "", DOC.read_text(), flags=re.S)
    paragraphs = [" ".join(p.split()) for p in prose.split("\n\n")]
    return [p for p in paragraphs if len(re.findall(r"`[0-9a-f]{2,}(?:…[0-9a-f]{2,})?`", p)) >= 4]


def test_every_prose_example_is_checked():
    """Every example written out in PROTOCOL.md's prose is the bytes of the
    vectors it names (so the codecs check it too), in order; and every
    length and byte count it states is the one its bytes say."""
    examples = _prose_examples()
    assert len(examples) >= 6, "PROTOCOL.md lost its examples"
    by_name = {v["name"]: v["hex"] for v in VECTORS}
    for text in examples:
        named = [n for n in re.findall(r"`([a-z][a-z-]*)`", text) if n in by_name]
        assert named, f"an example that names no vector: {text[:80]}"
        whole = "".join(by_name[n] for n in named)
        pos = 0
        for token in re.findall(r"`([0-9a-f]{2,}(?:…[0-9a-f]{2,})?)`", text):
            if token in (by_name[n] for n in named):  # the whole frame again, after its pieces
                continue
            for part in token.split("…"):
                found = whole.find(part, pos)
                while found != -1 and found % 2:  # bytes start at even hex offsets
                    found = whole.find(part, found + 1)
                assert found != -1, f"`{token}` is not next in the bytes of {named}: {text[:80]}"
                pos = found + len(part)
        for hex_, n in re.findall(r"`([0-9a-f]+)` length (\d+)", text):
            assert int(hex_, 16) == int(n), f"`{hex_}` is length {int(hex_, 16)}, not {n}"
        for hex_, n in re.findall(r"`([0-9a-f]+)` (?:then the |\+ )(\d+)[- ]byte", text):
            assert int(hex_, 16) == int(n), f"`{hex_}` counts {int(hex_, 16)} bytes, not {n}"
        for hex_, quoted in re.findall(r'`([0-9a-f]{4})` "([^"]*)"', text):
            assert int(hex_, 16) == len(quoted.encode()), f'`{hex_}` is not the length of "{quoted}"'


def test_a_packet_answer_without_the_group_reads_as_group_0():
    """group_id was added at the end of PACKET's answer within version 1: an
    answer that ends after the claims (an older server) reads as group 0."""
    from anbao.server import answers
    from anbao_client import wire
    from anbao_client.protocol import RESPONSE_HEADER_BYTES
    from anbao_client.wire import Op

    fields = [42, 1000, 2, 1, 1, 3, 1700000000000, 1700086400000, 1000, 2, 0, 2, "hi", [(1, 7, 400), (2, 8, 600)]]
    frame = answers.ok(Op.PACKET, 8, 0, *fields, 77)
    with_group = wire.decode_packet(frame[RESPONSE_HEADER_BYTES:])
    without = wire.decode_packet(frame[RESPONSE_HEADER_BYTES:-8])
    assert (with_group.group_id, without.group_id) == (77, 0)
    assert without.claims == with_group.claims and without.greeting == "hi"
