"""The dashboard page in a real headless Chromium, served by a real Mosquitto's http_dir."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests import test_security
from tests.clients import device
from tests.conftest import make_config, reap, running, spawn_worker, unique, wait_serving
from tests.processes import REPO, Mosquitto, wait_port

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = REPO / "test-artifacts" / "dashboard"

try:
    from playwright.async_api import Browser, Page, async_playwright, expect
except ImportError:  # pragma: no cover - scripts/test installs it
    pytest.skip("playwright is not installed (scripts/test installs it)", allow_module_level=True)
if not os.path.exists(CHROMIUM):
    pytest.skip("chromium is missing: apt-get install chromium", allow_module_level=True)

WAIT_MS = 10_000  # how long expect() waits for the page to show something
secured = test_security.secured  # Mosquitto from deploy/: dynamic-security roles


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """Debian's Chromium, headless, driven by Playwright (its own browser download is not used)."""
    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=CHROMIUM)
        yield b
        await b.close()


async def open_page(browser: Browser, mosq: Mosquitto, query: str, **context: object) -> Page:
    assert mosq.ws_port is not None
    wait_port(mosq.ws_port)
    ctx = await browser.new_context(**context)  # type: ignore[arg-type]
    page = await ctx.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    await page.goto(f"http://127.0.0.1:{mosq.ws_port}/{query}")
    page.set_default_timeout(WAIT_MS)
    await expect(page.locator("#conn")).to_have_attribute("data-state", "connected")
    assert errors == []
    return page


async def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


async def test_dashboard_follows_a_worker_live(
    browser: Browser, own_broker: Mosquitto, redis_url: str
) -> None:
    """Online, stats, evictions, the inspector, a broker restart and the Last Will, live."""
    prefix, cid, cid2 = unique("mem"), unique("kitchen-"), unique("hall-")
    # two workers in a share group on one Redis, as in the README's Scaling out
    args = ["--prefix", prefix, "--stats-interval", "0.3", "--reconnect-max", "0.5"]
    args += ["--backend", redis_url, "--shared-group", unique("g")]
    worker = spawn_worker(own_broker, *args, "--client-id", cid, "--event-format", "json")
    other = spawn_worker(own_broker, *args, "--client-id", cid2, "--max-bytes", "100000")
    try:
        # tall enough that the screenshot needs no scrolling (the header stays on top)
        tall = {"width": 1280, "height": 1900}
        page = await open_page(browser, own_broker, f"?prefix={prefix}", viewport=tall)
        card = page.locator(f'.card[data-client-id="{cid}"]')
        await expect(card).to_have_attribute("data-state", "online")
        await expect(page.locator(f'.card[data-client-id="{cid2}"]')).to_have_attribute(
            "data-state", "online"
        )
        await expect(card.locator(".state")).to_have_text("online")

        async with device(own_broker.host, own_broker.port, prefix) as d:
            for text in ("hello", "what's the weather?", "sunny"):
                await d.request("kiosk-7", "append", {"role": "user", "content": text})
            summary = {"text": "They greeted each other.", "upto": 1, "base": 0}
            assert (await d.request("kiosk-7", "summary", summary))["ok"]
            await d.request("gone-1", "append", {"role": "user", "content": "bye"})
            await d.request("gone-1", "delete")
        feed = page.locator('#eviction-feed li[data-reason="deleted"][data-convo="gone-1"]')
        await expect(feed).to_have_count(1)
        await expect(feed).to_contain_text("1 turn, 0 keys dropped")
        # on the charts' 24-hour clock, whatever the browser's locale
        await expect(feed.locator("time")).to_have_text(re.compile(r"^\d\d:\d\d:\d\d$"))
        await expect(page.locator('#eviction-counts [data-reason="deleted"]')).to_have_text(
            "deleted: 1"
        )
        await expect(page.locator('.card[data-deleted="1"]')).to_have_count(1)
        await expect(card.locator('[data-field="requests"]')).not_to_have_text("?")

        await page.fill("#inspector input[name=convo]", "kiosk-7")
        await page.click("#inspector button")
        turns = page.locator("#inspector-turns li")
        await expect(turns).to_have_count(3)
        await expect(turns.nth(0)).to_have_class("summary")
        await expect(turns.nth(0)).to_contain_text("They greeted each other.")
        await expect(turns.nth(0)).to_contain_text("up to #1")
        await expect(turns.nth(1)).to_contain_text("what's the weather?")
        await expect(turns.nth(1)).to_contain_text("#2 · 5 tokens")
        await expect(page.locator("#inspector-status")).to_have_attribute("data-state", "ok")
        # the list of the store both workers share, refreshed by itself
        listed = page.locator('#convo-list li[data-convo="kiosk-7"]')
        await expect(listed).to_contain_text("2 turns · 0 keys · 13 tokens")
        await expect(listed).to_contain_text("summary up to #1")
        await expect(page.locator("#convo-count")).to_have_text("1 live conversation")
        await shot(page, "1-live")

        own_broker.restart()
        await expect(page.locator("#conn")).to_have_attribute("data-state", "connected")
        async with device(own_broker.host, own_broker.port, prefix) as d:
            await d.request("gone-2", "append", {"role": "user", "content": "again"})
            await d.request("gone-2", "delete")
        await expect(page.locator('#eviction-feed li[data-convo="gone-2"]')).to_have_count(1)
        await expect(page.locator("#eviction-feed li").first).to_have_attribute(
            "data-convo", "gone-2"
        )

        reap(worker, signal.SIGKILL)  # the broker sends its Last Will
        await expect(card).to_have_attribute("data-state", "offline")
        await expect(card.locator(".state")).to_have_text("offline")
        await expect(page.locator(f'.card[data-client-id="{cid2}"]')).to_have_attribute(
            "data-state", "online"
        )
        await shot(page, "2-one-offline")

        phone = await open_page(
            browser, own_broker, f"?prefix={prefix}", viewport={"width": 390, "height": 844}
        )
        await expect(phone.locator(".card")).to_have_count(2)
        await shot(phone, "3-phone")
    finally:
        reap(worker)
        reap(other)


