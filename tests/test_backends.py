"""The backend behaviour suite: the whole store contract, run on every backend.

Each test drives a backend through the same interface the service uses, on a fake clock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import shutil
import sqlite3
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import redis.asyncio

from worker import constants as c
from worker.backends.base import Backend
from worker.backends.cluster import ClusterBackend, shard_of
from worker.backends.memory import MemoryBackend
from worker.backends.redis import RedisBackend
from worker.backends.sqlite import SqliteBackend
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
    decode_cursor,
)
from worker.store import Limits
from worker.turns import expand_turns

BACKENDS = ["memory", "sqlite", "redis", "cluster"]
# The cluster backend runs this suite with one index shard, where its LRU is exact and the
# small limits below mean what they say; tests/test_cluster.py covers many shards.
CLUSTER_SUITE_SHARDS = 1


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Harness:
    """A backend on a fake clock, with the evictions it reported so far."""

    def __init__(
        self, kind: str, limits: Limits, tmp: Path, clock: Clock, redis_url: str = ""
    ) -> None:
        self.kind, self.limits, self.tmp, self.clock = kind, limits, tmp, clock
        self.redis_url = redis_url
        self.prefix = f"t{uuid.uuid4().hex[:10]}"  # each harness its own keys in Redis
        self.events: list[tuple[str, str, int, int]] = []
        self.trimmed: list[tuple[str, list[int], int]] = []  # (convo, seqs, summary_upto)
        self.born: list[int] = []  # each trimmed event's
        self.be = self._new()

    def _new(self) -> Backend:
        wall = self.clock  # one fake time drives both clocks
        if self.kind == "memory":
            return MemoryBackend(self.limits, clock=self.clock, wall=wall)
        if self.kind == "cluster":
            return ClusterBackend(
                f"{self.redis_url}?shards={CLUSTER_SUITE_SHARDS}",
                self.limits,
                prefix=self.prefix,
                clock=self.clock,
                wall=wall,
            )
        if self.kind == "redis":
            return RedisBackend(
                self.redis_url, self.limits, prefix=self.prefix, clock=self.clock, wall=wall
            )
        return SqliteBackend(
            f"sqlite:///{self.tmp}/memory.db", self.limits, clock=self.clock, wall=wall
        )

    async def reopen(self, limits: Limits | None = None) -> None:
        """Close and open again on the same storage, as a restarted worker does."""
        await self.be.close()
        self.limits = limits or self.limits
        self.be = self._new()
        await self.be.open()

    def _note(self, events: list[Event]) -> None:
        for e in events:
            if isinstance(e, Eviction):
                self.events.append((e.convo, e.reason, e.count, e.keys))
            else:
                seqs = [t["seq"] for t in Turns(e.count, e.turns).decoded()]
                self.trimmed.append((e.convo, seqs, e.summary_upto))
                self.born.append(e.born)

    async def run(self, req: Request) -> Result:
        results, events = await self.be.execute([req])
        self._note(events)
        return results[0]

    async def ok(self, req: Request) -> Any:
        result = await self.run(req)
        if isinstance(result, WorkerError):
            raise result
        return result

    async def expire(self) -> bool:
        more, events = await self.be.expire()
        self._note(events)
        return more

    def connected(self) -> None:
        """What the service does on connecting: announce what opening held, each trimmed
        event delivered (the broker's PUBACK)."""
        events = self.be.held_events()
        self._note(events)
        for e in events:
            if isinstance(e, Trimmed) and e.receipt:
                self.be.delivered(e.receipt)

    def take(self) -> list[tuple[str, str, int, int]]:
        out, self.events = self.events, []
        return out

    @property
    def counts(self) -> Any:
        return self.be.counts()


Make = Callable[..., Awaitable[Harness]]


def _server_url(request: pytest.FixtureRequest) -> str:
    if request.param == "redis":
        return str(request.getfixturevalue("redis_url"))
    if request.param == "cluster":
        return str(request.getfixturevalue("redis_cluster").url)
    return ""


@pytest.fixture(params=BACKENDS)
async def make(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Make]:
    made: list[Harness] = []

    url = _server_url(request)

    async def factory(**limits: Any) -> Harness:
        # Budget tests count bytes by hand: no overheads unless a test asks for them.
        limits = {
            "convo_cost": 0,
            "id_byte_cost": 1,
            "turn_cost": 0,
            "key_cost": 0,
            "id_cost": 0,
            **limits,
        }
        h = Harness(request.param, Limits(**limits), tmp_path / str(len(made)), Clock(), url)
        await h.be.open()
        made.append(h)
        return h

    yield factory
    for h in made:
        await h.be.close()


async def turns(h: Harness, convo: str, last: int | None = None) -> list[dict[str, Any]]:
    result = await h.ok(Get(convo, last))
    assert isinstance(result, Turns)
    return result.decoded()


async def add(h: Harness, convo: str, content: str = "x", role: str = "user", **kw: Any) -> Any:
    result = await h.ok(Append(convo, role, content, **kw))
    assert isinstance(result, Fields)
    return result.fields


async def test_append_numbers_turns_and_counts_them(make: Make) -> None:
    """seq numbers turns from 1; count is how many are stored."""
    h = await make()
    assert await add(h, "c") == {"seq": 1, "count": 1}
    assert await add(h, "c") == {"seq": 2, "count": 2}
    assert await add(h, "d") == {"seq": 1, "count": 1}


async def test_max_turns_drops_the_oldest_without_an_eviction(make: Make) -> None:
    """Past --max-turns the oldest turn goes; trimming is not an eviction."""
    h = await make(max_turns=3)
    for i in range(5):
        await add(h, "c", f"m{i}")
    assert [t["content"] for t in await turns(h, "c")] == ["m2", "m3", "m4"]
    assert [t["seq"] for t in await turns(h, "c")] == [3, 4, 5]
    assert await add(h, "c") == {"seq": 6, "count": 3}
    assert h.take() == []
    assert (h.counts.turns, h.counts.bytes) == (3, 1 + 6 + 6 + 5)


async def test_get_last_and_unknown(make: Make) -> None:
    """get returns the last N, oldest first; [] for an unknown conversation (not created)."""
    h = await make()
    for i in range(4):
        await add(h, "c", f"m{i}")
    assert [t["content"] for t in await turns(h, "c", 2)] == ["m2", "m3"]
    assert [t["content"] for t in await turns(h, "c", 10)] == ["m0", "m1", "m2", "m3"]
    assert await turns(h, "nobody") == []
    assert h.counts.conversations == 1


async def test_get_last_of_any_size_and_the_batch_around_it(make: Make) -> None:
    """`last` is any int >= 1: one past every turn returns them all, and the requests
    batched with it are answered as ever (Redis's script failed on one over 2^53, and its
    whole batch was answered unavailable, though stored)."""
    h = await make()
    await add(h, "c", "a")
    results, _ = await h.be.execute(
        [Append("c", "user", "b"), Get("c", 2**63 - 1), Append("c", "user", "c")]
    )
    got = results[1]
    assert [type(r) for r in results] == [Fields, Turns, Fields]
    assert isinstance(got, Turns)
    assert [t["content"] for t in got.decoded()] == ["a", "b"]


async def test_a_conversation_the_script_cannot_read_fails_alone(make: Make) -> None:
    """A conversation whose stored data the Redis script cannot read (another program
    wrote it) is answered internal, and the requests batched with it as ever (the whole
    batch was answered unavailable, though the others were stored)."""
    h = await make()
    if not isinstance(h.be, RedisBackend):
        pytest.skip("the Redis script's")
    await add(h, "bad")
    if isinstance(h.be, ClusterBackend):  # its own connection to the data's node
        await h.be._rc.hset(f"{h.be.keys[shard_of('bad', h.be.shards)]}m:bad", "seq", "x")
    else:
        await h.be._redis.hset(f"{h.be.key}m:bad", "seq", "x")
    results, _ = await h.be.execute(
        [Append("good", "user", "1"), Append("bad", "user", "x"), Append("good", "user", "2")]
    )
    assert [r.code if isinstance(r, WorkerError) else r for r in results] == [
        Fields({"seq": 1, "count": 1}),
        "internal",
        Fields({"seq": 2, "count": 2}),
    ]


async def test_a_cluster_shard_the_sweep_cannot_read_is_left_out(make: Make) -> None:
    """A shard whose data the script cannot read (another program's key in its place) is
    left out of a sweep like a shard that is down (here the only one: the sweep is told
    storage is unavailable, and tries again), not a TypeError."""
    h = await make(ttl=10)
    if not isinstance(h.be, ClusterBackend):
        pytest.skip("the cluster's")
    await add(h, "c")
    await h.be._rc.set(f"{h.be.keys[0]}dl", "not a sorted set")
    h.clock.now += 20
    with pytest.raises(Unavailable):  # raised TypeError
        await h.expire()
    assert h.take() == []


async def test_turns_carry_role_and_timestamp(make: Make) -> None:
    """A stored turn comes back with its role, the clock's timestamp and its sequence number."""
    h = await make()
    await add(h, "c", "hello", role="assistant")
    assert await turns(h, "c") == [
        {"role": "assistant", "content": "hello", "ts": h.clock.now, "seq": 1, "tokens": 2}
    ]


async def test_ttl_slides_on_append_and_get(make: Make) -> None:
    """The TTL runs from the last append or get."""
    h = await make(ttl=10)
    await add(h, "c")
    h.clock.now += 8
    assert len(await turns(h, "c")) == 1
    h.clock.now += 8
    await add(h, "c")
    h.clock.now += 9.9
    assert await h.expire() is False
    assert h.take() == []
    assert len(await turns(h, "c")) == 2


async def test_expiry_is_proactive_and_reported_once(make: Make) -> None:
    """The sweep expires conversations nobody touches, one event each."""
    h = await make(ttl=10)
    await add(h, "a")
    await add(h, "a")
    h.clock.now += 5
    await add(h, "b")
    h.clock.now += 6
    await h.expire()
    assert h.take() == [("a", "ttl", 2, 0)]
    h.clock.now += 10
    await h.expire()
    await h.expire()
    assert h.take() == [("b", "ttl", 1, 0)]
    assert (h.counts.conversations, h.counts.turns, h.counts.bytes) == (0, 0, 0)


async def test_expired_conversation_is_never_visible_again(make: Make) -> None:
    """An append after expiry starts a fresh conversation at seq 1, with the ttl event first."""
    h = await make(ttl=10)
    await add(h, "c", "old")
    h.clock.now += 11
    assert await add(h, "c", "new") == {"seq": 1, "count": 1}
    assert h.take() == [("c", "ttl", 1, 0)]
    assert [t["content"] for t in await turns(h, "c")] == ["new"]


async def test_get_on_expired_is_empty(make: Make) -> None:
    """A get after the TTL finds nothing, and the conversation's expiry is reported as ttl."""
    h = await make(ttl=10)
    await add(h, "c")
    h.clock.now += 10
    assert await turns(h, "c") == []
    assert h.take() == [("c", "ttl", 1, 0)]


async def test_ttl_zero_disables_expiry(make: Make) -> None:
    """With ttl 0 nothing expires, however much time passes."""
    h = await make(ttl=0)
    await add(h, "c")
    h.clock.now += 1e9
    assert await h.expire() is False
    assert len(await turns(h, "c")) == 1


async def test_mass_expiry_is_chunked(make: Make) -> None:
    """A sweep step expires a bounded number and says whether more is due."""
    h = await make(ttl=1, max_conversations=10_000)
    for at in range(0, 5000, 64):  # batches of --max-inflight, as the service sends them
        batch = [Append(f"c{i}", "u", "x") for i in range(at, min(at + 64, 5000))]
        results, _ = await h.be.execute(batch)
        assert all(isinstance(r, Fields) for r in results)
    h.clock.now += 2
    assert await h.expire() is True
    assert 0 < h.counts.conversations < 5000
    while await h.expire():
        pass
    assert h.counts.conversations == 0
    assert len(h.take()) == 5000


async def test_lru_evicts_the_least_recently_used(make: Make) -> None:
    """Creating one more than --max-conversations evicts the LRU one; a get is a use."""
    h = await make(max_conversations=3)
    for name in "abc":
        await add(h, name)
    await turns(h, "a")
    await add(h, "d")
    assert h.take() == [("b", "lru", 1, 0)]
    assert [len(await turns(h, n)) for n in "abcd"] == [1, 0, 1, 1]


async def test_lru_report_says_ttl_when_the_victim_had_expired(make: Make) -> None:
    """A conversation pushed out by LRU after its TTL had passed is reported as ttl, not lru."""
    h = await make(max_conversations=1, ttl=5)
    await add(h, "a")
    h.clock.now += 6
    await add(h, "b")
    assert h.take() == [("a", "ttl", 1, 0)]


async def test_memory_budget_evicts_lru_with_reason_memory(make: Make) -> None:
    """Past --max-bytes, least recently used conversations go (reason memory)."""
    h = await make(max_bytes=100)
    await add(h, "a", "x" * 40, role="r")  # 41 bytes and the 1-byte id
    await add(h, "b", "x" * 40, role="r")  # 84
    await add(h, "c", "x" * 40, role="r")  # 126 -> a goes
    assert h.take() == [("a", "memory", 1, 0)]
    assert h.counts.bytes == 84


async def test_budget_counts_each_conversation_turn_and_key_overhead(make: Make) -> None:
    """--max-bytes counts the per-conversation, per-turn and per-key costs, on every backend."""
    h = await make(max_bytes=400, convo_cost=99, id_byte_cost=2, turn_cost=10, key_cost=20)
    await add(h, "a", "x" * 6, role="r")  # 99 + 2 + 10 + 7
    await save(h, "a", "k", "v")  # 20 + 1 + 2
    assert h.counts.bytes == 118 + 23
    await add(h, "b", "x" * 6, role="r")  # 259
    await add(h, "c", "x" * 6, role="r")  # 377
    assert h.take() == []
    await add(h, "c", "x" * 6, role="r")  # 394
    await add(h, "c", "x" * 6, role="r")  # 411 -> a goes
    assert h.take() == [("a", "memory", 1, 1)]
    assert h.counts.bytes == 411 - 141
    await h.ok(Delete("b"))
    await h.ok(Delete("c"))
    assert h.counts.bytes == 0
    assert isinstance(await h.run(Append("d", "r", "x" * 290)), TooLarge)  # 99 + 2 + 10 + 291


async def test_budget_counts_utf8_bytes(make: Make) -> None:
    """The byte budget counts UTF-8 bytes of id, role and content, not characters."""
    h = await make()
    await add(h, "ç", "é" * 10, role="ü")
    assert h.counts.bytes == 2 + 22


async def test_turn_larger_than_the_budget_is_refused(make: Make) -> None:
    """A turn that could never fit is too_large, and nothing is evicted for it."""
    h = await make(max_bytes=50)
    await add(h, "a", "x" * 10)
    refused = await h.run(Append("b", "user", "x" * 50))
    assert isinstance(refused, TooLarge)
    assert refused.message == "the turn (54 bytes with its overhead) does not fit in --max-bytes 50"
    value = await save(h, "b", "k", "v" * 60)
    assert isinstance(value, TooLarge)
    assert value.message == "the value does not fit in --max-bytes 50"  # Redis said no 50
    assert h.take() == []
    assert h.counts.conversations == 1


async def test_one_conversation_over_the_budget_trims_its_own_oldest_turns(make: Make) -> None:
    """The conversation being written is never evicted for its own append."""
    h = await make(max_bytes=100, max_turns=10)
    for i in range(5):
        await add(h, "c", f"{i}" * 39, role="r")
    assert [t["content"][0] for t in await turns(h, "c")] == ["3", "4"]
    assert h.counts.bytes == 1 + 80
    assert h.take() == []


async def test_delete_reports_one_eviction(make: Make) -> None:
    """Delete reports how many turns it removed, one deleted event, and a fresh start after it."""
    h = await make()
    await add(h, "c")
    await add(h, "c")
    assert (await h.ok(Delete("c"))).fields == {"deleted": 2}
    assert (await h.ok(Delete("c"))).fields == {"deleted": 0}
    assert h.take() == [("c", "deleted", 2, 0)]
    assert (await add(h, "c"))["seq"] == 1


async def test_append_with_id_is_applied_once(make: Make) -> None:
    """A repeated id gets the original reply and stores nothing more."""
    h = await make()
    first = await add(h, "c", "a", id="m1")
    await add(h, "c", "b", id="m2")
    assert await add(h, "c", "a", id="m1") == first == {"seq": 1, "count": 1}
    assert [t["content"] for t in await turns(h, "c")] == ["a", "b"]


async def test_a_delete_with_an_id_is_applied_once_and_its_ids_outlive_it(make: Make) -> None:
    """A broker restored from its last autosave delivers again requests answered since: a
    delete with an id, and writes with ids before and after it. The deleted conversation's
    ids and the delete's are kept, and taken back by the conversation started again: none
    is applied twice, and the turns appended after the delete stay."""
    h = await make()
    await add(h, "c", "a1", id="a1")
    assert await add(h, "c", "a2", id="a2") == {"seq": 2, "count": 2}
    assert (await h.ok(Delete("c", "d1"))).fields == {"deleted": 2}
    assert (await h.ok(Delete("c", "d1"))).fields == {"deleted": 2}  # gone already: the reply
    assert await add(h, "c", "a3", id="a3") == {"seq": 1, "count": 1}
    assert await add(h, "c", "a2", id="a2") == {"seq": 2, "count": 2}
    assert (await h.ok(Delete("c", "d1"))).fields == {"deleted": 2}
    assert await add(h, "c", "a3", id="a3") == {"seq": 1, "count": 1}
    assert [t["content"] for t in await turns(h, "c")] == ["a3"]
    assert h.take() == [("c", "deleted", 2, 0)]
    assert (await h.ok(Delete("x", "dx"))).fields == {"deleted": 0}  # nothing to delete yet
    await add(h, "x", "x1")
    assert (await h.ok(Delete("x", "dx"))).fields == {"deleted": 0}
    assert (await h.ok(Delete("c"))).fields == {"deleted": 1}  # without an id: every time
    assert [len(await turns(h, n)) for n in ("c", "x")] == [0, 1]


async def test_a_deleted_conversations_ids_are_bounded(make: Make) -> None:
    """What stays of a deleted conversation counts in --max-bytes (its id's bytes and its
    ids), goes first when the budget is short, and lasts --ttl."""
    h = await make(max_bytes=500, id_cost=100, ttl=100)
    await add(h, "c", "x", role="r", id="i1")
    assert h.counts.bytes == 1 + 2 + 100
    await h.ok(Delete("c", "d1"))
    assert h.counts.bytes == 1 + 2 * 100
    h.clock.now += 101
    while await h.expire():
        pass
    assert h.counts.bytes == 0
    assert (await add(h, "c", "x", role="r", id="i1"))["seq"] == 1  # forgotten: applied again
    await h.ok(Delete("c", "d1"))
    await add(h, "e", "x" * 190, role="r")
    assert h.counts.bytes == 201 + 1 + 191
    await add(h, "e", "x" * 110, role="r")  # over: the grave goes, not a conversation
    assert h.counts.bytes == 1 + 191 + 111
    assert h.take() == [("c", "deleted", 1, 0)] * 2  # and no event for the ids
    assert (await add(h, "c", "x", role="r", id="i1"))["seq"] == 1


async def test_a_fresh_grave_outlives_an_idle_conversation(make: Make) -> None:
    """In a full store (what a cache sized by --max-bytes is) graves that always went first
    lasted until the bytes their delete freed were used again: the least recently used goes,
    a grave by the time of its delete."""
    h = await make(max_bytes=400, id_cost=100)
    await add(h, "o", "x" * 100, role="r")
    h.clock.now += 1
    await add(h, "c", "x", role="r", id="i1")
    await h.ok(Delete("c", "d1"))
    h.clock.now += 1
    await add(h, "n", "x" * 150, role="r")  # 102 + 201 + 152 > 400: "o" goes, not the grave
    assert h.take() == [("c", "deleted", 1, 0), ("o", "memory", 1, 0)]
    assert h.counts.bytes == 201 + 152
    await add(h, "c", "x", role="r", id="i2")
    assert (await h.ok(Delete("c", "d1"))).fields == {"deleted": 1}  # remembered
    assert len(await turns(h, "c")) == 1


async def test_an_evicted_conversations_ids_outlive_it(make: Make) -> None:
    """A broker restored from its last autosave delivers again writes answered since; the
    conversation they went to may have been evicted for room in between. Its ids stay, for
    --ttl from its last use, and the conversation started again takes them back: a write of
    before the eviction is answered, not applied again (it brought an old turn back after
    newer ones, and a delete took the turns of the conversation started since)."""
    h = await make(max_conversations=2, ttl=100)
    first = await add(h, "c", "c1", id="c1")
    h.clock.now += 1
    await add(h, "a", id="a1")
    await add(h, "b", id="b1")  # "c" goes (LRU), its ids stay
    assert h.take() == [("c", "lru", 1, 0)]
    assert await add(h, "c", "c1", id="c1") == first  # answered, nothing stored
    assert await turns(h, "c") == []
    assert h.counts.conversations == 2
    assert await add(h, "c", "c2", id="c2") == {"seq": 1, "count": 1}  # takes the ids back
    assert h.take() == [("a", "lru", 1, 0)]
    await h.ok(Delete("c", "dc"))
    await add(h, "c", "c3", id="c3")
    await add(h, "a", id="a2")
    await add(h, "b", id="b2")  # "c" goes again, with the delete's id
    assert h.take() == [("c", "deleted", 1, 0), ("b", "lru", 1, 0), ("c", "lru", 1, 0)]
    await add(h, "c", "c4", id="c4")
    assert (await h.ok(Delete("c", "dc"))).fields == {"deleted": 1}  # took "c4" before
    assert await add(h, "c", "c1", id="c1") == first
    assert [t["content"] for t in await turns(h, "c")] == ["c4"]
    h.clock.now += 100  # past --ttl from every last use: the graves go with the rest
    while await h.expire():
        pass
    assert (h.counts.conversations, h.counts.bytes) == (0, 0)
    assert await add(h, "c", "c1", id="c1") == first  # forgotten: applied again
    assert [t["content"] for t in await turns(h, "c")] == ["c1"]


async def test_graves_are_at_most_twice_max_conversations(make: Make) -> None:
    """Graves, of deletes and evictions alike, are at most twice --max-conversations: the
    oldest goes. At once (a chaos trial), deletes left three conversations' ids with none
    live under --max-conversations 2, and the evicted one's were dropped: its write, that a
    crashed broker delivered again, was applied again."""
    h = await make(max_conversations=2)
    first = await add(h, "c0", "old", id="a1")
    for n in (1, 2):  # c0 is evicted, c1 then c2 deleted: three graves, nothing live
        await add(h, f"c{n}", "x", id=f"a{n}")
    for n in (1, 2):
        await h.ok(Delete(f"c{n}", f"d{n}"))
    assert await add(h, "c0", "old", id="a1") == first
    assert await turns(h, "c0") == []  # answered, not stored
    await add(h, "d", "x", id="d1")
    await h.ok(Delete("d", "dd"))
    for n in range(6):
        await add(h, f"e{n}", "x", id=f"e{n}")  # e0-e3 evicted: graves over four
    for n in range(4):
        await add(h, f"e{n}", "x", id=f"e{n}")
    assert [len(await turns(h, f"e{n}")) for n in range(4)] == [0, 0, 0, 0]
    assert (await h.ok(Delete("d", "dd"))).fields == {"deleted": 0}  # the oldest went


async def test_a_conversation_started_again_takes_its_grave_before_making_room(
    make: Make,
) -> None:
    """A conversation started again takes its ids back before it evicts another for room:
    the grave that eviction digs went over --max-conversations graves, and the oldest, its
    own, went first (an old turn back after the new one, with --max-conversations 1)."""
    h = await make(max_conversations=1, ttl=100)
    first = await add(h, "c", "gone", id="a2")
    h.clock.now += 1
    await add(h, "o", "other", id="o1")  # "c" goes (LRU), its ids stay
    h.clock.now += 1
    await add(h, "c", "one", id="a3")  # "o" goes, with its ids
    assert await add(h, "c", "gone", id="a2") == first
    assert [t["content"] for t in await turns(h, "c")] == ["one"]


async def test_a_grave_older_than_every_kept_one_is_not_kept(make: Make) -> None:
    """At --max-conversations graves, a conversation evicted that was last used before every
    grave kept is the oldest: it goes, not a newer delete's grave."""
    h = await make(max_conversations=3, ttl=100)
    await add(h, "a", id="a1")
    h.clock.now += 50
    await add(h, "x", "x1", id="x1")
    for name in ("x", "y", "z"):  # three graves, all newer than "a"'s last use
        await h.ok(Delete(name, f"{name}d"))
        h.clock.now += 1
    await add(h, "b")
    await add(h, "c")
    await add(h, "d")  # "a" goes: older than the three graves, it leaves none
    await add(h, "x", "x2", id="x2")
    assert (await h.ok(Delete("x", "xd"))).fields == {"deleted": 1}  # remembered
    assert [t["content"] for t in await turns(h, "x")] == ["x2"]


async def test_a_conversation_evicted_for_memory_keeps_its_ids_while_they_fit(
    make: Make,
) -> None:
    """A conversation evicted for --max-bytes leaves its ids, counted in the budget (its
    id's bytes and its ids), where its turns were; they go in turn when the budget is still
    short, as a conversation last used when it was."""
    h = await make(max_bytes=400, id_cost=100)
    first = await add(h, "o", "x" * 150, role="r", id="o1")
    assert h.counts.bytes == 1 + 151 + 100
    h.clock.now += 1
    await add(h, "n", "x" * 200, role="r")  # 252 + 202 > 400: "o" goes, its ids stay
    assert h.take() == [("o", "memory", 1, 0)]
    assert h.counts.bytes == 202 + 1 + 100
    assert await add(h, "o", "x" * 150, role="r", id="o1") == first
    assert await turns(h, "o") == []
    h.clock.now += 1
    await add(h, "m", "x" * 150, role="r")  # 303 + 152 > 400: the ids go, not "n"
    assert h.take() == []
    assert h.counts.bytes == 202 + 152
    assert (await add(h, "o", "x" * 150, role="r", id="o1"))["seq"] == 1  # applied again


async def test_remembered_ids_count_in_the_budget(make: Make) -> None:
    """Each request id a conversation remembers costs --max-bytes, and goes past
    --max-inflight (max_ids): ids crowd other conversations out like turns do."""
    h = await make(max_bytes=800, id_cost=100, max_ids=5, max_turns=2)
    first = await add(h, "c", "x", role="r", id="i0")
    assert h.counts.bytes == 1 + 2 + 100
    for i in range(1, 7):
        await add(h, "c", "x", role="r", id=f"i{i}")
    assert h.counts.bytes == 1 + 2 * 2 + 5 * 100  # two turns, the five newest ids
    assert (await add(h, "c", "x", role="r", id="i6"))["seq"] == 7  # remembered
    assert (await add(h, "c", "x", role="r", id="i0")) != first  # forgotten: applied again
    await add(h, "d", "x", role="r", id="j0")
    await add(h, "d", "x", role="r", id="j1")
    assert h.take() == []
    await add(h, "d", "x", role="r", id="j2")  # 505 + 305 > 800
    assert h.take() == [("c", "memory", 2, 0)]
    assert h.counts.bytes == 1 + 2 * 2 + 3 * 100


async def test_a_conversation_alone_at_the_budget_forgets_ids_before_turns(make: Make) -> None:
    """Ids are a cache: a conversation over --max-bytes by itself gives up its oldest ids
    first, then turns; a turn or state value that fits without the ids is stored."""
    h = await make(max_bytes=300, id_cost=100, max_turns=10)
    for i in range(4):
        await add(h, "c", "x" * 10, role="r", id=f"i{i}")
    assert [t["seq"] for t in await turns(h, "c")] == [1, 2, 3, 4]
    assert h.counts.bytes == 1 + 4 * 11 + 2 * 100
    assert (await add(h, "c", "x" * 10, role="r", id="i3"))["seq"] == 4
    assert (await add(h, "c", "x" * 10, role="r", id="i1"))["seq"] == 5  # forgotten
    assert isinstance(await save(h, "c", "k", "v" * 40, id="s"), Fields)
    assert h.counts.bytes <= 300
    assert (await add(h, "c", "x" * 10, role="r", id="i9"))["seq"] == 6
    assert h.counts.bytes <= 300
    assert h.take() == []
    assert (await add(h, "e", "x" * 290, role="r", id="e1"))["seq"] == 1  # its id does not fit
    assert h.counts.bytes == 1 + 291


async def test_a_write_without_an_id_makes_room_by_forgetting_ids(make: Make) -> None:
    """A value that fits the conversation only without its remembered ids is stored, and its
    conversation kept: the ids go (the budget evicted the conversation just written)."""
    h = await make(max_bytes=2000, id_cost=100)
    for i in range(10):
        await add(h, "c", "x", role="r", id=f"r{i}")
    assert isinstance(await save(h, "c", "k", "v" * 1500), Fields)
    assert await load(h, "c", "k") == "v" * 1500
    assert h.take() == []
    assert h.counts.bytes <= 2000


async def test_a_restore_forgets_ids_a_conversation_cannot_keep(tmp_path: Path) -> None:
    """A conversation stored when its ids cost less comes back without the ids it cannot
    keep, not evicted for them."""
    limits = Limits(max_bytes=3000, id_cost=10)
    h = Harness("sqlite", limits, tmp_path, Clock())
    await h.be.open()
    try:
        for i in range(20):
            await add(h, "c", "x" * 100, id=f"r{i}")
        await h.reopen(dataclasses.replace(limits, id_cost=500))
        assert len(await turns(h, "c")) == 8
        assert h.take() == []
        assert h.counts.bytes <= 3000
    finally:
        await h.be.close()


async def test_batch_is_applied_in_order(make: Make) -> None:
    """Requests in one batch take effect in the order given, each with its own result."""
    h = await make(max_turns=100)
    reqs: list[Request] = [Append("c", "u", str(i)) for i in range(50)]
    reqs.insert(25, Get("c", 1))
    results, _ = await h.be.execute(reqs)
    assert isinstance(results[25], Turns)
    assert results[25].decoded()[0]["content"] == "24"
    assert [r.fields["seq"] for r in results if isinstance(r, Fields)] == list(range(1, 51))


# --- state -------------------------------------------------------------------------------


async def save(h: Harness, convo: str, key: str, value: Any, ns: str = "n", **kw: Any) -> Any:
    return await h.run(StateSave(convo, ns, key, msgpack.packb(value), **kw))


async def load(h: Harness, convo: str, key: str, ns: str = "n", ttl: float | None = None) -> Any:
    loaded = await h.ok(StateLoad(convo, ns, key, ttl))
    assert isinstance(loaded, Loaded)
    return None if loaded.value is None else msgpack.unpackb(loaded.value)


async def get_all(h: Harness, convo: str, ns: str = "n") -> dict[str, Any]:
    result = await h.ok(StateGetAll(convo, ns))
    assert isinstance(result, Items)
    return {k: msgpack.unpackb(v) for k, v in result.items.items()}


async def test_state_round_trip_and_namespaces(make: Make) -> None:
    """Values round-trip per namespace; a missing key loads None; delete says if it deleted."""
    h = await make()
    await save(h, "c", "k", {"a": [1, None]})
    await save(h, "c", "k", "other", ns="m")
    assert await load(h, "c", "k") == {"a": [1, None]}
    assert await load(h, "c", "k", ns="m") == "other"
    assert await load(h, "c", "nope") is None
    assert await get_all(h, "c") == {"k": {"a": [1, None]}}
    assert (await h.ok(StateDelete("c", "n", "k"))).fields == {"deleted": True}
    assert (await h.ok(StateDelete("c", "n", "k"))).fields == {"deleted": False}
    assert h.counts.keys == 1


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        False,
        0,
        -(2**63),
        2**64 - 1,
        1.5,
        "",
        "é",
        b"\x00\xff",
        [],
        [1, [2, [3]]],
        {"a": {"b": None}},
        msgpack.ExtType(5, b"ext"),
    ],
)
async def test_state_values_round_trip_exactly(make: Make, value: Any) -> None:
    """Every msgpack value a device saves loads back equal."""
    h = await make()
    await save(h, "c", "k", value)
    assert await load(h, "c", "k") == value


