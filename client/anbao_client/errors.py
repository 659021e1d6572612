"""One exception class per status code, so callers can `except SoldOut:`."""

from __future__ import annotations

from typing import Any

from .wire import Grabbed, Status


class AnbaoError(Exception):
    """Base of every error the server answers with a status code."""

    status: Status = Status.INTERNAL
    retryable = False

    def __init__(self, message: str = "", *, worker_id: int | None = None) -> None:
        super().__init__(message or self.status.name)
        self.message = message
        self.worker_id = worker_id


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


class Busy(AnbaoError):
    status = Status.BUSY
    retryable = True


class Unavailable(AnbaoError):
    status = Status.UNAVAILABLE
    retryable = True


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


class InDoubt(AnbaoError):
    """A relayed GRAB whose owner worker died with it: it may have landed.
    Retrying it is safe ((packet, user) is its key) and gives the definite
    answer; Client.grab does so by itself before raising this."""

    status = Status.IN_DOUBT
    retryable = True


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


class CoolingDown(AnbaoError):
    """GRAB: this user had too many refused grabs (NOT_ELIGIBLE,
    ALREADY_CLAIMED) lately, and a fresh grab waits until the cool-down
    ends (the message says how long). Nothing was decided: a share the user
    already holds is still answered ALREADY_CLAIMED, never this."""

    status = Status.COOLING_DOWN


class RateLimited(AnbaoError):
    """Any request: the token is past its request-rate ceiling on the
    worker that answered. Nothing was done (a GRAB was not decided):
    retry after a pause, as for Busy."""

    status = Status.RATE_LIMITED
    retryable = True


class CursorExpired(AnbaoError):
    """EVENTS: the cursor is older than the feed's retention; the events
    after it are gone. `resume_cursor` is the oldest cursor still valid
    (the events after it are all there)."""

    status = Status.CURSOR_EXPIRED
    resume_cursor: int = 0


class Internal(AnbaoError):
    status = Status.INTERNAL


class ConnectionLost(Exception):
    """The connection closed with this request unanswered: its outcome is
    unknown. Every money-moving call is safe to retry with the same
    idempotency key (GRAB: the same packet and user)."""


class NotAnbao(ConnectionLost):
    """What answered at this address does not speak the anbao protocol (an
    HTTP server, such as the metrics port, say): nothing was done there."""


class RequestTimeout(Exception):
    """No answer within the request timeout; the outcome is unknown, as
    with ConnectionLost, and a retry with the same key is safe."""


BY_STATUS: dict[int, type[AnbaoError]] = {cls.status: cls for cls in AnbaoError.__subclasses__()}
BY_STATUS[Status.INTERNAL] = Internal


def error_for(status: int, message: str, worker_id: int | None = None, **fields: Any) -> AnbaoError:
    """The typed error of a status; `fields` are its body's fields after the
    message (wire.error_fields), set as attributes."""
    cls = BY_STATUS.get(status, AnbaoError)
    err = cls(message, worker_id=worker_id)
    for name, value in fields.items():
        setattr(err, name, value)
    return err
