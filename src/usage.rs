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
//!
//! With keyrings, a backend encrypts under many keys at once (a row per tenant), so what it
//! holds is kept per key: its grants ([`spend`] is the hot path's one lookup), its coverage and
//! its estimates. Each map is bounded; forgetting coverage or an estimate only over-counts.

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::BuildHasherDefault;

use immuta_core::key::KeyId;
use immuta_core::ring::KeyIdHasher;
use immuta_core::usage::{
    self as rule, Counter, CounterIdent, Coverage, Grant, Reservation, UsageLimit, HARD_LIMIT,
};
use pgrx::pg_sys;

use crate::xact::write_blocker;
use crate::{catalog, gucs, shared_cache};

type ById<T> = HashMap<KeyId, T, BuildHasherDefault<KeyIdHasher>>;

/// Keys a backend keeps grants, coverage and estimates for before it forgets them all (it then
/// takes new grants, and over-counts what it had reserved and not spent).
const MAX_KEYS_HELD: usize = 16_384;

/// What this backend may still encrypt under a key before it asks the counter again.
#[derive(Clone, Copy)]
struct Held {
    left: u64,
    /// The local transaction id of the last transaction that spent from it.
    used_in: u32,
    /// Taken where no row could cover it (read-only, standby, parallel): dropped as soon as this
    /// backend could write one.
    uncovered: bool,
}

/// This backend's estimate of a key's counter, when the counter is not in shared memory.
struct Local {
    ident: CounterIdent,
    counter: Counter,
}

/// What this backend reserved for a key and has not spent.
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
    static GRANTS: RefCell<ById<Held>> = RefCell::new(ById::default());
    /// Keys spent from by a transaction whose grants were dropped before it ended (a rolled-back
    /// savepoint, a full map), with that transaction's local id: [`used_in`] still names them.
    static RETIRED: RefCell<Vec<(u32, KeyId)>> = const { RefCell::new(Vec::new()) };
    static LOCAL: RefCell<ById<Local>> = RefCell::new(ById::default());
    static OWN: RefCell<ById<Own>> = RefCell::new(ById::default());
    static RESERVED: RefCell<Vec<Reserved>> = const { RefCell::new(Vec::new()) };
}

/// The hot path: spends one encryption of this backend's grant under key `id`; `false` when it
/// holds none (or one no row covers while this transaction could write one: it is dropped).
/// `lxid` is the local transaction id, recorded so that a commit can tell the keys it encrypted
/// under ([`used_in`]).
#[inline]
pub fn spend(id: KeyId, lxid: u32) -> bool {
    GRANTS.with_borrow_mut(|grants| match grants.get_mut(&id) {
        Some(held) if held.uncovered && grants_are_covered() => {
            grants.remove(&id);
            false
        }
        Some(held) if held.left > 0 => {
            held.left -= 1;
            held.used_in = lxid;
            true
        }
        _ => false,
    })
}

/// The keys this backend encrypted under in transaction `lxid`.
pub fn used_in(lxid: u32) -> Vec<KeyId> {
    let mut used: Vec<KeyId> = GRANTS
        .with_borrow(|grants| grants.iter().filter(|(_, h)| h.used_in == lxid).map(|(id, _)| *id).collect());
    RETIRED.with_borrow(|r| used.extend(r.iter().filter(|(x, _)| *x == lxid).map(|(_, id)| *id)));
    used.sort_unstable();
    used.dedup();
    used
}

/// Keeps, before `grants` is emptied, which keys its transactions spent from.
fn retire(grants: &ById<Held>) {
    RETIRED.with_borrow_mut(|r| {
        let current = grants.values().map(|h| h.used_in).max().unwrap_or(0);
        r.retain(|(x, _)| *x == current);
        r.extend(
            grants
                .iter()
                .filter(|(_, h)| h.used_in == current && current != 0)
                .map(|(id, h)| (h.used_in, *id)),
        );
    });
}

/// What is left of this backend's grant under key `id` (0 when none, or one to be dropped).
pub fn held(id: KeyId) -> u64 {
    GRANTS.with_borrow(|grants| match grants.get(&id) {
        Some(held) if !(held.uncovered && grants_are_covered()) => held.left,
        _ => 0,
    })
}

