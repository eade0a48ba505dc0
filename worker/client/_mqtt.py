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
import contextvars
import itertools
import ssl
import uuid
from collections.abc import AsyncGenerator, Callable, Generator
from typing import Any, Final, Literal, TypeVar

import aiomqtt
import msgpack

from worker import constants as c
from worker.client._api import _Api, _Fanout, _not_open, _ok, _refuse, ask_again
from worker.client._errors import BadRequestError, NoReplyError, RefusedError, TooLargeError
from worker.client._models import Eviction
from worker.config import tls_context
from worker.mqtt import NODELAY, Connection, Message, login_refused, refusal
from worker.packets import PublishProperties, oversize
from worker.protocol import decode_event, decode_status, topic_name_problem, validate_prefix

_T = TypeVar("_T")

DEFAULT_TIMEOUT: Final = 5.0
DEFAULT_ATTEMPTS: Final = 3
# memctl's stats waited this long for more retained snapshots after the first one.
_STATS_QUIET: Final = 0.3
# Writes: an id of the client's makes a repeat the same request (a retry after a timeout,
# or what a broker restored from its last autosave delivers again).
_AT_MOST_ONCE: Final = (
    c.OP_APPEND,
    c.OP_DELETE,
    c.OP_STATE_SAVE,
    c.OP_STATE_DELETE,
    c.OP_SUMMARY,
)


