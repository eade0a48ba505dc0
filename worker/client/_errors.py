"""The client's errors: each carries the wire code of the reply (or of the reply the worker
would have sent, for input refused before sending).

    MemoryWorkerError            (code)
    +-- BadPayloadError          bad_payload
    +-- BadRequestError          bad_request
    +-- TooLargeError            too_large
    +-- BadTopicError            bad_topic
    +-- UnavailableError         unavailable
    +-- ConflictError            conflict (a summary's compare-and-set; carries upto, seq)
    +-- InternalError            internal
    +-- NoReplyError             timeout; also a TimeoutError
    +-- RefusedError             refused; also a PermissionError (the broker said no)

One tree with the worker's (worker/errors.py): MemoryWorkerError is a WorkerError, and each
class for a wire code is also the worker's class for it (BadRequestError is a BadRequest),
whose code it takes; `except worker.errors.BadRequest` catches either. The client's names
stay their own, for the apps that already catch them. The last two are the client's alone:
nothing came back, or the broker (not the worker) refused.
"""

from __future__ import annotations

from typing import Final

from worker.errors import (
    BadPayload,
    BadRequest,
    BadTopic,
    Conflict,
    TooLarge,
    Unavailable,
    WorkerError,
)


class MemoryWorkerError(WorkerError):
    """An error reply from the worker (or refused input), with its wire `code` and
    `message`."""


class BadPayloadError(MemoryWorkerError, BadPayload):
    pass


class BadRequestError(MemoryWorkerError, BadRequest):
    pass


class TooLargeError(MemoryWorkerError, TooLarge):
    pass


class BadTopicError(MemoryWorkerError, BadTopic):
    pass


class UnavailableError(MemoryWorkerError, Unavailable):
    pass


class ConflictError(MemoryWorkerError, Conflict):
    """A summary refused because its `base` is not the conversation's current summary (or it
    names another `born`).

    Attributes:
        upto: the conversation's current summary upto (0 without one).
        seq: its newest seq (0 when the conversation is not live).
        born: when it was started, Unix ms (0 when it is not live).
    """

    def __init__(self, message: str, upto: int = 0, seq: int = 0, born: int = 0) -> None:
        super().__init__(message, upto, seq, born)


class InternalError(MemoryWorkerError):
    pass


class NoReplyError(MemoryWorkerError, TimeoutError):
    """No reply within `timeout` on any attempt (no worker, or no broker)."""

    code = "timeout"


class RefusedError(MemoryWorkerError, PermissionError):
    """The broker refused a subscription (SUBACK) or a publish (PUBACK) of this client,
    usually its ACL, or its login (CONNACK): the message names the topic (empty for a
    login), the broker's reason and what to change.

    Attributes:
        topic: the topic or filter refused.
        reason: the broker's reason ("Not authorized", ...).
    """

    code = "refused"

    def __init__(self, message: str, topic: str = "", reason: str = "") -> None:
        super().__init__(message)
        self.topic, self.reason = topic, reason


# Every wire code's class, derived so that a new subclass cannot be forgotten here.
_BY_CODE: Final[dict[str, type[MemoryWorkerError]]] = {
    cls.code: cls
    for cls in MemoryWorkerError.__subclasses__()
    if cls not in (NoReplyError, RefusedError)
}


def error_for(
    code: str, message: str, details: dict[str, object] | None = None
) -> MemoryWorkerError:
    """The exception for an error reply's code (InternalError for codes this client lacks);
    `details` is the rest of the error map (a conflict's upto and seq)."""
    if code == ConflictError.code:
        extra = details or {}
        upto, seq, born = (extra.get(k, 0) for k in ("upto", "seq", "born"))
        return ConflictError(message, *(v if isinstance(v, int) else 0 for v in (upto, seq, born)))
    return _BY_CODE.get(code, InternalError)(message)
