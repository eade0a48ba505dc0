"""The wire contract end to end: real Mosquitto, real MQTT 5 and 3.1.1 clients."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any

import aiomqtt
import msgpack
import pytest

from tests.clients import Device, check, decode, device, next_message, watcher
from tests.conftest import WorkerFactory, unique
from tests.processes import Mosquitto
from worker.protocol import limits_payload
from worker.service import Service


async def test_append_get_delete(dev: Device) -> None:
    """append numbers turns, get returns them oldest first, delete removes them."""
    assert await dev.request("c1", "append", {"role": "user", "content": "hi"}) == {
        "ok": True,
        "seq": 1,
        "count": 1,
    }
    assert (await dev.request("c1", "append", {"role": "assistant", "content": "yo"}))["seq"] == 2
    reply = await dev.request("c1", "get")
    assert [(t["role"], t["content"], t["seq"]) for t in reply["turns"]] == [
        ("user", "hi", 1),
        ("assistant", "yo", 2),
    ]
    assert all(isinstance(t["ts"], float) for t in reply["turns"])
    assert (await dev.request("c1", "get", {"last": 1}))["turns"][0]["content"] == "yo"
    assert await dev.request("c1", "delete") == {"ok": True, "deleted": 2}
    assert await dev.request("c1", "get") == {"ok": True, "turns": [], "tokens": 0}
    assert await dev.request("c1", "delete") == {"ok": True, "deleted": 0}


async def test_id_is_echoed(dev: Device) -> None:
    """A request's id comes back as it was sent: str, int or bytes."""
    for req_id in ("abc", 42, b"\x00\xff"):
        reply = await dev.request("c", "get", {"id": req_id})
        assert reply["id"] == req_id


async def test_correlation_data_and_content_type(dev5: Device) -> None:
    """MQTT 5 replies carry the request's Correlation Data and application/msgpack."""
    fut = await dev5.send(f"{dev5.prefix}/c/get", {})
    message = await asyncio.wait_for(fut, 10)
    assert message.properties is not None
    assert getattr(message.properties, "CorrelationData", None) == (1).to_bytes(4, "big")
    assert getattr(message.properties, "ContentType", None) == "application/msgpack"


@pytest.mark.parametrize("qos", [0, 1])
async def test_reply_uses_the_request_qos(dev: Device, qos: int) -> None:
    """The reply is published with the QoS of its request."""
    fut = await dev.send(f"{dev.prefix}/c/get", {}, qos=qos)
    message = await asyncio.wait_for(fut, 10)
    assert message.qos == qos


@pytest.mark.parametrize(
    ("op", "payload", "code"),
    [
        ("append", b"\xc1\xc1", "bad_payload"),
        ("append", msgpack.packb([1, 2]), "bad_payload"),
        ("append", msgpack.packb({"role": "user"}), "bad_request"),
        ("append", msgpack.packb({"role": 5, "content": "x"}), "bad_request"),
        ("get", msgpack.packb({"last": -1}), "bad_request"),
        ("append", b"\x81\xa4role\xa3\xff\xfe\xfd", "bad_payload"),
        ("append", msgpack.packb({"role": "u", "content": "x" * 70_000}), "too_large"),
    ],
    ids=["garbage", "not-a-map", "missing", "wrong-type", "bad-last", "bad-utf8", "oversize"],
)
async def test_bad_input_gets_its_error_code(
    dev5: Device, op: str, payload: bytes, code: str
) -> None:
    """Each bad request with a route gets an error reply with the documented code."""
    reply = await dev5.raw(f"{dev5.prefix}/c/{op}", payload)
    check("error.reply", reply)
    assert reply["ok"] is False
    assert reply["error"]["code"] == code
    assert (await dev5.request("c", "get"))["ok"] is True


async def test_bad_request_via_reply_to(broker: Mosquitto, worker: Service) -> None:
    """A 3.1.1 device gets its error on reply_to, with its id."""
    async with device(broker.host, broker.port, worker.cfg.prefix, v5=False) as d:
        reply = await d.request("c", "append", {"role": "", "content": "x", "id": 9})
        assert reply["error"]["code"] == "bad_request"
        assert reply["id"] == 9


