"""The secured set-up in deploy/: passwords, ACLs, and replies kept in each device's space."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import re
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import msgpack
import pytest

from tests.clients import NODELAY, decode, next_message, props, watcher
from tests.conftest import run_memctl, running, spawn_worker
from tests.processes import REPO, Mosquitto, free_port
from worker.client import MemoryClient
from worker.config import Config
from worker.service import Service

USERS = {
    "memory-worker": "w-secret",
    "dashboard": "d-secret",
    "kiosk-a": "a-secret",
    "kiosk-b": "b-secret",
}


def dynsec_plugin() -> Path | None:
    found = sorted(Path("/usr/lib").glob("*/mosquitto_dynamic_security.so"))
    return found[0] if found else None


def add_user(
    work: Path, name: str, password: str, *options: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [REPO / "deploy" / "add-user", *options, name, password],
        env={"CTRL_DIR": str(work / "ctrl"), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """Mosquitto from deploy/mosquitto.conf (dynamic security made by deploy/init-security),
    with users added by deploy/add-user while it runs."""
    plugin = dynsec_plugin()
    if plugin is None:
        pytest.skip("Mosquitto's dynamic-security plugin is not installed")
    work = tmp_path_factory.mktemp("secured")
    port = free_port()
    subprocess.run(
        [REPO / "deploy" / "init-security", "admin-secret"],
        check=True,
        env={
            "DYNSEC_FILE": str(work / "dynsec.json"),
            "CTRL_DIR": str(work / "ctrl"),
            "MQTT_PORT": str(port),
            "PERSIST_DIR": str(work / "persist"),
            "PATH": "/usr/bin:/bin",
        },
        capture_output=True,
    )
    conf = (REPO / "deploy" / "mosquitto.conf").read_text()
    conf = re.sub(r"(?m)^plugin .*$", f"plugin {plugin}", conf)
    conf = re.sub(
        r"(?m)^plugin_opt_config_file .*$", f"plugin_opt_config_file {work / 'dynsec.json'}", conf
    )
    (work / "base.conf").write_text(conf)
    mosq = Mosquitto(work, conf=work / "base.conf", port=port).start()
    try:  # a failed add-user must not leave the broker running
        for name, password in USERS.items():
            done = add_user(work, name, password)
            assert done.returncode == 0, done.stderr
        mosq.work = work  # type: ignore[attr-defined]
        yield mosq
    finally:
        mosq.stop()


def worker_config(secured: Mosquitto, **overrides: Any) -> Config:
    """The worker as deploy/ runs it: its own user, replies kept in each device's space."""
    return Config(
        host=secured.host,
        port=secured.port,
        username="memory-worker",
        password=USERS["memory-worker"],
        route_prefix="reply/{convo}",
        **overrides,
    )


@pytest.fixture
async def secured_worker(secured: Mosquitto) -> AsyncIterator[Service]:
    async with running(worker_config(secured, stats_interval=0.2)) as service:
        yield service


@contextlib.asynccontextmanager
async def login(
    secured: Mosquitto, user: str | None, password: str | None = None
) -> AsyncIterator[aiomqtt.Client]:
    password = password or (USERS.get(user) if user else None)
    async with aiomqtt.Client(
        secured.host,
        secured.port,
        username=user,
        password=password,
        protocol=aiomqtt.ProtocolVersion.V5,
        socket_options=[NODELAY],
    ) as client:
        yield client


async def ask(
    client: aiomqtt.Client,
    convo: str,
    op: str,
    body: dict[str, Any],
    route: str,
    prefix: str = "mem",
) -> dict[str, Any]:
    """Publish a request with `route`; the next message the client gets must be its reply."""
    await client.publish(
        f"{prefix}/{convo}/{op}", msgpack.packb(body), qos=1, properties=props(ResponseTopic=route)
    )
    message = await asyncio.wait_for(anext(aiter(client.messages)), 10)
    assert message.topic.value == route, f"got {message.topic.value} before the reply"
    return decode(message)  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("user", "password"), [(None, None), ("kiosk-a", "wrong"), ("nobody", "x")]
)
async def test_anonymous_and_wrong_passwords_are_refused(
    secured: Mosquitto, user: str | None, password: str | None
) -> None:
    """The secured broker refuses anonymous clients and wrong passwords."""
    with pytest.raises(aiomqtt.MqttError):
        async with login(secured, user, password):
            pass


