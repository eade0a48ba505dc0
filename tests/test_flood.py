"""Floods: memory stays bounded and a well-behaved device is still answered promptly."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiomqtt
import msgpack
import pytest

from tests.clients import NODELAY, AckHolder, decode, device, next_message, props, watcher
from tests.conftest import make_config, reap, running, spawn_worker, unique
from tests.processes import Mosquitto
from worker.service import Service

FLOOD = 20_000
RSS_BOUND_MIB = 64  # stated in the README


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize("spread", ["distinct", "single"])
async def test_flood_keeps_memory_bounded_and_serves_others(broker: Mosquitto, spread: str) -> None:
    """20,000 appends (to distinct conversations, or to one): RSS stays under the stated
    bound, and another device's requests are answered while the flood goes on (how fast is
    scripts/bench's business, not a timed assertion here)."""
    prefix, cid = unique("mem"), unique("w-")
    proc = spawn_worker(broker, "--prefix", prefix, "--client-id", cid)
    try:
        async with watcher(broker.host, broker.port, f"{prefix}/_worker/{cid}/status") as seen:
            assert decode(await next_message(seen))["state"] == "online"
        flooding = True
        peak = 0.0
        latencies: list[float] = []
        body = msgpack.packb({"role": "user", "content": "x" * 120})

        async def flood() -> None:
            nonlocal flooding
            async with aiomqtt.Client(
                broker.host, broker.port, socket_options=[NODELAY], max_inflight_messages=1000
            ) as client:
                for i in range(FLOOD):
                    convo = f"f{i}" if spread == "distinct" else "one"
                    await client.publish(f"{prefix}/{convo}/append", body, qos=1)
            flooding = False

        async def probe() -> None:
            async with device(broker.host, broker.port, prefix) as d:
                while flooding:
                    t0 = time.perf_counter()
                    assert (await d.request("probe", "get", {"last": 1}))["ok"]
                    latencies.append(time.perf_counter() - t0)
                    await asyncio.sleep(0.01)  # a device that asks now and then

        async def sample() -> None:
            nonlocal peak
            while flooding:
                peak = max(peak, rss_mib(proc.pid))
                await asyncio.sleep(0.05)

        await asyncio.gather(flood(), probe(), sample())
        async with device(broker.host, broker.port, prefix) as d:
            last = await d.request("one" if spread == "single" else f"f{FLOOD - 1}", "get")
        assert len(last["turns"]) >= 1
        assert latencies, "no request of another device was answered during the flood"
        latencies.sort()
        p99 = latencies[int(len(latencies) * 0.99)]
        print(
            f"{spread}: peak RSS {peak:.1f} MiB, {len(latencies)} probes, p99 {p99 * 1000:.1f} ms"
        )
        assert peak < RSS_BOUND_MIB
        assert proc.poll() is None
    finally:
        reap(proc)


async def test_replies_waiting_for_the_broker_stay_bounded(broker: Mosquitto) -> None:
    """While the broker's PUBACKs of our publishes lag (behind a flood), what waits for them
    stays within REPLY_BACKLOG_BYTES: past it a batch is answered unavailable, nothing done
    (a flood of gets of a large conversation took the worker to 2 GiB, and appends with
    --trimmed-events, each announcing a large turn, 541 MB)."""
    async with AckHolder(broker.host, broker.port) as hop:
        cfg = make_config(
            broker, port=hop.port, max_payload_bytes=65536, max_turns=4, trimmed_events=True
        )
        async with running(cfg), device(broker.host, broker.port, cfg.prefix) as dev:
            for i in range(4):  # a 240 KB get
                await dev.request("big", "append", {"role": "user", "content": f"{i}" * 60_000})
            hop.holding = True
            gets = [await dev.send(f"{cfg.prefix}/big/get", {}) for _ in range(200)]
            appended = await dev.request("big", "append", {"role": "user", "content": "x"})
            hop.release()
            replies = [await dev.reply(fut) for fut in gets]
            assert [t["seq"] for t in (await dev.request("big", "get"))["turns"]] == [1, 2, 3, 4]
    assert appended["error"]["code"] == "unavailable"  # not stored: it would trim a turn
    assert "nothing was done" in appended["error"]["message"]
    ok = [r for r in replies if r["ok"]]
    # Past 8 MiB before a batch, it is refused: a batch (64 at most) may take it past.
    assert 8 * 2**20 // 240_000 <= len(ok) <= 8 * 2**20 // 240_000 + 1 + 64, len(ok)
    assert all(r["error"]["code"] == "unavailable" for r in replies if not r["ok"])
    assert all(len(r["turns"]) == 4 for r in ok)


