// The dnet dashboard: polls GET /v1/topology every second, draws the ring, and chats over
// POST /v1/chat/completions. Plain DOM and SVG; every value from the server goes in through
// textContent or setAttribute, never innerHTML (node names come from mDNS adverts).
"use strict";

const POLL_MS = 1000;
const POLL_TIMEOUT_MS = 4000; // a hung node must read as unreachable, not freeze the page
const SPARK_POINTS = 90;
const KEY_STORAGE = "dnet.apiKey";
const SVG_NS = "http://www.w3.org/2000/svg";

const $ = (id) => document.getElementById(id);

const state = {
  key: loadKey(),
  keyAsked: false,   // the key dialog opens by itself once (again only after a new key)
  lastOk: 0,         // when the last poll succeeded (ms)
  lastSig: "",       // the last topology rendered, to skip identical re-renders
  rates: [],         // recent measured tokens/s, for the sparkline
  history: [],       // the chat conversation: [{role, content}]
  chat: null,        // AbortController of the answer streaming in, if any
};

// ---- HTTP ---------------------------------------------------------------------------------

function loadKey() {
  try { return localStorage.getItem(KEY_STORAGE) || ""; } catch { return ""; }
}

function saveKey(key) {
  state.key = key;
  try { localStorage.setItem(KEY_STORAGE, key); } catch { /* private mode: keep in memory */ }
}

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (state.key) headers.set("Authorization", `Bearer ${state.key}`);
  let response;
  try {
    response = await fetch(path, { ...options, headers, cache: "no-store" });
  } catch (err) {
    // fetch rejects with a TypeError when the node cannot be reached (each browser words it
    // differently); tag it so callers tell it apart from a bug in this page.
    if (!(err instanceof TypeError)) throw err;
    const down = new Error("the node is unreachable");
    down.name = "NetworkError";
    throw down;
  }
  if (response.status === 401) askForKey();
  return response;
}

async function errorText(response) {
  const text = await response.text().catch(() => "");
  try {
    const body = JSON.parse(text);
    if (body.error) return `${response.status}: ${body.error.message || body.error}`;
  } catch { /* not JSON */ }
  return `${response.status} ${response.statusText}${text ? `: ${text.slice(0, 200)}` : ""}`;
}

function askForKey() {
  setStatus("warn", "API key required");
  if (state.keyAsked) return;
  state.keyAsked = true;
  openKeyDialog();
}

function openKeyDialog() {
  const dialog = $("key-dialog");
  if (dialog.open) return;
  $("key-input").value = "";
  dialog.showModal();
}

// ---- Polling ------------------------------------------------------------------------------

let pollTimer = 0;
let polling = false;

async function poll() {
  if (polling) return; // one loop only: a poll in flight schedules the next itself
  polling = true;
  clearTimeout(pollTimer);
  try {
    await pollOnce();
  } catch (err) {
    if (err.name === "TimeoutError") unreachable("not answering");
    else if (err.name === "NetworkError") unreachable("unreachable");
    else {
      console.error(err); // a bug of this page, not the node's fault
      setStatus("bad", `dashboard error: ${err.message}`);
    }
  }
  polling = false;
  // Scheduled after the answer, not on an interval: a slow node never gets requests stacked.
  pollTimer = setTimeout(poll, POLL_MS);
}

async function pollOnce() {
  const response = await api("v1/topology", { signal: AbortSignal.timeout(POLL_TIMEOUT_MS) });
  if (response.status === 404) await showManualMode();
  else if (response.ok) showTopology(await response.json());
  else if (response.status !== 401) unreachable(`answers ${await errorText(response)}`);
}

function unreachable(why) {
  document.body.classList.add("stale");
  const ago = state.lastOk ? `, last update ${Math.round((Date.now() - state.lastOk) / 1000)} s ago`
    : "";
  setStatus("bad", `node ${why}${ago}`);
}

function reachable(label) {
  state.lastOk = Date.now();
  document.body.classList.remove("stale");
  setStatus("ok", label);
}

