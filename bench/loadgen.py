"""The load generator: one process, C connections on its own uvloop.

Closed loop (wrk): every connection keeps `depth` requests in flight and
sends the next one as soon as an answer comes back; latency is measured from
the moment each request was written.

Open loop (wrk2): requests are put on a timetable at `rate` per second for
this process, whatever the server does; latency is measured from the
*scheduled* send time, so a stalled server is charged for every request it
delayed (coordinated omission corrected). A connection never has more than
`depth` requests in flight; a request whose connection slots are all busy
waits, and its wait counts. The timetable is served on the event loop's
millisecond timer: a request may leave up to ~1 ms after its slot (also
counted), and the scheduler never spins.

Routing, as the SDK's Cluster does it: a process holds one group of
connections per worker it sends to, each connection steered to that worker
by its TCP source port (anbao_client.routing.local_port_for; the server's
reuseport BPF program picks the listener from it), and each group draws its
requests from a workload of packets that worker owns. A group with no
worker (the baselines, or --routing any) uses ordinary connections. After
HELLO every steered connection asks TOPOLOGY which worker it reached; a
miss is counted (the server relays, so answers stay right, only slower).
With several sets (--sets) a group also names its set's port, since each
packet's grabs go to the set that holds it, and its answers are counted
per set as well.

Requests are built with anbao_client.wire (the SDK's pure-Python codec) and
answers split with wire.FrameBuffer. With protocol "resp" (the Redis
baseline) the same generator speaks RESP2 straight to redis-server: each
grab is an EVALSHA of the grab script, pipelined `depth` deep per
connection, a PING instead of HELLO, replies matched in order; each reply
must be an amount (OK), ALREADY_CLAIMED or SOLD_OUT, anything else is
counted as INTERNAL (an error reply) or BAD_REPLY.

Latencies go into HdrHistograms (1 us to 1 h, 3 significant digits) which
travel back to the parent encoded, with the count of every (opcode, status)
pair. Every run is bounded twice: by its
attempts and by `duration_s`; after the deadline nothing new is sent, and
answers still missing after `grace_s` are counted as unanswered.
"""

from __future__ import annotations

import asyncio
import random
import resource
import socket
import time
import traceback
from array import array

from hdrh.histogram import HdrHistogram

from anbao_client import wire
from anbao_client.routing import local_port_for
from anbao_client.wire import Op, Status

from . import resp
from .redis_baseline import GrabEncoder

LOWEST_US = 1
HIGHEST_US = 3_600_000_000
SIGNIFICANT_DIGITS = 3
CONNECT_TIMEOUT_S = 15.0
GO_TIMEOUT_S = 600.0
PROGRESS_EVERY_S = 0.1
UNANSWERED = 256  # pseudo-status of a request whose answer never came
BAD_REPLY = 257  # pseudo-status of a Redis reply that is none of amount / ALREADY_CLAIMED / SOLD_OUT
HELLO_RID = 1
TOPOLOGY_RID = 2
PORT_ATTEMPTS = 50
TIMER_TICK_S = 0.001


_SOLD_OUT, _ALREADY_CLAIMED, _INTERNAL = int(Status.SOLD_OUT), int(Status.ALREADY_CLAIMED), int(Status.INTERNAL)


def new_histogram() -> HdrHistogram:
    return HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_DIGITS)


# ---------------------------------------------------------------- workloads
# A workload hands out requests one at a time: take(rid) -> (frame, opcode),
# or None once it is spent. Each is built inside the process from a plain
# dict so that it crosses the process boundary cheaply.


class GrabRange:
    """GRABs on one packet from users user_first + i % user_mod, i in [lo, hi)."""

    def __init__(self, packet_id: int, user_first: int, user_mod: int, lo: int, hi: int, grab=wire.grab):
        assert user_mod > 0 and 0 <= lo <= hi
        self.grab = grab
        self.packet_id, self.user_first, self.user_mod = packet_id, user_first, user_mod
        self.i, self.hi = lo, hi
        self.total = hi - lo

    def take(self, rid: int):
        i = self.i
        if i >= self.hi:
            return None
        self.i = i + 1
        return self.grab(rid, self.packet_id, self.user_first + i % self.user_mod), Op.GRAB


