// Requests to the worker from the browser: MQTT 5 Response Topic + Correlation Data, each
// answered by a promise. Says plainly (as the error's message) when the broker does not let
// this user ask.

(() => {
  "use strict";
  const MW = (globalThis.MW ??= {});

  const { decodePayload, encodeRequest } = MW.decode;

  const TIMEOUT_MS = 5000;

  // A request that got no answer: `state` is "error" (try again) or "denied" (the broker's ACL).
  function failure(message, state) {
    return Object.assign(new Error(message), { state });
  }

  class Requests {
    // replyTemplate: where the worker may answer; with --route-prefix 'reply/{convo}' the
    // page is opened with ?reply=reply/{convo}.
    // workersOnline(): how many workers of the prefix the page sees online.
    constructor(getConnection, prefix, replyTemplate, workersOnline = () => null) {
      this.getConnection = getConnection;
      this.workersOnline = workersOnline;
      this.prefix = prefix;
      this.replyTemplate = replyTemplate;
      this.replyTopics = new Set();
      this.subscribedOn = null;
      this.pending = new Map(); // correlation hex -> {resolve, reject, timer}
    }

    connected() {
      return Boolean(this.getConnection().client?.connected);
    }

    replyTopic(conn, convo) {
      const base = this.replyTemplate ? this.replyTemplate.replaceAll("{convo}", convo) : "dashboard";
      return `${base}/${conn.clientId}/reply`;
    }

    // P/<convo>/<op> with `body`: resolves with the decoded reply (ok or not), rejects with a
    // failure() when none can come.
    ask(convo, op, body = {}) {
      return new Promise((resolve, reject) => {
        const conn = this.getConnection();
        const client = conn.client;
        if (!client || !client.connected) return reject(failure("Not connected to the broker: wait for \"connected\" above.", "error"));
        const replyTopic = this.replyTopic(conn, convo);
        const id = crypto.getRandomValues(new Uint8Array(8));
        const hex = toHex(id);
        const timer = setTimeout(() => this.settle(hex, null, this.unanswered()), TIMEOUT_MS);
        this.pending.set(hex, { resolve, reject, timer });
        const send = () =>
          client.publish(
            `${this.prefix}/${convo}/${op}`,
            encodeRequest(body),
            { qos: 1, properties: { responseTopic: replyTopic, correlationData: id, contentType: "application/msgpack" } },
            (err) => {
              if (err) this.settle(hex, null, failure(`The broker refused the request (${err.message.replace(/^Publish error: /, "")}): this user may only watch, not ask the worker. docs/dashboards.md shows how to allow it.`, "denied"));
            },
          );
        if (this.subscribedOn === client && this.replyTopics.has(replyTopic)) return send();
        if (this.subscribedOn !== client) this.replyTopics.clear();
        client.subscribe(replyTopic, { qos: 1 }, (err, granted) => {
          if (err || !granted?.length || granted[0].qos >= 0x80) {
            return this.settle(hex, null, failure("The broker does not let this user read replies: this user may only watch, not ask the worker. docs/dashboards.md shows how to allow it.", "denied"));
          }
          this.subscribedOn = client;
          this.replyTopics.add(replyTopic);
          send();
        });
      });
    }

    unanswered() {
      const within = `No reply within ${TIMEOUT_MS / 1000} s`;
      if (this.workersOnline() === 0) {
        return failure(`${within}: no worker of prefix "${this.prefix}" is online (Workers above).`, "error");
      }
      return failure(`${within}. Either no worker serves prefix "${this.prefix}", or the broker drops this user's requests (its ACL lets it read only: see deploy/ to allow asking).`, "denied");
    }

    settle(hex, body, error) {
      const pending = this.pending.get(hex);
      if (!pending) return;
      clearTimeout(pending.timer);
      this.pending.delete(hex);
      if (error) pending.reject(error);
      else pending.resolve(body);
    }

    isReply(topic) {
      return this.replyTopics.has(topic);
    }

    reply(payload, props) {
      const hex = toHex(props.correlationData ?? []);
      if (!this.pending.has(hex)) return;
      let body;
      try {
        body = decodePayload(payload, props.contentType);
      } catch (err) {
        return this.settle(hex, null, failure(`An undecodable reply: ${err.message}`, "error"));
      }
      this.settle(hex, body, null);
    }
  }

  function toHex(bytes) {
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  MW.requests = { Requests };
})();
