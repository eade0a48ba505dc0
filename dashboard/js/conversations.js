// The live conversations: P/_conversations/list paged through every few seconds, shown most
// recently used first, filtered by an id prefix, with a count; a click opens one in the
// inspector. Listing is not a use: watching keeps nothing alive.

(() => {
  "use strict";
  const MW = (globalThis.MW ??= {});

  const REFRESH_MS = 3000;
  const PAGE = 1000;
  const MAX_PAGES = 10; // at most 10,000 listed per refresh: a page stays light on a big store
  const SHOWN = 200;

  class ConversationsView {
    constructor(form, countEl, list, requests, onPick) {
      this.form = form;
      this.countEl = countEl;
      this.list = list;
      this.requests = requests;
      this.onPick = onPick;
      this.busy = false;
      form.addEventListener("submit", (e) => {
        e.preventDefault();
        this.refresh();
      });
      form.elements.prefix.addEventListener("input", () => this.refresh());
      setInterval(() => this.refresh(), REFRESH_MS);
    }

    say(text, state) {
      this.countEl.textContent = text;
      this.countEl.dataset.state = state;
    }

    async refresh() {
      if (!this.requests.connected()) return;
      if (this.busy) {
        this.again = true;
        return;
      }
      this.busy = true;
      const prefix = this.form.elements.prefix.value.trim();
      try {
        const { found, complete } = await this.listAll(prefix);
        this.render(found, complete, prefix);
      } catch (err) {
        this.say(err.message, err.state);
      } finally {
        this.busy = false;
      }
      if (this.again) {
        this.again = false;
        this.refresh();
      }
    }

    async listAll(prefix) {
      const found = [];
      let cursor = null;
      for (let page = 0; page < MAX_PAGES; page++) {
        const body = { limit: PAGE };
        if (prefix) body.prefix = prefix;
        if (cursor) body.cursor = cursor;
        const reply = await this.requests.ask("_conversations", "list", body);
        if (!reply.ok) throw Object.assign(new Error(`The worker answered ${reply.error?.code}: ${reply.error?.message}`), { state: "error" });
        found.push(...reply.conversations);
        cursor = reply.cursor;
        if (!cursor) return { found, complete: true };
      }
      return { found, complete: false };
    }

    render(found, complete, prefix) {
      found.sort((a, b) => b.last_used - a.last_used);
      const n = found.length;
      const count = `${complete ? n : `more than ${n}`}${prefix ? "" : " live"} conversation${n === 1 ? "" : "s"}`;
      const which = prefix ? ` starting with "${prefix}"` : "";
      this.say(`${count}${which}${n > SHOWN ? `, the ${SHOWN} most recently used shown` : ""}`, "ok");
      this.list.dataset.count = String(n);
      const now = Date.now() / 1000;
      this.list.replaceChildren(
        ...found.slice(0, SHOWN).map((c) => {
          const li = document.createElement("li");
          li.dataset.convo = c.convo;
          li.innerHTML = `<button type="button" class="link"></button> <span class="muted"></span>`;
          li.querySelector("button").textContent = c.convo;
          li.querySelector("button").addEventListener("click", () => this.onPick(c.convo));
          const parts = [`${c.turns} turn${c.turns === 1 ? "" : "s"}`, `${c.keys} key${c.keys === 1 ? "" : "s"}`, `${c.tokens} tokens`, `used ${ago(now - c.last_used)}`];
          if (c.upto) parts.push(`summary up to #${c.upto}`);
          if (c.expires_at != null) parts.push(`expires in ${ago(c.expires_at - now)}`);
          li.querySelector(".muted").textContent = parts.join(" · ");
          return li;
        }),
      );
    }
  }

  function ago(seconds) {
    const s = Math.max(0, Math.round(seconds));
    if (s < 60) return `${s} s`;
    const min = Math.round(s / 60);
    if (min < 60) return `${min} min`;
    return `${Math.round(s / 3600)} h`;
  }

  MW.conversations = { ConversationsView };
})();
