//! Authentication and entitlements (contract §8): JWT bearer tokens verified
//! with keys from `--auth-jwks` (RS256, ES256, EdDSA, chosen by `kid`) and/or
//! `--auth-hs256-secret-file`, re-read when the files change; `exp` required,
//! [`LEEWAY_SECS`] of clock leeway, issuer and audience checked when set. The
//! `tickshard` claim lists the symbol patterns a caller may `subscribe` to and
//! `publish`; callers without a token get what `--anonymous` grants.
//!
//! Everything here is protocol-free: the WebSocket and gRPC edges take the
//! token where their protocol carries it and ask [`Auth::verify`].

use std::{
    collections::HashSet,
    path::PathBuf,
    sync::{Arc, RwLock},
    time::{SystemTime, UNIX_EPOCH},
};

use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind, jwk::JwkSet};
use serde::Deserialize;

use crate::watch::{Reload, Watched};

/// Clock leeway on `exp` (and `nbf`), seconds.
pub const LEEWAY_SECS: u64 = 30;
/// The longest token accepted, bytes (a larger one is `unauthorized` unread).
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// Most patterns in one claim list.
pub const MAX_PATTERNS: usize = 1_000;
/// The longest `sub` accepted, bytes (it scopes the caller's publisher ids).
pub const MAX_SUB_BYTES: usize = 256;

/// What callers without a token may do (`--anonymous`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Anonymous {
    /// Nothing: every call needs a token.
    None,
    /// Read every symbol; publishing needs a token (a public dashboard).
    Subscribe,
    /// Read and publish everything (the laptop default).
    All,
}

/// The authentication configuration, from the flags.
#[derive(Clone, Debug, Default)]
pub struct AuthConfig {
    pub jwks: Option<PathBuf>,
    pub hs256_secret: Option<PathBuf>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    /// `None`: the contract's default (`all` without keys, `none` with).
    pub anonymous: Option<Anonymous>,
}

/// The symbols one right covers: exact symbols, prefixes (`EQ.*`) or all (`*`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Patterns {
    all: bool,
    exact: HashSet<String>,
    prefixes: HashSet<String>,
}

impl Patterns {
    pub fn everything() -> Patterns {
        Patterns {
            all: true,
            ..Patterns::default()
        }
    }

    pub fn nothing() -> Patterns {
        Patterns::default()
    }

    /// Parses a claim list (at most [`MAX_PATTERNS`]). A pattern is a
    /// symbol (contract §8), so it is case-insensitive like one: it is
    /// upper-cased, as symbols are on input.
    pub fn parse(list: &[String]) -> Result<Patterns, String> {
        if list.len() > MAX_PATTERNS {
            return Err(format!("more than {MAX_PATTERNS} patterns in one list"));
        }
        let mut p = Patterns::default();
        for pat in list {
            let pat = pat.to_ascii_uppercase();
            match pat.strip_suffix('*') {
                Some("") => p.all = true,
                Some(prefix) => {
                    p.prefixes.insert(prefix.to_owned());
                }
                None => {
                    p.exact.insert(pat);
                }
            }
        }
        Ok(p)
    }

    /// Does this right cover `symbol`? One lookup per prefix of the symbol
    /// (symbols are at most 32 bytes), whatever the number of patterns.
    pub fn allows(&self, symbol: &str) -> bool {
        self.all
            || self.exact.contains(symbol)
            || (!self.prefixes.is_empty()
                && (0..=symbol.len())
                    .filter(|&k| symbol.is_char_boundary(k))
                    .any(|k| self.prefixes.contains(&symbol[..k])))
    }

    /// Covers every symbol.
    pub fn is_all(&self) -> bool {
        self.all
    }

