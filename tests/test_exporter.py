"""deploy/prometheus-mqtt-exporter.yaml against the real exporter, worker and broker."""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.clients import device
from tests.conftest import WorkerFactory
from tests.processes import REPO, Mosquitto, free_port, wait_port
from worker import constants as c

CONFIG = REPO / "deploy" / "prometheus-mqtt-exporter.yaml"
EXPORTER = shutil.which("prometheus-mqtt-exporter")


def mapped() -> dict[str, str]:
    """mqtt_name -> prom_name, as the config file maps them."""
    text = CONFIG.read_text()
    pairs = re.findall(r"(?m)^  - prom_name: (\S+)\n    mqtt_name: (\S+)$", text)
    return {mqtt: prom for prom, mqtt in pairs}


def test_every_stats_field_has_a_metric() -> None:
    """Each numeric stats field, counters by reason and code included, maps to a metric:
    the fields are read from the stats the worker publishes (taken_over had none)."""
    from worker.backends.base import Counts
    from worker.errors import WorkerError
    from worker.protocol import Stats, stats_payload
    from worker.store import Limits

    codes = {cls.code for cls in WorkerError.__subclasses__()} - {"bad_route"} | {"internal"}
    body = stats_payload(
        Stats(started=0.0),
        Counts(0, 0, 0, 0),
        Limits(),
        client_id="w",
        version="v",
        backend="memory",
        now=0.0,
        ts=0.0,
        interval=10.0,
    )
    wanted = {f"evictions.{r}" for r in c.REASONS} | {f"errors.{code}" for code in codes}
    wanted |= {"refused.bad_route"}
    for key, value in body.items():
        if isinstance(value, dict):
            wanted |= {f"{key}.{k}" for k, v in value.items() if isinstance(v, int | float)}
        elif isinstance(value, int | float) and not isinstance(value, bool):
            wanted.add(key)
    wanted -= {"ts", "stats_interval"}  # when and how often: not a measure of the worker
    assert wanted <= set(mapped()), wanted - set(mapped())


@pytest.fixture
def exporter(own_broker: Mosquitto, tmp_path: Path) -> Iterator[int]:
    """The exporter on a free port, reading own_broker with the shipped config."""
    if EXPORTER is None:
        pytest.skip("prometheus-mqtt-exporter is missing: apt-get install prometheus-mqtt-exporter")
    conf = tmp_path / "exporter.yaml"
    conf.write_text(
        CONFIG.read_text().replace("tcp://127.0.0.1:1883", f"tcp://127.0.0.1:{own_broker.port}")
    )
    port = free_port()
    log = (tmp_path / "exporter.log").open("wb")
    proc = subprocess.Popen(
        [EXPORTER, "-config", str(conf), "-listen-address", "127.0.0.1", "-listen-port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_port(port, proc=proc)
        yield port
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
        log.close()


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return str(resp.read().decode())


def value(metrics: str, name: str, worker: str) -> float | None:
    m = re.search(rf'(?m)^{name}\{{[^}}]*sensor="{re.escape(worker)}"[^}}]*\}} (\S+)', metrics)
    return float(m[1]) if m else None


async def test_exporter_turns_stats_into_metrics(
    own_broker: Mosquitto, exporter: int, worker_factory: WorkerFactory
) -> None:
    """Append, delete, scrape /metrics: the worker's numbers are there, labelled by worker."""
    async with (
        worker_factory(own_broker, prefix="mem", event_format="json", stats_interval=0.2) as w,
        device(own_broker.host, own_broker.port, "mem") as d,
    ):
        await d.request("kiosk-1", "append", {"role": "user", "content": "hi"})
        await d.request("kiosk-2", "append", {"role": "user", "content": "hello"})
        await d.request("kiosk-2", "delete")
        cid = w.cfg.client_id
        for _ in range(200):  # stats come every 0.2 s; the exporter takes each as it comes
            metrics = await asyncio.to_thread(scrape, exporter)
            if value(metrics, "memory_worker_evictions_deleted_total", cid) == 1:
                break
            await asyncio.sleep(0.05)
        assert value(metrics, "memory_worker_evictions_deleted_total", cid) == 1
        assert value(metrics, "memory_worker_requests_total", cid) == 3
        assert value(metrics, "memory_worker_conversations", cid) == 1
        assert value(metrics, "memory_worker_turns", cid) == 1
        assert value(metrics, "memory_worker_stored_bytes", cid) == w.backend.counts().bytes
        assert value(metrics, "memory_worker_limit_max_bytes", cid) == c.DEFAULT_MAX_BYTES
