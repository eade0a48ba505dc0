"""deploy/install and deploy/uninstall in a staging root, and the systemd unit they install."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import stat
import subprocess
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest

from tests.conftest import running
from tests.processes import REPO, Mosquitto, wait_port
from tests.test_security import ask, dynsec_plugin, refused
from worker.config import Config

INSTALL = REPO / "deploy" / "install"
UNINSTALL = REPO / "deploy" / "uninstall"
PREFIX = "/opt/mw"
# This machine's Mosquitto configuration, like many: no include_dir for conf.d.
MOSQUITTO_CONF = "persistence true\npersistence_location /var/lib/mosquitto/\n"
CONFD = "etc/mosquitto/conf.d"
LISTENERS = f"{CONFD}/memory-worker-listeners.conf"
WEB = f"{PREFIX}/share/dashboard"


def kiosk_a(mosq: Mosquitto) -> aiomqtt.Client:
    """The device kiosk-a (password "a") of the secured broker, over MQTT 5."""
    return aiomqtt.Client(
        mosq.host, mosq.port, username="kiosk-a", password="a", protocol=aiomqtt.ProtocolVersion.V5
    )


def mosquitto_version() -> tuple[int, ...]:
    out = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True, check=False).stdout
    found = re.search(r"mosquitto version ([0-9.]+)", out)
    return tuple(int(n) for n in found[1].split(".")) if found else ()


# Mosquitto before 2.0.12 opens a WebSockets listener on every interface, whatever address.
WS_KEEPS_ADDRESS = mosquitto_version() >= (2, 0, 12)


def run(*args: str | Path, as_nobody: bool = False) -> subprocess.CompletedProcess[str]:
    command = [str(a) for a in args]
    if as_nobody:
        command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=300, check=False, cwd="/"
    )


def add_user(ctrl: Path, port: int, name: str, password: str) -> subprocess.CompletedProcess[str]:
    """deploy/add-user NAME -, the password on stdin as deploy/install passes it."""
    return subprocess.run(
        [REPO / "deploy/add-user", name, "-"],
        input=password + "\n",
        env={"CTRL_DIR": str(ctrl), "MQTT_PORT": str(port), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=False,
    )


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the installer runs as root only")


def restage(staged: Path, to: Path, mosquitto_conf: str = MOSQUITTO_CONF) -> Path:
    """A copy of a staged root with Mosquitto's own configuration as a fresh install finds it:
    `mosquitto_conf`, nothing of ours in conf.d (the venv is kept: a re-run reuses it)."""
    root = Path(shutil.copytree(staged, to, symlinks=True))
    shutil.rmtree(root / CONFD)
    shutil.rmtree(root / "etc/memory-worker")
    shutil.rmtree(root / "var/lib/mosquitto")
    (root / "etc/mosquitto/mosquitto.conf").write_text(mosquitto_conf)
    return root


@contextlib.contextmanager
def installed_broker(root: Path, work: Path) -> Iterator[Mosquitto]:
    """A real Mosquitto from the staged conf.d files, read in Mosquitto's include_dir order,
    with the staged paths for the dynamic-security file and http_dir; on free ports."""
    text = "".join(f.read_text() + "\n" for f in sorted((root / CONFD).glob("*.conf")))
    text = text.replace("/var/lib/mosquitto/", f"{root}/var/lib/mosquitto/")
    text = text.replace(f"http_dir {WEB}", f"http_dir {root}{WEB}")
    work.mkdir()
    (work / "base.conf").write_text(text)
    mosq = Mosquitto(work / "broker", conf=work / "base.conf").start()
    try:
        if mosq.ws_port is not None:
            wait_port(mosq.ws_port, proc=mosq.proc)
        yield mosq
    finally:
        mosq.stop()


def page(port: int) -> str:
    """What the broker's http_dir serves at /."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as reply:
        text: str = reply.read().decode()
        return text


