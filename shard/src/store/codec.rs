//! Binary layout of everything the store writes. Big-endian integers, decimals as
//! `rust_decimal`'s 16-byte exact serialisation. Every value starts with a
//! layout version byte so a later version can read (or clearly refuse) it.

use rust_decimal::Decimal;

use crate::domain::{Candle, Epoch, Interval, Symbol, Tick};

pub(crate) const VALUE_V1: u8 = 1;
/// Tick blocks of format 2: the ticks, then the de-dup states their commit
/// changed (format 1 blocks hold only the ticks).
pub(crate) const BLOCK_V2: u8 = 2;
/// Tick blocks of format 3: as [`BLOCK_V2`], with compact decimals ([`put_decimal_compact`]): a typical tick takes ~30 bytes
/// instead of ~75, and sled's cost grows with the bytes it writes.
pub(crate) const BLOCK_V3: u8 = 3;

const HAS_BID: u8 = 1;
const HAS_ASK: u8 = 2;
const HAS_BID_SIZE: u8 = 4;
const HAS_ASK_SIZE: u8 = 8;

/// A typical compact tick (for buffer reservations only).
const TYPICAL_COMPACT_TICK_LEN: usize = 32;

/// A decimal in 2 to 15 bytes, exactly: one byte of sign (0x80) and scale
/// (0..=28), then the 96-bit magnitude as a LEB128 varint. `67012.50` takes
/// 5 bytes instead of 16.
pub(crate) fn put_decimal_compact(out: &mut Vec<u8>, d: Decimal) {
    out.push((d.scale() as u8) | if d.is_sign_negative() { 0x80 } else { 0 });
    let mut m = d.mantissa().unsigned_abs();
    loop {
        let byte = (m & 0x7f) as u8;
        m >>= 7;
        if m == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn put_tick_compact(out: &mut Vec<u8>, t: &Tick) {
    out.extend_from_slice(&t.ts.to_be_bytes());
    out.push(tick_flags(t));
    for d in [Some(t.price), Some(t.size), t.bid, t.ask, t.bid_size, t.ask_size]
        .into_iter()
        .flatten()
    {
        put_decimal_compact(out, d);
    }
}

fn tick_flags(t: &Tick) -> u8 {
    (t.bid.is_some() as u8 * HAS_BID)
        | (t.ask.is_some() as u8 * HAS_ASK)
        | (t.bid_size.is_some() as u8 * HAS_BID_SIZE)
        | (t.ask_size.is_some() as u8 * HAS_ASK_SIZE)
}

pub(crate) fn put_tick(out: &mut Vec<u8>, t: &Tick) {
    out.extend_from_slice(&t.ts.to_be_bytes());
    out.push(tick_flags(t));
    out.extend_from_slice(&t.price.serialize());
    out.extend_from_slice(&t.size.serialize());
    for d in [t.bid, t.ask, t.bid_size, t.ask_size].into_iter().flatten() {
        out.extend_from_slice(&d.serialize());
    }
}

pub(crate) fn put_candle(out: &mut Vec<u8>, c: &Candle) {
    out.extend_from_slice(&c.start.to_be_bytes());
    for d in [c.open, c.high, c.low, c.close, c.volume] {
        out.extend_from_slice(&d.serialize());
    }
    out.extend_from_slice(&c.count.to_be_bytes());
}

/// A cursor over a stored value; every read fails cleanly on truncated input.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub(crate) fn bytes<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.buf.split_first_chunk::<N>()?;
        self.buf = rest;
        Some(*head)
    }

    pub(crate) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.buf.split_at_checked(n)?;
        self.buf = rest;
        Some(head)
    }

    pub(crate) fn u8(&mut self) -> Option<u8> {
        self.bytes::<1>().map(|b| b[0])
    }

    pub(crate) fn u32(&mut self) -> Option<u32> {
        self.bytes().map(u32::from_be_bytes)
    }

    pub(crate) fn u64(&mut self) -> Option<u64> {
        self.bytes().map(u64::from_be_bytes)
    }

    pub(crate) fn i64(&mut self) -> Option<i64> {
        self.bytes().map(i64::from_be_bytes)
    }

    pub(crate) fn decimal(&mut self) -> Option<Decimal> {
        self.bytes().map(Decimal::deserialize)
    }

    /// A compact decimal ([`put_decimal_compact`]); `None` on truncated
    /// input, an overlong varint, or a magnitude or scale out of range.
    pub(crate) fn decimal_compact(&mut self) -> Option<Decimal> {
        let head = self.u8()?;
        let scale = u32::from(head & 0x7f);
        let mut m: u128 = 0;
        for shift in (0..98).step_by(7) {
            let byte = self.u8()?;
            m |= u128::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                let mut d = Decimal::try_from_i128_with_scale(i128::try_from(m).ok()?, scale).ok()?;
                d.set_sign_negative(head & 0x80 != 0);
                return Some(d);
            }
        }
        None
    }

    pub(crate) fn tick(&mut self, symbol: Symbol, seq: u64) -> Option<Tick> {
        self.tick_with(symbol, seq, Reader::decimal)
    }

    fn tick_with(&mut self, symbol: Symbol, seq: u64, decimal: fn(&mut Reader<'a>) -> Option<Decimal>) -> Option<Tick> {
        let ts = self.i64()?;
        let flags = self.u8()?;
        let price = decimal(self)?;
        let size = decimal(self)?;
        let mut opt = |bit: u8| -> Option<Option<Decimal>> {
            if flags & bit != 0 {
                decimal(self).map(Some)
            } else {
                Some(None)
            }
        };
        let bid = opt(HAS_BID)?;
        let ask = opt(HAS_ASK)?;
        let bid_size = opt(HAS_BID_SIZE)?;
        let ask_size = opt(HAS_ASK_SIZE)?;
        Some(Tick {
            symbol,
            seq,
            ts,
            price,
            size,
            bid,
            ask,
            bid_size,
            ask_size,
        })
    }

    pub(crate) fn candle(&mut self, symbol: Symbol, interval: Interval) -> Option<Candle> {
        Some(Candle {
            symbol,
            interval,
            start: self.i64()?,
            open: self.decimal()?,
            high: self.decimal()?,
            low: self.decimal()?,
            close: self.decimal()?,
            volume: self.decimal()?,
            count: self.u64()?,
        })
    }
}

