//! Counting encryptions per data key for the usage limit. The rule and the protocol (grants,
//! reservations written ahead of use) are `immuta_core::usage`; this file places the counters
//! and writes the reservations to `immuta.key_usage`.
//!
//! Preloaded, each key's counter is in shared memory next to the key cache, so the limit holds
//! for the whole cluster: a process takes `grant_size` (up to 1024) encryptions at a time under
//! the cache's LWLock and spends them with a plain decrement (`backend.rs`), so the lock is
//! taken once per thousand rows, never per row. Not preloaded, each backend counts for itself,
//! starting from the table's sum; backends see each other's reservations only through the
//! table, so the limit can be overrun by what the sessions hold unspent (a block each at most).
//!
//! A reservation row belongs to the transaction that wrote it: if that transaction (or the
//! subtransaction) aborts, the row is gone, and the abort callbacks take the block back out of
//! the counter, so the next writer persists it again.

use std::cell::RefCell;

use immuta_core::key::KeyId;
use immuta_core::usage::{self as rule, Counter, CounterIdent, Step, UsageLimit, HARD_LIMIT};
use pgrx::pg_sys;

use crate::backend::BACKEND;
use crate::{catalog, gucs, keys, shared_cache};

/// This backend's own counter, when the counter is not in shared memory.
struct Local {
    ident: CounterIdent,
    counter: Counter,
    /// Reservations this backend made for the key: blocks grow with each (`UsageLimit::block`).
    reservations: u32,
}

/// A reservation row written by the transaction in progress.
struct Reserved {
    ident: CounterIdent,
    shared: bool,
    amount: u64,
    subxact: pg_sys::SubTransactionId,
}

thread_local! {
    static LOCAL: RefCell<Option<Local>> = const { RefCell::new(None) };
    static RESERVED: RefCell<Vec<Reserved>> = const { RefCell::new(Vec::new()) };
}

/// Which limit a grant is taken against.
#[derive(Clone, Copy)]
pub enum Against {
    /// `immuta.max_encryptions_per_key`: reaching it means rolling over.
    Soft,
    /// 2^32: for a key that has reached the soft limit but cannot be rolled over here.
    Hard,
}

fn ident(id: KeyId) -> CounterIdent {
    let keys_table = BACKEND.with_borrow(|b| b.oids).map(|o| o.data_keys.to_u32()).unwrap_or(0);
    // SAFETY: MyDatabaseId is set for every backend and parallel worker.
    let database = unsafe { pg_sys::MyDatabaseId.to_u32() };
    CounterIdent { database, keys_table, key_id: id.get() }
}

/// Takes a grant of encryptions under key `id`: how many this process may encrypt before it asks
/// again (at least 1), or `None` when the key has reached the limit.
pub fn take(id: KeyId, against: Against) -> Option<u64> {
    let usage = gucs::usage_limit();
    let limit = match against {
        Against::Soft => usage.get(),
        Against::Hard => HARD_LIMIT,
    };
    let can_write = keys::write_blocker().is_none();
    let ident = ident(id);
    if shared_cache::is_shared() {
        if let Some(granted) = take_shared(&ident, usage, limit, can_write) {
            return granted;
        }
    }
    take_local(&ident, usage, limit, can_write)
}

/// From the shared counter; the outer `None` when no counter slot could be had.
fn take_shared(ident: &CounterIdent, usage: UsageLimit, limit: u64, can_write: bool) -> Option<Option<u64>> {
    let id = KeyId::new(ident.key_id).expect("a key id");
    loop {
        let step = shared_cache::with_counters(|slots, tick| {
            let index = rule::find(slots, ident, tick)?;
            let counter = &mut slots[index].counter;
            let step = rule::next_step(*counter, usage.grant_size(), limit, usage.max_block(), can_write);
            match step {
                Step::Grant(n) => counter.granted += n,
                // Optimistically counted as persisted now, so that concurrent processes do not
                // write the same block; taken back if this transaction aborts.
                Step::Persist(n) => counter.persisted += n,
                Step::Exhausted => {}
            }
            Some(step)
        })?;
        match step {
            None => {
                let baseline = catalog::usage_sum(id);
                shared_cache::with_counters(|slots, tick| rule::insert(slots, ident, baseline, tick))??;
            }
            Some(Step::Grant(n)) => return Some(Some(n)),
            Some(Step::Exhausted) => return Some(None),
            Some(Step::Persist(n)) => reserve(ident, true, n),
        }
    }
}

