"""worker/packets.py reads and writes PUBLISH and PUBACK exactly as paho does, byte for byte.

paho is the reference here: its encoder (Client._send_publish) and its decoder
(paho.mqtt._packet.decode_publish) are the code the lean path replaces, so these tests also
fail loudly if either moves in a paho upgrade.
"""

from __future__ import annotations

import socket
from typing import Any

import paho.mqtt.client as paho
import pytest
from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt import _packet
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from worker import packets

topics = st.text(st.characters(exclude_categories=["Cs"]), max_size=300)
payloads = st.binary(max_size=70_000)
optional_bytes = st.none() | st.binary(max_size=300)


def paho_publish(
    topic: str,
    payload: bytes,
    qos: int,
    retain: bool,
    mid: int,
    props: Properties | None,
    protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv5,
) -> bytes:
    """The PUBLISH packet paho itself would write."""
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=protocol)
    left, right = socket.socketpair()  # _send_publish needs "connected"; nothing is sent
    client._sock = left
    client.on_socket_register_write = lambda *_: None  # queue the packet, do not write it
    try:
        client._send_publish(mid, topic.encode(), payload, qos, retain, False, None, props)
        packet: bytes = bytes(client._out_packet.popleft()["packet"])
    finally:
        client._sock = None
        left.close()
        right.close()
    return packet


def paho_decode(packet: bytes) -> Any:
    start, end = packets.frame(packet, 0)
    assert end == len(packet)
    return _packet.decode_publish(packet[0], packet[start:end], MQTTProtocolVersion.MQTTv5)


def read_back(packet: bytes, v5: bool = True) -> packets.Incoming:
    start, end = packets.frame(packet, 0)
    return packets.decode_publish(packet[0], packet, start, end, v5)


def fields(msg: packets.Incoming) -> tuple[str, bytes, int, bool, int]:
    return (msg.topic, msg.payload, msg.qos, msg.retain, msg.mid)


@given(topics, payloads, st.sampled_from([0, 1]), st.booleans(), optional_bytes)
def test_publish_encodes_as_paho_does(
    topic: str, payload: bytes, qos: int, retain: bool, correlation: bytes | None
) -> None:
    """Our PUBLISH is byte for byte the one paho writes for the same message."""
    mid = 4242 if qos else 0
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.ContentType = "application/msgpack"
    if correlation is not None:
        props.CorrelationData = correlation
    ours = packets.encode_publish(
        topic.encode(),
        payload,
        qos,
        retain,
        mid,
        packets.properties("application/msgpack", correlation),
    )
    assert ours == paho_publish(topic, payload, qos, retain, mid, props)
    theirs = paho_decode(ours)
    assert (theirs.topic, theirs.payload, theirs.qos, theirs.mid) == (
        topic.encode(),
        payload,
        qos,
        mid,
    )


@given(topics, st.text(max_size=200), st.binary(max_size=300))
def test_request_properties_encode_as_paho_does(
    topic: str, response: str, correlation: bytes
) -> None:
    """A client's request (Response Topic, Correlation Data) is the PUBLISH paho writes."""
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.ResponseTopic = response
    props.CorrelationData = correlation
    ours = packets.PublishProperties(response_topic=response)(correlation)
    packet = packets.encode_publish(topic.encode(), b"{}", 1, False, 9, ours)
    assert packet == paho_publish(topic, b"{}", 1, False, 9, props)


@given(topics, payloads, st.sampled_from([0, 1]), st.booleans())
def test_mqtt311_publish_both_ways_as_paho(
    topic: str, payload: bytes, qos: int, retain: bool
) -> None:
    """MQTT 3.1.1 (the client's protocol=3): no properties; written as paho writes it, and
    read back."""
    mid = 513 if qos else 0
    ours = packets.encode_publish(topic.encode(), payload, qos, retain, mid, b"")
    assert ours == paho_publish(
        topic, payload, qos, retain, mid, None, MQTTProtocolVersion.MQTTv311
    )
    msg = read_back(ours, v5=False)
    assert fields(msg) == (topic, payload, qos, retain, mid)
    assert (msg.response_topic, msg.correlation) == (None, None)


