//! Client → server messages of WebSocket protocol v1 (contract §4), parsed in
//! place with simd-json (the frame buffer is mutated, nothing is copied).

use simd_json::{BorrowedValue, Buffers, StaticNode, prelude::*};
use tickshard_shard::{
    domain::{Epoch, ErrorCode, Position, Symbol},
    hub::Channel,
};

use super::json;

/// A parsed, validated client request.
#[derive(Debug, PartialEq)]
pub struct Request {
    /// The request's `id`, as raw JSON, echoed in the reply.
    pub id: Option<Vec<u8>>,
    pub op: Op,
}

#[derive(Debug, PartialEq)]
pub enum Op {
    Subscribe {
        symbols: Vec<Symbol>,
        channels: Vec<Channel>,
        resume: Vec<(Symbol, Position)>,
    },
    Unsubscribe {
        symbols: Vec<Symbol>,
        channels: Vec<Channel>,
    },
    Ping,
    Symbols,
}

/// A request the server answers with an `error` message.
#[derive(Debug, PartialEq)]
pub struct ProtoError {
    pub id: Option<Vec<u8>>,
    pub code: ErrorCode,
    pub message: String,
}

fn bad(id: &Option<Vec<u8>>, code: ErrorCode, message: impl Into<String>) -> ProtoError {
    ProtoError {
        id: id.clone(),
        code,
        message: message.into(),
    }
}

/// Parses one text message. `buf` is used as simd-json's scratch space.
pub fn parse(buf: &mut [u8], buffers: &mut Buffers) -> Result<Request, ProtoError> {
    let v = simd_json::to_borrowed_value_with_buffers(buf, buffers)
        .map_err(|e| bad(&None, ErrorCode::BadJson, format!("invalid JSON: {e}")))?;
    let Some(obj) = v.as_object() else {
        return Err(bad(&None, ErrorCode::BadJson, "expected a JSON object"));
    };
    let id = match obj.get("id") {
        None => None,
        Some(raw) => {
            Some(id_json(raw).ok_or_else(|| bad(&None, ErrorCode::BadJson, "\"id\" must be a number or a string"))?)
        }
    };
    let Some(op) = obj.get("op").and_then(|o| o.as_str()) else {
        return Err(bad(&id, ErrorCode::BadJson, "missing \"op\" (a string)"));
    };
    let op = match op {
        "ping" => Op::Ping,
        "symbols" => Op::Symbols,
        "subscribe" => {
            let symbols = symbols(&v, &id)?;
            let channels = channels(&v, &id)?;
            let resume = resume(&v, &id)?;
            Op::Subscribe {
                symbols,
                channels,
                resume,
            }
        }
        "unsubscribe" => Op::Unsubscribe {
            symbols: symbols(&v, &id)?,
            channels: channels(&v, &id)?,
        },
        other => {
            let mut shown = other.chars().take(40).collect::<String>();
            if other.len() > shown.len() {
                shown.push('…');
            }
            return Err(bad(
                &id,
                ErrorCode::UnknownOp,
                format!("unknown op '{shown}'; expected subscribe, unsubscribe, ping or symbols"),
            ));
        }
    };
    Ok(Request { id, op })
}

/// The raw JSON of an `id`: numbers, strings, booleans and null are echoed.
fn id_json(v: &BorrowedValue<'_>) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    match v {
        BorrowedValue::String(s) => json::string(&mut out, s),
        BorrowedValue::Static(StaticNode::I64(n)) => out.extend_from_slice(n.to_string().as_bytes()),
        BorrowedValue::Static(StaticNode::U64(n)) => out.extend_from_slice(n.to_string().as_bytes()),
        BorrowedValue::Static(StaticNode::F64(n)) if n.is_finite() => out.extend_from_slice(n.to_string().as_bytes()),
        BorrowedValue::Static(StaticNode::Bool(b)) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        BorrowedValue::Static(StaticNode::Null) => out.extend_from_slice(b"null"),
        _ => return None,
    }
    Some(out)
}

fn symbols(v: &BorrowedValue<'_>, id: &Option<Vec<u8>>) -> Result<Vec<Symbol>, ProtoError> {
    let Some(list) = v.get("symbols").and_then(|s| s.as_array()) else {
        return Err(bad(id, ErrorCode::BadJson, "\"symbols\" must be an array of strings"));
    };
    if list.is_empty() {
        return Err(bad(id, ErrorCode::BadJson, "\"symbols\" is empty"));
    }
    let mut out = Vec::with_capacity(list.len());
    for s in list {
        let Some(s) = s.as_str() else {
            return Err(bad(id, ErrorCode::BadJson, "\"symbols\" must be an array of strings"));
        };
        let sym = Symbol::parse(s).map_err(|e| bad(id, ErrorCode::InvalidSymbol, e.to_string()))?;
        if !out.contains(&sym) {
            out.push(sym);
        }
    }
    Ok(out)
}

