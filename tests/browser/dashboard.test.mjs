// The dashboard against a real tickshard on loopback, in real Chromium
// (Debian's /usr/bin/chromium; playwright-core never downloads a browser).
//
//   TICKSHARD_BIN=target/debug/tickshard node tests/browser/dashboard.test.mjs
//
// Publishes known ticks (through `tickshard publish`, i.e. gRPC), then asserts
// what a trader sees: exact decimal strings in the watchlist, the right candles
// with the right OHLC, and after a kill -9 and restart of the server: the page
// reconnects, resumes (ticks published while it was away are replayed), and
// shows no gap and no duplicate. Then: a watchlist larger than the server's
// per-connection limit fills up to it without a reconnect loop and keeps the
// chart live; a server that stops answering (SIGSTOP) is left and the page
// resumes when it answers again; the token never appears in a URL; and no
// script or Content-Security-Policy error. Saves a screenshot.
import assert from "node:assert/strict";
import { spawn, execFileSync } from "node:child_process";
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const here = dirname(fileURLToPath(import.meta.url));
const root = resolve(here, "../..");
const BIN = resolve(root, process.env.TICKSHARD_BIN ?? "target/debug/tickshard");
const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
const ARTIFACTS = resolve(here, "artifacts");
const WAIT = 20_000;

const tmp = mkdtempSync(join(tmpdir(), "tickshard-browser-"));
const dataDir = join(tmp, "data");
let server = null;

function start(http = "127.0.0.1:0", grpc = "127.0.0.1:0", extra = [], dir = dataDir) {
  return new Promise((ok, fail) => {
    const p = spawn(BIN, ["--no-sim", "--data-dir", dir, "--http-addr", http, "--grpc-addr", grpc, "--peer-addr", "127.0.0.1:0", "--drain-ms", "200", ...extra], {
      stdio: ["ignore", "pipe", "pipe"],
    });
    let out = "", err = "";
    const timer = setTimeout(() => { p.kill("SIGKILL"); fail(new Error(`server did not start:\n${err}`)); }, WAIT);
    p.stderr.on("data", (d) => { err += d; });
    p.stdout.on("data", (d) => {
      out += d;
      const h = out.match(/http listening on (\S+)/), g = out.match(/grpc listening on (\S+)/);
      if (h && g) { clearTimeout(timer); ok({ proc: p, http: h[1], grpc: g[1] }); }
    });
    p.on("exit", (code) => { clearTimeout(timer); if (!/grpc listening/.test(out)) fail(new Error(`server exited ${code}:\n${err}`)); });
  });
}

function publish(ticks, publisherId, to = server, token = null) {
  const file = join(tmp, `${publisherId}.ndjson`);
  writeFileSync(file, ticks.map((t) => JSON.stringify(t)).join("\n") + "\n");
  const auth = token ? ["--token", token] : [];
  execFileSync(BIN, ["publish", file, "--grpc", `http://${to.grpc}`, "--publisher-id", publisherId, ...auth], { timeout: WAIT, stdio: "pipe" });
}

// Script errors and Content-Security-Policy violations on a page.
function watchErrors(page) {
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  page.on("console", (m) => { if (m.type() === "error" && /Content.Security.Policy/i.test(m.text())) errors.push(m.text()); });
  return errors;
}

// A server that needs a token for everything (contract §8): the page asks for
// one, and with a token minted by `tickshard token` shows the prices.
async function signIn(browser) {
  const secret = join(tmp, "secret");
  writeFileSync(secret, "s".repeat(48) + "\n");
  const mint = (sub, args) => execFileSync(BIN, ["token", "--secret-file", secret, "--sub", sub, ...args], { encoding: "utf8" }).trim();
  const locked = await start("127.0.0.1:0", "127.0.0.1:0", ["--auth-hs256-secret-file", secret], join(tmp, "data-auth"));
  try {
    publish([{ symbol: "AUTH-1", ts: us(s0, 1), price: "42.125", size: "1" }], "auth-1", locked, mint("feed", ["--publish", "AUTH-*"]));
    const page = await browser.newPage();
    const errors = watchErrors(page);
    const urls = [];
    page.on("request", (r) => urls.push(r.url()));
    page.on("websocket", (w) => urls.push(w.url()));
    await page.goto(`http://${locked.http}/`);
    await page.waitForSelector("#signin:not([hidden])", { timeout: WAIT });
    assert.equal((await page.evaluate(() => window.tickshard.view())).status, "sign in needed");
    const viewer = mint("viewer", ["--subscribe", "AUTH-*"]);
    await page.fill("#token", viewer);
    await page.click("#signin button");
    await page.waitForFunction(() => window.tickshard.view().rows["AUTH-1"]?.last === "42.125", null, { timeout: WAIT });
    assert.equal(await page.isHidden("#signin"), true, "the form goes away once signed in");
    assert.deepEqual(errors, [], "no script errors on the page");
    assert.ok(urls.length >= 3, `requests seen: ${urls}`);
    assert.deepEqual(urls.filter((u) => u.includes(viewer.slice(-16))), [], "the token is never in a URL");
    await page.close();
  } finally {
    locked.proc.kill("SIGKILL");
  }
}