    /// The symbols of `symbols` this right does not cover, for a message
    /// (`A, B (and 3 more)`: at most ten named); `None` if it covers them all.
    pub fn denied<'a>(&self, symbols: impl IntoIterator<Item = &'a str>) -> Option<String> {
        const NAMED: usize = 10;
        let mut named = Vec::new();
        let mut n = 0;
        for s in symbols {
            if !self.allows(s) {
                n += 1;
                if named.len() < NAMED {
                    named.push(s);
                }
            }
        }
        (n > 0).then(|| {
            let more = n - named.len();
            let list = named.join(", ");
            if more > 0 {
                format!("{list} (and {more} more)")
            } else {
                list
            }
        })
    }

    /// Grants nothing at all.
    pub fn is_empty(&self) -> bool {
        !self.all && self.exact.is_empty() && self.prefixes.is_empty()
    }
}

/// Who a caller is and what it may do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// The token's `sub`; `None` for an anonymous caller.
    pub sub: Option<String>,
    /// The token's `exp` (Unix seconds); `None` for an anonymous caller.
    pub exp: Option<u64>,
    pub subscribe: Patterns,
    pub publish: Patterns,
}

impl Principal {
    /// Unix seconds after which the token no longer counts (`exp` + leeway).
    pub fn lapses_at(&self) -> Option<u64> {
        self.exp.map(|e| e.saturating_add(LEEWAY_SECS))
    }

    /// May it read at all (anything but `auth` and `ping` on a WebSocket)?
    pub fn may_read(&self) -> bool {
        !self.subscribe.is_empty()
    }

    pub fn is_authenticated(&self) -> bool {
        self.sub.is_some()
    }

    /// When the token lapses, on the runtime's clock.
    pub fn lapse_instant(&self) -> Option<tokio::time::Instant> {
        self.lapses_at().map(|at| {
            let left = at.saturating_sub(now_secs()).min(MAX_EXP_AHEAD_SECS + LEEWAY_SECS);
            tokio::time::Instant::now() + std::time::Duration::from_secs(left)
        })
    }

    /// Why this caller may not read `symbols`, if it may not: `Unauthorized`
    /// (anonymous without the right to read) or `Forbidden` naming them.
    pub fn check_read<'a>(&self, symbols: impl IntoIterator<Item = &'a str>) -> Result<(), Denied> {
        if !self.may_read() && !self.is_authenticated() {
            return Err(Denied::Unauthorized);
        }
        match self.subscribe.denied(symbols) {
            None => Ok(()),
            Some(list) => Err(Denied::Forbidden(format!("not entitled to read {list}"))),
        }
    }

    /// The publishing caller, in the shard's terms.
    pub fn publisher(&self) -> tickshard_shard::publish::Caller {
        let may_publish: Option<tickshard_shard::publish::SymbolCheck> = if self.publish.is_all() {
            None
        } else {
            let p = self.publish.clone();
            Some(Arc::new(move |s: &str| p.allows(s)))
        };
        tickshard_shard::publish::Caller {
            sub: self.sub.as_deref().map(Arc::from),
            may_publish,
            until: self.lapse_instant(),
        }
    }
}

/// A refused read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Denied {
    /// No token, and anonymous callers may not read: `unauthorized`.
    Unauthorized,
    /// Symbols the caller may not read, named: `forbidden`.
    Forbidden(String),
}

impl Denied {
    /// Counts it (`protocol`: `ws` or `grpc`).
    pub fn counted(self, protocol: &'static str) -> Denied {
        if let Denied::Forbidden(_) = self {
            metrics::counter!(tickshard_shard::metrics::FORBIDDEN, "protocol" => protocol, "right" => "subscribe")
                .increment(1);
        } else {
            AuthError::Missing.counted();
        }
        self
    }
}

/// Why a token was not accepted; `reason` labels the metric.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("a token is required")]
    Missing,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid: {0}")]
    Invalid(String),
    #[error("the token's signature does not verify")]
    BadSignature,
    #[error("the token's key is not known (kid {0:?})")]
    UnknownKey(Option<String>),
    #[error("the token's issuer is not accepted")]
    WrongIssuer,
    #[error("the token's audience is not accepted")]
    WrongAudience,
}

