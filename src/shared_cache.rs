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

use immuta_core::cache::{self, Claim, KeyIdent, Lookup, Slot};
use immuta_core::config::Config;
use immuta_core::key::{DataKey, WrappingKeyRef};
use immuta_core::time::UnixMicros;
use immuta_core::usage::CounterSlot;
use pgrx::pg_sys;
use pgrx::prelude::*;
use serde_json::json;

use crate::catalog::KeyRow;
use crate::{gucs, providers};

/// Counters; in shared memory when preloaded, per backend otherwise.
#[repr(C)]
#[derive(Default)]
struct Stats {
    hits: AtomicU64,
    misses: AtomicU64,
    kms_unwraps: AtomicU64,
    local_unwraps: AtomicU64,
    evictions: AtomicU64,
}

#[repr(C)]
struct Header {
    /// Bumped by `immuta_cache_reset()`: every backend drops its ring when it sees it move.
    epoch: AtomicU64,
    /// Logical clock for least-recently-used eviction.
    tick: AtomicU64,
    stats: Stats,
    slots: usize,
}

struct Shared {
    header: *mut Header,
    slots: *mut Slot,
    counters: *mut CounterSlot,
    lock: *mut pg_sys::LWLock,
}

/// Set in the postmaster by the shared memory startup hook and inherited by every child.
static mut SHARED: Option<Shared> = None;
static LOCAL_STATS: Stats = Stats {
    hits: AtomicU64::new(0),
    misses: AtomicU64::new(0),
    kms_unwraps: AtomicU64::new(0),
    local_unwraps: AtomicU64::new(0),
    evictions: AtomicU64::new(0),
};

static mut PREV_REQUEST_HOOK: pg_sys::shmem_request_hook_type = None;
static mut PREV_STARTUP_HOOK: pg_sys::shmem_startup_hook_type = None;

const NAME: &std::ffi::CStr = c"immuta key cache";

/// The segment: the header, `slots` key slots, then as many usage counter slots (`usage.rs`).
fn size(slots: usize) -> usize {
    std::mem::size_of::<Header>() + slots * (std::mem::size_of::<Slot>() + std::mem::size_of::<CounterSlot>())
}

/// Called from `_PG_init` while shared_preload_libraries is being processed.
pub fn request_shared_memory() {
    // SAFETY: runs in the postmaster during preload, before any backend exists; installs hooks
    // chained to the previous ones, as PostgreSQL expects.
    unsafe {
        PREV_REQUEST_HOOK = pg_sys::shmem_request_hook;
        pg_sys::shmem_request_hook = Some(on_shmem_request);
        PREV_STARTUP_HOOK = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(on_shmem_startup);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_shmem_request() {
    // SAFETY: the shmem request hook, in the postmaster: chain, then request our space and lock.
    unsafe {
        if let Some(prev) = PREV_REQUEST_HOOK {
            prev();
        }
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
        if !found {
            header.write(Header {
                epoch: AtomicU64::new(1),
                tick: AtomicU64::new(0),
                stats: Stats::default(),
                slots,
            });
            for i in 0..slots {
                slot_ptr.add(i).write(Slot::EMPTY);
                counter_ptr.add(i).write(CounterSlot::EMPTY);
            }
        }
        let lock = &raw mut (*pg_sys::GetNamedLWLockTranche(NAME.as_ptr())).lock;
        pg_sys::LWLockRelease(init_lock);
        SHARED = Some(Shared { header, slots: slot_ptr, counters: counter_ptr, lock });
    }
}

fn shared() -> Option<&'static Shared> {
    // SAFETY: SHARED is written only in the postmaster's startup hook, before this process was
    // forked, and only read afterwards.
    unsafe { (*(&raw const SHARED)).as_ref() }.filter(|s| !s.header.is_null())
}

fn stats() -> &'static Stats {
    match shared() {
        // SAFETY: the header lives in shared memory for the life of the cluster.
        Some(s) => unsafe { &(*s.header).stats },
        None => &LOCAL_STATS,
    }
}

/// The epoch of the shared cache (0 without preload): a lock-free read for the hot path.
pub fn epoch() -> u64 {
    // SAFETY: an atomic load from the header in shared memory.
    shared().map(|s| unsafe { (*s.header).epoch.load(Ordering::Acquire) }).unwrap_or(0)
}

