"""deploy/install and deploy/uninstall in a staging root, and the systemd unit they install."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import aiomqtt
import pytest

from tests.conftest import running
from tests.processes import REPO, Mosquitto, free_port
from tests.test_security import ask, dynsec_plugin, refused
from worker.config import Config

INSTALL = REPO / "deploy" / "install"
UNINSTALL = REPO / "deploy" / "uninstall"
PREFIX = "/opt/mw"
# This machine's Mosquitto configuration, like many: no include_dir for conf.d.
MOSQUITTO_CONF = "persistence true\npersistence_location /var/lib/mosquitto/\n"


def run(*args: str | Path, as_nobody: bool = False) -> subprocess.CompletedProcess[str]:
    command = [str(a) for a in args]
    if as_nobody:
        command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=300, check=False, cwd="/"
    )


def add_user(ctrl: Path, port: int, name: str, password: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [REPO / "deploy/add-user", name, password],
        env={"CTRL_DIR": str(ctrl), "MQTT_PORT": str(port), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=False,
    )


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the installer runs as root only")


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A staging root with the worker installed by deploy/install --root --prefix --secure."""
    if os.geteuid() != 0:
        pytest.skip("the installer runs as root only")
    root = tmp_path_factory.mktemp("root")
    (root / "etc/mosquitto").mkdir(parents=True)
    (root / "etc/mosquitto/mosquitto.conf").write_text(MOSQUITTO_CONF)
    done = run(INSTALL, "--root", root, "--prefix", PREFIX, "--secure")
    assert done.returncode == 0, done.stderr
    root.joinpath("install.out").write_text(done.stdout)
    return root


