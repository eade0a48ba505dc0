"""The Python client: one behaviour suite over mqtt:// (MQTT 5 and 3.1.1) and memory://,
concurrency through one and several clients, and exactly-once appends across a drop."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import msgpack
import pytest

from tests.clients import AckHolder, decode, next_message, watcher
from tests.conftest import WorkerFactory, make_config, running, unique
from tests.processes import Mosquitto, SplitProxy
from worker.client import (
    Appended,
    BadRequestError,
    BadTopicError,
    BlockingMemoryClient,
    LocalMemory,
    Memory,
    MemoryClient,
    MemoryWorkerError,
    NoReplyError,
    TooLargeError,
    memory_from_url,
    open_blocking_memory,
    open_memory,
)
from worker.client._mqtt import _Reply
from worker.service import Service


@pytest.fixture(params=["mqtt5", "mqtt311", "memory"])
async def memory(
    request: pytest.FixtureRequest, broker: Mosquitto, worker_factory: WorkerFactory
) -> AsyncIterator[Memory]:
    """The same API over a worker (each protocol) and in this process, max_turns 4."""
    if request.param == "memory":
        async with open_memory("memory://?max_turns=4&ttl=3600&max_conversations=50") as m:
            yield m
        return
    async with worker_factory(max_turns=4, max_conversations=50) as w:
        protocol = 5 if request.param == "mqtt5" else 3
        url = f"mqtt://{broker.host}:{broker.port}/{w.cfg.prefix}?protocol={protocol}"
        async with open_memory(url) as m:
            yield m


async def test_append_and_get_keep_order_and_bound(memory: Memory) -> None:
    """Appends answer seq and count; get returns the last max_turns turns, oldest first."""
    convo = unique("c")
    done = [await memory.append(convo, "user", f"m{i}") for i in range(6)]
    assert [(d.seq, d.count) for d in done] == [(1, 1), (2, 2), (3, 3), (4, 4), (5, 4), (6, 4)]
    turns = await memory.get(convo)
    assert [(t["seq"], t["role"], t["content"]) for t in turns] == [
        (3, "user", "m2"),
        (4, "user", "m3"),
        (5, "user", "m4"),
        (6, "user", "m5"),
    ]
    assert all(isinstance(t["ts"], float) for t in turns)
    assert [t["seq"] for t in await memory.get(convo, last=2)] == [5, 6]
    assert await memory.get(unique("never")) == []


async def test_state_round_trip(memory: Memory) -> None:
    """save, load, get_all and delete keep the old store's signatures and answers."""
    s = unique("s")
    value: dict[str, Any] = {"a": [1, 2.5, None, True], "b": b"\x00\xff"}
    await memory.save(s, "prefs", "k1", value)
    await memory.save(s, "prefs", "k2", "two", ttl=60)
    assert await memory.load(s, "prefs", "k1") == value
    assert await memory.load(s, "prefs", "missing") is None
    assert await memory.load(s, "prefs", "missing", default=...) is ...
    await memory.save(s, "prefs", "nil", None)
    assert await memory.load(s, "prefs", "nil", default=...) is None  # found: nil
    assert await memory.get_all(s, "prefs") == {"k1": value, "k2": "two", "nil": None}
    await memory.delete(s, "prefs", "nil")
    assert await memory.delete(s, "prefs", "k1") is True
    assert await memory.delete(s, "prefs", "k1") is False
    assert await memory.get_all(s, "prefs") == {"k2": "two"}


async def test_forget_removes_turns_and_reports_eviction(memory: Memory) -> None:
    """forget answers the turns removed, and a 'deleted' eviction reaches evictions()."""
    convo = unique("c")
    events = memory.evictions(convo)
    first = asyncio.ensure_future(anext(events))
    await asyncio.sleep(0)  # let the iterator subscribe before the delete
    if isinstance(memory, MemoryClient):
        await memory.get(convo)  # a round trip after which the subscription is in place
    await memory.append(convo, "user", "hi")
    await memory.append(convo, "assistant", "hello")
    assert await memory.forget(convo) == 2
    event = await asyncio.wait_for(first, 10)
    assert (event["convo"], event["reason"], event["count"]) == (convo, "deleted", 2)
    assert await memory.get(convo) == []
    await events.aclose()


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda m: m.append("a+b", "user", "x"), BadTopicError),
        (lambda m: m.append("a/b", "user", "x"), BadTopicError),
        (lambda m: m.append("", "user", "x"), BadTopicError),
        (lambda m: m.append("x" * 129, "user", "x"), BadTopicError),
        (lambda m: m.append("_worker", "user", "x"), BadTopicError),
        (lambda m: m.get(7), BadTopicError),  # it was AttributeError: 'int' ... 'encode'
        (lambda m: m.append("c", "", "x"), BadRequestError),
        (lambda m: m.save("c", "ns", "k" * 129, 1), BadRequestError),
        (lambda m: m.load("c", "", "k"), BadRequestError),
        (lambda m: m.get("c", last=0), BadRequestError),
        (lambda m: m.save("c", "ns", "k", 1, ttl=-1), BadRequestError),
        (lambda m: m.save("c", "ns", "k", object()), BadRequestError),  # not msgpack
        (lambda m: m.save("c", "ns", "k", 2**64), BadRequestError),
    ],
)
async def test_refused_input_raises_the_workers_code(
    memory: Memory, call: Any, error: type[MemoryWorkerError]
) -> None:
    """Input the contract refuses raises the subclass of the code the worker would answer."""
    with pytest.raises(error) as info:
        await call(memory)
    assert info.value.code == error.code
    assert info.value.message


async def test_too_large_comes_from_the_worker(memory: Memory) -> None:
    """A payload over --max-payload-bytes is refused by the worker itself: TooLargeError,
    naming the limit; memory:// measures it as the worker would (it stored a megabyte).
    MQTT 3.1.1's reply_to is in the payload the worker refuses: it reads that much of it
    (there was no reply, and the client only guessed why)."""
    setting = "memory://?max_payload_bytes" if isinstance(memory, LocalMemory) else "the worker's"
    with pytest.raises(TooLargeError, match=rf"the limit is 65536 \({re.escape(setting)}"):
        await memory.append(unique("c"), "user", "x" * 70000)
    assert (await memory.append(unique("c"), "user", "x" * 65000)).seq == 1


async def test_a_request_over_the_brokers_packet_limit_under_mqtt_311_says_so(
    broker: Mosquitto, worker_factory: WorkerFactory
) -> None:
    """Mosquitto closes the connection of a packet over its max_packet_size; MQTT 3.1.1's
    CONNACK does not say the limit (MQTT 5's does: TooLargeError before sending). The error
    says the request may be the cause, not only that the broker went away."""
    async with (
        worker_factory() as w,
        MemoryClient(
            broker.host, broker.port, w.cfg.prefix, protocol=3, timeout=1, attempts=2
        ) as m,
    ):
        with pytest.raises(NoReplyError, match=r"the 2000\d{3}-byte request may be what ends it"):
            await m.append(unique("c"), "user", "x" * 2_000_000)
        assert await m.get(unique("c")) == []  # and it goes on