async def test_a_device_uses_its_own_conversation(
    secured: Mosquitto, secured_worker: Service
) -> None:
    """A device may append to its own conversation and gets the reply."""
    async with login(secured, "kiosk-a") as a:
        await a.subscribe("reply/kiosk-a/#", qos=1)
        reply = await ask(
            a, "kiosk-a", "append", {"role": "user", "content": "hi"}, "reply/kiosk-a/r"
        )
        assert reply == {"ok": True, "seq": 1, "count": 1}


async def test_a_device_cannot_touch_another_conversation(
    secured: Mosquitto, secured_worker: Service
) -> None:
    """A device can neither write, delete nor read another device's conversation."""
    async with login(secured, "kiosk-a") as a, login(secured, "kiosk-b") as b:
        await a.subscribe("reply/kiosk-a/#", qos=1)
        await b.subscribe("reply/kiosk-b/#", qos=1)
        await ask(
            b, "kiosk-b", "append", {"role": "user", "content": "b's secret"}, "reply/kiosk-b/r"
        )
        for op in ("append", "delete", "get"):
            await a.publish(
                f"mem/kiosk-b/{op}",
                msgpack.packb({"role": "user", "content": "a was here"}),
                qos=1,
                properties=props(ResponseTopic="reply/kiosk-a/stolen"),
            )
        # a's own request goes after the forbidden ones; they never reached the worker
        await ask(a, "kiosk-a", "get", {}, "reply/kiosk-a/r")
        turns = (await ask(b, "kiosk-b", "get", {}, "reply/kiosk-b/r"))["turns"]
        assert [t["content"] for t in turns] == ["b's secret"]


async def test_a_device_cannot_read_requests_or_other_replies(
    secured: Mosquitto, secured_worker: Service
) -> None:
    """Mosquitto refuses the subscriptions, and delivers nothing the roles do not grant."""
    async with login(secured, "kiosk-a") as a, login(secured, "kiosk-b") as b:
        assert refused(await a.subscribe([("reply/#", 1), ("mem/#", 1), ("reply/kiosk-b/#", 1)]))
        await a.subscribe("reply/kiosk-a/#", qos=1)
        await b.subscribe("reply/kiosk-b/#", qos=1)
        await ask(b, "kiosk-b", "append", {"role": "u", "content": "private"}, "reply/kiosk-b/r")
        # b's request and the worker's reply to it were published before a's own reply
        assert (await ask(a, "kiosk-a", "get", {}, "reply/kiosk-a/r"))["ok"] is True


def refused(codes: Any) -> bool:
    """True when every reason code of a SUBACK is a refusal (0x80 and up)."""
    return all(getattr(code, "value", code) >= 0x80 for code in codes)


async def test_replies_cannot_be_aimed_at_another_device(
    secured: Mosquitto, secured_worker: Service
) -> None:
    """--route-prefix reply/{convo}: a's request naming b's reply topic is served, not sent."""
    async with login(secured, "kiosk-a") as a, login(secured, "kiosk-b") as b:
        await a.subscribe("reply/kiosk-a/#", qos=1)
        await b.subscribe("reply/kiosk-b/#", qos=1)
        await a.publish(
            "mem/kiosk-a/get", b"", qos=1, properties=props(ResponseTopic="reply/kiosk-b/spoof")
        )
        await ask(a, "kiosk-a", "get", {}, "reply/kiosk-a/r")
        await ask(b, "kiosk-b", "get", {}, "reply/kiosk-b/r")  # b's first message is its own
        assert secured_worker.stats.refused["bad_route"] == 1


