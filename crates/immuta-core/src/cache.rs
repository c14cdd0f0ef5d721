//! The shared key cache's slot table: which unwrapped data keys the whole cluster holds, as plain
//! data that the SQL layer places in PostgreSQL shared memory and guards with one LWLock.
//!
//! Why two levels: the backend-local key ring (`ring.rs`) answers every row without any lock;
//! this table sits behind it so that a key unwrapped by one backend (one KMS `Decrypt`) serves
//! every other backend and parallel worker of the cluster. A slot that is being loaded is marked
//! with the loader's process id, so concurrent first uses of one key wait for that single
//! unwrap instead of each calling KMS.
//!
//! A key is identified by database, key id *and* a digest of its wrapped bytes: key ids restart
//! when the extension is dropped and created again, or a database is restored elsewhere, and the
//! digest keeps a stale slot from ever answering for a different key with the same id.
//!
//! The table is shared by every database of the cluster, and each database may be a different
//! tenant, so no database may use it against another ([`fair_victim`]): when it is full, the
//! slot given up is the least recently used one of the database that holds the most slots (the
//! requesting database's own if it holds as many as any other). A database can take a slot from
//! another only while it holds fewer than that one, so each keeps at least its fair share
//! (capacity divided by the databases using the cache) of what it needs, however many keys
//! another creates. Resets and statistics are per database too ([`DatabaseEntry`]).

use sha2::{Digest, Sha256};
use zeroize::Zeroize;

use crate::key::{KeyId, WrappedKey, DATA_KEY_LEN};
use crate::time::UnixMicros;

/// Identity of a cached key.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct KeyIdent {
    pub database: u32,
    pub key_id: i64,
    pub wrapped_digest: [u8; 16],
}

impl KeyIdent {
    pub fn new(database: u32, key_id: KeyId, wrapped: &WrappedKey) -> KeyIdent {
        let digest = Sha256::digest(wrapped.as_bytes());
        KeyIdent {
            database,
            key_id: key_id.get(),
            wrapped_digest: digest[..16].try_into().expect("32-byte digest"),
        }
    }
}

const EMPTY: u32 = 0;
const LOADING: u32 = 1;
const READY: u32 = 2;

/// One slot. Plain data (`repr(C)`, `Copy`) so it can live in shared memory.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Slot {
    state: u32,
    loader_pid: i32,
    ident: KeyIdent,
    /// READY: when the key must be unwrapped again (`immuta.cache_ttl`); `i64::MAX` for never.
    /// LOADING: when the loader's own deadline passes; after it, another process takes over.
    expires_at: i64,
    /// Logical clock of the last use, for least-recently-used eviction.
    last_used: u64,
    key: [u8; DATA_KEY_LEN],
}

impl Slot {
    pub const EMPTY: Slot = Slot {
        state: EMPTY,
        loader_pid: 0,
        ident: KeyIdent { database: 0, key_id: 0, wrapped_digest: [0; 16] },
        expires_at: 0,
        last_used: 0,
        key: [0; DATA_KEY_LEN],
    };

    fn clear(&mut self) {
        self.key.zeroize();
        *self = Slot::EMPTY;
    }
}

/// What a lookup found.
pub enum Lookup {
    /// The key and when it expires.
    Ready([u8; DATA_KEY_LEN], UnixMicros),
    /// Another process is unwrapping it.
    Loading {
        pid: i32,
    },
    Absent,
}

/// Looks `ident` up; an expired slot counts as absent.
pub fn lookup(slots: &[Slot], ident: &KeyIdent, now: UnixMicros) -> Lookup {
    for slot in slots {
        if slot.state != EMPTY && slot.ident == *ident {
            return match slot.state {
                READY if slot.expires_at > now.0 => Lookup::Ready(slot.key, UnixMicros(slot.expires_at)),
                READY => Lookup::Absent,
                _ => Lookup::Loading { pid: slot.loader_pid },
            };
        }
    }
    Lookup::Absent
}

/// Marks a slot as used at `tick` (for eviction).
pub fn touch(slots: &mut [Slot], ident: &KeyIdent, tick: u64) {
    if let Some(slot) = slots.iter_mut().find(|s| s.state == READY && s.ident == *ident) {
        slot.last_used = tick;
    }
}

