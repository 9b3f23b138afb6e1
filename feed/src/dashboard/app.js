// tickshard dashboard: a client of the public WebSocket protocol v1 plus the
// candle history endpoint (GET /api/candles). It subscribes to every symbol,
// resumes from the last {seq, epoch} of each after any reconnect, never shows a
// duplicate or silently skips a tick, and says so when the server could not
// resume (recovered: false) and it reloaded a snapshot.
//
// When the server says `unauthorized` (or `token_expired`) the page asks for a
// token, keeps it in this tab's session storage only, and sends it with the
// `auth` op (never in the URL) and as a bearer header to /api/candles.
//
// Prices stay the exact decimal strings the server sends; only the chart
// converts them to numbers (it plots pixels).
//
// The watchlist is subscribed in batches, one at a time: a batch the server
// refuses as over its per-connection limit (`too_many_subscriptions`) is halved
// until one symbol no longer fits, and the list stops growing there (one slot
// is given back for the chart's candles if it needs it). Reconnects wait a
// random time under a doubling bound (full jitter) that resets only once data
// flows again (at most 10 s; after 1008/1009, "fix the client first", it
// starts at 8 s and grows to a minute), and while the page waits for a token it does not reconnect at all. An
// app-level ping every 15 s (the browser hides the server's pings) replaces a
// connection that answered nothing in the interval after a ping (15–30 s),
// e.g. after a laptop slept.
"use strict";

// `#ping=MS` in the URL sets the ping interval (tests use a short one).
const PING_MS = Number(new URLSearchParams(location.hash.slice(1)).get("ping")) || 15000;
const CONNECT_MS = 10000; // an upgrade not answered by then is given up
const BATCH = 200; // symbols per watchlist subscribe (about 12 KiB with resume positions)
const MAX_NOTICES = 50;
const MAX_BARS = 2000; // bars kept for the chart (a day of 1s candles would be 86,400)

const state = {
  status: "connecting",
  symbols: new Map(), // symbol -> row state
  selected: null,
  interval: "1m",
  candles: [], // the selected symbol's bars, exact strings
  notices: [],
  gaps: 0,
  dups: 0,
  reconnects: 0,
  unrecovered: 0,
  signin: false,
  watchFull: false, // the server refused more subscriptions on this connection
};

const TOKEN_KEY = "tickshard.token";
const token = () => sessionStorage.getItem(TOKEN_KEY);
function askForToken(why) {
  state.signin = true;
  setStatus(why, "down");
  $("signin").hidden = false;
  $("token").focus();
}
function sendAuth() {
  const t = token();
  if (t) send({ op: "auth", id: "auth", token: t });
}

// A plain, serialisable view of the page state (the browser tests read it).
window.tickshard = {
  view() {
    const rows = {};
    for (const [sym, r] of state.symbols) rows[sym] = { seq: r.seq, epoch: r.epoch, last: r.last, bid: r.bid, ask: r.ask, ticks: r.total, subscribed: r.subscribed };
    return {
      status: state.status, selected: state.selected, interval: state.interval, rows,
      candles: state.candles.map((c) => ({ ...c })), notices: state.notices.slice(-20),
      gaps: state.gaps, dups: state.dups, reconnects: state.reconnects, unrecovered: state.unrecovered,
      watchFull: state.watchFull, chartLive: chartSub !== null && chartSub.live,
      chart: { panes: chart.panes().length, candlePane: candleSeries.getPane().paneIndex(), volumePane: volumeSeries.getPane().paneIndex() },
    };
  },
  select: (sym) => select(sym),
  setInterval: (iv) => setCandleInterval(iv),
};

const $ = (id) => document.getElementById(id);
const rowsEl = $("rows");
let ws = null;

function notice(text) {
  state.notices.push(text);
  if (state.notices.length > 2 * MAX_NOTICES) state.notices.splice(0, state.notices.length - MAX_NOTICES);
  $("note").textContent = text;
}

function setStatus(s, cls) {
  state.status = s;
  $("status").textContent = s;
  $("status").className = "status " + (cls || "");
}

