"""MqttChatMessageHistory: LangChain's chat-history interface on the worker (needs the
optional langchain extra; skipped where langchain-core is not installed)."""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

pytest.importorskip("langchain_core")

from langchain_core.messages import AIMessage, BaseMessage, ChatMessage, HumanMessage, SystemMessage

from tests.conftest import unique
from tests.processes import Mosquitto
from worker.client import open_blocking_memory
from worker.langchain import MqttChatMessageHistory
from worker.service import Service


def _conversation(url: str, session: str) -> tuple[list[BaseMessage], list[BaseMessage]]:
    history = MqttChatMessageHistory(session, url=url)
    try:
        history.add_messages(
            [
                SystemMessage("be brief"),
                HumanMessage("hi"),
                AIMessage("hello"),
                ChatMessage(role="tool", content="42"),
            ]
        )
        seen = list(history.messages)
        history.clear()
        return seen, list(history.messages)
    finally:
        history.close()


EXPECTED = [SystemMessage("be brief"), HumanMessage("hi"), AIMessage("hello")]


async def test_sync_history_over_the_worker(broker: Mosquitto, worker: Service) -> None:
    """Messages come back as the same LangChain types, in order; clear forgets them."""
    url = f"mqtt://{broker.host}:{broker.port}/{worker.cfg.prefix}"
    seen, after = await asyncio.to_thread(_conversation, url, unique("s"))
    assert seen[:3] == EXPECTED
    assert seen[3] == ChatMessage(role="tool", content="42")
    assert after == []


async def test_async_history_over_the_worker(broker: Mosquitto, worker: Service) -> None:
    """The async methods give the same answers without blocking the caller's loop."""
    url = f"mqtt://{broker.host}:{broker.port}/{worker.cfg.prefix}"
    history = await asyncio.to_thread(MqttChatMessageHistory, unique("s"), url)
    try:
        await history.aadd_messages(EXPECTED)
        assert await history.aget_messages() == EXPECTED
        await history.aclear()
        assert await history.aget_messages() == []
    finally:
        await asyncio.to_thread(history.close)