/// From this backend's own counter.
fn take_local(ident: &CounterIdent, usage: UsageLimit, limit: u64, can_write: bool) -> Option<u64> {
    let id = KeyId::new(ident.key_id).expect("a key id");
    loop {
        let state = LOCAL.with_borrow(|l| l.as_ref().filter(|l| l.ident == *ident).map(|l| (l.counter, l.reservations)));
        let Some((counter, reservations)) = state else {
            let baseline = catalog::usage_sum(id);
            let counter = Counter { granted: baseline, persisted: baseline };
            LOCAL.set(Some(Local { ident: *ident, counter, reservations: 0 }));
            continue;
        };
        match rule::next_step(counter, usage.grant_size(), limit, usage.block(reservations), can_write) {
            Step::Grant(n) => {
                with_local(ident, |l| l.counter.granted += n);
                return Some(n);
            }
            Step::Exhausted => return None,
            Step::Persist(n) => {
                with_local(ident, |l| l.counter.persisted += n);
                reserve(ident, false, n);
                // The table also shows what other backends reserved meanwhile: all of it is
                // spoken for, and of our row, what we had already spent unpersisted.
                let total = catalog::usage_sum(id);
                let behind = counter.granted.saturating_sub(counter.persisted);
                with_local(ident, |l| {
                    l.counter = Counter { granted: total.saturating_sub(n) + behind, persisted: total };
                    l.reservations += 1;
                });
            }
        }
    }
}

fn with_local(ident: &CounterIdent, f: impl FnOnce(&mut Local)) {
    LOCAL.with_borrow_mut(|l| {
        if let Some(l) = l.as_mut().filter(|l| l.ident == *ident) {
            f(l)
        }
    })
}

/// Writes a reservation row, remembering it first so that an abort (even of this very insert)
/// takes it back out of the counter.
fn reserve(ident: &CounterIdent, shared: bool, amount: u64) {
    // SAFETY: reads the current subtransaction id, inside a transaction.
    let subxact = unsafe { pg_sys::GetCurrentSubTransactionId() };
    RESERVED.with_borrow_mut(|r| r.push(Reserved { ident: *ident, shared, amount, subxact }));
    catalog::insert_usage(KeyId::new(ident.key_id).expect("a key id"), amount);
}

/// Encryptions counted under key `id`: what the table holds, or what the counter in memory has
/// granted if that is more (grants by read-only sessions not yet persisted).
pub fn counted(id: KeyId) -> u64 {
    let ident = ident(id);
    let persisted = catalog::usage_sum(id);
    let shared = shared_cache::with_counters(|slots, tick| {
        rule::find(slots, &ident, tick).map(|i| slots[i].counter.granted)
    })
    .flatten();
    let local = LOCAL.with_borrow(|l| l.as_ref().filter(|l| l.ident == ident).map(|l| l.counter.granted));
    persisted.max(shared.unwrap_or(0)).max(local.unwrap_or(0))
}

/// Takes the reservations of rolled-back rows back out of their counters.
fn undo(rows: Vec<Reserved>) {
    for row in rows {
        if row.shared {
            shared_cache::with_counters(|slots, tick| {
                if let Some(i) = rule::find(slots, &row.ident, tick) {
                    let c = &mut slots[i].counter;
                    c.persisted = c.persisted.saturating_sub(row.amount);
                }
            });
        } else {
            with_local(&row.ident, |l| l.counter.persisted = l.counter.persisted.saturating_sub(row.amount));
        }
    }
}

/// Transaction end: committed rows stay; rolled-back ones are taken back.
pub fn at_transaction_end(committed: bool) {
    let rows = RESERVED.take();
    if !committed {
        undo(rows);
    }
}

/// Subtransaction end: a released savepoint hands its rows to the parent; a rolled-back one
/// loses them.
pub fn at_subtransaction_end(sub: pg_sys::SubTransactionId, parent: pg_sys::SubTransactionId, committed: bool) {
    let rolled_back = RESERVED.with_borrow_mut(|rows| {
        if committed {
            rows.iter_mut().filter(|r| r.subxact == sub).for_each(|r| r.subxact = parent);
            Vec::new()
        } else {
            let (gone, kept) = std::mem::take(rows).into_iter().partition(|r| r.subxact == sub);
            *rows = kept;
            gone
        }
    });
    undo(rolled_back);
}
