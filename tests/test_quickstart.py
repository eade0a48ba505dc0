"""The quick start as a new user meets it: scripts/run from a clean clone keeps queued requests."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import msgpack
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.clients import device, watcher
from tests.fake_llm import fake_model
from tests.processes import MOSQUITTO, REPO, Mosquitto, free_port, wait_port
from worker.constants import DEFAULT_CLIENT_ID


@pytest.fixture
def clone() -> Iterator[Path]:
    """A `git clone` of this repository's committed state, sharing its installed .venv.

    Made under /tmp and readable by all, as a checkout in a home folder would be, so that
    Mosquitto dropped to the `mosquitto` user can reach it.
    """
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    top = Path(tempfile.mkdtemp(prefix="mw-clone-", dir="/tmp"))
    try:
        top.chmod(0o755)
        subprocess.run(["git", "clone", "-q", str(REPO), str(top / "mw")], check=True)
        venv = REPO / ".venv"
        (top / "mw" / ".venv").symlink_to(venv)
        # What ensure_venv would write after installing: the shared .venv already has it all.
        want = hashlib.sha256((top / "mw" / "pyproject.toml").read_bytes()).hexdigest()
        (venv / ".installed-").write_text(want + "\n")
        yield top / "mw"
    finally:
        shutil.rmtree(top, ignore_errors=True)


@contextlib.contextmanager
def scripts_run(
    clone: Path,
    port: int,
    *args: str,
    until: tuple[str, ...] = ("serving mem/#",),
    dashboard_port: int | None = None,
) -> Iterator[list[str]]:
    """`scripts/run ARGS` in the clone until it says the worker serves (and whatever else
    `until` names); Ctrl-C at the end.

    Yields the lines it printed so far; the rest are added once it has stopped.
    """
    proc = subprocess.Popen(
        [str(clone / "scripts" / "run"), *args],
        cwd=clone,
        env={
            **os.environ,
            "MEMORY_WORKER_PORT": str(port),
            "MEMORY_WORKER_DASHBOARD_PORT": str(dashboard_port or free_port()),
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None
    seen = []
    waiting = set(until)
    for line in proc.stdout:
        seen.append(line)
        waiting -= {word for word in waiting if word in line}
        if not waiting:
            break
    else:
        proc.wait(timeout=10)
        pytest.fail("scripts/run did not serve:\n" + "".join(seen))
    try:
        yield seen
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        seen.extend(proc.communicate(timeout=20)[0].splitlines(keepends=True))


def session_present(port: int, client_id: str) -> bool:
    """Whether the broker on `port` still keeps a session for `client_id` (MQTT 5 CONNACK)."""
    flags: list[bool] = []
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id, protocol=paho.MQTTv5)
    client.on_connect = lambda _c, _u, f, _rc, _p: flags.append(f.session_present)
    client.connect("127.0.0.1", port, clean_start=False)
    deadline = time.monotonic() + 10
    while not flags and time.monotonic() < deadline:
        client.loop(timeout=0.5)
    client.disconnect()
    assert flags, "no CONNACK"
    return flags[0]


def broker_alone(conf: Path, port: int) -> subprocess.Popen[bytes]:
    """The broker as scripts/run configured it, started by hand without the worker."""
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], cwd=conf.parent)
    wait_port(port, proc=proc)
    return proc


async def test_requests_queued_while_stopped_survive_a_broker_restart(clone: Path) -> None:
    """Stop scripts/run, queue QoS 1 appends on its broker, restart that broker, run again."""
    port = free_port()
    with scripts_run(clone, port):
        pass
    conf = clone / "var" / "mosquitto.conf"
    if os.geteuid() == 0:  # the folder was given to the user Mosquitto runs as
        assert "user root" not in conf.read_text()
        assert (clone / "var" / "mosquitto").owner() == "mosquitto"
    alone = broker_alone(conf, port)
    try:
        async with aiomqtt.Client("127.0.0.1", port) as client:
            for n in range(5):
                body = msgpack.packb({"role": "user", "content": f"queued {n}"})
                await client.publish("mem/kiosk-7/append", body, qos=1)
    finally:
        alone.send_signal(signal.SIGTERM)
        assert alone.wait(timeout=10) == 0
    with scripts_run(clone, port):
        async with device("127.0.0.1", port, "mem") as d:
            reply = await d.request("kiosk-7", "get")
    assert [t["content"] for t in reply["turns"]] == [f"queued {n}" for n in range(5)]
    assert "Permission denied" not in (clone / "var" / "mosquitto.log").read_text()


async def _folded(clone: Path, port: int, *args: str, **login: Any) -> None:
    """`scripts/run ARGS --max-turns 2 --summarizer URL --model tiny`: four turns appended,
    the two oldest are folded into the summary by the model named; Ctrl-C then stops the
    two without a word about the summarizer (it stops first, at times)."""
    with (
        fake_model() as model,
        scripts_run(
            clone,
            port,
            *args,
            "--max-turns",
            "2",
            "--summarizer",
            model.url,
            "--model",
            "tiny",
            until=("serving mem/#", "folding mem/+/trimmed"),
        ) as said,
    ):
        async with (
            device("127.0.0.1", port, "mem", **login) as d,
            watcher("127.0.0.1", port, "reply/+/_summarizer/#", **login) as replies,
        ):
            for n in range(1, 5):
                await d.request("voice-1", "append", {"role": "user", "content": f"t{n}"})
            while (await d.request("voice-1", "get")).get("summary", {}).get("upto") != 2:
                await asyncio.wait_for(replies.get(), 30)
            reply = await d.request("voice-1", "get")
    assert reply["summary"]["text"] == "t1 t2"
    assert [t["content"] for t in reply["turns"]] == ["t3", "t4"]
    assert model.asked_for == {"tiny"}
    assert not [line for line in said if "summarizer stopped" in line]


async def test_scripts_run_starts_a_summarizer_beside_the_worker(clone: Path) -> None:
    """`scripts/run --summarizer URL --model NAME` runs the worker with trimmed events and a
    summarizer folding them with the model NAME on the model server at URL (--model went to
    the worker, which refused it; the summarizer's warning said to give it)."""
    await _folded(clone, free_port())


@pytest.fixture
def passwd(tmp_path: Path) -> Path:
    """A Mosquitto password file with the user kiosk, password s3cret."""
    path = tmp_path / "passwd"
    command = ["mosquitto_passwd", "-b", "-c", str(path), "kiosk", "s3cret"]
    subprocess.run(command, check=True, capture_output=True)
    return path


async def test_scripts_runs_summarizer_logs_in_as_the_worker(
    clone: Path, tmp_path: Path, passwd: Path
) -> None:
    """On a broker that wants a login, the summarizer uses the worker's (it tried anonymous
    for ever, and the turns the worker trimmed reached no summary)."""
    conf = f"allow_anonymous false\npassword_file {passwd}"
    broker = Mosquitto(tmp_path / "mosquitto", extra=conf).start()
    try:
        login = {"username": "kiosk", "password": "s3cret"}
        await _folded(clone, broker.port, "--username", "kiosk", "--password", "s3cret", **login)
    finally:
        broker.stop()


def test_scripts_run_stops_when_its_summarizer_does(clone: Path) -> None:
    """A summarizer that stops (here at once: a model URL without its scheme) takes the
    worker with it, saying why: the worker went on trimming turns that no summary kept."""
    proc = subprocess.run(
        [str(clone / "scripts" / "run"), "--summarizer", "localhost:11434"],
        cwd=clone,
        env={
            **os.environ,
            "MEMORY_WORKER_PORT": str(free_port()),
            "MEMORY_WORKER_DASHBOARD_PORT": str(free_port()),
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode != 0, proc.stdout
    assert "--llm-url must be an http:// or https:// URL" in proc.stdout
    assert "the summarizer stopped (exit 2): stopping the worker too" in proc.stdout


def test_its_own_broker_on_a_port_below_the_ephemeral_range(
    clone: Path, stock_broker: Mosquitto
) -> None:
    """`--own-broker` with the port taken picks another below the kernel's ephemeral range,
    where no client's local port can be: a client retrying the stopped broker's port could
    be given it as its own and connect to itself, holding it from the broker's restart."""
    stock_broker.start()
    try:
        # the dashboard's port taken too: off (Mosquitto 2.0.11 here), it moves nowhere
        taken = stock_broker.port
        with scripts_run(clone, taken, "--own-broker", dashboard_port=taken) as said:
            (port,) = re.findall(r"started mosquitto on 127\.0\.0\.1:(\d+)", "".join(said))
    finally:
        stock_broker.stop()
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    assert int(port) != stock_broker.port
    assert int(port) < low
    if any("dashboard off" in line for line in said):  # it said so, and then that it moved
        assert not any("the dashboard gets port" in line for line in said), said


async def test_on_a_broker_it_did_not_start(clone: Path, stock_broker: Mosquitto) -> None:
    """With Mosquitto already listening, `scripts/run --dashboard` names the command that
    serves the page (without --dashboard, one line says there is none), and the worker
    leaves no session on that broker once stopped."""
    stock_broker.start()
    try:
        with scripts_run(clone, stock_broker.port, "--dashboard") as said:
            async with device("127.0.0.1", stock_broker.port, "mem") as d:
                assert (await d.request("kiosk-7", "get"))["ok"] is True
        text = "".join(said)
        assert "'scripts/run --own-broker --dashboard'" in text, text
        assert session_present(stock_broker.port, DEFAULT_CLIENT_ID) is False
        # Not asked for: one line says there is none, not the recipe (a new user's trial).
        with scripts_run(clone, stock_broker.port) as said:
            async with device("127.0.0.1", stock_broker.port, "mem") as d:
                assert (await d.request("kiosk-7", "get"))["ok"] is True
        told = [line for line in said if "dashboard" in line]
        assert len(told) == 1, told
        assert "no dashboard on 127.0.0.1:" in told[0], told
    finally:
        stock_broker.stop()
