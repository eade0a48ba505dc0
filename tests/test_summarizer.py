"""memory-summarizer against a real worker and broker, with the chat-completions stand-in:
whatever fails (the model, the summarizer, the broker), every trimmed turn ends up in the
saved summary exactly once, in order."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import aiomqtt
import msgpack
import pytest

from tests.clients import Device, device, watcher
from tests.conftest import WorkerFactory, program, reap, unique
from tests.fake_llm import FakeModel, fake_model
from tests.processes import REPO, Mosquitto, free_port
from worker import summarizer
from worker.errors import ConfigError
from worker.llm import ChatModel, Folded, ModelError, parse_completion
from worker.summarizer import Summarizer, SummarizerConfig, from_args

Replies = asyncio.Queue[aiomqtt.Message]


@pytest.fixture
def model() -> Any:
    with fake_model() as m:
        yield m


def _config(broker: Mosquitto, prefix: str, model: FakeModel, **kw: Any) -> SummarizerConfig:
    fields: dict[str, Any] = {
        "host": broker.host,
        "port": broker.port,
        "prefix": prefix,
        "client_id": unique("summarizer-"),
        "llm_url": model.url,
        "retry_max": 0.2,
        "reconnect_max": 0.5,
        **kw,
    }
    return SummarizerConfig(**fields)


@contextlib.asynccontextmanager
async def summarizing(cfg: SummarizerConfig) -> AsyncIterator[Summarizer]:
    """A summarizer served from this event loop, subscribed before the block starts."""
    s = Summarizer(cfg)
    stop = asyncio.Event()
    task = asyncio.create_task(s.run(stop))
    await asyncio.wait_for(s.connected.wait(), 10)
    try:
        yield s
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


async def talk(d: Device, convo: str, first: int, last: int) -> None:
    for i in range(first, last + 1):
        assert (await d.request(convo, "append", {"role": "user", "content": f"t{i}"}))["ok"]


async def summary_upto(d: Device, replies: Replies, convo: str, upto: int) -> list[str]:
    """The summary's words once it covers `upto`: read, then wait for the next saved one."""
    while True:
        reply = await d.request(convo, "get", {"last": 1})
        if reply.get("summary", {}).get("upto", 0) >= upto:
            words: list[str] = reply["summary"]["text"].split()
            return words
        await asyncio.wait_for(replies.get(), 30)


def words(first: int, last: int) -> list[str]:
    return [f"t{i}" for i in range(first, last + 1)]


async def test_trimmed_turns_are_folded_into_the_summary(
    broker: Mosquitto, worker_factory: WorkerFactory, model: FakeModel
) -> None:
    """Each turn past the window reaches the summary once, in order; a get then returns the
    summary and the window, none of the folded turns twice."""
    async with (
        worker_factory(max_turns=2, trimmed_events=True) as w,
        summarizing(_config(broker, w.cfg.prefix, model)) as s,
        device(broker.host, broker.port, w.cfg.prefix, v5=False) as d,
        watcher(broker.host, broker.port, "reply/+/_summarizer/#") as replies,
    ):
        await talk(d, "kiosk", 1, 12)
        assert await summary_upto(d, replies, "kiosk", 10) == words(1, 10)
        reply = await d.request("kiosk", "get", {"max_tokens": 1000})
        assert [t["content"] for t in reply["turns"]] == ["t11", "t12"]
        assert reply["summary"]["upto"] == 10
        assert model.seen == words(1, 10)  # each turn asked once: several per call at times
        assert 1 <= s.folds == w.stats.summaries <= 10