async def test_state_counts_toward_the_budget_and_goes_with_the_conversation(make: Make) -> None:
    """State keys count toward the byte budget and go (counted) with their conversation."""
    h = await make()
    await save(h, "c", "key", "v")  # 3 + 2, and the id's 1
    await add(h, "c", "x")
    assert h.counts.bytes == 1 + 5 + 5
    await h.ok(Delete("c"))
    assert h.take() == [("c", "deleted", 1, 1)]
    assert (h.counts.bytes, h.counts.keys) == (0, 0)


async def test_key_ttl_expires_without_event(make: Make) -> None:
    """A key's own TTL removes just that key, with no eviction event."""
    h = await make(ttl=0)
    await save(h, "c", "k", 1, ttl=5)
    await save(h, "c", "forever", 2)
    h.clock.now += 5
    assert await load(h, "c", "k") is None
    await save(h, "c", "k2", 1, ttl=1)
    h.clock.now += 1
    await h.expire()
    assert h.take() == []
    assert h.counts.keys == 1
    assert await get_all(h, "c") == {"forever": 2}


async def test_a_load_with_a_ttl_starts_the_keys_ttl_again(make: Make) -> None:
    """state/load with `ttl`: a found key with a TTL lives that long from now, its value
    untouched; one saved without a TTL keeps none (a put between a read and its refresh
    stands whole); a load without it leaves the TTL running; a key not found is not made."""
    h = await make(ttl=0)
    await save(h, "c", "k", 1, ttl=5)
    await save(h, "c", "forever", 2)
    h.clock.now += 4
    assert await load(h, "c", "k", ttl=5) == 1
    assert await load(h, "c", "forever", ttl=3) == 2
    assert await load(h, "c", "none", ttl=5) is None
    h.clock.now += 2.5  # 6.5 s after the save
    assert await load(h, "c", "k") == 1
    h.clock.now += 0.5
    await h.expire()
    assert await get_all(h, "c") == {"k": 1, "forever": 2}
    h.clock.now += 2
    assert await load(h, "c", "k") is None  # 5 s after the refresh
    assert await get_all(h, "c") == {"forever": 2}
    assert h.counts.keys == 1


