// scopeloop live dashboard: one websocket, canvas drawing, no libraries.
// The server sends only what is new (newest frame, new metric points, events, state);
// this page draws at most once per animation frame.
"use strict";

// The token is never read here: the server moved it from the first URL into an
// HttpOnly cookie, which the websocket and fetch below carry by themselves.
const params = new URLSearchParams(location.search);
const fps = params.get("fps") || "15";
const WINDOW_S = 60;
const MAX_EVENTS = 200;
const GAP_S = 1.0;
const PLOTS = {
  latency_ms: { title: "loop latency", unit: "ms", color: "#4fc3f7" },
  frames_skipped: { title: "frames skipped (total)", unit: "", color: "#f5b942" },
  tracking_error_um: { title: "tracking error", unit: "µm", color: "#3ecf8e" },
  reward: { title: "reward", unit: "", color: "#c792ea" },
  laser_power_mw: { title: "laser power", unit: "mW", color: "#ff7a45" },
  detect_ms: { title: "detection time", unit: "ms", color: "#82aaff" },
};
const $ = (id) => document.getElementById(id);

const series = {};     // name -> {t: [], v: [], el, canvas, value}
let state = { state: "waiting" };
let lastFrame = null;  // {header, image (canvas)}
let frameTimes = [];
let dirty = false;
let ws = null;
let retryMs = 500;

// ---- websocket ---------------------------------------------------------------------

function connect() {
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  const query = new URLSearchParams({ fps });
  ws = new WebSocket(`${proto}//${location.host}/ws?${query}`);
  ws.binaryType = "arraybuffer";
  let opened = false;
  ws.onopen = () => { opened = true; retryMs = 500; $("conn").classList.add("up"); notice(null); };
  ws.onmessage = (ev) => {
    if (typeof ev.data === "string") onJson(JSON.parse(ev.data));
    else onBinary(ev.data);
  };
  ws.onclose = async () => {
    $("conn").classList.remove("up");
    setButtons(false);
    if (!opened) {
      const res = await fetch("/api/status").catch(() => null);
      if (res && res.status === 401) {
        notice("This dashboard needs a token: open it as …/?token=YOUR_TOKEN");
        return;
      }
    }
    notice("connection lost, retrying…");
    setTimeout(connect, retryMs);
    retryMs = Math.min(retryMs * 2, 5000);
  };
}

function send(cmd) {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ cmd }));
}

function notice(text) {
  const el = $("notice");
  el.hidden = !text;
  el.textContent = text || "";
}

// ---- messages ----------------------------------------------------------------------

function onJson(msg) {
  if (msg.type === "command") {
    const text = msg.ok ? `${msg.cmd}: accepted (state ${msg.state})` : `${msg.cmd}: ${msg.error}`;
    addEvent({ t_s: null, level: msg.ok ? "local" : "error", message: text });
    if (msg.ok && msg.state) setState({ ...state, state: msg.state });
    return;
  }
  if (msg.type !== "update") return;
  if (msg.reset) resetAll();
  if (msg.state) setState(msg.state);
  if (msg.metrics) {
    for (const [name, points] of Object.entries(msg.metrics)) addPoints(name, points);
  }
  if (msg.events) for (const e of msg.events) addEvent(e);
  requestDraw();
}

function onBinary(buf) {
  const view = new DataView(buf);
  const len = view.getUint32(0, true);
  const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buf, 4, len)));
  const pixels = new Uint8Array(buf, 4 + len);
  if (header.type === "frame") onFrame(header, pixels);
  else if (header.type === "map") onMap(header, pixels);
}

function grayCanvas(width, height, pixels, lut) {
  const c = document.createElement("canvas");
  c.width = width;
  c.height = height;
  const ctx = c.getContext("2d");
  const img = ctx.createImageData(width, height);
  const d = img.data;
  for (let i = 0, j = 0; i < width * height; i++, j += 4) {
    const v = pixels[i];
    if (lut) { d[j] = lut[v * 3]; d[j + 1] = lut[v * 3 + 1]; d[j + 2] = lut[v * 3 + 2]; }
    else { d[j] = v; d[j + 1] = v; d[j + 2] = v; }
    d[j + 3] = 255;
  }
  ctx.putImageData(img, 0, 0);
  return c;
}

