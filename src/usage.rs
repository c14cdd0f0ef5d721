//! Counting encryptions per data key for the usage limit. The rule and the protocol (grants
//! from a counter, rows written ahead of use that only their writer spends) are
//! `immuta_core::usage`; this file places the counters and writes the rows to
//! `immuta.key_usage`.
//!
//! Preloaded, each key's counter is in shared memory next to the key cache, so the limit holds
//! for the whole cluster: a process takes up to 1,024 encryptions at a time under the cache's
//! LWLock and spends them with a plain decrement (`backend.rs`), so the lock is taken once per
//! thousand rows, never per row; and spending by processes that cannot write is recorded there
//! until a writer covers it. Not preloaded, each backend keeps its own estimate of the counter,
//! starting from the table's sum and refreshed from it at each row it writes; backends can then
//! pass the limit together by what they hold unspent, and spending that cannot be written (a
//! read-only transaction, a parallel worker) is lost when the process exits.
//!
//! A row belongs to the transaction that wrote it: if that transaction (or subtransaction)
//! aborts, the abort callbacks undo it in the counter, so what was spent under it is covered
//! again by the next row.

use std::cell::RefCell;

use immuta_core::key::KeyId;
use immuta_core::usage::{
    self as rule, Counter, CounterIdent, Coverage, Grant, Reservation, UsageLimit, HARD_LIMIT,
};
use pgrx::pg_sys;

use crate::backend::BACKEND;
use crate::{catalog, gucs, keys, shared_cache};

/// This backend's estimate of a key's counter, when the counter is not in shared memory.
struct Local {
    ident: CounterIdent,
    counter: Counter,
}

/// What this backend reserved for a key and has not spent (one key at a time: the current one;
/// coverage left on a replaced key is simply not used, an over-count).
struct Own {
    ident: CounterIdent,
    coverage: Coverage,
}

/// A reservation row written by the transaction in progress.
struct Reserved {
    ident: CounterIdent,
    shared: bool,
    reservation: Reservation,
    subxact: pg_sys::SubTransactionId,
}

thread_local! {
    static LOCAL: RefCell<Option<Local>> = const { RefCell::new(None) };
    static OWN: RefCell<Option<Own>> = const { RefCell::new(None) };
    static RESERVED: RefCell<Vec<Reserved>> = const { RefCell::new(Vec::new()) };
}

/// Which limit a grant is taken against.
#[derive(Clone, Copy)]
pub enum Against {
    /// `immuta.max_encryptions_per_key`: reaching it means rolling over.
    Soft,
    /// The soft limit plus `UsageLimit::overrun()`: while another session rolls the key over.
    Overrun,
    /// 2^32: for a key that has reached the soft limit but cannot be rolled over here.
    Hard,
}

fn ident(id: KeyId) -> CounterIdent {
    let keys_table = BACKEND.with_borrow(|b| b.oids).map(|o| o.data_keys.to_u32()).unwrap_or(0);
    // SAFETY: MyDatabaseId is set for every backend and parallel worker.
    let database = unsafe { pg_sys::MyDatabaseId.to_u32() };
    CounterIdent { database, keys_table, key_id: id.get() }
}

/// Runs `f` on this backend's coverage of `ident` (a fresh one if it held another key's).
fn with_own<R>(ident: &CounterIdent, f: impl FnOnce(&mut Coverage) -> R) -> R {
    OWN.with_borrow_mut(|own| {
        let own = match own {
            Some(o) if o.ident == *ident => o,
            slot => slot.insert(Own { ident: *ident, coverage: Coverage::default() }),
        };
        f(&mut own.coverage)
    })
}

/// Takes a grant of encryptions under key `id`: how many this process may encrypt before it asks
/// again (at least 1), or `None` when the key has reached the limit. Writes a reservation row
/// first when this process's coverage does not suffice and the transaction can write.
pub fn take(id: KeyId, against: Against) -> Option<u64> {
    let usage = gucs::usage_limit();
    let limit = match against {
        Against::Soft => usage.get(),
        Against::Overrun => usage.get() + usage.overrun(),
        Against::Hard => HARD_LIMIT,
    };
    let can_write = keys::write_blocker().is_none();
    let ident = ident(id);
    let (shared, granted) =
        match shared_cache::is_shared().then(|| grant_shared(&ident, usage, limit, can_write)) {
            Some(Some(granted)) => (true, granted),
            _ => (false, grant_local(&ident, usage, limit, can_write)),
        };
    let granted = granted?;
    if let Some(reservation) = granted.reserve {
        reserve(&ident, shared, reservation);
        if !shared {
            // Learn what other backends reserved meanwhile: all of it may be spent, while our
            // own unspent coverage is not.
            let total = catalog::usage_sum(id);
            let unspent = with_own(&ident, |own| own.unspent);
            with_local(&ident, |l| {
                let spent = total.saturating_sub(unspent) + l.counter.uncovered;
                l.counter.granted = l.counter.granted.max(spent);
            });
        }
    }
    // A grant no row covers must not be spent by a later transaction that could have written
    // one: `backend.rs` drops it when this transaction can write again.
    Some(granted.count)
}

/// Whether grants taken now are covered by rows (this transaction can write them).
pub fn grants_are_covered() -> bool {
    keys::write_blocker().is_none()
}

