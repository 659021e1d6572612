"""A new user's first hour (issue 19): every mistake gets a clear answer
and the right exit code, the command line speaks yuan (refusals included),
and what it prints is true. Real servers throughout: the in-loop worker,
`anbao serve`, the embedded PostgreSQL, memcached."""

import asyncio
import json
import logging
import subprocess
import sys
import time

import asyncpg
from helpers import Raw, dsn_for, funded_users
from served import free_port

from anbao.cli import EXIT_REFUSED, EXIT_UNREACHABLE
from anbao.cliutil import yuan_in_text
from anbao.config import AdmissionTuning
from anbao_client import wire
from anbao_client.protocol import Status

ANBAO = [sys.executable, "-m", "anbao.cli"]


async def cli(*args, cwd=None, server=None, as_json=False):
    """`anbao ARGS` (against `server`, an in-loop Anbao, when given): (exit code, stdout, stderr)."""
    where = ["--port", str(server.port), "--tokens-file", str(server.tokens_file)] if server else []
    proc = await asyncio.create_subprocess_exec(
        *ANBAO,
        *map(str, args),
        *where,
        *(["--json"] if as_json else []),
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, out.decode(), err.decode()


# ---------------------------------------------------------------- item 3: mistakes answered clearly


async def test_audit_where_no_server_ran_creates_nothing_and_exits_2(tmp_path):
    rc, out, err = await cli("audit", cwd=tmp_path)
    assert rc == 2, out + err
    assert "nothing to audit" in err and "--dsn" in err and "Traceback" not in err
    assert not (tmp_path / ".anbao").exists(), "no embedded PostgreSQL made where none was"


async def test_audit_of_a_database_without_the_schema_exits_2(pg, tmp_path):
    root = await asyncpg.connect(dsn_for(pg, "postgres"))
    try:
        await root.execute("DROP DATABASE IF EXISTS not_anbao")
        await root.execute("CREATE DATABASE not_anbao")
    finally:
        await root.close()
    rc, out, err = await cli("audit", "--dsn", dsn_for(pg, "not_anbao"), cwd=tmp_path)
    assert rc == 2 and "has no anbao tables" in err and "Traceback" not in err, out + err


async def test_client_command_without_a_token_exits_2(tmp_path):
    rc, out, err = await cli("balance", "1", cwd=tmp_path)
    assert rc == 2 and out == ""
    assert "no token" in err and "make run" in err and "Traceback" not in err


async def test_client_command_where_nothing_listens_exits_4(tmp_path):
    rc, _, err = await cli("balance", "1", "--port", free_port(), "--token", "x", cwd=tmp_path)
    assert rc == EXIT_UNREACHABLE and "nothing listens there" in err


async def test_a_server_that_hangs_up_is_no_answer_not_a_refusal(tmp_path):
    """A connection lost is an AnbaoError (OutcomeUnknown) in the SDK, but no
    server answered: the CLI says "no answer" and exits UNREACHABLE, never a
    refusal with a made-up status."""

    async def hang_up(reader, writer):
        writer.transport.abort()  # a real peer that closes at once

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        rc, out, err = await cli("balance", "1", "--port", port, "--token", "x", cwd=tmp_path)
    finally:
        server.close()
        await server.wait_closed()
    assert rc == EXIT_UNREACHABLE and "no answer from" in err and "Traceback" not in err, out + err


async def test_an_answer_that_is_not_the_protocol_is_recognised_at_once(serve, tmp_path):
    """Pointed at the metrics port: told at once that it is an HTTP server,
    not after the request timeout (10 s) as 'no answer'."""
    s = serve(workers=1)
    started = time.monotonic()
    rc, _, err = await cli("balance", "1", "--port", s.metrics_port, "--token", "x", cwd=tmp_path)
    assert rc == EXIT_UNREACHABLE and "is not an anbao server" in err and "HTTP server" in err, err
    assert time.monotonic() - started < 5, "recognised at once, not at the request timeout"


async def test_bad_command_lines_exit_2(anbao):
    rc, _, err = await cli("register", "5-1", server=anbao)
    assert rc == 2 and "runs backwards" in err
    rc, _, err = await cli("register", ",", server=anbao)
    assert rc == 2 and "no ids" in err
    rc, _, err = await cli("demo", "--members", 1, server=anbao)
    assert rc == 2 and "--members 2.." in err and "Traceback" not in err
    admin = await anbao.client("admin")
    assert await anbao.fetchval("SELECT count(*) FROM accounts WHERE kind = 1") == 0, "nothing registered"
    await admin.close()


# ---------------------------------------------------------------- item 5: yuan everywhere


def test_amounts_in_a_message_are_rendered_in_yuan():
    assert yuan_in_text("balance 28525 cents below 50000 cents") == "balance 285.25 yuan below 500.00 yuan"
    assert yuan_in_text("10000000 cents cannot be split into 1 shares of at most 20000 cents") == (
        "100,000.00 yuan cannot be split into 1 shares of at most 200.00 yuan"
    )
    # Ids and counts are not amounts; only what the server marks as cents is.
    assert yuan_in_text("unknown packet 1024; 3 shares") == "unknown packet 1024; 3 shares"


async def test_refusals_are_shown_in_yuan(anbao):
    admin = await anbao.client("admin")
    await funded_users(admin, 1, 2, 28_525)
    rc, _, err = await cli("withdraw", 1, "500", server=anbao)
    assert rc == EXIT_REFUSED
    assert err.strip() == "anbao: INSUFFICIENT_FUNDS: balance 285.25 yuan below 500.00 yuan"
    rc, _, err = await cli("send", 1, "285", 1, server=anbao)
    assert rc == EXIT_REFUSED
    assert "SHARE_ABOVE_MAX: 285.00 yuan cannot be split into 1 shares of at most 200.00 yuan" in err
    rc, _, err = await cli("send", 1, "300", 1, "--fixed", server=anbao)
    assert "a share of 300.00 yuan is above the maximum share of 200.00 yuan" in err
    rc, _, err = await cli("send", 1, "0.02", 3, server=anbao)
    assert "total 0.02 yuan below 3 shares of at least 0.01 yuan" in err
    # --json keeps the server's words: amounts in cents, like every --json field.
    rc, out, _ = await cli("withdraw", 2, "500", server=anbao, as_json=True)
    assert json.loads(out)["message"] == "balance 28525 cents below 50000 cents"
    await admin.close()


# ---------------------------------------------------------------- item 6: what it prints is true


async def test_send_and_packet_say_what_happened(anbao):
    admin = await anbao.client("admin")
    await funded_users(admin, 1, 3, 10_000)
    await admin.group_create(77, [1, 2, 3], name="家人")
    rc, out, err = await cli("send", 1, "10", 2, "--group", 77, "--greeting", "恭喜发财", "--expiry", 1, server=anbao)
    assert rc == 0, err
    line = out.strip()
    assert "\n" not in line and not line.endswith(";"), "one whole line, never cut at a width"
    assert " for the members of group 77 “恭喜发财”, expires " in line and line.endswith("balance 90.00")
    packet_id = int(line.split(":")[0].split()[1])
    rc, quiet, _ = await cli("send", 1, "1", 1, "--quiet", server=anbao)
    assert rc == 0 and quiet.strip().isdigit()

    await admin.grab(packet_id, 2)
    await admin.grab(packet_id, 3)  # sold out: its luckiest is known
    await asyncio.sleep(1.2)  # past its expiry
    rc, out, _ = await cli("packet", packet_id, server=anbao)
    assert rc == 0
    head, state, *table = out.splitlines()
    assert "for the members of group 77 at send time — “恭喜发财”" in head
    assert " expired " in state and " expires " not in state
    assert [h.strip() for h in table[2].strip("┃│ ").split("┃")] == ["seq", "user", "amount"], table
    assert "(luckiest)" in out
    await admin.close()


async def test_a_failing_memcached_is_logged_with_a_true_count(caplog):
    from anbao.admission.permits import MemcachedPermits

    permits = MemcachedPermits(
        "127.0.0.1", free_port(), 0, AdmissionTuning(memcached_timeout_ms=500)
    )  # nobody listens there
    with caplog.at_level(logging.WARNING, logger="anbao"):
        assert await permits.admit(1) and await permits.admit(2)  # fails open
    [first] = [r.getMessage() for r in caplog.records if "memcached at" in r.getMessage()]
    assert first.endswith("(1 error)"), first
    permits._logged_at -= 11  # the next interval
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="anbao"):
        await permits.admit(3)
    [second] = [r.getMessage() for r in caplog.records if "memcached at" in r.getMessage()]
    assert second.endswith("(2 errors in the last 11 s)"), second


