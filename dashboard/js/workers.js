// One card per worker, from its retained status and stats: online or offline in words and
// colour, what it runs, its gauges against its limits, and its charts. A worker that is not
// online can be removed: its retained status and stats are cleared on the broker.

(() => {
  "use strict";
  const MW = (globalThis.MW ??= {});

  const { WorkerCharts } = MW.charts;

  class WorkersView {
    // retire(clientId, done): clear the worker's retained messages; done(null) or done(why)
    constructor(root, empty, retire) {
      this.root = root;
      this.empty = empty;
      this.retire = retire;
      this.cards = new Map();
      setInterval(() => this.cards.forEach((card) => card.tick()), 1000);
    }

    card(clientId) {
      let card = this.cards.get(clientId);
      if (!card) {
        card = new WorkerCard(clientId, this.retire);
        const after = [...this.cards.keys()].sort().find((id) => id > clientId);
        this.root.insertBefore(card.el, after ? this.cards.get(after).el : null);
        this.cards.set(clientId, card);
        this.empty.hidden = true;
      }
      return card;
    }

    status(clientId, body) {
      this.card(clientId).status(body);
    }

    online() {
      return [...this.cards.values()].filter((card) => card.online).length;
    }

    // The worker's retained status was cleared (from this page, memctl retire or elsewhere).
    remove(clientId) {
      const card = this.cards.get(clientId);
      if (!card) return;
      card.el.remove();
      this.cards.delete(clientId);
      this.empty.hidden = this.cards.size > 0;
    }

    stats(clientId, body, retained) {
      this.card(clientId).stats(body, retained);
    }
  }

  class WorkerCard {
    constructor(clientId, retire) {
      this.el = document.createElement("article");
      this.el.className = "card";
      this.el.dataset.clientId = clientId;
      this.el.dataset.state = "unknown";
      this.el.innerHTML = `
        <header><h3></h3><span class="state badge">no status yet</span></header>
        <p class="retire"><button type="button">Remove this worker</button>
          <span class="muted">clears its retained status and stats on the broker</span></p>
        <div class="card-body"><div class="summary">
        <dl class="facts">
          <dt>version</dt><dd data-field="version">?</dd>
          <dt>backend</dt><dd data-field="backend">?</dd>
          <dt>uptime</dt><dd data-field="uptime">?</dd>
          <dt>last stats</dt><dd data-field="age">none yet</dd>
        </dl>
        <div class="gauges">
          ${gauge("conversations")}
          ${gauge("bytes")}
        </div>
        <dl class="facts">
          <dt>turns</dt><dd data-field="turns">?</dd>
          <dt>state keys</dt><dd data-field="keys">?</dd>
          <dt>requests</dt><dd data-field="requests">?</dd>
          <dt>evictions</dt><dd data-field="evictions">?</dd>
          <dt>errors</dt><dd data-field="errors">?</dd>
          <dt>TTL</dt><dd data-field="ttl">?</dd>
        </dl></div>
        <div><p class="muted no-charts">Charts start with the next stats message.</p>
        <div class="charts"></div></div></div>`;
      this.el.querySelector("h3").textContent = clientId;
      const button = this.el.querySelector(".retire button");
      const note = this.el.querySelector(".retire span");
      button.addEventListener("click", () => {
        button.disabled = true;
        note.textContent = "removing...";
        retire(clientId, (why) => {
          button.disabled = false;
          note.textContent = why ? `not removed: ${why}` : "removed";
          note.classList.toggle("refused", Boolean(why));
        });
      });
      this.charts = new WorkerCharts(this.el.querySelector(".charts"));
      this.online = false;
      this.uptimeAt = null; // [uptime in the last stats, when they were sent]
      this.statsAt = null;
      this.every = 10000; // ms between its stats, once two have come (--stats-interval)
    }

    set(field, text) {
      this.el.querySelector(`[data-field="${field}"]`).textContent = text;
    }

    status(body) {
      this.online = body.state === "online";
      this.el.dataset.state = this.online ? "online" : "offline";
      const badge = this.el.querySelector(".state");
      badge.textContent = this.online ? "online" : "offline";
      badge.title = `${body.state} since ${new Date((body.ts ?? 0) * 1000).toLocaleString()}`;
      this.set("version", body.version ?? "?");
      this.set("backend", body.backend ?? "?");
      if (!this.online) this.set("uptime", "stopped");
      this.el.querySelector(".no-charts").textContent = this.online
        ? "Charts start with the next stats message."
        : "Offline: no stats are coming. Charts start when it is back.";
    }

    stats(s, retained) {
      const lim = s.limits || {};
      // Stats that come as they are published are new, whatever the worker's clock says (a
      // Pi has no clock of its own until it reaches a time server); a retained copy, kept by
      // the broker, is as old as the worker's clock says.
      const at = retained && isCount(s.ts) ? Math.min(Date.now(), s.ts * 1000) : Date.now();
      if (s.stats_interval > 0) this.every = s.stats_interval * 1000;
      else if (this.statsAt && at > this.statsAt) this.every = at - this.statsAt; // older workers
      this.statsAt = at;
      this.uptimeAt = isCount(s.uptime) ? [s.uptime, this.statsAt] : null;
      this.fill("conversations", s.conversations, lim.max_conversations, number);
      this.fill("bytes", s.bytes, lim.max_bytes, bytes);
      this.set("turns", `${number(s.turns)}${lim.max_turns ? ` (at most ${lim.max_turns} per conversation)` : ""}`);
      this.set("keys", number(s.keys));
      this.set("requests", number(s.requests));
      this.set("evictions", counts(s.evictions));
      this.set("errors", counts(s.errors));
      this.set("ttl", lim.ttl === undefined ? "?" : lim.ttl ? `${lim.ttl} s after last use` : "off");
      this.el.dataset.requests = s.requests;
      this.el.dataset.deleted = s.evictions?.deleted ?? 0;
      this.charts.add(s);
      this.el.querySelector(".no-charts").hidden = !this.charts.container.hidden;
      this.tick();
    }

    fill(name, value, limit, fmt) {
      const meter = this.el.querySelector(`[data-gauge="${name}"]`);
      if (!isCount(value)) {
        meter.querySelector("meter").value = 0;
        meter.querySelector(".value").textContent = "?";
        return;
      }
      if (!isCount(limit)) limit = 0;
      const share = limit ? value / limit : 0;
      meter.querySelector("meter").value = Math.min(1, share);
      meter.querySelector("meter").className = share > 0.9 ? "high" : "";
      meter.querySelector(".value").textContent = limit
        ? `${fmt(value)} of ${fmt(limit)} (${(share * 100).toFixed(share < 0.1 ? 1 : 0)}%)`
        : fmt(value);
    }

    tick() {
      const age = this.statsAt ? Date.now() - this.statsAt : 0;
      // "online" but silent: stopped where its Last Will never reached this broker (a broker
      // that restarted from a saved "online"), or cut off from it
      const silent = this.online && age > Math.max(SILENT_MS, 3 * this.every);
      this.el.dataset.silent = silent;
      if (this.uptimeAt && this.online) {
        const [up, at] = this.uptimeAt;
        this.set("uptime", silent ? "unknown" : duration(up + (Date.now() - at) / 1000));
      }
      if (this.statsAt) this.set("age", `${duration(age / 1000)} ago${silent ? ": silent, gone or cut off?" : ""}`);
    }
  }

  const SILENT_MS = 30000;

  function gauge(name) {
    return `<div class="gauge" data-gauge="${name}"><span class="label">${name}</span><meter min="0" max="1" value="0"></meter><span class="value">?</span></div>`;
  }

  // Stats from another version, or from whoever else publishes there, may lack a field.
  function isCount(n) {
    return typeof n === "number" && Number.isFinite(n);
  }

  function number(n) {
    return isCount(n) ? n.toLocaleString() : "?";
  }

  function counts(map) {
    const parts = Object.entries(map || {}).filter(([, n]) => n).map(([k, n]) => `${k} ${n}`);
    return parts.length ? parts.join(", ") : "none";
  }

  function bytes(n) {
    if (!isCount(n)) return "?";
    const units = ["B", "KiB", "MiB", "GiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) {
      n /= 1024;
      i++;
    }
    return `${i ? n.toFixed(1) : n} ${units[i]}`;
  }

  function duration(s) {
    s = Math.max(0, Math.floor(s));
    const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
    if (d) return `${d} d ${h} h`;
    if (h) return `${h} h ${m} min`;
    if (m) return `${m} min ${s % 60} s`;
    return `${s} s`;
  }

  MW.workers = { WorkersView, bytes, duration };
})();