async def test_dashboard_on_a_laptop_and_a_phone(browser: Browser, own_broker: Mosquitto) -> None:
    """One worker's card uses a laptop's width, legends show the latest values with clock times,
    and a stopped worker can be removed: its retained status and stats are cleared."""
    prefix, cid = unique("mem"), unique("kiosk-hall-")
    worker = spawn_worker(
        own_broker, "--prefix", prefix, "--client-id", cid, "--stats-interval", "1"
    )
    try:
        laptop = {"width": 1366, "height": 768}
        page = await open_page(browser, own_broker, f"?prefix={prefix}", viewport=laptop)
        card = page.locator(f'.card[data-client-id="{cid}"]')
        await expect(card).to_have_attribute("data-state", "online")
        async with device(own_broker.host, own_broker.port, prefix) as d:
            for n in range(20):
                await d.request(f"kiosk-{n % 4}", "append", {"role": "user", "content": "hi"})
        await expect(card.locator(".charts")).to_be_visible(timeout=15_000)
        box = await card.bounding_box()
        assert box is not None
        assert box["width"] > 1200, box
        charts = await card.locator(".chart").evaluate_all(
            "els => els.map(e => e.getBoundingClientRect().top)"
        )
        assert len(set(charts)) < len(charts), "the charts stand side by side on a laptop"
        legend = card.locator(".chart").nth(1).locator(".u-legend .u-value")
        await expect(legend.first).to_have_text(re.compile(r"^\d\d:\d\d:\d\d$"))
        await expect(legend.nth(1)).to_have_text("4")  # conversations, the latest value
        await expect(legend.nth(2)).to_have_text("20")  # turns
        stored = card.locator(".chart").nth(2).locator(".u-legend .u-value")
        await expect(stored.nth(2)).to_have_text("64Mi")  # the budget, as the card's 64.0 MiB
        await expect(card.locator(".retire")).to_be_hidden()
        await shot(page, "6-laptop-one-worker")
        phone = await open_page(
            browser, own_broker, f"?prefix={prefix}", viewport={"width": 390, "height": 844}
        )
        await expect(phone.locator(".card .charts")).to_be_visible(timeout=15_000)
        await shot(phone, "7-phone-one-worker")

        assert reap(worker, signal.SIGTERM) == 0
        await expect(card).to_have_attribute("data-state", "offline")
        await card.locator(".retire button").click()
        await expect(card).to_have_count(0)
        await expect(page.locator("#no-workers")).to_be_visible()
        again = await open_page(browser, own_broker, f"?prefix={prefix}", viewport=laptop)
        await expect(again.locator("#no-workers")).to_be_visible()
        await expect(again.locator(".card")).to_have_count(0)
    finally:
        reap(worker)