class GrabPairs:
    """GRABs on explicit (packet, user) pairs, in the order given."""

    def __init__(self, packets: array, users: array, grab=wire.grab):
        assert len(packets) == len(users)
        self.grab = grab
        self.packets, self.users = packets, users
        self.i = 0
        self.total = len(packets)

    def take(self, rid: int):
        i = self.i
        if i >= self.total:
            return None
        self.i = i + 1
        return self.grab(rid, self.packets[i], self.users[i]), Op.GRAB


class Mixed:
    """Sends, grabs and queries drawn at random in fixed proportions."""

    def __init__(
        self,
        n: int,
        seed: int,
        weights: dict,
        senders: list,
        send_cents: int,
        send_shares: int,
        grab_packets: list,
        user_first: int,
        user_count: int,
    ):
        self.total = n
        self.left = n
        self.rng = random.Random(seed)
        ops = [Op[name] for name in weights]
        cum, acc = [], 0.0
        for name in weights:
            acc += weights[name]
            cum.append(acc)
        self.ops, self.cum = ops, [c / acc for c in cum]
        self.senders, self.send_cents, self.send_shares = senders, send_cents, send_shares
        self.grab_packets = grab_packets
        self.user_first, self.user_count = user_first, user_count

    def take(self, rid: int):
        if self.left <= 0:
            return None
        self.left -= 1
        rng = self.rng
        x = rng.random()
        op = self.ops[-1]
        for o, c in zip(self.ops, self.cum, strict=True):
            if x < c:
                op = o
                break
        if op == Op.GRAB:
            user = self.user_first + rng.randrange(self.user_count)
            return wire.grab(rid, rng.choice(self.grab_packets), user), op
        if op == Op.SEND:
            return wire.send(
                rid,
                rng.randbytes(wire.IDEMPOTENCY_KEY_BYTES),
                rng.choice(self.senders),
                self.send_cents,
                self.send_shares,
                wire.Mode.RANDOM,
                0,
                wire.Audience.OPEN,
                [],
                "",
            ), op
        if op == Op.PACKET:
            return wire.packet(rid, rng.choice(self.grab_packets), 0, 10), op
        if op == Op.BALANCE:
            return wire.balance(rid, self.user_first + rng.randrange(self.user_count)), op
        raise AssertionError(op)


class StepBudget:
    """The evening's workload: n steps to start (bench/evening_load.py's
    EveningGenerator draws them; the generic loops never call take)."""

    def __init__(self, n: int):
        self.total = self.left = n

    def take(self, rid: int):
        return None


def make_workload(desc: dict, grab=wire.grab):
    """grab(rid, packet, user) -> request bytes: wire.grab, or the Redis
    baseline's EVALSHA encoder."""
    kind = desc["kind"]
    if kind == "evening":
        return StepBudget(desc["n"])
    if kind == "grab_range":
        return GrabRange(desc["packet_id"], desc["user_first"], desc["user_mod"], desc["lo"], desc["hi"], grab)
    if kind == "grab_pairs":
        return GrabPairs(desc["packets"], desc["users"], grab)
    if grab is not wire.grab:
        raise ValueError(f"workload {kind!r} speaks anbao's protocol only")
    if kind == "group_sends":
        from .sendalone import GroupSends  # SEND alone (python -m bench.sendalone)

        return GroupSends(desc["n"], desc["seed"], desc["groups"])
    if kind == "mixed":
        return Mixed(
            desc["n"],
            desc["seed"],
            desc["weights"],
            desc["senders"],
            desc["send_cents"],
            desc["send_shares"],
            desc["grab_packets"],
            desc["user_first"],
            desc["user_count"],
        )
    raise ValueError(f"unknown workload {kind!r}")


# ---------------------------------------------------------------- connections


