"""What the worker tells systemd: the notify protocol (sd_notify(3)) and journald's log format.

The protocol is one datagram of `KEY=value` lines to the AF_UNIX socket named by
$NOTIFY_SOCKET (a name starting with `@` is in the abstract namespace); spoken here
directly, so no library is needed. Outside systemd $NOTIFY_SOCKET is unset and every call
does nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

log = logging.getLogger("memory_worker")
# Seconds of start each extension gives: past the next one, for the part of opening that
# runs on the event loop (a store's rows loaded into memory: seconds on a Pi).
EXTEND_FOR = 30.0

_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


class Notifier:
    """Sends READY, STATUS, WATCHDOG and STOPPING to systemd, when systemd asks for them.

    Args:
        address: the socket from $NOTIFY_SOCKET, or None to do nothing.
        watchdog: seconds within which systemd expects a WATCHDOG=1, or None.
    """

    def __init__(self, address: str | None, watchdog: float | None = None) -> None:
        self.address: str | bytes | None = address
        if address is not None and address.startswith("@"):
            self.address = b"\0" + address[1:].encode()
        self.watchdog = watchdog
        self._status = ""
        self._sock: socket.socket | None = None
        self._failing = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Notifier:
        """The notifier systemd asked for in the environment ($NOTIFY_SOCKET, $WATCHDOG_USEC)."""
        watchdog = None
        pid = environ.get("WATCHDOG_PID")
        usec = environ.get("WATCHDOG_USEC", "")
        # WATCHDOG_PID names the process the watchdog is for; a child must not answer for it.
        if usec.isdigit() and int(usec) > 0 and (pid is None or pid == str(os.getpid())):
            watchdog = int(usec) / 1e6
        return cls(environ.get("NOTIFY_SOCKET") or None, watchdog)

    def notify(self, *lines: str) -> None:
        """Send one datagram; a failure is logged, never raised (systemd may have gone)."""
        if self.address is None:
            return
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(lines).encode(), self.address)
        except OSError as exc:
            if not self._failing:  # once, not at every watchdog ping
                log.warning("could not notify systemd: %s", exc)
            self._failing = True
        else:
            self._failing = False

    def ready(self, status: str) -> None:
        self._status = status
        self.notify("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        """Tell `systemctl status` what the worker does now (sent only when it changed)."""
        if status != self._status:
            self._status = status
            self.notify(f"STATUS={status}")

    async def extend_start(
        self, what: str, stop: asyncio.Event, every: float = 5.0, most: float = 600.0
    ) -> None:
        """While the worker opens its store: STATUS says `what`, and EXTEND_TIMEOUT_USEC gives
        the start EXTEND_FOR more every `every` s, for up to `most` s in all (a store that
        hangs is still given up), until `stop` is set (systemd applies an extension to the
        stop's timeout too). A large SQLite file, rebuilt once after an upgrade, may take
        longer on a Pi's SD card than the unit's TimeoutStartSec, and a start killed there
        rolls the rebuild back, again at every restart."""
        if self.address is None:
            return
        self._status = what
        end = time.monotonic() + most
        while not stop.is_set():
            self.notify(f"STATUS={what}", f"EXTEND_TIMEOUT_USEC={round(EXTEND_FOR * 1e6)}")
            if time.monotonic() + every > end:
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(every):
                    await stop.wait()

    def stopping(self) -> None:
        self.notify("STOPPING=1", "STATUS=stopping")

    async def keep_alive(self, status: Callable[[], str], every: float = 5.0) -> None:
        """Ping the watchdog every half of its interval (or every `every` s without one),
        refreshing STATUS at each tick.

        The pings come from the event loop itself, so a wedged loop stops them and systemd
        restarts the worker.
        """
        if self.address is None:
            return
        period = every if self.watchdog is None else self.watchdog / 2
        while True:
            if self.watchdog is not None:
                self.notify("WATCHDOG=1")
            self.status(status())
            await asyncio.sleep(period)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class JournalFormatter(logging.Formatter):
    """One line per record, each prefixed with its syslog priority (`<4>` for a warning),
    which journald turns into the entry's level; journald adds the timestamp itself."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        priority = _PRIORITY.get(record.levelno, 6 if record.levelno < logging.WARNING else 3)
        return "\n".join(f"<{priority}>{line}" for line in super().format(record).splitlines())


def under_journald(environ: Mapping[str, str], stream_fd: int = 2) -> bool:
    """True when `stream_fd` is the journal stream systemd gave us ($JOURNAL_STREAM)."""
    device, _, inode = environ.get("JOURNAL_STREAM", "").partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        st = os.fstat(stream_fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (int(device), int(inode))


def configure_logging(level: str, environ: Mapping[str, str]) -> None:
    """Log at `level` to stderr: journald's priorities under systemd, timestamps otherwise."""
    if under_journald(environ):
        handler = logging.StreamHandler()
        handler.setFormatter(JournalFormatter())
        logging.basicConfig(level=level.upper(), handlers=[handler])
    else:
        logging.basicConfig(
            level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
    logging.getLogger("mqtt").setLevel(logging.WARNING)
