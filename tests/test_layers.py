"""The pure core stays pure: store and protocol import no configuration, broker or I/O code."""

from __future__ import annotations

import subprocess
import sys

import pytest

FORBIDDEN = ("worker.config", "argparse", "ssl", "paho", "aiomqtt", "redis", "sqlite3")


@pytest.mark.parametrize("module", ["worker.store", "worker.protocol"])
def test_the_pure_core_imports_nothing_impure(module: str) -> None:
    """Importing the store or the protocol alone loads none of the forbidden modules."""
    probe = f"import sys, {module}; print(' '.join(m for m in {FORBIDDEN!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "", f"{module} pulls in: {done.stdout.strip()}"
