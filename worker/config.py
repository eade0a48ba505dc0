"""The worker's whole configuration: one frozen object built once from flags and environment."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
import math
import os
import ssl
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from worker import constants as c
from worker.backend_url import FORMS, parse_backend_url
from worker.errors import ConfigError
from worker.protocol import topic_name_problem, validate_prefix
from worker.store import Limits


@dataclass(frozen=True, slots=True)
class Config:
    """Everything `memory-worker` is told; see `memory-worker --help` for each field."""

    host: str = c.DEFAULT_HOST
    port: int = c.DEFAULT_PORT
    prefix: str = c.DEFAULT_PREFIX
    client_id: str = c.DEFAULT_CLIENT_ID
    username: str | None = None
    password: str | None = None
    limits: Limits = dataclasses.field(default_factory=Limits)
    max_payload_bytes: int = c.DEFAULT_MAX_PAYLOAD_BYTES
    backend: str = c.DEFAULT_BACKEND
    stats_interval: float = c.DEFAULT_STATS_INTERVAL
    session_expiry: int | None = None  # see session_expiry_seconds
    max_inflight: int = c.DEFAULT_MAX_INFLIGHT
    reconnect_max: float = c.DEFAULT_RECONNECT_MAX
    shared_group: str | None = None
    route_prefix: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    log_level: str = c.DEFAULT_LOG_LEVEL
    event_format: str = c.DEFAULT_EVENT_FORMAT
    ha_discovery: str | None = None

    def __post_init__(self) -> None:
        validate(self)
        if self.limits.max_ids != self.max_inflight:
            # The id memory is --max-inflight however the Config is built (see Limits.max_ids).
            limits = dataclasses.replace(self.limits, max_ids=self.max_inflight)
            object.__setattr__(self, "limits", limits)

    @property
    def session_expiry_seconds(self) -> int:
        """How long the broker keeps our session. In a share group it ends with the worker:
        Mosquitto goes on handing a disconnected member with a live session its share of
        the requests, where nobody answers them until it comes back."""
        if self.session_expiry is not None:
            return self.session_expiry
        return 0 if self.shared_group else c.DEFAULT_SESSION_EXPIRY


def _positive_int(name: str, value: int) -> None:
    if value < 1:
        raise ConfigError(f"{name} must be at least 1, got {value}")


def validate_limits(
    lim: Limits, max_payload_bytes: int, flag: Callable[[str], str] = lambda name: f"--{name}"
) -> None:
    """Raise ConfigError for bounds that cannot work: the worker's flags, and the same
    bounds of the client's in-process memory (`flag` names them as a memory:// URL does)."""
    for name, value in (
        ("max-turns", lim.max_turns),
        ("max-conversations", lim.max_conversations),
        ("max-keys", lim.max_keys),
    ):
        _positive_int(flag(name), value)
    if not 0 <= lim.ttl < math.inf:  # NaN too
        raise ConfigError(f"{flag('ttl')} must be 0 (off) or more seconds, got {lim.ttl}")
    most = flag("max-payload-bytes")
    if max_payload_bytes < c.MIN_MAX_PAYLOAD_BYTES:
        raise ConfigError(
            f"{most} must be at least {c.MIN_MAX_PAYLOAD_BYTES}, got {max_payload_bytes}"
        )
    if max_payload_bytes > 256 * 1024 * 1024:
        raise ConfigError(f"{most} must be at most 268435456 (MQTT's own limit)")
    if lim.max_bytes < max_payload_bytes:
        raise ConfigError(
            f"{flag('max-bytes')} ({lim.max_bytes}) must be at least {most} "
            f"({max_payload_bytes}), or no request could ever be stored"
        )


def validate_connection(
    *,
    port: int,
    prefix: str,
    session_expiry: int | None,
    reconnect_max: float,
    tls_ca: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    log_level: str,
) -> None:
    """Raise ConfigError for a broker connection's flags, which the worker and
    memory-summarizer share."""
    if not 1 <= port <= 65535:
        raise ConfigError(f"--port must be 1-65535, got {port}")
    try:
        validate_prefix(prefix)
    except ValueError as exc:
        raise ConfigError(f"--prefix {prefix!r}: {exc}") from None
    if session_expiry is not None and not 0 <= session_expiry <= 0xFFFFFFFF:
        raise ConfigError(f"--session-expiry must be 0-4294967295, got {session_expiry}")
    if reconnect_max <= 0:
        raise ConfigError(f"--reconnect-max must be more than 0, got {reconnect_max}")
    for name, path in (("tls-ca", tls_ca), ("tls-cert", tls_cert), ("tls-key", tls_key)):
        if path is not None and not os.path.isfile(path):
            raise ConfigError(f"--{name}: no such file {path!r}")
    if (tls_cert or tls_key) and not tls_ca:
        raise ConfigError("--tls-cert and --tls-key need --tls-ca")
    try:
        tls_context(tls_ca, tls_cert, tls_key)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if logging.getLevelName(log_level.upper()) not in (10, 20, 30, 40, 50):
        raise ConfigError(f"--log-level must be debug, info, warning or error, got {log_level}")