impl AuthError {
    /// The label of `tickshard_auth_failures_total{reason}`.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Expired => "expired",
            AuthError::Invalid(_) => "invalid",
            AuthError::BadSignature => "bad_signature",
            AuthError::UnknownKey(_) => "unknown_key",
            AuthError::WrongIssuer => "wrong_issuer",
            AuthError::WrongAudience => "wrong_audience",
        }
    }

    /// Counts it (every refusal of a token goes through here).
    pub fn counted(self) -> AuthError {
        metrics::counter!(tickshard_shard::metrics::AUTH_FAILURES, "reason" => self.reason()).increment(1);
        self
    }
}

/// A key file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {what}")]
pub struct KeyError {
    pub path: PathBuf,
    pub what: String,
}

/// The verification keys in force.
#[derive(Default)]
struct Keys {
    hs256: Option<DecodingKey>,
    /// `(kid, algorithm, key)` of every usable JWKS entry.
    jwks: Vec<(Option<String>, Algorithm, DecodingKey)>,
}

fn load_keys(cfg: &AuthConfig) -> Result<Keys, KeyError> {
    let mut keys = Keys::default();
    if let Some(path) = &cfg.hs256_secret {
        let err = |what: String| KeyError {
            path: path.clone(),
            what,
        };
        let secret = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        let secret = secret_of(&secret);
        if secret.len() < 32 {
            return Err(err(format!(
                "the HS256 secret is {} bytes; use at least 32",
                secret.len()
            )));
        }
        keys.hs256 = Some(DecodingKey::from_secret(secret));
    }
    if let Some(path) = &cfg.jwks {
        let err = |what: String| KeyError {
            path: path.clone(),
            what,
        };
        let text = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        let set: JwkSet = serde_json::from_slice(&text).map_err(|e| err(format!("not a JWKS: {e}")))?;
        use jsonwebtoken::jwk::{AlgorithmParameters as P, EllipticCurve, KeyAlgorithm, PublicKeyUse};
        for jwk in &set.keys {
            let kid = &jwk.common.key_id;
            // only signature keys of the three accepted algorithms; others
            // (encryption keys, PS256, P-384, symmetric) are skipped, not fatal
            let alg = match (&jwk.algorithm, jwk.common.key_algorithm) {
                (P::RSA(_), None | Some(KeyAlgorithm::RS256)) => Some(Algorithm::RS256),
                (P::EllipticCurve(p), None | Some(KeyAlgorithm::ES256)) if p.curve == EllipticCurve::P256 => {
                    Some(Algorithm::ES256)
                }
                (P::OctetKeyPair(p), None | Some(KeyAlgorithm::EdDSA)) if p.curve == EllipticCurve::Ed25519 => {
                    Some(Algorithm::EdDSA)
                }
                _ => None,
            };
            let usable = !matches!(
                jwk.common.public_key_use,
                Some(PublicKeyUse::Encryption | PublicKeyUse::Other(_))
            );
            let Some(alg) = alg.filter(|_| usable) else {
                tracing::warn!(file = %path.display(), ?kid, "JWKS entry skipped: not an RS256, ES256 (P-256) or EdDSA (Ed25519) signature key");
                continue;
            };
            let key = DecodingKey::from_jwk(jwk).map_err(|e| err(format!("key {kid:?}: {e}")))?;
            keys.jwks.push((kid.clone(), alg, key));
        }
        if keys.jwks.is_empty() {
            return Err(err("the JWKS has no usable keys (RS256, ES256, EdDSA)".into()));
        }
    }
    Ok(keys)
}

/// The secret in a secret file: without one trailing newline (`echo … >
/// file`); every other byte counts.
fn secret_of(file: &[u8]) -> &[u8] {
    file.strip_suffix(b"\r\n")
        .or_else(|| file.strip_suffix(b"\n"))
        .unwrap_or(file)
}

/// The latest `exp` accepted: ten years ahead (a later one is a mistake,
/// and would overflow the runtime's clock).
pub const MAX_EXP_AHEAD_SECS: u64 = 10 * 365 * 86_400;

/// The `tickshard` claim.
#[derive(Deserialize, Default)]
struct Entitlements {
    subscribe: Option<Vec<String>>,
    publish: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    exp: u64,
    #[serde(default)]
    tickshard: Option<Entitlements>,
}