async def test_a_device_that_sends_json_is_told_so(broker: Mosquitto, worker: Service) -> None:
    """JSON's `{` is a msgpack integer: a device that sent JSON was told its payload 'holds
    more than one msgpack value', and one under MQTT 3.1.1, whose reply_to is inside the
    JSON, got no reply at all (two trials). Both hear 'looks like JSON', the 3.1.1 one on
    its reply_to with its id; the worker goes on serving."""
    async with device(broker.host, broker.port, worker.cfg.prefix) as d5:
        reply = await d5.raw(f"{d5.prefix}/c/append", b'{"role": "user", "content": "hi"}\n')
        assert reply["error"]["code"] == "bad_payload"
        assert reply["error"]["message"].startswith("payload looks like JSON, not msgpack")
    inbox = f"reply/{unique('json')}"
    async with aiomqtt.Client(
        broker.host, broker.port, protocol=aiomqtt.ProtocolVersion.V311
    ) as d311:
        await d311.subscribe(inbox, qos=1)
        said = json.dumps({"role": "user", "content": "hi", "reply_to": inbox, "id": "j1"})
        await d311.publish(f"{worker.cfg.prefix}/c/append", said.encode(), qos=1)
        async with asyncio.timeout(10):
            message = await anext(d311.messages)
    reply = msgpack.unpackb(message.payload)
    check("error.reply", reply)
    assert reply["error"]["code"] == "bad_payload"
    assert reply["error"]["message"].startswith("payload looks like JSON, not msgpack")
    assert reply["id"] == "j1"
    async with device(broker.host, broker.port, worker.cfg.prefix, v5=False) as d:
        assert (await d.request("c", "get"))["ok"] is True


@pytest.mark.parametrize(
    ("body", "code", "words"),
    [
        ({"role": "user", "content": "x" * 70_000}, "too_large", "--max-payload-bytes"),
        ({"role": "user", "content": b"\xff"}, "bad_payload", "not valid UTF-8"),
    ],
    ids=["oversize", "bad-utf8"],
)
async def test_a_payload_not_decoded_whole_is_answered_on_its_reply_to(
    broker: Mosquitto, worker: Service, body: dict[str, Any], code: str, words: str
) -> None:
    """An MQTT 3.1.1 device's route is in its payload: one over --max-payload-bytes, or
    that cannot be decoded whole, is still answered there, with its id and the reason in
    a device's words (it got no reply at all, and retried for ever)."""
    raw = msgpack.packb({**body, "reply_to": "placeholder", "id": "r1"})
    if isinstance(body["content"], bytes):  # a str whose bytes are not UTF-8
        raw = raw.replace(b"\xc4\x01\xff", b"\xa1\xff")
    async with device(broker.host, broker.port, worker.cfg.prefix, v5=False) as d:
        route = f"{d.inbox}/1"
        raw = raw.replace(msgpack.packb("placeholder"), msgpack.packb(route))
        fut = d._waiting[route] = asyncio.get_running_loop().create_future()
        await d.client.publish(f"{d.prefix}/c/append", raw, qos=1)
        reply = await d.reply(fut)
    check("error.reply", reply)
    assert (reply["error"]["code"], reply["id"]) == (code, "r1")
    assert words in reply["error"]["message"]


@pytest.mark.parametrize("convo", ["_worker", "$x", "x" * 129])
async def test_bad_conversation_id(dev: Device, convo: str) -> None:
    """A conversation id the contract does not allow is answered bad_topic."""
    reply = await dev.request(convo, "get")
    assert reply["error"]["code"] == "bad_topic"


async def test_bad_routes_are_never_published(broker: Mosquitto, worker: Service) -> None:
    """Routes under P/, with wildcards or too long get no reply; the worker keeps serving."""
    p = worker.cfg.prefix
    async with (
        watcher(broker.host, broker.port, f"{p}/#", "elsewhere/#") as seen,
        device(broker.host, broker.port, p, v5=False) as d,
    ):
        bad = [f"{p}/victim/append", f"{p}/x", "elsewhere/+", "elsewhere/#", "e" * 300, 7]
        for route in bad:
            await d.client.publish(
                f"{p}/victim/append",
                msgpack.packb({"role": "user", "content": "x", "reply_to": route}),
                qos=1,
            )
        assert (await d.request("victim", "get"))["turns"][-1]["seq"] == len(bad)
        topics = []
        while not seen.empty():
            topics.append((await seen.get()).topic.value)
        requests = [f"{p}/victim/append"] * len(bad) + [f"{p}/victim/get"]
        assert [t for t in topics if not t.startswith(f"{p}/_worker/")] == requests
    assert worker.stats.refused["bad_route"] == len(bad)


