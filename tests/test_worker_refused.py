"""A worker that the secured broker kicks and then refuses: it says so once, naming what to
check, leaves no future unawaited, and serves again once it is let in."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import subprocess
from collections.abc import Callable

from tests.conftest import running
from tests.processes import Mosquitto
from tests.test_security import secured, worker_config

__all__ = ["secured"]  # the fixture, imported for the tests below


class Records(logging.Handler):
    """Every log record, with a way to await one (emit may run on paho's threads)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(logging.DEBUG)
        self.loop = loop
        self.records: list[logging.LogRecord] = []
        self.arrived = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.loop.call_soon_threadsafe(self.arrived.set)

    def messages(self, level: int = logging.DEBUG) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= level]

    async def wait_for(self, found: Callable[[list[str]], bool]) -> None:
        while not found(self.messages()):
            self.arrived.clear()
            await self.arrived.wait()


def dynsec(broker: Mosquitto, *args: str) -> None:
    """mosquitto_ctrl dynsec ARGS as the broker's admin."""
    subprocess.run(
        ["mosquitto_ctrl", "dynsec", *args],
        env={**os.environ, "XDG_CONFIG_HOME": str(broker.work / "ctrl")},  # type: ignore[attr-defined]
        capture_output=True,
        check=True,
        timeout=15,
    )


async def test_a_worker_refused_on_a_reconnect_says_so_once(secured: Mosquitto) -> None:
    """Kicked, then refused at each reconnect: one error names the refusal and the settings
    to check, the later refusals are debug lines; no future is left unawaited, no forced
    disconnection is logged, and once let in again the worker serves."""
    records = Records(asyncio.get_running_loop())
    root, ours = logging.getLogger(), logging.getLogger("memory_worker")
    level = ours.level
    root.addHandler(records)
    ours.setLevel(logging.DEBUG)
    try:
        async with running(worker_config(secured, reconnect_max=0.2)) as service:
            await asyncio.to_thread(dynsec, secured, "disableClient", "memory-worker")
            try:
                refused_twice = records.wait_for(
                    lambda ms: len([m for m in ms if m.startswith("refused again")]) >= 2
                )
                await asyncio.wait_for(refused_twice, 20)
            finally:
                await asyncio.to_thread(dynsec, secured, "enableClient", "memory-worker")
            await asyncio.wait_for(service.connected.wait(), 10)
        gc.collect()  # a future whose exception was never retrieved says so when collected
    finally:
        root.removeHandler(records)
        ours.setLevel(level)
    said = [m for m in records.messages(logging.WARNING) if "refused" in m]
    assert len(said) == 1, said
    assert "not authori" in said[0].lower()
    assert "MEMORY_WORKER_PASSWORD" in said[0]
    for message in records.messages(logging.WARNING):
        assert "never retrieved" not in message
        assert "gracefully" not in message
        assert "Operation timed out" not in message