function send(msg) {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(msg));
}

// ---- decimals as strings -------------------------------------------------
function dp(s) { const i = s.indexOf("."); return i < 0 ? 0 : s.length - i - 1; }
function scaled(s, scale) {
  const neg = s.startsWith("-");
  const digits = (neg ? s.slice(1) : s).replace(".", "") + "0".repeat(scale - dp(s));
  return neg ? -BigInt(digits) : BigInt(digits);
}
function cmp(a, b) { const k = Math.max(dp(a), dp(b)); const x = scaled(a, k), y = scaled(b, k); return x < y ? -1 : x > y ? 1 : 0; }
function changePct(from, to) {
  const k = Math.max(dp(from), dp(to));
  const a = scaled(from, k), b = scaled(to, k);
  if (a === 0n) return "";
  const bp = (b - a) * 10000n / a;
  const sign = bp < 0n ? "-" : bp > 0n ? "+" : "";
  const abs = bp < 0n ? -bp : bp;
  return `${sign}${abs / 100n}.${String(abs % 100n).padStart(2, "0")}%`;
}

// ---- watchlist ---------------------------------------------------------------
function row(sym) {
  let r = state.symbols.get(sym);
  if (r) return r;
  const tr = document.createElement("tr");
  tr.dataset.symbol = sym;
  tr.innerHTML = `<td class="sym"></td><td class="last"></td><td class="bid"></td><td class="ask"></td><td class="chg"></td><td class="rate"></td>`;
  tr.cells[0].textContent = sym;
  tr.addEventListener("click", () => select(sym));
  const kids = rowsEl.children; // sorted by symbol: binary search for the place
  let lo = 0, hi = kids.length;
  while (lo < hi) { const mid = (lo + hi) >> 1; if (kids[mid].dataset.symbol > sym) hi = mid; else lo = mid + 1; }
  rowsEl.insertBefore(tr, kids[lo] || null);
  r = { seq: 0, epoch: "", first: null, last: null, bid: null, ask: null, count: 0, shown: "", total: 0, tr, timer: 0, subscribed: false };
  state.symbols.set(sym, r);
  if (!state.selected) select(sym);
  return r;
}

function render(r, m) {
  const c = r.tr.cells;
  const prev = r.last;
  r.last = m.price; r.bid = m.bid ?? null; r.ask = m.ask ?? null;
  if (r.first === null) r.first = m.price;
  c[1].textContent = m.price;
  c[2].textContent = m.bid ?? "";
  c[3].textContent = m.ask ?? "";
  const pct = changePct(r.first, m.price);
  c[4].textContent = pct;
  c[4].className = "chg " + (pct.startsWith("-") ? "down" : pct.startsWith("+") ? "up" : "");
  if (prev !== null && prev !== m.price) {
    c[1].className = "last " + (cmp(m.price, prev) > 0 ? "flash-up" : "flash-down");
    clearTimeout(r.timer);
    r.timer = setTimeout(() => { c[1].className = "last"; }, 300);
  }
}

// (data only for a symbol with a row: one given back to make room for the
// chart may still have a tick on the way)
function onTick(m) {
  const r = state.symbols.get(m.symbol);
  if (!r) return;
  if (m.seq <= r.seq) { state.dups++; return; } // never show a duplicate
  if (r.seq && m.seq !== r.seq + 1) {
    state.gaps++;
    notice(`${m.symbol}: gap ${r.seq} → ${m.seq}`);
  }
  r.seq = m.seq; r.count++; r.total++;
  render(r, m);
}

function onSnapshot(m) {
  const r = state.symbols.get(m.symbol);
  if (!r) return;
  r.seq = m.seq; r.epoch = m.epoch;
  render(r, m);
  if (m.conflated) notice(`${m.symbol}: fell behind; showing a fresh snapshot`);
}

