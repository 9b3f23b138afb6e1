//! Files re-read when they change (TLS certificates and keys, JWT verification
//! keys): one `stat` per file every [`CHECK_EVERY`], compared with the last.
//! Rebuilding is the owner's job ([`Reload`]); an error keeps what is in force.

use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio_util::sync::CancellationToken;

/// How often watched files are checked.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);

/// What identifies a file's content without reading it: a rotation replaces
/// the file (or the symlink a Kubernetes Secret volume swaps), which changes
/// at least one of these.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: i64,
    mtime_nsec: i64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    std::fs::metadata(path).ok().map(|m| Stamp {
        dev: m.dev(),
        ino: m.ino(),
        len: m.len(),
        mtime: m.mtime(),
        mtime_nsec: m.mtime_nsec(),
    })
}

/// A set of files and how they looked when last read.
pub struct Watched {
    paths: Vec<PathBuf>,
    state: Mutex<Seen>,
}

struct Seen {
    /// The files as they were when last read successfully.
    taken: Vec<Option<Stamp>>,
    /// The files as they were when a rebuild last failed (reported once;
    /// retried every check until it works or they change again).
    failed: Option<Vec<Option<Stamp>>>,
}

impl Watched {
    /// Takes the files' stamps now (call it before reading them).
    pub fn new(paths: Vec<PathBuf>) -> Watched {
        let taken = paths.iter().map(|p| stamp(p)).collect();
        Watched {
            paths,
            state: Mutex::new(Seen { taken, failed: None }),
        }
    }

    /// Runs `rebuild` if any file changed since the last successful one:
    /// `None` when nothing changed (or a failure already reported repeats:
    /// it is retried at every check, since a transient error such as EMFILE
    /// must not make a rotation wait for the next one), else its result.
    pub fn rebuild_if_changed(&self, rebuild: impl FnOnce() -> Result<(), String>) -> Option<Result<(), String>> {
        let now: Vec<_> = self.paths.iter().map(|p| stamp(p)).collect();
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.taken == now {
            return None;
        }
        match rebuild() {
            Ok(()) => {
                st.taken = now;
                st.failed = None;
                Some(Ok(()))
            }
            Err(_) if st.failed.as_ref() == Some(&now) => None,
            Err(e) => {
                st.failed = Some(now);
                Some(Err(e))
            }
        }
    }
}

/// Something built from files and rebuilt when they change.
pub trait Reload: Send + Sync + 'static {
    /// `None` when nothing changed; else whether the new files were taken (an
    /// error leaves the previous ones in force).
    fn reload_if_changed(&self) -> Option<Result<(), String>>;
    /// What the log and the metric call it (`tls`, `peer_tls`, `auth_keys`).
    fn what(&self) -> &'static str;
}

/// Checks `r`'s files every [`CHECK_EVERY`] until `stop` (the reads, a few
/// KiB once per change, on the blocking pool).
pub async fn watch(r: Arc<dyn Reload>, stop: CancellationToken) {
    let mut every = tokio::time::interval(CHECK_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let what = r.what();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        let me = r.clone();
        let result = match tokio::task::spawn_blocking(move || me.reload_if_changed()).await {
            Ok(None) => continue,
            Ok(Some(r)) => r,
            Err(e) => Err(format!("reload task failed: {e}")),
        };
        match &result {
            Ok(()) => tracing::info!(what, "files changed: reloaded"),
            Err(e) => tracing::warn!(what, error = %e, "files changed but cannot be used; keeping the previous ones"),
        }
        let label = if result.is_ok() { "ok" } else { "error" };
        metrics::counter!(tickshard_shard::metrics::RELOADS, "what" => what, "result" => label).increment(1);
    }
}
