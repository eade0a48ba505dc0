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

They are not worker.errors' classes: those are the worker's reasons to answer with an error
(raised by the pure core, caught by the service), these are what an application catches
after the reply came back; `error_for` maps one code onto the other, and a test checks that
every wire code in worker.errors has its class here. The last two are the client's own:
nothing came back, or the broker (not the worker) refused.
"""

from __future__ import annotations

from typing import ClassVar, Final


class MemoryWorkerError(Exception):
    """An error reply from the worker (or refused input), with its wire `code`."""

    code: ClassVar[str] = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadPayloadError(MemoryWorkerError):
    code = "bad_payload"


class BadRequestError(MemoryWorkerError):
    code = "bad_request"


class TooLargeError(MemoryWorkerError):
    code = "too_large"


class BadTopicError(MemoryWorkerError):
    code = "bad_topic"


class UnavailableError(MemoryWorkerError):
    code = "unavailable"


class ConflictError(MemoryWorkerError):
    """A summary refused because its `base` is not the conversation's current summary.

    Attributes:
        upto: the conversation's current summary upto (0 without one).
        seq: its newest seq (0 when the conversation is not live).
        born: when it was started, Unix ms (0 when it is not live).
    """

    code = "conflict"

    def __init__(self, message: str, upto: int = 0, seq: int = 0, born: int = 0) -> None:
        super().__init__(message)
        self.upto, self.seq, self.born = upto, seq, born


class InternalError(MemoryWorkerError):
    code = "internal"


class NoReplyError(MemoryWorkerError, TimeoutError):
    """No reply within `timeout` on any attempt (no worker, or no broker)."""

    code = "timeout"


class RefusedError(MemoryWorkerError, PermissionError):
    """The broker refused a subscription (SUBACK) or a publish (PUBACK) of this client,
    usually its ACL: the message names the topic, the broker's reason and what to change.

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
