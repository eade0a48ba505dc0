"""Fixtures: a real Mosquitto per session, and workers started in this process or as programs."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.clients import Device, device
from tests.processes import REPO, Mosquitto, RedisClusterServers, RedisServer, redis_server
from worker.backends import create_backend
from worker.config import Config
from worker.service import Service
from worker.store import Limits


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """The session's Mosquitto, started from the repo's mosquitto.conf on a free port."""
    mosq = Mosquitto(tmp_path_factory.mktemp("mosquitto")).start()
    yield mosq
    mosq.stop()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis of the session's own on a free port, else REDIS_URL, else the test is skipped."""
    if redis_server() is None:
        url = os.environ.get("REDIS_URL")
        if not url:
            pytest.skip("redis-server is not installed and REDIS_URL is not set")
        yield url
        return
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server.url
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    """A Redis Cluster of three masters of the session's own, else the test is skipped."""
    if redis_server() is None:
        pytest.skip("redis-server is not installed: no Redis Cluster to test against")
    cluster = RedisClusterServers(tmp_path_factory.mktemp("redis-cluster")).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A Mosquitto of the test's own, for tests that stop or restart it."""
    mosq = Mosquitto(tmp_path / "mosquitto").start()
    yield mosq
    mosq.stop(signal.SIGKILL)


@pytest.fixture
def stock_broker(tmp_path: Path) -> Mosquitto:
    """Mosquitto with Debian's stock settings (not started): no set_tcp_nodelay, a Receive
    Maximum of 20."""
    conf = tmp_path / "stock.conf"
    conf.write_text("per_listener_settings false\nallow_anonymous true\nlistener 1883\n")
    return Mosquitto(tmp_path / "stock", conf=conf)


def unique(stem: str = "t") -> str:
    return f"{stem}{uuid.uuid4().hex[:10]}"


def make_config(broker: Mosquitto, **overrides: Any) -> Config:
    limits = Limits(**{k: overrides.pop(k) for k in list(overrides) if k in Limits.__slots__})
    fields: dict[str, Any] = {
        "host": broker.host,
        "port": broker.port,
        "prefix": unique("mem"),
        "client_id": unique("worker-"),
        "stats_interval": 0.2,
        "reconnect_max": 0.5,
        "limits": limits,
    }
    fields.update(overrides)
    return Config(**fields)


@contextlib.asynccontextmanager
async def running(cfg: Config) -> AsyncIterator[Service]:
    """A worker served from this event loop until the block ends (then stopped gracefully)."""
    service = Service(cfg, create_backend(cfg))
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    ready = asyncio.create_task(service.connected.wait())
    done, _ = await asyncio.wait({task, ready}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    if ready not in done:
        ready.cancel()
        stop.set()
        await task  # raises what went wrong
        raise TimeoutError("worker did not connect")
    try:
        yield service
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


WorkerFactory = Callable[..., contextlib.AbstractAsyncContextManager[Service]]


@pytest.fixture
def worker_factory(broker: Mosquitto) -> WorkerFactory:
    """Start a worker on the session broker with overrides of the config (unique prefix)."""

    def start(target: Mosquitto | None = None, **overrides: Any) -> Any:
        return running(make_config(target or broker, **overrides))

    return start


@pytest.fixture
async def worker(worker_factory: WorkerFactory) -> AsyncIterator[Service]:
    async with worker_factory() as service:
        yield service


@pytest.fixture(params=[True, False], ids=["mqtt5", "mqtt311"])
async def dev(
    request: pytest.FixtureRequest, broker: Mosquitto, worker: Service
) -> AsyncIterator[Device]:
    """A device of each protocol version, talking to `worker`."""
    async with device(broker.host, broker.port, worker.cfg.prefix, v5=request.param) as d:
        yield d


@pytest.fixture
async def dev5(broker: Mosquitto, worker: Service) -> AsyncIterator[Device]:
    async with device(broker.host, broker.port, worker.cfg.prefix) as d:
        yield d


def program(name: str) -> str:
    return str(Path(sys.executable).parent / name)


async def run_memctl(broker: Mosquitto, *args: str) -> subprocess.CompletedProcess[str]:
    """memctl as a user runs it against `broker`, off the test's event loop."""
    where = ("--host", broker.host, "--port", str(broker.port))
    return await asyncio.to_thread(
        subprocess.run,
        [program("memctl"), *where, *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def spawn_worker(broker: Mosquitto, *args: str, **env: str) -> subprocess.Popen[str]:
    """`memory-worker` as a program, as a user runs it."""
    return subprocess.Popen(
        [program("memory-worker"), "--host", broker.host, "--port", str(broker.port), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
        env={**os.environ, **env},
    )


def wait_serving(proc: subprocess.Popen[str]) -> None:
    """Return once a spawned worker has subscribed (it logs "serving ...")."""
    assert proc.stdout is not None
    for line in proc.stdout:
        if "serving" in line:
            return
    raise AssertionError("the worker exited before serving")


def reap(
    proc: subprocess.Popen[str], sig: int = signal.SIGKILL, *, keep_output: bool = False
) -> int:
    """Stop a spawned program if it still runs; return its exit status. Its output pipe is
    closed unless `keep_output` (then the caller reads and closes it)."""
    if proc.poll() is None:
        proc.send_signal(sig)
    code = proc.wait(timeout=15)
    if proc.stdout is not None and not keep_output:
        proc.stdout.close()
    return code
