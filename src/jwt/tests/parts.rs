//! The token's base64url parts: decoded strictly, as the `base64` crate's engine decodes them, and never a panic on
//! any input.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use proptest::prelude::*;

use super::super::Violation;
use super::super::token::{base64url, decode};

/// RFC 4648 section 3.5: the bits left over after the last whole byte must be zero. `QQ` is the one byte `A`, `QR`
/// the same byte with a set bit left over; one character alone holds no whole byte.
#[test]
fn trailing_bits_and_a_lone_character_are_refused() {
    assert_eq!(base64url("QQ"), Ok(b"A".to_vec()));
    assert_eq!(base64url("QR"), Err(Violation::Malformed));
    assert_eq!(base64url("Q"), Err(Violation::Malformed));
    assert_eq!(base64url(""), Err(Violation::Malformed));
}

proptest! {
    #[test]
    fn decoder_never_panics(token in ".{0,300}") {
        let _ = decode(&token, None);
    }

    #[test]
    fn decoder_never_panics_on_base64ish_input(token in "[A-Za-z0-9_=+/.-]{0,300}") {
        let _ = decode(&token, None);
    }

    /// The SIMD decoder of the token's parts accepts and refuses what the `base64` crate's strict URL-safe engine
    /// without padding does, and decodes the same bytes: padding, the standard alphabet, white space, a length
    /// of 1 mod 4 and non-zero trailing bits all refused.
    #[test]
    fn token_parts_decode_as_the_base64_crate_decodes(part in "[A-Za-z0-9_=+/ -]{1,80}") {
        prop_assert_eq!(base64url(&part).ok(), URL_SAFE_NO_PAD.decode(&part).ok());
    }
}
