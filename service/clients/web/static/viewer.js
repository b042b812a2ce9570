// tomocast live viewer. Receives raw float32 slices over a WebSocket (service/web/frames.py has
// the format) and windows and colours them here, so contrast and colour changes cost no round
// trip. State for the tests is mirrored in data- attributes on <body> and on each canvas.
import { makeLut, paint, percentiles } from "./render.js";

const BUDGET_MS = 70;        // the service's per-slice latency budget
const SPARK_POINTS = 150;    // slices shown in the sparkline
const FRAME_CACHE = 64;      // recent frames kept here (the server keeps the whole scan)
const TOPICS = ["recon", "slice"];
const WINDOWS_KEPT = 64;     // windows of a continuous scan kept (as the server: WINDOWS_KEPT)
const PLAY_MS = 400;         // one window per step when playing

const $ = (id) => document.getElementById(id);
const body = document.body;
const decoder = new TextDecoder();

const state = {
  socket: null,
  publisher: null,
  scan: emptyScan(null, 0),
  follow: true,
  shownIndex: null,
  frames: new Map(),           // "topic:index" -> {header, pixels}
  shown: { recon: null, slice: null },
  // Previews (`view --web --previews`): the latest of each row without its final slice yet,
  // shown in the denoised panel until the final slice comes, and the latest XZ cut.
  previews: new Map(),         // index -> frame
  xz: null,
  // A continuous scan's windows (protocol v1.1): their projection spans, the frames of the
  // chosen row, and the window shown (null: none yet).
  windows: emptyWindows(),
  // The viewer server's clock minus this browser's, in seconds, from the ping with the
  // shortest round trip; the service's clock is taken to agree with the viewer server's.
  clock: { offset: 0, rtt: Infinity, samples: [] },
  spark: [],                   // totals (ms) of the latest slices, across scans
  dropped: 0,
  renderPending: false,
  lut: makeLut("gray"),
  lutName: "gray",
};

function emptyWindows() {
  return { spans: new Map(), frames: new Map(), shown: null, playing: null };
}

function emptyScan(scanId, rows) {
  return { scanId, rows, status: scanId ? "running" : "idle", model: "", latency: new Map(),
           received: { slice: new Set(), recon: new Set() }, ended: null, previewFraction: null };
}

// ---- the socket -------------------------------------------------------------------------------

function connect() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const socket = new WebSocket(`${scheme}://${location.host}/ws`);
  socket.binaryType = "arraybuffer";
  state.socket = socket;
  socket.onopen = () => {
    body.dataset.socket = "open";
    state.clock.samples = [];
    send({ follow: state.follow });
    ping();
  };
  socket.onclose = () => {
    body.dataset.socket = "closed";
    body.dataset.publisher = "offline";
    $("publisher-text").textContent = "viewer server unreachable: retrying";
    setTimeout(connect, 2000);
  };
  socket.onmessage = (event) => {
    if (typeof event.data === "string") onText(JSON.parse(event.data));
    else onFrame(parseFrame(event.data));
  };
}

function send(message) {
  if (state.socket && state.socket.readyState === WebSocket.OPEN) {
    state.socket.send(JSON.stringify(message));
  }
}

function ping() { send({ ping: Date.now() / 1000 }); }
setInterval(ping, 5000);

function parseFrame(buffer) {
  const length = new DataView(buffer).getUint32(0, true);
  const header = JSON.parse(decoder.decode(new Uint8Array(buffer, 4, length)));
  const offset = 4 + length + ((4 - ((4 + length) % 4)) % 4);
  const [h, w] = header.shape;
  return { header, pixels: new Float32Array(buffer, offset, h * w) };
}

function onText(message) {
  switch (message.kind) {
    case "publisher": return onPublisher(message);
    case "scan": return onScanState(message);
    case "event": return onEvent(message);
    case "meta": return onFrame({ header: message, pixels: null });
    case "pong": return onPong(message);
    case "stats":
      state.dropped = message.dropped;
      $("dropped-count").textContent = String(message.dropped);
      $("dropped").classList.toggle("lossy", message.dropped > 0);
      return;
    case "missing": return;  // (or a window the server no longer keeps)  // the slider asked for a slice the server has not got (yet)
  }
}

