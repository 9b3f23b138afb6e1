//! Which shard owns a symbol.
//!
//! `owner(symbol) = jump_consistent_hash(xxh3_64(symbol), N)`, where `symbol` is
//! the upper-cased bytes, `xxh3_64` is XXH3 64-bit with seed 0 (a published,
//! platform-independent algorithm), and the jump hash is Lamping & Veach (2014)
//! computed in exact integer arithmetic (no floats, so no platform rounding).
//! Every pod computes the same map; the golden tests below pin it, so a change
//! that would move symbols between shards cannot pass unnoticed.

use crate::domain::Symbol;

/// The platform-stable 64-bit hash of a symbol.
pub fn symbol_hash(symbol: &Symbol) -> u64 {
    xxhash_rust::xxh3::xxh3_64(symbol.as_bytes())
}

/// Jump consistent hash: maps `key` to a bucket in `0..buckets` so that growing
/// from `n` to `n + 1` buckets moves only `1/(n+1)` of the keys. `buckets == 0`
/// is treated as 1.
pub fn jump_consistent_hash(mut key: u64, buckets: u32) -> u32 {
    let buckets = u64::from(buckets.max(1));
    let (mut b, mut j) = (0u64, 0u64);
    while j < buckets {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        // j = (b + 1) * 2^31 / ((key >> 33) + 1), exactly
        j = (u128::from(b + 1) * (1u128 << 31) / u128::from((key >> 33) + 1)) as u64;
    }
    b as u32
}

/// The shard map of a deployment as seen from one pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ownership {
    shards: u32,
    me: u32,
}

impl Ownership {
    /// `shard_id < shards` is checked by the configuration before this is built.
    pub fn new(shards: u32, me: u32) -> Ownership {
        Ownership {
            shards: shards.max(1),
            me,
        }
    }

    pub fn shards(&self) -> u32 {
        self.shards
    }

    pub fn me(&self) -> u32 {
        self.me
    }

    pub fn owner(&self, symbol: &Symbol) -> u32 {
        jump_consistent_hash(symbol_hash(symbol), self.shards)
    }

    pub fn is_local(&self, symbol: &Symbol) -> bool {
        self.owner(symbol) == self.me
    }
}

/// `n` symbols (`R0`, `R1`, …) that shard 0 of `shards` does not own, for
/// tests of a pod whose peers are down.
#[cfg(test)]
pub(crate) fn remote_symbols(shards: u32, n: usize) -> Vec<Symbol> {
    let own = Ownership::new(shards, 0);
    (0..)
        .map(|i| Symbol::parse(&format!("R{i}")).expect("symbol"))
        .filter(|s| !own.is_local(s))
        .take(n)
        .collect()
}

/// The ordinal at the end of a StatefulSet pod's hostname: `tickshard-2` → 2.
pub fn ordinal_from_hostname(hostname: &str) -> Option<u32> {
    let (_, tail) = hostname.rsplit_once('-')?;
    if tail.is_empty() || !tail.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    tail.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sym(s: &str) -> Symbol {
        Symbol::parse(s).unwrap()
    }

    /// Golden values: if any of these change, symbols move between shards and
    /// every deployed data directory is orphaned. Do not update them casually.
    /// The hashes agree with the reference XXH3 (Python `xxhash.xxh3_64`).
    #[test]
    fn golden_hashes_and_owners() {
        let golden: [(&str, u64, [u32; 4]); 6] = [
            ("BTC-USD", 0xdaab_9b98_c1b5_e947, [0, 1, 2, 2]),
            ("ETH-USD", 0xa065_649b_5d38_e94d, [0, 0, 2, 2]),
            ("AAPL", 0xdfb0_aa5c_25cc_e8c5, [0, 0, 0, 0]),
            ("EUR/USD", 0x4c5c_469a_f605_55ed, [0, 0, 0, 0]),
            ("MSFT", 0x9503_6c02_84b0_988d, [0, 0, 0, 0]),
            ("SOL-USD", 0x2c20_45d9_e36b_8132, [0, 0, 2, 2]),
        ];
        for (s, hash, owners) in golden {
            assert_eq!(symbol_hash(&sym(s)), hash, "{s}");
            // case-insensitive input, same owner
            assert_eq!(symbol_hash(&sym(&s.to_lowercase())), hash, "{s}");
            for (n, want) in [1, 2, 3, 8].into_iter().zip(owners) {
                assert_eq!(Ownership::new(n, 0).owner(&sym(s)), want, "{s} with {n} shards");
            }
        }
    }

    #[test]
    fn jump_hash_reference_values() {
        // Test vectors shared by the published implementations (Go, C, Python,
        // Elixir) of the paper's floating-point version; the exact-integer
        // version must agree with them.
        let vectors: [(u64, u32, u32); 12] = [
            (1, 1, 0),
            (42, 57, 43),
            (0xDEAD_10CC, 1, 0),
            (0xDEAD_10CC, 666, 361),
            (256, 1024, 520),
            (0, 2, 0),
            (4, 2, 1),
            (7, 2, 0),
            (1, 128, 55),
            (129, 128, 120),
            (128, 100_000_000, 38_172_097),
            (u64::MAX, 128, 92),
        ];
        for (key, buckets, want) in vectors {
            assert_eq!(
                jump_consistent_hash(key, buckets),
                want,
                "key {key:#x} buckets {buckets}"
            );
        }
        assert_eq!(jump_consistent_hash(7, 0), 0);
    }

    #[test]
    fn growing_moves_few_keys_and_spreads_evenly() {
        let n = 10_000u64;
        let mut moved = 0;
        let mut counts = [0u32; 3];
        for k in 0..n {
            let key = xxhash_rust::xxh3::xxh3_64(&k.to_le_bytes());
            let a = jump_consistent_hash(key, 3);
            let b = jump_consistent_hash(key, 4);
            counts[a as usize] += 1;
            if a != b {
                moved += 1;
                assert_eq!(b, 3, "keys only move to the new bucket");
            }
        }
        assert!((2000..3000).contains(&moved), "moved {moved}");
        for c in counts {
            assert!((3000..3700).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn hostname_ordinals() {
        assert_eq!(ordinal_from_hostname("tickshard-2"), Some(2));
        assert_eq!(ordinal_from_hostname("my-app-tickshard-17"), Some(17));
        assert_eq!(ordinal_from_hostname("laptop"), None);
        assert_eq!(ordinal_from_hostname("tickshard-"), None);
        assert_eq!(ordinal_from_hostname("tickshard-x1"), None);
    }
}
