//! What subscribers measure: frames scanned for `seq` and `ts` (not parsed),
//! latency histograms, and CPU/RSS of a process from `/proc`.

use std::sync::atomic::{AtomicU64, Ordering};

use hdrhistogram::Histogram;

pub(crate) fn now_us() -> u64 {
    tickshard_shard::domain::now_micros().max(0) as u64
}

pub(crate) fn hist() -> Histogram<u64> {
    // 1 µs .. 100 s, 3 significant digits: constant, valid bounds
    Histogram::new_with_bounds(1, 100_000_000, 3).expect("valid histogram bounds")
}

pub(crate) fn quantiles(h: &Histogram<u64>) -> [u64; 5] {
    if h.is_empty() {
        return [0; 5];
    }
    [
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.9),
        h.value_at_quantile(0.99),
        h.value_at_quantile(0.999),
        h.max(),
    ]
}

/// CPU seconds (user + system) and RSS bytes of a process, from /proc.
pub(crate) fn proc_usage(pid: &str) -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    // fields 14 and 15 of stat (utime, stime), in clock ticks (100/s on Linux)
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some((ticks as f64 / 100.0, rss_kb * 1024))
}

/// The measured window, by publish time: a delivery counts (and its latency
/// is recorded) if its tick was published inside it, whenever it arrives —
/// the generator keeps reading for a grace period after the window, so
/// "delivered / owed" compares the same ticks on both sides.
pub(crate) struct Window {
    start: AtomicU64,
    end: AtomicU64,
}

impl Window {
    pub(crate) fn new() -> Window {
        Window {
            start: AtomicU64::new(u64::MAX),
            end: AtomicU64::new(u64::MAX),
        }
    }

    pub(crate) fn open(&self, at: u64) {
        self.start.store(at, Ordering::Relaxed);
    }

    pub(crate) fn close(&self, at: u64) {
        self.end.store(at, Ordering::Relaxed);
    }

    pub(crate) fn contains(&self, ts: u64) -> bool {
        ts >= self.start.load(Ordering::Relaxed) && ts < self.end.load(Ordering::Relaxed)
    }
}

/// A subscriber's last seq per symbol it watches (the gap check): dense for
/// "every symbol", a sorted list for a watchlist (a few of many symbols).
pub(crate) enum Lasts {
    Dense(Vec<u64>),
    Sparse(Vec<(u64, u64)>),
}

impl Lasts {
    pub(crate) fn dense(n: usize) -> Lasts {
        Lasts::Dense(vec![0; n])
    }

    pub(crate) fn sparse(watch: &[usize]) -> Lasts {
        Lasts::Sparse(watch.iter().map(|&i| (i as u64, 0)).collect())
    }

    pub(crate) fn get_mut(&mut self, idx: u64) -> Option<&mut u64> {
        match self {
            Lasts::Dense(v) => v.get_mut(usize::try_from(idx).ok()?),
            Lasts::Sparse(v) => {
                let at = v.binary_search_by_key(&idx, |e| e.0).ok()?;
                Some(&mut v[at].1)
            }
        }
    }
}

/// One subscriber's counters and latency histogram.
pub(crate) type SubResult = (SubStats, Histogram<u64>);

#[derive(Default)]
pub(crate) struct SubStats {
    pub deliveries: u64,
    pub bytes: u64,
    pub gaps: u64,
    pub conflated: u64,
    pub closed: bool,
}

/// Parses the digits at the start of `p` (wrapping past `u64::MAX`: the
/// server's numbers fit). Eight at a time while eight are there (a `ts` has
/// 16 digits: byte by byte, its parse was the generator's largest cost).
fn digits(p: &[u8]) -> (u64, usize) {
    let mut n = 0u64;
    let mut i = 0;
    while let Some(v) = p.get(i..i + 8).and_then(eight_digits) {
        n = n.wrapping_mul(100_000_000).wrapping_add(v);
        i += 8;
    }
    while let Some(&c) = p.get(i) {
        if !c.is_ascii_digit() {
            break;
        }
        n = n.wrapping_mul(10).wrapping_add(u64::from(c - b'0'));
        i += 1;
    }
    (n, i)
}

