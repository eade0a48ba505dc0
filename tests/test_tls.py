"""The optional TLS listener, with a certificate made for the test."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.clients import device
from tests.conftest import program, run_memctl, running, unique
from tests.processes import Mosquitto, SplitProxy, free_port
from worker.backends import create_backend
from worker.client import RefusedError, open_blocking_memory, open_memory
from worker.config import Config, tls_context
from worker.service import Service

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl missing")


def make_certs(d: Path) -> None:
    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    ssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
    )
    ssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    )
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    ssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        "server.crt",
    )


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Mosquitto, Path]]:
    d = tmp_path_factory.mktemp("tls")
    make_certs(d)
    port = free_port()
    mosq = Mosquitto(
        d,
        port=port,
        extra="\n".join(
            (
                f"certfile {d / 'server.crt'}",
                f"keyfile {d / 'server.key'}",
                f"cafile {d / 'ca.crt'}",
                "tls_version tlsv1.2",
            )
        ),
    ).start()
    yield mosq, d / "ca.crt"
    mosq.stop()


async def test_worker_and_device_over_tls(tls_broker: tuple[Mosquitto, Path]) -> None:
    """Worker and device talk over TLS: one request, then a hundred pipelined, answered in order."""
    broker, ca = tls_broker
    cfg = Config(
        host=broker.host, port=broker.port, tls_ca=str(ca), prefix="tls", client_id="tls-worker"
    )
    async with (
        running(cfg),
        device(broker.host, broker.port, "tls", tls_context=tls_context(str(ca))) as d,
    ):
        assert await d.request("c", "append", {"role": "u", "content": "sealed"}) == {
            "ok": True,
            "seq": 1,
            "count": 1,
        }
        futs = [await d.send("tls/c/append", {"role": "u", "content": str(i)}) for i in range(100)]
        assert [(await d.reply(f))["seq"] for f in futs] == list(range(2, 102))


async def test_client_over_mqtts(tls_broker: tuple[Mosquitto, Path]) -> None:
    """open_memory("mqtts://...?ca=") verifies the broker with that CA and talks the contract."""
    broker, ca = tls_broker
    cfg = Config(
        host=broker.host, port=broker.port, tls_ca=str(ca), prefix="tls2", client_id="tls-worker2"
    )
    async with (
        running(cfg),
        open_memory(f"mqtts://{broker.host}:{broker.port}/tls2?ca={ca}") as memory,
    ):
        assert (await memory.append("c", "u", "sealed")).seq == 1
        assert [t["content"] for t in await memory.get("c")] == ["sealed"]


async def test_blocking_client_over_mqtts(tls_broker: tuple[Mosquitto, Path]) -> None:
    """The blocking client's threads, each on a TLS connection of its own, store and read
    their turns."""
    broker, ca = tls_broker
    cfg = Config(
        host=broker.host, port=broker.port, tls_ca=str(ca), prefix="tls3", client_id="tls-worker3"
    )

    def use() -> tuple[list[list[int]], list[str]]:
        url = f"mqtts://{broker.host}:{broker.port}/tls3?ca={ca}"
        seqs: list[list[int]] = [[] for _ in range(4)]
        with open_blocking_memory(url) as memory:

            def lane(n: int) -> None:
                for i in range(20):
                    seqs[n].append(memory.append(f"c{n}", "user", str(i)).seq)

            threads = [threading.Thread(target=lane, args=(n,)) for n in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return seqs, [t["content"] for t in memory.get("c3", last=2)]

    async with running(cfg):
        seqs, last = await asyncio.to_thread(use)
    assert seqs == [list(range(1, 21))] * 4
    assert last == ["18", "19"]


async def test_blocking_tls_records_whose_last_bytes_come_alone(
    tls_broker: tuple[Mosquitto, Path],
) -> None:
    """Through a hop that delivers the last 3 bytes of every chunk on their own, a blocking
    call over TLS is answered as they come, and a delete (sent once) is not lost to a read
    that gave up (the calls have 30 s)."""
    broker, ca = tls_broker
    cfg = Config(
        host=broker.host, port=broker.port, tls_ca=str(ca), prefix="tls4", client_id="tls-worker4"
    )

    def use(port: int) -> tuple[int, int]:
        with open_blocking_memory(f"mqtts://{broker.host}:{port}/tls4?ca={ca}&timeout=30") as m:
            m.append("c", "user", "x" * 30_000)
            return len(m.get("c")), m.forget("c")

    async with running(cfg):
        with SplitProxy(broker.port) as hop:
            assert await asyncio.wait_for(asyncio.to_thread(use, hop.port), 20) == (1, 1)


async def test_plain_mqtt_to_a_tls_port_suggests_tls(tls_broker: tuple[Mosquitto, Path]) -> None:
    """A TLS listener waits out MQTT's CONNECT as a broken handshake: the timeout says a TLS
    port may be why, for the client and memctl (not when the client did use TLS)."""
    from worker.client import NoReplyError

    broker, _ = tls_broker
    with pytest.raises(NoReplyError, match=r"a TLS port\? then mqtts:// with \?ca=FILE"):
        async with open_memory(f"mqtt://{broker.host}:{broker.port}/mem?timeout=1"):
            pass
    done = await run_memctl(broker, "--timeout", "1", "get", "c")
    assert done.returncode == 3, done.stderr
    assert "a TLS port?" in done.stderr


async def test_a_broker_certificate_the_worker_cannot_verify_is_one_error(
    tls_broker: tuple[Mosquitto, Path], tmp_path: Path
) -> None:
    """A certificate signed by another CA than --tls-ca's will not verify on any retry: the
    worker says so once, as an error naming the CA file (it warned "unreachable" every few
    seconds), and goes on retrying quietly."""
    broker, _ = tls_broker
    make_certs(tmp_path)  # another CA, which did not sign the broker's certificate
    errors: list[logging.LogRecord] = []
    retried = asyncio.Event()

    class Seen(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                errors.append(record)
            elif "refused again" in record.getMessage():
                retried.set()

    seen = Seen(logging.DEBUG)
    logger = logging.getLogger("memory_worker")
    level = logger.level
    logger.addHandler(seen)
    logger.setLevel(logging.DEBUG)
    cfg = Config(
        host=broker.host,
        port=broker.port,
        tls_ca=str(tmp_path / "ca.crt"),
        prefix="tls-bad",
        client_id=unique("tls-bad-"),
        reconnect_max=0.2,
    )
    service, stop = Service(cfg, create_backend(cfg)), asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    try:
        await asyncio.wait_for(retried.wait(), 30)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        logger.removeHandler(seen)
        logger.setLevel(level)
    assert [r.levelno for r in errors] == [logging.ERROR]
    message = errors[0].getMessage()
    assert "TLS certificate does not verify against --tls-ca" in message
    assert str(tmp_path / "ca.crt") in message


async def test_tls_to_a_plain_port_suggests_plain_mqtt(
    broker: Mosquitto, tls_broker: tuple[Mosquitto, Path]
) -> None:
    """A plain listener closes on TLS's hello: the error says a plain port may be why, for
    the client and memctl (it was a bare "Connection reset by peer")."""
    from worker.client import NoReplyError

    _, ca = tls_broker
    with pytest.raises(NoReplyError, match=r"not a TLS port\? then mqtt://"):
        async with open_memory(f"mqtts://{broker.host}:{broker.port}/mem?timeout=1&ca={ca}"):
            pass
    done = await run_memctl(broker, "--tls-ca", str(ca), "--timeout", "1", "get", "c")
    assert done.returncode == 3, done.stderr
    assert "not a TLS port?" in done.stderr


async def test_memctl_tls_verifies_with_the_systems_cas(tls_broker: tuple[Mosquitto, Path]) -> None:
    """memctl --tls connects with TLS verified against the system's CAs (here the test's CA,
    made the system's by SSL_CERT_FILE); a broker they do not vouch for is refused."""
    broker, ca = tls_broker
    cfg = Config(
        host=broker.host, port=broker.port, tls_ca=str(ca), prefix="tls5", client_id="tls-worker5"
    )
    where = ["--host", broker.host, "--port", str(broker.port), "--prefix", "tls5", "--tls"]

    def memctl(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [program("memctl"), *where, "--timeout", "5", *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            env={**os.environ, **env},
        )

    async with running(cfg):
        done = await asyncio.to_thread(memctl, "append", "c", "user", "hi", SSL_CERT_FILE=str(ca))
        assert (done.returncode, done.stdout) == (0, '{"ok": true, "seq": 1, "count": 1}\n')
        refused = await asyncio.to_thread(memctl, "get", "c", SSL_CERT_FILE="/nonexistent")
    # refused (4), not "no answer in time" (3): an app that retries timeouts would retry it
    assert refused.returncode == 4, refused.stderr
    assert "certificate verify failed" in refused.stderr
    assert "give the CA that signed it" in refused.stderr


async def test_a_certificate_that_stops_verifying_on_reconnecting_is_refused(
    tmp_path: Path,
) -> None:
    """The broker comes back with a certificate of another CA (a rotation the client's CA
    file missed): a request raises the refusal, naming the certificate, at the next
    reconnection's answer, as at opening; it was "lost the broker" after every attempt."""
    first, second = tmp_path / "first", tmp_path / "second"
    for d in (first, second):
        d.mkdir()
        make_certs(d)
    served = tmp_path / "served"
    served.mkdir()
    for name in ("server.crt", "server.key"):
        shutil.copy(first / name, served / name)
    mosq = Mosquitto(
        tmp_path,
        port=free_port(),
        extra=f"certfile {served / 'server.crt'}\nkeyfile {served / 'server.key'}",
    ).start()
    try:
        async with open_memory(
            f"mqtts://127.0.0.1:{mosq.port}/mem?ca={first / 'ca.crt'}&timeout=30"
        ) as m:
            for name in ("server.crt", "server.key"):
                shutil.copy(second / name, served / name)
            await asyncio.to_thread(mosq.restart)
            with pytest.raises(RefusedError, match="certificate does not verify"):
                await asyncio.wait_for(m.get("c"), 20)  # far below the client's 30 s
    finally:
        mosq.stop()
