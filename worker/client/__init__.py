"""A Python client for memory-worker, with the API of the in-process store it replaces.

    async with MemoryClient("127.0.0.1") as memory:      # or: open_memory("mqtt://pi.local")
        await memory.append("kiosk-7", "user", "hello")
        turns = await memory.get("kiosk-7")

`BlockingMemoryClient` offers the same methods without `await`, for threaded programs;
`open_memory(url)` / `open_blocking_memory(url)` pick a broker (`mqtt://`, `mqtts://`) or the
worker's own store in this process (`memory://`) from a URL. See docs/client.md.

One private module per concern: `_errors` (the exception tree, by wire code), `_models`
(what calls return), `_api` (the methods every memory shares), `_mqtt` (`MemoryClient`),
`_local` (`LocalMemory`), `_blocking` (`BlockingMemoryClient`), `_threads` (its calls, each
on the calling thread's own connection); the URL factory is here. Framework adapters live
beside them (`worker.client.langchain`, `worker.client.langgraph`, and `_adapters`, what
they share).
"""

from __future__ import annotations

from typing import Any, NoReturn
from urllib.parse import parse_qs, unquote, urlencode, urlsplit, urlunsplit

from worker import constants as c
from worker.client._blocking import BlockingMemoryClient, Memory
from worker.client._errors import (
    BadPayloadError,
    BadRequestError,
    BadTopicError,
    ConflictError,
    InternalError,
    MemoryWorkerError,
    NoReplyError,
    RefusedError,
    TooLargeError,
    UnavailableError,
    error_for,
)
from worker.client._local import LocalMemory
from worker.client._models import (
    Appended,
    Context,
    ConversationInfo,
    Eviction,
    Summarized,
    Summary,
    Turn,
)
from worker.client._mqtt import (
    DEFAULT_ATTEMPTS,
    DEFAULT_TIMEOUT,
    MemoryClient,
    check_host,
    check_reply_prefix,
)
from worker.client._threads import DEFAULT_CONNECTIONS
from worker.store import Limits

# The bounds a memory:// URL sets (the store's costs are measured, not options).
_MEMORY_LIMITS = ("max_turns", "ttl", "max_conversations", "max_bytes", "max_keys")


def memory_from_url(url: str, **kwargs: Any) -> Memory:
    """An (unopened) async memory for `url`; keyword arguments go to MemoryClient.

    `mqtt://[user:password@]host[:port][/prefix]` (port 1883), `mqtts://...` (TLS, port
    8883; `?ca=FILE`), with `?timeout=S&qos=N&reply_prefix=T&protocol=3&attempts=N` as
    options; or
    `memory://?max_turns=8&ttl=3600&max_conversations=500` (also `max_bytes`, `max_keys`,
    `max_payload_bytes`).
    """
    parts = urlsplit(url)
    if parts.fragment or url.endswith("#"):
        raise ValueError(
            f"{url!r}: '#' starts a URL's fragment: a prefix cannot hold it (a wildcard), "
            "and a password writes it %23"
        )
    query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    if parts.scheme == "memory":
        if parts.netloc or parts.path.strip("/"):  # it would be left aside in silence
            raise ValueError(
                f"{url!r}: memory:// is this process's memory: no host nor prefix "
                "(memory://?max_turns=8)"
            )
        fields = {f: query.pop(f) for f in list(query) if f in _MEMORY_LIMITS}
        payload = query.pop("max_payload_bytes", None)
        if query:
            raise ValueError(f"memory:// does not take {', '.join(sorted(query))}")
        _refuse_empty(url, {**fields, "max_payload_bytes": payload})
        try:
            numbers: dict[str, Any] = {
                f: (float(v) if f == "ttl" else int(v)) for f, v in fields.items()
            }
            limits = Limits(**numbers)
            most = c.DEFAULT_MAX_PAYLOAD_BYTES if payload is None else int(payload)
        except ValueError:
            raise ValueError(f"bad number in {url!r}") from None
        try:
            return LocalMemory(limits, max_payload_bytes=most)
        except ValueError as exc:
            raise ValueError(f"{url!r}: {exc}") from None
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ValueError(f"{url!r}: the scheme must be mqtt, mqtts or memory")
    if not parts.hostname:  # mqtt:/host or mqtt:///prefix: a broker on 1883 by chance
        raise ValueError(
            f"{url!r}: no host: {parts.scheme}://HOST[:PORT][/prefix] "
            f"(this machine's broker: {parts.scheme}://127.0.0.1)"
        )
    options: dict[str, Any] = {
        "username": unquote(parts.username) if parts.username else None,
        "password": unquote(parts.password) if parts.password else None,
        "tls": parts.scheme == "mqtts",
    }
    if parts.path.strip("/"):
        options["prefix"] = unquote(parts.path.strip("/"))
    convert: dict[str, Any] = {
        "ca": ("tls_ca", str),
        "timeout": ("timeout", float),
        "qos": ("qos", int),
        "reply_prefix": ("reply_prefix", str),
        "protocol": ("protocol", int),
        "attempts": ("attempts", int),
    }
    for name, text in query.items():
        if name == "connections":
            raise ValueError(f"{url!r}: option 'connections' is for open_blocking_memory only")
        if name not in convert:
            raise ValueError(f"{url!r}: unknown option {name!r}")
        _refuse_empty(url, {name: text})
        field, kind = convert[name]
        try:
            options[field] = kind(text)
        except ValueError:
            raise ValueError(f"{url!r}: option {name!r} must be a number, not {text!r}") from None
    options.update(kwargs)
    try:
        port = parts.port
    except ValueError as exc:  # urllib's "Port out of range 0-65535", or not a number
        raise ValueError(f"{url!r}: {exc}") from None
    if port is None:
        port = 8883 if parts.scheme == "mqtts" else c.DEFAULT_PORT
    return MemoryClient(parts.hostname, port, **options)


