"""A broker that refuses (its ACL): the client and memctl say so at once, naming the topic,
rather than waiting out their timeouts."""

from __future__ import annotations

import asyncio
import os
import subprocess
from typing import Any

import pytest

from tests.conftest import program, running
from tests.processes import Mosquitto
from tests.test_security import USERS, add_user, secured, secured_worker, worker_config
from tests.test_worker_refused import dynsec
from worker.client import BlockingMemoryClient, MemoryClient, NoReplyError, RefusedError
from worker.service import Service

# deploy/'s secured broker (dynamic security): kiosk-a may ask under mem/kiosk-a/ and read
# replies under reply/kiosk-a/, nothing else. Mosquitto's plain acl_file grants every
# SUBSCRIBE and only filters deliveries, so it cannot show a refused one.
__all__ = ["secured", "secured_worker"]
USER, PASSWORD = "kiosk-a", USERS["kiosk-a"]


async def first_eviction(m: MemoryClient) -> None:
    async for _ in m.evictions():
        break


@pytest.mark.parametrize("protocol", [5, 3])
async def test_a_refused_reply_subscription_is_an_error_naming_it(
    secured: Mosquitto, protocol: int
) -> None:
    """A SUBACK refusing the reply topic raises RefusedError on connecting, naming the topic
    and suggesting reply_prefix (MQTT 5 and 3.1.1)."""
    client = MemoryClient(
        secured.host, secured.port, "mem", protocol=protocol, username=USER, password=PASSWORD
    )
    with pytest.raises(RefusedError) as info:
        async with client:
            pass
    inbox = f"mem-reply/{client.tag}" + ("/+" if protocol == 3 else "")  # 3.1.1: one each
    assert info.value.topic == inbox
    assert info.value.code == "refused"
    assert isinstance(info.value, PermissionError)
    assert f"'{inbox}'" in info.value.message
    assert "reply_prefix='reply/kiosk-a'" in info.value.message
    # Each role's by the command that made it: the client cannot know which (a trial read
    # "reply/<user>" as an app's).
    assert "(deploy/add-user kiosk-a): reply_prefix='reply/kiosk-a'" in info.value.message
    assert "(deploy/add-user --app kiosk-a): reply_prefix='reply/{convo}'" in info.value.message
    # 3.1.1's SUBACK has one refusal, no reason: not MQTT 5's "Unspecified error"
    reason = "Not authorized" if protocol == 5 else "Failure (MQTT 3.1.1 says no reason)"
    assert info.value.reason == reason


async def test_a_refused_event_subscription_is_an_error(secured: Mosquitto) -> None:
    """evictions() of conversations the user may not read raises RefusedError naming the filter,
    each time it is asked."""
    async with MemoryClient(
        secured.host,
        secured.port,
        "mem",
        reply_prefix="reply/kiosk-a",
        timeout=2,
        username=USER,
        password=PASSWORD,
    ) as m:
        with pytest.raises(RefusedError) as info:
            await first_eviction(m)
        assert info.value.topic == "mem/+/evicted"
        assert "the dashboard's login reads eviction events" in info.value.message
        with pytest.raises(RefusedError):  # not left counted as subscribed
            await first_eviction(m)


# kiosk-a's client, with a timeout far above what the refusal tests wait.
KIOSK_A: dict[str, Any] = {
    "prefix": "mem",
    "reply_prefix": "reply/kiosk-a",
    "timeout": 60,
    "username": USER,
    "password": PASSWORD,
}


async def test_a_refused_request_is_an_error_naming_its_topic(secured: Mosquitto) -> None:
    """A request the broker refuses (MQTT 5 PUBACK 'Not authorized': another device's
    conversation) raises RefusedError at once, naming the topic; the next request still goes."""
    async with MemoryClient(secured.host, secured.port, **KIOSK_A) as m:
        async with asyncio.timeout(30):  # far below the client's own 60 s
            with pytest.raises(RefusedError) as info:
                await m.get("kiosk-b")
        assert info.value.topic == "mem/kiosk-b/get"
        assert info.value.reason == "Not authorized"
        assert "'mem/kiosk-b/get' (Not authorized)" in info.value.message
        with pytest.raises(RefusedError):
            await m.forget("kiosk-b")