def over_websockets(
    mosq: Mosquitto, username: str | None = None, password: str | None = None
) -> aiomqtt.Client:
    assert mosq.ws_port is not None
    return aiomqtt.Client(
        mosq.host,
        mosq.ws_port,
        transport="websockets",
        username=username,
        password=password,
        protocol=aiomqtt.ProtocolVersion.V5,
    )


def env_of(root: Path) -> dict[str, str]:
    lines = (root / "etc/memory-worker/memory-worker.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.startswith("MEMORY_WORKER_"))


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
    venv = staged / PREFIX[1:]
    version = subprocess.run(
        [venv / "bin/python", venv / "bin/memory-worker", "--version"],
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
def test_the_installed_package_is_typed(staged: Path) -> None:
    """What pip installed from the clone carries py.typed (an app's mypy saw the client as
    Any without it: a trial) and the Redis script."""
    venv = staged / PREFIX[1:]
    where = subprocess.run(
        [venv / "bin/python", "-c", "import worker; print(worker.__file__)"],
        capture_output=True,
        text=True,
        check=True,
        cwd="/",
    )
    package = Path(where.stdout.strip()).parent
    assert package.is_relative_to(venv), package  # installed, not this clone
    assert (package / "py.typed").is_file()
    assert (package / "backends/redis.lua").is_file()


@needs_root
def test_the_staged_tree_names_slash_not_the_staging_root(staged: Path) -> None:
    """--root: no file of the staged tree names the staging root (scripts start with
    #!PREFIX/bin/python), so the tree can be copied or packaged as /."""
    script = staged / PREFIX[1:] / "bin/memory-worker"
    assert script.read_text().splitlines()[0] == f"#!{PREFIX}/bin/python"
    named = subprocess.run(
        ["grep", "-rlF", str(staged), staged], capture_output=True, text=True, check=False
    ).stdout.split()
    assert [p for p in named if not p.endswith("install.out")] == []


@needs_root
def test_the_secured_install_serves_the_dashboard_to_logged_in_users(staged: Path) -> None:
    """--secure: MQTT on every interface and the dashboard's WebSockets listener, declared in
    their own snippet; the security snippet declares none; the page is world-readable."""
    listeners = (staged / LISTENERS).read_text()
    assert "\nlistener 1883\n" in listeners
    assert f"\nlistener 9001\nprotocol websockets\nhttp_dir {WEB}\n" in listeners
    assert "allow_anonymous" not in listeners
    security = (staged / CONFD / "memory-worker-security.conf").read_text()
    assert "allow_anonymous false" in security
    assert not re.search(r"(?m)^listener", security)
    web = staged / WEB[1:]
    assert (web / "index.html").read_bytes() == (REPO / "dashboard/index.html").read_bytes()
    # Mosquitto started as root serves http_dir as `mosquitto`: every folder from the prefix
    # down can be entered, every file read, by anyone.
    for folder in (staged / PREFIX[1:], web.parent):
        assert folder.stat().st_mode & 0o005 == 0o005, folder
    for path in web.rglob("*"):
        want = 0o005 if path.is_dir() else 0o004
        assert stat.S_IMODE(path.stat().st_mode) & want == want, path
    out = (staged / "install.out").read_text()
    assert "dashboard: http://<this machine>:9001/ for logged-in users" in out


@needs_root
def test_without_secure_the_dashboard_waits_for_a_mosquitto_that_keeps_it_local(
    staged: Path, tmp_path: Path
) -> None:
    """No --secure: the listener only where Mosquitto keeps it on 127.0.0.1 (2.0.12+); on
    older ones no listener at all (Mosquitto's own localhost:1883 stays), saying why."""
    root = restage(staged, tmp_path / "root")
    done = run(INSTALL, "--root", root, "--prefix", PREFIX)
    assert done.returncode == 0, done.stderr
    if WS_KEEPS_ADDRESS:
        assert "listener 9001 127.0.0.1\nprotocol websockets\n" in (root / LISTENERS).read_text()
    else:
        assert not (root / LISTENERS).exists()
        assert not (root / WEB[1:]).exists()
        assert "dashboard: not served" in done.stdout
        assert "--dashboard serves it anyway" in done.stdout


@needs_root
async def test_the_dashboard_opt_in_keeps_mqtt_on_loopback_and_anonymous(
    staged: Path, tmp_path: Path
) -> None:
    """--dashboard without --secure: the snippet says again what Mosquitto 2.0 did with no
    listener (1883 on loopback, anonymous); a broker started from it answers MQTT, serves the
    page and MQTT over WebSockets; on Mosquitto < 2.0.12 the output warns of the LAN."""
    root = restage(staged, tmp_path / "root")
    done = run(INSTALL, "--root", root, "--prefix", PREFIX, "--dashboard")
    assert done.returncode == 0, done.stderr
    listeners = (root / LISTENERS).read_text()
    assert "\nlistener 1883 127.0.0.1\nallow_anonymous true\n" in listeners
    assert f"\nlistener 9001 127.0.0.1\nprotocol websockets\nhttp_dir {WEB}\n" in listeners
    assert not (root / CONFD / "memory-worker-security.conf").exists()
    assert ("opens port 9001 on every interface" in done.stdout) is not WS_KEEPS_ADDRESS
    again = run(INSTALL, "--root", root, "--prefix", PREFIX)
    assert f"{root}/{LISTENERS} is up to date" in again.stdout, "the choice is kept"
    with installed_broker(root, tmp_path / "broker") as mosq:
        assert mosq.ws_port is not None
        assert "memory-worker" in await asyncio.to_thread(page, mosq.ws_port)
        async with (
            aiomqtt.Client(mosq.host, mosq.port, protocol=aiomqtt.ProtocolVersion.V5) as tcp,
            over_websockets(mosq) as ws,
        ):
            await ws.subscribe("mem/_worker/#", qos=1)
            await tcp.publish("mem/_worker/w/status", b"online", qos=1)
            message = await asyncio.wait_for(anext(aiter(ws.messages)), 10)
            assert message.payload == b"online"


@needs_root
def test_a_broker_with_its_own_mqtt_listener_keeps_it(staged: Path, tmp_path: Path) -> None:
    """A broker configured with its own 1883 listener: the snippet adds only the dashboard's,
    and leaves its anonymous setting alone."""
    own = MOSQUITTO_CONF + "listener 1883 127.0.0.1\nallow_anonymous false\npassword_file /p\n"
    root = restage(staged, tmp_path / "root", own)
    done = run(INSTALL, "--root", root, "--prefix", PREFIX, "--dashboard")
    assert done.returncode == 0, done.stderr
    listeners = (root / LISTENERS).read_text()
    assert re.findall(r"(?m)^listener .*$", listeners) == ["listener 9001 127.0.0.1"]
    assert "allow_anonymous" not in listeners
    assert "MQTT on the broker's own listener on port 1883" in done.stdout


@needs_root
def test_no_dashboard_takes_the_listener_and_the_page_away(staged: Path, tmp_path: Path) -> None:
    """--no-dashboard after --dashboard: our listeners snippet and the copied page go."""
    root = restage(staged, tmp_path / "root")
    assert run(INSTALL, "--root", root, "--prefix", PREFIX, "--dashboard").returncode == 0
    done = run(INSTALL, "--root", root, "--prefix", PREFIX, "--no-dashboard")
    assert done.returncode == 0, done.stderr
    assert not (root / LISTENERS).exists()
    assert not (root / WEB[1:]).exists()
    assert (root / CONFD / "memory-worker.conf").exists()


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
    password, a device added by deploy/add-user is served, and the share group is refused;
    the dashboard user logs in over WebSockets; anonymous clients are refused on both."""
    if dynsec_plugin() is None:
        pytest.skip("Mosquitto's dynamic-security plugin is not installed")
    with installed_broker(staged, tmp_path / "b") as mosq:
        env = env_of(staged)
        users = (
            ("memory-worker", env["MEMORY_WORKER_PASSWORD"]),
            ("kiosk-a", "a"),
            ("dashboard", "d"),
        )
        for name, password in users:
            done = await asyncio.to_thread(
                add_user, staged / "etc/memory-worker/ctrl", mosq.port, name, password
            )
            assert done.returncode == 0, done.stdout + done.stderr
        for anonymous in (
            aiomqtt.Client(mosq.host, mosq.port, protocol=aiomqtt.ProtocolVersion.V5),
            over_websockets(mosq),
        ):
            with pytest.raises(aiomqtt.MqttError):
                async with anonymous:
                    pass
        assert mosq.ws_port is not None
        assert "memory-worker" in await asyncio.to_thread(page, mosq.ws_port)
        cfg = Config(
            host=mosq.host,
            port=mosq.port,
            username=env["MEMORY_WORKER_USERNAME"],
            password=env["MEMORY_WORKER_PASSWORD"],
            route_prefix=env["MEMORY_WORKER_ROUTE_PREFIX"],
            shared_group="workers",
        )
        async with (
            running(cfg) as worker,
            kiosk_a(mosq) as a,
            over_websockets(mosq, "dashboard", "d") as dashboard,
        ):
            assert refused(await a.subscribe("$share/workers/mem/#", qos=1))
            await a.subscribe("reply/kiosk-a/#", qos=1)
            await dashboard.subscribe("mem/+/evicted", qos=1)
            reply = await ask(
                a, "kiosk-a", "append", {"role": "u", "content": "x"}, "reply/kiosk-a/r"
            )
            assert reply["ok"] is True
            assert worker.stats.requests == 1
            await a.publish("mem/kiosk-a/delete", b"\x80", qos=1)
            event = await asyncio.wait_for(anext(aiter(dashboard.messages)), 10)
            assert str(event.topic) == "mem/kiosk-a/evicted"


@needs_root
def test_a_secured_reinstall_without_the_admins_options_says_what_to_do(
    staged: Path, tmp_path: Path
) -> None:
    """After deploy/uninstall the broker's users are kept but the admin's options are not:
    --secure then stops with one line naming the file to move away."""
    root = Path(shutil.copytree(staged, tmp_path / "root", symlinks=True))
    assert run(UNINSTALL, "--root", root, "--prefix", PREFIX).returncode == 0
    done = run(INSTALL, "--root", root, "--prefix", PREFIX, "--secure")
    assert done.returncode == 1
    [line] = done.stderr.splitlines()
    assert line.startswith("deploy/install: error: /var/lib/mosquitto/dynamic-security.json")
    assert "move /var/lib/mosquitto/dynamic-security.json away" in line
    # It stops before writing anything: the broker's snippets written by a stopped run would
    # be "up to date" to the next one, which then would not restart the broker for them.
    assert list((root / CONFD).iterdir()) == []
    assert not (root / PREFIX[1:]).exists()


@needs_root
def test_add_user_fails_on_a_broker_without_the_plugin(tmp_path: Path) -> None:
    """deploy/add-user against a broker that does not load the dynamic-security plugin (it
    does not answer mosquitto_ctrl) fails, saying so, rather than reporting success."""
    mosq = Mosquitto(tmp_path / "broker").start()
    try:
        subprocess.run(
            [REPO / "deploy/init-security", "admin-secret"],
            env={
                "DYNSEC_FILE": str(tmp_path / "dynsec.json"),
                "CTRL_DIR": str(tmp_path / "ctrl"),
                "PERSIST_DIR": "",
                "PATH": "/usr/bin:/bin",
            },
            capture_output=True,
            check=True,
        )
        done = add_user(tmp_path / "ctrl", mosq.port, "memory-worker", "secret")
    finally:
        mosq.stop()
    assert done.returncode == 1, done.stdout
    assert "dynamic-security plugin is not loaded" in done.stderr


@needs_root
async def test_the_broker_roles_follow_the_configured_prefix(staged: Path, tmp_path: Path) -> None:
    """MEMORY_WORKER_PREFIX in the settings before the first --secure install: the roles the
    installer makes and deploy/add-user's device roles are for that prefix, and work."""
    if dynsec_plugin() is None:
        pytest.skip("Mosquitto's dynamic-security plugin is not installed")
    root = restage(staged, tmp_path / "root")
    (root / "etc/memory-worker").mkdir()
    (root / "etc/memory-worker/memory-worker.env").write_text("MEMORY_WORKER_PREFIX=home/mem\n")
    done = run(INSTALL, "--root", root, "--prefix", PREFIX, "--secure")
    assert done.returncode == 0, done.stderr
    roles = json.loads((root / "var/lib/mosquitto/dynamic-security.json").read_text())["roles"]
    topics = {acl["topic"] for role in roles for acl in role["acls"]}
    assert {"home/mem/#", "$share/+/home/mem/#", "home/mem/_worker/#"} <= topics
    assert not any(t.startswith("mem/") for t in topics)
    with installed_broker(root, tmp_path / "b") as mosq:
        env = env_of(root)
        for name, password in (("memory-worker", env["MEMORY_WORKER_PASSWORD"]), ("kiosk-a", "a")):
            added = await asyncio.to_thread(
                add_user, root / "etc/memory-worker/ctrl", mosq.port, name, password
            )
            assert added.returncode == 0, added.stdout + added.stderr
        cfg = Config(
            host=mosq.host,
            port=mosq.port,
            prefix="home/mem",
            username="memory-worker",
            password=env["MEMORY_WORKER_PASSWORD"],
            route_prefix=env["MEMORY_WORKER_ROUTE_PREFIX"],
        )
        async with (
            running(cfg),
            kiosk_a(mosq) as a,
        ):
            await a.subscribe("reply/kiosk-a/#", qos=1)
            body = {"role": "u", "content": "x"}
            reply = await ask(a, "kiosk-a", "append", body, "reply/kiosk-a/r", prefix="home/mem")
            assert reply["ok"] is True


@needs_root
def test_the_summarizer_is_installed_beside_the_worker(staged: Path, tmp_path: Path) -> None:
    """--summarizer URL: its unit (which verifies), its settings with the model server and,
    with --secure, its own broker user; the worker's trimmed events on; a later run without
    the flag keeps it, and adds nothing twice."""
    root = restage(staged, tmp_path / "root")
    url = "http://127.0.0.1:11434/v1"
    for args in (["--summarizer", url], []):
        done = run(INSTALL, "--root", root, "--prefix", PREFIX, "--secure", *args)
        assert done.returncode == 0, done.stderr
    unit = (root / "etc/systemd/system/memory-summarizer.service").read_text()
    assert f"ExecStart={PREFIX}/bin/memory-summarizer\n" in unit
    settings = (root / "etc/memory-worker/memory-summarizer.env").read_text()
    assert f"MEMORY_SUMMARIZER_LLM_URL={url}\n" in settings
    assert settings.count("MEMORY_SUMMARIZER_USERNAME=summarizer\n") == 1
    assert "MEMORY_SUMMARIZER_PASSWORD=" in settings
    worker = (root / "etc/memory-worker/memory-worker.env").read_text()
    assert worker.count("MEMORY_WORKER_TRIMMED_EVENTS=1\n") == 1
    venv = root / PREFIX[1:]
    helped = run(venv / "bin/python", venv / "bin/memory-summarizer", "--help")
    assert helped.returncode == 0, helped.stderr
    if shutil.which("systemd-analyze") is not None:
        copy = tmp_path / "memory-summarizer.service"
        copy.write_text(unit.replace(f"ExecStart={PREFIX}", f"ExecStart={root}{PREFIX}"))
        verified = run("systemd-analyze", "verify", copy)
        assert verified.returncode == 0, verified.stderr