async def test_a_model_that_is_down_or_answers_garbage_loses_nothing(
    broker: Mosquitto,
    worker_factory: WorkerFactory,
    model: FakeModel,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """While the model fails the events wait; each failure is logged once per conversation
    while it lasts, and another failure after it too (only the first was: a model that went
    from 500s to garbage still looked down); once it answers, every trimmed turn is
    folded."""
    async with (
        worker_factory(max_turns=2, trimmed_events=True) as w,
        summarizing(_config(broker, w.cfg.prefix, model)),
        device(broker.host, broker.port, w.cfg.prefix) as d,
        watcher(broker.host, broker.port, "reply/+/_summarizer/#") as replies,
    ):
        model.set_mode("down")
        await talk(d, "c", 1, 5)
        await model.wait_calls(3)
        model.set_mode("garbage")
        await model.wait_calls(model.calls + 3)
        model.set_mode("ok")
        assert await summary_upto(d, replies, "c", 3) == words(1, 3)
    failures = [r for r in caplog.records if "the model failed" in r.getMessage()]
    assert len(failures) == 2
    assert "answered 503" in failures[0].getMessage()
    assert "not a chat completion" in failures[1].getMessage()
    assert {r.levelno for r in failures} == {logging.WARNING}


async def test_a_backlog_after_an_outage_is_one_model_call(
    broker: Mosquitto, worker_factory: WorkerFactory, model: FakeModel
) -> None:
    """The turns trimmed while the model was down go to it in one call once it is back: the
    fold that failed first went on retrying its own turn alone, and the rest took a second
    call (a new-user trial counted two)."""
    async with (
        worker_factory(max_turns=2, trimmed_events=True) as w,
        summarizing(_config(broker, w.cfg.prefix, model)) as s,
        device(broker.host, broker.port, w.cfg.prefix) as d,
        watcher(broker.host, broker.port, "reply/+/_summarizer/#") as replies,
    ):
        model.set_mode("down")
        await talk(d, "c", 1, 6)
        await s.wait_received(4)  # turns 1-4, trimmed one by one
        await model.wait_calls(model.calls + 1)  # a try that failed after they all came
        model.set_mode("ok")
        assert await summary_upto(d, replies, "c", 4) == words(1, 4)
        assert s.folds == 1


@pytest.mark.parametrize("proxy", [False, True], ids=["timeout", "gateway-504"])
async def test_a_backlog_too_slow_to_fold_at_once_is_folded_in_parts(
    broker: Mosquitto, worker_factory: WorkerFactory, model: FakeModel, proxy: bool
) -> None:
    """A model that cannot fold the whole backlog within --llm-timeout (here: more than two
    turns at once) gets smaller parts, each saved: every turn reaches the summary once, in
    order. The same too-long call went out again and again, and the summary stood still.
    Behind a proxy that gives up first (504 Gateway Timeout), the same."""
    model.gateway_timeout = proxy
    async with (
        worker_factory(max_turns=2, trimmed_events=True) as w,
        summarizing(_config(broker, w.cfg.prefix, model, llm_timeout=30.0 if proxy else 1.0)),
        device(broker.host, broker.port, w.cfg.prefix) as d,
        watcher(broker.host, broker.port, "reply/+/_summarizer/#") as replies,
    ):
        model.set_mode("down")  # the backlog builds up
        await talk(d, "c", 1, 10)
        await model.wait_calls(1)
        model.most_turns = 2
        model.set_mode("ok")
        try:
            assert await summary_upto(d, replies, "c", 8) == words(1, 8)
        finally:
            model.most_turns = None
            model.set_mode("ok")  # lets the held calls go
    assert model.seen == words(1, 8)


@pytest.mark.parametrize("shared", [True, False], ids=["share-group", "each-every-event"])
async def test_two_summarizers_racing_on_one_conversation(
    broker: Mosquitto, worker_factory: WorkerFactory, model: FakeModel, shared: bool
) -> None:
    """Two members of one share group get alternate events of the same conversation (without
    a group, both get every event); compare-and-set and the seq order make every turn land in
    the summary exactly once."""
    group = unique("g") if shared else None
    async with (
        worker_factory(max_turns=2, trimmed_events=True) as w,
        summarizing(_config(broker, w.cfg.prefix, model, group=group)) as a,
        summarizing(_config(broker, w.cfg.prefix, model, group=group)) as b,
        device(broker.host, broker.port, w.cfg.prefix) as d,
        watcher(broker.host, broker.port, "reply/+/_summarizer/#") as replies,
    ):
        await talk(d, "c", 1, 30)
        assert await summary_upto(d, replies, "c", 28) == words(1, 28)
        assert a.acknowledged > 0
        assert b.acknowledged > 0


def spawn_summarizer(broker: Mosquitto, prefix: str, model: FakeModel, cid: str) -> Any:
    """`memory-summarizer` as a program, started and subscribed."""
    proc = subprocess.Popen(
        [
            program("memory-summarizer"),
            "--host",
            broker.host,
            "--port",
            str(broker.port),
            "--prefix",
            prefix,
            "--client-id",
            cid,
            "--llm-url",
            model.url,
            "--retry-max",
            "0.2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if "folding" in line:
            return proc
    raise AssertionError(f"memory-summarizer ended: {proc.wait()}")


async def test_a_summarizer_killed_mid_fold_resumes_where_it_was(
    broker: Mosquitto, worker_factory: WorkerFactory, model: FakeModel
) -> None:
    """SIGKILL while the model folds: nothing was acknowledged, so the restarted summarizer
    (same client id, its persistent session) gets the events again and folds them once."""
    cid = unique("summarizer-")
    async with (
        worker_factory(max_turns=2, trimmed_events=True) as w,
        device(broker.host, broker.port, w.cfg.prefix) as d,
        watcher(broker.host, broker.port, "reply/+/_summarizer/#") as replies,
    ):
        model.set_mode("hold")
        proc = await asyncio.to_thread(spawn_summarizer, broker, w.cfg.prefix, model, cid)
        try:
            await talk(d, "c", 1, 5)
            await model.wait_calls(1)
        finally:
            reap(proc, signal.SIGKILL)
        await talk(d, "c", 6, 7)  # trimmed while no summarizer runs: kept in its session
        model.set_mode("ok")
        proc = await asyncio.to_thread(spawn_summarizer, broker, w.cfg.prefix, model, cid)
        try:
            assert await summary_upto(d, replies, "c", 5) == words(1, 5)
        finally:
            reap(proc, signal.SIGTERM)


async def test_a_broker_restart_loses_no_trimmed_turn(
    own_broker: Mosquitto, worker_factory: WorkerFactory, model: FakeModel
) -> None:
    """The broker restarts while a fold is in the model: the worker and the summarizer come
    back, the event is delivered again, and the summary covers every turn once."""
    b = own_broker
    async with (
        worker_factory(b, max_turns=2, trimmed_events=True) as w,
        summarizing(_config(b, w.cfg.prefix, model)) as s,
    ):
        model.set_mode("hold")
        async with device(b.host, b.port, w.cfg.prefix) as d:
            await talk(d, "c", 1, 4)
        await model.wait_calls(1)
        b.restart(signal.SIGTERM)
        model.set_mode("ok")
        await asyncio.wait_for(w.wait_connections(2), 15)
        await asyncio.wait_for(s.wait_connections(2), 15)
        async with (
            device(b.host, b.port, w.cfg.prefix) as d,
            watcher(b.host, b.port, "reply/+/_summarizer/#") as replies,
        ):
            await talk(d, "c", 5, 6)
            assert await summary_upto(d, replies, "c", 4) == words(1, 4)


async def test_stopping_while_folds_back_off_is_at_once_and_loses_nothing(
    broker: Mosquitto,
    worker_factory: WorkerFactory,
    model: FakeModel,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Stopped while its folds wait to try the model again, the summarizer ends at once
    rather than after the drain's deadline (Ctrl-C took 12 s): nothing of theirs was
    acknowledged, so the next run (same client id) folds them."""
    monkeypatch.setattr(summarizer, "_DRAIN_TIMEOUT", 3600.0)
    async with (
        worker_factory(max_turns=2, trimmed_events=True) as w,
        device(broker.host, broker.port, w.cfg.prefix) as d,
        watcher(broker.host, broker.port, "reply/+/_summarizer/#") as replies,
    ):
        cfg = replace(_config(broker, w.cfg.prefix, model), retry_max=3600.0)
        model.set_mode("down")
        async with summarizing(cfg):  # its exit waits 20 s at most for the summarizer
            await talk(d, "a", 1, 4)
            await talk(d, "b", 1, 4)
            await model.wait_calls(2)  # both conversations' folds failed: backing off
        model.set_mode("ok")
        async with summarizing(cfg):
            assert await summary_upto(d, replies, "a", 2) == words(1, 2)
            assert await summary_upto(d, replies, "b", 2) == words(1, 2)


async def test_a_gone_conversation_acknowledges_its_events(
    broker: Mosquitto, worker_factory: WorkerFactory, model: FakeModel
) -> None:
    """Events of a conversation deleted before its fold are acknowledged without a summary,
    and a conversation started again under the same id is not given the old turns."""
    async with (
        worker_factory(max_turns=1, trimmed_events=True) as w,
        summarizing(_config(broker, w.cfg.prefix, model)) as s,
        device(broker.host, broker.port, w.cfg.prefix) as d,
    ):
        model.set_mode("hold")
        await talk(d, "c", 1, 3)
        await model.wait_calls(1)
        await d.request("c", "delete")
        await talk(d, "c", 1, 1)
        model.set_mode("ok")
        await asyncio.wait_for(s.wait_acknowledged(2), 10)
        reply = await d.request("c", "get")
        assert "summary" not in reply
        assert [t["content"] for t in reply["turns"]] == ["t1"]


def test_the_command_line_refuses_bad_flags_in_one_line() -> None:
    """Bad values name the flag; the broker's variables are shared with the worker's."""
    cfg = from_args([], {"MEMORY_WORKER_PORT": "1999", "OPENAI_API_KEY": "k"})
    assert (cfg.port, cfg.api_key, cfg.llm_url) == (1999, "k", "http://127.0.0.1:11434/v1")
    cfg = from_args(["--port", "2000"], {"MEMORY_SUMMARIZER_PORT": "1998"})
    assert cfg.port == 2000
    for argv, message in (
        (["--port", "x"], "--port: expected an integer"),
        (["--llm-url", "ftp://x"], "--llm-url must be an http"),
        (["--group", "a/b"], "--group must be a name"),
        (["--log-level", "chatty"], "--log-level must be"),
        (["--session-expiry", "-1"], "--session-expiry must be"),
        (["--nope"], "unrecognized arguments"),
        (["--model", ""], "--model must name the model"),
        (["--model", " "], "--model must name the model"),
    ):
        with pytest.raises(ConfigError, match=message):
            from_args(argv, {})
    # An empty variable is unset, as env files mean it (and as the worker reads its own).
    assert from_args([], {"MEMORY_SUMMARIZER_MODEL": ""}).model == SummarizerConfig().model
    done = subprocess.run(
        [program("memory-summarizer"), "--port", "0"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 2
    assert done.stderr == "memory-summarizer: error: --port must be 1-65535, got 0\n"


async def test_events_out_of_order_are_folded_in_seq_order(
    broker: Mosquitto, worker_factory: WorkerFactory, model: FakeModel
) -> None:
    """Trimmed events that reach a summarizer out of seq order (two workers publishing, a
    redelivery) are folded earliest first, each turn once."""
    async with (
        worker_factory(max_turns=10) as w,
        summarizing(_config(broker, w.cfg.prefix, model)),
        device(broker.host, broker.port, w.cfg.prefix) as d,
        watcher(broker.host, broker.port, "reply/+/_summarizer/#") as replies,
    ):
        await talk(d, "c", 1, 5)
        turns = (await d.request("c", "get"))["turns"]
        for seq in (3, 1, 2):
            event = {"convo": "c", "turns": [turns[seq - 1]], "summary_upto": 0, "ts": 1.0}
            await d.client.publish(f"{w.cfg.prefix}/c/trimmed", msgpack.packb(event), qos=1)
        assert await summary_upto(d, replies, "c", 3) == words(1, 3)
        assert model.seen == words(1, 3)


async def test_a_summary_that_empties_the_window_still_gets_its_turns_folded(
    broker: Mosquitto, worker_factory: WorkerFactory, model: FakeModel
) -> None:
    """A device's summary so long that the conversation's byte budget trims every turn of the
    window: those trimmed turns reach the model and a saved summary, not taken for a
    conversation that is gone."""
    limits = {"convo_cost": 0, "id_byte_cost": 0, "turn_cost": 0, "key_cost": 0}
    async with (
        worker_factory(
            max_turns=5, max_bytes=1024, max_payload_bytes=1024, trimmed_events=True, **limits
        ) as w,
        summarizing(_config(broker, w.cfg.prefix, model)) as s,
        device(broker.host, broker.port, w.cfg.prefix) as d,
        watcher(broker.host, broker.port, "reply/+/_summarizer/#") as replies,
    ):
        await talk(d, "c", 1, 5)
        await d.request("c", "state/save", {"ns": "n", "key": "k", "value": "v" * 590})
        long = {"text": "w " * 213, "upto": 1, "base": 0}  # 426 bytes: no turn fits beside
        assert (await d.request("c", "summary", long)) == {"ok": True, "upto": 1, "dropped": 1}
        assert (await d.request("c", "get"))["turns"] == []
        await summary_upto(d, replies, "c", 5)
        assert model.seen == words(2, 5)
        assert s.folds >= 1


async def test_a_summarizer_started_before_its_broker_waits_for_it(
    own_broker: Mosquitto, model: FakeModel
) -> None:
    """At boot the broker may come up after the summarizer: it says so once and waits,
    rather than ending with a traceback."""
    said = threading.Event()

    class Seen(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "retrying with backoff" in record.getMessage():
                said.set()

    handler = Seen(logging.WARNING)
    logging.getLogger("memory_summarizer").addHandler(handler)
    own_broker.stop()
    s = Summarizer(_config(own_broker, "mem", model))
    stop = asyncio.Event()
    task = asyncio.create_task(s.run(stop))
    try:
        assert await asyncio.to_thread(said.wait, 10)
        own_broker.start()
        await asyncio.wait_for(s.connected.wait(), 15)
    finally:
        logging.getLogger("memory_summarizer").removeHandler(handler)
        stop.set()
        await asyncio.wait_for(task, 20)


def test_the_gap_wait_starts_again_while_the_summary_moves(monkeypatch: pytest.MonkeyPatch) -> None:
    """An event waiting for earlier turns gives up on them only after --gap-wait without the
    summary moving. Counted from its first wait, a member of a group gave up while another
    was still saving those turns in parts (a slow model), and their acknowledgement then
    dropped them unfolded."""
    now = [100.0]
    monkeypatch.setattr("worker.summarizer.time.monotonic", lambda: now[0])
    s = Summarizer(SummarizerConfig(llm_url="http://127.0.0.1:9/v1", gap_wait=10))
    ev = summarizer._Event(generation=0, mid=1, qos=1, turns=[{"seq": 9}])
    assert not s._gap_is_over("c", ev, 2)
    now[0] += 8
    assert not s._gap_is_over("c", ev, 4)  # the summary moved: waiting anew
    now[0] += 8
    assert not s._gap_is_over("c", ev, 4)
    now[0] += 3
    assert s._gap_is_over("c", ev, 4)  # 11 s without a move


async def test_the_model_check_says_what_would_stop_every_fold(model: FakeModel) -> None:
    """At start the model server's list tells a missing model (with how to get it) and a
    server that does not answer; a one-model server (llama.cpp's) is not second-guessed."""
    chat = ChatModel(model.url, "llama3.2")
    assert await chat.check() is None  # Ollama lists it as llama3.2:latest
    model.models = [{"id": "qwen2.5:0.5b", "object": "model", "owned_by": "library"}]
    problem = await chat.check()
    assert problem is not None
    assert "has no model 'llama3.2' (it lists: qwen2.5:0.5b)" in problem
    assert "ollama pull llama3.2" in problem
    model.models = [{"id": "/models/tiny.gguf", "object": "model", "owned_by": "llamacpp"}]
    assert await chat.check() is None
    # The URL without its /v1: the server answers 404 to each path, and the fold does too.
    bare = ChatModel(model.url.removesuffix("/v1"), "llama3.2")
    problem = await bare.check()
    assert problem is not None
    assert f"does --llm-url end in /v1? ({model.url};" in problem
    with pytest.raises(ModelError, match="answered 404: 404 page not found: does --llm-url"):
        bare._post(b"{}")
    problem = await ChatModel(f"http://127.0.0.1:{free_port()}/v1", "llama3.2").check()
    assert problem is not None
    assert "does not answer" in problem
    with socket.create_server(("127.0.0.1", 0)) as not_http:  # an SSH port, say
        port = not_http.getsockname()[1]
        answer = threading.Thread(target=_say_ssh, args=(not_http,), daemon=True)
        answer.start()
        problem = await ChatModel(f"http://127.0.0.1:{port}/v1", "llama3.2").check()
        answer.join(10)
    assert problem is not None
    assert "does not answer (BadStatusLine" in problem


def _bad_status(conn: socket.socket) -> None:
    conn.sendall(b"GARBAGE\r\n\r\n")


def _cut_short(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b'{"choices":')


def _huge(conn: socket.socket) -> None:
    body = json.dumps({"choices": [{"message": {"content": "word " * 500_000}}]}).encode()
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)


def _trickle(
    conn: socket.socket, head: bytes = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n"
) -> None:
    conn.sendall(head)
    with contextlib.suppress(OSError):  # until the caller gives up and closes
        for _ in range(100_000):
            conn.sendall(b" ")
            time.sleep(0.01)  # the server's pace: the scenario, not a synchronization


def _trickled_headers(conn: socket.socket) -> None:
    _trickle(conn, b"HTTP/1.1 200 OK\r\nX-Slow: ")


def _trickled_error(conn: socket.socket) -> None:
    _trickle(conn, b"HTTP/1.1 500 Oops\r\nContent-Length: 300\r\n\r\n")


@pytest.mark.parametrize(
    ("answer", "words", "timed_out"),
    [
        (_bad_status, "a broken answer (BadStatusLine", False),
        (_cut_short, "a broken answer (cut short, 989 bytes missing)", False),
        (
            _huge,
            "answered more than 1048576 bytes: the model did not keep to the max_tokens",
            False,
        ),
        (_trickle, "did not answer within 1.0s", True),
        (_trickled_headers, "did not answer within 1.0s", True),
        (_trickled_error, "did not answer within 1.0s", True),
    ],
)
async def test_a_broken_or_endless_answer_is_a_model_error(
    answer: Any, words: str, timed_out: bool
) -> None:
    """A model server's broken answer (not HTTP, a body cut short) failed the fold with a
    traceback logged as the summarizer's own error; an answer trickled a byte at a time was
    waited for past --llm-timeout (17 s with a timeout of 2 s), and a huge one was read whole
    and sent back to the model to shorten (new users' trials)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]

        def serve() -> None:
            conn, _ = server.accept()
            with conn:
                got = b""
                while b"\r\n\r\n" not in got:
                    got += conn.recv(65536)
                head, _, body = got.partition(b"\r\n\r\n")
                size = int(re.search(rb"(?i)content-length: (\d+)", head)[1])  # type: ignore[index]
                while len(body) < size:  # all of it: closing on unread bytes resets
                    body += conn.recv(65536)
                answer(conn)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        chat = ChatModel(f"http://127.0.0.1:{port}/v1", "llama3.2", timeout=1.0)
        with pytest.raises(ModelError, match=re.escape(words)) as info:
            await chat.fold("", [{"role": "user", "content": "hi", "seq": 1}])
        assert info.value.timed_out is timed_out
        thread.join(10)


async def test_the_model_call_keeps_its_time_whatever_is_slow(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A name lookup that outlasts --llm-timeout left the timer no socket to shut, and the
    call then waited on a trickled answer for ever (a review); and a model behind the
    http_proxy of the environment is reached through it (urllib's, which a rewrite lost)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        lines: list[bytes] = []

        def serve() -> None:
            for _ in range(2):
                conn, _ = server.accept()
                with conn:
                    got = b""
                    while b"\r\n\r\n" not in got and (more := conn.recv(65536)):
                        got += more
                    lines.append(got.split(b"\r\n", 1)[0])
                    if len(lines) == 1:
                        _trickle(conn)
                    else:
                        body = b'{"choices": [{"message": {"content": "proxied"}}]}'
                        head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
                        conn.sendall(head + body)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        lookup = socket.getaddrinfo

        def slow_lookup(*args: Any, **kwargs: Any) -> Any:
            time.sleep(1.5)  # a resolver this slow: the scenario, not a synchronization
            return lookup(*args, **kwargs)

        monkeypatch.setattr(socket, "getaddrinfo", slow_lookup)
        chat = ChatModel(f"http://127.0.0.1:{port}/v1", "llama3.2", timeout=1.0)
        turn = [{"role": "user", "content": "hi", "seq": 1}]
        with pytest.raises(ModelError, match=re.escape("did not answer within 1.0s")) as info:
            await chat.fold("", turn)
        assert info.value.timed_out
        monkeypatch.setattr(socket, "getaddrinfo", lookup)
        monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{port}")
        monkeypatch.delenv("no_proxy", raising=False)
        monkeypatch.delenv("NO_PROXY", raising=False)
        far = ChatModel("http://model.invalid:8000/v1", "llama3.2", timeout=5.0)
        assert (await far.fold("", turn)).text == "proxied"
        thread.join(10)
    assert lines[1] == b"POST http://model.invalid:8000/v1/chat/completions HTTP/1.1"


async def test_a_name_lookup_that_hangs_costs_the_caller_its_timeout_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """getaddrinfo blocks for as long as the resolver takes, past any socket timeout: a fold
    (and the check at start) waited for it, however long (the last notes left it). Now the
    caller gets its answer at --llm-timeout; the lookup ends on its own, unheard."""
    lookup = socket.getaddrinfo
    resolver_back = threading.Event()
    asked = threading.Event()

    def hanging_lookup(*args: Any, **kwargs: Any) -> Any:
        asked.set()
        resolver_back.wait(30)
        return lookup(*args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", hanging_lookup)
    chat = ChatModel("http://model.example:8000/v1", "llama3.2", timeout=0.5)
    turn = [{"role": "user", "content": "hi", "seq": 1}]
    try:
        async with asyncio.timeout(10):  # the bug's hang would last the resolver's 30 s
            with pytest.raises(ModelError, match=re.escape("did not answer within 0.5s")) as info:
                await chat.fold("", turn)
            assert info.value.timed_out
            assert asked.is_set()
            problem = await chat.check()
        assert problem is not None
        assert problem.startswith("the model server at http://model.example:8000/v1 does not")
    finally:
        resolver_back.set()


async def test_a_fold_cancelled_as_its_answer_comes_is_cancelled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stop cancels the folds under way: one whose answer came as it was cancelled
    returned the answer (Python 3.11's wait_for, 150 of 200 in a review's run), and the
    summarizer went on to save it and call the model again while stopping. The model's
    answer is a stand-in here: the race is the loop's, not the server's."""
    answered = threading.Event()

    def post(self: ChatModel, data: bytes) -> Folded:
        answered.wait(10)
        return parse_completion(b'{"choices": [{"message": {"content": "folded"}}]}')

    monkeypatch.setattr(ChatModel, "_post", post)
    chat = ChatModel("http://127.0.0.1:9/v1", "llama3.2", timeout=5.0)
    turn = [{"role": "user", "content": "hi", "seq": 1}]
    swallowed = 0
    for round_ in range(80):
        answered.clear()
        fold = asyncio.create_task(chat.fold("", turn))
        await asyncio.sleep(0)  # the call under way, its thread waiting
        answered.set()
        for _ in range(round_ % 4):  # the answer on its way back, or come
            await asyncio.sleep(0)
        if not fold.cancel():
            continue  # done already: nothing to cancel
        try:
            await fold
        except asyncio.CancelledError:
            continue
        swallowed += 1
    assert swallowed == 0


async def test_a_failure_that_differs_only_in_its_answer_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Answers that are no completion, each with its own id (as OpenAI-compatible servers
    give them): one warning, not one per retry (a review); another kind of failure after
    them: one more."""
    s = Summarizer(SummarizerConfig(llm_url="http://127.0.0.1:9/v1"))
    s._stopping.set()  # each back-off returns at once
    answers = [json.dumps({"id": f"chatcmpl-{n}", "choices": []}).encode() for n in range(5)]
    errors: list[ModelError] = []
    for answer in answers:
        with pytest.raises(ModelError) as info:
            parse_completion(answer)
        errors.append(info.value)
    errors.append(
        ModelError("http://x/v1/chat/completions answered 503: busy", kind="answered 503")
    )
    for exc in errors:
        with pytest.raises(summarizer._Stopped):
            await s._back_off("c", 0, f"the model failed: {exc}", f"model: {exc.kind}")
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(said) == 2, said
    assert "chatcmpl-0" in said[0]
    assert "answered 503" in said[1]


def _say_ssh(server: socket.socket) -> None:
    conn, _ = server.accept()
    with conn:
        conn.recv(4096)
        conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")


@pytest.mark.parametrize("trimmed", [False, True])
async def test_a_worker_without_trimmed_events_is_named_at_start(
    broker: Mosquitto,
    worker_factory: WorkerFactory,
    model: FakeModel,
    caplog: pytest.LogCaptureFixture,
    trimmed: bool,
) -> None:
    """Beside workers that do not announce trimmed turns the summarizer would fold nothing,
    silently: it says so at start, naming them (and says nothing when they do announce).
    A worker whose retained stats are older than three of its --stats-interval has stopped:
    it is not named (it was, for five minutes)."""
    prefix = unique("mem")
    stopped = {"client_id": "gone-one", "ts": time.time() - 60, "stats_interval": 10.0}
    gone = msgpack.packb(stopped | {"trimmed_events": False})
    async with aiomqtt.Client(broker.host, broker.port) as c:
        await c.publish(f"{prefix}/_worker/gone-one/stats", gone, qos=1, retain=True)
    async with (
        worker_factory(prefix=prefix, trimmed_events=trimmed) as w,
        summarizing(_config(broker, w.cfg.prefix, model)) as s,
    ):
        assert s.preflight is not None
        # At once: the worker's stats are fresh (pinged), so no wait of a --stats-interval
        # (gone-one's 10 s) for newer ones.
        await asyncio.wait_for(s.preflight, 5)
    warned = [r.getMessage() for r in caplog.records if "--trimmed-events" in r.getMessage()]
    if trimmed:
        assert warned == []
    else:
        assert len(warned) == 1, warned
        assert w.cfg.client_id in warned[0]
        assert "gone-one" not in warned[0]
    assert not [r for r in caplog.records if "model server" in r.getMessage()]


async def test_workers_are_looked_at_again_after_the_start(
    broker: Mosquitto,
    worker_factory: WorkerFactory,
    model: FakeModel,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A summarizer started before its worker (or with another --prefix) said nothing while
    the turns went unfolded: it says that no worker is online under its prefix, once, and
    names a worker that comes later without --trimmed-events, once."""
    monkeypatch.setattr(summarizer, "_WATCH_EVERY", 0.05)
    prefix = unique("mem")

    def said(words: str) -> list[str]:
        return [r.getMessage() for r in caplog.records if words in r.getMessage()]

    async with summarizing(_config(broker, prefix, model)) as s:
        await asyncio.wait_for(s.wait_looks(1), 20)  # a look finding none takes a timeout
        assert len(said(f"no memory-worker is online under the prefix {prefix}")) == 1
        async with worker_factory(prefix=prefix, trimmed_events=False) as w:
            while not said("run without --trimmed-events"):
                await asyncio.wait_for(s.wait_looks(s.looks + 1), 20)
            await asyncio.wait_for(s.wait_looks(s.looks + 2), 20)
    assert len(said("no memory-worker is online")) == 1
    named = said("run without --trimmed-events")
    assert len(named) == 1, named
    assert w.cfg.client_id in named[0]


async def test_a_stopped_worker_is_not_taken_for_one_that_runs(
    broker: Mosquitto,
    model: FakeModel,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker stopped a moment ago keeps its stats retained and recent: its status says
    offline, so the summarizer's look says no worker runs, and does not name it."""
    monkeypatch.setattr(summarizer, "_WATCH_EVERY", 0.05)
    prefix = unique("mem")
    stats = {"client_id": "stopped", "ts": time.time(), "stats_interval": 3600}
    async with aiomqtt.Client(broker.host, broker.port) as c:
        topic = f"{prefix}/_worker/stopped"
        body = msgpack.packb(stats | {"trimmed_events": False})
        await c.publish(f"{topic}/stats", body, qos=1, retain=True)
        offline = msgpack.packb({"state": "offline", "client_id": "stopped", "ts": time.time()})
        await c.publish(f"{topic}/status", offline, qos=1, retain=True)
    async with summarizing(_config(broker, prefix, model)) as s:
        await asyncio.wait_for(s.wait_looks(1), 20)
    said = [r.getMessage() for r in caplog.records]
    assert [m for m in said if "no memory-worker is online" in m]
    assert not [m for m in said if "run without --trimmed-events" in m]


async def test_a_workers_last_run_is_not_taken_for_this_one(
    broker: Mosquitto, model: FakeModel, caplog: pytest.LogCaptureFixture
) -> None:
    """scripts/run and the services start the worker and the summarizer together: the
    summarizer read the stats the worker had retained from its last run (without
    --trimmed-events, a moment old) before the worker published its own, and warned falsely.
    It looks again, one --stats-interval later, at stats published since it started."""
    prefix = unique("mem")
    last_run = {"client_id": "memory-worker", "ts": time.time(), "stats_interval": 0.2}
    stale = msgpack.packb(last_run | {"trimmed_events": False})
    async with aiomqtt.Client(broker.host, broker.port) as c:
        await c.publish(f"{prefix}/_worker/memory-worker/stats", stale, qos=1, retain=True)
    async with summarizing(_config(broker, prefix, model)) as s:
        assert s.preflight is not None
        await asyncio.wait_for(s.preflight, 30)
    assert not [r for r in caplog.records if "--trimmed-events" in r.getMessage()]


@pytest.mark.parametrize("interval", ["abc", float("nan"), True])
async def test_a_strangers_stats_interval_does_not_stop_the_start_check(
    broker: Mosquitto, model: FakeModel, interval: Any
) -> None:
    """Anyone may publish stats: one whose interval is not a number ended the start's check
    with a ValueError (NaN reached asyncio.sleep: a review). It is left out of the wait."""
    prefix = unique("mem")
    now = time.time()
    last_run = {"client_id": "memory-worker", "ts": now, "stats_interval": 0.2}
    odd = {"client_id": "odd", "ts": now, "stats_interval": interval, "trimmed_events": False}
    async with aiomqtt.Client(broker.host, broker.port) as c:
        for name, body in (("memory-worker", last_run), ("odd", odd)):
            stats = msgpack.packb(body | {"trimmed_events": False})
            await c.publish(f"{prefix}/_worker/{name}/stats", stats, qos=1, retain=True)
    async with summarizing(_config(broker, prefix, model)) as s:
        assert s.preflight is not None
        await asyncio.wait_for(s.preflight, 5)  # one interval of the worker's: 0.2 s


def test_a_langchain_message_stored_whole_reads_as_words_to_the_model() -> None:
    """LangChain's history stores tool calls and tool answers whole, as JSON under the role
    langchain: the model folding them reads who said what and which tool was called."""
    pytest.importorskip("langchain_core")
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage

    from worker.client.langchain import turn_of
    from worker.llm import fold_messages

    call = {"name": "weather", "args": {"city": "Oslo"}, "id": "c1", "type": "tool_call"}
    messages = [
        AIMessage("let me look", tool_calls=[call]),
        ToolMessage("4 °C, rain", tool_call_id="c1", name="weather"),
        HumanMessage(content=["and", {"type": "text", "text": "tomorrow?"}, {"type": "image"}]),
    ]
    turns = [dict(zip(("role", "content"), turn_of(m), strict=True)) for m in messages]
    asked = fold_messages("", [*turns, {"role": "langchain", "content": "{not json"}], 64)
    assert asked[-1]["content"].endswith(
        'assistant: let me look [calls weather({"city": "Oslo"})]\n'
        "tool weather: 4 °C, rain\n"
        "user: and tomorrow?\n"
        "langchain: {not json"
    )


def test_a_model_call_ending_after_its_loop_closed_is_dropped_quietly() -> None:
    """A model call (or the start check) still running when the summarizer's loop closes
    ends on its own thread without an error there: nobody waits for its answer."""
    from worker import llm

    release = threading.Event()

    def slow() -> str:
        release.wait(30)
        return "late"

    async def start_and_leave() -> None:
        asyncio.get_running_loop().create_task(llm._in_thread(slow))
        await asyncio.sleep(0)  # the thread is started

    seen: list[BaseException | None] = []
    hook = threading.excepthook
    threading.excepthook = lambda args: seen.append(args.exc_value)
    try:
        asyncio.run(start_and_leave())  # closes the loop, the call still running
        release.set()
        for thread in threading.enumerate():
            if thread.name == "model call":
                thread.join(30)
    finally:
        threading.excepthook = hook
    assert seen == []


def test_a_completion_is_read_without_the_thinking_and_with_a_count_it_can_save() -> None:
    """A thinking model's <think> block is not the summary, and a completion_tokens the
    worker would refuse is estimated instead (the save was refused, and tried again for
    ever)."""
    raw = {
        "choices": [{"message": {"content": "<think>\nweigh it\n</think>\n\nThe gist."}}],
        "usage": {"completion_tokens": 2_000_000},
    }
    assert parse_completion(json.dumps(raw).encode()) == Folded("The gist.", None)
    raw["usage"] = {"completion_tokens": 1500}  # the reasoning's too: not the summary's
    assert parse_completion(json.dumps(raw).encode()) == Folded("The gist.", None)
    raw["choices"] = [{"message": {"content": "<think>\nweigh it, and wei"}}]  # cut off
    with pytest.raises(ModelError, match="never ended"):
        parse_completion(json.dumps(raw).encode())


def test_help_shows_what_the_environment_sets(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--help said 1883 with MEMORY_WORKER_PORT set to another port (which was used); it
    says the variable and its value now, and never a password."""
    monkeypatch.setenv("COLUMNS", "200")
    env = {"MEMORY_WORKER_PORT": "1999", "MEMORY_SUMMARIZER_PASSWORD": "s3cret"}
    with pytest.raises(SystemExit):
        from_args(["--help"], env)
    shown = capsys.readouterr().out
    assert "broker port (default: 1883; here MEMORY_WORKER_PORT=1999)" in shown
    assert "here MEMORY_SUMMARIZER_PASSWORD is set" in shown
    assert "s3cret" not in shown