/// What claiming a slot did.
pub enum Claim {
    /// The caller must unwrap the key and `fill` this slot (or `abandon` it). `evicted` names the
    /// database whose live key was given up for it, if one was.
    Claimed { index: usize, evicted: Option<u32> },
    /// Someone else holds it: ready, or being loaded.
    Taken(Lookup),
    /// Every slot is being loaded: unwrap without caching.
    Full,
}

/// Claims a slot for loading `ident` by `pid` until `deadline`: reuses its own expired slot, or
/// an empty, expired or abandoned one, or evicts a live one chosen by [`fair_victim`]
/// (zeroizing it). A slot left loading
/// by a process that died (`alive(pid)` is false) or that overran its deadline is taken over.
pub fn claim(
    slots: &mut [Slot],
    ident: &KeyIdent,
    pid: i32,
    now: UnixMicros,
    deadline: UnixMicros,
    alive: impl Fn(i32) -> bool,
) -> Claim {
    let stuck = |s: &Slot| s.state == LOADING && (!alive(s.loader_pid) || s.expires_at <= now.0);
    let mut target = None;
    for (i, slot) in slots.iter().enumerate() {
        if slot.state != EMPTY && slot.ident == *ident {
            match slot.state {
                READY if slot.expires_at > now.0 => return Claim::Taken(lookup(slots, ident, now)),
                LOADING if slot.loader_pid != pid && !stuck(slot) => {
                    return Claim::Taken(Lookup::Loading { pid: slot.loader_pid })
                }
                _ => {
                    target = Some(i);
                    break;
                }
            }
        }
    }
    let mut evicted = None;
    let garbage = |s: &Slot| s.state == EMPTY || (s.state == READY && s.expires_at <= now.0) || stuck(s);
    let index = match target.or_else(|| slots.iter().position(garbage)) {
        Some(i) => i,
        None => {
            let live = |s: &Slot| s.state == READY;
            match fair_victim(slots, ident.database, |s| s.ident.database, live, |s| s.last_used) {
                Some(i) => {
                    evicted = Some(slots[i].ident.database);
                    i
                }
                None => return Claim::Full,
            }
        }
    };
    let slot = &mut slots[index];
    slot.clear();
    slot.state = LOADING;
    slot.loader_pid = pid;
    slot.ident = *ident;
    slot.expires_at = deadline.0;
    Claim::Claimed { index, evicted }
}

/// The slot to give up when a table shared by databases is full and `requester` needs one: the
/// least recently used (`age`) of the `evictable` slots of the database holding the most slots
/// (occupied ones: `database` is not 0), or of `requester` itself when it holds as many as
/// that one. `None` when nothing is evictable. Used for key slots and usage counter slots alike.
pub fn fair_victim<T>(
    items: &[T],
    requester: u32,
    database: impl Fn(&T) -> u32,
    evictable: impl Fn(&T) -> bool,
    age: impl Fn(&T) -> u64,
) -> Option<usize> {
    let mut held = std::collections::HashMap::<u32, usize>::new();
    for item in items {
        match database(item) {
            0 => {}
            db => *held.entry(db).or_default() += 1,
        }
    }
    let mine = held.get(&requester).copied().unwrap_or(0);
    // Databases by slots held, most first; ties go to the requester, then to the lower oid, so
    // the choice does not depend on the order of the table.
    let mut order: Vec<(u32, usize)> = held.into_iter().collect();
    order.sort_by_key(|&(db, n)| (std::cmp::Reverse(n), db != requester, db));
    order.into_iter().filter(|&(db, n)| db == requester || n > mine).find_map(|(db, _)| {
        items
            .iter()
            .enumerate()
            .filter(|(_, item)| database(item) == db && evictable(item))
            .min_by_key(|(_, item)| age(item))
            .map(|(i, _)| i)
    })
}

/// Publishes the unwrapped key in the slot the caller (`pid`) claimed.
pub fn fill(
    slots: &mut [Slot],
    index: usize,
    ident: &KeyIdent,
    pid: i32,
    key: &[u8; DATA_KEY_LEN],
    expires_at: UnixMicros,
    tick: u64,
) {
    let slot = &mut slots[index];
    // Only the loader that still holds the claim publishes: one that overran its deadline and was
    // taken over, or whose slot a reset emptied, does not.
    if slot.state == LOADING && slot.ident == *ident && slot.loader_pid == pid {
        slot.key = *key;
        slot.expires_at = expires_at.0;
        slot.last_used = tick;
        slot.state = READY;
    }
}