class _Conn(asyncio.Protocol):
    def __init__(self, gen: Generator, group: _Group):
        self.gen = gen
        self.group = group
        self.transport: asyncio.Transport | None = None
        self.frames = wire.FrameBuffer()
        self.pending: dict[int, tuple[float, int]] = {}  # request id -> (start time, opcode)
        self.next_rid = TOPOLOGY_RID + 1
        self.setup_answers: list = []  # HELLO and TOPOLOGY, before the load
        self.setup_waiter: asyncio.Future | None = None
        self.in_setup = True
        self.alive = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.alive = True
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    BAD_INPUT = "bad frame from server"

    def data_received(self, data: bytes) -> None:
        try:
            answers = self.frames.feed(data)
        except ValueError as exc:
            self.gen.note_error(f"{self.BAD_INPUT}: {exc}")
            self.transport.close()
            return
        if self.in_setup:
            self.setup_answers += answers
            if self.setup_waiter is not None and not self.setup_waiter.done():
                self.setup_waiter.set_result(None)
            return
        if answers:
            self.deliver(answers)

    def deliver(self, responses: list) -> None:
        self.gen.on_responses(self, responses)

    def connection_lost(self, exc) -> None:
        self.alive = False
        if self.setup_waiter is not None and not self.setup_waiter.done():
            self.setup_waiter.set_exception(ConnectionError(f"connection lost during HELLO: {exc}"))
        self.gen.on_lost(self, exc)

    async def setup_answer(self):
        while not self.setup_answers:
            self.setup_waiter = asyncio.get_running_loop().create_future()
            await asyncio.wait_for(self.setup_waiter, CONNECT_TIMEOUT_S)
        return self.setup_answers.pop(0)


class _RespConn(_Conn):
    """A connection to redis-server: RESP2 replies, in the order of the
    requests (request ids stay local: reply k answers the k-th request)."""

    def __init__(self, gen: Generator, group: _Group):
        super().__init__(gen, group)
        self.frames = resp.ReplyParser()
        self.answer_rid = self.next_rid  # the request the next reply answers

    BAD_INPUT = "bad RESP from redis"

    def deliver(self, replies: list) -> None:
        self.gen.on_replies(self, replies)


class _Group:
    """Connections to one worker (or to whichever the kernel picks) and the
    workload they share; with sets, on its set's port (tag: the set), its
    answers also counted on their own."""

    def __init__(
        self, worker: int | None, connections: int, work, rate: float | None, port: int | None = None, tag=None
    ):
        self.worker = worker
        self.port, self.tag = port, tag
        self.ok = self.answered = 0
        self.last_ok = self.last_answer = None
        self.n_connections = connections
        self.work = work
        self.rate = rate
        self.conns: list[_Conn] = []
        self.exhausted = work.total == 0
        self.blocked = False  # open loop: every slot busy, requests waiting
        self.slot_freed = asyncio.Event()


# ---------------------------------------------------------------- generator