@pytest.fixture
def passwd(tmp_path: Path) -> Path:
    """A Mosquitto password file with the user dashboard, password s3cret."""
    path = tmp_path / "passwd"
    subprocess.run(
        ["mosquitto_passwd", "-b", "-c", str(path), "dashboard", "s3cret"],
        check=True,
        capture_output=True,
    )
    return path


async def test_dashboard_asks_for_a_login(browser: Browser, tmp_path: Path, passwd: Path) -> None:
    """A broker that wants a password gets a login form; a refused one says so in words."""
    mosq = Mosquitto(
        tmp_path / "mosquitto", extra=f"allow_anonymous false\npassword_file {passwd}"
    ).start()
    try:
        assert mosq.ws_port is not None
        wait_port(mosq.ws_port)
        ctx = await browser.new_context()
        page = await ctx.new_page()
        page.set_default_timeout(WAIT_MS)
        await page.goto(f"http://127.0.0.1:{mosq.ws_port}/")
        await expect(page.locator("#login")).to_be_visible()
        await expect(page.locator("#conn")).to_have_attribute("data-state", "login")
        await page.fill("#login input[name=password]", "wrong")
        await page.click("#login button")
        await expect(page.locator("#conn")).to_contain_text("refused")
        await shot(page, "4-login-refused")
        await page.fill("#login input[name=password]", "s3cret")
        await page.click("#login button")
        await expect(page.locator("#conn")).to_have_attribute("data-state", "connected")
        await expect(page.locator("#login")).to_be_hidden()
    finally:
        mosq.stop()


async def test_dashboard_user_of_deploy_watches_but_may_not_ask(
    browser: Browser, secured: Mosquitto
) -> None:
    """deploy/'s dashboard user logs in, sees the worker, lists the live conversations, and is
    told it may not read their turns, nor remove the worker once stopped."""
    cfg = test_security.worker_config(secured, stats_interval=0.3)
    async with running(cfg):
        assert secured.ws_port is not None
        wait_port(secured.ws_port)
        page = await (await browser.new_context()).new_page()
        page.set_default_timeout(WAIT_MS)
        await page.goto(f"http://127.0.0.1:{secured.ws_port}/?reply=reply/{{convo}}")
        await expect(page.locator("#conn")).to_have_attribute("data-state", "login")
        await page.fill("#login input[name=username]", "dashboard")
        await page.fill("#login input[name=password]", test_security.USERS["dashboard"])
        await page.click("#login button")
        await expect(page.locator("#conn")).to_have_attribute("data-state", "connected")
        card = page.locator(f'.card[data-client-id="{cfg.client_id}"]')
        await expect(card).to_have_attribute("data-state", "online")
        await expect(page.locator("#convo-count")).to_have_text("0 live conversations")
        await page.fill("#inspector input[name=convo]", "kiosk-a")
        await page.click("#inspector button")
        status = page.locator("#inspector-status")
        await expect(status).to_have_attribute("data-state", "denied")
        await expect(status).to_contain_text("may only watch")
        await shot(page, "5-deploy-dashboard-user")
    await expect(card).to_have_attribute("data-state", "offline")  # the worker stopped
    await card.locator(".retire button").click()
    await expect(card.locator(".retire .refused")).to_contain_text("may only watch")
    await expect(card).to_have_count(1)
    await shot(page, "8-deploy-remove-refused")


