"""The transport: the only module that touches aiomqtt and paho internals.

aiomqtt keeps the connection (CONNECT, SUBSCRIBE, keepalive, reconnect, its public API);
`Connection` takes the hot path from paho: it reads the socket itself, decodes PUBLISH and
PUBACK with worker/packets.py and hands every other packet to paho, and it writes our
PUBLISH and PUBACK packets itself, one socket write per batch. The service sees a narrow
interface: `publish_packed`, `acknowledge`, `flush`, `pause_reading`/`resume_reading`,
`backlog`, per-topic callbacks (`on_topic`), and what CONNACK and DISCONNECT said
(`broker_receive_max`, `broker_max_packet`, `taken_over`). Every private attribute it relies
on is named in `PRIVATE_ATTRIBUTES`, which tests/test_transport_guard.py checks against the
installed versions, so an upgrade that moves one fails there and not deep in the hot path.

`BlockingConnection` is the other kind of connection here: a blocking socket a thread
writes and reads itself (the blocking client's), all its packets worker/packets.py's.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import ssl
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any, Final, Self

import aiomqtt
import paho.mqtt.client as paho
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from worker import packets
from worker.constants import KEEPALIVE
from worker.packets import PUBACK, PUBLISH, Incoming

_log = logging.getLogger(__name__)

Message = Incoming
OnMessage = Callable[[Incoming], None]
# (message id, the broker's reason): a QoS 1 publish of ours the broker refused.
OnRefused = Callable[[int, str], None]

# The versions these internals were read from; pyproject.toml pins both ranges.
PINNED = "aiomqtt 2.5, paho-mqtt 2.2"
# (class, attribute): every private attribute of aiomqtt.Client and paho.mqtt.client.Client
# that this module reads, writes or overrides.
PRIVATE_ATTRIBUTES: tuple[tuple[str, str], ...] = (
    ("aiomqtt.Client", "_client"),
    ("aiomqtt.Client", "_loop"),
    ("aiomqtt.Client", "_connected"),
    ("aiomqtt.Client", "_disconnected"),
    ("aiomqtt.Client", "_misc_task"),
    ("aiomqtt.Client", "_misc_loop"),
    ("aiomqtt.Client", "_on_connect"),
    ("aiomqtt.Client", "_on_disconnect"),
    ("aiomqtt.Client", "_on_socket_open"),
    ("aiomqtt.Client", "_on_socket_close"),
    ("aiomqtt.Client", "_on_socket_register_write"),
    ("aiomqtt.Client", "_on_subscribe"),
    ("aiomqtt.Client", "_on_unsubscribe"),
    ("aiomqtt.Client", "_pending_subscribes"),
    ("aiomqtt.Client", "_pending_unsubscribes"),
    ("paho.Client", "_out_messages"),
    ("paho.Client", "_out_packet"),
    ("paho.Client", "_max_inflight_messages"),
    ("paho.Client", "_mid_generate"),
    ("paho.Client", "_sock"),
    ("paho.Client", "_sock_recv"),
    ("paho.Client", "_sock_close"),
    ("paho.Client", "_call_socket_register_write"),
    ("paho.Client", "_last_msg_out"),
    ("paho.Client", "_last_bytes_received"),
    ("paho.Client", "_ssl_wrap_socket"),
    ("paho.Client", "_ssl_context"),
    ("paho.Client", "_host"),
    ("paho.Client", "_connect_timeout"),
)

NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
_READ_BUFFER = 65536
_SESSION_TAKEN_OVER = 0x8E
# Of the broker's Receive Maximum, what paho keeps for its own QoS 1 publishes (status,
# discovery, probes); the hot path has the rest.
_PAHO_INFLIGHT = 16
_TLS_RECORDS = 64  # TLS records read per readable event, beyond the first
_LOGIN_REFUSED = (0x86, 0x87)  # CONNACK: bad user name or password; not authorized
_UNSPECIFIED = 0x80


def _code(exc: Exception) -> int | None:
    rc = getattr(exc, "rc", None)
    return getattr(rc, "value", rc)


def login_refused(exc: Exception) -> bool:
    """Whether `exc` is the broker's CONNACK refusing our user name or password."""
    return isinstance(exc, MqttConnectError) and _code(exc) in _LOGIN_REFUSED


def certificate_refused(exc: BaseException) -> bool:
    """Whether connecting failed on the broker's certificate (aiomqtt keeps only the text)."""
    return "CERTIFICATE_VERIFY_FAILED" in str(exc) or isinstance(exc, ssl.SSLCertVerificationError)


def closed_by_broker(exc: Exception) -> bool:
    """Whether `exc` is paho's "Unspecified error" for a connection the broker closed
    without a DISCONNECT packet (as Mosquitto does when it stops)."""
    return (
        isinstance(exc, aiomqtt.MqttCodeError)
        and not isinstance(exc, MqttConnectError)
        and _code(exc) == _UNSPECIFIED
    )