/// Runs `f` on the slot table under the cache lock.
fn with_slots<R>(mode: pg_sys::LWLockMode::Type, f: impl FnOnce(&mut [Slot], &Header) -> R) -> Option<R> {
    let s = shared()?;
    // SAFETY: the slot table and header live in shared memory for the life of the cluster; the
    // LWLock serialises access to the slots (the header is atomics only). A Rust panic or
    // PostgreSQL ERROR while holding it is released by the transaction abort.
    unsafe {
        pg_sys::LWLockAcquire(s.lock, mode);
        let header = &*s.header;
        let result = f(std::slice::from_raw_parts_mut(s.slots, header.slots), header);
        pg_sys::LWLockRelease(s.lock);
        Some(result)
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
    // SAFETY: as in `with_slots`: the counter slots follow the key slots in the same segment,
    // as many of them, and the same LWLock guards them.
    unsafe {
        pg_sys::LWLockAcquire(s.lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let header = &*s.header;
        let tick = header.tick.fetch_add(1, Ordering::Relaxed);
        let result = f(std::slice::from_raw_parts_mut(s.counters, header.slots), tick);
        pg_sys::LWLockRelease(s.lock);
        Some(result)
    }
}

/// Wall-clock now, for expiry.
fn wall_now() -> UnixMicros {
    // SAFETY: reads the current time.
    crate::catalog::from_pg_timestamp(unsafe { pg_sys::GetCurrentTimestamp() })
}

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

fn unwrap_counted(row: &KeyRow, config: &Config) -> DataKey {
    let key = providers::unwrap(row, config);
    let counter = match row.wrapping {
        WrappingKeyRef::AwsKms { .. } => &stats().kms_unwraps,
        WrappingKeyRef::Local { .. } => &stats().local_unwraps,
    };
    counter.fetch_add(1, Ordering::Relaxed);
    key
}

fn process_alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks for the process's existence.
    pid > 0 && unsafe { libc::kill(pid, 0) } == 0
}

/// The data key of `row` and when it expires: from the shared cache, or unwrapped once for the
/// whole cluster and published there. Without preload: unwrapped by this backend.
pub fn key_for(row: &KeyRow, config: &Config) -> (DataKey, UnixMicros) {
    let now = wall_now();
    if shared().is_none() {
        stats().misses.fetch_add(1, Ordering::Relaxed);
        return (unwrap_counted(row, config), expiry(now));
    }
    // SAFETY: MyDatabaseId and MyProcPid are set for every backend and worker.
    let (database, pid) = unsafe { (pg_sys::MyDatabaseId.to_u32(), pg_sys::MyProcPid) };
    let ident = KeyIdent::new(database, row.id, &row.wrapped);
    loop {
        let now = wall_now();
        let deadline = UnixMicros(now.0.saturating_add(gucs::kms_timeout().as_micros() as i64 * 2));
        let claim = with_slots(pg_sys::LWLockMode::LW_EXCLUSIVE, |slots, header| {
            let claim = cache::claim(slots, &ident, pid, now, deadline, process_alive);
            if let Claim::Taken(Lookup::Ready(..)) = claim {
                cache::touch(slots, &ident, header.tick.fetch_add(1, Ordering::Relaxed));
            }
            (claim, header.epoch.load(Ordering::Acquire))
        })
        .expect("shared memory is present");
        match claim {
            (Claim::Taken(Lookup::Ready(mut bytes, expires_at)), _) => {
                stats().hits.fetch_add(1, Ordering::Relaxed);
                return (DataKey::from_bytes(&mut bytes), expires_at);
            }
            (Claim::Taken(_), _) => {
                // Another backend is unwrapping this key: wait for it rather than call KMS too.
                // If it overruns its own deadline, the next claim takes the slot over.
                // SAFETY: sleeps 5 ms; interrupts are checked right after.
                unsafe { pg_sys::pg_usleep(5_000) };
                pgrx::check_for_interrupts!();
            }
            (Claim::Claimed { index, evicted }, claimed_epoch) => {
                if evicted {
                    stats().evictions.fetch_add(1, Ordering::Relaxed);
                }
                stats().misses.fetch_add(1, Ordering::Relaxed);
                let key = PgTryBuilder::new(|| unwrap_counted(row, config))
                    .catch_others(|e| {
                        with_slots(pg_sys::LWLockMode::LW_EXCLUSIVE, |slots, _| {
                            cache::abandon(slots, index, &ident, pid)
                        });
                        e.rethrow()
                    })
                    .execute();
                let expires_at = expiry(wall_now());
                with_slots(pg_sys::LWLockMode::LW_EXCLUSIVE, |slots, header| {
                    // A reset while we were unwrapping: do not bring the old key back.
                    if header.epoch.load(Ordering::Acquire) == claimed_epoch {
                        let tick = header.tick.fetch_add(1, Ordering::Relaxed);
                        cache::fill(slots, index, &ident, pid, key.expose(), expires_at, tick)
                    } else {
                        cache::abandon(slots, index, &ident, pid)
                    }
                });
                return (key, expires_at);
            }
            (Claim::Full, _) => {
                stats().misses.fetch_add(1, Ordering::Relaxed);
                return (unwrap_counted(row, config), expiry(now));
            }
        }
    }
}

/// `immuta_cache_reset()`: drops (and zeroizes) every cached key of the cluster, or of this
/// backend without preload. Returns how many shared keys were dropped.
pub fn reset() -> i64 {
    let dropped = with_slots(pg_sys::LWLockMode::LW_EXCLUSIVE, |slots, header| {
        let n = cache::clear_all(slots);
        header.epoch.fetch_add(1, Ordering::AcqRel);
        n
    });
    dropped.unwrap_or(0) as i64
}

/// `immuta_cache_stats()`.
pub fn stats_json(local_keys: usize) -> serde_json::Value {
    let s = stats();
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let (mode, capacity, entries) = match shared() {
        Some(sh) => {
            let now = wall_now();
            // SAFETY: reading the slot count from the header.
            let capacity = unsafe { (*sh.header).slots };
            let entries =
                with_slots(pg_sys::LWLockMode::LW_SHARED, |slots, _| cache::ready_count(slots, now))
                    .unwrap_or(0);
            ("shared", Some(capacity), entries)
        }
        None => ("backend", None, local_keys),
    };
    json!({
        "mode": mode,
        "capacity": capacity,
        "entries": entries,
        "hits": load(&s.hits),
        "misses": load(&s.misses),
        "kms_unwraps": load(&s.kms_unwraps),
        "local_unwraps": load(&s.local_unwraps),
        "evictions": load(&s.evictions),
        "ttl_seconds": gucs::cache_ttl_seconds(),
        "backend_keys": local_keys,
    })
}
