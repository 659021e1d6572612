"""anbao_client: the Python SDK for the anbao red-packet service."""
from .client import Client, new_idempotency_key
from .cluster import Cluster
from .errors import *  # noqa: F401,F403 - one class per status code
from .errors import AnbaoError, ConnectionLost, RequestTimeout
from .sync import SyncClient
from .wire import (AuditResult, Audience, Claim, Deposited, Grabbed, GroupChange, GroupCreated, GroupInfo, Mode,
                   PacketInfo, PacketStatus, Page, ReceivedShare, Scope, Sent, SentPacket, Statement,
                   StatementEntry, Status, TransferKind, Withdrawn)

__all__ = ["Client", "Cluster", "SyncClient", "new_idempotency_key", "AnbaoError", "ConnectionLost", "RequestTimeout",
           "AuditResult", "Audience", "Claim", "Deposited", "Grabbed", "GroupChange", "GroupCreated", "GroupInfo",
           "Mode", "PacketInfo", "PacketStatus", "Page", "ReceivedShare", "Scope", "Sent", "SentPacket",
           "Statement", "StatementEntry", "Status", "TransferKind", "Withdrawn"]
