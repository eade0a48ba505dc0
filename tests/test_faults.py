"""Nothing lost: worker stops and crashes, broker restarts, a broker that is gone."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from tests.clients import AckHolder, Device, decode, device, next_message, watcher
from tests.conftest import (
    WorkerFactory,
    make_config,
    reap,
    running,
    spawn_worker,
    unique,
    wait_serving,
)
from tests.processes import Mosquitto
from worker import constants as c
from worker import packets
from worker.backends import create_backend
from worker.config import Config
from worker.service import Service


async def test_requests_sent_while_stopped_are_served_on_start(
    broker: Mosquitto, worker_factory: WorkerFactory
) -> None:
    """Worker stopped gracefully, 100 QoS 1 appends published meanwhile: all stored, in order."""
    prefix, cid = unique("mem"), unique("w-")
    async with worker_factory(prefix=prefix, client_id=cid, max_turns=200):
        pass  # the first start makes the broker keep a session for the worker
    async with device(broker.host, broker.port, prefix) as d:
        futs = [
            await d.send(f"{prefix}/c/append", {"role": "u", "content": str(i)}) for i in range(100)
        ]
        async with worker_factory(prefix=prefix, client_id=cid, max_turns=200):
            replies = [await d.reply(f) for f in futs]
            assert [r["seq"] for r in replies] == list(range(1, 101))
            turns = (await d.request("c", "get"))["turns"]
    assert [t["content"] for t in turns] == [str(i) for i in range(100)]


async def _wait_status(seen: asyncio.Queue[aiomqtt.Message], state: str) -> None:
    while decode(await next_message(seen))["state"] != state:
        pass


async def test_sigkill_mid_stream_loses_and_duplicates_nothing(
    broker: Mosquitto, tmp_path: Path
) -> None:
    """SIGKILL during 1,000 QoS 1 appends with ids (SQLite): exactly 1,000 stored, in order."""
    prefix, cid = unique("mem"), unique("w-")
    args = (
        "--prefix",
        prefix,
        "--client-id",
        cid,
        "--backend",
        f"sqlite:///{tmp_path}/m.db",
        "--max-turns",
        "2000",
    )
    status = f"{prefix}/_worker/{cid}/status"
    total = 1000
    async with (
        watcher(broker.host, broker.port, status) as seen,
        device(broker.host, broker.port, prefix) as d,
    ):
        proc = spawn_worker(broker, *args)
        await _wait_status(seen, "online")
        futs = []
        for i in range(total):
            body = {"role": "u", "content": str(i), "id": f"m{i}"}
            futs.append(await d.send(f"{prefix}/c/append", body))
            if i == 300:
                await futs[150]  # the worker is busy: kill it mid-stream
                proc.send_signal(signal.SIGKILL)
        reap(proc)
        await _wait_status(seen, "offline")
        proc = spawn_worker(broker, *args)
        try:
            replies = [await d.reply(f) for f in futs]
            turns = (await d.request("c", "get"))["turns"]
        finally:
            reap(proc, signal.SIGTERM)
    assert [int(t["content"]) for t in turns] == list(range(total))
    assert [t["seq"] for t in turns] == list(range(1, total + 1))
    assert [r["seq"] for r in replies] == list(range(1, total + 1))


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["graceful", "sigkill"])
async def test_broker_restart_under_load(
    own_broker: Mosquitto, worker_factory: WorkerFactory, tmp_path: Path, how: int
) -> None:
    """The worker comes back by itself; with SQLite no acknowledged append is lost."""
    b = own_broker
    acked: list[int] = []
    async with worker_factory(b, backend=f"sqlite:///{tmp_path}/m.db", max_turns=5000) as w:
        under_load = asyncio.Event()

        async def load(start: int, count: int) -> None:
            async with device(b.host, b.port, w.cfg.prefix) as d:
                for i in range(start, start + count):
                    reply = await d.request(
                        "c", "append", {"role": "u", "content": str(i), "id": i}
                    )
                    assert reply["ok"]
                    acked.append(i)
                    if len(acked) == 200:
                        under_load.set()

        task = asyncio.create_task(load(0, 100_000))
        await under_load.wait()
        b.restart(how)
        task.cancel()  # the device was cut off too; what it had acknowledged is in `acked`
        with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
            await task
        t0 = asyncio.get_running_loop().time()
        await asyncio.wait_for(w.wait_connections(2), 15)
        await load(len(acked) + 10_000, 50)  # serving again
        assert asyncio.get_running_loop().time() - t0 < 10
        async with device(b.host, b.port, w.cfg.prefix) as d:
            stored = {int(t["content"]) for t in (await d.request("c", "get"))["turns"]}
    assert set(acked) <= stored


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def test_broker_gone_neither_exits_nor_spins(own_broker: Mosquitto) -> None:
    """With the broker down the worker waits at a low cost, and serves when it is back. It
    says so once (a warning each retry filled a Pi's journal while its Mosquitto was down)."""
    prefix, cid = unique("mem"), unique("w-")
    proc = spawn_worker(own_broker, "--prefix", prefix, "--client-id", cid)
    status = f"{prefix}/_worker/{cid}/status"
    try:
        async with watcher(own_broker.host, own_broker.port, status) as seen:
            await _wait_status(seen, "online")
        own_broker.stop()
        before = _cpu_seconds(proc.pid)
        await asyncio.sleep(5)  # the thing measured here is idle time itself
        used = _cpu_seconds(proc.pid) - before
        assert proc.poll() is None
        assert used < 0.5, f"{used:.2f} s of CPU in 5 s without a broker"
        own_broker.start()
        async with watcher(own_broker.host, own_broker.port, status) as seen:
            await _wait_status(seen, "online")
        async with device(own_broker.host, own_broker.port, prefix) as d:
            assert (await d.request("c", "get"))["ok"]
    finally:
        reap(proc, signal.SIGTERM, keep_output=True)
    assert proc.stdout is not None
    log = proc.stdout.read()
    proc.stdout.close()
    said = [line for line in log.splitlines() if "unreachable or lost" in line]
    assert len(said) == 1, log  # 4 or 5 retries in those 5 s
    assert " WARNING " in said[0]


async def test_at_most_max_inflight_requests_applied_before_their_acks_leave(
    broker: Mosquitto, worker_factory: WorkerFactory, tmp_path: Path
) -> None:
    """A broker past our Receive Maximum: batches stay within it, earlier acks already sent."""
    # Mosquitto 2.0.11 sends a further Receive Maximum of messages on every PUBACK, so what
    # the worker applies must be bounded by the worker itself: a SIGKILL loses at most the
    # acknowledgements of one batch, and their redelivery stays within the ids remembered.
    db = f"sqlite:///{tmp_path}/m.db"
    async with worker_factory(backend=db, max_inflight=4, max_turns=1000) as w:
        execute = w.backend.execute
        seen: list[tuple[int, int]] = []

        async def recording(requests: Any) -> Any:
            assert w._client is not None
            unsent_acks = sum(p["command"] == 0x40 for p in w._client._client._out_packet)
            seen.append((len(requests), unsent_acks))
            return await execute(requests)

        w.backend.execute = recording  # type: ignore[method-assign]
        async with device(broker.host, broker.port, w.cfg.prefix) as d:
            body = {"role": "u", "content": "x"}
            futs = [await d.send(f"{w.cfg.prefix}/c/append", body) for _ in range(400)]
            replies = [await d.reply(f) for f in futs]
    assert [r["seq"] for r in replies] == list(range(1, 401))
    assert max(size for size, _ in seen) <= 4
    assert all(unsent == 0 for _, unsent in seen)


async def test_a_reply_over_the_brokers_packet_size_is_too_large_not_a_lost_connection(
    tmp_path: Path, worker_factory: WorkerFactory
) -> None:
    """Keys each within --max-payload-bytes can add up to a get_all reply over the broker's
    max_packet_size: it is answered too_large, and the worker stays connected and serves.
    (The broker dropped the worker for the reply, and again on each reconnection, as the
    reply went out again: nothing else was served.)"""
    small = Mosquitto(tmp_path / "broker", extra="max_packet_size 100000").start()
    try:
        async with (
            worker_factory(small, max_payload_bytes=40_000) as w,
            device(small.host, small.port, w.cfg.prefix) as d,
        ):
            for i in range(4):
                body = {"ns": "n", "key": f"k{i}", "value": "v" * 30_000}
                assert (await d.request("big", "state/save", body))["ok"]
            reply = await d.request("big", "state/get_all", {"ns": "n"})
            assert reply["error"]["code"] == "too_large"
            assert "max_packet_size" in reply["error"]["message"]
            assert (await d.request("big", "state/load", {"ns": "n", "key": "k0"}))["ok"]
            assert w.connections == 1
            assert w.stats.errors["too_large"] == 1
    finally:
        small.stop()


async def test_a_stop_mid_sweep_announces_the_evictions_it_made(
    broker: Mosquitto, tmp_path: Path
) -> None:
    """A stop while the sweep announces an expiry chunk (its events held up, here by the
    broker's PUBACKs): the chunk's evictions, made and stored, are all announced before the
    worker goes, and what it had not swept yet is at the next start: each once. The sweep
    was cancelled mid-chunk, and the events not yet sent were lost with SQLite's deletions."""
    prefix, db, n = unique("mem"), f"sqlite:///{tmp_path / 'm.db'}", 600  # chunks 500, 100

    def config(port: int, ttl: float) -> Config:
        return make_config(
            broker, port=port, prefix=prefix, backend=db, ttl=ttl, max_conversations=10_000
        )

    async with (
        watcher(broker.host, broker.port, f"{prefix}/+/evicted") as evicted,
        device(broker.host, broker.port, prefix) as d,
    ):
        async with running(config(broker.port, 3600)):
            for i in range(n):
                await d.send(f"{prefix}/c{i:04}/append", {"role": "user", "content": "x"}, qos=0)
            assert (await d.request(f"c{n - 1:04}", "get"))["turns"]
        async with AckHolder(broker.host, broker.port, lambda t: t.endswith("/evicted")) as hop:
            hop.holding = True
            worker = Service(config(hop.port, 0.001), create_backend(config(hop.port, 0.001)))
            stop = asyncio.Event()
            task = asyncio.create_task(worker.run(stop))
            # The sweep announces a chunk of 500, two slices of 64 at most unacknowledged: it
            # waits for PUBACKs held.
            events = [decode(await next_message(evicted))]
            (sweep,) = [t for t in asyncio.all_tasks() if t.get_name() == "sweep"]
            stop.set()
            # Stopping, the chunk's events held: the sweep is not cancelled meanwhile (it
            # was, within a few turns of the loop), then the broker acknowledges again.
            for _ in range(200):
                await asyncio.sleep(0)  # turns of the loop, not time
                if sweep.done():
                    break
            hop.release()
            await asyncio.wait_for(task, 30)
        async with running(config(broker.port, 0.001)):
            while len(events) < n:
                events.append(decode(await next_message(evicted)))
    assert sorted(e["convo"] for e in events) == [f"c{i:04}" for i in range(n)]
    assert {e["reason"] for e in events} == {"ttl"}


async def test_each_lost_connection_is_said(
    own_broker: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    """A broker that stays away is said once (above); a connection that was made and is lost
    again is a new loss, said again, however short it lasted (a flapping connection, or a
    twin on another prefix taking the id, was hidden at debug level)."""
    with caplog.at_level(logging.WARNING, logger="memory_worker"):
        async with running(make_config(own_broker)) as w:
            for n in (2, 3):
                own_broker.restart()
                await asyncio.wait_for(w.wait_connections(n), 30)
    said = [r for r in caplog.records if "unreachable or lost" in r.getMessage()]
    assert len(said) == 2


def _sqlite_worker(tmp_path: Path) -> tuple[str, list[str]]:
    """A prefix, and the flags of a worker on a SQLite file in `tmp_path` announcing each
    turn past a window of one."""
    prefix = unique("mem")
    args = ["--prefix", prefix, "--client-id", unique("w-"), "--max-turns", "1"]
    return prefix, [*args, "--backend", f"sqlite:///{tmp_path}/m.db", "--trimmed-events"]


async def _trim_kept_from_the_broker(broker: Mosquitto, d: Device, args: list[str]) -> None:
    """The worker appends "one" and "two" to "c" and is killed; its trimmed event of "one"
    never reached the broker, as if it died before writing it."""
    async with AckHolder(broker.host, broker.port) as hop:
        hop.swallowing = lambda topic: topic.endswith("/trimmed")
        proc = spawn_worker(broker, *args, "--port", str(hop.port))
        try:
            await asyncio.to_thread(wait_serving, proc)
            for content in ("one", "two"):
                assert (await d.request("c", "append", {"role": "user", "content": content}))["ok"]
        finally:
            reap(proc)


async def test_a_trim_stored_before_its_event_left_is_announced_at_the_next_start(
    broker: Mosquitto, tmp_path: Path
) -> None:
    """A worker killed after SQLite stored a trim and before the broker had its trimmed event
    (here the event never reaches the broker, as if the worker died before writing it)
    announces it when it starts again: the turns reach the summarizer. They were lost, in
    neither a get nor a summary."""
    prefix, args = _sqlite_worker(tmp_path)
    async with (
        watcher(broker.host, broker.port, f"{prefix}/+/trimmed") as trimmed,
        device(broker.host, broker.port, prefix) as d,
    ):
        await _trim_kept_from_the_broker(broker, d, args)
        assert trimmed.empty()
        proc = spawn_worker(broker, *args)
        try:
            event = decode(await next_message(trimmed))
        finally:
            reap(proc, signal.SIGTERM)
    assert (event["convo"], [t["content"] for t in event["turns"]]) == ("c", ["one"])


async def test_a_trim_redis_kept_whose_event_never_left_is_announced_by_a_sweep(
    broker: Mosquitto, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same on Redis, which workers share: the killed worker's trim waits in Redis's
    outbox, and a sweep of a worker of the group (here the one started again) announces it
    once it has waited OUTBOX_STALE (shortened here): the turns reach the summarizer. They
    were lost, in neither a get nor a summary."""
    prefix = unique("mem")
    args = ["--prefix", prefix, "--client-id", unique("w-"), "--max-turns", "1"]
    args += ["--backend", redis_url, "--trimmed-events"]
    monkeypatch.setattr(c, "OUTBOX_STALE", 0.5)
    async with (
        watcher(broker.host, broker.port, f"{prefix}/+/trimmed") as trimmed,
        device(broker.host, broker.port, prefix) as d,
    ):
        await _trim_kept_from_the_broker(broker, d, args)
        assert trimmed.empty()
        cfg = make_config(
            broker, prefix=prefix, backend=redis_url, max_turns=1, trimmed_events=True
        )
        async with running(cfg):
            event = decode(await next_message(trimmed))
            assert trimmed.empty()
    assert (event["convo"], [t["content"] for t in event["turns"]]) == ("c", ["one"])


async def test_what_opening_evicts_is_announced_on_connecting(
    broker: Mosquitto, tmp_path: Path
) -> None:
    """A worker started on a SQLite file with a lower --max-conversations evicts as it opens,
    and announces it as soon as it serves, not with the first request or sweep to come (an
    hour away under the default --ttl)."""
    prefix, args = _sqlite_worker(tmp_path)
    async with (
        watcher(broker.host, broker.port, f"{prefix}/+/evicted") as evicted,
        device(broker.host, broker.port, prefix) as d,
    ):
        proc = spawn_worker(broker, *args)
        try:
            await asyncio.to_thread(wait_serving, proc)
            for convo in ("a", "b", "c"):
                assert (await d.request(convo, "append", {"role": "user", "content": "x"}))["ok"]
        finally:
            assert reap(proc, signal.SIGTERM) == 0
        proc = spawn_worker(broker, *args, "--max-conversations", "2")
        try:
            event = decode(await next_message(evicted))
        finally:
            reap(proc, signal.SIGTERM)
    assert (event["convo"], event["reason"]) == ("a", "lru")


async def test_a_held_trimmed_event_comes_before_the_new_ones(
    broker: Mosquitto, tmp_path: Path
) -> None:
    """The trimmed event a killed worker kept is announced before the trims of the requests
    its session queued meanwhile, which the new run serves as it connects (it came after
    them: a summarizer waited for the gap, up to --gap-wait, before folding)."""
    prefix, args = _sqlite_worker(tmp_path)
    async with (
        watcher(broker.host, broker.port, f"{prefix}/+/trimmed") as trimmed,
        device(broker.host, broker.port, prefix) as d,
    ):
        await _trim_kept_from_the_broker(broker, d, args)
        queued = await d.send(f"{prefix}/c/append", {"role": "user", "content": "three"})
        # Its subscriptions answered late: the queued request is served meanwhile.
        async with AckHolder(broker.host, broker.port) as hop:
            hop.withheld, hop.holding = {packets.SUBACK}, True
            proc = spawn_worker(broker, *args, "--port", str(hop.port))
            try:
                assert (await d.reply(queued))["ok"]
                events = [decode(await next_message(trimmed))]
                hop.release()
                events.append(decode(await next_message(trimmed)))
            finally:
                reap(proc, signal.SIGTERM)
    assert [[t["content"] for t in e["turns"]] for e in events] == [["one"], ["two"]]


async def test_a_stopped_worker_announces_no_trimmed_event_twice(
    broker: Mosquitto, tmp_path: Path
) -> None:
    """A worker stopped gracefully has its trimmed events acknowledged by the broker, and
    its SQLite file knows it: the next start announces none of them again."""
    prefix, args = _sqlite_worker(tmp_path)
    async with (
        watcher(broker.host, broker.port, f"{prefix}/+/trimmed") as trimmed,
        device(broker.host, broker.port, prefix) as d,
    ):
        contents = []
        for content in ("one", "two", "three"):
            proc = spawn_worker(broker, *args)
            try:
                await asyncio.to_thread(wait_serving, proc)
                body = {"role": "user", "content": content}
                assert (await d.request("c", "append", body))["ok"]
                if content != "one":
                    event = decode(await next_message(trimmed))
                    contents.append([t["content"] for t in event["turns"]])
            finally:
                assert reap(proc, signal.SIGTERM) == 0
    assert contents == [["one"], ["two"]]


def _save_now(b: Mosquitto) -> None:
    """Make the broker write its persistence file (SIGUSR1) and wait until it has: what a
    broker killed later comes back with, as after its last autosave. It writes a new file
    and renames it over the old one: the file's inode changes (no event says so; polled, as
    wait_port polls a port)."""
    db = b.workdir / "mosquitto.db"
    before = db.stat().st_ino if db.exists() else 0
    assert b.proc is not None
    b.proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while not db.exists() or db.stat().st_ino == before:
        assert time.monotonic() < deadline, "the broker wrote no persistence file"
        time.sleep(0.01)


_APPEND = "append"
# What a replay meets: (worker flags, requests in flight at the broker's save, requests
# answered after it, the conversation's turns expected after the broker's crash).
_REPLAYS: dict[
    str, tuple[tuple[str, ...], list[tuple[str, str, dict[str, Any]]], list[Any], Any]
] = {
    "a delete": (
        (),
        [
            ("c", _APPEND, {"role": "user", "content": "gone", "id": "a2"}),
            ("c", "delete", {"id": "d1"}),
            ("c", _APPEND, {"role": "user", "content": "one", "id": "a3"}),
        ],
        [("c", {"role": "user", "content": "two", "id": "a4"})],
        [("one", 1), ("two", 2)],
    ),
    "an eviction": (
        ("--max-conversations", "1"),
        [("c", _APPEND, {"role": "user", "content": "gone", "id": "a2"})],
        [
            ("o", {"role": "user", "content": "other", "id": "o1"}),  # "c" goes (LRU)
            ("c", {"role": "user", "content": "one", "id": "a3"}),  # "o" goes
        ],
        [("one", 1)],
    ),
}


@pytest.mark.parametrize("story", list(_REPLAYS))
@pytest.mark.parametrize("backend", ["memory", "sqlite", "sqlite power cut", "redis"])
async def test_a_broker_crash_replays_nothing_twice(
    own_broker: Mosquitto,
    tmp_path: Path,
    backend: str,
    story: str,
    request: pytest.FixtureRequest,
) -> None:
    """A broker killed after an autosave comes back with the requests that were in flight to
    the worker then, and delivers them again though they were answered since. With ids the
    worker recognizes every one, a delete's too, across the delete that started the
    conversation again, or its eviction: nothing acknowledged is lost and nothing is stored
    twice (a replayed delete took the turns appended after it; replayed appends were stored
    again, an old turn after newer ones). A power cut takes the worker with the broker:
    SQLite keeps what it needs of the delete and the eviction."""
    flags, in_flight, after, expected = _REPLAYS[story]
    b, prefix, cid = own_broker, unique("mem"), unique("w-")
    url = {"memory": "memory", "redis": ""}.get(backend, f"sqlite:///{tmp_path}/m.db")
    url = url or request.getfixturevalue("redis_url")
    args = ("--prefix", prefix, "--client-id", cid, "--backend", url, *flags)
    status = f"{prefix}/_worker/{cid}/status"
    proc = spawn_worker(b, *args)
    try:
        async with watcher(b.host, b.port, status) as seen:
            await _wait_status(seen, "online")
        async with device(b.host, b.port, prefix) as d:
            body = {"role": "user", "content": "before", "id": "a1"}
            assert (await d.request("c", "append", body))["seq"] == 1
            proc.send_signal(signal.SIGSTOP)  # these stay in flight to the worker
            futs = [await d.send(f"{prefix}/{c}/{op}", body) for c, op, body in in_flight]
            await asyncio.to_thread(_save_now, b)
            proc.send_signal(signal.SIGCONT)
            assert [(await d.reply(f))["ok"] for f in futs] == [True] * len(futs)
            for convo, body in after:
                assert (await d.request(convo, _APPEND, body))["ok"]
        b.stop(signal.SIGKILL)
        if backend == "sqlite power cut":
            reap(proc)
            proc = spawn_worker(b, *args)
        b.start()
        async with device(b.host, b.port, prefix) as d:
            # After the replayed requests: the broker hands them to the worker's session first.
            turns = (await d.request("c", "get"))["turns"]
    finally:
        proc.send_signal(signal.SIGCONT)
        reap(proc, signal.SIGTERM)
    assert [(t["content"], t["seq"]) for t in turns] == expected
