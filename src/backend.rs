//! Backend-local state: the key ring, the configuration, the nonce generator, and the
//! invalidation that keeps them current without a query per row.
//!
//! The hot path (`encrypt_fast`, `decrypt_*`) reads a process-local transaction id, compares two
//! counters, and looks the key up in the ring (and, for a named keyring, its name); encryption
//! also decrements this backend's grant of the key's usage counter (`usage.rs`). It runs no SPI
//! and takes no lock. The state is private to this file; the lifecycle (`keys.rs`) drives it
//! through the functions below, and nothing here calls back up. Everything that
//! can change the ring (a rotation, a rollback of a rotation, a key disabled or destroyed, a
//! keyring created or changed, a configuration change, DROP EXTENSION) sends a relcache
//! invalidation for `immuta.data_keys`, `immuta.keyrings` or `immuta.config`; PostgreSQL
//! delivers it to every backend at its next transaction start or lock acquisition, and only after
//! the sending transaction commits (or, to the sender itself, when it aborts). The callback bumps
//! a counter; the next immuta call sees the counter moved and refreshes from the tables once.
//! A refresh learns from the audit log's new events which keys and keyrings changed (every
//! change to them is audited, in commit order) and drops only those: with thousands of
//! keyrings, a rotation of one costs the others nothing.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use immuta_core::cipher::{expect_type, DataCipher};
use immuta_core::config::Config;
use immuta_core::format;
use immuta_core::key::{DataKey, KeyId};
use immuta_core::key_state::KeyState;
use immuta_core::keyrings;
use immuta_core::nonce::NonceSource;
use immuta_core::ring::{CurrentKey, KeyRing, Named};
use immuta_core::time::UnixMicros;
use immuta_core::value_type::{Scalar, ValueType};
use immuta_core::Error;
use pgrx::{pg_guard, pg_sys, PgSqlErrorCode};
use zeroize::Zeroizing;

use crate::buffer::{Scratch, SecretBuf};
use crate::catalog::{self, KeyringRow, TableOids};
use crate::config_source::{self, Effective};
use crate::errors::{raise, OrRaise};
use crate::shared_cache;
use crate::usage;
use crate::varlena;
use crate::xact;

/// Bumped by every invalidation that concerns immuta; starts at 1 so a fresh backend is stale.
static INVALIDATIONS: AtomicU64 = AtomicU64::new(1);
/// OIDs of `immuta.data_keys`, `immuta.keyrings` and `immuta.config` as last looked up (0
/// before the first lookup).
static DATA_KEYS_OID: AtomicU32 = AtomicU32::new(0);
static KEYRINGS_OID: AtomicU32 = AtomicU32::new(0);
static CONFIG_OID: AtomicU32 = AtomicU32::new(0);
static INDEX_KEYS_OID: AtomicU32 = AtomicU32::new(0);

struct Backend {
    ring: KeyRing,
    config: Option<Effective>,
    oids: Option<TableOids>,
    /// The value of `INVALIDATIONS` the ring and configuration reflect.
    valid_as_of: u64,
    /// Whether the named keyrings were loaded in bulk since the ring last dropped them all (a
    /// keyring the ring does not know is then loaded with all the others, afterwards alone).
    bulk_loaded: bool,
    /// The newest audit event the ring reflects: keys disabled or destroyed by later events are
    /// dropped, and the keyrings they changed reloaded, at the next refresh (`catalog::audit_since`).
    audit_seen: i64,
    /// The highest key id when the audit log was last replayed: a newer key without an event
    /// makes every keyring reload.
    keys_seen: i64,
    /// The local transaction id of the last call, to run per-transaction checks once.
    lxid: u32,
    /// Start time of that transaction: the clock of the rollover rule.
    now: UnixMicros,
    /// The shared cache's epoch and `INVALIDATIONS` when that transaction first called immuta
    /// (see [`before_commit`]).
    xact_epoch: u64,
    xact_invalidations: u64,
    /// This database's resets and key-state changes as of that first call.
    xact_resets: shared_cache::Resets,
    /// The shared cache's epoch the ring reflects (`immuta_cache_reset()` anywhere moves it).
    cache_epoch: u64,
    /// The resets and key-state changes the ring reflects (see
    /// `shared_cache::resets_of_this_database`).
    cache_resets: shared_cache::Resets,
    nonces: Option<(i32, NonceSource)>,
    /// Whether this transaction reads the invalidations queued for it at each call (see
    /// [`prepare`]).
    reads_invalidations: bool,
}

