"""Errors as values, each carrying the wire code it is answered with.

    WorkerError              (code: internal)
    +-- BadPayload           not msgpack, or not a map
    +-- BadRequest           a field missing or of the wrong type
    +-- TooLarge             payload, value, or key count over its limit
    +-- BadTopic             a conversation id or operation the contract does not allow
    +-- Unavailable          the storage engine cannot be reached in time
    +-- Conflict             a summary whose base is not the current one (carries `upto`)
    +-- BadRoute             a reply route that must not be published to (never sent)
ConfigError                  a flag or environment value is invalid (one-line message)
"""

from typing import ClassVar


class WorkerError(Exception):
    """Base of every error that becomes an error reply."""

    code: ClassVar[str] = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def details(self) -> dict[str, object]:
        """Fields the error map carries besides `code` and `message`."""
        return {}


class BadPayload(WorkerError):
    code = "bad_payload"


class BadRequest(WorkerError):
    code = "bad_request"


class TooLarge(WorkerError):
    code = "too_large"


class BadTopic(WorkerError):
    code = "bad_topic"


class Unavailable(WorkerError):
    code = "unavailable"


class Conflict(WorkerError):
    """A summary refused by its compare-and-set: the error map carries the conversation's
    current summary `upto` (0 without one), its newest `seq` and its `born` (both 0 when it is
    not live)."""

    code = "conflict"

    def __init__(self, message: str, upto: int, seq: int, born: int = 0) -> None:
        super().__init__(message)
        self.upto = upto
        self.seq = seq
        self.born = born

    def details(self) -> dict[str, object]:
        return {"upto": self.upto, "seq": self.seq, "born": self.born}


class BadRoute(WorkerError):
    """A refused reply route: counted, never answered (there is nowhere safe to answer)."""

    code = "bad_route"


# The codes an error reply can carry: every error's but BadRoute's, which is never answered.
_ERRORS: tuple[type[WorkerError], ...] = (WorkerError, *WorkerError.__subclasses__())
ERROR_CODES = tuple(e.code for e in _ERRORS if e is not BadRoute)


class ConfigError(Exception):
    """An invalid flag or environment value, reported as one line before exiting."""
