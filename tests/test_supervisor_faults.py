"""kill -9 of the supervisor, on the embedded PostgreSQL as `make run` uses
it: nothing it started outlives it for long, and `anbao serve` started again
on the same data directory and port works, whatever the previous run left
(a PostgreSQL still running, a memcached, a stale postmaster.pid)."""

import os
import signal
import subprocess

from helpers import APP_TOKEN
from polling import eventually
from served import ANBAO, Served, free_port, is_recorded_alive, recorded_processes

from anbao.storage import embedded
from anbao_client import Client
from anbao_client.errors import AlreadyClaimed

GONE_TIMEOUT_S = 45  # the workers' drain is bounded by 30 s; idle ones take milliseconds


def tokens(data_dir):
    import json

    doc = json.loads((data_dir / "tokens.json").read_text())
    return {t["scope"]: t["token"] for t in doc["tokens"]}


def processes(s: Served) -> dict:
    info = s.run_info()
    return {
        "workers": list(info["worker_processes"].values()),
        "memcached": info["memcached_process"],
        "reaper": info["reaper_process"],
        "postmaster": embedded.postmaster((s.data_dir / "pgdata").resolve()),
    }


async def test_kill_9_supervisor_leaves_nothing_and_serve_starts_again(tmp_path):
    data, port = tmp_path / "data", free_port()
    started: list[Served] = []
    sleeper = None

    def serve():
        s = Served(None, data, None, 2, [], port=port, metrics=False).start()
        started.append(s)
        assert s.port == port
        return s

    try:
        # Round 1: money in, a packet, a grab; then SIGKILL the supervisor.
        s = serve()
        admin = await Client.connect("127.0.0.1", port, tokens(data)["admin"])
        await admin.register([1, 2])
        await admin.deposit(1, 10_000)
        sent = await admin.send(1, 500, 1)
        grabbed = await admin.grab(sent.packet_id, 2)
        await admin.close()
        p = processes(s)
        assert p["postmaster"] is not None and all(is_recorded_alive(e) for e in p["workers"])
        s.proc.kill()
        s.proc.wait(10)
        await eventually(lambda: not any(is_recorded_alive(e) for e in p["workers"]), GONE_TIMEOUT_S, "workers to die")
        await eventually(lambda: not is_recorded_alive(p["memcached"]), GONE_TIMEOUT_S, "memcached to stop")
        await eventually(
            lambda: embedded.postmaster((data / "pgdata").resolve()) is None, GONE_TIMEOUT_S, "PostgreSQL to stop"
        )
        await eventually(lambda: not is_recorded_alive(p["reaper"]), GONE_TIMEOUT_S, "the reaper to finish")
        assert "died without stopping" in s.log()

        # Round 2: the same data directory and port serve again, with the money.
        s = serve()
        admin = await Client.connect("127.0.0.1", port, tokens(data)["admin"])
        assert await admin.balance(2) == 500
        try:
            await admin.grab(sent.packet_id, 2)
            raise AssertionError("a second share")
        except AlreadyClaimed as e:
            assert (e.grabbed.seq, e.grabbed.amount_cents) == (grabbed.seq, grabbed.amount_cents)
        await admin.close()
        # Now the reaper dies with the supervisor (a kill of everything, or
        # an OOM kill): workers still die with their parent; memcached and
        # PostgreSQL are left running for the next start to deal with.
        p = processes(s)
        s.proc.kill()
        os.kill(p["reaper"]["pid"], signal.SIGKILL)
        s.proc.wait(10)
        await eventually(lambda: not any(is_recorded_alive(e) for e in p["workers"]), GONE_TIMEOUT_S, "workers to die")
        assert is_recorded_alive(p["memcached"]) and p["postmaster"].is_running()

        # Round 3: the next start stops the old memcached and reuses the
        # PostgreSQL that still runs on the data directory.
        s = serve()
        assert not is_recorded_alive(p["memcached"]), "the previous run's memcached was left running"
        assert embedded.postmaster((data / "pgdata").resolve()).pid == p["postmaster"].pid
        admin = await Client.connect("127.0.0.1", port, tokens(data)["admin"])
        assert await admin.balance(2) == 500
        await admin.close()
        assert s.stop() == 0
        assert embedded.postmaster((data / "pgdata").resolve()) is None

        # Round 4: a postmaster.pid whose pid now belongs to another live
        # process (a crash, then pid reuse): PostgreSQL would refuse to start.
        sleeper = subprocess.Popen(["sleep", "60"])
        pid_file = data / "pgdata" / "postmaster.pid"
        pid_file.write_text(
            f"{sleeper.pid}\n{(data / 'pgdata').resolve()}\n1700000000\n5432\n"
            f"{(data / 'pgdata').resolve()}\n\n  5432001 0\nready\n"
        )
        s = serve()
        admin = await Client.connect("127.0.0.1", port, tokens(data)["admin"])
        assert await admin.balance(1) == 9_500
        await admin.close()
        assert s.stop() == 0
        audit = subprocess.run(ANBAO + ["audit", "--data-dir", str(data)], capture_output=True, text=True, timeout=60)
        assert audit.returncode == 0, audit.stdout + audit.stderr
    finally:
        for s in started:
            s.kill_everything()
        if sleeper is not None:
            sleeper.kill()
            sleeper.wait()
        embedded.stop_data_dir(data)