_Prepared = tuple[bytes, str, bytes, bytes]  # key, topic, payload, properties


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
        qos: QoS of requests (0 or 1). Replies come at QoS 0 whatever it is: the client's
            session ends with its connection, so a QoS 1 reply (an acknowledgement each, and
            the broker's in-flight state) saves nothing; a request whose reply is lost with
            the connection is sent again (a write with its id).
        reply_prefix: replies come to `<reply_prefix>/<client tag>`; `{convo}` in it becomes
            the conversation id (for a worker run with `--route-prefix reply/{convo}`).
        protocol: 5 (replies matched by Correlation Data) or 3 (MQTT 3.1.1: each request
            names a reply topic of its own, `reply_to` in the payload, and is matched by it).
        attempts: how many times a request is sent before NoReplyError. Writes (deletes
            too) carry an id made by the client, so the worker applies a repeat at most
            once; reads are repeated as they are.
        replies: False for a client that only watches (evictions(), stats()): it subscribes
            to no reply topic, so a login that may not read one (a dashboard's) can use it;
            a request then raises RuntimeError.

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
        replies: bool = True,
    ) -> None:
        if protocol not in (3, 5):
            raise ValueError("protocol must be 5 or 3 (MQTT 3.1.1)")
        if qos not in (0, 1):
            raise ValueError("qos must be 0 or 1")
        try:
            check_host(host)
        except ValueError as exc:
            if isinstance(host, str) and "://" in host:  # the hint is for the class's callers
                raise ValueError(f"{exc} (open_memory() takes URLs)") from None
            raise
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise ValueError(f"port must be a number from 1 to 65535, not {port!r}")
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
            raise ValueError(f"timeout must be more than 0 seconds, not {timeout!r}")  # NaN too
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            raise ValueError(f"attempts must be a whole number from 1, not {attempts!r}")
        try:
            validate_prefix(prefix)
        except ValueError as exc:
            raise ValueError(f"prefix {prefix!r}: {exc}") from None
        self.host, self.port, self.prefix = host, port, prefix
        self.timeout, self.qos, self.protocol = timeout, qos, protocol
        self.attempts = attempts
        self._replies = replies
        self.tag = uuid.uuid4().hex[:12]
        self._reply_prefix = reply_prefix or f"{prefix}-reply"
        check_reply_prefix(self._reply_prefix, prefix)
        # Every request's inbox, unless it names the conversation.
        self._inbox = "" if "{convo}" in self.reply_prefix else f"{self.reply_prefix}/{self.tag}"
        self._auth = (username, password)
        self._tls: ssl.SSLContext | None = (
            tls_context(tls_ca) if tls_ca else ssl.create_default_context() if tls else None
        )
        self._n = itertools.count(1)
        self._waiting: dict[bytes, _Reply] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._deadlines: dict[bytes, float] = {}  # a waiting request's key -> when it expires
        self._sweep: asyncio.TimerHandle | None = None  # at the earliest of _deadlines
        self._filters: dict[str, int] = {}  # extra subscriptions (events, stats) -> users
        self._mids: dict[bytes, int] = {}  # a waiting request's key -> its publish's id
        self._stats: set[asyncio.Queue[Message]] = set()  # one per stats() call
        self._events = _Fanout()
        self._under_prefix = prefix + "/"
        self._worker_topics = f"{prefix}/{c.WORKER_LEVEL}/"
        self._client: Connection | None = None  # once subscribed: requests may go
        self._properties: dict[str, PublishProperties] = {}  # reply topic -> its properties
        self._shut = asyncio.Event()  # set by __aexit__: ends a pause before asking again
        self._reader: asyncio.Task[None] | None = None
        self._open = False  # between __aenter__'s connection and __aexit__
        self._opening = False
        self._max_packet: int | None = None  # the broker's Maximum Packet Size (MQTT 5)
        self._refusal: RefusedError | None = None  # the last reconnection's, while it lasts
        self._tried = asyncio.Event()  # set (and made anew) when a reconnection succeeds or fails

    @property
    def reply_prefix(self) -> str:
        """Where replies come (read-only: the client subscribes there, and the inbox and
        request properties derived from it are made once)."""
        return self._reply_prefix

    # -- lifecycle --

    async def __aenter__(self) -> MemoryClient:
        if self._open or self._opening:
            raise RuntimeError("the memory client is already open: one `async with` at a time")
        self._opening = True
        try:
            # What belonged to an earlier opening, maybe on another loop, starts afresh.
            self._loop = asyncio.get_running_loop()
            self._sweep = None
            self._tried = asyncio.Event()
            self._shut = asyncio.Event()
            try:
                await self._connect()
            except aiomqtt.MqttError as exc:
                raise unreachable(
                    self.host, self.port, self._auth[0], exc, tls=self._tls is not None
                ) from exc
            self._open = True
        finally:
            self._opening = False
        self._reader = asyncio.create_task(
            self._read(), name="memory-client-reader", context=contextvars.Context()
        )
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            # Python 3.11's asyncio.wait_for (aiomqtt's) drops a cancel that comes as what
            # it waits for is done: the task went on into its block, and waited there for
            # ever (a chaos trial, 1 in 10 opens cancelled a millisecond in).
            await self.__aexit__(None, None, None)
            raise asyncio.CancelledError
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._open = False
        self._shut.set()
        try:
            if self._reader is not None:
                self._reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._reader
            await self._disconnect()
        finally:
            # What still waits fails now, not after its timeouts.
            for fut in self._waiting.values():
                if not fut.done():
                    fut.set_exception(_closed_while_waiting())
            self._waiting.clear()
            self._mids.clear()
            self._deadlines.clear()
            self._events.end()
            self._tried.set()  # wakes the tasks waiting to connect: they see it closed

    def _inbox_filter(self) -> str:
        return inbox_filter(self.reply_prefix, self.tag, self.protocol)

    async def _connect(self) -> None:
        version = aiomqtt.ProtocolVersion.V5 if self.protocol == 5 else aiomqtt.ProtocolVersion.V311
        # A fresh connection each time: a request the old one lost is the request's to send
        # again (with its id), not the connection's.
        client = Connection(
            lambda message: self._on_message(client, message),
            on_refused=self._on_refused,
            flush_after_read=True,
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
            if self._replies:
                await self._subscribe_on(client, self._inbox_filter(), 0)
            # Until every filter is on it: a call's own may come or go meanwhile (events(),
            # stats()), seeing no connection to subscribe or unsubscribe on.
            done: set[str] = set()
            while todo := [f for f in self._filters if f not in done]:
                for f in todo:
                    if f in self._filters:
                        await self._subscribe_on(client, f, 1)
                    done.add(f)
        except BaseException:
            with contextlib.suppress(aiomqtt.MqttError):
                await client.__aexit__(None, None, None)
            raise
        self._client = client
        self._refusal = None
        self._max_packet = client.broker_max_packet

    async def _subscribe_on(self, client: Connection, topic_filter: str, qos: int) -> None:
        """Subscribe; RefusedError at once when the broker refuses (its ACL), rather than a
        NoReplyError after every attempt's timeout."""
        reason = refusal(await client.subscribe(topic_filter, qos=qos), self.protocol == 5)
        if reason is not None:
            raise self._refused("subscription to", topic_filter, reason)

    def _refused(self, what: str, topic: str, reason: str) -> RefusedError:
        user = self._auth[0] or "<username>"
        # The project's roles (deploy/init-security); the client cannot know which is this user's.
        # The client's inbox, or a blocking call's connection's (its tag and "-<n>").
        if topic.startswith(f"{self.prefix}/{c.WORKER_LEVEL}/"):
            hint = (
                "with the project's roles the dashboard's login reads the workers' topics "
                "(memctl stats), and only the workers' own may clear them (memctl retire: "
                "memory-worker, MEMORY_WORKER_USERNAME and MEMORY_WORKER_PASSWORD of its env "
                "file, docs/dashboards.md)"
            )
        elif topic.startswith(inbox_filter(self.reply_prefix, self.tag, 5)):
            ours = (
                "the dashboard role's: reply_prefix='reply/_conversations', memctl "
                "--reply-prefix reply/_conversations"
            )
            theirs = (
                f"a device's (deploy/add-user {user}): reply_prefix='reply/{user}', memctl "
                f"--reply-prefix reply/{user}; an app's (deploy/add-user --app {user}): "
                "reply_prefix='reply/{convo}'"
            )
            hint = (
                "replies come there: set reply_prefix to a topic this user may read (with the "
                "project's roles, "
                + (f"{ours}; {theirs})" if user == "dashboard" else f"{theirs}; {ours})")
            )
        elif topic.endswith((f"/{c.EVICTED}", f"/{c.TRIMMED}")):
            hint = (
                "with the project's roles the dashboard's login reads eviction events (memctl "
                "watch --username dashboard), and only memory-summarizer's the trimmed turns"
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
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(aiomqtt.MqttError, RuntimeError):
                await client.__aexit__(None, None, None)

    async def _read(self) -> None:
        """Reconnect when the connection drops; what waited then is sent again."""
        backoff = 0.05
        while self._open:
            client = self._client
            lost: Exception = _Lost()
            try:
                if client is None:
                    await self._connect()
                    self._said_tried()
                    backoff = 0.05
                    continue
                await client.wait_disconnected()
            except aiomqtt.MqttError as exc:
                # On reconnecting: the password changed since, or the broker's certificate.
                why = unreachable(
                    self.host, self.port, self._auth[0], exc, tls=self._tls is not None
                )
                if isinstance(why, RefusedError):
                    lost = why
            except RefusedError as exc:  # on reconnecting: the ACL changed since
                lost = exc
            # What the broker said: a request waiting for a reconnection fails with it (it
            # was "lost the broker" after its timeouts, for ever).
            self._refusal = lost if isinstance(lost, RefusedError) else None
            await self._disconnect()
            if client is None:
                self._said_tried()
            for fut in self._waiting.values():
                if not fut.done():
                    fut.set_exception(lost)
            self._waiting.clear()
            self._mids.clear()  # message ids are the lost connection's
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)

    def _on_message(self, client: Connection, message: Message) -> None:
        """Every PUBLISH, as the transport reads it: a reply completes its request at once (no
        queue, no task); events and stats go to their listeners."""
        if message.qos:  # events and stats (replies come at QoS 0)
            # First: what its handling sends goes out at once, in one write with it (the
            # transport writes at once what a read's last message makes).
            client.acknowledge(message.mid, message.qos)
        if not message.topic.startswith(self._under_prefix):
            self._answer(message)
        elif message.topic.startswith(self._worker_topics):
            for queue in self._stats:
                queue.put_nowait(message)
        elif message.topic.endswith("/" + c.EVICTED):
            with contextlib.suppress(Exception):
                self._events.publish(decode_event(message.payload, None))

    def _answer(self, message: Message) -> None:
        try:
            reply = msgpack.unpackb(message.payload, strict_map_key=False)
        except Exception:  # not a reply of ours: nobody waits for it
            return
        key = message.correlation if self.protocol == 5 else reply_key(message.topic)
        if key is None:  # MQTT 5 without Correlation Data: not a reply of ours
            return
        fut = self._waiting.pop(key, None)
        if fut is not None:
            self._mids.pop(key, None)
            if not fut.done():
                fut.resolve(reply)

    def _on_refused(self, mid: int, reason: str) -> None:
        """The broker refused a request's publish (an MQTT 5 PUBACK said so): fail it now."""
        for key, sent in self._mids.items():
            if sent == mid:
                # Gone from both maps now (a thread's request has no task to clean up after it).
                del self._mids[key]
                fut = self._waiting.pop(key, None)
                if fut is not None and not fut.done():
                    fut.set_exception(_PublishRefused(reason))
                return

    # -- requests --

    def _said_tried(self) -> None:
        tried, self._tried = self._tried, asyncio.Event()
        tried.set()

    async def _reconnected(self, sent: bool) -> Connection:
        """The connection, once a reconnection is let in; the broker's refusal when the next
        one is not (not an earlier one's: the login may have been mended since), or, for a
        request an earlier attempt of which went out, NoReplyError saying so."""
        while True:
            await self._tried.wait()
            if self._client is not None:
                return self._client
            if not self._open:
                raise _not_open()
            if (why := self._refusal) is not None:
                again = RefusedError(f"reconnecting, {why}", why.topic, why.reason)
                raise self._unsure(again) if sent else again

    def _unsure(self, refusal: RefusedError) -> NoReplyError:
        """A refusal that came after an attempt of the request went out: that attempt may have
        been applied, so not a RefusedError (the broker said no) but a NoReplyError."""
        return NoReplyError(
            f"no reply from memory-worker on {self.host}:{self.port} (prefix {self.prefix!r}) "
            f"to a request that went out and may have been applied (the same request_id "
            f"stores it once), then {refusal}"
        )

    def _prepare(
        self, convo: str, op: str, body: dict[str, Any], tag: str | None = None
    ) -> _Prepared:
        """What every attempt of a request sends, and the key its reply is matched by; `tag`
        names another reply topic than the client's (a blocking call's own connection's)."""
        _refuse(convo, op, body)
        if not self._replies:
            raise RuntimeError("this client was made with replies=False: it only watches")
        if "id" not in body and op in _AT_MOST_ONCE:
            body["id"] = f"{self.tag}-{next(self._n)}"  # valid by construction: not checked
        if tag is None:
            inbox = self._inbox or f"{self.reply_prefix.replace('{convo}', convo)}/{self.tag}"
        else:
            inbox = f"{self.reply_prefix.replace('{convo}', convo)}/{tag}"
        if self.protocol == 5:
            # Each request's own: the same request_id twice at once gets two replies.
            key = next(self._n).to_bytes(8, "big")
            props = (self._properties.get(inbox) or self._template(inbox))(key)
        else:
            # MQTT 3.1.1 has no Correlation Data: a reply topic of the request's own, under
            # the inbox, so that a late reply answers nothing else (a request_id may come
            # again, in another conversation).
            n = next(self._n)
            key = str(n).encode()
            body["reply_to"] = f"{inbox}/{n}"
            props = b""
        topic, payload = f"{self.prefix}/{convo}/{op}", msgpack.packb(body)
        # Past the size the broker said it takes (MQTT 5's CONNACK), it would drop the
        # connection, and each attempt would be "connection lost".
        limit = self._max_packet
        if oversize(topic, payload, props, limit):
            raise TooLargeError(
                f"the request is {len(payload)} bytes: the broker at {self.host}:{self.port} "
                f"takes packets of up to {limit} bytes"
            )
        return key, topic, payload, props

    def _attempt_failed(
        self,
        exc: Exception,
        topic: str,
        attempt: int,
        last: bool,
        size: int = 0,
        unavailable: int = 0,
        sent: bool = False,
    ) -> None:
        """Raise what an attempt's failure means to the caller; return to try again (`size`:
        the request's payload, in bytes; `unavailable`: the attempts before answered so;
        `sent`: an earlier attempt went out)."""
        if isinstance(exc, _PublishRefused):
            refused = self._refused("publish to", topic, exc.reason)
            raise (self._unsure(refused) if sent else refused) from None
        if last:
            within = f" within {self.timeout}s" + (f", {attempt} attempts" if attempt > 1 else "")
            if self._client is None and self._open:  # the broker, not the worker, is missing
                big = ""
                if self.protocol == 3 and size > c.DEFAULT_MAX_PAYLOAD_BYTES:
                    # MQTT 5's CONNACK says the broker's limit, and the client checks it
                    big = (
                        f" (the {size}-byte request may be what ends it: a broker closes the "
                        "connection of a packet over its max_packet_size, 1 MiB in "
                        "deploy/mosquitto.d/memory-worker.conf)"
                    )
                raise NoReplyError(
                    f"lost the broker at {self.host}:{self.port}, and no connection came back"
                    + within
                    + big
                ) from None
            why = "no reply" if isinstance(exc, TimeoutError) else "connection lost"
            hint = f": is memory-worker running with prefix {self.prefix!r} there?"
            if self._auth[0]:  # an acl_file broker grants the subscription, delivers nothing
                hint += f" And may {self._auth[0]!r} read reply_prefix {self.reply_prefix!r}?"
                if self.protocol == 3:  # MQTT 5's PUBACK says a refused publish
                    hint += f" And publish to {topic!r}?"
            if self.protocol == 3 and size > c.DEFAULT_MAX_PAYLOAD_BYTES:
                # Workers of before refuse it unread, so they cannot read the reply_to in it.
                hint = (
                    f": under MQTT 3.1.1 a request of {size} bytes, over the worker's "
                    f"--max-payload-bytes ({c.DEFAULT_MAX_PAYLOAD_BYTES} unless set), gets no "
                    "reply from an older worker: its reply_to is inside it"
                )
            elif unavailable:  # the worker runs: what it stores on is struggling
                hint = (
                    f": it answered 'unavailable' (ask again later) to {unavailable} attempt"
                    + ("s" if unavailable > 1 else "")
                    + " before"
                )
            raise NoReplyError(
                f"{why} from memory-worker on {self.host}:{self.port} "
                f"(prefix {self.prefix!r})" + within + hint
            ) from None

    async def _request(self, convo: str, op: str, body: dict[str, Any]) -> dict[str, Any]:
        if not self._open:
            raise _not_open()
        key, topic, payload, props = self._prepare(convo, op, body)
        loop = asyncio.get_running_loop()
        unavailable = 0  # attempts answered so
        sent = False  # an attempt went out
        for attempt in range(1, self.attempts + 1):
            last = attempt == self.attempts
            fut = _Reply(loop)
            earlier = sent
            try:
                deadline = loop.time() + self.timeout
                client = self._client
                if client is None:
                    async with asyncio.timeout_at(deadline):
                        client = await self._reconnected(earlier)
                self._waiting[key] = fut
                self._deadlines[key] = deadline
                if self._sweep is None:
                    # In a context of its own, as the reader: what outlives a request must
                    # not hold the caller's context variables. LangChain's holds the chat
                    # history whose client this is: a history made per call stayed open
                    # for a timeout after its call.
                    self._sweep = loop.call_at(
                        deadline, self._expire, context=contextvars.Context()
                    )
                # The reply implies delivery, so the request waits for it alone, not for the
                # PUBACK; a PUBACK that refuses fails it (_on_refused), as a lost connection does.
                self._mids[key] = client.publish_packed(topic, payload, self.qos, False, props)
                sent = True
                reply = await fut
            except NoReplyError:  # a TimeoutError too, yet final (_reconnected's)
                raise
            except (_PublishRefused, TimeoutError, _Lost) as exc:
                self._attempt_failed(exc, topic, attempt, last, len(payload), unavailable, earlier)
                continue
            finally:
                self._deadlines.pop(key, None)
                if self._waiting.get(key) is fut:  # timed out, lost or cancelled
                    del self._waiting[key]
                self._mids.pop(key, None)
            pause = ask_again(reply, attempt, last)
            if pause is None:
                return _ok(reply)
            unavailable += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._shut.wait(), pause)
            if not self._open:
                raise _closed_while_waiting()
        raise AssertionError("unreachable")  # pragma: no cover

    def _list_patience(self) -> float:
        return self.timeout * self.attempts

    def _expire(self) -> None:
        """Fail the requests whose time is up. One timer for all, at the earliest deadline
        when it fires (about once per timeout under load): a timer per request (asyncio's
        TimerHandle, pushed and cancelled) was a tenth of a round trip at window 1."""
        self._sweep = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        due = [key for key, deadline in self._deadlines.items() if deadline <= now]
        if len(due) < len(self._deadlines):
            # Not always the first: one that waited for the connection was stored late.
            self._sweep = loop.call_at(
                min(self._deadlines.values()), self._expire, context=contextvars.Context()
            )
        for key in due:
            del self._deadlines[key]
            fut = self._waiting.get(key)
            if fut is not None and not fut.done():
                fut.set_exception(TimeoutError())

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
        if not self._open:
            raise _not_open()
        self._filters[topic_filter] = self._filters.get(topic_filter, 0) + 1
        if (again or self._filters[topic_filter] == 1) and self._client is not None:
            try:
                await self._subscribe_on(self._client, topic_filter, 1)
            except aiomqtt.MqttError as exc:  # the connection lost meanwhile: not aiomqtt's
                self._drop_filter(topic_filter)
                raise NoReplyError(
                    f"lost the broker at {self.host}:{self.port} subscribing to "
                    f"{topic_filter!r}: {exc}"
                ) from None
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
        """Eviction events as they come (of one conversation, or all), until you stop or
        the client closes."""
        if convo_id is not None:
            _refuse(convo_id, c.OP_GET, {})
        topic_filter = f"{self.prefix}/{convo_id or '+'}/{c.EVICTED}"
        with self._events.listen(convo_id) as queue:
            await self._subscribe(topic_filter)
            try:
                while (event := await queue.get()) is not None:
                    yield event
            finally:
                await self._unsubscribe(topic_filter)

    async def stats(self) -> list[dict[str, Any]]:
        """Each worker's stats: fresh from each worker whose status says online (asked on its
        ping topic, answered within a second), else its latest retained snapshot, up to
        --stats-interval old; [] when no worker ever ran. Each has the `state` its status
        says (online, offline; unknown without one): a stopped worker's stats stay. `fresh`
        says whether the worker answered now: one whose status says online but that did not
        (stopped by a signal, hung, cut off) shows its last snapshot, `fresh` false."""
        base = f"{self.prefix}/{c.WORKER_LEVEL}/"
        found = await self._retained(base + "+/+", self.timeout)
        snapshots = {
            topic[len(base) : -len("/stats")]: payload
            for topic, payload in found.items()
            if topic.endswith("/stats") and payload
        }
        states = {w: decode_status(found.get(f"{base}{w}/status")).get("state") for w in snapshots}
        online = [w for w, state in states.items() if state == "online"]
        fresh = await self._fresh_stats(base, online) if online else {}
        snapshots.update(fresh)
        out = []
        for w, payload in snapshots.items():
            body = decode_event(payload, None)
            if isinstance(body, dict):  # anyone may publish there
                body["state"] = states[w] or "unknown"
                body["fresh"] = w in fresh
            out.append(body)
        return out

    async def _fresh_stats(self, base: str, workers: list[str]) -> dict[str, bytes]:
        """Live stats of `workers`, each pinged: those that answer within PING_EVERY and a
        bit. None of them when the broker refuses the pings (a role without the right: the
        dashboard role of an older deploy/init-security)."""
        queue: asyncio.Queue[Message] = asyncio.Queue()
        fresh: dict[str, bytes] = {}
        self._stats.add(queue)
        try:
            await self._subscribe(base + "+/stats", again=True)
            try:
                async with asyncio.timeout(c.PING_EVERY + 0.5):
                    for worker in workers:
                        client = self._client
                        if client is None or await client.publish_acked(
                            f"{base}{worker}/{c.PING}", b""
                        ):
                            return fresh
                    while len(fresh) < len(workers):
                        message = await queue.get()
                        worker = message.topic[len(base) : -len("/stats")]
                        if not message.retain and worker in workers and message.payload:
                            fresh[worker] = message.payload
            except TimeoutError:
                pass
            return fresh
        finally:
            self._stats.discard(queue)
            await self._unsubscribe(base + "+/stats")

    async def retire(self, client_id: str) -> Literal["retired", "online", "unknown"]:
        """Clear the retained status and stats of a worker that is not running, so that
        dashboards and `stats()` forget it: "retired". Nothing is cleared when its status
        says it is online ("online": stop it first) or nothing of it is retained ("unknown").
        A broker that refuses the subscription or the clearing raises RefusedError. MQTT 5
        only: a 3.1.1 broker drops a publish it refuses without a word."""
        if self.protocol != 5:
            raise ValueError("retire() needs MQTT 5: a 3.1.1 broker cannot say it refused it")
        if topic_name_problem(client_id) or "/" in client_id:
            raise ValueError(f"not a worker's client id: {client_id!r}")
        base = f"{self.prefix}/{c.WORKER_LEVEL}/{client_id}/"
        # Retained messages follow the SUBACK: a short wait is enough to know there are none.
        found = await self._retained(base + "+", min(self.timeout, 1.0))
        if not found:
            return "unknown"
        if decode_status(found.get(base + "status")).get("state") == "online":
            return "online"
        for kind in ("stats", "status"):
            topic = base + kind
            client = self._client
            if client is None:
                raise NoReplyError(f"lost the broker at {self.host}:{self.port}")
            try:
                async with asyncio.timeout(self.timeout):
                    reason = await client.publish_acked(topic, b"", retain=True)
            except TimeoutError:
                raise NoReplyError(
                    f"the broker at {self.host}:{self.port} did not acknowledge clearing "
                    f"{topic!r} within {self.timeout}s"
                ) from None
            if reason is not None:
                raise self._refused("publish to", topic, reason)
        return "retired"

    async def _retained(self, topic_filter: str, wait: float) -> dict[str, bytes]:
        """The retained messages under `topic_filter` (a filter under the workers' topics),
        by topic: subscribed again for them, read until `wait` passes with none (then
        _STATS_QUIET after each) or a topic comes twice (live messages now)."""
        if self._open and self._client is None:
            # Not connected: none would come, and "no worker" ([], "unknown") is not the
            # answer; the broker's, once it answers a reconnection, is.
            try:
                async with asyncio.timeout(self.timeout):
                    await self._reconnected(False)
            except TimeoutError:
                raise NoReplyError(
                    f"lost the broker at {self.host}:{self.port}, and no connection came back "
                    f"within {self.timeout}s"
                ) from None
        queue: asyncio.Queue[Message] = asyncio.Queue()
        found: dict[str, bytes] = {}
        self._stats.add(queue)  # before subscribing: retained messages follow the SUBACK
        try:
            await self._subscribe(topic_filter, again=True)
        except BaseException:
            self._stats.discard(queue)
            raise
        try:
            while True:
                try:
                    async with asyncio.timeout(wait):
                        message = await queue.get()
                except TimeoutError:
                    break
                if not _matches(topic_filter, message.topic):  # another call's
                    continue
                if message.topic in found:
                    break
                found[message.topic] = message.payload
                wait = _STATS_QUIET
        finally:
            self._stats.discard(queue)
            await self._unsubscribe(topic_filter)
        return found


class _Reply:
    """The future a request's task awaits: asyncio's Future protocol, but a reply read from
    the socket resumes the task at once (`resolve`), inside the read, rather than on the
    event loop's next turn (a turn was a tenth of a round trip at window 1). Anything else
    (a timeout, a lost connection, a cancel) completes it as an asyncio Future does, its
    callbacks scheduled on the loop.
    """

    __slots__ = ("_asyncio_future_blocking", "_callbacks", "_exc", "_loop", "_state", "_value")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._state = _PENDING
        self._value: Any = None
        self._exc: BaseException | None = None
        self._callbacks: list[tuple[Callable[[Any], object], contextvars.Context | None]] = []
        self._asyncio_future_blocking = False

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def done(self) -> bool:
        return self._state != _PENDING

    def cancelled(self) -> bool:
        return self._state == _CANCELLED

    def result(self) -> Any:
        if self._state == _PENDING:
            raise asyncio.InvalidStateError("result is not set")
        if self._exc is not None:
            # One lost connection's exception fails every waiter: each raise starts afresh.
            raise self._exc.with_traceback(None)
        return self._value

    def exception(self) -> BaseException | None:
        if self._state == _PENDING:
            raise asyncio.InvalidStateError("exception is not set")
        if self._state == _CANCELLED:
            raise self._exc or asyncio.CancelledError()
        return self._exc

    def add_done_callback(
        self, fn: Callable[[Any], object], *, context: contextvars.Context | None = None
    ) -> None:
        if self._state != _PENDING:
            self._loop.call_soon(fn, self, context=context)
        else:
            self._callbacks.append((fn, context))

    def remove_done_callback(self, fn: Callable[[Any], object]) -> int:
        kept = [(f, ctx) for f, ctx in self._callbacks if f != fn]
        removed = len(self._callbacks) - len(kept)
        self._callbacks[:] = kept
        return removed

    def cancel(self, msg: Any | None = None) -> bool:
        if self._state != _PENDING:
            return False
        self._state, self._exc = _CANCELLED, asyncio.CancelledError(msg)
        self._schedule()
        return True

    def set_result(self, value: Any) -> None:
        self._complete(value, None)
        self._schedule()

    def set_exception(self, exc: BaseException) -> None:
        self._complete(None, exc)
        self._schedule()

    def resolve(self, value: Any) -> None:
        """Set the result and run the callbacks (the awaiting task's step) now: called from
        the socket's read, which runs outside any task (else scheduled, as set_result)."""
        self._complete(value, None)
        if asyncio.current_task(self._loop) is not None:
            self._schedule()
            return
        callbacks, self._callbacks = self._callbacks, []
        for fn, ctx in callbacks:
            try:
                if ctx is None:
                    fn(self)
                else:
                    ctx.run(fn, self)
            except Exception as exc:  # as asyncio's Handle would report it
                self._loop.call_exception_handler(
                    {"message": "exception in a reply's callback", "exception": exc}
                )

    def _complete(self, value: Any, exc: BaseException | None) -> None:
        if self._state != _PENDING:
            raise asyncio.InvalidStateError("the reply is already done")
        self._state, self._value, self._exc = _FINISHED, value, exc

    def _schedule(self) -> None:
        callbacks, self._callbacks = self._callbacks, []
        for fn, ctx in callbacks:
            self._loop.call_soon(fn, self, context=ctx)

    def __await__(self) -> Generator[Any, None, Any]:
        if self._state == _PENDING:
            self._asyncio_future_blocking = True
            yield self
        if self._state == _PENDING:
            raise RuntimeError("await wasn't used with future")
        return self.result()

    __iter__ = __await__


_PENDING, _CANCELLED, _FINISHED = 0, 1, 2


def _closed_while_waiting() -> RuntimeError:
    return RuntimeError("the memory client was closed while this request waited")


class _PublishRefused(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _matches(topic_filter: str, topic: str) -> bool:
    """Whether `topic` matches a filter whose wildcards are single levels (+) only."""
    want, got = topic_filter.split("/"), topic.split("/")
    return len(want) == len(got) and all(w in ("+", g) for w, g in zip(want, got, strict=True))


def inbox_filter(reply_prefix: str, tag: str, protocol: int) -> str:
    """What a client (or a blocking client's connection) tagged `tag` subscribes to for its
    replies: under MQTT 3.1.1 each request has a reply topic of its own, one level down."""
    inbox = f"{reply_prefix.replace('{convo}', '+')}/{tag}"
    return inbox if protocol == 5 else inbox + "/+"


def reply_key(topic: str) -> bytes:
    """The key of the request an MQTT 3.1.1 reply on `topic` answers (its last level)."""
    return topic[topic.rfind("/") + 1 :].encode()


def check_host(host: str) -> None:
    """Raise ValueError unless `host` could be a host name or address (not a URL, nor one
    with its port in it)."""
    if not isinstance(host, str) or not host.strip():
        raise ValueError(f"host must be a host name or address, not {host!r}")
    if "://" in host:
        raise ValueError(
            f"host {host!r} is a URL, not a host name: give the host and the port apart"
        )
    name, colon, port = host.rpartition(":")
    if colon and port.isdigit() and ":" not in name:  # (an IPv6 address has more colons)
        raise ValueError(f"host {host!r} ends in a port: give the host {name!r} and the port apart")


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
    host: str, port: int, username: str | None, exc: aiomqtt.MqttError, *, tls: bool = False
) -> NoReplyError | RefusedError:
    """Why connecting failed: RefusedError when the broker refused the login (a wrong
    username or password is not a broker that is down) or its TLS certificate does not
    verify (no retry mends either), NoReplyError otherwise."""
    if login_refused(exc):
        who = repr(username) if username else "an anonymous client"
        fix = "check the username and password" if username else "give a username and password"
        return RefusedError(
            f"the broker at {host}:{port} refused the login of {who} ({exc}): {fix}", "", str(exc)
        )
    if "CERTIFICATE_VERIFY_FAILED" in str(exc):
        return RefusedError(
            f"the broker at {host}:{port}: its TLS certificate does not verify ({exc}): give "
            "the CA that signed it (?ca=FILE, tls_ca=, memctl --tls-ca)",
            "",
            "certificate verify failed",
        )
    # A TLS listener reads MQTT's CONNECT as a broken handshake and waits, or closes: no
    # CONNACK comes. A plain one closes on TLS's hello.
    why = str(exc)
    hint = ""
    if not tls and ("timed out" in why or "before its CONNACK" in why):
        hint = " (a TLS port? then mqtts:// with ?ca=FILE, tls_ca=, or memctl --tls-ca)"
    elif tls and any(word in why for word in ("reset by peer", "EOF", "WRONG_VERSION")):
        hint = " (not a TLS port? then mqtt://, without ca, tls_ca or --tls-ca)"
    return NoReplyError(f"cannot reach the broker at {host}:{port}: {why}{hint}")
