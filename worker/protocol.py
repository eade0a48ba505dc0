"""The wire contract as pure functions: topics, validation, and msgpack envelopes.

No I/O here. A message comes in as (topic, payload, response topic) and leaves as a
`Parsed` value; replies and events leave as bytes.
"""

from __future__ import annotations

import base64
import codecs
import contextlib
import functools
import json
import math
import re
import struct
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import msgpack

from worker import constants as c
from worker.errors import BadPayload, BadRequest, BadRoute, BadTopic, TooLarge, WorkerError
from worker.turns import MAX_TOKENS, estimate_tokens

# What Mosquitto refuses in a topic name (it disconnects the publisher): control characters
# (C0, DEL, C1) and Unicode non-characters. Wildcards are refused in names by MQTT itself.
_NONCHARS = "".join(
    f"{chr(plane * 0x10000 + 0xFFFE)}{chr(plane * 0x10000 + 0xFFFF)}" for plane in range(17)
)
_BAD_NAME_CHARS: Final = re.compile(f"[\x00-\x1f\x7f-\x9f\ud800-\udfff\ufdd0-\ufdef{_NONCHARS}+#]")
_BAD_CONVO_CHARS: Final = re.compile(
    f"[\x00-\x1f\x7f-\x9f\ud800-\udfff\ufdd0-\ufdef{_NONCHARS}+#/]"
)
_SURROGATES: Final = re.compile("[\ud800-\udfff]")
# Devices reuse their reply topics and conversations: what was checked once is remembered.
_CACHE_SIZE: Final = 4096
# A request's operation, an event's leaf, or a worker topic's `_worker/<client-id>/<leaf>`
# past the conversation's place: a longer topic is never remembered.
_LONGEST_LEAF: Final = 64

_MISSING: Final[Any] = object()


def topic_name_problem(topic: str) -> str | None:
    """Why `topic` cannot be published to (by MQTT's and Mosquitto's rules), or None."""
    if not topic:
        return "empty"
    if len(topic.encode("utf-8", "surrogatepass")) > c.MAX_TOPIC_BYTES:
        return f"longer than {c.MAX_TOPIC_BYTES} bytes"
    if _BAD_NAME_CHARS.search(topic):
        return "wildcard, control character, surrogate or non-character"
    return None


def validate_prefix(prefix: str) -> None:
    """Raise ValueError unless `prefix` can head every topic the worker uses."""
    problem = topic_name_problem(prefix)
    if problem:
        raise ValueError(problem)
    if prefix.startswith(("$", "/")) or prefix.endswith("/") or "//" in prefix:
        raise ValueError("must not start with $ or /, end with /, or have empty levels")


def validate_convo(convo: str) -> None:
    """Raise BadTopic unless `convo` is a conversation id the contract allows."""
    if not isinstance(convo, str):  # a Python caller's: a topic's level is always one
        raise BadTopic(f"conversation id must be a string, not {type(convo).__name__}")
    size = len(convo.encode("utf-8", "surrogatepass"))
    if not 1 <= size <= c.MAX_CONVO_BYTES:
        raise BadTopic(f"conversation id must be 1-{c.MAX_CONVO_BYTES} UTF-8 bytes, got {size}")
    if convo[0] in "_$":
        raise BadTopic("conversation ids starting with _ or $ are reserved")
    if _BAD_CONVO_CHARS.search(convo):
        raise BadTopic("conversation id has a wildcard, slash, control or non-character")


# --- requests ---------------------------------------------------------------------------
# Value types are slotted but not frozen: a frozen dataclass sets each field through
# object.__setattr__, which made parsing a request a third slower. Nothing mutates them.


@dataclass(slots=True)
class Append:
    convo: str
    role: str
    content: str
    id: Any = None
    tokens: int | None = None  # None: estimated from the content

    @property
    def token_count(self) -> int:
        return estimate_tokens(self.content) if self.tokens is None else self.tokens


@dataclass(slots=True)
class Get:
    convo: str
    last: int | None = None
    max_tokens: int | None = None
    summary: bool = True


@dataclass(slots=True)
class Summary:
    """Save a conversation's summary, compare-and-set on its `upto`, dropping the turns it
    covers."""

    convo: str
    text: str
    upto: int
    base: int
    tokens: int | None = None
    id: Any = None
    born: int | None = None  # applied only to the conversation started then

    @property
    def token_count(self) -> int:
        return estimate_tokens(self.text) if self.tokens is None else self.tokens


@dataclass(slots=True)
class Delete:
    convo: str
    id: Any = None


@dataclass(slots=True)
class StateSave:
    convo: str
    ns: str
    key: str
    value: bytes  # msgpack-encoded, stored and returned as is
    ttl: float | None = None
    id: Any = None


@dataclass(slots=True)
class StateLoad:
    convo: str
    ns: str
    key: str
    ttl: float | None = None  # a found key's TTL starts again, this long


@dataclass(slots=True)
class StateGetAll:
    convo: str
    ns: str


@dataclass(slots=True)
class StateDelete:
    convo: str
    ns: str
    key: str
    id: Any = None


@dataclass(slots=True)
class StateNamespaces:
    """The namespaces that hold live keys (a look from outside: not a use)."""

    convo: str


