"""The secured set-up in deploy/: passwords, ACLs, and replies kept in each device's space."""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import msgpack
import pytest

from tests.clients import NODELAY, decode, next_message, props, watcher
from tests.conftest import running
from tests.processes import REPO, Mosquitto
from worker.config import Config
from worker.service import Service

USERS = {
    "memory-worker": "w-secret",
    "dashboard": "d-secret",
    "kiosk-a": "a-secret",
    "kiosk-b": "b-secret",
}


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """Mosquitto from deploy/mosquitto.conf, with users made by deploy/add-user."""
    work = tmp_path_factory.mktemp("secured")
    passwd = work / "passwd"
    for name, password in USERS.items():
        subprocess.run(
            [REPO / "deploy" / "add-user", name, password],
            check=True,
            env={"PASSWD_FILE": str(passwd), "PATH": "/usr/bin:/bin"},
            capture_output=True,
        )
    conf = (REPO / "deploy" / "mosquitto.conf").read_text()
    conf = re.sub(r"(?m)^password_file .*$", f"password_file {passwd}", conf)
    conf = re.sub(r"(?m)^acl_file .*$", f"acl_file {REPO / 'deploy' / 'acl'}", conf)
    (work / "base.conf").write_text(conf)
    mosq = Mosquitto(work, conf=work / "base.conf").start()
    yield mosq
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
    client: aiomqtt.Client, convo: str, op: str, body: dict[str, Any], route: str
) -> dict[str, Any]:
    """Publish a request with `route`; the next message the client gets must be its reply."""
    await client.publish(
        f"mem/{convo}/{op}", msgpack.packb(body), qos=1, properties=props(ResponseTopic=route)
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
    with pytest.raises(aiomqtt.MqttError):
        async with login(secured, user, password):
            pass


async def test_a_device_uses_its_own_conversation(
    secured: Mosquitto, secured_worker: Service
) -> None:
    async with login(secured, "kiosk-a") as a:
        await a.subscribe("reply/kiosk-a/#", qos=1)
        reply = await ask(
            a, "kiosk-a", "append", {"role": "user", "content": "hi"}, "reply/kiosk-a/r"
        )
        assert reply == {"ok": True, "seq": 1, "count": 1}


async def test_a_device_cannot_touch_another_conversation(
    secured: Mosquitto, secured_worker: Service
) -> None:
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
    """Mosquitto grants the subscriptions but delivers nothing the ACL forbids."""
    async with login(secured, "kiosk-a") as a, login(secured, "kiosk-b") as b:
        await a.subscribe([("reply/#", 1), ("mem/#", 1)])
        await b.subscribe("reply/kiosk-b/#", qos=1)
        await ask(b, "kiosk-b", "append", {"role": "u", "content": "private"}, "reply/kiosk-b/r")
        # b's request and the worker's reply to it were published before a's own reply
        assert (await ask(a, "kiosk-a", "get", {}, "reply/kiosk-a/r"))["ok"] is True


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
    tracked = subprocess.run(
        ["git", "ls-files", "deploy"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    assert "deploy/passwd" not in tracked
    assert Path(REPO / ".gitignore").read_text().count("deploy/passwd") == 1


async def test_a_device_outside_the_secret_share_group_takes_nothing(secured: Mosquitto) -> None:
    """Mosquitto 2.0 lets anyone subscribe to anything (its ACL file checks reads only on
    delivery), and a member of the workers' share group takes its turn of the requests even
    when it may not read them. A group name that devices cannot guess keeps them out: a
    device subscribing under any other group name gets its own (unreadable) copy, and the
    workers' group loses nothing."""
    group = f"workers-{uuid.uuid4().hex}"  # a secret, like a password
    async with (
        running(worker_config(secured, shared_group=group)) as w,
        login(secured, "kiosk-a") as a,
    ):
        await a.subscribe(
            [("$share/workers/mem/+/get", 1), ("$share/memory-worker/mem/#", 1), ("mem/#", 1)]
        )
        await a.subscribe("reply/kiosk-a/#", qos=1)
        for _ in range(10):
            assert (await ask(a, "kiosk-a", "get", {}, "reply/kiosk-a/r"))["ok"] is True
        assert w.stats.requests == 10
