"""One parser for --backend: every accepted form reaches a working backend, every bad one
is one line and exit 2."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.processes import RedisClusterServers, free_port, redis_server, wait_port
from tests.test_cli import run_worker
from worker import cli
from worker.backend_url import parse_backend_url, redacted
from worker.backends import create_backend
from worker.config import Config
from worker.protocol import Append, Fields, Get, Turns
from worker.store import Limits

needs_redis = pytest.mark.skipif(redis_server() is None, reason="redis-server is not installed")


@pytest.mark.parametrize(
    "url",
    [
        "mongodb://x",
        "sqlite://host/x.db",
        "sqlite:///",
        "sqlite:///x.db?journal=wal",
        "redis://",
        "redis://h:99999/0",
        "redis://h:6379/zero",
        "rediss://h:6380/0?ssl_ca_certs=/no/such/ca.pem",
        "redis://h:6379/0?foo=bar",
        "redis://h:6379/0?socket_timeout=soon",
        "rediss://h:6379/0?ssl_cert_reqs=bogus",
        "redis://h:6379/0?protocol=7",
        "redis://h:6379/0?decode_responses=true",
        "redis://h:6379/0?db=3",
        "redis+cluster://h:1/0",
        "unix://relative.sock",
        "unix:///run/redis.sock?db=x",
        "unix:///run/redis.sock?password=x",
        "redis+cluster://",
        "redis+cluster://h",
        "redis+cluster://h:1,h:x",
        "redis+cluster://h:1?shards=0",
        "redis+cluster://h:1?shards=1000",
        "redis+cluster://h:1?nodes=3",
    ],
)
def test_a_bad_backend_is_one_line_and_exit_2(url: str) -> None:
    """The parser names what is wrong; memory-worker says it in one line and exits 2."""
    with pytest.raises(ValueError, match="--backend"):
        parse_backend_url(url)
    done = run_worker("--backend", url)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("memory-worker: error: --backend")


def test_too_many_shards_for_the_limits_is_one_line_and_exit_2() -> None:
    """Each shard needs a conversation and a largest request of its own."""
    done = run_worker("--backend", "redis+cluster://h:1?shards=64", "--max-conversations", "10")
    assert (done.returncode, len(done.stderr.strip().splitlines())) == (2, 1), done.stderr
    assert "shards" in done.stderr


def test_the_backend_is_built_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """memory-worker builds the backend once and serves with that one."""
    built: list[Any] = []
    served: list[Any] = []

    def build(cfg: Config) -> Any:
        built.append(create_backend(cfg))
        return built[-1]

    async def serve(cfg: Config, backend: Any) -> None:
        served.append(backend)

    monkeypatch.setattr(cli, "create_backend", build)
    monkeypatch.setattr(cli, "serve", serve)
    assert cli.main(["--backend", "memory"]) == 0
    assert len(built) == 1
    assert served == built


def test_max_ids_follows_max_inflight_however_config_is_built() -> None:
    """The id memory is --max-inflight, also for a Config built in code."""
    assert Config(max_inflight=200).limits.max_ids == 200
    assert Config(max_inflight=7, limits=Limits(max_turns=3)).limits == Limits(
        max_turns=3, max_ids=7
    )


async def works(url: str, **cfg: Any) -> None:
    """The URL's backend opens, stores a turn and gives it back."""
    be = create_backend(Config(backend=url, **cfg))
    await be.open()
    try:
        results, _ = await be.execute([Append("c", "u", "hello"), Get("c")])
        assert isinstance(results[0], Fields), results[0]
        assert isinstance(results[1], Turns), results[1]
        assert results[1].decoded()[-1]["content"] == "hello"
    finally:
        await be.close()


async def test_memory_and_sqlite_forms_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """memory, sqlite:///relative.db and sqlite:////absolute.db?synchronous=normal."""
    monkeypatch.chdir(tmp_path)
    await works("memory")
    await works("sqlite:///rel.db")
    assert (tmp_path / "rel.db").exists()
    await works(f"sqlite:///{tmp_path}/abs.db?synchronous=normal")
    assert (tmp_path / "abs.db").exists()


@needs_redis
async def test_redis_forms_work(redis_url: str, redis_cluster: RedisClusterServers) -> None:
    """redis://host:port/db and redis+cluster://host:port,host:port."""
    await works(redis_url)
    await works(redis_cluster.url, prefix="one")
    await works(f"{redis_cluster.url}?shards=3", prefix="two")


