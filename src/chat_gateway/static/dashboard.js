// The live dashboard: one EventSource on /v1/stats/events (every instance
// added up, or the serving instance alone: #scope), one snapshot a second,
// drawn as figures and charts of the last two minutes with time and value axes
// (uPlot, vendored under /static/vendor/uplot/), a row per instance, per
// webhook receiver and per busiest room.
// Every figure is an <output> whose data-value holds the raw number ("" and "–"
// while it is unknown: before the first sample, or no webhooks), and #status
// carries data-state (connecting, live, stale, reconnecting, refused).
// In auth mode the feed needs an API key: /dashboard?key=K (taken out of the
// address bar at once and kept for the tab only), or typed into #key-form,
// which shows when the gateway refuses the feed (401).
"use strict";

(function () {
  const KEEP = 120; // samples per chart
  const $ = (id) => document.getElementById(id);
  const times = []; // sample times, seconds
  const series = {}; // name -> [numbers or null], aligned with times
  const roomSeries = new Map(); // room -> [numbers]
  // chart element id -> its lines: [series name, label, colour]
  const CHARTS = {
    "c-rate": [["rate", "accepted / s", "#2563eb"], ["delivered", "delivered / s", "#059669"]],
    "c-clients": [["clients", "clients", "#059669"], ["subscriptions", "subscriptions", "#7c3aed"]],
    "c-latency": [["p95", "p95 ms", "#d97706"], ["p50", "p50 ms", "#2563eb"]],
    "c-cache": [["cache", "hit rate %", "#7c3aed"]],
    "c-limited": [["limited", "refusals / s", "#dc2626"]],
    "c-backlog": [["backlog", "events waiting", "#0891b2"]],
  };
  const plots = {}; // chart element id -> uPlot
  let samples = 0;
  let lastAt = 0;

  function setStatus(state, text) {
    $("status").dataset.state = state;
    $("status").textContent = text;
  }

  function put(id, value, digits) {
    const out = $(id);
    if (value === null || value === undefined) {
      out.dataset.value = "";
      out.textContent = "–";
      return;
    }
    out.dataset.value = String(value);
    out.textContent = typeof value === "number" && digits !== undefined
      ? value.toFixed(digits) : String(value);
  }

  function push(list, value) {
    list.push(value);
    if (list.length > KEEP) list.splice(0, list.length - KEEP);
  }

  function record(name, value) {
    push(series[name] || (series[name] = []), value === undefined ? null : value);
  }

  function chartSize(el) {
    return { width: Math.max(160, el.clientWidth), height: 110 };
  }

  function makePlot(id) {
    const el = $(id);
    const grid = { stroke: "rgba(127,127,127,0.18)", width: 1 };
    const axis = { stroke: "#888", grid, ticks: grid, font: "11px system-ui, sans-serif" };
    const opts = {
      ...chartSize(el),
      scales: { x: { time: true }, y: { range: (u, min, max) => [0, max > 0 ? max * 1.1 : 1] } },
      axes: [{ ...axis, size: 28 }, { ...axis, size: 46 }],
      series: [{}, ...CHARTS[id].map(([, label, stroke]) => ({ label, stroke, width: 2 }))],
      legend: { show: true, live: false },
      cursor: { drag: { x: false, y: false } },
    };
    return new uPlot(opts, data(id), el);
  }

  function data(id) {
    return [times.slice(), ...CHARTS[id].map(([name]) => (series[name] || []).slice())];
  }

  function drawCharts() {
    if (typeof uPlot === "undefined") return; // the library failed to load: figures only
    for (const id of Object.keys(CHARTS)) {
      if (!plots[id]) plots[id] = makePlot(id);
      else plots[id].setData(data(id));
      const [name, label] = CHARTS[id][0];
      const values = series[name] || [];
      const last = values[values.length - 1];
      $(id).setAttribute("aria-label",
        `${label}, last two minutes: now ${last === null || last === undefined ? "unknown" : last}`);
    }
  }

  function resetCharts() {
    times.length = 0;
    Object.keys(series).forEach((k) => delete series[k]);
    for (const id of Object.keys(plots)) {
      plots[id].destroy();
      delete plots[id];
    }
    roomSeries.clear();
  }

  // sparklines of the rooms' table: a plain canvas each
  function spark(canvas, values, color) {
    const ratio = window.devicePixelRatio || 1;
    const w = canvas.width;
    const h = canvas.height;
    canvas.width = Math.round(w * ratio);
    canvas.height = Math.round(h * ratio);
    canvas.style.width = w + "px";
    canvas.style.height = h + "px";
    const g = canvas.getContext("2d");
    g.setTransform(ratio, 0, 0, ratio, 0, 0);
    const nums = values.filter((v) => v !== null && isFinite(v));
    if (!nums.length) return;
    const top = Math.max(1e-9, ...nums);
    const step = w / (KEEP - 1);
    const x0 = w - (values.length - 1) * step;
    g.beginPath();
    values.forEach((v, i) => {
      const y = h - 2 - (v / top) * (h - 5);
      if (i === 0) g.moveTo(x0, y); else g.lineTo(x0 + i * step, y);
    });
    g.strokeStyle = color;
    g.lineWidth = 1.5;
    g.stroke();
  }

  function row(cells, data) {
    const tr = document.createElement("tr");
    Object.entries(data || {}).forEach(([k, v]) => { tr.dataset[k] = String(v); });
    cells.forEach((text, i) => {
      const cell = document.createElement(i === 0 ? "th" : "td");
      if (i === 0) cell.scope = "row";
      cell.textContent = text;
      tr.append(cell);
    });
    return tr;
  }

  function duration(s) {
    if (s < 90) return `${Math.round(s)} s`;
    if (s < 5400) return `${Math.round(s / 60)} min`;
    return `${(s / 3600).toFixed(1)} h`;
  }

  function instances(list) {
    put("instances-count", list.length);
    $("instances").replaceChildren(...list.map((i) => row(
      [i.id || "–", String(i.pid), duration(i.uptime_s), String(i.clients),
        i.accepted === undefined ? "–" : String(i.accepted),
        i.closing ? "shutting down" : "serving"],
      { instance: i.id, clients: i.clients })));
  }

  function webhooks(list) {
    const known = Array.isArray(list);
    $("no-webhooks").hidden = known;
    $("webhooks").replaceChildren(...(known ? list : []).map((w) => row(
      [w.endpoint, String(w.backlog), duration(w.oldest_pending_s), w.breaker.replace("_", " ")],
      { endpoint: w.endpoint, backlog: w.backlog, breaker: w.breaker })));
    const backlog = known ? list.reduce((n, w) => n + w.backlog, 0) : null;
    put("backlog", backlog);
    put("backlog-oldest", known ? Math.max(0, ...list.map((w) => w.oldest_pending_s)) : null, 1);
    put("breakers-open", known ? list.filter((w) => w.breaker !== "closed").length : null);
    return backlog;
  }

  function scopeLabels(scope) {
    document.querySelectorAll(".where").forEach((el) => {
      el.textContent = scope === "cluster" ? el.dataset.cluster : el.dataset.instance;
    });
  }

  function rooms(list) {
    const body = $("rooms");
    const seen = new Set();
    list.forEach((r) => {
      seen.add(r.room);
      push(roomSeries.get(r.room) || (roomSeries.set(r.room, []), roomSeries.get(r.room)), r.per_s);
    });
    for (const name of roomSeries.keys()) if (!seen.has(name)) roomSeries.delete(name);
    body.replaceChildren();
    list.forEach((r) => {
      const tr = document.createElement("tr");
      tr.dataset.room = r.room;
      tr.dataset.rate = String(r.per_s);
      tr.dataset.seq = String(r.seq);
      const cells = [r.room, r.per_s.toFixed(1), String(r.seq), String(r.subscribers)];
      cells.forEach((text, i) => {
        const cell = document.createElement(i === 0 ? "th" : "td");
        if (i === 0) cell.scope = "row";
        cell.textContent = text;
        tr.append(cell);
      });
      const td = document.createElement("td");
      const canvas = document.createElement("canvas");
      canvas.className = "spark";
      canvas.width = 160;
      canvas.height = 28;
      canvas.setAttribute("role", "img");
      canvas.setAttribute("aria-label", `${r.room}: ${r.per_s} messages per second`);
      td.append(canvas);
      tr.append(td);
      body.append(tr);
      spark(canvas, roomSeries.get(r.room), "#2563eb");
    });
    $("no-rooms").hidden = list.length > 0;
  }

  function update(snap) {
    samples += 1;
    lastAt = Date.now();
    const t = $("updated");
    t.dateTime = new Date(snap.time * 1000).toISOString();
    t.textContent = new Date(snap.time * 1000).toLocaleTimeString();
    t.dataset.samples = String(samples);
    const n = (snap.instances || []).length;
    $("instance").dataset.instances = String(n);
    $("instance").textContent = snap.scope === "cluster"
      ? `${n} instance${n === 1 ? "" : "s"}, served by pid ${snap.instance.pid}`
      : `pid ${snap.instance.pid}, up ${Math.round(snap.instance.uptime_s)} s`;
    scopeLabels(snap.scope);

    put("rate", snap.messages.accepted_per_s, 1);
    put("delivered", snap.messages.delivered_per_s, 1);
    put("clients", snap.clients.total);
    put("clients-ws", snap.clients.ws);
    put("clients-sse", snap.clients.sse);
    put("subscriptions", snap.subscriptions);
    put("latency", snap.latency_ms.p95, 1);
    put("latency-p50", snap.latency_ms.p50, 1);
    put("latency-mean", snap.latency_ms.mean, 2);
    put("latency-count", snap.latency_ms.count);
    const hit = snap.cache.hit_rate === null ? null : snap.cache.hit_rate * 100;
    put("cache", hit === null ? (snap.cache.hit_rate_total === null ? null
      : snap.cache.hit_rate_total * 100) : hit, 0);
    put("cache-hits", snap.cache.hits_total);
    put("cache-lookups", snap.cache.lookups_total);
    put("limited", snap.rate_limited.per_s, 1);
    put("limited-total", snap.rate_limited.total);
    put("rooms-held", snap.rooms_held);
    const backlog = webhooks(snap.webhooks);
    instances(snap.instances || []);

    push(times, snap.time);
    record("rate", snap.messages.accepted_per_s);
    record("delivered", snap.messages.delivered_per_s);
    record("clients", snap.clients.total);
    record("subscriptions", snap.subscriptions);
    record("p95", snap.latency_ms.p95);
    record("p50", snap.latency_ms.p50);
    record("cache", hit);
    record("limited", snap.rate_limited.per_s);
    record("backlog", backlog);
    drawCharts();
    rooms(snap.rooms);
    setStatus(snap.instance.closing ? "stale" : "live",
              snap.instance.closing ? "Instance shutting down" : "Live");
  }

  const KEY_STORE = "chat-gateway.stats-key";
  let key = sessionStorage.getItem(KEY_STORE);
  (function takeKeyFromAddress() {
    const params = new URLSearchParams(location.search);
    if (!params.has("key")) return;
    key = params.get("key");
    sessionStorage.setItem(KEY_STORE, key);
    params.delete("key");
    const rest = params.toString();
    history.replaceState(null, "", location.pathname + (rest ? "?" + rest : "") + location.hash);
  })();

  function feedUrl() {
    let url = "/v1/stats/events?scope=" + encodeURIComponent($("scope").value);
    if (key) url += "&key=" + encodeURIComponent(key);
    return url;
  }

  // EventSource does not tell why it gave up: ask once, reading only the status.
  async function refusal() {
    const ctl = new AbortController();
    try {
      const r = await fetch(feedUrl(), { signal: ctl.signal, cache: "no-store" });
      ctl.abort();
      return r.status;
    } catch (e) {
      return 0;
    }
  }

  function askForKey() {
    setStatus("refused", key ? "The API key was refused" : "An API key is needed for the figures");
    $("key-form").hidden = false;
    $("key").focus();
  }

  $("key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    key = $("key").value.trim();
    sessionStorage.setItem(KEY_STORE, key);
    $("key").value = "";
    $("key-form").hidden = true;
    setStatus("connecting", "Connecting…");
    if (source) source.close();
    open();
  });

  let source = null;
  function open() {
    source = new EventSource(feedUrl());
    source.addEventListener("stats", (ev) => update(JSON.parse(ev.data)));
    source.onopen = () => setStatus("live", "Live");
    source.onerror = () => {
      setStatus("reconnecting", "Connection lost; reconnecting…");
      if (source.readyState === EventSource.CLOSED) {
        source = null;
        // The browser gave up (a 401, a 503, ...): a key is asked for, else try again.
        refusal().then((status) => (status === 401 ? askForKey() : setTimeout(open, 2000)));
      }
    };
  }

  setInterval(() => {
    if (lastAt && Date.now() - lastAt > 3000 && $("status").dataset.state === "live") {
      setStatus("stale", "No sample for " + Math.round((Date.now() - lastAt) / 1000) + " s");
    }
  }, 1000);

  $("scope").addEventListener("change", () => {
    // Another set of figures: start the charts afresh.
    if (source) source.close();
    resetCharts();
    samples = 0;
    setStatus("connecting", "Connecting…");
    open();
  });

  // -- a state room's keys, live: snapshot, then each (conflated) write ---------------
  // One EventSource on /v1/rooms/{room}/events?conflate_ms=N: `event: snapshot`
  // replaces the table, `event: state` sets or removes a row. The browser resumes a
  // dropped stream with Last-Event-ID (the last seq), so the gateway sends only the
  // keys written meanwhile, or a fresh snapshot.
  const stateKeys = new Map(); // key -> {value, seq, updated_at}
  let stateSource = null;
  let stateCounts = { snapshots: 0, updates: 0 };

  function stateFigure(id, value) {
    const el = $(id);
    el.textContent = String(value);
    el.dataset.value = String(value);
  }

  function stateStatus(state, text) {
    const el = $("state-status");
    el.dataset.state = state;
    el.textContent = text;
  }

  function drawState(seq) {
    const body = $("state-keys");
    const rows = [...stateKeys].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)).map(
      ([key, e]) => row([key, JSON.stringify(e.value), String(e.seq),
                         new Date(e.updated_at).toLocaleTimeString()],
                        { key, seq: e.seq }));
    body.replaceChildren(...rows);
    if (seq !== undefined) stateFigure("state-seq", seq);
    stateFigure("state-snapshots", stateCounts.snapshots);
    stateFigure("state-updates", stateCounts.updates);
  }

  function watchState(room, conflateMs) {
    if (stateSource) stateSource.close();
    stateKeys.clear();
    stateCounts = { snapshots: 0, updates: 0 };
    drawState("–");
    const params = new URLSearchParams({ conflate_ms: String(conflateMs) });
    if (key) params.set("token", key);
    stateStatus("connecting", `Connecting to ${room}…`);
    const src = new EventSource(`/v1/rooms/${encodeURIComponent(room)}/events?${params}`);
    stateSource = src;
    src.onopen = () => stateStatus("live", `${room}: live`);
    src.addEventListener("snapshot", (ev) => {
      const snap = JSON.parse(ev.data);
      stateKeys.clear();
      for (const [k, e] of Object.entries(snap.values || {})) stateKeys.set(k, e);
      stateCounts.snapshots += 1;
      drawState(snap.seq);
    });
    src.addEventListener("state", (ev) => {
      const w = JSON.parse(ev.data);
      if (w.deleted) stateKeys.delete(w.key);
      else stateKeys.set(w.key, { value: w.value, seq: w.seq, updated_at: w.updated_at });
      stateCounts.updates += 1;
      drawState(w.seq);
    });
    src.onerror = () => {
      if (src !== stateSource) return;
      if (src.readyState === EventSource.CLOSED) {
        // refused (not a state room, a bad name, no key): say why, from the HTTP API
        stateStatus("refused", `${room}: refused`);
        fetch(`/v1/rooms/${encodeURIComponent(room)}/state`,
              { headers: key ? { authorization: "Bearer " + key } : {} })
          .then((r) => r.json())
          .then((b) => { if (b.error) stateStatus("refused", `${room}: ${b.error.message}`); })
          .catch(() => {});
      } else {
        stateStatus("reconnecting", `${room}: connection lost; resuming…`);
      }
    };
  }

  $("state-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const room = $("state-room").value.trim();
    const ms = Math.max(0, Math.min(60000, Number($("state-conflate").value) || 0));
    if (room) watchState(room, ms);
  });

  window.addEventListener("resize", () => {
    for (const [id, plot] of Object.entries(plots)) plot.setSize(chartSize($(id)));
  });
  open();
})();
