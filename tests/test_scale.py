"""Several workers sharing Redis behind an MQTT shared subscription."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio
from redis.crc import key_slot

from tests.clients import decode, device, next_message, watcher
from tests.conftest import make_config, reap, running, spawn_worker, unique, wait_serving
from tests.processes import Mosquitto, RedisClusterServers, RedisServer, redis_server
from worker.client import (
    Appended,
    BlockingMemoryClient,
    MemoryClient,
    NoReplyError,
    UnavailableError,
)
from worker.service import Service

pytestmark = pytest.mark.skipif(redis_server() is None, reason="redis-server is not installed")


@contextlib.asynccontextmanager
async def workers(
    broker: Mosquitto, url: str, n: int, **overrides: Any
) -> AsyncIterator[list[Service]]:
    prefix, group = unique("mem"), unique("g")
    async with contextlib.AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(
                running(
                    make_config(broker, prefix=prefix, backend=url, shared_group=group, **overrides)
                )
            )
            for _ in range(n)
        ]


@contextlib.asynccontextmanager
async def on_own_redis(
    broker: Mosquitto, tmp_path: Path
) -> AsyncIterator[tuple[RedisServer, Service]]:
    """A worker on a Redis of the test's own, which the test may stop and start."""
    server = RedisServer(tmp_path).start()
    try:
        async with running(make_config(broker, backend=server.url)) as w:
            yield server, w
    finally:
        server.stop()


async def converse(m: MemoryClient, convo: str, count: int) -> list[int]:
    """An app that waits for each reply: returns the seqs it was given."""
    return [(await m.append(convo, "u", str(i))).seq for i in range(count)]


async def test_three_workers_share_the_load_and_keep_order(
    broker: Mosquitto, redis_url: str
) -> None:
    """Every acknowledged append is stored once and in order; each eviction announced once."""
    async with workers(broker, redis_url, 3, max_turns=100) as ws:
        prefix = ws[0].cfg.prefix
        async with watcher(broker.host, broker.port, f"{prefix}/+/evicted") as events:
            async with contextlib.AsyncExitStack() as stack:
                apps = [
                    await stack.enter_async_context(MemoryClient(broker.host, broker.port, prefix))
                    for _ in range(6)
                ]
                seqs = await asyncio.gather(*(converse(m, f"d{i}", 40) for i, m in enumerate(apps)))
                turns = [await apps[0].get(f"d{i}") for i in range(6)]
                for i in range(6):
                    await apps[0].forget(f"d{i}")
            deleted: Counter[str] = Counter()
            while len(deleted) < 6:
                ev = decode(await next_message(events))
                if ev["reason"] == "deleted":
                    deleted[ev["convo"]] += 1
    served = [w.stats.requests for w in ws]
    assert all(n > 0 for n in served), served
    assert seqs == [list(range(1, 41))] * 6
    assert [[int(x["content"]) for x in t] for t in turns] == [list(range(40))] * 6
    assert set(deleted.values()) == {1}


async def test_each_expiry_is_announced_once(broker: Mosquitto, redis_url: str) -> None:
    """Three sweepers, one event per expired conversation."""
    async with workers(broker, redis_url, 3, ttl=0.5) as ws:
        prefix = ws[0].cfg.prefix
        async with (
            watcher(broker.host, broker.port, f"{prefix}/+/evicted") as events,
            device(broker.host, broker.port, prefix) as d,
        ):
            for i in range(30):
                await d.request(f"c{i}", "append", {"role": "u", "content": "x"})
            got: Counter[str] = Counter()
            while len(got) < 30:
                ev = decode(await next_message(events))
                assert ev["reason"] == "ttl"
                got[ev["convo"]] += 1
            await d.request("sentinel", "get")  # any duplicate would have come before this
            await d.request("sentinel", "append", {"role": "u", "content": "x"})
            await d.request("sentinel", "delete")
            ev = decode(await next_message(events))
            assert (ev["convo"], ev["reason"]) == ("sentinel", "deleted")
    assert set(got.values()) == {1}


