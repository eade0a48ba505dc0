"""Listing through the Python client and memctl: conversations() pages underneath, on
mqtt:// (MQTT 5 and 3.1.1) and memory://, async and blocking."""

from __future__ import annotations

import asyncio
import random

import aiomqtt
import msgpack
import pytest

from tests import test_client
from tests.clients import props
from tests.conftest import WorkerFactory, unique
from tests.processes import Mosquitto
from tests.test_cli import memctl
from worker.client import (
    BadRequestError,
    Memory,
    MemoryClient,
    UnavailableError,
    open_blocking_memory,
)
from worker.service import Service

memory = test_client.memory
blocking_url = test_client.blocking_url


async def test_conversations_pages_through_every_live_conversation(memory: Memory) -> None:
    """conversations() yields every live conversation in id order, whatever the page size."""
    stem = unique("L")
    names = [f"{stem}-{i:02}" for i in range(12)]
    for name in reversed(names):
        await memory.append(name, "user", "hello")
    await memory.save(names[3], "prefs", "lang", "en")
    listed = [info async for info in memory.conversations(stem, page_size=5)]
    assert [info["convo"] for info in listed] == names
    assert (listed[3]["turns"], listed[3]["keys"], listed[3]["upto"]) == (1, 1, 0)
    assert listed[0]["expires_at"] == listed[0]["last_used"] + 3600
    assert [i["convo"] async for i in memory.conversations(f"{stem}-1")] == names[10:]
    assert [i async for i in memory.conversations(unique("nobody"))] == []
    assert await memory.namespaces(names[3]) == ["prefs"]
    assert await memory.namespaces(names[4]) == []
    for bad in (0, 1001, True):  # named as the caller named it (the worker's says 'limit')
        with pytest.raises(BadRequestError, match="'page_size' must be an integer 1-1000"):
            [i async for i in memory.conversations(stem, page_size=bad)]


async def test_blocking_conversations_is_an_iterator(blocking_url: str) -> None:
    """The blocking client's conversations() is a plain iterator over the same pages."""
    stem = unique("B")

    def use() -> tuple[list[str], list[str]]:
        with open_blocking_memory(blocking_url) as m:
            for i in range(7):
                m.append(f"{stem}{i}", "user", "x")
            m.save(f"{stem}0", "cart", "k", 1)
            return [i["convo"] for i in m.conversations(stem, page_size=3)], m.namespaces(
                f"{stem}0"
            )

    listed, namespaces = await asyncio.to_thread(use)
    assert listed == [f"{stem}{i}" for i in range(7)]
    assert namespaces == ["cart"]


async def test_memctl_lists_every_page_and_namespaces(broker: Mosquitto, worker: Service) -> None:
    """memctl list prints a JSON line per conversation, all pages; state namespaces too."""
    prefix = worker.cfg.prefix
    for name in ("b", "a", "c"):
        assert (await memctl(broker, prefix, "append", name, "user", "hi"))[0] == 0
    assert (await memctl(broker, prefix, "state", "save", "a", "prefs", "k", "1"))[0] == 0
    code, lines = await memctl(broker, prefix, "list", "--limit", "2")
    assert (code, [line["convo"] for line in lines]) == (0, ["a", "b", "c"])
    code, lines = await memctl(broker, prefix, "list", "--prefix", "b")
    assert (code, [line["convo"] for line in lines]) == (0, ["b"])
    code, lines = await memctl(broker, prefix, "state", "namespaces", "a")
    assert (code, lines) == (0, [{"ok": True, "namespaces": ["prefs"]}])
    code, _ = await memctl(broker, prefix, "list", "--limit", "0")
    assert code == 2


async def test_listings_beyond_the_waiting_pages_keep_their_place(
    broker: Mosquitto, worker_factory: WorkerFactory
) -> None:
    """More listings at once than the worker lets pages wait (--max-inflight / 8): a page
    answered 'unavailable' asks again and the listing goes on from its place. After three
    quick attempts it raised UnavailableError mid-listing, its place lost (a new user's
    trial: 16 of 24 listings failed)."""
    async with (
        worker_factory(max_inflight=16) as w,  # 2 pages may wait
        MemoryClient(broker.host, broker.port, w.cfg.prefix) as m,
    ):
        stem = unique("P")
        names = [f"{stem}-{i:02}" for i in range(20)]
        for name in names:
            await m.append(name, "user", "x")

        async def listing() -> list[str]:
            return [info["convo"] async for info in m.conversations(stem, page_size=4)]

        listed = await asyncio.gather(*(listing() for _ in range(40)))
        assert all(one == names for one in listed)
        assert w.stats.errors.get("unavailable", 0) > 0  # they did meet full waiting pages


@pytest.mark.parametrize("draw", ["shortest", "longest"])
async def test_a_listing_that_gives_up_says_how_long_it_asked(
    broker: Mosquitto, draw: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page the worker keeps turning away raises UnavailableError once the client's
    timeout x attempts have passed, saying how long it was asked (it said "3 attempts"
    after 15 s of them: a trial). A responder stands in for a worker whose waiting pages
    stay full: it answers every page so. The pauses drawn at their shortest it still says
    so (it said "3 attempts" when they all came short: the suite, once)."""
    monkeypatch.setattr(random, "uniform", lambda a, b: a if draw == "shortest" else b)
    prefix = unique("full")
    busy = {"ok": False, "error": {"code": "unavailable", "message": "8 listing pages wait"}}
    async with aiomqtt.Client(
        broker.host, broker.port, protocol=aiomqtt.ProtocolVersion.V5
    ) as peer:
        await peer.subscribe(f"{prefix}/_conversations/list")

        async def answer() -> None:
            async for message in peer.messages:
                asked = message.properties
                assert asked is not None
                await peer.publish(
                    getattr(asked, "ResponseTopic"),  # noqa: B009 - paho sets it at run time
                    msgpack.packb(busy),
                    properties=props(CorrelationData=getattr(asked, "CorrelationData")),  # noqa: B009
                )

        answering = asyncio.create_task(answer())
        try:
            async with MemoryClient(broker.host, broker.port, prefix, timeout=0.5, attempts=3) as m:
                with pytest.raises(UnavailableError) as info:
                    [i async for i in m.conversations()]
        finally:
            answering.cancel()
    assert info.value.message.startswith("8 listing pages wait (the page asked again for ")
