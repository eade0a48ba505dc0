"""--event-format json and --ha-discovery: events, status and stats any dashboard tool reads."""

from __future__ import annotations

import asyncio
import json
import re
import signal
from typing import Any

import aiomqtt
import msgpack

from tests.clients import check, device, next_message, watcher
from tests.conftest import WorkerFactory, reap, spawn_worker, unique
from tests.processes import Mosquitto
from worker import constants as c
from worker.protocol import (
    Eviction,
    content_type,
    decode_event,
    encode,
    encode_event,
    ha_discovery,
    ha_node_id,
)


def content_type_of(msg: aiomqtt.Message) -> str | None:
    return getattr(msg.properties, "ContentType", None)


def as_json(msg: aiomqtt.Message) -> Any:
    assert content_type_of(msg) == "application/json"
    assert isinstance(msg.payload, bytes)
    return json.loads(msg.payload.decode("utf-8"))


def test_json_encoding_keeps_fields_and_numbers() -> None:
    """JSON events carry the msgpack fields, numbers as numbers, UTF-8 as is."""
    ev = Eviction("kiosk-é", "lru", 3, 1, 1.5)
    assert json.loads(encode_event(ev, c.FORMAT_JSON)) == msgpack.unpackb(encode_event(ev))
    assert encode({"evictions": {"lru": 2}}, c.FORMAT_JSON) == b'{"evictions":{"lru":2}}'
    for fmt in c.EVENT_FORMATS:
        for ctype in (content_type(fmt), None):
            decoded = decode_event(encode_event(ev, fmt), ctype)
            assert decoded == msgpack.unpackb(encode_event(ev))


def test_ha_discovery_configs_are_stable_and_valid() -> None:
    """Every discovery config is schema-valid JSON with a unique, stable unique_id."""
    configs = ha_discovery(
        "homeassistant", "mem/_worker/w 1/status", "mem/_worker/w 1/stats", "w 1", "0.1.0"
    )
    assert configs == ha_discovery(
        "homeassistant", "mem/_worker/w 1/status", "mem/_worker/w 1/stats", "w 1", "0.1.0"
    )
    ids = set()
    for topic, payload in configs:
        body = json.loads(payload)
        check("ha.discovery", body)
        assert re.fullmatch(r"homeassistant/(sensor|binary_sensor)/w_1/\w+/config", topic)
        ids.add(body["unique_id"])
    assert len(ids) == len(configs)
    assert ha_node_id("a/b+c") == "a_b_c"


async def test_json_events_status_and_stats(
    broker: Mosquitto, worker_factory: WorkerFactory
) -> None:
    """With --event-format json, events, status and stats are schema-valid JSON, typed so."""
    async with worker_factory(event_format="json", max_conversations=1) as w:
        base = f"{w.cfg.prefix}/_worker/{w.cfg.client_id}"
        async with (
            watcher(broker.host, broker.port, f"{w.cfg.prefix}/+/evicted") as events,
            device(broker.host, broker.port, w.cfg.prefix) as d,
        ):
            await d.request("a", "append", {"role": "u", "content": "x"})
            await d.request("b", "append", {"role": "u", "content": "y"})  # evicts a (lru)
            ev = as_json(await next_message(events))
            check("evicted.event", ev)
            assert (ev["convo"], ev["reason"], ev["count"]) == ("a", "lru", 1)
            # replies stay msgpack
            assert await d.request("b", "get", {}) is not None
        async with watcher(broker.host, broker.port, f"{base}/status") as status:
            body = as_json(await next_message(status))
            check("status", body)
            assert body["state"] == "online"
        async with watcher(broker.host, broker.port, f"{base}/stats") as stats:
            while True:
                body = as_json(await next_message(stats))
                check("stats", body)
                if body["evictions"].get("lru") == 1:
                    break
            assert body["limits"]["max_conversations"] == 1
            assert body["limits"]["max_bytes"] == c.DEFAULT_MAX_BYTES


