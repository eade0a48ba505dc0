"""LangChain's byte store on the worker: MqttByteStore passes langchain-tests' standard
suites (BaseStoreSyncTests, BaseStoreAsyncTests), unchanged, against a real broker and worker.

The worker runs as its own process (the synchronous suite blocks the test's thread)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

pytest.importorskip("langchain_tests")

from langchain_tests.integration_tests import BaseStoreAsyncTests, BaseStoreSyncTests

from tests.conftest import reap, spawn_worker, unique, wait_serving
from tests.processes import Mosquitto
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
