"""The docs cannot drift: every shell or Python block marked `<!-- runnable -->` in README.md
and docs/ runs against a real broker and worker, as a user would paste it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import reap, spawn_worker, unique
from tests.processes import REPO, Mosquitto

RUNNABLE = re.compile(r"<!-- runnable -->\n```(sh|bash|python)\n(.*?)```", re.S)
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def blocks(doc: Path) -> list[list[str]]:
    """Each runnable block as the command that runs it: bash, or this Python."""
    shells = {"python": [sys.executable, "-c"]}
    return [
        [*shells.get(lang, ["bash", "-euo", "pipefail", "-c"]), block]
        for lang, block in RUNNABLE.findall(doc.read_text())
    ]


@pytest.fixture(scope="module")
def shell_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A broker and a worker with the docs' defaults (prefix mem), and an environment that
    points memctl and Mosquitto's clients at them instead of port 1883."""
    broker = Mosquitto(tmp_path_factory.mktemp("docs-broker")).start()
    proc = spawn_worker(broker, "--client-id", unique("docs-"))
    config = tmp_path_factory.mktemp("xdg")
    for tool in ("mosquitto_rr", "mosquitto_pub", "mosquitto_sub"):
        (config / tool).write_text(f"-h 127.0.0.1\n-p {broker.port}\n")
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # the worker logs "serving ..." once it has subscribed
            if "serving" in line:
                break
        else:
            raise AssertionError("the worker exited before serving")
        yield {
            **os.environ,
            "MEMORY_WORKER_HOST": "127.0.0.1",
            "MEMORY_WORKER_PORT": str(broker.port),
            "XDG_CONFIG_HOME": str(config),
        }
    finally:
        reap(proc)
        broker.stop()


def test_the_readme_has_runnable_blocks() -> None:
    """The front door's tour is among what is run."""
    assert len(blocks(REPO / "README.md")) >= 2


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_runnable_blocks_run(doc: Path, shell_env: dict[str, str]) -> None:
    """Each runnable block of the document exits 0, in order, against a running worker."""
    for *shell, block in blocks(doc):
        done = subprocess.run(
            [*shell, block],
            check=False,
            cwd=REPO,
            env=shell_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, f"{doc.name}:\n{block}\nstdout:\n{done.stdout}\n{done.stderr}"


def test_every_worker_flag_is_in_the_operations_table() -> None:
    """docs/operations.md's table names every flag `memory-worker --help` has."""
    helped = subprocess.run(
        [str(Path(sys.executable).parent / "memory-worker"), "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    flags = set(re.findall(r"^  (--[a-z-]+)", helped, re.M)) - {"--help"}
    table = (REPO / "docs" / "operations.md").read_text()
    documented = set(re.findall(r"`(--[a-z-]+)`", table.split("## Flags", 1)[1].split("\n\n`")[0]))
    assert flags, helped
    assert sorted(flags - documented) == []