class Generator:
    def __init__(self, spec: dict, progress=None, progress_slot: int = 0):
        self.loop = asyncio.get_running_loop()
        self.spec = spec
        self.depth: int = spec["depth"]
        self.rate: float | None = spec.get("rate")
        self.duration_s: float = spec["duration_s"]
        self.grace_s: float = spec.get("grace_s", 10.0)
        self.worker_count: int | None = spec.get("worker_count")
        self.resp = spec.get("protocol", "anbao") == "resp"
        grab = GrabEncoder(spec["script_sha"]) if self.resp else wire.grab
        total = sum(_planned(g["workload"]) for g in spec["groups"]) or 1
        self.groups = [
            _Group(
                g.get("worker"),
                g["connections"],
                make_workload(g["workload"], grab),
                self.rate * _planned(g["workload"]) / total if self.rate else None,
                g.get("port"),
                g.get("set"),
            )
            for g in spec["groups"]
        ]
        self.conns: list[_Conn] = []
        self.hist = new_histogram()
        self.hist_ok = new_histogram()
        self.hist_op: dict[int, HdrHistogram] = {}
        self.counts: dict[int, int] = {}  # opcode << 9 | status -> answers
        self.sent = self.answered = self.ok = self.lost = 0
        self.ok_amount = 0  # resp: cents handed out in OK answers
        self.t0 = self.first_send = self.last_answer = self.last_ok = None
        self.stopping = False
        self.capped = False
        self.errors: list[str] = []
        self.max_sched_lag = 0.0
        self.steered = self.misrouted = 0
        self.done: asyncio.Future = self.loop.create_future()
        self.progress = progress
        self.progress_slot = progress_slot
        self.multi_op = any(g["workload"]["kind"] == "mixed" for g in spec["groups"])

    @property
    def exhausted(self) -> bool:
        return all(g.exhausted for g in self.groups)

    @property
    def planned(self) -> int:
        return sum(g.work.total for g in self.groups)

    # -------------------------------------------------------- setup

    async def connect(self) -> None:
        host = self.spec["host"]
        token = self.spec["token"].encode()
        sem = asyncio.Semaphore(64)
        conn_class = _RespConn if self.resp else _Conn

        async def one(group: _Group) -> _Conn:
            async with sem:
                steer = group.worker is not None and self.worker_count and self.worker_count > 1 and not self.resp
                port = group.port or self.spec["port"]
                for attempt in range(PORT_ATTEMPTS if steer else 1):
                    local = (host, local_port_for(group.worker, self.worker_count)) if steer else None
                    try:
                        _, conn = await asyncio.wait_for(
                            self.loop.create_connection(lambda: conn_class(self, group), host, port, local_addr=local),
                            CONNECT_TIMEOUT_S,
                        )
                        break
                    except OSError:
                        if attempt == PORT_ATTEMPTS - 1 or not steer:
                            raise  # else: that source port was taken; draw another
                if self.resp:
                    conn.transport.write(resp.encode_command(b"PING"))
                    r = await conn.setup_answer()
                    if r != "PONG":
                        raise ConnectionError(f"redis answered PING with {r!r}")
                    conn.in_setup = False
                    return conn
                conn.transport.write(wire.hello(HELLO_RID, token))
                r = await conn.setup_answer()
                if r.status != wire.Status.OK:
                    raise ConnectionError(f"HELLO refused: {_status_name(r.status)} {wire.error_message(r.body)}")
                if steer:
                    conn.transport.write(wire.topology(TOPOLOGY_RID))
                    r = await conn.setup_answer()
                    self.steered += 1
                    if r.status != wire.Status.OK or wire.decode_topology(r).worker_id != group.worker:
                        self.misrouted += 1
                conn.in_setup = False
                return conn

        for g in self.groups:
            g.conns = list(await asyncio.gather(*(one(g) for _ in range(g.n_connections))))
            self.conns += g.conns

    # -------------------------------------------------------- running

    async def run(self) -> None:
        self.t0 = time.monotonic()
        self.loop.call_at(self.loop.time() + self.duration_s, self._deadline)
        self._report_progress()
        self.first_send = self.t0
        for g in self.groups:
            if self.rate:
                self.loop.create_task(self._open_loop(g))
            else:
                for c in g.conns:
                    self._fill(c, self.t0)
                    if g.exhausted:
                        break
        self._check_done()
        await self.done

    def _fill(self, conn: _Conn, now: float) -> None:
        """Closed loop: tops this connection up to `depth` in flight."""
        group = conn.group
        n = self.depth - len(conn.pending)
        if n <= 0 or self.stopping or group.exhausted or not conn.alive:
            return
        take = group.work.take
        pending = conn.pending
        rid = conn.next_rid
        frames = []
        for _ in range(n):
            item = take(rid)
            if item is None:
                group.exhausted = True
                break
            frame, op = item
            pending[rid] = (now, op)
            frames.append(frame)
            rid += 1
        conn.next_rid = rid
        if frames:
            self.sent += len(frames)
            conn.transport.write(b"".join(frames))

    async def _open_loop(self, group: _Group) -> None:
        rate = group.rate
        t0 = self.t0
        conns = group.conns
        depth = self.depth
        take = group.work.take
        k = 0  # requests sent so far, in timetable order
        ci = 0
        while not self.stopping and not group.exhausted:
            now = time.monotonic()
            due = int((now - t0) * rate) + 1
            batches: dict[_Conn, list] = {}
            blocked = False
            while k < due:
                for _ in range(len(conns)):
                    c = conns[ci]
                    ci = (ci + 1) % len(conns)
                    if c.alive and len(c.pending) < depth:
                        break
                else:
                    blocked = True  # every slot busy: this request waits, its clock already running
                    break
                rid = c.next_rid
                item = take(rid)
                if item is None:
                    group.exhausted = True
                    break
                c.next_rid = rid + 1
                frame, op = item
                c.pending[rid] = (t0 + k / rate, op)
                batches.setdefault(c, []).append(frame)
                k += 1
            for c, frames in batches.items():
                self.sent += len(frames)
                c.transport.write(b"".join(frames))
            if group.exhausted or not any(c.alive for c in conns):
                break
            if blocked:
                # Wait for an answer to free a slot (not a busy poll: that
                # would take CPU from the server on a small machine).
                group.slot_freed.clear()
                group.blocked = True
                await group.slot_freed.wait()
                group.blocked = False
                continue
            # The event loop's timers tick in milliseconds: a shorter sleep
            # would spin and take a core from the server. A request thus waits
            # up to ~1 ms past its slot, and that wait is in its latency.
            wait = max((t0 + k / rate) - time.monotonic(), TIMER_TICK_S)
            intended = time.monotonic() + wait
            await asyncio.sleep(wait)
            # How late this process woke up: its own stalls (CPU contention,
            # pauses), which the open-loop latencies include.
            lag = time.monotonic() - intended
            if lag > self.max_sched_lag:
                self.max_sched_lag = lag
        group.exhausted = True
        self._check_done()

    def on_responses(self, conn: _Conn, responses: list) -> None:
        now = time.monotonic()
        pending = conn.pending
        hist, hist_ok, counts = self.hist, self.hist_ok, self.counts
        n = ok = 0
        for r in responses:
            entry = pending.pop(r.request_id, None)
            if entry is None:
                self.note_error(f"answer to unknown request id {r.request_id}")
                continue
            start, op = entry
            us = int((now - start) * 1_000_000) or 1
            hist.record_value(us)
            if self.multi_op:
                h = self.hist_op.get(op)
                if h is None:
                    h = self.hist_op[op] = new_histogram()
                h.record_value(us)
            key = (op << 9) | r.status
            counts[key] = counts.get(key, 0) + 1
            if r.status == 0:
                ok += 1
                hist_ok.record_value(us)
            n += 1
        if ok:
            self.ok += ok
            self.last_ok = conn.group.last_ok = now
            conn.group.ok += ok
        self._answered(conn, n, now)

    def on_replies(self, conn: _RespConn, replies: list) -> None:
        """on_responses for Redis: reply k answers request answer_rid + k."""
        now = time.monotonic()
        pending = conn.pending
        hist, hist_ok, counts = self.hist, self.hist_ok, self.counts
        rid = conn.answer_rid
        n = 0
        for v in replies:
            entry = pending.pop(rid, None)
            rid += 1
            if entry is None:
                self.note_error(f"redis reply {v!r} to no request")
                continue
            start, op = entry
            us = int((now - start) * 1_000_000) or 1
            hist.record_value(us)
            if type(v) is int:
                if v > 0:
                    status = 0
                    self.ok_amount += v
                else:
                    status = BAD_REPLY
                    self.note_error(f"redis grab answered amount {v}")
            elif v == b"SOLD_OUT":
                status = _SOLD_OUT
            elif v == b"ALREADY_CLAIMED":
                status = _ALREADY_CLAIMED
            elif isinstance(v, resp.RespError):
                status = _INTERNAL
                self.note_error(f"redis error reply: {v}")
            else:
                status = BAD_REPLY
                self.note_error(f"redis grab answered {v!r}")
            key = (op << 9) | status
            counts[key] = counts.get(key, 0) + 1
            if status == 0:
                self.ok += 1
                hist_ok.record_value(us)
                self.last_ok = now
            n += 1
        conn.answer_rid = rid
        self._answered(conn, n, now)

    def _answered(self, conn: _Conn, n: int, now: float) -> None:
        """After n answers on conn: refill it (closed loop) or free a slot
        (open loop), and end the run once nothing more is owed."""
        self.answered += n
        self.last_answer = now
        conn.group.answered += n
        conn.group.last_answer = now
        if not self.rate:
            self._fill(conn, now)
        elif conn.group.blocked:
            conn.group.slot_freed.set()
        if self.exhausted or self.stopping:
            self._check_done()

    def on_lost(self, conn: _Conn, exc) -> None:
        if conn.pending:
            self.lost += len(conn.pending)
            for _, op in conn.pending.values():
                key = (op << 9) | UNANSWERED
                self.counts[key] = self.counts.get(key, 0) + 1
            conn.pending.clear()
        if not conn.in_setup and not self.stopping and not self.exhausted:
            self.note_error(f"connection lost: {exc}")
        conn.group.slot_freed.set()
        if self.conns and not any(c.alive for c in self.conns):
            self.stopping = True
        self._check_done()

    def note_error(self, text: str) -> None:
        if len(self.errors) < 20:
            self.errors.append(text)

    def _deadline(self) -> None:
        if self.done.done():
            return
        # Stopped by the clock, not by running out of attempts (or answers still due).
        if not self.exhausted or any(c.pending for c in self.conns):
            self.capped = True
        self.stopping = True
        for g in self.groups:
            g.slot_freed.set()
        self.loop.call_later(self.grace_s, self._give_up)
        self._check_done()

    def _give_up(self) -> None:
        for c in self.conns:
            for _, op in c.pending.values():
                key = (op << 9) | UNANSWERED
                self.counts[key] = self.counts.get(key, 0) + 1
                self.lost += 1
            c.pending.clear()
        if not self.done.done():
            self.done.set_result(None)

    def _check_done(self) -> None:
        if self.done.done() or not (self.exhausted or self.stopping):
            return
        if all(not c.pending for c in self.conns):
            self.done.set_result(None)

    def _report_progress(self) -> None:
        if self.progress is not None:
            self.progress[2 * self.progress_slot] = self.answered
            self.progress[2 * self.progress_slot + 1] = self.ok
        if not self.done.done():
            self.loop.call_later(PROGRESS_EVERY_S, self._report_progress)

    def close(self) -> None:
        for c in self.conns:
            if c.transport is not None:
                c.transport.close()

    def by_tag(self) -> dict:
        """Per tag of the groups (with sets: per set): OK answers, answers and
        when the last of each came."""
        out: dict = {}
        for g in self.groups:
            if g.tag is None:
                continue
            t = out.setdefault(g.tag, {"ok": 0, "answered": 0, "last_ok": None, "last_answer": None})
            t["ok"] += g.ok
            t["answered"] += g.answered
            for k in ("last_ok", "last_answer"):
                v = getattr(g, k)
                if v is not None and (t[k] is None or v > t[k]):
                    t[k] = v
        return out

    def result(self) -> dict:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "connections": len(self.conns),
            "sent": self.sent,
            "answered": self.answered,
            "ok": self.ok,
            "ok_amount": self.ok_amount,
            "unanswered": self.lost,
            "capped": self.capped,
            "planned": self.planned,
            "steered_connections": self.steered,
            "misrouted_connections": self.misrouted,
            "t0": self.t0,
            "first_send": self.first_send,
            "last_answer": self.last_answer,
            "last_ok": self.last_ok,
            "counts": dict(self.counts),
            "hist": self.hist.encode(),
            "hist_ok": self.hist_ok.encode(),
            "hist_op": {op: h.encode() for op, h in self.hist_op.items()},
            "cpu_s": usage.ru_utime + usage.ru_stime,
            "max_sched_lag_s": self.max_sched_lag,
            "errors": self.errors,
            "by_tag": self.by_tag(),
        }