/// A snapshot of one symbol's state, as of its `last_seq`. Written when the
/// symbol is created and when it is compacted (not every commit): the log
/// records after `last_seq` bring it up to date (`Store::load_log`; in format
/// 2 and 3 directories, the tick blocks after it: `Store::load_tail`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SymbolRecord {
    pub symbol: Symbol,
    pub epoch: Epoch,
    /// The last assigned (and, once committed, durable) seq; 0 = no ticks yet.
    pub last_seq: u64,
    pub last: Option<Tick>,
    /// The current (open) candle of each interval, indexed by `Interval::index`.
    pub candles: [Option<Candle>; 3],
}

impl SymbolRecord {
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.push(VALUE_V1);
        out.extend_from_slice(self.epoch.as_bytes());
        out.extend_from_slice(&self.last_seq.to_be_bytes());
        match &self.last {
            Some(t) => {
                out.push(1);
                put_tick(out, t);
            }
            None => out.push(0),
        }
        for c in &self.candles {
            match c {
                Some(c) => {
                    out.push(1);
                    put_candle(out, c);
                }
                None => out.push(0),
            }
        }
    }

    pub(crate) fn decode(symbol: Symbol, buf: &[u8]) -> Option<SymbolRecord> {
        let mut r = Reader::new(buf);
        if r.u8()? != VALUE_V1 {
            return None;
        }
        let epoch = Epoch::from_bytes(r.bytes()?);
        let last_seq = r.u64()?;
        let last = match r.u8()? {
            0 => None,
            _ => Some(r.tick(symbol, last_seq)?),
        };
        let mut candles = [None; 3];
        for (i, slot) in candles.iter_mut().enumerate() {
            if r.u8()? != 0 {
                *slot = Some(r.candle(symbol, Interval::from_index(i as u8)?)?);
            }
        }
        r.is_empty().then_some(SymbolRecord {
            symbol,
            epoch,
            last_seq,
            last,
            candles,
        })
    }
}

/// Publisher de-duplication state of one `(publisher_id, symbol)` pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DedupState {
    /// The last accepted `publisher_seq`.
    pub publisher_seq: u64,
    /// The `seq` it was stored under.
    pub seq: u64,
    /// Wall-clock µs of the last accepted publish (for expiry).
    pub last_used: i64,
}

/// Encodes every publisher's de-dup state of one symbol: the symbol's de-dup
/// snapshot, written with its [`SymbolRecord`] snapshot.
pub(crate) fn encode_dedup<'a>(entries: impl Iterator<Item = (&'a str, &'a DedupState)>, out: &mut Vec<u8>) {
    out.push(VALUE_V1);
    put_dedup_entries(entries, out);
}