function setStatus(kind, text) {
  const status = $("status");
  status.className = `status ${kind}`;
  status.textContent = text;
}

async function showManualMode() {
  // `dnet api` has no mesh: show the model it serves; the chat works the same.
  const response = await api("v1/models", { signal: AbortSignal.timeout(POLL_TIMEOUT_MS) });
  if (!response.ok) {
    if (response.status !== 401) unreachable(await errorText(response));
    return;
  }
  const models = (await response.json()).data || [];
  document.body.classList.add("manual");
  $("manual-note").hidden = false;
  $("model").textContent = models.length ? models[0].id : "(no model)";
  $("epoch").textContent = "–";
  reachable("live · manual-mode API");
}

// ---- Topology -----------------------------------------------------------------------------

function showTopology(t) {
  document.body.classList.remove("manual");
  $("manual-note").hidden = true;
  const me = t.nodes.find((n) => n.id === t.this_node);
  reachable(`live · ${me ? me.name : "this node"}`);
  pushRate(t);
  const sig = JSON.stringify(t);
  if (sig === state.lastSig) return;
  state.lastSig = sig;

  $("model").textContent = t.model || "(no model yet)";
  $("model").title = t.model || "";
  $("epoch").textContent = String(t.epoch);
  const byId = new Map(t.nodes.map((n) => [n.id, n]));
  drawRing(t, byId);
  showEntryOnly(t);
  showNodes(t);
  showPerf(t);
}

/** [0,1,2,3,8,9] -> "0-3,8-9" */
function layerRanges(layers) {
  const sorted = [...layers].sort((a, b) => a - b);
  const parts = [];
  for (let i = 0; i < sorted.length;) {
    let j = i;
    while (j + 1 < sorted.length && sorted[j + 1] === sorted[j] + 1) j++;
    parts.push(i === j ? `${sorted[i]}` : `${sorted[i]}-${sorted[j]}`);
    i = j + 1;
  }
  return parts.join(",");
}