async def test_dashboard_lists_live_conversations(browser: Browser, own_broker: Mosquitto) -> None:
    """The inspector's list: live conversations, most recently used first, refreshing, filtered
    by prefix, counted, and a click shows one's turns."""
    prefix = unique("mem")
    proc = spawn_worker(own_broker, "--prefix", prefix, "--client-id", unique("lister-"))
    try:
        wait_serving(proc)
        async with device(own_broker.host, own_broker.port, prefix) as d:
            for convo in ("kiosk-1", "kiosk-2"):
                await d.request(convo, "append", {"role": "user", "content": f"hi from {convo}"})
            page = await open_page(
                browser, own_broker, f"?prefix={prefix}", viewport={"width": 1280, "height": 1400}
            )
            items = page.locator("#convo-list li")
            await expect(items).to_have_count(2)
            await expect(page.locator("#convo-count")).to_have_text("2 live conversations")
            await d.request("hall-1", "append", {"role": "user", "content": "hello"})
            await expect(items).to_have_count(3)  # the list refreshes by itself
            await expect(items.first).to_have_attribute("data-convo", "hall-1")
            await expect(items.first).to_contain_text("1 turn · 0 keys")
            await page.fill("#convo-filter input[name=prefix]", "kiosk")
            await expect(items).to_have_count(2)
            await expect(page.locator("#convo-count")).to_contain_text(
                '2 conversations starting with "kiosk"'
            )
            await page.click('#convo-list li[data-convo="kiosk-2"] button')
            await expect(page.locator("#inspector-turns li")).to_have_count(1)
            await expect(page.locator("#inspector-turns li")).to_contain_text("hi from kiosk-2")
            await expect(page.locator("#inspector input[name=convo]")).to_have_value("kiosk-2")
            await page.fill("#convo-filter input[name=prefix]", "")
            await expect(items).to_have_count(3)
            await shot(page, "6-conversations")
    finally:
        reap(proc)


async def test_a_malformed_stats_message_spoils_nothing_else(
    browser: Browser, own_broker: Mosquitto
) -> None:
    """Any client may publish under the prefix: retained stats that lack fields (or carry
    wrong types) show "?" on their card, and the page goes on following the real worker and
    answering the inspector. The first one threw inside MQTT.js's handler, and no message
    came through after it: the real worker's card froze and the inspector said no worker
    serves the prefix."""
    import aiomqtt
    import msgpack

    prefix, cid = unique("mem"), unique("real-")
    proc = spawn_worker(
        own_broker, "--prefix", prefix, "--client-id", cid, "--stats-interval", "0.3"
    )
    try:
        wait_serving(proc)
        async with aiomqtt.Client(own_broker.host, own_broker.port) as c:
            for who, body in (
                ("bad-1", {"client_id": "x"}),
                ("bad-2", {"turns": "many", "ts": "x"}),
            ):
                topic = f"{prefix}/_worker/{who}/stats"
                await c.publish(topic, msgpack.packb(body), qos=1, retain=True)
        tall = {"width": 1280, "height": 2100}  # the screenshot needs no scrolling
        page = await open_page(browser, own_broker, f"?prefix={prefix}", viewport=tall)
        bad = page.locator('.card[data-client-id="bad-1"]')
        await expect(bad.locator('[data-field="turns"]')).to_have_text("?")
        await expect(bad.locator('[data-gauge="bytes"] .value')).to_have_text("?")
        await expect(
            page.locator('.card[data-client-id="bad-2"] [data-field="turns"]')
        ).to_have_text("?")
        async with device(own_broker.host, own_broker.port, prefix) as d:
            await d.request("kiosk-7", "append", {"role": "user", "content": "hello"})
        card = page.locator(f'.card[data-client-id="{cid}"]')
        await expect(card.locator('[data-field="turns"]')).to_have_text(re.compile(r"^1 \(at most"))
        await page.fill("#inspector input[name=convo]", "kiosk-7")
        await page.click("#inspector button")
        await expect(page.locator("#inspector-turns li")).to_contain_text("hello")
        await shot(page, "11-malformed-stats")
    finally:
        reap(proc)


async def test_a_prefix_no_worker_can_have_is_said(browser: Browser, own_broker: Mosquitto) -> None:
    """?prefix= with a wildcard is said to be wrong: the broker ended the connection of the
    page's subscription to it, and the page reconnected for ever, saying the broker did not
    answer."""
    assert own_broker.ws_port is not None
    wait_port(own_broker.ws_port)
    page = await browser.new_page()
    await page.goto(f"http://127.0.0.1:{own_broker.ws_port}/?prefix=a/%23")
    conn = page.locator("#conn")
    await expect(conn).to_have_text(
        "not connected: ?prefix=a/# has a wildcard or a control character; give the worker's"
        " --prefix",
        timeout=WAIT_MS,
    )
    await shot(page, "12-bad-prefix")


