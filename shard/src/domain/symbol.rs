use std::{cmp::Ordering, fmt, hash, str};

use super::InputError;

/// The longest symbol the contract allows.
pub const MAX_SYMBOL_LEN: usize = 32;

/// An instrument name: 1–32 characters of `A-Z 0-9 . - _ / :`, upper-cased.
///
/// Stored inline (no heap), so it is `Copy` and cheap to hash and compare on the
/// tick hot path. The bytes past `len` are always zero.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Symbol {
    len: u8,
    bytes: [u8; MAX_SYMBOL_LEN],
}

impl Symbol {
    /// Validates and normalises (upper-cases) a symbol given by a client.
    pub fn parse(input: &str) -> Result<Symbol, InputError> {
        let raw = input.as_bytes();
        let invalid = |why| InputError::InvalidSymbol {
            shown: shown(input),
            why,
        };
        if raw.is_empty() {
            return Err(invalid("is empty"));
        }
        if raw.len() > MAX_SYMBOL_LEN {
            return Err(invalid("is longer than 32 characters"));
        }
        let mut bytes = [0u8; MAX_SYMBOL_LEN];
        for (dst, &b) in bytes.iter_mut().zip(raw) {
            let up = b.to_ascii_uppercase();
            if !(up.is_ascii_uppercase() || up.is_ascii_digit() || b".-_/:".contains(&up)) {
                return Err(invalid("has characters outside A-Z 0-9 . - _ / :"));
            }
            *dst = up;
        }
        Ok(Symbol {
            len: raw.len() as u8,
            bytes,
        })
    }

    /// Rebuilds a symbol from bytes this program stored itself; `None` if they
    /// are not a valid symbol (a corrupt record).
    pub fn from_stored(raw: &[u8]) -> Option<Symbol> {
        let s = str::from_utf8(raw).ok()?;
        let sym = Symbol::parse(s).ok()?;
        (sym.as_bytes() == raw).then_some(sym)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII is ever stored (checked in `parse`), so this cannot fail.
        str::from_utf8(self.as_bytes()).unwrap_or_default()
    }