function onFrame(header, pixels) {
  lastFrame = { header, image: grayCanvas(header.width, header.height, pixels, null) };
  const now = performance.now();
  frameTimes.push(now);
  while (frameTimes.length && now - frameTimes[0] > 2000) frameTimes.shift();
  $("frame-seq").textContent = header.seq;
  $("frame-fps").textContent = (frameTimes.length / 2).toFixed(1);
  const [w, h] = header.field_um;
  $("frame-field").textContent = `${w.toFixed(1)} × ${h.toFixed(1)} µm`;
  $("frame-phase").textContent = header.phase ? `· ${header.phase}` : "";
  const info = header.info || {};
  const bits = [];
  bits.push(`${header.detections_um.length} detected`);
  if (info.error_um !== undefined) bits.push(`error ${info.error_um.toFixed(2)} µm`);
  if (header.laser && header.laser.length) {
    bits.push(`laser ${header.laser.reduce((a, s) => a + s.power_mw, 0).toFixed(2)} mW`);
  } else bits.push("laser off");
  $("frame-info").textContent = bits.join(" · ");
  requestDraw();
}

// ---- state & buttons ---------------------------------------------------------------

function setState(s) {
  state = s;
  document.body.dataset.state = s.state;
  $("state").textContent = s.state + (s.reason && s.state === "stopped" ? ` (${s.reason})` : "");
  if (s.run) $("run-name").textContent = s.run;
  $("phase").textContent = s.phase ? `phase: ${s.phase}` : "";
  setButtons(ws && ws.readyState === WebSocket.OPEN);
}

function setButtons(connected) {
  const st = state.state;
  $("btn-pause").disabled = !connected || st !== "running";
  $("btn-resume").disabled = !connected || st !== "paused";
  $("btn-stop").disabled = !connected || !(st === "running" || st === "paused" || st === "starting");
}

$("btn-pause").onclick = () => send("pause");
$("btn-resume").onclick = () => send("resume");
$("btn-stop").onclick = () => {
  if (!$("btn-stop").dataset.armed) {  // one extra click guards against a slip
    $("btn-stop").dataset.armed = "1";
    $("btn-stop").textContent = "Confirm stop";
    setTimeout(() => { delete $("btn-stop").dataset.armed; $("btn-stop").textContent = "Stop"; }, 3000);
    return;
  }
  delete $("btn-stop").dataset.armed;
  $("btn-stop").textContent = "Stop";
  send("stop");
};

// ---- events ------------------------------------------------------------------------

function addEvent(e) {
  const li = document.createElement("li");
  li.className = e.level || "info";
  const t = document.createElement("span");
  t.className = "t";
  t.textContent = e.t_s == null ? "you" : `${e.t_s.toFixed(2)} s`;
  const m = document.createElement("span");
  m.className = "m";
  m.textContent = e.message;
  li.append(t, m);
  const list = $("events");
  list.prepend(li);
  while (list.children.length > MAX_EVENTS) list.lastChild.remove();
}

// ---- plots -------------------------------------------------------------------------

function plotFor(name) {
  if (series[name]) return series[name];
  const meta = PLOTS[name] || { title: name, unit: "", color: "#b0bec5" };
  const el = document.createElement("div");
  el.className = "plot";
  el.innerHTML = `<div class="head"><span></span><b>–</b></div><canvas></canvas>`;
  el.querySelector("span").textContent = `${meta.title}${meta.unit ? ` (${meta.unit})` : ""}`;
  const canvas = el.querySelector("canvas");
  canvas.dataset.metric = name;
  canvas.dataset.points = "0";
  canvas.id = `plot-${name}`;
  const order = Object.keys(PLOTS);
  const rank = (n) => (order.includes(n) ? order.indexOf(n) : order.length);
  const host = $("plots");
  const after = [...host.children].find((c) => rank(c.querySelector("canvas").dataset.metric) > rank(name));
  host.insertBefore(el, after || null);
  series[name] = { t: [], v: [], meta, canvas, value: el.querySelector("b") };
  return series[name];
}

function addPoints(name, points) {
  const s = plotFor(name);
  for (const [t, v] of points) { s.t.push(t); s.v.push(v); }
  const tmax = s.t[s.t.length - 1];
  let cut = 0;
  while (cut < s.t.length && s.t[cut] < tmax - WINDOW_S) cut++;
  if (cut) { s.t.splice(0, cut); s.v.splice(0, cut); }
  s.total = (s.total || 0) + points.length;
}

