//! The backend's key ring: the ciphers of the data keys it has unwrapped, and which key is current.
//!
//! Lookups are by key id in a small map hashed by one multiplication (key ids are trusted small
//! integers; SipHash cost 2% of a decrypt-heavy profile). The current key is held apart so that
//! encryption, the common case, costs one comparison and no hashing. Data keys never change once created, so a
//! cipher stays valid for the life of the backend; what changes is which key is current and which
//! keys exist, and the SQL layer refreshes those on invalidation (see `src/backend.rs`).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use crate::cipher::DataCipher;
use crate::key::KeyId;
use crate::time::UnixMicros;

/// The key that encrypts, and when it is due for rollover.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CurrentKey {
    pub id: KeyId,
    pub due_at: UnixMicros,
}

/// Ready ciphers by key id, plus the current key.
#[derive(Default)]
pub struct KeyRing {
    current: Option<CurrentKey>,
    /// Each cipher with the instant after which its key must be unwrapped again
    /// (`immuta.cache_ttl`), so that revoking KMS access takes effect.
    ciphers: HashMap<KeyId, (DataCipher, UnixMicros), BuildHasherDefault<KeyIdHasher>>,
}

/// Fibonacci hashing of the key id: spreads consecutive ids over the high bits hashbrown uses.
#[derive(Default)]
pub struct KeyIdHasher(u64);

impl Hasher for KeyIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_i64(&mut self, n: i64) {
        self.0 = (n as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

impl KeyRing {
    pub fn current(&self) -> Option<CurrentKey> {
        self.current
    }

    pub fn set_current(&mut self, current: Option<CurrentKey>) {
        self.current = current;
    }

    /// The cipher of key `id`, unless it is absent or expired at `now`.
    pub fn cipher(&self, id: KeyId, now: UnixMicros) -> Option<&DataCipher> {
        self.ciphers.get(&id).filter(|(_, expires)| now < *expires).map(|(c, _)| c)
    }

    /// The cipher of key `id` whatever its expiry: for use right after loading it.
    pub fn loaded(&self, id: KeyId) -> Option<&DataCipher> {
        self.ciphers.get(&id).map(|(c, _)| c)
    }

    pub fn insert(&mut self, cipher: DataCipher, expires_at: UnixMicros) {
        self.ciphers.insert(cipher.key_id(), (cipher, expires_at));
    }

    /// How many keys the ring holds (expired ones included until replaced).
    pub fn len(&self) -> usize {
        self.ciphers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ciphers.is_empty()
    }

    /// Keeps only the ciphers whose keys `exists`: drops keys created by transactions that rolled
    /// back. Dropped ciphers zeroize their key schedules.
    pub fn retain(&mut self, mut exists: impl FnMut(KeyId) -> bool) {
        self.ciphers.retain(|id, _| exists(*id));
    }

    /// Forgets every cipher and the current key.
    pub fn clear(&mut self) {
        self.ciphers.clear();
        self.current = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::DataKey;

    #[test]
    fn retain_drops_keys_that_no_longer_exist() {
        let mut ring = KeyRing::default();
        for id in 1..=3 {
            ring.insert(DataCipher::new(KeyId::new(id).unwrap(), &DataKey::generate()), UnixMicros(100));
        }
        ring.retain(|id| id.get() != 2);
        assert!(ring.cipher(KeyId::new(1).unwrap(), UnixMicros(0)).is_some());
        assert!(ring.cipher(KeyId::new(1).unwrap(), UnixMicros(100)).is_none(), "expired");
        assert!(ring.cipher(KeyId::new(2).unwrap(), UnixMicros(0)).is_none());
        assert_eq!(ring.len(), 2);
        ring.clear();
        assert!(ring.is_empty() && ring.current().is_none());
    }
}