// The watchlist's subscribes on this connection: a queue, one batch in
// flight, and every batch id sent with the symbols of it the server still
// subscribes later (their shard was down: it said `unavailable` for each,
// and completes them with a `subscribed` of the same id, or refuses them).
const newWatch = () => ({ queue: [], batch: null, size: BATCH, n: 0, retry: 0, ids: new Map() });
let watch = newWatch();

function subscribeAll(symbols) {
  if (state.watchFull) return;
  const waiting = new Set(watch.queue);
  if (watch.batch) for (const s of watch.batch.symbols) waiting.add(s);
  for (const s of symbols) {
    const r = state.symbols.get(s);
    if (!(r && r.subscribed) && !waiting.has(s)) watch.queue.push(s);
  }
  pump();
}

function pump() {
  if (watch.batch || watch.retry || state.watchFull || !watch.queue.length) return;
  const symbols = watch.queue.splice(0, watch.size);
  const resume = {};
  for (const s of symbols) {
    const r = state.symbols.get(s);
    if (r && r.epoch) resume[s] = { seq: r.seq, epoch: r.epoch };
  }
  watch.batch = { id: `watch-${++watch.n}`, symbols };
  watch.ids.set(watch.batch.id, new Set());
  send({ op: "subscribe", id: watch.batch.id, symbols, channels: ["ticks"], resume });
}

function onWatched(m) {
  const deferred = watch.ids.get(m.id);
  for (const e of m.symbols) {
    deferred.delete(e.symbol);
    const r = row(e.symbol);
    r.subscribed = true;
    if (r.epoch && !e.recovered) {
      state.unrecovered++;
      notice(`${e.symbol}: could not resume (history no longer retained); reloaded from a snapshot`);
    }
    if (r.epoch !== e.epoch) r.first = null; // a new history: change counts from it
    // Not resumed: a snapshot follows if the symbol has ticks; until then
    // (and when it has none) the position is the server's.
    if (!e.recovered) r.seq = e.seq;
    r.epoch = e.epoch;
  }
  attempt = 0; // data flows: the next reconnect starts from the shortest wait
  if (watch.batch && m.id === watch.batch.id) { watch.batch = null; pump(); }
}

// One symbol of a batch waits for its shard: the server subscribes it when
// the shard is back (the batch's other symbols were answered first).
function onDeferred(m) {
  watch.ids.get(m.id).add(m.symbol);
  row(m.symbol).subscribed = true;
  notice(`${m.symbol}: its shard is unavailable; subscribing as soon as it is back`);
  if (watch.batch && m.id === watch.batch.id) { watch.batch = null; pump(); }
}

// The server gave up on a batch's deferred symbols: the next symbol list
// (every 5 s) queues them again.
function onDeferredRefused(m) {
  for (const s of watch.ids.get(m.id)) {
    const r = state.symbols.get(s);
    if (r) r.subscribed = false;
  }
  watch.ids.get(m.id).clear();
  notice(`${m.code}: ${m.message}`);
}

function onWatchRefused(m) {
  const b = watch.batch;
  watch.batch = null;
  if (m.code === "too_many_subscriptions") {
    if (b.symbols.length > 1) {
      watch.size = Math.max(1, b.symbols.length >> 1);
      watch.queue.unshift(...b.symbols);
    } else {
      state.watchFull = true;
      watch.queue = [];
      notice(`watchlist full: the server allows no more subscriptions on one connection (${[...state.symbols.values()].filter((r) => r.subscribed).length} symbols)`);
    }
  } else if (m.code === "rate_limited") {
    watch.queue.unshift(...b.symbols);
    watch.retry = setTimeout(() => { watch.retry = 0; pump(); }, 1000);
  } else {
    // (unavailable while the server drains, …) the symbol list polled every
    // 5 s brings the rest back
    watch.queue = [];
    notice(`${m.code}: ${m.message}`);
  }
  pump();
}

// The chart's candles did not fit: give back the watchlist's last symbol.
function makeRoomForChart() {
  const victim = [...state.symbols.entries()].reverse().find(([s, r]) => r.subscribed && s !== state.selected);
  if (!victim || !chartSub || chartSub.retried) return false;
  const [sym, r] = victim;
  send({ op: "unsubscribe", id: "make-room", symbols: [sym], channels: ["ticks"] });
  r.subscribed = false;
  r.tr.remove();
  state.symbols.delete(sym);
  chartSub.retried = true;
  subscribeChart();
  return true;
}

