"""What every framework adapter shares: a blocking client of its own, or one it was given."""

from __future__ import annotations

from worker.client import BlockingMemoryClient, open_blocking_memory

DEFAULT_URL = "mqtt://127.0.0.1:1883/mem"


def missing_extra(extra: str, exc: ModuleNotFoundError) -> ModuleNotFoundError:
    """The error for an adapter whose framework is not installed: which extra brings it."""
    return ModuleNotFoundError(
        f"worker.client.{extra} needs the {extra!r} extra ({exc.name} is not installed): in "
        f"a clone, .venv/bin/pip install -e '.[{extra}]'; elsewhere, "
        f"pip install 'memory-worker[{extra}]'",
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
