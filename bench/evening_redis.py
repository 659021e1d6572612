"""The evening on Redis: the same business in Lua, on bench/redis_baseline.py's
RedisServer (AOF, appendfsync always: a reply leaves after its write is fsynced).

Keys (a packet's keys share one hash tag, as in redis_baseline.packet_keys):
  b:USER            the user's balance, integer cents (a string: INCRBY)
  g:GROUP           the group's members (a set)
  idem:KEYHEX       a SEND's idempotency key -> its packet id
  {pk:P}:meta       hash: sender, total, count, group
  {pk:P}:shares     list of the pre-split shares still unclaimed (the escrow)
  {pk:P}:claimed    hash user -> amount
  {pk:P}:log        list "user:amount" in claim order (what PACKET reads)
  {pk:P}:elig       set: the group's members at send time, but the sender

Eligibility: membership at send time, as anbao's GROUP audience. SEND
copies the group's set into the packet (SDIFFSTORE g:GROUP minus the
sender: one command, C code over an intset of 20-200 integers, a few
microseconds) rather than checking the live group set at grab time, which
would let a member who joins after the SEND grab it (not the semantics
anbao keeps). The groups do not change during the bench, so both would
answer the same; the copy is the faithful one, and it is cheap in Redis.

Packet ids come from the caller (the load generator numbers its own, as an
app would give a packet an id before it asks for it): every key a script
touches is then one of its KEYS.

The split is anbao's double-mean rule in integer cents: each share in
[1, min(2 x remaining / left, remaining - (left - 1))], the last takes the
rest; drawn with a Park-Miller generator (x * 48271 mod 2^31 - 1, exact in
Lua's doubles) seeded by the caller, so a retried SEND would draw the same
shares, and Redis's script replication sees no random call.
"""

from __future__ import annotations

import hashlib

from anbao_client.wire import Op, Status

from . import loadgen, resp
from .redis_baseline import RedisServer, packet_keys

SEND_SCRIPT = """\
-- KEYS: idem, sender balance, group set, meta, shares, elig
-- ARGV: sender, total cents, count, seed, packet id, group id
local prior = redis.call('GET', KEYS[1])
if prior then return tonumber(prior) end
if redis.call('SISMEMBER', KEYS[3], ARGV[1]) == 0 then return 'NOT_ELIGIBLE' end
local total = tonumber(ARGV[2])
local count = tonumber(ARGV[3])
local balance = tonumber(redis.call('GET', KEYS[2]) or '0')
if balance < total then return 'INSUFFICIENT_FUNDS' end
redis.call('DECRBY', KEYS[2], total)
local x = tonumber(ARGV[4])
local remaining = total
local shares = {}
for left = count, 2, -1 do
  local upper = math.min(math.floor(2 * remaining / left), remaining - (left - 1))
  if upper < 1 then upper = 1 end
  x = (x * 48271) % 2147483647
  local amount = 1 + (x % upper)
  shares[#shares + 1] = amount
  remaining = remaining - amount
end
shares[#shares + 1] = remaining
redis.call('RPUSH', KEYS[5], unpack(shares))
redis.call('HSET', KEYS[4], 'sender', ARGV[1], 'total', total, 'count', count, 'group', ARGV[6])
redis.call('SDIFFSTORE', KEYS[6], KEYS[3])
redis.call('SREM', KEYS[6], ARGV[1])
redis.call('SET', KEYS[1], ARGV[5])
return tonumber(ARGV[5])
"""

GRAB_SCRIPT = """\
-- KEYS: elig, claimed, shares, log, grabber balance; ARGV: user
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 0 then return 'NOT_ELIGIBLE' end
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return 'ALREADY_CLAIMED' end
local amount = redis.call('LPOP', KEYS[3])
if not amount then return 'SOLD_OUT' end
redis.call('HSET', KEYS[2], ARGV[1], amount)
redis.call('RPUSH', KEYS[4], ARGV[1] .. ':' .. amount)
redis.call('INCRBY', KEYS[5], amount)
return tonumber(amount)
"""

PACKET_SCRIPT = """\
-- KEYS: meta, log; ARGV: offset, limit
local meta = redis.call('HGETALL', KEYS[1])
if #meta == 0 then return 'NOT_FOUND' end
local first = tonumber(ARGV[1])
return {meta, redis.call('LRANGE', KEYS[2], first, first + tonumber(ARGV[2]) - 1)}
"""

SCRIPTS = {"send": SEND_SCRIPT, "grab": GRAB_SCRIPT, "packet": PACKET_SCRIPT}
SHAS = {name: hashlib.sha1(text.encode()).hexdigest() for name, text in SCRIPTS.items()}
LOAD_CHUNK = 2000
PACKET, BALANCE = int(Op.PACKET), int(Op.BALANCE)


def status_of_reply(v) -> int:
    """A Redis script's refusal (a status name) as anbao's status code."""
    if isinstance(v, resp.RespError):
        return int(Status.INTERNAL)
    if isinstance(v, bytes):
        try:
            return int(Status[v.decode()])
        except (KeyError, UnicodeDecodeError):
            return loadgen.BAD_REPLY
    return loadgen.BAD_REPLY


def meta_key(packet_id: int) -> bytes:
    return b"{pk:%d}:meta" % packet_id


def elig_key(packet_id: int) -> bytes:
    return b"{pk:%d}:elig" % packet_id


def balance_key(user_id: int) -> bytes:
    return b"b:%d" % user_id


def group_key(group_id: int) -> bytes:
    return b"g:%d" % group_id


