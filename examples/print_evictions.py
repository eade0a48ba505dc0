"""Dashboard side: print every eviction the worker announces, one line each.

.venv/bin/python examples/print_evictions.py [COUNT]

On the broker at MEMORY_URL (default: $MEMORY_WORKER_HOST, _PORT and _PREFIX, as memctl
reads them, or 127.0.0.1, 1883 and mem).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys

from worker.client import MemoryWorkerError, open_memory

# scripts/run --own-broker prints the MEMORY_WORKER_PORT to export.
DEFAULT_URL = "mqtt://{}:{}/{}".format(  # as memctl reads them
    os.environ.get("MEMORY_WORKER_HOST") or "127.0.0.1",
    os.environ.get("MEMORY_WORKER_PORT") or "1883",
    os.environ.get("MEMORY_WORKER_PREFIX") or "mem",
)


async def main(count: int | None) -> None:
    async with open_memory(os.environ.get("MEMORY_URL", DEFAULT_URL)) as memory:
        events = memory.evictions()
        waiting = asyncio.ensure_future(anext(events))
        await asyncio.sleep(0)  # the iterator subscribes first...
        await memory.stats()  # ...so after this round trip its subscription is in place
        print("watching", flush=True)
        seen = 0
        while count is None or seen < count:
            event = await waiting
            what = f"{event['reason']}, {event['count']} turns, {event['keys']} keys"
            print(f"{event['convo']}: {what}", flush=True)
            seen += 1
            waiting = asyncio.ensure_future(anext(events))
        waiting.cancel()


if __name__ == "__main__":
    if sys.argv[1:] and not sys.argv[1].isdigit():
        sys.exit("usage: examples/print_evictions.py [COUNT] (stop it with Ctrl-C)")
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else None))
    except MemoryWorkerError as exc:  # no broker, no worker, a refusal: one line, as memctl
        sys.exit(f"print_evictions: {exc.message}")