async def test_two_supervisors_never_share_a_data_directory(tmp_path, fresh_dsn, tokens_file):
    first = Served(fresh_dsn, tmp_path / "data", tokens_file, 1, [], metrics=False).start()
    try:
        second = subprocess.run(
            ANBAO
            + [
                "serve",
                "--dsn",
                fresh_dsn,
                "--data-dir",
                str(tmp_path / "data"),
                "--port",
                "0",
                "--workers",
                "1",
                "--metrics-port",
                "0",
                "--tokens-file",
                str(tokens_file),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode != 0 and "another `anbao serve`" in second.stderr
        assert first.proc.poll() is None
        assert first.stop() == 0
    finally:
        first.kill_everything()


def test_a_data_dir_too_deep_for_unix_sockets_still_serves(tmp_path):
    """The workers' private sockets live under --data-dir; a path past
    AF_UNIX's 107 bytes made every worker fail ("AF_UNIX path too long").
    They move to a short directory of this user's, removed at stop."""
    from pathlib import Path

    from anbao.server.supervisor import SUN_PATH_MAX_BYTES, socket_dir

    deep = tmp_path / ("d" * 60) / ("e" * 60) / "run"
    deep.mkdir(parents=True)
    short = socket_dir(deep)
    assert short != deep and len(str(short / "worker-1023.sock")) <= SUN_PATH_MAX_BYTES
    assert short == socket_dir(deep), "the same data dir, the same socket directory"
    assert socket_dir(Path("/tmp/x/run")) == Path("/tmp/x/run"), "a short path is kept"
    short.rmdir()


async def test_a_run_directory_deleted_under_the_supervisor_neither_stops_nor_strands_it(serve):
    """The run directory deleted under a serving supervisor, then a worker
    killed: the supervisor records the restart in a run directory made
    again and keeps serving, and stops cleanly. Before, recording the
    restart raised: the supervisor left its loop without stopping the
    other worker and then waited, forever, at exit for it."""
    import shutil

    s = serve(workers=2)
    before = s.run_info()
    shutil.rmtree(s.data_dir / "run")
    os.kill(before["workers"]["0"], signal.SIGKILL)

    def restarted() -> bool:
        try:
            info = s.run_info()
        except (OSError, ValueError):
            return False
        return info["restarts"] >= 1 and info["workers"]["0"] != before["workers"]["0"]

    await eventually(restarted, 30, "the restart recorded again")
    client = await Client.connect("127.0.0.1", s.port, APP_TOKEN)
    try:
        assert await client.ping() in (0, 1)
    finally:
        await client.close()
    after = s.run_info()
    assert s.stop() == 0
    # The reaper outlives the supervisor by the moment it takes to see it go.
    await eventually(
        lambda: not any(is_recorded_alive(e) for e in recorded_processes(after)), GONE_TIMEOUT_S, "every process gone"
    )