async def test_nobody_can_impersonate_the_worker(
    secured: Mosquitto, secured_worker: Service
) -> None:
    """A device cannot publish the worker's status or eviction events."""
    status = f"mem/_worker/{secured_worker.cfg.client_id}/status"
    async with login(secured, "kiosk-a") as a:
        await a.publish(status, msgpack.packb({"state": "offline"}), qos=1, retain=True)
        await a.publish("mem/kiosk-b/evicted", msgpack.packb({"convo": "kiosk-b"}), qos=1)
    async with login(secured, "dashboard") as dash:
        await dash.subscribe(status, qos=1)
        async for message in dash.messages:
            assert decode(message)["state"] == "online"
            break


async def test_dashboard_reads_events_status_and_stats(
    secured: Mosquitto, secured_worker: Service
) -> None:
    """The dashboard user may subscribe to events, status and stats, and gets status and stats."""
    base = f"mem/_worker/{secured_worker.cfg.client_id}"
    async with watcher(
        secured.host,
        secured.port,
        "mem/+/evicted",
        f"{base}/status",
        f"{base}/stats",
        username="dashboard",
        password=USERS["dashboard"],
    ) as seen:
        topics = {(await next_message(seen)).topic.value for _ in range(2)}
        assert topics == {f"{base}/status", f"{base}/stats"}
        async with login(secured, "kiosk-a") as a:
            await a.subscribe("reply/kiosk-a/#", qos=1)
            await ask(a, "kiosk-a", "append", {"role": "u", "content": "x"}, "reply/kiosk-a/r")
            await ask(a, "kiosk-a", "delete", {}, "reply/kiosk-a/r")
        while (message := await next_message(seen)).topic.value != "mem/kiosk-a/evicted":
            pass
        assert decode(message)["reason"] == "deleted"


