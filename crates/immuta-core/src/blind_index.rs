//! Blind indexes: keyed equality terms of values, for lookups and uniqueness on encrypted columns.
//!
//! A term is `version (2 bytes, big-endian) || HMAC-SHA256(mac key, type byte || encoding)`
//! truncated to the index's term length. The type byte and the encoding are those a ciphertext
//! seals (value_type.rs, encoding.rs), so `'00123'::text` and `123::int4` have different terms, and
//! the term of a stored value can be computed from its plaintext as opened. The MAC key is derived
//! from the index key with HKDF-SHA256, bound to the key's id, keyring and index name: two indexes
//! (or two keyrings' indexes of one name) never share a MAC key, so their terms never correlate.
//! The version prefix says which version of the index key made a term (rotation: lookups match
//! every version still enabled; the re-computation job finds the terms of older versions).
//! docs/FORMAT.md has the layout and test vectors.

use aws_lc_rs::hkdf;
use zeroize::Zeroizing;

use crate::hmac_sha256::HmacSha256;

use crate::key::{DataKey, KeyId};
use crate::value_type::ValueType;

/// Shortest and longest term length (the MAC part, without the version prefix), in bytes.
pub const MIN_TERM_LEN: u8 = 4;
pub const MAX_TERM_LEN: u8 = 32;
/// The default term length: at 10^9 distinct values, the chance that any two share a term is
/// about 1.5e-21 (README, "Blind indexes").
pub const DEFAULT_TERM_LEN: u8 = 16;
/// Below this length, collisions among 10^9 values become likely enough to matter (about 6e-12
/// at 12 bytes, 0.03 at 8): immuta warns.
pub const WARN_BELOW_TERM_LEN: u8 = 12;
/// Bytes of the version prefix.
pub const VERSION_LEN: usize = 2;
/// The longest term (prefix included).
pub const MAX_TERM: usize = VERSION_LEN + MAX_TERM_LEN as usize;
/// Versions of one index: 1 to 65535.
pub const MAX_VERSION: i32 = u16::MAX as i32;

/// The HKDF salt of the MAC key derivation (domain separation from every other use of a key).
pub const DERIVATION_SALT: &[u8] = b"immuta blind index v1";

/// Index names follow the keyring name rule (letters, digits, `_ . : -`, 1 to 63 bytes).
pub fn name_ok(name: &str) -> bool {
    crate::keyrings::name_ok(name)
}

/// Whether `len` is a term length an index may have.
pub fn term_len_ok(len: i32) -> bool {
    (i32::from(MIN_TERM_LEN)..=i32::from(MAX_TERM_LEN)).contains(&len)
}

/// The version a term was made with (its prefix); `None` for bytes too short to be a term.
pub fn version_of(term: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes(term.get(..VERSION_LEN)?.try_into().ok()?))
}

/// The HKDF info: the index key's id, then its keyring and index name, each preceded by its
/// length (one byte: names are at most 63 bytes).
fn info(id: KeyId, keyring: &str, name: &str) -> Vec<u8> {
    let mut info = Vec::with_capacity(8 + 2 + keyring.len() + name.len());
    info.extend_from_slice(&id.to_wire());
    info.push(keyring.len() as u8);
    info.extend_from_slice(keyring.as_bytes());
    info.push(name.len() as u8);
    info.extend_from_slice(name.as_bytes());
    info
}

/// One version of an index key, ready to make terms. Holds only the derived MAC key's HMAC
/// states (zeroized when dropped); no `Debug`, no `Clone`.
pub struct TermKey {
    mac: Box<HmacSha256>,
    version: u16,
    term_len: u8,
}