async def test_max_keys_refuses_new_keys_but_not_updates(make: Make) -> None:
    """At max_keys a new key is too_large, an update is not, and an expired key frees its place."""
    h = await make(max_keys=2)
    await save(h, "c", "a", 1)
    await save(h, "c", "b", 1, ttl=1)
    full = await save(h, "c", "z", 1)
    assert isinstance(full, TooLarge)
    assert full.message == "the conversation has --max-keys 2 live keys"  # Redis said no 2
    assert isinstance(await save(h, "c", "a", 2), Fields)
    h.clock.now += 1
    assert isinstance(await save(h, "c", "z", 1), Fields)  # b expired, so z fits
    assert h.counts.keys == 2


async def test_a_key_delete_with_an_id_is_applied_once(make: Make) -> None:
    """A key's delete delivered again (a broker restored from its autosave) does not take
    the value saved after it, in a live conversation or in one it found empty."""
    h = await make()
    await save(h, "c", "k", "v1", id="s1")
    assert (await h.ok(StateDelete("c", "n", "k", "x1"))).fields == {"deleted": True}
    await save(h, "c", "k", "v2", id="s2")
    assert (await h.ok(StateDelete("c", "n", "k", "x1"))).fields == {"deleted": True}
    assert await load(h, "c", "k") == "v2"
    assert (await h.ok(StateDelete("e", "n", "k", "x2"))).fields == {"deleted": False}
    await save(h, "e", "k", "v", id="s3")
    assert (await h.ok(StateDelete("e", "n", "k", "x2"))).fields == {"deleted": False}
    assert await load(h, "e", "k") == "v"
    assert (await h.ok(StateDelete("e", "n", "k"))).fields == {"deleted": True}  # no id


