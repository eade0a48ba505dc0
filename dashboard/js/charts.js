// Time series drawn from the stats stream: rates from counter differences between two stats
// messages, levels as they come. One small uPlot chart per measure.

(() => {
  "use strict";
  const MW = (globalThis.MW ??= {});

  const KEEP = 360; // points per series: an hour at the default --stats-interval of 10 s
  const REASONS = ["ttl", "lru", "memory", "deleted"];
  const ERROR_CODES = [
    "bad_payload", "bad_request", "too_large", "bad_topic", "conflict", "unavailable", "internal",
  ];
  const PALETTE = ["#2b6cb0", "#c05621", "#2f855a", "#b83280", "#6b46c1", "#718096", "#b7791f"];
  // time-axis steps in seconds: whole seconds at least, so that labels read as clock times
  const TIME_STEPS = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400, 43200, 86400];
  const HEIGHT = 120;
  // byte-axis steps: powers of two (ticks at 32Mi and 64Mi, not at 47.7Mi)
  const BINARY_STEPS = [0, 1, 2, 3].flatMap((k) => [1, 2, 4, 8, 16, 32, 64, 128, 256, 512].map((m) => m * 1024 ** k));

  // name, series labels, how to get each value from (stats, previous stats, seconds between),
  // and how to write a value (decimal by default; bytes in binary units, as the cards do)
  const MEASURES = [
    ["requests / s", ["req/s"], (s, p, dt) => [rate(s.requests, p?.requests, dt)]],
    ["conversations and turns", ["conversations", "turns"], (s) => [s.conversations, s.turns]],
    ["stored bytes vs --max-bytes", ["bytes", "budget"], (s) => [s.bytes, s.limits?.max_bytes ?? null], binary],
    ["evictions / s by reason", REASONS, (s, p, dt) => REASONS.map((r) => rate(s.evictions?.[r] ?? 0, p ? p.evictions?.[r] ?? 0 : undefined, dt))],
    ["errors / s by code", ERROR_CODES, (s, p, dt) => ERROR_CODES.map((c) => rate(s.errors?.[c] ?? 0, p ? p.errors?.[c] ?? 0 : undefined, dt))],
  ];

  function rate(now, before, dt) {
    if (before === undefined || !(dt > 0) || now < before) return null;
    return (now - before) / dt;
  }

  class WorkerCharts {
    constructor(container) {
      this.data = MEASURES.map(([, labels]) => [[], ...labels.map(() => [])]);
      this.prev = null;
      this.container = container;
      container.hidden = true;
      this.plots = MEASURES.map(([title, labels, , fmt = compact], i) => {
        const box = document.createElement("figure");
        box.className = "chart";
        container.append(box);
        const plot = new globalThis.uPlot(
          {
            title,
            width: chartWidth(box),
            height: HEIGHT,
            scales: { x: { time: true } },
            axes: [
              { size: 28, space: 64, incrs: TIME_STEPS, values: (u, ticks, _i, _space, step) => ticks.map((t) => clock(t, step < 60)) },
              { size: 56, values: (u, ticks) => ticks.map(fmt), ...(fmt === binary ? { incrs: BINARY_STEPS } : {}) },
            ],
            series: [
              { label: "time", value: (u, t) => (t == null ? "--" : clock(t, true)) },
              ...labels.map((label, j) => ({ label, stroke: PALETTE[j], width: 1.5, points: { show: false }, value: (u, v) => (v == null ? "--" : fmt(v)), ...(label === "budget" ? { dash: [6, 4] } : {}) })),
            ],
            // the legend shows the latest values unless the pointer picks a moment
            hooks: { setCursor: [(u) => u.cursor.idx == null && showLatest(u)] },
          },
          this.data[i],
          box,
        );
        new ResizeObserver(() => plot.setSize({ width: chartWidth(box), height: HEIGHT })).observe(box);
        return plot;
      });
    }

    add(stats) {
      const ts = stats.ts ?? Date.now() / 1000;
      const dt = this.prev ? ts - (this.prev.ts ?? ts) : 0;
      if (this.prev && dt <= 0) return; // a repeat (the retained copy after a reconnect)
      MEASURES.forEach(([, , values], i) => {
        const cols = this.data[i];
        cols[0].push(ts);
        values(stats, this.prev, dt).forEach((v, j) => cols[j + 1].push(v));
        if (cols[0].length > KEEP) cols.forEach((c) => c.shift());
      });
      this.prev = stats;
      // one point makes no line (and uPlot a time axis of years): wait for the second
      if (this.data[0][0].length < 2) return;
      this.container.hidden = false;
      this.plots.forEach((p, i) => {
        p.setData(this.data[i]);
        if (p.cursor.idx == null) showLatest(p);
      });
    }
  }

  function showLatest(u) {
    const n = u.data[0].length;
    if (n) u.setLegend({ idx: n - 1 }, false);
  }

  // seconds since the epoch -> "14:05" or, for steps under a minute, "14:05:30" (local time)
  function clock(t, seconds) {
    const opts = { hour: "2-digit", minute: "2-digit", hourCycle: "h23", ...(seconds ? { second: "2-digit" } : {}) };
    return new Date(t * 1000).toLocaleTimeString([], opts);
  }

  // 60000000 -> "60M": axis labels that fit a phone (ticks are round decimal numbers).
  function compact(n) {
    const a = Math.abs(n);
    if (!Number.isFinite(a)) return "--";
    if (a >= 1e9) return `${+(n / 1e9).toFixed(1)}G`;
    if (a >= 1e6) return `${+(n / 1e6).toFixed(1)}M`;
    if (a >= 1e4) return `${+(n / 1e3).toFixed(1)}k`;
    return `${+n.toFixed(2)}`;
  }

  // 67108864 -> "64Mi": bytes as the cards write them (MiB), short enough for an axis.
  function binary(n) {
    const a = Math.abs(n);
    if (!Number.isFinite(a)) return "--";
    if (a >= 2 ** 30) return `${+(n / 2 ** 30).toFixed(1)}Gi`;
    if (a >= 2 ** 20) return `${+(n / 2 ** 20).toFixed(1)}Mi`;
    if (a >= 2 ** 10) return `${+(n / 2 ** 10).toFixed(1)}Ki`;
    return `${+n.toFixed(0)}`;
  }

  function chartWidth(box) {
    return Math.max(200, Math.floor(box.clientWidth));
  }

  MW.charts = { WorkerCharts, REASONS, ERROR_CODES, clock };
})();
