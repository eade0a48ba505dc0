"""A device's request/reply with paho-mqtt 2.x: MQTT 5 by default, 3.1.1 with --v311.

    MQTT_HOST=127.0.0.1 MQTT_PORT=1883 CONVO=kiosk-7 python request_reply.py [--v311]
        [--no-nodelay] [--rounds N]
Appends one turn (with an id, so a retry is stored once), reads the conversation back, and
with --rounds N prints the median get round trip in ms.
"""

import json
import os
import socket
import statistics
import sys
import threading
import time
import uuid

import msgpack
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

HOST = os.environ.get("MQTT_HOST", "127.0.0.1")
PORT = int(os.environ.get("MQTT_PORT", "1883"))
PREFIX = os.environ.get("PREFIX", "mem")
CONVO = os.environ.get("CONVO", "kiosk-7")
V5 = "--v311" not in sys.argv
NODELAY = "--no-nodelay" not in sys.argv

client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5 if V5 else mqtt.MQTTv311)
inbox = f"reply/{CONVO}/{uuid.uuid4().hex}"  # this device's own reply topic
replies: dict[object, dict] = {}
arrived = threading.Condition()


def on_socket_open(client, userdata, sock):
    if NODELAY:  # without it each round trip waits ~40 ms (Nagle meets delayed ACK)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def on_message(client, userdata, msg):
    # MQTT 5: the Correlation Data comes back; 3.1.1: each request had its own reply topic.
    key = msg.properties.CorrelationData if V5 else msg.topic
    with arrived:
        replies[key] = msgpack.unpackb(msg.payload)  # a map: {"ok": ..., ...}
        arrived.notify_all()


def request(op, body, request_id, timeout=5.0):
    """Publish one request (QoS 1) and wait for its reply."""
    body = {**body, "id": request_id}
    props = None
    if V5:
        key = request_id.encode()
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = inbox
        props.CorrelationData = key
    else:
        key = body["reply_to"] = f"{inbox}/{request_id}"
    client.publish(f"{PREFIX}/{CONVO}/{op}", msgpack.packb(body), qos=1, properties=props)
    with arrived:
        if not arrived.wait_for(lambda: key in replies, timeout):
            raise TimeoutError(op)
        return replies.pop(key)


def append(role, content):
    request_id = uuid.uuid4().hex  # the same id on every retry: stored once
    for _ in range(3):
        try:
            return request("append", {"role": role, "content": content}, request_id)
        except TimeoutError:
            continue
    raise TimeoutError("append")


client.on_socket_open = on_socket_open
client.on_message = on_message
client.connect(HOST, PORT)
client.subscribe(inbox if V5 else inbox + "/#", qos=1)  # sent before any request
client.loop_start()
print(json.dumps(append("user", "what's the weather?")))
print(json.dumps(request("get", {"last": 4}, uuid.uuid4().hex)))
if "--rounds" in sys.argv:
    times = []
    for _ in range(int(sys.argv[sys.argv.index("--rounds") + 1])):
        started = time.perf_counter()
        request("get", {"last": 1}, uuid.uuid4().hex)
        times.append((time.perf_counter() - started) * 1000)
    print(json.dumps({"median_ms": round(statistics.median(times), 3)}))
client.loop_stop()
client.disconnect()
