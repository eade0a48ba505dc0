"""`MemoryClient`: the async client of memory-worker over one MQTT connection."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import itertools
import math
import socket
import ssl
import uuid
from collections.abc import AsyncGenerator
from typing import Any, Final

import aiomqtt
import msgpack
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from worker import constants as c
from worker.client._api import _Api, _Fanout, _ok, _refuse
from worker.client._errors import BadRequestError, NoReplyError, RefusedError
from worker.client._models import Eviction
from worker.config import tls_context
from worker.mqtt import refusal
from worker.protocol import decode_event, topic_name_problem

DEFAULT_TIMEOUT: Final = 5.0
DEFAULT_ATTEMPTS: Final = 3
# Without it every request/reply round trip waits ~40 ms (Nagle against delayed ACKs).
_NODELAY: Final = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
# memctl's stats waited this long for more retained snapshots after the first one.
_STATS_QUIET: Final = 0.3


def _content_type(message: aiomqtt.Message) -> str | None:
    """Events, status and stats come as msgpack or JSON (the worker's --event-format)."""
    return getattr(message.properties, "ContentType", None) if message.properties else None


class _Lost(Exception):
    """The connection dropped while a request waited: send it again once reconnected."""


class MemoryClient(_Api):
    """An async client of memory-worker over one MQTT connection.

    Args:
        host, port: the broker.
        prefix: the worker's topic prefix (`--prefix`).
        username, password: broker credentials.
        tls_ca: CA certificate to verify the broker with; connects with TLS.
        tls: connect with TLS verified against the system's CAs (when `tls_ca` is not given).
        timeout: seconds to wait for each attempt's reply (and for connecting).
        qos: QoS of requests and replies (0 or 1).
        reply_prefix: replies come to `<reply_prefix>/<client tag>`; `{convo}` in it becomes
            the conversation id (for a worker run with `--route-prefix reply/{convo}`).
        protocol: 5 (replies matched by Correlation Data) or 3 (MQTT 3.1.1: replies routed
            by `reply_to` in the payload and matched by the echoed `id`).
        attempts: how many times a request safe to repeat is sent before NoReplyError.
            Appends and saves carry an id made by the client, so the worker applies a
            repeat at most once; reads are repeated as they are; a conversation or key
            delete is sent once.

    Use it as an async context manager; any number of tasks may share it.
    """

    def __init__(
        self,
        host: str = c.DEFAULT_HOST,
        port: int = c.DEFAULT_PORT,
        prefix: str = c.DEFAULT_PREFIX,
        *,
        username: str | None = None,
        password: str | None = None,
        tls_ca: str | None = None,
        tls: bool = False,
        timeout: float = DEFAULT_TIMEOUT,
        qos: int = 1,
        reply_prefix: str | None = None,
        protocol: int = 5,
        attempts: int = DEFAULT_ATTEMPTS,
    ) -> None:
        if protocol not in (3, 5):
            raise ValueError("protocol must be 5 or 3 (MQTT 3.1.1)")
        if qos not in (0, 1):
            raise ValueError("qos must be 0 or 1")
        self.host, self.port, self.prefix = host, port, prefix
        self.timeout, self.qos, self.protocol = timeout, qos, protocol
        self.attempts = max(1, attempts)
        self.tag = uuid.uuid4().hex[:12]
        self.reply_prefix = reply_prefix or f"{prefix}-reply"
        check_reply_prefix(self.reply_prefix, prefix)
        self._auth = (username, password)
        self._tls: ssl.SSLContext | None = (
            tls_context(tls_ca) if tls_ca else ssl.create_default_context() if tls else None
        )
        self._n = itertools.count(1)
        self._waiting: dict[bytes, asyncio.Future[dict[str, Any]]] = {}
        self._filters: dict[str, int] = {}  # extra subscriptions (events, stats) -> users
        self._stats: set[asyncio.Queue[aiomqtt.Message]] = set()  # one per stats() call
        self._events = _Fanout()
        self._client: aiomqtt.Client | None = None
        self._properties: dict[str, Properties] = {}  # reply topic -> a request's template
        self._connected = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._closing = False

    # -- lifecycle --

    async def __aenter__(self) -> MemoryClient:
        try:
            await self._connect()
        except aiomqtt.MqttError as exc:
            raise NoReplyError(
                f"cannot reach the broker at {self.host}:{self.port}: {exc}"
            ) from exc
        self._reader = asyncio.create_task(self._read(), name="memory-client-reader")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._closing = True
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        await self._disconnect()

    def _inbox_filter(self) -> str:
        return f"{self.reply_prefix.replace('{convo}', '+')}/{self.tag}"

    async def _connect(self) -> None:
        version = aiomqtt.ProtocolVersion.V5 if self.protocol == 5 else aiomqtt.ProtocolVersion.V311
        client = aiomqtt.Client(
            self.host,
            self.port,
            username=self._auth[0],
            password=self._auth[1],
            identifier=f"memory-client-{self.tag}",
            protocol=version,
            tls_context=self._tls,
            socket_options=[_NODELAY],
            timeout=self.timeout,
            queue_type=self._inbox(),
        )
        # Many concurrent requests are the point of one shared client, not a sign of trouble.
        client.pending_calls_threshold = 1 << 30
        await client.__aenter__()
        try:
            await self._subscribe_on(client, self._inbox_filter(), self.qos)
            for f in self._filters:
                await self._subscribe_on(client, f, 1)
        except BaseException:
            with contextlib.suppress(aiomqtt.MqttError):
                await client.__aexit__(None, None, None)
            raise
        self._client = client
        self._connected.set()

    async def _subscribe_on(self, client: aiomqtt.Client, topic_filter: str, qos: int) -> None:
        """Subscribe; RefusedError at once when the broker refuses (its ACL), rather than a
        NoReplyError after every attempt's timeout."""
        reason = refusal(await client.subscribe(topic_filter, qos=qos))
        if reason is not None:
            raise self._refused("subscription to", topic_filter, reason)

    def _refused(self, what: str, topic: str, reason: str) -> RefusedError:
        user = self._auth[0] or "<username>"
        if topic == self._inbox_filter():
            hint = (
                "replies come there: set reply_prefix to a topic this user may read "
                f"(with the project's ACL: reply_prefix='reply/{user}', memctl --reply-prefix "
                f"reply/{user})"
            )
        else:
            hint = (
                f"check the prefix ({self.prefix!r}) and the broker's ACL for this user "
                f"(the project's lets a device ask under {self.prefix}/{user}/ and read "
                f"replies under reply_prefix='reply/{user}')"
            )
        return RefusedError(
            f"the broker at {self.host}:{self.port} refused the {what} {topic!r} ({reason}): "
            + hint,
            topic,
            reason,
        )

    async def _disconnect(self) -> None:
        self._connected.clear()
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(aiomqtt.MqttError, RuntimeError):
                await client.__aexit__(None, None, None)

    def _inbox(self) -> type[asyncio.Queue[aiomqtt.Message]]:
        """aiomqtt's incoming queue (its `queue_type`), which hands each reply to its request
        as paho reads it: a reply then costs no trip through the queue and `messages` (a
        task and an `asyncio.wait` per message). Events and stats are queued as usual."""
        answer = self._answer

        class Inbox(asyncio.Queue[aiomqtt.Message]):
            def put_nowait(self, item: aiomqtt.Message) -> None:
                if not answer(item):
                    super().put_nowait(item)

        return Inbox

    async def _read(self) -> None:
        """Hand events and stats to their listeners; reconnect when the connection drops."""
        backoff = 0.05
        while not self._closing:
            client = self._client
            lost: Exception = _Lost()
            try:
                if client is None:
                    await self._connect()
                    backoff = 0.05
                    continue
                async for message in client.messages:
                    self._dispatch(message)
            except aiomqtt.MqttError:
                pass
            except RefusedError as exc:  # on reconnecting: the ACL changed since
                lost = exc
            await self._disconnect()
            for fut in self._waiting.values():
                if not fut.done():
                    fut.set_exception(lost)
            self._waiting.clear()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)

    def _answer(self, message: aiomqtt.Message) -> bool:
        """Complete the request a reply answers; False for messages under the prefix (events
        and stats). Runs inside paho's read callback, so it must not raise."""
        if message.topic.value.startswith(self.prefix + "/"):
            return False
        try:
            reply = msgpack.unpackb(message.payload, strict_map_key=False)
        except Exception:  # not a reply of ours: nobody waits for it
            return True
        key: Any = getattr(message.properties, "CorrelationData", None)
        if key is None and isinstance(reply, dict):
            key = _key(reply.get("id"))
        fut = self._waiting.pop(key, None) if isinstance(key, bytes) else None
        if fut is not None and not fut.done():
            fut.set_result(reply)
        return True

    def _dispatch(self, message: aiomqtt.Message) -> None:
        topic = message.topic.value
        if topic.startswith(f"{self.prefix}/{c.WORKER_LEVEL}/"):
            for queue in self._stats:
                queue.put_nowait(message)
            return
        if topic.endswith("/" + c.EVICTED):
            with contextlib.suppress(Exception):
                self._events.publish(decode_event(message.payload, _content_type(message)))

    # -- requests --

    async def _request(self, convo: str, op: str, body: dict[str, Any]) -> dict[str, Any]:
        safe = op not in (c.OP_DELETE, c.OP_STATE_DELETE)
        if "id" not in body and (op in (c.OP_APPEND, c.OP_STATE_SAVE) or self.protocol == 3):
            body["id"] = f"{self.tag}-{next(self._n)}"
        _refuse(convo, op, body)
        inbox = f"{self.reply_prefix.replace('{convo}', convo)}/{self.tag}"
        properties = None
        if self.protocol == 5:
            # Each request's own: the same request_id twice at once gets two replies.
            key = next(self._n).to_bytes(8, "big")
            properties = copy.copy(self._properties.get(inbox) or self._template(inbox))
            properties.CorrelationData = key
        else:
            key = _key(body["id"]) or b""
            body["reply_to"] = inbox
        payload = msgpack.packb(body)
        topic = f"{self.prefix}/{convo}/{op}"
        loop = asyncio.get_running_loop()
        for attempt in range(1, self.attempts + 1):
            last = attempt == self.attempts or not safe
            fut: asyncio.Future[dict[str, Any]] = loop.create_future()
            sending: asyncio.Future[None] | None = None
            timer: asyncio.TimerHandle | None = None
            answered = False
            try:
                # MQTT 3.1.1: a reply names only its id, so a request whose id is in flight
                # (the same request_id twice at once) waits for that one's answer first.
                while (other := self._waiting.get(key)) is not None:
                    await asyncio.wait([other])
                deadline = loop.time() + self.timeout
                client = self._client
                if client is None:
                    async with asyncio.timeout_at(deadline):
                        await self._connected.wait()
                    client = self._client
                    assert client is not None
                self._waiting[key] = fut
                # A timer that fails the reply's future: a third of what asyncio.timeout costs.
                timer = loop.call_at(deadline, _expire, fut)
                # The reply implies delivery, so the request waits for it alone, not for the
                # PUBACK first; the publish fails the request when it fails. Its own timeout is
                # ours (math.inf spares aiomqtt's wait_for a task and a timer).
                sending = asyncio.ensure_future(
                    client.publish(
                        topic, payload, qos=self.qos, properties=properties, timeout=math.inf
                    )
                )
                sending.add_done_callback(functools.partial(_fail_with_publish, fut))
                reply = await fut
                answered = True
                return _ok(reply)
            except (TimeoutError, _Lost, aiomqtt.MqttError) as exc:
                if last:
                    why = "no reply" if isinstance(exc, TimeoutError) else "connection lost"
                    raise NoReplyError(
                        f"{why} from memory-worker on {self.host}:{self.port} "
                        f"(prefix {self.prefix!r}) within {self.timeout}s"
                        + (f", {attempt} attempts" if attempt > 1 else "")
                    ) from None
            finally:
                if timer is not None:
                    timer.cancel()
                if not answered:  # timed out, lost, failed or cancelled: nothing waits now
                    if self._waiting.get(key) is fut:
                        del self._waiting[key]
                    if sending is not None:
                        sending.cancel()
        raise AssertionError("unreachable")  # pragma: no cover

    def _template(self, inbox: str) -> Properties:
        """The properties of requests answered on `inbox`, but their Correlation Data: copying
        it costs a third of building paho's Properties anew."""
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        properties.ResponseTopic = inbox
        if "{convo}" not in self.reply_prefix:
            self._properties[inbox] = properties
        return properties

    # -- events and stats --

    async def _subscribe(self, topic_filter: str, *, again: bool = False) -> None:
        """Subscribe once per filter; `again` subscribes anyway, for the retained messages
        a subscription brings."""
        self._filters[topic_filter] = self._filters.get(topic_filter, 0) + 1
        if (again or self._filters[topic_filter] == 1) and self._client is not None:
            try:
                await self._subscribe_on(self._client, topic_filter, 1)
            except BaseException:
                self._drop_filter(topic_filter)
                raise

    def _drop_filter(self, topic_filter: str) -> bool:
        """One user fewer; whether it was the last."""
        self._filters[topic_filter] -= 1
        if self._filters[topic_filter]:
            return False
        del self._filters[topic_filter]
        return True

    async def _unsubscribe(self, topic_filter: str) -> None:
        if self._drop_filter(topic_filter) and self._client is not None:
            with contextlib.suppress(aiomqtt.MqttError):
                await self._client.unsubscribe(topic_filter)

    async def evictions(self, convo_id: str | None = None) -> AsyncGenerator[Eviction, None]:
        """Eviction events as they come (of one conversation, or all), until you stop."""
        if convo_id is not None:
            _refuse(convo_id, c.OP_GET, {})
        topic_filter = f"{self.prefix}/{convo_id or '+'}/{c.EVICTED}"
        with self._events.listen(convo_id) as queue:
            await self._subscribe(topic_filter)
            try:
                while True:
                    yield await queue.get()
            finally:
                await self._unsubscribe(topic_filter)

    async def stats(self) -> list[dict[str, Any]]:
        """Each worker's latest (retained) stats snapshot; [] when no worker ever ran."""
        topic_filter = f"{self.prefix}/{c.WORKER_LEVEL}/+/stats"
        queue: asyncio.Queue[aiomqtt.Message] = asyncio.Queue()
        self._stats.add(queue)
        seen: dict[str, dict[str, Any]] = {}
        await self._subscribe(topic_filter, again=True)
        try:
            wait = self.timeout
            while True:
                try:
                    async with asyncio.timeout(wait):
                        message = await queue.get()
                except TimeoutError:
                    break
                if message.topic.value in seen:
                    break
                seen[message.topic.value] = decode_event(message.payload, _content_type(message))
                wait = _STATS_QUIET
        finally:
            self._stats.discard(queue)
            await self._unsubscribe(topic_filter)
        return list(seen.values())


