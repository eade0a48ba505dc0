"""The transport: the only module that touches aiomqtt and paho internals.

aiomqtt manages the connection; `Connection` takes over its hot path and flow control and
offers the service a narrow interface: publish pre-encoded (`publish_packed`, with
`PackedProperties`), `acknowledge`, `pause_reading`/`resume_reading`, `backlog`, per-topic
callbacks (`on_topic`), and what CONNACK and DISCONNECT said (`broker_receive_max`,
`broker_max_packet`, `taken_over`). Every private attribute it relies on is named in
`PRIVATE_ATTRIBUTES`, which tests/test_transport_guard.py checks against the installed
versions, so an upgrade that moves one fails there and not deep in the hot path.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any, cast

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

Message = paho.MQTTMessage
OnMessage = Callable[[Any, Any, paho.MQTTMessage], None]
PublishPacked = Callable[[str, bytes, int, bool, "PackedProperties"], object]
Acknowledge = Callable[[int, int], object]

# The versions these internals were read from; pyproject.toml pins both ranges.
PINNED = "aiomqtt 2.5, paho-mqtt 2.2"
# (class, attribute): every private attribute of aiomqtt.Client and paho.mqtt.client.Client
# that this module reads, writes or overrides.
PRIVATE_ATTRIBUTES: tuple[tuple[str, str], ...] = (
    ("aiomqtt.Client", "_client"),
    ("aiomqtt.Client", "_loop"),
    ("aiomqtt.Client", "_disconnected"),
    ("aiomqtt.Client", "_misc_task"),
    ("aiomqtt.Client", "_misc_loop"),
    ("aiomqtt.Client", "_on_connect"),
    ("aiomqtt.Client", "_on_disconnect"),
    ("aiomqtt.Client", "_on_publish"),
    ("aiomqtt.Client", "_on_socket_open"),
    ("aiomqtt.Client", "_on_socket_close"),
    ("paho.Client", "_update_inflight"),
    ("paho.Client", "_out_messages"),
    ("paho.Client", "_out_packet"),
    ("paho.Client", "_inflight_messages"),
    ("paho.Client", "_max_inflight_messages"),
    ("paho.Client", "_sock"),
    ("paho.Client", "_sock_recv"),
    ("paho.Client", "_packet_write"),
)

NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
_READ_BURST = 256
_READ_BUFFER = 65536
_SESSION_TAKEN_OVER = 0x8E


class PackedProperties:
    """MQTT 5 PUBLISH properties already encoded: paho only ever calls `pack()` on them,
    and building its Properties object for each reply costs more than the rest of a reply."""

    __slots__ = ("packed",)

    def __init__(self, content_type: str, correlation: bytes | None = None) -> None:
        ct = content_type.encode()
        body = b"\x03" + len(ct).to_bytes(2, "big") + ct
        if correlation is not None:
            body += b"\x09" + len(correlation).to_bytes(2, "big") + correlation
        self.packed = _varint(len(body)) + body

    def pack(self) -> bytes:
        return self.packed

    def __str__(self) -> str:
        return f"[packed properties: {len(self.packed)} bytes]"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = n >> 7, n & 0x7F
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _properties(packet_type: int) -> Properties:
    return Properties(packet_type)  # type: ignore[no-untyped-call]


def connect_properties(session_expiry: int, receive_maximum: int) -> Properties:
    """CONNECT properties: how long the broker keeps our session, how much it may send."""
    props = _properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = session_expiry
    props.ReceiveMaximum = receive_maximum
    return props


def will(topic: str, payload: bytes, content_type: str) -> aiomqtt.Will:
    """A retained QoS 1 Will with its content type."""
    props = _properties(PacketTypes.WILLMESSAGE)
    props.ContentType = content_type
    return aiomqtt.Will(topic, payload, qos=1, retain=True, properties=props)


def subscribe_options(*, no_local: bool) -> SubscribeOptions:
    """QoS 1, retain flag as published, and No Local as asked."""
    return SubscribeOptions(qos=1, retainAsPublished=True, noLocal=no_local)


class Connection(aiomqtt.Client):
    """aiomqtt's client, with the hot path and flow control taken over.

    - Incoming messages go straight to `on_message` (no queue, no task per message).
    - Acknowledgement is manual (paho would PUBACK before the request is stored).
    - Reading the socket can be paused, so a flood waits in the broker, not in our memory.
    - The broker's Receive Maximum (from CONNACK) caps our own in-flight publishes, since
      Mosquitto disconnects a client that exceeds it.
    - Two paho costs are cut: it reads the socket a few bytes per system call (three calls
      per packet), so reads go through a 64 KiB buffer; and it scans every in-flight
      publish on each PUBACK, so the scan is skipped when nothing is queued behind them.

    Args:
        on_message: called on the event loop's thread with paho's (client, userdata, message).
        **kwargs: aiomqtt.Client's arguments.
    """

    def __init__(self, on_message: OnMessage, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        paho_client = self._client
        paho_client.manual_ack_set(True)
        paho_client.on_message = on_message
        # Bound methods, so the hot path pays one call per reply and per acknowledgement.
        self.publish_packed = cast(PublishPacked, paho_client.publish)
        self.acknowledge: Acknowledge = paho_client.ack
        self._fd = -1
        self.paused = False
        self.sendable = asyncio.Event()
        self.sendable.set()
        self._rbuf = b""
        self._rpos = 0
        self.broker_receive_max: int | None = None
        self.broker_max_packet: int | None = None
        self.taken_over = False
        scan = paho_client._update_inflight

        def update_inflight() -> MQTTErrorCode:
            if len(paho_client._out_messages) <= paho_client._inflight_messages:
                return MQTTErrorCode.MQTT_ERR_SUCCESS  # nothing queued to send
            return scan()

        paho_client._update_inflight = update_inflight  # type: ignore[method-assign]

    def _buffered_recv(self, bufsize: int) -> bytes:
        if self.paused:
            # paho reads up to one packet per publish of ours in flight per call, not one:
            # stop it here, or a broker that ignores our Receive Maximum (Mosquitto 2.0.11
            # does) makes a batch larger than the ids each conversation remembers.
            raise BlockingIOError
        data, pos = self._rbuf, self._rpos
        if pos >= len(data):
            sock = self._client._sock
            if sock is None:
                raise ConnectionError("not connected")
            data, pos = sock.recv(_READ_BUFFER), 0  # BlockingIOError: paho waits for more
            self._rbuf = data
        self._rpos = pos + bufsize
        return data[pos : pos + bufsize]

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: Any,
        reason_code: Any,
        properties: Properties | None = None,
    ) -> None:
        receive_max = getattr(properties, "ReceiveMaximum", None) if properties else None
        self.broker_receive_max = receive_max
        self.broker_max_packet = (
            getattr(properties, "MaximumPacketSize", None) if properties else None
        )
        # The public setter refuses once connected; CONNACK is the first moment we know it.
        client._max_inflight_messages = receive_max or 65535
        super()._on_connect(client, userdata, flags, reason_code, properties)

    @property
    def max_inflight(self) -> int:
        """How many of our QoS 1 publishes the broker lets be in flight (its Receive Maximum)."""
        return self._client._max_inflight_messages

    def backlog(self) -> int:
        """Our publishes the broker has not acknowledged, plus packets not yet written."""
        return len(self._client._out_messages) + len(self._client._out_packet)

    def backlog_limit(self) -> int:
        # Past what the broker lets be in flight, paho queues our publishes and scans the
        # queue on every PUBACK: keep that queue short.
        return max(256, 2 * self._client._max_inflight_messages)

    def _on_publish(
        self, client: paho.Client, userdata: Any, mid: int, reason_code: Any, properties: Any
    ) -> None:
        super()._on_publish(client, userdata, mid, reason_code, properties)
        if not self.sendable.is_set() and self.backlog() <= self.backlog_limit() // 2:
            self.sendable.set()

    def _tls_recv(self, bufsize: int) -> bytes:
        if self.paused:
            raise BlockingIOError  # as in _buffered_recv
        return paho.Client._sock_recv(self._client, bufsize)

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        # paho calls this from the executor thread that runs connect().
        def start() -> None:
            self._fd = sock.fileno()
            self.paused = False
            self._rbuf, self._rpos = b"", 0
            if type(sock) is socket.socket:  # TLS sockets keep their own buffer
                client._sock_recv = self._buffered_recv  # type: ignore[method-assign]
            else:
                client._sock_recv = self._tls_recv  # type: ignore[method-assign]
            self._loop.add_reader(self._fd, self._read)
            self._misc_task = self._loop.create_task(self._misc_loop())

        self._loop.call_soon_threadsafe(start)

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: Any,
        reason_code: Any,
        properties: Properties | None = None,
    ) -> None:
        self.taken_over = getattr(reason_code, "value", None) == _SESSION_TAKEN_OVER
        super()._on_disconnect(client, userdata, flags, reason_code, properties)

    def _on_socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._fd = -1
        super()._on_socket_close(client, userdata, sock)

    def _read(self) -> None:
        client = self._client
        try:
            for _ in range(_READ_BURST):
                client.loop_read()
                sock = client._sock
                if self.paused or sock is None:
                    break
                pending = getattr(sock, "pending", None)
                if pending is not None:  # TLS: only bytes already decrypted can be counted
                    if not pending():
                        break
                elif self._rpos >= len(self._rbuf):
                    break  # the buffer took all the socket had; epoll says when there is more
        except Exception as exc:  # paho raises OSError subclasses on a broken socket
            if not self._disconnected.done():
                self._disconnected.set_exception(exc)

    def flush(self) -> None:
        """Write what paho has queued, now rather than on the next writable event.

        Errors and what is left are the writer callback's, which stays registered: paho's
        loop_write would also (un)register it, through callbacks that run later.
        """
        self._client._packet_write()

    def pause_reading(self) -> None:
        if not self.paused and self._fd >= 0:
            self.paused = True
            self._loop.remove_reader(self._fd)

    def resume_reading(self) -> None:
        if self.paused and self._fd >= 0:
            self.paused = False
            self._loop.add_reader(self._fd, self._read)
            pending = getattr(self._client._sock, "pending", None)
            if self._rpos < len(self._rbuf) or (pending is not None and pending()):
                self._loop.call_soon(self._read)  # buffered bytes wake no epoll

    async def wait_disconnected(self) -> None:
        await asyncio.shield(self._disconnected)

    def on_topic(self, topic: str, callback: Callable[[paho.MQTTMessage], None]) -> None:
        """Hand messages on `topic` to `callback` instead of `on_message` (they still need
        `acknowledge`)."""
        self._client.message_callback_add(topic, lambda _c, _u, msg: callback(msg))

    def off_topic(self, topic: str) -> None:
        """Undo `on_topic`."""
        self._client.message_callback_remove(topic)
