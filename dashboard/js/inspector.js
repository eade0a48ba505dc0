// The conversation inspector: a `get` request over MQTT 5 (Response Topic + Correlation Data)
// from the browser, and its turns. Says plainly when the broker does not let this user ask.

(() => {
  "use strict";
  const MW = (globalThis.MW ??= {});

  const { decodePayload, encodeRequest } = MW.decode;

  const TIMEOUT_MS = 5000;
  const BAD_CONVO = /[/+#\u0000-\u001f\u007f-\u009f]|^[_$]/;

  class Inspector {
    // replyTemplate: where the worker may answer; with --route-prefix 'reply/{convo}' the
    // page is opened with ?reply=reply/{convo}.
    constructor(form, statusEl, list, getConnection, prefix, replyTemplate) {
      this.replyTemplate = replyTemplate;
      this.replyTopics = new Set();
      this.statusEl = statusEl;
      this.list = list;
      this.getConnection = getConnection;
      this.prefix = prefix;
      this.pending = null; // {id, timer}
      this.subscribedOn = null;
      form.addEventListener("submit", (e) => {
        e.preventDefault();
        this.ask(new FormData(form).get("convo").trim());
      });
    }

    replyTopic(conn, convo) {
      const base = this.replyTemplate ? this.replyTemplate.replaceAll("{convo}", convo) : "dashboard";
      return `${base}/${conn.clientId}/reply`;
    }

    say(text, state) {
      this.statusEl.textContent = text;
      this.statusEl.dataset.state = state;
    }

    ask(convo) {
      const conn = this.getConnection();
      const client = conn.client;
      if (!client || !client.connected) return this.say("Not connected to the broker: wait for \"connected\" above.", "error");
      if (!convo || BAD_CONVO.test(convo) || new TextEncoder().encode(convo).length > 128) {
        return this.say("Not a conversation id: 1-128 bytes, no / + #, not starting with _ or $.", "error");
      }
      const replyTopic = this.replyTopic(conn, convo);
      const id = crypto.getRandomValues(new Uint8Array(8));
      const hex = toHex(id);
      clearTimeout(this.pending?.timer);
      this.pending = {
        hex,
        convo,
        timer: setTimeout(() => {
          this.pending = null;
          this.say(`No reply within ${TIMEOUT_MS / 1000} s. Either no worker serves prefix "${this.prefix}", or the broker drops this user's requests (its ACL lets it read only: see deploy/ to allow asking).`, "denied");
        }, TIMEOUT_MS),
      };
      this.say(`Asking for ${convo} ...`, "asking");
      const send = () =>
        client.publish(
          `${this.prefix}/${convo}/get`,
          encodeRequest({}),
          { qos: 1, properties: { responseTopic: replyTopic, correlationData: id, contentType: "application/msgpack" } },
          (err) => {
            if (err) this.refused(`The broker refused the request (${err.message.replace(/^Publish error: /, "")}): this user may only watch, not ask the worker. docs/dashboards.md shows how to allow it.`);
          },
        );
      if (this.subscribedOn === client && this.replyTopics.has(replyTopic)) return send();
      if (this.subscribedOn !== client) this.replyTopics.clear();
      client.subscribe(replyTopic, { qos: 1 }, (err, granted) => {
        if (err || !granted?.length || granted[0].qos >= 0x80) {
          return this.refused("The broker does not let this user read replies: this user may only watch, not ask the worker. docs/dashboards.md shows how to allow it.");
        }
        this.subscribedOn = client;
        this.replyTopics.add(replyTopic);
        send();
      });
    }

    refused(text) {
      clearTimeout(this.pending?.timer);
      this.pending = null;
      this.say(text, "denied");
    }

    isReply(topic) {
      return this.replyTopics.has(topic);
    }

    reply(payload, props) {
      const pending = this.pending;
      if (!pending || toHex(props.correlationData ?? []) !== pending.hex) return;
      clearTimeout(pending.timer);
      this.pending = null;
      const body = decodePayload(payload, props.contentType);
      this.list.replaceChildren();
      if (!body.ok) return this.say(`The worker answered ${body.error?.code}: ${body.error?.message}`, "error");
      const turns = body.turns || [];
      const summary = body.summary;
      const tokens = typeof body.tokens === "number" ? `, ${body.tokens} tokens` : "";
      this.say(turns.length || summary
        ? `${pending.convo}: ${summary ? "a summary and " : ""}${turns.length} turn${turns.length === 1 ? "" : "s"}, oldest first${tokens}`
        : `${pending.convo}: no turns (unknown, expired or deleted)`, "ok");
      if (summary) this.list.append(this.item("summary", summary.text, `up to #${summary.upto} · ${summary.tokens} tokens`, "summary"));
      for (const t of turns) {
        const count = typeof t.tokens === "number" ? ` · ${t.tokens} tokens` : "";
        this.list.append(this.item(t.role, t.content, `#${t.seq}${count} · ${new Date(t.ts * 1000).toLocaleTimeString()}`));
      }
    }

    item(role, content, note, kind) {
      const li = document.createElement("li");
      if (kind) li.className = kind;
      li.innerHTML = `<span class="role"></span> <span class="content"></span> <span class="muted"></span>`;
      li.querySelector(".role").textContent = role;
      li.querySelector(".content").textContent = content;
      li.querySelector(".muted").textContent = note;
      return li;
    }
  }

  function toHex(bytes) {
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  MW.inspector = { Inspector };
})();
