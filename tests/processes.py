"""Real broker processes for the tests, each on a free ephemeral port (never 1883)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
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
        text = (conf or REPO / "mosquitto.conf").read_text()
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
        text += f"\npersistence_location {workdir}/\n{extra}\n"
        if web:
            http_dir = web[1] if web[1].startswith("/") else REPO / web[1]
            text += f"listener {self.ws_port} 127.0.0.1\nprotocol websockets\nhttp_dir {http_dir}\n"
        if os.geteuid() == 0:
            # Mosquitto started as root drops to the `mosquitto` user, which cannot read
            # or write the test's private temporary folder.
            text += "user root\n"
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