function onPong(message) {
  const now = Date.now() / 1000;
  const rtt = now - message.client;
  const samples = state.clock.samples;
  samples.push({ rtt, offset: message.server - (message.client + rtt / 2) });
  if (samples.length > 8) samples.shift();
  const best = samples.reduce((a, b) => (b.rtt < a.rtt ? b : a));
  state.clock.offset = best.offset;
  state.clock.rtt = best.rtt;
  if (samples.length < 5) ping();  // a quick burst at connection: the least delayed one wins
}

function onPublisher(message) {
  state.publisher = message;
  body.dataset.publisher = message.connected ? "connected" : "waiting";
  const info = message.info || {};
  $("publisher-text").textContent = message.connected
    ? `${message.endpoint} · ${info.device || "?"} · ${info.service || "tomocast"} ${info.version || ""}`
    : `waiting for a service on ${message.endpoint}`;
  if (info.model) $("model-name").textContent = `(${info.model})`;
}

function onScanState(message) {
  if (!message.scan_id) return;
  startScan(message.scan_id, message.rows, message.status);
  for (const topic of TOPICS) {
    for (const index of message.received[topic]) state.scan.received[topic].add(index);
  }
  for (const [index, seconds] of message.latency) {
    state.scan.latency.set(index, { pipeline: seconds * 1000, delivery: null, timing: {} });
  }
  const windows = message.windows;
  if (windows && windows.continuous_scan === message.scan_id) {
    for (const [k, span] of Object.entries(windows.spans)) state.windows.spans.set(Number(k), span);
    state.scan.continuous = windows.windows.length > 0;
  }
  if (message.ended) onEvent(message.ended, false);
  updateProgress();
}

function onEvent(event, log = true) {
  if (event.event === "scan_started") {
    startScan(event.scan_id, event.rows, "running");
  } else if (state.scan.continuous && event.scan_id.startsWith(`${state.scan.scanId}.w`)) {
    return;  // a window's own scan_completed: the time control shows the window
  } else if (event.scan_id === state.scan.scanId) {
    state.scan.status = event.event === "scan_completed" ? "completed" : "failed";
    state.scan.ended = event;
    // The scan is over: no more previews; a row still showing one switches to its final slice.
    state.previews.clear();
    if (state.shown.slice && state.shown.slice.header.topic === "preview") show(state.shownIndex, true);
  }
  if (log) logEvent(event);
  updateProgress();
}

function logEvent(event) {
  const time = new Date(event.t_published * 1000).toLocaleTimeString();
  let text = `${time} ${event.event} ${event.scan_id}`;
  if (event.event === "scan_started") text += ` ${event.rows}×${event.cols}×${event.n_angles}`;
  if (event.event === "scan_completed") {
    const latency = event.latency || {};
    text += `: ${event.slices} slices, ${event.missing_projections} missing projections, ` +
      `tail ${fmt(latency.tail_s * 1000)} ms, fbp ${fmt(latency.fbp_ms_per_slice)} ms/slice, ` +
      `denoise ${fmt(latency.denoise_ms_per_slice)} ms/slice`;
  }
  if (event.event === "scan_failed") text += `: ${event.reason}`;
  const item = document.createElement("li");
  item.textContent = text;
  const list = $("events");
  list.prepend(item);
  while (list.children.length > 8) list.lastChild.remove();
}

function startScan(scanId, rows, status) {
  if (state.scan.scanId === scanId) {
    state.scan.rows = rows || state.scan.rows;
    return;
  }
  state.scan = emptyScan(scanId, rows);
  state.scan.status = status;
  state.frames.clear();
  state.previews.clear();
  state.xz = null;
  state.shown = { recon: null, slice: null };
  state.shownIndex = null;
  stopPlaying();
  state.windows = emptyWindows();
  $("window-row").hidden = true;
  const slider = $("slider");
  slider.max = String(Math.max(0, rows - 1));
  slider.disabled = rows < 1;
  body.dataset.scan = scanId;
  body.dataset.rows = String(rows);
  scheduleRender();
}

// ---- slices -------------------------------------------------------------------------------------