/// Records a grant just taken under key `id` (replacing what was left of the last one).
fn hold(id: KeyId, left: u64, uncovered: bool) {
    GRANTS.with_borrow_mut(|grants| {
        if grants.len() >= MAX_KEYS_HELD && !grants.contains_key(&id) {
            retire(grants);
            grants.clear();
        }
        grants.insert(id, Held { left, used_in: 0, uncovered });
    })
}

/// Forgets every grant: part of them may have been covered by a rolled-back row, or the
/// extension was created again.
pub fn drop_grants() {
    GRANTS.with(|g| {
        if let Ok(mut g) = g.try_borrow_mut() {
            retire(&g);
            g.clear()
        }
    });
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
    // SAFETY: MyDatabaseId is set for every backend and parallel worker.
    let database = unsafe { pg_sys::MyDatabaseId.to_u32() };
    CounterIdent { database, keys_table: catalog::keys_table(), key_id: id.get() }
}

fn key_of(ident: &CounterIdent) -> KeyId {
    KeyId::new(ident.key_id).expect("a key id")
}

/// Runs `f` on this backend's coverage of `ident` (a fresh one if it held none, or another
/// installation's).
fn with_own<R>(ident: &CounterIdent, f: impl FnOnce(&mut Coverage) -> R) -> R {
    OWN.with_borrow_mut(|own| {
        let id = key_of(ident);
        if own.len() >= MAX_KEYS_HELD && !own.contains_key(&id) {
            own.clear();
        }
        let own = own.entry(id).or_insert_with(|| Own { ident: *ident, coverage: Coverage::default() });
        if own.ident != *ident {
            *own = Own { ident: *ident, coverage: Coverage::default() };
        }
        f(&mut own.coverage)
    })
}

/// The key to encrypt under has a grant of at least one encryption in this backend: the one it
/// holds, or a new one taken with `take` (`None`: the key has reached the limit `take` was
/// asked against). Kept apart from `take` so that a failing unwrap never wastes a grant.
pub fn ensure_grant(id: KeyId, take: impl FnOnce() -> Option<u64>) -> Option<u64> {
    let left = held(id);
    if left > 0 {
        return Some(left);
    }
    let covered = grants_are_covered();
    let granted = take()?;
    hold(id, granted, !covered);
    Some(granted)
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
    let can_write = write_blocker().is_none();
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
    write_blocker().is_none()
}

/// From the key's counter in shared memory (created from the table's sum on first use). The
/// outer `None` when no slot is free of uncovered spending: the caller counts on its own.
fn grant_shared(
    ident: &CounterIdent,
    usage: UsageLimit,
    limit: u64,
    can_write: bool,
) -> Option<Option<Grant>> {
    let id = key_of(ident);
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
    let id = key_of(ident);
    if !LOCAL.with_borrow(|l| l.get(&id).is_some_and(|l| l.ident == *ident)) {
        let baseline = catalog::usage_sum(id);
        LOCAL.with_borrow_mut(|l| {
            if l.len() >= MAX_KEYS_HELD {
                l.clear();
            }
            l.insert(id, Local { ident: *ident, counter: Counter { granted: baseline, uncovered: 0 } })
        });
    }
    LOCAL.with_borrow_mut(|l| {
        let counter = &mut l.get_mut(&id).expect("set above").counter;
        with_own(ident, |own| {
            let want = rule::want(usage, own);
            rule::grant(counter, own, want, limit, usage, can_write)
        })
    })
}

fn with_local(ident: &CounterIdent, f: impl FnOnce(&mut Local)) {
    LOCAL.with_borrow_mut(|l| {
        if let Some(l) = l.get_mut(&key_of(ident)).filter(|l| l.ident == *ident) {
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
    catalog::insert_usage(key_of(ident), reservation.row);
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
    let local = LOCAL.with_borrow(|l| l.get(&id).filter(|l| l.ident == ident).map(|l| l.counter.granted));
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
                let own = own
                    .get_mut(&key_of(&row.ident))
                    .filter(|o| o.ident == row.ident)
                    .map(|o| &mut o.coverage);
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
    drop_grants();
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
    LOCAL.with_borrow_mut(ById::clear);
    OWN.with_borrow_mut(ById::clear);
    drop_grants();
}
