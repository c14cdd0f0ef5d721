//! The backend's ring: the ciphers of the data keys it has unwrapped, and which key is current in
//! each keyring it has met.
//!
//! Lookups are by key id in a map hashed by one multiplication (key ids are trusted small
//! integers; SipHash cost 2% of a decrypt-heavy profile). The default keyring's current key is
//! held apart so that encryption without a keyring, the common case, costs one comparison and no
//! hashing; a named keyring costs one lookup of its name. Data keys never change once created, so
//! a cipher stays valid until its key is disabled or destroyed; what changes is which key is
//! current and which keys may be used, and the SQL layer refreshes those on invalidation (see
//! `src/backend.rs`).
//!
//! Both maps are bounded: a SaaS with a keyring per customer meets thousands of keyrings, and a
//! backend must not grow without limit. When the ciphers reach their capacity, expired ones go
//! first, then an arbitrary one (the next use unwraps it again from the shared cache); the named
//! keyrings' entries are all dropped at once and reloaded at their next use.
//!
//! Each named keyring's entry carries the stamp of the invalidation it was loaded under: an
//! entry whose stamp is not the backend's current one is stale and is reloaded, alone, at the
//! keyring's next use. So an invalidation costs each keyring one query at its next use, never a
//! reload of every keyring.

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

/// What the ring knows of a named keyring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Named {
    /// It exists; its current key, if it has one yet.
    Live(Option<CurrentKey>),
    /// It was destroyed (crypto-shredded): nothing encrypts under it.
    Destroyed,
}

/// Ready ciphers by key id, plus the current key of each keyring met.
pub struct KeyRing {
    current: Option<CurrentKey>,
    named: HashMap<InlineName, (Named, u64), BuildHasherDefault<KeyIdHasher>>,
    /// Each cipher with the instant after which its key must be unwrapped again
    /// (`immuta.cache_ttl`), so that revoking KMS access takes effect.
    ciphers: HashMap<KeyId, (DataCipher, UnixMicros), BuildHasherDefault<KeyIdHasher>>,
    capacity: usize,
}

impl Default for KeyRing {
    fn default() -> Self {
        KeyRing::with_capacity(Self::DEFAULT_CAPACITY)
    }
}

/// A keyring name held inline (a name is at most 63 bytes), so that finding a keyring touches
/// the map's own memory and not a separate allocation per name: with thousands of keyrings met
/// in turn, each such pointer is a cache miss per row (measured: the name comparison was the
/// costliest instruction of a row encrypted under one of 10,000 keyrings).
#[derive(Clone, Copy, PartialEq, Eq)]
struct InlineName {
    len: u8,
    bytes: [u8; 63],
}

impl InlineName {
    /// `None` for a name longer than any keyring's.
    #[inline]
    fn new(name: &str) -> Option<InlineName> {
        let len = name.len();
        if len > 63 {
            return None;
        }
        let mut bytes = [0u8; 63];
        bytes[..len].copy_from_slice(name.as_bytes());
        Some(InlineName { len: len as u8, bytes })
    }
}

impl std::hash::Hash for InlineName {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write(&self.bytes[..usize::from(self.len)]);
    }
}

/// Fibonacci hashing: spreads consecutive ids over the high bits hashbrown uses. Also used for
/// keyring names (eight bytes at a time), which only an administrator creates.
#[derive(Default)]
pub struct KeyIdHasher(u64);

