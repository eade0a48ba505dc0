"""Redis Cluster backend: the Redis backend's script, run on S index shards spread over the masters.

A conversation belongs to shard crc32(id) % S. Shard i keeps its keys under `mw:{<tag_i>}:`,
one hash slot, so each operation is still one atomic script on one node, and it has its own
LRU order, deadline set and share of the limits (the shares add up to the limits exactly, so
the totals are never exceeded). The tags are chosen so that shard i's slot lies in the i-th
of S equal slot ranges: a cluster whose masters own equal contiguous ranges (what
`redis-cli --cluster create` makes) gets S/masters shards each. Shards are served
independently: a master that is down makes only its shards' requests `unavailable`.
See docs/scaling.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import zlib
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import redis.asyncio
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from redis.exceptions import NoScriptError, ResponseError

from worker import constants as c
from worker.backend_url import BackendUrl, parse_backend_url, redacted
from worker.backends.base import Counts
from worker.backends.redis import (
    DEFAULT_TIMEOUT,
    SCRIPT,
    RedisBackend,
    _reply,
    _result,
    list_bounds,
    merge_pages,
    script_failed,
)
from worker.errors import ConfigError, Unavailable
from worker.protocol import Event, ListConvos, Request, Result, Trimmed
from worker.store import NO_DEADLINE, Limits

log = logging.getLogger("memory_worker.cluster")
_SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()
_CONVOS, _BYTES = 4, 5  # where the script's arguments carry max_conversations and max_bytes


def shard_of(convo: str, shards: int) -> int:
    """The shard a conversation lives in: stable across processes and workers."""
    return zlib.crc32(convo.encode()) % shards


def shard_tag(prefix: str, shard: int, shards: int) -> str:
    """A hash tag for `shard` whose slot lies in the shard's own 1/shards of the slot space."""
    low = shard * REDIS_CLUSTER_HASH_SLOTS // shards
    high = (shard + 1) * REDIS_CLUSTER_HASH_SLOTS // shards
    n = 0
    while True:
        tag = f"{prefix}:{shard}:{n}"
        if low <= key_slot(tag.encode()) < high:
            return tag
        n += 1


def share(total: int, shard: int, shards: int) -> int:
    """Shard `shard`'s part of a limit; the parts add up to `total`."""
    return total // shards + (1 if shard < total % shards else 0)


