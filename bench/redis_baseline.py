"""The Redis baseline: the design most flash-sale and red-packet projects
ship, measured with the very same load generator as anbao.

- Debian's `redis-server`, started by the bench on a free loopback port in a
  temporary directory with `--appendonly yes --appendfsync always --save ''`
  (the append-only file is fsynced before any reply of the event-loop turn
  goes out, so an answered grab is durable; no RDB snapshots), stopped by
  SIGTERM to its pid at the end.
- The grab is the usual Lua script, called with EVALSHA: HEXISTS the user in
  the packet's claimed hash -> ALREADY_CLAIMED; LPOP a pre-split share
  -> nil means SOLD_OUT; else HSET the claim, RPUSH "user:amount" to the
  packet's log, and return the amount.
- Shares are pre-split with the same double-mean rule as anbao
  (baselines.draw_share) and RPUSHed before the clock starts.
- The load generator speaks RESP2 to it directly (bench/resp.py), pipelined
  `--depth` deep per connection: no proxy, no extra hop.
- After the load: every answer was an amount, ALREADY_CLAIMED or SOLD_OUT;
  the logs hold exactly one entry per OK answer; the amounts answered sum to
  the amounts logged; per packet, claimed hash == log, logged + left in the
  list == the packet's total, nobody twice, never more claims than shares.
"""

from __future__ import annotations

import hashlib
import random
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from . import resp

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 60.0

GRAB_SCRIPT = """\
-- KEYS[1] shares list, KEYS[2] claimed hash, KEYS[3] log list; ARGV[1] user
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then
  return 'ALREADY_CLAIMED'
end
local amount = redis.call('LPOP', KEYS[1])
if not amount then
  return 'SOLD_OUT'
end
redis.call('HSET', KEYS[2], ARGV[1], amount)
redis.call('RPUSH', KEYS[3], ARGV[1] .. ':' .. amount)
return tonumber(amount)
"""
GRAB_SHA = hashlib.sha1(GRAB_SCRIPT.encode()).hexdigest()
SERVER_ARGS = ["--appendonly", "yes", "--appendfsync", "always", "--save", ""]


def packet_keys(packet_id: int) -> tuple[bytes, bytes, bytes]:
    """The packet's shares list, claimed hash and log list (one hash tag, as a
    cluster deployment would need)."""
    tag = b"{pk:%d}" % packet_id
    return tag + b":shares", tag + b":claimed", tag + b":log"


class GrabEncoder:
    """grab(rid, packet, user) -> the EVALSHA command, like wire.grab for
    anbao (the request id is not sent: Redis answers in order)."""

    def __init__(self, sha: str = GRAB_SHA):
        self.sha = sha.encode()
        self.prefixes: dict[int, bytes] = {}

    def __call__(self, rid: int, packet_id: int, user_id: int) -> bytes:
        prefix = self.prefixes.get(packet_id)
        if prefix is None:
            prefix = self.prefixes[packet_id] = resp.command_prefix(
                b"EVALSHA", self.sha, b"3", *packet_keys(packet_id), total=7
            )
        u = b"%d" % user_id
        return b"%s$%d\r\n%s\r\n" % (prefix, len(u), u)


def split_shares(rng: random.Random, total_cents: int, count: int, min_share_cents: int = 1) -> list[int]:
    """Pre-split shares by the double-mean rule (as the naive baseline and
    anbao draw them)."""
    from .baselines import draw_share

    out = []
    remaining = total_cents
    for left in range(count, 0, -1):
        a = draw_share(rng, remaining, left, min_share_cents)
        out.append(a)
        remaining -= a
    assert remaining == 0 and len(out) == count
    return out


class RedisServer:
    """A redis-server of our own: free loopback port, temporary directory,
    AOF with fsync on every write, nothing else persisted."""

    def __init__(self, binary: str = "redis-server", host: str = "127.0.0.1"):
        from .server import free_port

        self.host = host
        self.proc_exit: int | None = None
        self.dir = Path(tempfile.mkdtemp(prefix="anbao-bench-redis-"))
        self.log_path = self.dir / "redis.log"
        self.port = free_port(host)
        self.cmd = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            host,
            "--dir",
            str(self.dir),
            "--daemonize",
            "no",
            "--logfile",
            str(self.log_path),
            *SERVER_ARGS,
        ]
        self.proc: subprocess.Popen | None = subprocess.Popen(
            self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, cwd=str(self.dir)
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                with resp.Client(host, self.port, timeout=5) as c:
                    if c.call("PING") == "PONG":
                        break
            except (OSError, resp.RespError):
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""
                self.stop()
                raise RuntimeError(f"`{' '.join(self.cmd)}` did not start (exit {self.proc_exit}); log:\n{log}")
            time.sleep(0.05)
        self.pid = self.proc.pid

    def client(self) -> resp.Client:
        return resp.Client(self.host, self.port)

    def info(self) -> dict:
        """What the run ran on: version and the persistence settings in force."""
        with self.client() as c:
            text = c.call("INFO", "server").decode() + c.call("INFO", "persistence").decode()
            fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
            config = {}
            for name in (
                "appendonly",
                "appendfsync",
                "save",
                "aof-use-rdb-preamble",
                "auto-aof-rewrite-percentage",
                "auto-aof-rewrite-min-size",
                "io-threads",
            ):
                pair = c.call("CONFIG", "GET", name)
                if pair:
                    config[name] = pair[1].decode()
        return {
            "redis_version": fields.get("redis_version"),
            "aof_enabled": fields.get("aof_enabled"),
            "config": config,
            "argv": ["redis-server", "--port", "PORT", "--bind", self.host, "--dir", "TMPDIR", *SERVER_ARGS[:-1], "''"],
        }

    def persistence(self) -> dict:
        with self.client() as c:
            text = c.call("INFO", "persistence").decode()
        return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)

    def stop(self) -> int | None:
        """SIGTERM to our redis-server's pid only (it fsyncs the AOF and exits),
        then its directory goes."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
            self.proc_exit = self.proc.returncode
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)
        return self.proc_exit

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def prepare(
    server: RedisServer,
    packets: dict[int, int],
    cents_per_share: int,
    seed: int,
    presold: dict[int, list[int]] | None = None,
) -> dict[int, int]:
    """Loads the script and, per packet, RPUSHes its pre-split shares
    (packets: id -> share count, each packet shares x cents_per_share in
    total); presold: users who grab a packet before the clock starts (through
    the script). Returns each packet's total in cents."""
    rng = random.Random(seed)
    totals = {}
    with server.client() as c:
        if c.call("SCRIPT", "LOAD", GRAB_SCRIPT).decode() != GRAB_SHA:
            raise RuntimeError("redis computed another SHA1 for the grab script")
        commands = []
        for pid, count in packets.items():
            total = count * cents_per_share
            totals[pid] = total
            shares = split_shares(rng, total, count)
            key = packet_keys(pid)[0]
            for i in range(0, count, 1000):
                commands.append((b"RPUSH", key, *shares[i : i + 1000]))
        _check(c.pipeline(commands), "RPUSH")
        enc = GrabEncoder()
        for pid, users in (presold or {}).items():
            c.sock.sendall(b"".join(enc(0, pid, u) for u in users))
            replies = c._read(len(users))
            bad = [r for r in replies if not (isinstance(r, int) and r > 0)]
            if bad:
                raise RuntimeError(f"presale of packet {pid}: {len(bad)} grabs not OK, e.g. {bad[0]!r}")
    return totals


