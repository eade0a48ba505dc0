"""The systemd notify protocol, spoken by a real worker process to a real datagram socket."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.clients import device
from tests.conftest import program, reap, spawn_worker, unique
from tests.processes import Mosquitto
from worker.systemd import JournalFormatter, Notifier, under_journald


class NotifySocket:
    """The socket systemd would listen on: collects the worker's datagrams."""

    def __init__(self, address: str) -> None:
        self.name = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(b"\0" + address[1:].encode() if address.startswith("@") else address)

    def next(self, timeout: float = 15.0) -> list[str]:
        """The lines of the next datagram."""
        self.sock.settimeout(timeout)
        return self.sock.recv(4096).decode().split("\n")

    def until(self, line: str) -> list[list[str]]:
        """Every datagram up to and including the first that holds `line`."""
        seen = []
        while True:
            seen.append(self.next())
            if line in seen[-1]:
                return seen


@pytest.fixture(params=["path", "abstract"])
def notify(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NotifySocket]:
    if request.param == "path":
        address = str(tmp_path / "notify")
    else:
        address = f"@memory-worker-test-{uuid.uuid4().hex}"
    s = NotifySocket(address)
    yield s
    s.sock.close()


async def test_ready_only_once_subscribed_and_a_request_right_after_is_served(
    broker: Mosquitto, notify: NotifySocket
) -> None:
    """READY=1 comes once the worker is subscribed: a request sent at once gets its reply."""
    prefix = unique("mem")
    proc = spawn_worker(broker, "--prefix", prefix, NOTIFY_SOCKET=notify.name)
    try:
        datagrams = await asyncio.to_thread(notify.until, "READY=1")
        assert all("READY=1" not in d for d in datagrams[:-1])
        status = next(line for line in datagrams[-1] if line.startswith("STATUS="))
        assert f"{broker.host}:{broker.port}" in status
        assert "0 conversations" in status
        async with device(broker.host, broker.port, prefix) as d:
            reply = await d.request("c1", "append", {"role": "user", "content": "hi"})
            assert reply["ok"] is True
    finally:
        reap(proc)


async def test_the_status_counts_in_words(broker: Mosquitto, notify: NotifySocket) -> None:
    """After one request to one conversation the status says "1 conversation, 1 request"."""
    prefix = unique("mem")
    proc = spawn_worker(
        broker, "--prefix", prefix, NOTIFY_SOCKET=notify.name, WATCHDOG_USEC="400000"
    )
    try:
        await asyncio.to_thread(notify.until, "READY=1")
        async with device(broker.host, broker.port, prefix) as d:
            reply = await d.request("c1", "append", {"role": "user", "content": "hi"})
            assert reply["ok"] is True

        def counted() -> str:
            while True:
                for line in notify.next():
                    if line.startswith("STATUS=") and "1 conversation" in line:
                        return line

        status = await asyncio.to_thread(counted)
        assert status.endswith(": 1 conversation, 1 request"), status
    finally:
        reap(proc)


def test_watchdog_pings_at_half_the_interval(broker: Mosquitto, notify: NotifySocket) -> None:
    """With WATCHDOG_USEC the worker pings every half of it (counted over a window)."""
    proc = spawn_worker(
        broker, "--prefix", unique("mem"), NOTIFY_SOCKET=notify.name, WATCHDOG_USEC="400000"
    )
    try:
        notify.until("READY=1")
        window = 2.0
        pings = 0
        end = time.monotonic() + window
        while (left := end - time.monotonic()) > 0:
            try:
                lines = notify.next(timeout=left)
            except TimeoutError:
                break
            pings += "WATCHDOG=1" in lines
        # 0.2 s apart: 10 in the window; the upper bound is firm (never faster), the lower
        # leaves room for a loaded machine.
        assert 4 <= pings <= 11, pings
    finally:
        reap(proc)


def test_no_watchdog_pings_for_another_pid(broker: Mosquitto, notify: NotifySocket) -> None:
    """WATCHDOG_PID naming another process: that watchdog is not the worker's to feed."""
    proc = spawn_worker(
        broker,
        "--prefix",
        unique("mem"),
        NOTIFY_SOCKET=notify.name,
        WATCHDOG_USEC="100000",
        WATCHDOG_PID="1",
    )
    try:
        notify.until("READY=1")
        proc.send_signal(signal.SIGTERM)
        rest = notify.until("STOPPING=1")
        assert not any("WATCHDOG=1" in d for d in rest)
        assert proc.wait(timeout=15) == 0
    finally:
        reap(proc)