impl Hasher for KeyIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            let word = u64::from_le_bytes(word) ^ (chunk.len() as u64) << 59;
            self.0 = (self.0.rotate_left(26) ^ word).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_i64(&mut self, n: i64) {
        self.0 = (n as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

impl KeyRing {
    /// Ciphers a ring holds unless told otherwise: a keyring per customer of a large SaaS, each
    /// with its current key (about 600 bytes each: 10 MB at most).
    pub const DEFAULT_CAPACITY: usize = 16_384;

    pub fn with_capacity(capacity: usize) -> KeyRing {
        KeyRing {
            current: None,
            named: HashMap::default(),
            ciphers: HashMap::default(),
            capacity: capacity.max(1),
        }
    }

    /// The default keyring's current key.
    pub fn current(&self) -> Option<CurrentKey> {
        self.current
    }

    pub fn set_current(&mut self, current: Option<CurrentKey>) {
        self.current = current;
    }

    /// What the ring knows of keyring `name`, and the stamp it was loaded under; `None` when it
    /// has not been loaded.
    #[inline]
    pub fn named(&self, name: &str) -> Option<(Named, u64)> {
        self.named.get(&InlineName::new(name)?).copied()
    }

    /// Records what keyring `name` is (a name longer than any keyring's is not kept).
    pub fn set_named(&mut self, name: &str, named: Named, stamp: u64) {
        let Some(key) = InlineName::new(name) else { return };
        if self.named.len() >= self.capacity && !self.named.contains_key(&key) {
            self.named.clear();
        }
        self.named.insert(key, (named, stamp));
    }

    /// How many named keyrings the ring knows.
    pub fn named_len(&self) -> usize {
        self.named.len()
    }

    /// The cipher of key `id`, unless it is absent or expired at `now`.
    pub fn cipher(&self, id: KeyId, now: UnixMicros) -> Option<&DataCipher> {
        self.ciphers.get(&id).filter(|(_, expires)| now < *expires).map(|(c, _)| c)
    }

    /// The cipher of key `id` whatever its expiry: for use right after loading it.
    pub fn loaded(&self, id: KeyId) -> Option<&DataCipher> {
        self.ciphers.get(&id).map(|(c, _)| c)
    }

    /// Adds a cipher, making room first if the ring is full (expired ciphers, else any one).
    pub fn insert(&mut self, cipher: DataCipher, expires_at: UnixMicros, now: UnixMicros) {
        let id = cipher.key_id();
        if self.ciphers.len() >= self.capacity && !self.ciphers.contains_key(&id) {
            self.ciphers.retain(|_, (_, expires)| now < *expires);
            if self.ciphers.len() >= self.capacity {
                if let Some(victim) = self.ciphers.keys().find(|k| **k != id).copied() {
                    self.ciphers.remove(&victim);
                }
            }
        }
        self.ciphers.insert(id, (cipher, expires_at));
    }

    /// How many keys the ring holds (expired ones included until replaced).
    pub fn len(&self) -> usize {
        self.ciphers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ciphers.is_empty()
    }

    /// Keeps only the ciphers whose keys may still be used: drops keys created by transactions
    /// that rolled back, and keys disabled or destroyed since. Dropped ciphers zeroize their key
    /// schedules.
    pub fn retain(&mut self, mut usable: impl FnMut(KeyId) -> bool) {
        self.ciphers.retain(|id, _| usable(*id));
    }

    /// Forgets every cipher and every current key.
    pub fn clear(&mut self) {
        self.ciphers.clear();
        self.named.clear();
        self.current = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::DataKey;

    fn cipher(id: i64) -> DataCipher {
        DataCipher::new(KeyId::new(id).unwrap(), &DataKey::generate())
    }

    #[test]
    fn retain_drops_keys_that_no_longer_exist() {
        let mut ring = KeyRing::default();
        for id in 1..=3 {
            ring.insert(cipher(id), UnixMicros(100), UnixMicros(0));
        }
        ring.retain(|id| id.get() != 2);
        assert!(ring.cipher(KeyId::new(1).unwrap(), UnixMicros(0)).is_some());
        assert!(ring.cipher(KeyId::new(1).unwrap(), UnixMicros(100)).is_none(), "expired");
        assert!(ring.cipher(KeyId::new(2).unwrap(), UnixMicros(0)).is_none());
        assert_eq!(ring.len(), 2);
        ring.set_named("t", Named::Live(None), 1);
        ring.clear();
        assert!(ring.is_empty() && ring.current().is_none() && ring.named("t").is_none());
    }

    #[test]
    fn the_ring_never_holds_more_ciphers_than_its_capacity_and_evicts_expired_ones_first() {
        let mut ring = KeyRing::with_capacity(3);
        ring.insert(cipher(1), UnixMicros(10), UnixMicros(0));
        ring.insert(cipher(2), UnixMicros(1_000), UnixMicros(0));
        ring.insert(cipher(3), UnixMicros(1_000), UnixMicros(0));
        // At 20, key 1 has expired: it is the one that makes room.
        ring.insert(cipher(4), UnixMicros(1_000), UnixMicros(20));
        assert_eq!(ring.len(), 3);
        assert!(ring.loaded(KeyId::new(1).unwrap()).is_none());
        for id in 5..100 {
            ring.insert(cipher(id), UnixMicros(1_000), UnixMicros(20));
            assert!(ring.len() <= 3);
            assert!(ring.loaded(KeyId::new(id).unwrap()).is_some(), "the key just inserted stays");
        }
    }

    #[test]
    fn named_keyrings_are_bounded_and_carry_the_stamp_they_were_loaded_under() {
        let mut ring = KeyRing::with_capacity(2);
        let key = CurrentKey { id: KeyId::new(7).unwrap(), due_at: UnixMicros(5) };
        ring.set_named("a", Named::Live(Some(key)), 1);
        ring.set_named("b", Named::Destroyed, 1);
        assert_eq!(ring.named("a"), Some((Named::Live(Some(key)), 1)));
        ring.set_named("a", Named::Live(Some(key)), 2);
        assert_eq!(ring.named("a"), Some((Named::Live(Some(key)), 2)), "reloaded in place");
        ring.set_named("c", Named::Live(None), 2);
        assert!(ring.named("a").is_none() && ring.named("c").is_some());
        assert_eq!(ring.named_len(), 1);
        let long = "x".repeat(64);
        ring.set_named(&long, Named::Live(None), 2);
        assert!(ring.named(&long).is_none(), "no keyring has such a name");
        let max = "y".repeat(63);
        ring.set_named(&max, Named::Destroyed, 3);
        assert_eq!(ring.named(&max), Some((Named::Destroyed, 3)));
        assert!(ring.named(&max[..62]).is_none(), "a prefix is another name");
    }
}