async def test_retained_requests_are_ignored(
    broker: Mosquitto, worker_factory: WorkerFactory
) -> None:
    """A retained request is neither replayed on subscribe nor applied live."""
    async with worker_factory() as w, device(broker.host, broker.port, w.cfg.prefix) as d:
        topic = f"{w.cfg.prefix}/c/append"
        await d.client.publish(
            topic, msgpack.packb({"role": "u", "content": "live"}), qos=1, retain=True
        )
        assert (await d.request("c", "get"))["turns"] == []
        assert w.stats.ignored_retained == 1
    async with (
        worker_factory(prefix=w.cfg.prefix) as w2,
        device(broker.host, broker.port, w.cfg.prefix) as d,
    ):
        assert (await d.request("c", "get"))["turns"] == []
        assert w2.stats.ignored_retained == 1
        await d.client.publish(topic, b"", qos=1, retain=True)  # clear it


async def test_ordering_of_pipelined_appends(dev: Device) -> None:
    """Appends from one publisher are stored in the order published."""
    futs = [
        await dev.send(f"{dev.prefix}/c/append", {"role": "u", "content": str(i)})
        for i in range(200)
    ]
    replies = [await dev.reply(f) for f in futs]
    assert [r["seq"] for r in replies] == list(range(1, 201))
    turns = (await dev.request("c", "get"))["turns"]
    assert [t["content"] for t in turns] == [str(i) for i in range(192, 200)]


async def test_events_one_per_eviction(broker: Mosquitto, worker_factory: WorkerFactory) -> None:
    """lru, memory and deleted evictions are each announced once, on P/<convo>/evicted."""
    async with (
        worker_factory(
            max_conversations=2,
            max_bytes=1000,
            max_payload_bytes=256,
            convo_cost=0,  # the bytes are counted by hand below
            turn_cost=0,
            key_cost=0,
        ) as w,
        device(broker.host, broker.port, w.cfg.prefix) as d,
        watcher(broker.host, broker.port, f"{w.cfg.prefix}/+/evicted") as events,
    ):
        await d.request("a", "append", {"role": "u", "content": "1"})
        await d.request("b", "append", {"role": "u", "content": "2"})
        await d.request("c", "append", {"role": "u", "content": "3"})  # a: lru
        msg = await next_message(events)
        assert msg.topic.value == f"{w.cfg.prefix}/a/evicted"
        assert msg.qos == 1
        assert not msg.retain
        ev = decode(msg)
        check("evicted.event", ev)
        assert (ev["convo"], ev["reason"], ev["count"], ev["keys"]) == ("a", "lru", 1, 0)
        for _ in range(5):
            await d.request("c", "append", {"role": "u", "content": "x" * 200})
        await d.request("d", "append", {"role": "u", "content": "y" * 200})  # over 1000: b, c
        got = [decode(await next_message(events)) for _ in range(2)]
        assert [(e["convo"], e["reason"]) for e in got] == [("b", "lru"), ("c", "memory")]
        await d.request("d", "delete")
        ev = decode(await next_message(events))
        assert (ev["convo"], ev["reason"], ev["count"]) == ("d", "deleted", 1)
        await d.request("d", "delete")
        await d.request("d", "get")
        assert events.empty()
        assert w.stats.evictions == {"lru": 2, "memory": 1, "deleted": 1}


async def test_ttl_expiry_is_announced_without_a_touch(
    broker: Mosquitto, worker_factory: WorkerFactory
) -> None:
    """An idle conversation's ttl event goes out within about a second of expiry."""
    async with (
        worker_factory(ttl=0.3) as w,
        device(broker.host, broker.port, w.cfg.prefix) as d,
        watcher(broker.host, broker.port, f"{w.cfg.prefix}/+/evicted") as events,
    ):
        await d.request("idle", "append", {"role": "u", "content": "x"})
        t0 = asyncio.get_running_loop().time()
        ev = decode(await next_message(events))
        assert (ev["convo"], ev["reason"], ev["count"]) == ("idle", "ttl", 1)
        assert asyncio.get_running_loop().time() - t0 < 1.5
        assert await d.request("idle", "append", {"role": "u", "content": "y"}) == {
            "ok": True,
            "seq": 1,
            "count": 1,
        }