// Live candles of the chart (the first message is the current candle), each
// subscribe with an id of its own: a late answer to an earlier one is not
// taken for this one's.
let chartN = 0;
function subscribeChart() {
  chartSub.id = `chart-${++chartN}`;
  chartSub.live = false;
  send({ op: "subscribe", id: chartSub.id, symbols: [chartSub.sym], channels: [`candles:${chartSub.iv}`] });
}

// ---- chart -------------------------------------------------------------------
const chart = LightweightCharts.createChart($("chart"), {
  autoSize: true,
  layout: { background: { color: "#12161d" }, textColor: "#8b949e", fontFamily: "ui-monospace, Menlo, monospace" },
  grid: { vertLines: { color: "#1b212b" }, horzLines: { color: "#1b212b" } },
  timeScale: { timeVisible: true, secondsVisible: true, borderColor: "#242b36" },
  rightPriceScale: { borderColor: "#242b36", minimumWidth: 96 },
  crosshair: { mode: 0 },
});
const candleSeries = chart.addSeries(LightweightCharts.CandlestickSeries, {
  upColor: "#26a69a", downColor: "#ef5350", borderVisible: false, wickUpColor: "#26a69a", wickDownColor: "#ef5350",
});
// Volume in its own pane below the candles, with its own scale: its values
// never mix with the prices on the candles' scale.
const volumeSeries = chart.addSeries(LightweightCharts.HistogramSeries, {
  priceFormat: { type: "volume" }, priceLineVisible: false,
}, 1);
chart.panes()[0].setStretchFactor(4);
chart.panes()[1].setStretchFactor(1);
volumeSeries.priceScale().applyOptions({ scaleMargins: { top: 0.1, bottom: 0 }, borderColor: "#242b36" });

const bar = (c) => ({ time: Math.floor(c.start / 1e6), open: +c.open, high: +c.high, low: +c.low, close: +c.close });
const vol = (c) => ({ time: Math.floor(c.start / 1e6), value: +c.volume, color: cmp(c.close, c.open) >= 0 ? "rgba(38,166,154,.5)" : "rgba(239,83,80,.5)" });

function drawAll() {
  candleSeries.setData(state.candles.map(bar));
  volumeSeries.setData(state.candles.map(vol));
}

function showCandleInfo(c) {
  $("candle-info").textContent = c ? `O ${c.open}  H ${c.high}  L ${c.low}  C ${c.close}  V ${c.volume}  n ${c.count}` : "";
}

function onCandle(m) {
  if (m.symbol !== state.selected || m.interval !== state.interval) return;
  const c = { start: m.start, open: m.open, high: m.high, low: m.low, close: m.close, volume: m.volume, count: m.count, closed: m.closed };
  const last = state.candles[state.candles.length - 1];
  if (!last || c.start > last.start) {
    state.candles.push(c);
    if (state.candles.length > MAX_BARS + MAX_BARS / 10) {
      state.candles.splice(0, state.candles.length - MAX_BARS);
      drawAll();
    } else {
      candleSeries.update(bar(c)); volumeSeries.update(vol(c));
    }
  } else if (c.start === last.start) {
    state.candles[state.candles.length - 1] = c;
    candleSeries.update(bar(c)); volumeSeries.update(vol(c));
  } else {
    const i = state.candles.findIndex((x) => x.start === c.start);
    if (i >= 0) { state.candles[i] = c; drawAll(); }
  }
  showCandleInfo(state.candles[state.candles.length - 1]);
}