/// The value of eight ASCII digits, or `None` if one of them is not a digit
/// (SWAR: three multiply-and-shift steps instead of eight dependent ones).
fn eight_digits(b: &[u8]) -> Option<u64> {
    let v = u64::from_le_bytes(b.try_into().ok()?);
    // every byte in 0x30..=0x39: high nibble 3, and adding 6 does not carry into it
    let all_digits = (v & 0xf0f0_f0f0_f0f0_f0f0) == 0x3030_3030_3030_3030
        && (v.wrapping_add(0x0606_0606_0606_0606) & 0xf0f0_f0f0_f0f0_f0f0) == 0x3030_3030_3030_3030;
    if !all_digits {
        return None;
    }
    let v = v & 0x0f0f_0f0f_0f0f_0f0f;
    // (the first digit is the lowest byte: pairs, then quads, then all eight)
    let v = (v.wrapping_mul(10) + (v >> 8)) & 0x00ff_00ff_00ff_00ff;
    let v = (v.wrapping_mul(100) + (v >> 16)) & 0x0000_ffff_0000_ffff;
    Some((v.wrapping_mul(10_000) + (v >> 32)) & 0xffff_ffff)
}

const TICK_HEAD: &[u8] = b"{\"type\":\"tick\",\"symbol\":\"";
const SNAP_HEAD: &[u8] = b"{\"type\":\"snapshot\",\"symbol\":\"";

/// A subscriber's view of one text frame read at `now` (µs since the epoch):
/// count, latency, gap check. Frames are scanned by position (the server's
/// field order is fixed), not parsed.
pub(crate) fn on_frame(
    p: &[u8],
    now: u64,
    prefix: &[u8],
    last: &mut Lasts,
    st: &mut SubStats,
    h: &mut Histogram<u64>,
    window: &Window,
) {
    let (is_tick, rest) = if let Some(r) = p.strip_prefix(TICK_HEAD) {
        (true, r)
    } else if let Some(r) = p.strip_prefix(SNAP_HEAD) {
        (false, r)
    } else {
        return;
    };
    // <prefix><idx>","epoch":"…" (snapshots) or <prefix><idx>","seq":N,"ts":T
    let Some(rest) = rest.strip_prefix(prefix) else { return };
    let (idx, n) = digits(rest);
    let mut rest = &rest[n..];
    if !is_tick {
        // skip ","epoch":"xxxxxxxxxxxx"
        rest = rest.get(24..).unwrap_or_default();
    }
    let Some(rest) = rest
        .strip_prefix(b"\",\"seq\":".as_slice())
        .or_else(|| rest.strip_prefix(b",\"seq\":".as_slice()))
    else {
        return;
    };
    let (seq, n) = digits(rest);
    if let Some(l) = last.get_mut(idx) {
        if is_tick && *l != 0 && seq != *l + 1 {
            st.gaps += 1;
        }
        *l = seq;
    }
    if !is_tick {
        if p.ends_with(b"\"conflated\":true}") {
            st.conflated += 1;
        }
        return;
    }
    if let Some(ts) = rest[n..].strip_prefix(b",\"ts\":".as_slice()) {
        let ts = digits(ts).0;
        if window.contains(ts) {
            st.deliveries += 1;
            st.bytes += p.len() as u64;
            let _ = h.record(now.saturating_sub(ts).max(1));
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::{Lasts, digits};

    /// The byte-by-byte parse the fast one must equal.
    fn slow_digits(p: &[u8]) -> (u64, usize) {
        let n = p.iter().take_while(|c| c.is_ascii_digit()).count();
        let v = p[..n]
            .iter()
            .fold(0u64, |v, c| v.wrapping_mul(10).wrapping_add(u64::from(c - b'0')));
        (v, n)
    }

    #[test]
    fn digits_of_a_frame_field() {
        assert_eq!(digits(b"1732530000000160,\"price\""), (1_732_530_000_000_160, 16));
        assert_eq!(digits(b"12345678"), (12_345_678, 8));
        assert_eq!(digits(b"1234567:9"), (1_234_567, 7));
        assert_eq!(digits(b"123456789"), (123_456_789, 9));
        assert_eq!(digits(b"0000000042}"), (42, 10));
        assert_eq!(digits(b"x1"), (0, 0));
        assert_eq!(digits(b""), (0, 0));
        // bytes next to the digits, on both sides of the check
        assert_eq!(digits(b"1234567/"), (1_234_567, 7));
        assert_eq!(digits(b"1234567:"), (1_234_567, 7));
    }

    proptest! {
        #[test]
        fn digits_equal_the_byte_by_byte_parse(p in proptest::collection::vec(prop_oneof![
            8 => b'0'..=b'9',
            1 => any::<u8>(),
        ], 0..40)) {
            prop_assert_eq!(digits(&p), slow_digits(&p));
        }
    }

    #[test]
    fn a_watchlist_keeps_a_last_seq_per_watched_symbol_only() {
        let mut l = Lasts::sparse(&[3, 17, 4_000]);
        *l.get_mut(17).unwrap() = 5;
        assert_eq!(l.get_mut(17).copied(), Some(5));
        assert!(l.get_mut(4).is_none());
        assert!(l.get_mut(10_001).is_none());
    }
}