async def test_a_killed_worker_loses_nothing(broker: Mosquitto, redis_url: str) -> None:
    """One of three SIGKILLed under load: the others serve; the client, which retries with
    the same id, gets every append stored exactly once, in order."""
    prefix, group = unique("mem"), unique("g")
    procs = [
        spawn_worker(
            broker,
            "--prefix",
            prefix,
            "--client-id",
            unique("w-"),
            "--backend",
            redis_url,
            "--shared-group",
            group,
            "--max-turns",
            "500",
        )
        for _ in range(3)
    ]
    try:
        async with watcher(broker.host, broker.port, f"{prefix}/_worker/+/status") as seen:
            online = 0
            while online < 3:
                online += decode(await next_message(seen))["state"] == "online"
        async with MemoryClient(broker.host, broker.port, prefix, timeout=1, attempts=30) as m:
            for i in range(300):
                append = asyncio.ensure_future(m.append("c", "u", str(i)))
                if i == 100:
                    await asyncio.sleep(0)  # the append is sent...
                    procs[0].send_signal(signal.SIGKILL)  # ...and in flight
                await append
            turns = await m.get("c")
        assert [int(t["content"]) for t in turns] == list(range(300))
        assert [t["seq"] for t in turns] == list(range(1, 301))
    finally:
        for p in procs:
            reap(p)


async def test_redis_restart_gives_unavailable_then_full_service(
    broker: Mosquitto, tmp_path: Path
) -> None:
    """With Redis down requests are answered unavailable; when it is back service resumes."""
    server = RedisServer(tmp_path).start()
    try:
        async with (
            running(make_config(broker, backend=server.url)) as w,
            MemoryClient(broker.host, broker.port, w.cfg.prefix, attempts=1) as m,
        ):
            await m.append("c", "u", "x")
            server.stop()
            t0 = asyncio.get_running_loop().time()
            with pytest.raises(UnavailableError):
                await m.append("c", "u", "y")
            assert asyncio.get_running_loop().time() - t0 < 5
            server.start()
            assert await m.append("c", "u", "z") == Appended(1, 1)  # that Redis kept nothing
            assert w.connected.is_set()
            assert w.stats.errors["unavailable"] == 1
    finally:
        server.stop()


@pytest.mark.parametrize("blocking", [False, True], ids=["async", "blocking"])
async def test_the_client_asks_again_after_unavailable_and_stores_once(
    broker: Mosquitto, tmp_path: Path, blocking: bool
) -> None:
    """An `unavailable` reply ("ask again later") is asked again, with the same id, within
    the client's attempts: the write lands once when storage is back. A delete too: it
    carries an id like the other writes."""
    async with on_own_redis(broker, tmp_path) as (server, w):
        prefix = w.cfg.prefix
        async with (
            MemoryClient(broker.host, broker.port, prefix, attempts=20) as m,
            watcher(broker.host, broker.port, f"{prefix}/+/append") as requests,
            watcher(broker.host, broker.port, f"{prefix}/+/delete") as deletes,
        ):
            server.stop()
            if blocking:

                def append() -> Appended:
                    with BlockingMemoryClient(broker.host, broker.port, prefix, attempts=20) as b:
                        return b.append("c", "u", "y", request_id="r1")

                appended = asyncio.create_task(asyncio.to_thread(append))
            else:
                appended = asyncio.create_task(m.append("c", "u", "y", request_id="r1"))
            for _ in range(3):  # the third attempt: the first two were answered unavailable
                assert decode(await next_message(requests))["id"] == "r1"
            server.start()
            assert await appended == Appended(1, 1)
            assert w.stats.errors["unavailable"] >= 2
            assert [t["content"] for t in await m.get("c")] == ["y"]
            assert await m.append("c", "u", "y", request_id="r1") == Appended(1, 1)

            server.stop()
            forgotten = asyncio.create_task(m.forget("c"))
            ids = [decode(await next_message(deletes))["id"] for _ in range(2)]
            assert ids[0] == ids[1]
            server.start()
            assert await forgotten == 0  # this Redis keeps nothing across its restart