def _check(replies: list, what: str) -> None:
    bad = [r for r in replies if isinstance(r, resp.RespError)]
    if bad:
        raise RuntimeError(f"{what}: {len(bad)} errors, e.g. {bad[0]}")


def _check_packet(pid: int, log: list, left: list, claimed: list, total: int, shares: int, wrong: list[str]) -> int:
    """One packet's log, remaining shares and claimed hash agree and add up
    to its total; appends what is wrong; returns the cents logged."""
    entries = {}
    dupes = 0
    cents = 0
    for e in log:
        user, _, amount = e.partition(b":")
        if user in entries:
            dupes += 1
        entries[user] = amount
        cents += int(amount)
    claimed_by = dict(zip(claimed[0::2], claimed[1::2], strict=True))
    left_cents = sum(int(x) for x in left)
    if dupes:
        wrong.append(f"redis packet {pid}: {dupes} users claimed twice")
    if claimed_by != entries:
        wrong.append(f"redis packet {pid}: claimed hash ({len(claimed_by)}) disagrees with the log ({len(log)})")
    if len(log) > shares:
        wrong.append(f"redis packet {pid}: oversold, {len(log)} claims for {shares} shares")
    if cents + left_cents != total or len(log) + len(left) != shares:
        wrong.append(
            f"redis packet {pid}: {cents} cents logged + {left_cents} left in {len(left)}"
            f" shares != {total} cents in {shares} shares"
        )
    if any(int(x) < 1 for x in left) or any(int(a) < 1 for a in entries.values()):
        wrong.append(f"redis packet {pid}: a share below 1 cent")
    return cents


def verify(
    server: RedisServer,
    totals: dict[int, int],
    shares: dict[int, int],
    ok_answers: int,
    ok_amount: int,
    unanswered: int,
    capped: bool,
    presold: dict[int, list[int]] | None = None,
) -> list[str]:
    """The Redis design's own money check, like naive_verify; returns what is wrong."""
    presold = presold or {}
    wrong = []
    logged = logged_cents = 0
    presold_entries = sum(len(u) for u in presold.values())
    ids = list(totals)
    with server.client() as c:
        for i in range(0, len(ids), 2000):
            part = ids[i : i + 2000]
            cmds = []
            for pid in part:
                k_shares, k_claimed, k_log = packet_keys(pid)
                cmds += [(b"LRANGE", k_log, 0, -1), (b"LRANGE", k_shares, 0, -1), (b"HGETALL", k_claimed)]
            replies = c.pipeline(cmds, chunk=3000)
            _check(replies, "verify")
            for j, pid in enumerate(part):
                log, left, claimed = replies[3 * j : 3 * j + 3]
                cents = _check_packet(pid, log, left, claimed, totals[pid], shares[pid], wrong)
                logged += len(log)
                logged_cents += cents
    presold_cents = 0
    if presold:  # what the presale took, to subtract: the first entries of those packets' logs
        with server.client() as c:
            for pid, users in presold.items():
                head = c.call("LRANGE", packet_keys(pid)[2], 0, len(users) - 1)
                presold_cents += sum(int(e.partition(b":")[2]) for e in head)
    run_claims = logged - presold_entries
    run_cents = logged_cents - presold_cents
    if not ok_answers <= run_claims <= ok_answers + (unanswered if capped else 0):
        wrong.append(f"redis: {run_claims:,} claims logged but {ok_answers:,} OK answers")
    if not capped and run_cents != ok_amount:
        wrong.append(f"redis: the OK answers handed out {ok_amount:,} cents, the logs hold {run_cents:,}")
    p = server.persistence()
    if p.get("aof_enabled") != "1" or p.get("aof_last_write_status") != "ok":
        wrong.append(
            f"redis: append-only file not healthy: aof_enabled {p.get('aof_enabled')},"
            f" last write {p.get('aof_last_write_status')}"
        )
    return wrong
