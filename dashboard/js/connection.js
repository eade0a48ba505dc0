// One MQTT 5 connection over WebSockets: keeps itself up, tells its state in words, and asks
// for a username and password when the broker refuses anonymous access.

(() => {
  "use strict";
  const MW = (globalThis.MW ??= {});

  // mqtt.js's browser bundle defines the global `mqtt`.
  const mqtt = globalThis.mqtt.connect ? globalThis.mqtt : globalThis.mqtt.default;

  // CONNACK reason codes meaning "who are you?": MQTT 5 (134, 135) and MQTT 3.1.1 (4, 5).
  const AUTH_CODES = new Set([134, 135, 4, 5]);

  function defaultUrl(loc) {
    return `${loc.protocol === "https:" ? "wss" : "ws"}://${loc.host}/`;
  }

  class Connection {
    constructor({ url, topics, onMessage, onState }) {
      this.url = url;
      this.topics = topics;
      this.onMessage = onMessage;
      this.onState = onState;
      this.client = null;
      this.clientId = "dashboard-" + Math.random().toString(16).slice(2, 10);
    }

    connect(username, password) {
      if (this.client) this.client.end(true);
      const client = mqtt.connect(this.url, {
        protocolVersion: 5,
        clientId: this.clientId,
        clean: true,
        username: username || undefined,
        password: password || undefined,
        reconnectPeriod: 1000,
        connectTimeout: 5000,
        keepalive: 10,
        resubscribe: false,
      });
      this.client = client;
      this.onState("connecting", `connecting to ${this.url}`);
      client.on("connect", () => {
        this.onState("connected", `connected to ${this.url}`);
        client.subscribe(this.topics, { qos: 1 }, (err, granted) => {
          const refused = (granted || []).filter((g) => g.qos >= 0x80).map((g) => g.topic);
          if (err || refused.length) {
            this.onState("connected", `connected, but not allowed to read ${refused.join(", ") || err}`);
          }
        });
      });
      client.on("reconnect", () => this.onState("reconnecting", `reconnecting to ${this.url}`));
      client.on("offline", () => this.onState("offline", `offline: ${this.url} does not answer; retrying`));
      client.on("error", (err) => {
        if (AUTH_CODES.has(err.code)) {
          client.end(true);
          this.client = null;
          this.onState("login", username ? "the broker refused this username or password" : "the broker asks for a username and password");
        }
      });
      client.on("message", (topic, payload, packet) => {
        this.onMessage(topic, payload, packet.properties || {}, packet.retain);
      });
      return client;
    }
  }

  MW.connection = { Connection, defaultUrl };
})();
