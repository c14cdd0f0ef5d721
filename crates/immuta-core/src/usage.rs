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
//! Counting never costs the hot path more than a decrement: a process takes a *grant* of several
//! encryptions at a time from the key's [`Counter`] (the limit applies to what is granted) and
//! spends it locally. Persisting is separate and happens *ahead* of use: each process covers
//! what it spends with rows it appends to `immuta.key_usage`, each reserving a block beyond what
//! it needs at the moment ([`Coverage`]). A process spends only its own coverage, which is either
//! committed or belongs to its transaction in progress, so no committed encryption ever depends
//! on another transaction's uncommitted row: a crash loses no committed count, and a block that
//! is never used up is an over-count, the safe direction. A process that cannot write (a
//! read-only transaction, a standby, a parallel worker) records what it spent as `uncovered` in
//! the counter, and the next process that writes a row adopts it. See [`grant`].

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

    /// How far past the limit writable sessions may go on encrypting under a key while another
    /// session is rolling it over, before they wait for that rollover to commit: one block
    /// ([`max_block`](Self::max_block), a thousandth of the limit). With the shared counter the
    /// key then counts at most `limit + overrun()` encryptions from writable sessions, whatever
    /// the timing; only sessions that cannot roll over at all (read-only, standby) go further,
    /// up to [`HARD_LIMIT`].
    pub fn overrun(self) -> u64 {
        self.max_block()
    }

    /// The block of the `nth` reservation (from 0) a process makes for itself: the first block,
    /// doubling up to [`max_block`](Self::max_block), so a short session reserves about what it
    /// uses.
    pub fn block(self, nth: u32) -> u64 {
        self.first_block().checked_shl(nth.min(40)).unwrap_or(u64::MAX).min(self.max_block())
    }

    /// The first block: 64, or a millionth of the limit if that is more (1,953 by default). A
    /// backend that encrypts under thousands of keys at once (a keyring per tenant) then writes a
    /// row per key seldom: starting at 64, a hundred rows per key and query cost a row per key
    /// every other query, ten times what the encryptions cost (measured, 10,000 keyrings). What it
    /// may leave unspent is at most a millionth of a key's budget per session.
    fn first_block(self) -> u64 {
        (self.max_block() >> 10).max(64)
    }
}

impl Default for UsageLimit {
    fn default() -> Self {
        UsageLimit(Self::DEFAULT)
    }
}

/// One key's counter: in shared memory for the whole cluster when immuta is preloaded, else a
/// backend's own estimate.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    /// Encryptions granted to processes, used or about to be: the limit applies to this.
    pub granted: u64,
    /// Encryptions spent by processes that could not write, which no row covers yet.
    pub uncovered: u64,
}

/// What one process has reserved in `immuta.key_usage` for a key and not spent yet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Coverage {
    pub unspent: u64,
    /// Rows this process wrote for the key: the blocks grow with each ([`UsageLimit::block`]).
    pub reservations: u32,
}

/// A row to append to `immuta.key_usage` before spending a grant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reservation {
    /// The row's `encryptions`.
    pub row: u64,
    /// Of it, the counter's `uncovered` encryptions this row adopts.
    pub adopted: u64,
    /// Of it, what covers this process's spending: the grant's uncovered part plus a block.
    pub covers: u64,
}

/// Encryptions a process may do now under a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grant {
    /// At least one.
    pub count: u64,
    /// A row to write first, when the process can write and its coverage does not suffice.
    pub reserve: Option<Reservation>,
}

/// How many encryptions a process asks for at once: few at first, so a short session wastes
/// little of the key's budget, growing to [`UsageLimit::grant_size`].
pub fn want(usage: UsageLimit, own: &Coverage) -> u64 {
    usage.grant_size().min(usage.block(own.reservations))
}

/// Grants `want` encryptions (fewer near `limit`), or `None` when the counter has reached
/// `limit`. Called under the counter's lock (a shared counter) or on the backend's own; the
/// returned reservation must be written before the grant is spent. `can_write` says whether
/// this transaction can append to `immuta.key_usage`.
pub fn grant(
    counter: &mut Counter,
    own: &mut Coverage,
    want: u64,
    limit: u64,
    usage: UsageLimit,
    can_write: bool,
) -> Option<Grant> {
    if counter.granted >= limit {
        return None;
    }
    let count = want.max(1).min(limit - counter.granted);
    counter.granted += count;
    let from_own = own.unspent.min(count);
    own.unspent -= from_own;
    let rest = count - from_own;
    if !can_write {
        counter.uncovered += rest;
        return Some(Grant { count, reserve: None });
    }
    // Write when this grant needs it, or to persist a large backlog of read-only spending.
    if rest == 0 && counter.uncovered < usage.max_block() {
        return Some(Grant { count, reserve: None });
    }
    let adopted = std::mem::take(&mut counter.uncovered);
    let extra = usage.block(own.reservations);
    own.unspent += extra;
    own.reservations += 1;
    let covers = rest + extra;
    Some(Grant { count, reserve: Some(Reservation { row: covers + adopted, adopted, covers }) })
}

