"""`BlockingMemoryClient`: the API without `await`, on a private event-loop thread."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import threading
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Iterator
from typing import Any, Concatenate, ParamSpec, TypeVar

from worker.client._api import PLANS, _Api, _not_open
from worker.client._local import LocalMemory
from worker.client._models import ConversationInfo, Eviction
from worker.client._mqtt import MemoryClient, _closed_while_waiting
from worker.client._threads import DEFAULT_CONNECTIONS, ThreadRequests

_T = TypeVar("_T")
_P = ParamSpec("_P")

Memory = MemoryClient | LocalMemory
_CLOSING = 1.0  # seconds close() waits for the calls it cancelled to end


def _blocking(
    method: Callable[Concatenate[Any, _P], Coroutine[Any, Any, _T]],
) -> Callable[Concatenate[BlockingMemoryClient, _P], _T]:
    """The blocking twin of an async method of the memory, called by name on whichever
    memory the client drives. Over MQTT a method that sends one request (one with a plan)
    sends it from the calling thread, on a connection of its own."""
    name = method.__name__
    plan = PLANS.get(name)

    @functools.wraps(method)
    def call(self: BlockingMemoryClient, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        direct = self._direct
        if (
            plan is not None
            and direct is not None
            and threading.current_thread() is not self._thread
        ):
            convo, op, body, read = plan(None, *args, **kwargs)
            result: _T = read(direct.request(convo, op, body))
            return result
        coro: Coroutine[Any, Any, _T] = getattr(self.memory, name)(*args, **kwargs)
        return self._run(coro)

    return call


class BlockingMemoryClient:
    """The same API without `await`, for threaded programs (Flask, Django, scripts).

    The async client (or `memory://` store) runs on a private event-loop thread. Over MQTT
    each calling thread sends its request and reads its reply itself, on a connection of the
    client's that no other thread uses meanwhile: one per thread calling at once, up to
    `connections` (past that a call waits for one), kept open for the next calls. Events,
    stats and listing go through the loop's one connection. Use it as a plain context
    manager. The other arguments are `MemoryClient`'s.
    """

    def __init__(
        self,
        *args: Any,
        connections: int = DEFAULT_CONNECTIONS,
        _memory: Memory | None = None,
        **kwargs: Any,
    ) -> None:
        if isinstance(connections, bool) or not isinstance(connections, int) or connections < 1:
            raise ValueError(f"connections must be 1 or more, not {connections!r}")
        self._connections = connections
        self._memory: Memory = _memory if _memory is not None else MemoryClient(*args, **kwargs)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        # MQTT requests go out from the calling thread, on a connection of its own;
        # memory://'s take the loop.
        self._direct: ThreadRequests | None = None
        # Calls handed to the loop and not yet ended: closing ends them. The lock makes a
        # call either handed over before the close (and ended by it) or refused after.
        self._calls: set[concurrent.futures.Future[Any]] = set()
        self._lock = threading.Lock()
        self._shut: weakref.finalize[Any, Any] | None = None  # close()'s, once open

    def _submit(
        self, coro: Coroutine[Any, Any, _T], *, blocking: bool
    ) -> tuple[concurrent.futures.Future[_T], asyncio.AbstractEventLoop]:
        with self._lock:
            loop = self._loop
            if loop is None or (blocking and threading.current_thread() is self._thread):
                coro.close()
                if loop is None:
                    raise _not_open()
                raise RuntimeError("a blocking call on the client's own loop would wait forever")
            done = asyncio.run_coroutine_threadsafe(coro, loop)
            self._calls.add(done)
        done.add_done_callback(self._calls.discard)
        return done, loop

    def _run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        done, loop = self._submit(coro, blocking=True)
        try:
            return done.result()
        except concurrent.futures.CancelledError:
            if self._loop is not loop:  # ended by close()
                raise _closed_while_waiting() from None
            raise

    def __enter__(self) -> BlockingMemoryClient:
        return self.open()

    def open(self) -> BlockingMemoryClient:
        """Connect (once; opening an open client does nothing). A `with` block does it."""
        if self._loop is not None:
            return self
        loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=loop.run_forever, name="memory-client", daemon=True)
        self._thread.start()
        with self._lock:
            self._loop = loop
        try:
            self._run(self._enter())
        except BaseException:
            with self._lock:
                self._loop = None
            self._stop(loop)
            raise
        if isinstance(self._memory, MemoryClient):
            self._direct = ThreadRequests(self._memory, self._connections)
        # Dropped without close() (a web handler's per request), it left its connections and
        # two threads for the process's life (a trial): it is closed when collected, as a file
        # is. Not at exit: a loop that no longer runs would hold the exit for ever.
        self._shut = weakref.finalize(self, _shut, loop, self._thread, self._memory, self._direct)
        self._shut.atexit = False
        return self

    async def _enter(self) -> None:
        # The client's events and tasks must be made on the loop they run on.
        await self._memory.__aenter__()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Disconnect and stop the private loop (closing a closed client does nothing)."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("a blocking call on the client's own loop would wait forever")
        with self._lock:
            loop, self._loop = self._loop, None
        if loop is None:
            return
        direct, self._direct = self._direct, None
        try:
            if self._shut is not None:
                self._shut()  # once
            else:  # closed from another thread while it opened
                _shut(loop, self._thread, self._memory, direct)
        finally:
            self._cancel_calls()

    def _stop(self, loop: asyncio.AbstractEventLoop) -> None:
        _stop(loop, self._thread)
        self._cancel_calls()

    def _cancel_calls(self) -> None:
        for done in list(self._calls):  # a call that outlived its cancel
            done.cancel()

    def call(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Run `coro` (a call on `self.memory`) on the client's loop and wait for it, from
        any thread but the client's own (as the methods below do)."""
        return self._run(coro)

    async def run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Await `coro` (a call on `self.memory`) from any event loop: it runs on the
        client's own loop and connection, without blocking the caller's loop."""
        done, loop = self._submit(coro, blocking=False)
        try:
            return await asyncio.wrap_future(done)
        except asyncio.CancelledError:
            if done.cancelled() and self._loop is not loop:  # ended by close()
                raise _not_open() from None
            raise

    @property
    def memory(self) -> Memory:
        """The async client (or memory:// store) this one drives."""
        return self._memory

    # The store's methods, each `MemoryClient`'s (or `LocalMemory`'s) run to its end on the
    # private loop: one line here per method of the API, its signature and docstring taken
    # from the async one.
    append = _blocking(_Api.append)
    get = _blocking(_Api.get)
    context = _blocking(_Api.context)
    summarize = _blocking(_Api.summarize)
    forget = _blocking(_Api.forget)
    save = _blocking(_Api.save)
    load = _blocking(_Api.load)
    get_all = _blocking(_Api.get_all)
    delete = _blocking(_Api.delete)
    namespaces = _blocking(_Api.namespaces)
    stats = _blocking(MemoryClient.stats)

    def evictions(self, convo_id: str | None = None) -> Iterator[Eviction]:
        """Eviction events as they come, until you stop iterating or the client closes (from
        another thread: how a thread watching them is stopped)."""
        return self._iterate(lambda: self._memory.evictions(convo_id), ends_on_close=True)

    def conversations(
        self, prefix: str | None = None, *, page_size: int = 100
    ) -> Iterator[ConversationInfo]:
        """See MemoryClient.conversations: an iterator, paging underneath."""
        return self._iterate(lambda: self._memory.conversations(prefix, page_size=page_size))

    def _iterate(
        self, make: Callable[[], AsyncGenerator[_T, None]], *, ends_on_close: bool = False
    ) -> Iterator[_T]:
        """One of the async client's iterators, as a plain iterator run on the client's loop
        (closed on the loop when you stop). A listing cut short by close() raises: it is
        not whole."""
        items = make()
        opened = self._loop  # None: not open yet, and the first step says so
        try:
            while True:
                try:
                    yield self._run(_next(items))
                except StopAsyncIteration:
                    return
                except RuntimeError:
                    if ends_on_close and opened is not None and self._loop is None:
                        return
                    raise
        finally:
            if self._loop is not None:
                with contextlib.suppress(RuntimeError):  # closed meanwhile: nothing to close
                    self._run(items.aclose())


async def _next(items: AsyncIterator[_T]) -> _T:
    return await anext(items)


def _shut(
    loop: asyncio.AbstractEventLoop,
    thread: threading.Thread | None,
    memory: Memory,
    direct: ThreadRequests | None,
) -> None:
    """Close an open client's connections and stop its loop: by close(), or when the client
    is collected (then from whichever thread collects it: on its own loop's, from another)."""
    if threading.current_thread() is thread:
        args = (loop, thread, memory, direct)
        threading.Thread(target=_shut, args=args, name="memory-client-close", daemon=True).start()
        return
    if direct is not None:
        direct.close()
    try:
        asyncio.run_coroutine_threadsafe(_close(memory), loop).result()
    finally:
        _stop(loop, thread)


async def _close(memory: Memory) -> None:
    try:
        await memory.__aexit__(None, None, None)
    finally:
        # Calls handed over before the close end now, cancelled: "not open" to their callers.
        me = asyncio.current_task()
        if others := [task for task in asyncio.all_tasks() if task is not me]:
            for task in others:
                task.cancel()
            await asyncio.wait(others, timeout=_CLOSING)


def _stop(loop: asyncio.AbstractEventLoop, thread: threading.Thread | None) -> None:
    loop.call_soon_threadsafe(loop.stop)
    if thread is not None:
        thread.join()
    loop.close()
