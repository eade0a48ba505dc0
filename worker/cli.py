"""`memory-worker`: read the configuration, then hand it to the service."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence

from worker import __version__
from worker.backend_url import redact_urls
from worker.backends import Backend, create_backend
from worker.config import Config, from_args, unknown_variables, wants_version
from worker.errors import ConfigError
from worker.service import Service
from worker.systemd import configure_logging


async def serve(cfg: Config, backend: Backend) -> None:
    """Run the worker on `backend` until SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    service = Service(cfg, backend)
    await service.run(stop)
    logging.getLogger("memory_worker").info("stopped")


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if wants_version(args):
        print(__version__)
        return 0
    try:
        cfg = from_args(args, os.environ)
        backend = create_backend(cfg)
    except ConfigError as exc:
        # It may repeat a flag's value as given: a --backend URL's password, say.
        print(f"memory-worker: error: {redact_urls(str(exc))}", file=sys.stderr)
        return 2
    configure_logging(cfg.log_level, os.environ)
    for problem in unknown_variables(os.environ):
        logging.getLogger("memory_worker").warning("%s", problem)
    try:
        asyncio.run(serve(cfg, backend))
    except ConfigError as exc:
        print(f"memory-worker: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