@dataclass(slots=True)
class ListConvos:
    """P/_conversations/list: up to `limit` live conversations in id order (UTF-8 byte
    order) after the id `after` ("": from the start), those whose id starts with `prefix`.
    A look from outside: it refreshes no TTL and moves nothing in the LRU order."""

    limit: int = c.DEFAULT_LIST_LIMIT
    after: str = ""
    prefix: str = ""
    convo: str = c.CONVERSATIONS_LEVEL  # what a --route-prefix's {convo} names


Request = (
    Append
    | Get
    | Delete
    | Summary
    | StateSave
    | StateLoad
    | StateGetAll
    | StateDelete
    | StateNamespaces
    | ListConvos
)


def encode_cursor(after: str) -> str:
    """The opaque `cursor` of a list reply whose last conversation scanned is `after`."""
    return base64.urlsafe_b64encode(after.encode()).decode().rstrip("=")


def decode_cursor(cursor: Any) -> str:
    """The conversation id a list reply's `cursor` resumes after; BadRequest if it is none."""
    bad = BadRequest("'cursor' must be the cursor of a previous list reply")
    if not isinstance(cursor, str) or not 0 < len(cursor) <= 4 * c.MAX_CONVO_BYTES:
        raise bad
    try:
        after = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        validate_convo(after)
    except (ValueError, WorkerError):
        raise bad from None
    if encode_cursor(after) != cursor:
        raise bad
    return after


def list_page(scanned: list[tuple[str, dict[str, Any] | None]], more: bool) -> Fields:
    """A list reply from the conversations a page scanned, in id order (None: not live, as
    one expired and not yet swept), and whether more may follow the last one."""
    return Fields(
        {
            "conversations": [info for _, info in scanned if info is not None],
            "cursor": encode_cursor(scanned[-1][0]) if more and scanned else None,
        }
    )


def convo_info(
    convo: str, turns: int, keys: int, last_used: float, ttl: float, upto: int, tokens: int
) -> dict[str, Any]:
    """One entry of a list reply (schemas/list.reply.json); `last_used` in Unix seconds."""
    used = int(last_used * 1000 + 0.5)  # to the millisecond; round() costs three times more
    return {
        "convo": convo,
        "turns": turns,
        "keys": keys,
        "last_used": used / 1000,
        "expires_at": (used + int(ttl * 1000 + 0.5)) / 1000 if ttl else None,
        "upto": upto,
        "tokens": tokens,
    }


@dataclass(slots=True)
class Parsed:
    """One incoming message, understood. Exactly one of `request` and `error` is set."""

    request: Request | None
    error: WorkerError | None
    route: str | None
    refused: BadRoute | None
    req_id: Any = _MISSING

    @property
    def has_id(self) -> bool:
        return self.req_id is not _MISSING


# --- results (what a backend answers) -----------------------------------------------------


@dataclass(slots=True)
class Turns:
    """A get's answer: `count` msgpack-encoded turns back to back, oldest first, their
    tokens and the summary's in all, and the summary (text, upto, tokens) when returned."""

    count: int
    data: bytes
    tokens: int = 0
    summary: tuple[str, int, int] | None = None

    def decoded(self) -> list[Any]:
        """The turns as maps (for tests and tools; the worker itself never decodes them)."""
        return _unpack_all(self.data)


@dataclass(slots=True)
class Fields:
    """Any other ok answer: the fields besides `ok` and `id`."""

    fields: dict[str, Any]


@dataclass(slots=True)
class Items:
    """A state get_all's answer: keys with their msgpack-encoded values."""

    items: dict[str, bytes]


@dataclass(slots=True)
class Loaded:
    """A state load's answer: the msgpack-encoded value, or None when there is none."""

    value: bytes | None


Result = Turns | Fields | Items | Loaded | WorkerError


@dataclass(slots=True)
class Eviction:
    convo: str
    reason: str
    count: int
    keys: int
    ts: float


@dataclass(slots=True)
class Trimmed:
    """Turns that left a conversation's window without a summary covering them: `count`
    turns as a get returns them, back to back, in seq order."""

    convo: str
    count: int
    turns: bytes
    summary_upto: int
    ts: float
    born: int  # when the conversation was started (Unix ms): which one these turns were of
    # A durable backend's number for it, kept until the broker has it (`Backend.delivered`):
    # a worker killed after storing the trim and before the event left sends it at its
    # next start. 0: not kept. Not part of what it says.
    receipt: int = field(default=0, compare=False)


Event = Eviction | Trimmed


def trimmed_parts(turns: list[bytes], most: int = c.TRIMMED_EVENT_BYTES) -> list[list[bytes]]:
    """Turns that left a window, in order, cut into runs of at most `most` bytes (a turn
    over it alone): one trimmed event each."""
    parts: list[list[bytes]] = [[]]
    size = 0
    for turn in turns:
        if parts[-1] and size + len(turn) > most:
            parts.append([])
            size = 0
        parts[-1].append(turn)
        size += len(turn)
    return parts if turns else []


# --- parsing ------------------------------------------------------------------------------


def _unpack_all(data: bytes) -> list[Any]:
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(data)
    return list(unpacker)


def _bare(exc: WorkerError) -> WorkerError:
    """The error without its traceback and context: kept in a batch's Parsed values until
    the batch is answered, their frames kept the decoded body alive, and 64 KiB of
    `[{}, {}, ...]` is 5 MB of objects (400 such requests held 1.2 GB)."""
    exc.__traceback__ = exc.__context__ = exc.__cause__ = None
    return exc