function formatBytes(n) {
  if (n == null) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i === 0 || n >= 100 ? 0 : 1)} ${units[i]}`;
}

function shortName(node, id) {
  const name = node ? node.name : id.slice(0, 8);
  return name.length > 18 ? `${name.slice(0, 17)}…` : name;
}

// ---- The ring (SVG) -----------------------------------------------------------------------

const RING = { cx: 380, cy: 230, r: 140, node: 24, label: 44 };

function svg(tag, attrs, parent, text) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  if (text != null) el.textContent = text;
  if (parent) parent.appendChild(el);
  return el;
}

function drawRing(t, byId) {
  const root = $("ring");
  root.replaceChildren();
  const defs = svg("defs", {}, root);
  const marker = svg("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 8, refY: 5,
    markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" }, defs);
  svg("path", { d: "M0,0 L10,5 L0,10 z", class: "arrow-head" }, marker);

  const { cx, cy, r } = RING;
  svg("circle", { cx, cy, r, class: "track" }, root);
  const ring = t.ring;
  if (!ring.length) {
    svg("text", { x: cx, y: cy, class: "center" }, root, t.epoch ? "empty ring" : "no plan yet");
    $("ring-path").textContent = "";
    return;
  }
  const angle = (i) => -Math.PI / 2 + (2 * Math.PI * i) / ring.length;
  const at = (a, radius) => [cx + radius * Math.cos(a), cy + radius * Math.sin(a)];

  // Activation flow: clockwise arcs from each node to the next, the last back to the first.
  const gap = (RING.node + 8) / r; // radians kept clear around each node
  const span = (2 * Math.PI) / ring.length - 2 * gap;
  if (span > 0.05) {
    ring.forEach((_, i) => {
      const [x1, y1] = at(angle(i) + gap, r);
      const [x2, y2] = at(angle(i) + gap + span, r);
      const large = span > Math.PI ? 1 : 0;
      svg("path", { d: `M${x1},${y1} A${r},${r} 0 ${large} 1 ${x2},${y2}`, class: "flow",
        "marker-end": "url(#arrow)" }, root);
    });
  }
  svg("text", { x: cx, y: cy - 6, class: "center" }, root, "activations flow ↻");
  const rounds = t.rounds && t.rounds > 1 ? `${t.rounds} rounds per token` : "1 round per token";
  svg("text", { x: cx, y: cy + 14, class: "center muted" }, root, t.rounds ? rounds : "");

  ring.forEach((id, i) => {
    const node = byId.get(id);
    const a = angle(i);
    const [x, y] = at(a, r);
    const classes = ["node"];
    if (!node || !node.healthy) classes.push("unhealthy");
    if (node && node.coordinator) classes.push("coordinator");
    if (id === t.this_node) classes.push("you");
    const g = svg("g", { class: classes.join(" "), "data-id": id }, root);
    svg("title", {}, g, node ? `${node.name} (${id})` : id);
    svg("circle", { cx: x, cy: y, r: RING.node }, g);
    svg("text", { x, y: y + 5, class: "hop" }, g, String(i + 1));

    const lines = [
      `${node && node.coordinator ? "★ " : ""}${shortName(node, id)}${id === t.this_node ? " ◎" : ""}`,
      node ? `layers ${layerRanges(node.layers) || "–"}` : "not reporting",
    ];
    if (node && node.window) lines.push(`window ${node.window}${node.streaming ? " · streams" : ""}`);
    // Labels sit outside the circle, anchored away from it so they never cross the ring.
    const [lx, ly] = at(a, r + RING.label);
    const cos = Math.cos(a);
    const sin = Math.sin(a);
    const anchor = cos > 0.3 ? "start" : cos < -0.3 ? "end" : "middle";
    const lh = 16;
    const top = sin < -0.3 ? ly - (lines.length - 1) * lh
      : sin > 0.3 ? ly + 6 : ly - ((lines.length - 1) * lh) / 2 + 5;
    const label = svg("text", { x: lx, y: top, "text-anchor": anchor, class: "label" }, g);
    lines.forEach((line, k) => {
      svg("tspan", { x: lx, dy: k ? lh : 0, class: k ? "detail" : "name" }, label, line);
    });
  });

  const names = ring.map((id) => (byId.get(id) ? byId.get(id).name : id.slice(0, 8)));
  $("ring-path").textContent = `Token path: ${[...names, names[0]].join(" → ")}`;
}

function badge(text, kind) {
  const span = document.createElement("span");
  span.className = `badge ${kind}`;
  span.textContent = text;
  return span;
}

function nodeBadges(t, node) {
  const out = [];
  if (node.coordinator) out.push(badge("★ coordinator", "coord"));
  if (node.id === t.this_node) out.push(badge("this node", "you"));
  if (node.excluded) {
    const excluded = badge(`excluded: ${node.excluded.failure}`, "bad excluded");
    excluded.title = node.excluded.reason;
    out.push(excluded);
  } else if (!t.ring.includes(node.id)) out.push(badge("entry only", "entry"));
  if (!node.healthy) out.push(badge("unhealthy", "bad"));
  return out;
}

/** Why the coordinator left a node out of planning, and when it tries again. */
function exclusionText(node) {
  const e = node.excluded;
  const retry = e.retry_in_s > 0 ? `next try in ${Math.round(e.retry_in_s)} s` : "retrying";
  return `${e.failure}: ${e.reason} (failed ${e.failures}×; ${retry}, or when it changes)`;
}

function showEntryOnly(t) {
  const others = t.nodes.filter((n) => !t.ring.includes(n.id) && !n.excluded);
  $("entry-only").hidden = others.length === 0;
  $("entry-list").replaceChildren(...others.map((n) => {
    const li = document.createElement("li");
    li.className = n.healthy ? "" : "unhealthy";
    li.append(n.name, " ", ...nodeBadges(t, n).filter((b) => !b.classList.contains("entry")));
    return li;
  }));
}

// ---- Nodes table --------------------------------------------------------------------------

function cell(row, content, className) {
  const td = row.insertCell();
  if (className) td.className = className;
  if (content instanceof Node) td.append(content);
  else td.textContent = content;
  return td;
}

function memoryBar(node) {
  const wrap = document.createElement("div");
  wrap.className = "memory";
  const bar = document.createElement("div");
  bar.className = "bar";
  const fill = document.createElement("div");
  const used = node.memory_used_bytes;
  const budget = node.memory_budget_bytes;
  const share = used != null && budget ? used / budget : 0;
  fill.className = `fill${share > 1 ? " over" : share > 0.9 ? " high" : ""}`;
  fill.style.width = `${(Math.min(1, share) * 100).toFixed(1)}%`;
  if (share) wrap.title = `${(share * 100).toFixed(0)}% of the budget`;
  bar.append(fill);
  const text = document.createElement("span");
  text.textContent = `${formatBytes(used)} / ${formatBytes(budget)}`;
  wrap.append(bar, text);
  return wrap;
}

// The shard's prefix cache: bytes held of its capacity, and the share of looked-up prompt
// blocks it could restore.
function prefixCache(node) {
  if (!node.layers.length || !node.prefix_cache_capacity_bytes) return "–";
  const rate = node.prefix_cache_hit_rate;
  const hits = rate == null ? "no lookups yet" : `${(rate * 100).toFixed(0)}% hits`;
  return `${formatBytes(node.prefix_cache_bytes)} / ${
    formatBytes(node.prefix_cache_capacity_bytes)} · ${hits}`;
}

function showNodes(t) {
  const body = $("nodes").tBodies[0];
  body.replaceChildren();
  // Ring order first, then the entry-only nodes.
  const order = (n) => (t.ring.includes(n.id) ? t.ring.indexOf(n.id) : t.ring.length);
  for (const node of [...t.nodes].sort((a, b) => order(a) - order(b))) {
    const row = body.insertRow();
    row.dataset.id = node.id;
    if (!node.healthy) row.className = "unhealthy";
    const name = document.createElement("div");
    name.className = "name";
    name.append(node.name, " ", ...nodeBadges(t, node));
    name.title = node.id;
    if (node.excluded) {
      const why = document.createElement("div");
      why.className = "exclusion";
      why.textContent = exclusionText(node);
      name.append(why);
    }
    cell(row, name);
    cell(row, `${node.address}:${node.http_port}`, "muted");
    cell(row, layerRanges(node.layers) || "–");
    cell(row, node.layers.length ? `${node.window}${node.streaming ? " · streams" : ""}` : "–");
    cell(row, memoryBar(node));
    cell(row, prefixCache(node), "num");
    cell(row, node.decode_tokens_per_s ? node.decode_tokens_per_s.toFixed(1) : "–", "num");
    cell(row, node.epoch == null ? "–" : String(node.epoch), "num");
    cell(row, [node.chip || node.platform, node.version && `dnet ${node.version}`]
      .filter(Boolean).join(" · "), "muted");
  }
}

// ---- Speed and planner --------------------------------------------------------------------

function pushRate(t) {
  const rate = t.measured_ms_per_token ? 1000 / t.measured_ms_per_token : 0;
  state.rates.push(rate);
  if (state.rates.length > SPARK_POINTS) state.rates.shift();
  $("rate").textContent = rate ? rate.toFixed(1) : "–";
  drawSpark();
}

function drawSpark() {
  const root = $("spark");
  root.replaceChildren();
  const max = Math.max(...state.rates, 1);
  const step = 300 / (SPARK_POINTS - 1);
  const offset = SPARK_POINTS - state.rates.length; // newest point on the right edge
  const points = state.rates.map((v, i) => `${((offset + i) * step).toFixed(1)},${
    (46 - (v / max) * 42).toFixed(1)}`);
  if (points.length > 1) svg("polyline", { points: points.join(" "), class: "spark" }, root);
}

function showPerf(t) {
  const ms = (v) => (v == null ? "–" : `${v.toFixed(1)} ms`);
  $("latency").textContent = `per token: measured ${ms(t.measured_ms_per_token)}`
    + ` vs predicted ${ms(t.predicted_ms_per_token)}`;
  $("explanation").replaceChildren(...(t.explanation || []).map((line) => {
    const li = document.createElement("li");
    li.textContent = line;
    return li;
  }));
  $("last-error").hidden = !t.unavailable;
  $("last-error").textContent = t.unavailable ? `No ring can serve: ${t.unavailable}` : "";
  const others = t.other_clusters || [];
  $("other-clusters").hidden = others.length === 0;
  $("other-clusters").textContent = others.length ? "Another dnet cluster (a different "
    + `--cluster-key) is on the network: ${others.map((o) => o.seen).join(", ")}; its nodes `
    + "are ignored." : "";
}

// ---- Chat ---------------------------------------------------------------------------------

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  const who = document.createElement("div");
  who.className = "who";
  who.textContent = role;
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  div.append(who, body);
  $("chat-log").append(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

/** The payloads of an SSE stream's `data:` lines, as they arrive. */
async function* sseData(stream) {
  const reader = stream.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      const lines = buffer.split("\n");
      buffer = lines.pop(); // a partial line waits for the next chunk
      for (const line of lines) {
        if (line.startsWith("data:")) yield line.slice(5).trim();
      }
    }
  } finally {
    reader.cancel().catch(() => {}); // closes the connection if we stopped early
  }
}

async function sendChat(text) {
  const turn = [...state.history, { role: "user", content: text }];
  const asked = addMessage("user", text);
  const reply = addMessage("assistant", "");
  reply.classList.add("streaming");
  const out = reply.querySelector(".text");
  const controller = new AbortController();
  state.chat = controller;
  setChatBusy(true);
  let answer = "";
  try {
    const request = { messages: turn, stream: true };
    const max = parseInt($("max-tokens").value, 10);
    if (max > 0) request.max_tokens = max;
    const response = await api("v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(request), signal: controller.signal });
    if (!response.ok) throw new Error(await errorText(response));
    for await (const data of sseData(response.body)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message || JSON.stringify(chunk.error));
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) {
        answer += delta.content;
        out.textContent = answer;
        reply.scrollIntoView({ block: "end" });
      }
    }
    state.history = [...turn, { role: "assistant", content: answer }];
    if (!answer) out.textContent = "(empty answer)";
  } catch (err) {
    if (err.name === "AbortError") {
      // What was shown stays in the conversation, as the user read it.
      state.history = [...turn, { role: "assistant", content: answer }];
      reply.append(note("stopped"));
    } else {
      // A failed turn is left out of the history, so the next request does not carry it.
      asked.classList.add("failed");
      reply.classList.add("failed");
      reply.append(note(String(err.message || err), "error"));
    }
  } finally {
    reply.classList.remove("streaming");
    reply.classList.add("done");
    state.chat = null;
    setChatBusy(false);
  }
}

function note(text, className = "muted") {
  const p = document.createElement("p");
  p.className = `note-line ${className}`;
  p.textContent = text;
  return p;
}

function setChatBusy(busy) {
  $("chat-send").textContent = busy ? "Stop" : "Send";
  $("chat-send").classList.toggle("stop", busy);
}

// ---- Wiring -------------------------------------------------------------------------------

function init() {
  $("chat-form").addEventListener("submit", (event) => {
    event.preventDefault();
    if (state.chat) { state.chat.abort(); return; } // the button reads "Stop" meanwhile
    const text = $("chat-input").value.trim();
    if (!text) return;
    $("chat-input").value = "";
    sendChat(text);
  });
  $("chat-input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      if (!state.chat) $("chat-form").requestSubmit();
    }
  });
  $("chat-clear").addEventListener("click", () => {
    if (state.chat) state.chat.abort();
    state.history = [];
    $("chat-log").replaceChildren();
  });
  $("status").addEventListener("click", () => {
    if ($("status").classList.contains("warn")) openKeyDialog();
  });
  $("key-dialog").addEventListener("close", () => {
    if ($("key-dialog").returnValue !== "save") return;
    saveKey($("key-input").value.trim());
    state.keyAsked = false; // a wrong key asks once more
    poll();
  });
  poll();
}

init();
