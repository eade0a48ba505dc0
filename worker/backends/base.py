"""The one interface the service stores through.

A backend holds the store's whole semantics (bounds, TTL, LRU, byte budget, eviction
reports); the MQTT layer never knows which engine is underneath. Calls are async and take
whole batches, so that a durable or networked engine commits or round-trips once per batch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from worker import constants as c
from worker.protocol import Event, Request, Result


@dataclass(frozen=True, slots=True)
class Counts:
    conversations: int
    turns: int
    bytes: int
    keys: int


class Backend(ABC):
    """Storage behind the service.

    Lifecycle: `open()` once, then any number of `execute()` and `expire()` calls from one
    task at a time, then `close()`. `execute()` returns only once every effect it reports
    is as durable as the engine promises, so the caller may acknowledge after it.
    """

    name: str = "backend"
    # What the store itself is called (a shared engine's: workers of a share group compare
    # theirs, and one on another Redis is named), once open() has read it; None otherwise.
    store_id: str | None = None
    # Conversations a listing page reads per execute() (None: the whole page at once). The
    # service serves other requests between steps, for engines that do the work on the event
    # loop's thread; one that awaits another server does not need steps.
    list_step: int | None = None
    # execute_now() applies a batch without waiting on anything (a thread, a server): the
    # service then serves a read's requests in the read's own event-loop turn.
    immediate: bool = False

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Connect, create or load what the engine needs."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Flush and release everything; the backend is unusable afterwards."""

    @abstractmethod
    async def execute(self, requests: Sequence[Request]) -> tuple[list[Result], list[Event]]:
        """Apply requests in order: one result each, plus every event they caused (evictions,
        and trimmed turns with --trimmed-events)."""

    def execute_now(self, requests: Sequence[Request]) -> tuple[list[Result], list[Event]]:
        """`execute()` on the caller's turn, for an `immediate` engine."""
        raise NotImplementedError(f"the {self.name} backend is not immediate")

    @abstractmethod
    async def expire(self) -> tuple[bool, list[Event]]:
        """Expire a bounded amount of what is due: (more is due, evictions)."""

    def next_expiry(self) -> float:
        """Seconds until `expire()` next has work (inf: not before a request makes some).

        The sweep sleeps that long. A backend that cannot know (or may miss deadlines set by
        others) returns a bounded poll; this default is the old fixed interval.
        """
        return c.SWEEP_INTERVAL

    def held_events(self) -> list[Event]:
        """Events of opening, which no execute() or expire() returns: those a durable
        backend kept unsent at its last run, and what opening under lower limits evicted or
        trimmed. Once: the service announces them on connecting."""
        return []

    def delivered(self, receipt: int) -> None:  # noqa: B027 - optional hook
        """The broker has the event of this `Trimmed.receipt`: it need not be kept."""

    @abstractmethod
    def counts(self) -> Counts:
        """What is stored now (as this worker last saw it)."""