@pytest.mark.parametrize("blocking", [False, True], ids=["async", "blocking"])
async def test_a_client_closed_while_it_waits_to_ask_again_ends_the_call(
    broker: Mosquitto, tmp_path: Path, blocking: bool
) -> None:
    async with on_own_redis(broker, tmp_path) as (server, w):
        server.stop()
        prefix = w.cfg.prefix
        async with watcher(broker.host, broker.port, f"{prefix}/+/get") as requests:
            if blocking:
                b = BlockingMemoryClient(broker.host, broker.port, prefix, attempts=1000)
                await asyncio.to_thread(b.__enter__)
                call = asyncio.create_task(asyncio.to_thread(b.get, "c"))
                close: Any = asyncio.to_thread(b.close)
            else:
                m = await MemoryClient(broker.host, broker.port, prefix, attempts=1000).__aenter__()
                call = asyncio.create_task(m.get("c"))
                close = m.__aexit__(None, None, None)
            for _ in range(2):
                await next_message(requests)
            await close
            with pytest.raises(RuntimeError, match="closed while this request waited"):
                await asyncio.wait_for(call, 5)


async def test_unavailable_to_the_last_attempt_says_how_many(
    broker: Mosquitto, tmp_path: Path
) -> None:
    async with on_own_redis(broker, tmp_path) as (server, w):
        server.stop()
        async with MemoryClient(broker.host, broker.port, w.cfg.prefix, attempts=3) as m:
            with pytest.raises(UnavailableError, match=r"storage unavailable.*\(3 attempts\)"):
                await m.get("c")
        assert w.stats.errors["unavailable"] == 3


async def test_no_reply_after_unavailable_says_the_worker_answered(
    broker: Mosquitto, tmp_path: Path
) -> None:
    """A last attempt that gets no reply after attempts answered 'unavailable' does not ask
    whether a worker runs there: it says the worker answered so."""
    server = RedisServer(tmp_path).start()
    prefix = unique("mem")
    proc = spawn_worker(broker, "--prefix", prefix, "--backend", server.url)
    try:
        await asyncio.to_thread(wait_serving, proc)
        server.stop()
        async with (
            watcher(broker.host, broker.port, f"{prefix}-reply/#") as replies,
            MemoryClient(broker.host, broker.port, prefix, timeout=0.5, attempts=2) as m,
        ):
            call = asyncio.create_task(m.get("c"))
            assert decode(await next_message(replies))["error"]["code"] == "unavailable"
            proc.send_signal(signal.SIGSTOP)  # the next attempt gets no reply
            with pytest.raises(
                NoReplyError, match=r"answered 'unavailable' \(ask again later\) to 1"
            ):
                await call
    finally:
        proc.send_signal(signal.SIGCONT)
        reap(proc)
        server.stop()


async def test_a_redis_url_on_a_cluster_node_says_to_name_the_cluster(
    broker: Mosquitto, redis_cluster: RedisClusterServers
) -> None:
    """redis:// at a node of a Redis Cluster whose slot for the prefix is another node's
    looked like an outage ("not answering: MovedError") and every request 'unavailable'."""
    prefix = next(
        p for p in (f"mem{n}" for n in range(100)) if key_slot(f"mw:{{{p}}}:".encode()) > 6000
    )
    node = f"redis://127.0.0.1:{redis_cluster.ports[0]}/0"  # slots 0-5460 (cluster create's)
    proc = spawn_worker(broker, "--backend", node, "--prefix", prefix)
    out, _ = await asyncio.to_thread(proc.communicate, timeout=30)
    assert proc.returncode == 2, out
    assert "a node of a Redis Cluster" in out
    assert "redis+cluster://" in out


async def test_a_redis_that_refuses_for_good_stops_the_worker_at_start(
    broker: Mosquitto, tmp_path: Path
) -> None:
    """A Redis that refuses the login, or has no such database, will not mend by waiting: the
    worker exits 2 with one line saying what Redis said, and no password (it logged "not
    answering" with the URL's password, and answered 'unavailable' for ever)."""
    server = RedisServer(tmp_path).start()
    try:
        admin = redis.asyncio.Redis(port=server.port)
        await admin.config_set("requirepass", "hunter2x")
        await admin.aclose()
        where = f"127.0.0.1:{server.port}"
        for url, said in [
            (f"redis://:guess123@{where}/0", "invalid username-password pair"),
            (f"redis://{where}/0", "Authentication required"),
            (f"redis://:hunter2x@{where}/99", "DB index is out of range"),
        ]:
            proc = spawn_worker(broker, "--backend", url)
            out, _ = await asyncio.to_thread(proc.communicate, timeout=30)
            assert proc.returncode == 2, out
            assert out.count("\n") == 1, out
            assert "redis refused" in out
            assert said in out
            assert "hunter2x" not in out
            assert "guess123" not in out
    finally:
        server.stop()
