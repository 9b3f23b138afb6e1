//! Client → server messages of WebSocket protocol v1 (contract §4), parsed in
//! place with simd-json (the frame buffer is mutated, nothing is copied).

use std::collections::HashMap;

use simd_json::{BorrowedValue, Buffers, StaticNode, prelude::*};
use tickshard_shard::{
    domain::{Epoch, ErrorCode, Position, Symbol, SymbolListError, SymbolSet},
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
        resume: HashMap<Symbol, Position>,
    },
    Unsubscribe {
        symbols: Vec<Symbol>,
        channels: Vec<Channel>,
    },
    Ping,
    Symbols,
    /// Authenticate, or refresh the token (contract §8).
    Auth {
        token: String,
    },
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
/// `max_symbols` bounds every list of symbols in it (contract §4: a request
/// naming more is refused whole, repeats count once). Costs time linear in
/// the message's length.
pub fn parse(buf: &mut [u8], buffers: &mut Buffers, max_symbols: usize) -> Result<Request, ProtoError> {
    let v = simd_json::to_borrowed_value_with_buffers(buf, buffers)
        .map_err(|e| bad(&None, ErrorCode::BadJson, format!("invalid JSON: {e}")))?;
    let Some(obj) = v.as_object() else {
        return Err(bad(&None, ErrorCode::BadJson, "expected a JSON object"));
    };
    let id = id_of(&v)?;
    let Some(op) = obj.get("op").and_then(|o| o.as_str()) else {
        return Err(bad(&id, ErrorCode::BadJson, "missing \"op\" (a string)"));
    };
    let op = match op {
        "ping" => Op::Ping,
        "auth" => match obj.get("token").and_then(|t| t.as_str()) {
            Some(t) if t.len() <= crate::auth::MAX_TOKEN_BYTES => Op::Auth { token: t.to_owned() },
            Some(_) => {
                return Err(bad(
                    &id,
                    ErrorCode::Unauthorized,
                    format!("the token is longer than {} bytes", crate::auth::MAX_TOKEN_BYTES),
                ));
            }
            None => return Err(bad(&id, ErrorCode::BadJson, "auth needs \"token\" (a string)")),
        },
        "symbols" => Op::Symbols,
        "subscribe" => {
            let symbols = symbols(&v, &id, max_symbols)?;
            let channels = channels(&v, &id)?;
            let resume = resume(&v, &id, max_symbols)?;
            Op::Subscribe {
                symbols,
                channels,
                resume,
            }
        }
        "unsubscribe" => Op::Unsubscribe {
            symbols: symbols(&v, &id, max_symbols)?,
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
                format!("unknown op '{shown}'; expected subscribe, unsubscribe, ping, symbols or auth"),
            ));
        }
    };
    Ok(Request { id, op })
}

/// Whether a client close frame's payload is valid (RFC 6455 §5.5.1,
/// §7.4): empty, or a code one may send (1000–1003, 1007–1013, 3000–4999)
/// and a UTF-8 reason. Linear in its length (at most 125 bytes: longer
/// control frames are refused before).
pub fn close_payload_is_valid(p: &[u8]) -> bool {
    match p {
        [] => true,
        [hi, lo, reason @ ..] => {
            fastwebsockets::CloseCode::from(u16::from_be_bytes([*hi, *lo])).is_allowed()
                && std::str::from_utf8(reason).is_ok()
        }
        [_] => false,
    }
}

/// Only the `id` of a message, for the reply to a message that is not
/// processed (`rate_limited`): a client that correlates replies gets one.
pub fn id_only(buf: &mut [u8], buffers: &mut Buffers) -> Option<Vec<u8>> {
    let v = simd_json::to_borrowed_value_with_buffers(buf, buffers).ok()?;
    id_of(&v).ok().flatten()
}

/// The longest `id` (as JSON) a message may carry: it is echoed in every
/// reply to the message, up to one per symbol, so it is bounded like any
/// other input.
pub const MAX_ID_BYTES: usize = 256;

