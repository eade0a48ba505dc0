"""The redis+cluster:// backend on a real three-master Redis Cluster: spread, bounds, faults."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from tests.clients import decode, device, next_message, watcher
from tests.conftest import make_config, running, unique
from tests.processes import (
    Mosquitto,
    RedisClusterServers,
    cluster_port,
    free_port,
    redis_server,
    wait_port,
)
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


async def test_a_stopped_master_fails_only_its_shards(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Its shards answer `unavailable`, the others are served, and a listing is `unavailable`
    (never a page silently short); once it is back, all are, with what it stored (AOF). The
    log says so in one line each way, naming the shards (it was a line per shard)."""
    caplog.set_level(logging.INFO, logger="memory_worker.cluster")
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
            down = sorted(s for s, n in enumerate(names) if n in on_stopped)
            said = [r.getMessage() for r in caplog.records if "shards" in r.getMessage()]
            assert len(said) == 2, said
            assert f"shards {down} unavailable" in said[0]
            assert said[1] == f"redis cluster shards {down} answer again"
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


def _one_master(workdir: Path, port: int, announce: int) -> subprocess.Popen[bytes]:
    """A one-master Redis Cluster on `port` that tells clients to reach it on `announce`."""
    exe = redis_server()
    assert exe is not None
    node = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
         "--cluster-announce-ip", "127.0.0.1", "--cluster-announce-port", str(announce),
         "--cluster-config-file", "nodes.conf", "--save", "", "--appendonly", "no",
         "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    wait_port(port, proc=node)
    cli = [shutil.which("redis-cli") or "/usr/bin/redis-cli", "-p", str(port)]
    subprocess.run([*cli, "cluster", "addslotsrange", "0", "16383"], check=True)
    deadline = time.monotonic() + 30
    while "cluster_state:ok" not in subprocess.check_output([*cli, "cluster", "info"], text=True):
        if time.monotonic() > deadline:
            raise TimeoutError("the one-master cluster is not ok")
        time.sleep(0.05)  # as RedisClusterServers.wait_ok: Redis says no more
    return node


async def test_a_script_whose_reply_was_lost_is_not_run_again(tmp_path: Path) -> None:
    """A node's connection lost after it ran a script, before its reply came: the request is
    unavailable, and an append without an id is stored once (redis-py's default retry ran
    the script again, and stored it twice)."""
    port, hop = cluster_port(), free_port()
    node = await asyncio.to_thread(_one_master, tmp_path, port, hop)
    lose = {"armed": False, "next": False}
    relays: list[tuple[asyncio.Task[Any] | None, asyncio.StreamWriter]] = []

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
        relays.extend([(asyncio.current_task(), writer), (None, up_writer)])

        async def up() -> None:
            while data := await reader.read(65536):
                if lose["armed"] and b"EVALSHA" in data.upper():
                    lose["armed"], lose["next"] = False, True
                up_writer.write(data)

        async def down() -> None:
            while data := await up_reader.read(65536):
                if lose["next"]:  # the script ran: its reply is lost with the connection
                    lose["next"] = False
                    writer.transport.abort()
                    up_writer.close()
                    return
                writer.write(data)

        await asyncio.gather(up(), down(), return_exceptions=True)

    server = await asyncio.start_server(relay, "127.0.0.1", hop)
    be = ClusterBackend(f"redis+cluster://127.0.0.1:{hop}", Limits(ttl=0), prefix=unique())
    try:
        await be.open()
        await be.execute([Append("c", "user", "hello")])
        lose["armed"] = True
        (lost,), _ = await be.execute([Append("c", "user", "once, no id")])
        assert isinstance(lost, Unavailable)
        (got,), _ = await be.execute([Get("c")])
        assert isinstance(got, Turns)
        assert [t["content"] for t in got.decoded()] == ["hello", "once, no id"]
    finally:
        await be.close()
        server.close()
        for _, writer in relays:
            writer.close()
        await asyncio.gather(*(task for task, _ in relays if task), return_exceptions=True)
        node.terminate()
        node.wait(timeout=10)
