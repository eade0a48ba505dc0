"""The MQTT packets of the hot path, as bytes: PUBLISH both ways, PUBACK both ways (MQTT 5,
and 3.1.1 for the client's `protocol=3`).

Pure functions and value types, no sockets. worker/mqtt.py uses them instead of paho's
codec for these four packets, which carry every request and reply: paho turns each PUBLISH
into a message object with a Properties object, and each PUBACK into a ReasonCode and a
Properties object, which cost most of a request. For `Connection` everything else (CONNECT,
SUBSCRIBE, PINGREQ, ...) stays paho's; `BlockingConnection`, which has no paho, takes
CONNECT, SUBSCRIBE and their acknowledgements from here too.
"""

from __future__ import annotations

PUBLISH = 0x30
PUBACK = 0x40
_DUP = 0x08

# Property identifier -> how its value is laid out (MQTT 5, 2.2.2.2), for the properties a
# PUBLISH may carry; "s" a 2-byte length and bytes, "p" two of those, "v" a varint.
_FIXED = {0x01: 1, 0x02: 4, 0x23: 2}
_RESPONSE_TOPIC = 0x08
_CORRELATION_DATA = 0x09
_CONTENT_TYPE = 0x03
_USER_PROPERTY = 0x26
_SUBSCRIPTION_ID = 0x0B
# A Response Topic that is not UTF-8 becomes this, which no route check accepts.
BAD_ROUTE = "\x00"


class MalformedPacket(ValueError):
    """The broker sent bytes that are not a valid packet."""


class Incoming:
    """A PUBLISH from the broker: what the worker reads of it, nothing more."""

    __slots__ = ("correlation", "mid", "payload", "qos", "response_topic", "retain", "topic")

    def __init__(
        self,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        mid: int,
        response_topic: str | None,
        correlation: bytes | None,
    ) -> None:
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.mid = mid
        self.response_topic = response_topic
        self.correlation = correlation


