"""The pure core stays pure: store and protocol import no configuration, broker or I/O code."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

FORBIDDEN = ("worker.config", "argparse", "ssl", "paho", "aiomqtt", "redis", "sqlite3")


@pytest.mark.parametrize("module", ["worker.store", "worker.protocol"])
def test_the_pure_core_imports_nothing_impure(module: str) -> None:
    """Importing the store or the protocol alone loads none of the forbidden modules."""
    probe = f"import sys, {module}; print(' '.join(m for m in {FORBIDDEN!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "", f"{module} pulls in: {done.stdout.strip()}"


def test_only_the_transport_room_imports_paho() -> None:
    """No module of worker/ but mqtt.py and packets.py imports paho: the client included, it
    reaches the broker through the room's Connection."""
    room = {"worker/mqtt.py", "worker/packets.py"}
    outside = []
    for path in sorted((REPO / "worker").rglob("*.py")):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
        name = str(path.relative_to(REPO))
        if any(m.split(".")[0] == "paho" for m in imported) and name not in room:
            outside.append(name)
    assert outside == []


def test_a_modules_main_block_comes_last() -> None:
    """Run as `python -m worker.summarizer`, a module runs its `if __name__ == "__main__"`
    block where it stands: a function defined after it did not exist yet, and the
    summarizer's start-up check died of a NameError (as `memory-summarizer` it did not)."""
    late = []
    for path in sorted((REPO / "worker").rglob("*.py")):
        body = ast.parse(path.read_text()).body
        for i, node in enumerate(body):
            if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
                late += [f"{path.relative_to(REPO)}:{n.lineno}" for n in body[i + 1 :]]
    assert late == [], f"defined after the __main__ block: {late}"
