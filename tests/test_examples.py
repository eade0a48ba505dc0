"""Each example in examples/ runs as a user runs it, against a real broker and worker."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import urllib.error
import urllib.request

from tests.conftest import WorkerFactory, unique
from tests.processes import REPO, Mosquitto, free_port
from worker.client import MemoryClient
from worker.service import Service


def _url(broker: Mosquitto, worker: Service) -> str:
    return f"mqtt://{broker.host}:{broker.port}/{worker.cfg.prefix}"


async def _run(url: str | None, script: str, *args: str, **env: str) -> str:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MEMORY_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(REPO / "examples" / script),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**base, **({"MEMORY_URL": url} if url else {}), "PYTHONPATH": str(REPO), **env},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def test_an_example_finds_the_broker_scripts_run_named(
    own_broker: Mosquitto, worker_factory: WorkerFactory
) -> None:
    """Without MEMORY_URL an example talks to prefix mem on MEMORY_WORKER_PORT, the port
    `scripts/run --own-broker` says to export (it went to 1883 whatever that said); with
    MEMORY_WORKER_HOST and _PREFIX too, to those, as memctl does."""
    async with worker_factory(own_broker, prefix="mem"):
        out = await _run(
            None, "voice_assistant.py", "kiosk-7", "hi", MEMORY_WORKER_PORT=str(own_broker.port)
        )
    assert out.startswith("you said 'hi'")
    async with worker_factory(own_broker, prefix="elsewhere"):
        env = {"MEMORY_WORKER_HOST": "localhost", "MEMORY_WORKER_PREFIX": "elsewhere"}
        out = await _run(
            None, "voice_assistant.py", "k", "hi", MEMORY_WORKER_PORT=str(own_broker.port), **env
        )
    assert out.startswith("you said 'hi'")


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


def _http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def test_threaded_handler_answers_bad_requests_400(
    broker: Mosquitto, worker: Service
) -> None:
    """A request without text, to /, or with a conversation id the worker refuses gets a 400
    with a one-line reason, and the server goes on answering."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(REPO / "examples" / "threaded_handler.py"),
        str(port),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "MEMORY_URL": _url(broker, worker), "PYTHONPATH": str(REPO)},
        # Ctrl-C as in a terminal, even when the suite runs with SIGINT ignored (in the
        # background, under nohup), which the example would inherit.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert proc.stdout is not None
    try:
        assert b"serving" in await asyncio.wait_for(proc.stdout.readline(), 30)
        base = f"http://127.0.0.1:{port}"
        for path in ("/chat?session=s1", "/", "/chat?session=a%2Bb&text=hi"):
            status, body = await asyncio.to_thread(_http_get, base + path)
            assert status == 400, (path, body)
            assert body.count("\n") == 1, body
            assert len(body) < 200, body
        status, body = await asyncio.to_thread(_http_get, f"{base}/chat?session=s1&text=hi")
        assert (status, json.loads(body)["turns"]) == (200, 1)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            _, err = await asyncio.wait_for(proc.communicate(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
    assert b"Traceback" not in err, err.decode()


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
