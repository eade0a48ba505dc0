"""Context for the model over the wire: tokens, budgets, summaries and trimmed events, with a
real worker on a real Mosquitto, from MQTT 5 and MQTT 3.1.1 devices."""

from __future__ import annotations

import json

from tests.clients import Device, check, decode, device, next_message, watcher
from tests.conftest import WorkerFactory
from tests.processes import Mosquitto


async def test_a_device_asks_for_what_fits_its_model(dev: Device) -> None:
    """append takes tokens, get's max_tokens returns the newest whole turns that fit, with
    the summary first and the total in tokens."""
    for i, tokens in enumerate([400, 300, 500, 200, 600]):
        await dev.request("kiosk", "append", {"role": "user", "content": f"t{i}", "tokens": tokens})
    await dev.request("kiosk", "append", {"role": "assistant", "content": "x" * 10})  # ~3
    saved = await dev.request("kiosk", "summary", {"text": "they met", "upto": 2, "base": 0})
    assert saved == {"ok": True, "upto": 2, "dropped": 2}
    reply = await dev.request("kiosk", "get", {"max_tokens": 1000})
    assert reply["summary"] == {"text": "they met", "upto": 2, "tokens": 2}
    assert [(t["seq"], t["tokens"]) for t in reply["turns"]] == [(4, 200), (5, 600), (6, 3)]
    assert reply["tokens"] == 2 + 200 + 600 + 3
    plain = await dev.request("kiosk", "get", {"summary": False, "last": 2})
    assert "summary" not in plain
    assert plain["tokens"] == 603


async def test_a_stale_summary_is_a_conflict_with_the_current_upto(dev: Device) -> None:
    """A summary whose base is not the current upto is refused with conflict, upto and seq."""
    for _ in range(3):
        await dev.request("c", "append", {"role": "user", "content": "hi"})
    await dev.request("c", "summary", {"text": "s", "upto": 1, "base": 0})
    reply = await dev.request("c", "summary", {"text": "s2", "upto": 2, "base": 0, "id": 7})
    born = reply["error"].pop("born")
    assert isinstance(born, int)
    assert born > 0
    assert reply == {
        "ok": False,
        "id": 7,
        "error": {
            "code": "conflict",
            "message": "the summary's upto is 1, not base 0",
            "upto": 1,
            "seq": 3,
        },
    }
    again = {"text": "s2", "upto": 2, "base": 1, "born": born + 1}
    assert (await dev.request("c", "summary", again))["error"]["code"] == "conflict"
    again["born"] = born
    assert (await dev.request("c", "summary", again))["ok"]
    bad = await dev.request("c", "summary", {"text": "s", "upto": 0, "base": 0})
    assert bad["error"]["code"] == "bad_request"
    bad = await dev.request("c", "get", {"max_tokens": 0})
    assert bad["error"]["code"] == "bad_request"
    bad = await dev.request("c", "append", {"role": "u", "content": "x", "tokens": 1_000_001})
    assert bad["error"]["code"] == "bad_request"


async def test_trimmed_turns_are_announced_for_a_summarizer(
    broker: Mosquitto, worker_factory: WorkerFactory
) -> None:
    """With --trimmed-events each turn past the window goes out once on P/<convo>/trimmed,
    QoS 1, not retained, with the summary's upto; the stats count them and the summaries."""
    async with (
        worker_factory(max_turns=2, trimmed_events=True) as w,
        device(broker.host, broker.port, w.cfg.prefix, v5=False) as d,
        watcher(broker.host, broker.port, f"{w.cfg.prefix}/+/trimmed") as events,
    ):
        for i in range(3):
            await d.request("c", "append", {"role": "user", "content": f"m{i}", "tokens": i})
        msg = await next_message(events)
        assert msg.topic.value == f"{w.cfg.prefix}/c/trimmed"
        assert (msg.qos, msg.retain) == (1, False)
        ev = decode(msg)
        check("trimmed.event", ev)
        assert ev["convo"] == "c"
        assert ev["summary_upto"] == 0
        assert [(t["seq"], t["content"], t["tokens"]) for t in ev["turns"]] == [(1, "m0", 0)]
        await d.request("c", "summary", {"text": "m0", "upto": 1, "base": 0})
        await d.request("c", "append", {"role": "user", "content": "m3"})
        ev = decode(await next_message(events))
        assert ([t["seq"] for t in ev["turns"]], ev["summary_upto"]) == ([2], 1)
        assert (w.stats.trimmed, w.stats.summaries) == (2, 1)
        assert w.stats_body()["trimmed"] == 2
        await d.request("c", "delete")
        await d.request("c", "get")
        assert events.empty()


async def test_json_events_carry_the_trimmed_turns(
    broker: Mosquitto, worker_factory: WorkerFactory
) -> None:
    """Under --event-format json a trimmed event is the same fields as UTF-8 JSON."""
    async with (
        worker_factory(max_turns=1, trimmed_events=True, event_format="json") as w,
        device(broker.host, broker.port, w.cfg.prefix) as d,
        watcher(broker.host, broker.port, f"{w.cfg.prefix}/+/trimmed") as events,
    ):
        await d.request("c", "append", {"role": "user", "content": "é"})
        await d.request("c", "append", {"role": "user", "content": "b"})
        msg = await next_message(events)
        ev = json.loads(msg.payload)
        check("trimmed.event", ev)
        assert [(t["content"], t["tokens"]) for t in ev["turns"]] == [("é", 1)]
        assert ev["convo"] == "c"
