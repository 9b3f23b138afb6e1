//! The one error of the shard's API (subscribe and reads through [`Node`]),
//! in the three kinds a caller acts on differently — the model is sled's
//! `result.rs`, which keeps the caller's mistakes apart from the faults. Each
//! protocol maps it once, at its edge (`wire::error_status` for gRPC, the
//! WebSocket `error` message by [`Error::code`], HTTP by kind). The layers
//! below keep their own precise errors (`StoreError`, `CommitError`,
//! `PeerError`) and convert here.
//!
//! [`Node`]: crate::node::Node

use crate::{
    cluster::PeerError,
    committer::CommitError,
    domain::{ErrorCode, InputError},
    store::StoreError,
};

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The request is refused with a contract code (bad input,
    /// `symbol_limit`): retrying it unchanged gets the same answer.
    #[error("{message}")]
    Refused { code: ErrorCode, message: String },
    /// Retryable: the owner shard is unreachable, the shard is stopping, or
    /// the subscriber is gone.
    #[error("{0}")]
    Unavailable(String),
    /// A fault of this server (its store failed, a bug): its detail is
    /// logged where it happened and kept here for the server's own logs; a
    /// caller is told only that it was internal (store paths and keys are
    /// not a client's business).
    #[error("internal error (logged on the server)")]
    Fault(String),
}

impl Error {
    /// The contract code a client sees (a fault is `unavailable` to it: it
    /// may retry elsewhere).
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::Refused { code, .. } => *code,
            Error::Unavailable(_) | Error::Fault(_) => ErrorCode::Unavailable,
        }
    }

    pub fn unavailable(message: impl Into<String>) -> Error {
        Error::Unavailable(message.into())
    }
}

impl From<PeerError> for Error {
    fn from(e: PeerError) -> Self {
        match e {
            PeerError::Refused { code, message } => Error::Refused { code, message },
            e => Error::Unavailable(e.to_string()),
        }
    }
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        // (the one place a store fault becomes a caller's error: logged here)
        tracing::error!(error = %e, "a store read failed");
        Error::Fault(format!("store: {e}"))
    }
}

impl From<CommitError> for Error {
    fn from(e: CommitError) -> Self {
        match e {
            CommitError::SymbolLimit(_) => Error::Refused {
                code: ErrorCode::SymbolLimit,
                message: e.to_string(),
            },
            CommitError::StoreFailed(_) => Error::Fault(e.to_string()),
            CommitError::Stopped | CommitError::NotOwner(..) | CommitError::Move(_) => {
                Error::Unavailable(e.to_string())
            }
        }
    }
}

impl From<InputError> for Error {
    fn from(e: InputError) -> Self {
        Error::Refused {
            code: e.code(),
            message: e.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_layer_error_lands_in_its_kind() {
        let limit: Error = CommitError::SymbolLimit(5).into();
        assert_eq!(limit.code(), ErrorCode::SymbolLimit);
        assert!(matches!(limit, Error::Refused { .. }));
        let down: Error = PeerError::Down(3).into();
        assert_eq!(down, Error::Unavailable("shard 3 is unavailable".into()));
        let refused: Error = PeerError::Refused {
            code: ErrorCode::SymbolLimit,
            message: "full".into(),
        }
        .into();
        assert_eq!(refused.code(), ErrorCode::SymbolLimit);
        let failed: Error =
            CommitError::StoreFailed(std::sync::Arc::new(crate::store::StoreError::Bug("disk".into()))).into();
        assert!(matches!(&failed, Error::Fault(d) if d.contains("disk")));
        assert_eq!(
            failed.to_string(),
            "internal error (logged on the server)",
            "a fault's detail is not shown to callers"
        );
        assert_eq!(failed.code(), ErrorCode::Unavailable, "a fault is retryable elsewhere");
        let input: Error = InputError::InvalidRequest("no tick".into()).into();
        assert_eq!(input.code(), ErrorCode::InvalidRequest);
    }
}
