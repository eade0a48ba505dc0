"""The default backend: the pure store, in this process's memory."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from worker import constants as c
from worker.backends.base import Backend, Counts
from worker.protocol import Event, Request, Result
from worker.store import Limits, Store


class MemoryBackend(Backend):
    """Everything in RAM: fastest, and forgotten when the worker stops."""

    name = "memory"
    list_step = c.LIST_STEP

    def __init__(
        self,
        limits: Limits,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.store = Store(limits, clock=clock, wall=wall)
        self._clock = clock

    async def execute(self, requests: Sequence[Request]) -> tuple[list[Result], list[Event]]:
        run = self.store.execute
        results = [run(req) for req in requests]
        await self._commit()
        return results, self.store.take_events()

    def execute_now(self, requests: Sequence[Request]) -> tuple[list[Result], list[Event]]:
        if not self.immediate:  # an engine that makes changes durable in _commit (SQLite)
            raise NotImplementedError(f"the {self.name} backend is not immediate")
        run = self.store.execute
        return [run(req) for req in requests], self.store.take_events()

    async def expire(self) -> tuple[bool, list[Event]]:
        more = self.store.expire()
        await self._commit()
        return more, self.store.take_events()

    @property
    def immediate(self) -> bool:  # type: ignore[override]
        # Not for a subclass whose _commit does something: it must be awaited before replies.
        return type(self)._commit is MemoryBackend._commit

    def next_expiry(self) -> float:
        return self.store.next_deadline() - self._clock()

    async def _commit(self) -> None:
        """Make what the store just did durable; nothing to do in memory (see sqlite.py)."""

    def counts(self) -> Counts:
        s = self.store
        return Counts(s.conversations, s.turns, s.bytes, s.keys)
