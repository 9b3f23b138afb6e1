//! An outbox drained as a stream of protocol events: the one piece both the
//! public `Feed.Subscribe` and the peer `Cluster.Follow` use. Each hub item is
//! rendered into events (a chunk becomes one event per tick), written weight
//! is reported back to the outbox (so stalls are detected and repaired), and
//! a close ends the stream with its reason (the protocol maps it, e.g.
//! `wire::close_status`).

use std::{collections::VecDeque, sync::Arc};

use futures_util::{Stream, stream};

use crate::hub::{AfterWrite, Close, Data, Hub, Msg, Outbox};

struct State<E, G, R> {
    outbox: Arc<Outbox<E>>,
    hub: Arc<Hub>,
    render: R,
    queue: VecDeque<Msg<E>>,
    /// Rendered events not yet yielded (the rest of a chunk).
    ready: VecDeque<E>,
    /// Weight taken from the outbox and not yet reported written.
    taken: usize,
    close: Option<Close>,
    done: bool,
    /// Dropped with the stream (when the client goes away): its cleanup.
    _guard: G,
}

/// The events of `outbox` as a stream. `render` turns one hub item into zero
/// or more events; `guard` is dropped when the stream is (client gone).
pub fn outbox_events<E, G, R>(
    outbox: Arc<Outbox<E>>,
    hub: Arc<Hub>,
    guard: G,
    render: R,
) -> impl Stream<Item = Result<E, Close>> + Send
where
    E: Send + 'static,
    G: Send + 'static,
    R: FnMut(Data, &mut VecDeque<E>) + Send + 'static,
{
    let st = State {
        outbox,
        hub,
        render,
        queue: VecDeque::new(),
        ready: VecDeque::new(),
        taken: 0,
        close: None,
        done: false,
        _guard: guard,
    };
    stream::unfold(st, |mut st| async move {
        loop {
            if st.done {
                return None;
            }
            if let Some(ev) = st.ready.pop_front() {
                return Some((Ok(ev), st));
            }
            if let Some(msg) = st.queue.pop_front() {
                match msg {
                    Msg::Control(ev, w) => {
                        st.taken += w;
                        return Some((Ok(ev), st));
                    }
                    Msg::Data(d) => {
                        st.taken += d.weight();
                        (st.render)(d, &mut st.ready);
                        continue;
                    }
                }
            }
            if let Some(c) = st.close.take() {
                st.done = true;
                return Some((Err(c), st));
            }
            let outbox = st.outbox.clone();
            if let AfterWrite::Repair(stalled) = outbox.written(std::mem::take(&mut st.taken)) {
                st.hub.repair(outbox.id(), &stalled);
            }
            st.close = outbox.take(&mut st.queue).await;
        }
    })
}