async def test_msgpack_stays_the_default_and_says_so(
    broker: Mosquitto, worker_factory: WorkerFactory
) -> None:
    """By default status and stats are msgpack with Content Type application/msgpack."""
    async with worker_factory() as w:
        base = f"{w.cfg.prefix}/_worker/{w.cfg.client_id}"
        async with watcher(broker.host, broker.port, f"{base}/+") as queue:
            for _ in range(2):
                msg = await next_message(queue)
                assert content_type_of(msg) == "application/msgpack"
                assert isinstance(msg.payload, bytes)
                body = msgpack.unpackb(msg.payload)
                check("stats" if msg.topic.value.endswith("stats") else "status", body)


async def test_json_last_will(broker: Mosquitto) -> None:
    """A killed worker's Last Will is JSON too under --event-format json."""
    prefix, client_id = unique("mem"), unique("w")
    status_topic = f"{prefix}/_worker/{client_id}/status"
    proc = spawn_worker(
        broker, "--prefix", prefix, "--client-id", client_id, "--event-format", "json"
    )
    try:
        async with watcher(broker.host, broker.port, status_topic) as status:
            assert as_json(await next_message(status))["state"] == "online"
            reap(proc, signal.SIGKILL)
            body = as_json(await next_message(status))
            check("status", body)
            assert body["state"] == "offline"
    finally:
        reap(proc)


async def test_ha_discovery_configs_are_retained(broker: Mosquitto) -> None:
    """--ha-discovery publishes retained configs naming the worker's real topics."""
    prefix, client_id, ha = unique("mem"), unique("w"), unique("ha")
    proc = spawn_worker(
        broker,
        "--prefix", prefix,
        "--client-id", client_id,
        "--event-format", "json",
        "--ha-discovery", ha,
    )  # fmt: skip
    try:
        async with watcher(broker.host, broker.port, f"{prefix}/_worker/{client_id}/status") as s:
            await next_message(s)  # online: the configs follow it on the same connection
        async with watcher(broker.host, broker.port, f"{ha}/#") as queue:
            configs: dict[str, Any] = {}
            while len(configs) < len(c.REASONS) + 8:
                msg = await next_message(queue)
                assert msg.retain
                configs[msg.topic.value] = as_json(msg)
        stats_topic = f"{prefix}/_worker/{client_id}/stats"
        assert configs[f"{ha}/sensor/{client_id}/bytes/config"]["state_topic"] == stats_topic
        online = configs[f"{ha}/binary_sensor/{client_id}/online/config"]
        assert online["state_topic"] == f"{prefix}/_worker/{client_id}/status"
        for body in configs.values():
            check("ha.discovery", body)
    finally:
        reap(proc, signal.SIGTERM)


def test_ha_discovery_without_json_is_refused(broker: Mosquitto) -> None:
    """--ha-discovery with msgpack events exits 2 with one line saying what to add."""
    for extra in ([], ["--event-format", "msgpack"]):
        proc = spawn_worker(broker, "--ha-discovery", "homeassistant", *extra)
        out, _ = proc.communicate(timeout=15)
        assert proc.returncode == 2
        assert out.strip().count("\n") == 0
        assert "--ha-discovery needs --event-format json" in out
    proc = spawn_worker(broker, "--event-format", "xml")
    out, _ = proc.communicate(timeout=15)
    assert proc.returncode == 2
    assert "--event-format must be msgpack or json" in out


async def test_client_reads_json_events_and_stats(
    broker: Mosquitto, worker_factory: WorkerFactory
) -> None:
    """The Python client (and so memctl watch and stats) reads a JSON worker's events and
    stats as it reads msgpack ones."""
    from worker.client import MemoryClient

    async with (
        worker_factory(event_format="json") as w,
        MemoryClient(broker.host, broker.port, w.cfg.prefix) as m,
    ):
        events = m.evictions("c")
        first = asyncio.ensure_future(anext(events))
        while not first.done():  # until the client's subscription sees a deletion
            await m.append("c", "user", "hi")
            await m.forget("c")
            await asyncio.wait({first}, timeout=0.5)
        event = first.result()
        assert event["convo"] == "c"
        assert event["reason"] == "deleted"
        stats = await m.stats()
        assert [s["client_id"] for s in stats] == [w.cfg.client_id]
        await events.aclose()