function drawPlot(s) {
  const c = s.canvas;
  const dpr = window.devicePixelRatio || 1;
  const w = Math.max(c.clientWidth, 100), h = Math.max(c.clientHeight, 60);
  if (c.width !== Math.round(w * dpr)) { c.width = Math.round(w * dpr); c.height = Math.round(h * dpr); }
  const ctx = c.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  const n = s.t.length;
  c.dataset.points = String(s.total || 0);
  if (!n) return;
  const last = s.v[n - 1];
  s.value.textContent = `${formatNum(last)}${s.meta.unit ? " " + s.meta.unit : ""}`;
  const t1 = s.t[n - 1], t0 = Math.max(s.t[0], t1 - WINDOW_S);
  let lo = Infinity, hi = -Infinity;
  for (const v of s.v) { if (v < lo) lo = v; if (v > hi) hi = v; }
  if (lo > 0 && lo < 0.3 * hi) lo = 0;
  if (hi - lo < 1e-9) { hi += 0.5; lo -= 0.5; }
  const pad = 14, left = 34;
  const x = (t) => left + ((t - t0) / Math.max(t1 - t0, 1e-6)) * (w - left - 4);
  const y = (v) => h - pad - ((v - lo) / (hi - lo)) * (h - pad - 6);
  ctx.strokeStyle = "#263140";
  ctx.fillStyle = "#8391a3";
  ctx.font = "10px system-ui, sans-serif";
  ctx.lineWidth = 1;
  for (const v of [lo, (lo + hi) / 2, hi]) {
    ctx.beginPath(); ctx.moveTo(left, y(v)); ctx.lineTo(w - 4, y(v)); ctx.stroke();
    ctx.fillText(formatNum(v), 2, y(v) + 3);
  }
  ctx.textAlign = "right";
  ctx.fillText(`t = ${t1.toFixed(0)} s`, w - 4, h - 2);
  ctx.textAlign = "start";
  ctx.strokeStyle = s.meta.color;
  ctx.lineWidth = 1.4;
  ctx.beginPath();
  const stride = Math.max(1, Math.floor(n / (w * 2)));  // ~2 points per pixel are enough
  let prev = -Infinity;
  for (let i = 0; i < n; i += stride) {  // a gap (pause, phase change) breaks the line
    if (s.t[i] - prev > GAP_S) ctx.moveTo(x(s.t[i]), y(s.v[i])); else ctx.lineTo(x(s.t[i]), y(s.v[i]));
    prev = s.t[i];
  }
  ctx.lineTo(x(s.t[n - 1]), y(s.v[n - 1]));
  ctx.stroke();
}

function formatNum(v) {
  const a = Math.abs(v);
  if (a >= 1000) return v.toFixed(0);
  if (a >= 10) return v.toFixed(1);
  if (a >= 0.1 || a === 0) return v.toFixed(2);
  if (a >= 0.001) return v.toFixed(3);
  return v.toExponential(1);
}

// ---- camera frame ------------------------------------------------------------------

function drawFrame() {
  const c = $("frame");
  const ctx = c.getContext("2d");
  if (!lastFrame) {
    ctx.fillStyle = "#000"; ctx.fillRect(0, 0, c.width, c.height);
    ctx.fillStyle = "#8391a3"; ctx.font = "16px system-ui"; ctx.textAlign = "center";
    ctx.fillText("waiting for frames…", c.width / 2, c.height / 2);
    ctx.textAlign = "start";
    return;
  }
  const { header, image } = lastFrame;
  const aspect = header.height / header.width;
  if (c.height !== Math.round(c.width * aspect)) c.height = Math.round(c.width * aspect);
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(image, 0, 0, c.width, c.height);
  const [fw, fh] = header.field_um;
  const half = header.pixel_size_um / 2;  // positions are pixel centres
  const sx = (x) => ((x + half) / fw) * c.width;
  const sy = (y) => ((y + half) / fh) * c.height;
  for (const s of header.laser || []) {
    const r = 6 + 10 * Math.sqrt(Math.max(s.power_mw, 0));
    const g = ctx.createRadialGradient(sx(s.x_um), sy(s.y_um), 0, sx(s.x_um), sy(s.y_um), r);
    g.addColorStop(0, "rgba(255,122,69,0.85)");
    g.addColorStop(1, "rgba(255,122,69,0)");
    ctx.fillStyle = g;
    ctx.beginPath(); ctx.arc(sx(s.x_um), sy(s.y_um), r, 0, 2 * Math.PI); ctx.fill();
  }
  if (header.target_um) {
    const [tx, ty] = [sx(header.target_um[0]), sy(header.target_um[1])];
    ctx.strokeStyle = "#4fc3f7"; ctx.lineWidth = 1.5;
    ctx.beginPath();
    ctx.moveTo(tx - 12, ty); ctx.lineTo(tx - 4, ty); ctx.moveTo(tx + 4, ty); ctx.lineTo(tx + 12, ty);
    ctx.moveTo(tx, ty - 12); ctx.lineTo(tx, ty - 4); ctx.moveTo(tx, ty + 4); ctx.lineTo(tx, ty + 12);
    ctx.stroke();
  }
  ctx.strokeStyle = "#3ecf8e"; ctx.lineWidth = 2;
  for (const [x, y] of header.detections_um || []) {
    ctx.beginPath(); ctx.arc(sx(x), sy(y), 8, 0, 2 * Math.PI); ctx.stroke();
  }
  ctx.fillStyle = "rgba(0,0,0,0.55)"; ctx.fillRect(0, c.height - 18, c.width, 18);
  ctx.fillStyle = "#d7dde5"; ctx.font = "11px ui-monospace, monospace";
  ctx.fillText(`#${header.seq}  t=${header.t_s.toFixed(2)} s  ${header.width}×${header.height} px shown`, 6, c.height - 5);
  drawScaleBar(ctx, c, fw);
}