async def test_no_reply_with_a_login_asks_whether_it_may_read_its_replies(
    broker: Mosquitto,
) -> None:
    """A broker whose ACL is a file grants the reply subscription and delivers nothing there:
    with a login, no reply asks whether the user may read reply_prefix, as memctl's does (it
    asked only whether a worker runs)."""
    async with MemoryClient(
        broker.host, broker.port, unique("nobody"), username="bob", timeout=0.3, attempts=1
    ) as m:
        with pytest.raises(
            NoReplyError, match=r"And may 'bob' read reply_prefix 'nobody\w+-reply'\?$"
        ):
            await m.get("c")
    # MQTT 3.1.1 has no PUBACK that refuses: its publish may be what the ACL drops (a trial)
    async with MemoryClient(
        broker.host,
        broker.port,
        prefix := unique("nobody"),
        username="bob",
        timeout=0.3,
        attempts=1,
        protocol=3,
    ) as m:
        with pytest.raises(NoReplyError, match=rf"\? And publish to '{prefix}/c/get'\?$"):
            await m.get("c")


async def test_memory_url_takes_the_payload_limit() -> None:
    async with open_memory("memory://?max_payload_bytes=2000000") as m:
        assert (await m.append("c", "user", "x" * 1_000_000)).seq == 1
    async with open_memory("memory://?max_payload_bytes=300") as m:
        # Its own setting named, not the worker's flag (a trial)
        with pytest.raises(TooLargeError, match=r"limit is 300 \(memory://\?max_payload_bytes\)"):
            await m.append("c", "user", "x" * 500)
    with pytest.raises(ValueError, match="bad number"):
        memory_from_url("memory://?max_payload_bytes=lots")
    with pytest.raises(ValueError, match="at least 256"):
        memory_from_url("memory://?max_payload_bytes=0")
    for url in ("memory://somehost", "memory:///mem"):  # left aside in silence
        with pytest.raises(ValueError, match="no host nor prefix"):
            memory_from_url(url)


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ("max_turns=0", "max_turns must be at least 1, got 0"),
        ("max_conversations=0", "max_conversations must be at least 1, got 0"),
        ("max_keys=0", "max_keys must be at least 1"),
        ("ttl=-5", "ttl must be 0 (off) or more seconds, got -5.0"),
        ("ttl=nan", "ttl must be 0 (off) or more seconds, got nan"),  # a review
        ("ttl=inf", "ttl must be 0 (off) or more seconds, got inf"),
        ("max_bytes=1000", "max_bytes (1000) must be at least max_payload_bytes (65536)"),
        ("convo_cost=0", "memory:// does not take convo_cost"),
    ],
)
def test_memory_url_refuses_the_limits_the_worker_refuses(query: str, words: str) -> None:
    """As the worker's flags: a limit that cannot work (max_turns=0 broke the first append
    with an IndexError; ttl=-5 made every read empty)."""
    with pytest.raises(ValueError, match=re.escape(words)):
        memory_from_url(f"memory://?{query}")


async def test_a_request_past_the_brokers_packet_size_is_too_large_at_once(
    broker: Mosquitto, worker: Service
) -> None:
    """Over the Maximum Packet Size the broker announced (MQTT 5), a request is refused before
    sending: the broker would drop the connection, and every attempt was "connection lost"."""
    async with MemoryClient(broker.host, broker.port, worker.cfg.prefix, timeout=2) as m:
        with pytest.raises(TooLargeError, match="takes packets of up to 1048576 bytes"):
            await m.append("c", "user", "x" * 2_000_000)
        assert (await m.append("c", "user", "x")).seq == 1


async def test_no_worker_is_a_timeout(broker: Mosquitto) -> None:
    """Without a worker the call raises NoReplyError, which is a TimeoutError."""
    async with MemoryClient(broker.host, broker.port, unique("p"), timeout=0.2, attempts=2) as m:
        with pytest.raises(TimeoutError) as info:
            await m.get("c")
    assert isinstance(info.value, NoReplyError)
    assert info.value.code == "timeout"


async def test_a_timed_out_or_cancelled_request_leaves_no_task(broker: Mosquitto) -> None:
    """A request that times out, or is cancelled while it waits, leaves no task running."""
    prefix = unique("p")
    async with (
        watcher(broker.host, broker.port, f"{prefix}/c/get") as sent,
        MemoryClient(broker.host, broker.port, prefix, timeout=0.2, attempts=1) as m,
    ):
        before = asyncio.all_tasks()
        with pytest.raises(NoReplyError):
            await m.get("c")
        await next_message(sent)
        m.timeout = 30
        call = asyncio.create_task(m.get("c"))
        await next_message(sent)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        # aiomqtt's `messages` makes a Queue.get task per message; those are not the call's.
        left = {
            t
            for t in asyncio.all_tasks() - before - {asyncio.current_task()}
            if t.get_coro().__qualname__ != "Queue.get"  # type: ignore[union-attr]
        }
        async with asyncio.timeout(2):
            await asyncio.gather(*left, return_exceptions=True)


def test_the_api_methods_keep_their_signatures_and_types() -> None:
    """The methods made from plans show their own parameters and results to help(), inspect
    and typing (typing saw *args, **kwargs and a TypeVar)."""
    import inspect
    import typing

    for api in (MemoryClient, BlockingMemoryClient, LocalMemory):
        hints = typing.get_type_hints(api.append)
        assert hints["return"] is Appended
        assert hints["convo_id"] is str
        assert str(inspect.signature(api.append)).startswith("(self, convo_id: 'str', role:")
    assert inspect.iscoroutinefunction(MemoryClient.append)


async def test_open_memory_used_as_the_memory_says_how_to_open_it() -> None:
    """`m = open_memory(url)` then `await m.get(...)` was AttributeError on a context
    manager ('_AsyncGeneratorContextManager' object has no attribute 'get')."""
    opening = open_memory("memory://")
    with pytest.raises(AttributeError, match=r"async with open_memory\(url\) as memory: await"):
        await opening.get("c")
    assert not hasattr(opening, "get")  # duck typing still works
    with (  # it named a private class
        pytest.raises(TypeError, match=r"an `async with` block, not `with`"),
        open_memory("memory://"),
    ):
        pass
    async with open_memory("memory://") as m:
        assert (await m.append("c", "user", "x")).seq == 1


@pytest.mark.parametrize("protocol", [5, 3])
async def test_a_client_not_open_says_so_and_closing_ends_its_iterators(
    broker: Mosquitto, worker: Service, protocol: int
) -> None:
    """Before `async with` and after it, a call raises RuntimeError at once (it was
    NoReplyError after every attempt's timeout); so does a second `async with` (it took the
    first one's connection down when it ended); an evictions() iterator waiting when the
    client closes ends."""
    m = MemoryClient(
        broker.host, broker.port, worker.cfg.prefix, timeout=0.5, attempts=1, protocol=protocol
    )
    with pytest.raises(RuntimeError, match="not open"):
        await m.get("c")
    convo = unique("c")
    opened = await asyncio.gather(m.__aenter__(), m.__aenter__(), return_exceptions=True)
    assert m in opened
    assert [str(e) for e in opened if e is not m] == [
        "the memory client is already open: one `async with` at a time"
    ]
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_exit(m)
        with pytest.raises(RuntimeError, match="already open"):
            await m.__aenter__()
        events = m.evictions(convo)
        first = asyncio.ensure_future(anext(events))
        await asyncio.sleep(0)  # let the iterator subscribe before the delete
        await m.append(convo, "user", "x")
        assert await m.forget(convo) == 1
        assert (await asyncio.wait_for(first, 10))["convo"] == convo
        second = asyncio.ensure_future(anext(events))
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(second, 10)
    with pytest.raises(RuntimeError, match="not open"):
        await m.append("c", "user", "x")
    with pytest.raises(RuntimeError, match="not open"):
        await anext(m.evictions())