/// The verifier: keys (re-read on change), checks, the anonymous grant.
pub struct Auth {
    cfg: AuthConfig,
    anonymous: Anonymous,
    keys: RwLock<Arc<Keys>>,
    watched: Watched,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("anonymous", &self.anonymous)
            .field("keys", &self.has_keys())
            .finish()
    }
}

impl Auth {
    /// Reads the key files once; the server does not start with a bad one.
    pub fn load(cfg: AuthConfig) -> Result<Arc<Auth>, KeyError> {
        let watched = Watched::new(cfg.jwks.iter().chain(cfg.hs256_secret.iter()).cloned().collect());
        let keys = load_keys(&cfg)?;
        let configured = cfg.jwks.is_some() || cfg.hs256_secret.is_some();
        let anonymous = cfg
            .anonymous
            .unwrap_or(if configured { Anonymous::None } else { Anonymous::All });
        Ok(Arc::new(Auth {
            cfg,
            anonymous,
            keys: RwLock::new(Arc::new(keys)),
            watched,
        }))
    }

    /// Anyone may do anything (no keys, `--anonymous all` by default).
    pub fn open() -> Arc<Auth> {
        Arc::new(Auth {
            cfg: AuthConfig::default(),
            anonymous: Anonymous::All,
            keys: RwLock::new(Arc::new(Keys::default())),
            watched: Watched::new(Vec::new()),
        })
    }

    pub fn has_keys(&self) -> bool {
        self.cfg.jwks.is_some() || self.cfg.hs256_secret.is_some()
    }

    pub fn anonymous_mode(&self) -> Anonymous {
        self.anonymous
    }

    /// What a caller without a token gets.
    pub fn anonymous(&self) -> Principal {
        let (subscribe, publish) = match self.anonymous {
            Anonymous::None => (Patterns::nothing(), Patterns::nothing()),
            Anonymous::Subscribe => (Patterns::everything(), Patterns::nothing()),
            Anonymous::All => (Patterns::everything(), Patterns::everything()),
        };
        Principal {
            sub: None,
            exp: None,
            subscribe,
            publish,
        }
    }

