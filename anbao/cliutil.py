"""What the command line's client commands and the demo both need: amounts
shown in yuan, and the token the command line's options point to. A module
of its own so that `anbao.demo` does not import the command line (which
imports the demo)."""

from __future__ import annotations

from pathlib import Path


def yuan(amount_cents: int) -> str:
    sign = "-" if amount_cents < 0 else ""
    return f"{sign}{abs(amount_cents) // 100:,}.{abs(amount_cents) % 100:02d}"


def token_from_args(args) -> str:
    """--token, else the --scope token of --tokens-file (default DATA_DIR/tokens.json)."""
    if args.token:
        return args.token
    from .auth import token_for

    path = Path(args.tokens_file) if args.tokens_file else Path(args.data_dir) / "tokens.json"
    if not path.exists():
        raise SystemExit(
            f"anbao: no token: pass --token, or --tokens-file / --data-dir where {path.name} is"
            f" (the server creates {path} on its first run)"
        )
    return token_for(path, args.scope)
