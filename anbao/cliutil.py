"""What the command line's client commands and the demo both need: amounts
shown in yuan, and the token the command line's options point to. A module
of its own so that `anbao.demo` does not import the command line (which
imports the demo)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

# How the server writes an amount in a refusal's message (PROTOCOL.md,
# "Errors"): an integer and the word cents, so a renderer can find it.
_CENTS_IN_TEXT = re.compile(r"(?<![\w.])(-?\d+) cents\b")


def yuan(amount_cents: int) -> str:
    sign = "-" if amount_cents < 0 else ""
    return f"{sign}{abs(amount_cents) // 100:,}.{abs(amount_cents) % 100:02d}"


def yuan_in_text(message: str) -> str:
    """A server's message with each amount ("28525 cents") in yuan ("285.25 yuan")."""
    return _CENTS_IN_TEXT.sub(lambda m: f"{yuan(int(m.group(1)))} yuan", message)


def usage_error(text: str) -> SystemExit:
    """A mistake in how the command was given: said on stderr, exit 2 (as argparse's)."""
    print(f"anbao: {text}", file=sys.stderr)
    return SystemExit(2)


def token_from_args(args) -> str:
    """--token, else the --scope token of --tokens-file (default: with
    --topology the file all its sets share, else DATA_DIR/tokens.json)."""
    if args.token:
        return args.token
    from .auth import token_for

    if args.tokens_file:
        path = Path(args.tokens_file)
    elif getattr(args, "topology", None):
        from .topology import tokens_file

        path = tokens_file(args.topology)
    else:
        path = Path(args.data_dir) / "tokens.json"
    if not path.exists():
        raise usage_error(
            f"no token: {path} does not exist. Start the server here first (`make run`, or"
            f" `anbao serve`: it creates {path} on its first run), or pass --token, or"
            f" --tokens-file / --data-dir where its {path.name} is"
        )
    return token_for(path, args.scope)
