"""`memory-summarizer`: folds the turns a worker trims into the conversation's summary, with
any OpenAI-compatible model server, losing none.

One flow: the worker publishes each turn that leaves a window on P/<convo>/trimmed (with
--trimmed-events) -> the broker hands it to this summarizer (to one of a --group), kept in its
persistent session until acknowledged -> `_on_message` queues it behind that conversation's
earlier events -> `_fold` reads the summary (`get`), asks the model for the new one (the old
summary plus the trimmed turns it does not cover yet), saves it with compare-and-set
(`summary`, base = the upto it read) -> only then acknowledges the event.

What makes it lose nothing:
- The acknowledgement follows the save: a summarizer killed mid-fold gets the event again
  (from the broker, on the restart of its persistent session, or another member's).
- Compare-and-set: a fold saved on a summary that changed meanwhile is refused (`conflict`),
  and the summarizer reads again and folds again; a trim is never undone.
- Turns are folded in seq order: an event whose first turn does not follow the summary's
  upto waits for the events before it (held by another member, or redelivered), for
  --gap-wait seconds; past that its turns are folded anyway, and the log names the turns
  that never came (trimmed when no summarizer's session existed).
- An event that the summary already covers, or whose conversation is gone (deleted, evicted,
  or started again since: the save names the conversation's `born`), is acknowledged without
  a fold.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import logging
import math
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiomqtt

from worker import __version__
from worker import constants as c
from worker.client import (
    ConflictError,
    MemoryClient,
    MemoryWorkerError,
    TooLargeError,
    check_reply_prefix,
)
from worker.config import finite, tls_context, validate_connection
from worker.errors import ConfigError
from worker.llm import (
    DEFAULT_LLM_TIMEOUT,
    DEFAULT_LLM_URL,
    DEFAULT_MODEL,
    DEFAULT_SUMMARY_TOKENS,
    ChatModel,
    Folded,
    ModelError,
)
from worker.mqtt import Connection, Message, persistent, refusal
from worker.protocol import decode_event, stats_are_recent
from worker.systemd import Notifier, configure_logging

log = logging.getLogger("memory_summarizer")

DEFAULT_CLIENT_ID = "memory-summarizer"
# None: a plain subscription. Mosquitto 2.0 restores a persistent session's shared
# subscription after a restart without delivering to it until the client subscribes again:
# events published in between are dropped (measured with 2.0.11); a plain one keeps them.
DEFAULT_GROUP: str | None = None
DEFAULT_CONCURRENCY = 2
DEFAULT_GAP_WAIT = 600.0
# Under each conversation's reply/<convo>/, where a worker run with --route-prefix
# reply/{convo} (deploy/'s) may answer, and the summarizer role may read.
DEFAULT_REPLY_PREFIX = "reply/{convo}/_summarizer"
ENV_PREFIX = "MEMORY_SUMMARIZER_"
# Events handed to us and not yet acknowledged: the broker holds the rest.
_RECEIVE_MAXIMUM = 1000
_RETRY_FIRST = 0.5
_SHORTEST_SUMMARY = 32  # tokens: below it, a summary that does not fit is given up
DEFAULT_RETRY_MAX = 30.0
_DRAIN_TIMEOUT = 10.0
# A connection shorter than this does not reset the reconnect backoff.
_STABLE_CONNECTION = 10.0
# How often the workers are looked at again after the start's check (seconds).
_WATCH_EVERY = 60.0


@dataclass(frozen=True, slots=True)
class SummarizerConfig:
    """Everything `memory-summarizer` is told; see `memory-summarizer --help`."""

    host: str = c.DEFAULT_HOST
    port: int = c.DEFAULT_PORT
    prefix: str = c.DEFAULT_PREFIX
    client_id: str = DEFAULT_CLIENT_ID
    group: str | None = DEFAULT_GROUP
    reply_prefix: str = DEFAULT_REPLY_PREFIX
    username: str | None = None
    password: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    llm_url: str = DEFAULT_LLM_URL
    model: str = DEFAULT_MODEL
    api_key: str | None = field(default=None, repr=False)
    summary_tokens: int = DEFAULT_SUMMARY_TOKENS
    llm_timeout: float = DEFAULT_LLM_TIMEOUT
    concurrency: int = DEFAULT_CONCURRENCY
    gap_wait: float = DEFAULT_GAP_WAIT
    retry_max: float = DEFAULT_RETRY_MAX
    session_expiry: int = c.DEFAULT_SESSION_EXPIRY
    reconnect_max: float = c.DEFAULT_RECONNECT_MAX
    log_level: str = c.DEFAULT_LOG_LEVEL

    def __post_init__(self) -> None:
        validate_connection(
            port=self.port,
            prefix=self.prefix,
            session_expiry=self.session_expiry,
            reconnect_max=self.reconnect_max,
            tls_ca=self.tls_ca,
            tls_cert=self.tls_cert,
            tls_key=self.tls_key,
            log_level=self.log_level,
        )
        for name, value in (("client-id", self.client_id), ("group", self.group or "g")):
            if not value or any(ch in value for ch in "/+#"):
                raise ConfigError(f"--{name} must be a name without / + #, got {value!r}")
        for name, number in (
            ("summary-tokens", self.summary_tokens),
            ("concurrency", self.concurrency),
            ("llm-timeout", self.llm_timeout),
            ("retry-max", self.retry_max),
        ):
            if number <= 0:
                raise ConfigError(f"--{name} must be more than 0, got {number}")
        try:
            check_reply_prefix(self.reply_prefix, self.prefix)
        except MemoryWorkerError as exc:
            raise ConfigError(f"--reply-prefix: {exc.message}") from None
        if self.gap_wait < 0:
            raise ConfigError(f"--gap-wait must be 0 or more seconds, got {self.gap_wait}")
        if not self.llm_url.startswith(("http://", "https://")):
            raise ConfigError(f"--llm-url must be an http:// or https:// URL, got {self.llm_url!r}")
        if not self.model.strip():
            raise ConfigError(
                "--model must name the model (MEMORY_SUMMARIZER_MODEL; the server's GET "
                "/v1/models lists them), got an empty name"
            )


# (flag, kind, help); broker flags also read the worker's MEMORY_WORKER_* variables, so one
# environment file can serve both.
_BROKER_FLAGS = ("host", "port", "prefix", "username", "password", "tls-ca", "tls-cert", "tls-key")
_FLAGS: tuple[tuple[str, Callable[[str], object], str], ...] = (
    ("host", str, "broker host"),
    ("port", int, "broker port"),
    ("prefix", str, "the worker's topic prefix P"),
    ("client-id", str, "MQTT client id: give each instance its own, stable across restarts"),
    (
        "group",
        str,
        "share group: summarizers of one group split the trimmed events (without one, each "
        "gets every event; see docs/context.md)",
    ),
    ("reply-prefix", str, "where the worker's replies to it go; {convo}: the conversation id"),
    ("username", str, "broker username"),
    ("password", str, "broker password (prefer the environment variable)"),
    ("tls-ca", str, "CA certificate file: connect with TLS, verifying the broker"),
    ("tls-cert", str, "client certificate file"),
    ("tls-key", str, "client private key file"),
    ("llm-url", str, "OpenAI-compatible API base URL (Ollama, llama.cpp's llama-server)"),
    ("model", str, "the model's name on that server"),
    ("summary-tokens", int, "the summary's length to ask the model for, in tokens"),
    ("llm-timeout", finite, "seconds one model call may take"),
    ("concurrency", int, "conversations folded at once"),
    ("gap-wait", finite, "seconds an event waits for earlier ones of its conversation"),
    ("retry-max", finite, "cap of the backoff between tries of a fold (s)"),
    ("session-expiry", int, "seconds the broker keeps our session (and events) while we are away"),
    ("reconnect-max", finite, "cap of the reconnect backoff (s)"),
    ("log-level", str, "debug, info, warning or error"),
)


def from_args(argv: Sequence[str], environ: Mapping[str, str]) -> SummarizerConfig:
    """A flag wins over MEMORY_SUMMARIZER_<FLAG>, then MEMORY_WORKER_<FLAG> (broker flags),
    then the default; the API key comes from OPENAI_API_KEY."""
    parser = _Parser(
        prog="memory-summarizer",
        description="Fold the turns memory-worker trims (--trimmed-events) into each "
        "conversation's summary, with an OpenAI-compatible model server. Every flag can also "
        f"be set as {ENV_PREFIX}<FLAG>; broker flags also as MEMORY_WORKER_<FLAG>.",
    )
    defaults = SummarizerConfig()
    for name, _, text in _FLAGS:
        dest = name.replace("-", "_")
        here = ""
        for var in (v for v in _variables(name) if environ.get(v)):
            here = f"; here {var} is set" if name == "password" else f"; here {var}={environ[var]}"
            break
        parser.add_argument(
            f"--{name}",
            dest=dest,
            metavar=dest.upper(),
            help=f"{text} (default: {getattr(defaults, dest)}{here})",
        )
    ns = parser.parse_args(list(argv))
    values: dict[str, Any] = {}
    for name, kind, _ in _FLAGS:
        dest = name.replace("-", "_")
        raw, source = getattr(ns, dest), f"--{name}"
        for var in _variables(name):
            if raw is None and environ.get(var):  # an empty one is unset, as for the worker
                raw, source = environ[var], var
        if raw is None:
            continue
        try:
            values[dest] = kind(raw)
        except ValueError:
            kind_name = (
                "an integer" if kind is int else "a finite number" if kind is finite else "text"
            )
            raise ConfigError(f"{source}: expected {kind_name}, got {raw!r}") from None
    return SummarizerConfig(api_key=environ.get("OPENAI_API_KEY") or None, **values)


def _variables(flag: str) -> tuple[str, ...]:
    """The environment variables that set `flag`, the first found winning."""
    name = flag.replace("-", "_").upper()
    if flag in _BROKER_FLAGS:
        return ENV_PREFIX + name, c.ENV_PREFIX + name
    return (ENV_PREFIX + name,)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(message)


@dataclass(slots=True)
class _Event:
    """A trimmed event, until it is acknowledged."""

    generation: int
    mid: int
    qos: int
    turns: list[dict[str, Any]]
    born: int | None = None  # the conversation they were trimmed from (a later one differs)
    waiting_since: float = 0.0  # monotonic time it began to wait for earlier turns
    waited_upto: int = -1  # the summary's upto then: a wait restarts when it moves

    @property
    def first(self) -> int:
        return int(self.turns[0]["seq"]) if self.turns else 0

    @property
    def last(self) -> int:
        return int(self.turns[-1]["seq"])


class Summarizer:
    """Folds trimmed turns into summaries until stopped; see the module docstring.

    Args:
        cfg: the frozen configuration.
        model: the model to fold with (tests pass their own); by default cfg's server.
    """

    def __init__(self, cfg: SummarizerConfig, model: ChatModel | None = None) -> None:
        self.cfg = cfg
        self.model = model or ChatModel(
            cfg.llm_url,
            cfg.model,
            api_key=cfg.api_key,
            summary_tokens=cfg.summary_tokens,
            timeout=cfg.llm_timeout,
        )
        self.head = f"{cfg.prefix}/"
        topic = f"{cfg.prefix}/+/{c.TRIMMED}"
        self.topic_filter = f"$share/{cfg.group}/{topic}" if cfg.group else topic
        self.connected = asyncio.Event()
        self.folds = 0  # summaries saved
        self.received = 0  # events queued to fold
        self.acknowledged = 0  # events acknowledged
        self._progress = asyncio.Event()
        self.connections = 0  # connections made (and subscribed) in all
        self._connection_made = asyncio.Event()
        self._queues: dict[str, list[_Event]] = {}  # each in seq order
        self._arrived: dict[str, asyncio.Event] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._retries: dict[str, int] = {}  # a conversation's failed tries in a row
        self._slots = asyncio.Semaphore(cfg.concurrency)
        self._generation = 0
        self._closing = False
        self._stopping = asyncio.Event()  # folds waiting to try again end then
        # Conversations whose failure was logged: the problem logged last.
        self._refusing: dict[str, str] = {}
        self._shortened: set[str] = set()  # conversations whose too-large summary was logged
        self._most: dict[str, int] = {}  # turns per model call, where the model timed out
        self._conn: Connection | None = None
        self._memory: MemoryClient | None = None
        self.preflight: asyncio.Task[None] | None = None  # the checks at start
        self._named: set[str] = set()  # workers said to run without --trimmed-events
        self.looks = 0  # looks at the workers after the start's check
        self._looked = asyncio.Event()
        self.systemd = Notifier.from_environ(os.environ)

    # --- lifecycle ------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set; then finish the folds in hand (within a deadline)."""
        cfg = self.cfg
        memory = MemoryClient(
            cfg.host,
            cfg.port,
            cfg.prefix,
            username=cfg.username,
            password=cfg.password,
            tls_ca=cfg.tls_ca,
            reply_prefix=cfg.reply_prefix,
        )
        conn = persistent(
            self._on_message,
            host=cfg.host,
            port=cfg.port,
            client_id=cfg.client_id,
            username=cfg.username,
            password=cfg.password,
            session_expiry=cfg.session_expiry,
            receive_maximum=_RECEIVE_MAXIMUM,
            tls=tls_context(cfg.tls_ca, cfg.tls_cert, cfg.tls_key),
        )
        self._conn = conn
        if cfg.session_expiry == 0:
            log.warning(
                "--session-expiry 0: trimmed turns published while this summarizer is away "
                "are not kept for it"
            )
        async with contextlib.AsyncExitStack() as stack:
            if not await self._open(stack, memory, stop):
                return
            self._memory = memory
            connection = asyncio.create_task(self._stay_connected(conn, stop), name="connection")
            self.preflight = asyncio.create_task(self._preflight(memory), name="preflight")
            watch = asyncio.create_task(self._watch_workers(memory), name="workers")
            try:
                await stop.wait()
            finally:
                self.preflight.cancel()
                watch.cancel()
                self._closing = True  # events from now on stay with the broker
                self._stopping.set()
                for arrived in self._arrived.values():
                    arrived.set()
                self.systemd.stopping()
                folds = list(self._tasks.values())
                if folds:
                    log.info("stopping: %d conversations' folds in hand", len(folds))
                    await asyncio.wait(folds, timeout=_DRAIN_TIMEOUT)
                for task in folds:
                    task.cancel()
                await asyncio.gather(*folds, return_exceptions=True)
                connection.cancel()
                await asyncio.gather(connection, return_exceptions=True)
                self.systemd.close()

    async def _preflight(self, memory: MemoryClient) -> None:
        """Say at start what would leave every trimmed turn unfolded, rather than let it
        show only as a window without its summary: a model server that does not answer or
        lacks the model, or workers that run without --trimmed-events."""
        started = time.time()
        problem = await self.model.check()
        if problem is not None:
            log.warning("%s; trimmed turns wait for it (nothing is lost)", problem)
        try:
            stats = await memory.stats()  # fresh from the workers online (pinged)
            # Stats stay retained after a worker stops: only the recent ones say what runs.
            recent = [s for s in stats if _running(s, started)]
            quiet = _without_trimmed_events(recent)
            if quiet and not all(s["ts"] >= started for s in recent):
                # A worker started with this summarizer (scripts/run, the services) may not
                # have published its stats yet: these may be its last run's. Its own come
                # within one of its --stats-interval.
                every = max(
                    (s["stats_interval"] for s in stats if _says_interval(s.get("stats_interval"))),
                    default=10.0,
                )
                await asyncio.sleep(min(every, 60.0) + 1.0)
                stats = await memory.stats()
                since = [s for s in stats if isinstance(s.get("ts"), int | float)]
                quiet = _without_trimmed_events([s for s in since if s["ts"] >= started])
        except (MemoryWorkerError, aiomqtt.MqttError) as exc:  # a role that may not read them
            log.debug("no workers' stats to check: %s", exc)
            return
        self._name_quiet(quiet)

    def _name_quiet(self, quiet: list[str]) -> None:
        new = [name for name in quiet if name not in self._named]
        if new:
            self._named.update(new)
            log.warning(
                "the workers under %s (%s) run without --trimmed-events: the turns their "
                "window drops are not announced, and this summarizer has nothing to fold",
                self.cfg.prefix,
                ", ".join(new),
            )

    async def _watch_workers(self, memory: MemoryClient) -> None:
        """After the start's check, look at the workers every _WATCH_EVERY: one that comes
        online later without --trimmed-events is named, and no worker online at all is said
        once until one is (a summarizer started before its worker, or with another
        --prefix, said nothing while the turns went unfolded)."""
        assert self.preflight is not None
        await asyncio.wait([self.preflight])
        alone = False
        while True:
            await asyncio.sleep(_WATCH_EVERY)
            try:
                stats = await memory.stats()
            except (MemoryWorkerError, aiomqtt.MqttError):  # a role that may not read them
                return
            now = time.time()
            recent = [s for s in stats if _running(s, now)]
            if not recent and not alone:
                log.warning(
                    "no memory-worker is online under the prefix %s: this summarizer folds "
                    "what workers with that --prefix and --trimmed-events announce",
                    self.cfg.prefix,
                )
            alone = not recent
            self._name_quiet(_without_trimmed_events(recent))
            self.looks += 1
            self._looked.set()

    async def wait_looks(self, n: int) -> None:
        """Return once the workers have been looked at `n` times after the start's check."""
        while self.looks < n:
            self._looked.clear()
            await self._looked.wait()

    async def _open(
        self, stack: contextlib.AsyncExitStack, memory: MemoryClient, stop: asyncio.Event
    ) -> bool:
        """Open the client that asks the worker, waiting for a broker that is not there yet
        (at boot, say); False when stopped first."""
        attempt = 0
        while not stop.is_set():
            try:
                await stack.enter_async_context(memory)
                return True
            except MemoryWorkerError as exc:
                attempt += 1
                delay = min(self.cfg.reconnect_max, 0.1 * 2**attempt) * random.uniform(0.5, 1)
                log.log(
                    logging.WARNING if attempt == 1 else logging.DEBUG,
                    "%s; retrying with backoff",
                    exc,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
        return False

    async def _stay_connected(self, conn: Connection, stop: asyncio.Event) -> None:
        attempt = short = 0  # short: connections in a row lost within _STABLE_CONNECTION
        since = 0.0
        while not stop.is_set():
            self._generation += 1  # acknowledgements of an older connection are not sent
            try:
                async with conn:
                    refused = refusal(await conn.subscribe(self.topic_filter, qos=1))
                    if refused:
                        raise aiomqtt.MqttError(
                            f"the broker refused the subscription to {self.topic_filter} "
                            f"({refused}): on a secured broker this client needs the "
                            "summarizer role (deploy/add-user summarizer)"
                        )
                    since = time.monotonic()
                    self.connected.set()
                    self.connections += 1
                    self._connection_made.set()
                    self.systemd.ready(f"folding {self.cfg.prefix}/+/trimmed")
                    log.info(
                        "folding %s from %s:%d as %s with %s at %s",
                        self.topic_filter,
                        self.cfg.host,
                        self.cfg.port,
                        self.cfg.client_id,
                        self.cfg.model,
                        self.cfg.llm_url,
                    )
                    await conn.wait_disconnected()
            except aiomqtt.MqttError as exc:
                lasted = time.monotonic() - since if since else None
                since = 0.0
                if lasted is not None:
                    short = short + 1 if lasted < _STABLE_CONNECTION else 0
                    attempt = short
                attempt += 1
                delay = min(self.cfg.reconnect_max, 0.1 * 2**attempt) * random.uniform(0.5, 1)
                if conn.taken_over or short == 3:
                    # Mosquitto 2.0 closes the older of two connections with one client id,
                    # often without saying so: they take the session from each other.
                    log.error(
                        "the broker keeps closing this connection (%s): is another client "
                        "using the client id %r? Give each memory-summarizer its own "
                        "--client-id. Reconnecting with backoff",
                        exc,
                        self.cfg.client_id,
                    )
                else:
                    log.warning(
                        "broker %s:%d unreachable or lost (%s); retrying in %.1fs",
                        self.cfg.host,
                        self.cfg.port,
                        exc,
                        delay,
                    )
                await asyncio.sleep(delay)
            finally:
                self.connected.clear()

    # --- events -----------------------------------------------------------------------------

    def _on_message(self, msg: Message) -> None:
        if self._closing:
            return  # unacknowledged: the broker keeps it for us or another member
        event = self._parse(msg)
        if event is None:
            return
        convo, ev = event
        log.debug("%s: trimmed turns %d-%d to fold", convo, ev.first, ev.last)
        # In seq order: two workers (or a redelivery) can hand a conversation's events over
        # out of order, and the earliest must be folded first.
        bisect.insort(self._queues.setdefault(convo, []), ev, key=lambda e: e.first)
        self.received += 1
        self._progress.set()
        self._arrived.setdefault(convo, asyncio.Event()).set()
        if convo not in self._tasks:
            self._tasks[convo] = asyncio.create_task(self._drain(convo), name=f"fold {convo}")

    def _parse(self, msg: Message) -> tuple[str, _Event] | None:
        convo = msg.topic[len(self.head) : -len(c.TRIMMED) - 1]
        try:
            body = decode_event(msg.payload, None)
            turns = sorted(body["turns"], key=lambda t: t["seq"])
            if not turns or not all(_is_turn(t) for t in turns):
                raise ValueError("turns must be maps of role, content and an integer seq")
            born = body.get("born")
            if born is not None and (isinstance(born, bool) or not isinstance(born, int)):
                raise ValueError("born must be an integer")
        except Exception as exc:  # nothing in it can ever be folded: do not hold it forever
            log.warning("dropping an unreadable trimmed event on %s: %s", msg.topic, exc)
            self._ack(_Event(self._generation, msg.mid, msg.qos, []))
            return None
        return convo, _Event(self._generation, msg.mid, msg.qos, turns, born)

    def _ack(self, ev: _Event) -> None:
        # An event of an earlier connection is not acknowledged on this one: the broker
        # delivers it again, and its fold finds it covered.
        conn = self._conn
        if ev.generation == self._generation and conn is not None:
            conn.acknowledge(ev.mid, ev.qos)
            self.acknowledged += 1
            self._progress.set()

    async def wait_connections(self, n: int) -> None:
        """Return once the summarizer has connected (and subscribed) `n` times in all."""
        while self.connections < n:
            self._connection_made.clear()
            await self._connection_made.wait()

    async def wait_received(self, n: int) -> None:
        """Return once `n` events have been queued to fold in all."""
        while self.received < n:
            self._progress.clear()
            await self._progress.wait()

    async def wait_acknowledged(self, n: int) -> None:
        """Return once `n` events have been acknowledged in all."""
        while self.acknowledged < n:
            self._progress.clear()
            await self._progress.wait()

    async def _drain(self, convo: str) -> None:
        """Fold a conversation's events, earliest seq first, several at once when they follow
        each other (one model call for a backlog)."""
        queue = self._queues[convo]
        retries = 0
        try:
            while queue:
                batch = _batch(queue)
                try:
                    done = await self._fold(convo, batch)
                except _Stopped:
                    raise
                except Exception:  # a bug must not leave the event unacknowledged for good
                    if convo not in self._refusing:  # the traceback once, not every retry
                        log.exception("%s: folding failed; retrying with backoff", convo)
                        self._refusing[convo] = "a bug"
                    retries = await self._back_off(convo, retries, None)
                    continue
                if done:
                    self._retries.pop(convo, None)
                    for ev in batch:
                        queue.remove(ev)
        except _Stopped:
            pass
        finally:
            del self._tasks[convo]
            if not queue:
                del self._queues[convo]
                self._arrived.pop(convo, None)
                self._refusing.pop(convo, None)
                self._shortened.discard(convo)
                self._most.pop(convo, None)
                self._retries.pop(convo, None)

    def _ack_all(self, events: list[_Event]) -> bool:
        for ev in events:
            self._ack(ev)
        return True

    async def _fold(self, convo: str, events: list[_Event]) -> bool:
        """Fold the events' turns into the summary and save it; acknowledge them once saved
        (or once nothing is left to fold): True. False when an earlier event of the
        conversation is still to come, or later ones that join these came while the model
        failed (the caller batches again). Retries, with backoff, until one of those."""
        assert self._memory is not None
        memory, retries = self._memory, self._retries.get(convo, 0)
        turns = _turns_of(events)
        first, last = events[0], turns[-1]["seq"]
        while True:
            try:
                ctx = await memory.context(convo, last=1)
            except MemoryWorkerError as exc:
                retries = await self._back_off(convo, retries, f"reading the summary: {exc}")
                continue
            summary = ctx.summary
            upto = summary["upto"] if summary else 0
            todo = [t for t in turns if t["seq"] > upto]
            if not todo:
                return self._ack_all(events)
            # While it lives, a conversation with trimmed turns has a summary or turns, and
            # its newest turn is newer than every turn it trimmed: otherwise it is gone, or
            # was started again under the same id.
            if (summary is None and not ctx.turns) or (ctx.turns and ctx.turns[-1]["seq"] <= last):
                log.debug("%s is gone or started again: its trimmed turns are dropped", convo)
                return self._ack_all(events)
            if todo[0]["seq"] > upto + 1 and not self._gap_is_over(convo, first, upto):
                log.debug("%s: waiting for the turns before %d", convo, todo[0]["seq"])
                await self._wait_arrival(convo)
                return False
            part = todo[: self._most.get(convo, len(todo))]
            folding = True
            try:
                async with self._slots:  # held only while the model works
                    folded = await self.model.fold(summary["text"] if summary else "", part)
                folding = False
                log.debug(
                    "%s: saving the fold of turns %d-%d", convo, part[0]["seq"], part[-1]["seq"]
                )
                await self._save(convo, folded, part[-1]["seq"], upto, first.born)
            except ModelError as exc:
                if folding and exc.timed_out and len(part) > 1:
                    # A backlog the model cannot fold within --llm-timeout: smaller folds, each
                    # saved, rather than the same call again and again (for the conversation's
                    # later batches too, until its queue is empty).
                    self._most[convo] = len(part) // 2
                    exc = ModelError(
                        f"{exc} (next: {len(part) // 2} turns at a time)",
                        timed_out=True,
                        kind=exc.kind,
                    )
                retries = await self._back_off(
                    convo, retries, f"the model failed: {exc}", f"model: {exc.kind}"
                )
                if len(_batch(self._queues[convo])) > len(events):
                    # Turns trimmed meanwhile join the next call (the backoff goes on from
                    # here): a backlog after an outage is one call, not this one and then
                    # the rest.
                    self._retries[convo] = retries
                    return False
                continue
            except ConflictError as exc:
                if exc.seq == 0 or (first.born is not None and exc.born != first.born):
                    log.debug("%s is gone or started again: its trimmed turns are dropped", convo)
                    return self._ack_all(events)
                continue  # the summary moved on: read it again, fold again
            except MemoryWorkerError as exc:
                retries = await self._back_off(
                    convo, retries, f"saving the summary: {exc}", f"saving: {exc.code}"
                )
                continue
            self.folds += 1
            if part[-1]["seq"] < last:
                retries = 0
                continue  # the rest of the backlog, from the summary just saved
            if convo in self._refusing:
                del self._refusing[convo]
                log.info("%s: the summary is saved again (up to turn %d)", convo, last)
            return self._ack_all(events)

    def _gap_is_over(self, convo: str, ev: _Event, upto: int) -> bool:
        """Whether to fold past turns that never came, after --gap-wait of waiting for them."""
        now = time.monotonic()
        if upto != ev.waited_upto:  # the summary moved on meanwhile: not stuck, wait anew
            ev.waiting_since, ev.waited_upto = now, upto
        if now - ev.waiting_since < self.cfg.gap_wait:
            return False
        missing = f"turn {upto + 1}" if ev.first == upto + 2 else f"turns {upto + 1}-{ev.first - 1}"
        log.warning(
            "%s: %s did not reach this summarizer within --gap-wait (held in the session of "
            "another member of the group that is away, or trimmed before any summarizer "
            "subscribed); folding the turns after them",
            convo,
            missing,
        )
        return True

    async def _wait_arrival(self, convo: str) -> None:
        """Until another event of the conversation comes, or a short while (the event before
        may be folded by another member of the group meanwhile)."""
        arrived = self._arrived.setdefault(convo, asyncio.Event())
        arrived.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(arrived.wait(), min(self.cfg.retry_max, _RETRY_FIRST))
        if self._stopping.is_set():
            raise _Stopped

    async def _save(
        self, convo: str, folded: Folded, upto: int, base: int, born: int | None
    ) -> None:
        """Save the fold; one that does not fit --max-bytes is asked for again, shorter."""
        assert self._memory is not None
        text, tokens, ask = folded.text, folded.tokens, self.cfg.summary_tokens
        while True:
            try:
                await self._memory.summarize(convo, text, upto, base, tokens=tokens, born=born)
                return
            except TooLargeError as exc:
                if ask <= _SHORTEST_SUMMARY:
                    raise
                ask //= 2
                # Once per conversation: each retry of a fold that still fails asks again.
                first = convo not in self._shortened
                self._shortened.add(convo)
                log.log(
                    logging.WARNING if first else logging.DEBUG,
                    "%s: the worker refused the summary (%s); asking the model for %d tokens",
                    convo,
                    exc.message,
                    ask,
                )
            async with self._slots:  # a model call like any other: within --concurrency
                shorter = await self.model.fold(text, [], tokens=ask)
            text, tokens = shorter.text, shorter.tokens

    async def _back_off(
        self, convo: str, retries: int, problem: str | None, kind: str | None = None
    ) -> int:
        """Wait before the next try; `problem` is logged once while its `kind` (what it is
        without what changes from one try to the next) stays the same."""
        if problem is not None:
            kind = kind or problem
            if self._refusing.get(convo) != kind:
                self._refusing[convo] = kind
                log.warning("%s: %s; retrying with backoff", convo, problem)
            else:
                log.debug("%s: %s", convo, problem)
        delay = min(self.cfg.retry_max, _RETRY_FIRST * 2**retries) * random.uniform(0.5, 1)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), delay)
        if self._stopping.is_set():
            raise _Stopped
        return min(retries + 1, 16)


