//! The dashboard served at `/`: static assets embedded in the binary (the
//! container needs nothing else), and the candle-history JSON endpoint it
//! loads charts from. The chart library is vendored from npm
//! (`feed/dashboard/`, `npm run vendor`); the Rust build never runs Node.

use tickshard_shard::domain::History;

use crate::ws::json;

/// `(path, content type, bytes)` of every embedded asset.
const ASSETS: &[(&str, &str, &str)] = &[
    ("/", "text/html; charset=utf-8", include_str!("dashboard/index.html")),
    (
        "/index.html",
        "text/html; charset=utf-8",
        include_str!("dashboard/index.html"),
    ),
    (
        "/app.js",
        "text/javascript; charset=utf-8",
        include_str!("dashboard/app.js"),
    ),
    (
        "/style.css",
        "text/css; charset=utf-8",
        include_str!("dashboard/style.css"),
    ),
    (
        "/vendor/lightweight-charts.js",
        "text/javascript; charset=utf-8",
        include_str!("dashboard/vendor/lightweight-charts.js"),
    ),
];

/// The embedded asset at `path`, with its content type.
pub fn asset(path: &str) -> Option<(&'static str, &'static str)> {
    ASSETS
        .iter()
        .find(|(p, _, _)| *p == path)
        .map(|(_, ct, body)| (*ct, *body))
}

/// The JSON body of `GET /api/candles`: `{"symbol","interval","epoch",
/// "truncated","candles":[{"start","open","high","low","close","volume",
/// "count","closed"}…]}`, oldest first, decimals as strings.
pub fn candles_json(symbol: &str, interval: &str, h: &History) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + h.candles.len() * 160);
    out.extend_from_slice(b"{\"symbol\":");
    json::string(&mut out, symbol);
    out.extend_from_slice(b",\"interval\":");
    json::string(&mut out, interval);
    out.extend_from_slice(b",\"epoch\":");
    json::string(&mut out, &h.epoch.map(|e| e.to_string()).unwrap_or_default());
    out.extend_from_slice(if h.truncated {
        b",\"truncated\":true"
    } else {
        b",\"truncated\":false"
    });
    out.extend_from_slice(b",\"candles\":[");
    for (i, (c, closed)) in h.candles.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(format!("{{\"start\":{}", c.start).as_bytes());
        for (k, v) in [
            ("open", c.open),
            ("high", c.high),
            ("low", c.low),
            ("close", c.close),
            ("volume", c.volume),
        ] {
            out.extend_from_slice(format!(",\"{k}\":").as_bytes());
            json::string(&mut out, &v.to_string());
        }
        out.extend_from_slice(format!(",\"count\":{},\"closed\":{closed}}}", c.count).as_bytes());
    }
    out.extend_from_slice(b"]}");
    out
}
