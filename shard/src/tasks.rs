//! The one way the server spawns a task: on a [`TaskTracker`] that the drain
//! waits for, inside the span of the code that spawned it (so a task's logs
//! carry its connection's or stream's fields). A bare `tokio::spawn` (or a
//! tracker's own `spawn`) is refused by clippy (`disallowed-methods` in
//! `.clippy.toml`).

use tokio::task::JoinHandle;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

/// Spawns `fut` on `tracker`, in the current span.
#[expect(clippy::disallowed_methods, reason = "the one place a task is spawned")]
pub fn spawn<F>(tracker: &TaskTracker, fut: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    tracker.spawn(fut.in_current_span())
}

/// Spawns `fut` on `tracker`, in the current span, on the runtime `rt`
/// (`None`: the current one, as [`spawn`]).
#[expect(
    clippy::disallowed_methods,
    reason = "the one place a task is spawned on another runtime"
)]
pub fn spawn_on<F>(tracker: &TaskTracker, rt: Option<&tokio::runtime::Handle>, fut: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    match rt {
        Some(rt) => tracker.spawn_on(fut.in_current_span(), rt),
        None => spawn(tracker, fut),
    }
}
