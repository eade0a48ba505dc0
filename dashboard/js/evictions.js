// The eviction feed: newest first, with counts per reason since the page opened.

(() => {
  "use strict";
  const MW = (globalThis.MW ??= {});

  const { REASONS } = MW.charts;

  const KEEP = 200;

  class EvictionsView {
    constructor(feed, countsEl, empty) {
      this.feed = feed;
      this.empty = empty;
      this.counts = Object.fromEntries(REASONS.map((r) => [r, 0]));
      this.countEls = {};
      for (const reason of REASONS) {
        const li = document.createElement("li");
        li.className = `reason-${reason}`;
        li.dataset.reason = reason;
        countsEl.append(li);
        this.countEls[reason] = li;
      }
      this.render();
    }

    add(ev) {
      this.counts[ev.reason] = (this.counts[ev.reason] ?? 0) + 1;
      const li = document.createElement("li");
      li.dataset.reason = ev.reason;
      li.dataset.convo = ev.convo;
      const time = new Date((ev.ts ?? Date.now() / 1000) * 1000).toLocaleTimeString([], { hourCycle: "h23" });
      li.innerHTML = `<time></time> <span class="reason badge reason-${REASONS.includes(ev.reason) ? ev.reason : "other"}"></span> <code></code> <span class="muted"></span>`;
      li.querySelector("time").textContent = time;
      li.querySelector(".reason").textContent = ev.reason;
      li.querySelector("code").textContent = ev.convo;
      li.querySelector(".muted").textContent = `${ev.count} turn${ev.count === 1 ? "" : "s"}, ${ev.keys} key${ev.keys === 1 ? "" : "s"} dropped`;
      this.feed.prepend(li);
      while (this.feed.children.length > KEEP) this.feed.lastChild.remove();
      this.empty.hidden = true;
      this.render();
    }

    render() {
      for (const reason of REASONS) {
        this.countEls[reason].textContent = `${reason}: ${this.counts[reason]}`;
        this.countEls[reason].dataset.count = this.counts[reason];
      }
    }
  }

  MW.evictions = { EvictionsView };
})();