    pub fn len(&self) -> usize {
        usize::from(self.len)
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Why a list of symbols in one request was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SymbolListError {
    #[error(transparent)]
    Invalid(#[from] InputError),
    #[error("the request names more than {max} symbols")]
    TooMany { max: usize },
}

/// The distinct symbols of one request, in first-seen order, at most `max`
/// (contract §4: repeats count once; a request naming more is refused whole,
/// before any per-symbol work). Each `add` costs O(length of the input).
#[derive(Debug)]
pub struct SymbolSet {
    seen: std::collections::HashSet<Symbol>,
    list: Vec<Symbol>,
    max: usize,
}

impl SymbolSet {
    pub fn new(max: usize) -> SymbolSet {
        SymbolSet {
            seen: std::collections::HashSet::new(),
            list: Vec::new(),
            max,
        }
    }

    /// Parses and adds one symbol (a repeat is ignored).
    pub fn add(&mut self, input: &str) -> Result<Symbol, SymbolListError> {
        let sym = Symbol::parse(input)?;
        if self.seen.insert(sym) {
            if self.list.len() == self.max {
                return Err(SymbolListError::TooMany { max: self.max });
            }
            self.list.push(sym);
        }
        Ok(sym)
    }

    /// Parses a whole list.
    pub fn parse<'a>(inputs: impl IntoIterator<Item = &'a str>, max: usize) -> Result<Vec<Symbol>, SymbolListError> {
        let mut set = SymbolSet::new(max);
        for s in inputs {
            set.add(s)?;
        }
        Ok(set.into_vec())
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn into_vec(self) -> Vec<Symbol> {
        self.list
    }
}

/// Shows untrusted input in an error message: at most 40 characters, control
/// characters escaped, so an error never echoes a megabyte back.
fn shown(input: &str) -> String {
    let mut out: String = input.chars().take(40).flat_map(char::escape_debug).collect();
    if input.chars().count() > 40 {
        out.push('…');
    }
    out
}

impl hash::Hash for Symbol {
    fn hash<H: hash::Hasher>(&self, state: &mut H) {
        state.write(self.as_bytes());
    }
}

impl Ord for Symbol {
    fn cmp(&self, other: &Self) -> Ordering {
        self.as_bytes().cmp(other.as_bytes())
    }
}

impl PartialOrd for Symbol {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for Symbol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Symbol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Symbol({})", self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn normalises_case_and_keeps_punctuation() {
        let s = Symbol::parse("btc-usd").unwrap();
        assert_eq!(s.as_str(), "BTC-USD");
        assert_eq!(Symbol::parse("EUR/USD:FX_1.0").unwrap().as_str(), "EUR/USD:FX_1.0");
    }

    #[test]
    fn rejects_bad_symbols_with_a_reason() {
        let e = Symbol::parse("b@d").unwrap_err();
        assert_eq!(e.to_string(), "symbol 'b@d' has characters outside A-Z 0-9 . - _ / :");
        assert!(Symbol::parse("").is_err());
        assert!(Symbol::parse(&"A".repeat(33)).is_err());
        assert!(Symbol::parse(&"A".repeat(32)).is_ok());
        assert!(Symbol::parse("BTC USD").is_err());
        assert!(Symbol::parse("ÄPFEL").is_err());
    }

    #[test]
    fn symbol_lists_count_repeats_once_and_stop_past_the_limit() {
        let got = SymbolSet::parse(["a", "B", "A", "b", "c"], 3).unwrap();
        assert_eq!(got.iter().map(|s| s.as_str()).collect::<Vec<_>>(), ["A", "B", "C"]);
        // a million repeats of one symbol is one symbol
        assert_eq!(
            SymbolSet::parse(std::iter::repeat_n("X", 1_000_000), 1).unwrap().len(),
            1
        );
        assert_eq!(
            SymbolSet::parse(["A", "B", "C", "D"], 3),
            Err(SymbolListError::TooMany { max: 3 })
        );
        assert!(matches!(
            SymbolSet::parse(["A", "b@d"], 3),
            Err(SymbolListError::Invalid(_))
        ));
    }

    #[test]
    fn error_message_is_bounded() {
        let long = "x".repeat(10_000);
        let e = Symbol::parse(&long).unwrap_err().to_string();
        assert!(e.len() < 120, "{e}");
    }

    fn valid_char() -> impl Strategy<Value = char> {
        prop::sample::select(
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.-_/:"
                .chars()
                .collect::<Vec<_>>(),
        )
    }

    proptest! {
        #[test]
        fn valid_symbols_round_trip(chars in prop::collection::vec(valid_char(), 1..=32)) {
            let input: String = chars.into_iter().collect();
            let sym = Symbol::parse(&input).unwrap();
            prop_assert_eq!(sym.as_str(), input.to_ascii_uppercase());
            prop_assert_eq!(Symbol::from_stored(sym.as_bytes()), Some(sym));
            prop_assert_eq!(Symbol::parse(sym.as_str()).unwrap(), sym);
        }

        #[test]
        fn anything_outside_the_alphabet_is_rejected(input in ".{0,40}") {
            let ok = !input.is_empty()
                && input.len() <= 32
                && input.bytes().all(|b| b.is_ascii_alphanumeric() || b".-_/:".contains(&b));
            prop_assert_eq!(Symbol::parse(&input).is_ok(), ok);
        }

        #[test]
        fn ordering_is_lexicographic(a in "[A-Z]{1,5}", b in "[A-Z]{1,5}") {
            let (sa, sb) = (Symbol::parse(&a).unwrap(), Symbol::parse(&b).unwrap());
            prop_assert_eq!(sa.cmp(&sb), a.cmp(&b));
        }
    }
}