def validate(cfg: Config) -> None:
    """Raise ConfigError naming the first flag whose value cannot work."""
    lim = cfg.limits
    validate_connection(
        port=cfg.port,
        prefix=cfg.prefix,
        session_expiry=cfg.session_expiry,
        reconnect_max=cfg.reconnect_max,
        tls_ca=cfg.tls_ca,
        tls_cert=cfg.tls_cert,
        tls_key=cfg.tls_key,
        log_level=cfg.log_level,
    )
    if (
        not cfg.client_id
        or any(ch in cfg.client_id for ch in "/+#")
        or len(cfg.client_id.encode()) > 128
    ):
        raise ConfigError(f"--client-id must be 1-128 bytes without / + #, got {cfg.client_id!r}")
    _positive_int("--max-inflight", cfg.max_inflight)
    validate_limits(lim, cfg.max_payload_bytes)
    if cfg.stats_interval <= 0:
        raise ConfigError(f"--stats-interval must be more than 0, got {cfg.stats_interval}")
    if cfg.shared_group is not None and (
        not cfg.shared_group
        or any(ch in cfg.shared_group for ch in "/+#")
        # Other workers compare theirs with it, keeping at most that much of a stranger's
        or len(cfg.shared_group) > c.MAX_GROUP_CHARS
    ):
        raise ConfigError(
            f"--shared-group must be a name of 1-{c.MAX_GROUP_CHARS} characters without / + #, "
            f"got {cfg.shared_group!r}"
        )
    if cfg.route_prefix is not None:
        route = cfg.route_prefix
        problem = topic_name_problem(route.replace("{convo}", "c"))
        if not problem and route.startswith("$"):
            problem = "starts with $"
        if not problem and (route == cfg.prefix or route.startswith(cfg.prefix + "/")):
            problem = f"replies may not go under --prefix {cfg.prefix!r}, so none could be sent"
        if problem:
            raise ConfigError(f"--route-prefix {route!r}: {problem}")
    try:
        parse_backend_url(cfg.backend)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if cfg.event_format not in c.EVENT_FORMATS:
        raise ConfigError(f"--event-format must be msgpack or json, got {cfg.event_format!r}")
    if cfg.ha_discovery is not None:
        try:
            validate_prefix(cfg.ha_discovery)
        except ValueError as exc:
            raise ConfigError(f"--ha-discovery {cfg.ha_discovery!r}: {exc}") from None
        if cfg.event_format != c.FORMAT_JSON:
            # Home Assistant's value templates read JSON; msgpack stats would be unreadable.
            raise ConfigError("--ha-discovery needs --event-format json (HA reads JSON)")


@dataclass(frozen=True, slots=True)
class _Flag:
    name: str
    kind: Callable[[str], object]
    default: object
    help: str
    field: str = ""

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")

    @property
    def env(self) -> str:
        return c.ENV_PREFIX + self.dest.upper()


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def finite(raw: str) -> float:
    """A finite float: `--ttl nan` kept conversations for ever, and failed every listing
    (a review); `inf` too."""
    value = float(raw)
    if not math.isfinite(value):
        raise ValueError(raw)
    return value


def _boolean(raw: str) -> bool:
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise ValueError(raw)


_LIMIT_FIELDS = {f.name for f in dataclasses.fields(Limits)}

