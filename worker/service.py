"""The worker's lifecycle and batch flow over one broker connection.

One flow: the transport (worker/mqtt.py) hands a message to `_on_message` on the event
loop's thread -> it waits in the inbox -> once the read is handled (`_on_read`), the whole
inbox is one batch, served in that turn when nothing else is under way, else by `_process` ->
`Router.parse` turns each message into a request value -> `Backend.execute` applies the
batch -> each reply and eviction event is handed to the transport -> each QoS 1 request is
acknowledged -> the batch's replies and acknowledgements leave in one socket write. A request
is acknowledged only after its effect was stored and its reply queued before the
acknowledgement, so a worker killed in between gets the message again.

aiomqtt manages the connection; on the hot path its message queue, its awaited publishes and
paho's packet codec are bypassed by `worker.mqtt.Connection` (with worker/packets.py), the one
place that touches aiomqtt and paho internals.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import math
import os
import random
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, TypeGuard

import aiomqtt

from worker import __version__
from worker import constants as c
from worker.backends.base import Backend
from worker.config import Config, tls_context
from worker.errors import BadRoute, ConfigError, TooLarge, Unavailable, WorkerError
from worker.mqtt import (
    BlockingConnection,
    Connection,
    Message,
    PackedProperties,
    certificate_refused,
    closed_by_broker,
    login_refused,
    persistent,
    subscribe_options,
    will,
)
from worker.packets import PUBLISH, ReplyProperties, decode_publish, oversize
from worker.protocol import (
    Event,
    Eviction,
    Fields,
    ListConvos,
    Parsed,
    Request,
    Result,
    Router,
    Stats,
    Summary,
    content_type,
    decode_cursor,
    decode_event,
    decode_status,
    encode,
    encode_event,
    encode_result,
    encode_trimmed,
    ha_discovery,
    limits_payload,
    stats_are_recent,
    stats_payload,
    status_payload,
    topic_name_problem,
)
from worker.store import Limits
from worker.systemd import Notifier

log = logging.getLogger("memory_worker")
_PEERS_NAMED = 16  # workers on the prefix with other limits, each warned of once
_PEERS_TRACKED = 1024  # workers whose last stats named another store, remembered at most
_PEERS_KEPT = 256  # other workers whose status (or stats awaiting it) is remembered
_PEER_TEXT = c.MAX_GROUP_CHARS  # the longest client id, group, backend or store name kept
_LIMITS = tuple(limits_payload(Limits()))  # what a peer's stats' limits may hold
# Backends that workers of a share group can share (memory and SQLite are each worker's own).
_SHARED_BACKENDS = frozenset({"redis", "redis-cluster"})

# A connection shorter than this does not reset the reconnect backoff: two workers sharing a
# client id take each other's session at once, and must not do so several times a second.
_STABLE_CONNECTION = 10.0
_STILL_DOWN = 600.0  # seconds between warnings that the broker is still away
# Short connections in a row the broker closed (no attempt refused between) before the
# worker says why: a twin's fight goes on for ever, a broker restarted that often is rare.
_FLAPS = 5
# What deploy/mosquitto.d/memory-worker.conf sets; the worker warns about a broker below it.
BROKER_SNIPPET = "deploy/mosquitto.d/memory-worker.conf"
_WANT_INFLIGHT = 1000
_SLOW_ROUND_TRIP = 0.02
_EVENT_SLICE = 64  # eviction events handed to paho at once by the sweep
_STRAYS_MAX = 1024  # other prefixes' filters unsubscribed at most (_stray)
_STATS_LEAF = "/stats"  # a worker topic's (c.WORKER_LEAVES)
_STATUS_LEAF = "/status"
_PEER_LEAVES = (_STATUS_LEAF[1:], _STATS_LEAF[1:])  # what is read of other workers


def machine_node() -> str:
    """This machine's mark in a worker's status: a hash of its machine id (its host name
    without one), so that a worker tells one on its own machine from one elsewhere."""
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        with contextlib.suppress(OSError):
            with open(path, "rb") as f:
                raw = f.read().strip()
            if raw:
                break
    else:
        raw = socket.gethostname().encode()
    return hashlib.sha256(b"memory-worker node " + raw).hexdigest()[:16]


def _stats_of(payload: bytes, client_id: str) -> dict[str, Any] | None:
    """A worker's stats under `client_id`, else None (anyone may publish there)."""
    with contextlib.suppress(Exception):
        body = decode_event(payload, None)
        if body["client_id"] == client_id and isinstance(body["uptime"], int | float):
            return body  # type: ignore[no-any-return]
    return None


def _peer_text(value: object) -> TypeGuard[str]:
    return isinstance(value, str) and len(value) <= _PEER_TEXT


def _peer_fields(body: dict[str, Any]) -> dict[str, Any] | None:
    """What is compared of another worker's stats, each of a worker's shape, or None when it
    is not a worker's: anyone may publish there, and what is kept is memory (8 KiB of [{}]
    in its limits decoded to 600 KB, kept for 256 strangers: a review)."""
    limits = body.get("limits")
    if not _peer_text(body.get("client_id")) or not isinstance(limits, dict):
        return None
    kept = {
        "client_id": body["client_id"],
        "limits": {k: v for k in _LIMITS if isinstance(v := limits.get(k), int | float)},
    }
    for name in ("shared_group", "backend", "store"):
        if name in body:
            if body[name] is not None and not _peer_text(body[name]):
                return None
            kept[name] = body[name]
    for name in ("ts", "stats_interval"):
        if isinstance(body.get(name), int | float):
            kept[name] = body[name]
    return kept


def _of_this_run(stats: dict[str, Any], since: float) -> bool:
    """Whether a worker's stats are of its run that went online at `since` (its own clock):
    a restarted one's retained stats of the run before come first, with its old limits."""
    ts = stats.get("ts")
    return not isinstance(ts, int | float) or ts >= since


def _group_name(group: object) -> str:
    return f"in share group {group!r}" if group else "outside any share group"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _requests(todo: list[tuple[int, Message, Parsed]]) -> list[Request]:
    return [parsed.request for _, _, parsed in todo if parsed.request is not None]


def _failed(exc: Exception, n: int) -> tuple[list[Result], list[Event]]:
    """A batch the backend failed on: its error, or an internal error, for each request."""
    if isinstance(exc, WorkerError):
        return [exc] * n, []
    log.exception("backend failed on a batch of %d", n)
    return [WorkerError(f"internal error: {type(exc).__name__}")] * n, []


