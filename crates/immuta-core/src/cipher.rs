//! Sealing and opening values under one data key (AES-256-GCM, layout in `format.rs`).
//!
//! [`DataCipher`] holds the expanded AES key schedule, so that a key is expanded once per backend
//! rather than once per row; the schedule is zeroized when the cipher is dropped (the `zeroize`
//! features of `aes` and `aes-gcm`). Tag comparison is constant-time inside `aes-gcm`, and a value
//! that fails authentication yields one opaque error, never partial plaintext.

use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce, Tag};
use zeroize::Zeroize;

use crate::format::{self, BODY_OFFSET, HEADER_LEN, OVERHEAD};
use crate::key::{DataKey, KeyId};
use crate::{Error, Result};

/// A ready AES-256-GCM cipher for one data key.
pub struct DataCipher {
    key_id: KeyId,
    aead: Aes256Gcm,
}

impl DataCipher {
    pub fn new(key_id: KeyId, key: &DataKey) -> DataCipher {
        DataCipher { key_id, aead: Aes256Gcm::new(key.expose().into()) }
    }

    pub fn key_id(&self) -> KeyId {
        self.key_id
    }

    /// Seals `plaintext` into `out`, which must be exactly `format::sealed_len(plaintext.len())`
    /// bytes long. Writing into a caller's buffer lets the SQL layer seal straight into the
    /// `bytea` it returns.
    pub fn seal_into(&self, nonce: &[u8; format::NONCE_LEN], plaintext: &[u8], out: &mut [u8]) {
        assert_eq!(out.len(), format::sealed_len(plaintext.len()), "output buffer of wrong size");
        format::write_header(self.key_id, out);
        out[HEADER_LEN..BODY_OFFSET].copy_from_slice(nonce);
        let (head, rest) = out.split_at_mut(BODY_OFFSET);
        let (body, tag_out) = rest.split_at_mut(plaintext.len());
        body.copy_from_slice(plaintext);
        let tag = self
            .aead
            .encrypt_in_place_detached(Nonce::from_slice(nonce), &head[..HEADER_LEN], body)
            .expect("AES-GCM accepts any plaintext below 64 GiB, and PostgreSQL values are below 1 GiB");
        tag_out.copy_from_slice(&tag);
    }

    /// Seals `plaintext` into a new vector.
    pub fn seal(&self, nonce: &[u8; format::NONCE_LEN], plaintext: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; plaintext.len() + OVERHEAD];
        self.seal_into(nonce, plaintext, &mut out);
        out
    }

    /// Opens a parsed ciphertext into `out`, which must be exactly `sealed.body.len()` bytes.
    /// On failure `out` is zeroed. The caller has already checked that `sealed.key_id` is this
    /// cipher's key.
    pub fn open_into(&self, sealed: &format::Sealed<'_>, out: &mut [u8]) -> Result<()> {
        debug_assert_eq!(sealed.key_id, self.key_id);
        assert_eq!(out.len(), sealed.body.len(), "output buffer of wrong size");
        out.copy_from_slice(sealed.body);
        let tag = Tag::from_slice(sealed.tag);
        match self.aead.decrypt_in_place_detached(Nonce::from_slice(sealed.nonce), sealed.header, out, tag) {
            Ok(()) => Ok(()),
            Err(_) => {
                out.zeroize();
                Err(Error::AuthenticationFailed { key_id: self.key_id })
            }
        }
    }

    /// Opens a ciphertext into text: authenticates, decrypts and checks that the result is UTF-8
    /// without NUL bytes (which a PostgreSQL `text` cannot hold).
    pub fn open_text(&self, sealed: &format::Sealed<'_>) -> Result<String> {
        let mut out = vec![0u8; sealed.body.len()];
        self.open_text_into(sealed, &mut out)?;
        Ok(String::from_utf8(out).expect("checked"))
    }

    /// [`DataCipher::open_text`] into a caller's buffer of exactly `sealed.body.len()` bytes;
    /// zeroed on failure.
    pub fn open_text_into(&self, sealed: &format::Sealed<'_>, out: &mut [u8]) -> Result<()> {
        self.open_into(sealed, out)?;
        if let Err(e) = check_text(self.key_id, out) {
            out.zeroize();
            return Err(e);
        }
        Ok(())
    }
}

/// A decrypted value is returned as `text`: it must be UTF-8 and free of NUL bytes.
pub fn check_text(key_id: KeyId, bytes: &[u8]) -> Result<()> {
    if std::str::from_utf8(bytes).is_err() || bytes.contains(&0) {
        return Err(Error::InvalidText { key_id });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::parse;

    fn cipher(id: i64, byte: u8) -> DataCipher {
        let mut raw = [byte; 32];
        DataCipher::new(KeyId::new(id).unwrap(), &DataKey::from_bytes(&mut raw))
    }

    #[test]
    fn seal_then_open_round_trips() {
        let c = cipher(5, 7);
        for text in ["", "123-45-6789", "żółw 🐢 ☃", &"x".repeat(3 << 20)] {
            let sealed = c.seal(&[3; 12], text.as_bytes());
            assert_eq!(sealed.len(), text.len() + OVERHEAD);
            assert_eq!(c.open_text(&parse(&sealed).unwrap()).unwrap(), text);
        }
    }

    #[test]
    fn every_single_bit_flip_fails_authentication() {
        let c = cipher(1, 1);
        let sealed = c.seal(&[0; 12], b"4111 1111 1111 1111");
        for byte in 0..sealed.len() {
            for bit in 0..8 {
                let mut bad = sealed.clone();
                bad[byte] ^= 1 << bit;
                match parse(&bad) {
                    Ok(s) if s.key_id == c.key_id() => {
                        assert!(matches!(c.open_text(&s), Err(Error::AuthenticationFailed { .. })))
                    }
                    Ok(_) | Err(_) => {} // header changed: another key id or version, rejected earlier
                }
            }
        }
    }

    #[test]
    fn a_different_key_with_the_same_id_fails_authentication() {
        let sealed = cipher(1, 1).seal(&[0; 12], b"secret");
        let other = cipher(1, 2);
        assert!(matches!(other.open_text(&parse(&sealed).unwrap()), Err(Error::AuthenticationFailed { .. })));
    }

    #[test]
    fn authenticated_bytes_that_are_not_text_are_rejected() {
        let c = cipher(1, 1);
        for bad in [&b"\xff\xfe"[..], b"a\0b"] {
            let sealed = c.seal(&[0; 12], bad);
            assert!(matches!(c.open_text(&parse(&sealed).unwrap()), Err(Error::InvalidText { .. })));
        }
    }
}
