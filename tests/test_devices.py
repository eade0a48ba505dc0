"""The device recipes of docs/devices.md, run as written against a real broker and worker."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import unique
from tests.processes import REPO, Mosquitto
from worker.service import Service

RECIPES = REPO / "docs" / "devices"


async def run(
    broker: Mosquitto, worker: Service, *cmd: str, cwd: Path = RECIPES, convo: str = ""
) -> str:
    """Run a recipe against `worker` on `convo` (else one of its own); return what it printed."""
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        cwd=cwd,
        env={
            **os.environ,
            "MQTT_HOST": broker.host,
            "MQTT_PORT": str(broker.port),
            "PREFIX": worker.cfg.prefix,
            "CONVO": convo or unique("dev-"),
            "PYTHON": sys.executable,
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    text = out.decode()
    assert proc.returncode == 0, text
    return text


@pytest.mark.parametrize("version", ["--v5", "--v311"])
async def test_paho_python_recipe(broker: Mosquitto, worker: Service, version: str) -> None:
    """request_reply.py appends with an id, gets it back, and times round trips."""
    out = await run(broker, worker, sys.executable, "request_reply.py", version, "--rounds", "5")
    appended, got, timing = (json.loads(line) for line in out.splitlines())
    assert appended["ok"] is True
    assert got["turns"][-1]["content"] == "what's the weather?"
    assert timing["median_ms"] > 0


@pytest.fixture(scope="session")
def node_modules(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with MQTT.js and @msgpack/msgpack installed by npm, for the .mjs recipe."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are not installed: the MQTT.js recipe is not run")
    folder = tmp_path_factory.mktemp("npm")
    done = subprocess.run(
        ["npm", "install", "--silent", "--no-audit", "--no-fund", "mqtt@5", "@msgpack/msgpack@3"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"npm install mqtt @msgpack/msgpack failed: {done.stderr.strip()[:200]}")
    shutil.copy(RECIPES / "request_reply.mjs", folder)
    return folder


@pytest.mark.parametrize("version", ["--v5", "--v311"])
async def test_mqtt_js_recipe(
    broker: Mosquitto, worker: Service, node_modules: Path, version: str
) -> None:
    """request_reply.mjs (MQTT.js) appends, gets it back, and times round trips."""
    out = await run(
        broker, worker, "node", "request_reply.mjs", version, "--rounds", "5", cwd=node_modules
    )
    appended, got, timing = (json.loads(line) for line in out.splitlines())
    assert appended["ok"] is True
    assert got["turns"][-1]["content"] == "what's the weather?"
    assert timing["median_ms"] > 0


@pytest.fixture(scope="session")
def c_recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """request_reply.c built with gcc against libpaho-mqtt3c and msgpack-c."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed: the paho C recipe is not run")
    if (
        not Path("/usr/include/MQTTClient.h").exists()
        or not Path("/usr/include/msgpack.h").exists()
    ):
        pytest.skip("libpaho-mqtt-dev or libmsgpack-dev is missing: the paho C recipe is not run")
    exe = tmp_path_factory.mktemp("c") / "request_reply"
    subprocess.run(
        [
            "gcc",
            "-Wall",
            "-Werror",
            "-O2",
            str(RECIPES / "request_reply.c"),
            "-o",
            str(exe),
            "-lpaho-mqtt3c",
            "-lmsgpackc",
        ],
        check=True,
    )
    return exe


@pytest.mark.parametrize("version", ["--v5", "--v311"])
async def test_paho_c_recipe(
    broker: Mosquitto, worker: Service, c_recipe: Path, version: str
) -> None:
    """request_reply.c appends, gets it back, and prints the msgpack replies; run twice on one
    conversation, it stores both turns (each request has an id of its own)."""
    convo = unique("dev-")
    for seq in (1, 2):
        out = await run(broker, worker, str(c_recipe), version, convo=convo)
        appended, got = out.splitlines()
        assert appended.startswith(f'{{"ok"=>true, "seq"=>{seq}'), out
        assert got.count('"content"=>"hello from C"') == seq, got


async def test_mosquitto_clients_recipe(broker: Mosquitto, worker: Service) -> None:
    """request_reply.sh: mosquitto_rr at MQTT 5, mosquitto_sub/pub with reply_to at 3.1.1;
    run twice on one conversation, it stores both turns."""
    if shutil.which("mosquitto_rr") is None:
        pytest.skip("mosquitto-clients is not installed")
    convo = unique("dev-")
    for seq in (1, 2):  # run twice on one conversation: each request has an id of its own
        out = await run(broker, worker, "sh", "request_reply.sh", convo=convo)
        appended, got, got_311 = out.splitlines()
        assert appended.startswith(f"{{'ok': True, 'seq': {seq}"), out
        assert got.count("hello from the shell") == seq, got
        assert "hello from the shell" in got_311


def test_the_doc_quotes_the_recipes_as_they_are() -> None:
    """Every code block of docs/devices.md marked `from <file>` is that file's text verbatim."""
    doc = (REPO / "docs" / "devices.md").read_text()
    quoted = re.findall(r"<!-- from (\S+) -->\n```\w*\n(.*?)```", doc, flags=re.S)
    assert len(quoted) >= 6
    for path, block in quoted:
        assert block in (REPO / path).read_text(), f"{path} no longer contains:\n{block}"
