"""One exception class per status code, so callers can `except SoldOut:`,
nested by what the caller does about them (as asyncpg nests its own):

    AnbaoError
      RetryLater       nothing was done; the same request may be sent again
                       later: Busy, Unavailable, RateLimited, CoolingDown
      OutcomeUnknown   it may have been applied: resend it with the same
                       idempotency key (GRAB: the same packet and user),
                       which returns the first answer: InDoubt,
                       ConnectionLost, RequestTimeout
      ...              every other status: a definite answer
"""

from __future__ import annotations

from typing import Any

from .wire import Grabbed, Status


class AnbaoError(Exception):
    """Base of every error of the SDK. `status` is the server's status code;
    an error with no answer behind it (ConnectionLost, RequestTimeout)
    keeps the base's INTERNAL."""

    status: Status = Status.INTERNAL

    def __init__(self, message: str = "", *, worker_id: int | None = None) -> None:
        super().__init__(message or self.status.name)
        self.message = message
        self.worker_id = worker_id


class RetryLater(AnbaoError):
    """Nothing was done: send the same request again after a pause. The
    client resends BUSY by itself (busy_retry_ms) before raising Busy;
    RATE_LIMITED it never resends: that quota is the caller's to pace."""


class OutcomeUnknown(AnbaoError):
    """The request may have been applied. Resending it with the same
    idempotency key (GRAB: the same packet and user) moves money at most
    once and returns the first answer."""


class SoldOut(AnbaoError):
    status = Status.SOLD_OUT


class AlreadyClaimed(AnbaoError):
    """The user already holds a share of this packet: `.grabbed` is that
    first share (Client.grab sets it)."""

    status = Status.ALREADY_CLAIMED
    grabbed: Grabbed | None = None


class Expired(AnbaoError):
    status = Status.EXPIRED


class NotEligible(AnbaoError):
    status = Status.NOT_ELIGIBLE


class InsufficientFunds(AnbaoError):
    status = Status.INSUFFICIENT_FUNDS


class Invalid(AnbaoError):
    status = Status.INVALID


class Busy(RetryLater):
    status = Status.BUSY


class Unavailable(RetryLater):
    status = Status.UNAVAILABLE


class Unauthenticated(AnbaoError):
    status = Status.UNAUTHENTICATED


class Forbidden(AnbaoError):
    status = Status.FORBIDDEN


class NotFound(AnbaoError):
    status = Status.NOT_FOUND


class UnknownUser(AnbaoError):
    status = Status.UNKNOWN_USER


class IdempotencyConflict(AnbaoError):
    status = Status.IDEMPOTENCY_CONFLICT


class UnsupportedVersion(AnbaoError):
    status = Status.UNSUPPORTED_VERSION


class UnknownOpcode(AnbaoError):
    status = Status.UNKNOWN_OPCODE


class FrameTooLarge(AnbaoError):
    status = Status.FRAME_TOO_LARGE


class UnknownGroup(AnbaoError):
    status = Status.UNKNOWN_GROUP


class InDoubt(OutcomeUnknown):
    """A relayed GRAB whose owner worker died with it: it may have landed.
    Retrying it is safe ((packet, user) is its key) and gives the definite
    answer; Client.grab does so by itself before raising this."""

    status = Status.IN_DOUBT


class WrongSet(AnbaoError):
    """The request's user (their home) or packet lives in another set:
    `.set_id`, `.host`, `.port` say where (SetCluster follows it)."""

    status = Status.WRONG_SET
    set_id: int = -1
    host: str = ""
    port: int = 0


class ShareAboveMax(AnbaoError):
    """SEND: a share would exceed the server's maximum per share (fixed
    mode: ceil(total / count); random mode: total > count x maximum)."""

    status = Status.SHARE_ABOVE_MAX


class DailySendAmountCap(AnbaoError):
    """SEND: with this packet the sender would pass their daily cap on cents
    sent (per UTC day); nothing moved."""

    status = Status.DAILY_SEND_AMOUNT_CAP


class DailySendCountCap(AnbaoError):
    """SEND: with this packet the sender would pass their daily cap on
    packets sent (per UTC day); nothing moved."""

    status = Status.DAILY_SEND_COUNT_CAP


class CoolingDown(RetryLater):
    """GRAB: this user had too many refused grabs (NOT_ELIGIBLE,
    ALREADY_CLAIMED) lately, and a fresh grab waits until the cool-down
    ends (the message says how long). Nothing was decided: a share the user
    already holds is still answered ALREADY_CLAIMED, never this."""

    status = Status.COOLING_DOWN


class RateLimited(RetryLater):
    """Any request: the token is past its request-rate ceiling on the
    worker that answered. Nothing was done (a GRAB was not decided):
    retry after a pause, as for Busy."""

    status = Status.RATE_LIMITED


class CursorExpired(AnbaoError):
    """EVENTS: the cursor is older than the feed's retention; the events
    after it are gone. `resume_cursor` is the oldest cursor still valid
    (the events after it are all there)."""

    status = Status.CURSOR_EXPIRED
    resume_cursor: int = 0


class Internal(AnbaoError):
    status = Status.INTERNAL


class ConnectionLost(OutcomeUnknown):
    """The connection closed with this request unanswered: its outcome is
    unknown. Every money-moving call is safe to retry with the same
    idempotency key (GRAB: the same packet and user)."""


class NotAnbao(Exception):
    """What answered at this address does not speak the anbao protocol (an
    HTTP server, such as the metrics port, say): nothing was done there, and
    nothing will be (so neither RetryLater nor OutcomeUnknown)."""


class RequestTimeout(OutcomeUnknown):
    """No answer within the request timeout; the outcome is unknown, as
    with ConnectionLost, and a retry with the same key is safe."""


def _with_status(cls: type[AnbaoError]) -> list[type[AnbaoError]]:
    """cls's subclasses, at any depth, that name a status of their own."""
    out = []
    for sub in cls.__subclasses__():
        if "status" in vars(sub):
            out.append(sub)
        out.extend(_with_status(sub))
    return out


BY_STATUS: dict[int, type[AnbaoError]] = {cls.status: cls for cls in _with_status(AnbaoError)}
assert set(BY_STATUS) == set(Status) - {Status.OK}, "one class per error status"


def error_for(status: int, message: str, worker_id: int | None = None, **fields: Any) -> AnbaoError:
    """The typed error of a status; `fields` are its body's fields after the
    message (wire.error_fields), set as attributes."""
    cls = BY_STATUS.get(status, AnbaoError)
    err = cls(message, worker_id=worker_id)
    for name, value in fields.items():
        setattr(err, name, value)
    return err