async def test_status_and_stats_are_retained(
    broker: Mosquitto, worker_factory: WorkerFactory
) -> None:
    """status says online while serving, offline after a graceful stop; stats count."""
    async with worker_factory() as w, device(broker.host, broker.port, w.cfg.prefix) as d:
        await d.request("c", "append", {"role": "u", "content": "x"})
        await d.raw(f"{w.cfg.prefix}/c/append", b"\xc1")
        base = f"{w.cfg.prefix}/_worker/{w.cfg.client_id}"
        async with watcher(broker.host, broker.port, f"{base}/status") as status:
            msg = await next_message(status)
            assert msg.retain
            check("status", decode(msg))
            assert decode(msg)["state"] == "online"
        async with watcher(broker.host, broker.port, f"{base}/stats") as stats:
            while True:  # retained first, then every --stats-interval
                body = decode(await next_message(stats))
                check("stats", body)
                if body["requests"] >= 2:
                    break
            assert body["conversations"] == 1
            assert body["turns"] == 1
            assert body["errors"] == {"bad_payload": 1}
    async with watcher(broker.host, broker.port, f"{base}/status") as status:
        assert decode(await next_message(status))["state"] == "offline"


async def test_worker_survives_broker_restart(
    own_broker: Mosquitto, worker_factory: WorkerFactory
) -> None:
    """After a broker restart the worker reconnects, re-subscribes and its memory is intact."""
    async with worker_factory(own_broker) as w:
        async with device(own_broker.host, own_broker.port, w.cfg.prefix) as d:
            # With an id: a broker stopped before it took in our PUBACK delivers the
            # request again after the restart, and only the id keeps it from counting twice.
            await d.request("c", "append", {"role": "u", "content": "before", "id": "b1"})
        own_broker.restart()
        await asyncio.wait_for(w.wait_connections(2), 15)
        async with device(own_broker.host, own_broker.port, w.cfg.prefix) as d:
            turns = (await d.request("c", "get"))["turns"]
            assert [t["content"] for t in turns] == ["before"]


async def test_many_devices_at_once(broker: Mosquitto, worker: Service) -> None:
    """Concurrent devices each see only their own conversation, in order."""

    async def one(i: int) -> list[int]:
        async with device(broker.host, broker.port, worker.cfg.prefix, v5=i % 2 == 0) as d:
            convo = f"d{i}-{uuid.uuid4().hex[:6]}"
            return [
                (await d.request(convo, "append", {"role": "u", "content": str(n)}))["seq"]
                for n in range(20)
            ]

    results = await asyncio.gather(*(one(i) for i in range(8)))
    assert all(r == list(range(1, 21)) for r in results)
    assert unique()  # unique names keep tests apart on the shared broker


class _Said(logging.Handler):
    """Sets `said` once a log record contains `words`."""

    def __init__(self, words: str) -> None:
        super().__init__()
        self.words, self.said = words, asyncio.Event()
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if self.words in message:
            self.records.append(message)
            self.said.set()


async def test_workers_on_one_prefix_with_other_limits_are_warned(
    worker_factory: WorkerFactory,
) -> None:
    """Two workers of one share group with other --max-turns would each trim the shared
    conversations to its own (found: a stray worker cut them to 5 turns, silently): each
    says so, once, naming the other and the limit, from the other's stats."""
    prefix = unique("mem")
    handler = _Said("with other limits")
    logging.getLogger("memory_worker").addHandler(handler)
    try:
        async with (
            worker_factory(prefix=prefix, shared_group="g", client_id="wide", max_turns=1000),
            worker_factory(prefix=prefix, shared_group="g", client_id="narrow", max_turns=5),
        ):
            await asyncio.wait_for(handler.said.wait(), 30)
    finally:
        logging.getLogger("memory_worker").removeHandler(handler)
    first = handler.records[0]
    assert "max_turns 5, here 1000" in first or "max_turns 1000, here 5" in first
    assert f"serves {prefix}/# with other limits" in first
    assert len(set(handler.records)) == len(handler.records)  # once each


async def test_every_worker_of_a_group_judges_a_new_one(worker_factory: WorkerFactory) -> None:
    """A share hands each message to one worker of the group, and retained ones to none: a
    worker that joined with other limits was named by one of the others, or by none. Each
    reads the others' status and stats itself: both name it."""
    prefix = unique("mem")
    handler = _Said("(max_turns 5, here 1000)")
    logging.getLogger("memory_worker").addHandler(handler)
    quiet = {"prefix": prefix, "shared_group": "g", "stats_interval": 3600}
    try:
        async with (
            worker_factory(**quiet, client_id=unique("a-"), max_turns=1000),
            worker_factory(**quiet, client_id=unique("b-"), max_turns=1000),
            worker_factory(**quiet, client_id=unique("c-"), max_turns=5),
        ):
            while len(handler.records) < 2:
                handler.said.clear()
                await asyncio.wait_for(handler.said.wait(), 30)
    finally:
        logging.getLogger("memory_worker").removeHandler(handler)
    assert len(handler.records) == 2


