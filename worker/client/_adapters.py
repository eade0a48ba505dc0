"""What every framework adapter shares: a blocking client of its own, or one it was given."""

from __future__ import annotations

import os

from worker.client import BlockingMemoryClient, open_blocking_memory

# The broker scripts/run starts, on the port `scripts/run --own-broker` says to export.
DEFAULT_URL = "mqtt://{}:{}/{}".format(  # as memctl reads them
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
        url: where the memory is, as for `open_blocking_memory`.
        client: an open BlockingMemoryClient to share (then `url` is not used and `close()`
            leaves it open); by default the adapter opens its own.
    """

    def __init__(self, url: str = DEFAULT_URL, client: BlockingMemoryClient | None = None) -> None:
        self._owned = client is None
        self.client = client if client is not None else open_blocking_memory(url)

    def close(self) -> None:
        """Close the connection the adapter opened for itself."""
        if self._owned:
            self.client.close()
            self._owned = False
