"""Real broker processes for the tests, each on a free ephemeral port (never 1883)."""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
SNIPPET = REPO / "deploy" / "mosquitto.d" / "memory-worker.conf"


def run_as_line(folder: Path) -> str:
    """The `user` line a config needs so that Mosquitto can write `folder` (scripts/run's rule).

    Started as root, Mosquitto drops to the `mosquitto` user: the folder is given to it, and
    only when that user still cannot reach it (a private parent, like pytest's temporary
    folders or /root) does the broker stay root.
    """
    if os.geteuid() != 0:
        return ""
    with contextlib.suppress(KeyError, OSError):
        shutil.chown(folder, "mosquitto", "mosquitto")
        check = [
            "runuser",
            "-u",
            "mosquitto",
            "--",
            "test",
            "-w",
            str(folder),
            "-a",
            "-x",
            str(folder),
        ]
        if subprocess.run(check, check=False).returncode == 0:
            return ""
    return "user root\n"


_GIVEN: set[int] = set()


def free_port() -> int:
    """A free port below the kernel's ephemeral range: a client retrying a stopped broker's
    port in that range can be given it as its own local port, connect to itself, and hold
    it (a broker restarted there found it in use; paho read its own CONNECT back)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    while True:
        port = rng.randrange(10000, max(low, 11000))
        if port in _GIVEN:
            continue
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port))
        except OSError:
            continue
        _GIVEN.add(port)
        return port


def wait_port(
    port: int, timeout: float = 10.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Return once something accepts connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on port {port} after {timeout}s")


class Server:
    """A server process the tests own, listening on `port` once started."""

    proc: subprocess.Popen[bytes] | None = None

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=10)
        self.proc = None


class Mosquitto(Server):
    """A Mosquitto started from the repo's mosquitto.conf (or another), on its own port."""

    def __init__(
        self, workdir: Path, conf: Path | None = None, extra: str = "", port: int | None = None
    ) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = port or free_port()
        if conf is None:  # the quick start's broker, as scripts/run builds it
            text = (REPO / "mosquitto.conf").read_text() + "\n" + SNIPPET.read_text()
        else:
            text = conf.read_text()
        text = re.sub(r"(?m)^listener \d+.*$", f"listener {self.port} 127.0.0.1", text)
        # The dashboard's WebSockets listener (when the config has one) gets a port of its own
        # and serves the repository's dashboard/ by absolute path. It goes last, so that
        # listener settings in `extra` (TLS) still apply to the TCP listener.
        self.ws_port: int | None = None
        web = re.search(r"(?m)^listener \d+.*\nprotocol websockets\nhttp_dir (.*)\n?", text)
        if web:
            self.ws_port = free_port()
            text = text.replace(web[0], "")
        text = re.sub(r"(?m)^persistence_location .*$", "", text)
        text = re.sub(r"(?m)^include_dir (?!/)", f"include_dir {REPO}/", text)
        text += f"\npersistence_location {workdir}/\n{extra}\n"
        if web:
            http_dir = web[1] if web[1].startswith("/") else REPO / web[1]
            text += f"listener {self.ws_port} 127.0.0.1\nprotocol websockets\nhttp_dir {http_dir}\n"
        text += run_as_line(workdir)
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(text)
        self.log = workdir / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Mosquitto:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [MOSQUITTO, "-c", str(self.conf)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
        wait_port(self.port, proc=self.proc)
        return self

    def restart(self, sig: int = signal.SIGTERM) -> None:
        self.stop(sig)
        self.start()


def redis_server() -> str | None:
    return shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None
    )


class RedisServer(Server):
    """A redis-server of the tests' own on a free port, keeping nothing on disk."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        exe = redis_server()
        assert exe is not None
        self.proc = subprocess.Popen(
            [
                exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port, proc=self.proc)
        return self


def cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too and still a port."""
    rng = random.Random()
    while True:
        port = rng.randrange(20000, 55000)
        try:
            for p in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port


class RedisClusterServers:
    """Three redis-server masters in one Redis Cluster on free loopback ports (AOF on, so a
    stopped master comes back with its data)."""

    def __init__(self, workdir: Path, masters: int = 3) -> None:
        self.workdir = workdir
        self.ports = [cluster_port() for _ in range(masters)]
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * masters

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def start_node(self, i: int) -> None:
        exe = redis_server()
        assert exe is not None
        node_dir = self.workdir / f"node{i}"
        node_dir.mkdir(parents=True, exist_ok=True)
        self.procs[i] = subprocess.Popen(
            [
                exe,
                "--port",
                str(self.ports[i]),
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "1000",
                "--cluster-require-full-coverage",
                "no",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--dir",
                str(node_dir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.ports[i], proc=self.procs[i])

    def stop_node(self, i: int) -> None:
        proc = self.procs[i]
        if proc is not None and proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=10)
        self.procs[i] = None

    def cli(self, port: int, *args: str) -> str:
        cli = shutil.which("redis-cli") or "/usr/bin/redis-cli"
        out = subprocess.run(
            [cli, "-h", "127.0.0.1", "-p", str(port), *args],
            check=True,
            capture_output=True,
            timeout=30,
        )
        return out.stdout.decode()

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Return once every running master says cluster_state:ok."""
        deadline = time.monotonic() + timeout
        for i, port in enumerate(self.ports):
            if self.procs[i] is None:
                continue
            while "cluster_state:ok" not in self.cli(port, "cluster", "info"):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"redis cluster node {port} not ok after {timeout}s")
                time.sleep(0.05)

    def start(self) -> RedisClusterServers:
        for i in range(len(self.ports)):
            self.start_node(i)
        nodes = [f"127.0.0.1:{p}" for p in self.ports]
        self.cli(self.ports[0], "--cluster", "create", *nodes, "--cluster-replicas", "0",
                 "--cluster-yes")  # fmt: skip
        self.wait_ok()
        return self

    def stop(self) -> None:
        for i in range(len(self.ports)):
            self.stop_node(i)


class SplitProxy:
    """A TCP hop to `port` that hands on each chunk from the broker in two TCP segments, its
    last `tail` bytes `lag` seconds after the rest, as a real network's segmentation may end
    a packet (or a TLS record) with a few bytes of their own. Clients connect to `.port`."""

    def __init__(self, port: int, tail: int = 3, lag: float = 0.02) -> None:
        self.target, self.tail, self.lag = port, tail, lag
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed
                return
            broker = socket.create_connection(("127.0.0.1", self.target))
            for s in (client, broker):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.sockets.append(s)
            threading.Thread(target=self._pipe, args=(client, broker, 0), daemon=True).start()
            threading.Thread(
                target=self._pipe, args=(broker, client, self.tail), daemon=True
            ).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, tail: int) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if tail and len(data) > tail:
                    dst.sendall(data[:-tail])
                    time.sleep(self.lag)  # the network's timing, not the test's
                    dst.sendall(data[-tail:])
                else:
                    dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> SplitProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.listener.close()
        for s in self.sockets:
            s.close()