fn channels(v: &BorrowedValue<'_>, id: &Option<Vec<u8>>) -> Result<Vec<Channel>, ProtoError> {
    let Some(raw) = v.get("channels") else {
        return Ok(vec![Channel::Ticks]);
    };
    let Some(list) = raw.as_array() else {
        return Err(bad(id, ErrorCode::BadJson, "\"channels\" must be an array of strings"));
    };
    let mut out = Vec::with_capacity(list.len());
    for c in list {
        let name = c.as_str().unwrap_or_default();
        let Some(ch) = Channel::parse(name) else {
            return Err(bad(
                id,
                ErrorCode::BadJson,
                format!(
                    "unknown channel {}; expected ticks, candles:1s, candles:1m or candles:1h",
                    String::from_utf8_lossy(&{
                        let mut q = Vec::new();
                        json::string(&mut q, &name.chars().take(40).collect::<String>());
                        q
                    })
                ),
            ));
        };
        if !out.contains(&ch) {
            out.push(ch);
        }
    }
    if out.is_empty() {
        out.push(Channel::Ticks);
    }
    Ok(out)
}

fn resume(v: &BorrowedValue<'_>, id: &Option<Vec<u8>>) -> Result<Vec<(Symbol, Position)>, ProtoError> {
    let Some(raw) = v.get("resume") else {
        return Ok(Vec::new());
    };
    if raw.is_null() {
        return Ok(Vec::new());
    }
    let Some(obj) = raw.as_object() else {
        return Err(bad(
            id,
            ErrorCode::BadJson,
            "\"resume\" must be an object {symbol: {seq, epoch}}",
        ));
    };
    let mut out = Vec::with_capacity(obj.len());
    for (k, pos) in obj.iter() {
        let sym = Symbol::parse(k).map_err(|e| bad(id, ErrorCode::InvalidSymbol, e.to_string()))?;
        let seq = pos.get("seq").and_then(|s| s.as_u64());
        let epoch = pos.get("epoch").and_then(|e| e.as_str());
        let (Some(seq), Some(epoch)) = (seq, epoch) else {
            return Err(bad(
                id,
                ErrorCode::BadJson,
                format!("resume of {sym} must be {{\"seq\": <integer>, \"epoch\": <string>}}"),
            ));
        };
        // An epoch that does not parse matches no history: the client then gets
        // a snapshot with recovered=false, as for any other unknown epoch.
        let epoch = Epoch::parse(epoch).unwrap_or_default();
        out.push((sym, Position { seq, epoch }));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<Request, ProtoError> {
        let mut b = s.as_bytes().to_vec();
        parse(&mut b, &mut Buffers::default())
    }

    #[test]
    fn parses_the_contract_examples() {
        let r = p(r#"{"op":"subscribe","id":1,"symbols":["BTC-USD","eth-usd"],"channels":["ticks","candles:1m"],"resume":{"BTC-USD":{"seq":1042,"epoch":"9f2c41d07a3e"}}}"#).unwrap();
        assert_eq!(r.id.as_deref(), Some(&b"1"[..]));
        let Op::Subscribe {
            symbols,
            channels,
            resume,
        } = r.op
        else {
            panic!()
        };
        assert_eq!(
            symbols.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
            ["BTC-USD", "ETH-USD"]
        );
        assert_eq!(
            channels,
            vec![Channel::Ticks, Channel::Candles(tickshard_shard::domain::Interval::M1)]
        );
        assert_eq!(resume[0].1.seq, 1042);
        assert_eq!(resume[0].1.epoch.to_string(), "9f2c41d07a3e");
        assert_eq!(
            p(r#"{"op":"ping","id":"abc"}"#).unwrap().id.as_deref(),
            Some(&b"\"abc\""[..])
        );
        assert_eq!(p(r#"{"op":"symbols"}"#).unwrap().op, Op::Symbols);
        let r = p(r#"{"op":"unsubscribe","id":2,"symbols":["BTC-USD"]}"#).unwrap();
        assert!(matches!(r.op, Op::Unsubscribe { ref channels, .. } if channels == &[Channel::Ticks]));
    }

    #[test]
    fn bad_input_gets_the_right_code() {
        let code = |s: &str| p(s).unwrap_err().code;
        assert_eq!(code("{nope"), ErrorCode::BadJson);
        assert_eq!(code("[1,2]"), ErrorCode::BadJson);
        assert_eq!(code(r#"{"id":1}"#), ErrorCode::BadJson);
        assert_eq!(code(r#"{"op":"dance"}"#), ErrorCode::UnknownOp);
        assert_eq!(
            code(r#"{"op":"subscribe","symbols":["b@d"]}"#),
            ErrorCode::InvalidSymbol
        );
        assert_eq!(code(r#"{"op":"subscribe","symbols":[]}"#), ErrorCode::BadJson);
        assert_eq!(
            code(r#"{"op":"subscribe","symbols":["A"],"channels":["candles:5m"]}"#),
            ErrorCode::BadJson
        );
        assert_eq!(
            code(r#"{"op":"subscribe","symbols":["A"],"resume":{"A":{"seq":-1,"epoch":"x"}}}"#),
            ErrorCode::BadJson
        );
        // the id is echoed even in errors found after it was read
        let e = p(r#"{"op":"dance","id":9}"#).unwrap_err();
        assert_eq!(e.id.as_deref(), Some(&b"9"[..]));
    }
}