    /// The caller of an `Authorization` header value (`Bearer …`); no header
    /// is the anonymous caller.
    pub fn from_bearer(&self, header: Option<&[u8]>) -> Result<Principal, AuthError> {
        let Some(h) = header else {
            return Ok(self.anonymous());
        };
        // (the scheme is case-insensitive, RFC 9110 §11.1)
        let token = h
            .split_at_checked(7)
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case(b"Bearer "))
            .map(|(_, token)| token)
            .ok_or_else(|| AuthError::Invalid("expected 'Authorization: Bearer <token>'".into()).counted())?;
        let token =
            std::str::from_utf8(token).map_err(|_| AuthError::Invalid("the token is not text".into()).counted())?;
        self.verify(token.trim())
    }

    /// Verifies a token and returns its caller (failures are counted).
    pub fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        self.verify_inner(token).map_err(AuthError::counted)
    }

    fn verify_inner(&self, token: &str) -> Result<Principal, AuthError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::Invalid(format!("longer than {MAX_TOKEN_BYTES} bytes")));
        }
        if !self.has_keys() {
            return Err(AuthError::Invalid(
                "this server has no verification keys (--auth-jwks, --auth-hs256-secret-file)".into(),
            ));
        }
        let header = jsonwebtoken::decode_header(token).map_err(|e| AuthError::Invalid(e.to_string()))?;
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner()).clone();
        let key = match header.alg {
            Algorithm::HS256 => keys.hs256.as_ref(),
            Algorithm::RS256 | Algorithm::ES256 | Algorithm::EdDSA => keys
                .jwks
                .iter()
                .find(|(kid, alg, _)| *alg == header.alg && (header.kid.is_none() || *kid == header.kid))
                .map(|(_, _, k)| k),
            other => return Err(AuthError::Invalid(format!("algorithm {other:?} is not accepted"))),
        }
        .ok_or_else(|| AuthError::UnknownKey(header.kid.clone()))?;
        let mut v = Validation::new(header.alg);
        v.leeway = LEEWAY_SECS;
        // a configured issuer or audience must be present, not only match
        let mut required = vec!["exp"];
        if self.cfg.issuer.is_some() {
            required.push("iss");
        }
        if self.cfg.audience.is_some() {
            required.push("aud");
        }
        v.set_required_spec_claims(&required);
        v.validate_nbf = true;
        v.validate_aud = self.cfg.audience.is_some();
        if let Some(a) = &self.cfg.audience {
            v.set_audience(&[a]);
        }
        if let Some(i) = &self.cfg.issuer {
            v.set_issuer(&[i]);
        }
        let data = jsonwebtoken::decode::<Claims>(token, key, &v).map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => AuthError::Expired,
            ErrorKind::InvalidSignature => AuthError::BadSignature,
            ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
            ErrorKind::InvalidAudience => AuthError::WrongAudience,
            _ => AuthError::Invalid(e.to_string()),
        })?;
        let c = data.claims;
        // `sub` scopes the caller's publisher ids: required, bounded, no
        // control characters (so no two callers can share a scope)
        let sub = c.sub.unwrap_or_default();
        if sub.is_empty() || sub.len() > MAX_SUB_BYTES || sub.chars().any(char::is_control) {
            return Err(AuthError::Invalid(format!(
                "'sub' must be 1 to {MAX_SUB_BYTES} bytes without control characters"
            )));
        }
        if c.exp > now_secs().saturating_add(MAX_EXP_AHEAD_SECS) {
            return Err(AuthError::Invalid("'exp' is more than ten years ahead".into()));
        }
        let rights = c.tickshard.unwrap_or_default();
        let list = |l: Option<Vec<String>>| Patterns::parse(&l.unwrap_or_default()).map_err(AuthError::Invalid);
        Ok(Principal {
            sub: Some(sub),
            exp: Some(c.exp),
            subscribe: list(rights.subscribe)?,
            publish: list(rights.publish)?,
        })
    }
}

impl Reload for Auth {
    fn reload_if_changed(&self) -> Option<Result<(), String>> {
        self.watched.rebuild_if_changed(|| {
            load_keys(&self.cfg)
                .map(|k| *self.keys.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(k))
                .map_err(|e| e.to_string())
        })
    }

    fn what(&self) -> &'static str {
        "auth_keys"
    }
}

/// The claims of a token `tickshard token` mints (HS256).
#[derive(Clone, Debug, serde::Serialize)]
pub struct MintClaims {
    pub sub: String,
    pub exp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
    /// Patterns it may read (empty: the claim's list is left out: nothing).
    #[serde(skip)]
    pub subscribe: Vec<String>,
    #[serde(skip)]
    pub publish: Vec<String>,
}

/// Signs `claims` with an HS256 secret (as read from the secret file: a
/// trailing newline is not part of it).
pub fn mint_hs256(secret: &[u8], claims: &MintClaims) -> Result<String, String> {
    let secret = secret_of(secret);
    if secret.len() < 32 {
        return Err(format!("the HS256 secret is {} bytes; use at least 32", secret.len()));
    }
    if claims.exp > now_secs().saturating_add(MAX_EXP_AHEAD_SECS) {
        return Err("the lifetime is over ten years".into());
    }
    let mut rights = serde_json::Map::new();
    for (name, list) in [("subscribe", &claims.subscribe), ("publish", &claims.publish)] {
        if !list.is_empty() {
            rights.insert(name.into(), serde_json::json!(list));
        }
    }
    let mut body = serde_json::to_value(claims).map_err(|e| e.to_string())?;
    if let Some(o) = body.as_object_mut() {
        o.insert("iat".into(), serde_json::json!(now_secs()));
        o.insert("tickshard".into(), serde_json::Value::Object(rights));
    }
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(Algorithm::HS256),
        &body,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .map_err(|e| e.to_string())
}

