//! The cluster-wide cache of unwrapped data keys, in shared memory when immuta is preloaded.
//!
//! Two levels. Each backend's key ring (`backend.rs`) answers every row with no lock at all.
//! Behind it, when `immuta` is in `shared_preload_libraries`, a slot table in shared memory
//! (`immuta_core::cache`, guarded by one LWLock, taken only when a backend meets a key it does not
//! hold) lets one KMS `Decrypt` serve every backend and parallel worker: a cluster of a hundred
//! connections unwraps each key once, not a hundred times. Concurrent first uses of a key wait
//! for the one backend unwrapping it.
//!
//! Without preload (managed platforms, where `CREATE EXTENSION` is all one may do) there is no
//! shared memory: each backend unwraps the keys it meets once, and the statistics say so.
//!
//! `immuta.cache_ttl` bounds how long any copy lives, shared or local: after it, the key is
//! unwrapped again, so revoking KMS access takes effect within the TTL, and a KMS outage shorter
//! than the time left on the cached keys goes unnoticed.

use std::sync::atomic::{AtomicU64, Ordering};

use immuta_core::cache::{self, Claim, DatabaseEntry, DatabaseStats, DatabaseTable, KeyIdent, Lookup, Slot};
use immuta_core::key::{DataKey, KeyId, WrappingKeyRef};
use immuta_core::time::UnixMicros;
use immuta_core::usage::CounterSlot;
use pgrx::pg_sys;
use pgrx::prelude::*;
use serde_json::json;

use crate::catalog::KeyRow;
use crate::config_source::Effective;
use crate::{gucs, providers};

/// The segment's counters that are read and moved without the lock.
#[repr(C)]
struct Clocks {
    /// Bumped by every `immuta_cache_reset()`, in any database: a backend that sees it move looks
    /// up whether its own database was reset (a lock-free read on the hot path otherwise).
    epoch: AtomicU64,
    /// The source of reset generations: each reset takes a value never used before.
    generation: AtomicU64,
    /// The generation of the last reset of every database at once (a superuser's, or one whose
    /// database found no entry in the table).
    all_generation: AtomicU64,
    /// The key-state generation of the databases that have no entry of their own (see
    /// `DatabaseEntry::key_state_generation`): moving it makes their backends reload their view
    /// of the keys, never empty their rings.
    overflow_key_states: AtomicU64,
    /// Logical clock for least-recently-used eviction.
    tick: AtomicU64,
}

#[repr(C)]
struct Header {
    clocks: Clocks,
    slots: usize,
    databases: usize,
    /// Statistics of the databases that found no entry (under the lock).
    overflow: DatabaseStats,
}

struct Shared {
    header: *mut Header,
    slots: *mut Slot,
    counters: *mut CounterSlot,
    databases: *mut DatabaseEntry,
    lock: *mut pg_sys::LWLock,
}

/// What the cache lock guards, for one closure.
struct Guarded<'a> {
    slots: &'a mut [Slot],
    databases: DatabaseTable<'a>,
    clocks: &'a Clocks,
}

/// Set in the postmaster by the shared memory startup hook and inherited by every child.
static mut SHARED: Option<Shared> = None;

thread_local! {
    /// Without preload: this backend's own statistics.
    static LOCAL_STATS: std::cell::Cell<DatabaseStats> = const {
        std::cell::Cell::new(DatabaseStats { hits: 0, misses: 0, kms_unwraps: 0, local_unwraps: 0, evictions: 0 })
    };
}

static mut PREV_STARTUP_HOOK: pg_sys::shmem_startup_hook_type = None;

const NAME: &std::ffi::CStr = c"immuta key cache";

/// Entries of the per-database table: one more than the databases that can hold a key or a
/// counter slot at once, and never fewer than 1,024 (64 bytes each), so that databases share the
/// overflow statistics, and a reset reaches every database's backends, only in clusters where
/// more databases than that used the cache since the server started.
fn database_entries(slots: usize) -> usize {
    (2 * slots + 1).max(1024)
}

/// The segment: the header, `slots` key slots, as many usage counter slots (`usage.rs`), then
/// the per-database entries.
fn size(slots: usize) -> usize {
    std::mem::size_of::<Header>()
        + slots * (std::mem::size_of::<Slot>() + std::mem::size_of::<CounterSlot>())
        + database_entries(slots) * std::mem::size_of::<DatabaseEntry>()
}

