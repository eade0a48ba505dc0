"""LangChain's byte store on the worker: MqttByteStore passes langchain-tests' standard
suites (BaseStoreSyncTests, BaseStoreAsyncTests), unchanged, against a real broker and worker.

The worker runs as its own process (the synchronous suite blocks the test's thread)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

pytest.importorskip("langchain_tests")

from langchain_tests.integration_tests import BaseStoreAsyncTests, BaseStoreSyncTests

from tests.conftest import reap, spawn_worker, unique, wait_serving
from tests.processes import Mosquitto
from worker.client import BadRequestError
from worker.client.langchain import MqttByteStore


@pytest.fixture(scope="module")
def store_url(broker: Mosquitto) -> Iterator[str]:
    """A worker process of the module's own, and the URL of its memory."""
    prefix = unique("mem")
    proc = spawn_worker(broker, "--prefix", prefix, "--client-id", unique("stores-"))
    try:
        wait_serving(proc)
        yield f"mqtt://{broker.host}:{broker.port}/{prefix}"
    finally:
        reap(proc)


VALUES = (b"foo", b"\x00bar\xff", b"buzz" * 100)  # a NUL, a 0xff and some length


class TestMqttByteStoreSync(BaseStoreSyncTests[bytes]):
    @pytest.fixture
    def kv_store(self, store_url: str) -> Iterator[MqttByteStore]:
        store = MqttByteStore(unique("s"), "bytes", url=store_url)
        yield store
        store.close()

    @pytest.fixture
    def three_values(self) -> tuple[bytes, bytes, bytes]:
        return VALUES


class TestMqttByteStoreAsync(BaseStoreAsyncTests[bytes]):
    @pytest.fixture
    async def kv_store(self, store_url: str) -> AsyncIterator[MqttByteStore]:
        store = MqttByteStore(unique("s"), "bytes", url=store_url)
        yield store
        store.close()

    @pytest.fixture
    def three_values(self) -> tuple[bytes, bytes, bytes]:
        return VALUES


@pytest.mark.parametrize("how", ["mset", "amset"])
async def test_a_bad_pair_fails_mset_with_nothing_stored(store_url: str, how: str) -> None:
    """A value that is not bytes, or a key the worker refuses, fails the call before any
    pair is sent (the pairs before it were stored, and a str value said 'string argument
    without an encoding')."""
    store = MqttByteStore(unique("s"), "bytes", url=store_url)
    try:

        async def mset(pairs: list[tuple[str, Any]]) -> None:
            if how == "mset":
                await asyncio.to_thread(store.mset, pairs)
            else:
                await store.amset(pairs)

        with pytest.raises(
            TypeError, match="MqttByteStore stores bytes: the value of 'b' is a str"
        ):
            await mset([("a", b"1"), ("b", "not bytes")])
        with pytest.raises(BadRequestError, match="key"):
            await mset([("b", b"2"), ("", b"e")])
        assert await asyncio.to_thread(store.mget, ["a", "b"]) == [None, None]
        await mset([("a", bytearray(b"1")), ("b", memoryview(b"2"))])
        assert await asyncio.to_thread(store.mget, ["a", "b"]) == [b"1", b"2"]
    finally:
        await asyncio.to_thread(store.close)
