"""`BlockingMemoryClient`: the API without `await`, on a private event-loop thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Iterator
from typing import Any, TypeVar

from worker.client._local import LocalMemory
from worker.client._models import (
    Appended,
    Context,
    ConversationInfo,
    Eviction,
    Summarized,
    Turn,
)
from worker.client._mqtt import MemoryClient

_T = TypeVar("_T")

Memory = MemoryClient | LocalMemory


class BlockingMemoryClient:
    """The same API without `await`, for threaded programs (Flask, Django, scripts).

    The async client (or `memory://` store) runs on a private event-loop thread; every
    thread's calls share its one connection. Use it as a plain context manager. Arguments
    are `MemoryClient`'s.
    """

    def __init__(self, *args: Any, _memory: Memory | None = None, **kwargs: Any) -> None:
        self._memory: Memory = _memory if _memory is not None else MemoryClient(*args, **kwargs)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def _run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        assert self._loop is not None, "use BlockingMemoryClient in a with block"
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("a blocking call on the client's own loop would wait forever")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def __enter__(self) -> BlockingMemoryClient:
        return self.open()

    def open(self) -> BlockingMemoryClient:
        """Connect (once; opening an open client does nothing). A `with` block does it."""
        if self._loop is not None:
            return self
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="memory-client", daemon=True)
        self._thread.start()
        try:
            self._run(self._enter())
        except BaseException:
            self._stop()
            raise
        return self

    async def _enter(self) -> None:
        # The client's events and tasks must be made on the loop they run on.
        await self._memory.__aenter__()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Disconnect and stop the private loop (closing a closed client does nothing)."""
        if self._loop is None:
            return
        try:
            self._run(self._memory.__aexit__(None, None, None))
        finally:
            self._stop()

    def _stop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None and self._thread is not None:
            loop.call_soon_threadsafe(loop.stop)
            self._thread.join()
            loop.close()

    def call(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Run `coro` (a call on `self.memory`) on the client's loop and wait for it, from
        any thread but the client's own (as the methods below do)."""
        return self._run(coro)

    async def run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Await `coro` (a call on `self.memory`) from any event loop: it runs on the
        client's own loop and connection, without blocking the caller's loop."""
        assert self._loop is not None, "use BlockingMemoryClient in a with block"
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    @property
    def memory(self) -> Memory:
        """The async client (or memory:// store) this one drives."""
        return self._memory

    def append(
        self,
        convo_id: str,
        role: str,
        content: str,
        *,
        request_id: str | None = None,
        tokens: int | None = None,
    ) -> Appended:
        """See MemoryClient.append."""
        return self._run(
            self._memory.append(convo_id, role, content, request_id=request_id, tokens=tokens)
        )

    def get(
        self, convo_id: str, last: int | None = None, max_tokens: int | None = None
    ) -> list[Turn]:
        """See MemoryClient.get."""
        return self._run(self._memory.get(convo_id, last, max_tokens))

    def context(
        self, convo_id: str, max_tokens: int | None = None, *, last: int | None = None
    ) -> Context:
        """See MemoryClient.context."""
        return self._run(self._memory.context(convo_id, max_tokens, last=last))

    def summarize(
        self,
        convo_id: str,
        text: str,
        upto: int,
        base: int,
        *,
        tokens: int | None = None,
        request_id: str | None = None,
    ) -> Summarized:
        """See MemoryClient.summarize."""
        return self._run(
            self._memory.summarize(convo_id, text, upto, base, tokens=tokens, request_id=request_id)
        )

    def forget(self, convo_id: str) -> int:
        """See MemoryClient.forget."""
        return self._run(self._memory.forget(convo_id))

    def save(
        self,
        session_id: str,
        namespace: str,
        key: str,
        value: Any,
        ttl: float | None = None,
        *,
        request_id: str | None = None,
    ) -> None:
        """See MemoryClient.save."""
        self._run(self._memory.save(session_id, namespace, key, value, ttl, request_id=request_id))

    def load(self, session_id: str, namespace: str, key: str) -> Any:
        """See MemoryClient.load."""
        return self._run(self._memory.load(session_id, namespace, key))

    def get_all(self, session_id: str, namespace: str) -> dict[str, Any]:
        """See MemoryClient.get_all."""
        return self._run(self._memory.get_all(session_id, namespace))

    def delete(self, session_id: str, namespace: str, key: str) -> bool:
        """See MemoryClient.delete."""
        return self._run(self._memory.delete(session_id, namespace, key))

    def stats(self) -> list[dict[str, Any]]:
        """See MemoryClient.stats."""
        return self._run(self._memory.stats())

    def evictions(self, convo_id: str | None = None) -> Iterator[Eviction]:
        """Eviction events as they come, until you stop iterating."""
        return self._iterate(lambda: self._memory.evictions(convo_id))

    def conversations(
        self, prefix: str | None = None, *, page_size: int = 100
    ) -> Iterator[ConversationInfo]:
        """See MemoryClient.conversations: an iterator, paging underneath."""
        return self._iterate(lambda: self._memory.conversations(prefix, page_size=page_size))

    def _iterate(self, make: Callable[[], AsyncGenerator[_T, None]]) -> Iterator[_T]:
        """One of the async client's iterators, as a plain iterator run on the client's loop
        (closed on the loop when you stop)."""
        items = make()
        try:
            while True:
                try:
                    yield self._run(_next(items))
                except StopAsyncIteration:
                    return
        finally:
            if self._loop is not None:
                self._run(items.aclose())

    def namespaces(self, session_id: str) -> list[str]:
        """See MemoryClient.namespaces."""
        return self._run(self._memory.namespaces(session_id))


async def _next(items: AsyncIterator[_T]) -> _T:
    return await anext(items)