async def test_memory_url_not_open_says_so_as_the_mqtt_client_does() -> None:
    """memory:// outside its `async with` raises RuntimeError at once, as MemoryClient does
    (it went on storing after the block ended), and a second `async with` is refused."""
    memory = memory_from_url("memory://")
    with pytest.raises(RuntimeError, match="not open"):
        await memory.get("c")
    async with memory:
        await memory.append("c", "user", "x")
        with pytest.raises(RuntimeError, match="already open"):
            await memory.__aenter__()
    for call in (memory.get("c"), memory.append("c", "user", "y"), memory.stats()):
        with pytest.raises(RuntimeError, match="not open"):
            await call
    with pytest.raises(RuntimeError, match="not open"):
        await anext(memory.evictions())
    async with memory:  # open again, as MemoryClient may be
        assert [t["content"] for t in await memory.get("c")] == ["x"]


async def test_stats_and_retire_without_a_broker_say_so(tmp_path: Path) -> None:
    """With the broker gone, stats() and retire() raise NoReplyError after the client's
    timeout: they answered "no worker" ([] and "unknown") as if they had asked."""
    b = Mosquitto(tmp_path).start()
    try:
        async with MemoryClient(b.host, b.port, timeout=0.5, attempts=1) as m:
            b.stop()
            with pytest.raises(NoReplyError, match="lost the broker"):
                await m.stats()
            with pytest.raises(NoReplyError, match="lost the broker"):
                await m.retire("some-worker")
    finally:
        b.stop()


async def test_close_from_a_coroutine_ends_another_threads_call(
    broker: Mosquitto, worker: Service
) -> None:
    """close() called inside a coroutine of another loop, while a thread's call runs on the
    client's loop: that call ends with RuntimeError, saying the client closed while it
    waited, and the client closes (it raised "Cannot run the event loop while another loop is
    running" and left its loop open). Afterwards run() says the client is not open."""
    memory = BlockingMemoryClient(broker.host, broker.port, worker.cfg.prefix).open()
    running = threading.Event()

    async def forever() -> None:
        running.set()
        await asyncio.Event().wait()

    def call() -> BaseException | None:
        try:
            memory.call(forever())
        except BaseException as exc:
            return exc
        return None

    caller = asyncio.ensure_future(asyncio.to_thread(call))
    await asyncio.to_thread(running.wait, 10)
    memory.close()  # on this test's loop: a coroutine calls it
    ended = await asyncio.wait_for(caller, 10)
    assert isinstance(ended, RuntimeError)
    assert str(ended) == "the memory client was closed while this request waited"

    async def get() -> Any:
        return await memory.memory.get("c")

    with pytest.raises(RuntimeError, match="not open"):
        await memory.run(get())


async def test_local_memory_ends_its_iterators_when_closed() -> None:
    async with open_memory("memory://") as m:
        waiting = asyncio.ensure_future(anext(m.evictions()))
        await asyncio.sleep(0)
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(waiting, 10)


async def test_a_client_opened_again_reconnects(
    own_broker: Mosquitto, worker_factory: WorkerFactory
) -> None:
    """Closed and opened again, the client still reconnects when the broker restarts."""
    async with worker_factory(own_broker) as w:
        m = MemoryClient(own_broker.host, own_broker.port, w.cfg.prefix, timeout=2, attempts=10)
        async with m:
            assert (await m.append("c", "user", "0")).seq == 1
        async with m:
            own_broker.restart()
            assert (await m.append("c", "user", "1")).seq == 2


@pytest.mark.parametrize("protocol", [5, 3])
async def test_closing_a_blocking_client_ends_the_calls_of_other_threads(
    broker: Mosquitto, worker: Service, protocol: int
) -> None:
    """Threads calling while the client closes get RuntimeError: none waits forever (MQTT
    3.1.1's could) or raises NoReplyError after its timeouts (MQTT 5's did). Later calls
    raise it at once."""

    def use() -> tuple[list[bool], list[BaseException]]:
        memory = BlockingMemoryClient(
            broker.host, broker.port, worker.cfg.prefix, timeout=60, protocol=protocol
        ).open()
        going = threading.Barrier(5, timeout=30)
        ended: list[BaseException] = []

        def lane(n: int) -> None:
            memory.append(f"closing-{n}", "user", "x")
            going.wait()
            try:
                while True:
                    memory.append(f"closing-{n}", "user", "x")
            except BaseException as exc:
                ended.append(exc)

        threads = [threading.Thread(target=lane, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        going.wait()
        memory.close()
        for t in threads:
            t.join(30)
        for call in (lambda: memory.append("c", "user", "x"), memory.stats):
            with pytest.raises(RuntimeError, match="not open"):
                call()
        return [t.is_alive() for t in threads], ended

    alive, ended = await asyncio.to_thread(use)
    assert alive == [False] * 4
    assert len(ended) == 4
    for exc in ended:
        assert isinstance(exc, RuntimeError), exc
        assert "not open" in str(exc) or "closed while" in str(exc)


async def test_stats_lists_each_worker(broker: Mosquitto, worker: Service) -> None:
    """stats() returns the worker's retained snapshot with its ts; memory:// its store's,
    with the fields the docs list (state and fresh were missing: a review)."""
    async with MemoryClient(broker.host, broker.port, worker.cfg.prefix) as m:
        await m.append("c", "user", "x")
        stats = await m.stats()
    assert len(stats) == 1
    assert {"conversations", "requests", "ts", "state", "fresh"} <= set(stats[0])
    async with open_memory("memory://") as local:
        await local.append("c", "user", "x")
        [own] = await local.stats()
    assert (own["conversations"], own["state"], own["fresh"]) == (1, "online", True)


@pytest.mark.parametrize("protocol", [5, 3])
async def test_stats_are_fresh_from_a_worker_that_is_online(
    broker: Mosquitto, protocol: int
) -> None:
    """A worker publishes its stats every --stats-interval (10 s by default): stats() (and
    memctl stats) pinged it, and counts what was done a moment before, not the last snapshot
    (under MQTT 3.1.1 too: it never asked). A stopped worker's retained snapshot is still
    listed, as it was, and says it is offline (it looked like a live one); `fresh` says
    which answered now."""
    from tests.conftest import make_config, running

    cfg = make_config(broker, stats_interval=3600)
    gone = make_config(broker, stats_interval=3600, prefix=cfg.prefix)
    async with running(gone):
        pass
    async with (
        running(cfg),
        MemoryClient(broker.host, broker.port, cfg.prefix, protocol=protocol) as m,
    ):
        for n in range(3):
            await m.append(f"c{n}", "user", "x")
        stats = {s["client_id"]: s for s in await m.stats()}
    assert stats[cfg.client_id]["conversations"] == 3
    assert stats[cfg.client_id]["requests"] == 3
    assert stats[gone.client_id]["conversations"] == 0
    assert (stats[cfg.client_id]["state"], stats[gone.client_id]["state"]) == ("online", "offline")
    assert (stats[cfg.client_id]["fresh"], stats[gone.client_id]["fresh"]) == (True, False)


async def test_stats_of_a_stopped_process_say_they_are_not_fresh(broker: Mosquitto) -> None:
    """A worker stopped by SIGSTOP (or hung, or cut off) still has its status say online
    until the broker gives up on it: stats() shows its last snapshot with `fresh` false, and
    memctl stats says so."""
    from tests.conftest import reap, spawn_worker, wait_serving

    prefix = unique("stopped")
    proc = spawn_worker(broker, "--prefix", prefix, "--stats-interval", "3600")
    try:
        await asyncio.to_thread(wait_serving, proc)
        async with MemoryClient(broker.host, broker.port, prefix) as m:
            await m.append("c", "user", "x")
            [answered] = await m.stats()
            proc.send_signal(signal.SIGSTOP)
            [stopped] = await m.stats()
        assert (answered["state"], answered["fresh"], answered["requests"]) == ("online", True, 1)
        assert (stopped["state"], stopped["fresh"], stopped["requests"]) == ("online", False, 1)
    finally:
        proc.send_signal(signal.SIGCONT)
        reap(proc)


async def test_the_blocking_client_answers_every_method_from_a_thread(
    broker: Mosquitto, worker: Service
) -> None:
    """stats() (not part of the shared API) and a timeout no lock could wait as such
    (math.inf) work from a thread over MQTT 5 too."""

    def use() -> list[dict[str, Any]]:
        with BlockingMemoryClient(
            broker.host, broker.port, worker.cfg.prefix, timeout=math.inf
        ) as memory:
            assert memory.append("inf", "user", "x").seq == 1
            return memory.stats()

    stats = await asyncio.to_thread(use)
    assert len(stats) == 1
    assert {"conversations", "requests", "ts"} <= set(stats[0])


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("mqtt://127.0.0.1:1883/mem",), r"is a URL, not a host name.*\(open_memory\(\) takes"),
        (("127.0.0.1:1883",), "ends in a port: give the host '127.0.0.1' and the port apart"),
        (("",), "host must be a host name"),
        (("127.0.0.1", "1883"), "port must be a number"),
        (("127.0.0.1", 0), "port must be a number"),
        (("127.0.0.1", 1883, "mem", {"timeout": 0}), "timeout must be more than 0"),
        (("127.0.0.1", 1883, "mem", {"timeout": float("nan")}), "timeout must be more than 0"),
        (("127.0.0.1", 1883, "mem", {"timeout": "5"}), "timeout must be more than 0"),
        (("127.0.0.1", 1883, "mem", {"attempts": "3"}), "attempts must be a whole number"),
        (("127.0.0.1", 1883, "mem", {"attempts": 0}), "attempts must be a whole number from 1"),
    ],
)
def test_bad_client_arguments_are_clear(args: tuple[Any, ...], words: str) -> None:
    """Arguments that could never work are a ValueError when the client is made, not a
    NoReplyError (or a TypeError from deep inside) when it connects."""
    kwargs = args[-1] if isinstance(args[-1], dict) else {}
    positional = args[:-1] if kwargs else args
    with pytest.raises(ValueError, match=words):
        MemoryClient(*positional, **kwargs)
    with pytest.raises(ValueError, match=words):
        BlockingMemoryClient(*positional, **kwargs)


