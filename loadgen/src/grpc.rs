//! The gRPC publisher: K `Feed.Publish` streams with a window of unacked
//! requests, recording ack latency.

use std::sync::{
    Arc,
    atomic::{AtomicBool, AtomicU64, Ordering},
};

use hdrhistogram::Histogram;
use tickshard_proto::v1::{self as pb, feed_client::FeedClient};
use tokio::sync::{Mutex, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::{
    measure::{hist, now_us},
    pacer::Pacer,
    workload::Picker,
};

#[allow(clippy::too_many_arguments)]
pub(crate) async fn publisher(
    k: usize,
    url: String,
    symbols: Vec<String>,
    mut picker: Picker,
    rate: u64,
    window: usize,
    stop: CancellationToken,
    recording: Arc<AtomicBool>,
    published: Arc<AtomicU64>,
    ack_hists: Arc<Mutex<Vec<Histogram<u64>>>>,
    access: crate::raw_ws::Access,
) -> Result<(), String> {
    let channel = tickshard_client::tls::endpoint(&url, access.trust.as_ref())
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let mut client = FeedClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::PublishRequest>(window);
    let mut out = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    if let Some(t) = &access.token {
        let v = format!("Bearer {t}")
            .parse()
            .map_err(|_| "the token is not header text".to_string())?;
        out.metadata_mut().insert("authorization", v);
    }
    let mut acks = client.publish(out).await.map_err(|e| e.to_string())?.into_inner();
    let ring: Arc<Vec<AtomicU64>> = Arc::new((0..window * 2).map(|_| AtomicU64::new(0)).collect());
    let permits = Arc::new(Semaphore::new(window));
    let reader = {
        let (ring, permits, recording, published, stop) = (
            ring.clone(),
            permits.clone(),
            recording.clone(),
            published.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            let mut h = hist();
            loop {
                let m = tokio::select! {
                    _ = stop.cancelled() => break,
                    m = acks.message() => m,
                };
                let Ok(Some(ack)) = m else { break };
                permits.add_permits(1);
                if ack.error.is_some() {
                    continue;
                }
                published.fetch_add(1, Ordering::Relaxed);
                if recording.load(Ordering::Relaxed) {
                    let sent = ring[(ack.request_id as usize) % ring.len()].load(Ordering::Relaxed);
                    let _ = h.record(now_us().saturating_sub(sent).max(1));
                }
            }
            h
        })
    };
    let publisher_id = format!("bench-{k}-{}", now_us());
    let mut pseq = vec![0u64; symbols.len()];
    let mut id = 0u64;
    let mut pace = Pacer::new(rate);
    loop {
        let Some(batch) = pace.next(&stop, window as u64 / 4).await else {
            break;
        };
        for _ in 0..batch {
            let permit = tokio::select! {
                _ = stop.cancelled() => break,
                p = permits.acquire() => p,
            };
            let Ok(permit) = permit else { break };
            permit.forget();
            id += 1;
            let ts = now_us();
            let s = picker.pick(ts);
            pseq[s] += 1;
            ring[(id as usize) % ring.len()].store(ts, Ordering::Relaxed);
            let req = pb::PublishRequest {
                request_id: id,
                publisher_id: publisher_id.clone(),
                publisher_seq: pseq[s],
                tick: Some(pb::Tick {
                    symbol: symbols[s].clone(),
                    ts_micros: ts as i64,
                    price: "67012.50".into(),
                    size: "0.01".into(),
                    bid: "67012.40".into(),
                    ask: "67012.60".into(),
                    ..Default::default()
                }),
            };
            if tx.send(req).await.is_err() {
                return Err("publish stream closed".into());
            }
        }
        if stop.is_cancelled() {
            break;
        }
    }
    drop(tx);
    if let Ok(h) = reader.await {
        ack_hists.lock().await.push(h);
    }
    Ok(())
}