FLAGS: tuple[_Flag, ...] = (
    _Flag("host", str, c.DEFAULT_HOST, "broker host"),
    _Flag("port", int, c.DEFAULT_PORT, "broker port"),
    _Flag("prefix", str, c.DEFAULT_PREFIX, "topic prefix P: requests are P/<convo>/<op>"),
    _Flag("client-id", str, c.DEFAULT_CLIENT_ID, "MQTT client id; also names the worker topics"),
    _Flag("username", str, None, "broker username"),
    _Flag("password", str, None, "broker password (prefer the environment variable)"),
    _Flag("max-turns", int, c.DEFAULT_MAX_TURNS, "turns kept per conversation"),
    _Flag("ttl", finite, c.DEFAULT_TTL, "seconds a conversation lives after its last use; 0: off"),
    _Flag("max-conversations", int, c.DEFAULT_MAX_CONVERSATIONS, "conversations kept (LRU)"),
    _Flag(
        "max-bytes",
        int,
        c.DEFAULT_MAX_BYTES,
        "budget on stored bytes, each conversation's, turn's and key's overhead included "
        "(docs/contract.md)",
    ),
    _Flag("max-payload-bytes", int, c.DEFAULT_MAX_PAYLOAD_BYTES, "largest request accepted"),
    _Flag("max-keys", int, c.DEFAULT_MAX_KEYS, "live state keys per conversation"),
    _Flag(
        "trimmed-events",
        _boolean,
        False,
        "publish each turn that leaves a window without a summary on P/<convo>/trimmed "
        "(for memory-summarizer)",
    ),
    _Flag("backend", str, c.DEFAULT_BACKEND, FORMS),
    _Flag("stats-interval", finite, c.DEFAULT_STATS_INTERVAL, "seconds between stats messages"),
    _Flag(
        "session-expiry",
        int,
        c.DEFAULT_SESSION_EXPIRY,
        "MQTT session expiry in seconds; 0 with --shared-group unless given",
    ),
    _Flag("max-inflight", int, c.DEFAULT_MAX_INFLIGHT, "requests in progress before reading stops"),
    _Flag("reconnect-max", finite, c.DEFAULT_RECONNECT_MAX, "cap of the reconnect backoff (s)"),
    _Flag("shared-group", str, None, "serve through $share/<group>/... with other workers"),
    _Flag(
        "route-prefix",
        str,
        None,
        "replies only to this topic or under it; {convo} is "
        "replaced by the conversation id (e.g. reply/{convo})",
    ),
    _Flag("tls-ca", str, None, "CA certificate file: connect with TLS, verifying the broker"),
    _Flag("tls-cert", str, None, "client certificate file, when the broker asks for one"),
    _Flag("tls-key", str, None, "client private key file (with --tls-cert)"),
    _Flag("log-level", str, c.DEFAULT_LOG_LEVEL, "debug, info, warning or error"),
    _Flag(
        "event-format",
        str,
        c.DEFAULT_EVENT_FORMAT,
        "msgpack or json: encoding of eviction events, status and stats",
    ),
    _Flag(
        "ha-discovery",
        str,
        None,
        "publish retained Home Assistant discovery configs under this prefix "
        "(e.g. homeassistant); needs --event-format json",
    ),
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="memory-worker",
        description="Bounded conversation memory served over MQTT. Every flag can also be "
        "set as MEMORY_WORKER_<FLAG> in the environment (e.g. MEMORY_WORKER_MAX_TURNS).",
    )
    for flag in FLAGS:
        if flag.default is False:  # a switch: --flag alone, or --flag false
            parser.add_argument(
                f"--{flag.name}",
                dest=flag.dest,
                default=None,
                nargs="?",
                const="true",
                metavar="BOOL",
                help=f"{flag.help} (default: off; env {flag.env}=1)",
            )
            continue
        parser.add_argument(
            f"--{flag.name}",
            dest=flag.dest,
            default=None,
            metavar=flag.dest.upper(),
            help=f"{flag.help} (default: {flag.default}; env {flag.env})",
        )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    return parser


def from_args(argv: Sequence[str], environ: Mapping[str, str]) -> Config:
    """Build the Config: a flag wins over its environment variable, which wins over the default."""
    ns = build_parser().parse_args(list(argv))
    top: dict[str, object] = {}
    limits: dict[str, object] = {}
    for flag in FLAGS:
        raw = getattr(ns, flag.dest)
        source = f"--{flag.name}"
        if raw is None and environ.get(flag.env):  # an empty one is unset, as env files mean
            raw, source = environ[flag.env], flag.env
        if raw is None:
            continue
        try:
            value = flag.kind(raw)
        except ValueError:
            kind = _KIND_NAMES.get(flag.kind, flag.kind.__name__)
            raise ConfigError(f"{source}: expected {kind}, got {raw!r}") from None
        (limits if flag.dest in _LIMIT_FIELDS else top)[flag.dest] = value
    if "max_inflight" in top:
        limits["max_ids"] = top["max_inflight"]
    return Config(limits=Limits(**limits), **top)  # type: ignore[arg-type]


# Variables of the project's scripts, not the worker's flags.
_SCRIPT_VARIABLES = ("DASHBOARD_PORT", "TEST_SYSTEM_CACHE")


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """What to say of each MEMORY_WORKER_* variable that names no setting (a typo is
    otherwise ignored in silence), with the setting it most likely means."""
    known = {flag.env for flag in FLAGS} | {c.ENV_PREFIX + v for v in _SCRIPT_VARIABLES}
    out = []
    for name in sorted(environ):
        if name.startswith(c.ENV_PREFIX) and name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            out.append(f"{name} is not a setting of memory-worker{hint}: ignored")
    return out


def tls_context(
    ca: str | None, cert: str | None = None, key: str | None = None
) -> ssl.SSLContext | None:
    """A client TLS context verifying the broker against `ca`, or None without TLS;
    ValueError naming the file that cannot be loaded (missing, unreadable, not PEM)."""
    if ca is None:
        return None
    try:
        context = ssl.create_default_context(cafile=ca)
    except OSError as exc:  # ssl.SSLError too
        raise ValueError(f"TLS CA certificate {ca!r}: {_reason(exc)}") from None
    if cert is not None:
        try:
            context.load_cert_chain(cert, key)
        except OSError as exc:
            raise ValueError(
                f"TLS client certificate {cert!r} (key {key!r}): {_reason(exc)}"
            ) from None
    return context


def _reason(exc: OSError) -> str:
    return exc.strerror or getattr(exc, "reason", None) or str(exc)


_KIND_NAMES: dict[Callable[[str], object], str] = {
    _boolean: "true or false",
    int: "an integer",
    finite: "a finite number",
    str: "a string",
}


def wants_version(argv: Sequence[str]) -> bool:
    return "--version" in argv
