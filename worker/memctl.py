"""`memctl`: talk to a running memory worker from the shell, one JSON line per answer.

--host, --port, --prefix, --username and --password default to MEMORY_WORKER_HOST, _PORT,
_PREFIX, _USERNAME and _PASSWORD when set (a password there stays out of `ps`).

Exit status: 0 ok, 1 the worker answered with an error (or retire refused: the worker is
online, or unknown), 2 bad usage, 3 no answer in time (including a broker that cannot be
reached), 4 refused (the broker refused the login, or a subscription or publish its ACL
forbids: see --reply-prefix; or its TLS certificate does not verify), 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import json
import math
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, NoReturn

import msgpack

from worker import constants as c
from worker.client import (
    ConflictError,
    MemoryClient,
    MemoryWorkerError,
    NoReplyError,
    RefusedError,
    check_host,
    check_reply_prefix,
)
from worker.config import tls_context
from worker.errors import WorkerError
from worker.protocol import check_request, topic_name_problem, validate_prefix

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NO_REPLY, EXIT_REFUSED = 0, 1, 2, 3, 4
EXIT_INTERRUPTED = 130  # as a shell reports a command Ctrl-C stopped
_NONE: Any = object()  # what a load gives for a key that is not there


def _jsonable(value: Any) -> Any:
    """A msgpack value as JSON can say it: bin and ext as base64 maps, a map's keys that are
    not strings as their JSON text, NaN and infinities as strings (JSON has none)."""
    if isinstance(value, dict):
        return {
            k if isinstance(k, str) else json.dumps(_jsonable(k)): _jsonable(v)
            for k, v in value.items()
        }
    if isinstance(value, msgpack.ExtType):  # a tuple: before the lists
        return {"ext": value.code, "base64": base64.b64encode(value.data).decode()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, bytes):
        return {"base64": base64.b64encode(value).decode()}
    if isinstance(value, msgpack.Timestamp):
        return value.to_unix()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def emit(value: Any) -> None:
    print(json.dumps(_jsonable(value), default=str, ensure_ascii=False), flush=True)


class _Parser(argparse.ArgumentParser):
    """memctl's options go before its command: given after it, the error says so."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.own_options: set[str] = set()
        super().__init__(*args, **kwargs)

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        self.own_options.update(action.option_strings)
        return action

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments: "):
            given = message.removeprefix("unrecognized arguments: ").split()
            misplaced = [
                a for a in given if a.partition("=")[0] in self.own_options - {"-h", "--help"}
            ]
            if misplaced:
                message += (
                    f" ({misplaced[0].partition('=')[0]} is memctl's own option: it goes "
                    "before the command, as in memctl --port 1884 get kiosk-7)"
                )
        super().error(message)


def _from(kind: type[Any], name: str, set_to: str | None) -> Callable[[str], Any]:
    """`kind` of a flag's text, naming the variable when the text is the variable's."""

    def parse(text: str) -> Any:
        try:
            return kind(text)
        except ValueError:
            where = f" (from ${name})" if text == set_to else ""
            raise argparse.ArgumentTypeError(f"not a number: {text!r}{where}") from None

    return parse