async def test_the_fatal_frame_is_protocol_md_s_example(anbao):
    """The bytes a real server sends after a frame over the limit are the
    vector PROTOCOL.md shows (`fatal-frame-too-large`)."""
    raw = await Raw.open(anbao.port)
    raw.send((70_005).to_bytes(4, "big") + bytes([wire.Op.PING]) + bytes(4))
    [fatal] = await raw.answers(1)
    assert (fatal.opcode, fatal.request_id, fatal.status) == (0, 0, Status.FRAME_TOO_LARGE)
    from anbao.core import codec

    doc_hex = "0000002f800000000010000000256672616d65206f66203730303039206279746573206f766572206c696d6974203635353336"
    assert codec.encode_error(0, 0, fatal.status, fatal.worker_id, wire.error_message(fatal.body)).hex() == doc_hex
    raw.close()


# ---------------------------------------------------------------- item 8: bench keeps the committed results


def test_bench_writes_to_an_untracked_directory_by_default():
    from bench.args import RUNS_DIR, parse_args

    args = parse_args(["hot"])
    assert args.out == RUNS_DIR and RUNS_DIR.name == "runs"
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", str(RUNS_DIR / "hot.json")], cwd=RUNS_DIR.parent.parent, timeout=30
    )
    assert ignored.returncode == 0, "bench/runs is untracked"
    assert parse_args(["hot", "--out", "bench/results"]).out.name == "results"  # on purpose only