# What msgpack's exceptions mean for a device, in its words (not Python's).
_UNDECODABLE: Final = (
    (UnicodeDecodeError, "a string in it is not valid UTF-8"),
    (msgpack.StackError, "it nests too deeply"),
    (msgpack.ExtraData, "it holds more than one msgpack value"),
    (TypeError, "a map key in it is an array or a map"),
)
_MSGPACK_TYPES: Final = {
    "NoneType": "nil",
    "bool": "a bool",
    "int": "an integer",
    "float": "a float",
    "str": "a string",
    "bytes": "bin",
    "list": "an array",
    "ExtType": "an ext",
    "Timestamp": "a timestamp",
}


def _decode(payload: bytes) -> dict[Any, Any]:
    if not payload:
        return {}
    try:
        body = msgpack.unpackb(payload, strict_map_key=False)
    except Exception as exc:  # msgpack raises many types for bad input
        # JSON's `{` is a msgpack integer: "it holds more than one msgpack value" misled.
        if _json_text(payload) is not None:
            raise BadPayload(
                "payload looks like JSON, not msgpack: send the same map encoded as msgpack "
                "(docs/devices.md)"
            ) from None
        if _plain_text(payload):
            raise BadPayload(
                "payload looks like text, not msgpack: a request is a msgpack map (docs/devices.md)"
            ) from None
        why = next((w for kind, w in _UNDECODABLE if isinstance(exc, kind)), "")
        if not why and str(exc).startswith("code must be 0~127"):  # msgpack's words
            why = "an ext type in it is negative, which msgpack reserves (-1 is a timestamp)"
        raise BadPayload(
            f"payload is not msgpack: {why or 'it is cut short or malformed'}"
        ) from exc
    if not isinstance(body, dict):
        kind = type(body).__name__
        raise BadPayload(f"payload must be a msgpack map, got {_MSGPACK_TYPES.get(kind, kind)}")
    return body


_BLANK: Final = b" \t\n\r\x0b\x0c\x00"


def _json_text(payload: bytes) -> bytes | None:
    """An undecodable payload's text when it looks like a JSON object or array, by its first
    and last characters alone (parsing it cost a bad request a thousand times a good one's
    decoding, on the event loop: a review); else None. A BOM before it, as editors save, and
    a NUL after it, as C strings end, are not part of it."""
    text = payload.strip(_BLANK).removeprefix(b"\xef\xbb\xbf").lstrip()
    return text if text[:1] + text[-1:] in (b"{}", b"[]") else None


def _plain_text(payload: bytes) -> bool:
    """Whether an undecodable payload reads as text, by its first _TEXT_BYTES: what
    `mosquitto_pub -m hello` sends was "more than one msgpack value" (a JSON scalar too)."""
    try:  # not final: the cut may fall inside a character
        text = codecs.getincrementaldecoder("utf-8")().decode(payload[:_TEXT_BYTES]).strip()
    except UnicodeDecodeError:  # msgpack's map and string headers are not UTF-8
        return False
    return bool(text) and text.replace("\n", " ").replace("\t", " ").isprintable()


_TEXT_BYTES: Final = 256


def _salvage_json(text: bytes) -> tuple[Any, Any]:
    """`reply_to` and `id` of a JSON object: an MQTT 3.1.1 device that sent JSON is owed its
    error reply too (it got none). Only up to _SALVAGE_JSON_BYTES: parsing is the cost."""
    if len(text) > _SALVAGE_JSON_BYTES:
        return _MISSING, _MISSING
    try:
        body = json.loads(text)
    except (ValueError, RecursionError):
        return _MISSING, _MISSING
    if not isinstance(body, dict):
        return _MISSING, _MISSING
    return body.get("reply_to", _MISSING), body.get("id", _MISSING)


_SALVAGE_JSON_BYTES: Final = 2048  # the worst a few times a request's whole cost
_SALVAGE_BYTES: Final = 1 << 20  # Mosquitto's max_packet_size in deploy/
_SALVAGE_KEYS: Final = 32


def _salvage(payload: bytes) -> tuple[Any, Any]:
    """`reply_to` and `id` of a payload not decoded whole (over --max-payload-bytes, or
    broken elsewhere): an MQTT 3.1.1 device's route is in it, and it is owed its error
    reply. Read key by key, the other values skipped undecoded; either missing: _MISSING.
    Bounded, for a payload made to stall it: its first _SALVAGE_BYTES, _SALVAGE_KEYS keys
    (no request has more fields); the last of a key repeated wins, as in a whole decode."""
    found = {"reply_to": _MISSING, "id": _MISSING}
    # Keys and the two values are decoded within these limits; skip() keeps to none, but
    # allocates nothing.
    unpacker = msgpack.Unpacker(
        raw=False,
        max_buffer_size=_SALVAGE_BYTES,
        max_str_len=0xFFFF,
        max_bin_len=c.MAX_ID_BYTES,
        max_array_len=0,
        max_map_len=0,
        max_ext_len=0,
    )
    unpacker.feed(payload[:_SALVAGE_BYTES])
    with contextlib.suppress(Exception):  # no map, or broken before them
        for _ in range(min(unpacker.read_map_header(), _SALVAGE_KEYS)):
            key = unpacker.unpack()
            if isinstance(key, str) and key in found:
                found[key] = unpacker.unpack()
            else:
                unpacker.skip()
    return found["reply_to"], found["id"]


