"""The wire contract's pure half: topics, routes, request parsing and reply encoding."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from worker.errors import BadPayload, BadRequest, BadTopic, TooLarge
from worker.protocol import (
    Append,
    Fields,
    Get,
    Items,
    ListConvos,
    Loaded,
    Router,
    StateNamespaces,
    StateSave,
    Turns,
    encode_cursor,
    encode_result,
    topic_name_problem,
    validate_prefix,
)
from worker.turns import encode_turn, pack_turn, turn_size

R = Router("mem", 1024)


def parse(topic: str, body: Any = None, raw: bytes | None = None, rt: str | None = None) -> Any:
    payload = raw if raw is not None else msgpack.packb(body if body is not None else {})
    return R.parse(topic, payload, rt)


def test_append_request_is_understood() -> None:
    """A well-formed append becomes an Append value with its route and id."""
    p = parse("mem/c1/append", {"role": "user", "content": "hi", "id": "a", "x": 1}, rt="r/1")
    assert p.request == Append("c1", "user", "hi", "a")
    assert (p.route, p.req_id, p.error, p.refused) == ("r/1", "a", None, None)


def test_empty_payload_counts_as_empty_map() -> None:
    """An empty payload is {}: a get with no fields."""
    p = R.parse("mem/c1/get", b"", None)
    assert p.request == Get("c1", None)
    assert not p.has_id


def test_reply_to_is_the_route_without_response_topic() -> None:
    """MQTT 3.1.1 devices name their route in the payload; the MQTT 5 property wins."""
    assert parse("mem/c/get", {"reply_to": "dev/1"}).route == "dev/1"
    assert parse("mem/c/get", {"reply_to": "dev/1"}, rt="dev/5").route == "dev/5"


@pytest.mark.parametrize(
    "convo",
    [
        "_worker",
        "$sys",
        "a" * 129,
        "é" * 65,
        "bad\x01",
        "bad\x7f",
        "bad\u0085",
        "x\ufdd0",
        "x\uffff",
        "x\U0001fffe",
    ],
)
def test_bad_conversation_ids_are_bad_topic(convo: str) -> None:
    """Reserved, oversize, control and non-character conversation ids are refused."""
    assert isinstance(parse(f"mem/{convo}/get").error, BadTopic)


def test_conversation_id_of_128_bytes_is_fine() -> None:
    """The limit is in UTF-8 bytes, inclusive."""
    assert parse(f"mem/{'é' * 64}/get").error is None


def test_unknown_operation_is_bad_topic() -> None:
    """An unknown operation or a foreign prefix is bad_topic; one that names no operation (or
    no conversation) says what a request's topic is (it said "unknown operation ''")."""
    assert isinstance(parse("mem/c/state/nope", {"ns": "n"}).error, BadTopic)
    assert isinstance(parse("other/c/get").error, BadTopic)
    shape = "a request's topic is mem/<conversation>/<operation>"
    for topic, what in (
        ("mem", "no conversation nor operation"),
        ("mem/c", "no operation"),
        ("mem/c/", "no operation"),
        ("mem/c/frob", "unknown operation 'frob'"),
    ):
        assert parse(topic).error.message == f"{what}: {shape}"


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        (b"\xc1", BadPayload),
        (b"\x93\x01\x02\x03", BadPayload),
        (msgpack.packb("text"), BadPayload),
        (msgpack.packb({}) + b"x", BadPayload),
        (b"\x91" * 1000 + b"\xc0", BadPayload),
        (b"\x81\xa4role\xa2\xff\xfe", BadPayload),
        (b"\x00" * 1025, TooLarge),
    ],
    ids=["garbage", "array", "string", "trailing", "deep", "bad-utf8", "oversize"],
)
def test_undecodable_payloads(raw: bytes, kind: type[Exception]) -> None:
    """Payloads that are not a msgpack map, or over the cap, get the documented code."""
    assert isinstance(parse("mem/c/append", raw=raw).error, kind)


def test_a_payload_of_json_is_named_so() -> None:
    """JSON's `{` is a msgpack integer: a device that sent JSON was told its payload 'holds
    more than one msgpack value' (a new user's trial). Told by its first and last
    characters (a BOM before them, a C string's NUL after), not parsed: text that only
    starts like JSON is 'not msgpack' as before."""
    for raw in (b' {"role": "user"}\n', b'\xef\xbb\xbf{"a": 1}', b"[1, 2]", b'{"a": 1}\x00'):
        said = parse("mem/c/append", raw=raw).error
        assert isinstance(said, BadPayload)
        assert said.message.startswith("payload looks like JSON, not msgpack"), said.message
    for raw in (b'{"role": "user"', b"[1, 2"):
        error = parse("mem/c/append", raw=raw).error
        assert isinstance(error, BadPayload)
        assert error.message.startswith("payload looks like text, not msgpack"), error.message