async def test_state_touches_the_conversation(make: Make) -> None:
    """A state request keeps its conversation alive (its TTL restarts)."""
    h = await make(ttl=10, max_conversations=2)
    await add(h, "a")
    await add(h, "b")
    h.clock.now += 8
    await load(h, "a", "k")
    h.clock.now += 8
    await h.expire()
    assert h.take() == [("b", "ttl", 1, 0)]


async def test_state_save_with_id_is_applied_once(make: Make) -> None:
    """A save repeated with the same request id is not applied again."""
    h = await make()
    await save(h, "c", "k", 1, id=b"x")
    await save(h, "c", "k", 2)
    await save(h, "c", "k", 1, id=b"x")
    assert await load(h, "c", "k") == 2


# --- durability (backends that outlive the worker) ----------------------------------------

DURABLE = ["sqlite", "redis", "cluster"]


@pytest.fixture(params=DURABLE)
async def durable(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    url = _server_url(request)
    h = Harness(request.param, Limits(ttl=100, max_turns=4), tmp_path, Clock(), url)
    await h.be.open()
    yield h
    await h.be.close()


async def test_restart_keeps_turns_state_and_ids(durable: Harness) -> None:
    """Everything a reply confirmed is there after a restart; seq and ids carry on."""
    h = durable
    for i in range(6):
        await add(h, "c", f"m{i}", id=f"id{i}")
    await save(h, "c", "k", {"deep": [1, b"\x00"]})
    await save(h, "c", "gone", 1)
    await h.ok(StateDelete("c", "n", "gone"))
    await add(h, "other", "o")
    await h.ok(Delete("other"))
    before = (h.counts, await turns(h, "c"))
    await h.reopen()
    assert (h.counts, await turns(h, "c")) == before
    assert await load(h, "c", "k") == {"deep": [1, b"\x00"]}
    assert await add(h, "c", "again", id="id5") == {"seq": 6, "count": 4}
    assert await add(h, "c", "m6") == {"seq": 7, "count": 4}
    assert await turns(h, "other") == []


async def test_a_deleted_conversations_ids_survive_a_restart(durable: Harness) -> None:
    """A worker restarted with its broker (a power cut) still knows a delete and the writes
    of before it, when the broker delivers them again."""
    h = durable
    await add(h, "c", "a1", id="a1")
    await add(h, "c", "a2", id="a2")
    await h.ok(Delete("c", "d1"))
    await h.ok(Delete("gone", "d2"))
    counted = h.counts.bytes
    await h.reopen()
    assert h.counts.bytes == counted
    assert await add(h, "c", "a3", id="a3") == {"seq": 1, "count": 1}
    assert (await h.ok(Delete("c", "d1"))).fields == {"deleted": 2}
    assert await add(h, "c", "a2", id="a2") == {"seq": 2, "count": 2}
    assert [t["content"] for t in await turns(h, "c")] == ["a3"]
    await add(h, "gone", "g")
    assert (await h.ok(Delete("gone", "d2"))).fields == {"deleted": 0}
    assert len(await turns(h, "gone")) == 1


@pytest.mark.parametrize("ttl", [0, 100])
async def test_a_grave_lasts_the_ttl_of_after_a_restart(durable: Harness, ttl: float) -> None:
    """A grave lasts --ttl from its delete under the --ttl the worker runs with now, as a
    conversation does (one dug under --ttl 0 lasted for ever after a restart with a TTL)."""
    h = durable
    await h.reopen(dataclasses.replace(h.limits, ttl=ttl))
    await add(h, "c", "a1", id="a1")
    await h.ok(Delete("c", "d1"))
    await h.reopen(dataclasses.replace(h.limits, ttl=10))
    h.clock.now += 11
    while await h.expire():
        pass
    assert h.counts.bytes == 0
    await add(h, "c", "again")
    assert (await h.ok(Delete("c", "d1"))).fields == {"deleted": 1}  # forgotten: applied


async def test_an_evicted_conversations_ids_outlive_a_restart(durable: Harness) -> None:
    """An evicted conversation's ids are stored with the rest, and last --ttl from its last
    use after a restart too."""
    h = durable
    await h.reopen(dataclasses.replace(h.limits, max_conversations=1))
    first = await add(h, "c", "c1", id="c1")
    h.clock.now += 50
    await add(h, "o", "o1")  # "c" goes (LRU) at 1050, last used at 1000
    counted = h.counts.bytes
    await h.reopen()
    assert h.counts.bytes == counted
    assert await add(h, "c", "c1", id="c1") == first
    assert await turns(h, "c") == []
    h.clock.now += 51  # past --ttl (100) from its last use, not from its eviction
    while await h.expire():
        pass
    assert (await add(h, "c", "c1", id="c1")) == first  # forgotten: applied again
    assert len(await turns(h, "c")) == 1


async def test_a_restart_with_a_lower_max_inflight_keeps_the_newest_ids(
    durable: Harness,
) -> None:
    """Ids kept under a higher --max-inflight are cut to the newest ones, and counted."""
    h = durable
    for i in range(6):
        await add(h, "c", f"m{i}", id=f"id{i}")
    await h.reopen(dataclasses.replace(h.limits, max_ids=3))
    await add(h, "c", "new", id="idx")  # the newest three now: id4, id5, idx
    assert (await add(h, "c", "m5", id="id5"))["seq"] == 6
    assert (await add(h, "c", "m3", id="id3"))["seq"] == 8  # forgotten: applied again
    counted = h.counts.bytes
    await h.reopen()
    assert h.counts.bytes == counted  # a restore counts ids as their writes did


async def test_ttl_keeps_counting_while_down(durable: Harness) -> None:
    """Deadlines are wall-clock: time spent stopped counts toward expiry."""
    h = durable
    await add(h, "old")
    h.clock.now += 60
    await add(h, "young")
    await save(h, "young", "k", 1, ttl=50)
    await h.be.close()
    h.clock.now += 45  # old: 105 s idle, young: 45 s
    h.be = h._new()
    await h.be.open()
    await h.expire()
    assert h.take() == [("old", "ttl", 1, 0)]
    assert len(await turns(h, "young")) == 1
    h.clock.now += 5
    assert await load(h, "young", "k") is None


async def test_lru_order_survives_restart(durable: Harness) -> None:
    """A restart with a lower --max-conversations evicts the least recently used first."""
    h = durable
    if h.kind in ("redis", "cluster"):
        pytest.skip("Redis bounds are kept by each operation; nothing is loaded on start")
    for name in "abc":
        await add(h, name)
    await turns(h, "a")
    await h.reopen(Limits(ttl=100, max_turns=4, max_conversations=2))
    h.connected()  # what opening evicted is announced on connecting
    assert h.take() == [("b", "lru", 1, 0)]
    await h.reopen()
    assert [len(await turns(h, n)) for n in "abc"] == [1, 0, 1]


async def test_a_restart_with_fewer_turns_announces_what_it_drops(tmp_path: Path) -> None:
    """A restart with a lower --max-turns trims each window as it loads: with --trimmed-events
    the turns it drops are announced (on connecting), as an append's would be. They left the
    window unannounced, and never reached the summary."""
    h = Harness("sqlite", Limits(ttl=100, max_turns=8, trimmed_events=True), tmp_path, Clock())
    await h.be.open()
    for i in range(6):
        await add(h, "c", f"m{i}")
    await h.reopen(Limits(ttl=100, max_turns=4, trimmed_events=True))
    h.connected()
    assert h.trimmed == [("c", [1, 2], 0)]
    assert [t["seq"] for t in await turns(h, "c")] == [3, 4, 5, 6]
    # Stored trimmed: not announced again, nor back in the window, at the next start.
    await h.reopen(Limits(ttl=100, max_turns=8, trimmed_events=True))
    h.connected()
    assert h.trimmed == [("c", [1, 2], 0)]
    assert [t["seq"] for t in await turns(h, "c")] == [3, 4, 5, 6]
    await h.be.close()


async def test_a_trimmed_event_is_kept_until_the_broker_has_it(tmp_path: Path) -> None:
    """SQLite stores a trimmed event with its trim, and holds it until `delivered`: a worker
    killed after the trim was stored and before the broker had the event sends it at its
    next start (it was lost, and the summary never had the turns)."""
    limits = Limits(ttl=100, max_turns=1, trimmed_events=True)
    h = Harness("sqlite", limits, tmp_path, Clock())
    await h.be.open()
    await add(h, "c", "one")
    (kept,) = (await h.be.execute([Append("c", "user", "two")]))[1]
    assert isinstance(kept, Trimmed)
    assert kept.receipt
    await h.reopen()  # not delivered: held
    (again,) = h.be.held_events()
    assert isinstance(again, Trimmed)
    assert (again, again.receipt) == (kept, kept.receipt)
    assert h.be.held_events() == []
    (later,) = (await h.be.execute([Append("c", "user", "three")]))[1]
    assert isinstance(later, Trimmed)
    assert later.receipt > kept.receipt
    h.be.delivered(kept.receipt)
    await h.reopen()
    (held,) = h.be.held_events()
    assert isinstance(held, Trimmed)
    assert (held, held.receipt) == (later, later.receipt)
    h.be.delivered(later.receipt)
    await h.reopen()  # delivered, then closed without another write: gone all the same
    assert h.be.held_events() == []
    await h.be.close()


async def test_redis_keeps_a_trimmed_event_until_the_broker_has_it(make: Make) -> None:
    """Redis keeps a trimmed event in an outbox with its trim until `delivered`: one left
    there past OUTBOX_STALE (its worker killed before the broker had it, or the reply lost
    to a timeout) is claimed by a sweep, once, and sent again. It was lost, and the summary
    never had the turns."""
    h = await make(max_turns=1, trimmed_events=True)
    if h.kind not in ("redis", "cluster"):
        pytest.skip("SQLite's outbox is another test's; the memory backend keeps none")
    await add(h, "c", "one")
    (kept,) = (await h.be.execute([Append("c", "user", "two")]))[1]
    assert isinstance(kept, Trimmed)
    assert kept.receipt
    assert (await h.be.expire())[1] == []  # in flight a while yet
    h.clock.now += c.OUTBOX_STALE
    (again,) = (await h.be.expire())[1]
    assert isinstance(again, Trimmed)
    assert (again, again.receipt) == (kept, kept.receipt)
    assert (await h.be.expire())[1] == []  # claimed: other workers' sweeps leave it
    (later,) = (await h.be.execute([Append("c", "user", "three")]))[1]
    assert isinstance(later, Trimmed)
    h.be.delivered(kept.receipt)
    h.be.delivered(later.receipt)
    await add(h, "d", "x")  # the deletions go with the next call
    h.clock.now += 2 * c.OUTBOX_STALE
    assert (await h.be.expire())[1] == []


async def test_redis_keeps_a_large_trim_until_the_broker_has_every_part(make: Make) -> None:
    """A trim of many turns (a restart with a lower --max-turns) goes out in parts: its
    outbox entry stays until the broker has them all, and a sweep sends it whole again."""
    h = await make(max_turns=40, trimmed_events=True, max_bytes=10**8)
    if h.kind not in ("redis", "cluster"):
        pytest.skip("SQLite's outbox is another test's; the memory backend keeps none")
    for i in range(40):
        await add(h, "c", f"{i:02}" + "x" * 40_000)
    await h.reopen(dataclasses.replace(h.limits, max_turns=1))
    parts = [
        p for p in (await h.be.execute([Append("c", "user", "last")]))[1] if isinstance(p, Trimmed)
    ]
    assert len(parts) > 1
    assert all(p.receipt == parts[0].receipt for p in parts)
    for part in parts[1:]:
        h.be.delivered(part.receipt)
    await add(h, "d", "x")
    h.clock.now += c.OUTBOX_STALE
    again = (await h.be.expire())[1]
    assert again == parts  # one part not delivered: the whole trim again
    for part in parts:
        h.be.delivered(part.receipt)
    await add(h, "e", "y")
    h.clock.now += 2 * c.OUTBOX_STALE
    assert (await h.be.expire())[1] == []


async def test_redis_keeps_to_limits_lowered_since_the_data_was_stored(make: Make) -> None:
    """Workers started again on Redis with a lower --max-conversations, --max-bytes or
    --max-turns: their sweeps evict down to the new limits, announced, and a get trims a
    longer window first. Nothing was done until a write came (50 conversations under
    --max-conversations 10, a get of 8 turns under --max-turns 3; a new user's trial)."""
    h = await make(max_turns=8, trimmed_events=True)
    if h.kind not in ("redis", "cluster"):
        pytest.skip("the other backends load what they store, and keep the limits then")
    for n in range(6):
        for i in range(5):
            await add(h, f"c{n}", f"t{i}")
    await h.reopen(dataclasses.replace(h.limits, max_conversations=4, max_turns=3))
    while await h.expire():
        pass
    evicted = h.take()
    assert h.counts.conversations <= 4
    assert len(evicted) == 6 - h.counts.conversations
    assert {reason for _, reason, _, _ in evicted} == {"lru"}
    if h.kind == "redis":
        assert evicted == [("c0", "lru", 5, 0), ("c1", "lru", 5, 0)]
    assert [t["seq"] for t in await turns(h, "c5")] == [3, 4, 5]
    assert h.trimmed[-1] == ("c5", [1, 2], 0)
    budget = h.counts.bytes // 2
    await h.reopen(dataclasses.replace(h.limits, max_bytes=budget))
    while await h.expire():
        pass
    assert h.counts.bytes <= budget
    assert {reason for _, reason, _, _ in h.take()} == {"memory"}


async def test_redis_workers_agree_on_their_stores_name(make: Make) -> None:
    """Workers on one Redis store read one name for it; a Redis restarted empty (here its key
    evicted) is named anew by the next worker to open it, and the others take that name at
    their next sweep (they kept the old one, and a share group warned of "another store")."""
    h = await make()
    if h.kind not in ("redis", "cluster"):
        pytest.skip("a store of one worker's own has no name")
    other = h._new()
    await other.open()
    assert h.be.store_id is not None
    assert other.store_id == h.be.store_id
    assert isinstance(h.be, RedisBackend)
    key = (h.be.keys[0] if isinstance(h.be, ClusterBackend) else h.be.key) + "store"
    client = h.be._rc if isinstance(h.be, ClusterBackend) else h.be._redis
    await client.delete(key)
    late = h._new()
    await late.open()
    assert late.store_id not in (None, h.be.store_id)
    await h.be.expire()
    await other.expire()
    assert h.be.store_id == other.store_id == late.store_id
    await other.close()
    await late.close()


async def test_a_large_trim_goes_out_as_events_a_broker_takes(tmp_path: Path) -> None:
    """A restart with a lower --max-turns trims many turns at once: they go out as several
    trimmed events of at most 256 KiB of turns each (one event of 1.5 MB was over the
    broker's max_packet_size: not sent, deleted as if delivered, and its turns lost)."""
    h = Harness("sqlite", Limits(ttl=100, max_turns=40, trimmed_events=True), tmp_path, Clock())
    await h.be.open()
    for i in range(40):
        await add(h, "c", f"{i:02}" + "x" * 40_000)
    await h.reopen(Limits(ttl=100, max_turns=1, trimmed_events=True))
    events = [e for e in h.be.held_events() if isinstance(e, Trimmed)]
    assert all(len(e.turns) <= 256 * 1024 for e in events)
    assert len(events) > 1
    seqs = [t["seq"] for e in events for t in Turns(e.count, e.turns).decoded()]
    assert seqs == list(range(1, 40))
    await h.be.close()


async def test_lru_order_survives_restart_with_ttl_off(tmp_path: Path) -> None:
    """With --ttl 0 a get still counts as a use, and that order is what a restart keeps."""
    h = Harness("sqlite", Limits(ttl=0), tmp_path, Clock())
    await h.be.open()
    for name in "abc":
        await add(h, name)
    await turns(h, "a")
    await h.reopen(Limits(ttl=0, max_conversations=2))
    h.connected()
    assert h.take() == [("b", "lru", 1, 0)]
    await h.be.close()


async def test_next_expiry_tells_the_sweep_how_long_it_may_sleep(make: Make) -> None:
    """next_expiry() is never past the next deadline, and is forever when nothing can expire."""
    h = await make(ttl=10)
    await h.expire()  # Redis reads its earliest deadline on a sweep
    if h.kind not in ("redis", "cluster"):  # Redis polls for deadlines other workers set
        assert h.be.next_expiry() == math.inf
    await add(h, "a")
    await h.expire()
    assert 0 < h.be.next_expiry() <= 10
    h.clock.now += 10
    assert h.be.next_expiry() <= 0
    await h.expire()
    assert h.take() == [("a", "ttl", 1, 0)]


async def test_an_sqlite_file_of_unpacked_turns_still_loads(tmp_path: Path) -> None:
    """A file written before turns were packed (each turn the map a get returns) loads with
    the same turns, and is written packed from then on."""
    h = Harness("sqlite", Limits(ttl=0), tmp_path, Clock())
    await h.be.open()
    for content in ("one", "two", "three"):
        await add(h, "a", content, role="assistant" if content == "two" else "user")
    before = await turns(h, "a")
    await h.be.close()
    db = sqlite3.connect(tmp_path / "memory.db")
    with db:
        (blob,) = db.execute("SELECT turns FROM convos WHERE name = 'a'").fetchone()
        maps = []
        for t in msgpack.unpackb(blob):
            old = msgpack.unpackb(expand_turns(t)[0])
            del old["tokens"]
            maps.append(msgpack.packb(old))
        db.execute("UPDATE convos SET turns = ? WHERE name = 'a'", (msgpack.packb(maps),))
        db.execute("ALTER TABLE convos DROP COLUMN summary")
        db.execute("ALTER TABLE convos DROP COLUMN born")
    db.close()
    await h.reopen()
    assert await turns(h, "a") == before
    await add(h, "a", "four")
    assert [t["content"] for t in await turns(h, "a")] == ["one", "two", "three", "four"]
    await h.be.close()


# --- tokens, budgets and summaries ------------------------------------------------------------


async def window(h: Harness, convo: str, **kw: Any) -> Turns:
    result = await h.ok(Get(convo, **kw))
    assert isinstance(result, Turns)
    return result


async def summarize(h: Harness, convo: str, text: str, upto: int, base: int, **kw: Any) -> Any:
    return await h.run(Summary(convo, text, upto, base, **kw))


async def test_turns_carry_their_tokens_said_or_estimated(make: Make) -> None:
    """A turn keeps the tokens its append said, or ceil(UTF-8 bytes / 4); get totals them."""
    h = await make()
    await add(h, "c", "x" * 9, tokens=2)
    await add(h, "c", "é" * 5)  # 10 bytes: 3 tokens
    await add(h, "c", "", tokens=0)
    got = await window(h, "c")
    assert [t["tokens"] for t in got.decoded()] == [2, 3, 0]
    assert got.tokens == 5
    assert got.summary is None


async def test_max_tokens_returns_the_newest_whole_turns_that_fit(make: Make) -> None:
    """The budget takes whole turns from the newest back and stops at the first that does not
    fit; with last, both limits apply; a turn bigger than the budget returns nothing."""
    h = await make(max_turns=10)
    for i, tokens in enumerate([5, 1, 4, 3]):
        await add(h, "c", f"m{i}", tokens=tokens)
    got = await window(h, "c", max_tokens=7)
    assert [t["content"] for t in got.decoded()] == ["m2", "m3"]
    assert (got.count, got.tokens) == (2, 7)
    assert [t["content"] for t in (await window(h, "c", max_tokens=8)).decoded()] == [
        "m1",
        "m2",
        "m3",
    ]
    assert [t["content"] for t in (await window(h, "c", max_tokens=100, last=1)).decoded()] == [
        "m3"
    ]
    nothing = await window(h, "c", max_tokens=2)
    assert (nothing.count, nothing.tokens, nothing.decoded()) == (0, 0, [])


async def test_a_summary_replaces_the_turns_it_covers(make: Make) -> None:
    """A saved summary removes the turns with seq <= upto, and get returns it before the rest."""
    h = await make(max_turns=10)
    for i in range(5):
        await add(h, "c", f"m{i}", tokens=10)
    saved = await summarize(h, "c", "the first three", 3, 0, tokens=4)
    assert isinstance(saved, Fields)
    assert saved.fields == {"upto": 3, "dropped": 3}
    got = await window(h, "c")
    assert [t["seq"] for t in got.decoded()] == [4, 5]
    assert got.summary == ("the first three", 3, 4)
    assert got.tokens == 24
    assert (await window(h, "c", summary=False)).summary is None
    assert h.counts.turns == 2


async def test_the_summary_counts_first_against_max_tokens(make: Make) -> None:
    """The summary's tokens come off the budget first; alone over it, it comes without turns."""
    h = await make(max_turns=10)
    for _ in range(4):
        await add(h, "c", "x", tokens=10)
    await h.ok(Summary("c", "s", 1, 0, tokens=15))
    got = await window(h, "c", max_tokens=35)
    assert [t["seq"] for t in got.decoded()] == [3, 4]
    assert got.tokens == 35
    alone = await window(h, "c", max_tokens=14)
    assert (alone.count, alone.summary, alone.tokens) == (0, ("s", 1, 15), 15)
    unsummarized = await window(h, "c", max_tokens=14, summary=False)
    assert [t["seq"] for t in unsummarized.decoded()] == [4]


async def test_summary_compare_and_set_refuses_with_conflict(make: Make) -> None:
    """A stale base, an upto out of range or a conversation that is not live is a conflict
    carrying the current upto and newest seq; nothing changes."""
    h = await make(max_turns=10)
    for _ in range(4):
        await add(h, "c")
    await h.ok(Summary("c", "one", 2, 0))
    for base, upto in ((0, 3), (1, 3), (2, 2), (2, 5)):
        refused = await summarize(h, "c", "two", upto, base)
        assert isinstance(refused, Conflict)
        assert (refused.upto, refused.seq) == (2, 4)
    assert refused.message == (  # every engine says it alike
        "'upto' must be between 3 and 4 (after the summary's upto, up to the newest turn), not 5"
    )
    far = await summarize(h, "c", "two", 10**17, 2)
    assert isinstance(far, Conflict)
    assert far.message.endswith(", not 100000000000000000")  # Lua said 1e+17
    stale = await summarize(h, "c", "two", 3, 2**64 - 1)
    assert isinstance(stale, Conflict)
    assert stale.message == "the summary's upto is 2, not base 18446744073709551615"
    gone = await summarize(h, "nobody", "x", 1, 0)
    assert isinstance(gone, Conflict)
    assert (gone.upto, gone.seq) == (0, 0)
    assert await turns(h, "nobody") == []
    assert (await h.ok(Summary("c", "two", 4, 2))).fields == {"upto": 4, "dropped": 2}
    covered = await summarize(h, "c", "three", 5, 4)  # it said "between 5 and 4"
    assert isinstance(covered, Conflict)
    assert covered.message == "nothing to summarize: the summary covers every turn (upto 4)"
    got = await window(h, "c")
    assert (got.count, got.summary) == (0, ("two", 4, 1))


async def test_the_summary_counts_in_the_budget_and_goes_with_the_conversation(
    make: Make,
) -> None:
    """A summary costs its text plus the turn overhead; one that could never fit is too_large;
    delete removes it, and the next append starts a conversation without one."""
    h = await make(max_bytes=60, max_turns=10, turn_cost=5)
    for _ in range(3):
        await add(h, "c", "x" * 5, role="r")  # 1 + 11 each
    assert isinstance(await summarize(h, "c", "y" * 60, 1, 0), TooLarge)
    await h.ok(Summary("c", "y" * 20, 1, 0))
    assert h.counts.bytes == 1 + 2 * 11 + 25
    await h.ok(Delete("c"))
    assert h.take() == [("c", "deleted", 2, 0)]
    await add(h, "c")
    assert (await window(h, "c")).summary is None
    assert h.counts.bytes == 1 + len("user") + 1 + 5


async def test_a_summary_keeps_the_newest_turn_it_does_not_cover(make: Make) -> None:
    """Without trimmed events, a summary whose room would take the newest turn, which it does
    not cover, is too_large, naming it (the turn was lost, unannounced: a review); one that
    fits beside it trims older uncovered turns, never the newest."""
    h = await make(max_bytes=60, max_turns=10, turn_cost=5)
    for i in range(3):
        await add(h, "c", f"x{i}" * 2 + "x", role="r")  # 1 + 11 each
    refused = await summarize(h, "c", "y" * 50, 1, 0)  # 1 + 55 + 11 > 60
    assert isinstance(refused, TooLarge)
    assert refused.message.endswith(
        "does not fit in --max-bytes 60 beside the newest turn, which it does not cover (11 bytes)"
    )
    assert [t["seq"] for t in await turns(h, "c")] == [1, 2, 3]
    assert (await h.ok(Summary("c", "y" * 40, 1, 0))).fields == {"upto": 1, "dropped": 1}
    assert [t["seq"] for t in await turns(h, "c")] == [3]
    assert h.counts.bytes == 1 + 45 + 11
    await h.ok(Summary("c", "y" * 54, 3, 1))  # covering the newest too: all its room
    assert await turns(h, "c") == []
    assert h.counts.bytes == 60


async def test_with_trimmed_events_a_summary_may_take_every_turn_it_does_not_cover(
    make: Make,
) -> None:
    """With trimmed events the turns a summary's room takes are announced, the newest too,
    for a summarizer to fold: refused, a summary that could not fit beside the newest turn
    was refused for ever, and memory-summarizer asked its model again and again (a review)."""
    h = await make(max_bytes=60, max_turns=10, turn_cost=5, trimmed_events=True)
    for i in range(3):
        await add(h, "c", f"x{i}" * 2 + "x", role="r")
    assert (await h.ok(Summary("c", "y" * 50, 1, 0))).fields == {"upto": 1, "dropped": 1}
    assert await turns(h, "c") == []
    assert h.trimmed == [("c", [2, 3], 1)]
    assert h.counts.bytes == 1 + 55


async def test_trimmed_events_announce_every_uncovered_turn_once(make: Make) -> None:
    """With trimmed_events each turn that leaves the window (max_turns or the conversation's
    own budget) is announced once with the summary's upto; covered turns and evictions not."""
    h = await make(max_turns=2, max_bytes=40, trimmed_events=True)
    for i in range(4):
        await add(h, "c", f"m{i}")
    assert h.trimmed == [("c", [1], 0), ("c", [2], 0)]
    await h.ok(Summary("c", "s", 3, 0))
    await add(h, "c", "x" * 30)  # the budget pushes out turn 4
    assert h.trimmed[2:] == [("c", [4], 3)]
    await h.ok(Delete("c"))
    assert len(h.trimmed) == 3
    quiet = await make(max_turns=1)
    await add(quiet, "c")
    await add(quiet, "c")
    assert quiet.trimmed == []


async def test_summary_survives_a_restart(durable: Harness) -> None:
    """A saved summary and the turns' tokens are there after a restart."""
    h = durable
    for i in range(4):
        await add(h, "c", f"m{i}", tokens=i)
    await h.ok(Summary("c", "early", 2, 0, tokens=9))
    before = await window(h, "c")
    await h.reopen()
    after = await window(h, "c")
    assert (after.summary, after.tokens, after.decoded()) == (
        before.summary,
        before.tokens,
        before.decoded(),
    )
    conflict = await summarize(h, "c", "again", 3, 0)
    assert isinstance(conflict, Conflict)
    assert conflict.upto == 2


async def test_a_summary_for_a_conversation_started_again_is_a_conflict(make: Make) -> None:
    """A trimmed event names the conversation's born; a summary carrying an older born is a
    conflict, so turns of a deleted conversation never cover those of the next one."""
    h = await make(max_turns=1, trimmed_events=True)
    await add(h, "c", "old")
    await add(h, "c", "old")
    (born,) = h.born
    assert born == int(h.clock.now * 1000)
    await h.ok(Delete("c"))
    h.clock.now += 1
    await add(h, "c", "new")
    refused = await summarize(h, "c", "old", 1, 0, born=born)
    assert isinstance(refused, Conflict)
    assert (refused.upto, refused.seq, refused.born) == (0, 1, born + 1000)
    assert [t["content"] for t in await turns(h, "c")] == ["new"]
    assert isinstance(await summarize(h, "c", "new", 1, 0, born=born + 1000), Fields)


async def test_an_id_is_remembered_per_operation(make: Make) -> None:
    """The same id on an append, a state save and a summary is three requests: each is
    applied once, and a repeat of each gets its own reply."""
    h = await make(max_turns=10)
    for _ in range(2):
        assert await add(h, "c", "x", id="same") == {"seq": 1, "count": 1}
        await save(h, "c", "k", 1, id="same")
    await add(h, "c", "y")
    for _ in range(2):
        saved = await h.ok(Summary("c", "s", 1, 0, id="same"))
        assert saved.fields == {"upto": 1, "dropped": 1}
    assert [t["content"] for t in await turns(h, "c")] == ["y"]


async def test_born_is_unique_within_one_millisecond(make: Make) -> None:
    """A conversation deleted and started again at the same instant gets another born, so a
    summary meant for the first cannot apply to the second."""
    h = await make(max_turns=1, trimmed_events=True)
    await add(h, "c", "a")
    await add(h, "c", "b")
    (born,) = h.born
    await h.ok(Delete("c"))
    await add(h, "c", "a")
    refused = await summarize(h, "c", "old", 1, 0, born=born)
    assert isinstance(refused, Conflict)
    assert refused.born == born + 1


# --- listing ------------------------------------------------------------------------------


async def page(
    h: Harness, limit: int = 100, cursor: str | None = None, prefix: str = ""
) -> tuple[list[dict[str, Any]], str | None]:
    after = "" if cursor is None else decode_cursor(cursor)
    result = await h.ok(ListConvos(limit, after, prefix))
    assert isinstance(result, Fields)
    return result.fields["conversations"], result.fields["cursor"]


async def listing(h: Harness, limit: int = 100, prefix: str = "") -> list[str]:
    """Every id a full listing returns, page after page, in order."""
    ids: list[str] = []
    cursor = None
    while True:
        entries, cursor = await page(h, limit, cursor, prefix)
        ids += [e["convo"] for e in entries]
        if cursor is None:
            return ids


async def namespaces(h: Harness, convo: str) -> list[str]:
    result = await h.ok(StateNamespaces(convo))
    assert isinstance(result, Fields)
    return list(result.fields["namespaces"])


async def test_list_pages_through_every_conversation_in_id_order(make: Make) -> None:
    """Pages of `limit` in UTF-8 byte order, each id once; the last page's cursor is nil."""
    h = await make()
    names = [f"c{i:02}" for i in range(23)] + ["é", "z", "a/b".replace("/", "-")]
    for name in reversed(names):
        await add(h, name)
    first, cursor = await page(h, 10)
    assert len(first) == 10
    assert cursor is not None
    assert await listing(h, 10) == sorted(names, key=str.encode)
    assert await listing(h, 1000) == sorted(names, key=str.encode)
    assert await page(await make(), 5) == ([], None)


async def test_list_entries_say_size_use_expiry_summary_and_tokens(make: Make) -> None:
    """Each entry: turns, live keys, last use and expiry (Unix s), the summary's upto, tokens."""
    h = await make(ttl=50)
    await add(h, "c", "a", tokens=3)
    await add(h, "c", "b", tokens=4)
    await add(h, "c", "c", tokens=5)
    await save(h, "c", "k", 1)
    h.clock.now += 7
    await h.ok(Summary("c", "gist", 1, 0, tokens=2))
    await add(h, "d")
    assert (await page(h))[0] == [
        {
            "convo": "c",
            "turns": 2,
            "keys": 1,
            "last_used": 1007.0,
            "expires_at": 1057.0,
            "upto": 1,
            "tokens": 2 + 4 + 5,
        },
        {
            "convo": "d",
            "turns": 1,
            "keys": 0,
            "last_used": 1007.0,
            "expires_at": 1057.0,
            "upto": 0,
            "tokens": 1,
        },
    ]
    forever = await make(ttl=0)
    await add(forever, "c")
    assert (await page(forever))[0][0]["expires_at"] is None


async def test_list_by_prefix(make: Make) -> None:
    """Only ids that start with the prefix, paged the same way."""
    h = await make()
    for name in ["kiosk-1", "kiosk-2", "kiosk", "kiosk-10", "kiosj", "kiosl", "box-1"]:
        await add(h, name)
    assert await listing(h, 2, "kiosk") == ["kiosk", "kiosk-1", "kiosk-10", "kiosk-2"]
    assert await listing(h, 100, "kiosk-1") == ["kiosk-1", "kiosk-10"]
    assert await listing(h, 100, "nobody") == []
    assert await listing(h, 3, "") == sorted(
        ["kiosk-1", "kiosk-2", "kiosk", "kiosk-10", "kiosj", "kiosl", "box-1"]
    )


async def test_list_is_not_a_use(make: Make) -> None:
    """Listing refreshes no TTL and moves nothing in the LRU order."""
    h = await make(ttl=10, max_conversations=2)
    await add(h, "old")
    h.clock.now += 6
    await add(h, "new")
    assert await listing(h) == ["new", "old"]
    await add(h, "third")  # the least recently used goes, however recently it was listed
    assert h.take() == [("old", "lru", 1, 0)]
    h.clock.now += 5  # "new" was last used 5 s ago... and listed just before
    await listing(h)
    h.clock.now += 5
    await h.expire()
    assert ("new", "ttl", 1, 0) in h.take()


async def test_list_leaves_out_expired_conversations(make: Make) -> None:
    """A conversation past its TTL is not listed, swept or not."""
    h = await make(ttl=10)
    await add(h, "a")
    h.clock.now += 5
    await add(h, "b")
    h.clock.now += 5
    assert await listing(h) == ["b"]
    assert await listing(h, 1) == ["b"]


async def test_a_conversation_live_throughout_a_listing_is_returned(make: Make) -> None:
    """The SCAN guarantee: live during the whole listing means listed, at least once."""
    h = await make(max_conversations=1000)
    stay = [f"s{i:03}" for i in range(0, 60, 2)]
    for name in stay:
        await add(h, name)
    seen: list[str] = []
    cursor = None
    n = 0
    while True:
        entries, cursor = await page(h, 7, cursor)
        seen += [e["convo"] for e in entries]
        n += 1
        await add(h, f"s{n * 7:03}x")  # created meanwhile: may or may not be listed
        await add(h, f"a{n}")  # before the cursor: not listed
        if cursor is None:
            break
    assert set(stay) <= set(seen)
    assert len(seen) == len(set(seen))


async def test_namespaces_with_live_keys(make: Make) -> None:
    """state/namespaces lists the namespaces holding live keys, and is not a use."""
    h = await make(ttl=10, max_conversations=2)
    assert await namespaces(h, "c") == []
    await save(h, "c", "k", 1, ns="prefs")
    await save(h, "c", "k", 1, ns="cart", ttl=3)
    await save(h, "c", "k", 1, ns="ab")
    await h.ok(StateDelete("c", "ab", "k"))
    assert await namespaces(h, "c") == ["cart", "prefs"]
    h.clock.now += 3
    assert await namespaces(h, "c") == ["prefs"]
    await add(h, "d")
    await namespaces(h, "c")
    await add(h, "e")  # "c" is still the least recently used
    assert [e[:2] for e in h.take()] == [("c", "lru")]


async def test_listing_survives_a_restart(durable: Harness) -> None:
    """After a restart the same conversations are listed, with their last use."""
    h = durable
    await add(h, "b")
    h.clock.now += 3
    await add(h, "a")
    before = await page(h)
    await h.reopen()
    assert await page(h) == before


async def test_redis_data_stored_before_listing_is_indexed_on_open(
    redis_url: str, tmp_path: Path
) -> None:
    """Conversations a Redis holds from before listing existed (no index) are listed after
    the next worker opens it."""
    h = Harness("redis", Limits(), tmp_path, Clock(), redis_url)
    await h.be.open()
    try:
        for name in ("b", "a", "c"):
            await add(h, name)
        async with redis.asyncio.from_url(redis_url) as r:
            assert await r.delete(f"mw:{{{h.prefix}}}:ix") == 1
        assert await listing(h) == []
        await h.reopen()
        assert await listing(h) == ["a", "b", "c"]
    finally:
        await h.be.close()


async def test_redis_ids_remembered_before_they_were_counted_still_answer(
    redis_url: str, tmp_path: Path
) -> None:
    """Ids a Redis holds from before they counted in --max-bytes answer their repeats and,
    forgotten, give back nothing they did not take."""
    limits = Limits(max_ids=2, convo_cost=0, id_byte_cost=0, turn_cost=0, id_cost=100)
    h = Harness("redis", limits, tmp_path, Clock(), redis_url)
    await h.be.open()
    try:
        first = await add(h, "c", "x", role="r", id="old")
        async with redis.asyncio.from_url(redis_url) as r:  # as the earlier version left it
            key = f"mw:{{{h.prefix}}}:"
            ((old_id, value),) = (await r.hgetall(f"{key}i:c")).items()
            assert isinstance(value, bytes)
            await r.hset(f"{key}i:c", old_id, value.split(b"\0")[0])
            await r.hset(f"{key}m:c", mapping={"nbytes": 2, "ibytes": 0})
            await r.set(f"{key}bytes", 2)
        assert await add(h, "c", "x", role="r", id="old") == first
        await add(h, "c", "x", role="r", id="new1")
        await add(h, "c", "x", role="r", id="new2")  # forgets "old", which cost nothing
        assert h.counts.bytes == 3 * 2 + 2 * 100
    finally:
        await h.be.close()


async def test_redis_a_grave_whose_ids_went_is_no_error(redis_url: str, tmp_path: Path) -> None:
    """Ids Redis dropped from outside (maxmemory, a DEL) while the grave was listed: the
    conversation starts again without them (every append to it failed on a RENAME)."""
    h = Harness("redis", Limits(), tmp_path, Clock(), redis_url)
    await h.be.open()
    try:
        await add(h, "c", "x", id="a1")
        await h.ok(Delete("c", "d1"))
        async with redis.asyncio.from_url(redis_url) as r:
            await r.delete(f"mw:{{{h.prefix}}}:gi:c", f"mw:{{{h.prefix}}}:gil:c")
        assert await add(h, "c", "x", id="a2") == {"seq": 1, "count": 1}
        assert await add(h, "c", "x", id="a1") == {"seq": 2, "count": 2}  # went with them
        assert await add(h, "c", "x", id="a2") == {"seq": 1, "count": 1}
    finally:
        await h.be.close()


async def test_sqlite_writes_only_the_state_keys_that_change(tmp_path: Path) -> None:
    """An append writes a conversation's turns, not its state, and a save its one key: the
    state was one column of the conversation's row, and SQLite writes a row whole, so an
    append to a conversation holding 15 MB of state wrote it all (another device's get took
    100 ms)."""
    h = Harness("sqlite", Limits(), tmp_path, Clock())
    await h.be.open()
    db = sqlite3.connect(tmp_path / "memory.db")
    try:
        await save(h, "c", "k", "v" * 1000)
        db.executescript(
            "CREATE TABLE written(what TEXT);"
            "CREATE TRIGGER s AFTER UPDATE OF state ON convos"
            " BEGIN INSERT INTO written VALUES ('state'); END;"
            "CREATE TRIGGER i AFTER INSERT ON keys BEGIN INSERT INTO written VALUES (new.key); END;"
            "CREATE TRIGGER u AFTER UPDATE ON keys BEGIN INSERT INTO written VALUES (new.key); END;"
        )
        await add(h, "c", "hi")
        await save(h, "c", "k2", 1)
        await add(h, "c", "again")
        await h.ok(StateDelete("c", "n", "k2"))
        assert [what for (what,) in db.execute("SELECT what FROM written")] == ["k2"]
        await h.reopen()
        assert await get_all(h, "c") == {"k": "v" * 1000}
        assert [t["content"] for t in await turns(h, "c")] == ["hi", "again"]
    finally:
        db.close()
        await h.be.close()


async def test_an_sqlite_file_of_state_in_one_column_still_loads(tmp_path: Path) -> None:
    """A file written when a conversation's state was one column of its row loads with the
    same keys and their TTLs, moved to a row each."""
    clock = Clock()
    h = Harness("sqlite", Limits(ttl=0), tmp_path, clock)
    await h.be.open()
    await add(h, "c", "hi")
    await save(h, "c", "k", {"deep": [1]})
    await save(h, "c", "brief", 2, ttl=50)
    await h.be.close()
    db = sqlite3.connect(tmp_path / "memory.db")
    with db:
        rows = db.execute("SELECT ns, key, value, deadline FROM keys WHERE name = 'c'").fetchall()
        state: dict[str, Any] = {}
        for ns, key, value, deadline in rows:
            state.setdefault(ns, {})[key] = [value, deadline]
        db.execute("UPDATE convos SET state = ? WHERE name = 'c'", (msgpack.packb(state),))
        db.execute("DROP TABLE keys")
    db.close()
    await h.reopen()
    assert await get_all(h, "c") == {"k": {"deep": [1]}, "brief": 2}
    clock.now += 60
    assert await get_all(h, "c") == {"k": {"deep": [1]}}
    await save(h, "c", "k3", 3)
    await h.reopen()
    assert await get_all(h, "c") == {"k": {"deep": [1]}, "k3": 3}
    await h.be.close()


def _as_before(path: Path) -> None:
    """Make the file's conversations and graves WITHOUT ROWID tables, as files of before."""
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        for table in ("convos", "graves"):
            (sql,) = db.execute("SELECT sql FROM sqlite_master WHERE name = ?", (table,)).fetchone()
            db.execute(f"ALTER TABLE {table} RENAME TO old")
            db.execute(sql.removesuffix(" WITHOUT ROWID") + " WITHOUT ROWID")
            db.execute(f"INSERT INTO {table} SELECT * FROM old")
            db.execute("DROP TABLE old")


def _without_rowid(path: Path) -> set[str]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return {
            name
            for name, sql in db.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table'")
            if sql.upper().endswith("WITHOUT ROWID")
        }


async def test_an_sqlite_file_of_without_rowid_tables_is_rebuilt_with_everything(
    tmp_path: Path,
) -> None:
    """Files of before kept conversations and graves in WITHOUT ROWID tables (a commit took
    twice as long with windows of a kilobyte): opened, they are rowid tables holding every
    row as it was, and the worker goes on from them."""
    clock = Clock()
    h = Harness("sqlite", Limits(ttl=0, max_conversations=2), tmp_path, clock)
    await h.be.open()
    for convo in ("a", "b"):
        await add(h, convo, "hi " + convo, id=convo + "1")
        await add(h, convo, "again " + convo, role="assistant", id=convo + "2")
    await save(h, "a", "k", {"deep": [1]})
    await add(h, "c", "third, and b is evicted", id="c1")  # b's ids stay: a grave
    before = {convo: await turns(h, convo) for convo in ("a", "c")}
    await h.be.close()
    _as_before(tmp_path / "memory.db")
    db = sqlite3.connect(tmp_path / "memory.db")
    with db:
        assert db.execute("SELECT count(*) FROM graves").fetchone() == (1,)
        rows = sorted(db.execute("SELECT * FROM convos"))
    db.close()
    await h.reopen()
    assert _without_rowid(tmp_path / "memory.db") == set()
    db = sqlite3.connect(tmp_path / "memory.db")
    try:
        assert sorted(db.execute("SELECT * FROM convos")) == rows
        assert db.execute("SELECT name FROM graves").fetchall() == [("b",)]
    finally:
        db.close()
    assert {convo: await turns(h, convo) for convo in ("a", "c")} == before
    assert await get_all(h, "a") == {"k": {"deep": [1]}}
    await add(h, "a", "more")
    await h.reopen()
    assert [t["content"] for t in await turns(h, "a")] == ["hi a", "again a", "more"]
    await h.be.close()


@pytest.mark.parametrize(
    ("setup", "kept", "why"),
    [
        ("CREATE VIEW recent AS SELECT name, used FROM convos", {"convos"}, "view recent"),
        ("CREATE INDEX by_use ON convos(used)", {"convos"}, "index by_use would be lost"),
        ("CREATE TABLE rebuilt (x)", {"convos", "graves"}, "SQLite refused it"),
        ("ALTER TABLE graves RENAME TO g2; ALTER TABLE g2 RENAME TO graves", set(), ""),
    ],
    ids=["a-view", "an-index", "refused", "a-quoted-name"],
)
async def test_a_table_the_rebuild_would_harm_is_kept_as_it_is(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, setup: str, kept: set[str], why: str
) -> None:
    """The rebuild is only a speed-up: a view or an index of the user's on the table (a DROP
    took them, a view stopped every start), or SQLite refusing it, keeps the table as it
    is, and the worker opens and serves (a review); a name stored quoted is rebuilt too."""
    h = Harness("sqlite", Limits(ttl=0), tmp_path, Clock())
    await h.be.open()
    await add(h, "a", "hi")
    await h.be.close()
    path = tmp_path / "memory.db"
    _as_before(path)
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.executescript(setup)
    with caplog.at_level(logging.INFO, "memory_worker.sqlite"):
        await h.reopen()
    assert _without_rowid(path) == kept
    said = [r.getMessage() for r in caplog.records if "kept as it is" in r.getMessage()]
    assert len(said) == len(kept), said
    assert all(why in line for line in said), said
    await add(h, "a", "again")
    assert [t["content"] for t in await turns(h, "a")] == ["hi", "again"]
    await h.be.close()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A folder on a filesystem of 30 MiB of its own (a tmpfs: root only)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounts a tmpfs: root only")
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=30m", "tmpfs", str(small)], check=True)
    try:
        yield small
    finally:
        subprocess.run(["umount", "--lazy", str(small)], check=True)


async def test_a_rebuild_with_no_room_for_it_is_not_tried(
    small_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A rebuild goes through the WAL and into the file: on a disk without room for it, it
    filled the disk and the worker stopped for good, exit 2 at every start (a review). It
    is not tried, and the file is as it was."""
    h = Harness("sqlite", Limits(ttl=0, max_conversations=2000), small_disk, Clock())
    await h.be.open()
    try:
        await h.be.execute([Append(f"c{i}", "user", "x" * 1000) for i in range(1500)])
        await h.be.close()
        _as_before(small_disk / "memory.db")
        with caplog.at_level(logging.INFO, "memory_worker.sqlite"):
            await h.reopen()
        assert _without_rowid(small_disk / "memory.db") == {"convos", "graves"}
        said = [r.getMessage() for r in caplog.records if "kept as it is" in r.getMessage()]
        assert len(said) == 2, said
        assert all("MiB free beside the file" in line for line in said), said
        assert (await add(h, "c1", "served"))["count"] == 2
    finally:
        await h.be.close()


async def test_a_linked_file_is_judged_by_its_own_disk(
    small_disk: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SQLite keeps the WAL beside the file a link names: the room for a rebuild is
    measured there, not beside the link (the rebuild filled the file's disk, then rolled
    back, at every start: a review)."""
    h = Harness("sqlite", Limits(ttl=0, max_conversations=2000), small_disk, Clock())
    await h.be.open()
    await h.be.execute([Append(f"c{i}", "user", "x" * 1000) for i in range(1500)])
    await h.be.close()
    _as_before(small_disk / "memory.db")
    (tmp_path / "link.db").symlink_to(small_disk / "memory.db")
    linked = SqliteBackend(f"sqlite:///{tmp_path}/link.db", Limits(max_conversations=2000))
    try:
        with caplog.at_level(logging.INFO, "memory_worker.sqlite"):
            await linked.open()
        said = [r.getMessage() for r in caplog.records if "kept as it is" in r.getMessage()]
        assert len(said) == 2, said
        assert all("MiB free beside the file" in line for line in said), said
    finally:
        await linked.close()


async def test_a_second_worker_on_an_sqlite_file_is_refused(tmp_path: Path) -> None:
    """Two workers on one file would both number turns and lose each other's: the second
    is refused at open, naming the first's pid; once the first closes, it opens."""
    url = f"sqlite:///{tmp_path}/shared.db"
    first = SqliteBackend(url, Limits())
    await first.open()
    second = SqliteBackend(url, Limits())
    with pytest.raises(
        ConfigError, match=rf"in use by another memory-worker \(pid {os.getpid()}\)"
    ):
        await second.open()
    await second.close()
    await first.close()
    third = SqliteBackend(url, Limits())
    await third.open()
    await third.close()


async def test_the_sqlite_lock_holds_through_a_link(tmp_path: Path) -> None:
    """The lock is the file's, not the path's: a link to a file in use is refused too."""
    first = SqliteBackend(f"sqlite:///{tmp_path}/real.db", Limits())
    await first.open()
    (tmp_path / "link.db").symlink_to(tmp_path / "real.db")
    linked = SqliteBackend(f"sqlite:///{tmp_path}/link.db", Limits())
    with pytest.raises(ConfigError, match="in use by another memory-worker"):
        await linked.open()
    await linked.close()
    await first.close()


@pytest.mark.parametrize("kind", ["notes", "another schema"])
async def test_a_file_that_is_not_a_database_is_refused_and_left_closed(
    tmp_path: Path, kind: str
) -> None:
    """A file SQLite cannot read, or a database of another program's with a table of our
    name, is a ConfigError naming it, and nothing of the attempt stays open: not the file
    (its sqlite3 connection stayed open), not its lock."""
    path = tmp_path / "notes.db"
    if kind == "notes":
        path.write_bytes(b"these are notes, not a database\n" * 64)
        words = "file is not a database"
    else:
        with contextlib.closing(sqlite3.connect(path)) as other:
            other.execute("CREATE TABLE convos (name TEXT PRIMARY KEY, tick INTEGER)")
        words = "no such column"
    backend = SqliteBackend(f"sqlite:///{path}", Limits())
    with pytest.raises(ConfigError, match=rf"cannot open .*notes\.db: {words}"):
        await backend.open()
    open_files = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # listdir's own, closed by now
            open_files.add(os.readlink(f"/proc/self/fd/{fd}"))
    assert not {str(path), f"{path}.lock"} & open_files
    await backend.close()
