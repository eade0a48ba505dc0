"""The client's model context: tokens on append, budgets on get, `context` and `summarize`,
the same over a worker (MQTT 5 and 3.1.1) and in this process (memory://)."""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import unique
from tests.test_client import memory  # noqa: F401 - the fixture, over every transport
from worker.client import (
    BadRequestError,
    ConflictError,
    Memory,
    open_blocking_memory,
)


async def test_context_is_the_summary_and_the_turns_that_fit(memory: Memory) -> None:  # noqa: F811
    """context(max_tokens) returns the summary counted first and the newest whole turns that
    fit; get(max_tokens) the turns alone, without the summary."""
    convo = unique("c")
    for tokens in (100, 200, 300, 400):
        await memory.append(convo, "user", "x", tokens=tokens)
    saved = await memory.summarize(convo, "a greeting", upto=1, base=0, tokens=50)
    assert (saved.upto, saved.dropped) == (1, 1)
    ctx = await memory.context(convo, 800)
    assert ctx.summary == {"text": "a greeting", "upto": 1, "tokens": 50}
    assert [(t["seq"], t["tokens"]) for t in ctx.turns] == [(3, 300), (4, 400)]
    assert ctx.tokens == 750
    assert [t["seq"] for t in await memory.get(convo, max_tokens=800)] == [3, 4]
    assert [t["seq"] for t in await memory.get(convo, max_tokens=900)] == [2, 3, 4]
    whole = await memory.context(convo)
    assert (len(whole.turns), whole.tokens) == (3, 950)
    empty = await memory.context(unique("never"), 100)
    assert (empty.summary, empty.turns, empty.tokens) == (None, [], 0)


async def test_a_stale_summary_raises_conflict_with_the_current_upto(
    memory: Memory,  # noqa: F811
) -> None:
    """summarize with a base that is no longer current raises ConflictError carrying upto."""
    convo = unique("c")
    for _ in range(3):
        await memory.append(convo, "user", "hi")
    await memory.summarize(convo, "one", 1, 0)
    with pytest.raises(ConflictError) as caught:
        await memory.summarize(convo, "two", 2, 0)
    assert (caught.value.code, caught.value.upto, caught.value.seq) == ("conflict", 1, 3)
    with pytest.raises(BadRequestError):
        await memory.append(convo, "user", "x", tokens=-1)
    with pytest.raises(ConflictError):
        await memory.summarize(unique("gone"), "x", 1, 0)


async def test_the_blocking_client_speaks_context_too() -> None:
    """The blocking client has context and summarize, with the same answers."""

    def run() -> None:
        with open_blocking_memory("memory://?max_turns=10") as store:
            store.append("c", "user", "one two", tokens=2)
            store.append("c", "user", "three", tokens=1)
            store.summarize("c", "counting", 1, 0, tokens=1)
            ctx = store.context("c", 2)
            assert ctx.summary == {"text": "counting", "upto": 1, "tokens": 1}
            assert [t["content"] for t in ctx.turns] == ["three"]
            assert store.get("c", max_tokens=1) == ctx.turns

    await asyncio.to_thread(run)
