// The Node.js peer of scripts/bench: the short script a Pi owner could pick instead of the
// worker (issue 16). MQTT.js subscribes to PREFIX/+/+ at QoS 1 over MQTT 5, decodes msgpack,
// keeps a Map of capped arrays, and replies on the Response Topic with the Correlation Data,
// at the request's QoS. No validation, TTL, LRU, events or backpressure.
//
//   node bench/node/peer.js HOST PORT PREFIX
import mqtt from 'mqtt'
import { decode, encode } from '@msgpack/msgpack'

const [host, port, prefix] = process.argv.slice(2)
const CAP = 20
const convos = new Map()
const client = mqtt.connect({ host, port: Number(port), protocolVersion: 5, clean: true })

client.on('connect', () => {
  // MQTT.js opens its socket without noDelay. mqtt-packet corks each tick's writes into one
  // segment, so no 40 ms Nagle/delayed-ACK stall shows at window 1 either way; set as the
  // other responders do, so a write in a later tick never waits for an ACK.
  client.stream.setNoDelay(true)
  client.subscribe(`${prefix}/+/+`, { qos: 1 }, (err) => {
    if (err) throw err
    console.log('ready')
  })
})

client.on('message', (topic, payload, packet) => {
  const [, convo, op] = topic.split('/')
  const body = payload.length ? decode(payload) : {}
  let turns = convos.get(convo)
  let reply
  if (op === 'append') {
    if (!turns) convos.set(convo, (turns = { seq: 0, list: [] }))
    turns.list.push({ role: body.role, content: body.content, ts: Date.now() / 1000, seq: ++turns.seq })
    if (turns.list.length > CAP) turns.list.shift()
    reply = { ok: true, seq: turns.seq, count: turns.list.length }
  } else if (op === 'get') {
    reply = { ok: true, turns: turns ? turns.list.slice(-(body.last || CAP)) : [] }
  } else return
  const route = packet.properties?.responseTopic
  if (!route) return
  const properties = { contentType: 'application/msgpack' }
  if (packet.properties.correlationData) properties.correlationData = packet.properties.correlationData
  const out = encode(reply)
  client.publish(route, Buffer.from(out.buffer, out.byteOffset, out.byteLength), { qos: packet.qos, properties })
})
