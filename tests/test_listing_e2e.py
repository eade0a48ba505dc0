"""Listing conversations and namespaces end to end: MQTT 5 and 3.1.1 devices, a share group."""

from __future__ import annotations

import asyncio
import signal

import pytest

from tests.clients import AckHolder, Device, device, next_message, watcher
from tests.conftest import (
    WorkerFactory,
    make_config,
    reap,
    running,
    spawn_worker,
    unique,
    wait_serving,
)
from tests.processes import Mosquitto, redis_server
from tests.test_scale import workers


async def test_list_pages_and_namespaces(dev: Device) -> None:
    """A device pages through P/_conversations/list and reads a conversation's namespaces."""
    for name in ("kiosk-2", "kiosk-1", "box"):
        await dev.request(name, "append", {"role": "user", "content": "hi"})
    await dev.request("kiosk-1", "state/save", {"ns": "prefs", "key": "k", "value": 1})
    first = await dev.request("_conversations", "list", {"limit": 2, "id": "p1"})
    assert [e["convo"] for e in first["conversations"]] == ["box", "kiosk-1"]
    assert first["id"] == "p1"
    rest = await dev.request("_conversations", "list", {"limit": 2, "cursor": first["cursor"]})
    assert ([e["convo"] for e in rest["conversations"]], rest["cursor"]) == (["kiosk-2"], None)
    kiosks = await dev.request("_conversations", "list", {"prefix": "kiosk-"})
    assert [(e["convo"], e["keys"]) for e in kiosks["conversations"]] == [
        ("kiosk-1", 1),
        ("kiosk-2", 0),
    ]
    assert await dev.request("kiosk-1", "state/namespaces") == {"ok": True, "namespaces": ["prefs"]}


async def test_bad_list_requests_get_bad_request(dev: Device) -> None:
    """A bad cursor, limit or prefix is bad_request; other _conversations topics bad_topic."""
    for body in ({"cursor": "nope!"}, {"limit": 0}, {"prefix": "a/b"}):
        reply = await dev.request("_conversations", "list", body)
        assert reply["error"]["code"] == "bad_request", body
    reply = await dev.request("_conversations", "get")
    assert reply["error"]["code"] == "bad_topic"


async def test_a_long_page_is_read_in_steps_behind_other_requests(broker: Mosquitto) -> None:
    """A page of 1,000 is read a few conversations at a time (constants.LIST_STEP), and a
    request that comes meanwhile is answered first; the pages are whole and in order."""
    prefix = unique("mem")
    proc = spawn_worker(broker, "--prefix", prefix, "--max-conversations", "5000")
    try:
        await asyncio.to_thread(wait_serving, proc)
        async with device(broker.host, broker.port, prefix) as d:
            names = sorted(f"c{i:04}" for i in range(2100))
            for name in names:  # QoS 0 and unawaited: the last request's reply says all are in
                await d.send(f"{prefix}/{name}/append", {"role": "user", "content": "x"}, qos=0)
            assert (await d.request("zz", "append", {"role": "user", "content": "x"}))["ok"]
            order: list[str] = []
            page = await d.send(f"{prefix}/_conversations/list", {"limit": 1000}, qos=0)
            page.add_done_callback(lambda _: order.append("page"))
            get = await d.send(f"{prefix}/zz/get", {}, qos=0)
            get.add_done_callback(lambda _: order.append("get"))
            first, _ = await d.reply(page), await d.reply(get)
            assert order == ["get", "page"]
            second = await d.request(
                "_conversations", "list", {"limit": 1000, "cursor": first["cursor"]}
            )
            third = await d.request(
                "_conversations", "list", {"limit": 1000, "cursor": second["cursor"]}
            )
            listed = [e["convo"] for p in (first, second, third) for e in p["conversations"]]
            assert listed == [*names, "zz"]
            assert third["cursor"] is None
            some = await d.request("_conversations", "list", {"limit": 1000, "prefix": "c19"})
            assert [e["convo"] for e in some["conversations"]] == [
                n for n in names if n.startswith("c19")
            ]
            assert some["cursor"] is None
    finally:
        reap(proc, signal.SIGTERM)


async def test_waiting_pages_count_against_max_inflight(
    broker: Mosquitto, worker_factory: WorkerFactory
) -> None:
    """Pages waiting for their turn are held to --max-inflight with the requests not yet
    read (QoS 0 ones included, which no Receive Maximum bounds): past it the worker stops
    reading, and the flood waits in the broker. Past an eighth of it (at least one) a page
    is answered unavailable at once: a burst of pages stopped the worker reading devices'
    requests for a minute."""
    async with (
        worker_factory(max_inflight=4) as w,
        device(broker.host, broker.port, w.cfg.prefix) as d,
    ):
        for i in range(300):
            await d.send(f"{w.cfg.prefix}/c{i:03}/append", {"role": "user", "content": "x"}, qos=0)
        assert (await d.request("c299", "get"))["turns"]
        held, flooding = 0, True

        async def sample() -> None:
            nonlocal held
            while flooding:
                held = max(held, len(w._later) + len(w._inbox))
                await asyncio.sleep(0)

        sampler = asyncio.create_task(sample())
        pages = [
            await d.send(f"{w.cfg.prefix}/_conversations/list", {"limit": 1000}, qos=0)
            for _ in range(200)
        ]
        replies = [await d.reply(page) for page in pages]
        flooding = False
        await sampler
        whole = [r for r in replies if r["ok"]]
        assert all(len(r["conversations"]) == 300 for r in whole)
        busy = [r["error"] for r in replies if not r["ok"]]
        assert whole
        assert busy
        assert {e["code"] for e in busy} == {"unavailable"}
        assert "listing pages wait already" in busy[0]["message"]
        assert 0 < held <= 4


