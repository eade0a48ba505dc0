"""Python echo responders: the transport floor the worker is measured against.

    python -m bench.echo HOST PORT PREFIX idiomatic|direct

- idiomatic: aiomqtt as its documentation shows it, `async for message in client.messages`
  and `await client.publish(...)` per reply.
- direct: the same connection class and hot path as the worker (`worker.mqtt.Connection`:
  its own PUBLISH decoder straight to a batch, replies encoded and written with the
  acknowledgements in one write per batch), with no parsing and no store. The worker's throughput
  over this one is the cost of the worker's own work.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from worker.constants import CONTENT_TYPE
from worker.mqtt import Connection, Message
from worker.packets import ReplyProperties

OK = b"\x81\xa2ok\xc3"
NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _reply_props(message_props: Any) -> tuple[str | None, Properties]:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.ContentType = "application/msgpack"
    correlation = getattr(message_props, "CorrelationData", None)
    if correlation is not None:
        props.CorrelationData = correlation
    return getattr(message_props, "ResponseTopic", None), props


async def idiomatic(host: str, port: int, prefix: str) -> None:
    async with aiomqtt.Client(
        host, port, protocol=aiomqtt.ProtocolVersion.V5, socket_options=[NODELAY]
    ) as client:
        await client.subscribe(f"{prefix}/+/+", qos=1)
        print("ready", flush=True)
        async for message in client.messages:
            route, props = _reply_props(message.properties)
            if route:
                await client.publish(route, OK, qos=message.qos, properties=props)


async def direct(host: str, port: int, prefix: str) -> None:
    inbox: list[Message] = []
    wake = asyncio.Event()

    def on_message(msg: Message) -> None:
        inbox.append(msg)
        wake.set()

    reply_props = ReplyProperties(CONTENT_TYPE)
    client = Connection(
        on_message,
        hostname=host,
        port=port,
        protocol=aiomqtt.ProtocolVersion.V5,
        socket_options=[NODELAY],
    )
    async with client:
        await client.subscribe(f"{prefix}/+/+", options=SubscribeOptions(qos=1))
        print("ready", flush=True)
        while True:
            await wake.wait()
            wake.clear()
            batch, inbox[:] = list(inbox), []
            for msg in batch:
                route = msg.response_topic
                if route:
                    client.publish_packed(route, OK, msg.qos, False, reply_props(msg.correlation))
                if msg.qos:
                    client.acknowledge(msg.mid, msg.qos)
            client.flush()


def main() -> None:
    host, port, prefix, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    run = {"idiomatic": idiomatic, "direct": direct}[mode]
    asyncio.run(run(host, port, prefix))


if __name__ == "__main__":
    main()
