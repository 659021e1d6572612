"""Caller authentication: bearer tokens with a scope, compared in constant time."""

from __future__ import annotations

import hmac
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from anbao_client.protocol import Scope

# The scopes a token file may grant; Scope.PEER is granted only on the
# workers' private Unix sockets, to the token the supervisor makes for them.
SCOPES = {"app": Scope.APP, "admin": Scope.ADMIN}


# A caller's name: what its idempotency keys are scoped by (idempotency.py
# scoped_key, migration 0015), never the secret. Bytes of UTF-8, no NUL.
MAX_CALLER_NAME_BYTES = 64
PEER_CALLER = "peer"  # the workers' own token (it relays GRABs only: no keys)


@dataclass(frozen=True)
class Caller:
    """Who a connection's HELLO proved it is: the token's scope, and its
    name in the tokens file (by default the scope's name). Tokens that
    share a name are one caller: a token rotated under its old name keeps
    its idempotency keys."""

    scope: int
    name: str


@dataclass(frozen=True)
class TokenBook:
    entries: tuple[tuple[bytes, Caller], ...]

    def caller_of(self, token: bytes) -> Caller | None:
        """The token's caller, or None. Every entry is compared, so the time
        taken says nothing about which token, or how much of one, matched."""
        found = None
        for known, caller in self.entries:
            if hmac.compare_digest(known, token):
                found = caller
        return found

    def with_token(self, token: bytes, scope: int, name: str = PEER_CALLER) -> TokenBook:
        return TokenBook(self.entries + ((token, Caller(scope, name)),))

    @classmethod
    def load(cls, path: Path) -> TokenBook:
        doc = json.loads(path.read_text())
        entries = tuple(
            (t["token"].encode(), Caller(SCOPES[t["scope"]], caller_name(t.get("name", t["scope"]), path)))
            for t in doc["tokens"]
        )
        assert entries, f"{path} holds no tokens"
        return cls(entries)


def caller_name(name: object, path: Path) -> str:
    """A token's name as the file gives it, checked: keys are stored under it."""
    if not isinstance(name, str):
        raise ValueError(f"{path}: a token's name must be a string, not {name!r}")
    raw = name.encode()
    if not 0 < len(raw) <= MAX_CALLER_NAME_BYTES or b"\0" in raw:
        raise ValueError(f"{path}: a token's name is 1..{MAX_CALLER_NAME_BYTES} bytes of UTF-8 without NUL: {name!r}")
    return name


def ensure_tokens_file(path: Path) -> Path:
    """Creates an admin and an app token on first run, readable by the owner only."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "tokens": [
            {"name": "admin", "scope": "admin", "token": secrets.token_urlsafe(32)},
            {"name": "app", "scope": "app", "token": secrets.token_urlsafe(32)},
        ]
    }
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=2)
    return path


def token_for(path: Path, scope: str) -> str:
    doc = json.loads(path.read_text())
    return next(t["token"] for t in doc["tokens"] if t["scope"] == scope)
