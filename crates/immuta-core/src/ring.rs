//! The backend's ring: the ciphers of the data keys it has unwrapped, and which key is current in
//! each keyring it has met.
//!
//! Lookups are by key id in a map hashed by one multiplication (key ids are trusted small
//! integers; SipHash cost 2% of a decrypt-heavy profile). The default keyring's current key is
//! held apart so that encryption without a keyring, the common case, costs one comparison and no
//! hashing. A named keyring is one entry of one cache line, found by its name, which links to
//! its current key's cipher: a row under one of thousands of keyrings touches that line and the
//! key schedule, and no map by key id. Data keys never change once created, so a cipher stays
//! valid until its key is disabled or destroyed; what changes is which key is current and which
//! keys may be used, and the SQL layer refreshes those on invalidation (see `src/backend.rs`).
//!
//! The map by key id owns the ciphers; a keyring's link does not keep a cipher alive, so a key
//! dropped from the map (disabled, destroyed, evicted) is zeroized at once and the link is made
//! again, by key id, at the next use.
//!
//! Both tables are bounded: a SaaS with a keyring per customer meets thousands of keyrings, and a
//! backend must not grow without limit. When the ciphers reach their capacity, expired ones go
//! first, then an arbitrary one (the next use unwraps it again from the shared cache); the named
//! keyrings' entries are all dropped at once and reloaded at their next use.
//!
//! The SQL layer marks a keyring's entry stale when something changed it (a new key, a state
//! change, its settings); a stale entry is reloaded, in place, at the keyring's next use. So a
//! change costs the keyrings it concerns a query each, not every keyring.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::rc::{Rc, Weak};

use hashbrown::HashTable;

use crate::cipher::DataCipher;
use crate::key::{DataKey, KeyId};
use crate::keyrings;
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

/// A cipher the ring holds, with the instant after which its key must be unwrapped again
/// (`immuta.cache_ttl`), so that revoking KMS access takes effect, and its key's keyring. The
/// fields a row uses come first.
#[repr(C)]
pub struct Loaded {
    expires: UnixMicros,
    cipher: DataCipher,
    keyring: Rc<str>,
}

impl Loaded {
    pub fn cipher(&self) -> &DataCipher {
        &self.cipher
    }
}

/// Ready ciphers by key id, plus the current key of each keyring met.
pub struct KeyRing {
    current: Option<CurrentKey>,
    named: NamedTable,
    /// The only owner of each cipher: dropping it here zeroizes the key schedule, whatever the
    /// named entries' links say.
    ciphers: HashMap<KeyId, Rc<Loaded>, BuildHasherDefault<KeyIdHasher>>,
    capacity: usize,
}

impl Default for KeyRing {
    fn default() -> Self {
        KeyRing::with_capacity(Self::DEFAULT_CAPACITY)
    }
}

/// Bytes of a name held in the entry itself; the rest of a longer name (at most 63 bytes in
/// all) is in a box of its own.
const HEAD: usize = 29;
const TAIL: usize = 63 - HEAD;

/// One named keyring, in exactly one cache line: with thousands of keyrings met in turn, each
/// row under a keyring finds it with one memory access that misses the processor's caches
/// (measured: the entry was the costliest access of such a row while it spanned two lines and
/// the key's cipher was looked up in a second map). A name of up to 29 bytes is compared within
/// the line; a longer one also reads its box.
#[repr(C, align(64))]
struct NamedEntry {
    len: u8,
    destroyed: bool,
    /// A change of the keyring may have happened since it was loaded: reload before use.
    stale: bool,
    head: [u8; HEAD],
    tail: Option<Box<[u8; TAIL]>>,
    /// The current key's id (0: none yet) and when it is due.
    current_id: i64,
    due_at: UnixMicros,
    /// The current key's cipher, once the ring has one: found without a lookup by key id.
    cipher: Weak<Loaded>,
}

