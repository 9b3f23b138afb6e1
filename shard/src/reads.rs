//! Reads of market data, in domain types, routed to the owner: what the gRPC
//! `Feed` (GetSnapshot, GetHistory, ListSymbols), the WebSocket `symbols` op
//! and the HTTP candles endpoint ask, and what the peer service answers from
//! this pod's own data. Each protocol converts at its edge (`wire` for gRPC).

use std::sync::{Arc, atomic::Ordering};

use crate::{
    Error,
    domain::{HISTORY_LIMIT_MAX, History, HistoryQuery, LastTick, Symbol, SymbolInfo},
    node::Node,
    store::StoreError,
};

/// Keeps the first `limit` items; true if there were more (read `limit + 1`
/// to know).
fn truncate<T>(items: &mut Vec<T>, limit: usize) -> bool {
    let more = items.len() > limit;
    items.truncate(limit);
    more
}

impl Node {
    /// History of a symbol this pod owns, asked by a peer; `limit` is
    /// clamped to [`HISTORY_LIMIT_MAX`]. One this pod handed over while the
    /// rebalance runs comes from the new owner (peers that still route by
    /// the committed map ask here); for any other symbol it does not own the
    /// caller's map is stale, and the answer is `unavailable`: what is here
    /// (if anything) is not the symbol's history.
    pub async fn local_history(&self, symbol: Symbol, q: HistoryQuery, limit: usize) -> Result<History, Error> {
        self.check_peer_read(&symbol)?;
        self.history(symbol, q, limit).await
    }

    /// A peer's read of `symbol` (the peer routed it here as to its owner):
    /// `unavailable` if this pod neither owns nor handed over the symbol (the
    /// peer's map is stale), or while the symbol is settling here.
    fn check_peer_read(&self, symbol: &Symbol) -> Result<(), Error> {
        self.check_settled(symbol)?;
        if self.placement().moved_to(symbol).is_none() && self.owner_link(symbol)?.is_some() {
            return Err(Error::Unavailable(format!(
                "shard {} does not own {symbol}; retry",
                self.placement().me()
            )));
        }
        Ok(())
    }

    /// History of any symbol, from its owner.
    pub async fn history(&self, symbol: Symbol, q: HistoryQuery, limit: usize) -> Result<History, Error> {
        self.check_settled(&symbol)?;
        let peer = match self.owner_link(&symbol)? {
            Some(peer) => peer,
            None => {
                let h = self.local_history_here(symbol, q, limit).await?;
                match self.owner_link(&symbol)? {
                    None => return Ok(h),
                    Some(peer) => peer,
                }
            }
        };
        Ok(peer.history(symbol, q, limit).await?)
    }

    async fn local_history_here(&self, symbol: Symbol, q: HistoryQuery, limit: usize) -> Result<History, StoreError> {
        let limit = limit.min(HISTORY_LIMIT_MAX);
        let epoch = self.head(&symbol).map(|h| h.epoch);
        let mut h = History {
            epoch,
            ..History::default()
        };
        match q {
            HistoryQuery::Ticks { from, to } => {
                h.ticks = self.read_local_ticks(symbol, from.max(1), to, limit + 1).await?;
                h.truncated = truncate(&mut h.ticks, limit);
            }
            HistoryQuery::Candles { interval, from, to } => {
                h.candles = self.read_local_candles(symbol, interval, from, to, limit + 1).await?;
                h.truncated = truncate(&mut h.candles, limit);
            }
        }
        Ok(h)
    }

    /// The latest tick of each symbol this pod owns (symbols without ticks
    /// are left out); those it handed over come from their new owner. A
    /// symbol it neither owns nor handed over (a caller with a stale map) is
    /// answered `unavailable`: what this pod may hold of it is a mirror that
    /// can lag, or nothing (the symbol would be left out as if it had no
    /// ticks).
    pub async fn local_snapshots(&self, symbols: &[Symbol]) -> Result<Vec<LastTick>, Error> {
        for s in symbols {
            self.check_peer_read(s)?;
        }
        let (moved, here): (Vec<Symbol>, Vec<Symbol>) =
            symbols.iter().partition(|s| self.placement().moved_to(s).is_some());
        let mut out = self.snapshots_here(&here);
        if !moved.is_empty() {
            out.extend(self.snapshots(&moved).await?);
        }
        Ok(out)
    }

