use std::fmt;

/// The identity of one symbol's history: 48 random bits shown as 12 hex digits.
///
/// A `seq` is meaningful only together with its epoch. The owner creates it when
/// it first stores the symbol (or is first asked to serve it); it survives
/// restarts and changes only if the history is lost.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Epoch([u8; 6]);

impl Epoch {
    pub const LEN: usize = 6;

    /// A fresh, random epoch (never all zero, which marks "none").
    pub fn random() -> Epoch {
        loop {
            let v = fastrand::u64(..);
            let b = v.to_be_bytes();
            let e = Epoch([b[2], b[3], b[4], b[5], b[6], b[7]]);
            if !e.is_none() {
                return e;
            }
        }
    }

    pub fn from_bytes(b: [u8; 6]) -> Epoch {
        Epoch(b)
    }

    pub fn as_bytes(&self) -> &[u8; 6] {
        &self.0
    }

    pub fn is_none(&self) -> bool {
        self.0 == [0; 6]
    }

    /// Parses the 12-hex-digit form a client echoes back; `None` for anything else
    /// (which then simply does not match any symbol's epoch).
    pub fn parse(s: &str) -> Option<Epoch> {
        let s = s.as_bytes();
        if s.len() != 12 {
            return None;
        }
        let mut out = [0u8; 6];
        for (i, pair) in s.chunks_exact(2).enumerate() {
            let hi = hex_val(pair[0])?;
            let lo = hex_val(pair[1])?;
            out[i] = hi << 4 | lo;
        }
        Some(Epoch(out))
    }

    /// Writes the 12 hex digits into `out` without allocating.
    pub fn write_hex(&self, out: &mut [u8; 12]) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        for (i, b) in self.0.iter().enumerate() {
            out[2 * i] = HEX[usize::from(b >> 4)];
            out[2 * i + 1] = HEX[usize::from(b & 0xf)];
        }
    }
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; 12];
        self.write_hex(&mut buf);
        f.write_str(std::str::from_utf8(&buf).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Epoch({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let e = Epoch::from_bytes([0x9f, 0x2c, 0x41, 0xd0, 0x7a, 0x3e]);
        assert_eq!(e.to_string(), "9f2c41d07a3e");
        assert_eq!(Epoch::parse("9f2c41d07a3e"), Some(e));
        assert_eq!(Epoch::parse("9F2C41D07A3E"), Some(e));
        assert_eq!(Epoch::parse("9f2c41d07a3"), None);
        assert_eq!(Epoch::parse("9f2c41d07a3g"), None);
        for _ in 0..100 {
            let r = Epoch::random();
            assert!(!r.is_none());
            assert_eq!(Epoch::parse(&r.to_string()), Some(r));
        }
    }
}
