"""The blocking client's requests, sent and awaited by the calling thread on a connection of
its own: no event loop and no hand-over between threads on a request's way.

Handing each request to the client's loop thread and its reply back cost a blocking call
twice the CPU of an async one (two thread wake-ups through the GIL, measured in
docs/performance.md); here a call is the thread's own write and read. The price is a
connection per thread calling at once, up to `connections`, kept for the next call as an
HTTP client keeps its pool: each has its own client id and reply topic on the broker.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from typing import Any, Final

import aiomqtt
import msgpack

from worker.client._api import _not_open, _ok, ask_again
from worker.client._errors import MemoryWorkerError, NoReplyError, RefusedError
from worker.client._mqtt import (
    MemoryClient,
    _closed_while_waiting,
    _Lost,
    _PublishRefused,
    inbox_filter,
    reply_key,
    unreachable,
)
from worker.mqtt import BlockingConnection, login_refused, reason_name
from worker.packets import (
    DISCONNECT,
    PUBACK,
    PUBLISH,
    MalformedPacket,
    decode_ack,
    decode_publish,
    puback,
)

DEFAULT_CONNECTIONS: Final = 16
# Before a request goes out on a connection, a read that does not wait asks whether the
# broker still holds it (it may have restarted, or closed it): always before a delete, which
# is sent only once; before the rest, which may go again, after a pause this long (the
# attempt it spares is worth a read then, not between calls that follow closely).
_IDLE_CHECK: Final = 0.01


class _Link:
    """One pooled connection and the reply topic it subscribed to."""

    __slots__ = ("conn", "inbox_filter", "tag")

    def __init__(self, client: MemoryClient, n: int) -> None:
        self.tag = f"{client.tag}-{n}"
        self.inbox_filter = inbox_filter(client.reply_prefix, self.tag, client.protocol)
        self.conn = BlockingConnection(
            client.host,
            client.port,
            f"memory-client-{self.tag}",
            username=client._auth[0],
            password=client._auth[1],
            tls=client._tls,
            v5=client.protocol == 5,
        )


class _Unreachable(TimeoutError):
    """An attempt's time ran out connecting, each try failing (its last failure)."""


class _Turn:
    """A thread's place in the queue for a connection: given it, its lock is released."""

    __slots__ = ("given", "link")

    def __init__(self) -> None:
        self.given = threading.Lock()
        self.given.acquire()
        self.link: _Link | None = None