def _name(body: dict[Any, Any], field: str) -> str:
    value = body.get(field)
    if not isinstance(value, str):
        raise BadRequest(f"'{field}' must be a string")
    if not 1 <= len(value.encode("utf-8", "surrogatepass")) <= c.MAX_NAME_BYTES:
        raise BadRequest(f"'{field}' must be 1-{c.MAX_NAME_BYTES} UTF-8 bytes")
    return value


def _check_id(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, str | int | bytes):
        raise BadRequest("'id' must be a string, integer or bytes")
    if isinstance(value, str) and len(value.encode("utf-8", "surrogatepass")) > c.MAX_ID_BYTES:
        raise BadRequest(f"'id' must be at most {c.MAX_ID_BYTES} bytes")
    if isinstance(value, bytes) and len(value) > c.MAX_ID_BYTES:
        raise BadRequest(f"'id' must be at most {c.MAX_ID_BYTES} bytes")
    return value


def _int(body: dict[Any, Any], field: str, low: int, high: int | None = None) -> int | None:
    """The optional integer `field` of `body`, in low..high, or None when absent (or nil)."""
    value = body.get(field)
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < low
        or (high is not None and value > high)
    ):
        within = f">= {low}" if high is None else f"{low}-{high}"
        raise BadRequest(f"'{field}' must be an integer {within}")
    return value


def _build(op: str, convo: str, body: dict[Any, Any], req_id: Any) -> Request:
    if op == c.OP_APPEND:
        role, content = body.get("role"), body.get("content")
        if not isinstance(role, str) or not 1 <= len(role) <= c.MAX_ROLE_CHARS:
            raise BadRequest(f"'role' must be a string of 1-{c.MAX_ROLE_CHARS} characters")
        if not isinstance(content, str):
            raise BadRequest("'content' must be a string")
        tokens = _int(body, "tokens", 0, MAX_TOKENS) if "tokens" in body else None
        return Append(convo, role, content, None if req_id is _MISSING else req_id, tokens)
    if op == c.OP_GET:
        last = _int(body, "last", 1)
        if "max_tokens" not in body and "summary" not in body:
            return Get(convo, last)
        summary = body.get("summary")
        if summary is None:
            summary = True
        if not isinstance(summary, bool):
            raise BadRequest("'summary' must be true or false")
        return Get(convo, last, _int(body, "max_tokens", 1), summary)
    if op == c.OP_DELETE:
        return Delete(convo, None if req_id is _MISSING else req_id)
    if op == c.OP_SUMMARY:
        text = body.get("text")
        if not isinstance(text, str):
            raise BadRequest("'text' must be a string")
        upto, base = _int(body, "upto", 1), _int(body, "base", 0)
        if upto is None or base is None:
            raise BadRequest("'upto' (>= 1) and 'base' (>= 0) are required")
        return Summary(
            convo,
            text,
            upto,
            base,
            _int(body, "tokens", 0, MAX_TOKENS),
            None if req_id is _MISSING else req_id,
            _int(body, "born", 0),
        )
    if op == c.OP_LIST:
        return _build_list(body)
    if op == c.OP_STATE_NAMESPACES:
        return StateNamespaces(convo)
    ns = _name(body, "ns")
    if op == c.OP_STATE_GET_ALL:
        return StateGetAll(convo, ns)
    key = _name(body, "key")
    if op == c.OP_STATE_LOAD:
        return StateLoad(convo, ns, key, _ttl(body))
    if op == c.OP_STATE_DELETE:
        return StateDelete(convo, ns, key, None if req_id is _MISSING else req_id)
    if "value" not in body:
        raise BadRequest("'value' is required (nil is a value)")
    ttl = _ttl(body)
    try:
        value = msgpack.packb(body["value"])
    except UnicodeEncodeError:  # a Python caller's str with lone surrogates (memory://)
        raise BadRequest("'value' holds text that is not valid UTF-8") from None
    except (TypeError, ValueError, OverflowError) as exc:  # a Python caller's object, 2**64
        raise BadRequest(
            f"'value' is not msgpack ({exc}): None, bool, int, float, str, bytes, and lists "
            "and maps of them"
        ) from None
    return StateSave(
        convo,
        ns,
        key,
        value,
        ttl,
        None if req_id is _MISSING else req_id,
    )


def _ttl(body: dict[Any, Any]) -> float | None:
    ttl = body.get("ttl")
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 < ttl < math.inf:
        raise BadRequest("'ttl' must be a number of seconds > 0")
    return float(ttl)


def _build_list(body: dict[Any, Any]) -> ListConvos:
    limit = _int(body, "limit", 1, c.MAX_LIST_LIMIT)
    prefix = body.get("prefix")
    if prefix is None:
        prefix = ""
    if (
        not isinstance(prefix, str)
        or len(prefix.encode("utf-8", "surrogatepass")) > c.MAX_CONVO_BYTES
        or _BAD_CONVO_CHARS.search(prefix)
    ):
        raise BadRequest(
            f"'prefix' must be a string of at most {c.MAX_CONVO_BYTES} UTF-8 bytes that can "
            "begin a conversation id"
        )
    cursor = body.get("cursor")
    after = "" if cursor is None else decode_cursor(cursor)
    return ListConvos(c.DEFAULT_LIST_LIMIT if limit is None else limit, after, prefix)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def check_topic(convo: str, op: str) -> None:
    """Raise the WorkerError of a request to P/<convo>/<op> whatever its body (remembered:
    a client asks about the same conversations again and again)."""
    if convo == c.CONVERSATIONS_LEVEL and op == c.OP_LIST:
        return
    if op not in c.OPERATIONS:
        raise BadTopic(f"unknown operation {op!r}")
    validate_convo(convo)


