"""The one parser of `--backend URL`: Config validates with it and create_backend builds from it.

Pure (no I/O; redis-py, imported for a Redis URL alone, is asked about its options without
connecting), and outside worker/backends so that worker/config.py can use it without
importing the package that imports worker/config.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

SYNC_MODES = ("full", "normal")
DEFAULT_SHARDS = 16  # see docs/scaling.md: why 16
MAX_SHARDS = 256
_PASSWORD_OPTION = re.compile(r"([?&]password=)[^&]*")
FORMS = (
    "memory, sqlite:///rel.db, sqlite:////abs.db, redis://host:port/db, rediss://host:port/db, "
    "unix:///path/redis.sock?db=N or redis+cluster://host:port[,host:port...][?shards=N]"
)


@dataclass(frozen=True, slots=True)
class BackendUrl:
    """A judged backend URL: which engine, and what it needs to be built."""

    kind: str  # memory | sqlite | redis | cluster
    url: str  # as given
    path: Path = Path()  # sqlite: the database file
    synchronous: str = "full"  # sqlite
    nodes: tuple[tuple[str, int], ...] = ()  # cluster: the start-up nodes
    shards: int = DEFAULT_SHARDS  # cluster: index shards


def redacted(url: str) -> str:
    """The URL as a log or an error may show it: a password in it, if any, as ***. (In the
    user part up to the last @, which may hold / and @ unencoded, and as ?password=.)"""
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest:
        user, at, host = rest.rpartition("@")
        name, colon, _ = user.partition(":")
        if colon:
            rest = f"{name}:***{at}{host}"
    return scheme + sep + _PASSWORD_OPTION.sub(r"\1***", rest)


_URL = re.compile(r"\S+://\S+")


def redact_urls(text: str) -> str:
    """`text` with every URL in it redacted (an error that repeats what it was given)."""
    return _URL.sub(lambda url: redacted(url.group()), text)


def _port(url: str, text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"--backend {redacted(url)!r}: port must be 1-65535, got {text!r}")
    return int(text)


def _db(url: str, text: str) -> None:
    if not text.isdigit():
        raise ValueError(
            f"--backend {redacted(url)!r}: the database must be a number, got {text!r}"
        )


def _sqlite(url: str) -> BackendUrl:
    parts = urlsplit(url)
    if parts.netloc or not parts.path.startswith("/"):
        raise ValueError(
            f"--backend {redacted(url)!r}: expected sqlite:///relative.db or sqlite:////absolute/path.db"
        )
    raw = parts.path[1:]
    if not raw or raw.endswith("/"):
        raise ValueError(f"--backend {redacted(url)!r}: no file name")
    query = parse_qs(parts.query)
    sync = query.pop("synchronous", ["full"])[0].lower()
    if sync not in SYNC_MODES or query:
        raise ValueError(f"--backend {redacted(url)!r}: the only option is synchronous=full|normal")
    return BackendUrl("sqlite", url, path=Path(raw), synchronous=sync)


def _redis(url: str) -> BackendUrl:
    parts = urlsplit(url)
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        hint = " (in a password, write / as %2F and @ as %40)" if "@" in url else ""
        raise ValueError(f"--backend {redacted(url)!r}: port must be 1-65535{hint}") from None
    if not host:
        raise ValueError(
            f"--backend {redacted(url)!r}: no host (expected {parts.scheme}://host:port/db)"
        )
    if port is not None and port == 0:
        raise ValueError(f"--backend {redacted(url)!r}: port must be 1-65535")
    db = parts.path.strip("/")
    if db:
        _db(url, db)
    for key, values in parse_qs(parts.query).items():
        if key == "db":
            _db(url, values[0])
            if db and values[0] != db:  # redis-py takes the query's, silently
                raise ValueError(
                    f"--backend {redacted(url)!r}: two databases, {db} and db={values[0]}: name one"
                )
        elif key == "ssl_ca_certs" and not Path(values[0]).is_file():
            raise ValueError(f"--backend {redacted(url)!r}: no such file {values[0]!r}")
    problem = _redis_py_problem(url)
    if problem:
        raise ValueError(f"--backend {redacted(url)!r}: {problem}")
    return BackendUrl("redis", url)


def _redis_py_problem(url: str) -> str | None:
    """What redis-py refuses in the URL's options, found without connecting (an option it
    does not take was accepted at start, then failed every request as 'unavailable')."""
    import redis.asyncio
    import redis.exceptions

    try:
        pool = redis.asyncio.ConnectionPool.from_url(url)
        if pool.connection_kwargs.get("decode_responses"):
            return "decode_responses: the worker reads Redis's replies as bytes (leave it out)"
        pool.connection_class(**pool.connection_kwargs)
    except TypeError as exc:
        found = re.search(r"keyword argument '(\w+)'", str(exc))
        what = repr(found[1]) if found else f"({exc})"
        return (
            f"redis-py takes no option {what} (the options are its connection arguments: "
            "?socket_keepalive=true, ?health_check_interval=N, ?ssl_ca_certs=FILE, ...)"
        )
    except (ValueError, redis.exceptions.RedisError) as exc:  # a value it cannot read
        return str(exc)
    return None


def _unix(url: str) -> BackendUrl:
    parts = urlsplit(url)
    if parts.netloc or not parts.path.startswith("/") or parts.path.endswith("/"):
        raise ValueError(f"--backend {redacted(url)!r}: expected unix:///path/redis.sock?db=N")
    for key, values in parse_qs(parts.query).items():
        if key != "db":
            raise ValueError(f"--backend {redacted(url)!r}: the only option is db=N")
        _db(url, values[0])
    return BackendUrl("redis", url)


def _cluster(url: str) -> BackendUrl:
    rest = url[len("redis+cluster://") :]
    hosts, _, query_text = rest.partition("?")
    hosts = hosts.rstrip("/")
    if "/" in hosts:
        raise ValueError(
            f"--backend {redacted(url)!r}: a redis+cluster URL names no database (a cluster "
            "has only database 0): redis+cluster://host:port[,host:port...]"
        )
    if "@" in hosts:
        raise ValueError(
            f"--backend {redacted(url)!r}: a login in a redis+cluster URL is not supported"
        )
    nodes = []
    for item in hosts.split(","):
        host, sep, port = item.rpartition(":")
        if not sep or not host:
            raise ValueError(f"--backend {redacted(url)!r}: expected host:port, got {item!r}")
        nodes.append((host.strip("[]"), _port(url, port)))
    shards = DEFAULT_SHARDS
    for key, values in parse_qs(query_text, keep_blank_values=True).items():
        if key != "shards":
            raise ValueError(f"--backend {redacted(url)!r}: the only option is shards=N")
        if not values[0].isdigit() or not 1 <= int(values[0]) <= MAX_SHARDS:
            raise ValueError(f"--backend {redacted(url)!r}: shards must be 1-{MAX_SHARDS}")
        shards = int(values[0])
    return BackendUrl("cluster", url, nodes=tuple(nodes), shards=shards)


def parse_backend_url(url: str) -> BackendUrl:
    """The judged URL, or ValueError with a one-line message naming what is wrong."""
    if url == "memory":
        return BackendUrl("memory", url)
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme == "sqlite":
        return _sqlite(url)
    if scheme in ("redis", "rediss"):
        return _redis(url)
    if scheme == "unix":
        return _unix(url)
    if scheme == "redis+cluster":
        return _cluster(url)
    raise ValueError(f"--backend must be {FORMS}, got {redacted(url)!r}")
