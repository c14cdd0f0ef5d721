//! The usage limit: how many values one data key may encrypt, and how encryptions are counted.
//!
//! AES-GCM with random 96-bit nonces must not be invoked more than 2^32 times under one key
//! (NIST SP 800-38D, section 8.3): beyond that, the chance of two values sharing a nonce, which
//! reveals their XOR and the authentication key, exceeds 2^-32. immuta rolls a key over when it
//! has counted `immuta.max_encryptions_per_key` encryptions (the *soft* limit, default 2·10^9),
//! and refuses to encrypt under a key that has reached 2^32 (the *hard* limit) at all, which
//! can only happen when rollover has been impossible for two billion encryptions (a standby, or
//! read-only transactions only).
//!
//! Counting never costs the hot path more than a decrement: a process takes a *grant* of
//! several encryptions at a time from a counter and spends it locally. The counter says how many
//! encryptions have been granted (`granted`) and how many of those are already written to the
//! table `immuta.key_usage` (`persisted`). Writes happen *ahead* of use: before a grant goes
//! beyond what is persisted, the granting transaction appends a row reserving a further block,
//! so a crash loses no count that was persisted, and a committed block is counted even if it is
//! never used up (an over-count, the safe direction). See [`next_step`].

/// The hard limit of NIST SP 800-38D for random nonces.
pub const HARD_LIMIT: u64 = 1 << 32;

/// The soft limit: encryptions after which a key rolls over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UsageLimit(u64);

impl UsageLimit {
    /// Default of `immuta.max_encryptions_per_key`: 2·10^9, under half the hard limit, so that
    /// what a crash can leave uncounted and what read-only sessions spend before a rollover both
    /// fit many times over in the margin.
    pub const DEFAULT: u64 = 2_000_000_000;

    /// A limit of `n` encryptions, at least 1 and below the hard limit.
    pub fn new(n: u64) -> UsageLimit {
        UsageLimit(n.clamp(1, HARD_LIMIT - 1))
    }

    pub fn get(self) -> u64 {
        self.0
    }

    /// How many encryptions a process takes from a shared counter at once: about a thousandth
    /// of the limit, at most 1024 (one lock per thousand rows is not measurable), at least 1 (so
    /// a tiny test limit is exact).
    pub fn grant_size(self) -> u64 {
        (self.0 / 1024).clamp(1, 1024)
    }

    /// The largest block one row of `immuta.key_usage` reserves: a thousandth of the limit (at
    /// least 64, or the limit if smaller), so a key's lifetime writes about a thousand rows, and
    /// a restart wastes at most that much of its budget.
    pub fn max_block(self) -> u64 {
        (self.0 / 1000).max(self.0.min(64))
    }

    /// The block of the `nth` reservation (from 0) a process makes for itself: 64, doubling up to
    /// [`max_block`](Self::max_block), so a short session reserves about what it uses.
    pub fn block(self, nth: u32) -> u64 {
        64u64.checked_shl(nth.min(40)).unwrap_or(u64::MAX).min(self.max_block())
    }
}

impl Default for UsageLimit {
    fn default() -> Self {
        UsageLimit(Self::DEFAULT)
    }
}

/// The state of one key's counter (shared by the cluster, or private to a backend).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    /// Encryptions handed out to processes (used or about to be).
    pub granted: u64,
    /// Encryptions reserved in `immuta.key_usage`, committed or by a transaction in progress.
    pub persisted: u64,
}

/// What a process must do to encrypt `want` more values under a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Spend this many (at least one) from the counter: `granted` grows by it.
    Grant(u64),
    /// First append a row reserving this many more encryptions (`persisted` grows by it), then
    /// ask again.
    Persist(u64),
    /// The key has reached `limit`: roll it over (or, when that is impossible, ask again with
    /// the hard limit).
    Exhausted,
}

/// The next step for a counter. `block` is how much a reservation row should cover beyond what
/// is granted (capped by [`UsageLimit::max_block`] by the caller); `can_write` says whether this
/// transaction can append to `immuta.key_usage` (not on a standby, in a read-only transaction
/// or in a parallel worker). A process that cannot write is granted encryptions anyway, counted
/// in memory only, and the next process that can write persists them.
pub fn next_step(counter: Counter, want: u64, limit: u64, block: u64, can_write: bool) -> Step {
    if counter.granted >= limit {
        return Step::Exhausted;
    }
    let room = limit - counter.granted;
    if counter.persisted > counter.granted {
        return Step::Grant(want.max(1).min(counter.persisted - counter.granted).min(room));
    }
    if can_write {
        // Cover what was granted unpersisted, plus a block, but never past the limit.
        let behind = counter.granted - counter.persisted;
        return Step::Persist(behind + block.max(1).min(room));
    }
    Step::Grant(want.max(1).min(room))
}

/// Identity of a key's counter in shared memory: the database, the keys table (a dropped and
/// re-created extension restarts key ids) and the key id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterIdent {
    pub database: u32,
    pub keys_table: u32,
    pub key_id: i64,
}

/// One counter slot. Plain data so it can live in shared memory; `key_id` 0 marks a free slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CounterSlot {
    pub ident: CounterIdent,
    pub counter: Counter,
    last_used: u64,
}

impl CounterSlot {
    pub const EMPTY: CounterSlot = CounterSlot {
        ident: CounterIdent { database: 0, keys_table: 0, key_id: 0 },
        counter: Counter { granted: 0, persisted: 0 },
        last_used: 0,
    };
}

/// The index of the slot counting `ident`, marking it used at `tick`.
pub fn find(slots: &mut [CounterSlot], ident: &CounterIdent, tick: u64) -> Option<usize> {
    let index = slots.iter().position(|s| s.ident.key_id != 0 && s.ident == *ident)?;
    slots[index].last_used = tick;
    Some(index)
}