@given(
    topics,
    payloads,
    st.sampled_from([0, 1]),
    st.booleans(),
    st.none() | st.text(max_size=200),
    optional_bytes,
    st.lists(st.tuples(st.text(max_size=20), st.text(max_size=20)), max_size=4),
    st.none() | st.integers(0, 2**32 - 1),
    st.none() | st.integers(1, 2**28 - 1),
)
def test_publish_decodes_what_paho_encodes(
    topic: str,
    payload: bytes,
    qos: int,
    retain: bool,
    response: str | None,
    correlation: bytes | None,
    user: list[tuple[str, str]],
    expiry: int | None,
    subscription: int | None,
) -> None:
    """Every property a broker may put on a PUBLISH is read past; the route and the
    correlation come out as paho reads them."""
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.PayloadFormatIndicator = 1
    props.ContentType = "application/msgpack"
    if response is not None:
        props.ResponseTopic = response
    if correlation is not None:
        props.CorrelationData = correlation
    if user:
        props.UserProperty = user
    if expiry is not None:
        props.MessageExpiryInterval = expiry
    if subscription is not None:
        props.SubscriptionIdentifier = subscription
    mid = 65535 if qos else 0
    packet = paho_publish(topic, payload, qos, retain, mid, props)
    msg = read_back(packet)
    assert fields(msg) == (topic, payload, qos, retain, mid)
    assert msg.response_topic == response
    assert msg.correlation == correlation


def test_a_packet_split_anywhere_is_framed_only_when_whole() -> None:
    """The framer waits for the rest of a packet, whatever byte the socket stopped at."""
    packet = packets.encode_publish(b"mem/c/append", b"x" * 300, 1, False, 7, b"\x00")
    two = packet + packets.puback(7)
    for cut in range(len(two)):
        start, end = packets.frame(two[:cut], 0)
        assert (start, end) == ((-1, -1) if cut < len(packet) else (3, len(packet)))
    assert packets.frame(two, len(packet)) == (len(packet) + 2, len(two))


def test_puback_and_duplicate_are_as_mqtt_says() -> None:
    """PUBACK is type 4 with the packet id; a duplicate differs only in its DUP flag."""
    assert packets.puback(0x1234) == b"\x40\x02\x12\x34"
    packet = packets.encode_publish(b"t", b"p", 1, True, 9, b"\x00")
    again = packets.as_duplicate(packet)
    assert again[0] == packet[0] | 0x08
    assert again[1:] == packet[1:]
    assert paho_decode(again).dup


def test_a_response_topic_that_is_not_utf8_is_no_route() -> None:
    """Bad UTF-8 in the Response Topic yields a route that no route check accepts."""
    body = b"\x00\x01t" + b"\x05\x08\x00\x02\xff\xfe" + b"payload"
    packet = b"\x30" + bytes((len(body),)) + body
    msg = packets.decode_publish(packet[0], packet, 2, len(packet))
    assert msg.response_topic == packets.BAD_ROUTE
    assert msg.payload == b"payload"


@pytest.mark.parametrize(
    "body",
    [
        b"\x00\x05ab",  # topic longer than the packet
        b"\x00\x01t\x03\x2a\x00\x00",  # a property no PUBLISH may carry
        b"\x00\x01t\x09\x08\x00\x02ab",  # properties longer than said
    ],
)
def test_malformed_publish_is_refused(body: bytes) -> None:
    """A PUBLISH whose fields do not add up raises MalformedPacket, never a wrong message."""
    packet = b"\x30" + bytes((len(body),)) + body
    with pytest.raises(packets.MalformedPacket):
        packets.decode_publish(packet[0], packet, 2, len(packet))