class _Stopped(Exception):
    """The summarizer stops: a fold waiting to try again ends. Its events, never
    acknowledged, stay with the broker for the next run."""


# Turns folded in one model call at most, when a backlog of events follows each other.
_BATCH_TURNS = 32


def _says_interval(said: object) -> bool:
    """Whether a worker's stats say a --stats-interval (anyone may publish stats: "abc"
    raised past the check, nan reached asyncio.sleep: a review)."""
    return isinstance(said, int | float) and not isinstance(said, bool) and 0 < said < math.inf


def _running(stats: dict[str, Any], now: float) -> bool:
    """Whether these stats are of a worker that runs: not one whose status says it stopped
    (its last stats stay recent a while), nor one silent for its intervals (a power cut
    leaves its "online" standing)."""
    return stats.get("state") != "offline" and stats_are_recent(stats, now)


def _without_trimmed_events(stats: list[dict[str, Any]]) -> list[str]:
    """The workers of these stats that do not announce trimmed turns, when none does."""
    flags = {str(s.get("client_id")): s.get("trimmed_events") for s in stats}
    if True in flags.values():
        return []
    return [name for name, on in flags.items() if on is False]


def _batch(queue: list[_Event]) -> list[_Event]:
    """The first event and those that follow it without a gap (a redelivered copy too), of
    the same conversation's life."""
    batch = [queue[0]]
    for ev in queue[1:]:
        if ev.born != batch[0].born or ev.first > batch[-1].last + 1:
            break
        if sum(len(e.turns) for e in batch) + len(ev.turns) > _BATCH_TURNS:
            break
        batch.append(ev)
    return batch


def _turns_of(events: list[_Event]) -> list[dict[str, Any]]:
    """The events' turns in seq order, each once."""
    turns = {t["seq"]: t for ev in events for t in ev.turns}
    return [turns[seq] for seq in sorted(turns)]


def _is_turn(turn: Any) -> bool:
    return (
        isinstance(turn, dict)
        and isinstance(turn.get("role"), str)
        and isinstance(turn.get("content"), str)
        and isinstance(turn.get("seq"), int)
        and not isinstance(turn.get("seq"), bool)
    )


async def serve(cfg: SummarizerConfig) -> None:
    """Run a summarizer until SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await Summarizer(cfg).run(stop)
    log.info("stopped")


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if "--version" in args:
        print(__version__)
        return 0
    try:
        cfg = from_args(args, os.environ)
    except ConfigError as exc:
        print(f"memory-summarizer: error: {exc}", file=sys.stderr)
        return 2
    configure_logging(cfg.log_level, os.environ)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