/// Starts counting `ident` from `baseline` (what `immuta.key_usage` holds), unless a slot
/// appeared meanwhile. Takes a free slot, or evicts the least recently used one that has nothing
/// unpersisted (its count is in the table and is read again if needed). `None` when every slot
/// holds unpersisted grants: the caller counts privately instead.
pub fn insert(slots: &mut [CounterSlot], ident: &CounterIdent, baseline: u64, tick: u64) -> Option<usize> {
    if let Some(index) = find(slots, ident, tick) {
        return Some(index);
    }
    let index = match slots.iter().position(|s| s.ident.key_id == 0) {
        Some(free) => free,
        None => slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.counter.granted <= s.counter.persisted)
            .min_by_key(|(_, s)| s.last_used)
            .map(|(i, _)| i)?,
    };
    slots[index] = CounterSlot {
        ident: *ident,
        counter: Counter { granted: baseline, persisted: baseline },
        last_used: tick,
    };
    Some(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_slots_are_found_created_and_evicted_only_when_persisted() {
        let mut slots = [CounterSlot::EMPTY; 2];
        let a = CounterIdent { database: 1, keys_table: 10, key_id: 1 };
        let b = CounterIdent { key_id: 2, ..a };
        let c = CounterIdent { key_id: 3, ..a };
        assert_eq!(find(&mut slots, &a, 1), None);
        let ia = insert(&mut slots, &a, 500, 1).unwrap();
        assert_eq!(slots[ia].counter, Counter { granted: 500, persisted: 500 });
        assert_eq!(insert(&mut slots, &a, 0, 2), Some(ia), "an existing slot is kept, baseline ignored");
        let ib = insert(&mut slots, &b, 0, 3).unwrap();
        slots[ib].counter.granted = 1; // b has an unpersisted grant
        let ic = insert(&mut slots, &c, 7, 4).unwrap();
        assert_eq!(ic, ia, "a, fully persisted, is evicted; b is not");
        slots[ic].counter.granted = 8;
        assert_eq!(insert(&mut slots, &a, 0, 5), None, "nothing evictable");
        let other_table = CounterIdent { keys_table: 11, ..b };
        assert_eq!(find(&mut slots, &other_table, 6), None);
    }

    /// Spends `n` encryptions one at a time the way a process does, writing when told to.
    fn spend(counter: &mut Counter, n: u64, limit: u64, block: u64, can_write: bool) -> Result<u64, u64> {
        let mut writes = 0;
        let mut left = n;
        while left > 0 {
            match next_step(*counter, left, limit, block, can_write) {
                Step::Grant(g) => {
                    assert!(g >= 1 && g <= left);
                    counter.granted += g;
                    left -= g;
                }
                Step::Persist(p) => {
                    counter.persisted += p;
                    writes += 1;
                }
                Step::Exhausted => return Err(n - left),
            }
        }
        Ok(writes)
    }

    #[test]
    fn exactly_the_limit_is_granted_then_the_key_is_exhausted() {
        let mut c = Counter::default();
        assert_eq!(spend(&mut c, 1000, 1000, 64, true).map(|_| ()), Ok(()));
        assert_eq!(c.granted, 1000);
        assert_eq!(next_step(c, 1, 1000, 64, true), Step::Exhausted);
    }

    #[test]
    fn writable_processes_persist_before_they_spend() {
        let mut c = Counter::default();
        let writes = spend(&mut c, 10_000, 1_000_000, 1000, true).unwrap();
        assert_eq!(writes, 10);
        assert!(c.persisted >= c.granted, "nothing granted is unpersisted");
        assert!(c.persisted - c.granted < 1000, "at most a block ahead");
    }

    #[test]
    fn read_only_grants_are_caught_up_by_the_next_writer() {
        let mut c = Counter::default();
        assert_eq!(spend(&mut c, 500, 1_000_000, 100, false), Ok(0));
        assert_eq!(c, Counter { granted: 500, persisted: 0 });
        assert_eq!(next_step(c, 1, 1_000_000, 100, true), Step::Persist(600));
    }

    #[test]
    fn a_reservation_never_goes_past_the_limit() {
        let c = Counter { granted: 990, persisted: 990 };
        assert_eq!(next_step(c, 5, 1000, 100, true), Step::Persist(10));
        let c = Counter { granted: 990, persisted: 1000 };
        assert_eq!(next_step(c, 50, 1000, 100, true), Step::Grant(10));
    }

    #[test]
    fn the_hard_limit_still_stops_a_key_that_cannot_roll_over() {
        let c = Counter { granted: HARD_LIMIT - 1, persisted: 0 };
        assert_eq!(next_step(c, 10, HARD_LIMIT, 100, false), Step::Grant(1));
        let c = Counter { granted: HARD_LIMIT, persisted: 0 };
        assert_eq!(next_step(c, 10, HARD_LIMIT, 100, false), Step::Exhausted);
    }

    #[test]
    fn grant_and_block_sizes_scale_with_the_limit() {
        assert_eq!(UsageLimit::new(1000).grant_size(), 1);
        assert_eq!(UsageLimit::new(1000).max_block(), 64);
        assert_eq!(UsageLimit::new(10).max_block(), 10);
        assert_eq!(UsageLimit::new(1000).block(0), 64);
        assert_eq!(UsageLimit::default().block(3), 512);
        assert_eq!(UsageLimit::default().block(99), 2_000_000);
        assert_eq!(UsageLimit::default().grant_size(), 1024);
        assert_eq!(UsageLimit::default().max_block(), 2_000_000);
        assert_eq!(UsageLimit::new(0).get(), 1);
        assert_eq!(UsageLimit::new(u64::MAX).get(), HARD_LIMIT - 1);
    }
}
