"""The topology file as a server on this machine reads it: every set with
the DSN of its PostgreSQL. An entry may name a `data_dir` instead of a
`dsn`: the embedded PostgreSQL there (storage/embedded.py), which only
this machine reaches (its Unix socket) unless `anbao pg start --listen`
gave it a TCP address. A relative data_dir is read from the topology
file's directory, so every set's `serve` finds the same one wherever it
is started. The file's format itself is the SDK's (anbao_client.routing).

The one home of "which DSN is set N's": `serve`, `migrate`, `audit
--topology`, the workers (SetPeers) and the demo all ask resolve()."""

from __future__ import annotations

import dataclasses
import json
import socket
from pathlib import Path

from anbao_client.routing import SetInfo, SetTopology

from .storage import embedded


class TopologyRefused(Exception):
    """A topology this machine cannot run sets from (said to the operator as is)."""


def load(path: str | Path) -> SetTopology:
    """The file, each entry's data_dir absolute and its dsn filled in
    (resolve()); TopologyRefused when an entry has neither it can use."""
    return resolve(SetTopology.load(path), Path(path))


def resolve(topo: SetTopology, path: Path) -> SetTopology:
    base = Path(path).resolve().parent
    sets = {s: _resolved(info, base, path) for s, info in topo.sets.items()}
    return dataclasses.replace(topo, sets=sets)


def _resolved(info: SetInfo, base: Path, path: Path) -> SetInfo:
    data_dir = str((base / info.data_dir).resolve()) if info.data_dir else None
    if info.dsn or data_dir is None:
        if not info.dsn:
            raise TopologyRefused(
                f"set {info.set_id} in {path} has neither a dsn nor a data_dir: the other sets cannot"
                " replicate with it (docs/DEPLOYMENT.md, the topology file)"
            )
        return dataclasses.replace(info, data_dir=data_dir)
    if not embedded.network(Path(data_dir)) and not is_local(info.host):
        raise TopologyRefused(
            f"set {info.set_id} in {path} names only a data_dir, and its host {info.host} is not this"
            " machine: its embedded PostgreSQL answers on a Unix socket here only. Give set"
            f" {info.set_id} a dsn the other sets reach (`anbao pg start --listen` on its machine"
            " prints one; docs/DEPLOYMENT.md)"
        )
    return dataclasses.replace(info, data_dir=data_dir, dsn=embedded.dsn_for(Path(data_dir)))


def is_local(host: str) -> bool:
    """Whether host is an address of this machine (one a socket can bind)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    for family, _, _, _, addr in infos:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((addr[0], 0))
                return True
            except OSError:
                continue
    return False


def tokens_file(path: str | Path) -> Path:
    """The tokens file every set of the topology shares (one token opens
    every set: SetCluster connects to all with one): the file's
    "tokens_file" (relative to its directory), default tokens.json beside it."""
    doc = json.loads(Path(path).read_text())
    return Path(path).resolve().parent / doc.get("tokens_file", "tokens.json")


async def check_replicates(dsn: str, set_id: int) -> None:
    """Refuses (TopologyRefused) a set whose PostgreSQL cannot publish its
    credits: logical replication needs wal_level = logical, and a server
    started without it would serve while no credit ever left it."""
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=CHECK_TIMEOUT_S)
    try:
        level = await conn.fetchval("SHOW wal_level")
        version = await conn.fetchval("SHOW server_version_num")
    finally:
        await conn.close()
    if level != "logical":
        raise TopologyRefused(
            f"set {set_id}: its PostgreSQL has wal_level = {level}, and sets replicate their credits by"
            " logical replication. Set wal_level = logical there (ALTER SYSTEM SET wal_level = logical;"
            " then restart it), or run the embedded one: `anbao pg start --data-dir DIR` (docs/DEPLOYMENT.md)"
        )
    if int(version) < MIN_SERVER_VERSION_NUM:
        raise TopologyRefused(
            f"set {set_id}: its PostgreSQL is version {version}; sets need 15 or later (publication row filters)"
        )


CHECK_TIMEOUT_S = 10
MIN_SERVER_VERSION_NUM = 150000
