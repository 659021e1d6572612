"""The two baselines, each a server of its own process speaking anbao's
protocol framing, so the very same load generator drives them:

- echo:  a raw uvloop server that answers every frame at once without doing
         any work (anbao's own Cython frame codec, nothing else). The ceiling
         for any Python server on this machine.
- naive: the textbook design straight on PostgreSQL. Every GRAB is one
         asyncpg transaction: SELECT ... FOR UPDATE on the packet row, check
         what is left, insert the claim and its transfer, credit the wallet,
         update the packet's counters, COMMIT. Its own tables in its own
         database, on the same PostgreSQL server (same fsync, same settings)
         as anbao.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import queue
import random
import signal
import socket
import time

import asyncpg

from anbao_client.protocol import MESSAGES, PROTOCOL_VERSION, Op, Status

NAIVE_DATABASE = "anbao_bench_naive"
NAIVE_PACKET_ID = 1
NAIVE_POOL_DEFAULT = 50
START_TIMEOUT_S = 60.0

NAIVE_SCHEMA = """
CREATE TABLE naive_wallets (
    user_id       BIGINT PRIMARY KEY,
    balance_cents BIGINT NOT NULL DEFAULT 0 CHECK (balance_cents >= 0)
);
CREATE TABLE naive_packets (
    packet_id       BIGINT PRIMARY KEY,
    total_cents     BIGINT  NOT NULL CHECK (total_cents > 0),
    share_count     INTEGER NOT NULL CHECK (share_count > 0),
    min_share_cents BIGINT  NOT NULL DEFAULT 1,
    claimed_count   INTEGER NOT NULL DEFAULT 0,
    remaining_cents BIGINT  NOT NULL,
    CHECK (claimed_count <= share_count),
    CHECK (remaining_cents >= 0)
);
CREATE TABLE naive_claims (
    packet_id    BIGINT  NOT NULL REFERENCES naive_packets,
    seq          INTEGER NOT NULL,
    user_id      BIGINT  NOT NULL,
    amount_cents BIGINT  NOT NULL CHECK (amount_cents >= 1),
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (packet_id, seq),
    UNIQUE (packet_id, user_id)
);
CREATE TABLE naive_transfers (
    transfer_id  BIGSERIAL PRIMARY KEY,
    packet_id    BIGINT NOT NULL,
    user_id      BIGINT NOT NULL,
    amount_cents BIGINT NOT NULL CHECK (amount_cents > 0),
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);
"""


def _nodelay(transport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _hello_answer(codec, rid: int) -> bytes:
    layout = MESSAGES[Op.HELLO].answer.head
    values = (PROTOCOL_VERSION, 1, 1, 65536, 1024, 65536)
    # Fields HELLO grew since (the feed's limits): 0, unknown, as the SDK reads a field not sent.
    return codec.encode_ok(Op.HELLO, rid, 0, layout, values + (0,) * (len(layout) - len(values)))


# ---------------------------------------------------------------- echo


class _EchoProtocol(asyncio.Protocol):
    def __init__(self):
        from anbao.core import codec

        self.codec = codec
        self.decoder = codec.FrameDecoder()
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        _nodelay(transport)

    def data_received(self, data: bytes) -> None:
        codec = self.codec
        try:
            frames = self.decoder.feed(data)
        except codec.FramingError:
            self.transport.close()
            return
        out = []
        for opcode, rid, _ in frames:
            if opcode == Op.GRAB:
                out.append(codec.encode_grab(rid, Status.OK, 0, 1, 1, 0))
            elif opcode == Op.HELLO:
                out.append(_hello_answer(codec, rid))
            else:
                out.append(codec.encode_ok(opcode, rid, 0, "", ()))
        self.transport.write(b"".join(out))


async def _echo_main(host: str, port: int, port_q) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_EchoProtocol, host, port, backlog=4096, reuse_port=True)
    port_q.put(server.sockets[0].getsockname()[1])
    await _wait_for_sigterm()
    server.close()


# ---------------------------------------------------------------- naive


def draw_share(rng: random.Random, remaining_cents: int, left: int, min_share_cents: int) -> int:
    """WeChat's double-mean rule, as anbao uses it: [min, 2 x mean], the
    last share takes the rest, every later share keeps its minimum."""
    if left == 1:
        return remaining_cents
    upper = min(2 * remaining_cents // left, remaining_cents - min_share_cents * (left - 1))
    return rng.randint(min_share_cents, max(min_share_cents, upper))


class _Refuse(Exception):
    def __init__(self, status: int, text: str):
        super().__init__(text)
        self.status = status


class _NaiveProtocol(asyncio.Protocol):
    def __init__(self, pool: asyncpg.Pool, rng: random.Random, tasks: set):
        from anbao.core import codec

        self.codec = codec
        self.pool = pool
        self.rng = rng
        self.tasks = tasks
        self.decoder = codec.FrameDecoder()
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        _nodelay(transport)

    def connection_lost(self, exc) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        codec = self.codec
        try:
            frames = self.decoder.feed(data)
        except codec.FramingError:
            self.transport.close()
            return
        loop = asyncio.get_running_loop()
        for opcode, rid, args in frames:
            if opcode == Op.GRAB and type(args) is tuple:
                t = loop.create_task(self._grab(rid, *args))
                self.tasks.add(t)
                t.add_done_callback(self.tasks.discard)
            elif opcode == Op.HELLO:
                self.transport.write(_hello_answer(codec, rid))
            else:
                self.transport.write(
                    codec.encode_error(opcode, rid, Status.UNKNOWN_OPCODE, 0, "naive serves GRAB only")
                )

    async def _grab(self, rid: int, packet_id: int, user_id: int) -> None:
        codec = self.codec
        try:
            amount, seq, remaining = await self._transaction(packet_id, user_id)
            frame = codec.encode_grab(rid, Status.OK, 0, amount, seq, remaining)
        except _Refuse as r:
            frame = codec.encode_error(Op.GRAB, rid, r.status, 0, str(r))
        except Exception as exc:  # noqa: BLE001 - the load generator counts it by status
            frame = codec.encode_error(Op.GRAB, rid, Status.INTERNAL, 0, repr(exc)[:200])
        if self.transport is not None:
            self.transport.write(frame)

    async def _transaction(self, packet_id: int, user_id: int) -> tuple[int, int, int]:
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                p = await conn.fetchrow(
                    "SELECT share_count, claimed_count, remaining_cents, min_share_cents"
                    " FROM naive_packets WHERE packet_id = $1 FOR UPDATE",
                    packet_id,
                )
                if p is None:
                    raise _Refuse(Status.NOT_FOUND, "unknown packet")
                share_count, claimed, remaining, min_share_cents = p
                if claimed >= share_count:
                    raise _Refuse(Status.SOLD_OUT, "sold out")
                if await conn.fetchval(
                    "SELECT 1 FROM naive_claims WHERE packet_id = $1 AND user_id = $2", packet_id, user_id
                ):
                    raise _Refuse(Status.ALREADY_CLAIMED, "already claimed")
                amount = draw_share(self.rng, remaining, share_count - claimed, min_share_cents)
                seq = claimed + 1
                credited = await conn.execute(
                    "UPDATE naive_wallets SET balance_cents = balance_cents + $2 WHERE user_id = $1", user_id, amount
                )
                if credited != "UPDATE 1":
                    raise _Refuse(Status.UNKNOWN_USER, "unknown user")
                await conn.execute(
                    "INSERT INTO naive_claims (packet_id, seq, user_id, amount_cents) VALUES ($1, $2, $3, $4)",
                    packet_id,
                    seq,
                    user_id,
                    amount,
                )
                await conn.execute(
                    "INSERT INTO naive_transfers (packet_id, user_id, amount_cents) VALUES ($1, $2, $3)",
                    packet_id,
                    user_id,
                    amount,
                )
                await conn.execute(
                    "UPDATE naive_packets SET claimed_count = claimed_count + 1,"
                    " remaining_cents = remaining_cents - $2 WHERE packet_id = $1",
                    packet_id,
                    amount,
                )
        return amount, seq, share_count - seq


async def _naive_main(host: str, dsn: str, pool_size: int, port_q) -> None:
    loop = asyncio.get_running_loop()
    pool = await asyncpg.create_pool(dsn, min_size=pool_size, max_size=pool_size)
    tasks: set = set()
    rng = random.Random()
    server = await loop.create_server(lambda: _NaiveProtocol(pool, rng, tasks), host, 0, backlog=4096)
    port_q.put(server.sockets[0].getsockname()[1])
    await _wait_for_sigterm()
    server.close()
    if tasks:
        await asyncio.wait(list(tasks), timeout=30)
    await pool.close()


async def naive_prepare(admin_dsn: str, dsn: str, users: int, shares: int, total_cents: int) -> None:
    """A fresh database: users wallets 1..users and one open packet."""
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {NAIVE_DATABASE} WITH (FORCE)")
        await conn.execute(f"CREATE DATABASE {NAIVE_DATABASE}")
    finally:
        await conn.close()
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(NAIVE_SCHEMA)
        await conn.execute("INSERT INTO naive_wallets (user_id) SELECT generate_series(1, $1::bigint)", users)
        await conn.execute(
            "INSERT INTO naive_packets (packet_id, total_cents, share_count, remaining_cents) VALUES ($1, $2, $3, $2)",
            NAIVE_PACKET_ID,
            total_cents,
            shares,
        )
        await conn.execute("ANALYZE")
    finally:
        await conn.close()


async def naive_drop(admin_dsn: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {NAIVE_DATABASE} WITH (FORCE)")
    finally:
        await conn.close()


async def naive_verify(dsn: str, ok_answers: int, unanswered: int, shares: int, total_cents: int) -> list[str]:
    """The naive design's own money check; returns what is wrong. unanswered:
    requests whose answer never came (a capped run), which may have committed."""
    conn = await asyncpg.connect(dsn)
    try:
        claims, claimed = await conn.fetchrow(
            "SELECT count(*), COALESCE(sum(amount_cents), 0)::bigint FROM naive_claims"
        )
        transfers, transferred = await conn.fetchrow(
            "SELECT count(*), COALESCE(sum(amount_cents), 0)::bigint FROM naive_transfers"
        )
        wallets = await conn.fetchval("SELECT COALESCE(sum(balance_cents), 0)::bigint FROM naive_wallets")
        p = await conn.fetchrow(
            "SELECT claimed_count, remaining_cents FROM naive_packets WHERE packet_id = $1", NAIVE_PACKET_ID
        )
        dupes = await conn.fetchval(
            "SELECT count(*) FROM (SELECT user_id FROM naive_claims GROUP BY packet_id, user_id HAVING count(*) > 1) d"
        )
    finally:
        await conn.close()
    wrong = []
    if not ok_answers <= claims <= ok_answers + unanswered:
        wrong.append(f"naive: {claims} claims in the database but {ok_answers} OK answers")
    if claims > shares:
        wrong.append(f"naive: oversold, {claims} claims for {shares} shares")
    if not (claimed == transferred == wallets) or transfers != claims:
        wrong.append(f"naive: claims {claimed} / transfers {transferred} / wallets {wallets} cents disagree")
    if p["claimed_count"] != claims or p["remaining_cents"] != total_cents - claimed:
        wrong.append(f"naive: packet counters {dict(p)} disagree with {claims} claims of {claimed} cents")
    if claims == shares and claimed != total_cents:
        wrong.append(f"naive: sold out but gave {claimed} of {total_cents} cents")
    if dupes:
        wrong.append(f"naive: {dupes} users claimed twice")
    return wrong


# ---------------------------------------------------------------- processes


async def _wait_for_sigterm() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def _echo_process(host: str, port: int, port_q) -> None:
    import uvloop

    uvloop.run(_echo_main(host, port, port_q))


def _naive_process(host: str, dsn: str, pool_size: int, port_q) -> None:
    import uvloop

    try:
        uvloop.run(_naive_main(host, dsn, pool_size, port_q))
    except Exception as exc:
        port_q.put(exc)
        raise


class BaselineServer:
    """A baseline server in processes of its own, on a free loopback port.
    echo may run several processes on one SO_REUSEPORT port (like anbao's
    workers); naive is one process with a pool of PostgreSQL connections."""

    def __init__(
        self,
        kind: str,
        host: str = "127.0.0.1",
        dsn: str | None = None,
        pool_size: int = NAIVE_POOL_DEFAULT,
        processes: int = 1,
    ):
        assert kind in ("echo", "naive") and processes >= 1
        self.kind, self.host = kind, host
        self.procs: list = []
        ctx = mp.get_context("spawn")
        self.port = 0
        for i in range(processes if kind == "echo" else 1):
            q = ctx.Queue()
            if kind == "echo":
                proc = ctx.Process(target=_echo_process, args=(host, self.port, q), name=f"bench-echo-{i}", daemon=True)
            else:
                proc = ctx.Process(
                    target=_naive_process, args=(host, dsn, pool_size, q), name="bench-naive", daemon=True
                )
            proc.start()
            self.procs.append(proc)
            self.port = self._wait_port(proc, q)

    def _wait_port(self, proc, q) -> int:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                port = q.get(timeout=0.2)
                break
            except queue.Empty:
                if not proc.is_alive() or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"{self.kind} baseline server did not start (exit {proc.exitcode})") from None
        if isinstance(port, Exception):
            self.stop()
            raise RuntimeError(f"{self.kind} baseline server failed: {port!r}")
        return port

    def stop(self) -> None:
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()  # SIGTERM: the server finishes what it took
        for proc in self.procs:
            proc.join(60)
            if proc.is_alive():
                proc.kill()
                proc.join(10)

    def __enter__(self) -> BaselineServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