def test_url_errors_are_clear() -> None:
    """A bad URL is a one-line ValueError naming what is wrong."""
    from worker.client import memory_from_url

    for url, words in [
        ("http://x", "scheme"),
        ("memory://?max_turns=x", "bad number"),
        ("memory://?colour=red", "colour"),
        ("mqtt://h/p?colour=red", "colour"),
        ("mqtt://h/p?timeout=x", "option 'timeout' must be a number, not 'x'"),
        ("mqtt://h/p?connections=4", "option 'connections' is for open_blocking_memory only"),
        ("mqtts://h/p?ca=/nope/ca.crt", "TLS CA certificate '/nope/ca.crt': No such file"),
        ("mqtt://h/mem/#", "cannot hold it"),
        ("mqtt://u:pa#ss@h/mem", "a password writes it %23"),
        ("mqtt://h/mem%2F%23", "prefix 'mem/#': "),
        ("mqtt://h:0/mem", "port must be a number from 1 to 65535, not 0"),
        ("mqtt://h:99999/mem", r"'mqtt://h:99999/mem': Port out of range"),
        ("mqtt://h:port/mem", r"'mqtt://h:port/mem': Port could not be cast"),
        # A slash short, or none given: it went to a broker on 127.0.0.1:1883, if any.
        ("mqtt:/127.0.0.1:21883", r"no host: mqtt://HOST\[:PORT\]\[/prefix\]"),
        ("mqtt:///mem", "no host"),
        ("mqtts://:8883/mem", "no host"),
        # An empty option was left aside in silence: a default reply prefix, refused there.
        ("mqtt://h/p?reply_prefix=", "option 'reply_prefix' is empty"),
        ("mqtt://h/p?timeout=5&ca=", "option 'ca' is empty"),
        ("memory://?max_turns=", "option 'max_turns' is empty"),
        ("mqtt://h/p?tls", "unknown option 'tls'"),  # not "empty"
    ]:
        with pytest.raises(ValueError, match=words):
            memory_from_url(url)
    with pytest.raises(ValueError, match="option 'connections' must be a number"):
        open_blocking_memory("mqtt://h/p?connections=x")
    with pytest.raises(ValueError, match="connections must be 1 or more"):
        open_blocking_memory("mqtt://h/p?connections=0")
    with pytest.raises(ValueError, match="option 'reply_prefix' is empty"):  # the adapters' way
        open_blocking_memory("mqtt://h/p?connections=4&reply_prefix=")
    for blank in ("mqtt://h/mem?", "mqtt://h/mem?timeout=5&", "memory://?"):  # as before
        memory_from_url(blank)
    with pytest.raises(BadRequestError, match="reply prefix"):
        memory_from_url("mqtt://h/p?reply_prefix=a/%23")


# --- concurrency ------------------------------------------------------------------------------


def _gapless(turns: list[Any], n: int) -> None:
    assert [t["seq"] for t in turns] == list(range(1, n + 1))


@pytest.mark.parametrize("protocol", [5, 3])
async def test_qos_0_requests_are_answered(
    broker: Mosquitto, worker: Service, protocol: int
) -> None:
    """qos=0 sends requests and takes replies at QoS 0, under MQTT 5 and 3.1.1 alike."""
    async with MemoryClient(
        broker.host, broker.port, worker.cfg.prefix, qos=0, protocol=protocol
    ) as m:
        assert (await m.append("q0", "user", "a")).seq == 1
        assert [t["content"] for t in await m.get("q0")] == ["a"]


@pytest.mark.parametrize("protocol", [5, 3])
async def test_the_same_request_id_twice_at_once_gets_both_answers(
    broker: Mosquitto, worker: Service, protocol: int
) -> None:
    """Two concurrent appends with one request_id each get the answer (one attempt each,
    no retry), and the turn is stored once."""
    async with MemoryClient(
        broker.host, broker.port, worker.cfg.prefix, protocol=protocol, attempts=1, timeout=3
    ) as m:
        first, second = await asyncio.gather(
            m.append("twins", "user", "once", request_id="r-1"),
            m.append("twins", "user", "once", request_id="r-1"),
        )
        assert first == second
        assert [t["content"] for t in await m.get("twins")] == ["once"]


async def test_500_concurrent_appends_through_one_client(
    broker: Mosquitto, worker_factory: WorkerFactory
) -> None:
    """500 appends gathered over 5 conversations through one client: each seq run gapless."""
    async with (
        worker_factory(max_turns=200) as w,
        MemoryClient(broker.host, broker.port, w.cfg.prefix, timeout=30) as m,
    ):
        convos = [unique("c") for _ in range(5)]
        done = await asyncio.gather(*(m.append(convos[i % 5], "user", str(i)) for i in range(500)))
        assert sorted(d.seq for d in done) == sorted(list(range(1, 101)) * 5)
        for convo in convos:
            _gapless(await m.get(convo), 100)