def test_no_secret_is_committed() -> None:
    """deploy/'s password and security files are git-ignored and never tracked."""
    tracked = subprocess.run(
        ["git", "ls-files", "deploy"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    ignored = Path(REPO / ".gitignore").read_text().splitlines()
    for secret in ("deploy/passwd", "deploy/dynamic-security.json", "deploy/ctrl/"):
        assert secret.rstrip("/") not in tracked
        assert secret in ignored


async def test_a_device_cannot_join_the_workers_share_group(secured: Mosquitto) -> None:
    """A device subscribing to the workers' share group by its exact name is refused by the
    broker and takes none of the requests (with Mosquitto's ACL file it took half)."""
    group = "workers"
    async with (
        running(worker_config(secured, shared_group=group)) as w,
        login(secured, "kiosk-a") as a,
    ):
        filters = [
            f"$share/{group}/mem/#",
            f"$share/{group}/mem/+/get",
            f"$share/{group}/mem/+/append",
        ]
        assert refused(await a.subscribe([(f, 1) for f in filters]))
        await a.subscribe("reply/kiosk-a/#", qos=1)
        for _ in range(10):
            assert (await ask(a, "kiosk-a", "get", {}, "reply/kiosk-a/r"))["ok"] is True
        assert w.stats.requests == 10


async def test_the_admin_cannot_join_the_workers_share_group(secured: Mosquitto) -> None:
    """The admin deploy/init-security makes administers; it reads no application topic."""
    async with login(secured, "admin", "admin-secret") as admin:
        assert refused(await admin.subscribe([("$share/workers/mem/#", 1), ("mem/#", 1)]))


def test_add_user_refuses_names_that_are_not_conversation_ids(secured: Mosquitto) -> None:
    """A name with a wildcard or a slash would widen a device's rights: exit 2, one line."""
    for name in ("a/b", "k+", "#", "_worker", "$SYS"):
        done = add_user(secured.work, name, "x")  # type: ignore[attr-defined]
        assert done.returncode == 2
        assert done.stderr.count("\n") == 1


def test_add_user_says_when_the_broker_is_not_running(tmp_path: Path) -> None:
    """Without a broker to talk to add-user fails in one line, and prints no password."""
    subprocess.run(
        [REPO / "deploy" / "init-security", "pw"],
        check=True,
        capture_output=True,
        env={
            "DYNSEC_FILE": str(tmp_path / "d.json"),
            "CTRL_DIR": str(tmp_path / "ctrl"),
            "MQTT_PORT": str(free_port()),
            "PATH": "/usr/bin:/bin",
        },
    )
    done = add_user(tmp_path, "kiosk-z", "")
    assert done.returncode == 1
    assert "not running" in done.stderr
    assert "password" not in done.stdout


@pytest.mark.parametrize(
    ("script", "args", "code", "words"),
    [
        ("init-security", ["--help"], 0, "deploy/init-security [ADMIN_PASSWORD]: make"),
        ("init-security", ["-x"], 2, "error: no option '-x'"),
        ("add-user", ["--help"], 0, "deploy/add-user [--if-missing] [--app] NAME"),
        ("add-user", [], 2, "usage: deploy/add-user [--if-missing] [--app] NAME"),
        ("add-user", ["--if-missing", "--help"], 2, "error: no option '--help'"),
        # A device named "assistant" whose password was "--app":
        ("add-user", ["assistant", "--app"], 2, "error: options come before NAME, not '--app'"),
        ("add-user", ["assistant", "pw", "--app"], 2, "error: too many arguments"),
    ],
)
def test_an_option_is_neither_a_password_nor_a_name(
    tmp_path: Path, script: str, args: list[str], code: int, words: str
) -> None:
    """`init-security --help` made "--help" the admin's password, and `add-user --help` a
    device named "--help": help is shown, another option refused, and nothing is made."""
    env = {"DYNSEC_FILE": str(tmp_path / "d.json"), "CTRL_DIR": str(tmp_path / "ctrl")}
    done = subprocess.run(
        [REPO / "deploy" / script, *args],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PERSIST_DIR": "", **env},
        check=False,
    )
    assert done.returncode == code, done.stderr
    assert words in (done.stdout if code == 0 else done.stderr)
    assert not (tmp_path / "d.json").exists()


async def test_passwords_never_reach_mosquitto_ctrls_command_line(
    secured: Mosquitto, tmp_path: Path
) -> None:
    """add-user (new client, then a new password) hands mosquitto_ctrl no password on its
    command line, which ps shows to every local user; the client then logs in with it."""
    real = shutil.which("mosquitto_ctrl")
    assert real is not None
    shim = tmp_path / "bin" / "mosquitto_ctrl"
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {tmp_path}/argv\nexec {real} "$@"\n')
    shim.chmod(0o755)
    work = secured.work  # type: ignore[attr-defined]
    path = f"{shim.parent}:/usr/bin:/bin"

    def add(password: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [REPO / "deploy" / "add-user", "kiosk-ps", "-"],
            input=password + "\n",
            env={"CTRL_DIR": str(work / "ctrl"), "PATH": path},
            capture_output=True,
            text=True,
            check=False,
        )

    for password in ("first-secret", "second-secret"):
        done = await asyncio.to_thread(add, password)
        assert done.returncode == 0, done.stderr
    argv = (tmp_path / "argv").read_text()
    assert "createClient kiosk-ps" in argv
    assert "setClientPassword kiosk-ps" in argv
    assert "secret" not in argv
    async with login(secured, "kiosk-ps", "second-secret"):
        pass


async def test_the_dashboard_may_list_conversations_and_a_device_may_not(
    secured: Mosquitto, secured_worker: Service
) -> None:
    """deploy/'s roles: the dashboard user lists live conversations; a device's listing is
    refused by the broker and never reaches the worker."""
    async with login(secured, "kiosk-a") as a, login(secured, "dashboard") as dash:
        await a.subscribe("reply/kiosk-a/#", qos=1)
        await ask(a, "kiosk-a", "append", {"role": "u", "content": "hi"}, "reply/kiosk-a/r")
        assert refused(await dash.subscribe([("reply/kiosk-a/#", 1)]))
        await dash.subscribe("reply/_conversations/dash", qos=1)
        listed = await ask(dash, "_conversations", "list", {}, "reply/_conversations/dash")
        assert "kiosk-a" in [e["convo"] for e in listed["conversations"]]
        served = secured_worker.stats.requests
        await a.publish(
            "mem/_conversations/list",
            b"",
            qos=1,
            properties=props(ResponseTopic="reply/kiosk-a/list"),
        )
        await a.publish(
            "mem/_conversations/list",
            b"",
            qos=1,
            properties=props(ResponseTopic="reply/_conversations/stolen"),
        )
        # a's own request goes after the refused ones; only it reached the worker
        assert (await ask(a, "kiosk-a", "get", {}, "reply/kiosk-a/r"))["ok"] is True
        assert secured_worker.stats.requests == served + 1
        assert refused(await a.subscribe([("reply/_conversations/#", 1)]))


def test_init_security_gives_the_persistence_folder_to_mosquitto(secured: Mosquitto) -> None:
    """deploy/mosquitto.conf saves under var/mosquitto-secured/ (not scripts/run's folder:
    two brokers of one clone would share a file): deploy/init-security makes it, and
    as root gives it to the `mosquitto` user Mosquitto drops to (it could not write a folder
    root made, and said so every autosave)."""
    conf = (REPO / "deploy" / "mosquitto.conf").read_text()
    assert re.search(r"(?m)^persistence_location var/mosquitto-secured/$", conf)
    persist = secured.work / "persist"  # type: ignore[attr-defined]
    assert persist.is_dir()
    if os.geteuid() == 0 and shutil.which("mosquitto") and _has_user("mosquitto"):
        assert persist.owner() == "mosquitto"


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


async def test_the_dashboard_user_gets_fresh_stats(secured: Mosquitto) -> None:
    """The dashboard role may ping a worker (P/_worker/+/ping): memctl stats and stats() show
    what a worker counts now, not its snapshot of up to --stats-interval ago."""
    import time

    async with running(worker_config(secured, stats_interval=3600)) as w:
        asked = time.time()  # after the worker's first (retained) stats
        async with MemoryClient(
            secured.host,
            secured.port,
            "mem",
            username="dashboard",
            password=USERS["dashboard"],
            replies=False,
        ) as m:
            stats = {s["client_id"]: s for s in await m.stats()}
    assert stats[w.cfg.client_id]["ts"] > asked


async def test_watching_needs_no_reply_topic(secured: Mosquitto, secured_worker: Service) -> None:
    """memctl's stats and watch (and a client made with replies=False) subscribe to no reply
    topic, so the dashboard user runs them without --reply-prefix; such a client refuses a
    request at once rather than waiting for a reply that cannot come."""
    user, password = "dashboard", USERS["dashboard"]
    async with MemoryClient(
        secured.host, secured.port, "mem", username=user, password=password, replies=False
    ) as m:
        assert secured_worker.cfg.client_id in [s["client_id"] for s in await m.stats()]
        with pytest.raises(RuntimeError, match="replies=False"):
            await m.get("kiosk-a")
    done = await run_memctl(secured, "--username", user, "--password", password, "stats")
    assert done.returncode == 0, done.stderr
    assert '"client_id"' in done.stdout


async def test_a_second_worker_with_the_id_is_stopped_on_the_secured_broker(
    secured: Mosquitto, secured_worker: Service
) -> None:
    """deploy/init-security's worker role may read and write the look's own topics
    ($memory-worker/look/#, which wildcards do not match): a second worker with the id of
    one serving is found and exits 2 (refused, the look told nothing, and the two fought)."""
    proc = spawn_worker(
        secured,
        "--username",
        "memory-worker",
        "--route-prefix",
        "reply/{convo}",
        "--client-id",
        secured_worker.cfg.client_id,
        MEMORY_WORKER_PASSWORD=USERS["memory-worker"],
    )
    out, _ = await asyncio.to_thread(proc.communicate, timeout=30)
    assert proc.returncode == 2, out
    assert "another worker serves" in out
    assert secured_worker.stats.taken_over == 0


async def test_an_app_login_uses_every_conversation_but_cannot_speak_for_the_worker(
    secured: Mosquitto, secured_worker: Service
) -> None:
    """`deploy/add-user --app NAME`: a login trusted with every conversation (a device has
    only its own, so LangGraph's store, whose namespaces are conversations lg.*, could not
    run on the secured broker at all), with the client's reply_prefix reply/{convo}; it may
    not announce events nor publish a worker's status."""
    from worker.client.langgraph import MqttStore

    made = await asyncio.to_thread(add_user, secured.work, "assistant", "app-secret", "--app")  # type: ignore[attr-defined]
    assert made.returncode == 0, made.stderr
    assert "role app-assistant" in made.stdout
    again = await asyncio.to_thread(add_user, secured.work, "assistant", "app-secret", "--app")  # type: ignore[attr-defined]
    assert "updated the password of assistant" in again.stdout
    # A device is not made an app by --app (it only had its password changed, still a device).
    assert (await asyncio.to_thread(add_user, secured.work, "kiosk-app", "pw")).returncode == 0  # type: ignore[attr-defined]
    refused = await asyncio.to_thread(add_user, secured.work, "kiosk-app", "pw", "--app")  # type: ignore[attr-defined]
    assert refused.returncode == 1
    assert "not as an app" in refused.stderr
    kept = await asyncio.to_thread(add_user, secured.work, "kiosk-app", "", "--if-missing")  # type: ignore[attr-defined]
    assert kept.stdout == "kiosk-app is on the broker already\n"  # no password it did not set
    url = f"mqtt://assistant:app-secret@{secured.host}:{secured.port}/mem?timeout=10"

    def use() -> tuple[Any, list[Any], list[Any]]:
        store = MqttStore(url=url + "&reply_prefix=reply/%7Bconvo%7D")
        try:
            store.put(("users", "alice"), "prefs", {"lang": "en"})
            store.put(("users", "bob"), "prefs", {"lang": "fr"})
            found = [i.namespace for i in store.search(("users",), filter={"lang": "fr"})]
            return store.get(("users", "alice"), "prefs"), found, store.list_namespaces()
        finally:
            store.close()

    item, found, spaces = await asyncio.to_thread(use)
    assert item is not None
    assert item.value == {"lang": "en"}
    assert found == [("users", "bob")]
    assert spaces == [("users", "alice"), ("users", "bob")]
    status = f"mem/_worker/{secured_worker.cfg.client_id}/status"
    async with (
        login(secured, "dashboard") as dash,
        MemoryClient(
            secured.host,
            secured.port,
            username="assistant",
            password="app-secret",
            reply_prefix="reply/{convo}",
            timeout=10,
        ) as m,
    ):
        await dash.subscribe([(status, 1), ("mem/+/evicted", 1)])
        async with login(secured, "assistant", "app-secret") as app:
            await app.publish(status, msgpack.packb({"state": "offline"}), qos=1, retain=True)
            await app.publish("mem/kiosk-b/evicted", msgpack.packb({"convo": "kiosk-b"}), qos=1)
        await m.append("app-c", "user", "x")
        assert await m.forget("app-c") == 1  # the worker's own event, after the app's
        seen = [await asyncio.wait_for(anext(aiter(dash.messages)), 10) for _ in range(2)]
    assert [message.topic.value for message in seen] == [status, "mem/app-c/evicted"]
    assert decode(seen[0])["state"] == "online"
