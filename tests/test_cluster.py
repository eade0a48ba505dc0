"""The redis+cluster:// backend on a real three-master Redis Cluster: spread, bounds, faults."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from tests.clients import decode, device, next_message, watcher
from tests.conftest import make_config, running, unique
from tests.processes import Mosquitto, RedisClusterServers, redis_server
from worker.backends.cluster import ClusterBackend, shard_of, shard_tag, share
from worker.errors import Unavailable
from worker.protocol import Append, Fields, Get, ListConvos, Turns, decode_cursor
from worker.store import Limits

pytestmark = pytest.mark.skipif(redis_server() is None, reason="redis-server is not installed")


def test_shard_tags_fall_in_their_own_slot_range() -> None:
    """Shard i's hash tag hashes into the i-th of S equal slot ranges."""
    for shards in (1, 3, 16, 64):
        width = REDIS_CLUSTER_HASH_SLOTS / shards
        for i in range(shards):
            assert int(key_slot(shard_tag("mem", i, shards).encode()) // width) == i


def test_shares_add_up_to_the_limit() -> None:
    """The shards' parts of a limit add up to exactly the limit."""
    for total in (16, 17, 300, 64 * 1024 * 1024 + 5):
        assert sum(share(total, i, 16) for i in range(16)) == total


def test_the_shard_of_a_conversation_is_stable() -> None:
    """crc32, not Python's salted hash: every worker and every run agree."""
    assert shard_of("kitchen", 16) == 4
    assert Counter(shard_of(f"c{i}", 16) for i in range(1600)).most_common(1)[0][1] < 140


@contextlib.asynccontextmanager
async def backend(url: str, **limits: Any) -> AsyncIterator[ClusterBackend]:
    be = ClusterBackend(url, Limits(**limits), prefix=unique("mem"))
    await be.open()
    try:
        yield be
    finally:
        await be.close()


async def cmd(r: redis.asyncio.Redis, *args: Any) -> Any:
    return await r.execute_command(*args)  # type: ignore[no-untyped-call]


async def slot_owners(cluster: RedisClusterServers, port: int) -> dict[int, int]:
    """Which port serves each slot, as the node on `port` sees it."""
    async with redis.asyncio.Redis(host="127.0.0.1", port=port) as r:
        ranges = await cmd(r, "CLUSTER SLOTS")
    owners = {}
    for low, high, master, *_ in ranges:
        for slot in range(int(low), int(high) + 1):
            owners[slot] = int(master[1])
    return owners


async def test_keys_are_on_every_master(redis_cluster: RedisClusterServers) -> None:
    """Conversations land on all three masters, not in one slot."""
    async with backend(redis_cluster.url) as be:
        results, _ = await be.execute([Append(f"c{i}", "u", "x") for i in range(200)])
        assert all(isinstance(r, Fields) for r in results)
        tag = be.keys[0].split("{")[1].split(":")[0]
        for port in redis_cluster.ports:
            async with redis.asyncio.Redis(host="127.0.0.1", port=port) as r:
                assert [k async for k in r.scan_iter(match=f"mw:{{{tag}:*", count=1000)], port
        assert be.counts().conversations == 200


async def test_bounds_hold_in_total_and_every_eviction_is_reported_once(
    redis_cluster: RedisClusterServers,
) -> None:
    """900 conversations under --max-conversations 300 over 16 shards: at most 300 kept,
    every other one evicted with exactly one event."""
    async with backend(redis_cluster.url, max_conversations=300, max_bytes=16 * 65536) as be:
        events: Counter[str] = Counter()
        for start in range(0, 900, 100):
            results, evictions = await be.execute(
                [Append(f"c{i}", "u", "x" * 500) for i in range(start, start + 100)]
            )
            assert all(isinstance(r, Fields) for r in results)
            events.update(e.convo for e in evictions)
            assert be.counts().conversations <= 300
            assert be.counts().bytes <= 16 * 65536
        results, _ = await be.execute([Get(f"c{i}") for i in range(900)])
        alive = {f"c{i}" for i, r in enumerate(results) if isinstance(r, Turns) and r.count}
    assert set(events.values()) == {1}
    assert len(alive) == be.counts().conversations <= 300
    assert alive | set(events) == {f"c{i}" for i in range(900)}
    assert not alive & set(events)


async def test_two_workers_in_a_share_group_keep_the_bound(
    broker: Mosquitto, redis_cluster: RedisClusterServers
) -> None:
    """Two workers, 900 conversations, --max-conversations 300: the bound holds, each
    eviction is announced once, and nothing disappears unannounced."""
    prefix, group = unique("mem"), unique("g")
    cfg = {"prefix": prefix, "backend": redis_cluster.url, "shared_group": group}
    async with (
        running(make_config(broker, max_conversations=300, **cfg)) as w1,
        running(make_config(broker, max_conversations=300, **cfg)) as w2,
        watcher(broker.host, broker.port, f"{prefix}/+/evicted") as events,
        contextlib.AsyncExitStack() as stack,
    ):
        devs = [
            await stack.enter_async_context(device(broker.host, broker.port, prefix))
            for _ in range(6)
        ]

        async def talk(k: int) -> None:
            for i in range(k, 900, 6):
                reply = await devs[k].request(f"c{i}", "append", {"role": "u", "content": "x"})
                assert reply["ok"], reply

        await asyncio.gather(*(talk(k) for k in range(6)))
        alive: set[str] = set()

        async def look(k: int) -> None:
            for i in range(k, 900, 6):
                if (await devs[k].request(f"c{i}", "get"))["turns"]:
                    alive.add(f"c{i}")

        await asyncio.gather(*(look(k) for k in range(6)))
        announced: Counter[str] = Counter()
        while len(announced) < 900 - len(alive):
            ev = decode(await next_message(events))
            assert ev["reason"] == "lru", ev
            announced[ev["convo"]] += 1
        # Each worker's events reach us in the order it sent them: once both have announced
        # a sentinel's deletion, any duplicate sent before would have arrived.
        sentinels = [f"s{i}" for i in range(20)]
        for s in sentinels:
            await devs[0].request(s, "append", {"role": "u", "content": "x"})
            await devs[0].request(s, "delete")
        deleted = 0
        while deleted < len(sentinels):
            ev = decode(await next_message(events))
            if ev["reason"] == "deleted":
                deleted += 1
            else:
                announced[ev["convo"]] += 1
        assert w1.stats.requests
        assert w2.stats.requests
    assert len(alive) <= 300
    assert set(announced.values()) == {1}
    assert set(announced) | alive == {f"c{i}" for i in range(900)}


async def test_a_stopped_master_fails_only_its_shards(tmp_path: Path) -> None:
    """Its shards answer `unavailable`, the others are served, and a listing is `unavailable`
    (never a page silently short); once it is back, all are, with what it stored (AOF)."""
    cluster = RedisClusterServers(tmp_path).start()
    try:
        async with backend(cluster.url) as be:
            convos: dict[int, str] = {}
            i = 0
            while len(convos) < be.shards:  # one conversation per shard
                convos.setdefault(shard_of(f"c{i}", be.shards), f"c{i}")
                i += 1
            names = [convos[s] for s in range(be.shards)]
            results, _ = await be.execute([Append(n, "u", "x") for n in names])
            assert all(isinstance(r, Fields) for r in results)
            owners = await slot_owners(cluster, cluster.ports[0])
            stopped = cluster.ports[1]
            on_stopped = {
                n for s, n in enumerate(names) if owners[key_slot(be.keys[s].encode())] == stopped
            }
            assert on_stopped
            assert len(on_stopped) < len(names)
            cluster.stop_node(1)
            t0 = asyncio.get_running_loop().time()
            results, _ = await be.execute([Append(n, "u", "y") for n in names])
            took = asyncio.get_running_loop().time() - t0
            failed = {n for n, r in zip(names, results, strict=True) if isinstance(r, Unavailable)}
            assert failed == on_stopped, took
            assert all(r.fields["seq"] == 2 for r in results if isinstance(r, Fields))
            (listed,), _ = await be.execute([ListConvos()])
            assert isinstance(listed, Unavailable)
            cluster.start_node(1)
            await asyncio.to_thread(cluster.wait_ok)
            while True:  # the client reconnects by itself; no new backend
                results, _ = await be.execute([Append(n, "u", "z") for n in names])
                if not any(isinstance(r, Unavailable) for r in results):
                    break
            seqs = {
                n: r.fields["seq"] if isinstance(r, Fields) else r
                for n, r in zip(names, results, strict=True)
            }
            assert all(seqs[n] == (2 if n in on_stopped else 3) for n in names), seqs
            (listed,), _ = await be.execute([ListConvos()])
            assert isinstance(listed, Fields)
            assert [e["convo"] for e in listed.fields["conversations"]] == sorted(names)
    finally:
        cluster.stop()


async def test_moved_slots_are_followed(tmp_path: Path) -> None:
    """A shard's slot migrated to another master (keys and all) is found there: MOVED and
    ASK are followed, not reported."""
    cluster = RedisClusterServers(tmp_path).start()
    try:
        async with backend(cluster.url) as be:
            name = "c0"
            shard = shard_of(name, be.shards)
            await be.execute([Append(name, "u", "x")])
            slot = key_slot(be.keys[shard].encode())
            owners = await slot_owners(cluster, cluster.ports[0])
            src = owners[slot]
            dst = next(p for p in cluster.ports if p != src)
            await migrate(src, dst, slot)
            results, _ = await be.execute([Append(name, "u", "y"), Get(name)])
            assert isinstance(results[0], Fields)
            assert results[0].fields["seq"] == 2
            assert isinstance(results[1], Turns)
            assert results[1].count == 2
    finally:
        cluster.stop()


async def migrate(src: int, dst: int, slot: int) -> None:
    """Move `slot` with its keys from the master on `src` to the one on `dst`."""
    async with (
        redis.asyncio.Redis(host="127.0.0.1", port=src) as s,
        redis.asyncio.Redis(host="127.0.0.1", port=dst) as d,
    ):
        src_id = (await cmd(s, "CLUSTER MYID")).decode()
        dst_id = (await cmd(d, "CLUSTER MYID")).decode()
        await cmd(d, "CLUSTER SETSLOT", slot, "IMPORTING", src_id)
        await cmd(s, "CLUSTER SETSLOT", slot, "MIGRATING", dst_id)
        while keys := await cmd(s, "CLUSTER GETKEYSINSLOT", slot, 100):
            await cmd(s, "MIGRATE", "127.0.0.1", dst, "", 0, 5000, "KEYS", *keys)
        for r in (d, s):
            await cmd(r, "CLUSTER SETSLOT", slot, "NODE", dst_id)


async def test_listing_spans_every_master_in_id_order(redis_cluster: RedisClusterServers) -> None:
    """A listing merges all 16 shards (on three masters): every id once, in order, in pages."""
    names = [f"c{i:03}" for i in range(150)]
    async with backend(redis_cluster.url, max_conversations=10_000) as be:
        await be.execute([Append(n, "u", "x") for n in names])
        seen, after = [], ""
        while True:
            (result,), _ = await be.execute([ListConvos(limit=11, after=after, prefix="c0")])
            assert isinstance(result, Fields)
            assert len(result.fields["conversations"]) <= 11
            seen += [e["convo"] for e in result.fields["conversations"]]
            if result.fields["cursor"] is None:
                break
            after = decode_cursor(result.fields["cursor"])
    assert seen == names[:100]