class ThreadRequests:
    """The blocking client's requests, each sent and awaited by its own thread on a pooled
    connection (`request`: the API's plans, worker/client/_api.py, make them).

    A thread takes an idle connection (or opens one, up to `connections`; past that it
    waits for one), sends the request, reads until its reply and gives the connection back.
    Timeouts, attempts with the same id and refusals are `MemoryClient`'s; a thread whose
    connection dropped connects it again within its attempt's time.
    Replies come at QoS 0 whatever `qos` is: the connection's session ends with it, so QoS 1
    would add an acknowledgement per reply and save nothing (a reply lost with the
    connection is asked again, as with QoS 1).
    """

    def __init__(self, client: MemoryClient, connections: int = DEFAULT_CONNECTIONS) -> None:
        self._client = client
        self._max = connections
        self._idle: list[_Link] = []
        self._busy: set[_Link] = set()
        self._made = 0
        self._open = True
        self._lock = threading.Lock()
        # Threads waiting for a connection (past `connections` at once), first come first
        # served: a connection given back goes to the first of them, not to whoever asks
        # next (a thread calling in a loop took it back every time, and the others timed out).
        self._queue: collections.deque[_Turn] = collections.deque()
        self._closed = threading.Event()  # wakes a thread waiting to connect again

    def request(self, convo: str, op: str, body: dict[str, Any]) -> dict[str, Any]:
        link = self._borrow()
        try:
            return self._exchange(link, convo, op, body)
        except MemoryWorkerError:  # an answer, or attempts given up: the stream is whole
            raise
        except BaseException:  # maybe half a packet written (an interrupt in sendall)
            link.conn.close()
            raise
        finally:
            self._give_back(link)

    def _exchange(self, link: _Link, convo: str, op: str, body: dict[str, Any]) -> dict[str, Any]:
        client = self._client
        key, topic, payload, props = client._prepare(convo, op, body, link.tag)
        conn = link.conn
        if (
            conn.sock is not None
            and time.monotonic() - conn.used > _IDLE_CHECK
            and not conn.idle_but_open()
        ):
            conn.close()
        unavailable = 0  # attempts answered so
        sent = False  # an attempt went out
        for attempt in range(1, client.attempts + 1):
            last = attempt == client.attempts
            deadline = time.monotonic() + client.timeout
            earlier = sent
            try:
                if conn.sock is None:
                    try:
                        self._connect(link, deadline)
                    except RefusedError as exc:  # an earlier attempt may have been applied
                        raise client._unsure(exc) if earlier else exc from None
                sent = True  # from the first byte on, it may be applied
                mid = conn.publish(topic, payload, client.qos, props, deadline)
                reply = self._reply(conn, key, mid, deadline)
                pause = ask_again(reply, attempt, last)
                if pause is None:
                    return _ok(reply)
                unavailable += 1
                if self._closed.wait(pause):
                    raise _closed_while_waiting()
            except MemoryWorkerError:  # the worker's error reply, or a refusal: NoReplyError
                raise  # is a TimeoutError and RefusedError an OSError, yet final
            except (_PublishRefused, TimeoutError) as exc:
                # A timed-out request's late reply is skipped by its key: the connection stays.
                if not self._open:
                    raise _closed_while_waiting() from None
                if last and isinstance(exc, _Unreachable):
                    raise NoReplyError(
                        f"cannot reach the broker at {client.host}:{client.port} ({exc}) "
                        f"within {client.timeout}s"
                        + (f", {attempt} attempts" if attempt > 1 else "")
                    ) from None
                client._attempt_failed(
                    exc, topic, attempt, last, len(payload), unavailable, earlier
                )
            except (OSError, MalformedPacket):
                conn.close()
                if not self._open:
                    raise _closed_while_waiting() from None
                client._attempt_failed(
                    _Lost(), topic, attempt, last, len(payload), unavailable, earlier
                )
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _reply(conn: BlockingConnection, key: bytes, mid: int, deadline: float) -> Any:
        while True:
            first, packet = conn.next_packet(deadline)
            kind = first & 0xF0
            if kind == PUBLISH:
                message = decode_publish(first, packet, 0, len(packet), conn.v5)
                if message.qos:
                    conn.send(puback(message.mid), deadline)
                # A timed-out request's late reply is skipped: it is not for this one.
                if (message.correlation if conn.v5 else reply_key(message.topic)) != key:
                    continue
                try:
                    return msgpack.unpackb(message.payload, strict_map_key=False)
                except Exception:  # not a reply of ours: nobody waits for it
                    continue
            elif kind == PUBACK and mid and len(packet) > 2:  # Success is 2 bytes
                ack = decode_ack(first, packet, 0, len(packet))
                if ack.mid == mid and ack.reason >= 0x80:
                    raise _PublishRefused(reason_name(PUBACK, ack.reason))
            elif kind == DISCONNECT:  # the broker's, before it closes the connection
                raise ConnectionResetError("the broker disconnected")

    def _connect(self, link: _Link, deadline: float) -> None:
        """Connect and subscribe to the link's reply topic, again and again while the broker
        cannot be reached (or refuses the connection for another reason than the login),
        until `deadline` (TimeoutError)."""
        client, conn = self._client, link.conn
        backoff = 0.05
        failed: Exception | None = None
        while True:
            try:
                conn.connect(deadline)
                reason = conn.subscribe(link.inbox_filter, 0, deadline)
            except TimeoutError:
                conn.close()  # not subscribed: no request may go out on it
                if failed is not None:  # out of time trying again
                    raise _Unreachable(failed) from None
                raise
            except aiomqtt.MqttError as exc:  # a refused CONNACK
                if login_refused(exc):  # the password changed since the client opened
                    raise unreachable(client.host, client.port, client._auth[0], exc) from None
                failed = exc
            except (OSError, MalformedPacket) as exc:
                conn.close()
                failed = exc
            else:
                if reason is not None:
                    conn.close(disconnect=True)
                    raise client._refused("subscription to", link.inbox_filter, reason)
                if not self._open:  # closed while it connected: close() did not see its socket
                    conn.close()
                    raise _closed_while_waiting()
                return
            wait = min(backoff, deadline - time.monotonic())
            if wait <= 0:
                raise _Unreachable(failed)
            if self._closed.wait(wait):
                raise _closed_while_waiting()
            backoff = min(backoff * 2, 1.0)

    def _borrow(self) -> _Link:
        with self._lock:
            if not self._open:
                raise _not_open()
            if self._idle:
                link = self._idle.pop()
            elif self._made < self._max:
                self._made += 1
                link = _Link(self._client, self._made)
            else:
                turn = _Turn()
                self._queue.append(turn)
                link = None
            if link is not None:
                self._busy.add(link)
                return link
        # As long as a call's attempts may take: the connection's call may be answered on
        # its last (a worker stalled for longer than one timeout).
        timeout = self._client.timeout * self._client.attempts
        turn.given.acquire(timeout=min(timeout, threading.TIMEOUT_MAX))
        with self._lock:
            if turn.link is None:  # timed out, or closed
                with contextlib.suppress(ValueError):
                    self._queue.remove(turn)
                if not self._open:
                    raise _closed_while_waiting()
                client = self._client
                raise NoReplyError(
                    f"all {self._max} connections of the blocking client stayed busy for "
                    f"{timeout}s: their calls wait for the worker or the broker at "
                    f"{client.host}:{client.port}, or more threads call at once than "
                    f"BlockingMemoryClient(connections={self._max})"
                )
            return turn.link

    def _give_back(self, link: _Link) -> None:
        with self._lock:
            if self._open:
                if self._queue:  # to the first waiting thread, still busy
                    turn = self._queue.popleft()
                    turn.link = link
                    turn.given.release()
                    return
                self._busy.discard(link)
                self._idle.append(link)
                return
            self._busy.discard(link)
        link.conn.close()

    def close(self) -> None:
        """Disconnect every connection; the threads still in a call get RuntimeError."""
        with self._lock:
            self._open = False
            idle, self._idle = self._idle, []
            busy = list(self._busy)
            waiting, self._queue = list(self._queue), collections.deque()
        for turn in waiting:
            turn.given.release()
        self._closed.set()
        for link in busy:
            link.conn.shutdown()
        for link in idle:
            link.conn.close(disconnect=True)