impl NamedEntry {
    fn new(name: &[u8], named: Named) -> NamedEntry {
        let mut head = [0u8; HEAD];
        let split = name.len().min(HEAD);
        head[..split].copy_from_slice(&name[..split]);
        let tail = (name.len() > HEAD).then(|| {
            let mut tail = Box::new([0u8; TAIL]);
            tail[..name.len() - HEAD].copy_from_slice(&name[HEAD..]);
            tail
        });
        let mut entry = NamedEntry {
            len: name.len() as u8,
            destroyed: false,
            stale: false,
            head,
            tail,
            current_id: 0,
            due_at: UnixMicros(0),
            cipher: Weak::new(),
        };
        entry.set(named);
        entry
    }

    fn set(&mut self, named: Named) {
        let current = match named {
            Named::Live(current) => current,
            Named::Destroyed => None,
        };
        self.destroyed = named == Named::Destroyed;
        self.current_id = current.map_or(0, |c| c.id.get());
        self.due_at = current.map_or(UnixMicros(0), |c| c.due_at);
        self.stale = false;
        if current.is_none_or(|c| self.cipher.upgrade().is_none_or(|l| l.cipher.key_id() != c.id)) {
            self.cipher = Weak::new();
        }
    }

    #[inline]
    fn is(&self, name: &[u8]) -> bool {
        if usize::from(self.len) != name.len() {
            return false;
        }
        let split = name.len().min(HEAD);
        self.head[..split] == name[..split]
            && self.tail.as_ref().is_none_or(|tail| tail[..name.len() - HEAD] == name[HEAD..])
    }

    fn name(&self) -> Vec<u8> {
        let len = usize::from(self.len);
        let mut name = self.head[..len.min(HEAD)].to_vec();
        if let Some(tail) = &self.tail {
            name.extend_from_slice(&tail[..len - HEAD]);
        }
        name
    }

    #[inline]
    fn current(&self) -> Option<CurrentKey> {
        KeyId::new(self.current_id).map(|id| CurrentKey { id, due_at: self.due_at })
    }

    fn named(&self) -> Named {
        if self.destroyed {
            Named::Destroyed
        } else {
            Named::Live(self.current())
        }
    }
}

/// The named keyrings' entries in the order they were met, and an index of them by name (four
/// bytes per keyring and its control byte, which stay in the processor's caches): the entries of
/// keyrings met together sit together in memory, as their keys' schedules do, instead of being
/// scattered over the table by their hashes. Entries are only added, updated in place, or all
/// dropped at once.
#[derive(Default)]
struct NamedTable {
    index: HashTable<u32>,
    entries: Vec<NamedEntry>,
}

impl NamedTable {
    #[inline]
    fn position(&self, name: &[u8]) -> Option<usize> {
        let entries = &self.entries;
        self.index.find(hash_name(name), |&i| entries[i as usize].is(name)).map(|&i| i as usize)
    }

    #[inline]
    fn find(&self, name: &[u8]) -> Option<&NamedEntry> {
        self.position(name).map(|i| &self.entries[i])
    }

    #[inline]
    fn find_mut(&mut self, name: &[u8]) -> Option<&mut NamedEntry> {
        self.position(name).map(|i| &mut self.entries[i])
    }

    /// Adds the entry of a name not yet in the table.
    fn insert(&mut self, entry: NamedEntry) {
        let position =
            u32::try_from(self.entries.len()).expect("the ring is bounded far below 2^32 keyrings");
        let entries = &self.entries;
        self.index
            .insert_unique(hash_name(&entry.name()), position, |&i| hash_name(&entries[i as usize].name()));
        self.entries.push(entry);
    }

    fn len(&self) -> usize {
        self.entries.len()
    }

    fn clear(&mut self) {
        self.index.clear();
        self.entries.clear();
    }
}

