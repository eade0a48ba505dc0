"""MQTT peers for the end-to-end tests: devices (MQTT 5 and 3.1.1) and dashboards."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from functools import cache
from typing import Any

import aiomqtt
import jsonschema
import msgpack
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.processes import REPO
from worker import packets

SCHEMAS = REPO / "schemas"
TIMEOUT = 10.0
# Without it every request/reply round trip waits ~40 ms (Nagle against delayed ACKs).
NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _as_json(value: Any) -> Any:
    """msgpack values as JSON Schema sees them: bin as a string (see schemas/README.md)."""
    if isinstance(value, bytes):
        return value.decode("latin-1")
    if isinstance(value, dict):
        return {str(k): _as_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_as_json(v) for v in value]
    return value


@cache
def schema(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((SCHEMAS / f"{name}.json").read_text())
    return loaded


def check(name: str, value: Any) -> None:
    """Assert that `value` matches schemas/<name>.json."""
    jsonschema.validate(_as_json(value), schema(name))


def props(**fields: Any) -> Properties:
    p = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    for key, value in fields.items():
        setattr(p, key, value)
    return p


class Device:
    """A device that asks the worker and awaits its answers.

    MQTT 5 devices ask with a Response Topic and Correlation Data; MQTT 3.1.1 devices put
    `reply_to` in the payload. Every reply is checked against the schema of its operation.
    """

    def __init__(self, client: aiomqtt.Client, prefix: str, v5: bool) -> None:
        self.client = client
        self.prefix = prefix
        self.v5 = v5
        self.inbox = f"reply/{uuid.uuid4().hex}"
        self._n = itertools.count(1)
        self._waiting: dict[bytes | str, asyncio.Future[aiomqtt.Message]] = {}
        self.unmatched: asyncio.Queue[aiomqtt.Message] = asyncio.Queue()

    async def _listen(self) -> None:
        async for message in self.client.messages:
            key: bytes | str | None
            if self.v5:
                key = getattr(message.properties, "CorrelationData", None)
            else:
                key = message.topic.value
            fut = self._waiting.pop(key, None) if key is not None else None
            if fut is None:
                self.unmatched.put_nowait(message)
            elif not fut.done():
                fut.set_result(message)

    async def send(
        self, topic: str, body: dict[str, Any] | bytes, *, qos: int = 1, retain: bool = False
    ) -> asyncio.Future[aiomqtt.Message]:
        """Publish a request (a map, or raw bytes); the future resolves with its reply.

        A 3.1.1 device adds `reply_to` to a map body that has none.
        """
        n = next(self._n)
        fut: asyncio.Future[aiomqtt.Message] = asyncio.get_running_loop().create_future()
        properties = None
        if self.v5:
            key: bytes | str = n.to_bytes(4, "big")
            properties = props(ResponseTopic=self.inbox, CorrelationData=key)
        else:
            key = f"{self.inbox}/{n}"
            if isinstance(body, dict) and "reply_to" not in body:
                body = {**body, "reply_to": key}
        self._waiting[key] = fut
        payload = body if isinstance(body, bytes) else msgpack.packb(body)
        await self.client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        return fut

    async def request(
        self, convo: str, op: str, body: dict[str, Any] | None = None, *, qos: int = 1
    ) -> dict[str, Any]:
        """One request and its decoded, schema-checked reply."""
        fut = await self.send(f"{self.prefix}/{convo}/{op}", body or {}, qos=qos)
        reply = await self.reply(fut)
        name = f"{op.replace('/', '.')}.reply"
        check(name if (SCHEMAS / f"{name}.json").exists() else "error.reply", reply)
        return reply

    async def reply(self, fut: asyncio.Future[aiomqtt.Message]) -> dict[str, Any]:
        message = await asyncio.wait_for(fut, TIMEOUT)
        if self.v5:
            assert getattr(message.properties, "ContentType", None) == "application/msgpack"
        decoded: dict[str, Any] = msgpack.unpackb(message.payload)
        return decoded

    async def raw(self, topic: str, payload: bytes, qos: int = 1) -> dict[str, Any]:
        """Publish raw bytes (an MQTT 5 device: the route is in the properties)."""
        return await self.reply(await self.send(topic, payload, qos=qos))


@contextlib.asynccontextmanager
async def device(
    host: str, port: int, prefix: str, *, v5: bool = True, **kwargs: Any
) -> AsyncIterator[Device]:
    protocol = aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311
    async with aiomqtt.Client(
        host, port, protocol=protocol, socket_options=[NODELAY], **kwargs
    ) as client:
        dev = Device(client, prefix, v5)
        await client.subscribe(f"{dev.inbox}/#" if not v5 else dev.inbox, qos=1)
        listener = asyncio.create_task(dev._listen())
        try:
            yield dev
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await listener


@contextlib.asynccontextmanager
async def watcher(
    host: str, port: int, *filters: str, **kwargs: Any
) -> AsyncIterator[asyncio.Queue[aiomqtt.Message]]:
    """Messages on `filters`, in arrival order, from a subscription made before yielding."""
    queue: asyncio.Queue[aiomqtt.Message] = asyncio.Queue()
    async with aiomqtt.Client(host, port, protocol=aiomqtt.ProtocolVersion.V5, **kwargs) as client:
        for f in filters:
            await client.subscribe(f, qos=1)

        async def pump() -> None:
            async for message in client.messages:
                queue.put_nowait(message)

        task = asyncio.create_task(pump())
        try:
            yield queue
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await task


async def next_message(queue: asyncio.Queue[aiomqtt.Message]) -> aiomqtt.Message:
    return await asyncio.wait_for(queue.get(), TIMEOUT)


def decode(message: aiomqtt.Message) -> Any:
    return msgpack.unpackb(message.payload, strict_map_key=False)


class AckHolder:
    """A TCP hop to the broker whose client (the worker) gets none of the broker's PUBACKs
    of its publishes to topics `held(topic)` says, while `holding`: they wait for
    `release()`, as behind a flood. Everything else passes, but while `paused`, when
    whatever comes waits for `resume()` and then goes in one write (one read of the
    client's: one batch). The client's publishes to topics `swallowing(topic)` says never
    reach the broker, as if the client died before it wrote them. While `holding`, the
    broker's packets of the kinds in `withheld` (SUBACK, say) wait for `release()` too."""

    def __init__(self, host: str, port: int, held: Callable[[str], bool] = lambda _: True) -> None:
        self.target = (host, port)
        self.holding = False
        self.swallowing: Callable[[str], bool] = lambda _: False
        self.withheld: set[int] = set()
        self.port = 0
        self._which = held
        self._topics: dict[int, str] = {}  # the client's QoS 1 publishes: mid -> topic
        self._held: list[bytes] = []
        self.paused = False
        self._paused: list[bytes] = []
        self._more = asyncio.Event()
        self._to_client: asyncio.StreamWriter | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> AckHolder:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for w in self._writers:
            w.close()
        if self._server is not None:
            self._server.close()

    def release(self) -> None:
        """Hand on the PUBACKs held, and hold no more."""
        self.holding = False
        held, self._held = self._held, []
        if self._to_client is not None:
            for packet in held:
                self._to_client.write(packet)

    async def wait_paused(self, publishes: int) -> None:
        """Until this many PUBLISH packets wait, paused."""
        while sum(p[0] & 0xF0 == packets.PUBLISH for p in self._paused) < publishes:
            self._more.clear()
            await self._more.wait()

    def resume(self) -> None:
        self.paused = False
        waiting, self._paused = self._paused, []
        if self._to_client is not None:
            self._to_client.write(b"".join(waiting))

    @staticmethod
    def _packets(buf: bytes) -> tuple[list[bytes], bytes]:
        out = []
        while (span := packets.frame(buf, 0))[0] >= 0:
            out.append(buf[: span[1]])
            buf = buf[span[1] :]
        return out, buf

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self._to_client = writer
        self._writers += [writer, up_writer]

        async def up() -> None:
            buf = b""
            while data := await reader.read(65536):
                done, buf = self._packets(buf + data)
                for p in done:
                    if p[0] & 0xF0 == packets.PUBLISH:
                        start = packets.frame(p, 0)[0]
                        n = int.from_bytes(p[start : start + 2], "big")
                        topic = p[start + 2 : start + 2 + n].decode()
                        if self.swallowing(topic):
                            continue
                        if p[0] & 0x06 == 0x02:  # QoS 1
                            mid = int.from_bytes(p[start + 2 + n : start + 4 + n], "big")
                            self._topics[mid] = topic
                    up_writer.write(p)

        async def down() -> None:
            buf = b""
            while data := await up_reader.read(65536):
                done, buf = self._packets(buf + data)
                for p in done:
                    if self.paused:
                        self._paused.append(p)
                        self._more.set()
                        continue
                    if self.holding and p[0] & 0xF0 in self.withheld:
                        self._held.append(p)
                        continue
                    if self.holding and p[0] & 0xF0 == packets.PUBACK:
                        topic = self._topics.get(int.from_bytes(p[2:4], "big"), "")
                        if self._which(topic):
                            self._held.append(p)
                            continue
                    writer.write(p)

        await asyncio.gather(up(), down(), return_exceptions=True)
