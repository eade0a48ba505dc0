"""`MemoryClient`: the async client of memory-worker over one MQTT connection.

It rides the worker's own transport (worker/mqtt.py's `Connection`, with worker/packets.py's
codec), not aiomqtt's public publish and message queue: paho's decoding of every reply and
PUBACK into Properties objects, and aiomqtt's publish path, were two thirds of the client's
CPU. So the house has one MQTT path for both directions, under the same pinned versions and
guard tests; nothing of it shows in the client's API.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import ssl
import uuid
from collections.abc import AsyncGenerator
from typing import Any, Final

import aiomqtt
import msgpack

from worker import constants as c
from worker.client._api import _Api, _Fanout, _ok, _refuse
from worker.client._errors import BadRequestError, NoReplyError, RefusedError
from worker.client._models import Eviction
from worker.config import tls_context
from worker.mqtt import NODELAY, Connection, Message, login_refused, refusal
from worker.packets import PublishProperties
from worker.protocol import decode_event, topic_name_problem

DEFAULT_TIMEOUT: Final = 5.0
DEFAULT_ATTEMPTS: Final = 3
# memctl's stats waited this long for more retained snapshots after the first one.
_STATS_QUIET: Final = 0.3
# Writes retried after a timeout: an id of the client's makes a repeat the same request.
_AT_MOST_ONCE: Final = (c.OP_APPEND, c.OP_STATE_SAVE, c.OP_SUMMARY)


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
        self._mids: dict[bytes, int] = {}  # a waiting request's key -> its publish's id
        self._stats: set[asyncio.Queue[Message]] = set()  # one per stats() call
        self._events = _Fanout()
        self._under_prefix = prefix + "/"
        self._worker_topics = f"{prefix}/{c.WORKER_LEVEL}/"
        self._client: Connection | None = None  # once subscribed: requests may go
        self._properties: dict[str, PublishProperties] = {}  # reply topic -> its properties
        self._connected = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._closing = False

    # -- lifecycle --

    async def __aenter__(self) -> MemoryClient:
        try:
            await self._connect()
        except aiomqtt.MqttError as exc:
            raise unreachable(self.host, self.port, self._auth[0], exc) from exc
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
        # A fresh connection each time: a request the old one lost is the request's to send
        # again (with its id), not the connection's.
        client = Connection(
            lambda message: self._on_message(client, message),
            on_refused=self._on_refused,
            hostname=self.host,
            port=self.port,
            username=self._auth[0],
            password=self._auth[1],
            identifier=f"memory-client-{self.tag}",
            protocol=version,
            tls_context=self._tls,
            socket_options=[NODELAY],
            timeout=self.timeout,
        )
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

    async def _subscribe_on(self, client: Connection, topic_filter: str, qos: int) -> None:
        """Subscribe; RefusedError at once when the broker refuses (its ACL), rather than a
        NoReplyError after every attempt's timeout."""
        reason = refusal(await client.subscribe(topic_filter, qos=qos))
        if reason is not None:
            raise self._refused("subscription to", topic_filter, reason)

    def _refused(self, what: str, topic: str, reason: str) -> RefusedError:
        user = self._auth[0] or "<username>"
        # The project's roles (deploy/init-security); the client cannot know which is this user's.
        if topic == self._inbox_filter():
            hint = (
                "replies come there: set reply_prefix to a topic this user may read (with the "
                f"project's roles, a device's: reply_prefix='reply/{user}', memctl "
                f"--reply-prefix reply/{user}; the dashboard role's: reply/_conversations)"
            )
        else:
            hint = (
                f"check the prefix ({self.prefix!r}) and the broker's ACL for this user (with "
                f"the project's roles, a device asks under {self.prefix}/{user}/ with "
                f"reply_prefix='reply/{user}'; the dashboard role only lists conversations, "
                "with reply_prefix='reply/_conversations'; the summarizer role only gets and "
                "summarizes)"
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

    async def _read(self) -> None:
        """Reconnect when the connection drops; what waited then is sent again."""
        backoff = 0.05
        while not self._closing:
            client = self._client
            lost: Exception = _Lost()
            try:
                if client is None:
                    await self._connect()
                    backoff = 0.05
                    continue
                await client.wait_disconnected()
            except aiomqtt.MqttError as exc:
                if login_refused(exc):  # on reconnecting: the password changed since
                    lost = unreachable(self.host, self.port, self._auth[0], exc)
            except RefusedError as exc:  # on reconnecting: the ACL changed since
                lost = exc
            await self._disconnect()
            for fut in self._waiting.values():
                if not fut.done():
                    fut.set_exception(lost)
            self._waiting.clear()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)

    def _on_message(self, client: Connection, message: Message) -> None:
        """Every PUBLISH, as the transport reads it: a reply completes its request at once (no
        queue, no task); events and stats go to their listeners."""
        if not message.topic.startswith(self._under_prefix):
            self._answer(message)
        elif message.topic.startswith(self._worker_topics):
            for queue in self._stats:
                queue.put_nowait(message)
        elif message.topic.endswith("/" + c.EVICTED):
            with contextlib.suppress(Exception):
                self._events.publish(decode_event(message.payload, None))
        if message.qos:
            # After the answer, whose task then runs first on the next turn of the loop: the
            # request it sends next goes out in the same write as this acknowledgement.
            client.acknowledge(message.mid, message.qos)

    def _answer(self, message: Message) -> None:
        try:
            reply = msgpack.unpackb(message.payload, strict_map_key=False)
        except Exception:  # not a reply of ours: nobody waits for it
            return
        key: Any = message.correlation
        if key is None and isinstance(reply, dict):
            key = _key(reply.get("id"))
        fut = self._waiting.pop(key, None) if isinstance(key, bytes) else None
        if fut is not None and not fut.done():
            fut.set_result(reply)

    def _on_refused(self, mid: int, reason: str) -> None:
        """The broker refused a request's publish (an MQTT 5 PUBACK said so): fail it now."""
        for key, sent in self._mids.items():
            if sent == mid:
                fut = self._waiting.get(key)
                if fut is not None and not fut.done():
                    fut.set_exception(_PublishRefused(reason))
                return

    # -- requests --

    async def _request(self, convo: str, op: str, body: dict[str, Any]) -> dict[str, Any]:
        safe = op not in (c.OP_DELETE, c.OP_STATE_DELETE)
        if "id" not in body and (op in _AT_MOST_ONCE or self.protocol == 3):
            body["id"] = f"{self.tag}-{next(self._n)}"
        _refuse(convo, op, body)
        inbox = f"{self.reply_prefix.replace('{convo}', convo)}/{self.tag}"
        if self.protocol == 5:
            # Each request's own: the same request_id twice at once gets two replies.
            key = next(self._n).to_bytes(8, "big")
            props = (self._properties.get(inbox) or self._template(inbox))(key)
        else:
            key = _key(body["id"]) or b""
            body["reply_to"] = inbox
            props = b""
        payload = msgpack.packb(body)
        topic = f"{self.prefix}/{convo}/{op}"
        loop = asyncio.get_running_loop()
        for attempt in range(1, self.attempts + 1):
            last = attempt == self.attempts or not safe
            fut: asyncio.Future[dict[str, Any]] = loop.create_future()
            timer: asyncio.TimerHandle | None = None
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
                # PUBACK; a PUBACK that refuses fails it (_on_refused), as a lost connection does.
                self._mids[key] = client.publish_packed(topic, payload, self.qos, False, props)
                return _ok(await fut)
            except _PublishRefused as exc:
                raise self._refused("publish to", topic, exc.reason) from None
            except (TimeoutError, _Lost) as exc:
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
                if self._waiting.get(key) is fut:  # timed out, lost or cancelled
                    del self._waiting[key]
                self._mids.pop(key, None)
        raise AssertionError("unreachable")  # pragma: no cover

    def _template(self, inbox: str) -> PublishProperties:
        """The properties of requests answered on `inbox`, encoded once (but their Correlation
        Data) when every request is answered there."""
        properties = PublishProperties(response_topic=inbox)
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
        queue: asyncio.Queue[Message] = asyncio.Queue()
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
                if message.topic in seen:
                    break
                seen[message.topic] = decode_event(message.payload, None)
                wait = _STATS_QUIET
        finally:
            self._stats.discard(queue)
            await self._unsubscribe(topic_filter)
        return list(seen.values())


def _expire(reply: asyncio.Future[Any]) -> None:
    if not reply.done():
        reply.set_exception(TimeoutError())


class _PublishRefused(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


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


def unreachable(
    host: str, port: int, username: str | None, exc: aiomqtt.MqttError
) -> NoReplyError | RefusedError:
    """Why connecting failed: RefusedError when the broker refused the login (a wrong
    username or password is not a broker that is down), NoReplyError otherwise."""
    if login_refused(exc):
        who = repr(username) if username else "an anonymous client"
        return RefusedError(
            f"the broker at {host}:{port} refused the login of {who} ({exc}): check the "
            "username and password",
            "",
            str(exc),
        )
    return NoReplyError(f"cannot reach the broker at {host}:{port}: {exc}")