pub(crate) fn decode_dedup(buf: &[u8]) -> Option<Vec<(String, DedupState)>> {
    let mut r = Reader::new(buf);
    (r.u8()? == VALUE_V1).then_some(())?;
    let out = r.dedup_entries()?;
    r.is_empty().then_some(out)
}

fn put_dedup_entries<'a>(entries: impl Iterator<Item = (&'a str, &'a DedupState)>, out: &mut Vec<u8>) {
    let at = out.len();
    out.extend_from_slice(&0u32.to_be_bytes());
    let mut n = 0u32;
    for (id, st) in entries {
        // Ids are validated before they get here (≤ 128 bytes of ASCII, or a
        // scoped id of at most 385 bytes of UTF-8); the cut is a last line of
        // defence and never splits a character.
        let mut end = id.len().min(usize::from(u16::MAX));
        while !id.is_char_boundary(end) {
            end -= 1;
        }
        let id = &id.as_bytes()[..end];
        out.extend_from_slice(&(id.len() as u16).to_be_bytes());
        out.extend_from_slice(id);
        out.extend_from_slice(&st.publisher_seq.to_be_bytes());
        out.extend_from_slice(&st.seq.to_be_bytes());
        out.extend_from_slice(&st.last_used.to_be_bytes());
        n += 1;
    }
    out[at..at + 4].copy_from_slice(&n.to_be_bytes());
}

impl Reader<'_> {
    fn dedup_entries(&mut self) -> Option<Vec<(String, DedupState)>> {
        let n = self.u32()?;
        let mut out = Vec::with_capacity((n as usize).min(1024));
        for _ in 0..n {
            let len = u16::from_be_bytes(self.bytes()?) as usize;
            // Lossy on purpose: an id is only compared, never interpreted,
            // and a directory an older version wrote with a cut id must
            // still open (recovery never fails on what a request put there).
            let id = String::from_utf8_lossy(self.take(len)?).into_owned();
            out.push((
                id,
                DedupState {
                    publisher_seq: self.u64()?,
                    seq: self.u64()?,
                    last_used: self.i64()?,
                },
            ));
        }
        Some(out)
    }
}

/// A block of consecutive ticks of one symbol, followed by de-dup states: a
/// symbol's section of a log record carries the states its commit changed; a
/// tick block written by compaction carries none (its snapshot has them).
pub(crate) fn encode_block<'a>(
    ticks: &[Tick],
    dedup: impl Iterator<Item = (&'a str, &'a DedupState)>,
    out: &mut Vec<u8>,
) {
    out.reserve(9 + ticks.len() * TYPICAL_COMPACT_TICK_LEN);
    out.push(BLOCK_V3);
    out.extend_from_slice(&(ticks.len() as u32).to_be_bytes());
    for t in ticks {
        put_tick_compact(out, t);
    }
    put_dedup_entries(dedup, out);
}

/// Decodes a block whose first tick has `first_seq`, calling `f` for each tick
/// until it returns false. Returns the de-dup trailer when every tick was read.
pub(crate) fn decode_block(
    symbol: Symbol,
    first_seq: u64,
    buf: &[u8],
    mut f: impl FnMut(Tick) -> bool,
) -> Option<Vec<(String, DedupState)>> {
    let mut r = Reader::new(buf);
    let version = r.u8()?;
    let decimal = match version {
        VALUE_V1 | BLOCK_V2 => Reader::decimal,
        BLOCK_V3 => Reader::decimal_compact,
        _ => return None,
    };
    let n = r.u32()?;
    for i in 0..u64::from(n) {
        let t = r.tick_with(symbol, first_seq.checked_add(i)?, decimal)?;
        if !f(t) {
            return Some(Vec::new());
        }
    }
    let dedup = if version != VALUE_V1 {
        r.dedup_entries()?
    } else {
        Vec::new()
    };
    r.is_empty().then_some(dedup)
}

/// A whole decoded tick block: its ticks and the de-dup states its commit
/// changed (a section of a log record, or a format 2/3 block after a snapshot).
#[derive(Debug, PartialEq, Eq)]
pub struct TickBlock {
    pub ticks: Vec<Tick>,
    pub dedup: Vec<(String, DedupState)>,
}

pub(crate) fn decode_whole_block(symbol: Symbol, first_seq: u64, buf: &[u8]) -> Option<TickBlock> {
    let mut ticks = Vec::new();
    let dedup = decode_block(symbol, first_seq, buf, |t| {
        ticks.push(t);
        true
    })?;
    Some(TickBlock { ticks, dedup })
}