function onFrame(frame) {
  const h = frame.header;
  if (h.topic === "preview") return onPreview(frame);
  if (h.window_index != null) return onWindow(frame);
  if (h.scan_id !== state.scan.scanId) startScan(h.scan_id, h.rows, "running");
  const scan = state.scan;
  if (h.model) scan.model = h.model;
  const firstTime = !scan.received[h.topic].has(h.index);
  if (firstTime) {
    scan.received[h.topic].add(h.index);
    if (h.topic === "slice") state.previews.delete(h.index);
    if (h.topic === "slice") recordLatency(h);
    updateProgress();
  }
  if (frame.pixels) {
    state.frames.set(`${h.topic}:${h.index}`, frame);
    if (state.frames.size > FRAME_CACHE) state.frames.delete(state.frames.keys().next().value);
  }
  // Following: the newest denoised slice, and the one a newly opened page is sent first.
  if (state.follow && h.topic === "slice" && (firstTime || state.shownIndex == null)) {
    show(h.index, false);
  }
  if (frame.pixels && h.index === state.shownIndex) {
    state.shown[h.topic] = frame;
    scheduleRender();
  }
}

// A partial reconstruction while the scan arrives: shown in the denoised panel (marked) for a
// row without its final slice; following, the previewed row nearest the middle.
function onPreview(frame) {
  const h = frame.header;
  if (h.scan_id !== state.scan.scanId) startScan(h.scan_id, h.rows, "running");
  const scan = state.scan;
  if (scan.status !== "running" || !frame.pixels) return;
  scan.previewFraction = Math.max(scan.previewFraction || 0, h.fraction);
  updateProgress();
  if ((h.plane || "xy") === "xz") {
    state.xz = frame;
    scheduleRender();
    return;
  }
  if (scan.received.slice.has(h.index)) return;  // its final slice is here
  state.previews.set(h.index, frame);
  if (state.follow && scan.received.slice.size === 0) {
    const middle = Math.floor(scan.rows / 2);
    const nearest = [...state.previews.keys()].reduce(
      (a, b) => (Math.abs(b - middle) < Math.abs(a - middle) ? b : a));
    if (state.shownIndex !== nearest) return show(nearest, false);
  }
  if (h.index === state.shownIndex && !state.frames.has(`slice:${h.index}`)) {
    state.shown.slice = frame;
    scheduleRender();
  }
}

// A slice of a continuous scan's window k: grouped under the continuous scan. Following, the
// newest window is shown at the chosen row (the middle one until the row slider moves).
function onWindow(frame) {
  const h = frame.header;
  const scanId = h.continuous_scan || h.scan_id.replace(/\.w\d+$/, "");
  if (scanId !== state.scan.scanId) startScan(scanId, h.rows, "running");
  const scan = state.scan;
  const windows = state.windows;
  const k = h.window_index;
  scan.continuous = true;
  scan.rows = h.rows;
  windows.spans.set(k, [h.first_projection, h.last_projection]);
  while (windows.spans.size > WINDOWS_KEPT) windows.spans.delete(Math.min(...windows.spans.keys()));
  if (state.shownIndex == null) state.shownIndex = Math.floor(h.rows / 2);
  const row = state.shownIndex;
  if (frame.pixels && h.index === row) {
    windows.frames.set(`${h.topic}:${k}`, frame);
    while (windows.frames.size > 2 * WINDOWS_KEPT) {
      windows.frames.delete(windows.frames.keys().next().value);
    }
  }
  $("window-row").hidden = false;
  const slider = $("window-slider");
  slider.min = String(Math.min(...windows.spans.keys()));
  slider.max = String(Math.max(...windows.spans.keys()));
  if (state.follow && h.index === row && (windows.shown == null || k >= windows.shown)) {
    showWindow(k, false);
  } else if (frame.pixels && k === windows.shown && h.index === row) {
    state.shown[h.topic] = frame;
    scheduleRender();
  }
  updateProgress();
}

// Show window k at the chosen row; ask the server for what is not here.
function showWindow(k, request) {
  const windows = state.windows;
  windows.shown = k;
  let missing = false;
  for (const topic of TOPICS) {
    state.shown[topic] = windows.frames.get(`${topic}:${k}`) || null;
    missing ||= state.shown[topic] === null;
  }
  if (missing && request) send({ get: state.shownIndex, window: k });
  $("window-slider").value = String(k);
  $("slider").value = String(state.shownIndex);
  scheduleRender();
}

