"""The status and stats payloads match their schemas, built without a broker."""

from __future__ import annotations

import jsonschema
import pytest

from tests.clients import check
from worker import constants as c
from worker.backends.base import Counts
from worker.protocol import Stats, decode_event, encode, stats_payload, status_payload
from worker.store import Limits


def _stats(stats: Stats) -> dict[str, object]:
    return stats_payload(
        stats,
        Counts(conversations=3, turns=7, bytes=1234, keys=2),
        Limits(ttl=0.0),
        client_id="w1",
        version="1.2.3",
        backend="memory",
        now=stats.started + 12.3456,
        ts=1_700_000_000.5,
        interval=10.0,
    )


@pytest.mark.parametrize("state", ["online", "offline"])
@pytest.mark.parametrize("fmt", c.EVENT_FORMATS)
def test_status_matches_its_schema(state: str, fmt: str) -> None:
    """Both states, in both event formats, decode to a status that matches schemas/status.json."""
    body = status_payload(
        state, version="1.2.3", client_id="w1", prefix="mem", backend="memory", pid=42, ts=1.5
    )
    decoded = decode_event(encode(body, fmt), None)
    check("status", decoded)
    assert decoded == body


@pytest.mark.parametrize("fmt", c.EVENT_FORMATS)
def test_stats_match_their_schema(fmt: str) -> None:
    """Counters, counts and limits decode to stats that match schemas/stats.json."""
    stats = Stats(started=100.0, requests=9, ignored_retained=1, taken_over=2)
    stats.errors["bad_payload"] += 2
    stats.refused["bad_route"] += 1
    for reason in c.REASONS:
        stats.evictions[reason] += 1
    decoded = decode_event(encode(_stats(stats), fmt), None)
    check("stats", decoded)
    assert decoded["uptime"] == 12.346
    assert decoded["limits"]["ttl"] == 0
    assert decoded["evictions"] == dict.fromkeys(c.REASONS, 1)


def test_fresh_stats_match_their_schema() -> None:
    """A worker that has served nothing yet reports empty counters that still match."""
    body = _stats(Stats(started=0.0))
    check("stats", body)
    assert body["errors"] == body["refused"] == body["evictions"] == {}


def test_the_schema_refuses_an_unknown_eviction_reason() -> None:
    """The stats schema is strict where it promises to be: eviction reasons are enumerated."""
    stats = Stats(started=0.0)
    stats.evictions["gone"] += 1
    with pytest.raises(jsonschema.ValidationError):
        check("stats", _stats(stats))
