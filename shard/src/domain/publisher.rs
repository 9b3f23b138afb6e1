use super::InputError;

/// The longest `publisher_id` the contract allows (§5), in bytes.
pub const MAX_PUBLISHER_ID_BYTES: usize = 128;

/// Checks a `publisher_id` (contract §5): at most 128 bytes of printable ASCII
/// (space to `~`). Empty means "no de-duplication" and is allowed.
///
/// The id is stored with every de-dup state, so what passes here is exactly
/// what recovery reads back: no cut, no encoding question.
pub fn validate_publisher_id(id: &str) -> Result<(), InputError> {
    if id.len() > MAX_PUBLISHER_ID_BYTES {
        return Err(InputError::InvalidRequest(format!(
            "publisher_id is {} bytes; at most {MAX_PUBLISHER_ID_BYTES} are allowed",
            id.len()
        )));
    }
    if let Some(at) = id.bytes().position(|b| !(b' '..=b'~').contains(&b)) {
        return Err(InputError::InvalidRequest(format!(
            "publisher_id must be printable ASCII; byte {at} is not"
        )));
    }
    Ok(())
}

/// The longest caller identity (a token's `sub`) that scopes publisher ids.
pub const MAX_SUB_BYTES: usize = 256;

/// Separates the caller from its `publisher_id` in a scoped id: not printable
/// ASCII, so never part of a `publisher_id`, and the split (at the last one)
/// is unambiguous.
const SCOPE: char = '\u{1f}';

/// The de-duplication key of an authenticated caller's `publisher_id`
/// (contract §8: `(sub, publisher_id, symbol)`), so no caller can shadow
/// another's requests. An empty id stays empty (no de-duplication).
pub fn scoped_publisher_id(sub: &str, id: &str) -> String {
    if id.is_empty() {
        return String::new();
    }
    let sub: String = sub.chars().filter(|&c| c != SCOPE).collect();
    format!("{sub}{SCOPE}{id}")
}

/// The caller part of a de-dup key ([`scoped_publisher_id`]): its `sub`,
/// or `""` for an anonymous caller's plain `publisher_id`.
pub fn publisher_scope(key: &str) -> &str {
    key.rsplit_once(SCOPE).map_or("", |(sub, _)| sub)
}

/// Checks a publisher id a peer forwarded: a client's (as
/// [`validate_publisher_id`]) or a scoped one (a caller of at most
/// [`MAX_SUB_BYTES`], then a valid client id).
pub fn validate_forwarded_publisher_id(id: &str) -> Result<(), InputError> {
    match id.rsplit_once(SCOPE) {
        None => validate_publisher_id(id),
        Some((sub, client_id)) if sub.len() <= MAX_SUB_BYTES => validate_publisher_id(client_id),
        Some(_) => Err(InputError::InvalidRequest(format!(
            "the caller part of a scoped publisher_id is over {MAX_SUB_BYTES} bytes"
        ))),
    }
}

/// A valid `publisher_id` made from any text (a file name, say): characters
/// outside printable ASCII become `_`, and it is cut to the allowed length.
pub fn publisher_id_from(text: &str) -> String {
    text.chars()
        .map(|c| if (' '..='~').contains(&c) { c } else { '_' })
        .take(MAX_PUBLISHER_ID_BYTES)
        .collect()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn bounds_and_alphabet() {
        assert!(validate_publisher_id("").is_ok());
        assert!(validate_publisher_id("desk-7 feed:1 ~!").is_ok());
        assert!(validate_publisher_id(&"a".repeat(128)).is_ok());
        assert!(validate_publisher_id(&"a".repeat(129)).is_err());
        assert!(validate_publisher_id("tab\there").is_err());
        assert!(validate_publisher_id("caf\u{e9}").is_err());
        let e = validate_publisher_id(&"\u{e9}".repeat(40_000)).unwrap_err();
        assert_eq!(e.code(), crate::domain::ErrorCode::InvalidRequest);
        assert!(e.to_string().len() < 100, "{e}");
    }

    #[test]
    fn scoped_ids_keep_callers_apart_and_pass_a_peer() {
        let a = scoped_publisher_id("a\u{1f}b", "c");
        let b = scoped_publisher_id("a", "b\u{1f}c");
        assert_ne!(a, b);
        assert_ne!(scoped_publisher_id("x", "feed"), scoped_publisher_id("y", "feed"));
        assert_eq!(scoped_publisher_id("x", ""), "");
        assert!(validate_forwarded_publisher_id(&scoped_publisher_id("desk-7", "feed-1")).is_ok());
        assert!(validate_forwarded_publisher_id("plain").is_ok());
        assert!(validate_forwarded_publisher_id(&scoped_publisher_id(&"s".repeat(257), "f")).is_err());
        assert!(validate_forwarded_publisher_id(&scoped_publisher_id("s", "tab\t")).is_err());
    }

    proptest! {
        #[test]
        fn anything_sanitised_is_valid(text in ".{0,300}") {
            let id = publisher_id_from(&text);
            prop_assert!(validate_publisher_id(&id).is_ok(), "{:?}", id);
        }
    }
}
