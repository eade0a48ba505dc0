"""`memctl`: talk to a running memory worker from the shell, one JSON line per answer.

Exit status: 0 ok, 1 the worker answered with an error, 2 bad usage, 3 no answer in time
(including a broker that cannot be reached).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import socket
import sys
import uuid
from collections.abc import Sequence
from typing import Any

import aiomqtt
import msgpack
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from worker import constants as c
from worker.config import tls_context

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NO_REPLY = 0, 1, 2, 3


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"base64": base64.b64encode(value).decode()}
    if isinstance(value, msgpack.ExtType):
        return {"ext": value.code, "base64": base64.b64encode(value.data).decode()}
    if isinstance(value, msgpack.Timestamp):
        return value.to_unix()
    return str(value)


def emit(value: Any) -> None:
    print(json.dumps(value, default=_jsonable, ensure_ascii=False), flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="memctl", description=__doc__.split("\n")[0])
    p.add_argument("--host", default=c.DEFAULT_HOST)
    p.add_argument("--port", type=int, default=c.DEFAULT_PORT)
    p.add_argument("--prefix", default=c.DEFAULT_PREFIX)
    p.add_argument("--username")
    p.add_argument("--password")
    p.add_argument("--tls-ca", help="CA certificate: connect with TLS")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for an answer")
    p.add_argument("--qos", type=int, choices=(0, 1), default=1)
    p.add_argument("--id", help="request id (echoed; makes appends and saves at-most-once)")
    p.add_argument(
        "--reply-prefix",
        default="memctl",
        help="replies come to <this>/<random>; on a secured broker use the "
        "device's own, e.g. reply/<convo>",
    )
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("append", help="store a turn")
    a.add_argument("convo")
    a.add_argument("role")
    a.add_argument("content")
    g = sub.add_parser("get", help="print a conversation's turns, oldest first")
    g.add_argument("convo")
    g.add_argument("--last", type=int)
    d = sub.add_parser("delete", help="forget a conversation")
    d.add_argument("convo")
    w = sub.add_parser("watch", help="print eviction events as they come")
    w.add_argument("--count", type=int, help="stop after this many events")
    sub.add_parser("stats", help="print each worker's latest stats")
    s = sub.add_parser("state", help="per-conversation state: save, load, get-all, delete")
    ssub = s.add_subparsers(dest="state_command", required=True)
    sv = ssub.add_parser("save", help="save a key; VALUE is JSON (a bare word is a string)")
    for q in (sv, ssub.add_parser("load"), ssub.add_parser("delete")):
        q.add_argument("convo")
        q.add_argument("ns")
        q.add_argument("key")
    sv.add_argument("value")
    sv.add_argument("--ttl", type=float)
    ga = ssub.add_parser("get-all")
    ga.add_argument("convo")
    ga.add_argument("ns")
    return p


def _json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def request_of(args: argparse.Namespace) -> tuple[str, str, dict[str, Any]]:
    """(convo, op, body) for a request command."""
    if args.command == "append":
        return args.convo, c.OP_APPEND, {"role": args.role, "content": args.content}
    if args.command == "get":
        return args.convo, c.OP_GET, {} if args.last is None else {"last": args.last}
    if args.command == "delete":
        return args.convo, c.OP_DELETE, {}
    op = "state/" + args.state_command.replace("-", "_")
    body: dict[str, Any] = {"ns": args.ns}
    if args.state_command != "get-all":
        body["key"] = args.key
    if args.state_command == "save":
        body["value"] = _json_value(args.value)
        if args.ttl is not None:
            body["ttl"] = args.ttl
    return args.convo, op, body


def _client(args: argparse.Namespace) -> aiomqtt.Client:
    return aiomqtt.Client(
        args.host,
        args.port,
        username=args.username,
        password=args.password,
        protocol=aiomqtt.ProtocolVersion.V5,
        identifier=f"memctl-{uuid.uuid4().hex[:12]}",
        timeout=args.timeout,
        socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        tls_context=tls_context(args.tls_ca),
    )


async def ask(args: argparse.Namespace) -> int:
    convo, op, body = request_of(args)
    if args.id is not None:
        body["id"] = args.id
    reply_topic = f"{args.reply_prefix}/{uuid.uuid4().hex}"
    correlation = uuid.uuid4().bytes
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.ResponseTopic = reply_topic
    props.CorrelationData = correlation
    async with _client(args) as client:
        await client.subscribe(reply_topic, qos=args.qos)
        await client.publish(
            f"{args.prefix}/{convo}/{op}", msgpack.packb(body), qos=args.qos, properties=props
        )
        async with asyncio.timeout(args.timeout):
            async for message in client.messages:
                got = getattr(message.properties, "CorrelationData", None)
                if got != correlation:
                    continue
                reply = msgpack.unpackb(message.payload, strict_map_key=False)
                emit(reply)
                return EXIT_OK if reply.get("ok") else EXIT_ERROR
    return EXIT_NO_REPLY  # pragma: no cover


async def watch(args: argparse.Namespace) -> int:
    seen = 0
    async with _client(args) as client:
        await client.subscribe(f"{args.prefix}/+/{c.EVICTED}", qos=1)
        async for message in client.messages:
            emit(msgpack.unpackb(message.payload))
            seen += 1
            if args.count is not None and seen >= args.count:
                break
    return EXIT_OK


async def stats(args: argparse.Namespace) -> int:
    """Each worker's retained stats, once; the broker sends all of them right on subscribe."""
    seen: set[str] = set()
    async with _client(args) as client:
        await client.subscribe(f"{args.prefix}/{c.WORKER_LEVEL}/+/stats", qos=1)
        messages = aiter(client.messages)
        async with asyncio.timeout(args.timeout):
            first = await anext(messages)
        message: aiomqtt.Message | None = first
        while message is not None and message.topic.value not in seen:
            seen.add(message.topic.value)
            emit(msgpack.unpackb(message.payload))
            try:
                async with asyncio.timeout(0.3):
                    message = await anext(messages)
            except TimeoutError:
                message = None
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run = {"watch": watch, "stats": stats}.get(args.command, ask)
    try:
        return asyncio.run(run(args))
    except TimeoutError:
        print(
            f"memctl: no answer within {args.timeout}s (is memory-worker running on "
            f"{args.host}:{args.port} with prefix {args.prefix!r}?)",
            file=sys.stderr,
        )
    except aiomqtt.MqttError as exc:
        print(f"memctl: cannot reach the broker at {args.host}:{args.port}: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        return EXIT_OK
    return EXIT_NO_REPLY


if __name__ == "__main__":
    sys.exit(main())