def test_stopping_on_sigterm(broker: Mosquitto, notify: NotifySocket) -> None:
    """SIGTERM: STOPPING=1 is sent, then the worker exits cleanly."""
    proc = spawn_worker(broker, "--prefix", unique("mem"), NOTIFY_SOCKET=notify.name)
    try:
        notify.until("READY=1")
        proc.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in notify.until("STOPPING=1")[-1]
        assert proc.wait(timeout=15) == 0
    finally:
        reap(proc)


def test_the_start_is_extended_while_the_store_opens(
    broker: Mosquitto, notify: NotifySocket, tmp_path: Path
) -> None:
    """Opening a store says so, and asks systemd for more time than TimeoutStartSec (a large
    SQLite file rebuilt once after an upgrade, on a Pi's SD card): before READY=1."""
    proc = spawn_worker(
        broker,
        "--prefix",
        unique("mem"),
        "--backend",
        f"sqlite:///{tmp_path}/memory.db",
        NOTIFY_SOCKET=notify.name,
    )
    try:
        datagrams = notify.until("READY=1")
        assert datagrams[0] == ["STATUS=opening the sqlite store", "EXTEND_TIMEOUT_USEC=30000000"]
    finally:
        reap(proc)


async def test_the_start_is_extended_again_and_for_a_while_only(notify: NotifySocket) -> None:
    """Each extension is renewed before it runs out, until `most` (a store that hangs is
    still given up by systemd), and none once a stop is asked for (systemd applies them to
    the stop's timeout too: a stop during a rebuild waited for ten minutes)."""
    n = Notifier(notify.name)
    try:
        await asyncio.wait_for(n.extend_start("opening", asyncio.Event(), 0.05, 0.12), 10)
        got = _datagrams(notify)
        assert 2 <= len(got) <= 3
        assert all(d == ["STATUS=opening", "EXTEND_TIMEOUT_USEC=30000000"] for d in got)
        stop = asyncio.Event()
        extending = asyncio.create_task(n.extend_start("opening", stop, 0.05, 600))
        await asyncio.to_thread(notify.next)  # the first extension
        stop.set()
        await asyncio.wait_for(extending, 10)  # it ends, before its ten minutes
        assert _datagrams(notify) == []
    finally:
        n.close()


def _datagrams(notify: NotifySocket) -> list[list[str]]:
    """The datagrams that came and were not read yet."""
    got = []
    notify.sock.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        while True:
            got.append(notify.sock.recv(4096).decode().split("\n"))
    return got


def test_without_notify_socket_nothing_is_sent() -> None:
    """Outside systemd the notifier does nothing and raises nothing."""
    n = Notifier.from_environ({})
    n.ready("x")
    n.stopping()
    assert n.address is None
    assert n.watchdog is None


def test_journal_lines_carry_priorities() -> None:
    """Under journald: `<N>` syslog priorities on every line, and no timestamp of our own."""
    record = logging.LogRecord("memory_worker", logging.WARNING, "f", 1, "a\nb", None, None)
    assert JournalFormatter().format(record) == "<4>memory_worker: a\n<4>b"


def test_journal_stream_is_recognised_by_its_device_and_inode(tmp_path: Path) -> None:
    """JOURNAL_STREAM counts only when stderr really is that stream."""
    with (tmp_path / "f").open("w") as f:
        st = os.fstat(f.fileno())
        assert under_journald({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, f.fileno())
        assert not under_journald({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}, f.fileno())
        assert not under_journald({}, f.fileno())


def test_logs_under_journald_are_one_line_with_priority(broker: Mosquitto) -> None:
    """The worker, its stderr being the journal stream, logs `<6>memory_worker: serving ...`."""
    read, write = os.pipe()
    st = os.fstat(write)
    proc = subprocess.Popen(
        [
            program("memory-worker"),
            "--host",
            broker.host,
            "--port",
            str(broker.port),
            "--prefix",
            unique("mem"),
        ],
        stdout=write,
        stderr=write,
        env={**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"},
    )
    os.close(write)
    try:
        with os.fdopen(read) as out:
            first = out.readline()
        assert first.startswith("<6>memory_worker: serving "), first
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)


def test_a_vanished_notify_socket_is_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """systemd gone: sending fails quietly, with one warning however often it is tried."""
    n = Notifier(str(tmp_path / "nobody-listens"), watchdog=1.0)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            n.notify("WATCHDOG=1")
    assert len(caplog.records) == 1
    n.close()
