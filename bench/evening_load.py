"""The evening's load generator: bench/loadgen.py's Generator (connections,
steering, HdrHistograms, open/closed loop, deadline and grace), driving
dependent steps instead of independent requests.

A step is one packet's life (bench/evening.py draws it): SEND, then its
GRABs, then PACKET by 3 of the grabbers, then BALANCE by one of them. A
step lives on the connection that sent its SEND, so its grabs reach the
worker that owns its packet (whoever takes a SEND owns the packet, and
each connection is steered to one worker). Each connection keeps a queue
of ready requests (the next requests of its steps whose previous request
was answered); a free in-flight slot takes the oldest ready request, or
starts a new step (a SEND) when none is ready and the connection holds
fewer than max_steps_per_conn steps.

Closed loop: each connection keeps `depth` requests in flight. A request
answered with a retryable status (BUSY, RATE_LIMITED, UNAVAILABLE,
IN_DOUBT) is counted with that status and sent again after retry_ms (a
SEND with its own idempotency key, so at most once).
Open loop: requests leave on a timetable at the group's rate, latency from
the scheduled time (coordinated omission corrected); each slot takes a
ready request of any of the group's connections with a free slot before
it starts a new step (a packet's grabs follow its SEND as a burst); a
retryable answer is counted and the request dropped (a SEND's step ends
there).

The run ends after its steps (--attempts) or at --duration-s: then no new
request leaves, the answers still due are awaited (grace), and the steps
cut short stay as they are (their packets unsold, to expire). Only answers
never received make it CAPPED.

Redis (protocol "resp"): the same steps as EVALSHA of the evening scripts
(bench/evening_redis.py), packet ids chosen here (as an app would:
process slot << 40 | sequence), replies matched in order.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from dataclasses import dataclass, field

from anbao_client import wire
from anbao_client.wire import Op, Status

from . import evening_redis, loadgen

SEND, GRAB, PACKET, BALANCE = int(Op.SEND), int(Op.GRAB), int(Op.PACKET), int(Op.BALANCE)
RETRYABLE = frozenset(int(s) for s in (Status.BUSY, Status.RATE_LIMITED, Status.UNAVAILABLE, Status.IN_DOUBT))
OPENERS = 3  # grabbers who open the packet (PACKET)
CLAIMS_LIMIT = 100  # PACKET: claims_offset 0, limit 100
SHARES_MIN, SHARES_MAX = 5, 20
SHARES_GEOMETRIC_P = 1 / 3  # shares = 5 + failures before a success at p = 1/3 (mean 2), capped: mean ~7
EXTRA_GRABBERS_MIN, EXTRA_GRABBERS_MAX = 1, 5  # grabbers beyond the shares: each step sells out
CENTS_PER_SHARE_MIN, CENTS_PER_SHARE_MAX = 100, 1000  # total = shares x uniform(1.00 .. 10.00)
SEED_MAX = 2_147_483_646  # the Redis split's Park-Miller generator takes seeds 1 .. 2^31 - 2


@dataclass(slots=True)
class Step:
    group_id: int
    sender: int
    count: int
    total_cents: int
    key: bytes  # SEND's idempotency key
    seed: int  # Redis: the split's seed
    grabbers: list[int]
    packet_id: int = 0
    left: int = 0  # answers still due in the current phase
    ended: bool = False
    conn: object = field(default=None, repr=False)


def draw_shares(rng: random.Random) -> int:
    """5 + a geometric count (failures before a success at p = 1/3), capped at
    20: P(5) = 1/3, P(6) = 2/9, ..., mean 5 + 2 x (1 - (2/3)^15) = 6.995."""
    k = SHARES_MIN
    while k < SHARES_MAX and rng.random() >= SHARES_GEOMETRIC_P:
        k += 1
    return k


def draw_step(rng: random.Random, groups: list[list[int]], group_first: int) -> Step:
    """A random group, a random member sends; shares + 1..5 other members
    grab (never more than the group holds besides the sender, and never
    fewer grabbers than shares + 1: a group of 20 caps a packet at 18 shares)."""
    gi = rng.randrange(len(groups))
    members = groups[gi]
    others = len(members) - 1
    count = min(draw_shares(rng), others - 1)
    extra = rng.randint(EXTRA_GRABBERS_MIN, EXTRA_GRABBERS_MAX)
    picks = rng.sample(members, min(count + extra, others) + 1)
    return Step(
        group_id=group_first + gi,
        sender=picks[0],
        count=count,
        total_cents=count * rng.randint(CENTS_PER_SHARE_MIN, CENTS_PER_SHARE_MAX),
        key=rng.randbytes(wire.IDEMPOTENCY_KEY_BYTES),
        seed=rng.randint(1, SEED_MAX),
        grabbers=picks[1:],
    )


class AnbaoEncoder:
    """The steps' requests in anbao's binary protocol (the SDK's codec)."""

    @staticmethod
    def send(rid: int, step: Step) -> bytes:
        return wire.send(
            rid,
            step.key,
            step.sender,
            step.total_cents,
            step.count,
            wire.Mode.RANDOM,
            0,
            wire.Audience.GROUP,
            [step.group_id],
            "",
        )

    grab = staticmethod(wire.grab)

    @staticmethod
    def packet(rid: int, packet_id: int) -> bytes:
        return wire.packet(rid, packet_id, 0, CLAIMS_LIMIT)

    balance = staticmethod(wire.balance)


class EveningGenerator(loadgen.Generator):
    """One load-generator process of the evening (see the module's doc)."""

    def __init__(self, spec: dict, progress=None, progress_slot: int = 0):
        super().__init__(spec, progress, progress_slot)
        ev = spec["evening"]
        self.multi_op = True
        self.members: list[list[int]] = ev["groups"]
        self.group_first: int = ev["group_first"]
        self.rng = random.Random(ev["seed"] * 1_000_003 + progress_slot)
        self.retry_s = ev["retry_ms"] / 1000
        self.max_steps = max(2, ev.get("max_steps_per_conn") or 2 * self.depth)
        self.enc = evening_redis.EveningEncoder(ev["shas"]) if self.resp else AnbaoEncoder()
        self.packet_base = (progress_slot + 1) << 40
        # steps_cut: ended early (a SEND dropped in open loop, a connection lost)
        # slots_unsent: open loop, the timetable's slots past the last request sent when the run ended
        self.stats = {
            "steps_started": 0,
            "steps_done": 0,
            "steps_cut": 0,
            "retries": 0,
            "sends_refused": 0,
            "slots_unsent": 0,
        }

    async def connect(self) -> None:
        await super().connect()
        for g in self.groups:
            g.active = 0
        for c in self.conns:
            c.ready = deque()
            c.items = {}
            c.steps = 0

    async def run(self) -> None:
        self.t0 = self.first_send = time.monotonic()
        self.loop.call_at(self.loop.time() + self.duration_s, self._deadline)
        self._report_progress()
        for g in self.groups:
            if self.rate:
                self.loop.create_task(self._open_loop(g))
            else:
                for c in g.conns:
                    self._fill(c, self.t0)
        self._check_done()
        await self.done

    # -------------------------------------------------------- steps

    def _next(self, conn):
        """The next request of this connection: a ready one, else a new step's SEND."""
        if conn.ready:
            return conn.ready.popleft()
        g = conn.group
        if self.stopping or g.work.left <= 0 or conn.steps >= self.max_steps:
            return None
        g.work.left -= 1
        g.active += 1
        conn.steps += 1
        self.stats["steps_started"] += 1
        step = draw_step(self.rng, self.members, self.group_first)
        step.conn = conn
        if self.resp:
            step.packet_id = self.packet_base + self.stats["steps_started"]
        return (SEND, step, step.sender)

    def _frame(self, rid: int, item) -> bytes:
        op, step, user = item
        enc = self.enc
        if op == GRAB:
            return enc.grab(rid, step.packet_id, user)
        if op == SEND:
            return enc.send(rid, step)
        if op == PACKET:
            return enc.packet(rid, step.packet_id)
        return enc.balance(rid, user)

    def _end(self, step: Step, cut: bool = False) -> None:
        if step.ended:
            return
        step.ended = True
        conn = step.conn
        conn.steps -= 1
        g = conn.group
        g.active -= 1
        self.stats["steps_cut" if cut else "steps_done"] += 1
        if g.work.left <= 0 and g.active == 0:
            g.exhausted = True

    def _advance(self, item, status: int, packet_id: int | None) -> None:
        """What an answer to `item` makes ready next."""
        op, step, _ = item
        conn = step.conn
        if status in RETRYABLE:
            if not self.rate and not self.stopping:
                self.stats["retries"] += 1
                self.loop.call_later(self.retry_s, self._requeue, item)
                return
            if op == SEND:
                self._end(step, cut=True)
                return
        if op == GRAB:
            step.left -= 1
            if step.left == 0:
                step.left = OPENERS
                conn.ready.extend((PACKET, step, u) for u in step.grabbers[:OPENERS])
        elif op == SEND:
            if status != 0:
                self.stats["sends_refused"] += 1
                self._end(step)
                return
            step.packet_id = packet_id
            step.left = len(step.grabbers)
            conn.ready.extend((GRAB, step, u) for u in step.grabbers)
        elif op == PACKET:
            step.left -= 1
            if step.left == 0:
                step.left = 1
                conn.ready.append((BALANCE, step, step.grabbers[0]))
        else:
            self._end(step)

    def _requeue(self, item) -> None:
        conn = item[1].conn
        if self.stopping or not conn.alive:
            self._end(item[1], cut=True)
            self._check_done()
            return
        conn.ready.appendleft(item)
        self._fill(conn, time.monotonic())

    # -------------------------------------------------------- sending

    def _fill(self, conn, now: float) -> None:
        """Closed loop: tops this connection up to `depth` in flight."""
        if self.stopping or not conn.alive:
            return
        pending, items = conn.pending, conn.items
        frames = []
        rid = conn.next_rid
        while len(pending) < self.depth:
            item = self._next(conn)
            if item is None:
                break
            pending[rid] = (now, item[0])
            items[rid] = item
            frames.append(self._frame(rid, item))
            rid += 1
        conn.next_rid = rid
        if frames:
            self.sent += len(frames)
            conn.transport.write(b"".join(frames))

    def _take_slot(self, conns: list, ci: int):
        """Open loop: (connection, request, next index) of the first connection
        from ci with a free slot and something to send; None when there is none.
        A ready request anywhere goes before a new step, so that a packet's
        grabs follow its SEND as a burst, as they do in a chat group."""
        n = len(conns)
        depth = self.depth
        for j in range(n):
            c = conns[(ci + j) % n]
            if c.ready and c.alive and len(c.pending) < depth:
                return c, c.ready.popleft(), (ci + j + 1) % n
        for j in range(n):
            c = conns[(ci + j) % n]
            if c.alive and len(c.pending) < depth:
                item = self._next(c)
                if item is not None:
                    return c, item, (ci + j + 1) % n
        return None

    async def _open_loop(self, group) -> None:
        rate, t0, conns = group.rate, self.t0, group.conns
        k = ci = 0
        while not self.stopping and not group.exhausted:
            due = int((time.monotonic() - t0) * rate) + 1
            batches: dict = {}
            blocked = False
            while k < due:
                got = self._take_slot(conns, ci)
                if got is None:
                    blocked = True  # nothing ready or no free slot: the timetable's clock keeps running
                    break
                c, item, ci = got
                rid = c.next_rid
                c.next_rid = rid + 1
                c.pending[rid] = (t0 + k / rate, item[0])
                c.items[rid] = item
                batches.setdefault(c, []).append(self._frame(rid, item))
                k += 1
            for c, frames in batches.items():
                self.sent += len(frames)
                c.transport.write(b"".join(frames))
            if group.exhausted or not any(c.alive for c in conns):
                break
            if blocked:
                group.slot_freed.clear()
                group.blocked = True
                await group.slot_freed.wait()
                group.blocked = False
                continue
            await self._sleep_until(t0 + k / rate)
        # Slots of the timetable never sent (the server behind, every slot busy): not in the histograms.
        self.stats["slots_unsent"] += max(0, int(min(time.monotonic() - t0, self.duration_s) * rate) - k)
        self._check_done()

    async def _sleep_until(self, t: float) -> None:
        wait = max(t - time.monotonic(), loadgen.TIMER_TICK_S)
        intended = time.monotonic() + wait
        await asyncio.sleep(wait)
        self.max_sched_lag = max(self.max_sched_lag, time.monotonic() - intended)

    # -------------------------------------------------------- answers

    def _record(self, op: int, status: int, us: int) -> None:
        self.hist.record_value(us)
        h = self.hist_op.get(op)
        if h is None:
            h = self.hist_op[op] = loadgen.new_histogram()
        h.record_value(us)
        key = (op << 9) | status
        self.counts[key] = self.counts.get(key, 0) + 1
        if status == 0:
            self.hist_ok.record_value(us)

    def on_responses(self, conn, responses: list) -> None:
        now = time.monotonic()
        n = ok = 0
        for r in responses:
            entry = conn.pending.pop(r.request_id, None)
            item = conn.items.pop(r.request_id, None)
            if entry is None or item is None:
                self.note_error(f"answer to unknown request id {r.request_id}")
                continue
            op = entry[1]
            self._record(op, r.status, int((now - entry[0]) * 1_000_000) or 1)
            packet_id = wire.decode_sent(r.body).packet_id if op == SEND and r.status == 0 else None
            self._advance(item, r.status, packet_id)
            ok += r.status == 0
            n += 1
        self._tally(conn, n, ok, now)

    def on_replies(self, conn, replies: list) -> None:
        now = time.monotonic()
        n = ok = 0
        rid = conn.answer_rid
        for v in replies:
            entry = conn.pending.pop(rid, None)
            item = conn.items.pop(rid, None)
            rid += 1
            if entry is None or item is None:
                self.note_error(f"redis reply {v!r} to no request")
                continue
            op = entry[1]
            status = self.enc.status(op, v)
            if status == loadgen.BAD_REPLY or status == int(Status.INTERNAL):
                self.note_error(f"redis answered {op_label(op)} with {v!r}")
            self._record(op, status, int((now - entry[0]) * 1_000_000) or 1)
            self._advance(item, status, v if op == SEND and status == 0 else None)
            ok += status == 0
            n += 1
        conn.answer_rid = rid
        self._tally(conn, n, ok, now)

    def _tally(self, conn, n: int, ok: int, now: float) -> None:
        if ok:
            self.ok += ok
            self.last_ok = conn.group.last_ok = now
            conn.group.ok += ok
        self._answered(conn, n, now)

    def on_lost(self, conn, exc) -> None:
        cut = {id(item[1]): item[1] for item in (*conn.items.values(), *conn.ready)}
        conn.items.clear()
        conn.ready.clear()
        for step in cut.values():
            self._end(step, cut=True)
        super().on_lost(conn, exc)

    def _deadline(self) -> None:
        """The run's time is up: nothing new leaves; the answers due are
        awaited (grace). Not CAPPED unless some never come (_give_up)."""
        if self.done.done():
            return
        self.stopping = True
        for g in self.groups:
            g.slot_freed.set()
        self.loop.call_later(self.grace_s, self._give_up)
        self._check_done()

    def _give_up(self) -> None:
        if any(c.pending for c in self.conns):
            self.capped = True
        super()._give_up()

    def result(self) -> dict:
        out = super().result()
        st = self.stats
        # Steps the clock stopped before their BALANCE (their packets may be unsold).
        st["steps_unfinished"] = st["steps_started"] - st["steps_done"] - st["steps_cut"]
        out["extra"] = dict(st)
        return out


def op_label(op: int) -> str:
    try:
        return Op(op).name
    except ValueError:
        return str(op)