function stepWindow(delta) {
  const keys = [...state.windows.spans.keys()].sort((a, b) => a - b);
  if (!keys.length) return false;
  const now = state.windows.shown == null ? keys[keys.length - 1] : state.windows.shown;
  const target = delta < 0 ? keys.filter((k) => k < now).pop() : keys.find((k) => k > now);
  if (target == null) return false;
  setFollow(false);
  showWindow(target, true);
  return true;
}

function stopPlaying() {
  if (state.windows.playing != null) clearInterval(state.windows.playing);
  state.windows.playing = null;
  $("window-play").textContent = "play";
}

function recordLatency(h) {
  const pipeline = h.timing && h.timing.end_to_end != null ? h.timing.end_to_end * 1000 : null;
  const delivery = (Date.now() / 1000 + state.clock.offset - h.t_published) * 1000;
  const toViewer = h.t_viewer != null ? (h.t_viewer - h.t_published) * 1000 : null;
  state.scan.latency.set(h.index, { pipeline, delivery, toViewer, timing: h.timing || {} });
  if (pipeline != null) {
    state.spark.push(pipeline + Math.max(0, delivery));
    if (state.spark.length > SPARK_POINTS) state.spark.shift();
  }
}

// Show slice `index` of the current scan; ask the server for what is not here.
function show(index, request) {
  state.shownIndex = index;
  let missing = false;
  for (const topic of TOPICS) {
    state.shown[topic] = state.frames.get(`${topic}:${index}`) || null;
    missing ||= state.shown[topic] === null;
  }
  if (!state.shown.slice && state.previews.has(index)) state.shown.slice = state.previews.get(index);
  if (missing && request) send({ get: index });
  $("slider").value = String(index);
  scheduleRender();
}

function updateProgress() {
  const scan = state.scan;
  const received = scan.received.slice.size;
  $("scan-id").textContent = scan.scanId || "no scan yet";
  $("scan-progress").max = Math.max(1, scan.rows);
  $("scan-progress").value = received;
  $("scan-count").textContent = scan.continuous
    ? `continuous · ${state.windows.spans.size} windows kept (last ${WINDOWS_KEPT})`
    : `${received} / ${scan.rows} slices`;
  const status = $("scan-status");
  const preview = scan.status === "running" && scan.previewFraction != null
    ? ` · preview ${Math.round(100 * scan.previewFraction)}% of angles` : "";
  status.textContent = scan.status === "idle" ? "" : scan.status + preview;
  status.className = scan.status;
  body.dataset.received = String(received);
  body.dataset.status = scan.status;
}

// ---- drawing ------------------------------------------------------------------------------------

function scheduleRender() {
  if (state.renderPending) return;
  state.renderPending = true;
  requestAnimationFrame(render);
}

function render() {
  state.renderPending = false;
  const windowOf = {};
  for (const topic of TOPICS) {
    const frame = state.shown[topic];
    windowOf[topic] = frame ? contrastWindow(frame) : null;
  }
  if ($("linked").checked && windowOf.slice) windowOf.recon = windowOf.slice;
  for (const topic of TOPICS) drawPanel(topic, state.shown[topic], windowOf[topic]);
  $("panel-xz").hidden = !state.xz;
  if (state.xz) drawPanel("xz", state.xz, contrastWindow(state.xz));
  const index = state.shownIndex;
  const k = state.windows.shown;
  const span = k == null ? null : state.windows.spans.get(k);
  $("window-label").textContent = k == null ? "window –"
    : `window ${k}${span ? ` (projections ${span[0]}-${span[1]})` : ""}`;
  body.dataset.window = k == null ? "" : String(k);
  $("slider-label").textContent = index == null ? "slice –" : `slice ${index} / ${state.scan.rows - 1}`;
  body.dataset.shownIndex = index == null ? "" : String(index);
  body.dataset.follow = String(state.follow);
  drawLatency();
}