// More symbols than the server lets one connection watch: the page fills its
// watchlist up to the limit (one slot left for the chart's candles), says so,
// and does not reconnect over it.
async function fullWatchlist(browser) {
  const capped = await start("127.0.0.1:0", "127.0.0.1:0", ["--max-subscriptions", "20"], join(tmp, "data-capped"));
  try {
    const ticks = [];
    for (let i = 0; i < 30; i++) ticks.push({ symbol: `W${String(i).padStart(2, "0")}`, ts: us(s0, i), price: `${i}.50`, size: "1" });
    publish(ticks, "capped-1", capped);
    const page = await browser.newPage();
    const errors = watchErrors(page);
    await page.goto(`http://${capped.http}/`);
    await page.waitForFunction(() => { const v = window.tickshard.view(); return v.watchFull && v.chartLive; }, null, { timeout: WAIT });
    const v = await page.evaluate(() => window.tickshard.view());
    const shown = Object.entries(v.rows).filter(([, r]) => r.subscribed);
    assert.equal(shown.length, 19, `19 symbols and the chart fill the 20 subscriptions: ${JSON.stringify(v.notices)}`);
    await page.waitForFunction(() => Object.values(window.tickshard.view().rows).filter((r) => r.subscribed && r.last !== null).length === 19, null, { timeout: WAIT });
    for (const [sym, r] of Object.entries((await page.evaluate(() => window.tickshard.view())).rows)) {
      if (r.subscribed) assert.equal(r.last, `${Number(sym.slice(1))}.50`, sym);
    }
    assert.equal(v.reconnects, 0, "no reconnect over a full watchlist");
    assert.ok(v.notices.some((n) => n.startsWith("watchlist full")), JSON.stringify(v.notices));
    assert.deepEqual(errors, [], "no script errors on the page");
    await page.close();
  } finally {
    capped.proc.kill("SIGKILL");
  }
}

// A server that stops answering (SIGSTOP: its sockets stay open) is given up
// after two missed pings (`#ping=500`); when it answers again the page
// resumes without a gap.
async function silentServer(browser) {
  const page = await browser.newPage();
  const errors = watchErrors(page);
  await page.goto(`http://${server.http}/#ping=500`);
  await page.waitForFunction(() => window.tickshard.view().rows["BTC-USD"]?.seq === 9, null, { timeout: WAIT });
  server.proc.kill("SIGSTOP");
  try {
    await page.waitForFunction(() => window.tickshard.view().status === "reconnecting (silent)", null, { timeout: WAIT });
  } finally {
    server.proc.kill("SIGCONT");
  }
  await page.waitForFunction(() => window.tickshard.view().status === "live", null, { timeout: WAIT });
  publish([btc(s0 + 4, 100, "67060.00", "0.100", "67059.90", "67060.10")], "browser-5");
  await page.waitForFunction(() => window.tickshard.view().rows["BTC-USD"]?.seq === 10, null, { timeout: WAIT });
  const v = await page.evaluate(() => window.tickshard.view());
  assert.equal(v.rows["BTC-USD"].last, "67060.00");
  assert.equal(v.gaps + v.dups + v.unrecovered, 0, JSON.stringify(v.notices));
  assert.deepEqual(errors, [], "no script errors on the page");
  await page.close();
}

const s0 = Math.floor(Date.now() / 1000) - 30; // a whole second, recent
const us = (sec, micro) => (sec * 1_000_000 + micro);
const btc = (sec, micro, price, size, bid, ask) => ({ symbol: "BTC-USD", ts: us(sec, micro), price, size, bid, ask });