def check_request(convo: str, op: str, body: dict[Any, Any]) -> Request:
    """The request the worker would build from `body` on P/<convo>/<op>, or the WorkerError
    its reply would carry (for clients that refuse bad input before sending)."""
    check_topic(convo, op)
    req_id = _check_id(body["id"]) if "id" in body else _MISSING
    request = _build(op, convo, body, req_id)
    # A Python caller's str may hold lone surrogates, which no msgpack message can carry.
    # (The request's text fields are the body's own strings.)
    for name in ("role", "content", "text", "ns", "key"):
        text = body.get(name)
        # isascii() first: it is a flag of the str, the search half the client's check.
        if isinstance(text, str) and not text.isascii() and _SURROGATES.search(text):
            raise BadRequest(f"'{name}' is not valid UTF-8 (it holds a lone surrogate)")
    return request


def reply_parsed(req_id: Any = _MISSING) -> Parsed:
    """A Parsed that only carries an id, for encoding a reply outside the service."""
    return Parsed(None, None, None, None, req_id)


def too_large_payload(
    size: int, limit: int, setting: str = "the worker's --max-payload-bytes"
) -> str:
    return f"payload is {size} bytes; the limit is {limit} ({setting})"


class Router:
    """Knows the topics under one prefix: what to subscribe to and what a topic asks for."""

    def __init__(
        self, prefix: str, max_payload_bytes: int, route_prefix: str | None = None
    ) -> None:
        validate_prefix(prefix)
        self.prefix = prefix
        self.max_payload_bytes = max_payload_bytes
        self.route_prefix = route_prefix
        self._head = prefix + "/"
        self._skip = len(self._head)
        self._worker_level = c.WORKER_LEVEL + "/"
        self._list_topic = f"{self._head}{c.CONVERSATIONS_LEVEL}/{c.OP_LIST}"
        # Remembered: a client asks on the same topics again and again. Only what a request
        # or a worker's own topic can be is kept (split keeps none of the BadTopics it
        # raises): a long topic or route kept is memory a client chooses (4096 routes of
        # 60 KB held 250 MB: a review).
        self._longest = len(self._head) + c.MAX_CONVO_BYTES + _LONGEST_LEAF
        self.split = functools.lru_cache(maxsize=_CACHE_SIZE)(self._split)
        self._not_for_us_kept = functools.lru_cache(maxsize=_CACHE_SIZE)(self._not_for_us)
        self._route_problem_kept = functools.lru_cache(maxsize=_CACHE_SIZE)(self._route_problem)

    def filters(self) -> list[str]:
        """Topic filters that receive every request, and every mistaken one (for bad_topic)."""
        return [f"{self._head}#"]

    def legacy_filters(self) -> list[str]:
        """What earlier versions subscribed to: a session kept from them may still hold these."""
        return [f"{self.prefix}/+/{op}" for op in (c.OP_APPEND, c.OP_GET, c.OP_DELETE)] + [
            f"{self.prefix}/+/state/+"
        ]

    def mine(self, topic: str) -> bool:
        """Whether a message's topic is under the prefix (the prefix alone too: P/# has it)."""
        return topic.startswith(self._head) or topic == self.prefix

    @staticmethod
    def stray_filters(topic: str) -> list[str]:
        """For a request topic under another prefix: the filters a run of this client id
        with that prefix subscribed to, whichever of the topic's leading levels it was (a
        request's topic has two levels or more after its prefix)."""
        levels = topic.split("/")
        out = []
        for k in range(1, len(levels) - 1):
            try:
                other = Router("/".join(levels[:k]), 0)
            except ValueError:  # not a prefix a worker could have had
                continue
            out += other.filters() + other.legacy_filters()
        return out

    def not_for_us(self, topic: str) -> bool:
        """Workers' own traffic under the prefix: events and worker topics, never requests."""
        if len(topic) > self._longest:
            return self._not_for_us(topic)
        return self._not_for_us_kept(topic)

    def route_problem(self, route: str, convo: str | None) -> str | None:
        """Why the worker must not publish a reply to `route`, or None."""
        if len(route) > c.MAX_TOPIC_BYTES:  # refused, whatever it is
            return self._route_problem(route, convo)
        return self._route_problem_kept(route, convo)

    def _not_for_us(self, topic: str) -> bool:
        rest = topic[self._skip :] if topic.startswith(self._head) else ""
        if rest.startswith(self._worker_level):
            client_id, sep, leaf = rest[len(self._worker_level) :].rpartition("/")
            return bool(sep and client_id) and leaf in c.WORKER_LEAVES
        convo, sep, leaf = rest.partition("/")
        return bool(sep) and leaf in c.EVENT_LEAVES and "/" not in convo

    def evicted_topic(self, convo: str) -> str:
        return f"{self._head}{convo}/{c.EVICTED}"

    def trimmed_topic(self, convo: str) -> str:
        return f"{self._head}{convo}/{c.TRIMMED}"

    def worker_topic(self, client_id: str, leaf: str) -> str:
        return f"{self._head}{c.WORKER_LEVEL}/{client_id}/{leaf}"

    def _split(self, topic: str) -> tuple[str, str]:
        """(convo, op) of a request topic; BadTopic when the topic asks for nothing we serve."""
        if not topic.startswith(self._head):
            what = "no conversation nor operation" if topic == self.prefix else "not under it"
            raise BadTopic(f"{what}: a request's topic is {self._head}<conversation>/<operation>")
        if topic == self._list_topic:
            return c.CONVERSATIONS_LEVEL, c.OP_LIST
        convo, sep, op = topic[self._skip :].partition("/")
        if not sep or op not in c.OPERATIONS:
            what = f"unknown operation {op!r}" if op else "no operation"
            raise BadTopic(f"{what}: a request's topic is {self._head}<conversation>/<operation>")
        validate_convo(convo)
        return convo, op

    def _route_problem(self, route: str, convo: str | None) -> str | None:
        problem = topic_name_problem(route)
        if problem:
            return problem
        if route.startswith("$"):
            return "topics starting with $ are the broker's"
        if route == self.prefix or route.startswith(self._head):
            return f"replies must not go under {self._head}"
        if self.route_prefix is not None:
            if convo is None:
                return "no valid conversation to check the route against"
            own = self.route_prefix.replace("{convo}", convo)
            if route != own and not route.startswith(own + "/"):
                return f"replies for this conversation go under {own}"
        return None

    def parse(self, topic: str, payload: bytes, response_topic: str | None) -> Parsed:
        """Understand one message. Never raises: every problem becomes a value in Parsed."""
        body: dict[Any, Any] | None = None
        error: WorkerError | None = None
        if len(payload) > self.max_payload_bytes:
            error = TooLarge(too_large_payload(len(payload), self.max_payload_bytes))
        else:
            try:
                body = _decode(payload)
            except WorkerError as exc:
                error = _bare(exc)

        where: tuple[str, str] | None = None
        try:
            where = self.split(topic)
        except WorkerError as exc:
            error = error or _bare(exc)

        route: Any = response_topic
        salvaged: Any = _MISSING
        if body is None and payload:
            found, salvaged = _salvage(payload)
            if found is _MISSING and salvaged is _MISSING and (text := _json_text(payload)):
                found, salvaged = _salvage_json(text)
            if route is None and found is not _MISSING:
                route = found
        elif route is None and body is not None:
            route = body.get("reply_to")
        refused: BadRoute | None = None
        if route is not None:
            problem = (
                self.route_problem(route, where[0] if where else None)
                if isinstance(route, str)
                else "not a string"
            )
            if problem:
                refused, route = BadRoute(f"reply route refused: {problem}"), None

        req_id: Any = _MISSING
        request: Request | None = None
        if body is not None and where is not None:
            try:
                if "id" in body:
                    req_id = _check_id(body["id"])
                request = _build(where[1], where[0], body, req_id)
            except WorkerError as exc:
                error = _bare(exc)
        elif body is not None and "id" in body:
            with contextlib.suppress(WorkerError):
                req_id = _check_id(body["id"])
        elif salvaged is not _MISSING:
            with contextlib.suppress(WorkerError):
                req_id = _check_id(salvaged)
        return Parsed(request, error, route, refused, req_id)