fn id_of(v: &BorrowedValue<'_>) -> Result<Option<Vec<u8>>, ProtoError> {
    match v.get("id") {
        None => Ok(None),
        Some(raw) => match id_json(raw) {
            Some(id) if id.len() <= MAX_ID_BYTES => Ok(Some(id)),
            Some(_) => Err(bad(
                &None,
                ErrorCode::BadJson,
                format!("\"id\" is over {MAX_ID_BYTES} bytes"),
            )),
            None => Err(bad(&None, ErrorCode::BadJson, "\"id\" must be a number or a string")),
        },
    }
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

fn symbols(v: &BorrowedValue<'_>, id: &Option<Vec<u8>>, max: usize) -> Result<Vec<Symbol>, ProtoError> {
    let Some(list) = v.get("symbols").and_then(|s| s.as_array()) else {
        return Err(bad(id, ErrorCode::BadJson, "\"symbols\" must be an array of strings"));
    };
    if list.is_empty() {
        return Err(bad(id, ErrorCode::BadJson, "\"symbols\" is empty"));
    }
    let mut set = SymbolSet::new(max);
    for s in list {
        let Some(s) = s.as_str() else {
            return Err(bad(id, ErrorCode::BadJson, "\"symbols\" must be an array of strings"));
        };
        set.add(s).map_err(|e| list_error(id, e))?;
    }
    Ok(set.into_vec())
}

fn list_error(id: &Option<Vec<u8>>, e: SymbolListError) -> ProtoError {
    match e {
        SymbolListError::Invalid(e) => bad(id, ErrorCode::InvalidSymbol, e.to_string()),
        SymbolListError::TooMany { max } => bad(
            id,
            ErrorCode::TooManySubscriptions,
            format!("the request names more than {max} symbols (the subscription limit per connection)"),
        ),
    }
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

fn resume(v: &BorrowedValue<'_>, id: &Option<Vec<u8>>, max: usize) -> Result<HashMap<Symbol, Position>, ProtoError> {
    let Some(raw) = v.get("resume") else {
        return Ok(HashMap::new());
    };
    if raw.is_null() {
        return Ok(HashMap::new());
    }
    let Some(obj) = raw.as_object() else {
        return Err(bad(
            id,
            ErrorCode::BadJson,
            "\"resume\" must be an object {symbol: {seq, epoch}}",
        ));
    };
    // Counted as read, each symbol once (keys that differ only in case name
    // one symbol, contract §1): past `max` distinct ones, refused whole.
    let mut out = HashMap::with_capacity(obj.len().min(max.saturating_add(1)));
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
        out.insert(sym, Position { seq, epoch });
        if out.len() > max {
            return Err(list_error(id, SymbolListError::TooMany { max }));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<Request, ProtoError> {
        let mut b = s.as_bytes().to_vec();
        parse(&mut b, &mut Buffers::default(), 1_000)
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
        let btc = Symbol::parse("BTC-USD").unwrap();
        assert_eq!(resume[&btc].seq, 1042);
        assert_eq!(resume[&btc].epoch.to_string(), "9f2c41d07a3e");
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

    fn subscribe_of(symbols: impl Iterator<Item = String>) -> String {
        let list: Vec<String> = symbols.map(|s| format!("\"{s}\"")).collect();
        format!(r#"{{"op":"subscribe","id":5,"symbols":[{}]}}"#, list.join(","))
    }

    /// Issue 10, item 2: counts are checked while the list is read (a set,
    /// not a scan per symbol), repeats count once, and the id is echoed.
    #[test]
    fn symbol_lists_are_bounded_and_repeats_count_once() {
        let limit = |s: &str, max: usize| {
            let mut b = s.as_bytes().to_vec();
            parse(&mut b, &mut Buffers::default(), max)
        };
        // 10,800 distinct symbols in one 64 KiB message: refused, id echoed.
        let many = subscribe_of((0..10_800).map(|i| format!("S{i}")));
        let e = limit(&many, 1_000).unwrap_err();
        assert_eq!(
            (e.code, e.id.as_deref()),
            (ErrorCode::TooManySubscriptions, Some(&b"5"[..]))
        );
        // The same symbol 10,000 times is one symbol.
        let same = subscribe_of(std::iter::repeat_n("btc-usd".to_string(), 10_000));
        let Op::Subscribe { symbols, .. } = limit(&same, 1).unwrap().op else {
            panic!()
        };
        assert_eq!(symbols.len(), 1);
        // Exactly the limit is fine; a resume map past it is refused too.
        assert!(limit(&subscribe_of((0..3).map(|i| format!("S{i}"))), 3).is_ok());
        let resume =
            r#"{"op":"subscribe","symbols":["A"],"resume":{"A":{"seq":1,"epoch":"x"},"B":{"seq":1,"epoch":"x"}}}"#;
        assert_eq!(limit(resume, 1).unwrap_err().code, ErrorCode::TooManySubscriptions);
        // keys that differ only in case are one symbol
        let resume =
            r#"{"op":"subscribe","symbols":["A"],"resume":{"a":{"seq":1,"epoch":"x"},"A":{"seq":1,"epoch":"x"}}}"#;
        let Op::Subscribe { resume, .. } = limit(resume, 1).unwrap().op else {
            panic!()
        };
        assert_eq!(resume.len(), 1);
        let unsub = r#"{"op":"unsubscribe","symbols":["A","B"]}"#;
        assert_eq!(limit(unsub, 1).unwrap_err().code, ErrorCode::TooManySubscriptions);
    }

    /// An id is echoed in every reply to its message (one per symbol when
    /// an owner is down): past [`MAX_ID_BYTES`] the message is `bad_json`.
    #[test]
    fn an_id_is_bounded() {
        let at = format!(r#"{{"op":"ping","id":"{}"}}"#, "x".repeat(MAX_ID_BYTES - 2));
        assert_eq!(p(&at).unwrap().id.map(|i| i.len()), Some(MAX_ID_BYTES));
        let over = format!(r#"{{"op":"ping","id":"{}"}}"#, "x".repeat(MAX_ID_BYTES - 1));
        let e = p(&over).unwrap_err();
        assert_eq!((e.code, e.id), (ErrorCode::BadJson, None));
        assert!(e.message.contains("over 256 bytes"), "{}", e.message);
        let id = |s: &str| id_only(&mut s.as_bytes().to_vec(), &mut Buffers::default());
        assert_eq!(id(&over), None, "nor echoed when rate limited");
    }

    #[test]
    fn the_id_alone_is_read_from_any_json_object() {
        let id = |s: &str| id_only(&mut s.as_bytes().to_vec(), &mut Buffers::default());
        assert_eq!(
            id(r#"{"op":"subscribe","id":"x1","symbols":[]}"#).as_deref(),
            Some(&br#""x1""#[..])
        );
        assert_eq!(id(r#"{"op":"ping"}"#), None);
        assert_eq!(id("not json"), None);
    }

    proptest::proptest! {
        /// A close payload is valid exactly when it is empty, or a code one
        /// may send (RFC 6455 §7.4) and a UTF-8 reason; any bytes, no panic.
        #[test]
        fn close_payloads_are_checked_as_the_rfc_says(p in proptest::collection::vec(proptest::num::u8::ANY, 0..126)) {
            let sendable = |c: u16| matches!(c, 1000..=1003 | 1007..=1013 | 3000..=4999);
            let want = match p.as_slice() {
                [] => true,
                [_] => false,
                [a, b, rest @ ..] => sendable(u16::from_be_bytes([*a, *b])) && std::str::from_utf8(rest).is_ok(),
            };
            proptest::prop_assert_eq!(close_payload_is_valid(&p), want);
        }

        /// Codes are drawn often enough to hit every range.
        #[test]
        fn close_codes_of_every_range(code in 0u16..6000, reason in "[a-zé]{0,20}") {
            let mut p = code.to_be_bytes().to_vec();
            p.extend_from_slice(reason.as_bytes());
            let sendable = matches!(code, 1000..=1003 | 1007..=1013 | 3000..=4999);
            proptest::prop_assert_eq!(close_payload_is_valid(&p), sendable);
        }
    }
}
