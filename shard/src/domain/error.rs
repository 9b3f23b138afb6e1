use std::fmt;

/// The stable error codes of the external contract (§4, §5). Clients switch on
/// these strings, so they never change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    BadJson,
    UnknownOp,
    InvalidSymbol,
    InvalidTick,
    TooManySubscriptions,
    RateLimited,
    MessageTooLarge,
    Unavailable,
    InvalidRequest,
    SymbolLimit,
    /// No (valid) credentials for what was asked (contract §8).
    Unauthorized,
    /// Authenticated, but not entitled to that symbol (contract §8).
    Forbidden,
    /// The connection's token expired without a refresh (contract §8).
    TokenExpired,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 13] = [
        ErrorCode::BadJson,
        ErrorCode::UnknownOp,
        ErrorCode::InvalidSymbol,
        ErrorCode::InvalidTick,
        ErrorCode::TooManySubscriptions,
        ErrorCode::RateLimited,
        ErrorCode::MessageTooLarge,
        ErrorCode::Unavailable,
        ErrorCode::InvalidRequest,
        ErrorCode::SymbolLimit,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::TokenExpired,
    ];

    /// The code a client sent back (a peer's ack); `None` if unknown.
    pub fn parse(s: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadJson => "bad_json",
            ErrorCode::UnknownOp => "unknown_op",
            ErrorCode::InvalidSymbol => "invalid_symbol",
            ErrorCode::InvalidTick => "invalid_tick",
            ErrorCode::TooManySubscriptions => "too_many_subscriptions",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::MessageTooLarge => "message_too_large",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::SymbolLimit => "symbol_limit",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::TokenExpired => "token_expired",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A caller mistake: bad input that is rejected with a contract error code.
/// It never indicates a fault of the server.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    #[error("symbol '{shown}' {why}")]
    InvalidSymbol { shown: String, why: &'static str },
    #[error("{0}")]
    InvalidTick(String),
    /// A request that is malformed as a whole (not its tick): a bad
    /// `publisher_id`, a missing tick.
    #[error("{0}")]
    InvalidRequest(String),
}

impl InputError {
    pub fn code(&self) -> ErrorCode {
        match self {
            InputError::InvalidSymbol { .. } => ErrorCode::InvalidSymbol,
            InputError::InvalidTick(_) => ErrorCode::InvalidTick,
            InputError::InvalidRequest(_) => ErrorCode::InvalidRequest,
        }
    }
}