async def test_a_refused_blocking_request_is_an_error_at_once(secured: Mosquitto) -> None:
    """The blocking client, whose MQTT 5 requests go out from the calling thread, raises the
    broker's refusal at once too."""

    def use() -> RefusedError:
        with BlockingMemoryClient(secured.host, secured.port, **KIOSK_A) as memory:
            with pytest.raises(RefusedError) as info:
                memory.append("kiosk-b", "user", "x")
            with pytest.raises(RefusedError):  # again: nothing of the first left to shadow it
                memory.forget("kiosk-b")
            client = memory.memory
            assert isinstance(client, MemoryClient)
            assert (client._waiting, client._mids) == ({}, {})  # nothing left behind
            return info.value

    refused = await asyncio.wait_for(asyncio.to_thread(use), 30)  # far below the 60 s
    assert (refused.topic, refused.reason) == ("mem/kiosk-b/append", "Not authorized")


def device(secured: Mosquitto, name: str, password: str) -> dict[str, Any]:
    """A device's client options (deploy/add-user NAME), with a timeout far above what the
    tests wait."""
    return {
        "host": secured.host,
        "port": secured.port,
        "username": name,
        "password": password,
        "reply_prefix": f"reply/{name}",
        "timeout": 30,
    }


def memctl_as_kiosk(
    secured: Mosquitto, password: str, *args: str
) -> subprocess.CompletedProcess[str]:
    """memctl as kiosk-a, with `password`, waiting up to 30 s for a reply it should not need."""
    return subprocess.run(
        [
            program("memctl"),
            *("--host", secured.host, "--port", str(secured.port)),
            *("--username", USER, "--password", password, "--timeout", "30", *args),
        ],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )


def test_memctl_says_refused_in_one_line_with_exit_4(secured: Mosquitto) -> None:
    """memctl on a broker refusing its reply topic prints one line naming it and exits 4."""
    done = memctl_as_kiosk(secured, USERS["kiosk-a"], "get", "kiosk-a")
    assert done.returncode == 4, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("memctl: the broker at")
    assert "'memctl/" in lines[0]
    assert "--reply-prefix reply/kiosk-a" in lines[0]
    assert done.stdout == ""


async def test_a_wrong_password_is_a_refused_login_not_a_timeout(secured: Mosquitto) -> None:
    """The broker refusing the login raises RefusedError at once (not NoReplyError, which
    says no broker may be there); memctl prints it in one line with exit 4 (below)."""
    with pytest.raises(RefusedError) as info:
        async with MemoryClient(
            secured.host, secured.port, "mem", username=USER, password="wrong", timeout=30
        ):
            pass
    assert "refused the login of 'kiosk-a'" in info.value.message
    assert "check the username and password" in info.value.message


def test_memctl_says_a_refused_login_in_one_line_with_exit_4(secured: Mosquitto) -> None:
    done = memctl_as_kiosk(secured, "wrong", "list")
    assert done.returncode == 4, done.stderr
    assert done.stderr.count("\n") == 1
    assert "refused the login of 'kiosk-a'" in done.stderr


async def test_the_hint_leads_the_dashboard_user_to_its_reply_prefix(secured: Mosquitto) -> None:
    """The refusal a dashboard user gets without reply_prefix names the dashboard role's
    reply topics, and with them its client connects (the advice does not go round in a
    circle, as reply/<user> would: that role may not read it)."""
    user, password = "dashboard", USERS["dashboard"]
    with pytest.raises(RefusedError) as info:
        async with MemoryClient(
            secured.host, secured.port, "mem", username=user, password=password
        ):
            pass
    said = info.value.message
    assert said.index("reply/_conversations") < said.index("reply/dashboard")  # its own first
    async with MemoryClient(
        secured.host,
        secured.port,
        "mem",
        reply_prefix="reply/_conversations",
        username=user,
        password=password,
        timeout=0.5,
    ) as m:
        assert isinstance(await m.stats(), list)