@needs_root
def test_the_layout(staged: Path) -> None:
    """The venv under --prefix runs, and settings, unit and broker snippet are in place."""
    version = subprocess.run(
        [staged / PREFIX[1:] / "bin/memory-worker", "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert version.stdout.strip()
    env = (staged / "etc/memory-worker/memory-worker.env").read_text()
    assert "MEMORY_WORKER_BACKEND=sqlite:////var/lib/memory-worker/memory.db" in env
    unit = (staged / "etc/systemd/system/memory-worker.service").read_text()
    assert f"ExecStart={PREFIX}/bin/memory-worker\n" in unit
    snippet = staged / "etc/mosquitto/conf.d/memory-worker.conf"
    assert snippet.read_bytes() == (REPO / "deploy/mosquitto.d/memory-worker.conf").read_bytes()
    assert (staged / "var/lib/mosquitto").is_dir()
    conf = (staged / "etc/mosquitto/mosquitto.conf").read_text()
    assert conf.startswith(MOSQUITTO_CONF)
    assert conf.count("include_dir /etc/mosquitto/conf.d") == 1


@needs_root
def test_it_says_what_it_does_and_skips_systemctl(staged: Path) -> None:
    """Every step is a line; in a staging root systemctl is skipped, saying so."""
    out = (staged / "install.out").read_text()
    assert "writing" in out
    assert "systemctl: skipped (a staging root)" in out


@needs_root
def test_a_reinstall_keeps_the_settings_and_sizes_the_memory_ceiling(staged: Path) -> None:
    """Settings survive a second run (an upgrade); MAX_BYTES sets MemoryMax in a drop-in."""
    env = staged / "etc/memory-worker/memory-worker.env"
    env.write_text(env.read_text() + "MEMORY_WORKER_MAX_BYTES=16777216\n")
    kept = env.read_text()
    done = run(INSTALL, "--root", staged, "--prefix", PREFIX)
    assert done.returncode == 0, done.stderr
    assert "keeping" in done.stdout
    assert "from these sources is installed already" in done.stdout
    assert env.read_text() == kept
    conf = (staged / "etc/mosquitto/mosquitto.conf").read_text()
    assert conf.count("include_dir /etc/mosquitto/conf.d") == 1
    dropin = (staged / "etc/systemd/system/memory-worker.service.d/memory.conf").read_text()
    assert "MemoryMax=144M" in dropin  # 5 x 16 MiB + 64 MiB


@needs_root
def test_the_installed_unit_verifies(staged: Path, tmp_path: Path) -> None:
    """systemd-analyze verify accepts the unit (its ExecStart pointed at the staged venv)."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    unit = (staged / "etc/systemd/system/memory-worker.service").read_text()
    copy = tmp_path / "memory-worker.service"
    copy.write_text(unit.replace(f"ExecStart={PREFIX}", f"ExecStart={staged}{PREFIX}"))
    done = run("systemd-analyze", "verify", copy)
    assert done.returncode == 0, done.stderr


def test_the_repository_unit_has_the_settings_the_contract_names() -> None:
    """Type=notify, restart on failure, a watchdog, a memory ceiling and the hardening."""
    unit = (REPO / "deploy/memory-worker.service").read_text().splitlines()
    for line in (
        "Type=notify",
        "Restart=on-failure",
        "WatchdogSec=30s",
        "MemoryMax=384M",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "StateDirectory=memory-worker",
    ):
        assert line in unit


def test_help_and_bad_options() -> None:
    """--help works for anyone; an unknown option is a one-line error and exit 2."""
    for script in (INSTALL, UNINSTALL):
        assert run(script, "--help").returncode == 0
        done = run(script, "--frobnicate")
        assert done.returncode == 2
        assert done.stderr.count("\n") == 1


@needs_root
def test_it_refuses_to_run_as_another_user() -> None:
    """Not root: one clear line, exit 1, nothing done."""
    # A copy another user can read: the clone may sit in a private folder (mktemp -d, /root).
    with tempfile.TemporaryDirectory() as folder:
        os.chmod(folder, 0o755)
        copies = [Path(shutil.copy(script, folder)) for script in (INSTALL, UNINSTALL)]
        results = [run(copy, as_nobody=True) for copy in copies]
    for done in results:
        assert done.returncode == 1
        assert "run as root" in done.stderr
        assert done.stdout == ""


@needs_root
def test_uninstall_removes_all_but_the_data(staged: Path, tmp_path: Path) -> None:
    """Unit, venv, settings and snippet go; the data stays, and uninstall says where."""
    staged = Path(shutil.copytree(staged, tmp_path / "root", symlinks=True))
    data = staged / "var/lib/memory-worker"
    data.mkdir(parents=True)
    (data / "memory.db").write_bytes(b"kept")
    done = run(UNINSTALL, "--root", staged, "--prefix", PREFIX)
    assert done.returncode == 0, done.stderr
    for gone in (
        "etc/systemd/system/memory-worker.service",
        "etc/systemd/system/memory-worker.service.d",
        PREFIX[1:],
        "etc/memory-worker",
        "etc/mosquitto/conf.d/memory-worker.conf",
        "etc/mosquitto/conf.d/memory-worker-security.conf",
    ):
        assert not (staged / gone).exists(), gone
    assert (data / "memory.db").read_bytes() == b"kept"
    assert str(data) in done.stdout


@needs_root
async def test_the_secured_install_serves_devices_and_keeps_them_out_of_the_group(
    staged: Path, tmp_path: Path
) -> None:
    """A broker from the installed conf.d files: the worker logs in with the env file's
    password, a device added by deploy/add-user is served, and the share group is refused."""
    if dynsec_plugin() is None:
        pytest.skip("Mosquitto's dynamic-security plugin is not installed")
    dynsec = staged / "var/lib/mosquitto/dynamic-security.json"
    confd = sorted((staged / "etc/mosquitto/conf.d").glob("*.conf"))
    text = "".join(f.read_text() + "\n" for f in confd)
    text = text.replace("/var/lib/mosquitto/dynamic-security.json", str(dynsec))
    (tmp_path / "base.conf").write_text(text)
    port = free_port()
    mosq = Mosquitto(tmp_path / "broker", conf=tmp_path / "base.conf", port=port).start()
    try:
        env = dict(
            line.split("=", 1)
            for line in (staged / "etc/memory-worker/memory-worker.env").read_text().splitlines()
            if line.startswith("MEMORY_WORKER_")
        )
        for name, password in (("memory-worker", env["MEMORY_WORKER_PASSWORD"]), ("kiosk-a", "a")):
            done = await asyncio.to_thread(
                add_user, staged / "etc/memory-worker/ctrl", port, name, password
            )
            assert done.returncode == 0, done.stdout + done.stderr
        cfg = Config(
            host=mosq.host,
            port=port,
            username=env["MEMORY_WORKER_USERNAME"],
            password=env["MEMORY_WORKER_PASSWORD"],
            route_prefix=env["MEMORY_WORKER_ROUTE_PREFIX"],
            shared_group="workers",
        )
        async with (
            running(cfg) as worker,
            aiomqtt.Client(
                mosq.host,
                port,
                username="kiosk-a",
                password="a",
                protocol=aiomqtt.ProtocolVersion.V5,
            ) as a,
        ):
            assert refused(await a.subscribe("$share/workers/mem/#", qos=1))
            await a.subscribe("reply/kiosk-a/#", qos=1)
            reply = await ask(
                a, "kiosk-a", "append", {"role": "u", "content": "x"}, "reply/kiosk-a/r"
            )
            assert reply["ok"] is True
            assert worker.stats.requests == 1
    finally:
        mosq.stop()