thread_local! {
    static BACKEND: RefCell<Backend> = RefCell::new(Backend {
        ring: KeyRing::default(),
        config: None,
        oids: None,
        valid_as_of: 0,
        bulk_loaded: false,
        audit_seen: 0,
        keys_seen: 0,
        lxid: 0,
        now: UnixMicros(0),
        xact_epoch: 0,
        xact_invalidations: 0,
        xact_resets: shared_cache::Resets { all: 0, database: 0, key_states: 0 },
        cache_epoch: 0,
        cache_resets: shared_cache::Resets { all: 0, database: 0, key_states: 0 },
        nonces: None,
        reads_invalidations: false,
    });
}

/// A nonce from this process's generator. The generator is created lazily, so never in the
/// postmaster, and re-created if the process id changed (a fork would otherwise repeat nonces).
fn next_nonce(nonces: &mut Option<(i32, NonceSource)>) -> [u8; format::NONCE_LEN] {
    // SAFETY: MyProcPid is set by PostgreSQL at process start and only read here.
    let pid = unsafe { pg_sys::MyProcPid };
    match nonces {
        Some((owner, source)) if *owner == pid => source.next_nonce(),
        slot => {
            let mut source = NonceSource::from_os();
            let nonce = source.next_nonce();
            *slot = Some((pid, source));
            nonce
        }
    }
}

impl Backend {
    /// The current key of `keyring` (`None`: the default keyring) as the ring knows it.
    /// A named keyring's entry counts only if nothing changed the keyring since it was loaded.
    #[inline]
    fn current_of(&self, keyring: Option<&str>) -> Option<CurrentKey> {
        match keyring {
            None => self.ring.current(),
            Some(name) => match self.ring.named(name)? {
                Named::Live(current) => current,
                Named::Destroyed => None,
            },
        }
    }

    /// Forgets (and zeroizes) every key, and every keyring's entry.
    fn forget_keys(&mut self) {
        self.ring.clear();
        self.bulk_loaded = false;
        GENERATION.set(GENERATION.get() + 1);
    }

    fn config(&self) -> Rc<Config> {
        self.config.as_ref().map(|e| e.config.clone()).unwrap_or_default()
    }
}

/// The configuration in force (after [`prepare`]).
pub fn config() -> Rc<Config> {
    BACKEND.with_borrow(|b| b.config())
}

/// The configuration in force and where it came from.
pub fn effective() -> Effective {
    BACKEND.with_borrow(|b| b.config.clone().unwrap_or_default())
}

/// The OIDs of immuta's tables in this database (looked up if no call has yet).
pub fn oids() -> TableOids {
    BACKEND.with_borrow(|b| b.oids).unwrap_or_else(catalog::table_oids)
}

/// How many ciphers this backend holds.
pub fn key_count() -> usize {
    BACKEND.with_borrow(|b| b.ring.len())
}

/// Forgets (and zeroizes) every key this backend holds, and what it knew of the audit log:
/// `immuta_cache_reset()`, and an abort of a transaction that wrote immuta's rows (the audit ids
/// it saw may be given again to other events).
pub fn clear() {
    BACKEND.with(|b| {
        // An abort callback may run while a borrow is active (an error inside one): then there
        // is nothing safe to do but make the next call reload.
        if let Ok(mut b) = b.try_borrow_mut() {
            b.forget_keys();
            b.audit_seen = 0;
            b.valid_as_of = 0;
        } else {
            CLEAR_PENDING.set(true);
        }
    });
    stale();
}

