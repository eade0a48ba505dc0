"""What every framework adapter shares: a blocking client of its own, or one it was given."""

from __future__ import annotations

import os
import threading
import weakref

from worker.client import BlockingMemoryClient, open_blocking_memory


def default_url() -> str:
    """The broker scripts/run starts, on the port `scripts/run --own-broker` says to export:
    MEMORY_WORKER_HOST, _PORT and _PREFIX as memctl reads them, when an adapter is made."""
    return "mqtt://{}:{}/{}".format(
        os.environ.get("MEMORY_WORKER_HOST") or "127.0.0.1",
        os.environ.get("MEMORY_WORKER_PORT") or "1883",
        os.environ.get("MEMORY_WORKER_PREFIX") or "mem",
    )


def missing_extra(extra: str, exc: ModuleNotFoundError) -> ModuleNotFoundError:
    """The error for an adapter whose framework is not installed: which extra brings it."""
    return ModuleNotFoundError(
        f"worker.client.{extra} needs the {extra!r} extra ({exc.name} is not installed): in "
        f"the clone, .venv/bin/pip install -e '.[{extra}]'; into another environment, "
        f"pip install '<the clone>[{extra}]' (the package is not on PyPI)",
        name=exc.name,
    )


class OnClient:
    """An adapter over a BlockingMemoryClient.

    Args:
        url: where the memory is, as for `open_blocking_memory` (by default `default_url()`).
        client: an open BlockingMemoryClient to share (not with `url`; `close()` leaves it
            open); by default the adapter opens its own, closed by `close()` or
            when the adapter is garbage collected (so not one to hand to another adapter).
    """

    def __init__(self, url: str | None = None, client: BlockingMemoryClient | None = None) -> None:
        if client is not None and not isinstance(client, BlockingMemoryClient):
            raise TypeError(
                f"client must be a BlockingMemoryClient (open_blocking_memory), not "
                f"{type(client).__name__}: the adapters call it from the framework's threads"
            )
        if client is not None and url is not None:
            raise TypeError("give url or client, not both: the client already has its memory")
        own = client is None
        self.client = open_blocking_memory(url or default_url()) if client is None else client
        # Frameworks make an adapter per call and drop it without closing it (LangChain's
        # RunnableWithMessageHistory): each left a connection and two threads behind.
        self._own = weakref.finalize(self, _close, self.client) if own else None

    def close(self) -> None:
        """Close the connection the adapter opened for itself."""
        if self._own is not None:
            self._own()  # once: it is then dead


def _close(client: BlockingMemoryClient) -> None:
    try:
        client.close()
    except RuntimeError:  # collected on the client's own loop thread, which close() stops
        threading.Thread(target=client.close, name="memory-client-close", daemon=True).start()