async def test_correlation_data_past_1_kib_gets_no_reply(
    broker: Mosquitto, worker: Service
) -> None:
    """A reply echoes the request's Correlation Data: past 1 KiB the route is refused (no
    reply), as a request of a few bytes cost a reply of 64 KB (800 MB in a flood)."""
    prefix = worker.cfg.prefix
    async with device(broker.host, broker.port, prefix) as dev:
        inbox = f"reply/{unique('big')}"
        async with watcher(broker.host, broker.port, inbox) as replies:
            for size in (2000, 1024):
                await dev.client.publish(
                    f"{prefix}/c/get",
                    msgpack.packb({}),
                    qos=1,
                    properties=props(ResponseTopic=inbox, CorrelationData=bytes(size)),
                )
            message = await next_message(replies)
            assert len(message.properties.CorrelationData) == 1024  # type: ignore[union-attr]
            assert (await dev.request("c", "get"))["ok"]
            assert replies.empty()


async def test_a_batch_of_large_gets_is_answered_whole(broker: Mosquitto) -> None:
    """A batch of 64 gets of conversations of default limits (8 turns of 50 KB: 400 KB
    each, 25 MB in all) is answered whole: a batch's own replies do not count against its
    reads (counted as waiting for the broker, most of them were refused)."""
    async with AckHolder(broker.host, broker.port) as hop:
        cfg = make_config(broker, port=hop.port)
        async with running(cfg), device(broker.host, broker.port, cfg.prefix) as dev:
            for n in range(64):
                for _ in range(8):
                    body = {"role": "user", "content": "x" * 50_000}
                    await dev.send(f"{cfg.prefix}/c{n}/append", body)
            assert len((await dev.request("c63", "get"))["turns"]) == 8
            hop.paused = True
            gets = [await dev.send(f"{cfg.prefix}/c{n}/get", {}) for n in range(64)]
            await hop.wait_paused(64)
            hop.resume()  # one read: one batch
            replies = [await dev.reply(f) for f in gets]
    assert [len(r.get("turns", ())) for r in replies] == [8] * 64


