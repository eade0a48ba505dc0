"""The one call memory-summarizer makes to a language model: fold turns into a summary, over
any OpenAI-compatible chat-completions endpoint (Ollama's /v1, llama.cpp's llama-server, a
hosted API).

The standard library's urllib in a thread is enough for one POST per fold: no HTTP client
dependency for a call that takes seconds of model time.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from worker import constants as c
from worker.turns import MAX_TOKENS

DEFAULT_LLM_URL = "http://127.0.0.1:11434/v1"
DEFAULT_MODEL = "llama3.2"
DEFAULT_SUMMARY_TOKENS = 256
DEFAULT_LLM_TIMEOUT = 120.0

SYSTEM_PROMPT = (
    "You keep the running summary of a conversation between a user and an assistant, for a "
    "small language model with little context. Fold the new turns into the summary: keep "
    "names, facts, preferences, decisions and open questions; drop greetings and filler. "
    "Write at most {tokens} tokens, in the conversation's language. Answer with the summary "
    "alone."
)


_GAVE_UP = (408, 504)  # Request Timeout; Gateway Timeout (nginx's, a load balancer's)
_CHECK_TIMEOUT = 5.0  # seconds the model list may take at start
_CHECK_BYTES = 1 << 20
_LATE = 0.5  # seconds past its timeout a call's thread has to say so itself
# A chat completion's size at most: a summary of MAX_TOKENS tokens is a fraction of it. More
# is a model that ignored max_tokens, whose answer the worker would refuse anyway.
MAX_ANSWER_BYTES = 1 << 20
_READ = 1 << 16


class ModelError(Exception):
    """The model could not fold (down, slow, refused, or answered something unusable);
    `timed_out` when it did not answer within the timeout; `kind`, the failure without what
    changes from one answer to the next (an answer's id), for logging it once."""

    def __init__(self, message: str, *, timed_out: bool = False, kind: str = "") -> None:
        super().__init__(message)
        self.timed_out = timed_out
        self.kind = kind or message


@dataclass(frozen=True, slots=True)
class Folded:
    """A model's new summary, and its length in the model's tokens when it said."""

    text: str
    tokens: int | None


def fold_messages(
    summary: str, turns: Sequence[dict[str, Any]], tokens: int
) -> list[dict[str, str]]:
    """The chat messages asking for the summary that folds `turns` into `summary`."""
    lines = "\n".join(_line(t["role"], t["content"]) for t in turns)
    return [
        {"role": "system", "content": SYSTEM_PROMPT.format(tokens=tokens)},
        {
            "role": "user",
            "content": f"Summary so far:\n{summary or '(none yet)'}\n\nNew turns:\n{lines}",
        },
    ]


# A LangChain message stored whole (worker/client/langchain.py): its type's speaker.
_SPEAKERS = {"human": "user", "ai": "assistant", "system": "system", "tool": "tool"}


def _line(role: str, content: str) -> str:
    """A turn as the model reads it; a LangChain message stored whole (role `langchain`, its
    dict in JSON) as what was said and which tools were called, not as JSON."""
    if role == c.WHOLE_MESSAGE_ROLE:
        try:
            message = json.loads(content)
            kind, data = message["type"], message["data"]
            said = data.get("content", "")
            if not isinstance(said, str):  # content made of parts: their text
                said = " ".join(p if isinstance(p, str) else str(p.get("text", "")) for p in said)
            calls = [
                f"{call['name']}({json.dumps(call.get('args', {}), ensure_ascii=False)})"
                for call in data.get("tool_calls", [])
            ]
            speaker = _SPEAKERS.get(kind, kind)
            if kind == "tool" and data.get("name"):
                speaker = f"tool {data['name']}"
            text = " ".join([said.strip(), *(f"[calls {c}]" for c in calls)]).strip()
            return f"{speaker}: {text}"
        except (ValueError, KeyError, TypeError, AttributeError):
            pass  # a device's turn under that role: as it is
    return f"{role}: {content}"


class ChatModel:
    """A chat-completions endpoint.

    Args:
        url: the API's base URL (…/v1); `/chat/completions` is appended.
        model: the model's name on that server.
        api_key: sent as a Bearer token when given (OPENAI_API_KEY).
        summary_tokens: the summary's length to ask for (and max_tokens of the answer).
        timeout: seconds one call may take.
    """

    def __init__(
        self,
        url: str = DEFAULT_LLM_URL,
        model: str = DEFAULT_MODEL,
        *,
        api_key: str | None = None,
        summary_tokens: int = DEFAULT_SUMMARY_TOKENS,
        timeout: float = DEFAULT_LLM_TIMEOUT,
    ) -> None:
        self.base = url.rstrip("/")
        self.endpoint = self.base + "/chat/completions"
        self.model = model
        self.api_key = api_key
        self.summary_tokens = summary_tokens
        self.timeout = timeout

    async def fold(
        self, summary: str, turns: Sequence[dict[str, Any]], *, tokens: int | None = None
    ) -> Folded:
        """The summary with `turns` folded in, of about `tokens` (summary_tokens by
        default); ModelError when none came back."""
        want = tokens or self.summary_tokens
        body = {
            "model": self.model,
            "messages": fold_messages(summary, turns, want),
            "max_tokens": want,
            "temperature": 0.2,
            "stream": False,
        }
        data = json.dumps(body).encode()
        try:
            # The thread's own deadline cannot cut a name lookup short (getaddrinfo blocks
            # for as long as the resolver takes): the caller does not wait past it. Not
            # wait_for: Python 3.11's returns a result that came as the task was cancelled.
            async with asyncio.timeout(self.timeout + _LATE):
                return await _in_thread(lambda: self._post(data))
        except TimeoutError:
            raise self._too_slow() from None

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    async def check(self) -> str | None:
        """What would stop every fold (see `check_now`), asked without holding up a stop."""
        wait = min(self.timeout, _CHECK_TIMEOUT) + _LATE
        try:
            async with asyncio.timeout(wait):
                return await _in_thread(self.check_now)
        except TimeoutError:
            return f"the model server at {self.base} does not answer within {wait:g}s"

    def check_now(self) -> str | None:
        """What would stop every fold, as far as the server's model list (GET …/models, which
        Ollama's and llama.cpp's servers answer) tells: a server that does not answer, a
        refused key, a model it does not have. None when it cannot tell, or all is well."""
        url = self.base + "/models"
        request = urllib.request.Request(url, headers=self._headers())
        try:
            with urllib.request.urlopen(request, timeout=min(self.timeout, _CHECK_TIMEOUT)) as got:
                body = json.loads(got.read(_CHECK_BYTES))
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                return f"{url} refused the API key ({exc.code}): check OPENAI_API_KEY"
            if exc.code == 404 and self._path_hint():
                return f"{url} answered 404{self._path_hint()}"
            return None  # no list there: the first fold will tell
        except (OSError, http.client.HTTPException) as exc:  # refused, unreachable, not HTTP
            return f"the model server at {self.base} does not answer ({exc!r})"
        except ValueError:  # not JSON
            return None
        entries = body.get("data") if isinstance(body, dict) else None
        if not isinstance(entries, list):
            return None
        entries = [e for e in entries if isinstance(e, dict)]
        if any(e.get("owned_by") == "llamacpp" for e in entries):
            return None  # llama.cpp's server folds with its one model, whatever the name
        names = {str(e.get("id")) for e in entries}
        if self.model in names or f"{self.model}:latest" in names:  # Ollama's default tag
            return None
        listed = ", ".join(sorted(names)[:10]) or "none"
        return (
            f"the model server at {self.base} has no model {self.model!r} (it lists: "
            f"{listed}): pull it (ollama pull {self.model}) or name another with --model "
            "(scripts/run --model; MEMORY_SUMMARIZER_MODEL for the service)"
        )

    def _path_hint(self) -> str:
        """For a 404: OpenAI-compatible servers answer under /v1, which a URL may leave out."""
        if self.base.rstrip("/").endswith("/v1"):
            return ""
        return (
            f": does --llm-url end in /v1? ({self.base}/v1; Ollama's is "
            "http://127.0.0.1:11434/v1, llama.cpp's server's http://127.0.0.1:8080/v1)"
        )

    def _post(self, data: bytes) -> Folded:
        """One call, within `timeout` in all: a socket's timeout bounds each read alone, and
        an answer trickled a byte at a time (its headers, its body) went on for ever, so a
        timer shuts the connection's socket at the deadline. urllib, for proxies
        (http_proxy, no_proxy) and redirects, with its connections handed to the timer."""
        made: list[http.client.HTTPConnection] = []
        fired = threading.Event()
        opener = urllib.request.build_opener(_Watched(made, fired))
        request = urllib.request.Request(self.endpoint, data=data, headers=self._headers())
        deadline = time.monotonic() + self.timeout
        cut = threading.Timer(self.timeout, _cut_off, (made, fired))
        cut.daemon = True
        cut.start()
        try:
            with opener.open(request, timeout=self.timeout) as response:
                raw = self._read(response, deadline)
        except urllib.error.HTTPError as exc:
            with exc:
                detail = b"" if fired.is_set() else exc.read(300)
            if fired.is_set() or time.monotonic() >= deadline:
                raise self._too_slow() from None
            raise ModelError(
                f"{self.endpoint} answered {exc.code}: "
                + detail.decode("utf-8", "replace").strip()
                + (self._path_hint() if exc.code == 404 else ""),
                timed_out=exc.code in _GAVE_UP,  # a proxy in front of a model too slow
                kind=f"answered {exc.code}",
            ) from None
        except (OSError, ValueError, http.client.HTTPException) as exc:
            if fired.is_set() or time.monotonic() >= deadline:
                raise self._too_slow() from None
            if isinstance(exc, http.client.HTTPException):  # not HTTP, an answer cut short
                raise ModelError(
                    f"{self.endpoint}: a broken answer ({exc!r})", kind="broken"
                ) from None
            raise ModelError(  # refused, unreachable, timed out, a name that does not resolve
                f"{self.endpoint}: {exc}", timed_out=_timed_out(exc), kind="unreachable"
            ) from None
        except ModelError as exc:
            if (fired.is_set() or time.monotonic() >= deadline) and not exc.timed_out:
                raise self._too_slow() from None  # cut off: not its fault
            raise
        finally:
            cut.cancel()
            for conn in made:
                conn.close()
        if fired.is_set():  # cut off where a closed connection reads as an end
            raise self._too_slow()
        return parse_completion(raw)

    def _too_slow(self) -> ModelError:
        return ModelError(
            f"{self.endpoint} did not answer within {self.timeout}s", timed_out=True, kind="slow"
        )

    def _read(self, response: http.client.HTTPResponse, deadline: float) -> bytes:
        """The answer's body, up to MAX_ANSWER_BYTES, until `deadline` (the timer's backstop:
        it finds no socket to shut while a slow name lookup or connect goes on)."""
        chunks, size = [], 0
        while chunk := response.read1(_READ):
            chunks.append(chunk)
            size += len(chunk)
            if time.monotonic() >= deadline:
                raise self._too_slow()
            if size > MAX_ANSWER_BYTES:
                raise ModelError(
                    f"{self.endpoint} answered more than {MAX_ANSWER_BYTES} bytes: the model "
                    f"did not keep to the max_tokens it was asked for ({self.summary_tokens} "
                    "or fewer)",
                    kind="too large",
                )
        if response.length:  # its Content-Length not reached: the connection closed
            raise ModelError(
                f"{self.endpoint}: a broken answer (cut short, {response.length} bytes missing)",
                kind="broken",
            )
        return b"".join(chunks)


_T = TypeVar("_T")


async def _in_thread(call: Callable[[], _T]) -> _T:
    """`call()` on a daemon thread of its own: a stop does not wait up to the model's
    timeout for it (asyncio.to_thread's executor is joined when the loop closes)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[_T] = loop.create_future()

    def run() -> None:
        try:
            result: _T | None = call()
            failed: BaseException | None = None
        except BaseException as exc:  # handed to the waiting coroutine
            result, failed = None, exc
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
            loop.call_soon_threadsafe(_settle, done, result, failed)

    threading.Thread(target=run, name="model call", daemon=True).start()
    return await done


def _settle(done: asyncio.Future[_T], result: _T | None, exc: BaseException | None) -> None:
    if done.done():  # cancelled meanwhile
        return
    if exc is not None:
        done.set_exception(exc)
    else:
        done.set_result(result)  # type: ignore[arg-type]  # None only with an exception


_THINKING = re.compile(r"^\s*<think>.*?</think>", re.DOTALL)


def parse_completion(raw: bytes) -> Folded:
    """The summary in a chat-completions answer; ModelError for anything else."""
    try:
        body = json.loads(raw)
        text = body["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise ModelError(
            f"not a chat completion: {raw[:200]!r}", kind="not a chat completion"
        ) from None
    thought = False
    if isinstance(text, str) and text.lstrip().startswith("<think>"):
        # A thinking model's reasoning is not the summary, nor counted in its tokens; one
        # cut off before its end (out of tokens) leaves no summary.
        text, thought = _THINKING.sub("", text), True
        if text.lstrip().startswith("<think>"):
            raise ModelError("the model's answer is reasoning that never ended (</think>)")
    if not isinstance(text, str) or not text.strip():
        raise ModelError("the model answered an empty summary")
    if any("\ud800" <= ch <= "\udfff" for ch in text):
        raise ModelError("the model answered text that is not valid UTF-8 (a lone surrogate)")
    usage = body.get("usage") if isinstance(body, dict) else None
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    # A count the worker would refuse (past MAX_TOKENS) is estimated instead: the save is
    # not refused for ever.
    known = not thought and isinstance(tokens, int) and 0 <= tokens <= MAX_TOKENS
    return Folded(text.strip(), tokens if known else None)


class _Watched(urllib.request.HTTPHandler, urllib.request.HTTPSHandler):
    """urllib's HTTP and HTTPS handlers (certificates verified as theirs are), each
    connection put in `made` for `_cut_off`, and refused once `fired` (a name lookup or
    connect that outlasted the call's time, when there was no socket yet to shut)."""

    def __init__(self, made: list[http.client.HTTPConnection], fired: threading.Event) -> None:
        super().__init__()
        self.made, self.fired = made, fired

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(self._maker(_Connection), req)

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(self._maker(_TlsConnection), req)

    def _maker(self, kind: type[_Connection]) -> Callable[..., http.client.HTTPConnection]:
        def make(host: str, **kwargs: Any) -> http.client.HTTPConnection:
            conn = kind(host, **kwargs)
            conn.fired = self.fired
            self.made.append(conn)
            return conn

        return make


class _Connection(http.client.HTTPConnection):
    fired: threading.Event

    def connect(self) -> None:
        super().connect()
        if self.fired.is_set():
            raise TimeoutError("the call's time ran out while it connected")


class _TlsConnection(_Connection, http.client.HTTPSConnection):
    pass


def _cut_off(made: list[http.client.HTTPConnection], fired: threading.Event) -> None:
    """At a call's deadline: a read waiting on a socket of the call ends (shutdown wakes
    it)."""
    fired.set()
    for conn in list(made):
        sock = conn.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def _timed_out(exc: BaseException) -> bool:
    # urllib wraps a connect timeout in URLError; a slow answer raises TimeoutError itself.
    reason = getattr(exc, "reason", None)
    return isinstance(exc, TimeoutError) or isinstance(reason, TimeoutError)