class PackedProperties:
    """MQTT 5 PUBLISH properties already encoded, for paho's own (awaited) publishes:
    paho only ever calls `pack()` on them."""

    __slots__ = ("packed",)

    def __init__(self, content_type: str, correlation: bytes | None = None) -> None:
        self.packed = packets.properties(content_type, correlation)

    def pack(self) -> bytes:
        return self.packed

    def __str__(self) -> str:
        return f"[packed properties: {len(self.packed)} bytes]"


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


# MQTT 3.1.1's one refusal code (0x80) says no more; paho reads it as MQTT 5's 0x80.
V3_FAILURE: Final = "Failure (MQTT 3.1.1 says no reason)"


def refusal(reason_codes: Sequence[Any], v5: bool = True) -> str | None:
    """The broker's reason ("Not authorized", ...) when a SUBACK refused a subscription, or
    None: what aiomqtt's `subscribe` returns, paho's reason codes for MQTT 5 and 3.1.1 alike."""
    for code in reason_codes:
        if getattr(code, "is_failure", False):
            return str(code) if v5 else V3_FAILURE
    return None


def persistent(
    on_message: OnMessage,
    *,
    host: str,
    port: int,
    client_id: str,
    username: str | None,
    password: str | None,
    session_expiry: int,
    receive_maximum: int,
    tls: ssl.SSLContext | None,
    last_will: aiomqtt.Will | None = None,
    on_read: Callable[[], None] | None = None,
) -> Connection:
    """A Connection that keeps its MQTT 5 session (and the messages the broker queues for it)
    across reconnections, as the worker and memory-summarizer both need."""
    return Connection(
        on_message,
        on_read=on_read,
        hostname=host,
        port=port,
        identifier=client_id,
        username=username,
        password=password,
        protocol=aiomqtt.ProtocolVersion.V5,
        clean_start=False,
        properties=connect_properties(session_expiry, receive_maximum),
        will=last_will,
        keepalive=KEEPALIVE,
        socket_options=[NODELAY],
        tls_context=tls,
    )


def subscribe_options(*, no_local: bool) -> SubscribeOptions:
    """QoS 1, retain flag as published, and No Local as asked."""
    return SubscribeOptions(qos=1, retainAsPublished=True, noLocal=no_local)


def _still_open(client: paho.Client, sock: Any) -> bool:
    """Whether `sock` is still the client's open socket (from the loop, after paho's thread
    handed it over: an open cancelled meanwhile closed it, and paho, reading its socket
    after the close, may hand over None)."""
    return bool(sock is not None and sock.fileno() >= 0 and client.socket() is sock)