@given(topics, st.integers(0, 300_000), optional_bytes, st.integers(-4, 4) | st.integers())
def test_oversize_says_whether_the_packet_is_over_a_limit(
    topic: str, size: int, correlation: bytes | None, off: int
) -> None:
    payload = bytes(size)
    props = packets.properties("application/msgpack", correlation)
    packet = packets.encode_publish(topic.encode(), payload, 1, False, 1, props)
    limit = max(1, len(packet) + off)  # near the packet's size, or anywhere
    over = packets.oversize(topic, payload, props, limit)
    if len(packet) > limit:  # never one the broker would refuse
        assert over is not None
        assert over >= len(packet)
    if over is not None:  # the header at its largest: a few bytes of margin at most
        assert over > limit
        assert over - len(packet) <= 3
    assert packets.oversize(topic, payload, props, None) is None


def test_varint_round_trips_at_every_width() -> None:
    """Remaining lengths of one to four bytes decode to what was encoded."""
    for n in (0, 127, 128, 16_383, 16_384, 2_097_151, 2_097_152, 268_435_455):
        encoded = packets.varint(n)
        assert packets.read_varint(encoded, 0) == (n, len(encoded))
        assert packets.read_varint(encoded[:-1], 0) == (-1, 0)


def test_acknowledgements_read_as_paho_writes_their_properties() -> None:
    """decode_ack reads a CONNACK's Maximum Packet Size and Server Keep Alive among other
    properties (a user property and a reason string too), a SUBACK's and a refusing
    PUBACK's reason code, and a Success PUBACK of two bytes."""
    props = Properties(PacketTypes.CONNACK)  # type: ignore[no-untyped-call]
    props.UserProperty = ("k", "v")
    props.MaximumPacketSize = 4096
    props.ReasonString = "fine"
    props.ServerKeepAlive = 7
    props.AssignedClientIdentifier = "x"
    packed = props.pack()  # type: ignore[no-untyped-call]
    connack = bytes((0x20,)) + packets.varint(2 + len(packed)) + b"\x00\x00" + packed
    start, end = packets.frame(connack, 0)
    ack = packets.decode_ack(connack[0], connack, start, end)
    assert (ack.reason, ack.max_packet, ack.keepalive, ack.reason_string) == (0, 4096, 7, "fine")
    refused = b"\x20\x03\x00\x86\x00"
    assert packets.decode_ack(0x20, refused, 2, 5).reason == 0x86
    assert packets.decode_ack(0x90, b"\x90\x04\x00\x05\x00\x87", 2, 6).reason == 0x87
    puback = packets.decode_ack(0x40, b"\x40\x03\x01\x02\x87", 2, 5)
    assert (puback.mid, puback.reason) == (0x102, 0x87)
    assert packets.decode_ack(0x40, b"\x40\x02\x01\x02", 2, 4).reason == 0
    with pytest.raises(packets.MalformedPacket):
        packets.decode_ack(0x20, b"\x20\x04\x00\x00\x05\x27", 2, 6)


def test_connect_and_subscribe_are_what_paho_sends() -> None:
    """A CONNECT with a login and Clean Start, and a SUBSCRIBE of one filter, byte for byte
    as paho writes them (with no properties)."""
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id="memory-client-t-1",
        protocol=MQTTProtocolVersion.MQTTv5,
    )
    client.username_pw_set("kiosk", "secret")
    left, right = socket.socketpair()  # "connected"; nothing is sent
    client._sock = left
    client.on_socket_register_write = lambda *_: None  # queue the packets, do not write them
    try:
        client._send_connect(30)
        client._send_subscribe(False, [(b"reply/kiosk/t-1", SubscribeOptions(qos=0))])
        sent = b"".join(bytes(p["packet"]) for p in client._out_packet)
    finally:
        client._sock = None
        left.close()
        right.close()
    mine = packets.encode_connect("memory-client-t-1", 30, "kiosk", "secret")
    mine += packets.encode_subscribe(1, "reply/kiosk/t-1", 0)
    assert sent == mine
