//! Entry points for the coverage-guided fuzz targets in `fuzz/` (see its
//! README): the protocol surfaces of this crate on arbitrary bytes. None may
//! panic; where a property holds it is asserted, so a violation is a crash
//! the fuzzer reports.

use std::{
    pin::Pin,
    sync::atomic::{AtomicU64, Ordering},
    task::{Context, Poll, Waker},
};

use fastwebsockets::{OpCode, Role, WebSocket};
use prost::Message as _;
use simd_json::Buffers;
use tickshard_proto::v1 as pb;
use tickshard_shard::{
    domain::{Epoch, Interval, Symbol, validate_publisher_id},
    rpc::parse_symbols,
    wire,
};
use tokio::io::{AsyncRead, ReadBuf};

use crate::{
    grpc::subscribe::sub_requests,
    ws::{
        client_read::{FrameTracker, MID_FRAME, Tracked},
        protocol::{self, Op},
        violation,
    },
};

/// The symbol limit the targets use (the default `--max-subscriptions`).
const MAX: usize = 1_000;

/// One WebSocket client message: parsed or refused with a code, in time
/// linear in its size; every list within the limit, symbols distinct.
pub fn ws_message(data: &[u8]) {
    let mut buffers = Buffers::default();
    let _ = protocol::id_only(&mut data.to_vec(), &mut buffers);
    let Ok(req) = protocol::parse(&mut data.to_vec(), &mut buffers, MAX) else {
        return;
    };
    if let Op::Subscribe { symbols, .. } | Op::Unsubscribe { symbols, .. } = &req.op {
        assert!(symbols.len() <= MAX && !symbols.is_empty());
        let distinct: std::collections::HashSet<_> = symbols.iter().collect();
        assert_eq!(distinct.len(), symbols.len(), "repeats count once");
    }
    if let Op::Subscribe { resume, .. } = &req.op {
        assert!(resume.len() <= MAX);
    }
}

/// A reader over fixed pieces: each read returns at most the next piece, as
/// a socket would; never pending; end of stream after the last.
struct Pieces {
    data: Vec<u8>,
    at: usize,
    cuts: Vec<usize>,
    next_cut: usize,
}

impl AsyncRead for Pieces {
    fn poll_read(mut self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let piece = self.cuts.get(self.next_cut).copied().unwrap_or(usize::MAX);
        self.next_cut += 1;
        let n = piece.min(self.data.len() - self.at).min(buf.remaining());
        let at = self.at;
        buf.put_slice(&self.data[at..at + n]);
        self.at += n;
        Poll::Ready(Ok(()))
    }
}

/// A frame as the reference parser sees it.
#[derive(Debug, PartialEq)]
struct RefFrame {
    end: usize,
    opcode: u8,
    fin: bool,
    masked: bool,
    rsv: bool,
    payload: Vec<u8>,
}

/// The frames of a whole stream, parsed at once (RFC 6455 §5.2), stopping at
/// the first incomplete one.
fn reference_frames(s: &[u8]) -> Vec<RefFrame> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while s.len() >= at + 2 {
        let (b0, b1) = (s[at], s[at + 1]);
        let masked = b1 & 0x80 != 0;
        let (len, mut head) = match b1 & 0x7f {
            126 if s.len() >= at + 4 => (u64::from(u16::from_be_bytes([s[at + 2], s[at + 3]])), 4),
            127 if s.len() >= at + 10 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&s[at + 2..at + 10]);
                (u64::from_be_bytes(b), 10)
            }
            126 | 127 => break,
            n => (u64::from(n), 2),
        };
        let mask = if masked {
            let Some(m) = s.get(at + head..at + head + 4) else {
                break;
            };
            head += 4;
            Some([m[0], m[1], m[2], m[3]])
        } else {
            None
        };
        let Some(end) = usize::try_from(len).ok().and_then(|l| (at + head).checked_add(l)) else {
            break;
        };
        let Some(raw) = s.get(at + head..end) else { break };
        let payload = raw
            .iter()
            .enumerate()
            .map(|(i, b)| mask.map_or(*b, |m| b ^ m[i % 4]))
            .collect();
        out.push(RefFrame {
            end,
            opcode: b0 & 0x0f,
            fin: b0 & 0x80 != 0,
            masked,
            rsv: b0 & 0x70 != 0,
            payload,
        });
        at = end;
    }
    out
}

/// What the reader refuses (fastwebsockets' checks and the tracker's mask check).
fn breaks_the_protocol(f: &RefFrame) -> bool {
    !f.masked
        || f.rsv
        || !matches!(f.opcode, 0 | 1 | 2 | 8 | 9 | 10)
        || f.opcode >= 8 && !f.fin
        || f.opcode >= 8 && f.payload.len() > 125
        || f.opcode == 1 && f.fin && std::str::from_utf8(&f.payload).is_err()
}

