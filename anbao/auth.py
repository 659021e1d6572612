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


@dataclass(frozen=True)
class TokenBook:
    entries: tuple[tuple[bytes, int], ...]

    def scope_of(self, token: bytes) -> int | None:
        """The token's scope, or None. Every entry is compared, so the time
        taken says nothing about which token, or how much of one, matched."""
        found = None
        for known, scope in self.entries:
            if hmac.compare_digest(known, token):
                found = scope
        return found

    def with_token(self, token: bytes, scope: int) -> TokenBook:
        return TokenBook(self.entries + ((token, scope),))

    @classmethod
    def load(cls, path: Path) -> TokenBook:
        doc = json.loads(path.read_text())
        entries = tuple((t["token"].encode(), SCOPES[t["scope"]]) for t in doc["tokens"])
        assert entries, f"{path} holds no tokens"
        return cls(entries)


def ensure_tokens_file(path: Path) -> Path:
    """Creates an admin and an app token on first run, readable by the owner only."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "tokens": [
            {"scope": "admin", "token": secrets.token_urlsafe(32)},
            {"scope": "app", "token": secrets.token_urlsafe(32)},
        ]
    }
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=2)
    return path


def token_for(path: Path, scope: str) -> str:
    doc = json.loads(path.read_text())
    return next(t["token"] for t in doc["tokens"] if t["scope"] == scope)