# ---------------------------------------------------------------- item 7: metrics say what they name


async def test_connections_count_clients_not_relays(serve, fresh_dsn):
    """A grab relayed from worker 0 to its owner, worker 1, opens their relay
    connection; with every client gone both workers read 0 connections, in
    STATS and in anbao_connections, and the status label is a name."""
    import urllib.request

    from helpers import ADMIN_TOKEN, APP_TOKEN
    from prometheus_client.parser import text_string_to_metric_families
    from served import steered_client

    from anbao_client import Cluster
    from anbao_client.routing import owner_of

    s = serve(workers=2)
    admin = await Cluster.connect("127.0.0.1", s.port, ADMIN_TOKEN)
    await funded_users(admin, 1, 3, 10_000)
    sent = await admin.send(1, 300, 3)
    while owner_of(sent.packet_id, 2) != 1:  # a packet worker 1 owns
        sent = await admin.send(1, 300, 3)
    await admin.close()
    plain = await steered_client(s.port, APP_TOKEN, 0, 2)
    await plain.grab(sent.packet_id, 2)  # relayed 0 -> 1
    at_owner = await steered_client(s.port, APP_TOKEN, 1, 2)
    stats = await at_owner.stats()  # the relay's connection ends at the owner
    assert (stats["worker_id"], stats["connections"], stats["relay_connections"]) == (1, 1, 1)
    await plain.close()
    await at_owner.close()
    await asyncio.sleep(1.5)  # one metrics flush

    def scrape():
        text = urllib.request.urlopen(f"http://127.0.0.1:{s.metrics_port}/metrics", timeout=5).read().decode()
        return [sample for f in text_string_to_metric_families(text) for sample in f.samples]

    samples = await asyncio.get_running_loop().run_in_executor(None, scrape)
    gauges = {x.labels["worker"]: x.value for x in samples if x.name == "anbao_connections"}
    assert gauges == {"0": 0, "1": 0}, gauges
    statuses = {x.labels["status"] for x in samples if x.name == "anbao_requests_total"}
    assert {"OK"} <= statuses and not any(st.isdigit() for st in statuses), statuses


def test_every_amount_in_a_refusal_says_cents():
    """PROTOCOL.md: an amount in an error message is written `N cents`, which
    is what lets the command line show it in yuan. Every refusal the server
    words with an amount in it keeps to that."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "anbao"
    found = 0
    for path in root.rglob("*.py"):
        text = path.read_text()
        for call in re.finditer(r"Refused\((.{0,400}?)\)\n", text, re.S):
            for expr, after in re.findall(r"\{([^{}]+)\}(.{0,6})", call.group(1)):
                if "cents" in expr or expr.strip() in ("total", "amount"):
                    found += 1
                    assert after.startswith(" cents"), f"{path.name}: {{{expr}}}{after} is an amount without its unit"
    # The refusals PL/pgSQL words (SEND's and DEPOSIT/WITHDRAW's batches):
    # format('...', args) with an amount among its arguments.
    for path in (root / "storage" / "migrations").glob("*.sql"):
        sql = path.read_text()
        for fmt, args in re.findall(r"message := format\(((?:'[^']*'\s*)+),\s*([^;]*)\);", sql):
            text = "".join(re.findall(r"'([^']*)'", fmt))
            values = [a.strip() for a in args.rstrip(")").split(",")]
            holes = re.split(r"%s", text)[1:]
            for value, after in zip(values, holes, strict=True):
                if value in ("bal", "total", "amount") or "cents" in value:
                    found += 1
                    assert after.startswith(" cents"), f"{path.name}: {value} in {text!r} is an amount without its unit"
    assert found >= 12, "the refusals with amounts were found"
