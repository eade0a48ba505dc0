"""The worker checks the broker it is given, and names a client id shared by two workers."""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess

import pytest

from tests.clients import decode, device, next_message, watcher
from tests.conftest import WorkerFactory, spawn_worker, unique
from tests.processes import Mosquitto
from worker.service import BROKER_SNIPPET


async def test_a_stock_broker_is_named_with_the_snippet(
    stock_broker: Mosquitto, worker_factory: WorkerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Against stock Mosquitto the worker warns of each missing setting, then serves."""
    stock_broker.start()
    try:
        with caplog.at_level(logging.WARNING, logger="memory_worker"):
            async with worker_factory(stock_broker) as w:
                assert w.connected.is_set()
        warnings = [r.getMessage() for r in caplog.records if "lacks settings" in r.getMessage()]
        assert len(warnings) == 1
        text = warnings[0]
        assert "max_inflight_messages is 20" in text
        assert "set_tcp_nodelay" in text
        assert BROKER_SNIPPET in text
        assert w.broker_round_trip is not None
    finally:
        stock_broker.stop()


async def test_the_projects_broker_gets_no_warning(
    worker_factory: WorkerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """mosquitto.conf with the snippet passes the in-flight check and times a round trip.

    (Whether that round trip is fast is a timing, left to the machine: not asserted here.)
    """
    with caplog.at_level(logging.WARNING, logger="memory_worker"):
        async with worker_factory() as w:
            assert w.connected.is_set()
    assert not [r for r in caplog.records if "max_inflight_messages" in r.getMessage()]
    assert w.broker_round_trip is not None


def _stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=15)
    return out


@pytest.mark.parametrize(
    "second_args", [(), ("--session-expiry", "0")], ids=["alike", "second-without-session"]
)
async def test_a_second_worker_with_a_client_id_in_use_stops(
    broker: Mosquitto, second_args: tuple[str, ...]
) -> None:
    """A worker started while another serves with its client id (two scripts/run on one
    broker, two Pis left at the default id) exits 2 naming the id, the other's pid and
    --client-id, rather than fight it for the session: they took it from each other for as
    long as both ran, each storing what reached it while it held the id. The first serves
    on. A second started by scripts/run (--session-expiry 0) leaves its Will, which the
    first reads on reconnecting: it logs the takeover once and counts it (it read the Will
    as its own "offline" and never said why it kept losing the broker). Mosquitto 2.0 says
    nothing else to the first: after a second alike, it logs one lost connection."""
    prefix, client_id = unique("mem"), unique("twin-")
    args = ("--prefix", prefix, "--client-id", client_id, "--stats-interval", "0.2")
    stats_topic = f"{prefix}/_worker/{client_id}/stats"
    first = spawn_worker(broker, *args)
    try:
        async with watcher(broker.host, broker.port, stats_topic) as seen:
            await next_message(seen)  # the first is serving
            second = spawn_worker(broker, *args, *second_args)
            out, _ = await asyncio.to_thread(second.communicate, timeout=30)
            assert second.returncode == 2, out
            said = out.strip().splitlines()[-1]
            assert said.startswith("memory-worker: error: another memory-worker is connected")
            assert repr(client_id) in said
            assert f"pid {first.pid}" in said
            assert "--client-id" in said
            if second_args:
                while decode(await next_message(seen))["taken_over"] != 1:
                    pass
            async with device(broker.host, broker.port, prefix) as d:
                reply = await d.request("c", "append", {"role": "user", "content": "x"})
            assert reply["ok"], reply
    finally:
        log = _stop(first)
    assert "Traceback" not in log
    errors = [line for line in log.splitlines() if " ERROR " in line]
    if not second_args:
        assert errors == [], log
        assert log.count("unreachable or lost") == 1, log
        return
    assert len(errors) == 1, log
    assert repr(client_id) in errors[0]
    assert "--client-id" in errors[0]
