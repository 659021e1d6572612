"""`anbao serve` as `make run` starts it: embedded PostgreSQL, tokens on
first run, the banner, a working server, a graceful stop; then `anbao audit`."""

import json
import signal
import socket
import stat
import subprocess
import sys
import time

from anbao_client import EventKind, SyncClient

ANBAO = [sys.executable, "-m", "anbao.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_prints_where_tokens_are_and_serves(tmp_path):
    data = tmp_path / "data"
    port = free_port()
    proc = subprocess.Popen(
        ANBAO + ["serve", "--data-dir", str(data), "--port", str(port), "--metrics-port", str(free_port())],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        banner = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, "server exited early:\n" + "".join(banner)
            banner.append(line)
            if "stop with Ctrl-C" in line:
                break
        text = "".join(banner)
        assert f"127.0.0.1:{port}" in text and str(data / "tokens.json") in text
        tokens_path = data / "tokens.json"
        assert stat.S_IMODE(tokens_path.stat().st_mode) == 0o600
        tokens = {t["scope"]: t["token"] for t in json.loads(tokens_path.read_text())["tokens"]}
        assert set(tokens) == {"admin", "app"} and len(set(tokens.values())) == 2
        with SyncClient("127.0.0.1", port, tokens["admin"]) as c:
            c.register([1, 2])
            c.deposit(1, 1_000)
            sent = c.send(1, 500, 1)
            assert c.grab(sent.packet_id, 2).amount_cents == 500
            assert c.balance(2) == 500
            # The sync feed is the async one's (issue 21): following, it
            # blocks until the next event; without, it ends at the head.
            feed = c.events(wait_ms=2_000)
            assert next(e for e in feed if e.packet_id == sent.packet_id).kind == EventKind.SENT
            feed.close()
            assert EventKind.SENT in [e.kind for e in c.events(follow=False) if e.packet_id == sent.packet_id]
    finally:
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, rest
    # A clean stop says so, and leaves no record of processes that are gone.
    assert "anbao stopped" in rest
    assert not (data / "run" / "workers.json").exists() and not list((data / "run").glob("*.sock"))
    audit = subprocess.run(ANBAO + ["audit", "--data-dir", str(data)], capture_output=True, text=True, timeout=60)
    assert audit.returncode == 0 and "anbao audit: OK" in audit.stdout, audit.stdout + audit.stderr
    from anbao.storage import embedded

    assert not embedded.already_running(data), "a one-off audit leaves no PostgreSQL behind"


def test_audit_exits_nonzero_on_a_broken_ledger(tmp_path):
    data = tmp_path / "data"
    subprocess.run(ANBAO + ["migrate", "--data-dir", str(data)], check=True, capture_output=True, timeout=60)
    from anbao.storage import embedded

    server, dsn = embedded.start(data)
    try:
        server.psql("INSERT INTO accounts (kind, owner_id, balance_cents) VALUES (1, 5, 100);")
        audit = subprocess.run(
            ANBAO + ["audit", "--data-dir", str(data), "--json"], capture_output=True, text=True, timeout=60
        )
        assert audit.returncode == 1
        report = json.loads(audit.stdout)
        assert not report["ok"]
        assert "balance equals the sum of its transfers" in report["violations"]
    finally:
        embedded.stop(server)


def test_limits_lists_every_limit_with_its_group_and_checks_overrides():
    """`anbao limits` lists what `serve --limit` takes, with the overrides
    applied; a name it does not list, or a value out of range, is refused
    as serve refuses it; a reader that stops early is no error."""
    from anbao.config import Limits

    run = subprocess.run([*ANBAO, "limits", "--json", "--limit", "commit_slots=1"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    assert list(doc) == Limits.names()
    assert doc["commit_slots"] == {"group": "commit", "value": 1}
    assert doc["max_frame_bytes"] == {"group": "wire", "value": Limits().wire.max_frame_bytes}
    table = subprocess.run([*ANBAO, "limits"], capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(table) == len(doc) and table[0].split() == ["wire", "max_frame_bytes", "65,536"]
    for bad, why in (["nope=1"], "NAME one `anbao limits` lists"), (["batch_max_grabs=0"], "must be positive"):
        for command in ("limits", "serve"):
            run = subprocess.run([*ANBAO, command, "--limit", *bad], capture_output=True, text=True, timeout=60)
            assert run.returncode == 2 and why in run.stderr, (command, run.stderr)
    head = subprocess.run(f"{sys.executable} -m anbao.cli limits | head -1", shell=True, capture_output=True, text=True)
    assert head.stdout.startswith("wire ") and "Traceback" not in head.stderr, head.stderr
