"""Which topics under P/ get which answer: operations, bad_topic, and silence for events."""

from __future__ import annotations

import pytest

from tests.clients import Device, check, decode, device, next_message, watcher
from tests.conftest import WorkerFactory, make_config, running, unique
from tests.processes import Mosquitto
from worker.service import Service


@pytest.mark.parametrize(
    "tail", ["kiosk-1/frobnicate", "a/b/get", "a/b/c/append", "x/state/nope", "x/state", "x"]
)
async def test_anything_not_an_operation_gets_bad_topic(dev: Device, tail: str) -> None:
    """Unknown operations and extra levels are answered bad_topic, on either protocol."""
    reply = await dev.reply(await dev.send(f"{dev.prefix}/{tail}", {"id": 4}))
    check("error.reply", reply)
    assert reply["error"]["code"] == "bad_topic"
    assert reply["id"] == 4


async def test_events_and_worker_topics_get_no_answer(
    broker: Mosquitto, worker: Service, dev5: Device
) -> None:
    """Eviction events and worker topics, ours or another's, are neither answered nor errors."""
    p = worker.cfg.prefix
    await dev5.request("gone", "append", {"role": "user", "content": "x"})
    await dev5.request("gone", "delete")  # the worker's own P/gone/evicted
    quiet = [
        f"{p}/c/evicted",
        f"{p}/_worker/other/status",
        f"{p}/_worker/other/stats",
        f"{p}/_worker/{worker.cfg.client_id}/stats",
    ]
    for topic in quiet:
        await dev5.send(topic, {"id": 1})
    # Served in order on one connection: a reply to any of them would come before this one.
    assert (await dev5.request("c", "get"))["ok"] is True
    assert dev5.unmatched.empty()
    assert worker.stats.errors == {}
    assert worker.stats.requests == 3


async def test_worker_topics_under_a_reserved_convo_are_still_bad(dev5: Device) -> None:
    """P/_worker/<op> is a request for the reserved conversation `_worker`: bad_topic."""
    reply = await dev5.reply(await dev5.send(f"{dev5.prefix}/_worker/get", {}))
    assert reply["error"]["code"] == "bad_topic"


async def test_other_workers_retained_status_is_not_counted(
    broker: Mosquitto, worker_factory: WorkerFactory
) -> None:
    """A second worker on the same prefix does not count the first one's retained topics."""
    prefix = unique("mem")
    async with worker_factory(prefix=prefix) as first, worker_factory(prefix=prefix) as second:
        async with device(broker.host, broker.port, prefix) as d:
            assert (await d.request("c", "get"))["ok"] is True
        assert first.stats.ignored_retained == 0
        assert second.stats.ignored_retained == 0
        assert second.stats.errors == {}
        assert first.stats.errors == {}


async def test_first_stats_come_as_soon_as_it_serves(
    broker: Mosquitto, worker_factory: WorkerFactory
) -> None:
    """With a stats interval of an hour, the first stats still arrive on connect."""
    prefix, client_id = unique("mem"), unique("worker-")
    topic = f"{prefix}/_worker/{client_id}/stats"
    async with (
        watcher(broker.host, broker.port, topic) as seen,
        worker_factory(prefix=prefix, client_id=client_id, stats_interval=3600),
    ):
        body = decode(await next_message(seen))
    check("stats", body)
    assert body["requests"] == 0
    assert body["taken_over"] == 0


async def test_a_request_under_the_prefix_of_an_earlier_run_is_left_to_its_workers(
    broker: Mosquitto,
) -> None:
    """A worker started again with another --prefix under the same client id: its session
    kept the old prefix's subscription, and it answered that prefix's requests bad_topic,
    even writes the workers of that prefix stored (a device was told its stored write
    failed; a new operator's trial). It answers nothing there now, and unsubscribes."""
    old, new, cid = unique("old"), unique("new"), unique("w-")
    async with running(make_config(broker, prefix=old, client_id=cid)):
        pass
    async with (
        running(make_config(broker, prefix=new, client_id=cid)),
        device(broker.host, broker.port, new) as d,
    ):
        for _ in range(2):
            stray = await d.send(f"{old}/c/get", {})
            # Served after the stray request, the worker's reply to this one comes after
            # any reply to that one.
            assert (await d.request("c", "get"))["ok"]
            assert not stray.done()
