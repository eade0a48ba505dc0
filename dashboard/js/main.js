// Wires the page: reads ?url= and ?prefix=, opens the connection, routes each message to
// its view.

(() => {
  "use strict";
  const MW = (globalThis.MW ??= {});

  const { Connection, defaultUrl } = MW.connection;
  const { classify, decodePayload } = MW.decode;
  const { EvictionsView } = MW.evictions;
  const { Inspector } = MW.inspector;
  const { ConversationsView } = MW.conversations;
  const { Requests } = MW.requests;
  const { WorkersView } = MW.workers;

  const params = new URLSearchParams(location.search);
  const url = params.get("url") || defaultUrl(location);
  const prefix = (params.get("prefix") || "mem").replace(/\/+$/, "");
  const $ = (id) => document.getElementById(id);

  $("where").textContent = `broker ${url} · prefix ${prefix}`;
  const workers = new WorkersView($("workers"), $("no-workers"), retire);
  const evictions = new EvictionsView($("eviction-feed"), $("eviction-counts"), $("no-evictions"));

  const conn = new Connection({
    url,
    topics: [`${prefix}/_worker/+/status`, `${prefix}/_worker/+/stats`, `${prefix}/+/evicted`],
    onMessage,
    onState,
  });
  const requests = new Requests(() => conn, prefix, params.get("reply"), () => workers.online());
  const inspector = new Inspector($("inspector"), $("inspector-status"), $("inspector-turns"), requests);
  const conversations = new ConversationsView($("convo-filter"), $("convo-count"), $("convo-list"), requests, (convo) => inspector.show(convo));

  function onMessage(topic, payload, props, retained) {
    if (requests.isReply(topic)) return requests.reply(payload, props);
    const where = classify(topic, prefix);
    if (where?.kind === "status" && !payload.length) return workers.remove(where.clientId);
    if (!where || !payload.length) return;
    let body;
    try {
      body = decodePayload(payload, props.contentType);
    } catch (err) {
      console.warn(`undecodable payload on ${topic}`, err);
      return;
    }
    // One message a view cannot show (any client may publish under the prefix) is left out:
    // thrown into MQTT.js's handler, it stopped every message after it.
    try {
      if (where.kind === "status") workers.status(where.clientId, body);
      else if (where.kind === "stats") workers.stats(where.clientId, body, retained);
      else evictions.add(body);
    } catch (err) {
      console.warn(`cannot show the message on ${topic}`, err);
    }
  }

  // Clear a worker's retained status and stats: empty retained messages, as memctl retire does.
  function retire(clientId, done) {
    const client = conn.client;
    if (!client || !client.connected) return done("not connected to the broker");
    let left = 2;
    let refused = null;
    for (const kind of ["stats", "status"]) {
      client.publish(`${prefix}/_worker/${clientId}/${kind}`, "", { qos: 1, retain: true }, (err) => {
        refused ??= err ? `the broker refused (${err.message}): this login may only watch; memctl retire ${clientId} with one that may` : null;
        if (--left === 0) done(refused);
      });
    }
  }

  function onState(state, words) {
    const badge = $("conn");
    badge.dataset.state = state;
    badge.textContent = words;
    $("login").hidden = state !== "login";
    if (state === "connected") conversations.refresh();
    if (state === "login") $("login-why").textContent = `${words[0].toUpperCase()}${words.slice(1)}.`;
  }

  $("login").addEventListener("submit", (e) => {
    e.preventDefault();
    const form = new FormData(e.target);
    conn.connect(form.get("username"), form.get("password"));
  });

  // As the worker's --prefix check: a broker ends the connection of a client that subscribes
  // to a filter it refuses, and the page reconnected for ever saying the broker did not answer.
  function prefixProblem(p) {
    if (!p) return "is empty";
    if (/[+#\u0000-\u001f\u007f-\u009f]/u.test(p)) return "has a wildcard or a control character";
    if (p.startsWith("$") || p.startsWith("/") || p.includes("//")) return "starts with $ or /, or has an empty level";
    return null;
  }

  const problem = prefixProblem(prefix);
  if (problem) onState("offline", `not connected: ?prefix=${prefix} ${problem}; give the worker's --prefix`);
  else conn.connect();
})();