/// The client byte stream, cut at arbitrary points: the frame tracker is at a
/// boundary exactly where the reference parser says a frame ends, and the
/// reader, dropped and rebuilt whenever the tracker proves its buffer empty
/// (as the server does), returns exactly the reference frames in order, or
/// stops at a protocol violation with a close code.
/// Input: one byte `n`, `n` piece sizes, then the stream.
pub fn ws_frames(data: &[u8]) {
    let Some((&n, rest)) = data.split_first() else { return };
    let n = usize::from(n % 32).min(rest.len());
    let (cut_bytes, stream) = rest.split_at(n);
    let cuts: Vec<usize> = cut_bytes.iter().map(|&c| usize::from(c).max(1)).collect();
    let reference = reference_frames(stream);

    // 1. The tracker, piece by piece.
    let mut t = FrameTracker::default();
    let mut at = 0usize;
    for piece in cuts.iter().copied().chain(std::iter::repeat(64)) {
        if at >= stream.len() {
            break;
        }
        let end = (at + piece).min(stream.len());
        t.feed(&stream[at..end]);
        at = end;
        let done = reference.iter().filter(|f| f.end <= at).count() as u64;
        let on_boundary = reference.iter().any(|f| f.end == at);
        assert_eq!(t.at_boundary(), on_boundary.then_some(done), "after {at} bytes");
        if reference.iter().any(|f| f.end <= at && !f.masked) {
            assert!(t.saw_violation());
        }
    }

    // 2. The reader, recycled as the server does.
    let boundary = AtomicU64::new(0);
    let mut inner = Some(Pieces {
        data: stream.to_vec(),
        at: 0,
        cuts,
        next_cut: 0,
    });
    let mut active = None;
    let mut got = 0usize;
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        let ws = match (&mut active, inner.take()) {
            (Some(ws), _) => ws,
            (None, Some(raw)) => {
                let mut ws = WebSocket::after_handshake(Tracked::new(raw, got as u64, &boundary), Role::Server);
                ws.set_auto_close(false);
                ws.set_auto_pong(false);
                ws.set_max_message_size(65_537);
                active.insert(ws)
            }
            (None, None) => return,
        };
        let frame = {
            let mut fut = std::pin::pin!(ws.read_frame());
            match fut.as_mut().poll(&mut cx) {
                Poll::Ready(r) => r,
                Poll::Pending => panic!("the reader waited on an input that never waits"),
            }
        };
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                // A violation closes with 1002/1007; anything else is the
                // end of the stream (or a frame over the size limit).
                if let Some(close) = violation(&e) {
                    assert!(matches!(crate::ws::close_frame(close).0, 1002 | 1007));
                    let trailing = reference.last().map_or(0, |f| f.end) < stream.len();
                    assert!(
                        reference[got.min(reference.len())..].iter().any(breaks_the_protocol) || trailing,
                        "a violation ({e}) without a bad frame at or after frame {got}"
                    );
                }
                return;
            }
        };
        let want = reference
            .get(got)
            .unwrap_or_else(|| panic!("frame {got} beyond the stream"));
        assert_eq!(frame.opcode as u8, want.opcode, "frame {got}");
        assert_eq!(frame.fin, want.fin);
        assert_eq!(&*frame.payload, &want.payload[..], "frame {got}'s payload");
        assert!(frame.opcode != OpCode::Text || !frame.fin || std::str::from_utf8(&frame.payload).is_ok());
        got += 1;
        let b = boundary.load(Ordering::Relaxed);
        assert!(b == MID_FRAME || b >= got as u64);
        if b == got as u64
            && let Some(ws) = active.take()
        {
            inner = Some(ws.into_inner().into_inner());
        }
    }
}

/// gRPC requests as a client sends them: decoded with prost, then validated
/// as the server does. Input: one byte choosing the message, then its bytes.
pub fn grpc_requests(data: &[u8]) {
    let Some((&kind, msg)) = data.split_first() else { return };
    match kind % 7 {
        0 => {
            let Ok(r) = pb::PublishRequest::decode(msg) else { return };
            let _ = validate_publisher_id(&r.publisher_id);
            if let Some(t) = &r.tick
                && let Ok(tick) = wire::tick_from_pb(t)
            {
                let back = wire::tick_from_pb(&wire::tick_to_pb(&tick));
                assert_eq!(back.ok(), Some(tick), "an accepted tick converts back exactly");
            }
        }
        1 => {
            let Ok(r) = pb::SubscribeRequest::decode(msg) else {
                return;
            };
            if let Ok(reqs) = sub_requests(&r, MAX) {
                assert!(!reqs.is_empty() && reqs.len() <= MAX);
            }
        }
        2 => {
            let Ok(r) = pb::SnapshotRequest::decode(msg) else {
                return;
            };
            if let Ok(syms) = parse_symbols(&r.symbols, MAX) {
                assert!(syms.len() <= MAX);
            }
        }
        3 => {
            let Ok(r) = pb::HistoryRequest::decode(msg) else { return };
            let _ = Symbol::parse(&r.symbol);
            let _ = Interval::parse(&r.interval);
        }
        5 => {
            // A peer's hand-over part (contract §9): checked, and what passes
            // converts back to the same bytes' meaning.
            let Ok(c) = pb::MoveChunk::decode(msg) else { return };
            if let Ok(part) = wire::move_part_from_pb(&c) {
                let again = wire::move_part_from_pb(&wire::move_part_to_pb(&part));
                let again = again.unwrap_or_else(|e| panic!("an accepted hand-over part converts back: {e}"));
                assert_eq!(again.ticks, part.ticks);
                assert_eq!(again.candles, part.candles);
                assert_eq!(
                    again.last.map(|(r, d)| (r.last_seq, d.len())),
                    part.last.map(|(r, d)| (r.last_seq, d.len()))
                );
            }
        }
        6 => {
            let Ok(s) = pb::ClusterState::decode(msg) else { return };
            if let Some(st) = wire::cluster_state_from_pb(&s) {
                assert_eq!(wire::cluster_state_from_pb(&wire::cluster_state_to_pb(&st)), Some(st));
            }
        }
        _ => {
            let Ok(r) = pb::FollowRequest::decode(msg) else { return };
            if let Some(pb::follow_request::Kind::Follow(f)) = r.kind {
                let _ = Symbol::parse(&f.symbol);
                let _ = f.resume.map(|p| Epoch::parse(&p.epoch));
            }
        }
    }
}
