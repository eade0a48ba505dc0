"""Storage engines behind one interface, chosen by `--backend URL`."""

from __future__ import annotations

from worker.backend_url import parse_backend_url
from worker.backends.base import Backend, Counts
from worker.config import Config
from worker.errors import ConfigError


def create_backend(cfg: Config) -> Backend:
    """The backend `cfg.backend` names (not yet opened), judged by the one URL parser."""
    try:
        url = parse_backend_url(cfg.backend)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if url.kind == "memory":
        from worker.backends.memory import MemoryBackend

        return MemoryBackend(cfg.limits)
    if url.kind == "sqlite":
        from worker.backends.sqlite import SqliteBackend

        return SqliteBackend(url.url, cfg.limits)
    if url.kind == "cluster":
        from worker.backends.cluster import ClusterBackend

        return ClusterBackend(url, cfg.limits, prefix=cfg.prefix, max_payload=cfg.max_payload_bytes)
    from worker.backends.redis import RedisBackend

    return RedisBackend(url.url, cfg.limits, prefix=cfg.prefix, ssl_ca_certs=cfg.tls_ca)


__all__ = ["Backend", "Counts", "create_backend"]
