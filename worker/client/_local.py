"""`LocalMemory`: the worker's own store in this process (what `memory://` opens)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any

import msgpack

from worker import constants as c
from worker import protocol
from worker.client._api import _Api, _Fanout, _not_open, _ok, _refuse
from worker.client._errors import error_for
from worker.client._models import Eviction
from worker.errors import ConfigError, TooLarge, WorkerError
from worker.protocol import Event, check_request, encode_result, reply_parsed, too_large_payload
from worker.store import Limits


class LocalMemory(_Api):
    """The worker's own store and protocol, in this process: the client's API without a
    broker (what `memory://` opens). Requests are checked, executed and answered by the
    same code the worker runs, so answers and errors are the same, a request's size against
    `max_payload_bytes` (the worker's --max-payload-bytes) included. `clock` is the store's
    monotonic clock, for TTL (tests pass a fake one)."""

    def __init__(
        self,
        limits: Limits | None = None,
        *,
        max_payload_bytes: int = c.DEFAULT_MAX_PAYLOAD_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from worker.backends.memory import MemoryBackend
        from worker.config import validate_limits

        self.limits = limits or Limits()
        try:  # the worker's own checks: a limit it refuses broke the first append here
            validate_limits(self.limits, max_payload_bytes, lambda name: name.replace("-", "_"))
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        self.max_payload_bytes = max_payload_bytes
        self._backend = MemoryBackend(self.limits, clock=clock)
        self._events = _Fanout()
        self._sweeper: asyncio.Task[None] | None = None
        self._started = time.monotonic()
        self._open = False  # inside `async with`: outside it a call raises, as MemoryClient's

    async def __aenter__(self) -> LocalMemory:
        if self._open:
            raise RuntimeError("the memory client is already open: one `async with` at a time")
        await self._backend.open()
        self._open = True
        self._sweeper = asyncio.create_task(self._sweep(), name="memory-sweeper")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._open = False
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        await self._backend.close()
        self._events.end()

    async def _sweep(self) -> None:
        while True:
            more, evictions = await self._backend.expire()
            self._announce(evictions)
            if not more:
                await asyncio.sleep(c.SWEEP_INTERVAL)

    def _announce(self, events: list[Event]) -> None:
        for ev in events:
            if not isinstance(ev, protocol.Eviction):
                continue
            self._events.publish(
                Eviction(convo=ev.convo, reason=ev.reason, count=ev.count, keys=ev.keys, ts=ev.ts)
            )

    async def _request(self, convo: str, op: str, body: dict[str, Any]) -> dict[str, Any]:
        if not self._open:
            raise _not_open()
        try:
            request = check_request(convo, op, body)
            size = len(msgpack.packb(body))
            if size > self.max_payload_bytes:  # as the worker measures what a client sends
                # memory://'s own setting, not a worker's flag (a trial)
                setting = "memory://?max_payload_bytes"
                raise TooLarge(too_large_payload(size, self.max_payload_bytes, setting))
        except WorkerError as exc:
            raise error_for(exc.code, exc.message) from None
        results, evictions = await self._backend.execute([request])
        self._announce(evictions)
        reply = msgpack.unpackb(encode_result(results[0], reply_parsed()), strict_map_key=False)
        return _ok(reply)

    async def evictions(self, convo_id: str | None = None) -> AsyncGenerator[Eviction, None]:
        """Eviction events as they come (of one conversation, or all), until you stop."""
        if not self._open:
            raise _not_open()
        if convo_id is not None:
            _refuse(convo_id, c.OP_GET, {})
        with self._events.listen(convo_id) as queue:
            while (event := await queue.get()) is not None:
                yield event

    async def stats(self) -> list[dict[str, Any]]:
        """This store's counts, shaped like one worker's stats."""
        if not self._open:
            raise _not_open()
        n = self._backend.counts()
        return [
            {
                "client_id": "memory",
                "conversations": n.conversations,
                "turns": n.turns,
                "bytes": n.bytes,
                "keys": n.keys,
                "uptime": round(time.monotonic() - self._started, 3),
                "ts": time.time(),
                "state": "online",  # as MemoryClient.stats() says of a worker
                "fresh": True,
            }
        ]
