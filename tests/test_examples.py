"""Each example in examples/ runs as a user runs it, against a real broker and worker."""

from __future__ import annotations

import asyncio
import json
import os
import sys

from tests.conftest import unique
from tests.processes import REPO, Mosquitto
from worker.client import MemoryClient
from worker.service import Service


def _url(broker: Mosquitto, worker: Service) -> str:
    return f"mqtt://{broker.host}:{broker.port}/{worker.cfg.prefix}"


async def _run(url: str, script: str, *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(REPO / "examples" / script),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "MEMORY_URL": url, "PYTHONPATH": str(REPO)},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def test_voice_assistant_remembers(broker: Mosquitto, worker: Service) -> None:
    """Each answer sees the turns before it: user, assistant, user, ..."""
    convo = unique("kiosk")
    out = await _run(_url(broker, worker), "voice_assistant.py", convo, "hi", "and now?")
    assert out.splitlines() == [
        "you said 'hi'; I remember 1 turns",
        "you said 'and now?'; I remember 3 turns",
    ]
    async with MemoryClient(broker.host, broker.port, worker.cfg.prefix) as m:
        assert [t["role"] for t in await m.get(convo)] == ["user", "assistant"] * 2


async def test_one_variable_switches_memory_to_the_bus(broker: Mosquitto, worker: Service) -> None:
    """The same program prints the same answer with memory:// and mqtt://."""
    local = await _run("memory://?max_turns=8", "any_memory.py")
    remote = await _run(_url(broker, worker), "any_memory.py")
    assert json.loads(local) == json.loads(remote)
    assert json.loads(remote) == {"turns": ["hello", "how warm is it?"], "units": "metric"}
    async with MemoryClient(broker.host, broker.port, worker.cfg.prefix) as m:
        assert await m.load("demo", "prefs", "units") == "metric"  # it was on the worker


async def test_threaded_handler_shares_one_client(broker: Mosquitto, worker: Service) -> None:
    """12 concurrent web requests, one blocking client: each session its own answer."""
    out = await _run(_url(broker, worker), "threaded_handler.py", "--demo", "12")
    answers = [json.loads(line) for line in out.splitlines()]
    assert sorted(a["session"] for a in answers) == sorted(f"web-{i}" for i in range(12))
    assert all(a["turns"] == 1 and a["visits"] == 1 for a in answers)


async def test_eviction_printer_prints_each_eviction(broker: Mosquitto, worker: Service) -> None:
    """The dashboard-side script prints a line per eviction event."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(REPO / "examples" / "print_evictions.py"),
        "2",
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "MEMORY_URL": _url(broker, worker), "PYTHONPATH": str(REPO)},
    )
    assert proc.stdout is not None
    assert await asyncio.wait_for(proc.stdout.readline(), 30) == b"watching\n"
    async with MemoryClient(broker.host, broker.port, worker.cfg.prefix) as m:
        for convo in ("a", "b"):
            await m.append(convo, "user", "x")
            await m.forget(convo)
    out = await asyncio.wait_for(proc.stdout.read(), 30)
    assert await proc.wait() == 0
    assert out.decode().splitlines() == [
        "a: deleted, 1 turns, 0 keys",
        "b: deleted, 1 turns, 0 keys",
    ]
