//! The ciphertext byte layouts. docs/FORMAT.md is the normative description; this file and that
//! one change together.
//!
//! ```text
//! version 1 (text only; read forever, no longer written)
//! offset  size  field
//! 0       1     format version, 0x01
//! 1       8     data key id, unsigned big-endian
//! 9       12    nonce (random)
//! 21      n     AES-256-GCM ciphertext of the UTF-8 plaintext (n = plaintext length)
//! 21+n    16    AES-GCM tag; associated data = bytes 0..9
//!
//! version 2
//! 0       1     format version, 0x02
//! 1       1     flags: bit 0 = a context was given; bits 1 to 7 are reserved and zero
//! 2       1     type (value_type.rs): bits 0-6 the scalar, bit 7 an array of it
//! 3       8     data key id, unsigned big-endian
//! 11      12    nonce (random)
//! 23      n     AES-256-GCM ciphertext of the value's encoding (encoding.rs)
//! 23+n    16    AES-GCM tag; associated data = bytes 0..11, then the context's UTF-8 bytes
//! ```
//!
//! Overhead is 37 bytes (v1) and 39 bytes (v2). The key id is fixed-width rather than a varint
//! so that the header can be read by `substring` in SQL and by any tool without a decoder. The
//! reserved flag bits are where a later version says what else a reader must know (a
//! deterministic mode, a class of key); this build refuses a value that sets one.

use crate::key::KeyId;
use crate::value_type::ValueType;
use crate::{Error, Result};

/// The first format: text only.
pub const VERSION_1: u8 = 0x01;
/// The format this build writes.
pub const VERSION_2: u8 = 0x02;
/// Length of the AES-GCM nonce.
pub const NONCE_LEN: usize = 12;
/// Length of the AES-GCM tag.
pub const TAG_LEN: usize = 16;
/// Header (authenticated) of version 1: version and key id.
pub const HEADER_LEN_V1: usize = 1 + 8;
/// Header (authenticated) of version 2: version, flags, type and key id.
pub const HEADER_LEN: usize = 1 + 1 + 1 + 8;
/// Where the encrypted body starts in version 2.
pub const BODY_OFFSET: usize = HEADER_LEN + NONCE_LEN;
/// Bytes version 1 adds to a plaintext; also the shortest value of any version.
pub const OVERHEAD_V1: usize = HEADER_LEN_V1 + NONCE_LEN + TAG_LEN;
/// Bytes version 2 adds to a plaintext.
pub const OVERHEAD: usize = BODY_OFFSET + TAG_LEN;

/// Flag bit: the value was sealed with a context, which is authenticated and not stored.
pub const FLAG_CONTEXT: u8 = 0x01;

/// Length of the version-2 ciphertext for a plaintext of `plaintext_len` bytes.
pub const fn sealed_len(plaintext_len: usize) -> usize {
    plaintext_len + OVERHEAD
}

/// A parsed view of a ciphertext of either version; borrows the input.
pub struct Sealed<'a> {
    pub version: u8,
    /// What the value holds: always text for version 1.
    pub value_type: ValueType,
    /// Whether it was sealed with a context (never, for version 1).
    pub has_context: bool,
    pub key_id: KeyId,
    /// The authenticated header (9 bytes for version 1, 11 for version 2).
    pub header: &'a [u8],
    pub nonce: &'a [u8; NONCE_LEN],
    pub body: &'a [u8],
    pub tag: &'a [u8; TAG_LEN],
}

/// Reads the header of a ciphertext. Checks the length first, so a truncated value is reported
/// as truncated whatever its first byte; then the version, the flags, the type and the key id.
pub fn parse(bytes: &[u8]) -> Result<Sealed<'_>> {
    if bytes.len() < OVERHEAD_V1 {
        return Err(Error::CiphertextTruncated { len: bytes.len(), min: OVERHEAD_V1 });
    }
    let (version, value_type, has_context, header_len) = match bytes[0] {
        VERSION_1 => (VERSION_1, ValueType::TEXT, false, HEADER_LEN_V1),
        VERSION_2 => {
            if bytes.len() < OVERHEAD {
                return Err(Error::CiphertextTruncated { len: bytes.len(), min: OVERHEAD });
            }
            let flags = bytes[1];
            if flags & !FLAG_CONTEXT != 0 {
                return Err(Error::UnsupportedFeature { version: VERSION_2, what: "flag", value: flags });
            }
            let value_type = ValueType::from_byte(bytes[2]).ok_or_else(|| Error::UnsupportedFeature {
                version: VERSION_2,
                what: "type",
                value: bytes[2],
            })?;
            (VERSION_2, value_type, flags & FLAG_CONTEXT != 0, HEADER_LEN)
        }
        version => return Err(Error::UnsupportedVersion { version }),
    };
    let wire_id = u64::from_be_bytes(bytes[header_len - 8..header_len].try_into().expect("8 bytes"));
    // (let-else rather than `ok_or`: an `Error` built eagerly is dropped on every success, and
    // its drop glue showed in the profile of decryption.)
    let Some(key_id) = KeyId::from_wire(wire_id) else {
        return Err(Error::UnknownKey { key_id: wire_id });
    };
    let (rest, tag) = bytes.split_at(bytes.len() - TAG_LEN);
    Ok(Sealed {
        version,
        value_type,
        has_context,
        key_id,
        header: &bytes[..header_len],
        nonce: rest[header_len..header_len + NONCE_LEN].try_into().expect("length checked"),
        body: &rest[header_len + NONCE_LEN..],
        tag: tag.try_into().expect("length checked"),
    })
}

