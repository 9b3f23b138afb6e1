//! Server → client JSON of WebSocket protocol v1 (contract §4), written by hand
//! into a reused buffer: field order fixed, decimals as strings exactly as
//! stored, optional fields omitted when absent, no allocation per message.

use std::io::Write as _;

use tickshard_shard::{
    domain::{Candle, Decimal, Epoch, Symbol, Tick},
    hub::Frames,
    node::SubResult,
};

/// Appends `s` as a JSON string literal, escaping as RFC 8259 requires.
pub fn string(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        if esc.is_empty() {
            let _ = write!(out, "\\u{b:04x}");
        } else {
            out.extend_from_slice(esc);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// A symbol needs no escaping (its alphabet is `A-Z 0-9 . - _ / :`).
fn symbol(out: &mut Vec<u8>, s: &Symbol) {
    out.push(b'"');
    out.extend_from_slice(s.as_bytes());
    out.push(b'"');
}

fn epoch(out: &mut Vec<u8>, e: &Epoch) {
    let mut hex = [0u8; 12];
    e.write_hex(&mut hex);
    out.push(b'"');
    out.extend_from_slice(&hex);
    out.push(b'"');
}

fn decimal(out: &mut Vec<u8>, d: &Decimal) {
    out.push(b'"');
    let _ = write!(out, "{d}");
    out.push(b'"');
}

fn int(out: &mut Vec<u8>, n: impl std::fmt::Display) {
    let _ = write!(out, "{n}");
}

fn tick_fields(out: &mut Vec<u8>, t: &Tick) {
    out.extend_from_slice(b",\"ts\":");
    int(out, t.ts);
    out.extend_from_slice(b",\"price\":");
    decimal(out, &t.price);
    out.extend_from_slice(b",\"size\":");
    decimal(out, &t.size);
    for (name, v) in [
        (&b",\"bid\":"[..], &t.bid),
        (b",\"ask\":", &t.ask),
        (b",\"bid_size\":", &t.bid_size),
        (b",\"ask_size\":", &t.ask_size),
    ] {
        if let Some(v) = v {
            out.extend_from_slice(name);
            decimal(out, v);
        }
    }
}

/// `{"type":"tick",...}`
pub fn tick(out: &mut Vec<u8>, t: &Tick) {
    out.extend_from_slice(b"{\"type\":\"tick\",\"symbol\":");
    symbol(out, &t.symbol);
    out.extend_from_slice(b",\"seq\":");
    int(out, t.seq);
    tick_fields(out, t);
    out.push(b'}');
}

/// Encodes every tick of a chunk once; the result is shared by all subscribers.
pub fn encode_ticks(ticks: &[Tick], frames: &mut Frames) {
    frames.reserve(ticks.len(), ticks.len() * 150);
    for t in ticks {
        tick(&mut frames.bytes, t);
        frames.end_frame();
    }
}

/// `{"type":"snapshot",...}` (with `"conflated":true` when the client fell behind)
pub fn snapshot(out: &mut Vec<u8>, e: &Epoch, t: &Tick, conflated: bool) {
    out.extend_from_slice(b"{\"type\":\"snapshot\",\"symbol\":");
    symbol(out, &t.symbol);
    out.extend_from_slice(b",\"epoch\":");
    epoch(out, e);
    out.extend_from_slice(b",\"seq\":");
    int(out, t.seq);
    tick_fields(out, t);
    if conflated {
        out.extend_from_slice(b",\"conflated\":true");
    }
    out.push(b'}');
}

/// `{"type":"candle",...}`
pub fn candle(out: &mut Vec<u8>, c: &Candle, closed: bool) {
    out.extend_from_slice(b"{\"type\":\"candle\",\"symbol\":");
    symbol(out, &c.symbol);
    out.extend_from_slice(b",\"interval\":\"");
    out.extend_from_slice(c.interval.as_str().as_bytes());
    out.extend_from_slice(b"\",\"start\":");
    int(out, c.start);
    for (name, v) in [
        (&b",\"open\":"[..], &c.open),
        (b",\"high\":", &c.high),
        (b",\"low\":", &c.low),
        (b",\"close\":", &c.close),
        (b",\"volume\":", &c.volume),
    ] {
        out.extend_from_slice(name);
        decimal(out, v);
    }
    out.extend_from_slice(b",\"count\":");
    int(out, c.count);
    out.extend_from_slice(if closed {
        b",\"closed\":true}"
    } else {
        b",\"closed\":false}"
    });
}

/// The `"id":…,` part of a reply, if the request carried one (raw JSON echoed).
fn id(out: &mut Vec<u8>, id: Option<&[u8]>) {
    if let Some(id) = id {
        out.extend_from_slice(b",\"id\":");
        out.extend_from_slice(id);
    }
}

/// `{"type":"subscribed","id":…,"symbols":[{"symbol","epoch","seq","recovered"}…]}`
pub fn subscribed(out: &mut Vec<u8>, req_id: Option<&[u8]>, results: &[SubResult]) {
    out.extend_from_slice(b"{\"type\":\"subscribed\"");
    id(out, req_id);
    out.extend_from_slice(b",\"symbols\":[");
    for (i, r) in results.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"symbol\":");
        symbol(out, &r.symbol);
        out.extend_from_slice(b",\"epoch\":");
        epoch(out, &r.epoch);
        out.extend_from_slice(b",\"seq\":");
        int(out, r.seq);
        out.extend_from_slice(if r.recovered {
            b",\"recovered\":true}"
        } else {
            b",\"recovered\":false}"
        });
    }
    out.extend_from_slice(b"]}");
}

