// The conversation inspector: a `get` request from the browser, and its turns. Says plainly
// when the broker does not let this user ask.

(() => {
  "use strict";
  const MW = (globalThis.MW ??= {});

  const BAD_CONVO = /[/+#\u0000-\u001f\u007f-\u009f]|^[_$]/;

  class Inspector {
    constructor(form, statusEl, list, requests) {
      this.form = form;
      this.statusEl = statusEl;
      this.list = list;
      this.requests = requests;
      this.asked = 0; // only the latest question's answer is shown
      form.addEventListener("submit", (e) => {
        e.preventDefault();
        this.ask(new FormData(form).get("convo").trim());
      });
    }

    say(text, state) {
      this.statusEl.textContent = text;
      this.statusEl.dataset.state = state;
    }

    // Show `convo` (also when picked from the list of live conversations).
    show(convo) {
      this.form.elements.convo.value = convo;
      this.ask(convo);
    }

    async ask(convo) {
      if (!this.requests.connected()) return this.say("Not connected to the broker: wait for \"connected\" above.", "error");
      if (!convo || BAD_CONVO.test(convo) || new TextEncoder().encode(convo).length > 128) {
        return this.say("Not a conversation id: 1-128 bytes, no / + #, not starting with _ or $.", "error");
      }
      const n = ++this.asked;
      this.say(`Asking for ${convo} ...`, "asking");
      let body;
      try {
        body = await this.requests.ask(convo, "get");
      } catch (err) {
        if (n === this.asked) this.say(err.message, err.state);
        return;
      }
      if (n !== this.asked) return;
      this.list.replaceChildren();
      if (!body.ok) return this.say(`The worker answered ${body.error?.code}: ${body.error?.message}`, "error");
      const turns = body.turns || [];
      const summary = body.summary;
      const tokens = typeof body.tokens === "number" ? `, ${body.tokens} tokens` : "";
      this.say(turns.length || summary
        ? `${convo}: ${summary ? "a summary and " : ""}${turns.length} turn${turns.length === 1 ? "" : "s"}, oldest first${tokens}`
        : `${convo}: no turns (unknown, expired or deleted)`, "ok");
      if (summary) this.list.append(this.item("summary", summary.text, `up to #${summary.upto} · ${summary.tokens} tokens`, "summary"));
      for (const t of turns) {
        const count = typeof t.tokens === "number" ? ` · ${t.tokens} tokens` : "";
        this.list.append(this.item(t.role, t.content, `#${t.seq}${count} · ${new Date(t.ts * 1000).toLocaleTimeString([], { hourCycle: "h23" })}`));
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

  MW.inspector = { Inspector };
})();