async def test_500_concurrent_appends_through_several_clients(
    broker: Mosquitto, worker_factory: WorkerFactory
) -> None:
    """500 appends from 4 clients at once into 3 shared conversations: seq gapless."""
    async with worker_factory(max_turns=300) as w:
        clients = [MemoryClient(broker.host, broker.port, w.cfg.prefix, timeout=30) for _ in "abcd"]
        for c in clients:
            await c.__aenter__()
        try:
            convos = [unique("c") for _ in range(3)]
            await asyncio.gather(
                *(clients[i % 4].append(convos[i % 3], "user", str(i)) for i in range(500))
            )
            sizes = [len(range(k, 500, 3)) for k in range(3)]
            for convo, size in zip(convos, sizes, strict=True):
                _gapless(await clients[0].get(convo), size)
        finally:
            for c in clients:
                await c.__aexit__(None, None, None)


@pytest.fixture(params=["mqtt5", "mqtt311", "memory"])
def blocking_url(
    request: pytest.FixtureRequest, broker: Mosquitto, worker: Service
) -> Iterator[str]:
    """MQTT 5 requests go out from the calling thread; MQTT 3.1.1's and memory://'s run on
    the client's loop."""
    if request.param == "memory":
        yield "memory://?max_turns=100"
    else:
        protocol = 5 if request.param == "mqtt5" else 3
        yield f"mqtt://{broker.host}:{broker.port}/{worker.cfg.prefix}?protocol={protocol}"


def _dropped_unclosed(url: str, times: int) -> tuple[int, int]:
    """Threads still alive, and file descriptors gained, after `times` blocking clients
    were opened, used and dropped without close()."""

    def handler(i: int) -> None:
        assert open_blocking_memory(url).get(f"dropped-{i}") == []

    handler(0)
    gc.collect()
    threads, fds = set(threading.enumerate()), len(os.listdir("/proc/self/fd"))
    for i in range(1, times + 1):
        handler(i)
    gc.collect()
    new = [t for t in threading.enumerate() if t not in threads]
    deadline = time.monotonic() + 10  # until a closed one's threads end, not a fixed wait
    for thread in new:
        thread.join(max(0.0, deadline - time.monotonic()))
    return sum(t.is_alive() for t in new), len(os.listdir("/proc/self/fd")) - fds


async def test_a_blocking_client_dropped_unclosed_is_closed(blocking_url: str) -> None:
    """A web handler that opens a blocking client per request and never closes it left a
    connection and two threads behind each (a trial): collected, it is closed, as a file."""
    assert await asyncio.to_thread(_dropped_unclosed, blocking_url, 10) == (0, 0)


async def test_16_threads_share_one_blocking_client(blocking_url: str) -> None:
    """16 threads on one BlockingMemoryClient each see only their own session's state."""
    # The worker serves from this test's loop, so the threads run off it.
    assert await asyncio.to_thread(_sixteen_threads, blocking_url) == []


async def test_a_blocking_evictions_iterator_ends_when_the_client_closes(blocking_url: str) -> None:
    """A thread watching evictions() stops when another thread closes the client, as the
    async iterator ends: closing is how a blocking watcher is stopped. One started on a
    closed client raises, as every call then does."""
    assert await asyncio.to_thread(_watch_until_closed, blocking_url) == (["seen"], [])


def _watch_until_closed(blocking_url: str) -> tuple[list[str], list[BaseException]]:
    memory = open_blocking_memory(blocking_url)
    convo = unique("watched")
    seen: list[str] = []
    errors: list[BaseException] = []
    first = threading.Event()

    def watch() -> None:
        try:
            for event in memory.evictions(convo):
                seen.append("seen" if event["convo"] == convo else event["convo"])
                first.set()
        except BaseException as exc:
            errors.append(exc)
        first.set()

    watcher = threading.Thread(target=watch)
    watcher.start()
    while not first.is_set():  # until the watcher's subscription is in place
        memory.append(convo, "user", "x")
        memory.forget(convo)
        first.wait(0.2)
    memory.close()
    watcher.join(30)
    assert not watcher.is_alive()
    with pytest.raises(RuntimeError, match="not open"):  # one started after: not open
        next(memory.evictions(convo))
    return seen[:1], errors


def _sixteen_threads(blocking_url: str) -> list[BaseException]:
    errors: list[BaseException] = []
    with open_blocking_memory(blocking_url) as memory:

        def session(n: int) -> None:
            try:
                sid = f"thread-{n}-{unique()}"
                for i in range(10):
                    memory.append(sid, "user", f"{n}:{i}")
                    memory.save(sid, "ns", "last", i)
                assert [t["content"] for t in memory.get(sid, last=3)] == [
                    f"{n}:{i}" for i in (7, 8, 9)
                ]
                assert memory.load(sid, "ns", "last") == 9
                assert memory.get_all(sid, "ns") == {"last": 9}
            except BaseException as exc:
                errors.append(exc)

        in_threads(session, 16)
    return errors


async def test_blocking_client_refuses_like_the_async_one(
    broker: Mosquitto, worker: Service
) -> None:
    """The blocking client raises the same coded errors."""

    def use() -> int:
        with BlockingMemoryClient(broker.host, broker.port, worker.cfg.prefix) as memory:
            with pytest.raises(BadTopicError):
                memory.append("a#", "user", "x")
            return memory.append("ok", "user", "x").seq

    assert await asyncio.to_thread(use) == 1


async def test_a_blocking_request_unanswered_is_sent_again_with_its_id(
    broker: Mosquitto,
) -> None:
    """Without a worker, a blocking append is sent once per attempt, each time with the same
    id, then raises NoReplyError naming the attempts; the client still serves after it."""
    prefix = unique("p")
    async with watcher(broker.host, broker.port, f"{prefix}/c/append") as sent:

        def use() -> str:
            with BlockingMemoryClient(
                broker.host, broker.port, prefix, timeout=0.3, attempts=3
            ) as memory:
                with pytest.raises(NoReplyError) as info:
                    memory.append("c", "user", "x")
                with pytest.raises(NoReplyError):  # the next call gets its own attempts
                    memory.get("c")
                return info.value.message

        message = await asyncio.to_thread(use)
        assert "3 attempts" in message
        ids = [decode(await next_message(sent))["id"] for _ in range(3)]
    assert ids[0]
    assert ids == [ids[0]] * 3


@pytest.mark.parametrize("op", ["delete", "state/delete"])
async def test_a_delete_unanswered_is_sent_again_with_its_id(broker: Mosquitto, op: str) -> None:
    """Deletes carry ids like the other writes (the worker applies one at most once, even
    when a broker restored from its autosave delivers it again), so they are retried too."""
    prefix = unique("p")
    async with watcher(broker.host, broker.port, f"{prefix}/c/{op}") as sent:
        async with MemoryClient(broker.host, broker.port, prefix, timeout=0.3, attempts=2) as m:
            with pytest.raises(NoReplyError):
                await (m.forget("c") if op == "delete" else m.delete("c", "n", "k"))
        ids = [decode(await next_message(sent))["id"] for _ in range(2)]
    assert ids[0]
    assert ids == [ids[0]] * 2