function contrastWindow(frame) {
  if (document.querySelector('input[name="window"]:checked').value === "manual") {
    const low = parseFloat($("w-low").value);
    const high = parseFloat($("w-high").value);
    if (Number.isFinite(low) && Number.isFinite(high)) return [low, high];
  }
  const pLow = clampPercent($("p-low").value, 0.5);
  const pHigh = clampPercent($("p-high").value, 99.5);
  const key = `${pLow}/${pHigh}`;
  if (frame.windowKey !== key) {
    frame.window = percentiles(frame.pixels, pLow, pHigh);
    frame.windowKey = key;
  }
  return frame.window;
}

function clampPercent(text, fallback) {
  const value = parseFloat(text);
  return Number.isFinite(value) ? Math.min(100, Math.max(0, value)) : fallback;
}

function drawPanel(topic, frame, window) {
  const canvas = $(`canvas-${topic}`);
  const placeholder = $(`placeholder-${topic}`);
  const caption = $(`caption-${topic}`);
  markPreview(topic, canvas, frame && frame.header.topic === "preview" ? frame.header : null);
  if (!frame) {
    canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
    delete canvas.dataset.index;
    placeholder.hidden = false;
    placeholder.textContent = placeholderText(topic);
    caption.textContent = "";
    return;
  }
  const [h, w] = frame.header.shape;
  if (canvas.width !== w || canvas.height !== h) {
    canvas.width = w;
    canvas.height = h;
  }
  paint(canvas, frame.pixels, window, state.lut);
  const [low, high] = window;
  placeholder.hidden = true;
  if (frame.header.window_index != null) canvas.dataset.window = String(frame.header.window_index);
  else delete canvas.dataset.window;
  Object.assign(canvas.dataset, { index: String(frame.header.index), scan: frame.header.scan_id,
                                  low: String(low), high: String(high), colormap: state.lutName });
  const binned = frame.header.bin > 1 ? ` · binned ${frame.header.bin}×` : "";
  const header = frame.header;
  const where = (header.window_index != null ? `window ${header.window_index} · ` : "") +
    (topic === "xz" ? `through slice row ${header.index}` : `slice ${header.index}`);
  const partial = header.topic === "preview" ? `preview · ${Math.round(100 * header.fraction)}% ` +
    `of angles (${header.angles} / ${header.n_angles}) · ` : "";
  caption.textContent = `${partial}${where} · window ${fmt(low, 4)} … ${fmt(high, 4)}${binned}`;
}

// Mark a panel as showing a preview (header) or not (null): its frame, title and data- state.
function markPreview(topic, canvas, header) {
  const figure = canvas.closest("figure");
  if (header) {
    figure.dataset.preview = "true";
    Object.assign(canvas.dataset, { preview: "true", fraction: String(header.fraction),
                                    angles: String(header.angles) });
  } else {
    delete figure.dataset.preview;
    for (const key of ["preview", "fraction", "angles"]) delete canvas.dataset[key];
  }
  if (topic === "slice") $("title-slice").textContent = header ? "preview (plain FBP)" : "denoised";
}

function placeholderText(topic) {
  if (state.shownIndex == null) return "waiting for a slice";
  if (topic === "recon" && state.scan.received.recon.size === 0 && state.scan.received.slice.size > 0) {
    return "plain FBP is not published: start the service with publish.recon = true";
  }
  return state.scan.received[topic].has(state.shownIndex) ? "loading…" : "not reconstructed yet";
}