# ---------------------------------------------------------------- process


def _planned(desc: dict) -> int:
    kind = desc["kind"]
    if kind == "grab_range":
        return desc["hi"] - desc["lo"]
    if kind == "grab_pairs":
        return len(desc["packets"])
    return desc["n"]


def _status_name(status: int) -> str:
    try:
        return wire.Status(status).name
    except ValueError:
        return str(status)


def generator_class(spec: dict) -> type[Generator]:
    if spec.get("generator") == "evening":
        from .evening_load import EveningGenerator

        return EveningGenerator
    return Generator


async def _main(spec: dict, slot: int, ready_q, go, progress) -> dict:
    gen = generator_class(spec)(spec, progress, slot)
    try:
        await gen.connect()
        ready_q.put(("ready", slot, None))
        loop = asyncio.get_running_loop()
        released = await loop.run_in_executor(None, go.wait, GO_TIMEOUT_S)
        if not released:
            raise TimeoutError("never told to start")
        await gen.run()
        return gen.result()
    finally:
        gen.close()


def process_main(spec: dict, slot: int, ready_q, go, progress, result_q) -> None:
    """Entry point of one load-generator process (multiprocessing, spawn)."""
    import uvloop

    try:
        result = uvloop.run(_main(spec, slot, ready_q, go, progress))
        result_q.put(("result", slot, result))
    except BaseException as exc:  # the parent must hear about it, whatever it is
        ready_q.put(("error", slot, f"{exc!r}\n{traceback.format_exc()}"))
        result_q.put(("error", slot, f"{exc!r}\n{traceback.format_exc()}"))