@pytest.mark.parametrize("protocol", [5, 3])
async def test_blocking_appends_stored_once_across_a_broker_restart(
    own_broker: Mosquitto, worker_factory: WorkerFactory, protocol: int
) -> None:
    """Four threads append through one blocking client while the broker restarts: every
    append stored exactly once, each thread's in order. Twice: closed and opened again (on
    a loop of its own), the client waits for the connection on its new loop."""
    async with worker_factory(own_broker, max_turns=100) as w:
        memory = BlockingMemoryClient(
            own_broker.host,
            own_broker.port,
            w.cfg.prefix,
            timeout=2,
            attempts=10,
            protocol=protocol,
        )

        def use(rounds: int) -> list[list[list[str]]]:
            stored = []
            for r in range(rounds):
                half = threading.Barrier(5, timeout=60)
                with memory:

                    def stream(convo: str, half: threading.Barrier) -> None:
                        for i in range(40):
                            memory.append(convo, "user", str(i))
                            if i == 20:
                                half.wait()

                    threads = [
                        threading.Thread(target=stream, args=(f"r{r}-t{n}", half)) for n in range(4)
                    ]
                    for t in threads:
                        t.start()
                    half.wait()
                    own_broker.restart()
                    for t in threads:
                        t.join()
                    stored.append(
                        [[t["content"] for t in memory.get(f"r{r}-t{n}")] for n in range(4)]
                    )
            return stored

        stored = await asyncio.to_thread(use, 2)
    assert stored == [[[str(i) for i in range(40)]] * 4] * 2


async def test_a_reply_resumes_its_task_inside_the_read() -> None:
    """The future a request awaits: a reply resolved from a loop callback (the socket's read)
    runs the awaiting task at once, before the callback goes on; resolved from inside a task
    it is scheduled, as an asyncio Future's; a cancel reaches the task as CancelledError."""
    loop = asyncio.get_running_loop()
    order: list[str] = []

    async def awaits(reply: _Reply) -> Any:
        value = await reply
        order.append("resumed")
        return value

    reply = _Reply(loop)
    task = asyncio.create_task(awaits(reply))
    await asyncio.sleep(0)  # the task now waits on the reply
    done = asyncio.Event()

    def read() -> None:
        reply.resolve(7)
        order.append("read goes on")
        done.set()

    loop.call_soon(read)
    await done.wait()
    assert order == ["resumed", "read goes on"]
    assert await task == 7

    order.clear()
    reply = _Reply(loop)
    task = asyncio.create_task(awaits(reply))
    await asyncio.sleep(0)
    reply.resolve(8)  # from this test's task: scheduled
    order.append("resolver goes on")
    assert await task == 8
    assert order == ["resolver goes on", "resumed"]

    reply = _Reply(loop)
    task = asyncio.create_task(awaits(reply))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert reply.cancelled()


async def test_local_memory_expires_with_an_event() -> None:
    """memory:// keeps the worker's TTL and announces the expiry as a 'ttl' eviction."""
    async with open_memory("memory://?ttl=0.2") as memory:
        assert isinstance(memory, LocalMemory)
        events = memory.evictions()
        await memory.append("c", "user", "x")
        event = await asyncio.wait_for(anext(events), 10)
        assert (event["convo"], event["reason"]) == ("c", "ttl")
        assert await memory.get("c") == []


# --- exactly once across a drop -------------------------------------------------------------


async def _append_in_order(m: MemoryClient, convo: str, n: int, half: asyncio.Event) -> None:
    for i in range(n):
        await m.append(convo, "user", str(i))
        if i == n // 2:
            half.set()


async def test_appends_stored_once_across_a_broker_restart(
    own_broker: Mosquitto, worker_factory: WorkerFactory
) -> None:
    """The broker restarts mid-stream: 60 appends, each stored exactly once, in order."""
    async with (
        worker_factory(own_broker, max_turns=100) as w,
        MemoryClient(own_broker.host, own_broker.port, w.cfg.prefix, timeout=2, attempts=10) as m,
    ):
        half = asyncio.Event()
        stream = asyncio.create_task(_append_in_order(m, "c", 60, half))
        await half.wait()
        own_broker.restart()
        await stream
        turns = await m.get("c")
    assert [t["content"] for t in turns] == [str(i) for i in range(60)]
    _gapless(turns, 60)


async def test_appends_stored_once_across_a_worker_restart(
    broker: Mosquitto, worker_factory: WorkerFactory, tmp_path: Path
) -> None:
    """The worker stops mid-stream and starts only after the client has resent an append:
    30 appends, each stored once, in order."""
    prefix, cid = unique("mem"), unique("w-")
    same = {
        "prefix": prefix,
        "client_id": cid,
        "max_turns": 100,
        "backend": f"sqlite:///{tmp_path}/m.db",
    }
    async with (
        watcher(broker.host, broker.port, f"{prefix}/c/append") as sent,
        MemoryClient(broker.host, broker.port, prefix, timeout=0.5, attempts=40) as m,
    ):
        async with worker_factory(**same):
            for i in range(10):
                await m.append("c", "user", str(i))
        stream = asyncio.create_task(_append_rest(m))
        ids: set[Any] = set()
        while True:  # wait for the first request the client sends twice
            req_id = decode(await next_message(sent)).get("id")
            if req_id in ids:
                break
            ids.add(req_id)
        async with worker_factory(**same):
            await stream
            turns = await m.get("c")
    assert [t["content"] for t in turns] == [str(i) for i in range(30)]
    _gapless(turns, 30)


async def _append_rest(m: MemoryClient) -> None:
    for i in range(10, 30):
        await m.append("c", "user", str(i))


async def test_concurrent_stats_calls_each_get_the_snapshot(
    broker: Mosquitto, worker: Service
) -> None:
    """Two stats() at once on one client both see the worker's retained snapshot."""
    async with MemoryClient(broker.host, broker.port, worker.cfg.prefix) as m:
        await m.append("c", "user", "x")
        first, second = await asyncio.gather(m.stats(), m.stats())
    assert len(first) == len(second) == 1


async def test_reply_prefix_with_convo_reaches_a_route_prefixed_worker(
    broker: Mosquitto, worker_factory: WorkerFactory
) -> None:
    """reply_prefix="reply/{convo}" puts each reply where --route-prefix reply/{convo} allows."""
    async with (
        worker_factory(route_prefix="reply/{convo}") as w,
        MemoryClient(
            broker.host, broker.port, w.cfg.prefix, reply_prefix="reply/{convo}", timeout=2
        ) as m,
    ):
        assert (await m.append("k1", "user", "a")).seq == 1
        assert (await m.append("k2", "user", "b")).seq == 1
        assert [t["content"] for t in await m.get("k2")] == ["b"]


def test_every_wire_code_has_its_exception() -> None:
    """Each error code the worker answers with maps to its own client exception class."""
    from worker.client import error_for
    from worker.client._errors import _BY_CODE
    from worker.errors import ERROR_CODES

    assert sorted(_BY_CODE) == sorted(ERROR_CODES)
    assert all(type(error_for(code, "m")).code == code for code in ERROR_CODES)


def test_the_client_and_the_worker_share_one_error_tree() -> None:
    """Each client error for a wire code is also the worker's error class for that code."""
    from worker import errors
    from worker.client import error_for

    worker_classes: list[type[errors.WorkerError]] = [
        errors.WorkerError,
        *errors.WorkerError.__subclasses__(),
    ]
    for cls in worker_classes:
        if cls.code in errors.ERROR_CODES:
            assert isinstance(error_for(cls.code, "m"), cls), cls


@pytest.mark.parametrize(
    ("adapter", "framework"), [("langchain", "langchain_core"), ("langgraph", "langgraph")]
)
def test_an_adapter_without_its_framework_names_the_extra(adapter: str, framework: str) -> None:
    """Importing an adapter whose framework is not installed says which extra brings it."""
    code = f"import sys; sys.modules[{framework!r}] = None; import worker.client.{adapter}"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ModuleNotFoundError: worker.client.")
    assert f"needs the {adapter!r} extra" in last
    assert f"pip install -e '.[{adapter}]'" in last