function drawLatency() {
  const index = state.shownIndex;
  const entry = index == null ? null : state.scan.latency.get(index);
  if (entry) {
    const t = entry.timing;
    const stages = ["wait", "fbp", "denoise"].filter((s) => t[s] != null)
      .map((s) => `${s} ${fmt(t[s] * 1000)}`).join(", ");
    const hop = entry.toViewer == null ? "" : ` (service → viewer ${fmt(entry.toViewer)})`;
    const delivery = entry.delivery == null ? "" : ` · to this screen ${fmt(entry.delivery)} ms${hop}`;
    $("latency-slice").textContent =
      `pipeline ${fmt(entry.pipeline)} ms${stages ? ` (${stages})` : ""}${delivery}`;
  } else {
    $("latency-slice").textContent = "–";
  }
  const canvas = $("sparkline");
  const context = canvas.getContext("2d");
  const { width, height } = canvas;
  context.clearRect(0, 0, width, height);
  const values = state.spark;
  const span = Math.max(values.length, 30) - 1;
  const top = Math.max(BUDGET_MS * 1.5, ...values) * 1.1;
  const y = (ms) => height - 2 - (ms / top) * (height - 4);
  context.strokeStyle = "#e0a43a";
  context.setLineDash([4, 3]);
  context.beginPath();
  context.moveTo(0, y(BUDGET_MS));
  context.lineTo(width, y(BUDGET_MS));
  context.stroke();
  context.setLineDash([]);
  context.strokeStyle = "#5aa9e6";
  context.beginPath();
  values.forEach((ms, i) => {
    const x = (i / span) * width;
    if (i === 0) context.moveTo(x, y(ms)); else context.lineTo(x, y(ms));
  });
  context.stroke();
  if (values.length) {
    const sorted = [...values].sort((a, b) => a - b);
    const q = (p) => sorted[Math.min(sorted.length - 1, Math.floor(p * sorted.length))];
    $("latency-stats").textContent =
      `last ${fmt(values[values.length - 1])} · p50 ${fmt(q(0.5))} · p95 ${fmt(q(0.95))} ms`;
  }
}

function fmt(value, digits = 1) {
  if (value == null || !Number.isFinite(value)) return "?";
  return Math.abs(value) >= 1e4 || (value !== 0 && Math.abs(value) < 1e-3)
    ? value.toExponential(2) : value.toFixed(digits);
}

// ---- controls -----------------------------------------------------------------------------------

function setFollow(follow) {
  if (state.follow === follow) return;
  state.follow = follow;
  $("follow").checked = follow;
  send({ follow });
  if (follow && state.scan.continuous) {
    stopPlaying();
    const keys = [...state.windows.spans.keys()];
    if (keys.length) showWindow(Math.max(...keys), true);
  } else if (follow) {
    const received = state.scan.received.slice;
    if (received.size) show(Math.max(...received), true);
  }
  scheduleRender();
}

$("slider").addEventListener("input", (event) => {
  if (state.scan.continuous) {  // another row: the same window there (following stays)
    state.shownIndex = parseInt(event.target.value, 10);
    state.windows.frames.clear();
    const keys = [...state.windows.spans.keys()];
    if (keys.length) showWindow(state.windows.shown ?? Math.max(...keys), true);
    return;
  }
  setFollow(false);
  show(parseInt(event.target.value, 10), true);
});
$("window-slider").addEventListener("input", (event) => {
  stopPlaying();
  setFollow(false);
  showWindow(parseInt(event.target.value, 10), true);
});
$("window-prev").addEventListener("click", () => { stopPlaying(); stepWindow(-1); });
$("window-next").addEventListener("click", () => { stopPlaying(); stepWindow(1); });
$("window-play").addEventListener("click", () => {
  if (state.windows.playing != null) return stopPlaying();
  const keys = [...state.windows.spans.keys()];
  if (!keys.length) return;
  setFollow(false);
  showWindow(Math.min(...keys), true);  // from the oldest kept window to the newest
  state.windows.playing = setInterval(() => { if (!stepWindow(1)) stopPlaying(); }, PLAY_MS);
  $("window-play").textContent = "pause";
});
$("follow").addEventListener("change", (event) => setFollow(event.target.checked));
$("colormap").addEventListener("change", (event) => {
  state.lut = makeLut(event.target.value);
  state.lutName = event.target.value;
  body.dataset.colormap = event.target.value;
  scheduleRender();
});
for (const input of document.querySelectorAll('input[name="window"]')) {
  input.addEventListener("change", () => {
    // Manual starts from the window on screen, so switching does not jump.
    const canvas = $("canvas-slice");
    if (input.value === "manual" && canvas.dataset.low && !$("w-low").value) {
      $("w-low").value = Number(canvas.dataset.low).toPrecision(4);
      $("w-high").value = Number(canvas.dataset.high).toPrecision(4);
    }
    scheduleRender();
  });
}
for (const id of ["p-low", "p-high", "w-low", "w-high", "linked"]) {
  $(id).addEventListener("input", scheduleRender);
}

// For tools/bench_web_wire.py, which times the page's own decoding and drawing.
globalThis.tomocastViewer = { parseFrame, percentiles, paint, makeLut };

body.dataset.colormap = "gray";
connect();
