"""What a database error means for the answer, and whether PostgreSQL is up.

A handler's database error is one of:
- UNREACHABLE: the request never reached a working database (no
  connection, the server starting or shutting down, out of connections):
  nothing happened; UNAVAILABLE.
- ROLLED_BACK: the database undid the transaction (serialization failure,
  deadlock, a cancelled statement, a full disk): nothing happened;
  UNAVAILABLE.
- BROKE: the connection broke while the request ran. A read did nothing;
  a write may have committed just before: IN_DOUBT, and a retry with the
  same idempotency key is safe (it moves money at most once).
- BAD_VALUE: a value the client sent does not fit a column (SQLSTATE class
  22): INVALID. The decoders check values first; this is the backstop.
Anything else is a bug: INTERNAL, logged with its traceback.
"""

from __future__ import annotations

import asyncio
import logging
import time

import asyncpg

log = logging.getLogger("anbao.database")

UNREACHABLE = "unreachable"
ROLLED_BACK = "rolled_back"
BROKE = "broke"
BAD_VALUE = "bad_value"

_CONNECT_PHASE = (
    asyncpg.exceptions.CannotConnectNowError,  # 57P03: starting up, shutting down, in recovery
    asyncpg.exceptions.TooManyConnectionsError,  # 53300
    asyncpg.exceptions.ClientCannotConnectError,  # 08001
    asyncpg.exceptions.ConnectionRejectionError,  # 08004
    # 55000 "database is not currently accepting connections" (ALLOW_CONNECTIONS
    # false); mid-session this class is a statement's refusal: rolled back too.
    asyncpg.exceptions.ObjectNotInPrerequisiteStateError,
    ConnectionRefusedError,  # nothing listens
    FileNotFoundError,  # no Unix socket: the server is not running
)
_MID_SESSION = (
    asyncpg.exceptions.AdminShutdownError,  # 57P01: our backend was terminated
    asyncpg.exceptions.CrashShutdownError,  # 57P02
    asyncpg.exceptions.ConnectionFailureError,  # 08006
    asyncpg.exceptions.PostgresConnectionError,  # the rest of class 08
    asyncpg.exceptions.InterfaceError,  # ConnectionDoesNotExistError: closed mid-operation
    asyncpg.exceptions._base.InternalClientError,  # "another operation is in progress": a connection
    # left mid-protocol by a backend that went away
    asyncio.TimeoutError,
    TimeoutError,
    OSError,  # reset, broken pipe
)
_ROLLED_BACK = (
    asyncpg.exceptions.TransactionRollbackError,  # class 40: serialization failure, deadlock
    asyncpg.exceptions.QueryCanceledError,  # 57014: statement timeout, cancel request
    asyncpg.exceptions.InsufficientResourcesError,  # class 53: disk full, out of memory
    asyncpg.exceptions.ProgramLimitExceededError,  # class 54
    asyncpg.exceptions.OperatorInterventionError,  # the rest of class 57
    asyncpg.exceptions.PostgresSystemError,  # class 58: I/O error
    asyncpg.exceptions.ReadOnlySQLTransactionError,  # 25006: a standby
)


def classify(exc: BaseException) -> str | None:
    """One of the kinds above, or None for an error that is no database
    failure (a bug). Order matters: some classes nest in others."""
    if isinstance(exc, _CONNECT_PHASE):
        return UNREACHABLE
    if isinstance(exc, asyncpg.exceptions.DataError):
        return BAD_VALUE
    if isinstance(exc, _MID_SESSION):  # before _ROLLED_BACK: the shutdowns are operator interventions too
        return BROKE
    if isinstance(exc, _ROLLED_BACK):
        return ROLLED_BACK
    return None


class DbHealth:
    """Whether this worker can reach PostgreSQL, from its requests and a
    probe of its own. An outage begins at a failure and ends only after
    successes with no failure for recovery_s: a database that half works
    (old connections answer, new ones are refused) is one outage, not one
    per request. It is logged when it begins, then at most once per log
    interval with how many requests it failed, and once when it ends."""

    def __init__(self, log_interval_ms: int, recovery_ms: int = 1000, clock=time.monotonic):
        assert log_interval_ms > 0 and recovery_ms > 0
        self.log_interval_s = log_interval_ms / 1000
        self.recovery_s = recovery_ms / 1000
        self.clock = clock
        self.down_since: float | None = None
        self.last_error = ""
        self.failures = 0  # requests and probes that failed, all time
        self.outages = 0
        self._last_failure_at = -1e9
        self._failures_at_log = 0
        self._logged_at = -1e9

    @property
    def up(self) -> bool:
        return self.down_since is None

    def failed(self, exc: BaseException) -> None:
        now = self.clock()
        self.failures += 1
        self._last_failure_at = now
        self.last_error = repr(exc)[:200]
        if self.down_since is None:
            self.down_since = now
            self.outages += 1
            self._logged_at, self._failures_at_log = now, self.failures
            log.error("PostgreSQL unreachable (%s); answering UNAVAILABLE until it is back", self.last_error)
        elif now - self._logged_at >= self.log_interval_s:
            log.error(
                "PostgreSQL still unreachable after %.1f s: %d failures in the last %.0f s (last: %s)",
                now - self.down_since,
                self.failures - self._failures_at_log,
                now - self._logged_at,
                self.last_error,
            )
            self._logged_at, self._failures_at_log = now, self.failures

    def succeeded(self) -> None:
        if self.down_since is not None:
            now = self.clock()
            if now - self._last_failure_at >= self.recovery_s:
                log.warning(
                    "PostgreSQL reachable again after %.1f s (%d failures)",
                    now - self.down_since,
                    self.failures - self._failures_at_log,
                )
                self.down_since = None

    def stats(self) -> dict:
        down_ms = 0 if self.down_since is None else int((self.clock() - self.down_since) * 1000)
        return {
            "database_up": self.up,
            "database_down_ms": down_ms,
            "database_failures": self.failures,
            "database_outages": self.outages,
            "database_last_error": self.last_error,
        }


class OncePerInterval(logging.Filter):
    """Lets a logger's warnings through at most once per interval_ms for
    each message template, and says how many were held back. A path that
    logs once per request (the engine's "loading packet N failed" logged
    1,300 times in a 5 s outage) floods the log exactly when someone reads
    it; DbHealth holds the outage itself to the same interval."""

    def __init__(self, interval_ms: int):
        super().__init__()
        self.interval_s = interval_ms / 1000
        self._last: dict[str, tuple[float, int]] = {}  # template -> (when last let through, held back since)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or not isinstance(record.msg, str):
            return True
        template, now = record.msg, time.monotonic()
        last, held = self._last.get(template, (-1e18, 0))
        if now - last < self.interval_s:
            self._last[template] = (last, held + 1)
            return False
        if held and isinstance(record.args, tuple):
            record.msg = f"{template} (and %d more like it in the last %.0f s, not logged)"
            record.args = (*record.args, held, now - last)
        if len(self._last) >= MAX_LOG_TEMPLATES_TRACKED:
            self._last.clear()
        self._last[template] = (now, 0)
        return True


MAX_LOG_TEMPLATES_TRACKED = 1024  # a logger's message templates are few; past this, forget them all
