// Payloads of events, status and stats: msgpack by default, JSON with --event-format json.
// The MQTT 5 Content Type says which; without one, the first byte does.

(() => {
  "use strict";
  const MW = (globalThis.MW ??= {});

  const { decode: unpack, encode: pack } = globalThis.MessagePack;
  const text = new TextDecoder("utf-8", { fatal: true });

  function decodePayload(payload, contentType) {
    if (contentType === "application/json") return JSON.parse(text.decode(payload));
    if (contentType === "application/msgpack") return unpack(payload);
    // No Content Type: our msgpack payloads are maps, which never start with "{".
    return payload[0] === 0x7b ? JSON.parse(text.decode(payload)) : unpack(payload);
  }

  function encodeRequest(body) {
    return pack(body);
  }

  // Topics under the prefix: P/_worker/<id>/status|stats and P/<convo>/evicted.
  function classify(topic, prefix) {
    if (!topic.startsWith(prefix + "/")) return null;
    const rest = topic.slice(prefix.length + 1).split("/");
    if (rest.length === 3 && rest[0] === "_worker" && (rest[2] === "status" || rest[2] === "stats")) {
      return { kind: rest[2], clientId: rest[1] };
    }
    if (rest.length === 2 && rest[1] === "evicted") return { kind: "evicted", convo: rest[0] };
    return null;
  }

  MW.decode = { decodePayload, encodeRequest, classify };
})();
