"""The one stand-in of the suite: a local HTTP server speaking OpenAI's chat-completions API
in place of a language model (no weights can be fetched here). It folds deterministically,
the old summary then each new turn's content, space-separated, and records every turn it was
given, so that a test can say which turns reached a saved summary and how often."""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_ASK = re.compile(r"Summary so far:\n(.*)\n\nNew turns:\n(.*)\Z", re.S)


class FakeModel:
    """Modes: "ok" folds, "down" answers 503, "garbage" answers 200 with no completion,
    "hold" waits (until the mode changes) before folding. With `most_turns`, a call with
    more turns than that is not answered (until it is None again): too slow; with
    `gateway_timeout` too, it is answered 504 at once, as a proxy in front of it would."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.most_turns: int | None = None
        self.gateway_timeout = False
        self.calls = 0
        self.asked_for: set[str] = set()  # the model names requests named
        # What GET /v1/models lists, as Ollama lists them (the default model pulled).
        self.models = [{"id": "llama3.2:latest", "object": "model", "owned_by": "library"}]
        self.seen: list[str] = []  # the content of every turn it was asked to fold
        self._changed = threading.Condition()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def set_mode(self, mode: str) -> None:
        with self._changed:
            self.mode = mode
            self._changed.notify_all()

    async def wait_calls(self, n: int) -> None:
        """Return once the model has been asked `n` times in all."""

        def wait() -> None:
            with self._changed:
                if not self._changed.wait_for(lambda: self.calls >= n, timeout=30):
                    raise TimeoutError(f"the model was asked {self.calls} times, not {n}")

        await asyncio.to_thread(wait)

    def _answer(self, body: dict[str, Any]) -> tuple[int, bytes]:
        with self._changed:
            self.calls += 1
            self.asked_for.add(str(body.get("model")))
            self._changed.notify_all()
            self._changed.wait_for(lambda: self.mode != "hold", timeout=30)
            mode = self.mode
        if mode == "down":
            return 503, b'{"error": "model is loading"}'
        if mode == "garbage":
            return 200, b'{"id": "x", "choices": []}'
        ask = _ASK.search(body["messages"][-1]["content"])
        assert ask is not None, body
        old = "" if ask[1] == "(none yet)" else ask[1]
        new = [line.split(": ", 1)[1] for line in ask[2].splitlines()]
        with self._changed:
            if self.most_turns is not None and len(new) > self.most_turns:
                if self.gateway_timeout:
                    return 504, b"<html><h1>504 Gateway Time-out</h1></html>"
                self._changed.wait_for(lambda: self.most_turns is None, timeout=30)
                return 503, b'{"error": "too late"}'
            self.seen += new
        # an answer is at most max_tokens long (a word is a token here)
        text = " ".join(" ".join([old, *new]).split()[: body.get("max_tokens") or None])
        answer = {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "model": body.get("model"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": 1,
                "completion_tokens": len(text.split()),
                "total_tokens": 2,
            },
        }
        return 200, json.dumps(answer).encode()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        model = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path != "/v1/models":
                    self._send(404, b"404 page not found")  # as Ollama answers
                    return
                self._send(200, json.dumps({"object": "list", "data": model.models}).encode())

            def do_POST(self) -> None:
                size = int(self.headers["Content-Length"])
                body = json.loads(self.rfile.read(size))
                if self.path != "/v1/chat/completions":
                    self._send(404, b"404 page not found")
                    return
                self._send(*model._answer(body))

            def _send(self, status: int, data: bytes) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the summarizer that asked was killed meanwhile

            def log_message(self, *args: Any) -> None:
                pass

        return Handler


@contextmanager
def fake_model() -> Iterator[FakeModel]:
    model = FakeModel()
    thread = threading.Thread(target=model.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield model
    finally:
        model.set_mode("ok")
        model.server.shutdown()
        model.server.server_close()
