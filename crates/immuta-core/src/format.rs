//! The ciphertext byte layout, version 1. docs/FORMAT.md is the normative description; this file
//! and that one change together.
//!
//! ```text
//! offset  size  field
//! 0       1     format version, 0x01
//! 1       8     data key id, unsigned big-endian
//! 9       12    nonce (random)
//! 21      n     AES-256-GCM ciphertext of the UTF-8 plaintext (n = plaintext length)
//! 21+n    16    AES-GCM tag; associated data = bytes 0..9 (version and key id)
//! ```
//!
//! Overhead is 37 bytes per value. The key id is fixed-width rather than a varint so that the
//! header can be read by `substring` in SQL and by any tool without a decoder.

use crate::key::KeyId;
use crate::{Error, Result};

/// The format version this build writes.
pub const VERSION_1: u8 = 0x01;
/// Bytes authenticated as associated data: version and key id.
pub const HEADER_LEN: usize = 1 + 8;
/// Length of the AES-GCM nonce.
pub const NONCE_LEN: usize = 12;
/// Length of the AES-GCM tag.
pub const TAG_LEN: usize = 16;
/// Where the encrypted body starts.
pub const BODY_OFFSET: usize = HEADER_LEN + NONCE_LEN;
/// Bytes added to every plaintext.
pub const OVERHEAD: usize = BODY_OFFSET + TAG_LEN;

/// Length of the ciphertext for a plaintext of `plaintext_len` bytes.
pub const fn sealed_len(plaintext_len: usize) -> usize {
    plaintext_len + OVERHEAD
}

/// A parsed view of a version-1 ciphertext; borrows the input.
pub struct Sealed<'a> {
    pub key_id: KeyId,
    pub header: &'a [u8; HEADER_LEN],
    pub nonce: &'a [u8; NONCE_LEN],
    pub body: &'a [u8],
    pub tag: &'a [u8; TAG_LEN],
}

/// Reads the version and key id of a ciphertext. Checks the length first, so a truncated value is
/// reported as truncated whatever its first byte.
pub fn parse(bytes: &[u8]) -> Result<Sealed<'_>> {
    if bytes.len() < OVERHEAD {
        return Err(Error::CiphertextTruncated { len: bytes.len(), min: OVERHEAD });
    }
    let version = bytes[0];
    if version != VERSION_1 {
        return Err(Error::UnsupportedVersion { version });
    }
    let header: &[u8; HEADER_LEN] = bytes[..HEADER_LEN].try_into().expect("length checked");
    let wire_id = u64::from_be_bytes(header[1..].try_into().expect("8 bytes"));
    let key_id = KeyId::from_wire(wire_id).ok_or(Error::UnknownKey { key_id: wire_id })?;
    let (rest, tag) = bytes.split_at(bytes.len() - TAG_LEN);
    Ok(Sealed {
        key_id,
        header,
        nonce: rest[HEADER_LEN..BODY_OFFSET].try_into().expect("length checked"),
        body: &rest[BODY_OFFSET..],
        tag: tag.try_into().expect("length checked"),
    })
}

/// Writes the header (version and key id) into the first [`HEADER_LEN`] bytes of `out`.
pub fn write_header(key_id: KeyId, out: &mut [u8]) {
    out[0] = VERSION_1;
    out[1..HEADER_LEN].copy_from_slice(&key_id.to_wire());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overhead_is_well_under_64_bytes() {
        assert_eq!(OVERHEAD, 37);
    }

    #[test]
    fn short_input_is_truncated_whatever_its_version_byte() {
        for len in 0..OVERHEAD {
            let bytes = vec![0xEEu8; len];
            assert!(matches!(parse(&bytes), Err(Error::CiphertextTruncated { .. })));
        }
    }

    #[test]
    fn unknown_version_is_reported_as_such() {
        let mut bytes = vec![0u8; OVERHEAD];
        bytes[0] = 2;
        assert!(matches!(parse(&bytes), Err(Error::UnsupportedVersion { version: 2 })));
    }

    #[test]
    fn key_ids_that_no_row_can_have_are_unknown_keys() {
        let mut bytes = vec![0u8; OVERHEAD];
        bytes[0] = VERSION_1;
        assert!(matches!(parse(&bytes), Err(Error::UnknownKey { key_id: 0 })));
        bytes[1..9].copy_from_slice(&u64::MAX.to_be_bytes());
        assert!(matches!(parse(&bytes), Err(Error::UnknownKey { key_id: u64::MAX })));
    }

    #[test]
    fn parse_splits_the_fields_at_the_documented_offsets() {
        let mut bytes: Vec<u8> = (0..(OVERHEAD as u8 + 5)).collect();
        bytes[0] = VERSION_1;
        bytes[1..9].copy_from_slice(&300u64.to_be_bytes());
        let sealed = parse(&bytes).unwrap();
        assert_eq!(sealed.key_id.get(), 300);
        assert_eq!(sealed.nonce[0], 9);
        assert_eq!(sealed.body, &bytes[21..26]);
        assert_eq!(sealed.tag[0], 26);
    }
}