async def test_pages_turned_away_do_not_slow_the_listings(
    broker: Mosquitto, worker_factory: WorkerFactory
) -> None:
    """Listing pages yield to devices' requests (a pause after each page while requests were
    applied lately); pages turned away 'unavailable' counted as such requests, so listings
    that asked again slowed each other to a crawl (a trial: 50 listings on Redis, 14-20 s
    and one UnavailableError, against 2 s). Only what was applied counts."""
    async with (
        worker_factory(max_inflight=8) as w,  # one page may wait
        device(broker.host, broker.port, w.cfg.prefix) as d,
    ):
        for i in range(50):
            await d.send(f"{w.cfg.prefix}/c{i:02}/append", {"role": "user", "content": "x"}, qos=0)
        assert (await d.request("c49", "get"))["turns"]
        served = w._served  # the devices' last requests
        pages = [
            await d.send(f"{w.cfg.prefix}/_conversations/list", {"limit": 5}, qos=0)
            for _ in range(30)
        ]
        replies = [await d.reply(page) for page in pages]
        assert any(r["ok"] for r in replies)
        assert {r["error"]["code"] for r in replies if not r["ok"]} == {"unavailable"}
        assert w._served == served


async def test_the_worker_goes_on_with_its_other_work_while_pages_queue(
    broker: Mosquitto,
) -> None:
    """Listers keeping pages of 1,000 queued on an idle worker: its other tasks (here the
    stats it publishes every 0.2 s) go on between pages, and it stops at once on SIGTERM."""
    prefix, cid = unique("mem"), unique("w-")
    proc = spawn_worker(
        broker,
        "--prefix",
        prefix,
        "--client-id",
        cid,
        "--max-conversations",
        "5000",
        "--stats-interval",
        "0.2",
    )
    try:
        await asyncio.to_thread(wait_serving, proc)
        async with (
            device(broker.host, broker.port, prefix) as d,
            watcher(broker.host, broker.port, f"{prefix}/_worker/{cid}/stats") as stats,
        ):
            for i in range(3000):
                await d.send(f"{prefix}/c{i:04}/append", {"role": "user", "content": "x"}, qos=0)
            assert (await d.request("c2999", "get"))["turns"]
            pages, listing = 0, True

            async def lister() -> None:  # two pages in flight: the queue never empties
                nonlocal pages
                ahead = await d.send(f"{prefix}/_conversations/list", {"limit": 1000})
                while listing:
                    page, ahead = (
                        ahead,
                        await d.send(f"{prefix}/_conversations/list", {"limit": 1000}),
                    )
                    await asyncio.wait_for(page, 30)  # undecoded: the client keeps up
                    pages += 1
                await asyncio.wait_for(ahead, 30)

            listers = [asyncio.create_task(lister()) for _ in range(4)]
            while pages < 4:
                await next_message(stats)
            seen = []
            for _ in range(3):  # stats while the pages keep coming
                await next_message(stats)
                seen.append(pages)
            assert seen[-1] > seen[0]
            listing = False
            await asyncio.gather(*listers)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 10) == 0
    finally:
        reap(proc, signal.SIGKILL)


@pytest.mark.skipif(redis_server() is None, reason="redis-server is not installed")
async def test_one_worker_of_a_share_group_answers_a_listing(
    broker: Mosquitto, redis_url: str
) -> None:
    """Two workers behind a shared subscription: one reply per listing, of the shared store."""
    async with (
        workers(broker, redis_url, 2) as ws,
        device(broker.host, broker.port, ws[0].cfg.prefix) as d,
    ):
        for i in range(5):
            await d.request(f"c{i}", "append", {"role": "user", "content": "x"})
        for _ in range(4):
            reply = await d.request("_conversations", "list")
            assert [e["convo"] for e in reply["conversations"]] == [f"c{i}" for i in range(5)]
        assert sum(w.stats.requests for w in ws) == 5 + 4  # each request served once


async def test_a_listing_refused_refuses_nothing_else(broker: Mosquitto) -> None:
    """Listings past the pages that may wait are refused, and only they: the requests read
    with them are served (the refusal was kept for the rest of the batch)."""
    async with AckHolder(broker.host, broker.port) as hop:
        cfg = make_config(broker, port=hop.port, max_inflight=8)  # one page may wait
        async with running(cfg), device(broker.host, broker.port, cfg.prefix) as d:
            await d.request("c", "append", {"role": "user", "content": "x"})
            hop.paused = True
            sent = [await d.send(f"{cfg.prefix}/_conversations/list", {}) for _ in range(3)]
            sent.append(await d.send(f"{cfg.prefix}/c/get", {}))
            await hop.wait_paused(4)
            hop.resume()  # one read: one batch
            replies = [await d.reply(f) for f in sent]
    assert [r["ok"] for r in replies] == [True, False, False, True]
    assert replies[3]["turns"][0]["content"] == "x"