@pytest.mark.parametrize(
    "raw", [b"hello", b'"hello"', b"null", b"123", b"append hi\n", "héllo wörld".encode() * 60]
)
def test_a_payload_of_text_is_named_so(raw: bytes) -> None:
    """`mosquitto_pub -m hello`, or a JSON scalar, was told its payload 'holds more than one
    msgpack value' (a trial); told by its first 256 bytes (a character cut there too)."""
    said = parse("mem/c/append", raw=raw).error
    assert isinstance(said, BadPayload)
    assert said.message.startswith("payload looks like text, not msgpack"), said.message


def test_a_negative_ext_type_is_named() -> None:
    """msgpack reserves negative ext types: one was 'cut short or malformed' (a review)."""
    said = parse("mem/c/state/save", raw=b"\x83\xa2ns\xa1n\xa3key\xa1k\xa5value\xd4\xfb\x01")
    assert isinstance(said.error, BadPayload)
    assert said.error.message == (
        "payload is not msgpack: an ext type in it is negative, which msgpack reserves (-1 is "
        "a timestamp)"
    )


@pytest.mark.parametrize(
    "raw", [msgpack.packb({"role": "user", "content": "hi"})[:-3], b"\xc1", b"ab\x01cd"]
)
def test_binary_is_not_called_text(raw: bytes) -> None:
    """A cut msgpack map's strings are printable, its headers are not UTF-8: not 'text'."""
    said = parse("mem/c/append", raw=raw).error
    assert isinstance(said, BadPayload)
    assert said.message.startswith("payload is not msgpack"), said.message


def test_too_large_is_checked_before_decoding() -> None:
    """An oversize payload is refused without being decoded whole: its reply_to and id are
    read alone, the other values skipped (a string that is not UTF-8 among them too), so a
    3.1.1 device gets its too_large. A payload that is no map, or breaks before them, has
    neither."""
    raw = msgpack.packb({"content": "x" * 2000, "role": b"\xff", "reply_to": "r", "id": 7})
    p = parse("mem/c/append", raw=raw.replace(b"\xc4\x01\xff", b"\xa1\xff"))
    assert isinstance(p.error, TooLarge)
    assert (p.route, p.req_id) == ("r", 7)
    # the last of a repeated key wins, as in a whole decode
    twice = b"\x83\xa8reply_to\xa1a\xa8reply_to\xa1b\xa7content\xda\x07\xd0" + b"x" * 2000
    assert parse("mem/c/append", raw=twice).route == "b"
    # bounded for a payload made to stall it: 32 keys, the first MiB
    many = {f"k{i}": 0 for i in range(32)} | {"content": "x" * 2000, "reply_to": "r"}
    hostile = b"\xdf\xff\xff\xff\xff" + b"\xc0" * (2 << 20)  # a map of nils, 4 billion long
    for broken in (
        msgpack.packb(many),
        msgpack.packb({"content": "x" * (1 << 20), "reply_to": "r"}),
        hostile,
        msgpack.packb(["r", "x" * 2000]),
        msgpack.packb({"x" * 70_000: 1, "reply_to": "r"}),  # a key over the limit
        msgpack.packb({"content": "x" * 2000, "reply_to": "r"})[:-3],  # cut short
    ):
        p = parse("mem/c/append", raw=broken)
        assert isinstance(p.error, TooLarge)
        assert p.route is None


@pytest.mark.parametrize(
    ("op", "body"),
    [
        ("append", {"content": "x"}),
        ("append", {"role": "", "content": "x"}),
        ("append", {"role": "r" * 33, "content": "x"}),
        ("append", {"role": "user", "content": 5}),
        ("append", {"role": 1, "content": "x"}),
        ("get", {"last": 0}),
        ("get", {"last": True}),
        ("get", {"last": "3"}),
        ("get", {"id": 1.5}),
        ("get", {"id": "x" * 65}),
        ("get", {"id": b"x" * 65}),
        ("get", {"id": True}),
        ("state/save", {"ns": "n", "key": "k"}),
        ("state/save", {"ns": "n", "key": "k", "value": 1, "ttl": 0}),
        ("state/save", {"ns": "n", "key": "k", "value": 1, "ttl": "5"}),
        ("state/save", {"ns": "", "key": "k", "value": 1}),
        ("state/load", {"ns": "n", "key": "k" * 129}),
        ("state/load", {"ns": "n", "key": "k", "ttl": -1}),
        ("state/load", {"ns": "n", "key": "k", "ttl": True}),
        ("state/get_all", {}),
        ("state/delete", {"ns": "n"}),
    ],
)
def test_wrong_fields_are_bad_request(op: str, body: dict[str, Any]) -> None:
    """Missing or wrong-typed fields are bad_request."""
    assert isinstance(parse(f"mem/c/{op}", body).error, BadRequest)


