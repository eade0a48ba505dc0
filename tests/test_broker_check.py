"""The worker checks the broker it is given, and names a client id shared by two workers."""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess

import pytest

from tests.clients import decode, next_message, watcher
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
async def test_two_workers_with_one_client_id(
    broker: Mosquitto, second_args: tuple[str, ...]
) -> None:
    """Each logs one error naming the id and --client-id, backs off quietly, and counts it.
    A second started by scripts/run on a broker that was there (--session-expiry 0) took the
    id back with its Will: the first read that "offline" on reconnecting, not an "online",
    and never said why it kept losing the broker."""
    prefix, client_id = unique("mem"), unique("twin-")
    args = ("--prefix", prefix, "--client-id", client_id, "--reconnect-max", "1")
    stats_topic = f"{prefix}/_worker/{client_id}/stats"
    first = spawn_worker(broker, *args, "--stats-interval", "0.2")
    second: subprocess.Popen[str] | None = None
    try:
        async with watcher(broker.host, broker.port, stats_topic) as seen:
            await next_message(seen)  # the first is serving
            second = spawn_worker(broker, *args, "--stats-interval", "0.2", *second_args)
            taken = 0
            while taken < 4:  # stats of whichever twin holds the session
                taken = max(taken, decode(await next_message(seen))["taken_over"])
    finally:
        logs = [_stop(first)] + ([_stop(second)] if second is not None else [])
    assert len(logs) == 2
    for log in logs:
        errors = [line for line in log.splitlines() if " ERROR " in line]
        assert len(errors) == 1, log
        assert repr(client_id) in errors[0]
        assert "--client-id" in errors[0]
        assert "Traceback" not in log
        # After the error, the fight goes on at debug level: no warning every reconnect.
        after = log.split(errors[0], 1)[1]
        assert after.count("unreachable or lost") <= 1, log


async def test_an_older_runs_offline_restored_by_the_broker_is_no_takeover(
    own_broker: Mosquitto,
) -> None:
    """A broker killed before its autosave comes back with what it saved last, which may be
    an earlier run's "offline" of this worker: on reconnecting the worker reads it, and it is
    not another worker's Will (that would be newer than this worker's "online"): no takeover
    is logged or counted."""
    import time

    import aiomqtt

    from tests.conftest import make_config, running
    from worker.protocol import encode, status_payload

    cfg = make_config(own_broker)
    earlier = status_payload(
        "offline",
        version="0",
        client_id=cfg.client_id,
        prefix=cfg.prefix,
        backend="memory",
        pid=1,
        ts=time.time() - 3600,
    )
    topic = f"{cfg.prefix}/_worker/{cfg.client_id}/status"
    async with aiomqtt.Client(own_broker.host, own_broker.port) as c:
        await c.publish(topic, encode(earlier, "msgpack"), qos=1, retain=True)
    own_broker.restart()  # saved
    async with running(cfg) as w:
        own_broker.restart(signal.SIGKILL)  # the worker's "online" was not saved
        await asyncio.wait_for(w.wait_connections(2), 30)
        assert w.stats.taken_over == 0
