"""The worker's own transport (worker/mqtt.py) keeps paho's promises on the wire.

Against a real Mosquitto where one can show it (a Receive Maximum of 20, replies too large for
one socket write); against a scripted broker where Mosquitto cannot be made to do it (hold
its PUBACKs, then drop the connection with our publishes in flight).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiomqtt
import msgpack
import pytest
from aiomqtt import ProtocolVersion
from paho.mqtt import _packet
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.clients import decode, device, next_message, watcher
from tests.conftest import WorkerFactory, make_config, running
from tests.processes import Mosquitto
from worker import packets
from worker.backends import create_backend
from worker.mqtt import BlockingConnection, Connection
from worker.service import Service


async def test_replies_and_events_past_the_brokers_receive_maximum(
    stock_broker: Mosquitto, worker_factory: WorkerFactory
) -> None:
    """300 pipelined appends, each evicting a conversation, through a broker that lets 20 of
    our publishes be in flight: every reply and every event arrives, on one connection."""
    stock_broker.start()
    try:
        async with (
            worker_factory(stock_broker, max_conversations=5) as w,
            watcher(stock_broker.host, stock_broker.port, f"{w.cfg.prefix}/+/evicted") as events,
            device(stock_broker.host, stock_broker.port, w.cfg.prefix) as d,
        ):
            assert w.broker_round_trip is not None
            sent = [
                await d.send(f"{w.cfg.prefix}/c{i}/append", {"role": "user", "content": "hi"})
                for i in range(300)
            ]
            replies = [await d.reply(fut) for fut in sent]
            assert all(r["ok"] and r["seq"] == 1 for r in replies)
            evicted = [decode(await next_message(events))["convo"] for _ in range(295)]
            assert sorted(evicted) == sorted(f"c{i}" for i in range(295))
            assert w.connections == 1
    finally:
        stock_broker.stop()


async def test_replies_larger_than_the_socket_buffer_arrive_whole(
    worker_factory: WorkerFactory, broker: Mosquitto
) -> None:
    """40 gets answered in one batch with 19 MB of replies (many partial socket writes)
    arrive whole and in the order of the stored turns."""
    async with worker_factory() as w, device(broker.host, broker.port, w.cfg.prefix) as d:
        contents = [f"{n:02d}" + "x" * 60_000 for n in range(8)]
        for content in contents:
            assert (await d.request("big", "append", {"role": "user", "content": content}))["ok"]
        sent = [await d.send(f"{w.cfg.prefix}/big/get", {}) for _ in range(40)]
        for fut in sent:
            reply = await d.reply(fut)
            assert [t["content"] for t in reply["turns"]] == contents


class ScriptedBroker:
    """Just enough of an MQTT 5 broker to watch the worker's publishes on the wire.

    It grants every SUBSCRIBE, echoes a publish on a topic the worker subscribed to (the
    worker's broker probe), acknowledges the worker's own topics at once and holds the
    PUBACK of every other publish of the worker while `holding` is set.
    """

    def __init__(self, receive_maximum: int) -> None:
        self.receive_maximum = receive_maximum
        self.holding = True
        self.hold_status = False  # hold the PUBACKs of the worker's status too
        self.statuses: list[bytes] = []  # what the worker published on its status topic
        self.connections: list[list[Any]] = []  # per connection: the worker's PUBLISH packets
        self.pubacks: list[int] = []  # mids the worker acknowledged
        self.replies: list[Any] = []  # the worker's publishes to "reply", all connections
        self.closed = 0  # connections the worker closed
        self.unacked: set[int] = set()
        self.most_unacked = 0
        self.changed = asyncio.Condition()
        self.writer: asyncio.StreamWriter | None = None
        self._subscribed: set[str] = set()
        self._mid = 0
        self._writers: list[asyncio.StreamWriter] = []

    async def serve(self) -> AsyncGenerator[int, None]:
        server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        async with server:
            try:
                yield server.sockets[0].getsockname()[1]
            finally:
                for writer in self._writers:
                    writer.close()
                    with contextlib.suppress(ConnectionError):
                        await writer.wait_closed()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            first, body = await self._read(reader)
            if b"-look-" in body:  # the worker looking for a twin (Service._live_twin): none
                writer.close()
                return
            self.writer = writer
            self._writers.append(writer)
            self.unacked.clear()
            self.connections.append([])
            while True:
                await self._packet(first, body)
                async with self.changed:
                    self.changed.notify_all()
                first, body = await self._read(reader)
        self.closed += 1
        async with self.changed:
            self.changed.notify_all()

    @staticmethod
    async def _read(reader: asyncio.StreamReader) -> tuple[int, bytes]:
        first = (await reader.readexactly(1))[0]
        length, shift = 0, 0
        while True:
            byte = (await reader.readexactly(1))[0]
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        return first, await reader.readexactly(length)

    def send(self, data: bytes) -> None:
        assert self.writer is not None
        self.writer.write(data)

    def _reply(self, kind: int, body: bytes) -> None:
        self.send(bytes((kind,)) + packets.varint(len(body)) + body)

    async def _packet(self, first: int, body: bytes) -> None:
        kind = first & 0xF0
        if kind == 0x10:  # CONNECT -> CONNACK, session present after the first
            props = b"\x21" + self.receive_maximum.to_bytes(2, "big")
            present = 1 if len(self.connections) > 1 else 0
            self._reply(0x20, bytes((present, 0)) + packets.varint(len(props)) + props)
        elif kind in (0x80, 0xA0):  # SUBSCRIBE, UNSUBSCRIBE -> SUBACK, UNSUBACK
            mid, rest = body[:2], body[2:]
            plen, pos = packets.read_varint(rest, 0)
            pos += plen
            codes = bytearray()
            while pos < len(rest):
                n = int.from_bytes(rest[pos : pos + 2], "big")
                topic = rest[pos + 2 : pos + 2 + n].decode()
                pos += 2 + n
                if kind == 0x80:
                    pos += 1
                    self._subscribed.add(topic)
                    codes.append(1)
                else:
                    self._subscribed.discard(topic)
                    codes.append(0)
            self._reply(0x90 if kind == 0x80 else 0xB0, mid + b"\x00" + bytes(codes))
        elif kind == 0x30:
            await self._publish(first, body)
        elif kind == 0x40:
            self.pubacks.append(int.from_bytes(body[:2], "big"))
        elif kind == 0xC0:
            self.send(b"\xd0\x00")

    async def _publish(self, first: int, body: bytes) -> None:
        msg = _packet.decode_publish(first, body, MQTTProtocolVersion.MQTTv5)
        topic = msg.topic.decode()
        if topic.endswith("/status"):
            self.statuses.append(bytes(msg.payload))
        if "/_worker/" in topic:
            if not (self.hold_status and topic.endswith("/status")):
                self.send(packets.puback(msg.mid))
            if topic in self._subscribed:  # the probe
                self.deliver(topic, bytes(msg.payload))
            return
        self.connections[-1].append(msg)
        if topic == "reply":
            self.replies.append(msg)
        if self.holding:
            self.unacked.add(msg.mid)
            self.most_unacked = max(self.most_unacked, len(self.unacked))
        else:
            self.send(packets.puback(msg.mid))

    def deliver(self, topic: str, payload: bytes, props: bytes = b"\x00") -> int:
        self._mid += 1
        self.send(packets.encode_publish(topic.encode(), payload, 1, False, self._mid, props))
        return self._mid

    async def until(self, what: Any) -> None:
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(what), 10)


def request_props(correlation: int) -> bytes:
    """PUBLISH properties of a request answered on "reply"."""
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.ResponseTopic = "reply"
    props.CorrelationData = correlation.to_bytes(4, "big")
    packed: bytes = props.pack()  # type: ignore[no-untyped-call]
    return packed


@contextlib.asynccontextmanager
async def scripted(broker: ScriptedBroker, **overrides: Any) -> AsyncIterator[Service]:
    """A worker connected to `broker`."""
    serving = broker.serve()
    port = await anext(serving)
    address = SimpleNamespace(host="127.0.0.1", port=port)
    cfg = make_config(address, stats_interval=3600, reconnect_max=0.2, **overrides)  # type: ignore[arg-type]
    try:
        async with running(cfg) as w:
            yield w
    finally:
        await serving.aclose()


async def test_a_batch_waits_until_the_last_ones_acknowledgements_are_written(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the broker not reading and 19 MB of replies behind its socket, the worker applies
    no further batch (a few requests or a flood) until the last batch's PUBACKs are in the
    kernel: requests applied but not acknowledged stay within the ids a conversation
    remembers (--max-inflight)."""
    starts: list[bool] = []
    first_done = asyncio.Event()
    sort, finish = Service._sort, Service._finish

    def starting(self: Service, batch: list[Any]) -> Any:  # a batch's start, either way
        assert self._client is not None
        starts.append(self._client.written.is_set())
        return sort(self, batch)

    def finishing(self: Service, *args: Any) -> None:
        finish(self, *args)
        first_done.set()

    read = asyncio.Event()
    on_read = Service._on_read

    def reading(self: Service) -> None:
        read.set()
        on_read(self)

    monkeypatch.setattr(Service, "_sort", starting)
    monkeypatch.setattr(Service, "_finish", finishing)
    monkeypatch.setattr(Service, "_on_read", reading)
    broker = ScriptedBroker(receive_maximum=1000)
    broker.holding = False
    async with scripted(broker) as w:
        prefix = w.cfg.prefix
        for i in range(8):
            turn = msgpack.packb({"role": "user", "content": "x" * 60_000})
            broker.deliver(f"{prefix}/big/append", turn, request_props(i))
        await broker.until(lambda: len(broker.replies) == 8)
        assert broker.writer is not None
        broker.writer.transport.pause_reading()  # type: ignore[attr-defined]
        starts.clear()
        first_done.clear()
        for i in range(40):
            broker.deliver(f"{prefix}/big/get", msgpack.packb({}), request_props(100 + i))
        await asyncio.wait_for(first_done.wait(), 10)
        assert w._client is not None
        assert not w._client.written.is_set()
        # A few, read while nothing waits in the inbox (the batch would start in the read's
        # turn, were it not held), then a flood that fills the inbox and pauses reading.
        read.clear()
        for i in range(5):
            body = msgpack.packb({"role": "user", "content": "t", "id": f"few{i}"})
            broker.deliver(f"{prefix}/few/append", body, request_props(500 + i))
        await asyncio.wait_for(read.wait(), 10)
        for i in range(600):
            body = msgpack.packb({"role": "user", "content": "t", "id": f"r{i}"})
            broker.deliver(f"{prefix}/ids/append", body, request_props(1000 + i))
        broker.writer.transport.resume_reading()  # type: ignore[attr-defined]
        await broker.until(lambda: len(broker.replies) == 8 + 645)
    assert len(starts) >= 10
    assert all(starts), starts


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
async def test_a_lone_request_is_served_in_the_turn_that_read_it(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the memory backend a read's requests are applied, answered and acknowledged in the
    read's own event-loop turn, without waking the process task (its wake-up was a third of
    a lone request's turns). SQLite's wait for the writer thread: the process task serves
    them."""
    tasks: list[int] = []
    handle = Service._handle

    async def by_task(self: Service, batch: list[Any]) -> None:
        tasks.append(len(batch))
        await handle(self, batch)

    monkeypatch.setattr(Service, "_handle", by_task)
    url = "memory" if backend == "memory" else f"sqlite:///{tmp_path / 'm.db'}"
    broker = ScriptedBroker(receive_maximum=100)
    broker.holding = False
    async with scripted(broker, backend=url) as w:
        for i in range(3):
            body = msgpack.packb({"role": "user", "content": f"turn {i}"})
            mid = broker.deliver(f"{w.cfg.prefix}/lone/append", body, request_props(i))
            await broker.until(
                lambda n=i + 1, m=mid: len(broker.replies) == n and m in broker.pubacks
            )
    assert [msgpack.unpackb(m.payload)["seq"] for m in broker.replies] == [1, 2, 3]
    assert tasks == ([] if backend == "memory" else [1, 1, 1])


async def test_a_malformed_packet_closes_the_connection_and_the_worker_comes_back() -> None:
    """A PUBLISH that breaks the protocol ends its connection, and the worker reconnects and
    serves."""
    broker = ScriptedBroker(receive_maximum=100)
    broker.holding = False
    async with scripted(broker) as w:
        broker.send(b"\x36\x03\x00\x01t")  # QoS bits 3
        await broker.until(lambda: broker.closed == 1 and len(broker.connections) == 2)
        await asyncio.wait_for(w.wait_connections(2), 10)
        body = msgpack.packb({"role": "user", "content": "hi"})
        broker.deliver(f"{w.cfg.prefix}/c/append", body, request_props(1))
        await broker.until(lambda: len(broker.replies) == 1)
        assert msgpack.unpackb(broker.replies[0].payload)["seq"] == 1


async def test_publishes_wait_for_room_and_go_again_after_a_reconnect() -> None:
    """With PUBACKs held, the worker keeps its publishes within the broker's Receive Maximum
    (less what paho keeps); after the connection drops it sends the unacknowledged ones again
    first, with the same packet ids and DUP set, then the rest: none lost, none invented."""
    broker = ScriptedBroker(receive_maximum=4)
    async with scripted(broker, max_conversations=1) as w:
        prefix = w.cfg.prefix
        requests = []
        for i in range(6):  # each append but the first evicts the one before
            body = msgpack.packb({"role": "user", "content": f"turn {i}"})
            requests.append(broker.deliver(f"{prefix}/c{i}/append", body, request_props(i)))
        await broker.until(
            lambda: set(requests) <= set(broker.pubacks) and len(broker.unacked) == 3
        )
        held = list(broker.connections[0])
        assert broker.writer is not None
        broker.holding = False
        broker.writer.close()  # the connection drops with three publishes in flight
        await broker.until(lambda: len(broker.connections) == 2)
        await broker.until(lambda: len(broker.connections[1]) == 11)
        again = broker.connections[1]
        assert [(m.mid, m.dup, m.topic, m.payload) for m in again[:3]] == [
            (m.mid, True, m.topic, m.payload) for m in held
        ]
        assert not any(m.dup for m in again[3:])
        topics = sorted(m.topic.decode() for m in again)
        assert topics == sorted([f"{prefix}/c{i}/evicted" for i in range(5)] + ["reply"] * 6)
        seqs = [msgpack.unpackb(m.payload)["seq"] for m in again if m.topic == b"reply"]
        assert seqs == [1] * 6
        assert broker.most_unacked == 3
        await asyncio.wait_for(w.wait_connections(2), 10)


async def test_a_huge_request_is_refused_and_the_next_one_served(
    worker_factory: WorkerFactory, broker: Mosquitto
) -> None:
    """A request of nearly the broker's max_packet_size (1 MiB: sixteen 64 KiB reads) gets
    too_large, and the worker goes on."""
    async with worker_factory() as w, device(broker.host, broker.port, w.cfg.prefix) as d:
        body = msgpack.packb({"role": "user", "content": "x" * 1_000_000})
        reply = await d.raw(f"{w.cfg.prefix}/huge/append", body)
        assert reply["error"]["code"] == "too_large"
        ok = await d.request("huge", "append", {"role": "user", "content": "small"})
        assert ok["ok"]
        assert ok["seq"] == 1


async def test_a_cancel_dropped_on_the_way_still_ends_the_wait_for_a_disconnection(
    broker: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    """Python 3.11's wait_for drops a cancel that comes as its future completes (aiomqtt's
    connect and subscribe): a worker stopped just as it resubscribed after a broker restart
    then waited forever. wait_disconnected() raises the dropped cancel. And the SUBACK of a
    subscribe cancelled meanwhile logs no traceback."""
    async with Connection(
        lambda message: None, hostname=broker.host, port=broker.port, protocol=ProtocolVersion.V5
    ) as conn:

        async def stay() -> None:
            with contextlib.suppress(asyncio.CancelledError):  # as wait_for may
                await asyncio.sleep(3600)
            await conn.wait_disconnected()

        task = asyncio.create_task(stay())
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)

        subscribing = asyncio.create_task(conn.subscribe("cancelled/#", qos=1))
        await asyncio.sleep(0)  # sent
        subscribing.cancel()
        await conn.subscribe("after/#", qos=1)  # its SUBACK comes after the cancelled one's
    assert "Unexpected message ID" not in caplog.text


async def test_a_stop_before_online_is_acknowledged_still_says_offline() -> None:
    """SIGTERM just after the worker published its retained "online", before the broker's
    PUBACK: it skipped the "offline" (not yet `connected`), and a clean DISCONNECT sends no
    will, so the retained status said online for good."""
    broker = ScriptedBroker(receive_maximum=100)
    broker.hold_status = True
    serving = broker.serve()
    port = await anext(serving)
    cfg = make_config(SimpleNamespace(host="127.0.0.1", port=port), stats_interval=3600)  # type: ignore[arg-type]
    service = Service(cfg, create_backend(cfg))
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    try:
        await broker.until(lambda: len(broker.statuses) == 1)
        assert msgpack.unpackb(broker.statuses[0])["state"] == "online"
        assert not service.connected.is_set()
        stop.set()
        await asyncio.wait_for(task, 15)
    finally:
        stop.set()
        await asyncio.gather(task, return_exceptions=True)
        await serving.aclose()
    assert [msgpack.unpackb(s)["state"] for s in broker.statuses] == ["online", "offline"]


async def test_a_blocking_connection_waiting_long_keeps_itself_alive(broker: Mosquitto) -> None:
    """A thread waits 7 s for a message on a BlockingConnection whose keepalive is 1 s, past
    the 1.5 s after which the broker drops a silent client (Mosquitto 2.0 checks every few
    seconds: one that only waited was dropped within 6 s): it sends PINGREQ meanwhile, so
    the broker keeps the connection and the message comes."""
    conn = BlockingConnection(broker.host, broker.port, "waits-long", keepalive=1)
    await asyncio.to_thread(conn.connect, time.monotonic() + 10)
    try:
        assert conn.keepalive == 1
        assert (
            await asyncio.to_thread(conn.subscribe, "slow/reply", 0, time.monotonic() + 10) is None
        )

        def wait() -> packets.Incoming:
            first, body = conn.next_packet(time.monotonic() + 10)
            while first & 0xF0 != packets.PUBLISH:  # PINGRESP
                first, body = conn.next_packet(time.monotonic() + 10)
            return packets.decode_publish(first, body, 0, len(body))

        waiting = asyncio.ensure_future(asyncio.to_thread(wait))
        await asyncio.sleep(7)  # how late the reply is: the scenario, not a synchronization
        async with aiomqtt.Client(broker.host, broker.port) as late:
            await late.publish("slow/reply", b"at last")
        assert (await asyncio.wait_for(waiting, 10)).payload == b"at last"
    finally:
        conn.close()


async def test_a_loss_inside_the_block_is_not_logged_as_an_unread_error(
    broker: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    """A connection lost before the block waits for its loss (a worker kicked by its twin
    while it subscribed): leaving the block reads the loss, and asyncio logs no "Future
    exception was never retrieved" ERROR beside the worker's own words."""
    import gc

    conn = Connection(
        lambda message: None,
        hostname=broker.host,
        port=broker.port,
        identifier="kicked-in-the-block",
        protocol=ProtocolVersion.V5,
    )

    async def kicked(conn: Connection) -> None:
        # Another client takes the id: the broker closes this connection.
        async with conn, aiomqtt.Client(broker.host, broker.port, identifier=conn.identifier):
            await asyncio.wait([conn._disconnected], timeout=10)  # not read
            await conn.subscribe("after/the/loss")

    with pytest.raises(aiomqtt.MqttError):
        await kicked(conn)
    del conn
    gc.collect()
    await asyncio.sleep(0)
    assert "never retrieved" not in caplog.text


async def test_a_loss_right_after_the_connack_is_seen(
    broker: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    """The connection closes right behind its CONNACK (a broker killed as it accepted): the
    loss came before the connecting task resumed, and aiomqtt then put a fresh future in
    place of the one that held it. The connection looked open for good (nothing ever waited
    out its loss) and asyncio logged "Future exception was never retrieved"."""
    import gc

    async def cut_after_connack(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(broker.host, broker.port)
        up_writer.write(await reader.read(65536))  # the CONNECT
        connack = await up_reader.read(65536)
        assert connack[0] == 0x20
        writer.write(connack)
        writer.close()
        up_writer.close()

    server = await asyncio.start_server(cut_after_connack, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        for _ in range(3):
            conn = Connection(
                lambda message: None,
                hostname="127.0.0.1",
                port=port,
                protocol=ProtocolVersion.V5,
            )
            with pytest.raises(aiomqtt.MqttError):
                async with conn:
                    await asyncio.wait_for(conn.wait_disconnected(), 10)
            del conn
    finally:
        server.close()
    gc.collect()
    await asyncio.sleep(0)
    assert "never retrieved" not in caplog.text