# --- encoding -------------------------------------------------------------------------------

_packb = msgpack.packb
_OK_TRUE: Final = _packb("ok") + _packb(True)
_TURNS_KEY: Final = _packb("turns")
_ITEMS_KEY: Final = _packb("items")
_ID_KEY: Final = _packb("id")
_FOUND_KEY: Final = _packb("found")
_VALUE_KEY: Final = _packb("value")
_TOKENS_KEY: Final = _packb("tokens")
_SUMMARY_KEY: Final = _packb("summary")
_NIL: Final = _packb(None)


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes([0x90 | n])
    if n < 0x10000:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def _map_header(n: int) -> bytes:
    if n < 16:
        return bytes([0x80 | n])
    if n < 0x10000:
        return b"\xde" + n.to_bytes(2, "big")
    return b"\xdf" + n.to_bytes(4, "big")


def encode_result(result: Result, parsed: Parsed) -> bytes:
    """The reply envelope for one request, with its id echoed when it had one."""
    id_part = _ID_KEY + _packb(parsed.req_id) if parsed.has_id else b""
    extra = 1 if parsed.has_id else 0
    if isinstance(result, WorkerError):
        return _packb(_error_body(result, parsed))
    if isinstance(result, Turns):
        summary = b""
        if result.summary is not None:
            text, upto, tokens = result.summary
            summary = _SUMMARY_KEY + _packb({"text": text, "upto": upto, "tokens": tokens})
            extra += 1
        return b"".join(
            (
                _map_header(3 + extra),
                _OK_TRUE,
                id_part,
                _TURNS_KEY,
                _array_header(result.count),
                result.data,
                _TOKENS_KEY,
                _packb(result.tokens),
                summary,
            )
        )
    if isinstance(result, Items):
        parts = [
            _map_header(2 + extra),
            _OK_TRUE,
            id_part,
            _ITEMS_KEY,
            _map_header(len(result.items)),
        ]
        for key, value in result.items.items():
            parts += (_packb(key), value)
        return b"".join(parts)
    if isinstance(result, Loaded):
        found = result.value is not None
        return b"".join(
            (
                _map_header(3 + extra),
                _OK_TRUE,
                id_part,
                _FOUND_KEY,
                _packb(found),
                _VALUE_KEY,
                result.value if result.value is not None else _NIL,
            )
        )
    body: dict[str, Any] = {"ok": True, **result.fields}
    if parsed.has_id:
        body["id"] = parsed.req_id
    return _packb(body)