/// A reservation's row was rolled back: the counter gets back what the row adopted, and what
/// the process already spent of the coverage it lost becomes uncovered. `own` is `None` when the
/// process no longer tracks that key: then all of the coverage counts as spent.
pub fn undo(counter: &mut Counter, own: Option<&mut Coverage>, reservation: &Reservation) {
    let lost = match own {
        Some(own) => {
            let lost = reservation.covers.saturating_sub(own.unspent);
            own.unspent = own.unspent.saturating_sub(reservation.covers);
            lost
        }
        None => reservation.covers,
    };
    counter.uncovered += reservation.adopted + lost;
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
        counter: Counter { granted: 0, uncovered: 0 },
        last_used: 0,
    };
}

/// The index of the slot counting `ident`, marking it used at `tick`.
pub fn find(slots: &mut [CounterSlot], ident: &CounterIdent, tick: u64) -> Option<usize> {
    let index = slots.iter().position(|s| s.ident.key_id != 0 && s.ident == *ident)?;
    slots[index].last_used = tick;
    Some(index)
}

/// The counter of `ident`, without marking it used (for reports, which must not keep a key's
/// slot from being evicted).
pub fn peek(slots: &[CounterSlot], ident: &CounterIdent) -> Option<Counter> {
    slots.iter().find(|s| s.ident.key_id != 0 && s.ident == *ident).map(|s| s.counter)
}

