"""A Python client for memory-worker, with the API of the in-process store it replaces.

    async with MemoryClient("127.0.0.1") as memory:      # or: open_memory("mqtt://pi.local")
        await memory.append("kiosk-7", "user", "hello")
        turns = await memory.get("kiosk-7")

`BlockingMemoryClient` offers the same methods without `await`, for threaded programs;
`open_memory(url)` / `open_blocking_memory(url)` pick a broker (`mqtt://`, `mqtts://`) or the
worker's own store in this process (`memory://`) from a URL. See docs/client.md.

Errors carry the wire code of the reply (or of the reply the worker would have sent, for
input refused before sending):

    MemoryWorkerError            (code)
    +-- BadPayloadError          bad_payload
    +-- BadRequestError          bad_request
    +-- TooLargeError            too_large
    +-- BadTopicError            bad_topic
    +-- UnavailableError         unavailable
    +-- InternalError            internal
    +-- NoReplyError             timeout; also a TimeoutError
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import itertools
import math
import socket
import ssl
import threading
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Final, TypedDict, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import aiomqtt
import msgpack
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from worker import constants as c
from worker.config import tls_context
from worker.errors import WorkerError
from worker.protocol import (
    check_request,
    decode_event,
    encode_result,
    reply_parsed,
    topic_name_problem,
)
from worker.store import Limits

_T = TypeVar("_T")


def _content_type(message: aiomqtt.Message) -> str | None:
    """Events, status and stats come as msgpack or JSON (the worker's --event-format)."""
    return getattr(message.properties, "ContentType", None) if message.properties else None


DEFAULT_TIMEOUT: Final = 5.0
DEFAULT_ATTEMPTS: Final = 3
# Without it every request/reply round trip waits ~40 ms (Nagle against delayed ACKs).
_NODELAY: Final = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
# memctl's stats waited this long for more retained snapshots after the first one.
_STATS_QUIET: Final = 0.3


# --- errors ---------------------------------------------------------------------------------


class MemoryWorkerError(Exception):
    """An error reply from the worker (or refused input), with its wire `code`."""

    code: ClassVar[str] = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadPayloadError(MemoryWorkerError):
    code = "bad_payload"


class BadRequestError(MemoryWorkerError):
    code = "bad_request"


class TooLargeError(MemoryWorkerError):
    code = "too_large"


class BadTopicError(MemoryWorkerError):
    code = "bad_topic"


class UnavailableError(MemoryWorkerError):
    code = "unavailable"


class InternalError(MemoryWorkerError):
    code = "internal"


class NoReplyError(MemoryWorkerError, TimeoutError):
    """No reply within `timeout` on any attempt (no worker, or no broker)."""

    code = "timeout"


# Every wire code's class, derived so that a new subclass cannot be forgotten here.
_BY_CODE: Final[dict[str, type[MemoryWorkerError]]] = {
    cls.code: cls for cls in MemoryWorkerError.__subclasses__() if cls is not NoReplyError
}


def error_for(code: str, message: str) -> MemoryWorkerError:
    """The exception for an error reply's code (InternalError for codes this client lacks)."""
    return _BY_CODE.get(code, InternalError)(message)


# --- results ----------------------------------------------------------------------------------


class Turn(TypedDict):
    role: str
    content: str
    ts: float
    seq: int


class Eviction(TypedDict):
    convo: str
    reason: str
    count: int
    keys: int
    ts: float


@dataclass(frozen=True, slots=True)
class Appended:
    """An append's reply: the turn's `seq` and how many turns the conversation holds."""

    seq: int
    count: int


def _refuse(convo: str, op: str, body: dict[str, Any]) -> None:
    """Raise what the worker would answer to this request, before sending it."""
    try:
        check_request(convo, op, body)
    except WorkerError as exc:
        raise error_for(exc.code, exc.message) from None


def _ok(reply: Any) -> dict[str, Any]:
    if not isinstance(reply, dict):
        raise BadPayloadError("reply is not a msgpack map")
    if not reply.get("ok"):
        error = reply.get("error") or {}
        raise error_for(str(error.get("code", "internal")), str(error.get("message", "")))
    return reply


class _Api:
    """The store's API on top of one `_request`, shared by every implementation."""

    async def _request(self, convo: str, op: str, body: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    async def append(
        self, convo_id: str, role: str, content: str, *, request_id: str | None = None
    ) -> Appended:
        """Store a turn; its `seq` and the conversation's turn `count`.

        `request_id` replaces the id the client makes: a repeat of the same id is stored once.
        """
        body: dict[str, Any] = {"role": role, "content": content}
        if request_id is not None:
            body["id"] = request_id
        reply = await self._request(convo_id, c.OP_APPEND, body)
        return Appended(reply["seq"], reply["count"])

    async def get(self, convo_id: str, last: int | None = None) -> list[Turn]:
        """The conversation's turns (the `last` ones), oldest first; [] when unknown."""
        body = {} if last is None else {"last": last}
        turns: list[Turn] = (await self._request(convo_id, c.OP_GET, body))["turns"]
        return turns

    async def forget(self, convo_id: str) -> int:
        """Delete a conversation and its state; how many turns were removed."""
        deleted: int = (await self._request(convo_id, c.OP_DELETE, {}))["deleted"]
        return deleted

    async def save(
        self,
        session_id: str,
        namespace: str,
        key: str,
        value: Any,
        ttl: float | None = None,
        *,
        request_id: str | None = None,
    ) -> None:
        """Save a state value (any msgpack value), for `ttl` seconds if given."""
        body: dict[str, Any] = {"ns": namespace, "key": key, "value": value}
        if request_id is not None:
            body["id"] = request_id
        if ttl is not None:
            body["ttl"] = ttl
        await self._request(session_id, c.OP_STATE_SAVE, body)

    async def load(self, session_id: str, namespace: str, key: str) -> Any:
        """A state value, or None when there is none."""
        body = {"ns": namespace, "key": key}
        return (await self._request(session_id, c.OP_STATE_LOAD, body))["value"]

    async def get_all(self, session_id: str, namespace: str) -> dict[str, Any]:
        """Every live key of a namespace with its value."""
        items: dict[str, Any] = (
            await self._request(session_id, c.OP_STATE_GET_ALL, {"ns": namespace})
        )["items"]
        return items

    async def delete(self, session_id: str, namespace: str, key: str) -> bool:
        """Delete a state key; whether it existed."""
        body = {"ns": namespace, "key": key}
        deleted: bool = (await self._request(session_id, c.OP_STATE_DELETE, body))["deleted"]
        return deleted


class _Fanout:
    """Eviction events handed to every open `evictions()` iterator."""

    def __init__(self) -> None:
        self.queues: dict[asyncio.Queue[Eviction], str | None] = {}

    def publish(self, event: Eviction) -> None:
        for queue, convo in self.queues.items():
            if convo is None or convo == event["convo"]:
                queue.put_nowait(event)

    @contextlib.contextmanager
    def listen(self, convo: str | None) -> Iterator[asyncio.Queue[Eviction]]:
        queue: asyncio.Queue[Eviction] = asyncio.Queue()
        self.queues[queue] = convo
        try:
            yield queue
        finally:
            del self.queues[queue]


# --- over MQTT ----------------------------------------------------------------------------


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
            await client.subscribe(self._inbox_filter(), qos=self.qos)
            for f in self._filters:
                await client.subscribe(f, qos=1)
        except BaseException:
            with contextlib.suppress(aiomqtt.MqttError):
                await client.__aexit__(None, None, None)
            raise
        self._client = client
        self._connected.set()

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
            try:
                if client is None:
                    await self._connect()
                    backoff = 0.05
                    continue
                async for message in client.messages:
                    self._dispatch(message)
            except aiomqtt.MqttError:
                pass
            await self._disconnect()
            for fut in self._waiting.values():
                if not fut.done():
                    fut.set_exception(_Lost())
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
        key = _key(body.get("id")) or next(self._n).to_bytes(8, "big")
        properties = None
        if self.protocol == 5:
            properties = copy.copy(self._properties.get(inbox) or self._template(inbox))
            properties.CorrelationData = key
        else:
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
                    self._waiting.pop(key, None)
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
            await self._client.subscribe(topic_filter, qos=1)

    async def _unsubscribe(self, topic_filter: str) -> None:
        self._filters[topic_filter] -= 1
        if not self._filters[topic_filter]:
            del self._filters[topic_filter]
            if self._client is not None:
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


# --- in this process ----------------------------------------------------------------------


class LocalMemory(_Api):
    """The worker's own store and protocol, in this process: the client's API without a
    broker (what `memory://` opens). Requests are checked, executed and answered by the
    same code the worker runs, so answers and errors are the same."""

    def __init__(self, limits: Limits | None = None) -> None:
        from worker.backends.memory import MemoryBackend

        self.limits = limits or Limits()
        self._backend = MemoryBackend(self.limits)
        self._events = _Fanout()
        self._sweeper: asyncio.Task[None] | None = None
        self._started = time.monotonic()

    async def __aenter__(self) -> LocalMemory:
        await self._backend.open()
        self._sweeper = asyncio.create_task(self._sweep(), name="memory-sweeper")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        await self._backend.close()

    async def _sweep(self) -> None:
        while True:
            more, evictions = await self._backend.expire()
            self._announce(evictions)
            if not more:
                await asyncio.sleep(c.SWEEP_INTERVAL)

    def _announce(self, evictions: list[Any]) -> None:
        for ev in evictions:
            self._events.publish(
                Eviction(convo=ev.convo, reason=ev.reason, count=ev.count, keys=ev.keys, ts=ev.ts)
            )

    async def _request(self, convo: str, op: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            request = check_request(convo, op, body)
        except WorkerError as exc:
            raise error_for(exc.code, exc.message) from None
        results, evictions = await self._backend.execute([request])
        self._announce(evictions)
        reply = msgpack.unpackb(encode_result(results[0], reply_parsed()), strict_map_key=False)
        return _ok(reply)

    async def evictions(self, convo_id: str | None = None) -> AsyncGenerator[Eviction, None]:
        """Eviction events as they come (of one conversation, or all), until you stop."""
        if convo_id is not None:
            _refuse(convo_id, c.OP_GET, {})
        with self._events.listen(convo_id) as queue:
            while True:
                yield await queue.get()

    async def stats(self) -> list[dict[str, Any]]:
        """This store's counts, shaped like one worker's stats."""
        n = self._backend.counts()
        return [
            {
                "client_id": "memory",
                "conversations": n.conversations,
                "turns": n.turns,
                "bytes": n.bytes,
                "keys": n.keys,
                "uptime": round(time.monotonic() - self._started, 3),
                "ts": time.time(),
            }
        ]


Memory = MemoryClient | LocalMemory


# --- blocking -----------------------------------------------------------------------------


class BlockingMemoryClient:
    """The same API without `await`, for threaded programs (Flask, Django, scripts).

    The async client (or `memory://` store) runs on a private event-loop thread; every
    thread's calls share its one connection. Use it as a plain context manager. Arguments
    are `MemoryClient`'s.
    """

    def __init__(self, *args: Any, _memory: Memory | None = None, **kwargs: Any) -> None:
        self._memory: Memory = _memory if _memory is not None else MemoryClient(*args, **kwargs)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def _run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        assert self._loop is not None, "use BlockingMemoryClient in a with block"
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("a blocking call on the client's own loop would wait forever")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def __enter__(self) -> BlockingMemoryClient:
        return self.open()

    def open(self) -> BlockingMemoryClient:
        """Connect (once; opening an open client does nothing). A `with` block does it."""
        if self._loop is not None:
            return self
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="memory-client", daemon=True)
        self._thread.start()
        try:
            self._run(self._enter())
        except BaseException:
            self._stop()
            raise
        return self

    async def _enter(self) -> None:
        # The client's events and tasks must be made on the loop they run on.
        await self._memory.__aenter__()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Disconnect and stop the private loop (closing a closed client does nothing)."""
        if self._loop is None:
            return
        try:
            self._run(self._memory.__aexit__(None, None, None))
        finally:
            self._stop()

    def _stop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None and self._thread is not None:
            loop.call_soon_threadsafe(loop.stop)
            self._thread.join()
            loop.close()

    async def run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Await `coro` (a call on `self.memory`) from any event loop: it runs on the
        client's own loop and connection, without blocking the caller's loop."""
        assert self._loop is not None, "use BlockingMemoryClient in a with block"
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    @property
    def memory(self) -> Memory:
        """The async client (or memory:// store) this one drives."""
        return self._memory

    def append(
        self, convo_id: str, role: str, content: str, *, request_id: str | None = None
    ) -> Appended:
        """See MemoryClient.append."""
        return self._run(self._memory.append(convo_id, role, content, request_id=request_id))

    def get(self, convo_id: str, last: int | None = None) -> list[Turn]:
        """See MemoryClient.get."""
        return self._run(self._memory.get(convo_id, last))

    def forget(self, convo_id: str) -> int:
        """See MemoryClient.forget."""
        return self._run(self._memory.forget(convo_id))

    def save(
        self,
        session_id: str,
        namespace: str,
        key: str,
        value: Any,
        ttl: float | None = None,
        *,
        request_id: str | None = None,
    ) -> None:
        """See MemoryClient.save."""
        self._run(self._memory.save(session_id, namespace, key, value, ttl, request_id=request_id))

    def load(self, session_id: str, namespace: str, key: str) -> Any:
        """See MemoryClient.load."""
        return self._run(self._memory.load(session_id, namespace, key))

    def get_all(self, session_id: str, namespace: str) -> dict[str, Any]:
        """See MemoryClient.get_all."""
        return self._run(self._memory.get_all(session_id, namespace))

    def delete(self, session_id: str, namespace: str, key: str) -> bool:
        """See MemoryClient.delete."""
        return self._run(self._memory.delete(session_id, namespace, key))

    def stats(self) -> list[dict[str, Any]]:
        """See MemoryClient.stats."""
        return self._run(self._memory.stats())

    def evictions(self, convo_id: str | None = None) -> Iterator[Eviction]:
        """Eviction events as they come, until you stop iterating."""
        events = self._memory.evictions(convo_id)
        try:
            while True:
                yield self._run(_next(events))
        finally:
            if self._loop is not None:
                self._run(events.aclose())


async def _next(events: AsyncIterator[Eviction]) -> Eviction:
    return await anext(events)


# --- the factory ----------------------------------------------------------------------------


def memory_from_url(url: str, **kwargs: Any) -> Memory:
    """An (unopened) async memory for `url`; keyword arguments go to MemoryClient.

    `mqtt://[user:password@]host[:port][/prefix]`, `mqtts://...` (TLS; `?ca=FILE`), with
    `?timeout=S&qos=N&reply_prefix=T&protocol=3` as options; or
    `memory://?max_turns=8&ttl=3600&max_conversations=500` (also `max_bytes`, `max_keys`).
    """
    parts = urlsplit(url)
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    if parts.scheme == "memory":
        fields = {f: query.pop(f) for f in list(query) if f in Limits.__slots__}
        if query:
            raise ValueError(f"memory:// does not take {', '.join(sorted(query))}")
        try:
            numbers: dict[str, Any] = {
                f: (float(v) if f == "ttl" else int(v)) for f, v in fields.items()
            }
            limits = Limits(**numbers)
        except ValueError:
            raise ValueError(f"bad number in {url!r}") from None
        return LocalMemory(limits)
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ValueError(f"{url!r}: the scheme must be mqtt, mqtts or memory")
    options: dict[str, Any] = {
        "username": unquote(parts.username) if parts.username else None,
        "password": unquote(parts.password) if parts.password else None,
        "tls": parts.scheme == "mqtts",
    }
    if parts.path.strip("/"):
        options["prefix"] = unquote(parts.path.strip("/"))
    convert: dict[str, Any] = {
        "ca": ("tls_ca", str),
        "timeout": ("timeout", float),
        "qos": ("qos", int),
        "reply_prefix": ("reply_prefix", str),
        "protocol": ("protocol", int),
        "attempts": ("attempts", int),
    }
    for name, text in query.items():
        if name not in convert:
            raise ValueError(f"{url!r}: unknown option {name!r}")
        field, kind = convert[name]
        options[field] = kind(text)
    options.update(kwargs)
    port = parts.port or (8883 if parts.scheme == "mqtts" else c.DEFAULT_PORT)
    return MemoryClient(parts.hostname or c.DEFAULT_HOST, port, **options)


@contextlib.asynccontextmanager
async def open_memory(url: str, **kwargs: Any) -> AsyncIterator[Memory]:
    """`async with open_memory(url) as memory:` a client or in-process store (see
    memory_from_url), opened for the block."""
    async with memory_from_url(url, **kwargs) as memory:
        yield memory


def open_blocking_memory(url: str, **kwargs: Any) -> BlockingMemoryClient:
    """The blocking API on `url`'s memory, already open (as `open()` opens a file): keep it
    (`store = open_blocking_memory(url)`, then `store.close()`) or use it in a `with` block."""
    return BlockingMemoryClient(_memory=memory_from_url(url, **kwargs)).open()


__all__ = [
    "Appended",
    "BadPayloadError",
    "BadRequestError",
    "BadTopicError",
    "BlockingMemoryClient",
    "Eviction",
    "InternalError",
    "LocalMemory",
    "MemoryClient",
    "MemoryWorkerError",
    "NoReplyError",
    "TooLargeError",
    "Turn",
    "UnavailableError",
    "error_for",
    "memory_from_url",
    "open_blocking_memory",
    "open_memory",
]