thread_local! {
    /// A [`clear`] could not take the backend's state (it ran inside a borrow): the next
    /// refresh does it.
    static CLEAR_PENDING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Moves whenever the ring is refreshed or emptied: what is derived from keys elsewhere (the
    /// blind indexes' MAC keys) is dropped when it moves.
    static GENERATION: std::cell::Cell<u64> = const { std::cell::Cell::new(1) };
}

/// The ring's generation (see `GENERATION`), after [`prepare`].
pub fn generation() -> u64 {
    GENERATION.get()
}

/// Registers the relcache callback. Called from `_PG_init`, once per process.
pub fn register_invalidation_callback() {
    // SAFETY: registering a callback with a static function pointer; PostgreSQL keeps it for the
    // life of the process, and the callback only touches atomics.
    unsafe {
        pg_sys::CacheRegisterRelcacheCallback(Some(on_relcache_invalidation), pg_sys::Datum::from(0));
    }
}

#[pg_guard]
extern "C-unwind" fn on_relcache_invalidation(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    let relid = relid.to_u32();
    // InvalidOid means "all relations" (e.g. after an invalidation queue overflow).
    if relid == 0
        || relid == DATA_KEYS_OID.load(Ordering::Relaxed)
        || relid == KEYRINGS_OID.load(Ordering::Relaxed)
        || relid == CONFIG_OID.load(Ordering::Relaxed)
        || relid == INDEX_KEYS_OID.load(Ordering::Relaxed)
    {
        stale();
    }
}

/// Makes this backend reload its view of the tables at its next call (after an abort that may
/// have left a key of the failed transaction in the ring: see `events.rs`).
pub fn stale() {
    INVALIDATIONS.fetch_add(1, Ordering::Relaxed);
}

/// After writing key rows (a new key, a rewrap, a state change): every other backend reloads
/// its ring when this transaction commits.
pub fn invalidate_keys(oids: TableOids) {
    // SAFETY: queues a relcache invalidation for an existing relation inside a transaction.
    unsafe { pg_sys::CacheInvalidateRelcacheByRelid(oids.data_keys) };
}

thread_local! {
    /// This transaction added or rewrapped key rows, and may hold their keys in the ring before
    /// committing.
    static KEYS_WRITTEN: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// After inserting or rewrapping key rows: every other backend reloads its ring when this
/// transaction commits, and this one empties its ring if it aborts (`events.rs`).
pub fn keys_written_in_this_transaction(oids: TableOids) {
    KEYS_WRITTEN.set(true);
    invalidate_keys(oids);
}

/// Whether this transaction wrote key rows.
pub fn keys_written() -> bool {
    KEYS_WRITTEN.get()
}

/// Whether this transaction wrote key rows, forgetting it (at its end).
pub fn take_keys_written() -> bool {
    KEYS_WRITTEN.replace(false)
}

/// After writing keyring rows: every backend reloads the keyrings it knows.
pub fn invalidate_keyrings(oids: TableOids) {
    // SAFETY: queues a relcache invalidation for an existing relation inside a transaction.
    unsafe { pg_sys::CacheInvalidateRelcacheByRelid(oids.keyrings) };
}

/// After writing index key rows: every backend drops its blind index MAC keys (blind_index.rs).
pub fn invalidate_index_keys(oids: TableOids) {
    // SAFETY: queues a relcache invalidation for an existing relation inside a transaction.
    unsafe { pg_sys::CacheInvalidateRelcacheByRelid(oids.index_keys) };
}

/// After storing a configuration: every backend reloads it once this transaction commits.
pub fn invalidate_config(oids: TableOids) {
    // SAFETY: queues a relcache invalidation for an existing relation inside a transaction.
    unsafe { pg_sys::CacheInvalidateRelcacheByRelid(oids.config) };
}

/// Per-call entry: the once-per-transaction checks (configuration file, clock), then a refresh
/// if an invalidation arrived. Returns the transaction's start time. In steady state: one load
/// of MyProc, two comparisons (and, where the shared cache cannot tell of key state changes, a
/// look at the session's invalidation queue).
///
/// A key disabled or destroyed elsewhere must stop at the next call in every session, also
/// within a transaction block, where PostgreSQL delivers invalidations only at a new lock.
/// Preloaded on a primary, the shared cache's counters say so at once (below). Without preload,
/// or on a standby (whose shared cache the primary's changes never reach: they arrive by the
/// replay of their commits, as invalidations), each call reads the invalidations queued for this
/// session: with none queued, PostgreSQL answers from one unlocked flag, so no lock is taken per
/// row. (A per-statement marker would not do: PostgreSQL's statement timestamp is set once per
/// protocol message, and several statements sent in one string share it.)
#[inline]
pub fn prepare() -> UnixMicros {
    let lxid = crate::compat::local_xid();
    let (mut stale, now, read_invalidations) = BACKEND.with_borrow_mut(|b| {
        let first_call = b.lxid != lxid || b.now.0 == 0;
        if first_call {
            b.lxid = lxid;
            b.now = xact::transaction_now();
            b.xact_epoch = shared_cache::epoch();
            b.xact_invalidations = INVALIDATIONS.load(Ordering::Relaxed);
            if b.config.as_ref().is_some_and(config_source::file_changed) {
                b.valid_as_of = 0;
            }
            b.reads_invalidations = !shared_cache::is_shared() || xact::in_recovery();
        }
        let epoch = shared_cache::epoch();
        if b.cache_epoch != epoch {
            // immuta_cache_reset() ran somewhere: if it concerned this database, drop (and
            // zeroize) every key this backend holds.
            b.cache_epoch = epoch;
            let resets = shared_cache::resets_of_this_database();
            let previous = std::mem::replace(&mut b.cache_resets, resets);
            if (previous.all, previous.database) != (resets.all, resets.database) {
                b.forget_keys();
                b.valid_as_of = 0;
            } else if previous.key_states != resets.key_states {
                // Keys were disabled or destroyed: reload now, not at the next transaction (the
                // relcache invalidation reaches a backend only then, or at a new lock), named
                // keyrings included.
                stale();
            }
        }
        if first_call {
            b.xact_resets = b.cache_resets;
        }
        (b.valid_as_of != INVALIDATIONS.load(Ordering::Relaxed), b.now, b.reads_invalidations)
    });
    if read_invalidations {
        // Outside the borrow: the relcache callbacks run here (ours only bumps a counter).
        xact::accept_invalidations();
        stale = BACKEND.with_borrow(|b| b.valid_as_of != INVALIDATIONS.load(Ordering::Relaxed));
    }
    if stale {
        refresh();
    }
    now
}

/// Reloads the configuration and the default keyring's current key, marks the named keyrings
/// that changed (reloaded at their next use), and drops the keys that were disabled or destroyed
/// or never committed, from this backend and from the shared cache.
fn refresh() {
    let as_of = INVALIDATIONS.load(Ordering::Relaxed);
    // SAFETY: reads the database encoding, fixed for the life of the backend.
    if unsafe { pg_sys::GetDatabaseEncoding() } != pg_sys::pg_enc::PG_UTF8 as i32 {
        raise(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            "immuta requires a database with UTF8 encoding",
            Some("immuta encrypts the UTF-8 bytes of text values.".into()),
            Some("Create the database with ENCODING 'UTF8'."),
        );
    }
    let oids = catalog::table_oids();
    DATA_KEYS_OID.store(oids.data_keys.to_u32(), Ordering::Relaxed);
    KEYRINGS_OID.store(oids.keyrings.to_u32(), Ordering::Relaxed);
    CONFIG_OID.store(oids.config.to_u32(), Ordering::Relaxed);
    INDEX_KEYS_OID.store(oids.index_keys.to_u32(), Ordering::Relaxed);
    GENERATION.set(GENERATION.get() + 1);
    let previous = BACKEND.with_borrow(|b| b.config.clone());
    let effective = config_source::load(previous.as_ref());
    let current = catalog::current_key(keyrings::DEFAULT);
    let reinstalled = BACKEND.with_borrow_mut(|b| {
        let reinstalled = b.oids.is_some_and(|o| o != oids);
        if reinstalled {
            // The extension was dropped and created again: the old key ids mean other keys now.
            b.forget_keys();
            b.audit_seen = 0;
        }
        reinstalled
    });
    if reinstalled {
        usage::forget();
    }
    if CLEAR_PENDING.replace(false) {
        BACKEND.with_borrow_mut(|b| {
            b.forget_keys();
            b.audit_seen = 0;
        });
    }
    let (since, keys_seen, empty) =
        BACKEND.with_borrow(|b| (b.audit_seen, b.keys_seen, b.ring.is_empty() && b.ring.named_len() == 0));
    let replay = catalog::audit_since(since, keys_seen, empty);
    // Keys disabled or destroyed since: their shared copies go too (on a standby, this is how
    // they leave its cache; on the primary the state change already dropped them at commit).
    shared_cache::forget(&replay.gone, false);
    let rollover_changed = previous.is_none_or(|p| p.config.rollover() != effective.config.rollover());
    BACKEND.with_borrow_mut(|b| {
        if replay.went_back {
            // Events this backend counted on are gone: start again from what the tables say.
            b.forget_keys();
        }
        b.ring.retain(|id| !replay.gone.contains(&id));
        // The keyrings that changed since (a key created, disabled or destroyed, settings) are
        // reloaded at their next use; the others stay. A keyring's due dates follow the
        // configuration's rollover unless it has its own: a new rollover reloads them all.
        if rollover_changed || replay.all_keyrings {
            b.ring.clear_named();
            b.bulk_loaded = false;
        } else {
            replay.keyrings.iter().for_each(|name| b.ring.forget_named(name));
        }
        b.audit_seen = replay.latest;
        b.keys_seen = replay.keys_max;
        let rollover = effective.config.rollover();
        b.ring.set_current(current.map(|(id, created)| CurrentKey { id, due_at: rollover.due_at(created) }));
        b.oids = Some(oids);
        b.config = Some(effective);
        b.valid_as_of = as_of;
    });
}

/// What the ring holds for keyring `name` once loaded: the first keyring met since the ring
/// dropped them all loads every keyring (up to the ring's bound) in one query; a keyring unknown
/// after that, or changed since it was loaded, is loaded alone. An unknown name is an error.
pub fn named(name: &str) -> Named {
    let (entry, bulk_done) = BACKEND.with_borrow(|b| (b.ring.named(name), b.bulk_loaded));
    if let Some(named) = entry {
        return named;
    }
    require_keyring_name(name);
    let rollover = config().rollover();
    let entry_of = |row: &KeyringRow| {
        if row.destroyed {
            Named::Destroyed
        } else {
            let length = row.settings.rollover_or(rollover);
            Named::Live(row.current.map(|(id, created)| CurrentKey { id, due_at: length.due_at(created) }))
        }
    };
    // The first keyring met since the ring dropped them all: load them all (the first pass over
    // a table of many tenants). Later, one alone: a keyring created since, or one that changed
    // (`refresh` marks only those; a first pass creates a key per keyring, and reloading all of
    // them at each would be quadratic).
    if !bulk_done {
        let rows = catalog::keyrings(KeyRing::DEFAULT_CAPACITY);
        BACKEND.with_borrow_mut(|b| {
            rows.iter().for_each(|row| b.ring.set_named(&row.name, entry_of(row)));
            b.bulk_loaded = true;
        });
        if let Some(named) = BACKEND.with_borrow(|b| b.ring.named(name)) {
            return named;
        }
    }
    let Some(row) = catalog::keyring(name) else { unknown_keyring(name) };
    let named = entry_of(&row);
    BACKEND.with_borrow_mut(|b| b.ring.set_named(name, named));
    named
}

/// Raises `22023` for a name no keyring can have (not echoed); checked before any query is made
/// with a name.
pub fn require_keyring_name(name: &str) {
    if !keyrings::name_ok(name) {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            "invalid immuta keyring name",
            Some(format!("A keyring name is {}.", keyrings::NAME_RULE)),
            None,
        );
    }
}

/// An error for a keyring that does not exist; a name that cannot be a keyring's is not echoed.
pub fn unknown_keyring(name: &str) -> ! {
    require_keyring_name(name);
    raise(
        PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
        format!("immuta keyring \"{name}\" does not exist"),
        Some("Keyrings are created by immuta_keyring_create(); encrypting never creates one.".into()),
        Some("Check the name, or create the keyring first (immuta_admin)."),
    )
}

/// The current key of `keyring` (`None`: default) as this backend holds it.
pub fn current(keyring: Option<&str>) -> Option<CurrentKey> {
    BACKEND.with_borrow(|b| b.current_of(keyring))
}

/// Makes `current` the key that encrypts under `keyring` in this backend.
pub fn set_current(keyring: Option<&str>, current: Option<CurrentKey>) {
    BACKEND.with_borrow_mut(|b| match keyring {
        None => b.ring.set_current(current),
        Some(name) => b.ring.set_named(name, Named::Live(current)),
    })
}

/// Adds the cipher of key `id` of `keyring` to the ring, made from `key` by the ring itself
/// (`KeyRing::insert`).
pub fn insert_key(id: KeyId, key: &DataKey, keyring: &str, expires_at: UnixMicros) {
    BACKEND.with_borrow_mut(|b| b.ring.insert(id, key, keyring, expires_at, xact::wall_now()));
}

/// The hot path of `immuta_encrypt`: seals the encoding `plaintext` of a value of `value_type`,
/// with `context` if given, under the current key of `keyring` (`None`: default), straight into
/// the `bytea` it returns; `None` when that needs the slow path (`keys.rs`): no current key
/// known, the key is due, not loaded, or this backend's grant under it is spent.
#[inline]
pub fn encrypt_fast(
    keyring: Option<&str>,
    now: UnixMicros,
    value_type: ValueType,
    context: Option<&[u8]>,
    plaintext: &[u8],
) -> Option<varlena::Bytea> {
    BACKEND.with_borrow_mut(|b| {
        let Backend { ring, nonces, lxid, .. } = &mut *b;
        let seal = |cipher: &DataCipher, nonces: &mut Option<(i32, NonceSource)>| {
            let nonce = next_nonce(nonces);
            let len = format::sealed_len(plaintext.len());
            varlena::bytea(len, |out| cipher.seal_into(&nonce, value_type, context, plaintext, out))
        };
        match keyring {
            None => {
                let current = ring.current().filter(|c| now < c.due_at)?;
                let cipher = ring.cipher(current.id, now)?;
                usage::spend(current.id, *lxid).then(|| seal(cipher, nonces))
            }
            Some(name) => {
                let (id, loaded) = ring.current_cipher(name, now)?;
                usage::spend(id, *lxid).then(|| seal(loaded.cipher(), nonces))
            }
        }
    })
}

/// Whether key `id` is the current key of its keyring, when the ring can tell without a lookup
/// of its own (as [`reencrypt_fast`] finds them); `None` sends the caller to the slow path.
#[inline]
pub fn is_current_fast(id: KeyId, now: UnixMicros) -> Option<bool> {
    BACKEND.with_borrow_mut(|b| b.ring.reencryption(id, now).map(|(_, current, _)| current == id))
}

/// What [`reencrypt_fast`] did with a value.
pub enum Reencrypted {
    /// It is under its keyring's current key already (and opened with its context).
    Unchanged,
    /// The same value under the current key.
    Sealed(varlena::Bytea),
}

/// The hot path of `immuta_reencrypt`: opens the parsed value `sealed` with `context` and seals
/// it again under the current key of its key's keyring, with one borrow of the ring; `None` when
/// that needs the slow path (`keys::reencrypt`): either key is not loaded or expired, the
/// keyring is not loaded, its key is due, or this backend's grant under it is spent. The
/// plaintext lives in a [`Scratch`] zeroed before this returns.
#[inline]
pub fn reencrypt_fast(
    sealed: &format::Sealed<'_>,
    context: Option<&[u8]>,
    now: UnixMicros,
) -> Option<Reencrypted> {
    BACKEND.with_borrow_mut(|b| {
        let Backend { ring, nonces, lxid, .. } = &mut *b;
        let (source, current, target) = ring.reencryption(sealed.key_id, now)?;
        let mut plaintext = Scratch::zeroed(sealed.body.len());
        let plaintext = plaintext.as_mut_slice();
        // Opened even when it stays as it is: a wrong context is an error either way. Opened
        // before the grant is spent, so a value that fails to open costs no encryption.
        source.cipher().open_into(sealed, context, plaintext).or_raise();
        if current == sealed.key_id {
            return Some(Reencrypted::Unchanged);
        }
        if !usage::spend(current, *lxid) {
            return None;
        }
        let nonce = next_nonce(nonces);
        let len = format::sealed_len(plaintext.len());
        Some(Reencrypted::Sealed(varlena::bytea(len, |out| {
            target.cipher().seal_into(&nonce, sealed.value_type, context, plaintext, out)
        })))
    })
}

/// Seals under key `id`, for which this backend holds a grant (`usage::ensure_grant`): the slow
/// path's end. Loads the key first if the ring lacks it.
pub fn seal_under(
    id: KeyId,
    now: UnixMicros,
    value_type: ValueType,
    context: Option<&[u8]>,
    plaintext: &[u8],
) -> varlena::Bytea {
    load_cipher(id, now);
    let spent = usage::spend(id, BACKEND.with_borrow(|b| b.lxid));
    debug_assert!(spent, "the caller holds a grant");
    BACKEND.with_borrow_mut(|b| {
        let Backend { ring, nonces, .. } = &mut *b;
        let nonce = next_nonce(nonces);
        let cipher = ring.loaded(id).expect("load_cipher loaded it");
        let len = format::sealed_len(plaintext.len());
        varlena::bytea(len, |out| cipher.seal_into(&nonce, value_type, context, plaintext, out))
    })
}

/// Before this transaction commits: if a key it encrypted under was disabled or destroyed while
/// it ran (by a transaction that committed meanwhile), the commit fails, rather than store values
/// that decrypt with difficulty or never. In steady state this costs one atomic read (preloaded:
/// the shared cache's epoch moves with every key state change in the cluster) or a look at the
/// invalidation queue (not preloaded); only when something changed, one query.
pub fn before_commit() {
    let Some((lxid, oids)) = changed_during_transaction() else { return };
    let used = usage::used_in(lxid);
    // The extension may have been dropped (or dropped and created again) in this transaction.
    if used.is_empty() || !catalog::still_installed(oids) {
        return;
    }
    if let Some(id) = catalog::not_enabled_among(&used).first() {
        raise(
            PgSqlErrorCode::ERRCODE_T_R_SERIALIZATION_FAILURE,
            format!("immuta data key {id} was disabled or destroyed while this transaction encrypted under it"),
            Some("Another session changed the key's state and committed first; the values encrypted under it here are not stored.".into()),
            Some("Retry the transaction: it encrypts under the keyring's current key."),
        );
    }
}

/// Whether a key's state may have changed in the cluster since this transaction first called
/// immuta: then its local transaction id and the tables of this installation. `None` (nothing to
/// check) when this transaction never called immuta or nothing moved; one atomic read in steady
/// state (see [`before_commit`]).
pub fn changed_during_transaction() -> Option<(u32, TableOids)> {
    let (lxid, xact_epoch, xact_invalidations, xact_resets, oids) =
        BACKEND.with_borrow(|b| (b.lxid, b.xact_epoch, b.xact_invalidations, b.xact_resets, b.oids));
    if lxid != crate::compat::local_xid() {
        return None;
    }
    if shared_cache::is_shared() {
        if shared_cache::epoch() == xact_epoch {
            return None;
        }
        // Something moved somewhere in the cluster: only this database's changes count.
        let now = shared_cache::resets_of_this_database();
        if (now.all, now.database, now.key_states)
            == (xact_resets.all, xact_resets.database, xact_resets.key_states)
        {
            return None;
        }
    } else {
        // SAFETY: processes pending shared invalidation messages inside a transaction, as any
        // lock acquisition does.
        unsafe { pg_sys::AcceptInvalidationMessages() };
        if INVALIDATIONS.load(Ordering::Relaxed) == xact_invalidations {
            return None;
        }
    }
    Some((lxid, oids?))
}

/// Makes sure the ring holds an unexpired cipher of key `id`, taking the key from the shared
/// cache or unwrapping it. A disabled or destroyed key is an error of its own, and so is a key
/// the database does not have.
pub fn load_cipher(id: KeyId, now: UnixMicros) {
    if BACKEND.with_borrow(|b| b.ring.cipher(id, now).is_some()) {
        return;
    }
    let row = catalog::key_row(id).ok_or(Error::UnknownKey { key_id: id.get() as u64 }).or_raise();
    require_enabled(&row);
    let effective = effective();
    let recheck = || require_enabled(&catalog::key_row(id).unwrap_or_else(|| unknown_key(id)));
    let (key, expires_at) = shared_cache::key_for(&row, &effective, recheck);
    insert_key(id, &key, &row.keyring, expires_at);
}

/// The keyring of key `id` (`None`: the default keyring), loading the key if the ring lacks it:
/// a key that is disabled, destroyed or unknown raises, as decrypting under it would.
pub fn keyring_of(id: KeyId, now: UnixMicros) -> Option<Rc<str>> {
    load_cipher(id, now);
    let keyring = BACKEND.with_borrow(|b| b.ring.keyring_of(id)).expect("load_cipher loaded it");
    (&*keyring != keyrings::DEFAULT).then_some(keyring)
}

/// Key `id`'s keyring (the default one by name) and whether the key is enabled, without raising
/// for a key that is disabled or destroyed (`None`: the database has no such key). An enabled
/// key is loaded into the ring, as decrypting under it would; a ready key costs one lookup.
pub fn probe_key(id: KeyId, now: UnixMicros) -> Option<(Rc<str>, bool)> {
    let ready = BACKEND.with_borrow(|b| b.ring.cipher(id, now).and(b.ring.keyring_of(id)));
    if let Some(keyring) = ready {
        return Some((keyring, true));
    }
    let row = catalog::key_row(id)?;
    let enabled = row.state == KeyState::Enabled;
    if enabled {
        load_cipher(id, now);
    }
    Some((Rc::from(row.keyring.as_str()), enabled))
}

/// Opens a parsed value whose key the ring holds (after [`keyring_of`] or [`load_cipher`]) with
/// `context` into `out` (exactly `sealed.body.len()` bytes).
pub fn open_loaded(sealed: &format::Sealed<'_>, context: Option<&[u8]>, out: &mut [u8]) {
    let opened =
        BACKEND.with_borrow(|b| b.ring.loaded(sealed.key_id).map(|c| c.open_into(sealed, context, out)));
    opened.expect("the caller loaded the key").or_raise()
}

fn unknown_key(id: KeyId) -> ! {
    crate::errors::report(Error::UnknownKey { key_id: id.get() as u64 }, crate::errors::ConfigOrigin::Stored)
}

/// Raises the error of a key that is disabled or destroyed (or whose keyring was destroyed).
fn require_enabled(row: &catalog::KeyRow) {
    let id = row.id;
    match row.state {
        KeyState::Enabled => {}
        KeyState::Disabled => raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("immuta data key {id} is disabled"),
            Some(format!(
                "The value is intact; key {id} of keyring \"{}\" was disabled and decrypts nothing until it is enabled again.",
                row.keyring
            )),
            Some("An immuta_admin may run SELECT immuta_key_enable(key_id, reason), if the key was disabled by mistake."),
        ),
        KeyState::Destroyed => raise(
            PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            format!("immuta data key {id} was destroyed"),
            Some(format!(
                "Key {id} of keyring \"{}\" was destroyed on purpose (crypto-shredding): the values under it can never be decrypted.",
                row.keyring
            )),
            Some("immuta.keys and immuta.audit_log say when, by whom and why."),
        ),
    }
}

