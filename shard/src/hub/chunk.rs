use std::sync::OnceLock;

use crate::domain::{Candle, Epoch, Symbol, Tick};

/// What the queue accounting charges for one tick: roughly its JSON frame.
/// Queue limits are approximate by design; exact byte counts would cost an
/// encode per subscriber.
pub const APPROX_TICK_BYTES: usize = 160;

/// Consecutive accepted ticks of one symbol from one group commit (or one page
/// of history), shared by every subscriber through an `Arc`.
///
/// The protocol encoding is done once, by the first writer that needs it
/// ([`Chunk::encoded`]), and the same bytes are then written to every
/// subscriber: encode once per tick, never once per subscriber.
pub struct Chunk {
    pub symbol: Symbol,
    pub ticks: Vec<Tick>,
    encoded: OnceLock<Encoded>,
}

/// Pre-encoded frames: frame `i` is `bytes[ends[i-1]..ends[i]]` (`ends[-1] = 0`).
#[derive(Default)]
pub struct Encoded {
    pub bytes: Vec<u8>,
    pub ends: Vec<u32>,
}

impl Encoded {
    /// The frames from tick index `from` on.
    pub fn frames_from(&self, from: usize) -> impl Iterator<Item = &[u8]> {
        let mut start = if from == 0 {
            0
        } else {
            self.ends.get(from - 1).map_or(self.bytes.len(), |&e| e as usize)
        };
        self.ends.iter().skip(from).map(move |&end| {
            let f = self.bytes.get(start..end as usize).unwrap_or_default();
            start = end as usize;
            f
        })
    }

    /// Bytes of the frames from tick index `from` on.
    pub fn len_from(&self, from: usize) -> usize {
        let start = if from == 0 {
            0
        } else {
            self.ends.get(from - 1).map_or(self.bytes.len(), |&e| e as usize)
        };
        self.bytes.len() - start
    }
}

impl Chunk {
    pub fn new(symbol: Symbol, ticks: Vec<Tick>) -> Chunk {
        Chunk {
            symbol,
            ticks,
            encoded: OnceLock::new(),
        }
    }

    pub fn first_seq(&self) -> u64 {
        self.ticks.first().map_or(0, |t| t.seq)
    }

    pub fn last_seq(&self) -> u64 {
        self.ticks.last().map_or(0, |t| t.seq)
    }

    /// The encoded frames, produced by `encode` on first use only.
    pub fn encoded(&self, encode: impl FnOnce(&[Tick], &mut Encoded)) -> &Encoded {
        self.encoded.get_or_init(|| {
            let mut e = Encoded::default();
            encode(&self.ticks, &mut e);
            e
        })
    }
}

/// A protocol-agnostic item of a subscriber's stream. Protocol layers (WebSocket
/// JSON, gRPC `Event`, peer `FollowEvent`) render it.
pub enum Data {
    /// `chunk.ticks[from..]`.
    Ticks {
        chunk: std::sync::Arc<Chunk>,
        from: usize,
    },
    Snapshot(Box<SnapshotData>),
    Candle(Box<CandleData>),
    /// The symbol's owner is unreachable; data resumes (without a gap) when it
    /// is back.
    Unavailable(Symbol),
}

pub struct SnapshotData {
    pub epoch: Epoch,
    pub tick: Tick,
    /// Intermediate ticks were dropped because the client fell behind.
    pub conflated: bool,
}

pub struct CandleData {
    pub candle: Candle,
    pub closed: bool,
}

impl Data {
    /// The queue accounting weight of this item.
    pub fn weight(&self) -> usize {
        match self {
            Data::Ticks { chunk, from } => chunk.ticks.len().saturating_sub(*from) * APPROX_TICK_BYTES,
            Data::Snapshot(_) => APPROX_TICK_BYTES + 64,
            Data::Candle(_) => 256,
            Data::Unavailable(_) => 128,
        }
    }
}