class Service:
    """Serves one broker connection (kept up, re-made on loss) for one backend.

    Args:
        cfg: the frozen configuration.
        backend: an unopened backend; `run` opens and closes it.
    """

    def __init__(self, cfg: Config, backend: Backend) -> None:
        self.cfg = cfg
        self.backend = backend
        self.router = Router(cfg.prefix, cfg.max_payload_bytes, cfg.route_prefix)
        self.stats = Stats(started=time.monotonic())
        self._inbox: list[tuple[int, Message]] = []
        # Listing pages: served a step at a time when no other request waits.
        self._later: collections.deque[_Page] = collections.deque()
        self._pages_max = max(1, cfg.max_inflight // 8)  # listing pages waiting at once
        self._sweep_resting = asyncio.Event()  # between expiry rounds
        self._sweep_resting.set()
        self._served = 0.0  # monotonic time other requests were last applied
        self._list_resume = 0.0  # no listing step before this monotonic time
        self._resume_timer: asyncio.TimerHandle | None = None
        self._wake = asyncio.Event()
        self._idle = False  # `_process` waits for `_wake` with nothing to do
        # Publishes of events a durable backend keeps until the broker has them: a stop waits
        # for their PUBACKs (else the next start sends them again).
        self._watched: set[asyncio.Future[str | None]] = set()
        self._strays: set[str] = set()  # filters of other prefixes unsubscribed (_stray)
        self._stores_apart: dict[str, bool] = {}  # peers whose last stats named another store
        self._unsubscribing: set[asyncio.Task[None]] = set()
        self._peers_warned: set[tuple[str, tuple[str, ...]]] = set()
        # Other workers' last status by client id: (state, when it went so).
        self._peer_states: dict[str, tuple[object, float]] = {}
        self._peer_pending: dict[str, dict[str, Any]] = {}  # their stats before a status
        self._generation = 0
        self._busy = False  # a batch is being handled
        self._closing = False  # shutting down: new requests stay unacknowledged, for later
        self._client: Connection | None = None
        self.connected = asyncio.Event()
        self.connections = 0
        self._connection_made = asyncio.Event()
        self.status_topic = self.router.worker_topic(cfg.client_id, "status")
        self.stats_topic = self.router.worker_topic(cfg.client_id, "stats")
        self.ping_topic = self.router.worker_topic(cfg.client_id, c.PING)
        self._pinged = -math.inf  # when this worker last answered a ping
        self._ping_answer: asyncio.TimerHandle | None = None
        self._fatal: ConfigError | None = None  # why it stopped on its own
        self._stopping = threading.Event()  # ends a look for a twin (`_live_twin`) early
        self._node = machine_node()
        self._elsewhere_said = False  # a twin on another broker was logged
        self._flap_said = False  # connections closed soon after opening were logged
        self._looks: set[str] = set()  # look topics of pings to answer (`_answer_ping`)
        self._tls: ssl.SSLContext | None = None
        self._reply_props = ReplyProperties(c.CONTENT_TYPE)
        self.systemd = Notifier.from_environ(os.environ)
        self.broker_round_trip: float | None = None
        self._online = b""  # the last "online" status this worker published
        self._will = b""  # the "offline" the broker publishes when it loses this worker
        # Sent on this connection, maybe not yet acknowledged (so not yet `connected`): a
        # stop then must still say offline, or the retained online outlives the worker.
        self._announced = False
        self._loss_explained = False
        self._refusal: str | None = None  # why the broker refuses our login, once logged
        self._event_props = PackedProperties(content_type(cfg.event_format))
        self._sweep_kick = asyncio.Event()
        self._sweep_due = 0.0

    # --- lifecycle ------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Open the backend, serve until `stop` is set, then shut down in order."""
        opening = asyncio.create_task(
            self.systemd.extend_start(f"opening the {self.backend.name} store", stop),
            name="opening",
        )
        try:
            await self.backend.open()
        finally:
            opening.cancel()
        client = self._make_client()
        self._client = client
        tasks = [
            asyncio.create_task(self._process(), name="process"),
            asyncio.create_task(self._sweep(), name="sweep"),
            asyncio.create_task(self._publish_stats_forever(), name="stats"),
            asyncio.create_task(self.systemd.keep_alive(self._systemd_status), name="systemd"),
        ]
        connection = asyncio.create_task(self._stay_connected(client, stop), name="connection")
        try:
            await stop.wait()
        finally:
            self._stopping.set()
            await self._shutdown(client, connection, tasks)
        if self._fatal is not None:
            raise self._fatal

    async def _shutdown(
        self, client: Connection, connection: asyncio.Task[None], tasks: list[asyncio.Task[None]]
    ) -> None:
        # Requests that arrive from now on are left unacknowledged: the broker keeps them in
        # the session for the next start. Reading goes on, for the acks of our last publishes.
        self._closing = True
        self.systemd.stopping()
        client.resume_reading()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drained(), timeout=c.DRAIN_TIMEOUT)
        with contextlib.suppress(TimeoutError):  # the expiry chunk in hand, announced
            await asyncio.wait_for(self._sweep_resting.wait(), timeout=c.DRAIN_TIMEOUT)
        if self._watched and self.connected.is_set():  # else they go again at the next start
            await asyncio.wait(set(self._watched), timeout=c.DRAIN_TIMEOUT)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.connected.is_set() or self._announced:
            with contextlib.suppress(Exception):
                self._publish_stats()
                await client.publish(
                    self.status_topic,
                    self._status("offline"),
                    qos=1,
                    retain=True,
                    timeout=2,
                    properties=self._event_props,  # type: ignore[arg-type]
                )
        connection.cancel()
        await asyncio.gather(connection, return_exceptions=True)
        await asyncio.shield(self.backend.close())
        self.systemd.close()

    async def _drained(self) -> None:
        while self._inbox or self._later or self._busy:
            self._wake.set()
            await asyncio.sleep(0.01)

    def _make_client(self) -> Connection:
        cfg = self.cfg
        self._will = self._status("offline")
        self._tls = tls_context(cfg.tls_ca, cfg.tls_cert, cfg.tls_key)
        return persistent(
            self._on_message,
            host=cfg.host,
            port=cfg.port,
            client_id=cfg.client_id,
            username=cfg.username,
            password=cfg.password,
            session_expiry=cfg.session_expiry_seconds,
            receive_maximum=min(cfg.max_inflight, 65535),
            tls=self._tls,
            last_will=will(self.status_topic, self._will, content_type(cfg.event_format)),
            on_read=self._on_read,
        )

    async def _stay_connected(self, client: Connection, stop: asyncio.Event) -> None:
        attempt = 0
        short_streak = 0  # connections in a row that lasted under _STABLE_CONNECTION
        closed_soon = 0  # of those, closed by the broker with no refused attempt between
        since = 0.0
        down_since: float | None = None  # when the broker was last said to be away
        said = 0.0
        while not stop.is_set():
            # Messages of an earlier connection must not be acknowledged on this one (the
            # broker delivers them again); the count changes before any message can arrive.
            self._generation += 1
            client.taken_over = False
            found = await asyncio.to_thread(self._live_twin, self._online)
            if found is not None and found[2]:
                self._fatal = self._twin_error(found[0])
                stop.set()
                return
            if found is not None and not self._elsewhere_said:
                self._elsewhere_said = True
                log.warning(
                    "a worker on another broker (its topics bridged here: machine %s, broker "
                    "%s), or of an older version, serves %s/# as client id %r too: the two "
                    "write the same status and stats topics, and dashboards see one worker. "
                    "Give each its own --client-id",
                    found[1].get("node"),
                    found[1].get("broker"),
                    self.cfg.prefix,
                    self.cfg.client_id,
                )
            try:
                async with client:
                    since = time.monotonic()
                    attempt = short_streak
                    self._refusal = None
                    await self._on_connected(client)
                    await client.wait_disconnected()
            except Exception as exc:  # MqttError mostly; paho can also surface an OSError
                self.connected.clear()
                self._announced = False  # the will says offline now
                self._inbox.clear()  # unacknowledged: the broker will deliver them again
                self._later.clear()
                since_was = bool(since)
                short = since_was and time.monotonic() - since < _STABLE_CONNECTION
                if since:
                    short_streak = short_streak + 1 if short else 0
                    attempt = short_streak
                since = 0.0
                attempt += 1
                delay = min(self.cfg.reconnect_max, 0.1 * 2**attempt) * random.uniform(0.5, 1)
                self._loss_explained = client.taken_over
                # Closed soon after opening, with no attempt refused between (a broker that
                # restarts refuses one): another client taking the id again and again.
                closed_soon = closed_soon + 1 if short and closed_by_broker(exc) else 0
                now = time.monotonic()
                if since_was:  # it was connected: a new loss, said again
                    down_since = None
                if client.taken_over:
                    self._taken_over(delay)
                elif closed_soon >= _FLAPS:
                    self._flapping(closed_soon)
                elif login_refused(exc):
                    self._refused(exc, delay)
                elif certificate_refused(exc):
                    self._refused(exc, delay, certificate=True)
                else:
                    # Once a takeover was seen, each short connection is that fight again;
                    # a broker that stays away is said once, then every _STILL_DOWN (a Pi's
                    # journal took a line every few seconds while its Mosquitto was down).
                    level = logging.DEBUG
                    if down_since is None:
                        down_since = said = now
                        if not (self.stats.taken_over and short):
                            level = logging.WARNING
                    elif now - said >= _STILL_DOWN:
                        said, level = now, logging.WARNING
                    log.log(
                        level,
                        "broker %s:%d unreachable or lost (%s)%s; retrying in %.1fs",
                        self.cfg.host,
                        self.cfg.port,
                        "the broker closed the connection" if closed_by_broker(exc) else exc,
                        f" for {(now - down_since) / 60:.0f} min" if now > down_since else "",
                        delay,
                    )
                self.systemd.status(self._systemd_status())
                await asyncio.sleep(delay)
            finally:
                self.connected.clear()

    def _refused(self, exc: Exception, delay: float, *, certificate: bool = False) -> None:
        if self._refusal is not None:  # once: it goes on until the broker's users change
            log.debug("refused again (%s); retrying in %.1fs", exc, delay)
            return
        self._refusal = str(exc)
        if certificate:  # as lasting as a refused login, until a file is fixed
            log.error(
                "broker %s:%d: its TLS certificate does not verify against --tls-ca %s (%s): "
                "give the CA that signed it, and a --host that its certificate names. "
                "Retrying with backoff (next in %.1fs)",
                self.cfg.host,
                self.cfg.port,
                self.cfg.tls_ca,
                exc,
                delay,
            )
            return
        log.error(
            "broker %s:%d refused the worker's login (%s): check MEMORY_WORKER_USERNAME (%s) "
            "and MEMORY_WORKER_PASSWORD, and that the broker has that user and lets it in "
            "(with deploy/install --secure: sudo deploy/install --secure adds it again). "
            "Retrying with backoff (next in %.1fs)",
            self.cfg.host,
            self.cfg.port,
            exc,
            self.cfg.username,
            delay,
        )

    def _flapping(self, times: int) -> None:
        """The broker closed the connection soon after it opened, again and again, and no
        worker's status says why: another client holds the id, most likely a worker under
        another --prefix (its status is there, not under ours; Mosquitto 2.0 gives no
        reason code)."""
        if self._flap_said or self.stats.taken_over:
            log.debug("the broker closed the connection again (%d short ones in a row)", times)
            return
        self._flap_said = True
        log.error(
            "the broker closed this worker's connection soon after it opened, %d times in a "
            "row: another client with client id %r takes it, most likely (a worker under "
            "another --prefix, whose status is not under %s/), unless the broker was "
            "restarted that often or refuses something (its log says). Give each worker its "
            "own --client-id",
            times,
            self.cfg.client_id,
            self.cfg.prefix,
        )

    def _taken_over(self, delay: float | None = None) -> None:
        self.stats.taken_over += 1
        if self.stats.taken_over == 1:  # once: the fight goes on until one of them stops
            log.error(
                "another client connected with client id %r and took this worker's session "
                "(the broker closes the older connection); give each worker its own "
                "--client-id. Reconnecting with backoff%s",
                self.cfg.client_id,
                "" if delay is None else f" (next in {delay:.1f}s)",
            )
        else:
            log.debug("session taken over again (%d times)", self.stats.taken_over)

    def _live_twin(self, ours: bytes) -> tuple[dict[str, Any], dict[str, Any], bool] | None:
        """Another worker serving now as this client id: its live stats, its retained status,
        and whether it answered on a topic of this broker's alone (then it holds the id's
        session here). None when there is none, or when the broker cannot be asked (the
        connection that follows says why).

        Run before each connection (in a thread): connecting as a client id takes its
        session from whoever holds it, and two workers doing so in turn split the devices'
        turns between two stores. A short connection under another id reads the retained
        status (by the time its own ping comes back, the broker has sent it); when that says
        "online" and is not this worker's own, it waits TWIN_WAIT for the answer the ping
        asks of that worker: its stats, on its stats topic and on the look's own topic under
        `$memory-worker/`, which no bridge carries (wildcards do not match `$` topics), so a
        worker on another broker whose topics are bridged here answers on the first only."""
        cfg = self.cfg
        conn = BlockingConnection(
            cfg.host,
            cfg.port,
            f"{cfg.client_id}-look-{secrets.token_hex(3)}",
            username=cfg.username,
            password=cfg.password,
            tls=self._tls,
        )
        here = f"{c.LOOK_TOPIC}/{secrets.token_hex(8)}"
        status: dict[str, Any] = {}
        live: dict[str, Any] | None = None
        seen = False  # our ping came back: any retained status came before it
        until = time.monotonic() + c.LOOK_TIMEOUT
        try:
            conn.connect(until)
            # The worker topics last: `subscribe` reads past what comes before its SUBACK,
            # and their retained messages come after theirs.
            for topic_filter in (here, self.router.worker_topic(cfg.client_id, "+")):
                if conn.subscribe(topic_filter, 0, until):
                    return None  # refused (an ACL from before the look): nothing to tell
            conn.publish(self.ping_topic, here.encode(), 0, b"\x00", until)
            while True:
                if self._stopping.is_set():
                    return None
                try:  # in slices, so that a stop ends the look soon
                    first, body = conn.next_packet(min(until, time.monotonic() + 0.25))
                except TimeoutError:
                    if time.monotonic() < until:
                        continue
                    raise
                if first & 0xF0 != PUBLISH:
                    continue
                msg = decode_publish(first, body, 0, len(body))
                if msg.topic == self.status_topic and msg.retain:
                    status = decode_status(bytes(msg.payload))
                    if msg.payload == ours or self._mine(status):
                        status = {}
                elif msg.topic == self.stats_topic and not msg.retain:
                    live = _stats_of(bytes(msg.payload), cfg.client_id) or live
                elif msg.topic == here and seen:
                    answer = _stats_of(bytes(msg.payload), cfg.client_id)
                    if answer is not None:
                        return answer, status, True
                elif msg.topic == self.ping_topic and msg.payload == here.encode() and not seen:
                    seen = True
                    if status.get("state") != "online":
                        return None
                    log.info(
                        "the broker's retained status says a worker with client id %r is "
                        "online: asking it (up to %.0fs)",
                        cfg.client_id,
                        c.TWIN_WAIT,
                    )
                    until = time.monotonic() + c.TWIN_WAIT
        except TimeoutError:
            if live is not None and not self._stopping.is_set():
                return live, status, False
            if seen and not self._stopping.is_set():
                log.info(
                    "no worker answered as %r in %.0fs: a stale status (its end unseen by the "
                    "broker); taking the id",
                    cfg.client_id,
                    c.TWIN_WAIT,
                )
            return None
        except Exception as exc:  # cannot connect, or refused: the real connection says why
            log.debug("could not look for another worker as %r: %r", cfg.client_id, exc)
            return None
        finally:
            conn.close(disconnect=True)

    def _mine(self, status: dict[str, Any]) -> bool:
        """Whether a status is an earlier one of this very worker (a broker killed before
        its autosave comes back with what it saved last: this process's older "online")."""
        return status.get("pid") == os.getpid() and status.get("node") == self._node

    def _twin_error(self, twin: dict[str, Any]) -> ConfigError:
        cfg = self.cfg
        return ConfigError(
            f"another worker serves {cfg.prefix}/# on {cfg.host}:{cfg.port} as client id "
            f"{cfg.client_id!r} (version {twin.get('version')}, backend {twin.get('backend')}, "
            f"up {twin['uptime']:.0f}s): taking the id would take its session, and "
            "the two would split the devices' turns between two stores. Give each worker its "
            "own --client-id (MEMORY_WORKER_CLIENT_ID; add --shared-group to share the load, "
            "docs/scaling.md), or stop the other one"
        )

    async def _check_taken_over(self, client: Connection) -> None:
        """After a lost connection: is the retained status still ours? Mosquitto 2.0 closes a
        connection whose client id another client takes without saying why (no reason code),
        and that client, if it is a worker, has published its own "online"; or, when this
        connection just took the id back, the broker has published that worker's Will (its
        "offline", not ours, and newer than our "online": an older run's "offline", which a
        broker restores from its persistence, is not one)."""
        if self._loss_explained:
            return  # the broker said so (reason code 0x8E), and it was counted
        retained = await self._retained(client, self.status_topic)
        if retained is None or retained in (self._online, self._will):
            return
        status = decode_status(retained)
        if self._mine(status):  # an older one of ours, restored by the broker
            return
        with contextlib.suppress(TypeError):  # a ts that is not a number: not a worker's
            if status.get("state") == "online" or (
                status.get("state") == "offline"
                and status.get("ts", 0) > decode_status(self._online).get("ts", 0)
            ):
                self._taken_over()

    async def _retained(self, client: Connection, topic: str) -> bytes | None:
        """The retained message on `topic`, or None when there is none."""
        got: asyncio.Future[bytes] = self._loop_future()

        def on_retained(msg: Message) -> None:
            if msg.qos:
                client.acknowledge(msg.mid, msg.qos)
            if msg.retain and not got.done():
                got.set_result(bytes(msg.payload))

        client.on_topic(topic, on_retained)
        try:
            await client.subscribe(topic, qos=1)
            # The broker sends retained messages right after the SUBACK, so by the PUBACK of
            # a later publish of ours any retained message has arrived.
            probe = self.router.worker_topic(self.cfg.client_id, "probe")
            await client.publish(probe, b"", qos=1, timeout=5)
            return got.result() if got.done() else None
        finally:
            client.off_topic(topic)
            with contextlib.suppress(Exception):
                await client.unsubscribe(topic)

    @staticmethod
    def _loop_future() -> asyncio.Future[bytes]:
        return asyncio.get_running_loop().create_future()

    async def _on_connected(self, client: Connection) -> None:
        # Before anything awaits: the session's queued requests are served meanwhile, and
        # their trims must come after the older ones a durable backend held.
        self._announce(self.backend.held_events())
        filters = self.router.filters()
        # No Local: the worker's own events and stats are not sent back to it. MQTT 5 forbids
        # it on shared subscriptions, where the Router drops them instead.
        options = subscribe_options(no_local=not self.cfg.shared_group)
        # A session kept from an earlier version or from a run outside the group holds other
        # filters that overlap these: each request would be served twice.
        stale = self.router.legacy_filters()
        if self.cfg.shared_group:
            stale += filters
            filters = [f"$share/{self.cfg.shared_group}/{f}" for f in filters]
        await client.unsubscribe(stale)
        if self.connections == 0:
            await self._check_broker(client)
        else:
            await self._check_taken_over(client)
        subscriptions = [(f, options) for f in filters]
        if self.cfg.shared_group:
            # A share hands each message to one worker of the group: a ping to any, and
            # another worker's status and stats to one (and retained ones to none).
            own = subscribe_options(no_local=True)
            subscriptions.append((self.ping_topic, own))
            subscriptions += [(self.router.worker_topic("+", leaf), own) for leaf in _PEER_LEAVES]
        await client.subscribe(subscriptions)
        if self.cfg.ha_discovery:  # before "online", so that a reader of it finds them
            for topic, config in ha_discovery(
                self.cfg.ha_discovery,
                self.status_topic,
                self.stats_topic,
                self.cfg.client_id,
                __version__,
            ):
                await client.publish(
                    topic,
                    config,
                    qos=1,
                    retain=True,
                    properties=self._event_props,  # type: ignore[arg-type]
                )
        self._online = self._status("online")
        self._announced = True
        await client.publish(
            self.status_topic,
            self._online,
            qos=1,
            retain=True,
            properties=self._event_props,  # type: ignore[arg-type]
        )
        self.connected.set()
        self.connections += 1
        self._connection_made.set()
        self._publish_stats()
        self.systemd.ready(self._systemd_status())
        lim = self.cfg.limits
        log.info(
            "serving %s/# on %s:%d as %s%s (backend %s; at most %d conversations, %d turns "
            "each, %d bytes; ttl %s)",
            self.cfg.prefix,
            self.cfg.host,
            self.cfg.port,
            self.cfg.client_id,
            f" in share group {self.cfg.shared_group!r}" if self.cfg.shared_group else "",
            self.backend.name,
            lim.max_conversations,
            lim.max_turns,
            lim.max_bytes,
            f"{lim.ttl:g} s" if lim.ttl else "off",
        )

    def _systemd_status(self) -> str:
        broker = f"{self.cfg.host}:{self.cfg.port}"
        if not self.connected.is_set():
            if self._refusal is not None:
                return f"refused by the broker at {broker} ({self._refusal}): see the log"
            return f"waiting for the broker at {broker}"
        return (
            f"serving {self.cfg.prefix}/# on {broker} as {self.cfg.client_id}: "
            f"{_plural(self.backend.counts().conversations, 'conversation')}, "
            f"{_plural(self.stats.requests, 'request')}"
        )

    async def _check_broker(self, client: Connection) -> None:
        """Warn, once, about broker settings the worker needs that this broker lacks."""
        problems = []
        receive_max = client.broker_receive_max or 65535
        if receive_max < _WANT_INFLIGHT:
            problems.append(
                f"max_inflight_messages is {receive_max} (the broker's Receive Maximum); "
                f"the worker needs {_WANT_INFLIGHT}, or it waits on acknowledgements under load"
            )
        packet = client.broker_max_packet
        if packet is None:
            problems.append(
                "max_packet_size is unset: a single publish of any size reaches the worker "
                "whole before it can refuse it (one of 200 MB took it to 685 MB)"
            )
        elif packet < self.cfg.max_payload_bytes + 1024:
            problems.append(
                f"max_packet_size is {packet} bytes; requests of --max-payload-bytes "
                f"({self.cfg.max_payload_bytes}) would be refused"
            )
        rtt = await self.probe_round_trip(client)
        if rtt is None:
            log.info("could not time a QoS 1 round trip through the broker (no delivery in 2 s)")
        elif rtt > _SLOW_ROUND_TRIP:
            problems.append(
                f"a QoS 1 round trip through the broker takes {rtt * 1000:.0f} ms "
                "(under 1 ms on loopback with set_tcp_nodelay true); set_tcp_nodelay is "
                "probably off"
            )
        self.broker_round_trip = rtt
        if problems:
            log.warning(
                "broker %s:%d lacks settings the worker needs:\n  - %s\n"
                "add %s to the broker's configuration (Debian: copy it into "
                "/etc/mosquitto/conf.d/) and restart it; serving anyway",
                self.cfg.host,
                self.cfg.port,
                "\n  - ".join(problems),
                BROKER_SNIPPET,
            )

    async def probe_round_trip(self, client: Connection, rounds: int = 3) -> float | None:
        """The fastest of a few QoS 1 publishes to a topic of our own, until both the PUBACK and
        the message are back. The messages are acknowledged after the last round: a broker
        without TCP_NODELAY holds its second packet until our delayed TCP ACK, as it does a
        device's reply behind the PUBACK of its request."""
        topic = self.router.worker_topic(self.cfg.client_id, "probe")
        got: list[Message] = []
        arrived = asyncio.Event()

        def on_probe(msg: Message) -> None:
            got.append(msg)
            arrived.set()

        client.on_topic(topic, on_probe)
        best: float | None = None
        try:
            await client.subscribe(topic, qos=1)
            for _ in range(rounds):
                arrived.clear()
                started = time.perf_counter()
                try:
                    await client.publish(topic, b"", qos=1, timeout=2)
                    await asyncio.wait_for(arrived.wait(), 2)
                except (TimeoutError, aiomqtt.MqttError):
                    return None
                took = time.perf_counter() - started
                best = took if best is None else min(best, took)
            await client.unsubscribe(topic)
        finally:
            client.off_topic(topic)
            # Only now: an acknowledgement sent between rounds carries our TCP ACK, and the
            # next round would miss the stall that a device, which sends nothing while it
            # waits for its reply, meets.
            for msg in got:
                client.acknowledge(msg.mid, msg.qos)
        return best

    async def wait_connections(self, n: int) -> None:
        """Return once the worker has connected (and subscribed) `n` times in all."""
        while self.connections < n:
            self._connection_made.clear()
            await self._connection_made.wait()

    def _status(self, state: str) -> bytes:
        body = status_payload(
            state,
            version=__version__,
            client_id=self.cfg.client_id,
            prefix=self.cfg.prefix,
            backend=self.backend.name,
            pid=os.getpid(),
            ts=time.time(),
            node=self._node,
            broker=f"{self.cfg.host}:{self.cfg.port}",
        )
        return encode(body, self.cfg.event_format)

    # --- the hot path ---------------------------------------------------------------------

    def _on_message(self, msg: Message) -> None:
        if self._closing:
            return
        self._inbox.append((self._generation, msg))
        if self._full() and self._client is not None:
            self._client.pause_reading()

    def _on_read(self) -> None:
        """Serve what the read brought in its own turn when `_process` would serve it at once
        anyway (nothing waits, nothing to hold back, a backend that does not wait): the
        wake-up of its task was a third of a lone request's event-loop turns."""
        if not self._inbox:
            return
        client = self._client
        if (
            self._idle
            and not self._later
            and self.backend.immediate
            and client is not None
            and client.written.is_set()
            and not client.paused
            and client.backlog() <= client.backlog_limit()
        ):
            batch, self._inbox = self._inbox, []
            try:
                self._handle_now(batch)
            except Exception:  # the transport would take it for a broken connection
                log.exception("batch failed")
            if not self._later:  # else a listing page came: `_process` serves it
                return
        self._idle = False
        self._wake.set()

    async def _sendable(self) -> None:
        """Wait until what the last batch wrote is in the kernel, and while the broker has not
        yet acknowledged a backlog of our publishes.

        Holding the next batch (and, once the inbox is full, reading) or the next expiry
        chunk there keeps the outgoing queue short instead of letting it grow, and keeps the
        requests applied but not acknowledged to one batch: the ids a conversation remembers.
        """
        client = self._client
        if client is not None and not client.written.is_set():
            # Even while reading is paused: writing does not wait on our reading (the
            # broker, not blocking, goes on reading what we send). A lost connection sets it.
            await client.written.wait()
        # Not while reading is paused: the broker's PUBACKs that would shrink the backlog
        # wait in the socket behind the requests we are not reading, so waiting would never
        # end. Input is bounded by the pause; the backlog grows by one batch at most.
        while (
            client is not None and not client.paused and client.backlog() > client.backlog_limit()
        ):
            client.sendable.clear()
            # PUBACKs wake us; the timeout covers a backlog that drains without one (our
            # own acknowledgements and QoS 0 packets leaving the socket).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(client.sendable.wait(), 0.05)

    async def _process(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._idle = not self._inbox and not self._later
            await self._wake.wait()
            self._idle = False
            self._wake.clear()
            while self._inbox or self._later:
                await self._sendable()
                client = self._client
                if not self._inbox:
                    # Between pages the other tasks run (stats, the sweep, the watchdog's
                    # pings): reading one does not yield, nor would a queue of them.
                    await asyncio.sleep(0)
                    if client is not None:
                        client.read_now()
                    if not self._later:
                        continue
                # No pause while pages fill --max-inflight: reading is paused, and the
                # requests it would let through are the ones waiting.
                pause = self._list_resume - time.monotonic()
                if not self._inbox and pause > 0 and not self._full():
                    if self._resume_timer is not None:
                        self._resume_timer.cancel()
                    self._resume_timer = loop.call_later(pause, self._wake.set)
                    break
                self._busy = True
                try:
                    if self._inbox:
                        batch, self._inbox = self._inbox, []
                        await self._handle(batch)
                    else:
                        await self._list_steps()
                except Exception:
                    log.exception("batch failed")
                finally:
                    self._busy = False
                if client is not None and client.paused and not self._inbox and not self._full():
                    client.resume_reading()

    def _full(self) -> bool:
        """Read no more: what waits (listing pages too, QoS 0 ones that no Receive Maximum
        bounds) is at --max-inflight."""
        return len(self._inbox) + len(self._later) >= self.cfg.max_inflight

    async def _handle(self, batch: list[tuple[int, Message]]) -> None:
        todo = self._sort(batch)
        if todo:
            self._finish(todo, await self._execute(_requests(todo)))

    def _handle_now(self, batch: list[tuple[int, Message]]) -> None:
        """`_handle` on the caller's turn, for an immediate backend."""
        todo = self._sort(batch)
        if todo:
            self._finish(todo, self._execute_now(_requests(todo)))

    def _sort(self, batch: list[tuple[int, Message]]) -> list[tuple[int, Message, Parsed]]:
        """Parse a batch: the requests to apply now, in order (parse errors among them);
        messages that are not requests are acknowledged, listing pages wait in `_later`."""
        parse = self.router.parse
        not_for_us = self.router.not_for_us
        mine = self.router.mine
        stats = self.stats
        todo: list[tuple[int, Message, Parsed]] = []
        # Past REPLY_BACKLOG_BYTES of our publishes the broker has not acknowledged (its
        # PUBACKs behind a flood), a batch is refused whole before anything is applied: its
        # replies and events would wait in memory without bound (a flood of gets took 2 GiB,
        # of appends with --trimmed-events 541 MB). Judged before the batch: its own replies
        # never refuse it.
        client = self._client
        backlog = client.unacked_bytes if client is not None else 0
        busy = (
            Unavailable(
                f"{backlog} bytes of the worker's messages wait for the broker to take them: "
                "nothing was done, ask again later"
            )
            if backlog > c.REPLY_BACKLOG_BYTES
            else None
        )
        for gen, msg in batch:
            topic = msg.topic
            if not_for_us(topic):  # events and worker topics: ours or other workers'
                if topic == self.ping_topic and not msg.retain:
                    self._answer_ping(msg.payload)
                elif len(msg.payload) > c.MAX_WORKER_TOPIC_BYTES:
                    pass  # not a worker's: anyone may publish there (a MB of [{}] is 69 MB)
                elif topic.endswith((_STATS_LEAF, _STATUS_LEAF)):
                    try:
                        if topic.endswith(_STATS_LEAF):
                            self._peer_stats(msg.payload)
                        else:
                            self._peer_status(msg.payload)
                    except Exception:  # a message must never cost the batch its replies
                        log.debug("another worker's stats do not compare", exc_info=True)
                self._ack(gen, msg)
                continue
            if msg.retain:
                stats.ignored_retained += 1
                self._ack(gen, msg)
                continue
            if not mine(topic):
                self._stray(topic)
                self._ack(gen, msg)
                continue
            parsed = parse(topic, msg.payload, msg.response_topic)
            if msg.correlation is not None and len(msg.correlation) > c.MAX_CORRELATION_BYTES:
                # Echoed in the reply: a request of a few bytes would cost a reply of 64 KB.
                refused = BadRoute(
                    f"reply route refused: correlation data of {len(msg.correlation)} bytes "
                    f"(at most {c.MAX_CORRELATION_BYTES})"
                )
                parsed = replace(parsed, route=None, refused=refused)
            if busy is not None and parsed.request is not None:
                parsed = replace(parsed, request=None, error=busy)
            if isinstance(parsed.request, ListConvos):
                if len(self._later) >= self._pages_max:
                    # Waiting pages count in --max-inflight: a burst of them stopped reading,
                    # and devices' requests waited at the broker behind them for a minute.
                    full = Unavailable(
                        f"{len(self._later)} listing pages wait already: ask again later"
                    )
                    todo.append((gen, msg, replace(parsed, request=None, error=full)))
                    continue
                # A page is a hundred conversations' worth of work and a large reply: the
                # requests of devices do not wait behind it (_process serves it after them).
                # Its PUBACK then follows theirs, out of the order MQTT asks of a client
                # (4.6.0-2); brokers do not check it.
                self._later.append(_Page(gen, msg, parsed, parsed.request))
            else:
                todo.append((gen, msg, parsed))
        return todo

    def _answer_ping(self, payload: bytes) -> None:
        """Another worker about to connect as this one's client id asks whether it serves:
        live stats say so (`_live_twin`), on the stats topic and on the look's topic the
        ping names, within PING_EVERY (anyone may ping: a few look topics a second)."""
        with contextlib.suppress(UnicodeDecodeError):
            here = bytes(payload).decode()
            if (
                here.startswith(c.LOOK_TOPIC + "/")
                and len(here) <= c.MAX_LOOK_TOPIC
                and not topic_name_problem(here)
                and len(self._looks) < c.LOOKS_ANSWERED
            ):
                self._looks.add(here)
        if self._ping_answer is not None:
            return  # one is on its way
        wait = self._pinged + c.PING_EVERY - time.monotonic()
        self._ping_answer = asyncio.get_running_loop().call_later(max(wait, 0), self._pong)

    def _pong(self) -> None:
        self._ping_answer = None
        self._pinged = time.monotonic()
        looks, self._looks = self._looks, set()
        if self.connected.is_set():
            self._publish_stats(looks)

    def _peer_status(self, payload: bytes) -> None:
        """Another worker's status: its stats are judged (`_peer_stats`) only while it says
        it is online (a stopped worker's last stats stay retained, and recent, a while)."""
        body = decode_status(payload)
        peer, state = body.get("client_id"), body.get("state")
        if not _peer_text(peer) or peer == self.cfg.client_id:
            return
        if not _peer_text(state):  # kept: 8 KiB of [{}] is 600 KB (a review)
            state = "?"
        if peer not in self._peer_states and len(self._peer_states) >= _PEERS_KEPT:
            return  # anyone may publish statuses: no more
        since = body.get("ts")
        since = float(since) if isinstance(since, int | float) else 0.0
        self._peer_states[peer] = (state, since)
        pending = self._peer_pending.pop(peer, None)
        if state == "online" and pending is not None and _of_this_run(pending, since):
            self._judge_peer(pending)

    def _peer_stats(self, payload: bytes) -> None:
        """Another worker's stats on this prefix, judged once its status says online."""
        try:
            body = _peer_fields(decode_event(payload, None))
        except Exception:  # not stats of ours: nothing to compare
            return
        if body is None:  # anyone may publish there: not a worker's
            return
        peer = body["client_id"]
        if peer == self.cfg.client_id or not stats_are_recent(body, time.time()):
            return
        state, since = self._peer_states.get(peer, (None, 0.0))
        if state == "online":
            if _of_this_run(body, since):
                self._judge_peer(body)
        elif state is None and (
            peer in self._peer_pending or len(self._peer_pending) < _PEERS_KEPT
        ):  # its status may come after: judged then, on what is compared
            self._peer_pending[peer] = body

    def _judge_peer(self, body: dict[str, Any]) -> None:
        """Say once when a worker online on this prefix serves it apart from this one
        (outside the share group, or in another: both answer every request, each from its
        own store), in its share group on a store of its own, or with other limits, since
        each would trim the conversations they share to its own."""
        if len(self._peers_warned) >= _PEERS_NAMED:  # anyone may publish stats: no more
            return
        peer, limits = body["client_id"], body["limits"]
        backend = self.backend.name
        group = self.cfg.shared_group or None
        if "shared_group" in body and (body["shared_group"] != group or group is None):
            self._peer_warning(
                peer,
                ("shared_group",),
                "worker %s serves %s/# %s, this one %s: each request reaches both, and each "
                "answers it from its own store (two replies, two histories). Run every worker "
                "on a prefix in one --shared-group (docs/scaling.md), or give this one another "
                "--prefix",
                peer,
                self.cfg.prefix,
                _group_name(body["shared_group"]),
                _group_name(group),
            )
            return
        backends = {body.get("backend"), backend}
        if "shared_group" in body and not backends <= _SHARED_BACKENDS:  # in one group
            self._peer_warning(
                peer,
                ("backend",),
                "worker %s serves %s/# in this one's share group on backend %s, this one on "
                "%s: a share group hands each request to one of them, and each keeps its own "
                "store, so a conversation has two histories. A share group needs one Redis "
                "(docs/scaling.md)",
                peer,
                self.cfg.prefix,
                body.get("backend"),
                backend,
            )
        theirs, store = body.get("store"), self.backend.store_id
        apart = "shared_group" in body and bool(theirs and store and theirs != store)
        # Twice in a row: a Redis restarted empty is named anew by the first worker to open
        # it, and the others take that name at their next sweep.
        if len(self._stores_apart) > _PEERS_TRACKED:  # anyone may publish stats
            self._stores_apart.clear()
        seen_apart, self._stores_apart[peer] = self._stores_apart.get(peer, False), apart
        if apart and seen_apart:
            self._peer_warning(
                peer,
                ("store",),
                "worker %s serves %s/# in this one's share group from another store (its "
                "%s store %s; here %s, store %s: another Redis, or another database of it): "
                "a share group hands each request to one of them, so a conversation has two "
                "histories. Give every worker of a group the same --backend (docs/scaling.md)",
                peer,
                self.cfg.prefix,
                body.get("backend"),
                theirs,
                getattr(self.backend, "url", backend),  # redacted: no password
                store,
            )
        ours = limits_payload(self.cfg.limits)
        differ = tuple(k for k in ours if k in limits and limits[k] != ours[k])
        if differ:
            self._peer_warning(
                peer,
                differ,
                "worker %s serves %s/# with other limits (%s): workers on one prefix must "
                "share their limits, or each trims the conversations they share to its own "
                "(docs/scaling.md)",
                peer,
                self.cfg.prefix,
                ", ".join(f"{k} {limits[k]}, here {ours[k]}" for k in differ),
            )

    def _peer_warning(self, peer: str, what: tuple[str, ...], message: str, *args: Any) -> None:
        if (peer, what) not in self._peers_warned:
            self._peers_warned.add((peer, what))
            log.warning(message, *args)

    def _finish(
        self,
        todo: list[tuple[int, Message, Parsed]],
        outcome: tuple[list[Result], list[Event]],
    ) -> None:
        """Reply to and acknowledge an executed batch, announce its events, and write."""
        results, evictions = outcome
        answers = iter(results)
        self._answer(
            [
                (gen, msg, parsed, parsed.error if parsed.error is not None else next(answers))
                for gen, msg, parsed in todo
            ],
            evictions,
        )
        if results:  # not refusals alone: listing pages turned away slowed the listings
            self._served = now = time.monotonic()  # that kept coming back, to a crawl
            if now + self.backend.next_expiry() < self._sweep_due - 0.01:
                self._sweep_kick.set()

    async def _execute(self, requests: list[Request]) -> tuple[list[Result], list[Event]]:
        if not requests:
            return [], []
        try:
            return await self.backend.execute(requests)
        except Exception as exc:
            return _failed(exc, len(requests))

    def _execute_now(self, requests: list[Request]) -> tuple[list[Result], list[Event]]:
        if not requests:
            return [], []
        try:
            return self.backend.execute_now(requests)
        except Exception as exc:
            return _failed(exc, len(requests))

    def _answer(
        self, done: list[tuple[int, Message, Parsed, Result]], evictions: list[Event]
    ) -> None:
        self.stats.requests += len(done)
        # Hand these acknowledgements to the kernel before the next batch is applied: a
        # crash then leaves at most one batch applied but unacknowledged, and the broker's
        # redelivery of it stays within the ids remembered. (Not while a reconnection is
        # under way: paho's connect runs on another thread.)
        client = self._client if self.connected.is_set() else None
        if client is not None:
            client.hold_writes()
        try:
            for gen, msg, parsed, result in done:
                self._reply(msg, parsed, result)
                self._ack(gen, msg)
            self._announce(evictions)
        finally:
            if client is not None:
                client.flush()

    async def _list_steps(self) -> None:
        """Read the oldest listing page a step at a time until it is whole (then reply), or
        until a request comes meanwhile (served first; the page goes on after it). While
        other requests are being served, the next page waits its LIST_DUTY pause."""
        if not self._later:  # the connection was lost meanwhile
            return
        page = self._later[0]
        client = self._client
        start = time.monotonic()
        try:
            while not await self._list_step(page):
                if client is not None:
                    client.read_now()
                if self._inbox or not self._later or self._later[0] is not page:
                    return
        finally:
            page.work += time.monotonic() - start
        now = time.monotonic()
        if now - self._served < c.LIST_BUSY:
            self._list_resume = now + page.work * (1 / c.LIST_DUTY - 1)

    async def _list_step(self, page: _Page) -> bool:
        """Read the page's next step; True once the page is answered (or gone)."""
        want = page.request.limit - page.read
        step = min(want, self.backend.list_step or want)
        request = replace(page.request, limit=step, after=page.after)
        # The store's events are whatever it holds (SQLite's evictions on opening, say),
        # not only this step's: announced as any batch's are.
        (result,), events = await self._execute([request])
        if not self._later or self._later[0] is not page:  # the connection was lost meanwhile
            self._answer([], events)
            return True
        if isinstance(result, Fields):
            try:
                cursor = result.fields["cursor"]
                after = decode_cursor(cursor) if cursor is not None else ""
            except WorkerError:
                log.exception("a listing step's cursor does not decode")
                result = WorkerError("internal error: a listing step's cursor")
            else:
                page.found += result.fields["conversations"]
                page.read += step
                if cursor is not None and page.read < page.request.limit:
                    page.after = after
                    self._answer([], events)
                    return False
                result = Fields({"conversations": page.found, "cursor": cursor})
        self._later.popleft()
        self._answer([(page.gen, page.msg, page.parsed, result)], events)
        return True

    def _reply(self, msg: Message, parsed: Parsed, result: Result) -> None:
        stats = self.stats
        route = parsed.route
        payload = props = b""
        if route is not None:
            assert self._client is not None
            payload = encode_result(result, parsed)
            props = self._reply_props(msg.correlation)
            limit = self._client.broker_max_packet
            # The broker would drop the connection, and again on each as the reply went again.
            if (size := oversize(route, payload, props, limit)) is not None:
                result = TooLarge(
                    f"the reply would be a {size}-byte packet, over the {limit} bytes "
                    "the broker takes (its max_packet_size): ask for less (get with "
                    "last or max_tokens, fewer keys in a namespace)"
                )
                payload = encode_result(result, parsed)
        if isinstance(result, WorkerError):
            stats.errors[result.code] += 1
        elif isinstance(parsed.request, Summary) and isinstance(result, Fields):
            stats.summaries += 1
        if parsed.refused is not None:
            stats.refused[parsed.refused.code] += 1
        if route is not None:
            assert self._client is not None
            self._client.publish_packed(route, payload, msg.qos, False, props)

    def _stray(self, topic: str) -> None:
        """A request under another prefix, which this worker never subscribed to: a run of
        its client id with that --prefix left the subscription in the session. Answered by
        nobody here (it told that prefix's devices bad_topic for writes the workers of that
        prefix stored); its filters are unsubscribed."""
        filters = [f for f in self.router.stray_filters(topic) if f not in self._strays]
        if self.cfg.shared_group:
            filters += [f"$share/{self.cfg.shared_group}/{f}" for f in filters]
        client = self._client
        if not filters or client is None or len(self._strays) > _STRAYS_MAX:
            return
        self._strays.update(filters)
        log.warning(
            "a request on %r reached this worker (prefix %r) through a subscription its "
            "session kept from a run of client id %r with another --prefix: not answered; "
            "unsubscribing it",
            topic,
            self.cfg.prefix,
            self.cfg.client_id,
        )
        task = asyncio.create_task(self._unsubscribe(client, filters))
        self._unsubscribing.add(task)
        task.add_done_callback(self._unsubscribing.discard)

    async def _unsubscribe(self, client: Connection, filters: list[str]) -> None:
        try:
            await client.unsubscribe(filters)
        except aiomqtt.MqttError:  # lost meanwhile: the next stray message asks again
            self._strays.difference_update(filters)

    def _ack(self, gen: int, msg: Message) -> None:
        if msg.qos and gen == self._generation and self._client is not None:
            self._client.acknowledge(msg.mid, msg.qos)

    def _announce(self, events: list[Event]) -> None:
        if not events or self._client is None:
            return
        publish = self._client.publish_packed
        router = self.router
        fmt, props = self.cfg.event_format, self._event_props.packed
        for ev in events:
            if isinstance(ev, Eviction):
                self.stats.evictions[ev.reason] += 1
                publish(router.evicted_topic(ev.convo), encode_event(ev, fmt), 1, False, props)
            else:
                self.stats.trimmed += ev.count
                topic, payload = router.trimmed_topic(ev.convo), encode_trimmed(ev, fmt)
                if not ev.receipt:
                    publish(topic, payload, 1, False, props)
                    continue
                sent = self._client.publish_watched(topic, payload, False, props)
                self._watched.add(sent)
                sent.add_done_callback(partial(self._delivered, ev.receipt))

    def _delivered(self, receipt: int, sent: asyncio.Future[str | None]) -> None:
        self._watched.discard(sent)
        if not sent.cancelled():  # refused or too large too: sending it again would not help
            self.backend.delivered(receipt)

    # --- background work ------------------------------------------------------------------

    async def _sweep(self) -> None:
        # Sleeps until the backend's next deadline (forever when nothing can expire), at
        # most once per SWEEP_INTERVAL; `_sweep_kick` wakes it when a request made an
        # earlier deadline than the one it sleeps to.
        failing = False
        ran = -math.inf
        while True:
            now = time.monotonic()
            delay = max(0.0, self.backend.next_expiry(), ran + c.SWEEP_INTERVAL - now)
            if failing:
                delay = c.SWEEP_INTERVAL
            self._sweep_due = now + delay
            self._sweep_kick.clear()
            self._sweep_resting.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._sweep_kick.wait(), None if delay == math.inf else delay
                )
            if self._sweep_kick.is_set() and time.monotonic() < self._sweep_due:
                continue  # woken by a request: sleep again, to its deadline
            if self._closing:
                return
            self._sweep_resting.clear()
            ran = time.monotonic()
            more = True
            # A chunk taken is announced whole, even once stopping (shutdown waits for it):
            # its evictions are made, and stored by a durable backend.
            while more and not self._closing:
                # Not while offline: its events would wait in memory, and a worker stopped
                # then would lose them after a durable backend stored the evictions.
                await self.connected.wait()
                await self._sendable()
                try:
                    more, evictions = await self.backend.expire()
                except Exception as exc:
                    if not failing:  # once per outage, not four times a second
                        log.warning("expiry sweep failed: %s", exc)
                    failing = True
                    break
                if failing:
                    log.info("expiry sweep works again")
                failing = False
                for at in range(0, len(evictions), _EVENT_SLICE):
                    await self._room_for_events()
                    self._announce(evictions[at : at + _EVENT_SLICE])
                    await asyncio.sleep(0)  # let requests in between slices

    async def _room_for_events(self) -> None:
        """Wait until a slice of events keeps our unacknowledged publishes within two
        slices (or half the broker's Receive Maximum, if less).

        Past the Receive Maximum paho queues our publishes, and a QoS 1 reply would wait
        behind every event queued before it for the broker's PUBACKs (the stall during an
        expiry wave); a short event backlog leaves replies room, and the broker less to get
        through before it reaches a reply.
        """
        client = self._client
        while client is not None and not client.paused and self.connected.is_set():
            room = min(client.max_inflight // 2, 2 * _EVENT_SLICE)
            if client.backlog() + _EVENT_SLICE <= max(room, _EVENT_SLICE):
                return
            client.sendable.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(client.sendable.wait(), 0.005)

    async def _publish_stats_forever(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.stats_interval)
            if self.connected.is_set():
                try:
                    self._publish_stats()
                except Exception:  # a stats message is never worth stopping the next one
                    log.exception("publishing stats failed")

    def stats_body(self) -> dict[str, Any]:
        return stats_payload(
            self.stats,
            self.backend.counts(),
            self.cfg.limits,
            client_id=self.cfg.client_id,
            version=__version__,
            backend=self.backend.name,
            now=time.monotonic(),
            ts=time.time(),
            interval=self.cfg.stats_interval,
            shared_group=self.cfg.shared_group or None,
            store=self.backend.store_id,
        )

    def _publish_stats(self, looks: Iterable[str] = ()) -> None:
        """The stats, retained on the stats topic, and to each look topic (`_answer_ping`)."""
        if self._client is not None:
            body = encode(self.stats_body(), self.cfg.event_format)
            self._client.publish_packed(self.stats_topic, body, 1, True, self._event_props.packed)
            for topic in looks:
                self._client.publish_packed(topic, body, 0, False, self._event_props.packed)


@dataclass(slots=True)
class _Page:
    """A listing request being read a step at a time."""

    gen: int
    msg: Message
    parsed: Parsed
    request: ListConvos
    after: str = field(init=False)
    read: int = 0  # conversations scanned so far
    work: float = 0.0  # seconds spent reading it
    found: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.after = self.request.after