/// Called from `_PG_init` while shared_preload_libraries is being processed.
pub fn request_shared_memory() {
    // SAFETY: runs in the postmaster during preload, before any backend exists; installs hooks
    // chained to the previous ones, as PostgreSQL expects.
    unsafe {
        crate::compat::install_shmem_request_hook(request_space);
        PREV_STARTUP_HOOK = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(on_shmem_startup);
    }
}

/// Requests the segment and its lock (`compat::install_shmem_request_hook` says when).
unsafe extern "C-unwind" fn request_space() {
    // SAFETY: in the postmaster while shared memory is being sized: request our space and lock.
    unsafe {
        pg_sys::RequestAddinShmemSpace(size(gucs::shared_cache_keys()));
        pg_sys::RequestNamedLWLockTranche(NAME.as_ptr(), 1);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_shmem_startup() {
    // SAFETY: the shmem startup hook (postmaster, also after a crash restart): under
    // AddinShmemInitLock, find or create our segment and initialise it if new. Slot is plain
    // data and Slot::EMPTY a valid value; Header holds atomics initialised in place.
    unsafe {
        if let Some(prev) = PREV_STARTUP_HOOK {
            prev();
        }
        let slots = gucs::shared_cache_keys();
        let init_lock = &raw mut (*pg_sys::MainLWLockArray.add(21)).lock;
        pg_sys::LWLockAcquire(init_lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let mut found = false;
        let base = pg_sys::ShmemInitStruct(NAME.as_ptr(), size(slots), &mut found).cast::<u8>();
        let header = base.cast::<Header>();
        let slot_ptr = base.add(std::mem::size_of::<Header>()).cast::<Slot>();
        let counter_ptr = slot_ptr.add(slots).cast::<CounterSlot>();
        let database_ptr = counter_ptr.add(slots).cast::<DatabaseEntry>();
        let databases = database_entries(slots);
        if !found {
            header.write(Header {
                clocks: Clocks {
                    epoch: AtomicU64::new(1),
                    generation: AtomicU64::new(0),
                    all_generation: AtomicU64::new(0),
                    overflow_key_states: AtomicU64::new(0),
                    tick: AtomicU64::new(0),
                },
                slots,
                databases,
                overflow: DatabaseStats::default(),
            });
            for i in 0..slots {
                slot_ptr.add(i).write(Slot::EMPTY);
                counter_ptr.add(i).write(CounterSlot::EMPTY);
            }
            for i in 0..databases {
                database_ptr.add(i).write(DatabaseEntry::EMPTY);
            }
        }
        let lock = &raw mut (*pg_sys::GetNamedLWLockTranche(NAME.as_ptr())).lock;
        pg_sys::LWLockRelease(init_lock);
        SHARED =
            Some(Shared { header, slots: slot_ptr, counters: counter_ptr, databases: database_ptr, lock });
    }
}

fn shared() -> Option<&'static Shared> {
    let shared = &raw const SHARED;
    // SAFETY: SHARED is written only in the postmaster's startup hook, before this process was
    // forked, and only read afterwards.
    unsafe { (*shared).as_ref() }.filter(|s| !s.header.is_null())
}

/// The epoch of the shared cache (0 without preload): a lock-free read for the hot path.
pub fn epoch() -> u64 {
    // SAFETY: an atomic load from the header in shared memory.
    shared().map(|s| unsafe { (*s.header).clocks.epoch.load(Ordering::Acquire) }).unwrap_or(0)
}

/// The resets that concern this database: the generation of the last reset of every database,
/// and of the last reset of this one. A backend whose ring predates either drops it. Read only
/// after [`epoch`] moved, so under the lock at most once per reset anywhere.
pub fn resets_of_this_database() -> Resets {
    let database = this_database();
    with_guarded(pg_sys::LWLockMode::LW_SHARED, |g| Resets {
        all: g.clocks.all_generation.load(Ordering::Acquire),
        database: g.databases.generation(database),
        key_states: g
            .databases
            .key_state_generation(database)
            .unwrap_or_else(|| g.clocks.overflow_key_states.load(Ordering::Acquire)),
    })
    .unwrap_or_default()
}

/// The generations a backend's ring reflects (see [`resets_of_this_database`]).
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct Resets {
    /// The last reset of every database at once.
    pub all: u64,
    /// The last reset of this database.
    pub database: u64,
    /// The last commit that disabled or destroyed keys of this database (or, when it has no
    /// entry, of any database without one).
    pub key_states: u64,
}

fn this_database() -> u32 {
    // SAFETY: MyDatabaseId is set for every backend and worker that runs immuta's functions.
    unsafe { pg_sys::MyDatabaseId.to_u32() }
}

/// Runs `f` on what the cache lock guards (the key slots and the per-database entries).
fn with_guarded<R>(mode: pg_sys::LWLockMode::Type, f: impl FnOnce(&mut Guarded) -> R) -> Option<R> {
    let s = shared()?;
    // SAFETY: the slot table, the per-database entries and the header live in shared memory for
    // the life of the cluster; the LWLock serialises access to the slots, the entries and the
    // header's overflow statistics (the clocks are atomics, borrowed apart from the overflow;
    // a shared-mode caller only reads). A Rust panic or PostgreSQL ERROR while holding the lock
    // is released by the abort.
    unsafe {
        pg_sys::LWLockAcquire(s.lock, mode);
        let header = s.header;
        let mut guarded = Guarded {
            slots: std::slice::from_raw_parts_mut(s.slots, (*header).slots),
            databases: DatabaseTable {
                entries: std::slice::from_raw_parts_mut(s.databases, (*header).databases),
                overflow: &mut (*header).overflow,
            },
            clocks: &(*header).clocks,
        };
        let result = f(&mut guarded);
        pg_sys::LWLockRelease(s.lock);
        Some(result)
    }
}

/// Adds to this database's statistics: in shared memory (under the lock) or this backend's.
fn count(f: impl Fn(&mut DatabaseStats)) {
    let database = this_database();
    if with_guarded(pg_sys::LWLockMode::LW_EXCLUSIVE, |g| f(g.databases.stats(database))).is_none() {
        LOCAL_STATS.with(|cell| {
            let mut stats = cell.get();
            f(&mut stats);
            cell.set(stats);
        });
    }
}

/// Whether the cluster-wide cache (and usage counters) exist: immuta is preloaded.
pub fn is_shared() -> bool {
    shared().is_some()
}

/// Runs `f` on the usage counter slots under the cache lock, with a fresh tick for recency.
/// `None` without preload.
pub fn with_counters<R>(f: impl FnOnce(&mut [CounterSlot], u64) -> R) -> Option<R> {
    let s = shared()?;
    // SAFETY: as in `with_guarded`: the counter slots follow the key slots in the same segment,
    // as many of them, and the same LWLock guards them.
    unsafe {
        pg_sys::LWLockAcquire(s.lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let tick = (*s.header).clocks.tick.fetch_add(1, Ordering::Relaxed);
        let result = f(std::slice::from_raw_parts_mut(s.counters, (*s.header).slots), tick);
        pg_sys::LWLockRelease(s.lock);
        Some(result)
    }
}

use crate::xact::wall_now;

fn expiry(now: UnixMicros) -> UnixMicros {
    match gucs::cache_ttl_seconds() {
        0 => UnixMicros(i64::MAX),
        ttl => UnixMicros(now.0.saturating_add(i64::from(ttl) * 1_000_000)),
    }
}

/// When a key put in the ring now must be unwrapped again.
pub fn expiry_from_now() -> UnixMicros {
    expiry(wall_now())
}

/// Unwraps the key of `row`, counting the unwrap in this database's statistics.
fn unwrap_counted(row: &KeyRow, config: &Effective) -> DataKey {
    let key = providers::unwrap(row, config);
    let kms = matches!(row.wrapping, WrappingKeyRef::AwsKms { .. });
    count(|s| if kms { s.kms_unwraps += 1 } else { s.local_unwraps += 1 });
    key
}

fn process_alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks for the process's existence.
    pid > 0 && unsafe { libc::kill(pid, 0) } == 0
}

/// The data key of `row` and when it expires: from the shared cache, or unwrapped once for the
/// whole cluster and published there. Without preload: unwrapped by this backend.
/// `recheck` runs after a claim and before the key is published, and raises if the key may no
/// longer be used: a key disabled or destroyed by a commit between the caller's read of its row
/// and the claim is not published (one committed after the claim empties the claimed slot, see
/// [`forget`]).
pub fn key_for(row: &KeyRow, config: &Effective, recheck: impl Fn()) -> (DataKey, UnixMicros) {
    let now = wall_now();
    if shared().is_none() {
        count(|s| s.misses += 1);
        return (unwrap_counted(row, config), expiry(now));
    }
    // SAFETY: MyProcPid is set for every backend and worker.
    let (database, pid) = (this_database(), unsafe { pg_sys::MyProcPid });
    let ident = KeyIdent::new(database, row.id, &row.wrapped);
    loop {
        let now = wall_now();
        let deadline = UnixMicros(now.0.saturating_add(gucs::kms_timeout().as_micros() as i64 * 2));
        let claim = with_guarded(pg_sys::LWLockMode::LW_EXCLUSIVE, |g| {
            let claim = cache::claim(g.slots, &ident, pid, now, deadline, process_alive);
            match &claim {
                Claim::Taken(Lookup::Ready(..)) => {
                    cache::touch(g.slots, &ident, g.clocks.tick.fetch_add(1, Ordering::Relaxed));
                    g.databases.stats(database).hits += 1;
                }
                Claim::Taken(_) => {}
                Claim::Claimed { evicted, .. } => {
                    if let Some(victim) = *evicted {
                        g.databases.stats(victim).evictions += 1;
                    }
                    g.databases.stats(database).misses += 1;
                }
                Claim::Full => g.databases.stats(database).misses += 1,
            }
            claim
        })
        .expect("shared memory is present");
        match claim {
            Claim::Taken(Lookup::Ready(mut bytes, expires_at)) => {
                return (DataKey::from_bytes(&mut bytes), expires_at);
            }
            Claim::Taken(_) => {
                // Another backend is unwrapping this key: wait for it rather than call KMS too.
                // If it overruns its own deadline, the next claim takes the slot over.
                // SAFETY: sleeps 5 ms; interrupts are checked right after.
                unsafe { pg_sys::pg_usleep(5_000) };
                pgrx::check_for_interrupts!();
            }
            Claim::Claimed { index, .. } => {
                let key = PgTryBuilder::new(std::panic::AssertUnwindSafe(|| {
                    let key = unwrap_counted(row, config);
                    recheck();
                    key
                }))
                .catch_others(|e| {
                    with_guarded(pg_sys::LWLockMode::LW_EXCLUSIVE, |g| {
                        cache::abandon(g.slots, index, &ident, pid)
                    });
                    e.rethrow()
                })
                .execute();
                let expires_at = expiry(wall_now());
                // A reset or a state change while we were unwrapping emptied the slot: then
                // `fill` publishes nothing.
                with_guarded(pg_sys::LWLockMode::LW_EXCLUSIVE, |g| {
                    let tick = g.clocks.tick.fetch_add(1, Ordering::Relaxed);
                    cache::fill(g.slots, index, &ident, pid, key.expose(), expires_at, tick)
                });
                return (key, expires_at);
            }
            Claim::Full => return (unwrap_counted(row, config), expiry(now)),
        }
    }
}

/// `immuta_cache_reset()`: drops (and zeroizes) the cached keys of this database, or, with
/// `all_databases` (a superuser's choice, checked by the caller), of the whole cluster; every
/// backend concerned drops its own copies at its next immuta call. Without preload: only this
/// backend's. Returns how many shared keys were dropped.
pub fn reset(all_databases: bool) -> i64 {
    let database = this_database();
    if !all_databases {
        make_room_for(database);
    }
    let dropped = with_guarded(pg_sys::LWLockMode::LW_EXCLUSIVE, |g| {
        let n = cache::clear(g.slots, (!all_databases).then_some(database));
        let generation = g.clocks.generation.fetch_add(1, Ordering::AcqRel) + 1;
        if all_databases || !g.databases.reset(database, generation) {
            g.clocks.all_generation.store(generation, Ordering::Release);
        }
        g.clocks.epoch.fetch_add(1, Ordering::AcqRel);
        n
    });
    dropped.unwrap_or(0) as i64
}

/// Zeroizes and drops the shared copies of keys `ids` of this database (disabled or destroyed),
/// slots being loaded included, so that an unwrap of one of them in flight is not published
/// (`cache::fill` publishes only into a slot its loader still holds). With `signal` (the commit
/// that disabled or destroyed them), every backend of this database reloads its view of the keys
/// at its next call, even within a statement. Returns how many copies were dropped.
pub fn forget(ids: &[KeyId], signal: bool) -> usize {
    if ids.is_empty() {
        return 0;
    }
    let database = this_database();
    if signal {
        make_room_for(database);
    }
    with_guarded(pg_sys::LWLockMode::LW_EXCLUSIVE, |g| {
        let n = cache::clear_keys(g.slots, database, ids);
        if signal {
            let generation = g.clocks.generation.fetch_add(1, Ordering::AcqRel) + 1;
            if !g.databases.key_states_changed(database, generation) {
                // No entry to record it in: the databases without one reload (never more).
                g.clocks.overflow_key_states.store(generation, Ordering::Release);
            }
            g.clocks.epoch.fetch_add(1, Ordering::AcqRel);
        }
        n
    })
    .unwrap_or(0)
}

/// When `database` has no entry of its own and none is free, frees the entries of databases that
/// were dropped (and their slots), so that its reset stays its own rather than reaching every
/// database. Which databases exist is looked up without the lock (a catalog lookup may wait).
fn make_room_for(database: u32) {
    let held = with_guarded(pg_sys::LWLockMode::LW_SHARED, |g| {
        (!g.databases.has_room_for(database)).then(|| g.databases.databases())
    });
    let Some(Some(held)) = held else { return };
    // SAFETY: syscache lookups of pg_database by OID, inside a transaction.
    let exists = |db: u32| unsafe {
        pg_sys::SearchSysCacheExists(
            pg_sys::SysCacheIdentifier::DATABASEOID as i32,
            pg_sys::Datum::from(db),
            pg_sys::Datum::from(0),
            pg_sys::Datum::from(0),
            pg_sys::Datum::from(0),
        )
    };
    let gone: Vec<u32> = held.into_iter().filter(|&db| !exists(db)).collect();
    if !gone.is_empty() {
        with_guarded(pg_sys::LWLockMode::LW_EXCLUSIVE, |g| {
            g.databases.free(&gone);
            gone.iter().for_each(|&db| {
                cache::clear(g.slots, Some(db));
            });
        });
    }
}

fn stats_json_of(s: &DatabaseStats) -> serde_json::Value {
    json!({
        "hits": s.hits,
        "misses": s.misses,
        "kms_unwraps": s.kms_unwraps,
        "local_unwraps": s.local_unwraps,
        "evictions": s.evictions,
    })
}

/// `immuta_cache_stats()`: this database's use of the cache; for a superuser, also the whole
/// cluster's (`cluster`). One database sees nothing of another's.
pub fn stats_json(local_keys: usize, superuser: bool) -> serde_json::Value {
    let database = this_database();
    let now = wall_now();
    let shared = with_guarded(pg_sys::LWLockMode::LW_SHARED, |g| {
        let mine = (cache::ready_count(g.slots, now, Some(database)), g.databases.stats_of(database));
        let all = (cache::ready_count(g.slots, now, None), g.databases.totals());
        (g.slots.len(), mine, all)
    });
    let mut out = match shared {
        Some((capacity, (entries, stats), (all_entries, all_stats))) => {
            // A database in the overflow (more databases used the cache than it keeps apart)
            // shares its counts with others: it is shown none rather than theirs.
            let mut out = stats_json_of(&stats.unwrap_or_default());
            out["statistics_kept"] = json!(stats.is_some());
            out["mode"] = json!("shared");
            out["capacity"] = json!(capacity);
            out["entries"] = json!(entries);
            if superuser {
                let mut cluster = stats_json_of(&all_stats);
                cluster["entries"] = json!(all_entries);
                out["cluster"] = cluster;
            }
            out
        }
        None => {
            let mut out = stats_json_of(&LOCAL_STATS.with(|c| c.get()));
            out["mode"] = json!("backend");
            out["capacity"] = serde_json::Value::Null;
            out["entries"] = json!(local_keys);
            out
        }
    };
    out["ttl_seconds"] = json!(gucs::cache_ttl_seconds());
    out["backend_keys"] = json!(local_keys);
    out
}

/// `shared` when preloaded, `backend` otherwise (for `immuta_status()`).
pub fn mode() -> &'static str {
    if is_shared() {
        "shared"
    } else {
        "backend"
    }
}