async function main() {
  mkdirSync(ARTIFACTS, { recursive: true });
  server = await start();
  publish([
    btc(s0, 100, "67012.50", "0.010", "67012.40", "67012.60"),
    btc(s0, 200, "67020.00", "0.500", "67019.90", "67020.10"),
    btc(s0, 300, "67001.25", "1.250", "67001.20", "67001.30"),
    btc(s0 + 1, 400, "67030.75", "0.020", "67030.70", "67030.80"),
    btc(s0 + 1, 500, "67025.00", "0.100", "67024.90", "67025.10"),
    { symbol: "EUR/USD", ts: us(s0 + 1, 600), price: "1.08512", size: "250000.00", bid: "1.08510", ask: "1.08514" },
  ], "browser-1");

  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-quic", "--no-first-run", "--disable-sync"],
  });
  try {
    const page = await browser.newPage({ viewport: { width: 1400, height: 800 } });
    const errors = watchErrors(page);
    await page.goto(`http://${server.http}/`);
    const view = () => page.evaluate(() => window.tickshard.view());

    // the watchlist shows the exact decimal strings
    await page.waitForFunction(() => window.tickshard.view().rows["EUR/USD"]?.last === "1.08512", null, { timeout: WAIT });
    const cells = async (sym) => page.$eval(`tr[data-symbol="${sym}"]`, (tr) => [...tr.cells].map((c) => c.textContent));
    assert.deepEqual((await cells("BTC-USD")).slice(0, 4), ["BTC-USD", "67025.00", "67024.90", "67025.10"]);
    assert.deepEqual((await cells("EUR/USD")).slice(0, 4), ["EUR/USD", "1.08512", "1.08510", "1.08514"]);

    // the chart: 1s candles of BTC-USD, history then live
    await page.evaluate(() => { window.tickshard.select("BTC-USD"); window.tickshard.setInterval("1s"); });
    await page.waitForFunction(() => window.tickshard.view().candles.length >= 2, null, { timeout: WAIT });
    let v = await view();
    const ohlc = (c) => [c.start, c.open, c.high, c.low, c.close, c.volume, c.count];
    // volume has its own scale, in its own pane below the prices
    assert.deepEqual(v.chart, { panes: 2, candlePane: 0, volumePane: 1 });
    assert.deepEqual(v.candles.map(ohlc), [
      [us(s0, 0), "67012.50", "67020.00", "67001.25", "67001.25", "1.760", 3],
      [us(s0 + 1, 0), "67030.75", "67030.75", "67025.00", "67025.00", "0.120", 2],
    ]);
    // a live tick in the next second appends a candle
    publish([btc(s0 + 2, 700, "67040.00", "0.001", "67039.90", "67040.10")], "browser-2");
    await page.waitForFunction(() => window.tickshard.view().candles.length === 3, null, { timeout: WAIT });
    v = await view();
    assert.deepEqual(ohlc(v.candles[2]), [us(s0 + 2, 0), "67040.00", "67040.00", "67040.00", "67040.00", "0.001", 1]);
    assert.equal(v.rows["BTC-USD"].seq, 6);

    // kill -9; ticks published while the page cannot reach the server (it
    // runs on another HTTP port meanwhile); kill -9 again and restart on the
    // same data dir and ports: the page resumes and is sent what it missed
    const { http, grpc } = server;
    server.proc.kill("SIGKILL");
    await page.waitForFunction(() => window.tickshard.view().status.startsWith("reconnecting"), null, { timeout: WAIT });
    server = await start("127.0.0.1:0", grpc);
    publish([
      btc(s0 + 3, 800, "67050.00", "0.300", "67049.90", "67050.10"),
      btc(s0 + 3, 900, "67055.50", "0.300", "67055.40", "67055.60"),
    ], "browser-3");
    server.proc.kill("SIGKILL");
    await new Promise((ok) => server.proc.once("exit", ok));
    server = await start(http, grpc);
    await page.waitForFunction(() => window.tickshard.view().rows["BTC-USD"]?.seq === 8, null, { timeout: WAIT });
    v = await view();
    assert.equal(v.status, "live");
    assert.equal(v.rows["BTC-USD"].last, "67055.50");
    assert.equal(v.gaps, 0, `no gap: ${JSON.stringify(v.notices)}`);
    assert.equal(v.dups, 0, "no duplicate");
    assert.equal(v.unrecovered, 0, "the resume recovered");
    assert.ok(v.reconnects >= 1);
    assert.equal(v.rows["BTC-USD"].ticks, 3, "every tick after the first snapshot (seq 6, 7, 8) shown exactly once");
    await page.waitForFunction(() => window.tickshard.view().candles.length === 4, null, { timeout: WAIT });
    // and live again
    publish([btc(s0 + 3, 950, "67056.00", "0.100", "67055.90", "67056.10")], "browser-4");
    await page.waitForFunction(() => window.tickshard.view().rows["BTC-USD"]?.ticks === 4, null, { timeout: WAIT });

    await page.screenshot({ path: join(ARTIFACTS, "dashboard.png") });
    assert.deepEqual(errors, [], "no script errors on the page");
    await signIn(browser);
    await fullWatchlist(browser);
    await silentServer(browser);
    console.log("dashboard browser test: ok (screenshot: tests/browser/artifacts/dashboard.png)");
  } finally {
    await browser.close();
  }
}

try {
  await main();
} catch (e) {
  console.error(e);
  process.exitCode = 1;
} finally {
  server?.proc.kill("SIGKILL");
  rmSync(tmp, { recursive: true, force: true });
}