async def test_a_blocking_thread_refused_its_login_says_so_at_once(secured: Mosquitto) -> None:
    """The password changes after a blocking client opened: a thread's first call, whose own
    connection is made then, raises the refused login at once, not NoReplyError after its
    attempts (30 s each)."""
    name = "kiosk-pw"
    assert add_user(secured.work, name, "first-secret").returncode == 0  # type: ignore[attr-defined]

    def use() -> RefusedError:
        with BlockingMemoryClient(**device(secured, name, "first-secret")) as memory:
            changed = add_user(secured.work, name, "second-secret")  # type: ignore[attr-defined]
            assert changed.returncode == 0
            with pytest.raises(RefusedError) as info:
                memory.append(name, "user", "x")
            return info.value

    refused = await asyncio.wait_for(asyncio.to_thread(use), 20)
    assert "check the username and password" in refused.message


async def test_memctl_retire_says_refused_in_one_line_with_exit_4(secured: Mosquitto) -> None:
    """memctl retire as a login that may not clear a worker's topics (the dashboard's) or not
    even read them (a device's) prints one line naming the topic and exits 4, and the worker's
    retained status stays (it printed "retired" and exited 0, or said "no worker")."""
    async with running(worker_config(secured, client_id="retire-me", stats_interval=0.2)):
        pass  # it leaves its "offline" status and stats, retained
    where = ("--host", secured.host, "--port", str(secured.port), "--timeout", "5")

    def retire(user: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [program("memctl"), *where, "--username", user, "retire", "retire-me"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
            env={**os.environ, "MEMORY_WORKER_PASSWORD": USERS[user]},
        )

    for user, topic in [
        ("dashboard", "mem/_worker/retire-me/stats"),
        ("kiosk-a", "mem/_worker/retire-me/+"),
    ]:
        done = retire(user)
        assert (done.returncode, done.stdout) == (4, ""), done.stderr
        assert done.stderr.count("\n") == 1, done.stderr
        assert f"'{topic}'" in done.stderr
        assert "only the workers' own may clear them (memctl retire: memory-worker" in done.stderr
    async with MemoryClient(
        secured.host,
        secured.port,
        "mem",
        reply_prefix="reply/_conversations",
        username="dashboard",
        password=USERS["dashboard"],
    ) as m:
        assert "retire-me" in [s["client_id"] for s in await m.stats()]


async def test_a_login_refused_on_reconnecting_is_a_refused_error_at_once(
    secured: Mosquitto, secured_worker: Service
) -> None:
    """A client the broker kicks and then refuses at each reconnection (its login disabled,
    its password changed) raises the refused login at once, not "lost the broker" after every
    attempt's timeout; a write that had gone out is a NoReplyError naming the refusal (it
    may have been stored: a RefusedError says the broker said no, and a caller may write it
    again); let in again, it serves at the next reconnection, not refused by the last one's
    answer."""
    name = "kiosk-off"
    assert add_user(secured.work, name, "secret").returncode == 0  # type: ignore[attr-defined]
    async with MemoryClient(**device(secured, name, "secret")) as m:
        acked, unsure, refused = 0, [], []

        async def write() -> None:  # until refused: writes in flight when the broker kicks
            nonlocal acked
            while True:
                try:
                    await m.append(name, "user", "x")
                    acked += 1
                except NoReplyError as exc:
                    unsure.append(exc.message)
                except RefusedError as exc:
                    refused.append(exc)
                    return

        writers = [asyncio.create_task(write()) for _ in range(4)]
        await m.append(name, "user", "x")  # the writers are under way
        acked += 1
        await asyncio.to_thread(dynsec, secured, "disableClient", name)
        try:
            async with asyncio.timeout(20):  # far below the client's 30 s attempts
                await asyncio.gather(*writers)
                with pytest.raises(RefusedError):  # each request, while it lasts
                    await m.get(name)
                with pytest.raises(RefusedError):  # not [] ("no worker") after a wait
                    await m.stats()
        finally:
            await asyncio.to_thread(dynsec, secured, "enableClient", name)
        assert all("refused the login of 'kiosk-off'" in exc.message for exc in refused)
        for said in unsure:
            assert "may have been applied" in said
            assert "refused the login of 'kiosk-off'" in said
        refusals = 0
        for _ in range(3):  # each call waits for the next reconnection's answer
            try:
                seq = (await asyncio.wait_for(m.append(name, "user", "x"), 20)).seq
                break
            except RefusedError:  # a reconnection that raced the enabling
                refusals += 1
        assert refusals <= 1
        # Every write stored was acknowledged or said to be unsure: none was "refused".
        assert acked + 1 <= seq <= acked + len(unsure) + 1, (acked, unsure)
