"""Storage engines behind one interface, chosen by `--backend URL`."""

from __future__ import annotations

from worker.backends.base import Backend, Counts
from worker.config import Config
from worker.errors import ConfigError


def create_backend(cfg: Config) -> Backend:
    """The backend `cfg.backend` names (not yet opened)."""
    url = cfg.backend
    if url == "memory":
        from worker.backends.memory import MemoryBackend

        return MemoryBackend(cfg.limits)
    if url.startswith("sqlite:"):
        from worker.backends.sqlite import SqliteBackend

        return SqliteBackend(url, cfg.limits)
    if url.startswith(("redis:", "rediss:", "unix:")):
        from worker.backends.redis import RedisBackend

        return RedisBackend(url, cfg.limits, prefix=cfg.prefix)
    raise ConfigError(f"--backend {url!r} is not supported")


__all__ = ["Backend", "Counts", "create_backend"]