/// Writes a version-2 header into the first [`HEADER_LEN`] bytes of `out`.
pub fn write_header(key_id: KeyId, value_type: ValueType, has_context: bool, out: &mut [u8]) {
    out[0] = VERSION_2;
    out[1] = if has_context { FLAG_CONTEXT } else { 0 };
    out[2] = value_type.to_byte();
    out[3..HEADER_LEN].copy_from_slice(&key_id.to_wire());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::value_type::Scalar;

    #[test]
    fn overhead_is_at_most_40_bytes() {
        assert_eq!(OVERHEAD_V1, 37);
        assert_eq!(OVERHEAD, 39);
    }

    #[test]
    fn short_input_is_truncated_whatever_its_version_byte() {
        for len in 0..OVERHEAD_V1 {
            let bytes = vec![0xEEu8; len];
            assert!(matches!(parse(&bytes), Err(Error::CiphertextTruncated { .. })));
        }
        for len in OVERHEAD_V1..OVERHEAD {
            let mut bytes = vec![0u8; len];
            bytes[0] = VERSION_2;
            assert!(matches!(parse(&bytes), Err(Error::CiphertextTruncated { min: 39, .. })));
        }
    }

    #[test]
    fn unknown_versions_flags_and_types_are_reported_as_such() {
        let mut bytes = vec![0u8; OVERHEAD];
        bytes[0] = 3;
        assert!(matches!(parse(&bytes), Err(Error::UnsupportedVersion { version: 3 })));
        bytes[0] = VERSION_2;
        bytes[1] = 0x02;
        bytes[2] = 1;
        assert!(matches!(parse(&bytes), Err(Error::UnsupportedFeature { what: "flag", value: 2, .. })));
        bytes[1] = 0;
        bytes[2] = 0x7f;
        assert!(matches!(parse(&bytes), Err(Error::UnsupportedFeature { what: "type", value: 0x7f, .. })));
    }

    #[test]
    fn key_ids_that_no_row_can_have_are_unknown_keys() {
        let mut bytes = vec![0u8; OVERHEAD];
        bytes[0] = VERSION_1;
        assert!(matches!(parse(&bytes), Err(Error::UnknownKey { key_id: 0 })));
        bytes[1..9].copy_from_slice(&u64::MAX.to_be_bytes());
        assert!(matches!(parse(&bytes), Err(Error::UnknownKey { key_id: u64::MAX })));
        let mut bytes = vec![0u8; OVERHEAD];
        (bytes[0], bytes[2]) = (VERSION_2, 1);
        assert!(matches!(parse(&bytes), Err(Error::UnknownKey { key_id: 0 })));
    }

    #[test]
    fn parse_splits_the_fields_at_the_documented_offsets() {
        let mut bytes: Vec<u8> = (0..(OVERHEAD_V1 as u8 + 5)).collect();
        bytes[0] = VERSION_1;
        bytes[1..9].copy_from_slice(&300u64.to_be_bytes());
        let sealed = parse(&bytes).unwrap();
        assert_eq!(
            (sealed.key_id.get(), sealed.value_type, sealed.has_context),
            (300, ValueType::TEXT, false)
        );
        assert_eq!(sealed.nonce[0], 9);
        assert_eq!(sealed.body, &bytes[21..26]);
        assert_eq!(sealed.tag[0], 26);

        let mut bytes: Vec<u8> = (0..(OVERHEAD as u8 + 5)).collect();
        write_header(KeyId::new(300).unwrap(), ValueType::array_of(Scalar::Uuid), true, &mut bytes);
        assert_eq!(&bytes[..3], &[2, 1, 0x91]);
        let sealed = parse(&bytes).unwrap();
        assert_eq!(sealed.key_id.get(), 300);
        assert_eq!(sealed.value_type, ValueType::array_of(Scalar::Uuid));
        assert!(sealed.has_context);
        assert_eq!(sealed.header, &bytes[..11]);
        assert_eq!(sealed.nonce[0], 11);
        assert_eq!(sealed.body, &bytes[23..28]);
        assert_eq!(sealed.tag[0], 28);
    }
}