def build_parser(env: Mapping[str, str] = os.environ) -> argparse.ArgumentParser:
    head, _, rest = (__doc__ or "").partition("\n")
    env = {k: v for k, v in env.items() if v}  # an empty variable is unset, as for the worker
    p = _Parser(
        prog="memctl",
        description=head,
        epilog=rest.strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # The worker's own variables, so that one `export` points both at the same broker.
    for flag, default in (("host", c.DEFAULT_HOST), ("port", c.DEFAULT_PORT)):
        name = f"{c.ENV_PREFIX}{flag.upper()}"
        p.add_argument(
            f"--{flag}",
            type=_from(type(default), name, env.get(name)),
            default=env.get(name, str(default)),
            help=f"broker {flag} (default: ${name}, else {default})",
        )
    p.add_argument(
        "--prefix",
        default=env.get(f"{c.ENV_PREFIX}PREFIX", c.DEFAULT_PREFIX),
        help=f"the worker's topic prefix (default: ${c.ENV_PREFIX}PREFIX, else "
        f"{c.DEFAULT_PREFIX}; `list --prefix` is another: the conversation ids' start)",
    )
    p.add_argument("--username", default=env.get(f"{c.ENV_PREFIX}USERNAME"))
    p.add_argument("--password", default=env.get(f"{c.ENV_PREFIX}PASSWORD"))
    p.add_argument("--tls-ca", help="CA certificate: connect with TLS, verified against it")
    p.add_argument(
        "--tls", action="store_true", help="connect with TLS, verified against the system's CAs"
    )
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for an answer")
    p.add_argument("--qos", type=int, choices=(0, 1), default=1)
    p.add_argument("--id", help="request id (echoed; makes a write, a delete too, at-most-once)")
    p.add_argument(
        "--reply-prefix",
        default="memctl",
        help="replies come to <this>/<random>; on a secured broker use the "
        "device's own, e.g. reply/<convo>",
    )
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("append", help="store a turn")
    a.add_argument("convo")
    a.add_argument("role", help="any name of 1-32 characters: user, assistant, system, tool ...")
    a.add_argument("content")
    a.add_argument("--tokens", type=int, help="the turn's length in your model's tokens")
    g = sub.add_parser(
        "get", help="print a conversation's summary and turns, oldest first, and their tokens"
    )
    g.add_argument("convo")
    g.add_argument("--last", type=int)
    g.add_argument(
        "--max-tokens", type=int, help="only the newest turns that fit, with the summary"
    )
    sm = sub.add_parser(
        "summary", help="print a conversation's summary, or save one (--save TEXT --upto N)"
    )
    sm.add_argument("convo")
    sm.add_argument("--save", metavar="TEXT", help="the new summary's text")
    sm.add_argument("--upto", type=int, help="the newest seq it covers (those turns are removed)")
    sm.add_argument(
        "--base",
        type=int,
        default=None,
        help="the upto of the summary it replaces (default: the current summary's, read first)",
    )
    sm.add_argument("--tokens", type=int, help="its length in your model's tokens")
    d = sub.add_parser("delete", help="forget a conversation")
    d.add_argument("convo")
    w = sub.add_parser("watch", help="print eviction events as they come")
    w.add_argument("--count", type=int, help="stop after this many events")
    sub.add_parser("stats", help="print each worker's stats (asked for now from those online)")
    r = sub.add_parser(
        "retire", help="clear a stopped worker's retained status and stats (pages drop it)"
    )
    r.add_argument("client_id", help="the worker's --client-id")
    ls = sub.add_parser("list", help="print every live conversation, one line each, in id order")
    # after `list`, --prefix filters ids (the topic prefix is the one before the command)
    ls.add_argument("--prefix", dest="id_prefix", help="only ids that start with this")
    ls.add_argument(
        "--limit",
        type=int,
        default=c.DEFAULT_LIST_LIMIT,
        help="conversations per request (1-1000); every page is printed",
    )
    s = sub.add_parser(
        "state", help="per-conversation state: save, load, get-all, delete, namespaces"
    )
    ssub = s.add_subparsers(dest="state_command", required=True)
    sv = ssub.add_parser("save", help="save a key; VALUE is JSON ('\"en\"', 3, true, [1])")
    loads = ssub.add_parser("load", help="a key's value (null when unknown)")
    dels = ssub.add_parser("delete", help="forget a key")
    for q in (sv, loads, dels):
        q.add_argument("convo")
        q.add_argument("ns")
        q.add_argument("key")
    sv.add_argument("value")
    sv.add_argument("--ttl", type=float, help="seconds the key lives")
    loads.add_argument("--ttl", type=float, help="seconds the key lives from now, if it has a TTL")
    kind = sv.add_mutually_exclusive_group()
    kind.add_argument("--string", action="store_true", help="VALUE is a string, not JSON")
    kind.add_argument(
        "--base64",
        action="store_true",
        help='VALUE is bytes in base64, saved as msgpack bin (what load shows as {"base64": ...})',
    )
    ga = ssub.add_parser("get-all", help="every live key of a namespace")
    ga.add_argument("convo")
    ga.add_argument("ns")
    ssub.add_parser("namespaces", help="the namespaces holding live keys").add_argument("convo")
    return p


def _state_value(args: argparse.Namespace) -> Any:
    """The value of `state save`: JSON, with --string the text as it is, with --base64 the
    bytes it encodes."""
    if args.base64:
        return base64.b64decode(args.value, validate=True)
    return args.value if args.string else json.loads(args.value)


def _client(args: argparse.Namespace, *, replies: bool = True) -> MemoryClient:
    return MemoryClient(
        args.host,
        args.port,
        args.prefix,
        username=args.username,
        password=args.password,
        tls_ca=args.tls_ca,
        tls=args.tls,
        timeout=args.timeout,
        qos=args.qos,
        reply_prefix=args.reply_prefix,
        attempts=1,
        replies=replies,
    )


async def _ask(memory: MemoryClient, args: argparse.Namespace) -> dict[str, Any]:
    """One request command, answered as the worker's reply."""
    rid = args.id
    reply: dict[str, Any] = {"ok": True}
    if args.command == "append":
        done = await memory.append(
            args.convo, args.role, args.content, request_id=rid, tokens=args.tokens
        )
        reply.update(seq=done.seq, count=done.count)
    elif args.command == "get":
        ctx = await memory.context(args.convo, args.max_tokens, last=args.last)
        if ctx.summary is not None:
            reply["summary"] = ctx.summary
        reply.update(turns=ctx.turns, tokens=ctx.tokens)
    elif args.command == "summary":
        reply.update(await _summary(memory, args))
    elif args.command == "delete":
        reply["deleted"] = await memory.forget(args.convo, request_id=rid)
    elif args.state_command == "save":
        value = _state_value(args)
        await memory.save(args.convo, args.ns, args.key, value, args.ttl, request_id=rid)
    elif args.state_command == "load":
        value = await memory.load(args.convo, args.ns, args.key, ttl=args.ttl, default=_NONE)
        found = value is not _NONE  # a key saved as nil is found
        reply.update(found=found, value=value if found else None)
    elif args.state_command == "get-all":
        reply["items"] = await memory.get_all(args.convo, args.ns)
    elif args.state_command == "namespaces":
        reply["namespaces"] = await memory.namespaces(args.convo)
    else:
        reply["deleted"] = await memory.delete(args.convo, args.ns, args.key, request_id=rid)
    return reply


async def _summary(memory: MemoryClient, args: argparse.Namespace) -> dict[str, Any]:
    """Show the summary, or save one on the current one (or on --base)."""
    if args.save is None:
        return {"summary": (await memory.context(args.convo, last=1)).summary}
    base = args.base
    if base is None:
        current = (await memory.context(args.convo, last=1)).summary
        base = current["upto"] if current else 0
    done = await memory.summarize(
        args.convo, args.save, args.upto, base, tokens=args.tokens, request_id=args.id
    )
    return {"upto": done.upto, "dropped": done.dropped}


async def _answer(
    args: argparse.Namespace, lines: Callable[[MemoryClient], AsyncIterator[Any]]
) -> int:
    """Print each of the lines a command's requests answer; an error reply as the last."""
    async with _client(args) as memory:
        try:
            async for line in lines(memory):
                emit(line)
        except (NoReplyError, RefusedError):
            raise
        except MemoryWorkerError as exc:
            error: dict[str, Any] = {"code": exc.code, "message": exc.message}
            if isinstance(exc, ConflictError):
                error.update(upto=exc.upto, seq=exc.seq, born=exc.born)
            emit({"ok": False, "error": error})
            return EXIT_ERROR
    return EXIT_OK


async def ask(args: argparse.Namespace) -> int:
    async def reply(memory: MemoryClient) -> AsyncIterator[dict[str, Any]]:
        yield await _ask(memory, args)

    return await _answer(args, reply)


async def watch(args: argparse.Namespace) -> int:
    seen = 0
    async with _client(args, replies=False) as memory:
        async for event in memory.evictions():
            emit(event)
            seen += 1
            if args.count is not None and seen >= args.count:
                break
    return EXIT_OK


async def list_all(args: argparse.Namespace) -> int:
    """Every live conversation, a JSON line each, all pages."""
    return await _answer(
        args, lambda memory: memory.conversations(args.id_prefix, page_size=args.limit)
    )


async def stats(args: argparse.Namespace) -> int:
    """Each worker's stats, once (fresh from those online, `MemoryClient.stats`), with how
    old each is (`age`, seconds)."""
    async with _client(args, replies=False) as memory:
        snapshots = await memory.stats()
    if not snapshots:
        raise NoReplyError("no stats")
    now = time.time()
    for snapshot in snapshots:
        ts = snapshot.get("ts")
        if isinstance(ts, int | float):
            snapshot["age"] = round(max(0.0, now - ts), 3)
        emit(snapshot)
    return EXIT_OK


async def retire(args: argparse.Namespace) -> int:
    """Clear the retained status and stats of a worker that is not running: dashboards (the
    page, `memctl stats`) forget it. Refused while its status says online."""
    async with _client(args, replies=False) as memory:
        done = await memory.retire(args.client_id)
    if done == "online":
        print(f"memctl: {args.client_id} is online: stop it first", file=sys.stderr)
        return EXIT_ERROR
    if done == "unknown":
        print(f"memctl: no worker {args.client_id!r} under {args.prefix!r}", file=sys.stderr)
        return EXIT_ERROR
    emit({"ok": True, "retired": args.client_id})
    return EXIT_OK


def _usage_problem(args: argparse.Namespace) -> str | None:
    """What the contract refuses in the arguments, before anything is sent."""
    if not args.timeout > 0:  # NaN too: the client's ValueError was a traceback
        return f"--timeout must be more than 0 seconds, got {args.timeout}"
    if not 1 <= args.port <= 65535:
        return f"--port must be 1-65535, got {args.port}"
    try:
        check_host(args.host)
    except ValueError as exc:
        return f"--{exc}"
    if getattr(args, "count", None) is not None and args.count < 1:
        return f"--count must be 1 or more, got {args.count}"
    if args.command == "retire" and (topic_name_problem(args.client_id) or "/" in args.client_id):
        return f"not a worker's client id: {args.client_id!r}"
    try:
        tls_context(args.tls_ca)
    except ValueError as exc:
        return f"--tls-ca: {exc}"
    try:
        validate_prefix(args.prefix)
    except ValueError as exc:
        return f"--prefix {args.prefix!r}: {exc}"
    try:
        check_reply_prefix(args.reply_prefix, args.prefix)
        if args.id is not None:
            check_request("c", c.OP_GET, {"id": args.id})
        if getattr(args, "convo", None) is not None:
            get = {
                "last": getattr(args, "last", None),
                "max_tokens": getattr(args, "max_tokens", None),
            }
            check_request(args.convo, c.OP_GET, {k: v for k, v in get.items() if v is not None})
        if args.command == "append":
            body = {"role": args.role, "content": args.content}
            check_request(args.convo, c.OP_APPEND, {**body, "tokens": args.tokens})
        if args.command == "summary" and args.save is None and args.upto is not None:
            return "summary --upto saves a summary: give its text with --save TEXT"
        if args.command == "summary" and args.save is not None:
            if args.upto is None:
                return "summary --save needs --upto (the newest seq it covers)"
            body = {"text": args.save, "upto": args.upto, "base": args.base or 0}
            check_request(args.convo, c.OP_SUMMARY, {**body, "tokens": args.tokens})
        if args.command == "list":
            body = {"limit": args.limit, "prefix": args.id_prefix}
            check_request(c.CONVERSATIONS_LEVEL, c.OP_LIST, body)
        if args.command == "state" and args.state_command != "namespaces":
            body = {"ns": args.ns, "key": getattr(args, "key", "k"), "value": 0}
            if getattr(args, "ttl", None) is not None:
                body["ttl"] = args.ttl
            check_request(args.convo, c.OP_STATE_SAVE, body)
        if getattr(args, "state_command", None) == "save":
            _state_value(args)
    except (WorkerError, MemoryWorkerError) as exc:
        return exc.message
    except json.JSONDecodeError:
        value = args.value
        return f"VALUE {value!r} is not JSON: quote a string ('\"{value}\"') or add --string"
    except binascii.Error:
        return f"VALUE {args.value!r} is not base64"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problem = _usage_problem(args)
    if problem:
        print(f"memctl: {problem}", file=sys.stderr)
        return EXIT_USAGE
    run = {"watch": watch, "stats": stats, "retire": retire, "list": list_all}.get(
        args.command, ask
    )
    try:
        return asyncio.run(run(args))
    except NoReplyError as exc:
        if not exc.message.startswith(("no reply", "no stats")):  # the broker's, not a worker's
            print(f"memctl: {exc.message}", file=sys.stderr)
            return EXIT_NO_REPLY
        # A broker whose ACL is a file (not dynamic security) grants the subscription to a
        # reply topic the user may not read, and then delivers nothing there.
        login = (
            f"; with a login, is --reply-prefix one {args.username!r} may read?"
            if args.username
            else ""
        )
        print(
            f"memctl: no answer within {args.timeout}s from a memory-worker under prefix "
            f"{args.prefix!r} (the broker at {args.host}:{args.port} took the request: is "
            f"memory-worker running there with --prefix {args.prefix}{login})",
            file=sys.stderr,
        )
    except RefusedError as exc:
        print(f"memctl: {exc.message}", file=sys.stderr)
        return EXIT_REFUSED
    except MemoryWorkerError as exc:
        print(f"memctl: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `memctl watch | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    return EXIT_NO_REPLY


if __name__ == "__main__":
    sys.exit(main())
