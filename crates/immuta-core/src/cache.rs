//! The shared key cache's slot table: which unwrapped data keys the whole cluster holds, as plain
//! data that the SQL layer places in PostgreSQL shared memory and guards with one LWLock.
//!
//! Why two levels: the backend-local key ring (`keyring.rs`) answers every row without any lock;
//! this table sits behind it so that a key unwrapped by one backend (one KMS `Decrypt`) serves
//! every other backend and parallel worker of the cluster. A slot that is being loaded is marked
//! with the loader's process id, so concurrent first uses of one key wait for that single
//! unwrap instead of each calling KMS.
//!
//! A key is identified by database, key id *and* a digest of its wrapped bytes: key ids restart
//! when the extension is dropped and created again, or a database is restored elsewhere, and the
//! digest keeps a stale slot from ever answering for a different key with the same id.

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
    /// The caller must unwrap the key and `fill` this slot (or `abandon` it).
    Claimed { index: usize, evicted: bool },
    /// Someone else holds it: ready, or being loaded.
    Taken(Lookup),
    /// Every slot is being loaded: unwrap without caching.
    Full,
}

/// Claims a slot for loading `ident` by `pid` until `deadline`: reuses its own expired slot, or
/// an empty one, or evicts the least recently used ready one (zeroizing it). A slot left loading
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
    let mut evicted = false;
    let index = match target.or_else(|| slots.iter().position(|s| s.state == EMPTY)) {
        Some(i) => i,
        None => {
            let victim = slots
                .iter()
                .enumerate()
                .filter(|(_, s)| s.state == READY || stuck(s))
                .min_by_key(|(_, s)| (s.state == READY && s.expires_at > now.0, s.last_used))
                .map(|(i, _)| i);
            match victim {
                Some(i) => {
                    evicted = slots[i].state == READY && slots[i].expires_at > now.0;
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

/// Zeroizes and empties every slot; returns how many held a key.
pub fn clear_all(slots: &mut [Slot]) -> usize {
    let n = slots.iter().filter(|s| s.state == READY).count();
    slots.iter_mut().for_each(Slot::clear);
    n
}

/// Number of slots holding a ready key.
pub fn ready_count(slots: &[Slot], now: UnixMicros) -> usize {
    slots.iter().filter(|s| s.state == READY && s.expires_at > now.0).count()
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
        assert!(!evicted);
        assert!(matches!(lookup(&slots, &ident(1), NOW), Lookup::Loading { pid: 10 }));
        fill(&mut slots, index, &ident(1), 10, &[7; 32], LATER, 1);
        assert!(matches!(lookup(&slots, &ident(1), NOW), Lookup::Ready(k, _) if k == [7; 32]));
        assert!(matches!(lookup(&slots, &ident(1), LATER), Lookup::Absent), "expired");
        assert_eq!(ready_count(&slots, NOW), 1);
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
        assert!(evicted);
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
        assert_eq!(clear_all(&mut slots), 1);
        assert!(slots.iter().all(|s| s.key == [0; 32] && s.state == EMPTY));
    }
}