async def test_a_restarted_workers_stats_of_its_run_before_are_not_judged(
    broker: Mosquitto, worker_factory: WorkerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker restarted with other limits: its stats of the run before (retained) came
    first, and the others named the old limits. Stats older than its status are not read."""
    prefix = unique("mem")
    async with worker_factory(prefix=prefix, shared_group="g", client_id=unique("a-")) as w:
        peer, now = unique("p-"), time.time()
        ours = limits_payload(w.cfg.limits)
        before = {"client_id": peer, "ts": now - 5, "stats_interval": 10, "shared_group": "g"}
        async with aiomqtt.Client(broker.host, broker.port) as c:
            topic = f"{prefix}/_worker/{peer}"
            stale = before | {"backend": "memory", "limits": ours | {"max_turns": 20}}
            await c.publish(f"{topic}/stats", msgpack.packb(stale), qos=1, retain=True)
            online = {"state": "online", "client_id": peer, "ts": now}
            await c.publish(f"{topic}/status", msgpack.packb(online), qos=1, retain=True)
            fresh = stale | {"ts": now + 1, "limits": ours}
            await c.publish(f"{topic}/stats", msgpack.packb(fresh), qos=1, retain=True)
            for leaf in ("stats", "status"):
                await c.publish(f"{topic}/{leaf}", b"", qos=1, retain=True)
        async with device(broker.host, broker.port, prefix) as d:
            assert (await d.request("c", "get"))["ok"]  # after those, in order
    assert not [r for r in caplog.records if "other limits" in r.getMessage()]


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ({}, {"shared_group": "g"}),  # scripts/run's worker beside docs/scaling.md's group
        ({}, {}),
        ({"shared_group": "g"}, {"shared_group": "h"}),
    ],
    ids=["one-outside", "both-outside", "two-groups"],
)
async def test_workers_on_one_prefix_apart_are_warned(
    worker_factory: WorkerFactory, first: dict[str, str], second: dict[str, str]
) -> None:
    """Two workers on one prefix, not both in one share group, each receive every request and
    answer it from their own store: two replies, two histories (a user ran docs/scaling.md's
    group beside scripts/run's worker). A worker that sees the other's stats says so, once."""
    prefix = unique("mem")
    handler = _Said("each request reaches both")
    logging.getLogger("memory_worker").addHandler(handler)
    try:
        async with (
            worker_factory(prefix=prefix, client_id=unique("a-"), **first),
            worker_factory(prefix=prefix, client_id=unique("b-"), **second),
        ):
            await asyncio.wait_for(handler.said.wait(), 30)
    finally:
        logging.getLogger("memory_worker").removeHandler(handler)
    assert f"serves {prefix}/# " in handler.records[0]
    assert "--shared-group" in handler.records[0]
    assert len(set(handler.records)) == len(handler.records)  # once each


async def test_a_stopped_worker_on_the_prefix_is_not_warned_of(
    broker: Mosquitto, worker_factory: WorkerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A stopped worker's last stats stay retained (and recent, a while): docs/scaling.md's
    group started after scripts/run's worker was stopped must not be told that worker
    answers every request too. Its status says offline."""
    prefix = unique("mem")
    async with worker_factory(prefix=prefix, client_id=unique("alone-")):
        pass
    async with (
        worker_factory(prefix=prefix, client_id=unique("grouped-"), shared_group="g"),
        device(broker.host, broker.port, prefix) as d,
    ):
        assert (await d.request("c", "get"))["ok"]  # after the retained ones, in order
    assert not [r for r in caplog.records if "each request reaches both" in r.getMessage()]


@pytest.mark.parametrize("second", ["sqlite", "memory"])
async def test_a_share_group_on_stores_of_their_own_is_warned(
    worker_factory: WorkerFactory, tmp_path: Path, second: str
) -> None:
    """A share group hands each request to one of its workers: on other backends, or each
    on the memory backend (the default), each keeps its own store, and a conversation's turns
    alternate between two histories."""
    prefix = unique("mem")
    handler = _Said("two histories")
    logging.getLogger("memory_worker").addHandler(handler)
    backend = f"sqlite:///{tmp_path}/m.db" if second == "sqlite" else "memory"
    try:
        async with (
            worker_factory(prefix=prefix, shared_group="g", client_id=unique("a-")),
            worker_factory(
                prefix=prefix, shared_group="g", client_id=unique("b-"), backend=backend
            ),
        ):
            await asyncio.wait_for(handler.said.wait(), 30)
    finally:
        logging.getLogger("memory_worker").removeHandler(handler)
    assert "A share group needs one Redis" in handler.records[0]
    assert f"backend {second}" in handler.records[0] or f"on {second}:" in handler.records[0]


async def test_a_share_group_on_two_redis_databases_is_warned(
    worker_factory: WorkerFactory, redis_url: str
) -> None:
    """Two workers of a group on Redis, but two databases of it (or two Redis servers): each
    request goes to one of them, each keeps its own store, and nothing was said (only the
    backend's kind was compared; a new operator's trial). Each store has a name now, in the
    stats, and a worker that sees another's says so."""
    prefix = unique("mem")
    handler = _Said("from another store")
    logging.getLogger("memory_worker").addHandler(handler)
    base = redis_url.rsplit("/", 1)[0]
    try:
        async with (
            worker_factory(
                prefix=prefix, shared_group="g", client_id=unique("a-"), backend=f"{base}/1"
            ) as a,
            worker_factory(
                prefix=prefix, shared_group="g", client_id=unique("b-"), backend=f"{base}/2"
            ) as b,
        ):
            await asyncio.wait_for(handler.said.wait(), 30)
            names = {a.backend.store_id, b.backend.store_id}
    finally:
        logging.getLogger("memory_worker").removeHandler(handler)
    assert len(names) == 2
    assert None not in names
    assert "--backend" in handler.records[0]
    assert all(name in handler.records[0] for name in names if name)


async def test_stats_of_any_shape_on_a_worker_topic_cost_no_request_its_reply(
    broker: Mosquitto, worker: Service
) -> None:
    """Anyone the broker lets may publish on a worker's topics: stats of a foreign shape
    (limits a list, a client id a list, not a map) among requests are ignored, and every
    request is answered (the comparison of limits raised, and cost the batch its replies)."""
    prefix = worker.cfg.prefix
    bad = [
        {"client_id": "evil", "limits": ["ttl"], "ts": time.time() + 1e9},
        {"client_id": ["evil"], "limits": {"ttl": 1}, "ts": time.time()},
        "not a map",
    ]
    async with device(broker.host, broker.port, prefix) as d:
        sent: list[Any] = []
        for i in range(90):  # published at once: the worker reads them in batches
            if i % 30 == 15:
                stats = msgpack.packb(bad[i // 30])
                sent.append(d.client.publish(f"{prefix}/_worker/evil/stats", stats, qos=1))
            sent.append(d.send(f"{prefix}/c/get", {}))
        futs = [f for f in await asyncio.gather(*sent) if f is not None]
        replies = [await d.reply(f) for f in futs]
    assert [r["ok"] for r in replies] == [True] * 90


async def test_stats_of_many_strangers_name_a_few_of_them(
    broker: Mosquitto, worker: Service
) -> None:
    """Anyone the broker lets may publish stats on a worker's topics: stats of a hundred
    workers with other limits are warned of for the first 16 only (each was one more
    warning, and one more entry kept for good)."""
    prefix = worker.cfg.prefix
    handler = _Said("with other limits")
    logging.getLogger("memory_worker").addHandler(handler)
    try:
        async with device(broker.host, broker.port, prefix) as d:
            body = worker.stats_body()
            del body["shared_group"]  # as an older worker's: only the limits differ
            for i in range(100):
                body |= {"client_id": f"stranger-{i}", "ts": time.time()}
                body["limits"] = {**body["limits"], "max_turns": 1000 + i}
                stats = msgpack.packb(body)
                online = msgpack.packb({"state": "online", "client_id": f"stranger-{i}"})
                await d.client.publish(f"{prefix}/_worker/stranger-{i}/status", online, qos=1)
                await d.client.publish(f"{prefix}/_worker/stranger-{i}/stats", stats, qos=1)
            assert (await d.request("c", "get"))["ok"]  # read after them all
    finally:
        logging.getLogger("memory_worker").removeHandler(handler)
    assert len(handler.records) == 16