/// The number of ticks in a block, without decoding them.
pub(crate) fn block_len(buf: &[u8]) -> Option<u64> {
    let mut r = Reader::new(buf);
    matches!(r.u8()?, VALUE_V1 | BLOCK_V2 | BLOCK_V3).then_some(())?;
    r.u32().map(u64::from)
}

/// Log records (`L` keys) of format 4.
pub(crate) const LOG_V1: u8 = 1;

/// Appends one symbol's part of a log record: the symbol, its first seq and a
/// length-prefixed block (ticks + the de-dup states the commit changed).
pub(crate) fn put_log_section<'a>(
    out: &mut Vec<u8>,
    ticks: &[Tick],
    dedup: impl Iterator<Item = (&'a str, &'a DedupState)>,
) {
    let Some(first) = ticks.first() else { return };
    if out.is_empty() {
        out.push(LOG_V1);
    }
    out.push(first.symbol.len() as u8);
    out.extend_from_slice(first.symbol.as_bytes());
    out.extend_from_slice(&first.seq.to_be_bytes());
    let at = out.len();
    out.extend_from_slice(&0u32.to_be_bytes());
    encode_block(ticks, dedup, out);
    let len = (out.len() - at - 4) as u32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

/// Decodes a log record: one [`TickBlock`] per symbol it holds.
pub(crate) fn decode_log(buf: &[u8]) -> Option<Vec<TickBlock>> {
    let mut r = Reader::new(buf);
    (r.u8()? == LOG_V1).then_some(())?;
    let mut out = Vec::new();
    while !r.is_empty() {
        let len = usize::from(r.u8()?);
        let symbol = Symbol::from_stored(r.take(len)?)?;
        let first_seq = r.u64()?;
        let block_len = r.u32()? as usize;
        out.push(decode_whole_block(symbol, first_seq, r.take(block_len)?)?);
    }
    Some(out)
}

/// Version bytes of a move mark and of the cluster state (1: written by no
/// release, kept readable: the first development builds of elastic shards).
const MARK_V1: u8 = 1;
const MARK_V2: u8 = 2;

/// A move mark's value: version, the new owner, done, the hand-over's attempt id.
pub(crate) fn encode_move_mark(to: u32, done: bool, attempt: u64) -> Vec<u8> {
    let mut v = vec![MARK_V2];
    v.extend_from_slice(&to.to_be_bytes());
    v.push(u8::from(done));
    v.extend_from_slice(&attempt.to_be_bytes());
    v
}

pub(crate) fn decode_move_mark(buf: &[u8]) -> Option<(u32, bool, u64)> {
    let mut r = Reader::new(buf);
    let version = r.u8()?;
    let (to, done) = (r.u32()?, r.u8()?);
    let attempt = match version {
        MARK_V1 => 0,
        MARK_V2 => r.u64()?,
        _ => return None,
    };
    (done <= 1 && r.is_empty()).then_some((to, done == 1, attempt))
}

/// The cluster state's value: version, state version, committed, target (0:
/// none), sealed.
pub(crate) fn encode_cluster_state(s: &crate::placement::ClusterState, sealed: bool) -> Vec<u8> {
    let mut v = vec![MARK_V2];
    v.extend_from_slice(&s.version.to_be_bytes());
    v.extend_from_slice(&s.committed.to_be_bytes());
    v.extend_from_slice(&s.target.unwrap_or(0).to_be_bytes());
    v.push(u8::from(sealed));
    v
}

/// `None` also for a count no cluster can have (0, or beyond `MAX_SHARDS`).
pub(crate) fn decode_cluster_state(buf: &[u8]) -> Option<(crate::placement::ClusterState, bool)> {
    use crate::placement::{ClusterState, MAX_SHARDS};
    let mut r = Reader::new(buf);
    let ok = |n: u32| (1..=MAX_SHARDS).contains(&n);
    let version = r.u8()?;
    let (v, committed, target) = (r.u64()?, r.u32()?, r.u32()?);
    let sealed = match version {
        MARK_V1 => false,
        MARK_V2 => match r.u8()? {
            0 => false,
            1 => true,
            _ => return None,
        },
        _ => return None,
    };
    (r.is_empty() && ok(committed) && (target == 0 || ok(target))).then_some((
        ClusterState {
            version: v,
            committed,
            target: (target > 0).then_some(target),
        },
        sealed,
    ))
}
