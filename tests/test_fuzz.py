"""Hostile input through the real broker: the worker never crashes, never gets disconnected,
answers each bad request that has a route with the right code, and keeps serving."""

from __future__ import annotations

import asyncio
import concurrent.futures
import random
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import aiomqtt
import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.clients import Device, decode, device, props, watcher
from tests.conftest import reap, spawn_worker, unique
from tests.processes import Mosquitto

T = TypeVar("T")
MAX_PAYLOAD = 4096


class Rig:
    """A worker program, an MQTT 5 device and a status watcher, on a loop in a thread, so
    that Hypothesis (synchronous) can drive them."""

    def __init__(self, broker: Mosquitto) -> None:
        self.broker = broker
        self.prefix, self.cid = unique("mem"), unique("w-")
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.statuses: list[str] = []
        self._online = threading.Event()
        self._stop: asyncio.Event | None = None
        self.proc = spawn_worker(
            broker,
            "--prefix",
            self.prefix,
            "--client-id",
            self.cid,
            "--max-payload-bytes",
            str(MAX_PAYLOAD),
        )
        self._device: concurrent.futures.Future[Device] = concurrent.futures.Future()
        self.peers = asyncio.run_coroutine_threadsafe(self._peers(), self.loop)
        self.device = self._device.result(30)

    async def _peers(self) -> None:
        status = f"{self.prefix}/_worker/{self.cid}/status"
        self._stop = asyncio.Event()
        async with (
            watcher(self.broker.host, self.broker.port, status) as seen,
            device(self.broker.host, self.broker.port, self.prefix) as d,
        ):
            first = decode(await seen.get())
            self.statuses.append(first["state"])
            while first["state"] != "online":
                first = decode(await seen.get())
                self.statuses.append(first["state"])
            self._device.set_result(d)
            stop = asyncio.create_task(self._stop.wait())
            while not stop.done():
                get = asyncio.create_task(seen.get())
                done, _ = await asyncio.wait({get, stop}, return_when=asyncio.FIRST_COMPLETED)
                if get in done:
                    self.statuses.append(decode(get.result())["state"])
                else:
                    get.cancel()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def close(self) -> None:
        assert self._stop is not None
        self.loop.call_soon_threadsafe(self._stop.set)
        self.peers.result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
        reap(self.proc, 15)


@pytest.fixture(scope="module")
def rig(broker: Mosquitto) -> Iterator[Rig]:
    r = Rig(broker)
    yield r
    assert r.proc.poll() is None, "the worker died"
    assert r.statuses == ["online"], r.statuses
    r.close()


def expected_codes(payload: bytes) -> set[str]:
    """What the contract says about a payload sent to append (an independent oracle)."""
    if len(payload) > MAX_PAYLOAD:
        return {"too_large"}
    try:
        body = msgpack.unpackb(payload, strict_map_key=False) if payload else {}
    except Exception:
        return {"bad_payload"}
    if not isinstance(body, dict):
        return {"bad_payload"}
    return {"bad_request", "ok"}


def _code(reply: dict[str, Any]) -> str:
    return "ok" if reply.get("ok") else str(reply["error"]["code"])


leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(),
    st.text(max_size=40),
    st.binary(max_size=40),
)
values = st.recursive(
    leaves,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=30,
)
fields = st.fixed_dictionaries(
    {},
    optional={
        "role": values,
        "content": values,
        "id": values,
        "last": values,
        "reply_to": values,
    },
)
payloads = st.one_of(
    st.binary(max_size=300),
    values.map(msgpack.packb),
    fields.map(msgpack.packb),
    st.builds(lambda b, cut: msgpack.packb(b)[:cut], fields, st.integers(0, 50)),
    st.builds(lambda n: b"\x91" * n + b"\xc0", st.integers(1, 3000)),
    st.builds(lambda n: b"\x81\xa4role" * n, st.integers(1, 2000)),
    st.builds(
        lambda s: msgpack.packb({"role": "u", "content": "x"})[:-1] + s,
        st.binary(min_size=1, max_size=4),
    ),
    st.integers(MAX_PAYLOAD + 1, MAX_PAYLOAD * 3).map(lambda n: b"\xc0" * n),
)


@settings(
    max_examples=1500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(payload=payloads)
def test_malformed_payloads_get_the_right_code(rig: Rig, payload: bytes) -> None:
    """Any malformed payload is answered with one of the codes it deserves."""
    reply = rig.call(rig.device.raw(f"{rig.prefix}/fz/append", payload))
    assert _code(reply) in expected_codes(payload)


@settings(max_examples=300, deadline=None)
@given(
    convo=st.text(min_size=1, max_size=70).filter(
        lambda t: (
            "/" not in t
            and "+" not in t
            and "#" not in t
            and "\x00" not in t
            and not any(
                0xD800 <= ord(ch) <= 0xDFFF
                or ord(ch) < 0x20
                or 0x7F <= ord(ch) <= 0x9F
                or 0xFDD0 <= ord(ch) <= 0xFDEF
                or (ord(ch) & 0xFFFE) == 0xFFFE
                for ch in t
            )
        )
    )
)
def test_odd_conversation_ids(rig: Rig, convo: str) -> None:
    """Any id Mosquitto lets through is either served or refused with bad_topic."""
    reply = rig.call(rig.device.request(convo, "get"))
    too_long = len(convo.encode()) > 128
    expected = "bad_topic" if too_long or convo[0] in "_$" else "ok"
    assert _code(reply) == expected


def test_random_bytes_flood(rig: Rig) -> None:
    """Thousands of random payloads at once, pipelined; every one answered."""
    rnd = random.Random(1234)
    blobs = [rnd.randbytes(rnd.randint(0, 200)) for _ in range(3000)]

    async def flood() -> list[dict[str, Any]]:
        futs = [
            await rig.device.send(f"{rig.prefix}/rb/append", b, qos=rnd.randint(0, 1))
            for b in blobs
        ]
        return [await rig.device.reply(f) for f in futs]

    replies = rig.call(flood())
    for blob, reply in zip(blobs, replies, strict=True):
        assert _code(reply) in expected_codes(blob)


def test_huge_headers_and_bad_routes(rig: Rig) -> None:
    """Big user properties and refused reply routes leave the worker serving."""

    async def go() -> dict[str, Any]:
        client: aiomqtt.Client = rig.device.client
        heavy = props(
            ResponseTopic=rig.device.inbox,
            CorrelationData=b"heavy",
            UserProperty=[(f"k{i}", "v" * 1000) for i in range(50)],
        )
        await client.publish(f"{rig.prefix}/hh/get", b"", qos=1, properties=heavy)
        for route in (f"{rig.prefix}/hh/append", "a/+/b", "#", "x" * 300, "$SYS/x", 5, b"r"):
            body = {"role": "u", "content": "x", "reply_to": route}
            async with aiomqtt.Client(rig.broker.host, rig.broker.port) as v311:
                await v311.publish(f"{rig.prefix}/hh/append", msgpack.packb(body), qos=1)
        return await rig.device.request("hh", "get")

    reply = rig.call(go())
    assert len(reply["turns"]) == 7