@pytest.mark.parametrize("in_url", [False, True], ids=["argument", "url"])
async def test_blocking_threads_past_the_connections_wait_for_one(
    broker: Mosquitto, worker: Service, in_url: bool
) -> None:
    """Six threads on a blocking client of two connections (`connections=2`, or
    `?connections=2` in the URL): every call is answered, and the replies come on two reply
    topics (one per connection) at most."""
    async with watcher(broker.host, broker.port, f"{worker.cfg.prefix}-reply/#") as replies:

        def use() -> list[int]:
            last = [0] * 6
            url = f"mqtt://{broker.host}:{broker.port}/{worker.cfg.prefix}?connections=2"
            with (
                open_blocking_memory(url)
                if in_url
                else BlockingMemoryClient(
                    broker.host, broker.port, worker.cfg.prefix, connections=2
                )
            ) as memory:

                def lane(n: int) -> None:
                    for i in range(10):
                        last[n] = memory.append(f"capped-{n}-{in_url}", "user", str(i)).seq

                in_threads(lane, 6)
            return last

        assert await asyncio.to_thread(use) == [10] * 6
        topics = {str((await next_message(replies)).topic) for _ in range(60)}
    assert 1 <= len(topics) <= 2


async def test_a_blocking_delete_after_a_broker_restart_is_answered(
    own_broker: Mosquitto, worker_factory: WorkerFactory
) -> None:
    """A delete is sent once: after the broker restarts, the thread's idle connection is found
    closed before the delete goes out on it, and the delete is answered."""
    async with worker_factory(own_broker) as w:

        def use() -> list[Any]:
            with BlockingMemoryClient(
                own_broker.host, own_broker.port, w.cfg.prefix, timeout=5
            ) as memory:
                memory.append("c", "user", "x")
                own_broker.restart()
                memory.forget("c")
                return memory.get("c")

        assert await asyncio.to_thread(use) == []


async def test_a_blocking_reply_whose_last_bytes_come_alone_is_read_at_once(
    broker: Mosquitto, worker: Service
) -> None:
    """Through a network hop that delivers the last 3 bytes of every chunk on their own, a
    blocking call is answered as they come, not when its timeout ends a read waiting for
    more (the calls here have 30 s; a read waiting for 5 bytes took all of it)."""
    with SplitProxy(broker.port) as hop:

        def use() -> list[str]:
            with BlockingMemoryClient(
                broker.host, hop.port, worker.cfg.prefix, timeout=30
            ) as memory:
                for i in range(3):
                    memory.append("split", "user", f"{i}" * 60_000)
                turns = memory.get("split")  # 180 kB: a reply of many segments
                memory.forget("split")  # sent once
                memory.append("split", "user", "again")
                return [t["content"][:2] for t in turns + memory.get("split")]

        got = await asyncio.wait_for(asyncio.to_thread(use), 20)
    assert got == ["00", "11", "22", "ag"]


async def test_a_blocking_connection_the_broker_disconnected_while_idle_is_made_anew(
    broker: Mosquitto, worker: Service
) -> None:
    """Another client takes a thread's connection's client id over: the broker sends that
    connection DISCONNECT (session taken over) and closes it. The next call, a delete (sent
    once), sees that before sending and goes out on a new connection."""
    memory = BlockingMemoryClient(broker.host, broker.port, worker.cfg.prefix, timeout=5)
    await asyncio.to_thread(memory.open)
    try:
        await asyncio.to_thread(memory.append, "taken", "user", "x")
        client = memory.memory
        assert isinstance(client, MemoryClient)
        thief = aiomqtt.Client(
            broker.host,
            broker.port,
            identifier=f"memory-client-{client.tag}-1",
            protocol=aiomqtt.ProtocolVersion.V5,
        )
        async with thief:
            assert await asyncio.to_thread(memory.forget, "taken") == 1
    finally:
        await asyncio.to_thread(memory.close)


async def test_threads_waiting_for_a_connection_are_served_in_turn(
    broker: Mosquitto, worker: Service
) -> None:
    """Twelve threads call in a loop for three seconds through two connections: the ones
    waiting get a connection in turn, each within its timeout (1 s), so every thread is
    answered every time. A thread giving a connection back took it again at once, and the
    others ran out of time waiting."""

    def use() -> tuple[list[int], list[BaseException]]:
        calls, errors = [0] * 12, []
        with BlockingMemoryClient(
            broker.host, broker.port, worker.cfg.prefix, connections=2, timeout=1.0
        ) as memory:
            end = time.monotonic() + 3

            def lane(n: int) -> None:
                try:
                    while time.monotonic() < end:
                        memory.append(f"turns-{n}", "user", "x")
                        calls[n] += 1
                except BaseException as exc:
                    errors.append(exc)

            in_threads(lane, 12)
        return calls, errors

    calls, errors = await asyncio.to_thread(use)
    assert errors == []
    assert min(calls) > 0


async def test_a_thread_waiting_for_a_connection_has_its_calls_retries_too(
    broker: Mosquitto,
) -> None:
    """The worker stalls for longer than one timeout, less than its three attempts: the call
    on the only connection is answered on a later attempt, and so is the call of the thread
    waiting for that connection. It waited one timeout, then failed with "all connections
    stayed busy", its retries skipped (a new user's trial)."""
    async with AckHolder(broker.host, broker.port) as hop:
        cfg = make_config(broker, port=hop.port)
        async with running(cfg):

            def use() -> list[Any]:
                with BlockingMemoryClient(
                    broker.host, broker.port, cfg.prefix, connections=1, timeout=0.5
                ) as memory:
                    memory.append("warm", "user", "x")  # the connection is made
                    hop.paused = True  # the worker gets requests, its replies wait
                    out: list[Any] = [None, None]

                    def call(n: int) -> None:
                        try:
                            out[n] = memory.append(f"stalled-{n}", "user", "x").seq
                        except Exception as exc:
                            out[n] = exc

                    first = threading.Thread(target=call, args=(0,))
                    first.start()
                    second = threading.Thread(target=call, args=(1,))
                    second.start()
                    # The stall: longer than a timeout, within the first call's attempts.
                    time.sleep(0.8)
                    hop.resume()
                    first.join()
                    second.join()
                    return out

            assert await asyncio.to_thread(use) == [1, 1]


async def test_a_blocking_call_while_the_broker_is_down_says_so(
    own_broker: Mosquitto, worker_factory: WorkerFactory
) -> None:
    """With the broker gone, a thread's call whose every try to connect failed says it cannot
    reach the broker, naming it, not "no reply from memory-worker"."""
    async with worker_factory(own_broker) as w:

        def use() -> list[str]:
            with BlockingMemoryClient(
                own_broker.host, own_broker.port, w.cfg.prefix, timeout=0.5, attempts=2
            ) as memory:
                memory.append("c", "user", "x")
                own_broker.stop()
                messages = []
                for call in (lambda: memory.append("c", "user", "y"), lambda: memory.forget("c")):
                    with pytest.raises(NoReplyError) as info:
                        call()
                    messages.append(info.value.message)
                return messages

        appended, forgot = await asyncio.to_thread(use)
    where = f"cannot reach the broker at {own_broker.host}:{own_broker.port}"
    assert appended.startswith(where)
    assert appended.endswith("2 attempts")
    assert forgot.startswith(where)