def _expire(reply: asyncio.Future[Any]) -> None:
    if not reply.done():
        reply.set_exception(TimeoutError())


def _fail_with_publish(reply: asyncio.Future[Any], sending: asyncio.Future[None]) -> None:
    """A failed publish fails the request waiting for its reply (it is then sent again)."""
    if sending.cancelled():
        return
    exc = sending.exception()
    if exc is not None and not reply.done():
        reply.set_exception(exc)


def _key(req_id: Any) -> bytes | None:
    if isinstance(req_id, str):
        return req_id.encode()
    if isinstance(req_id, bytes):
        return req_id
    return None


def check_reply_prefix(reply_prefix: str, prefix: str) -> None:
    """Raise BadRequestError unless the worker may publish replies under `reply_prefix`."""
    problem = topic_name_problem(reply_prefix.replace("{convo}", "x"))
    if problem is None and reply_prefix.startswith("$"):
        problem = "topics starting with $ are the broker's"
    if problem is None and (reply_prefix == prefix or reply_prefix.startswith(prefix + "/")):
        problem = f"replies must not go under {prefix}/"
    if problem is None and reply_prefix.endswith("/"):
        problem = "must not end with /"
    if problem:
        raise BadRequestError(f"reply prefix {reply_prefix!r}: {problem}")