/// `{"type":"unsubscribed",…}` or `{"type":"symbols",…}`: a reply with a symbol list.
pub fn symbol_list(out: &mut Vec<u8>, kind: &str, req_id: Option<&[u8]>, symbols: &[Symbol]) {
    out.extend_from_slice(b"{\"type\":\"");
    out.extend_from_slice(kind.as_bytes());
    out.push(b'"');
    id(out, req_id);
    out.extend_from_slice(b",\"symbols\":[");
    for (i, s) in symbols.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        symbol(out, s);
    }
    out.extend_from_slice(b"]}");
}

/// `{"type":"pong","id":…}`
/// `{"type":"authed","id":…,"sub":…,"exp":…}` (contract §8).
pub fn authed(out: &mut Vec<u8>, req_id: Option<&[u8]>, sub: &str, exp: u64) {
    out.extend_from_slice(b"{\"type\":\"authed\"");
    id(out, req_id);
    out.extend_from_slice(b",\"sub\":");
    string(out, sub);
    out.extend_from_slice(b",\"exp\":");
    int(out, exp);
    out.push(b'}');
}

pub fn pong(out: &mut Vec<u8>, req_id: Option<&[u8]>) {
    out.extend_from_slice(b"{\"type\":\"pong\"");
    id(out, req_id);
    out.push(b'}');
}

/// `{"type":"error","id":…,"code":…,"message":…}`
pub fn error(out: &mut Vec<u8>, req_id: Option<&[u8]>, code: &str, message: &str) {
    out.extend_from_slice(b"{\"type\":\"error\"");
    id(out, req_id);
    out.extend_from_slice(b",\"code\":");
    string(out, code);
    out.extend_from_slice(b",\"message\":");
    string(out, message);
    out.push(b'}');
}

/// `{"type":"error","code":"unavailable","symbol":…,"message":…}`: the
/// symbol's owner is unreachable; a normal resume follows when it is back.
/// `req_id`: the subscribe it answers, if any (contract §4: a reply echoes it).
pub fn unavailable(out: &mut Vec<u8>, req_id: Option<&[u8]>, sym: &Symbol, message: &str) {
    out.extend_from_slice(b"{\"type\":\"error\"");
    id(out, req_id);
    out.extend_from_slice(b",\"code\":\"unavailable\",\"symbol\":");
    symbol(out, sym);
    out.extend_from_slice(b",\"message\":");
    string(out, message);
    out.push(b'}');
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use tickshard_shard::domain::TickFields;

    use super::*;

    #[test]
    fn tick_frame_matches_the_contract() {
        let t = TickFields {
            symbol: "BTC-USD",
            ts: 1_732_530_000_123_999,
            price: "67012.50",
            size: "0.01",
            bid: "67012.40",
            ask: "67012.60",
            ..TickFields::default()
        }
        .validate()
        .unwrap();
        let mut out = Vec::new();
        tick(&mut out, &Tick { seq: 1043, ..t });
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"type":"tick","symbol":"BTC-USD","seq":1043,"ts":1732530000123999,"price":"67012.50","size":"0.01","bid":"67012.40","ask":"67012.60"}"#
        );
    }

    proptest! {
        #[test]
        fn strings_are_escaped_so_any_parser_reads_them_back(s in "\\PC*|[\\x00-\\x1f\"\\\\]{0,8}") {
            let mut out = Vec::new();
            error(&mut out, Some(b"7"), "bad_json", &s);
            let v = simd_json::to_owned_value(&mut out.clone()).unwrap();
            use simd_json::prelude::*;
            prop_assert_eq!(v.get("message").and_then(|m| m.as_str()), Some(s.as_str()));
            prop_assert_eq!(v.get("id").and_then(|m| m.as_u64()), Some(7));
        }
    }
}