/// Unix seconds now.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An `Auth` verifying HS256 tokens with a 40-byte secret (written to a
    /// per-process temp dir named by `tag`).
    fn hs256_auth(tag: &str) -> Arc<Auth> {
        let dir = std::env::temp_dir().join(format!("tickshard-auth-{tag}-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let secret = dir.join("secret");
        std::fs::write(&secret, "p".repeat(40)).unwrap();
        Auth::load(AuthConfig {
            hs256_secret: Some(secret),
            ..AuthConfig::default()
        })
        .unwrap()
    }

    /// The `Bearer` scheme is case-insensitive (RFC 9110 §11.1): `BEARER x`
    /// reaches the token check; another scheme or a cut header does not.
    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        let auth = hs256_auth("scheme");
        let why = |h: &str| match auth.from_bearer(Some(h.as_bytes())) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{h}: accepted"),
        };
        for h in ["Bearer abc", "bearer abc", "BEARER abc", "bEaReR abc"] {
            assert!(!why(h).contains("expected 'Authorization"), "{h}: {}", why(h));
        }
        for h in ["Basic abc", "Bear", "Bearerabc", ""] {
            assert!(why(h).contains("expected 'Authorization"), "{h}: {}", why(h));
        }
    }

    #[test]
    fn patterns_cover_symbols_prefixes_and_everything() {
        let p = Patterns::parse(&["BTC-USD".into(), "EQ.*".into()]).unwrap();
        assert!(p.allows("BTC-USD"));
        assert!(p.allows("EQ.AAPL"));
        assert!(p.allows("EQ."));
        assert!(!p.allows("EQ"));
        assert!(!p.allows("BTC-USDT"));
        assert!(!p.allows("ETH-USD"));
        assert!(Patterns::parse(&["*".into()]).unwrap().allows("ANY"));
        assert!(
            Patterns::parse(&[]).unwrap().is_empty(),
            "a missing list grants nothing"
        );
        assert!(Patterns::parse(&vec!["A".to_string(); MAX_PATTERNS + 1]).is_err());
        let p = Patterns::parse(&["A".into(), "B".into()]).unwrap();
        assert_eq!(p.denied(["A", "C"]), Some("C".to_string()));
        assert_eq!(p.denied(["A", "B"]), None);
        let many: Vec<String> = (0..12).map(|i| format!("X{i}")).collect();
        let listed = p.denied(many.iter().map(String::as_str)).unwrap();
        assert!(listed.ends_with("X9 (and 2 more)"), "{listed}");
        // a pattern is a symbol: case-insensitive, as symbols are upper-cased on input
        let p = Patterns::parse(&["btc-usd".into(), "eq.*".into()]).unwrap();
        assert!(p.allows("BTC-USD") && p.allows("EQ.AAPL"));
    }

    proptest::proptest! {
        /// `allows` agrees with the plain reading of the patterns: an exact
        /// symbol, a prefix before `*`, or `*` alone.
        #[test]
        fn allows_is_the_plain_reading(
            pats in proptest::collection::vec("[A-C.]{0,3}\\*?", 0..6),
            sym in "[A-C.]{1,5}",
        ) {
            let p = Patterns::parse(&pats).unwrap();
            let want = pats.iter().any(|pat| match pat.strip_suffix('*') {
                Some(prefix) => sym.starts_with(prefix),
                None => *pat == sym,
            });
            proptest::prop_assert_eq!(p.allows(&sym), want);
        }

        /// Whatever arrives as a token (header, query, `auth` op) is refused
        /// with an error, never a panic, in time linear in its length.
        #[test]
        fn any_text_as_a_token_is_an_error(token in "\\PC{0,300}|[A-Za-z0-9_-]{0,40}\\.[A-Za-z0-9_-]{0,60}\\.[A-Za-z0-9_-]{0,40}") {
            let auth = hs256_auth("prop");
            proptest::prop_assert!(auth.verify(&token).is_err());
            proptest::prop_assert!(auth.from_bearer(Some(token.as_bytes())).is_err());
        }
    }
}
