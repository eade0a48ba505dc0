"""Session state and the SQLite backend end to end: MQTT 5 and 3.1.1, memctl, restarts."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.clients import Device, decode, device, next_message, watcher
from tests.conftest import WorkerFactory, reap, spawn_worker, unique
from tests.processes import Mosquitto
from tests.test_cli import memctl, run_worker


async def test_state_operations(dev: Device) -> None:
    """save, load, get_all and delete, with values that round-trip exactly."""
    value = {"intent": "book", "slots": [1, 2.5, None, True], "raw": b"\x00\x01"}
    assert await dev.request("c", "state/save", {"ns": "chain", "key": "k", "value": value}) == {
        "ok": True
    }
    assert await dev.request("c", "state/load", {"ns": "chain", "key": "k"}) == {
        "ok": True,
        "found": True,
        "value": value,
    }
    await dev.request("c", "state/save", {"ns": "chain", "key": "n", "value": None})
    assert (await dev.request("c", "state/load", {"ns": "chain", "key": "n"}))["found"] is True
    assert await dev.request("c", "state/get_all", {"ns": "chain"}) == {
        "ok": True,
        "items": {"k": value, "n": None},
    }
    assert await dev.request("c", "state/delete", {"ns": "chain", "key": "k"}) == {
        "ok": True,
        "deleted": True,
    }
    assert await dev.request("c", "state/load", {"ns": "chain", "key": "k"}) == {
        "ok": True,
        "found": False,
        "value": None,
    }
    assert await dev.request("c", "state/get_all", {"ns": "other"}) == {"ok": True, "items": {}}


async def test_state_errors(dev: Device, worker_factory: WorkerFactory) -> None:
    """A missing field or too long a key is bad_request; an unknown operation bad_topic."""
    reply = await dev.request("c", "state/save", {"ns": "n", "key": "k"})
    assert reply["error"]["code"] == "bad_request"
    reply = await dev.request("c", "state/save", {"ns": "n", "key": "k" * 200, "value": 1})
    assert reply["error"]["code"] == "bad_request"
    reply = await dev.request("c", "state/nope", {"ns": "n"})
    assert reply["error"]["code"] == "bad_topic"


async def test_max_keys_is_too_large(broker: Mosquitto, worker_factory: WorkerFactory) -> None:
    """A new key past --max-keys is answered too_large."""
    async with worker_factory(max_keys=2) as w, device(broker.host, broker.port, w.cfg.prefix) as d:
        for key in "ab":
            await d.request("c", "state/save", {"ns": "n", "key": key, "value": 1})
        reply = await d.request("c", "state/save", {"ns": "n", "key": "z", "value": 1})
        assert reply["error"]["code"] == "too_large"


async def test_key_ttl(broker: Mosquitto, worker: Any, dev5: Device) -> None:
    """A key saved with a ttl is swept once it passes, without an event."""
    stats = f"{worker.cfg.prefix}/_worker/{worker.cfg.client_id}/stats"
    async with watcher(broker.host, broker.port, stats, f"{dev5.prefix}/+/evicted") as seen:
        await dev5.request("c", "state/save", {"ns": "n", "key": "k", "value": 1, "ttl": 0.3})
        await dev5.request("c", "state/save", {"ns": "n", "key": "stay", "value": 2})
        keys = None
        while keys != 1:  # stats come every 0.2 s; the sweep every 0.25 s
            msg = await next_message(seen)
            assert msg.topic.value == stats, "a key's expiry is not an eviction"
            keys = decode(msg)["keys"]
    assert await dev5.request("c", "state/load", {"ns": "n", "key": "k"}) == {
        "ok": True,
        "found": False,
        "value": None,
    }
    assert await dev5.request("c", "state/get_all", {"ns": "n"}) == {
        "ok": True,
        "items": {"stay": 2},
    }


async def test_eviction_event_counts_keys(broker: Mosquitto, dev5: Device) -> None:
    """The eviction event of a deleted conversation counts its turns and its keys."""
    async with watcher(broker.host, broker.port, f"{dev5.prefix}/+/evicted") as events:
        await dev5.request("c", "append", {"role": "u", "content": "x"})
        for key in "abc":
            await dev5.request("c", "state/save", {"ns": "n", "key": key, "value": key})
        await dev5.request("c", "delete")
        ev = decode(await next_message(events))
        assert (ev["reason"], ev["count"], ev["keys"]) == ("deleted", 1, 3)


async def test_memctl_state(broker: Mosquitto, worker: Any) -> None:
    """memctl state saves (JSON, or text as it is with --string), loads, lists and deletes."""
    p = worker.cfg.prefix
    for args in (
        ("k", '{"a": [1, 2]}'),
        ("word", "hello", "--ttl", "60", "--string"),
        ("flag", "true"),
        ("shout", "--string", "TRUE"),
    ):
        assert await memctl(broker, p, "state", "save", "c", "n", *args) == (0, [{"ok": True}])
    assert await memctl(broker, p, "state", "load", "c", "n", "k") == (
        0,
        [{"ok": True, "found": True, "value": {"a": [1, 2]}}],
    )
    assert await memctl(broker, p, "state", "get-all", "c", "n") == (
        0,
        [
            {
                "ok": True,
                "items": {"k": {"a": [1, 2]}, "word": "hello", "flag": True, "shout": "TRUE"},
            }
        ],
    )
    assert await memctl(broker, p, "state", "delete", "c", "n", "k") == (
        0,
        [{"ok": True, "deleted": True}],
    )
    # Bytes, as `load` shows them (LangChain's byte store keeps its values so), saved back.
    assert await memctl(broker, p, "state", "save", "c", "n", "b", "--base64", "AP8=") == (
        0,
        [{"ok": True}],
    )
    async with device(broker.host, broker.port, p) as d:
        assert (await d.request("c", "state/load", {"ns": "n", "key": "b"}))["value"] == b"\x00\xff"
    loaded = {"ok": True, "found": True, "value": {"base64": "AP8="}}
    assert await memctl(broker, p, "state", "load", "c", "n", "b") == (0, [loaded])


async def test_sqlite_worker_keeps_everything_across_restart(
    broker: Mosquitto, worker_factory: WorkerFactory, tmp_path: Path
) -> None:
    """A worker on SQLite finds turns, state and the next seq again after a restart."""
    backend = f"sqlite:///{tmp_path}/memory.db"
    prefix = unique("mem")
    async with (
        worker_factory(backend=backend, prefix=prefix) as w,
        device(broker.host, broker.port, prefix) as d,
    ):
        assert w.backend.name == "sqlite"
        for i in range(3):
            await d.request("c", "append", {"role": "u", "content": str(i)})
        await d.request("c", "state/save", {"ns": "n", "key": "k", "value": [1]})
    async with (
        worker_factory(backend=backend, prefix=prefix),
        device(broker.host, broker.port, prefix) as d,
    ):
        assert [t["content"] for t in (await d.request("c", "get"))["turns"]] == ["0", "1", "2"]
        assert (await d.request("c", "state/load", {"ns": "n", "key": "k"}))["value"] == [1]
        assert (await d.request("c", "append", {"role": "u", "content": "3"}))["seq"] == 4


async def test_sqlite_acknowledged_appends_survive_sigkill(
    broker: Mosquitto, tmp_path: Path
) -> None:
    """Every append whose reply went out is there after the worker is SIGKILLed."""
    prefix, cid = unique("mem"), unique("w-")
    args = (
        "--prefix",
        prefix,
        "--client-id",
        cid,
        "--backend",
        f"sqlite:///{tmp_path}/m.db",
        "--max-turns",
        "1000",
    )
    status = f"{prefix}/_worker/{cid}/status"
    async with watcher(broker.host, broker.port, status) as seen:
        proc = spawn_worker(broker, *args)
        assert decode(await next_message(seen))["state"] == "online"
        async with device(broker.host, broker.port, prefix) as d:
            futs = [
                await d.send(f"{prefix}/c/append", {"role": "u", "content": str(i)})
                for i in range(300)
            ]
            acked = 0
            for fut in futs:
                if acked == 150:
                    proc.send_signal(signal.SIGKILL)
                try:
                    await asyncio.wait_for(asyncio.shield(fut), 2 if acked < 150 else 0.5)
                except TimeoutError:
                    break
                acked += 1
        reap(proc)
        assert decode(await next_message(seen))["state"] == "offline"
        proc = spawn_worker(broker, *args)
        assert decode(await next_message(seen))["state"] == "online"
    try:
        async with device(broker.host, broker.port, prefix) as d:
            turns = (await d.request("c", "get"))["turns"]
        contents = [int(t["content"]) for t in turns]
        # Without ids, an append stored but not yet acknowledged when the worker died is
        # applied again when the broker delivers it again (see test_faults for ids).
        assert set(range(acked)) <= set(contents)
        first_seen = list(dict.fromkeys(contents))
        assert first_seen == sorted(first_seen)
    finally:
        reap(proc, signal.SIGTERM)


@pytest.mark.parametrize(
    "url", ["sqlite://", "sqlite:///", "sqlite:///x.db?foo=1", "sqlite:///x.db?synchronous=maybe"]
)
def test_bad_sqlite_urls(url: str) -> None:
    """A bad sqlite URL is one line naming --backend and exit 2."""
    done = run_worker("--backend", url)
    assert done.returncode == 2
    assert "--backend" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