def test_state_save_keeps_the_value_encoded() -> None:
    """The value is kept as msgpack bytes so it round-trips exactly."""
    value = {"a": [1, 2.5, None, True, b"\x00"], "b": {"c": "d"}}
    p = parse("mem/c/state/save", {"ns": "n", "key": "k", "value": value, "ttl": 2})
    assert p.request == StateSave("c", "n", "k", msgpack.packb(value), 2.0)


@pytest.mark.parametrize(
    "route",
    [
        "",
        "a/+/b",
        "a/#",
        "nul\x00",
        "ctl\x1f",
        "del\x7f",
        "c1\x9f",
        "non\ufffe",
        "non\ufdd5",
        "x" * 257,
        "mem/c/append",
        "mem",
        "$SYS/x",
    ],
)
def test_bad_routes_are_refused(route: str) -> None:
    """Routes Mosquitto would refuse, or inside the worker's own space, are never used."""
    p = parse("mem/c/get", rt=route)
    assert p.route is None
    assert p.refused is not None
    assert p.error is None  # the request itself is served; its reply has nowhere to go


def test_non_string_reply_to_is_refused() -> None:
    """A reply_to that is not a string is refused and no route is kept."""
    p = parse("mem/c/get", {"reply_to": 5})
    assert p.route is None
    assert p.refused is not None


def test_route_next_to_prefix_is_fine() -> None:
    """Only P itself and topics under P/ are reserved: P-something is not under P/."""
    assert parse("mem/c/get", rt="memory/x").route == "memory/x"


def test_topic_name_rules() -> None:
    """Topic names of up to 256 UTF-8 bytes pass; longer ones are named as a problem."""
    assert topic_name_problem("a/b/c") is None
    assert topic_name_problem("ü/ß") is None
    assert topic_name_problem("x" * 256) is None
    assert topic_name_problem("x" * 257) is not None


@pytest.mark.parametrize("prefix", ["", "$x", "/a", "a/", "a//b", "a/+", "a#"])
def test_bad_prefixes(prefix: str) -> None:
    """Each bad prefix is refused with a message."""
    with pytest.raises(ValueError, match=r"."):
        validate_prefix(prefix)


def _roundtrip(result: Any, body: Any = None) -> Any:
    return msgpack.unpackb(encode_result(result, parse("mem/c/get", body)))


def test_turns_reply_is_a_plain_msgpack_map() -> None:
    """Pre-encoded turns are spliced into a reply any msgpack decoder reads."""
    turns = [encode_turn("user", f"m{i}", 1.5, i, 2) for i in range(1, 20)]
    assert _roundtrip(Turns(len(turns), b"".join(turns), 38), {"id": b"\x01"}) == {
        "ok": True,
        "id": b"\x01",
        "turns": [
            {"role": "user", "content": f"m{i}", "ts": 1.5, "seq": i, "tokens": 2}
            for i in range(1, 20)
        ],
        "tokens": 38,
    }
    with_summary = Turns(0, b"", 7, ("earlier", 4, 7))
    assert _roundtrip(with_summary) == {
        "ok": True,
        "turns": [],
        "tokens": 7,
        "summary": {"text": "earlier", "upto": 4, "tokens": 7},
    }


def test_other_replies_echo_the_id() -> None:
    """Field, load and get-all replies carry the request's id back."""
    assert _roundtrip(Fields({"seq": 1, "count": 1}), {"id": 7}) == {
        "ok": True,
        "seq": 1,
        "count": 1,
        "id": 7,
    }
    assert _roundtrip(Loaded(msgpack.packb([1, "x"])), {"id": "q"}) == {
        "ok": True,
        "id": "q",
        "found": True,
        "value": [1, "x"],
    }
    assert _roundtrip(Loaded(None)) == {"ok": True, "found": False, "value": None}
    items = {f"k{i}": msgpack.packb(i) for i in range(20)}
    assert _roundtrip(Items(items)) == {"ok": True, "items": {f"k{i}": i for i in range(20)}}