/// Starts counting `ident` from `baseline` (what `immuta.key_usage` holds), unless a slot
/// appeared meanwhile. Takes a free slot, or evicts one with nothing uncovered (its count is in
/// the table and is read again when needed), chosen as key slots are (`cache::fair_victim`:
/// the least recently used of the database holding the most, so one database cannot take
/// another's counters). `None` when no slot can be taken: the caller counts on its own instead.
pub fn insert(slots: &mut [CounterSlot], ident: &CounterIdent, baseline: u64, tick: u64) -> Option<usize> {
    if let Some(index) = find(slots, ident, tick) {
        return Some(index);
    }
    let index = match slots.iter().position(|s| s.ident.key_id == 0) {
        Some(free) => free,
        None => crate::cache::fair_victim(
            slots,
            ident.database,
            |s| if s.ident.key_id == 0 { 0 } else { s.ident.database },
            |s| s.counter.uncovered == 0,
            |s| s.last_used,
        )?,
    };
    slots[index] =
        CounterSlot { ident: *ident, counter: Counter { granted: baseline, uncovered: 0 }, last_used: tick };
    Some(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A process spending `n` encryptions one grant at a time, writing the rows it is told to.
    /// Returns the rows written, or how many it spent before the key was exhausted.
    fn spend(
        counter: &mut Counter,
        own: &mut Coverage,
        n: u64,
        limit: u64,
        usage: UsageLimit,
        can_write: bool,
    ) -> Result<Vec<Reservation>, u64> {
        let mut rows = Vec::new();
        let mut left = n;
        while left > 0 {
            let w = want(usage, own).min(left);
            let Some(g) = grant(counter, own, w, limit, usage, can_write) else { return Err(n - left) };
            assert!(g.count >= 1 && g.count <= w);
            rows.extend(g.reserve);
            left -= g.count;
        }
        Ok(rows)
    }

    fn total(rows: &[Reservation]) -> u64 {
        rows.iter().map(|r| r.row).sum()
    }

    #[test]
    fn exactly_the_limit_is_granted_then_the_key_is_exhausted() {
        let usage = UsageLimit::new(1000);
        let (mut c, mut own) = (Counter::default(), Coverage::default());
        spend(&mut c, &mut own, 1000, 1000, usage, true).unwrap();
        assert_eq!(c.granted, 1000);
        assert_eq!(grant(&mut c, &mut own, 1, 1000, usage, true), None);
        assert_eq!(spend(&mut c, &mut own, 5, 1000, usage, true), Err(0));
    }

    #[test]
    fn what_a_writer_spends_is_always_covered_by_its_own_rows_a_block_ahead_at_most() {
        let usage = UsageLimit::default();
        let (mut c, mut own) = (Counter::default(), Coverage::default());
        let mut rows = Vec::new();
        for spent in [1u64, 63, 1000, 100_000, 5_000_000] {
            rows.extend(spend(&mut c, &mut own, spent, HARD_LIMIT, usage, true).unwrap());
            assert!(total(&rows) >= c.granted, "covered");
            assert_eq!(total(&rows) - c.granted, own.unspent);
            assert!(own.unspent <= usage.max_block());
        }
        assert!(rows.len() < 20, "blocks grow: {} rows", rows.len());
        let (mut c, mut own) = (Counter::default(), Coverage::default());
        let rows = spend(&mut c, &mut own, 1, HARD_LIMIT, usage, true).unwrap();
        assert_eq!(total(&rows), 1 + 1953, "a one-encryption session reserves a millionth of the limit");
    }

    #[test]
    fn read_only_spending_is_adopted_by_the_next_row() {
        let usage = UsageLimit::default();
        let mut c = Counter::default();
        let mut reader = Coverage::default();
        assert_eq!(spend(&mut c, &mut reader, 500, HARD_LIMIT, usage, false), Ok(vec![]));
        assert_eq!(c, Counter { granted: 500, uncovered: 500 });
        let mut writer = Coverage::default();
        let rows = spend(&mut c, &mut writer, 1, HARD_LIMIT, usage, true).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].adopted, 500);
        assert_eq!(c.uncovered, 0);
        assert_eq!(total(&rows), c.granted + writer.unspent);
    }

    #[test]
    fn undoing_a_rolled_back_row_uncovers_what_was_spent_of_it() {
        let usage = UsageLimit::new(1_000_000);
        let mut c = Counter { granted: 0, uncovered: 10 };
        let mut own = Coverage::default();
        let g = grant(&mut c, &mut own, 64, HARD_LIMIT, usage, true).unwrap();
        let r = g.reserve.unwrap();
        assert_eq!(r, Reservation { row: 138, adopted: 10, covers: 128 });
        // Spend 30 more of the coverage, then the row rolls back.
        grant(&mut c, &mut own, 30, HARD_LIMIT, usage, true).unwrap();
        assert_eq!(own.unspent, 34);
        undo(&mut c, Some(&mut own), &r);
        assert_eq!(own.unspent, 0);
        assert_eq!(c.uncovered, 10 + 94, "adopted back, plus the 94 spent under the lost row");
        let mut c2 = Counter::default();
        undo(&mut c2, None, &r);
        assert_eq!(c2.uncovered, 138, "a forgotten key: everything counts as spent");
    }

    #[test]
    fn a_reservation_never_grants_past_the_limit_and_the_hard_limit_stops_a_key() {
        let usage = UsageLimit::new(1000);
        let mut c = Counter { granted: 990, uncovered: 0 };
        let g = grant(&mut c, &mut Coverage::default(), 64, 1000, usage, true).unwrap();
        assert_eq!(g.count, 10);
        let mut c = Counter { granted: HARD_LIMIT - 1, uncovered: 0 };
        let mut own = Coverage::default();
        assert_eq!(grant(&mut c, &mut own, 10, HARD_LIMIT, usage, false).unwrap().count, 1);
        assert_eq!(grant(&mut c, &mut own, 10, HARD_LIMIT, usage, false), None);
    }

    #[test]
    fn grant_and_block_sizes_scale_with_the_limit() {
        assert_eq!(UsageLimit::new(1000).grant_size(), 1);
        assert_eq!(UsageLimit::new(1000).max_block(), 64);
        assert_eq!(UsageLimit::new(10).max_block(), 10);
        assert_eq!(UsageLimit::new(1000).block(0), 64);
        assert_eq!(UsageLimit::default().block(0), 1953);
        assert_eq!(UsageLimit::default().block(3), 15_624);
        assert_eq!(UsageLimit::new(60_000_000).block(0), 64, "small limits start at 64");
        assert_eq!(UsageLimit::default().block(99), 2_000_000);
        assert_eq!(UsageLimit::default().grant_size(), 1024);
        assert_eq!(UsageLimit::default().max_block(), 2_000_000);
        assert_eq!(want(UsageLimit::default(), &Coverage::default()), 1024);
        assert_eq!(want(UsageLimit::new(1_000_000), &Coverage::default()), 64);
        assert_eq!(UsageLimit::new(200).overrun(), 64);
        assert_eq!(UsageLimit::default().overrun(), 2_000_000);
        assert_eq!(UsageLimit::new(0).get(), 1);
        assert_eq!(UsageLimit::new(u64::MAX).get(), HARD_LIMIT - 1);
    }

    #[test]
    fn counter_slots_are_found_created_and_evicted_only_when_fully_covered() {
        let mut slots = [CounterSlot::EMPTY; 2];
        let a = CounterIdent { database: 1, keys_table: 10, key_id: 1 };
        let b = CounterIdent { key_id: 2, ..a };
        let c = CounterIdent { key_id: 3, ..a };
        assert_eq!(find(&mut slots, &a, 1), None);
        let ia = insert(&mut slots, &a, 500, 1).unwrap();
        assert_eq!(slots[ia].counter, Counter { granted: 500, uncovered: 0 });
        assert_eq!(insert(&mut slots, &a, 0, 2), Some(ia), "an existing slot is kept, baseline ignored");
        let ib = insert(&mut slots, &b, 0, 3).unwrap();
        slots[ia].counter.uncovered = 1; // a holds uncovered spending, b does not
        let ic = insert(&mut slots, &c, 7, 4).unwrap();
        assert_eq!(ic, ib, "b, fully covered, is evicted although a is older");
        slots[ic].counter.uncovered = 1;
        assert_eq!(insert(&mut slots, &b, 0, 5), None, "no slot holding uncovered spending is evicted");
        let other_table = CounterIdent { keys_table: 11, ..a };
        assert_eq!(find(&mut slots, &other_table, 6), None);
        assert_eq!(peek(&slots, &a).map(|c| c.uncovered), Some(1));
    }
}