let chartLoad = 0;
async function loadChart() {
  const sym = state.selected, iv = state.interval, load = ++chartLoad;
  if (!sym) return;
  $("chart-symbol").textContent = sym;
  try {
    const t = token();
    const r = await fetch(`/api/candles?symbol=${encodeURIComponent(sym)}&interval=${iv}&limit=500`,
      t ? { headers: { Authorization: `Bearer ${t}` } } : {});
    if (r.status === 401) { askForToken("sign in needed"); return; }
    const body = await r.json();
    if (load !== chartLoad) return; // a newer selection won
    if (!r.ok) {
      // never shown as "no history": say why, and come back when told to
      notice(`candle history for ${sym}: ${body.code || r.status}: ${body.message || r.statusText}`);
      if (r.status === 503) {
        const after = Math.min(Number(r.headers.get("Retry-After")) || 1, 30);
        setTimeout(() => { if (load === chartLoad) loadChart(); }, after * 1000);
        return;
      }
    }
    state.candles = (body.candles || []).slice(-MAX_BARS);
    drawAll();
    chart.timeScale().fitContent();
    showCandleInfo(state.candles[state.candles.length - 1]);
  } catch (e) {
    notice(`candle history for ${sym}: ${e}`);
  }
  if (!chartSub || chartSub.sym !== sym || chartSub.iv !== iv) return;
  chartSub.retried = false;
  subscribeChart();
}

let chartSub = null;
function select(sym) {
  if (chartSub) send({ op: "unsubscribe", id: "chart-off", symbols: [chartSub.sym], channels: [`candles:${chartSub.iv}`] });
  for (const [s, r] of state.symbols) r.tr.classList.toggle("selected", s === sym);
  state.selected = sym;
  chartSub = { sym, iv: state.interval };
  state.candles = [];
  drawAll();
  loadChart();
}

function setCandleInterval(iv) {
  for (const b of document.querySelectorAll(".intervals button")) b.classList.toggle("on", b.dataset.interval === iv);
  if (chartSub) send({ op: "unsubscribe", id: "chart-off", symbols: [chartSub.sym], channels: [`candles:${chartSub.iv}`] });
  state.interval = iv;
  chartSub = state.selected ? { sym: state.selected, iv } : null;
  state.candles = [];
  drawAll();
  loadChart();
}
for (const b of document.querySelectorAll(".intervals button")) b.addEventListener("click", () => setCandleInterval(b.dataset.interval));

// ---- connection --------------------------------------------------------------
let attempt = 0; // reconnects since data last flowed
let lastHeard = 0; // when this connection last brought a message
let pingSent = 0; // when the last ping went out on it (0: none yet)
let reconnectTimer = 0;
let expiryTimer = 0;

function connect() {
  clearTimeout(reconnectTimer);
  reconnectTimer = 0;
  if (ws) { // (one connection at a time: a sign-in during a reconnect)
    const old = ws;
    old.onopen = old.onclose = old.onmessage = null;
    old.close();
  }
  const url = new URL("/ws", location.href);
  url.protocol = url.protocol.replace("http", "ws");
  const sock = new WebSocket(url);
  ws = sock;
  lastHeard = Date.now();
  pingSent = 0;
  clearTimeout(watch.retry);
  watch = newWatch();
  state.watchFull = false;
  const unanswered = setTimeout(() => { if (sock.readyState === WebSocket.CONNECTING) closed(sock, "no answer"); }, CONNECT_MS);
  sock.onopen = () => {
    clearTimeout(unanswered);
    lastHeard = Date.now();
    setStatus("connected", "");
    for (const r of state.symbols.values()) r.subscribed = false;
    sendAuth();
    send({ op: "symbols", id: "list" });
    if (state.selected) loadChart(); // reload history: candles may have moved on
  };
  sock.onclose = (e) => closed(sock, e.code);
  sock.onmessage = (ev) => {
    lastHeard = Date.now();
    onMessage(JSON.parse(ev.data));
  };
}