def test_error_reply() -> None:
    """An error reply carries ok false, the id, and the error's code and message."""
    assert _roundtrip(BadRequest("nope"), {"id": "z"}) == {
        "ok": False,
        "id": "z",
        "error": {"code": "bad_request", "message": "nope"},
    }


def test_route_prefix_keeps_replies_in_the_conversation_s_own_space() -> None:
    """With --route-prefix reply/{convo}, a device cannot aim replies at another device."""
    r = Router("mem", 1024, route_prefix="reply/{convo}")
    assert r.parse("mem/kiosk-a/get", b"", "reply/kiosk-a").route == "reply/kiosk-a"
    assert r.parse("mem/kiosk-a/get", b"", "reply/kiosk-a/x/y").route == "reply/kiosk-a/x/y"
    for route in ("reply/kiosk-b/x", "reply/kiosk-ab", "reply", "other/kiosk-a"):
        p = r.parse("mem/kiosk-a/get", b"", route)
        assert (p.route, p.refused is not None) == (None, True), route
    bad = r.parse("mem/_x/get", b"", "reply/_x")
    assert bad.route is None
    assert isinstance(bad.error, BadTopic)


@pytest.mark.parametrize(
    ("role", "content"),
    [
        ("u", ""),
        ("assistant", "x" * 31),
        ("é" * 32, "x" * 32),
        ("r", "x" * 255),
        ("r", "x" * 256),
        ("r", "é" * 40000),
        ("r" * 32, "x" * 70000),
    ],
)
def test_turn_size_reads_the_encoding(role: str, content: str) -> None:
    """The byte count read off a stored turn equals its role and content in UTF-8."""
    turn = pack_turn(role, content, 1.5, 2**40, 1_000_000)
    assert turn_size(turn) == len(role.encode()) + len(content.encode())


def test_schemas_name_every_code_and_reason() -> None:
    """The error codes and eviction reasons in schemas/ are exactly the worker's."""
    from tests.clients import schema
    from worker import constants
    from worker.errors import ERROR_CODES

    codes = schema("error.reply")["properties"]["error"]["properties"]["code"]["enum"]
    assert sorted(codes) == sorted(ERROR_CODES)
    reasons = schema("evicted.event")["properties"]["reason"]["enum"]
    assert sorted(reasons) == sorted(constants.REASONS)


def test_list_is_a_worker_level_request() -> None:
    """P/_conversations/list parses into ListConvos; other _conversations topics do not."""
    p = parse("mem/_conversations/list", {"limit": 5, "prefix": "kiosk", "id": 3}, rt="r/1")
    assert p.request == ListConvos(5, "", "kiosk")
    assert (p.route, p.req_id, p.error) == ("r/1", 3, None)
    assert parse("mem/_conversations/list").request == ListConvos(100, "", "")
    after = parse("mem/_conversations/list", {"cursor": encode_cursor("kiosk-9")}).request
    assert after == ListConvos(100, "kiosk-9", "")
    for topic in ("mem/_conversations/get", "mem/_conversations/list/x", "mem/c/list"):
        assert isinstance(parse(topic).error, BadTopic), topic
    assert not R.not_for_us("mem/_conversations/list")


@pytest.mark.parametrize(
    "body",
    [
        {"limit": 0},
        {"limit": 1001},
        {"limit": "5"},
        {"limit": True},
        {"cursor": 5},
        {"cursor": ""},
        {"cursor": "!!"},
        {"cursor": encode_cursor("_reserved")},
        {"cursor": encode_cursor("kiosk") + "="},
        {"prefix": 5},
        {"prefix": "a/b"},
        {"prefix": "x" * 129},
    ],
)
def test_bad_list_fields_are_bad_request(body: dict[str, Any]) -> None:
    """A limit outside 1-1000, a cursor no reply gave, or an impossible prefix: bad_request."""
    assert isinstance(parse("mem/_conversations/list", body).error, BadRequest)


def test_state_namespaces_takes_no_fields() -> None:
    """P/<convo>/state/namespaces is a request of its conversation."""
    assert parse("mem/c/state/namespaces").request == StateNamespaces("c")
    assert isinstance(parse("mem/_x/state/namespaces").error, BadTopic)


def test_list_route_prefix_names_the_listing() -> None:
    """With --route-prefix reply/{convo}, a listing's replies go under reply/_conversations."""
    r = Router("mem", 1024, route_prefix="reply/{convo}")
    assert r.parse("mem/_conversations/list", b"", "reply/_conversations/x").route is not None
    assert r.parse("mem/_conversations/list", b"", "reply/kiosk").route is None