async def test_small_messages_that_decode_into_many_objects_keep_memory_bounded(
    broker: Mosquitto,
) -> None:
    """64 KiB of msgpack `[{}, {}, ...]` decodes into 5 MB of objects: as a request's body
    (refused) it stayed alive in the error's traceback until the batch was answered, and
    400 such requests held 1.2 GB; as stats of strangers on worker topics, kept whole for a
    status that never came. RSS stays under the stated bound, and the worker answers."""
    prefix, cid = unique("mem"), unique("w-")
    proc = spawn_worker(broker, "--prefix", prefix, "--client-id", cid)
    try:
        async with watcher(broker.host, broker.port, f"{prefix}/_worker/{cid}/status") as seen:
            assert decode(await next_message(seen))["state"] == "online"
        bomb = msgpack.packb([{}] * 65_000)
        role_bomb = msgpack.packb({"role": [{}] * 64_000, "content": "x"})
        stats_bomb = msgpack.packb(
            {"client_id": "s", "limits": {}, "ts": time.time(), "pad": [{}] * 60_000}
        )
        sending = True
        peak = 0.0

        async def send() -> None:
            nonlocal sending
            async with aiomqtt.Client(
                broker.host, broker.port, socket_options=[NODELAY], max_inflight_messages=1000
            ) as client:
                for i in range(200):
                    await client.publish(f"{prefix}/v{i}/get", bomb, qos=1)
                    await client.publish(f"{prefix}/r{i}/append", role_bomb, qos=1)
                    stats = stats_bomb.replace(b"\xa1s", b"\xa1" + bytes([65 + i % 26]), 1)
                    await client.publish(f"{prefix}/_worker/s{i}/stats", stats, qos=1)
            async with device(broker.host, broker.port, prefix) as d:  # after them, in order
                assert (await d.request("c", "get"))["ok"]
            sending = False

        async def sample() -> None:
            nonlocal peak
            while sending:
                peak = max(peak, rss_mib(proc.pid))
                await asyncio.sleep(0.02)

        await asyncio.gather(send(), sample())
        peak = max(peak, rss_mib(proc.pid))
        print(f"peak RSS {peak:.1f} MiB")
        assert peak < RSS_BOUND_MIB
        assert proc.poll() is None
    finally:
        reap(proc)


def _strangers(prefix: str, case: str) -> list[tuple[str, bytes, Any]]:
    """What a client that is not a worker may send, each kept by the worker until a review:
    statuses and stats of 256 made-up workers with 8 KiB of [{}] in them (600 KB each
    decoded), requests with 60 KB reply routes, and requests on 60 KB topics, each new."""
    blob: list[dict[str, Any]] = [{}] * 8100
    now = time.time()
    if case == "peers":
        out: list[tuple[str, bytes, Any]] = []
        for i in range(256):
            status = {"client_id": f"fake{i}", "state": blob}
            stats = {"client_id": f"ghost{i}", "limits": {"x": blob}, "ts": now}
            out.append((f"{prefix}/_worker/fake{i}/status", msgpack.packb(status), None))
            out.append((f"{prefix}/_worker/ghost{i}/stats", msgpack.packb(stats), None))
        return out
    long = "a" * 60_000
    if case == "routes":
        return [
            (f"{prefix}/c/get", b"\x80", props(ResponseTopic=f"r/{i:08d}{long}"))
            for i in range(800)
        ]
    return [
        (f"{prefix}/{i:08d}{long}/append", b"\x80", props(ResponseTopic="r/x")) for i in range(800)
    ]


@pytest.mark.parametrize("case", ["peers", "routes", "topics"])
async def test_what_strangers_send_is_not_kept_past_the_bound(broker: Mosquitto, case: str) -> None:
    """Worker topics anyone may publish on, and the topics and routes of requests the worker
    refuses, are remembered (other workers' limits; a topic's or route's verdict): 4 MB of
    made-up peers took 300 MB, 800 long routes or topics 50 MB each. RSS stays under the
    stated bound, and the worker answers."""
    prefix, cid = unique("mem"), unique("w-")
    proc = spawn_worker(broker, "--prefix", prefix, "--client-id", cid)
    try:
        async with watcher(broker.host, broker.port, f"{prefix}/_worker/{cid}/status") as seen:
            assert decode(await next_message(seen))["state"] == "online"
        async with aiomqtt.Client(
            broker.host,
            broker.port,
            protocol=aiomqtt.ProtocolVersion.V5,
            socket_options=[NODELAY],
            max_inflight_messages=1000,
        ) as client:
            for topic, payload, properties in _strangers(prefix, case):
                await client.publish(topic, payload, qos=1, properties=properties)
        async with device(broker.host, broker.port, prefix) as d:  # after them, in order
            assert (await d.request("c", "get"))["ok"]
        peak = rss_mib(proc.pid)
        print(f"{case}: RSS {peak:.1f} MiB")
        assert peak < RSS_BOUND_MIB
        assert proc.poll() is None
    finally:
        reap(proc)
