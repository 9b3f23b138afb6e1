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
"use strict";

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
    for (const [sym, r] of state.symbols) rows[sym] = { seq: r.seq, epoch: r.epoch, last: r.last, bid: r.bid, ask: r.ask, ticks: r.total };
    return {
      status: state.status, selected: state.selected, interval: state.interval, rows,
      candles: state.candles.map((c) => ({ ...c })), notices: state.notices.slice(-20),
      gaps: state.gaps, dups: state.dups, reconnects: state.reconnects, unrecovered: state.unrecovered,
      chart: { panes: chart.panes().length, candlePane: candleSeries.getPane().paneIndex(), volumePane: volumeSeries.getPane().paneIndex() },
    };
  },
  select: (sym) => select(sym),
  setInterval: (iv) => setCandleInterval(iv),
};

const $ = (id) => document.getElementById(id);
const rowsEl = $("rows");
let ws = null;
let backoff = 250;

function notice(text) {
  state.notices.push(text);
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
  const after = [...rowsEl.children].find((x) => x.dataset.symbol > sym);
  rowsEl.insertBefore(tr, after || null);
  r = { seq: 0, epoch: "", first: null, last: null, bid: null, ask: null, count: 0, total: 0, tr, timer: 0 };
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

function onTick(m) {
  const r = row(m.symbol);
  if (m.seq <= r.seq) { state.dups++; return; } // never show a duplicate
  if (r.seq && m.seq !== r.seq + 1) {
    state.gaps++;
    notice(`${m.symbol}: gap ${r.seq} → ${m.seq}`);
  }
  r.seq = m.seq; r.count++; r.total++;
  render(r, m);
}

function onSnapshot(m) {
  const r = row(m.symbol);
  r.seq = m.seq; r.epoch = m.epoch;
  render(r, m);
  if (m.conflated) notice(`${m.symbol}: fell behind; showing a fresh snapshot`);
}

function subscribeAll(symbols) {
  const fresh = symbols.filter((s) => !state.symbols.has(s) || !state.symbols.get(s).subscribed);
  if (!fresh.length) return;
  const resume = {};
  for (const s of fresh) {
    const r = state.symbols.get(s);
    if (r && r.epoch) resume[s] = { seq: r.seq, epoch: r.epoch };
  }
  for (const s of fresh) row(s).subscribed = true;
  send({ op: "subscribe", id: "watch", symbols: fresh, channels: ["ticks"], resume });
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
    candleSeries.update(bar(c)); volumeSeries.update(vol(c));
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
    state.candles = body.candles || [];
    drawAll();
    chart.timeScale().fitContent();
    showCandleInfo(state.candles[state.candles.length - 1]);
  } catch (e) {
    notice(`candle history for ${sym}: ${e}`);
  }
  // live candles (the first message is the current candle)
  send({ op: "subscribe", id: "chart", symbols: [sym], channels: [`candles:${iv}`] });
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
function connect() {
  const url = new URL("/ws", location.href);
  url.protocol = url.protocol.replace("http", "ws");
  ws = new WebSocket(url);
  ws.onopen = () => {
    setStatus("live", "live");
    backoff = 250;
    for (const r of state.symbols.values()) r.subscribed = false;
    sendAuth();
    send({ op: "symbols", id: "list" });
    if (state.selected) loadChart(); // reload history: candles may have moved on
  };
  ws.onclose = (e) => {
    setStatus(`reconnecting (${e.code})`, "down");
    state.reconnects++;
    setTimeout(connect, backoff);
    backoff = Math.min(backoff * 2, 5000);
  };
  ws.onmessage = (ev) => {
    const m = JSON.parse(ev.data);
    switch (m.type) {
      case "tick": onTick(m); break;
      case "snapshot": onSnapshot(m); break;
      case "candle": onCandle(m); break;
      case "symbols": subscribeAll(m.symbols); break;
      case "subscribed":
        for (const e of m.symbols) {
          if (m.id !== "watch") continue;
          const r = row(e.symbol);
          if (r.epoch && !e.recovered) {
            state.unrecovered++;
            notice(`${e.symbol}: could not resume (history no longer retained); reloaded from a snapshot`);
          }
          r.epoch = e.epoch;
        }
        break;
      case "authed":
        state.signin = false;
        $("signin").hidden = true;
        setStatus("live", "live");
        send({ op: "symbols", id: "list" });
        if (state.selected) loadChart();
        break;
      case "error":
        if (m.code === "unauthorized" || m.code === "token_expired") {
          if (m.id === "auth" || !token() || m.code === "token_expired") {
            sessionStorage.removeItem(TOKEN_KEY);
            askForToken(m.code === "token_expired" ? "token expired: sign in again" : "sign in needed");
          }
        } else if (m.code === "unavailable" && m.symbol) notice(`${m.symbol}: its shard is unavailable; resuming when it is back`);
        else notice(`${m.code}: ${m.message}`);
        break;
    }
  };
}

setInterval(() => {
  for (const r of state.symbols.values()) { r.tr.cells[5].textContent = r.count; r.count = 0; }
}, 1000);
setInterval(() => { if (!state.signin) send({ op: "symbols", id: "list" }); }, 5000); // pick up new symbols
$("signin").addEventListener("submit", (e) => {
  e.preventDefault();
  const t = $("token").value.trim();
  if (!t) return;
  sessionStorage.setItem(TOKEN_KEY, t);
  $("token").value = "";
  sendAuth();
});
connect();