class ClusterBackend(RedisBackend):
    """The Redis backend over a Redis Cluster, sharded; see the module docstring."""

    name = "redis-cluster"

    def __init__(
        self,
        url: BackendUrl | str,
        limits: Limits,
        prefix: str = c.DEFAULT_PREFIX,
        clock: Callable[[], float] = time.time,
        wall: Callable[[], float] = time.time,
        timeout: float = DEFAULT_TIMEOUT,
        max_payload: int = 0,
    ) -> None:
        parsed = parse_backend_url(url) if isinstance(url, str) else url
        s = parsed.shards
        if limits.max_conversations < s:
            raise ConfigError(
                f"--max-conversations ({limits.max_conversations}) must be at least the "
                f"{s} shards of {redacted(parsed.url)!r}"
            )
        if limits.max_bytes // s < max_payload:
            raise ConfigError(
                f"--max-bytes ({limits.max_bytes}) over {s} shards leaves less than "
                f"--max-payload-bytes ({max_payload}) per shard"
            )
        self.url = redacted(parsed.url)  # for the log
        self.limits = limits
        self.shards = s
        self.keys = [f"mw:{{{shard_tag(prefix, i, s)}}}:" for i in range(s)]
        self._limits = [
            (share(limits.max_conversations, i, s), share(limits.max_bytes, i, s)) for i in range(s)
        ]
        self._clock = clock
        self._wall = wall
        self.timeout = timeout
        self._rc = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in parsed.nodes],
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            require_full_coverage=False,
            # None: a script whose reply was lost may have run, and a write without an id
            # would be stored twice (a redirection, which ran nothing, still goes on).
            retry=Retry(NoBackoff(), 0),
        )
        self._shard_counts = [Counts(0, 0, 0, 0)] * s
        self._counts = Counts(0, 0, 0, 0)
        self._down: set[int] = set()
        self._fell: dict[int, str] = {}  # shards down since the last line, and why
        self._rose: list[int] = []  # and shards answering again
        self._next_deadline = 0.0  # unknown until the first sweep
        # Receipts are the shard's number for a kept trim, times the shards, plus the shard.
        self._delivered: list[int] = []
        self._parts: dict[int, int] = {}

    async def open(self) -> None:
        if not await self._initialize(self._deadline()):
            await self._check_cluster_mode()
        await self._all("counts")
        await self._name()

    async def _name(self) -> None:
        """The store's name, on shard 0 (its master down: as it was, until it answers)."""
        with contextlib.suppress(Unavailable, TimeoutError):
            async with asyncio.timeout(self.timeout):
                self.store_id = await self._name_store(self._rc, self.keys[0])

    async def close(self) -> None:
        if self._delivered:  # else sent again by a sweep, OUTBOX_STALE from now
            deadline = self._deadline()
            shards = {r % self.shards for r in self._delivered}
            await self._on_shards(self._run_shard(s, [], [], [], deadline) for s in shards)
        await self._rc.aclose()

    async def _initialize(self, deadline: float) -> bool:
        """Read the slot map before the shards' concurrent calls: redis-py 8.1 lets concurrent
        first calls race in its lazy initialization (AttributeError on a half-made
        connection). Whether it was read."""
        try:
            async with asyncio.timeout_at(deadline):
                await self._rc.initialize()
        except Exception as exc:  # the shards' own calls say which are unavailable
            log.debug("redis cluster %s: no slot map yet: %s", self.url, exc)
            return False
        return True

    async def _check_cluster_mode(self) -> None:
        """ConfigError when a start-up node answers as a Redis without cluster mode: its
        requests were 'unavailable' for ever, each shard logged as down."""
        for node in self._rc.get_nodes() or self._rc.startup_nodes:
            plain = redis.asyncio.Redis(
                host=node.host, port=int(node.port), socket_timeout=self.timeout
            )
            try:
                async with asyncio.timeout(self.timeout):
                    await plain.execute_command("CLUSTER", "INFO")  # type: ignore[no-untyped-call]
            except ResponseError as exc:
                if "cluster support disabled" in str(exc):
                    raise ConfigError(
                        f"--backend {self.url!r}: {node.host}:{node.port} is a Redis without "
                        f"cluster mode ({exc}): name it redis://{node.host}:{node.port}/0"
                    ) from None
            except Exception:  # down, or slow: the shards' own calls say so
                continue
            finally:
                await plain.aclose()
            return

    # --- calls --------------------------------------------------------------------------

    def _shard_args(self, shard: int, args: list[Any]) -> list[Any]:
        args[_CONVOS], args[_BYTES] = self._limits[shard]
        return args

    async def _eval(self, shard: int, args: list[Any]) -> Any:
        key = self.keys[shard]
        try:
            return await self._rc.execute_command("EVALSHA", _SHA, 1, key, *args)
        except NoScriptError:  # a master that restarted empty: nothing ran, send it whole
            return await self._rc.execute_command("EVAL", SCRIPT, 1, key, *args)

    def _deadline(self) -> float:
        return asyncio.get_running_loop().time() + self.timeout

    async def _on_shards(self, runs: Iterable[Awaitable[None]]) -> None:
        """Run `_run_shard`s at once, then say in one line each which shards fell and which
        answer again (a cluster out of reach was a line per shard, 16)."""
        await asyncio.gather(*runs)
        if self._fell:
            kinds = ", ".join(sorted(set(self._fell.values())))
            log.warning(
                "redis cluster %s: shards %s unavailable (%s); their requests get 'unavailable'",
                self.url,
                sorted(self._fell),
                kinds,
            )
            self._fell.clear()
        if self._rose:
            log.info("redis cluster shards %s answer again", sorted(self._rose))
            self._rose.clear()

    async def _run_shard(
        self, shard: int, calls: list[list[Any]], out: list[Any], at: list[int], deadline: float
    ) -> None:
        """Run one shard's calls in order; those not done when it fails stay None."""
        s = self.shards
        mine = [r for r in self._delivered if r % s == shard]
        if mine:
            self._delivered = [r for r in self._delivered if r % s != shard]
        try:
            async with asyncio.timeout_at(deadline):
                if mine:
                    args = self._args("delivered", *(r // s for r in mine))
                    await self._eval(shard, self._shard_args(shard, args))
                    mine = []
                for args, i in zip(calls, at, strict=True):
                    try:
                        out[i] = await self._eval(shard, self._shard_args(shard, args))
                    except ResponseError as exc:
                        if type(exc) is not ResponseError:  # the node's, not the script's
                            raise
                        out[i] = exc  # this call's data: the batch's others stand
        except Exception as exc:  # connection refused, timeout, cluster down, ...
            self._delivered += mine  # not deleted: once the shard answers
            if shard not in self._down:
                self._fell[shard] = type(exc).__name__
                if shard in self._rose:  # down again before "answer again" was said
                    self._rose.remove(shard)
            self._down.add(shard)
            return
        if shard in self._down:
            if self._fell.pop(shard, None) is None:  # else back before anything was said
                self._rose.append(shard)
            self._down.discard(shard)

    def _take_one(
        self, shard: int, reply: Any, now: float, convo: str = ""
    ) -> tuple[Any, list[Event]]:
        result, events, self._shard_counts[shard] = _reply(reply, convo, now)
        for ev in events:
            if isinstance(ev, Trimmed) and ev.receipt:
                ev.receipt = ev.receipt * self.shards + shard
        return result, self._kept(events)

    def _total(self) -> None:
        sc = self._shard_counts
        self._counts = Counts(
            sum(x.conversations for x in sc),
            sum(x.turns for x in sc),
            sum(x.bytes for x in sc),
            sum(x.keys for x in sc),
        )

    async def _all(self, op: str, *rest: Any) -> tuple[list[Any], list[Event]]:
        """One call of `op` on every shard: the replies of those that answered, their events."""
        deadline = self._deadline()
        if self._down:
            await self._initialize(deadline)
        out: list[Any] = [None] * self.shards
        await self._on_shards(
            self._run_shard(i, [self._args(op, *rest)], out, [i], deadline)
            for i in range(self.shards)
        )
        now = self._wall()
        results, evictions = [], []
        for i, reply in enumerate(out):
            if isinstance(reply, Exception):  # left out, as a shard that is down
                log.error("redis cluster shard %d: the store's script failed: %s", i, reply)
            elif reply is not None:
                result, evs = self._take_one(i, reply, now)
                results.append(result)
                evictions += evs
        self._total()
        return results, evictions

    async def execute(self, requests: Sequence[Request]) -> tuple[list[Result], list[Event]]:
        deadline = self._deadline()  # the whole batch is answered within the timeout
        if self._down:
            await self._initialize(deadline)
        groups: dict[int, tuple[list[list[Any]], list[int]]] = {}
        for i, req in enumerate(requests):
            if isinstance(req, ListConvos):
                continue
            calls, at = groups.setdefault(shard_of(req.convo, self.shards), ([], []))
            calls.append(self._call(req))
            at.append(i)
        out: list[Any] = [None] * len(requests)
        await self._on_shards(
            self._run_shard(s, calls, out, at, deadline) for s, (calls, at) in groups.items()
        )
        listed = {
            i: await self._list(req)
            for i, req in enumerate(requests)
            if isinstance(req, ListConvos)
        }
        now = self._wall()
        results: list[Result] = []
        evictions: list[Event] = []
        shard = {i: s for s, (_, at) in groups.items() for i in at}
        ttl = self.limits.ttl
        for i, (req, reply) in enumerate(zip(requests, out, strict=True)):
            if i in listed:
                results.append(listed[i])
                continue
            if reply is None:
                results.append(Unavailable("storage unavailable: its redis cluster node"))
                continue
            if isinstance(reply, Exception):
                results.append(script_failed(req, reply))
                continue
            raw, evs = self._take_one(shard[i], reply, now, req.convo)
            results.append(_result(req, raw, ttl))
            evictions += evs
        self._total()
        return results, evictions

    async def _list(self, req: ListConvos) -> Result:
        """A listing page across every shard (so across all masters), merged in id order."""
        pages, _ = await self._all("list", *list_bounds(req), req.limit)
        if len(pages) < self.shards:
            return Unavailable("storage unavailable: a redis cluster node does not answer")
        return merge_pages(req, [(p[1], p[2] == b"1") for p in pages], self.limits.ttl)

    async def expire(self) -> tuple[bool, list[Event]]:
        replies, evictions = await self._all("expire", c.SWEEP_CHUNK, repr(c.OUTBOX_STALE))
        await self._name()
        if not replies:
            raise Unavailable("storage unavailable: no redis cluster node answers")
        deadlines = [float(r[2]) for r in replies if r[2]]
        self._next_deadline = min(deadlines) if deadlines else NO_DEADLINE
        return any(r[1] == b"1" for r in replies), evictions
