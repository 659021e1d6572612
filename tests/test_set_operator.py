"""What an operator running sets meets at start (issue 20, items 1-2):
a topology that cannot replicate is refused naming the set and the fix;
`migrate` and `serve` stop only a PostgreSQL they started; every client
command takes --topology and goes to the user's (or packet's) set."""

import asyncio
import json
import subprocess
import sys

import pytest

from anbao.localsets import LocalSets
from anbao.storage import embedded

ANBAO = [sys.executable, "-m", "anbao.cli"]


def _anbao(*args, cwd=None, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run([*ANBAO, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=timeout)


def _topology(path, *entries) -> None:
    path.write_text(json.dumps({"sets": [{"id": i, "host": "127.0.0.1", **e} for i, e in enumerate(entries)]}))
    path.chmod(0o600)


@pytest.mark.timeout(300)
async def test_a_set_without_logical_wal_is_refused_at_start(tmp_path, fresh_dsn):
    """The session's PostgreSQL keeps wal_level at its default (replica):
    as a set's dsn, `migrate` and `serve` refuse it, saying which set and
    what to change, and serve nothing."""
    topo = tmp_path / "sets.json"
    _topology(topo, {"port": 7979, "dsn": fresh_dsn}, {"port": 7980, "dsn": fresh_dsn})
    for command in (
        ["migrate", "--topology", topo, "--set", 1],
        ["serve", "--topology", topo, "--set", 1, "--workers", 1, "--metrics-port", 0, "--port", 0],
    ):
        out = await asyncio.to_thread(_anbao, *command, "--data-dir", tmp_path / "run", cwd=tmp_path)
        assert out.returncode == 2, out.stdout + out.stderr
        assert "set 1: its PostgreSQL has wal_level = replica" in out.stderr, out.stderr
        assert "wal_level = logical" in out.stderr and "anbao pg start" in out.stderr, out.stderr
        assert "Traceback" not in out.stderr and "anbao serving" not in out.stdout


@pytest.mark.timeout(120)
def test_a_data_dir_entry_on_another_host_is_refused(tmp_path):
    """A data_dir's PostgreSQL answers on this machine's Unix socket only:
    an entry of another host with no dsn could never be subscribed to."""
    topo = tmp_path / "sets.json"
    topo.write_text(
        json.dumps(
            {
                "sets": [
                    {"id": 0, "host": "127.0.0.1", "port": 7979, "data_dir": "set0"},
                    {"id": 1, "host": "192.0.2.7", "port": 7979, "data_dir": "set1"},
                ]
            }
        )
    )
    out = _anbao("migrate", "--topology", topo, "--set", 0, cwd=tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "set 1" in out.stderr and "192.0.2.7 is not this machine" in out.stderr, out.stderr
    assert "Give set 1 a dsn" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "set0" / "pgdata").exists(), "refused before any PostgreSQL started"


@pytest.mark.timeout(300)
def test_migrate_leaves_running_the_postgresql_of_a_serving_set(tmp_path):
    """The guide's "Adding a set" runs migrate on serving sets: a set entry
    with a data_dir whose PostgreSQL runs (the set serving) keeps it up;
    one migrate started itself it stops."""
    topo = tmp_path / "sets.json"
    _topology(topo, {"port": 7979, "data_dir": "set0"}, {"port": 7980, "data_dir": "set1"})
    embedded.start(tmp_path / "set0", logical=True)
    try:
        out = _anbao("migrate", "--topology", topo, "--set", 0, cwd=tmp_path)
        assert out.returncode == 0, out.stdout + out.stderr
        assert embedded.already_running(tmp_path / "set0"), "migrate stopped the serving set's PostgreSQL"
        out = _anbao("migrate", "--topology", topo, "--set", 1, cwd=tmp_path)
        assert out.returncode == 0, out.stdout + out.stderr
        assert not embedded.already_running(tmp_path / "set1"), "migrate left its own PostgreSQL running"
        assert not (tmp_path / ".anbao").exists()  # nothing made in --data-dir's default
    finally:
        embedded.stop_data_dir(tmp_path / "set0")
        embedded.stop_data_dir(tmp_path / "set1")


@pytest.mark.timeout(120)
def test_pg_start_and_stop(tmp_path):
    """`anbao pg start` runs the embedded PostgreSQL by itself with wal_level
    = logical and prints a DSN that works; `pg stop` stops it."""
    import asyncio

    import asyncpg

    out = _anbao("pg", "start", "--data-dir", tmp_path / "pg", cwd=tmp_path)
    try:
        assert out.returncode == 0, out.stderr
        dsn = out.stdout.strip()
        assert dsn.startswith("postgresql://postgres:") and "wal_level = logical" in out.stderr

        async def level() -> str:
            conn = await asyncpg.connect(dsn)
            try:
                return await conn.fetchval("SHOW wal_level")
            finally:
                await conn.close()

        assert asyncio.run(level()) == "logical"
        assert _anbao("pg", "dsn", "--data-dir", tmp_path / "pg").stdout.strip() == dsn
        bad = _anbao("pg", "start", "--data-dir", tmp_path / "pg", "--listen", "127.0.0.1:5999", "--allow", "nonsense")
        assert bad.returncode == 2 and "--allow" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    finally:
        stop = _anbao("pg", "stop", "--data-dir", tmp_path / "pg")
    assert stop.returncode == 0 and "stopped" in stop.stderr
    assert not embedded.already_running(tmp_path / "pg")


@pytest.fixture(scope="module")
def local_sets(tmp_path_factory):
    with LocalSets(tmp_path_factory.mktemp("opsets"), count=2, workers=1) as sets:
        yield sets


def _client(sets, *args) -> dict:
    out = _anbao(*args, "--topology", sets.topology_file, "--tokens-file", sets.tokens_file, "--json")
    assert out.returncode == 0, f"{args}: {out.stdout}{out.stderr}"
    return json.loads(out.stdout)


@pytest.mark.timeout(300)
def test_every_client_command_routes_by_set(local_sets):
    """`anbao register 1-6 --topology F` registers each user at its home set
    (a plain one at set 0 is refused WRONG_SET for the others), and every
    other client command finds its set the same way."""
    from anbao_client.routing import home_set, set_of

    topo = local_sets.topology()
    users = list(range(101, 109))
    assert {home_set(u, topo) for u in users} == {0, 1}
    plain = _anbao("register", "101-108", "--port", local_sets.ports[0], "--tokens-file", local_sets.tokens_file)
    assert plain.returncode == 3 and "WRONG_SET" in plain.stderr, plain.stdout + plain.stderr
    assert _client(local_sets, "register", "101-108") == {"registered": 8, "new": 8}
    sender = next(u for u in users if home_set(u, topo) == 1)
    assert _client(local_sets, "deposit", sender, "10.00")["balance_cents"] == 1000
    assert _client(local_sets, "withdraw", sender, "1.00")["balance_cents"] == 900
    made = _client(local_sets, "group", "create", 77, "--members", "101-108")
    assert made["member_count"] == 8
    assert _client(local_sets, "group", "remove", 77, "108")["member_count"] == 7
    assert _client(local_sets, "group", "add", 77, "108")["member_count"] == 8
    assert _client(local_sets, "group", "show", 77)["member_count"] == 8
    sent = _client(local_sets, "send", sender, "5.00", 2, "--fixed", "--group", 77)
    packet = sent["packet_id"]
    assert set_of(packet) == 1
    winner = next(u for u in users if home_set(u, topo) == 0)
    assert _client(local_sets, "grab", packet, winner)["amount_cents"] == 250
    assert _client(local_sets, "packet", packet)["claimed_count"] == 1
    assert _client(local_sets, "sent", sender)["packets"][0]["packet_id"] == packet
    assert _client(local_sets, "statement", sender)["balance_cents"] == 400
    balance = _client(local_sets, "balance", winner)
    assert balance["balances_cents"][str(winner)] + balance["in_flight_cents"][str(winner)] == 250
    feed = _client(local_sets, "events", "--set", 1)["events"]
    assert any(e["kind"] == "SENT" and e["packet_id"] == packet for e in feed)
    assert not any(e["kind"] == "SENT" for e in _client(local_sets, "events", "--set", 0)["events"])
    assert _client(local_sets, "received", winner)["user_id"] == winner


def _pg_processes(local_sets, s: int) -> list:
    """Set s's postmaster and every process under it (its backends)."""
    master = embedded.postmaster(local_sets.pgdata(s).resolve())
    assert master is not None
    return [master, *master.children(recursive=True)]


@pytest.mark.timeout(300)
async def test_a_stalled_set_times_out_and_a_regrab_resolves(local_sets):
    """docs/DEPLOYMENT.md, "What happens when a set is down": with a set's
    PostgreSQL stalled, a grab of its packet times out (an unknown outcome,
    not a refusal); once it resumes, grabbing again answers the share that
    landed, once. Another set answers meanwhile."""
    import signal

    from served import RETRYABLE

    from anbao_client import AlreadyClaimed, RequestTimeout, SetCluster
    from anbao_client.routing import home_set

    topo, token = local_sets.topology(), local_sets.token()
    async with await SetCluster.connect(topo, token, timeout_ms=1500) as sc:
        users = list(range(301, 321))
        await sc.register(users)
        sender = next(u for u in users if home_set(u, topo) == 1)
        other = next(u for u in users if home_set(u, topo) == 0)
        await sc.deposit(sender, 1000)
        await sc.deposit(other, 1000)
        packet = (await sc.send(sender, 1000, 4)).packet_id
        stalled = _pg_processes(local_sets, 1)
        for p in stalled:
            p.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(RequestTimeout):
                await sc.grab(packet, other)
            assert await sc.balance(other) == 1000  # set 0 answers at once
        finally:
            for p in stalled:
                p.send_signal(signal.SIGCONT)
        for _ in range(60):
            try:
                g, again = await sc.grab(packet, other), False
                break
            except AlreadyClaimed as exc:
                g, again = exc.grabbed, True
                break
            except RETRYABLE:
                await asyncio.sleep(0.5)
        else:
            raise AssertionError("no answer after the set resumed")
        info = await sc.packet(packet)
        mine = [c for c in info.claims if c.user_id == other]
        assert [(c.seq, c.amount_cents) for c in mine] == [(g.seq, g.amount_cents)], (again, info.claims)


@pytest.mark.timeout(300)
def test_serve_leaves_running_the_postgresql_the_operator_started(tmp_path):
    """A set entry's data_dir whose PostgreSQL `anbao pg start` runs: serve
    uses it and, stopped with Ctrl-C, leaves it running (the operator's)."""
    import signal

    from served import free_port

    topo = tmp_path / "sets.json"
    _topology(topo, {"port": free_port(), "data_dir": "set0"}, {"port": free_port(), "data_dir": "set1"})
    assert _anbao("pg", "start", "--data-dir", tmp_path / "set0").returncode == 0
    try:
        proc = subprocess.Popen(
            [*ANBAO, "serve", "--topology", topo, "--set", "0", "--workers", "1", "--metrics-port", "0"],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "stop with Ctrl-C" in line:
                break
        assert f"embedded PostgreSQL in {tmp_path / 'set0' / 'pgdata'}" in "".join(lines), "".join(lines)
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=90)
        assert proc.returncode == 0, "".join(lines) + rest
        assert "PostgreSQL left running: `anbao pg start` started it" in rest, rest
        assert embedded.already_running(tmp_path / "set0")
    finally:
        _anbao("pg", "stop", "--data-dir", tmp_path / "set0")
        embedded.stop_data_dir(tmp_path / "set0")