/// From the key's counter in shared memory (created from the table's sum on first use). The
/// outer `None` when no slot is free of uncovered spending: the caller counts on its own.
fn grant_shared(
    ident: &CounterIdent,
    usage: UsageLimit,
    limit: u64,
    can_write: bool,
) -> Option<Option<Grant>> {
    let id = KeyId::new(ident.key_id).expect("a key id");
    // A standby never writes, and its counter would not learn what the primary spends: bring
    // it up to the replicated table at each grant (once per thousand rows).
    // SAFETY: reads whether this server is in recovery.
    let replicated = unsafe { pg_sys::RecoveryInProgress() }.then(|| catalog::usage_sum(id));
    loop {
        let outcome = shared_cache::with_counters(|slots, tick| {
            let index = rule::find(slots, ident, tick)?;
            let counter = &mut slots[index].counter;
            if let Some(total) = replicated {
                counter.granted = counter.granted.max(total + counter.uncovered);
            }
            Some(with_own(ident, |own| {
                let want = rule::want(usage, own);
                rule::grant(counter, own, want, limit, usage, can_write)
            }))
        })
        .expect("immuta is preloaded");
        if let Some(granted) = outcome {
            return Some(granted);
        }
        let baseline = catalog::usage_sum(id);
        shared_cache::with_counters(|slots, tick| rule::insert(slots, ident, baseline, tick)).flatten()?;
    }
}

/// From this backend's estimate of the key's counter.
fn grant_local(ident: &CounterIdent, usage: UsageLimit, limit: u64, can_write: bool) -> Option<Grant> {
    if !LOCAL.with_borrow(|l| l.as_ref().is_some_and(|l| l.ident == *ident)) {
        let baseline = catalog::usage_sum(KeyId::new(ident.key_id).expect("a key id"));
        LOCAL.set(Some(Local { ident: *ident, counter: Counter { granted: baseline, uncovered: 0 } }));
    }
    LOCAL.with_borrow_mut(|l| {
        let counter = &mut l.as_mut().expect("set above").counter;
        with_own(ident, |own| {
            let want = rule::want(usage, own);
            rule::grant(counter, own, want, limit, usage, can_write)
        })
    })
}

fn with_local(ident: &CounterIdent, f: impl FnOnce(&mut Local)) {
    LOCAL.with_borrow_mut(|l| {
        if let Some(l) = l.as_mut().filter(|l| l.ident == *ident) {
            f(l)
        }
    })
}

/// Writes a reservation row, remembering it first so that an abort (even of this very insert)
/// undoes it in the counter.
fn reserve(ident: &CounterIdent, shared: bool, reservation: Reservation) {
    // SAFETY: reads the current subtransaction id, inside a transaction.
    let subxact = unsafe { pg_sys::GetCurrentSubTransactionId() };
    RESERVED.with_borrow_mut(|r| r.push(Reserved { ident: *ident, shared, reservation, subxact }));
    catalog::insert_usage(KeyId::new(ident.key_id).expect("a key id"), reservation.row);
}

/// Encryptions counted under key `id`. Preloaded, the shared counter's grants: exact for the
/// cluster (it started from the table). Otherwise what the table holds, which is ahead of what
/// was spent by the unspent part of each session's last block, or this backend's own estimate
/// if that is more.
pub fn counted(id: KeyId) -> u64 {
    let ident = ident(id);
    let shared = shared_cache::with_counters(|slots, _| rule::peek(slots, &ident)).flatten();
    if let Some(counter) = shared {
        return counter.granted;
    }
    let local = LOCAL.with_borrow(|l| l.as_ref().filter(|l| l.ident == ident).map(|l| l.counter.granted));
    catalog::usage_sum(id).max(local.unwrap_or(0))
}

/// Undoes rolled-back rows in their counters, and drops this backend's grant: part of it may
/// have been covered by a rolled-back row (the undo counts all of it as spent).
fn undo(rows: Vec<Reserved>) {
    if rows.is_empty() {
        return;
    }
    for row in rows {
        let apply = |counter: &mut Counter| {
            OWN.with_borrow_mut(|own| {
                let own = own.as_mut().filter(|o| o.ident == row.ident).map(|o| &mut o.coverage);
                rule::undo(counter, own, &row.reservation)
            })
        };
        let mut applied = false;
        if row.shared {
            shared_cache::with_counters(|slots, tick| {
                if let Some(i) = rule::find(slots, &row.ident, tick) {
                    apply(&mut slots[i].counter);
                    applied = true;
                }
            });
        } else {
            with_local(&row.ident, |l| {
                apply(&mut l.counter);
                applied = true;
            });
        }
        if !applied {
            // The counter is gone (evicted, or replaced by another key's): the coverage lost
            // must still leave this backend.
            apply(&mut Counter::default());
        }
    }
    crate::backend::drop_grant();
}

/// Transaction end: committed rows stay; rolled-back ones are undone. A prepared transaction
/// counts as rolled back (it may yet be): at worst an over-count.
pub fn at_transaction_end(committed: bool) {
    let rows = RESERVED.take();
    if !committed {
        undo(rows);
    }
}

/// Subtransaction end: a released savepoint hands its rows to the parent; a rolled-back one
/// loses them.
pub fn at_subtransaction_end(
    sub: pg_sys::SubTransactionId,
    parent: pg_sys::SubTransactionId,
    committed: bool,
) {
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

/// Forgets every counter estimate and coverage: the extension was dropped and created again.
pub fn forget() {
    LOCAL.set(None);
    OWN.set(None);
}