async def test_a_history_without_url_reads_the_environment_when_made(
    broker: Mosquitto, worker: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MEMORY_WORKER_HOST, _PORT and _PREFIX (what `scripts/run --own-broker` says to
    export) are read when a history is made: they were read once, when the module was
    imported, so setting them later was ignored."""
    monkeypatch.setenv("MEMORY_WORKER_HOST", broker.host)
    monkeypatch.setenv("MEMORY_WORKER_PORT", str(broker.port))
    monkeypatch.setenv("MEMORY_WORKER_PREFIX", worker.cfg.prefix)
    history = await asyncio.to_thread(MqttChatMessageHistory, unique("s"))
    try:
        await history.aadd_messages(EXPECTED)
        assert await history.aget_messages() == EXPECTED
    finally:
        await asyncio.to_thread(history.close)


def test_history_in_process_is_bounded() -> None:
    """With memory:// the history keeps the worker's bounds: max_turns=2 keeps the last two."""
    history = MqttChatMessageHistory("s", url="memory://?max_turns=2")
    try:
        history.add_user_message("one")
        history.add_ai_message("two")
        history.add_user_message("three")
        assert history.messages == [AIMessage("two"), HumanMessage("three")]
    finally:
        history.close()


async def test_an_adapter_takes_a_blocking_client_and_not_a_url_beside_it() -> None:
    """The async client (what an async app holds) failed at the first read with an
    AttributeError on a coroutine; a url beside a client was dropped without a word."""
    from worker.client import MemoryClient

    wrong = MemoryClient("127.0.0.1")
    with pytest.raises(TypeError, match=r"client must be a BlockingMemoryClient \(.* MemoryClient"):
        MqttChatMessageHistory("s", client=wrong)  # type: ignore[arg-type]
    with (
        open_blocking_memory("memory://") as client,
        pytest.raises(TypeError, match="give url or client, not both"),
    ):
        MqttChatMessageHistory("s", url="mqtt://127.0.0.1/mem", client=client)


def test_a_summary_comes_first_and_the_budget_holds() -> None:
    """With a summary, messages start with a SystemMessage holding it; max_tokens keeps the
    newest messages that fit with it; summary=False leaves it out."""
    history = MqttChatMessageHistory("s", url="memory://?max_turns=10", max_tokens=5)
    try:
        for text in ("aaaa", "bbbbbbbb", "cccc", "dddd"):  # 1, 2, 1, 1 tokens
            history.add_user_message(text)
        history.client.summarize("s", "they said a", upto=1, base=0, tokens=2)
        assert history.messages == [
            SystemMessage("they said a"),
            HumanMessage("cccc"),
            HumanMessage("dddd"),
        ]
        plain = MqttChatMessageHistory("s", client=history.client, summary=False, max_tokens=3)
        assert plain.messages == [HumanMessage("cccc"), HumanMessage("dddd")]
    finally:
        history.close()


async def test_the_summary_comes_as_the_message_asked_for_and_not_empty() -> None:
    """A chat template that takes one system message, first (llama.cpp's, Anthropic's),
    refused a prompt's own system message followed by the summary's: summary_message_cls
    (LangChain's summary memories' name) makes it another kind. An empty summary (one
    saved by hand) is no message at all."""
    with open_blocking_memory("memory://") as client:
        for text in ("one", "two"):
            client.append("s", "user", text)
        client.summarize("s", "they counted", upto=1, base=0)
        human = MqttChatMessageHistory("s", client=client, summary_message_cls=HumanMessage)
        assert human.messages == [HumanMessage("they counted"), HumanMessage("two")]
        assert await human.aget_messages() == human.messages
        client.summarize("s", "", upto=2, base=1)
        assert MqttChatMessageHistory("s", client=client).messages == []


async def test_async_messages_carry_the_summary_too() -> None:
    """aget_messages gives what messages gives."""
    history = await asyncio.to_thread(MqttChatMessageHistory, "s", "memory://")
    try:
        await history.aadd_messages([HumanMessage("one"), AIMessage("two")])
        await history.client.run(history.client.memory.summarize("s", "one", 1, 0))
        assert await history.aget_messages() == [SystemMessage("one"), AIMessage("two")]
    finally:
        await asyncio.to_thread(history.close)


def test_the_old_address_has_both_adapters() -> None:
    """`worker.langchain` (the README's old address) gives the byte store too."""
    import worker.client.langchain as new
    import worker.langchain as old

    assert old.MqttByteStore is new.MqttByteStore
    assert old.MqttChatMessageHistory is new.MqttChatMessageHistory


def _chat_turns(
    url: str, session: str, turns: int, *, aio: bool = False
) -> tuple[int, int, list[BaseMessage]]:
    from langchain_core.language_models.fake_chat_models import FakeListChatModel
    from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder
    from langchain_core.runnables.history import RunnableWithMessageHistory

    prompt = ChatPromptTemplate.from_messages(
        [MessagesPlaceholder("history"), ("human", "{question}")]
    )
    model = FakeListChatModel(responses=[f"answer {n}" for n in range(turns)])
    chain = RunnableWithMessageHistory(
        prompt | model,
        lambda session_id: MqttChatMessageHistory(
            session_id, url=url + ("?timeout=60" if aio else "")
        ),
        input_messages_key="question",
        history_messages_key="history",
    )
    config: Any = {"configurable": {"session_id": session}}

    def grown_after(call: Callable[[int], object]) -> tuple[int, int]:
        call(0)
        gc.collect()  # the first call's history, if it waits for a cycle collection
        threads, fds = set(threading.enumerate()), len(os.listdir("/proc/self/fd"))
        for n in range(1, turns):
            call(n)
        gc.collect()
        # A closed client's executor threads end on their own, just after its close: until
        # they have ended (a leaked one never does), not a fixed wait.
        new = [t for t in threading.enumerate() if t not in threads]
        deadline = time.monotonic() + 10
        for thread in new:
            thread.join(max(0.0, deadline - time.monotonic()))
        return sum(t.is_alive() for t in new), len(os.listdir("/proc/self/fd")) - fds

    if aio:
        # A server's event loop, running throughout: what it holds (a timer) stays held
        # while the threads are counted, for the client's timeout (a minute here).
        loop = asyncio.new_event_loop()
        server = threading.Thread(target=loop.run_forever, daemon=True)
        server.start()
        try:
            grown = grown_after(
                lambda n: asyncio.run_coroutine_threadsafe(
                    chain.ainvoke({"question": f"q {n}"}, config), loop
                ).result()
            )
        finally:
            loop.call_soon_threadsafe(loop.stop)
            server.join()
            loop.close()
    else:
        grown = grown_after(lambda n: chain.invoke({"question": f"q {n}"}, config))
    history = MqttChatMessageHistory(session, url=url)
    try:
        return *grown, history.messages
    finally:
        history.close()


# Deprecated in langchain-core 1.0 for LangGraph's persistence, still in wide use.
@pytest.mark.filterwarnings("ignore:RunnableWithMessageHistory is deprecated")
@pytest.mark.parametrize("aio", [False, True], ids=["invoke", "ainvoke"])
async def test_a_history_made_per_call_and_dropped_leaves_no_connection(
    broker: Mosquitto, worker: Service, aio: bool
) -> None:
    """RunnableWithMessageHistory makes a history per call and never closes it: the
    history's own client closes when the history is collected, so threads and sockets do
    not pile up call after call, and every turn is kept. Also with ainvoke: the client's
    timer captured LangChain's context, which holds the history, for its timeout."""
    url = f"mqtt://{broker.host}:{broker.port}/{worker.cfg.prefix}"
    threads, fds, messages = await asyncio.to_thread(_chat_turns, url, unique("s"), 30, aio=aio)
    assert threads <= 0, threads
    assert fds <= 2, fds
    assert [m.content for m in messages[-4:]] == ["q 28", "answer 28", "q 29", "answer 29"]


def test_tool_calls_and_their_answers_come_back_whole() -> None:
    """An agent's turn that calls a tool, the tool's answer (its tool_call_id) and content
    made of parts come back as LangChain made them: without them the next model call is
    refused (a tool message must answer a preceding message's tool call)."""
    from langchain_core.messages import ToolMessage

    sent: list[BaseMessage] = [
        HumanMessage("weather in Oslo?"),
        AIMessage(
            "",
            tool_calls=[
                {"name": "weather", "args": {"city": "Oslo"}, "id": "call_1", "type": "tool_call"}
            ],
        ),
        ToolMessage("4 °C, rain", tool_call_id="call_1", name="weather"),
        HumanMessage(content=[{"type": "text", "text": "and tomorrow?"}]),
        AIMessage(  # content of no parts, as some models answer a call
            content=[],
            tool_calls=[
                {"name": "weather", "args": {"day": "+1"}, "id": "call_2", "type": "tool_call"}
            ],
        ),
        ToolMessage("dry", tool_call_id="call_2", name="weather"),
        AIMessage("dry"),
    ]
    history = MqttChatMessageHistory(unique("s"), url="memory://?max_turns=10")
    try:
        history.add_messages(sent)
        got = history.messages
        roles = [t["role"] for t in history.client.get(history.session_id)]
    finally:
        history.close()
    assert got == sent
    assert roles[0] == "user"
    assert roles[-1] == "assistant"  # plain messages keep the roles devices read


def test_a_streamed_answer_is_stored_as_the_assistant() -> None:
    """A streamed answer's chunks (AIMessageChunk, ...) are stored under the devices' roles
    and come back as plain messages (they were stored as role 'AIMessageChunk')."""
    from langchain_core.messages import AIMessageChunk, HumanMessageChunk

    history = MqttChatMessageHistory(unique("s"), url="memory://")
    try:
        chunks = [AIMessageChunk(content="Hel"), AIMessageChunk(content="lo")]
        history.add_messages([HumanMessageChunk(content="hi"), chunks[0] + chunks[1]])
        roles = [t["role"] for t in history.client.get(history.session_id)]
        got = history.messages
    finally:
        history.close()
    assert roles == ["user", "assistant"]
    assert [(type(m), m.content) for m in got] == [(HumanMessage, "hi"), (AIMessage, "Hello")]


def test_a_window_does_not_start_with_a_tool_answer_to_no_call() -> None:
    """`max_tokens` (or --max-turns) can cut a window between a tool call and its answers:
    the answers it starts with are left out of `messages` (a model refuses them)."""
    from langchain_core.messages import ToolMessage

    call = {"name": "weather", "args": {"note": "y" * 400}, "id": "call1", "type": "tool_call"}
    history = MqttChatMessageHistory(unique("s"), url="memory://", max_tokens=60)
    try:
        history.add_messages(
            [
                HumanMessage("hi"),
                AIMessage("", tool_calls=[call]),
                ToolMessage("sunny", tool_call_id="call1"),
            ]
        )
        assert len(history.client.get(history.session_id, None, 60)) == 1  # the answer alone
        got = history.messages
    finally:
        history.close()
    assert got == []
