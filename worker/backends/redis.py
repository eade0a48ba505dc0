"""Redis backend: the store's semantics in one Lua script, shared by any number of workers.

Every operation runs as one script call, which Redis executes alone, so two workers never
interleave inside an append, a trim or an eviction, and each eviction is reported by exactly
one worker (the one whose call made it). A batch of requests is one pipelined round trip.
TTL expiry is found by the workers' own sweeps (a sorted set of deadlines, claimed by the
same atomic script), not by keyspace notifications, which are fire-and-forget.

Deadlines are wall-clock seconds from the calling worker, so the workers' clocks must agree
(NTP); turns are stamped by the worker that stored them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgpack
import redis.asyncio

from worker import constants as c
from worker.backend_url import redacted
from worker.backends.base import Backend, Counts
from worker.errors import ConfigError, Conflict, TooLarge, Unavailable, WorkerError
from worker.protocol import (
    Append,
    Delete,
    Event,
    Eviction,
    Fields,
    Get,
    Items,
    ListConvos,
    Loaded,
    Request,
    Result,
    StateDelete,
    StateGetAll,
    StateLoad,
    StateNamespaces,
    StateSave,
    Summary,
    Trimmed,
    Turns,
    convo_info,
    list_page,
    trimmed_parts,
)
from worker.store import NO_DEADLINE, Limits, base_cost
from worker.turns import content_size, redis_tokens, redis_turn, summary_size, turn_head

log = logging.getLogger("memory_worker.redis")
SCRIPT = (Path(__file__).parent / "redis.lua").read_text()
DEFAULT_TIMEOUT = c.REDIS_TIMEOUT
_packb = msgpack.packb


def _field(ns: str, key: str = "") -> bytes:
    raw = ns.encode()
    return len(raw).to_bytes(2, "big") + raw + key.encode()


class RedisBackend(Backend):
    """Conversations in Redis (or Valkey), shared by every worker that names the same prefix.

    Args:
        url: redis://host:port/db (rediss:// for TLS), as redis-py reads it.
        limits: the store's bounds; every worker sharing the data must use the same.
        prefix: the topic prefix; keys are named mw:{prefix}:..., one Cluster hash slot.
        clock, wall: Unix clocks for deadlines and timestamps (tests pass fakes).
        timeout: seconds a batch may take before its requests are answered `unavailable`.
    """

    name = "redis"

    def __init__(
        self,
        url: str,
        limits: Limits,
        prefix: str = c.DEFAULT_PREFIX,
        clock: Callable[[], float] = time.time,
        wall: Callable[[], float] = time.time,
        timeout: float = DEFAULT_TIMEOUT,
        ssl_ca_certs: str | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ConfigError(f"--backend {redacted(url)!r}: expected redis://host:port/db")
        tls: dict[str, Any] = {}
        if parts.scheme == "rediss" and ssl_ca_certs and "ssl_ca_certs" not in parts.query:
            tls["ssl_ca_certs"] = ssl_ca_certs  # --tls-ca, unless the URL names its own CA
        self.url = redacted(url)  # for the log
        self.limits = limits
        self.key = f"mw:{{{prefix}}}:"
        self._clock = clock
        self._wall = wall
        self.timeout = timeout
        self._redis = redis.asyncio.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            health_check_interval=5,
            **tls,
        )
        self._script = self._redis.register_script(SCRIPT)
        self._counts = Counts(0, 0, 0, 0)
        self._next_deadline = 0.0  # unknown until the first sweep
        self._delivered: list[int] = []  # receipts whose events the broker has
        self._parts: dict[int, int] = {}  # receipts of events sent in parts: parts to come

    async def open(self) -> None:
        try:
            self._take(await self._run([self._args("counts", "")]))
            self.store_id = await self._name_store(self._redis, self.key)
        except Unavailable as exc:
            refusal = _refusal(exc.__cause__)
            if refusal is not None:  # waiting would not mend it
                raise ConfigError(f"--backend {self.url!r}: redis refused: {refusal}") from None
            log.warning(
                "redis at %s is not answering (%s); requests get 'unavailable' until it does",
                self.url,
                exc,
            )

    @staticmethod
    async def _name_store(client: Any, key: str) -> str:
        """The store's name, made by the first worker that opened it (or an older one's)."""
        try:
            await client.set(key + "store", uuid.uuid4().hex, nx=True)
            name = await client.get(key + "store")
        except Exception as exc:  # its counts were read: a name is not worth failing for
            raise Unavailable(f"storage unavailable: {type(exc).__name__}") from exc
        return name.decode() if isinstance(name, bytes) else str(name)

    async def close(self) -> None:
        if self._delivered:  # else sent again by a sweep, OUTBOX_STALE from now
            with contextlib.suppress(Unavailable):
                await self._run([])
        await self._redis.aclose()

    def delivered(self, receipt: int) -> None:
        left = self._parts.pop(receipt, 1) - 1
        if left:
            self._parts[receipt] = left
        else:
            self._delivered.append(receipt)

    def _kept(self, events: list[Event]) -> list[Event]:
        """`events`, with the parts of each trim kept in the outbox counted (its receipt is
        delivered once every part is)."""
        receipts = [ev.receipt for ev in events if isinstance(ev, Trimmed) and ev.receipt]
        if len(receipts) > len(set(receipts)):
            for receipt, parts in collections.Counter(receipts).items():
                if parts > 1:
                    self._parts[receipt] = parts
        return events

    def counts(self) -> Counts:
        return self._counts

    # --- calls --------------------------------------------------------------------------

    def _args(self, op: str, *rest: Any) -> list[Any]:
        lim = self.limits
        return [
            op,
            repr(self._clock()),
            repr(lim.ttl),
            lim.max_turns,
            lim.max_conversations,
            lim.max_bytes,
            lim.max_keys,
            lim.max_ids,
            base_cost(lim, rest[0]) if op not in ("counts", "expire", "list", "delivered") else 0,
            "1" if lim.trimmed_events else "",
            lim.convo_cost,
            lim.id_byte_cost,
            *rest,
        ]

    def _call(self, req: Request) -> list[Any]:
        match req:
            case Append():
                size = content_size(req.role, req.content) + self.limits.turn_cost
                head = turn_head(req.role, req.content, self._wall(), req.token_count)
                return self._args(
                    "append", req.convo, size, head, _id(b"a", req.id), self._id_cost(req.id)
                )
            case Get():
                # Lua's numbers are doubles: past 2^53 a `last` is an error in the script.
                last = min(req.last or 0, _MAX_LAST)
                return self._args(
                    "get", req.convo, last, req.max_tokens or 0, "1" if req.summary else ""
                )
            case Summary():
                size = summary_size(req.text, self.limits.turn_cost)
                return self._args(
                    "summary",
                    req.convo,
                    req.text,
                    req.upto,
                    req.base,
                    req.token_count,
                    size,
                    _id(b"m", req.id),
                    "" if req.born is None else req.born,
                    self._id_cost(req.id),
                )
            case Delete():
                return self._args("delete", req.convo, _id(b"d", req.id), self._id_cost(req.id))
            case StateSave():
                ttl = req.ttl or 0
                return self._args(
                    "save",
                    req.convo,
                    _field(req.ns, req.key),
                    len(req.key.encode()) + self.limits.key_cost,
                    req.value,
                    repr(ttl),
                    _id(b"s", req.id),
                    self._id_cost(req.id),
                )
            case StateLoad():
                return self._args("load", req.convo, _field(req.ns, req.key), repr(req.ttl or 0))
            case StateGetAll():
                return self._args("get_all", req.convo, _field(req.ns))
            case StateDelete():
                return self._args(
                    "state_delete",
                    req.convo,
                    _field(req.ns, req.key),
                    _id(b"x", req.id),
                    self._id_cost(req.id),
                )
            case StateNamespaces():
                return self._args("namespaces", req.convo)
            case ListConvos():
                return self._args("list", *list_bounds(req), req.limit)
        raise WorkerError(f"unknown request {type(req).__name__}")  # pragma: no cover

    def _id_cost(self, req_id: Any) -> int:
        return 0 if req_id is None else self.limits.id_cost

    async def _run(self, calls: list[list[Any]], *, each: bool = False) -> list[Any]:
        """The calls' replies; with `each`, a call the script failed on (data it cannot read)
        has its error in its place, and the others their replies."""
        delivered, self._delivered = self._delivered, []
        if delivered:
            calls = [self._args("delivered", *delivered), *calls]
        try:
            async with (
                asyncio.timeout(self.timeout),
                self._redis.pipeline(transaction=False) as pipe,
            ):
                for args in calls:
                    await self._script(keys=[self.key], args=args, client=pipe)
                replies: list[Any] = await pipe.execute(raise_on_error=not each)
        except Exception as exc:  # connection refused, timeout, NOSCRIPT races, ...
            self._delivered[:0] = delivered
            raise Unavailable(f"storage unavailable: {type(exc).__name__}") from exc
        if delivered:
            replies = replies[1:]
        for r in replies:  # a script's own error is the plain kind; the others are Redis's
            if isinstance(r, Exception) and type(r) is not redis.exceptions.ResponseError:
                raise Unavailable(f"storage unavailable: {type(r).__name__}") from r
        return replies

    def _take(self, replies: list[Any]) -> tuple[list[Any], list[Event]]:
        """The replies of calls of no conversation (counts, expire): results and events."""
        now = self._wall()
        results: list[Any] = []
        events: list[Event] = []
        for reply in replies:
            result, evs, self._counts = _reply(reply, "", now)
            results.append(result)
            events += evs
        return results, self._kept(events)

    async def execute(self, requests: Sequence[Request]) -> tuple[list[Result], list[Event]]:
        replies = await self._run([self._call(r) for r in requests], each=True)
        now, ttl = self._wall(), self.limits.ttl
        results: list[Result] = []
        events: list[Event] = []
        for req, reply in zip(requests, replies, strict=True):
            if isinstance(reply, Exception):
                results.append(script_failed(req, reply))
                continue
            raw, evs, self._counts = _reply(reply, req.convo, now)
            results.append(_result(req, raw, ttl))
            events += evs
        return results, self._kept(events)

    async def expire(self) -> tuple[bool, list[Event]]:
        raw, evictions = self._take(
            await self._run([self._args("expire", c.SWEEP_CHUNK, repr(c.OUTBOX_STALE))])
        )
        # Read again each sweep: a Redis restarted empty, or its key evicted, is named anew
        # by the first worker to come, and the others take that name.
        with contextlib.suppress(Unavailable):
            self.store_id = await self._name_store(self._redis, self.key)
        self._next_deadline = float(raw[0][2]) if raw[0][2] else NO_DEADLINE
        return raw[0][1] == b"1", evictions

    def next_expiry(self) -> float:
        # Exact for what this worker last saw; bounded, for deadlines other workers set.
        return min(self._next_deadline - self._clock(), c.REDIS_SWEEP_POLL)


def list_bounds(req: ListConvos) -> tuple[bytes, bytes]:
    """The ZRANGEBYLEX bounds of a listing page: after the cursor, within the prefix."""
    after, prefix = req.after.encode(), req.prefix.encode()
    start = b"(" + after if after and after >= prefix else b"[" + prefix
    # no UTF-8 string has a byte 0xff: every id that starts with the prefix sorts below this
    return start, b"(" + prefix + b"\xff" if prefix else b"+"


def merge_pages(req: ListConvos, pages: list[tuple[list[Any], bool]], ttl: float) -> Fields:
    """One listing page from the script's pages of every shard (rows in id order, and whether
    the shard has more after them): every shard has been scanned up to the smallest last id
    of those with more, so the page stops there, and at `limit` ids."""
    ends = [rows[-1][0] for rows, more in pages if more]
    cut = min(ends) if ends else None
    rows = sorted(
        (row for rows, _ in pages for row in rows if cut is None or row[0] <= cut),
        key=lambda row: bytes(row[0]),
    )
    more = cut is not None or len(rows) > req.limit
    scanned = [(row[0].decode(), _row_info(row, ttl)) for row in rows[: req.limit]]
    return list_page(scanned, more)


def _row_info(row: list[Any], ttl: float) -> dict[str, Any] | None:
    if len(row) == 1:  # expired, not yet swept
        return None
    convo, _, turns, keys, used, upto, tokens = row
    return convo_info(
        convo.decode(), int(turns), int(keys), float(used), ttl, int(upto), int(tokens)
    )


_MAX_LAST = 2**31  # more turns than a conversation holds: a `last` above it asks for all


def _id(op: bytes, req_id: Any) -> bytes:
    """An id as the script remembers it: per operation (the same id on another operation is
    another request)."""
    return b"" if req_id is None else op + _packb(req_id)


def _refusal(exc: BaseException | None) -> str | None:
    """What Redis said when it refused for good (a login, a database that does not exist,
    an ACL), rather than being down or slow."""
    if isinstance(exc, redis.exceptions.AuthenticationError | redis.exceptions.NoPermissionError):
        return str(exc) or type(exc).__name__
    if isinstance(exc, redis.exceptions.ResponseError) and "DB index is out of range" in str(exc):
        return str(exc)
    if isinstance(exc, redis.exceptions.MovedError):  # it looked like an outage for ever
        return (
            "it is a node of a Redis Cluster, which moved the request to another node: "
            "name the cluster as redis+cluster://HOST:PORT (docs/scaling.md)"
        )
    return None


def script_failed(req: Request, exc: Exception) -> WorkerError:
    """A request the script failed on (its conversation's data is not what the script
    writes: another program's, say): answered internal, alone; the batch's others stand
    (they were applied, and were answered unavailable)."""
    log.error("the store's script failed on conversation %r: %s", req.convo, exc)
    return WorkerError(f"internal error: the store's script failed: {exc}")


def _reply(reply: list[Any], convo: str, now: float) -> tuple[Any, list[Event], Counts]:
    """One script call's reply: (its result, the events it caused, the counts after it)."""
    result, evicted, counts, trimmed, receipt, held = reply
    events: list[Event] = [
        Eviction(cv.decode(), reason.decode(), int(n), int(k), now) for cv, reason, n, k in evicted
    ]
    if trimmed:
        events[:0] = _trimmed(convo, trimmed, now, int(receipt))
    for i in range(0, len(held), 2):  # kept trims claimed by a sweep: sent again
        entry = msgpack.unpackb(held[i + 1], raw=True)
        events += _trimmed(entry[0].decode(), entry[2:], float(entry[1]), int(held[i]))
    return result, events, Counts(*(int(x) for x in counts))


def _trimmed(convo: str, trimmed: list[Any], now: float, receipt: int) -> list[Event]:
    upto, born = int(trimmed[0]), int(trimmed[1])
    parts = trimmed_parts([redis_turn(e) for e in trimmed[2:]])
    return [Trimmed(convo, len(p), b"".join(p), upto, now, born, receipt) for p in parts]


def _result(req: Request, raw: list[Any], ttl: float) -> Result:
    kind, data = raw[0].decode(), raw[1]
    if kind == "list":
        assert isinstance(req, ListConvos)
        return merge_pages(req, [(data, raw[2] == b"1")], ttl)
    if kind == "too_large":
        return TooLarge(data.decode())
    if kind == "conflict":
        return Conflict(data.decode(), int(raw[2]), int(raw[3]), int(raw[4]))
    match req:
        case Append():
            seq, count = data.split()
            return Fields({"seq": int(seq), "count": int(count)})
        case Get():
            total, summary = sum(redis_tokens(t) for t in data), None
            if raw[2]:
                text, upto, tokens = raw[2]
                summary = (text.decode(), int(upto), int(tokens))
                total += summary[2]
            return Turns(len(data), b"".join(redis_turn(t) for t in data), total, summary)
        case Summary():
            upto, dropped = data.split()
            return Fields({"upto": int(upto), "dropped": int(dropped)})
        case Delete():
            return Fields({"deleted": int(data)})
        case StateSave():
            return Fields({})
        case StateLoad():
            return Loaded(data if kind == "value" else None)
        case StateGetAll():
            skip = 2 + len(req.ns.encode())
            return Items({data[i][skip:].decode(): data[i + 1] for i in range(0, len(data), 2)})
        case StateDelete():
            return Fields({"deleted": data == b"1"})
        case StateNamespaces():
            return Fields({"namespaces": sorted({n.decode() for n in data})})
    raise WorkerError(f"unknown request {type(req).__name__}")  # pragma: no cover