def varint(n: int) -> bytes:
    """MQTT's Variable Byte Integer."""
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while True:
        n, digit = n >> 7, n & 0x7F
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """(value, position after it); (-1, pos) when `buf` ends inside it."""
    value = shift = 0
    for i in range(pos, min(pos + 4, len(buf))):
        byte = buf[i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i + 1
        shift += 7
    if len(buf) - pos >= 4:
        raise MalformedPacket("remaining length over four bytes")
    return -1, pos


def frame(buf: bytes, pos: int) -> tuple[int, int]:
    """(start of the packet's body, end of the packet) for the packet at `pos`, or (-1, -1)
    when `buf` does not hold all of it yet."""
    if pos + 2 > len(buf):
        return -1, -1
    length = buf[pos + 1]
    if length < 0x80:
        end = pos + 2 + length
        return (pos + 2, end) if end <= len(buf) else (-1, -1)
    length, start = read_varint(buf, pos + 1)
    if length < 0 or start + length > len(buf):
        return -1, -1
    return start, start + length


def length(buf: bytes) -> int:
    """The whole length of the packet `buf` starts with, or 0 while its header is not in."""
    if len(buf) < 2:
        return 0
    n, start = read_varint(buf, 1)
    return start + n if n >= 0 else 0


def decode_publish(first: int, buf: bytes, start: int, end: int, v5: bool = True) -> Incoming:
    """The PUBLISH whose fixed header byte is `first` and whose body is buf[start:end]; an
    MQTT 3.1.1 one (no properties) when not `v5`."""
    response: str | None = None
    correlation: bytes | None = None
    try:
        p = start + 2 + ((buf[start] << 8) | buf[start + 1])
        raw_topic = buf[start + 2 : p]
        qos = (first >> 1) & 3
        mid = 0
        if qos:
            mid = (buf[p] << 8) | buf[p + 1]
            p += 2
        if v5:
            plen = buf[p]
            if plen < 0x80:
                p += 1
            else:
                plen, p = read_varint(buf, p)
        else:
            plen = 0
        pend = p + plen
        while p < pend:
            pid = buf[p]
            p += 1
            if pid in _FIXED:
                p += _FIXED[pid]
            elif pid == _SUBSCRIPTION_ID:
                _, p = read_varint(buf, p)
            else:
                n = (buf[p] << 8) | buf[p + 1]
                value = buf[p + 2 : p + 2 + n]
                p += 2 + n
                if pid == _RESPONSE_TOPIC:
                    try:
                        response = value.decode()
                    except UnicodeDecodeError:
                        response = BAD_ROUTE
                elif pid == _CORRELATION_DATA:
                    correlation = value
                elif pid == _USER_PROPERTY:
                    p += 2 + ((buf[p] << 8) | buf[p + 1])
                elif pid != _CONTENT_TYPE:
                    raise MalformedPacket(f"property {pid:#x} in a PUBLISH")
    except IndexError as exc:
        raise MalformedPacket("PUBLISH shorter than its fields") from exc
    if p != pend or pend > end or qos == 3:
        raise MalformedPacket("PUBLISH properties do not add up")
    try:
        topic = raw_topic.decode()
    except UnicodeDecodeError:
        topic = ""  # no operation matches it; Mosquitto does not forward such a topic anyway
    return Incoming(topic, buf[pend:end], qos, bool(first & 1), mid, response, correlation)


def _string(pid: int, value: str) -> bytes:
    raw = value.encode()
    return bytes((pid,)) + len(raw).to_bytes(2, "big") + raw


class PublishProperties:
    """PUBLISH properties (length first) with a Content Type (a reply's, an event's) or a
    Response Topic (a request's), encoded once; called with a Correlation Data, it appends
    that alone."""

    __slots__ = ("_body", "plain")

    def __init__(self, content_type: str | None = None, response_topic: str | None = None) -> None:
        self._body = b""
        if content_type is not None:
            self._body += _string(_CONTENT_TYPE, content_type)
        if response_topic is not None:
            self._body += _string(_RESPONSE_TOPIC, response_topic)
        self.plain = varint(len(self._body)) + self._body

    def __call__(self, correlation: bytes | None = None) -> bytes:
        if correlation is None:
            return self.plain
        body = self._body + b"\x09" + len(correlation).to_bytes(2, "big") + correlation
        return varint(len(body)) + body


# The worker's name for it: what its replies and events carry.
ReplyProperties = PublishProperties


def properties(content_type: str, correlation: bytes | None = None) -> bytes:
    """PUBLISH properties (length first): Content Type, and Correlation Data if given."""
    return PublishProperties(content_type)(correlation)


def encode_publish(
    topic: bytes, payload: bytes, qos: int, retain: bool, mid: int, props: bytes
) -> bytes:
    """A PUBLISH packet; `props` as `properties` makes them, `mid` unused at QoS 0."""
    head = len(topic).to_bytes(2, "big") + topic
    if qos:
        head += mid.to_bytes(2, "big")
    length = len(head) + len(props) + len(payload)
    first = PUBLISH | (qos << 1) | retain
    if length < 0x80:
        return b"".join((bytes((first, length)), head, props, payload))
    return b"".join((bytes((first,)), varint(length), head, props, payload))


_PUBLISH_HEAD = 9  # at most: first byte, remaining length (4), topic length (2), id (2)


def oversize(topic: str, payload: bytes, props: bytes, limit: int | None) -> int | None:
    """The size of a PUBLISH of these (its header counted at its largest) when it is over
    `limit`, the broker's Maximum Packet Size: past it the broker ends the connection.
    None when it fits, or the broker set no limit. (4 bytes a character bound the topic's
    UTF-8: it is encoded only near the limit.)"""
    if limit is None:
        return None
    rest = len(payload) + len(props) + _PUBLISH_HEAD
    if rest + 4 * len(topic) <= limit:
        return None
    size = rest + len(topic.encode())
    return size if size > limit else None


def as_duplicate(packet: bytes) -> bytes:
    """The same PUBLISH, sent again (DUP flag set)."""
    return bytes((packet[0] | _DUP,)) + packet[1:]


def puback(mid: int) -> bytes:
    """A PUBACK with reason Success (MQTT 5 lets the reason code be left out then)."""
    return bytes((PUBACK, 2, mid >> 8, mid & 0xFF))


# -- the rest of a blocking client connection's life (worker/mqtt.py's BlockingConnection):
# it has no paho to make and read these.

CONNACK = 0x20
SUBACK = 0x90
DISCONNECT = 0xE0
PINGREQ_PACKET = b"\xc0\x00"
DISCONNECT_PACKET = b"\xe0\x00"
_MAXIMUM_PACKET_SIZE = 0x27
_SERVER_KEEP_ALIVE = 0x13
_REASON_STRING = 0x1F
# CONNACK and DISCONNECT properties by layout (MQTT 5, 2.2.2.2): 1, 2 or 4 bytes, else a
# length-prefixed string or binary; a user property is two of those.
_WIDTH = {
    **dict.fromkeys((0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A), 1),
    **dict.fromkeys((0x13, 0x21, 0x22, 0x23), 2),
    **dict.fromkeys((0x02, 0x11, 0x18, 0x27), 4),
}


def _utf8(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return len(raw).to_bytes(2, "big") + raw


def _packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + varint(len(body)) + body


def encode_connect(
    client_id: str,
    keepalive: int,
    username: str | None = None,
    password: str | None = None,
    v5: bool = True,
) -> bytes:
    """A CONNECT with Clean Start (a session that ends with the connection) and no will."""
    flags = 0x02 | (0x80 if username is not None else 0) | (0x40 if password is not None else 0)
    body = _utf8("MQTT") + bytes((5 if v5 else 4, flags)) + keepalive.to_bytes(2, "big")
    if v5:
        body += b"\x00"
    body += _utf8(client_id)
    if username is not None:
        body += _utf8(username)
    if password is not None:
        body += _utf8(password)
    return _packet(0x10, body)


def encode_subscribe(mid: int, topic_filter: str, qos: int, v5: bool = True) -> bytes:
    """A SUBSCRIBE of one filter."""
    return _packet(
        0x82,
        mid.to_bytes(2, "big") + (b"\x00" if v5 else b"") + _utf8(topic_filter) + bytes((qos,)),
    )


class Ack:
    """A CONNACK, SUBACK, PUBACK or DISCONNECT: its reason code, the Server Keep Alive the
    blocking connection obeys, and the Maximum Packet Size and reason string a broker may add."""

    __slots__ = ("keepalive", "max_packet", "mid", "reason", "reason_string")

    def __init__(self) -> None:
        self.mid = 0
        self.reason = 0
        self.max_packet: int | None = None
        self.keepalive: int | None = None
        self.reason_string: str | None = None


def _read_properties(ack: Ack, buf: bytes, p: int, end: int) -> int:
    plen, p = read_varint(buf, p)
    pend = p + plen
    if plen < 0 or pend > end:
        raise MalformedPacket("properties past the packet's end")
    while p < pend:
        pid = buf[p]
        p += 1
        width = _WIDTH.get(pid)
        if width is not None:
            value = int.from_bytes(buf[p : p + width], "big")
            p += width
            if pid == _MAXIMUM_PACKET_SIZE:
                ack.max_packet = value
            elif pid == _SERVER_KEEP_ALIVE:
                ack.keepalive = value
        elif pid == _SUBSCRIPTION_ID:
            _, p = read_varint(buf, p)
        else:
            n = (buf[p] << 8) | buf[p + 1]
            if pid == _REASON_STRING:
                ack.reason_string = buf[p + 2 : p + 2 + n].decode(errors="replace")
            p += 2 + n
            if pid == _USER_PROPERTY:
                p += 2 + ((buf[p] << 8) | buf[p + 1])
    if p != pend:
        raise MalformedPacket("properties do not add up")
    return p


def decode_ack(first: int, buf: bytes, start: int, end: int, v5: bool = True) -> Ack:
    """The CONNACK, SUBACK (its first reason code: one filter per SUBSCRIBE), PUBACK or
    DISCONNECT whose body is buf[start:end]. MQTT 5 may leave out a PUBACK's or
    DISCONNECT's reason (Success) and properties."""
    ack = Ack()
    kind = first & 0xF0
    try:
        p = start
        if kind == CONNACK:
            ack.reason = buf[p + 1]
            p += 2
        elif kind in (SUBACK, PUBACK):
            ack.mid = (buf[p] << 8) | buf[p + 1]
            p += 2
        if kind == SUBACK:
            if v5:
                p = _read_properties(ack, buf, p, end)
            ack.reason = buf[p]
        elif v5 and p < end:
            if kind != CONNACK:
                ack.reason = buf[p]
                p += 1
            if p < end:
                _read_properties(ack, buf, p, end)
    except IndexError as exc:
        raise MalformedPacket("acknowledgement shorter than its fields") from exc
    return ack