function drawScaleBar(ctx, c, fieldW) {
  const target = fieldW / 5;
  const nice = [0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000].reduce(
    (best, v) => (v <= target ? v : best), 0.1);
  const px = (nice / fieldW) * c.width;
  ctx.fillStyle = "#fff";
  ctx.fillRect(c.width - px - 10, c.height - 30, px, 3);
  ctx.font = "11px system-ui"; ctx.textAlign = "right";
  ctx.fillText(`${nice} µm`, c.width - 10, c.height - 34);
  ctx.textAlign = "start";
}

// ---- policy maps -------------------------------------------------------------------

const VIRIDIS = (() => {
  const stops = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  const lut = new Uint8Array(256 * 3);
  for (let i = 0; i < 256; i++) {
    const f = (i / 255) * (stops.length - 1), k = Math.min(Math.floor(f), stops.length - 2), u = f - k;
    for (let ch = 0; ch < 3; ch++) lut[i * 3 + ch] = stops[k][ch] * (1 - u) + stops[k + 1][ch] * u;
  }
  return lut;
})();

function onMap(header, pixels) {
  $("maps-card").hidden = false;
  const id = `map-${header.name.replace(/[^A-Za-z0-9_-]/g, "_")}`;
  let box = document.getElementById(id);
  if (!box) {
    box = document.createElement("div");
    box.className = "map";
    box.id = id;
    box.innerHTML = `<h3></h3><div class="layers"></div>`;
    box.querySelector("h3").textContent = header.name;
    $("maps").append(box);
  }
  box.dataset.updates = String(Number(box.dataset.updates || 0) + 1);
  const layers = box.querySelector(".layers");
  layers.replaceChildren();
  let offset = 0;
  const [x0, x1, y0, y1] = header.extent;
  for (const layer of header.layers) {
    const n = layer.width * layer.height;
    const img = grayCanvas(layer.width, layer.height, pixels.subarray(offset, offset + n), VIRIDIS);
    offset += n;
    const fig = document.createElement("figure");
    const c = document.createElement("canvas");
    c.width = 256; c.height = Math.round(256 * layer.height / layer.width);
    c.dataset.layer = layer.name;
    const ctx = c.getContext("2d");
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(img, 0, 0, c.width, c.height);
    ctx.fillStyle = "#fff"; ctx.strokeStyle = "#000";
    for (const [px, py] of header.points || []) {
      const u = ((px - x0) / (x1 - x0)) * c.width, v = ((py - y0) / (y1 - y0)) * c.height;
      ctx.beginPath(); ctx.arc(u, v, 2.5, 0, 2 * Math.PI); ctx.fill(); ctx.stroke();
    }
    const cap = document.createElement("figcaption");
    cap.textContent = `${layer.name}: ${formatNum(layer.min)} … ${formatNum(layer.max)}` +
      `${header.units ? " " + header.units : ""} · ${(header.points || []).length} measured`;
    fig.append(c, cap);
    layers.append(fig);
  }
}

// ---- drawing loop ------------------------------------------------------------------

function requestDraw() {
  if (dirty) return;
  dirty = true;
  requestAnimationFrame(() => {
    dirty = false;
    drawFrame();
    for (const s of Object.values(series)) drawPlot(s);
  });
}

function resetAll() {
  for (const name of Object.keys(series)) delete series[name];
  $("plots").replaceChildren();
  $("maps").replaceChildren();
  $("maps-card").hidden = true;
  $("events").replaceChildren();
  lastFrame = null;
  $("frame-seq").textContent = "–";
}

drawFrame();
connect();