/// Parses a ciphertext and checks it holds `wanted`, loading the key it names once per backend;
/// then calls `open` with the ready cipher and the parsed value.
fn with_cipher<R>(
    ciphertext: &[u8],
    wanted: ValueType,
    open: impl FnOnce(&DataCipher, &format::Sealed<'_>) -> R,
) -> R {
    let sealed = format::parse(ciphertext).or_raise();
    expect_type(&sealed, wanted).or_raise();
    let now = prepare();
    // In steady state the key is in the ring: one borrow finds it and opens the value.
    let mut open = Some(open);
    let opened = BACKEND.with_borrow(|b| {
        let cipher = b.ring.cipher(sealed.key_id, now)?;
        Some(open.take().expect("not called yet")(cipher, &sealed))
    });
    if let Some(result) = opened {
        return result;
    }
    load_cipher(sealed.key_id, now);
    let open = open.take().expect("not called yet");
    BACKEND.with_borrow(|b| open(b.ring.loaded(sealed.key_id).expect("load_cipher loaded it"), &sealed))
}

/// `immuta_decrypt` to text: opens straight into the `text` it returns.
pub fn decrypt_text(ciphertext: &[u8], context: Option<&[u8]>) -> varlena::Text {
    with_cipher(ciphertext, ValueType::TEXT, |cipher, sealed| {
        varlena::text(sealed.body.len(), |out| cipher.open_into(sealed, context, out).or_raise())
    })
}

/// `immuta_decrypt_bytea`: opens straight into the `bytea` it returns.
pub fn decrypt_bytea(ciphertext: &[u8], context: Option<&[u8]>) -> varlena::Bytea {
    with_cipher(ciphertext, ValueType::scalar(Scalar::Bytea), |cipher, sealed| {
        varlena::bytea(sealed.body.len(), |out| cipher.open_into(sealed, context, out).or_raise())
    })
}

/// Decrypts a value of `wanted` and hands its plaintext encoding to `decode`, followed by one NUL
/// byte (which PostgreSQL's receive functions expect after their input, and which is not part of
/// the plaintext); the plaintext is zeroed when `decode` returns.
pub fn decrypt_with<R>(
    ciphertext: &[u8],
    wanted: ValueType,
    context: Option<&[u8]>,
    decode: impl FnOnce(&mut [u8]) -> R,
) -> R {
    // Small values (every fixed-size type) are opened on the stack, larger ones on the heap.
    const SMALL: usize = 64;
    let mut small = Zeroizing::new([0u8; SMALL]);
    let mut large = SecretBuf::new();
    let (small_ref, large_ref) = (&mut *small, &mut large);
    let with_nul: &mut [u8] = with_cipher(ciphertext, wanted, move |cipher, sealed| {
        let len = sealed.body.len();
        let buf: &mut [u8] = if len < SMALL {
            &mut small_ref[..=len]
        } else {
            *large_ref = SecretBuf::zeroed(len + 1);
            large_ref.as_mut_slice()
        };
        cipher.open_into(sealed, context, &mut buf[..len]).or_raise();
        buf
    });
    decode(with_nul)
}