def _refuse_empty(url: str, options: dict[str, str | None]) -> None:
    """An option given no value (`?reply_prefix=`) was left aside in silence."""
    for name, text in options.items():
        if text == "":
            raise ValueError(f"{url!r}: option {name!r} is empty: give it a value or leave it out")


def open_memory(url: str, **kwargs: Any) -> _Opening:
    """`async with open_memory(url) as memory:` a client or in-process store (see
    memory_from_url), opened for the block."""
    return _Opening(memory_from_url(url, **kwargs))


class _Opening:
    """What open_memory returns: the block that opens the memory. Used as the memory itself
    (`m = open_memory(url)`, then `await m.get(...)`), its AttributeError says how to open
    it (it named a context manager's class)."""

    __slots__ = ("_memory",)

    def __init__(self, memory: Memory) -> None:
        self._memory = memory

    async def __aenter__(self) -> Memory:
        return await self._memory.__aenter__()

    async def __aexit__(self, *exc: Any) -> None:
        await self._memory.__aexit__(*exc)

    def __enter__(self) -> NoReturn:
        raise TypeError(
            "open_memory(url) opens the memory for an `async with` block, not `with`: "
            "`async with open_memory(url) as memory:`, or open_blocking_memory(url) for "
            "code without await"
        )

    def __exit__(self, *exc: Any) -> None:  # pragma: no cover - __enter__ raised
        pass

    def __getattr__(self, name: str) -> Any:
        # AttributeError still (hasattr() and duck typing go on working), saying how.
        raise AttributeError(
            f"open_memory(url) has no {name!r}: it opens the memory for an `async with` "
            f"block: `async with open_memory(url) as memory: await memory.{name}(...)` (or "
            "open_blocking_memory(url), open at once, without await)",
            name=name,
            obj=self,
        )


def open_blocking_memory(url: str, **kwargs: Any) -> BlockingMemoryClient:
    """The blocking API on `url`'s memory, already open (as `open()` opens a file): keep it
    (`store = open_blocking_memory(url)`, then `store.close()`) or use it in a `with` block.
    An mqtt:// URL may also say `?connections=N` (BlockingMemoryClient's `connections`)."""
    parts = urlsplit(url)
    query = parse_qs(parts.query, keep_blank_values=True)  # memory_from_url refuses blanks
    connections = kwargs.pop("connections", DEFAULT_CONNECTIONS)
    if "connections" in query and parts.scheme != "memory":  # the blocking client's alone
        text = query.pop("connections")[-1]
        try:
            connections = int(text)
        except ValueError:
            raise ValueError(f"{url!r}: option 'connections' must be a number") from None
        url = urlunsplit(parts._replace(query=urlencode(query, doseq=True)))
    return BlockingMemoryClient(
        connections=connections, _memory=memory_from_url(url, **kwargs)
    ).open()


__all__ = [
    "DEFAULT_ATTEMPTS",
    "DEFAULT_TIMEOUT",
    "Appended",
    "BadPayloadError",
    "BadRequestError",
    "BadTopicError",
    "BlockingMemoryClient",
    "ConflictError",
    "Context",
    "ConversationInfo",
    "Eviction",
    "InternalError",
    "LocalMemory",
    "Memory",
    "MemoryClient",
    "MemoryWorkerError",
    "NoReplyError",
    "RefusedError",
    "Summarized",
    "Summary",
    "TooLargeError",
    "Turn",
    "UnavailableError",
    "check_host",
    "check_reply_prefix",
    "error_for",
    "memory_from_url",
    "open_blocking_memory",
    "open_memory",
]
