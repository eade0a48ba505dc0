"""Trimmed turns on the secured broker of deploy/: only the summarizer role reads them, and a
device may save a summary only for its own conversation."""

from __future__ import annotations

import asyncio

import msgpack

from tests.clients import props
from tests.conftest import running
from tests.fake_llm import fake_model
from tests.processes import Mosquitto
from tests.test_security import (  # noqa: F401 - `secured` is the module's broker fixture
    add_user,
    ask,
    login,
    refused,
    secured,
    worker_config,
)
from worker.store import Limits
from worker.summarizer import Summarizer, SummarizerConfig


async def test_only_the_summarizer_reads_trimmed_turns(secured: Mosquitto) -> None:  # noqa: F811
    """The summarizer user folds a device's trimmed turns under the ACLs; the dashboard and
    the devices are refused the trimmed topics, and a device cannot summarize another's
    conversation nor fake a trimmed event."""
    done = add_user(secured.work, "summarizer", "s-secret")  # type: ignore[attr-defined]
    assert done.returncode == 0, done.stderr
    assert "role summarizer" in done.stdout
    with fake_model() as model:
        cfg = SummarizerConfig(
            host=secured.host,
            port=secured.port,
            username="summarizer",
            password="s-secret",
            llm_url=model.url,
            retry_max=0.2,
        )
        summarizer = Summarizer(cfg)
        stop = asyncio.Event()
        async with (
            running(worker_config(secured, limits=Limits(max_turns=1, trimmed_events=True))) as w,
            login(secured, "kiosk-a") as a,
            login(secured, "kiosk-b") as b,
            login(secured, "dashboard") as dash,
        ):
            task = asyncio.create_task(summarizer.run(stop))
            await asyncio.wait_for(summarizer.connected.wait(), 10)
            for who in (dash, a):
                assert refused(
                    await who.subscribe([("mem/+/trimmed", 1), ("$share/x/mem/+/trimmed", 1)])
                )
            assert refused(await a.subscribe([("mem/kiosk-a/trimmed", 1)]))
            await a.subscribe("reply/kiosk-a/r", qos=1)  # not the summarizer's replies
            await b.subscribe("reply/kiosk-b/#", qos=1)
            await b.publish("mem/kiosk-a/trimmed", msgpack.packb({"convo": "kiosk-a"}), qos=1)
            await b.publish(
                "mem/kiosk-a/summary",
                msgpack.packb({"text": "b was here", "upto": 1, "base": 0}),
                qos=1,
                properties=props(ResponseTopic="reply/kiosk-b/r"),
            )
            for text in ("one", "two", "three"):
                body = {"role": "user", "content": text}
                assert (await ask(a, "kiosk-a", "append", body, "reply/kiosk-a/r"))["ok"]
            await asyncio.wait_for(summarizer.wait_acknowledged(2), 15)
            reply = await ask(a, "kiosk-a", "get", {}, "reply/kiosk-a/r")
            assert reply["summary"] == {"text": "one two", "upto": 2, "tokens": 2}
            assert model.seen == ["one", "two"]
            # b's summary and fake event were refused by the broker: the worker answered no
            # conflict, and the summarizer was handed only the two real events
            assert w.stats.errors.get("conflict", 0) == 0
            assert summarizer.acknowledged == 2
            own = {"text": "mine", "upto": 3, "base": 2}
            assert (await ask(a, "kiosk-a", "summary", own, "reply/kiosk-a/r"))["ok"]
            stop.set()
            await asyncio.wait_for(task, 15)