async def test_events_asked_for_while_reconnecting_still_come(
    own_broker: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An evictions() started while the client subscribes again after a broker restart is
    subscribed on the new connection too (it was left out: the watcher waited forever)."""
    b, prefix = own_broker, unique("p")
    subscribed, resubscribing, go_on = asyncio.Event(), asyncio.Event(), asyncio.Event()
    subscribe_on = MemoryClient._subscribe_on

    async def held(self: MemoryClient, client: Any, topic_filter: str, qos: int) -> None:
        if topic_filter == f"{prefix}/a/evicted" and self._client is None:
            resubscribing.set()
            await go_on.wait()
        await subscribe_on(self, client, topic_filter, qos)
        if topic_filter == f"{prefix}/a/evicted":
            subscribed.set()

    monkeypatch.setattr(MemoryClient, "_subscribe_on", held)
    async with MemoryClient(b.host, b.port, prefix, timeout=5, attempts=10) as m:
        a = asyncio.ensure_future(anext(m.evictions("a")))
        await asyncio.wait_for(subscribed.wait(), 10)
        b.restart()
        await asyncio.wait_for(resubscribing.wait(), 30)
        later = asyncio.ensure_future(anext(m.evictions("b")))
        await asyncio.sleep(0)  # let it count its filter while no connection is there
        go_on.set()
        async with asyncio.timeout(30):
            while m._client is None:  # each reconnection's answer wakes it
                await m._tried.wait()
        async with aiomqtt.Client(b.host, b.port) as device:
            for convo in ("a", "b"):
                event = {"convo": convo, "reason": "deleted", "count": 1, "ts": time.time()}
                await device.publish(f"{prefix}/{convo}/evicted", msgpack.packb(event), qos=1)
        assert (await asyncio.wait_for(a, 10))["convo"] == "a"
        assert (await asyncio.wait_for(later, 10))["convo"] == "b"


def in_threads(target: Callable[[int], None], count: int) -> None:
    """`target(n)` on `count` threads at once, n = 0 .. count - 1; returns when all ended."""
    threads = [threading.Thread(target=target, args=(n,)) for n in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


@pytest.mark.parametrize("blocking", [False, True], ids=["async", "blocking"])
async def test_a_late_mqtt311_reply_answers_only_its_own_request(
    broker: Mosquitto, blocking: bool, tmp_path: Path
) -> None:
    """MQTT 3.1.1 has no Correlation Data. A reply that comes after its request timed out does
    not answer a later request that reuses the request_id in another conversation (it did:
    that request got the first one's seq)."""
    cfg = make_config(broker, backend=f"sqlite:///{tmp_path / 'm.db'}")
    async with running(cfg), MemoryClient(broker.host, broker.port, cfg.prefix) as m:
        for i in range(4):
            await m.append("ca", "user", f"turn {i}")
    # The worker is gone; its session keeps the requests that come until it is back.
    args = (broker.host, broker.port, cfg.prefix)
    if blocking:
        timed_out = threading.Event()

        def calls() -> Any:
            with BlockingMemoryClient(*args, protocol=3, timeout=0.5, attempts=1) as b:
                with pytest.raises(NoReplyError):
                    b.append("ca", "user", "late", request_id="X1")
                timed_out.set()
                assert isinstance(b.memory, MemoryClient)
                b.memory.timeout = 10
                return b.append("cb", "user", "B", request_id="X1")

        later = asyncio.ensure_future(asyncio.to_thread(calls))
        await asyncio.to_thread(timed_out.wait, 10)
        async with running(cfg):
            got = await later
    else:
        async with MemoryClient(*args, protocol=3, timeout=0.5, attempts=1) as m:
            with pytest.raises(NoReplyError):
                await m.append("ca", "user", "late", request_id="X1")
            m.timeout = 10
            later = asyncio.ensure_future(m.append("cb", "user", "B", request_id="X1"))
            async with running(cfg):
                got = await later
    assert (got.seq, got.count) == (1, 1)


async def test_a_broker_gone_is_said_to_be_the_broker(tmp_path: Path) -> None:
    """A request made while the broker is down (the client waiting to reconnect) fails
    naming the broker, not "no reply from memory-worker"."""
    own = Mosquitto(tmp_path / "broker").start()
    try:
        async with MemoryClient(own.host, own.port, "mem", timeout=0.5, attempts=2) as m:
            own.stop()
            with pytest.raises(NoReplyError) as info:
                await m.get("c")
    finally:
        own.stop()
    assert info.value.message == (
        f"lost the broker at {own.host}:{own.port}, and no connection came back "
        "within 0.5s, 2 attempts"
    )


@pytest.mark.parametrize("method", ["get", "stats"])
async def test_a_blocking_call_waiting_when_the_client_closes_says_so(
    broker: Mosquitto, method: str
) -> None:
    """A thread's call waiting (for a reply from no worker, or for retained stats on the
    client's loop) when another thread closes the client ends at once with "closed while this
    request waited", as the async client's does (it said "not open: use it inside `with`",
    which reads as a mistake of the caller's)."""

    def use() -> BaseException | None:
        with BlockingMemoryClient(broker.host, broker.port, unique("none"), timeout=30) as m:
            result: list[BaseException] = []

            def call() -> None:
                try:
                    m.get("c") if method == "get" else m.stats()
                except BaseException as exc:
                    result.append(exc)

            caller = threading.Thread(target=call)
            caller.start()
            # Until its call is under way: on a connection of its own, or on the loop.
            while not (m._direct and m._direct._busy) and not m._calls:
                time.sleep(0.01)
            m.close()
            caller.join(10)
            return result[0] if result else None

    ended = await asyncio.to_thread(use)
    assert isinstance(ended, RuntimeError)
    assert str(ended) == "the memory client was closed while this request waited"


async def test_retire_and_stats_at_once_keep_to_their_own_topics(
    broker: Mosquitto, worker_factory: WorkerFactory
) -> None:
    """retire() and stats() on one client at the same time: stats() returns stats snapshots
    only (it also returned the worker's status, which retire's subscription brought), and the
    stopped worker is retired. MQTT 3.1.1 cannot retire: its broker drops a refused publish
    without a word."""
    prefix, gone = unique("mem"), unique("gone-")
    async with worker_factory(prefix=prefix, client_id=gone):
        pass  # it leaves its "offline" status and stats, retained
    async with MemoryClient(broker.host, broker.port, prefix) as m:
        stats, done = await asyncio.gather(m.stats(), m.retire(gone))
        assert done == "retired"
        assert [s["client_id"] for s in stats] == [gone]
        assert all("requests" in s for s in stats), stats
        assert await m.retire(gone) == "unknown"
    async with MemoryClient(broker.host, broker.port, prefix, protocol=3) as m:
        with pytest.raises(ValueError, match="needs MQTT 5"):
            await m.retire(gone)


async def test_an_open_cancelled_midway_ends_and_leaves_no_callback_errors(
    broker: Mosquitto,
) -> None:
    """A task cancelled while its client opens ends (Python 3.11's asyncio.wait_for, which
    aiomqtt uses, dropped a cancel that came as the CONNACK did: 1 in 10 went on into the
    block and waited there for ever), and leaves no errors: paho's thread had handed the
    socket to the loop, which then registered a descriptor the cancel had closed
    ("Exception in callback ... Bad file descriptor", 8 in 200; a chaos trial), or one whose
    number another socket had taken by then."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    try:
        for n in range(200):

            async def open_and_wait() -> None:
                async with MemoryClient(broker.host, broker.port, unique("p")):
                    await asyncio.Event().wait()

            task = asyncio.create_task(open_and_wait())
            await asyncio.sleep((n % 10) * 0.0005)  # cancelled at moments across the open
            task.cancel()
            await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 10)
        async with MemoryClient(broker.host, broker.port, unique("p")):
            pass  # a last round of the loop for callbacks still due
    finally:
        loop.set_exception_handler(None)
    assert errors == []
