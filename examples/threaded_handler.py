"""A Flask-style threaded web app: every request thread shares one BlockingMemoryClient
(a pool of connections, one per thread calling at once), as the old synchronous store's
users do. Plain wsgiref, no Flask needed.

    .venv/bin/python examples/threaded_handler.py [PORT]

On the broker at MEMORY_URL (default: $MEMORY_WORKER_HOST, _PORT and _PREFIX, as memctl
reads them, or 127.0.0.1, 1883 and mem).

`--demo N` serves on a free port, sends N concurrent requests from N threads, prints each
answer and stops.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import urllib.request
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from worker.client import (
    BadRequestError,
    BadTopicError,
    BlockingMemoryClient,
    MemoryWorkerError,
    TooLargeError,
    open_blocking_memory,
)

# scripts/run --own-broker prints the MEMORY_WORKER_PORT to export.
DEFAULT_URL = "mqtt://{}:{}/{}".format(  # as memctl reads them
    os.environ.get("MEMORY_WORKER_HOST") or "127.0.0.1",
    os.environ.get("MEMORY_WORKER_PORT") or "1883",
    os.environ.get("MEMORY_WORKER_PREFIX") or "mem",
)

ROUTE = "GET /chat?session=S&text=T"


class ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def make_app(memory: BlockingMemoryClient) -> Callable[..., Iterable[bytes]]:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        """GET /chat?session=S&text=T: store the turn, answer with the session's count."""
        q = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
        session, text = q.get("session"), q.get("text")
        if environ.get("PATH_INFO") != "/chat" or not session or text is None:
            return bad_request(start_response, f"usage: {ROUTE}")
        try:
            memory.append(session, "user", text)  # the same call the old store had
            visits = (memory.load(session, "web", "visits") or 0) + 1
            memory.save(session, "web", "visits", visits)
            turns = len(memory.get(session))
        except (BadRequestError, BadTopicError, TooLargeError) as exc:  # what the worker refused
            return bad_request(start_response, exc.message)
        body = json.dumps({"session": session, "turns": turns, "visits": visits})
        start_response("200 OK", [("Content-Type", "application/json")])
        return [body.encode()]

    return app


def bad_request(start_response: Callable[..., Any], reason: str) -> Iterable[bytes]:
    """A 400 whose body is the one-line reason."""
    start_response("400 Bad Request", [("Content-Type", "text/plain; charset=utf-8")])
    return [f"{reason}\n".encode()]


def demo(memory: BlockingMemoryClient, n: int) -> None:
    with make_server("127.0.0.1", 0, make_app(memory), ThreadingWSGIServer, QuietHandler) as srv:
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        answers: list[str] = [""] * n

        def visit(i: int) -> None:
            url = f"http://127.0.0.1:{srv.server_port}/chat?session=web-{i}&text=hi"
            with urllib.request.urlopen(url) as response:
                answers[i] = response.read().decode()

        threads = [threading.Thread(target=visit, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        srv.shutdown()
    print("\n".join(answers), flush=True)


USAGE = "usage: examples/threaded_handler.py [PORT] | --demo THREADS"

if __name__ == "__main__":
    demo_mode = sys.argv[1:2] == ["--demo"]
    number = sys.argv[2:3] if demo_mode else sys.argv[1:2]
    if (demo_mode and not number) or (number and not number[0].isdigit()):
        sys.exit(USAGE)
    try:
        mem = open_blocking_memory(os.environ.get("MEMORY_URL", DEFAULT_URL))
    except MemoryWorkerError as exc:  # no broker, a refusal: one line, as memctl
        sys.exit(f"threaded_handler: {exc.message}")
    with mem:
        if demo_mode:
            demo(mem, int(number[0]))
        else:
            port = int(number[0]) if number else 8000
            server = make_server("127.0.0.1", port, make_app(mem), ThreadingWSGIServer)
            print(
                f"serving http://127.0.0.1:{port}/chat?session=S&text=T (Ctrl-C stops)", flush=True
            )
            with contextlib.suppress(KeyboardInterrupt), server:
                server.serve_forever()