// The connection ended (`code`), or was given up as dead: come back after a
// random wait under a doubling bound, unless the page waits for a token.
function closed(sock, code) {
  if (sock !== ws) return; // an older connection
  sock.onclose = sock.onmessage = sock.onopen = null;
  if (sock.readyState !== WebSocket.CLOSED) sock.close();
  ws = null;
  state.reconnects++;
  if (state.signin) { setStatus("sign in needed", "down"); return; } // the form reconnects
  setStatus(`reconnecting (${code})`, "down");
  const policy = code === 1008 || code === 1009;
  if (policy) {
    attempt = Math.max(attempt, 5); // fix the client first: not four times a second
    notice(`the server closed the connection with ${code} (policy); retrying slowly`);
  }
  const bound = Math.min(250 * 2 ** Math.min(attempt, 8), policy ? 60000 : 10000);
  attempt++;
  reconnectTimer = setTimeout(connect, Math.random() * bound);
}

// Every PING_MS: a connection that brought nothing since the last ping (one
// interval ago) is given up, and the next one resumes; else a new ping.
// (Timed from the ping, not the clock: a hidden tab's timers may run once
// a minute, and a quiet feed is not a dead one.)
setInterval(() => {
  if (!ws || ws.readyState !== WebSocket.OPEN) return;
  if (pingSent && lastHeard < pingSent) { closed(ws, "silent"); return; }
  pingSent = Date.now();
  send({ op: "ping", id: "ping" });
}, PING_MS);

function onMessage(m) {
  switch (m.type) {
    case "tick": onTick(m); break;
    case "snapshot": onSnapshot(m); break;
    case "candle": onCandle(m); break;
    case "symbols":
      if (!state.signin) setStatus("live", "live");
      subscribeAll(m.symbols);
      break;
    case "subscribed":
      if (watch.ids.has(m.id)) onWatched(m);
      else if (chartSub && m.id === chartSub.id) chartSub.live = true;
      break;
    case "authed": {
      state.signin = false;
      $("signin").hidden = true;
      send({ op: "symbols", id: "list" });
      if (state.selected) loadChart();
      clearTimeout(expiryTimer);
      // a minute before the token lapses, ask for the next one (sent with
      // `auth` on this connection: nothing is cut)
      const ahead = m.exp ? m.exp * 1000 - Date.now() - 60000 : Infinity;
      if (ahead < 2 ** 31 - 1) expiryTimer = setTimeout(() => {
        $("signin").hidden = false;
        notice("the token expires in a minute: paste a new one to stay connected");
      }, Math.max(0, ahead));
      break;
    }
    case "error":
      if (m.code === "unauthorized" || m.code === "token_expired") {
        if (m.id === "auth" || !token() || m.code === "token_expired") {
          sessionStorage.removeItem(TOKEN_KEY);
          askForToken(m.code === "token_expired" ? "token expired: sign in again" : "sign in needed");
        }
        if (watch.batch && m.id === watch.batch.id) { watch.batch = null; watch.queue = []; }
      } else if (watch.ids.has(m.id) && m.symbol) onDeferred(m);
      else if (watch.batch && m.id === watch.batch.id) onWatchRefused(m);
      else if (watch.ids.has(m.id)) onDeferredRefused(m);
      else if (chartSub && m.id === chartSub.id && m.code === "too_many_subscriptions" && makeRoomForChart()) { /* retried */ }
      else if (m.code === "unavailable" && m.symbol) notice(`${m.symbol}: its shard is unavailable; resuming when it is back`);
      else notice(`${m.code}: ${m.message}`);
      break;
  }
}

setInterval(() => {
  for (const r of state.symbols.values()) {
    const t = String(r.count);
    if (t !== r.shown) { r.tr.cells[5].textContent = t; r.shown = t; }
    r.count = 0;
  }
}, 1000);
setInterval(() => { if (!state.signin) send({ op: "symbols", id: "list" }); }, 5000); // pick up new symbols
$("signin").addEventListener("submit", (e) => {
  e.preventDefault();
  const t = $("token").value.trim();
  if (!t) return;
  sessionStorage.setItem(TOKEN_KEY, t);
  $("token").value = "";
  if (ws && ws.readyState === WebSocket.OPEN) sendAuth();
  else { state.signin = false; attempt = 0; connect(); } // it sends the token once open
});
connect();
