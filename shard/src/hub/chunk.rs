use std::sync::OnceLock;

use bytes::Bytes;

use crate::domain::{Candle, Epoch, Symbol, Tick};

/// What the queue accounting charges for one tick: roughly its JSON frame.
/// Queue limits are approximate by design; exact byte counts would cost an
/// encode per subscriber.
pub const APPROX_TICK_BYTES: usize = 160;

/// Consecutive accepted ticks of one symbol from one group commit (or one page
/// of history), shared by every subscriber through an `Arc`.
///
/// Each protocol's encoding is done once, by the first writer that needs it
/// ([`Chunk::encoded`]), and the same bytes are then written to every
/// subscriber of that protocol: encode once per tick, never once per subscriber.
pub struct Chunk {
    pub symbol: Symbol,
    pub ticks: Vec<Tick>,
    json: OnceLock<Encoded>,
    protobuf: OnceLock<Encoded>,
}

/// The wire formats a chunk's ticks are encoded in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// WebSocket protocol v1 text frames.
    Json,
    /// `tickshard.v1.Event` messages of the gRPC `Subscribe` stream.
    Protobuf,
}

/// Frames being encoded: an encoder appends a frame's bytes to `bytes`, then
/// calls [`Frames::end_frame`].
#[derive(Default)]
pub struct Frames {
    pub bytes: Vec<u8>,
    ends: Vec<u32>,
}

impl Frames {
    pub fn reserve(&mut self, frames: usize, bytes: usize) {
        self.bytes.reserve(bytes);
        self.ends.reserve(frames);
    }

    pub fn end_frame(&mut self) {
        self.ends.push(self.bytes.len() as u32);
    }
}

/// Pre-encoded frames, one per tick: frame `i` is `bytes[ends[i-1]..ends[i]]`
/// (`ends[-1] = 0`).
pub struct Encoded {
    bytes: Bytes,
    ends: Vec<u32>,
}

impl Encoded {
    /// The byte ranges of the frames from tick index `from` on.
    fn ranges_from(&self, from: usize) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
        let len = self.bytes.len();
        let mut start = match from {
            0 => 0,
            _ => self.ends.get(from - 1).map_or(len, |&e| e as usize),
        };
        self.ends.iter().skip(from).map(move |&end| {
            let end = (end as usize).min(len);
            let r = start.min(end)..end;
            start = end;
            r
        })
    }

    /// The frames from tick index `from` on.
    pub fn frames_from(&self, from: usize) -> impl Iterator<Item = &[u8]> {
        self.ranges_from(from).map(|r| &self.bytes[r])
    }

    /// The frames from tick index `from` on, as handles on the shared bytes
    /// (a reference count each, no copy): for streams that need owned items.
    pub fn shared_from(&self, from: usize) -> impl Iterator<Item = Bytes> + '_ {
        self.ranges_from(from).map(|r| self.bytes.slice(r))
    }
}

impl Chunk {
    pub fn new(symbol: Symbol, ticks: Vec<Tick>) -> Chunk {
        Chunk {
            symbol,
            ticks,
            json: OnceLock::new(),
            protobuf: OnceLock::new(),
        }
    }

    pub fn first_seq(&self) -> u64 {
        self.ticks.first().map_or(0, |t| t.seq)
    }

    pub fn last_seq(&self) -> u64 {
        self.ticks.last().map_or(0, |t| t.seq)
    }

    /// The ticks encoded in `format`, produced by `encode` on first use only
    /// (`encode` must end one frame per tick).
    pub fn encoded(&self, format: Format, encode: impl FnOnce(&[Tick], &mut Frames)) -> &Encoded {
        let cell = match format {
            Format::Json => &self.json,
            Format::Protobuf => &self.protobuf,
        };
        cell.get_or_init(|| {
            let mut f = Frames::default();
            encode(&self.ticks, &mut f);
            Encoded {
                bytes: Bytes::from(f.bytes),
                ends: f.ends,
            }
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
    /// One candle event, shared by every subscriber it goes to.
    Candle(std::sync::Arc<CandleData>),
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

/// A candle event (an update of the current candle, or a closed one). Made
/// once per event and shared by its subscribers; like a [`Chunk`], each
/// protocol's encoding is done once, by the first writer that needs it.
pub struct CandleData {
    pub candle: Candle,
    pub closed: bool,
    json: OnceLock<Bytes>,
    protobuf: OnceLock<Bytes>,
}

impl CandleData {
    pub fn new(candle: Candle, closed: bool) -> std::sync::Arc<CandleData> {
        std::sync::Arc::new(CandleData {
            candle,
            closed,
            json: OnceLock::new(),
            protobuf: OnceLock::new(),
        })
    }

    /// The event encoded in `format` (one frame or message), produced by
    /// `encode` on first use only.
    pub fn encoded(&self, format: Format, encode: impl FnOnce(&Candle, bool, &mut Vec<u8>)) -> &Bytes {
        let cell = match format {
            Format::Json => &self.json,
            Format::Protobuf => &self.protobuf,
        };
        cell.get_or_init(|| {
            let mut out = Vec::new();
            encode(&self.candle, self.closed, &mut out);
            Bytes::from(out)
        })
    }
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