def _error_body(error: WorkerError, parsed: Parsed) -> dict[str, Any]:
    details = {"code": error.code, "message": error.message, **error.details()}
    body: dict[str, Any] = {"ok": False, "error": details}
    if parsed.has_id:
        body["id"] = parsed.req_id
    return body


def content_type(fmt: str) -> str:
    """The MQTT 5 Content Type of events, status and stats in `fmt` (msgpack or json)."""
    return c.CONTENT_TYPE_JSON if fmt == c.FORMAT_JSON else c.CONTENT_TYPE


def encode(value: Any, fmt: str = c.FORMAT_MSGPACK) -> bytes:
    """`value` as msgpack, or as compact UTF-8 JSON for tools that cannot read msgpack."""
    if fmt == c.FORMAT_JSON:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
    return _packb(value)


def decode_event(payload: bytes, content_type: str | None) -> Any:
    """An event, status or stats payload, in whichever --event-format the worker uses. Without
    a Content Type (an MQTT 3.1.1 reader) the first byte tells: a msgpack map is never "{"."""
    if content_type == c.CONTENT_TYPE_JSON or (content_type is None and payload[:1] == b"{"):
        return json.loads(payload)
    return msgpack.unpackb(payload, strict_map_key=False)


def encode_event(ev: Eviction, fmt: str = c.FORMAT_MSGPACK) -> bytes:
    return encode(
        {"convo": ev.convo, "reason": ev.reason, "count": ev.count, "keys": ev.keys, "ts": ev.ts},
        fmt,
    )


_TRIMMED_HEAD: Final = _map_header(5) + _packb("convo")
_TRIMMED_TURNS: Final = _packb("turns")
# One per appended turn past the window: the fixed-width numbers are packed with struct
# (msgpack.packb builds a Packer per call, half this function's time).
_TRIMMED_KEYS: Final = (_packb("summary_upto"), _packb("ts"), _packb("born"))
_TRIMMED_TAIL: Final = struct.Struct(
    ">{}sBQ{}sBd{}sBQ".format(*(len(key) for key in _TRIMMED_KEYS))
)


def encode_trimmed(ev: Trimmed, fmt: str = c.FORMAT_MSGPACK) -> bytes:
    """The P/<convo>/trimmed event: in msgpack the turns are spliced in as stored."""
    if fmt == c.FORMAT_JSON:
        body = {
            "convo": ev.convo,
            "turns": _unpack_all(ev.turns),
            "summary_upto": ev.summary_upto,
            "ts": ev.ts,
            "born": ev.born,
        }
        return encode(body, fmt)
    upto_key, ts_key, born_key = _TRIMMED_KEYS
    tail = _TRIMMED_TAIL.pack(
        upto_key, 0xCF, ev.summary_upto, ts_key, 0xCB, ev.ts, born_key, 0xCF, ev.born
    )
    return b"".join(
        (
            _TRIMMED_HEAD,
            _packb(ev.convo),
            _TRIMMED_TURNS,
            _array_header(ev.count),
            ev.turns,
            tail,
        )
    )


@dataclass
class Stats:
    """Counters for the stats topic, since `started` (a time.monotonic() reading)."""

    started: float
    requests: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)
    evictions: Counter[str] = field(default_factory=Counter)
    ignored_retained: int = 0
    taken_over: int = 0
    summaries: int = 0
    trimmed: int = 0


class _Counts(Protocol):
    @property
    def conversations(self) -> int: ...
    @property
    def turns(self) -> int: ...
    @property
    def bytes(self) -> int: ...
    @property
    def keys(self) -> int: ...


class _Bounds(Protocol):
    @property
    def max_bytes(self) -> int: ...
    @property
    def max_conversations(self) -> int: ...
    @property
    def max_turns(self) -> int: ...
    @property
    def max_keys(self) -> int: ...
    @property
    def ttl(self) -> float: ...
    @property
    def trimmed_events(self) -> bool: ...


def decode_status(payload: bytes | None) -> dict[str, Any]:
    """A worker's status message's fields (status_payload's), {} when it is not one: anyone
    the broker lets may publish on a worker's topics."""
    with contextlib.suppress(Exception):
        body = decode_event(payload or b"", None)
        if isinstance(body, dict):
            return body
    return {}


def status_payload(
    state: str,
    *,
    version: str,
    client_id: str,
    prefix: str,
    backend: str,
    pid: int,
    ts: float,
    node: str | None = None,
    broker: str | None = None,
) -> dict[str, Any]:
    """The body of P/_worker/<client-id>/status (schemas/status.json)."""
    return {
        "state": state,
        "version": version,
        "client_id": client_id,
        "prefix": prefix,
        "backend": backend,
        "pid": pid,
        "ts": ts,
        "node": node,
        "broker": broker,
    }