/// A keyring name's hash (eight bytes at a time; names are created only by an administrator).
#[inline]
fn hash_name(name: &[u8]) -> u64 {
    let mut hasher = KeyIdHasher::default();
    hasher.write(name);
    let h = hasher.finish();
    // The table places entries by the low bits, which a multiplication mixes least.
    h ^ (h >> 29)
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
        let mut mix = |word: u64, len: usize| {
            let word = word ^ (len as u64) << 59;
            self.0 = (self.0.rotate_left(26) ^ word).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        };
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            mix(u64::from_le_bytes(chunk.try_into().expect("eight bytes")), 8);
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            // Byte by byte: a copy of a variable length would be a call to memcpy per name.
            let word = rest.iter().rev().fold(0u64, |word, &b| word << 8 | u64::from(b));
            mix(word, rest.len());
        }
    }

    fn write_i64(&mut self, n: i64) {
        self.0 = (n as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

impl KeyRing {
    /// Ciphers a ring holds unless told otherwise: a keyring per customer of a large SaaS, each
    /// with its current key (about 1.6 kB each, `cipher.rs`: 27 MB at most).
    pub const DEFAULT_CAPACITY: usize = 16_384;

    pub fn with_capacity(capacity: usize) -> KeyRing {
        KeyRing {
            current: None,
            named: NamedTable::default(),
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

    #[inline]
    fn entry(&self, name: &[u8]) -> Option<&NamedEntry> {
        self.named.find(name)
    }

    /// What the ring knows of keyring `name`; `None` when it has not been loaded, or may have
    /// changed since ([`forget_named`](Self::forget_named)).
    #[inline]
    pub fn named(&self, name: &str) -> Option<Named> {
        self.entry(name.as_bytes()).filter(|e| !e.stale).map(NamedEntry::named)
    }

    /// The hot path of a row under a named keyring: its current key and that key's cipher, if
    /// the keyring's entry is loaded and not stale, its key is not due at `now`, and the cipher is
    /// loaded and not expired. Touches the keyring's entry and, through its link, the cipher;
    /// the map by key id only when the link must be made again.
    #[inline]
    pub fn current_cipher(&mut self, name: &str, now: UnixMicros) -> Option<(KeyId, Rc<Loaded>)> {
        let name = name.as_bytes();
        let entry = self.named.find_mut(name)?;
        if entry.stale || now >= entry.due_at {
            return None;
        }
        let id = KeyId::new(entry.current_id)?;
        let loaded = match entry.cipher.upgrade() {
            Some(loaded) if loaded.cipher.key_id() == id => loaded,
            _ => {
                let loaded = self.ciphers.get(&id)?.clone();
                entry.cipher = Rc::downgrade(&loaded);
                loaded
            }
        };
        (now < loaded.expires).then_some((id, loaded))
    }

    /// The hot path of a re-encryption: the cipher of key `id`, and the current key of that key's
    /// keyring with its cipher, if the ring holds both unexpired at `now`, the keyring's entry is
    /// not stale and its current key is not due. One lookup by key id, then the keyring's entry
    /// (or the default keyring's current key) and its link.
    #[inline]
    pub fn reencryption(&mut self, id: KeyId, now: UnixMicros) -> Option<(Rc<Loaded>, KeyId, Rc<Loaded>)> {
        let source = self.ciphers.get(&id).filter(|l| now < l.expires)?.clone();
        if &*source.keyring == keyrings::DEFAULT {
            let current = self.current.filter(|c| now < c.due_at)?;
            let target = self.ciphers.get(&current.id).filter(|l| now < l.expires)?.clone();
            return Some((source, current.id, target));
        }
        let (current, target) = self.current_cipher(&source.keyring, now)?;
        Some((source, current, target))
    }

    /// Records what keyring `name` is (a name longer than any keyring's is not kept).
    pub fn set_named(&mut self, name: &str, named: Named) {
        let name = name.as_bytes();
        if name.len() > HEAD + TAIL {
            return;
        }
        if let Some(entry) = self.named.find_mut(name) {
            entry.set(named);
            return;
        }
        if self.named.len() >= self.capacity {
            self.named.clear();
        }
        self.named.insert(NamedEntry::new(name, named));
    }

    /// How many named keyrings the ring knows.
    pub fn named_len(&self) -> usize {
        self.named.len()
    }

    /// Marks keyring `name` as changed: it is reloaded at its next use, in place.
    pub fn forget_named(&mut self, name: &str) {
        if let Some(entry) = self.named.find_mut(name.as_bytes()) {
            entry.stale = true;
        }
    }

    /// Forgets what the ring knows of the named keyrings.
    pub fn clear_named(&mut self) {
        self.named.clear();
    }

    /// The cipher of key `id`, unless it is absent or expired at `now`.
    pub fn cipher(&self, id: KeyId, now: UnixMicros) -> Option<&DataCipher> {
        self.ciphers.get(&id).filter(|l| now < l.expires).map(|l| &l.cipher)
    }

    /// The cipher of key `id` whatever its expiry: for use right after loading it.
    pub fn loaded(&self, id: KeyId) -> Option<&DataCipher> {
        self.ciphers.get(&id).map(|l| &l.cipher)
    }

    /// The keyring of key `id`, if the ring holds its cipher.
    pub fn keyring_of(&self, id: KeyId) -> Option<Rc<str>> {
        self.ciphers.get(&id).map(|l| l.keyring.clone())
    }

    /// Makes the cipher of key `id` of `keyring` from `key`, making room first if the ring is full
    /// (expired ciphers, else any one). The cipher is made here, in the expression that moves it
    /// into its `Rc`, rather than made by the caller and passed down: each move of a cipher may
    /// leave a copy of its key schedule behind, unzeroized. One remains: Rust builds the value
    /// on the stack and then moves it into the allocation (and `aes` builds the round keys in a
    /// local first), as with every `DataKey` unwrapped.
    pub fn insert(
        &mut self,
        id: KeyId,
        key: &DataKey,
        keyring: &str,
        expires_at: UnixMicros,
        now: UnixMicros,
    ) {
        if self.ciphers.len() >= self.capacity && !self.ciphers.contains_key(&id) {
            self.ciphers.retain(|_, l| now < l.expires);
            if self.ciphers.len() >= self.capacity {
                if let Some(victim) = self.ciphers.keys().find(|k| **k != id).copied() {
                    self.ciphers.remove(&victim);
                }
            }
        }
        let keyring = keyring.into();
        self.ciphers
            .insert(id, Rc::new(Loaded { expires: expires_at, cipher: DataCipher::new(id, key), keyring }));
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
    /// schedules (the named entries' links do not keep them).
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

    fn k(id: i64) -> KeyId {
        KeyId::new(id).unwrap()
    }

    #[test]
    fn retain_drops_keys_that_no_longer_exist() {
        let mut ring = KeyRing::default();
        for id in 1..=3 {
            ring.insert(k(id), &DataKey::generate(), "k", UnixMicros(100), UnixMicros(0));
        }
        ring.retain(|id| id.get() != 2);
        assert!(ring.cipher(k(1), UnixMicros(0)).is_some());
        assert!(ring.cipher(k(1), UnixMicros(100)).is_none(), "expired");
        assert!(ring.cipher(k(2), UnixMicros(0)).is_none());
        assert_eq!(ring.len(), 2);
        assert_eq!(ring.keyring_of(k(1)).as_deref(), Some("k"));
        assert_eq!(ring.keyring_of(k(2)), None);
        ring.set_named("t", Named::Live(None));
        ring.clear();
        assert!(ring.is_empty() && ring.current().is_none() && ring.named("t").is_none());
    }

    #[test]
    fn the_ring_never_holds_more_ciphers_than_its_capacity_and_evicts_expired_ones_first() {
        let mut ring = KeyRing::with_capacity(3);
        ring.insert(k(1), &DataKey::generate(), "k", UnixMicros(10), UnixMicros(0));
        ring.insert(k(2), &DataKey::generate(), "k", UnixMicros(1_000), UnixMicros(0));
        ring.insert(k(3), &DataKey::generate(), "k", UnixMicros(1_000), UnixMicros(0));
        // At 20, key 1 has expired: it is the one that makes room.
        ring.insert(k(4), &DataKey::generate(), "k", UnixMicros(1_000), UnixMicros(20));
        assert_eq!(ring.len(), 3);
        assert!(ring.loaded(k(1)).is_none());
        for id in 5..100 {
            ring.insert(k(id), &DataKey::generate(), "k", UnixMicros(1_000), UnixMicros(20));
            assert!(ring.len() <= 3);
            assert!(ring.loaded(k(id)).is_some(), "the key just inserted stays");
        }
    }

    #[test]
    fn named_keyrings_are_bounded_and_reloaded_in_place_once_marked_stale() {
        let mut ring = KeyRing::with_capacity(2);
        let key = CurrentKey { id: k(7), due_at: UnixMicros(5) };
        ring.set_named("a", Named::Live(Some(key)));
        ring.set_named("b", Named::Destroyed);
        assert_eq!(ring.named("a"), Some(Named::Live(Some(key))));
        ring.forget_named("a");
        assert_eq!(ring.named("a"), None, "stale");
        assert_eq!(ring.named("b"), Some(Named::Destroyed), "only the keyring marked");
        ring.forget_named("nobody");
        ring.set_named("a", Named::Live(None));
        assert_eq!(ring.named("a"), Some(Named::Live(None)), "reloaded in place");
        assert_eq!(ring.named_len(), 2);
        ring.set_named("c", Named::Live(None));
        assert!(ring.named("a").is_none() && ring.named("c").is_some());
        assert_eq!(ring.named_len(), 1);
        let long = "x".repeat(64);
        ring.set_named(&long, Named::Live(None));
        assert!(ring.named(&long).is_none(), "no keyring has such a name");
        let max = "y".repeat(63);
        ring.set_named(&max, Named::Destroyed);
        assert_eq!(ring.named(&max), Some(Named::Destroyed));
        assert!(ring.named(&max[..62]).is_none(), "a prefix is another name");
        ring.clear_named();
        assert_eq!(ring.named_len(), 0);
    }

    #[test]
    fn a_keyring_entry_fills_one_cache_line_and_links_to_its_current_cipher_without_owning_it() {
        assert_eq!(std::mem::size_of::<NamedEntry>(), 64);
        let mut ring = KeyRing::default();
        let now = UnixMicros(10);
        let long = "tenant-with-a-name-longer-than-the-head_0001";
        for (name, id) in [("t", 1), (long, 2)] {
            ring.set_named(name, Named::Live(Some(CurrentKey { id: k(id), due_at: UnixMicros(50) })));
            assert!(ring.current_cipher(name, now).is_none(), "the cipher is not loaded yet");
            ring.insert(k(id), &DataKey::generate(), "k", UnixMicros(100), now);
            let (got, loaded) = ring.current_cipher(name, now).expect("linked by key id");
            assert_eq!((got, loaded.cipher().key_id()), (k(id), k(id)));
            drop(loaded);
            assert!(ring.current_cipher(name, UnixMicros(50)).is_none(), "due");
            ring.forget_named(name);
            assert!(ring.current_cipher(name, now).is_none(), "stale");
            ring.set_named(name, Named::Live(Some(CurrentKey { id: k(id), due_at: UnixMicros(50) })));
            assert!(ring.current_cipher(name, now).is_some(), "reloaded, the link kept");
        }
        assert!(ring.current_cipher(&long[..long.len() - 1], now).is_none(), "a prefix is another name");
        assert!(ring.current_cipher("tenant-with-a-name-longer-than-the-head_0002", now).is_none());
        // Dropping the key from the ring drops its cipher: the link keeps nothing alive.
        ring.retain(|id| id != k(1));
        assert!(ring.current_cipher("t", now).is_none());
        assert_eq!(ring.len(), 1);
        // A new current key: the old link no longer serves.
        ring.insert(k(3), &DataKey::generate(), "k", UnixMicros(100), now);
        ring.set_named(long, Named::Live(Some(CurrentKey { id: k(3), due_at: UnixMicros(50) })));
        assert_eq!(ring.current_cipher(long, now).map(|(id, _)| id), Some(k(3)));
        // An expired cipher is not used (its key is unwrapped again).
        ring.insert(k(3), &DataKey::generate(), "k", UnixMicros(40), now);
        assert!(ring.current_cipher(long, UnixMicros(39)).is_some());
        assert!(ring.current_cipher(long, UnixMicros(40)).is_none());
        ring.set_named(long, Named::Destroyed);
        assert!(ring.current_cipher(long, now).is_none());
        assert_eq!(ring.named(long), Some(Named::Destroyed));
    }

    #[test]
    fn a_reencryption_finds_the_source_key_and_its_keyrings_current_key_or_nothing() {
        let mut ring = KeyRing::default();
        let now = UnixMicros(10);
        let ids = |r: Option<(Rc<Loaded>, KeyId, Rc<Loaded>)>| {
            r.map(|(s, c, t)| (s.cipher().key_id(), c, t.cipher().key_id()))
        };
        // The default keyring: keys 1 (old) and 2 (current).
        ring.insert(k(1), &DataKey::generate(), keyrings::DEFAULT, UnixMicros(100), now);
        assert!(ring.reencryption(k(1), now).is_none(), "no current key yet");
        ring.set_current(Some(CurrentKey { id: k(2), due_at: UnixMicros(50) }));
        assert!(ring.reencryption(k(1), now).is_none(), "the current key is not loaded");
        ring.insert(k(2), &DataKey::generate(), keyrings::DEFAULT, UnixMicros(100), now);
        assert_eq!(ids(ring.reencryption(k(1), now)), Some((k(1), k(2), k(2))));
        assert_eq!(ids(ring.reencryption(k(2), now)), Some((k(2), k(2), k(2))), "already current");
        assert!(ring.reencryption(k(1), UnixMicros(50)).is_none(), "the current key is due");
        assert!(ring.reencryption(k(3), now).is_none(), "the source key is not loaded");
        // A named keyring: its own current key, never the default one.
        ring.insert(k(3), &DataKey::generate(), "t", UnixMicros(30), now);
        assert!(ring.reencryption(k(3), now).is_none(), "the keyring is not loaded");
        ring.set_named("t", Named::Live(Some(CurrentKey { id: k(4), due_at: UnixMicros(50) })));
        assert!(ring.reencryption(k(3), now).is_none(), "its current key is not loaded");
        ring.insert(k(4), &DataKey::generate(), "t", UnixMicros(100), now);
        assert_eq!(ids(ring.reencryption(k(3), now)), Some((k(3), k(4), k(4))));
        assert!(ring.reencryption(k(3), UnixMicros(30)).is_none(), "the source key expired");
        ring.forget_named("t");
        assert!(ring.reencryption(k(3), now).is_none(), "the keyring is stale");
        ring.set_named("t", Named::Destroyed);
        assert!(ring.reencryption(k(4), now).is_none(), "the keyring was destroyed");
    }

    #[test]
    fn many_named_keyrings_are_found_by_name() {
        let mut ring = KeyRing::default();
        for i in 0..10_000 {
            let named = Named::Live(Some(CurrentKey { id: k(i + 1), due_at: UnixMicros(i) }));
            ring.set_named(&format!("tenant_{i}"), named);
        }
        assert_eq!(ring.named_len(), 10_000);
        for i in 0..10_000 {
            let want = Named::Live(Some(CurrentKey { id: k(i + 1), due_at: UnixMicros(i) }));
            assert_eq!(ring.named(&format!("tenant_{i}")), Some(want));
        }
        assert!(ring.named("tenant_10000").is_none());
    }
}