async def test_a_stopped_worker_is_said_to_be_offline_and_asked_nothing(
    browser: Browser, own_broker: Mosquitto
) -> None:
    """A page opened after the only worker stopped: its card said charts would start with the
    next stats message, and the inspector's unanswered question blamed the broker's ACL."""
    prefix, cid = unique("mem"), unique("stopped-")
    cfg = make_config(own_broker, prefix=prefix, client_id=cid, stats_interval=3600)
    async with running(cfg):
        pass
    # tall enough that the screenshot needs no scrolling (the header stays on top)
    tall = {"width": 1280, "height": 1000}
    page = await open_page(browser, own_broker, f"?prefix={prefix}", viewport=tall)
    card = page.locator(f'.card[data-client-id="{cid}"]')
    await expect(card).to_have_attribute("data-state", "offline")
    await expect(card.locator(".no-charts")).to_have_text(
        "Offline: no stats are coming. Charts start when it is back."
    )
    await page.fill("#inspector input[name=convo]", "kiosk-7")
    await page.click("#inspector button")
    status = page.locator("#inspector-status")
    await expect(status).to_have_attribute("data-state", "error", timeout=WAIT_MS)
    await expect(status).to_have_text(
        f'No reply within 5 s: no worker of prefix "{prefix}" is online (Workers above).'
    )
    await shot(page, "13-only-worker-offline")


async def test_a_worker_online_but_silent_is_flagged(
    browser: Browser, own_broker: Mosquitto
) -> None:
    """A retained "online" whose worker sends no stats any more (a broker restarted from a
    saved "online", so the Last Will never came) is flagged on its card, not shown as live;
    one whose stats are old only by less than 3 of its own --stats-interval is not."""
    prefix = unique("mem")
    ghost, slow = unique("ghost-"), unique("slow-")
    await _online(own_broker, prefix, ghost, age=600, interval=10.0)
    await _online(own_broker, prefix, slow, age=40, interval=60.0)
    page = await open_page(browser, own_broker, f"?prefix={prefix}")
    card = page.locator(f'.card[data-client-id="{ghost}"]')
    await expect(card).to_have_attribute("data-state", "online")
    await expect(card).to_have_attribute("data-silent", "true")
    await expect(card.locator('[data-field="age"]')).to_contain_text("silent, gone or cut off?")
    await expect(card.locator('[data-field="uptime"]')).to_have_text("unknown")
    live = page.locator(f'.card[data-client-id="{slow}"]')
    await expect(live).to_have_attribute("data-silent", "false")
    await expect(live.locator('[data-field="age"]')).not_to_contain_text("silent")
    await shot(page, "9-silent-worker")


async def test_a_worker_whose_clock_is_behind_is_not_flagged_silent(
    browser: Browser, own_broker: Mosquitto
) -> None:
    """Stats that arrive as they are published are new, whatever the worker's clock says: a
    Pi without a clock of its own runs an hour or a year behind until it reaches a time server,
    and its card read "1 h ago: silent, gone or cut off?" while it served. A retained copy
    replayed on opening the page is still judged by the worker's clock."""
    prefix = unique("mem")
    pi = unique("pi-")
    page = await open_page(browser, own_broker, f"?prefix={prefix}")
    await _online(own_broker, prefix, pi, age=3600, interval=10.0)
    card = page.locator(f'.card[data-client-id="{pi}"]')
    await expect(card).to_have_attribute("data-state", "online")
    await expect(card.locator('[data-field="age"]')).to_have_text(re.compile(r"^\d+ s ago$"))
    await expect(card).to_have_attribute("data-silent", "false")
    await shot(page, "10-worker-clock-behind")
    await page.reload()
    await expect(card.locator('[data-field="age"]')).to_contain_text("silent, gone or cut off?")


async def _online(broker: Mosquitto, prefix: str, cid: str, *, age: float, interval: float) -> None:
    """Publish a worker's retained "online" status and stats, `age` seconds old by their ts."""
    import time

    import aiomqtt

    from worker.protocol import Stats, encode, stats_payload, status_payload
    from worker.store import Limits

    at = time.time() - age
    status = status_payload(
        "online", version="0", client_id=cid, prefix=prefix, backend="memory", pid=1, ts=at
    )
    stats = stats_payload(
        Stats(started=time.monotonic()),
        _Counts(),
        Limits(),
        client_id=cid,
        version="0",
        backend="memory",
        now=time.monotonic(),
        ts=at,
        interval=interval,
    )
    base = f"{prefix}/_worker/{cid}"
    async with aiomqtt.Client(broker.host, broker.port) as publisher:
        await publisher.publish(f"{base}/status", encode(status, "msgpack"), qos=1, retain=True)
        await publisher.publish(f"{base}/stats", encode(stats, "msgpack"), qos=1, retain=True)


class _Counts:
    conversations = turns = bytes = keys = 0