impl TermKey {
    /// Derives the MAC key of version `version` of index `name` of `keyring` from its index key
    /// `key` (whose row id is `id`). `term_len` is checked by the caller ([`term_len_ok`]).
    pub fn derive(
        key: &DataKey,
        id: KeyId,
        keyring: &str,
        name: &str,
        version: u16,
        term_len: u8,
    ) -> TermKey {
        let info = info(id, keyring, name);
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, DERIVATION_SALT).extract(key.expose());
        let info_parts = [info.as_slice()];
        let mut mac_key = Zeroizing::new([0u8; crate::hmac_sha256::KEY_LEN]);
        prk.expand(&info_parts, hkdf::HKDF_SHA256)
            .and_then(|okm| okm.fill(&mut mac_key[..]))
            .expect("32 bytes is within HKDF's limit");
        TermKey {
            mac: HmacSha256::new(&mac_key),
            version,
            term_len: term_len.clamp(MIN_TERM_LEN, MAX_TERM_LEN),
        }
    }

    pub fn version(&self) -> u16 {
        self.version
    }

    /// The length of this key's terms, prefix included.
    pub fn term_size(&self) -> usize {
        VERSION_LEN + usize::from(self.term_len)
    }

    /// Writes the term of a value of `value_type` whose encoding is `encoding` into `out`, which
    /// is [`TermKey::term_size`] bytes long.
    pub fn term_into(&self, value_type: ValueType, encoding: &[u8], out: &mut [u8]) {
        let tag = self.mac.mac(value_type.to_byte(), encoding);
        out[..VERSION_LEN].copy_from_slice(&self.version.to_be_bytes());
        out[VERSION_LEN..].copy_from_slice(&tag[..usize::from(self.term_len)]);
    }

    /// The term of a value, as a new vector.
    pub fn term(&self, value_type: ValueType, encoding: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; self.term_size()];
        self.term_into(value_type, encoding, &mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::value_type::Scalar;

    fn key(byte: u8) -> DataKey {
        DataKey::from_bytes(&mut [byte; 32])
    }

    fn id(n: i64) -> KeyId {
        KeyId::new(n).unwrap()
    }

    #[test]
    fn terms_are_deterministic_versioned_and_truncated() {
        let k = TermKey::derive(&key(7), id(3), "default", "patients.ssn", 1, 16);
        let a = k.term(ValueType::TEXT, b"123-45-6789");
        assert_eq!(a, k.term(ValueType::TEXT, b"123-45-6789"));
        assert_eq!(a.len(), 18);
        assert_eq!(version_of(&a), Some(1));
        assert_ne!(a, k.term(ValueType::TEXT, b"123-45-6780"));
        let short = TermKey::derive(&key(7), id(3), "default", "patients.ssn", 1, 4);
        assert_eq!(short.term(ValueType::TEXT, b"123-45-6789"), a[..6]);
    }

    #[test]
    fn the_type_byte_keeps_equal_encodings_of_different_types_apart() {
        let k = TermKey::derive(&key(7), id(3), "default", "x", 1, 16);
        let text = k.term(ValueType::TEXT, b"1234");
        let bytea = k.term(ValueType::scalar(Scalar::Bytea), b"1234");
        assert_ne!(text, bytea);
    }

    #[test]
    fn index_names_keyrings_ids_and_keys_each_change_every_term() {
        let base = TermKey::derive(&key(7), id(3), "default", "a.b", 1, 16).term(ValueType::TEXT, b"v");
        for other in [
            TermKey::derive(&key(8), id(3), "default", "a.b", 1, 16),
            TermKey::derive(&key(7), id(4), "default", "a.b", 1, 16),
            TermKey::derive(&key(7), id(3), "tenant", "a.b", 1, 16),
            TermKey::derive(&key(7), id(3), "default", "a.c", 1, 16),
            // Length-prefixed fields: moving a byte from one name to the other changes the info.
            TermKey::derive(&key(7), id(3), "defaul", "ta.b", 1, 16),
        ] {
            assert_ne!(other.term(ValueType::TEXT, b"v")[2..], base[2..]);
        }
    }

    /// The vector of docs/FORMAT.md, computed independently with Python's hmac and hashlib.
    #[test]
    fn known_answer() {
        let k = TermKey::derive(&key(0x42), id(7), "default", "patients.ssn", 1, 16);
        let term = k.term(ValueType::TEXT, b"123-45-6789");
        assert_eq!(hex(&term), KNOWN_TERM);
    }

    const KNOWN_TERM: &str = "00013ecf7672d9fea39498b776a8c7d5230e";

    /// The full HMAC of the same vector (term length 32), and a second vector of FORMAT.md whose
    /// encoding spans three blocks (150 bytes), also computed with Python.
    #[test]
    fn known_answers_of_full_length_and_of_several_blocks() {
        let k = TermKey::derive(&key(0x42), id(7), "default", "patients.ssn", 1, 32);
        assert_eq!(
            hex(&k.term(ValueType::TEXT, b"123-45-6789")),
            "00013ecf7672d9fea39498b776a8c7d5230edaab078aa8ce2b7b2403752ece022f83"
        );
        let k = TermKey::derive(&key(0x42), id(12345), "tenant_42", "users.email", 3, 32);
        let value = format!("{}@example.com{}", "x".repeat(100), "y".repeat(38));
        assert_eq!(
            hex(&k.term(ValueType::TEXT, value.as_bytes())),
            "00037a86f26bec7edc35f0700a7a431bd10a90c13abcbb58f28b080ee32b7c23c878"
        );
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn term_lengths_and_versions_are_bounded() {
        assert!(term_len_ok(4) && term_len_ok(32) && term_len_ok(16));
        assert!(!term_len_ok(3) && !term_len_ok(33) && !term_len_ok(-1));
        assert_eq!(version_of(&[0]), None);
        assert_eq!(version_of(&[1, 2, 3]), Some(0x0102));
    }
}
