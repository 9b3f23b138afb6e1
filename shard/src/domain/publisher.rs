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

    proptest! {
        #[test]
        fn anything_sanitised_is_valid(text in ".{0,300}") {
            let id = publisher_id_from(&text);
            prop_assert!(validate_publisher_id(&id).is_ok(), "{:?}", id);
        }
    }
}
