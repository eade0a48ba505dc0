"""The API shape every memory shares: the store's methods on top of one `_request`, the
checks and reply handling around it, and the fan-out of eviction events."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import random
import re
from collections.abc import AsyncGenerator, Callable, Coroutine, Iterator
from typing import Any, Concatenate, ParamSpec, TypeVar

from worker import constants as c
from worker.client._errors import BadPayloadError, BadRequestError, UnavailableError, error_for
from worker.client._models import (
    Appended,
    Context,
    ConversationInfo,
    Eviction,
    Summarized,
    Turn,
)
from worker.errors import Unavailable, WorkerError
from worker.protocol import check_request


def _refuse(convo: str, op: str, body: dict[str, Any]) -> None:
    """Raise what the worker would answer to this request, before sending it."""
    try:
        check_request(convo, op, body)
    except WorkerError as exc:
        raise error_for(exc.code, exc.message) from None


def _not_open() -> RuntimeError:
    return RuntimeError(
        "the memory client is not open: use it inside `async with` (MemoryClient, "
        "open_memory) or `with` (BlockingMemoryClient), not before or after it"
    )


def ask_again(reply: Any, attempt: int, last: bool) -> float | None:
    """Seconds to pause before asking again, when the worker answered `unavailable` (Redis
    did not answer in time, its backlog behind a flood, too many listing pages waiting: "ask
    again later") and an attempt is left; else None. The pause doubles from a tenth of a
    second up to one, each drawn from its upper half so that clients refused together do
    not all come back together."""
    if not isinstance(reply, dict) or reply.get("ok"):
        return None
    error = reply.get("error")
    if not isinstance(error, dict) or error.get("code") != Unavailable.code:
        return None
    if last:
        if attempt > 1 and isinstance(error.get("message"), str):
            error["message"] += f" ({attempt} attempts)"
        return None
    pause = min(_AGAIN_MOST, _AGAIN_FIRST * 2 ** (attempt - 1))
    return random.uniform(pause / 2, pause)


_AGAIN_FIRST = 0.1
_AGAIN_MOST = 1.0


def _ok(reply: Any) -> dict[str, Any]:
    if not isinstance(reply, dict):
        raise BadPayloadError("reply is not a msgpack map")
    if not reply.get("ok"):
        error = reply.get("error") or {}
        code, message = str(error.get("code", "internal")), str(error.get("message", ""))
        raise error_for(code, message, error)
    return reply


_T = TypeVar("_T")
_P = ParamSpec("_P")
Reply = dict[str, Any]
# One request of the API: the conversation, the operation and the body to send, and what
# the reply (a map that said ok) becomes for the caller.
Plan = tuple[str, str, dict[str, Any], Callable[[Reply], _T]]
# Each single-request method's plan, by name: the blocking client's threads send them.
PLANS: dict[str, Callable[..., Plan[Any]]] = {}


def _one_request(
    plan: Callable[Concatenate[Any, _P], Plan[_T]],
) -> Callable[Concatenate[Any, _P], Coroutine[Any, Any, _T]]:
    """The API method that sends the one request `plan` makes of its arguments.

    The blocking client's threads call the plan and send it themselves: run as coroutines
    (two of them, each ending in StopIteration), the same calls cost a tenth more of a
    blocking call's CPU, measured from 8 threads (docs/performance.md).
    """

    async def method(self: _Api, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        convo, op, body, read = plan(self, *args, **kwargs)
        return read(await self._request(convo, op, body))

    functools.update_wrapper(method, plan, updated=())
    # help(), inspect and typing.get_type_hints show the plan's parameters and what the
    # method returns, not the plan: "Plan[Appended]" -> "Appended".
    signature = inspect.signature(plan)
    returns = str(signature.return_annotation)[len("Plan[") : -1]
    method.__signature__ = signature.replace(return_annotation=returns)  # type: ignore[attr-defined]
    method.__annotations__ = {**plan.__annotations__, "return": returns}
    PLANS[plan.__name__] = plan
    return method


class _Api:
    """The store's API on top of one `_request`, shared by every implementation."""

    async def _request(self, convo: str, op: str, body: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def _list_patience(self) -> float:
        """Seconds a listing page asks again while the worker answers that other listings
        fill its waiting pages (none in-process: no page ever waits there)."""
        return 0.0

    @_one_request
    def append(
        self,
        convo_id: str,
        role: str,
        content: str,
        *,
        request_id: str | None = None,
        tokens: int | None = None,
    ) -> Plan[Appended]:
        """Store a turn; its `seq` and the conversation's turn `count`.

        `request_id` replaces the id the client makes: a repeat of the same id is stored once.
        `tokens` is the turn's length in your model's tokenizer; without it the worker
        estimates ceil(UTF-8 bytes / 4).
        """
        body = _with_id({"role": role, "content": content}, request_id)
        if tokens is not None:
            body["tokens"] = tokens
        return convo_id, c.OP_APPEND, body, _appended

    @_one_request
    def get(
        self, convo_id: str, last: int | None = None, max_tokens: int | None = None
    ) -> Plan[list[Turn]]:
        """The conversation's turns (the `last` ones, the newest that fit `max_tokens`), oldest
        first; [] when unknown. The summary is not returned (see `context`), nor counted."""
        body: dict[str, Any] = {} if last is None else {"last": last}
        if max_tokens is not None:
            body.update(max_tokens=max_tokens, summary=False)
        return convo_id, c.OP_GET, body, _turns

    @_one_request
    def context(
        self, convo_id: str, max_tokens: int | None = None, *, last: int | None = None
    ) -> Plan[Context]:
        """What fits a model of `max_tokens`: the summary, counted first, and the newest whole
        turns that fit with it (all of them without a budget)."""
        body: dict[str, Any] = {"summary": True}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        if last is not None:
            body["last"] = last
        return convo_id, c.OP_GET, body, _context

    @_one_request
    def summarize(
        self,
        convo_id: str,
        text: str,
        upto: int,
        base: int,
        *,
        tokens: int | None = None,
        request_id: str | None = None,
        born: int | None = None,
    ) -> Plan[Summarized]:
        """Save the conversation's summary, covering its turns up to seq `upto`, in place of
        the one whose upto is `base` (0: none); the covered turns are removed with it.
        With `born` (a trimmed event's), only if the conversation is still that one.
        Raises ConflictError (with the current `upto`) when `base` is not current."""
        body = _with_id({"text": text, "upto": upto, "base": base}, request_id)
        if tokens is not None:
            body["tokens"] = tokens
        if born is not None:
            body["born"] = born
        return convo_id, c.OP_SUMMARY, body, _summarized

    @_one_request
    def forget(self, convo_id: str, *, request_id: str | None = None) -> Plan[int]:
        """Delete a conversation and its state; how many turns were removed."""
        return convo_id, c.OP_DELETE, _with_id({}, request_id), _deleted

    @_one_request
    def save(
        self,
        session_id: str,
        namespace: str,
        key: str,
        value: Any,
        ttl: float | None = None,
        *,
        request_id: str | None = None,
    ) -> Plan[None]:
        """Save a state value (any msgpack value), for `ttl` seconds if given."""
        body = _with_id({"ns": namespace, "key": key, "value": value}, request_id)
        if ttl is not None:
            body["ttl"] = ttl
        return session_id, c.OP_STATE_SAVE, body, _nothing

    @_one_request
    def load(
        self,
        session_id: str,
        namespace: str,
        key: str,
        *,
        ttl: float | None = None,
        default: Any = None,
    ) -> Plan[Any]:
        """A state value, or `default` when there is none (a key saved as None is found:
        a `default` of your own tells them apart); with `ttl`, a found key that has a TTL
        lives `ttl` seconds from now (its value untouched; one saved without a TTL keeps
        none)."""
        body: dict[str, Any] = {"ns": namespace, "key": key}
        if ttl is not None:
            body["ttl"] = ttl
        return session_id, c.OP_STATE_LOAD, body, functools.partial(_value_or, default)

    @_one_request
    def get_all(self, session_id: str, namespace: str) -> Plan[dict[str, Any]]:
        """Every live key of a namespace with its value."""
        return session_id, c.OP_STATE_GET_ALL, {"ns": namespace}, _items

    @_one_request
    def delete(
        self, session_id: str, namespace: str, key: str, *, request_id: str | None = None
    ) -> Plan[bool]:
        """Delete a state key; whether it existed."""
        body = _with_id({"ns": namespace, "key": key}, request_id)
        return session_id, c.OP_STATE_DELETE, body, _deleted

    # --- listing (issue 22) ---------------------------------------------------------------

    async def conversations(
        self, prefix: str | None = None, *, page_size: int = c.DEFAULT_LIST_LIMIT
    ) -> AsyncGenerator[ConversationInfo, None]:
        """Every live conversation (those whose id starts with `prefix`), in id order,
        fetched `page_size` at a time as you iterate. Listing is not a use: it refreshes no
        TTL. Like Redis SCAN, a conversation live throughout is returned at least once; one
        created or removed meanwhile may or may not be."""
        fits = isinstance(page_size, int) and not isinstance(page_size, bool)
        if not fits or not 1 <= page_size <= c.MAX_LIST_LIMIT:  # the worker's says 'limit'
            raise BadRequestError(f"'page_size' must be an integer 1-{c.MAX_LIST_LIMIT}")
        body: dict[str, Any] = {"limit": page_size}
        if prefix:
            body["prefix"] = prefix
        while True:
            reply = await self._list_page(body)
            for info in reply["conversations"]:
                yield info
            if reply["cursor"] is None:
                return
            body["cursor"] = reply["cursor"]

    async def _list_page(self, body: dict[str, Any]) -> dict[str, Any]:
        """One page. Other listings may fill the worker's waiting pages (8 with the default
        --max-inflight): the page asks again, and the listing keeps its place, for as long
        as a request's attempts may take (`_list_patience`). It gave up after three quick
        attempts."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        again = False  # whether it asked again, past its request's own attempts
        while True:
            try:
                return await self._request(c.CONVERSATIONS_LEVEL, c.OP_LIST, body)
            except UnavailableError as exc:
                if loop.time() + _AGAIN_MOST <= start + self._list_patience():
                    await asyncio.sleep(random.uniform(_AGAIN_MOST / 2, _AGAIN_MOST))
                    again = True
                    continue
                if not again:
                    raise
                said = re.sub(r" \(\d+ attempts\)$", "", exc.message)
                raise UnavailableError(
                    f"{said} (the page asked again for {loop.time() - start:.0f}s)"
                ) from None

    @_one_request
    def namespaces(self, session_id: str) -> Plan[list[str]]:
        """The state namespaces of a conversation that hold live keys (not a use)."""
        return session_id, c.OP_STATE_NAMESPACES, {}, _namespaces


# What each reply becomes.
def _appended(reply: Reply) -> Appended:
    return Appended(reply["seq"], reply["count"])


def _turns(reply: Reply) -> list[Turn]:
    turns: list[Turn] = reply["turns"]
    return turns


def _context(reply: Reply) -> Context:
    return Context(reply.get("summary"), reply["turns"], reply.get("tokens", 0))


def _summarized(reply: Reply) -> Summarized:
    return Summarized(reply["upto"], reply["dropped"])


def _with_id(body: dict[str, Any], request_id: str | None) -> dict[str, Any]:
    """`body` with the caller's id in place of the one the client would make."""
    if request_id is not None:
        body["id"] = request_id
    return body


def _deleted(reply: Reply) -> Any:
    return reply["deleted"]


def _nothing(reply: Reply) -> None:
    return None


def _value_or(default: Any, reply: Reply) -> Any:
    return reply["value"] if reply.get("found") else default


def _items(reply: Reply) -> dict[str, Any]:
    items: dict[str, Any] = reply["items"]
    return items


def _namespaces(reply: Reply) -> list[str]:
    names: list[str] = reply["namespaces"]
    return names


class _Fanout:
    """Eviction events handed to every open `evictions()` iterator."""

    def __init__(self) -> None:
        self.queues: dict[asyncio.Queue[Eviction | None], str | None] = {}

    def publish(self, event: Eviction) -> None:
        for queue, convo in self.queues.items():
            if convo is None or convo == event["convo"]:
                queue.put_nowait(event)

    def end(self) -> None:
        """The memory closed: every open iterator ends (None ends it)."""
        for queue in self.queues:
            queue.put_nowait(None)

    @contextlib.contextmanager
    def listen(self, convo: str | None) -> Iterator[asyncio.Queue[Eviction | None]]:
        queue: asyncio.Queue[Eviction | None] = asyncio.Queue()
        self.queues[queue] = convo
        try:
            yield queue
        finally:
            del self.queues[queue]