def stats_payload(
    stats: Stats,
    counts: _Counts,
    limits: _Bounds,
    *,
    client_id: str,
    version: str,
    backend: str,
    now: float,
    ts: float,
    interval: float,
    shared_group: str | None = None,
    store: str | None = None,
) -> dict[str, Any]:
    """The body of P/_worker/<client-id>/stats (schemas/stats.json); `now` is a
    time.monotonic() reading, for the uptime; `interval` is --stats-interval."""
    return {
        "client_id": client_id,
        "shared_group": shared_group,
        "version": version,
        "backend": backend,
        "store": store,
        "conversations": counts.conversations,
        "turns": counts.turns,
        "bytes": counts.bytes,
        "keys": counts.keys,
        "requests": stats.requests,
        "errors": dict(stats.errors),
        "refused": dict(stats.refused),
        "ignored_retained": stats.ignored_retained,
        "taken_over": stats.taken_over,
        "summaries": stats.summaries,
        "trimmed": stats.trimmed,
        "trimmed_events": limits.trimmed_events,
        "stats_interval": interval,
        "evictions": dict(stats.evictions),
        "uptime": round(now - stats.started, 3),
        "ts": ts,
        "limits": limits_payload(limits),
    }


def limits_payload(limits: _Bounds) -> dict[str, Any]:
    """The bounds as the stats carry them (`limits`), for gauges and for peers to compare."""
    return {
        "max_bytes": limits.max_bytes,
        "max_conversations": limits.max_conversations,
        "max_turns": limits.max_turns,
        "max_keys": limits.max_keys,
        "ttl": limits.ttl,
    }


# A worker's stats older than this many of its --stats-interval (and 30 s) are of one that
# stopped or was cut off (the dashboard reads them so too); without the interval (an older
# worker's), older than _RECENT_STATS seconds.
_SILENT_INTERVALS: Final = 3
_RECENT_STATS: Final = 300.0


def stats_are_recent(stats: Mapping[str, Any], now: float) -> bool:
    """Whether a worker's (retained) stats are of one that still runs, at Unix time `now`."""
    ts, interval = stats.get("ts"), stats.get("stats_interval")
    if not isinstance(ts, int | float):
        return False
    if isinstance(interval, int | float) and interval > 0:
        return now - ts < max(30.0, _SILENT_INTERVALS * interval)
    return now - ts < _RECENT_STATS


# Home Assistant sensors read from the JSON stats: (object id, name, template, unit, class).
_HA_SENSORS: Final = (
    ("conversations", "Conversations", "{{ value_json.conversations }}", None, None),
    ("turns", "Turns", "{{ value_json.turns }}", None, None),
    ("bytes", "Stored bytes", "{{ value_json.bytes }}", "B", "data_size"),
    ("keys", "State keys", "{{ value_json['keys'] }}", None, None),
    ("requests", "Requests", "{{ value_json.requests }}", None, None),
    ("errors", "Errors", "{{ value_json.errors.values() | sum }}", None, None),
    ("uptime", "Uptime", "{{ value_json.uptime | round(0) }}", "s", "duration"),
    *(
        (
            f"evictions_{r}",
            f"Evictions ({r})",
            f"{{{{ value_json.evictions.{r} | default(0) }}}}",
            None,
            None,
        )
        for r in c.REASONS
    ),
)


_HA_GAUGES: Final = frozenset({"conversations", "turns", "bytes", "keys", "uptime"})


def ha_node_id(client_id: str) -> str:
    """The worker's Home Assistant node id: its client id with only [A-Za-z0-9_-] kept."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", client_id)


def ha_discovery(
    ha_prefix: str, status_topic: str, stats_topic: str, client_id: str, version: str
) -> list[tuple[str, bytes]]:
    """Home Assistant MQTT discovery configs (topic, JSON payload), to be published retained:
    one device per worker, its online state from the status topic and sensors on the stats."""
    node = ha_node_id(client_id)
    device = {
        "identifiers": [f"memory_worker_{node}"],
        "name": f"memory-worker {client_id}",
        "model": "memory-worker",
        "sw_version": version,
    }
    availability = {
        "availability_topic": status_topic,
        "availability_template": "{{ value_json.state }}",
        "payload_available": "online",
        "payload_not_available": "offline",
    }
    configs: list[tuple[str, dict[str, Any]]] = [
        (
            f"{ha_prefix}/binary_sensor/{node}/online/config",
            {
                "name": "Online",
                "unique_id": f"memory_worker_{node}_online",
                "object_id": f"memory_worker_{node}_online",
                "state_topic": status_topic,
                "value_template": "{{ value_json.state }}",
                "payload_on": "online",
                "payload_off": "offline",
                "device_class": "connectivity",
                "device": device,
            },
        )
    ]
    for obj, name, template, unit, dclass in _HA_SENSORS:
        body: dict[str, Any] = {
            "name": name,
            "unique_id": f"memory_worker_{node}_{obj}",
            "object_id": f"memory_worker_{node}_{obj}",
            "state_topic": stats_topic,
            "value_template": template,
            "state_class": "measurement" if obj in _HA_GAUGES else "total_increasing",
            "device": device,
            **availability,
        }
        if unit:
            body["unit_of_measurement"] = unit
        if dclass:
            body["device_class"] = dclass
        configs.append((f"{ha_prefix}/sensor/{node}/{obj}/config", body))
    return [(topic, encode(body, c.FORMAT_JSON)) for topic, body in configs]