    fn snapshots_here(&self, symbols: &[Symbol]) -> Vec<LastTick> {
        symbols
            .iter()
            .filter_map(|s| self.head(s))
            .filter_map(|h| h.last.map(|tick| LastTick { epoch: h.epoch, tick }))
            .collect()
    }

    /// The latest tick of each symbol, from their owners (symbols without
    /// ticks are left out).
    pub async fn snapshots(&self, symbols: &[Symbol]) -> Result<Vec<LastTick>, Error> {
        let own = self.placement();
        let local: Vec<Symbol> = symbols.iter().copied().filter(|s| own.is_local(s)).collect();
        let mut out = self.snapshots_here(&local);
        if let Some(cluster) = self.cluster() {
            for peer in cluster.peers() {
                let theirs: Vec<Symbol> = symbols.iter().copied().filter(|s| own.owner(s) == peer.id).collect();
                if !theirs.is_empty() {
                    out.extend(peer.snapshots(&theirs).await?);
                }
            }
        }
        Ok(out)
    }

    /// Every symbol with ticks that this pod owns, sorted.
    pub fn local_symbols(&self) -> Vec<SymbolInfo> {
        let own = self.placement();
        self.symbols()
            .into_iter()
            .map(|(symbol, h)| SymbolInfo {
                symbol,
                owner: own.owner(&symbol),
                seq: h.seq,
                epoch: h.epoch,
            })
            .collect()
    }

    /// Every symbol with ticks on any shard, sorted. Shards that cannot be
    /// reached are left out (and logged): the list is what is known now.
    ///
    /// A list costs a call to every peer and a sort of every symbol, however
    /// short the request: callers that arrive while one is being made share
    /// the next one (made once that one is done, so it starts after each of
    /// them arrived and misses nothing they could have seen).
    pub async fn all_symbols(&self) -> Arc<Vec<SymbolInfo>> {
        let lists = &self.symbol_lists;
        // a list made from here on started after this call arrived
        let want = lists.started.load(Ordering::SeqCst) + 1;
        let mut done = lists.done.lock().await;
        if let Some((made, list)) = &*done
            && *made >= want
        {
            return list.clone();
        }
        let made = lists.started.fetch_add(1, Ordering::SeqCst) + 1;
        let list = Arc::new(self.make_symbol_list().await);
        *done = Some((made, list.clone()));
        list
    }

    async fn make_symbol_list(&self) -> Vec<SymbolInfo> {
        let mut out = self.local_symbols();
        if let Some(cluster) = self.cluster() {
            let calls = cluster
                .peers()
                .into_iter()
                .map(|p| async move { (p.id, p.symbols().await) });
            for (id, r) in futures_util::future::join_all(calls).await {
                match r {
                    Ok(r) => out.extend(r),
                    Err(e) => tracing::warn!(peer = id, error = %e, "symbol list without this shard"),
                }
            }
        }
        out.sort_by_key(|i| i.symbol);
        out
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    /// Symbol lists asked while one is being made share the next one; a
    /// list asked after one is done is made anew (it misses nothing).
    #[tokio::test(flavor = "current_thread")]
    async fn symbol_lists_asked_meanwhile_share_the_next_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let node = crate::node::test_node(dir.path(), 1, 100);
        let lists = &node.symbol_lists;
        node.all_symbols().await;
        node.all_symbols().await;
        assert_eq!(
            lists.started.load(Ordering::SeqCst),
            2,
            "one list per call, one after another"
        );
        // a list being made (the test holds it), and five callers meanwhile
        let making = lists.done.lock().await;
        lists.started.fetch_add(1, Ordering::SeqCst);
        let tracker = tokio_util::task::TaskTracker::new();
        let callers: Vec<_> = (0..5)
            .map(|_| {
                let node = node.clone();
                crate::tasks::spawn(&tracker, async move { node.all_symbols().await })
            })
            .collect();
        for _ in 0..10 {
            tokio::task::yield_now().await; // (each caller reaches the lock)
        }
        drop(making);
        for c in callers {
            c.await.expect("caller");
        }
        assert_eq!(lists.started.load(Ordering::SeqCst), 4, "the five shared one list");
        node.shutdown().await;
    }
}