/// Gives a claimed slot back after a failed unwrap.
pub fn abandon(slots: &mut [Slot], index: usize, ident: &KeyIdent, pid: i32) {
    let slot = &mut slots[index];
    if slot.state == LOADING && slot.ident == *ident && slot.loader_pid == pid {
        slot.clear();
    }
}

/// Zeroizes and empties every slot of `database`, or every slot of the cluster when `None`;
/// returns how many held a key.
pub fn clear(slots: &mut [Slot], database: Option<u32>) -> usize {
    let mine = |s: &Slot| s.state != EMPTY && database.is_none_or(|db| s.ident.database == db);
    let n = slots.iter().filter(|s| s.state == READY && mine(s)).count();
    slots.iter_mut().filter(|s| mine(s)).for_each(Slot::clear);
    n
}

/// Zeroizes and empties the slots of keys `ids` of `database` (keys disabled or destroyed),
/// whether ready or being loaded; returns how many held a key.
pub fn clear_keys(slots: &mut [Slot], database: u32, ids: &[KeyId]) -> usize {
    let hit = |s: &Slot| {
        s.state != EMPTY && s.ident.database == database && ids.iter().any(|id| id.get() == s.ident.key_id)
    };
    let n = slots.iter().filter(|s| s.state == READY && hit(s)).count();
    slots.iter_mut().filter(|s| hit(s)).for_each(Slot::clear);
    n
}

/// Number of slots holding a ready key, of `database` or of the whole cluster.
pub fn ready_count(slots: &[Slot], now: UnixMicros, database: Option<u32>) -> usize {
    slots
        .iter()
        .filter(|s| s.state == READY && s.expires_at > now.0)
        .filter(|s| database.is_none_or(|db| s.ident.database == db))
        .count()
}

/// What one database did with the shared cache since the server started.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DatabaseStats {
    /// Keys found ready in the shared cache.
    pub hits: u64,
    /// Keys that had to be unwrapped (or waited for).
    pub misses: u64,
    pub kms_unwraps: u64,
    pub local_unwraps: u64,
    /// This database's live keys given up to make room (for this or another database).
    pub evictions: u64,
}

impl DatabaseStats {
    pub fn add(&mut self, other: &DatabaseStats) {
        self.hits += other.hits;
        self.misses += other.misses;
        self.kms_unwraps += other.kms_unwraps;
        self.local_unwraps += other.local_unwraps;
        self.evictions += other.evictions;
    }
}

/// A database's own state in the shared cache: its reset generation and its statistics. An entry
/// is reused for another database only once its own was dropped ([`DatabaseTable::free`]), and
/// generations are never reused, so a backend never mistakes an old reset for none (no ABA);
/// when the table is full, further databases share [`DatabaseTable::overflow`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DatabaseEntry {
    /// The database's oid; 0 for a free entry.
    pub database: u32,
    /// Changed by every `immuta_cache_reset()` in the database, to a value never used before.
    pub reset_generation: u64,
    /// Changed by every commit that disabled or destroyed keys of the database: its backends
    /// reload their view of the keys at their next call, within the statement they are in.
    pub key_state_generation: u64,
    pub stats: DatabaseStats,
}

impl DatabaseEntry {
    pub const EMPTY: DatabaseEntry = DatabaseEntry {
        database: 0,
        reset_generation: 0,
        key_state_generation: 0,
        stats: DatabaseStats { hits: 0, misses: 0, kms_unwraps: 0, local_unwraps: 0, evictions: 0 },
    };
}

/// The entries of the databases that used the cache, and what the rest share.
pub struct DatabaseTable<'a> {
    pub entries: &'a mut [DatabaseEntry],
    /// Statistics of the databases that found no free entry.
    pub overflow: &'a mut DatabaseStats,
}