class Connection(aiomqtt.Client):
    """aiomqtt's client, with the hot path and flow control taken over.

    - Incoming PUBLISH packets are decoded here and go straight to `on_message` as
      `Incoming` values (no paho message, no queue, no task per message); acknowledgement is
      manual (`acknowledge`), since paho would PUBACK before the request is stored.
    - Our replies and events are encoded here and written with the acknowledgements in one
      socket write per batch (`flush`, also scheduled on its own at the end of the loop's
      turn). QoS 1 ones stay until the broker's PUBACK, are sent again (DUP) after a
      reconnection, and never exceed the broker's Receive Maximum, since a broker may
      disconnect a client that does (MQTT 5, 4.9; Mosquitto 2.0.11 does not): past it they
      wait here.
    - Reading the socket can be paused, so a flood waits in the broker, not in our memory.

    paho still reads (from our buffer, one packet at a time) and writes every other packet,
    so CONNECT, SUBSCRIBE, keepalive and aiomqtt's awaited publishes work as ever.

    It speaks MQTT 3.1.1 too (`protocol`), for the client's `protocol=3`: no properties.

    Args:
        on_message: called on the event loop's thread with each PUBLISH.
        on_refused: called with the message id and the broker's reason when an MQTT 5 broker
            refuses a QoS 1 publish of `publish_packed` (its PUBACK's reason code).
        flush_after_read: write what `on_message` queued as soon as the read is handled,
            rather than on the event loop's next turn (the client: a reply's acknowledgement
            and the request its task sends next leave in the read that brought the reply).
        on_read: called once a read's PUBLISH packets have all gone to `on_message` (the
            worker serves them as one batch, in the read's own turn when it can).
        **kwargs: aiomqtt.Client's arguments.
    """

    def __init__(
        self,
        on_message: OnMessage,
        *,
        on_refused: OnRefused | None = None,
        flush_after_read: bool = False,
        on_read: Callable[[], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._on_read = on_read
        self._flush_after_read = flush_after_read
        self._in_read = False
        self._last_of_read = False  # on_message has the read's last packet (flush_after_read)
        self._held = False  # hold_writes(): the caller flushes
        self._v5 = kwargs.get("protocol") == aiomqtt.ProtocolVersion.V5
        self._on_refused = on_refused
        paho_client = self._client
        paho_client.manual_ack_set(True)
        paho_client._sock_recv = self._feed_recv  # type: ignore[method-assign]
        write = paho_client.loop_write

        def loop_write() -> MQTTErrorCode:  # aiomqtt's writer callback calls this
            try:
                return write()
            finally:
                if not self.written.is_set() and not self._unwritten():
                    self.written.set()

        paho_client.loop_write = loop_write  # type: ignore[method-assign]
        tls = kwargs.get("tls_context")
        if tls is not None and tls.check_hostname:  # else paho checks the name: its own wrap
            paho_client._ssl_wrap_socket = self._ssl_wrap  # type: ignore[method-assign]
        self._on_message_cb = on_message
        self._topic_callbacks: dict[str, Callable[[Incoming], None]] = {}
        self._fd = -1
        self.paused = False
        self.sendable = asyncio.Event()
        self.sendable.set()
        # Set while nothing of ours waits behind paho's writer: all we queued is in the kernel.
        self.written = asyncio.Event()
        self.written.set()
        self._rbuf = b""  # bytes read and not yet handled: the start of a packet at most
        self._need = 0  # the length of that packet, once its header is in
        self._chunks: list[bytes] = []  # the rest of a large packet, joined once it is whole
        self._chunked = 0
        self._feed = b""  # the one packet paho is reading
        self._feed_pos = 0
        self._feed_eof = False
        self._online = False  # between an accepted CONNACK and the socket's close
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._inflight: dict[int, bytes] = {}  # mid -> our QoS 1 PUBLISH awaiting its PUBACK
        self._acked: dict[int, asyncio.Future[str | None]] = {}  # publish_acked()'s waiting
        self._waiting: collections.deque[tuple[int, bytes]] = collections.deque()
        self.unacked_bytes = 0  # of our QoS 1 publishes, in flight or waiting
        self._queued: collections.deque[tuple[dict[str, Any], int]] = collections.deque()
        self._quota = 1
        self.broker_receive_max: int | None = None
        self.broker_max_packet: int | None = None
        self.taken_over = False

    def _ssl_wrap(self, tcp_sock: socket.socket) -> ssl.SSLSocket:
        """paho's TLS handshake, closing the socket when it fails (paho drops it open: a
        ResourceWarning per attempt against a certificate that does not verify). Our
        contexts check the host name themselves (ssl.create_default_context)."""
        client = self._client
        assert client._ssl_context is not None
        sock = client._ssl_context.wrap_socket(
            tcp_sock, server_hostname=client._host, do_handshake_on_connect=False
        )
        try:
            sock.settimeout(client._connect_timeout)
            sock.do_handshake()
        except BaseException:
            sock.close()
            raise
        return sock

    # --- reading ----------------------------------------------------------------------------

    def _feed_recv(self, bufsize: int) -> bytes:
        pos = self._feed_pos
        if pos >= len(self._feed):
            if self._feed_eof:
                return b""
            raise BlockingIOError
        self._feed_pos = pos + bufsize
        return self._feed[pos : pos + bufsize]

    def _to_paho(self, packet: bytes, *, eof: bool = False) -> None:
        self._feed, self._feed_pos, self._feed_eof = packet, 0, eof
        try:
            self._client.loop_read()
        finally:
            self._feed, self._feed_eof = b"", False

    def _read(self) -> None:
        client = self._client
        sock = client._sock
        if sock is None or self.paused:
            return
        try:
            try:
                data = sock.recv(_READ_BUFFER)
                if type(sock) is not socket.socket:  # TLS: a recv returns one record
                    data += self._more_tls(sock)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return
            except OSError:
                data = b""
            if not data:
                self._to_paho(b"", eof=True)  # paho reports the loss, as from its own read
                return
            client._last_bytes_received = time.monotonic()
            if self._chunks or len(self._rbuf) + len(data) < self._need:
                # A large packet comes in 64 KiB reads: join it once, not once per read.
                self._chunks.append(data)
                self._chunked += len(data)
                if len(self._rbuf) + self._chunked < self._need:
                    return
                data = b"".join(self._chunks)
                self._chunks, self._chunked = [], 0
            self._rbuf = self._rbuf + data if self._rbuf else data
            if not self._flush_after_read:
                self._handle_buffered()
                return
            self._in_read = True
            try:
                self._handle_buffered()
            finally:
                self._in_read = False
            if self._out:
                self.flush()
        except Exception as exc:  # a broken socket, a malformed packet
            self._fail(exc)

    def _handle_buffered(self) -> None:
        self._parse()
        sock = self._client._sock
        if type(sock) is socket.socket:  # no TLS: nothing decrypted waits (and no getattr miss)
            return
        pending = getattr(sock, "pending", None)
        if pending is not None and pending() and not self.paused:
            self._loop.call_soon(self._read)  # TLS: decrypted bytes wake no epoll

    @staticmethod
    def _more_tls(sock: Any) -> bytes:
        more = []
        for _ in range(_TLS_RECORDS):
            try:
                more.append(sock.recv(_READ_BUFFER))
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                break
            if not more[-1]:
                break
        return b"".join(more)

    def _fail(self, exc: Exception) -> None:
        """The connection is unusable: say why, and let paho close it here, on the loop's
        thread (left open, the next connect() would close it from the executor's)."""
        if not self._disconnected.done():
            self._disconnected.set_exception(exc)
        if self._client._sock is not None:
            try:
                self._to_paho(b"", eof=True)
            except Exception:  # the reason is given above; closing is best effort
                self._client._sock_close()

    def _parse(self) -> None:
        buf, pos = self._rbuf, 0
        acked = delivered = False
        try:
            while not self.paused:
                start, end = packets.frame(buf, pos)
                if start < 0:
                    break
                kind = buf[pos] & 0xF0
                if kind == PUBLISH:
                    msg = packets.decode_publish(buf[pos], buf, start, end, self._v5)
                    pos = end
                    special = self._topic_callbacks
                    callback = special.get(msg.topic) if special else None
                    self._last_of_read = self._in_read and end == len(buf)
                    if callback is None:
                        self._on_message_cb(msg)
                        delivered = True
                    else:
                        callback(msg)
                    self._last_of_read = False
                    continue
                if kind == PUBACK and end - start >= 2:
                    mid = (buf[start] << 8) | buf[start + 1]
                    if (sent := self._inflight.pop(mid, None)) is not None:
                        self.unacked_bytes -= len(sent)
                        refused = end - start > 2 and buf[start + 2] >= 0x80  # MQTT 5
                        if refused:
                            self._refused(mid, buf[start + 2])
                        if self._acked:
                            self._ack_came(mid, buf[start + 2] if refused else None)
                        pos = end
                        acked = True
                        continue
                packet, pos = buf[pos:end], end
                self._to_paho(packet)
                if self._client._sock is None:
                    return
        finally:
            if self._client._sock is None:
                self._rbuf, self._need = b"", 0
            else:
                self._rbuf = buf[pos:] if pos else buf
                self._need = packets.length(self._rbuf)
        if acked:
            self._release_waiting()
            if not self.sendable.is_set() and self.backlog() <= self.backlog_limit() // 2:
                self.sendable.set()
        if delivered and self._on_read is not None:
            self._on_read()

    def _refused(self, mid: int, code: int) -> None:
        if self._on_refused is not None:
            self._on_refused(mid, reason_name(PUBACK, code))

    def _ack_came(self, mid: int, code: int | None) -> None:
        waiter = self._acked.pop(mid, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None if code is None else reason_name(PUBACK, code))

    # --- writing ----------------------------------------------------------------------------

    def publish_packed(
        self, topic: str, payload: bytes, qos: int, retain: bool, props: bytes
    ) -> int:
        """Publish without waiting; `props` as worker.packets.properties makes them (b"" for
        MQTT 3.1.1). The message id, for `on_refused` (0 at QoS 0)."""
        mid = self._client._mid_generate() if qos else 0
        packet = packets.encode_publish(
            topic.encode(), payload, 1 if qos else 0, retain, mid, props
        )
        limit = self.broker_max_packet
        if limit is not None and len(packet) > limit:
            # The broker would end the connection for it, and a QoS 1 one would go again on
            # the next: not sent (the worker answers a reply this large with too_large).
            _log.error(
                "a %d-byte PUBLISH to %r is over the broker's max_packet_size (%d): not sent",
                len(packet),
                topic,
                limit,
            )
            return 0
        if qos:
            if self._online and len(self._inflight) < self._quota and not self._waiting:
                self._inflight[mid] = packet
                self._write(packet)
            else:
                self._waiting.append((mid, packet))
            self.unacked_bytes += len(packet)
        elif self._online:
            self._write(packet)
        if self._last_of_read:
            # A request sent from the read's last reply goes now, with the acknowledgements
            # queued before it, not once the read unwinds: a few µs of the client's round
            # trip at window 1 (its path from read to write 27.5 instead of 30 µs).
            self.flush()
        return mid

    async def publish_acked(
        self, topic: str, payload: bytes, *, retain: bool = False
    ) -> str | None:
        """A QoS 1 publish, awaited until the broker's PUBACK: the broker's refusal ("Not
        authorized"), or None (an MQTT 3.1.1 PUBACK cannot refuse). The caller bounds the wait:
        after a lost connection the PUBACK may never come."""
        mid, waiter = self._watched(topic, payload, retain, b"\x00" if self._v5 else b"")
        try:
            return await waiter
        finally:
            self._acked.pop(mid, None)

    def publish_watched(
        self, topic: str, payload: bytes, retain: bool, props: bytes
    ) -> asyncio.Future[str | None]:
        """A QoS 1 publish, and a future that the broker's PUBACK completes as publish_acked
        returns ("not sent": it was not). It may never complete: the connection lost, the
        worker stopping."""
        return self._watched(topic, payload, retain, props)[1]

    def _watched(
        self, topic: str, payload: bytes, retain: bool, props: bytes
    ) -> tuple[int, asyncio.Future[str | None]]:
        mid = self.publish_packed(topic, payload, 1, retain, props)
        waiter: asyncio.Future[str | None] = self._loop.create_future()
        if mid:
            self._acked[mid] = waiter
        else:
            waiter.set_result("not sent")
        return mid, waiter

    def acknowledge(self, mid: int, qos: int) -> None:
        """PUBACK a QoS 1 message of this connection."""
        if qos and self._online:
            self._write(packets.puback(mid))

    def _write(self, packet: bytes) -> None:
        self._out.append(packet)
        self._flush_soon()

    def hold_writes(self) -> None:
        """Queue what is written until the caller's `flush()`, which it promises: no flush
        is scheduled meanwhile (it would find nothing left, an event loop turn for nothing)."""
        self._held = True

    def _flush_soon(self) -> None:
        if not self._flush_scheduled and not self._in_read and not self._held:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write what is queued now (one write), rather than at the end of the loop's turn."""
        self._flush_scheduled = False
        self._held = False
        out = self._out
        if not out or not self._online:
            out.clear()
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        count = len(out)
        out.clear()
        client = self._client
        if not client._out_packet:
            sock = client._sock  # None once paho closed it, before _closed runs
            try:
                sent = sock.send(data) if sock is not None else 0
            except OSError:  # BlockingIOError and TLS's wants too; paho's writer reports a
                sent = 0  # broken socket
            client._last_msg_out = time.monotonic()
            if sent == len(data):
                return
            data = data[sent:]
        # Behind what paho has not written yet, as one packet of its own (PUBACK is a type
        # paho writes without a callback), so that its writer finishes ours too, in order.
        entry = {
            "command": PUBACK,
            "mid": 0,
            "qos": 0,
            "pos": 0,
            "to_process": len(data),
            "packet": data,
            "info": None,
        }
        client._out_packet.append(entry)  # type: ignore[arg-type]
        self._queued.append((entry, count))
        self.written.clear()
        client._call_socket_register_write()

    def _release_waiting(self) -> None:
        waiting, inflight = self._waiting, self._inflight
        while waiting and len(inflight) < self._quota:
            mid, packet = waiting.popleft()
            inflight[mid] = packet
            self._write(packet)

    @property
    def max_inflight(self) -> int:
        """How many of our QoS 1 publishes may be in flight (the broker's Receive Maximum,
        less what paho keeps for its own)."""
        return self._quota

    def _unwritten(self) -> int:
        """Our packets still behind paho's writer."""
        queued = self._queued
        while queued and queued[0][0]["to_process"] == 0:
            queued.popleft()
        return sum(n for _, n in queued) if queued else 0

    def backlog(self) -> int:
        """Our publishes the broker has not acknowledged, plus packets not yet written."""
        return (
            len(self._inflight)
            + len(self._waiting)
            + len(self._client._out_messages)
            + self._unwritten()
            + len(self._out)
        )

    def backlog_limit(self) -> int:
        return max(256, 2 * self._quota)

    # --- the connection's life ---------------------------------------------------------------

    async def __aenter__(self) -> Self:
        # aiomqtt 2.5 renews `_connected` only after a disconnection it made itself. After one
        # the broker made (a kick, a restart) the old CONNACK would stand for the next
        # connection: a refusal would go unseen, and the refused connection's loss unawaited.
        if self._connected.done():
            self._connected = asyncio.Future()
        if self._disconnected.done():  # an earlier connection's loss, read or not
            if not self._disconnected.cancelled():
                self._disconnected.exception()
            self._disconnected = asyncio.Future()
        lost = self._disconnected
        try:
            await super().__aenter__()
        except BaseException:  # MqttError, or cancelled while waiting for the CONNACK
            # aiomqtt leaves the socket of a connection that got no CONNACK open: paho would
            # close it when collected, from any thread, maybe after the loop closed.
            if self._client._sock is not None:
                self._client._sock_close()
            raise
        if lost.done():
            # Lost between the CONNACK and here (a broker killed as it accepted): aiomqtt put
            # a fresh future in its place, which nothing would ever complete.
            self._disconnected = lost
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        try:
            await super().__aexit__(*exc_info)
        finally:
            # A loss while the block still ran (its subscribe, say) is the block's exception
            # already; unread, the loss's future was logged by asyncio as an ERROR.
            if self._disconnected.done() and not self._disconnected.cancelled():
                self._disconnected.exception()

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
        receive_max = receive_max or 65535
        mine = max(1, min(_PAHO_INFLIGHT, receive_max // 4))
        # The public setter refuses once connected; CONNACK is the first moment we know it.
        client._max_inflight_messages = mine
        self._quota = max(1, receive_max - mine)
        if not getattr(reason_code, "is_failure", False):
            self._online = True
            # Unacknowledged QoS 1 publishes go again, first and in order (MQTT 5, 4.4).
            # What was queued for the old connection (QoS 0, acknowledgements) dies with it.
            held = list(self._inflight.items())
            again = [(mid, packets.as_duplicate(p)) for mid, p in held[: self._quota]]
            # The new quota may be smaller: the rest go again as room comes.
            rest = [(mid, packets.as_duplicate(p)) for mid, p in held[self._quota :]]
            self._waiting.extendleft(reversed(rest))
            self._inflight = dict(again)
            self._out = [p for _, p in again]
            self._queued.clear()  # paho's reconnect() dropped its unwritten packets
            self.written.set()
            self._release_waiting()
            if self._out:
                self._flush_soon()
        super()._on_connect(client, userdata, flags, reason_code, properties)

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        # paho calls this from the executor thread that runs connect().
        def start() -> None:
            if not _still_open(client, sock):
                return
            self._fd = sock.fileno()
            self.paused = False
            self._rbuf, self._need, self._chunks, self._chunked = b"", 0, [], 0
            self._loop.add_reader(self._fd, self._read)
            self._misc_task = self._loop.create_task(self._misc_loop())

        self._loop.call_soon_threadsafe(start)

    def _on_socket_register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        # aiomqtt's reads the descriptor on paho's thread and registers it on the loop later:
        # a task cancelled while opening had closed it by then (EBADF, a traceback), or its
        # number went to another socket, whose writer it would have replaced.
        def write() -> None:
            try:
                client.loop_write()
            except Exception as exc:  # a broken connection, as aiomqtt's own says
                if not self._disconnected.done():
                    self._disconnected.set_exception(exc)

        def register() -> None:
            if _still_open(client, sock):
                self._loop.add_writer(sock.fileno(), write)

        self._loop.call_soon_threadsafe(register)

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: Any,
        reason_code: Any,
        properties: Properties | None = None,
    ) -> None:
        self.taken_over = getattr(reason_code, "value", None) == _SESSION_TAKEN_OVER
        if not self._connected.done():
            # aiomqtt ignores a loss before the CONNACK: the connect waited out its timeout.
            self._connected.set_exception(
                aiomqtt.MqttError("the broker closed the connection before its CONNACK")
            )
            self._connected.exception()  # read: a connect given up on already waits no more
            return
        super()._on_disconnect(client, userdata, flags, reason_code, properties)

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int, *rest: Any) -> None:
        if mid in self._pending_subscribes:  # else a cancelled subscribe's: nobody waits
            super()._on_subscribe(client, userdata, mid, *rest)

    def _on_unsubscribe(self, client: paho.Client, userdata: Any, mid: int, *rest: Any) -> None:
        if mid in self._pending_unsubscribes:  # (aiomqtt logs a traceback for those)
            super()._on_unsubscribe(client, userdata, mid, *rest)

    def _on_socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        # paho may call this from the executor thread: flush drops what is queued once
        # offline, and the next CONNACK starts a fresh queue; the rest is the loop's.
        self._fd = -1
        self._online = False
        if self._loop.is_closed():  # a socket closed at collection: nothing left to tell
            return
        self._loop.call_soon_threadsafe(self._closed)
        super()._on_socket_close(client, userdata, sock)

    def _closed(self) -> None:
        if self._fd < 0:  # not a newer socket's state
            self.paused = False  # a pause ends with its socket: no reads to hold back
            self.written.set()  # what was not written never will be

    def pause_reading(self) -> None:
        if not self.paused and self._fd >= 0:
            self.paused = True
            self._loop.remove_reader(self._fd)

    def resume_reading(self) -> None:
        if self.paused and self._fd >= 0:
            self.paused = False
            self._loop.add_reader(self._fd, self._read)
            if self._rbuf:
                self._loop.call_soon(self._resume_parse)  # buffered packets wake no epoll

    def read_now(self) -> None:
        """Read what the socket holds now, rather than at the loop's next turn: the worker
        takes in requests that came meanwhile before it starts on a deferred one."""
        if self._fd >= 0 and not self.paused:
            self._read()

    def _resume_parse(self) -> None:
        if self.paused or self._client._sock is None:
            return
        try:
            self._handle_buffered()
        except Exception as exc:
            self._fail(exc)

    async def wait_disconnected(self) -> None:
        """Until the connection is lost (raising why). A task with a cancel pending gets it
        here at once: one that meant to wait anyway must `uncancel()` first."""
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            # Python 3.11's asyncio.wait_for (aiomqtt's, connecting and subscribing) drops a
            # cancel that comes as its future completes: waiting here would outlast it forever.
            raise asyncio.CancelledError
        await asyncio.shield(self._disconnected)

    def on_topic(self, topic: str, callback: Callable[[Incoming], None]) -> None:
        """Hand messages on `topic` to `callback` instead of `on_message` (they still need
        `acknowledge`)."""
        self._topic_callbacks[topic] = callback

    def off_topic(self, topic: str) -> None:
        """Undo `on_topic`."""
        self._topic_callbacks.pop(topic, None)


__all__ = [
    "NODELAY",
    "Connection",
    "Message",
    "PackedProperties",
    "closed_by_broker",
    "login_refused",
    "refusal",
]


def reason_name(packet_type: int, code: int) -> str:
    """The name MQTT 5 gives a reason code ("Not authorized"), as paho's ReasonCode says it."""
    kind = {packets.CONNACK: PacketTypes.CONNACK, packets.SUBACK: PacketTypes.SUBACK}
    return str(ReasonCode(kind.get(packet_type, PacketTypes.PUBACK), identifier=code))


class BlockingConnection:
    """An MQTT 5 connection (3.1.1 with `v5=False`) on a blocking socket, used by one thread
    at a time: it writes a request and reads until the reply itself, with no event loop and
    no other thread in between (the blocking client's connection per calling thread). No
    paho here either:
    worker/packets.py encodes and decodes every packet, so this class owns the socket.

    Errors: OSError (TimeoutError when `deadline` passes) for a connection that failed or
    was lost, MqttConnectError for a refused CONNACK (as aiomqtt's connect raises it).
    """

    def __init__(
        self,
        host: str,
        port: int,
        client_id: str,
        *,
        username: str | None = None,
        password: str | None = None,
        tls: ssl.SSLContext | None = None,
        keepalive: int = KEEPALIVE,
        v5: bool = True,
    ) -> None:
        self.host, self.port, self.client_id = host, port, client_id
        self.v5 = v5
        self._auth = (username, password)
        self._tls = tls
        self._keepalive = keepalive
        self.keepalive = keepalive  # the broker's Server Keep Alive once it said one
        self.sock: socket.socket | None = None
        self._buf = bytearray()
        self._mid = 0
        self.used = 0.0  # when it last wrote: the broker's keepalive counts from there
        self._read_for = _LONGEST
        self._send_for = _LONGEST
        self._lowat = 1
        self._between = 1  # bytes a read waits for between packets: 1 until connected

    def connect(self, deadline: float) -> None:
        """Connect anew (a Clean Start: the session ends with the connection)."""
        self.close()
        sock = socket.create_connection((self.host, self.port), timeout=_left(deadline))
        try:
            sock.setsockopt(*NODELAY)
            if self._tls is not None:
                sock.settimeout(_left(deadline))
                sock = self._tls.wrap_socket(sock, server_hostname=self.host)
            else:
                sock.settimeout(None)
        except BaseException:
            sock.close()
            raise
        self.sock, self._buf, self._mid = sock, bytearray(), 0
        self._read_for = _LONGEST  # its SO_RCVTIMEO: none yet
        self._send_for = _LONGEST  # its SO_SNDTIMEO
        self._lowat = 1  # its SO_RCVLOWAT
        self._between = 1  # MQTT 3.1.1's CONNACK is 4 bytes
        try:
            self.keepalive = self._keepalive
            connect = packets.encode_connect(self.client_id, self._keepalive, *self._auth, self.v5)
            self.send(connect, deadline)
            first, body = self.next_packet(deadline)
            if first & 0xF0 != packets.CONNACK:
                raise packets.MalformedPacket("the broker's first packet is not a CONNACK")
            ack = packets.decode_ack(first, body, 0, len(body), self.v5)
            if not self.v5 and ack.reason:  # 3.1.1's return code, as MQTT 5 names it
                ack.reason = _V3_REFUSALS.get(ack.reason, _UNSPECIFIED)
            if ack.reason >= _UNSPECIFIED:
                raise MqttConnectError(ReasonCode(PacketTypes.CONNACK, identifier=ack.reason))
        except BaseException:
            self.close()
            raise
        if ack.keepalive is not None:  # the broker's Server Keep Alive rules
            self.keepalive = ack.keepalive
        self._between = _MORE_THAN_AN_ACK

    def subscribe(self, topic_filter: str, qos: int, deadline: float) -> str | None:
        """Subscribe; the broker's reason when it refused (as `refusal`), else None."""
        mid = self._next_mid()
        self.send(packets.encode_subscribe(mid, topic_filter, qos, self.v5), deadline)
        while True:
            first, body = self.next_packet(deadline)
            if first & 0xF0 == packets.SUBACK:
                ack = packets.decode_ack(first, body, 0, len(body), self.v5)
                if ack.mid == mid:
                    if ack.reason < 0x80:
                        return None
                    return reason_name(packets.SUBACK, ack.reason) if self.v5 else V3_FAILURE

    def publish(self, topic: str, payload: bytes, qos: int, props: bytes, deadline: float) -> int:
        """Send a PUBLISH; its message id (0 at QoS 0)."""
        mid = self._next_mid() if qos else 0
        self.send(packets.encode_publish(topic.encode(), payload, qos, False, mid, props), deadline)
        return mid

    def send(self, data: bytes, deadline: float) -> None:
        """Write `data` whole by `deadline`, or close the connection and raise
        ConnectionResetError: part of a packet may have gone out, and nothing may follow it."""
        sock = self.sock
        if sock is None:
            raise ConnectionResetError("not connected")
        try:
            if self._tls is not None:
                sock.settimeout(_left(deadline))
                sock.sendall(data)
            else:
                view = memoryview(data)
                while view:
                    if time.monotonic() + self._send_for > deadline + _LATE:  # as reads do
                        self._send_for = _left(deadline)
                        sock.setsockopt(
                            socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(self._send_for)
                        )
                    try:
                        view = view[sock.send(view) :]
                    except BlockingIOError:  # SO_SNDTIMEO ended it
                        self._send_for = _LONGEST
        except Exception as exc:
            self.close()
            raise ConnectionResetError(
                f"writing to the broker: {exc or type(exc).__name__}"
            ) from exc
        except BaseException:  # an interrupt: half a packet may have gone out
            self.close()
            raise
        self.used = time.monotonic()

    def next_packet(self, deadline: float) -> tuple[int, bytes]:
        """The next packet: its first byte and its body. Raises TimeoutError when `deadline`
        (time.monotonic) passes first, ConnectionResetError when the broker closes. While
        it waits past the keepalive it sends PINGREQ, as the broker expects of a client."""
        buf, sock = self._buf, self.sock
        while True:
            start, end = packets.frame(buf, 0)  # type: ignore[arg-type]  # bytes-like
            if start >= 0:
                first, body = buf[0], bytes(buf[start:end])
                del buf[:end]
                return first, body
            if sock is None:
                raise ConnectionResetError("not connected")
            now = time.monotonic()
            if now >= deadline:
                raise TimeoutError
            until = deadline
            if self.keepalive:
                if now >= self.used + self.keepalive:
                    self.send(packets.PINGREQ_PACKET, deadline)
                until = min(deadline, self.used + self.keepalive)
            if self._tls is not None:
                sock.settimeout(min(until - now, _LONGEST))
                try:
                    data = sock.recv(_READ_BUFFER)
                except TimeoutError:
                    continue
            else:
                got = self._recv(sock, bool(buf), now, until)
                if got is None:
                    continue
                data = got
            if not data:
                raise ConnectionResetError("the broker closed the connection")
            buf += data

    def _recv(self, sock: socket.socket, partial: bool, now: float, until: float) -> bytes | None:
        """A read of the plain socket, blocking until `until` at most (None then).

        It gives up after SO_RCVTIMEO: with a timeout of Python's, every read and write was
        a poll() too, and flipping the socket between the two modes an ioctl(), each a
        release of the GIL. SO_RCVTIMEO is set again only when a read could outlast `until`
        (about once per connection while the client's timeout stays the same).

        Between packets it waits for 5 bytes or more (SO_RCVLOWAT): the 4 of a PUBACK that
        says Success do not wake the thread, the reply coming after it does, and one read
        takes both (a refusing PUBACK, with its reason code, is 5 bytes; a SUBACK at least
        5). Inside a packet, and before the CONNACK, it wakes for any byte: a packet's last
        few may come alone, and MQTT 3.1.1's CONNACK is 4 bytes.
        """
        lowat = 1 if partial else self._between
        if lowat != self._lowat:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, lowat)
            self._lowat = lowat
        if now + self._read_for > until + _LATE:
            self._read_for = min(until - now, _LONGEST)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(self._read_for))
        try:
            return sock.recv(_READ_BUFFER)
        except BlockingIOError:  # SO_RCVTIMEO ended it
            self._read_for = _LONGEST  # set it anew, shorter, if time is left
            return None

    def idle_but_open(self) -> bool:
        """For a connection nobody used for a while: whether the broker still holds it, as
        far as what it sent meanwhile says (kept for the next read: a late reply)."""
        sock = self.sock
        if sock is None or (self.keepalive and time.monotonic() - self.used > self.keepalive):
            return False  # the broker may drop it at any moment now: connect anew
        while True:
            try:
                if self._tls is None:
                    data = sock.recv(_READ_BUFFER, socket.MSG_DONTWAIT)
                else:
                    sock.settimeout(0)
                    data = sock.recv(_READ_BUFFER)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                break
            except OSError:
                return False
            if not data:
                return False
            self._buf += data
        buf, pos = self._buf, 0
        try:
            while (span := packets.frame(buf, pos))[0] >= 0:  # type: ignore[arg-type]
                if buf[pos] & 0xF0 == packets.DISCONNECT:  # the broker's last word
                    return False
                pos = span[1]
        except packets.MalformedPacket:
            return False
        return True

    def shutdown(self) -> None:
        """Wake the thread that reads it (from another thread): its read ends at once."""
        sock = self.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                # socket's own, also under TLS: SSLSocket's would drop the TLS state under
                # the reading thread.
                socket.socket.shutdown(sock, socket.SHUT_RDWR)

    def close(self, *, disconnect: bool = False) -> None:
        sock, self.sock = self.sock, None
        if sock is None:
            return
        if disconnect:  # if it fits the send buffer now (2 bytes: it does unless stalled)
            with contextlib.suppress(OSError):
                sock.settimeout(0)
                sock.send(packets.DISCONNECT_PACKET)
        sock.close()

    def _next_mid(self) -> int:
        self._mid = self._mid % 65535 + 1
        return self._mid


_MORE_THAN_AN_ACK = 5
# MQTT 3.1.1's CONNACK return codes by their MQTT 5 reason (as paho converts them): bad
# protocol version, client id, server unavailable, bad login, not authorized.
_V3_REFUSALS = {1: 0x84, 2: 0x85, 3: 0x88, 4: 0x86, 5: 0x87}
_LATE = 0.05  # seconds a read may end after its deadline, to spare setting SO_RCVTIMEO


def _timeval(seconds: float) -> bytes:
    whole = int(seconds)
    return struct.pack("ll", whole, max(1, int((seconds - whole) * 1e6)))  # 0 is forever


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return min(left, _LONGEST)


_LONGEST = 1e9  # seconds: the longest a socket's timeout may be (a client's timeout may be more)