@pytest.fixture
def unix_redis(tmp_path: Path) -> Iterator[Path]:
    """A redis-server listening only on a unix socket."""
    exe = redis_server()
    if exe is None:
        pytest.skip("redis-server is not installed")
    sock = tmp_path / "redis.sock"
    proc = subprocess.Popen(
        [exe, "--port", "0", "--unixsocket", str(sock), "--save", "", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():  # as wait_port does for a TCP port
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server made no socket (exit {proc.poll()})")
            time.sleep(0.02)
        yield sock
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def test_a_redis_on_a_unix_socket_works(unix_redis: Path) -> None:
    """unix:///path/redis.sock?db=N, the usual set-up on a Pi."""
    await works(f"unix://{unix_redis}?db=2")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A redis-server speaking only TLS with a self-made CA; yields (port, CA file)."""
    exe = redis_server()
    if exe is None:
        pytest.skip("redis-server is not installed")
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: cannot make a certificate")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=ca",
             "-keyout", "ca.key", "-out", "ca.pem", cwd=tmp_path)  # fmt: skip
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
             "-keyout", "server.key", "-out", "server.csr", cwd=tmp_path)  # fmt: skip
    (tmp_path / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "2", "-extfile", "ext.cnf", "-out", "server.pem",
             cwd=tmp_path)  # fmt: skip
    port = free_port()
    log = tmp_path / "redis.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [exe, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
             "--tls-cert-file", str(tmp_path / "server.pem"),
             "--tls-key-file", str(tmp_path / "server.key"),
             "--tls-ca-cert-file", str(tmp_path / "ca.pem"), "--tls-auth-clients", "no",
             "--save", "", "--dir", str(tmp_path)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        try:
            wait_port(port, proc=proc)
        except RuntimeError:
            said = log.read_text(errors="replace")
            pytest.skip(f"this redis-server does not support --tls-port: {said.strip()[-200:]}")
        yield port, tmp_path / "ca.pem"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def test_rediss_with_tls_ca_or_the_urls_own_ca_works(tls_redis: tuple[int, Path]) -> None:
    """rediss:// verifies the server against --tls-ca, or the URL's ssl_ca_certs."""
    port, ca = tls_redis
    await works(f"rediss://127.0.0.1:{port}/0", tls_ca=str(ca))
    await works(f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={ca}")


def test_a_password_in_the_url_is_never_shown() -> None:
    """A Redis password stays out of errors and logs (the worker logged it while Redis was
    down, and a bad URL's error printed it)."""
    assert redacted("redis://:hunter2x@127.0.0.1:6393/0") == "redis://:***@127.0.0.1:6393/0"
    assert redacted("rediss://app:hunter2x@h:6380/1") == "rediss://app:***@h:6380/1"
    assert redacted("redis://h:6379/0") == "redis://h:6379/0"
    assert redacted("redis://:Zm9v/YmFy@h:6379/0") == "redis://:***@h:6379/0"
    assert redacted("redis://:p@ss@h/0") == "redis://:***@h/0"
    assert redacted("redis://h/0?password=hunter2x&db=1") == "redis://h/0?password=***&db=1"
    assert redacted("unix:///r.sock?db=0&password=hunter2x") == "unix:///r.sock?db=0&password=***"
    for url in (
        "redis://:hunter2x@h:99999/0",
        "redis://:hunter2x@h/x",
        "redis://:hunter2x@/0",
        "redis://:hunter/2x@h:6379/0",
        "redis+cluster://:hunter2x@h:7000,h:7001",
    ):
        with pytest.raises(ValueError, match="--backend") as info:
            parse_backend_url(url)
        assert "hunter2x" not in str(info.value)
        assert ":***@" in str(info.value)


def test_a_cluster_url_naming_a_plain_redis_says_so(redis_url: str) -> None:
    """redis+cluster:// naming a Redis without cluster mode: one line naming the redis://
    to use, exit 2. The worker ran, logged each of its 16 shards as unavailable, and
    answered every request 'unavailable' (a new operator's trial)."""
    node = redis_url.removeprefix("redis://").split("/")[0]
    done = run_worker("--port", str(free_port()), "--backend", f"redis+cluster://{node}")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "is a Redis without cluster mode" in lines[0]
    assert f"name it redis://{node}/0" in lines[0]