impl DatabaseTable<'_> {
    /// The entry of `database`, taking a free one if it has none; `None` when the table is full.
    pub fn entry(&mut self, database: u32) -> Option<&mut DatabaseEntry> {
        let index = self
            .entries
            .iter()
            .position(|e| e.database == database)
            .or_else(|| self.entries.iter().position(|e| e.database == 0))?;
        let entry = &mut self.entries[index];
        if entry.database == 0 {
            *entry = DatabaseEntry { database, ..DatabaseEntry::EMPTY };
        }
        Some(entry)
    }

    /// The statistics `database` counts into: its entry's, or the shared overflow.
    pub fn stats(&mut self, database: u32) -> &mut DatabaseStats {
        let index = self
            .entries
            .iter()
            .position(|e| e.database == database)
            .or_else(|| self.entries.iter().position(|e| e.database == 0));
        match index {
            Some(i) => {
                if self.entries[i].database == 0 {
                    self.entries[i] = DatabaseEntry { database, ..DatabaseEntry::EMPTY };
                }
                &mut self.entries[i].stats
            }
            None => self.overflow,
        }
    }

    /// The reset generation of `database`: 0 before its first reset. (A database without an
    /// entry has never been reset as itself: an entry is reused only once its database is gone,
    /// and a database that found none reset every database instead.)
    pub fn generation(&self, database: u32) -> u64 {
        self.entries.iter().find(|e| e.database == database).map_or(0, |e| e.reset_generation)
    }

    /// The statistics of `database`, if it has its own (not those it shares in the overflow).
    pub fn stats_of(&self, database: u32) -> Option<DatabaseStats> {
        self.entries.iter().find(|e| e.database == database).map(|e| e.stats)
    }

    /// Records a reset of `database` as `generation` (a value never used before). `false` when
    /// the database has no entry and none is free: the caller must then reset the whole cluster's
    /// backends instead.
    pub fn reset(&mut self, database: u32, generation: u64) -> bool {
        match self.entry(database) {
            Some(entry) => {
                entry.reset_generation = generation;
                true
            }
            None => false,
        }
    }

    /// The key-state generation of `database` (0 before its first change); `None` when it has no
    /// entry (it then shares the overflow's).
    pub fn key_state_generation(&self, database: u32) -> Option<u64> {
        self.entries.iter().find(|e| e.database == database).map(|e| e.key_state_generation)
    }

    /// Records that keys of `database` were disabled or destroyed, as `generation` (a value never
    /// used before). `false` when the database has no entry and none is free: the caller must
    /// then signal every database instead.
    pub fn key_states_changed(&mut self, database: u32, generation: u64) -> bool {
        match self.entry(database) {
            Some(entry) => {
                entry.key_state_generation = generation;
                true
            }
            None => false,
        }
    }

    /// Whether `database` has an entry, or could take a free one.
    pub fn has_room_for(&self, database: u32) -> bool {
        self.entries.iter().any(|e| e.database == database || e.database == 0)
    }

    /// The databases that hold entries.
    pub fn databases(&self) -> Vec<u32> {
        self.entries.iter().map(|e| e.database).filter(|&db| db != 0).collect()
    }

    /// Frees the entries of `gone` (databases that were dropped); their statistics go to the
    /// overflow, so the cluster's totals stay whole.
    pub fn free(&mut self, gone: &[u32]) {
        for entry in self.entries.iter_mut().filter(|e| e.database != 0 && gone.contains(&e.database)) {
            self.overflow.add(&entry.stats);
            *entry = DatabaseEntry::EMPTY;
        }
    }

    /// The statistics of the whole cluster.
    pub fn totals(&self) -> DatabaseStats {
        let mut all = *self.overflow;
        self.entries.iter().filter(|e| e.database != 0).for_each(|e| all.add(&e.stats));
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ident(id: i64) -> KeyIdent {
        KeyIdent::new(1, KeyId::new(id).unwrap(), &WrappedKey::new(vec![id as u8; 8]))
    }

    const NOW: UnixMicros = UnixMicros(1_000);
    const LATER: UnixMicros = UnixMicros(5_000);

    #[test]
    fn a_claimed_then_filled_slot_is_found_until_it_expires() {
        let mut slots = [Slot::EMPTY; 2];
        let Claim::Claimed { index, evicted } = claim(&mut slots, &ident(1), 10, NOW, LATER, |_| true) else {
            panic!()
        };
        assert_eq!(evicted, None);
        assert!(matches!(lookup(&slots, &ident(1), NOW), Lookup::Loading { pid: 10 }));
        fill(&mut slots, index, &ident(1), 10, &[7; 32], LATER, 1);
        assert!(matches!(lookup(&slots, &ident(1), NOW), Lookup::Ready(k, _) if k == [7; 32]));
        assert!(matches!(lookup(&slots, &ident(1), LATER), Lookup::Absent), "expired");
        assert_eq!(ready_count(&slots, NOW, None), 1);
        assert_eq!(ready_count(&slots, NOW, Some(1)), 1);
        assert_eq!(ready_count(&slots, NOW, Some(2)), 0);
    }

    #[test]
    fn a_second_loader_waits_for_the_first_unless_it_died() {
        let mut slots = [Slot::EMPTY; 2];
        claim(&mut slots, &ident(1), 10, NOW, LATER, |_| true);
        assert!(matches!(
            claim(&mut slots, &ident(1), 11, NOW, LATER, |_| true),
            Claim::Taken(Lookup::Loading { pid: 10 })
        ));
        assert!(matches!(claim(&mut slots, &ident(1), 11, NOW, LATER, |p| p != 10), Claim::Claimed { .. }));
    }

    #[test]
    fn a_loader_that_overran_its_deadline_is_taken_over_and_cannot_publish_late() {
        let mut slots = [Slot::EMPTY; 1];
        let Claim::Claimed { index, .. } = claim(&mut slots, &ident(1), 10, NOW, UnixMicros(2_000), |_| true)
        else {
            panic!()
        };
        let Claim::Claimed { .. } = claim(&mut slots, &ident(1), 11, UnixMicros(2_000), LATER, |_| true)
        else {
            panic!("the second process takes over once the deadline passed")
        };
        fill(&mut slots, index, &ident(1), 10, &[1; 32], LATER, 1);
        assert!(
            matches!(lookup(&slots, &ident(1), NOW), Lookup::Loading { pid: 11 }),
            "the late loader did not publish"
        );
    }

    #[test]
    fn a_full_table_evicts_the_least_recently_used_key_and_zeroizes_it() {
        let mut slots = [Slot::EMPTY; 2];
        for (id, tick) in [(1, 5), (2, 3)] {
            let Claim::Claimed { index, .. } = claim(&mut slots, &ident(id), 10, NOW, LATER, |_| true) else {
                panic!()
            };
            fill(&mut slots, index, &ident(id), 10, &[id as u8; 32], LATER, tick);
        }
        let Claim::Claimed { index, evicted } = claim(&mut slots, &ident(3), 10, NOW, LATER, |_| true) else {
            panic!()
        };
        assert_eq!(evicted, Some(1));
        assert_eq!(slots[index].key, [0; 32], "the evicted key is gone");
        assert!(matches!(lookup(&slots, &ident(2), NOW), Lookup::Absent), "key 2 was least recently used");
        assert!(matches!(lookup(&slots, &ident(1), NOW), Lookup::Ready(..)));
    }

    #[test]
    fn a_key_with_the_same_id_but_other_wrapped_bytes_is_another_key() {
        let mut slots = [Slot::EMPTY; 1];
        let Claim::Claimed { index, .. } = claim(&mut slots, &ident(1), 10, NOW, LATER, |_| true) else {
            panic!()
        };
        fill(&mut slots, index, &ident(1), 10, &[1; 32], LATER, 1);
        let other = KeyIdent::new(1, KeyId::new(1).unwrap(), &WrappedKey::new(vec![9; 8]));
        assert!(matches!(lookup(&slots, &other, NOW), Lookup::Absent));
    }

    #[test]
    fn abandon_and_clear_all_zeroize() {
        let mut slots = [Slot::EMPTY; 2];
        let Claim::Claimed { index, .. } = claim(&mut slots, &ident(1), 10, NOW, LATER, |_| true) else {
            panic!()
        };
        abandon(&mut slots, index, &ident(1), 10);
        assert!(matches!(lookup(&slots, &ident(1), NOW), Lookup::Absent));
        let Claim::Claimed { index, .. } = claim(&mut slots, &ident(2), 10, NOW, LATER, |_| true) else {
            panic!()
        };
        fill(&mut slots, index, &ident(2), 10, &[2; 32], LATER, 1);
        assert_eq!(clear(&mut slots, None), 1);
        assert!(slots.iter().all(|s| s.key == [0; 32] && s.state == EMPTY));
    }

    fn ident_in(database: u32, id: i64) -> KeyIdent {
        KeyIdent::new(database, KeyId::new(id).unwrap(), &WrappedKey::new(vec![id as u8; 8]))
    }

    /// Loads key `id` of `database` into `slots` at `tick`; returns whose key was evicted.
    fn load(slots: &mut [Slot], database: u32, id: i64, tick: u64) -> Option<u32> {
        let ident = ident_in(database, id);
        let Claim::Claimed { index, evicted } = claim(slots, &ident, 10, NOW, LATER, |_| true) else {
            panic!("claimed")
        };
        fill(slots, index, &ident, 10, &[id as u8; 32], LATER, tick);
        evicted
    }

    #[test]
    fn a_database_making_many_keys_evicts_its_own_once_it_holds_its_share() {
        let mut slots = [Slot::EMPTY; 8];
        // Database 2 holds three keys, used long ago.
        for id in 1..=3 {
            load(&mut slots, 2, id, id as u64);
        }
        // Database 1 makes 140 keys, each used after the last.
        let mut evicted_from_2 = 0;
        for id in 1..=140 {
            if load(&mut slots, 1, id, 100 + id as u64) == Some(2) {
                evicted_from_2 += 1;
            }
        }
        assert_eq!(evicted_from_2, 0, "database 2 holds less than its share (4 of 8)");
        for id in 1..=3 {
            assert!(
                matches!(lookup(&slots, &ident_in(2, id), NOW), Lookup::Ready(..)),
                "key {id} of database 2"
            );
        }
        assert_eq!(ready_count(&slots, NOW, Some(1)), 5);
    }

    #[test]
    fn a_database_below_its_share_takes_slots_from_the_largest_holder_down_to_equality() {
        let mut slots = [Slot::EMPTY; 6];
        for id in 1..=6 {
            load(&mut slots, 1, id, id as u64);
        }
        for id in 1..=5 {
            load(&mut slots, 2, id, 10 + id as u64);
        }
        assert_eq!((ready_count(&slots, NOW, Some(1)), ready_count(&slots, NOW, Some(2))), (3, 3));
        assert!(
            matches!(lookup(&slots, &ident_in(1, 6), NOW), Lookup::Ready(..)),
            "database 1 lost its oldest"
        );
        assert!(matches!(lookup(&slots, &ident_in(2, 1), NOW), Lookup::Absent), "then database 2 its own");
    }

    #[test]
    fn expired_slots_go_before_anyone_is_evicted() {
        let mut slots = [Slot::EMPTY; 2];
        load(&mut slots, 2, 1, 1);
        let ident = ident_in(2, 2);
        let Claim::Claimed { index, .. } = claim(&mut slots, &ident, 10, NOW, LATER, |_| true) else {
            panic!()
        };
        fill(&mut slots, index, &ident, 10, &[2; 32], NOW, 2); // expires at NOW: already expired
        assert_eq!(load(&mut slots, 1, 1, 3), None, "the expired slot is reused, nothing live is evicted");
    }

    #[test]
    fn a_reset_of_one_database_leaves_the_others_keys() {
        let mut slots = [Slot::EMPTY; 4];
        load(&mut slots, 1, 1, 1);
        load(&mut slots, 1, 2, 2);
        load(&mut slots, 2, 1, 3);
        assert_eq!(clear(&mut slots, Some(1)), 2);
        assert!(matches!(lookup(&slots, &ident_in(2, 1), NOW), Lookup::Ready(..)));
        assert_eq!(ready_count(&slots, NOW, None), 1);
    }

    #[test]
    fn database_entries_keep_generations_and_statistics_apart() {
        let mut entries = [DatabaseEntry::EMPTY; 2];
        let mut overflow = DatabaseStats::default();
        let mut table = DatabaseTable { entries: &mut entries, overflow: &mut overflow };
        assert_eq!(table.generation(1), 0);
        table.stats(1).hits += 2;
        assert_eq!(table.generation(1), 0);
        assert!(table.reset(2, 7));
        table.stats(2).misses += 1;
        assert_eq!(table.generation(2), 7);
        assert_eq!(table.generation(1), 0, "a reset of database 2 is not one of database 1");
        assert!(!table.reset(3, 8), "full: the caller resets everyone");
        table.stats(3).kms_unwraps += 5;
        assert_eq!(table.overflow.kms_unwraps, 5);
        assert_eq!(table.stats_of(3), None, "the overflow is nobody's to see");
        assert!(!table.has_room_for(3));
        assert_eq!(table.stats_of(1).map(|s| s.hits), Some(2));
        table.free(&[1]);
        assert!(table.has_room_for(3), "a dropped database's entry is free again");
        assert!(table.reset(3, 9));
        assert_eq!(table.generation(3), 9);
        assert_eq!(table.databases(), vec![3, 2]);
        let all = table.totals();
        assert_eq!((all.hits, all.misses, all.kms_unwraps), (2, 1, 5));
    }
}
