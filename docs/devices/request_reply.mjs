// A device's request/reply with MQTT.js 5 and @msgpack/msgpack: MQTT 5 by default, 3.1.1
// with --v311.   MQTT_HOST=... MQTT_PORT=... CONVO=kiosk-7 node request_reply.mjs [--v311]
//                [--no-nodelay] [--rounds N]
import { randomUUID } from "node:crypto";
import mqtt from "mqtt";
import { decode, encode } from "@msgpack/msgpack";

const host = process.env.MQTT_HOST ?? "127.0.0.1";
const port = Number(process.env.MQTT_PORT ?? 1883);
const prefix = process.env.PREFIX ?? "mem";
const convo = process.env.CONVO ?? "kiosk-7";
const v5 = !process.argv.includes("--v311");

const client = await mqtt.connectAsync({ host, port, protocolVersion: v5 ? 5 : 4 });
// Without it each round trip waits ~40 ms (Nagle meets delayed ACK).
if (!process.argv.includes("--no-nodelay")) client.stream.setNoDelay(true);

const inbox = `reply/${convo}/${randomUUID()}`; // this device's own reply topic
const waiting = new Map();
client.on("message", (topic, payload, packet) => {
  // MQTT 5: the Correlation Data comes back; 3.1.1: each request had its own reply topic.
  const key = v5 ? packet.properties?.correlationData?.toString() : topic;
  waiting.get(key)?.(decode(payload)); // a map: {ok: ..., ...}
  waiting.delete(key);
});
await client.subscribeAsync(v5 ? inbox : `${inbox}/#`, { qos: 1 });

async function request(op, body, id, timeoutMs = 5000) {
  body = { ...body, id };
  const options = { qos: 1 };
  let key = id;
  if (v5) options.properties = { responseTopic: inbox, correlationData: Buffer.from(id) };
  else key = body.reply_to = `${inbox}/${id}`;
  const reply = new Promise((resolve, reject) => {
    waiting.set(key, resolve);
    setTimeout(() => reject(new Error(`${op}: no reply`)), timeoutMs).unref();
  });
  await client.publishAsync(`${prefix}/${convo}/${op}`, Buffer.from(encode(body)), options);
  return reply;
}

async function append(role, content) {
  const id = randomUUID(); // the same id on every retry: stored once
  for (let attempt = 1; ; attempt++) {
    try {
      return await request("append", { role, content }, id);
    } catch (err) {
      if (attempt === 3) throw err;
    }
  }
}

console.log(JSON.stringify(await append("user", "what's the weather?")));
console.log(JSON.stringify(await request("get", { last: 4 }, randomUUID())));
const at = process.argv.indexOf("--rounds");
if (at > 0) {
  const times = [];
  for (let i = 0; i < Number(process.argv[at + 1]); i++) {
    const started = performance.now();
    await request("get", { last: 1 }, randomUUID());
    times.push(performance.now() - started);
  }
  times.sort((a, b) => a - b);
  console.log(JSON.stringify({ median_ms: Number(times[times.length >> 1].toFixed(3)) }));
}
await client.endAsync();