class EveningEncoder:
    """The evening's requests as RESP commands, and their replies as anbao's
    status codes (0: OK)."""

    def __init__(self, shas: dict[str, str]):
        self.send_sha, self.grab_sha, self.packet_sha = (shas[k].encode() for k in ("send", "grab", "packet"))

    def send(self, rid: int, step) -> bytes:
        shares, _, _ = packet_keys(step.packet_id)
        return resp.encode_command(
            b"EVALSHA",
            self.send_sha,
            6,
            b"idem:" + step.key.hex().encode(),
            balance_key(step.sender),
            group_key(step.group_id),
            meta_key(step.packet_id),
            shares,
            elig_key(step.packet_id),
            step.sender,
            step.total_cents,
            step.count,
            step.seed,
            step.packet_id,
            step.group_id,
        )

    def grab(self, rid: int, packet_id: int, user_id: int) -> bytes:
        shares, claimed, log = packet_keys(packet_id)
        return resp.encode_command(
            b"EVALSHA", self.grab_sha, 5, elig_key(packet_id), claimed, shares, log, balance_key(user_id), user_id
        )

    def packet(self, rid: int, packet_id: int) -> bytes:
        log = packet_keys(packet_id)[2]
        return resp.encode_command(b"EVALSHA", self.packet_sha, 2, meta_key(packet_id), log, 0, 100)

    def balance(self, rid: int, user_id: int) -> bytes:
        return resp.encode_command(b"GET", balance_key(user_id))

    @staticmethod
    def status(op: int, v) -> int:
        if type(v) is int:
            return 0 if v > 0 else loadgen.BAD_REPLY
        if op == PACKET and isinstance(v, list):
            return 0
        if op == BALANCE:
            return 0 if isinstance(v, bytes) else int(Status.NOT_FOUND) if v is None else loadgen.BAD_REPLY
        return status_of_reply(v)


def prepare(server: RedisServer, users: list[int], fund_cents: int, groups: dict[int, list[int]]) -> None:
    """Loads the scripts, sets every balance to fund_cents (the deposits) and
    fills every group's set."""
    with server.client() as c:
        for name, text in SCRIPTS.items():
            if c.call("SCRIPT", "LOAD", text).decode() != SHAS[name]:
                raise RuntimeError(f"redis computed another SHA1 for the {name} script")
        cmds = []
        for i in range(0, len(users), LOAD_CHUNK):
            args = []
            for u in users[i : i + LOAD_CHUNK]:
                args += [balance_key(u), fund_cents]
            cmds.append((b"MSET", *args))
        for gid, members in groups.items():
            cmds.append((b"SADD", group_key(gid), *members))
        bad = [r for r in c.pipeline(cmds) if isinstance(r, resp.RespError)]
        if bad:
            raise RuntimeError(f"redis setup: {len(bad)} errors, e.g. {bad[0]}")


def _packet_ids(c: resp.Client) -> list[int]:
    out, cursor = [], b"0"
    while True:
        cursor, keys = c.call("SCAN", cursor, "MATCH", "{pk:*}:meta", "COUNT", 5000)
        out += [int(k[len(b"{pk:") : k.index(b"}")]) for k in keys]
        if cursor == b"0":
            return sorted(set(out))


def books(server: RedisServer, users: list[int], deposits_cents: int) -> tuple[dict, list[str]]:
    """Redis's own books after the run: balances + what is left in the
    packets' share lists == the deposits; per packet claims <= count, no
    user twice, claimed + left == total."""
    wrong: list[str] = []
    with server.client() as c:
        balances = 0
        for i in range(0, len(users), LOAD_CHUNK):
            vals = c.call("MGET", *(balance_key(u) for u in users[i : i + LOAD_CHUNK]))
            balances += sum(int(v) for v in vals if v is not None)
        ids = _packet_ids(c)
        escrow = claims = 0
        for i in range(0, len(ids), LOAD_CHUNK):
            part = ids[i : i + LOAD_CHUNK]
            cmds = []
            for pid in part:
                shares, claimed, log = packet_keys(pid)
                cmds += [(b"HMGET", meta_key(pid), b"total", b"count"), (b"LRANGE", shares, 0, -1)]
                cmds += [(b"LRANGE", log, 0, -1), (b"HLEN", claimed)]
            replies = c.pipeline(cmds)
            for j, pid in enumerate(part):
                meta, left, log, n_claimed = replies[4 * j : 4 * j + 4]
                total_cents, count = int(meta[0]), int(meta[1])
                amounts = [int(x) for x in left] + [int(e.partition(b":")[2]) for e in log]
                left_cents = sum(amounts[: len(left)])
                claimed_cents = sum(amounts[len(left) :])
                if amounts and min(amounts) < 1:
                    wrong.append(f"redis packet {pid}: a share below 1 cent")
                if len(log) > count or len(log) != n_claimed:
                    wrong.append(f"redis packet {pid}: {len(log)} claims logged, {n_claimed} users, {count} shares")
                if claimed_cents + left_cents != total_cents or len(log) + len(left) != count:
                    wrong.append(f"redis packet {pid}: {claimed_cents} claimed + {left_cents} left != {total_cents}")
                escrow += left_cents
                claims += len(log)
    if balances + escrow != deposits_cents:
        wrong.append(f"redis: balances {balances:,} + escrow {escrow:,} cents != deposits {deposits_cents:,}")
    summary = {
        "packets": len(ids),
        "claims": claims,
        "balances_cents": balances,
        "escrow_cents": escrow,
        "deposits_cents": deposits_cents,
    }
    return summary, wrong
