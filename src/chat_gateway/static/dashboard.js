// The live dashboard: one EventSource on /v1/stats/events (every instance
// added up, or the serving instance alone: #scope), one snapshot a second,
// drawn as figures and small line charts of the last two minutes.
// Every figure is an <output> whose data-value holds the raw number, and
// #status carries data-state (connecting, live, stale, reconnecting, refused).
// In auth mode the feed needs an API key: /dashboard?key=K (taken out of the
// address bar at once and kept for the tab only), or typed into #key-form,
// which shows when the gateway refuses the feed (401).
"use strict";

(function () {
  const KEEP = 120; // samples per chart
  const $ = (id) => document.getElementById(id);
  const series = {}; // name -> [numbers or null]
  const roomSeries = new Map(); // room -> [numbers]
  const CHARTS = [
    ["c-rate", "rate", "#2563eb", "Messages per second"],
    ["c-clients", "clients", "#059669", "Connected clients"],
    ["c-latency", "latency", "#d97706", "Delivery latency p95 in ms"],
    ["c-cache", "cache", "#7c3aed", "Cache hit rate in percent"],
    ["c-limited", "limited", "#dc2626", "Rate-limit refusals per second"],
  ];
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
    push(series[name] || (series[name] = []), value);
  }

  function draw(canvas, values, color) {
    const ratio = window.devicePixelRatio || 1;
    const w = canvas.clientWidth || canvas.width;
    const h = canvas.clientHeight || canvas.height;
    if (canvas.width !== Math.round(w * ratio)) canvas.width = Math.round(w * ratio);
    if (canvas.height !== Math.round(h * ratio)) canvas.height = Math.round(h * ratio);
    const g = canvas.getContext("2d");
    g.setTransform(ratio, 0, 0, ratio, 0, 0);
    g.clearRect(0, 0, w, h);
    const nums = values.filter((v) => v !== null && isFinite(v));
    const peak = Math.max(0, ...nums);
    const top = peak > 0 ? peak : 1;
    const labelled = h >= 40; // sparklines in the table go without a label
    const pad = labelled ? 16 : 3;
    g.strokeStyle = "rgba(127,127,127,0.25)";
    g.lineWidth = 1;
    g.beginPath();
    g.moveTo(0, h - 0.5);
    g.lineTo(w, h - 0.5);
    g.stroke();
    if (labelled) {
      g.fillStyle = color;
      g.font = "11px system-ui, sans-serif";
      g.textAlign = "right";
      g.fillText("max " + (+peak.toPrecision(3)), w - 2, 11);
    }
    if (!nums.length) return;
    const step = w / (KEEP - 1);
    const x0 = w - (values.length - 1) * step;
    const y = (v) => h - 2 - (v / top) * (h - pad - 2);
    g.beginPath();
    let pen = false;
    values.forEach((v, i) => {
      if (v === null || !isFinite(v)) { pen = false; return; }
      const x = x0 + i * step;
      if (pen) g.lineTo(x, y(v)); else g.moveTo(x, y(v));
      pen = true;
    });
    g.strokeStyle = color;
    g.lineWidth = 2;
    g.stroke();
  }

  function chart(id, name, color, label) {
    const canvas = $(id);
    const values = series[name] || [];
    draw(canvas, values, color);
    const last = values[values.length - 1];
    canvas.setAttribute("aria-label", `${label}: now ${last === null || last === undefined ? "no data" : last}`);
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
      draw(canvas, roomSeries.get(r.room), "#2563eb");
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

    put("rate", snap.messages.accepted_per_s, 1);
    put("delivered", snap.messages.delivered_per_s, 1);
    put("clients", snap.clients.total);
    put("clients-ws", snap.clients.ws);
    put("clients-sse", snap.clients.sse);
    put("latency", snap.latency_ms.p95, 1);
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

    record("rate", snap.messages.accepted_per_s);
    record("clients", snap.clients.total);
    record("latency", snap.latency_ms.p95);
    record("cache", hit);
    record("limited", snap.rate_limited.per_s);
    CHARTS.forEach((c) => chart(...c));
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
    Object.keys(series).forEach((k) => delete series[k]);
    roomSeries.clear();
    samples = 0;
    setStatus("connecting", "Connecting…");
    open();
  });

  window.addEventListener("resize", () => CHARTS.forEach((c) => chart(...c)));
  open();
})();
