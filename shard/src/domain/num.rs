use rust_decimal::Decimal;

/// The largest timestamp the contract allows: 2^53 µs, so it fits a JS number.
pub const MAX_TS_MICROS: i64 = 1 << 53;

/// The largest seq (and cluster-state version, candle tick count) a peer may
/// hand this pod: 2^53, so it fits a JS number and the next one (`+ 1`)
/// can never overflow. A shard assigns one seq per tick: unreachable in use.
pub const MAX_SEQ: u64 = 1 << 53;

/// The wall clock in µs since the Unix epoch (0 if the clock is before it).
pub fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// Parses an exact decimal as exchanges write them: `-?digits(.digits)?`.
///
/// Stricter than `Decimal::from_str` on purpose: no exponent, no `_`, no `+`, no
/// leading or trailing dot, and never a silent rounding (`from_str_exact`). The
/// scale is kept, so `"67012.50"` comes back as `"67012.50"`.
pub fn parse_decimal(s: &str) -> Option<Decimal> {
    let digits = s.strip_prefix('-').unwrap_or(s);
    let (int, frac) = match digits.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (digits, None),
    };
    let all_digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(int) || !frac.is_none_or(all_digits) {
        return None;
    }
    Decimal::from_str_exact(s).ok()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn keeps_scale_and_rejects_sloppy_forms() {
        assert_eq!(parse_decimal("67012.50").unwrap().to_string(), "67012.50");
        assert_eq!(parse_decimal("0.00000001").unwrap().to_string(), "0.00000001");
        assert_eq!(parse_decimal("-3.5").unwrap().to_string(), "-3.5");
        assert_eq!(parse_decimal("007").unwrap().to_string(), "7");
        for bad in [
            "", ".5", "5.", "1e5", "1_000", "+1", " 1", "1 ", "NaN", "0x10", "--1", "1.2.3",
        ] {
            assert_eq!(parse_decimal(bad), None, "{bad:?} must be rejected");
        }
        // More precision than a Decimal holds is an error, never a rounding.
        assert_eq!(parse_decimal("0.00000000000000000000000000001"), None);
        assert_eq!(parse_decimal("99999999999999999999999999999999"), None);
    }

    proptest! {
        #[test]
        fn decimal_strings_round_trip_exactly(int in 0u64..=999_999_999_999, frac in "[0-9]{0,12}", neg: bool) {
            let text = match (neg, frac.is_empty()) {
                (false, true) => format!("{int}"),
                (false, false) => format!("{int}.{frac}"),
                (true, true) => format!("-{int}"),
                (true, false) => format!("-{int}.{frac}"),
            };
            let d = parse_decimal(&text).unwrap();
            let expect = if neg && d.is_zero() { text.trim_start_matches('-').to_string() } else { text.clone() };
            prop_assert_eq!(d.to_string(), expect);
            // serialize/deserialize (what the store does) is exact too
            prop_assert_eq!(Decimal::deserialize(d.serialize()), d);
            prop_assert_eq!(Decimal::deserialize(d.serialize()).to_string(), d.to_string());
        }
    }
}
