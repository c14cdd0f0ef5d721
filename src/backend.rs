//! Backend-local state: the key ring, the configuration, the nonce generator, and the
//! invalidation that keeps them current without a query per row.
//!
//! The hot path (`encrypt`, `decrypt`) reads a process-local transaction id, compares two
//! counters, and looks the key up in the ring; encryption also decrements this backend's grant
//! of the key's usage counter (`usage.rs`). It runs no SPI and takes no lock. Everything that
//! can change the ring (a rotation, a rollback of a rotation, a configuration change, DROP
//! EXTENSION) sends a relcache invalidation for `immuta.data_keys` or `immuta.config`; PostgreSQL
//! delivers it to every backend at its next transaction start or lock acquisition, and only after
//! the sending transaction commits (or, to the sender itself, when it aborts). The callback bumps
//! a counter; the next immuta call sees the counter moved and refreshes from the tables once.

use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use immuta_core::cipher::{expect_type, DataCipher};
use immuta_core::config::Config;
use immuta_core::format;
use immuta_core::key::KeyId;
use immuta_core::keyring::{CurrentKey, KeyRing};
use immuta_core::nonce::NonceSource;
use immuta_core::time::UnixMicros;
use immuta_core::value_type::{Scalar, ValueType};
use pgrx::prelude::*;
use pgrx::{pg_sys, PgSqlErrorCode};
use std::rc::Rc;
use zeroize::Zeroizing;

use crate::buffer::SecretBuf;
use crate::catalog::{self, TableOids};
use crate::config_source::{self, Effective};
use crate::errors::{raise, OrRaise};
use crate::keys;
use crate::shared_cache;
use crate::usage;
use crate::varlena;

/// Bumped by every invalidation that concerns immuta; starts at 1 so a fresh backend is stale.
static INVALIDATIONS: AtomicU64 = AtomicU64::new(1);
/// OIDs of `immuta.data_keys` and `immuta.config` as last looked up (0 before the first lookup).
static DATA_KEYS_OID: AtomicU32 = AtomicU32::new(0);
static CONFIG_OID: AtomicU32 = AtomicU32::new(0);

pub struct Backend {
    pub ring: KeyRing,
    pub config: Option<Effective>,
    pub oids: Option<TableOids>,
    /// The value of `INVALIDATIONS` the ring and configuration reflect.
    valid_as_of: u64,
    /// The local transaction id of the last call, to run per-transaction checks once.
    lxid: u32,
    /// Start time of that transaction: the clock of the rollover rule.
    now: UnixMicros,
    /// The transaction in which a rollover lost the try-lock: do not try again in it.
    pub rollover_given_up_in: Option<u32>,
    /// The shared cache's epoch the ring reflects (`immuta_cache_reset()` anywhere moves it).
    cache_epoch: u64,
    /// The resets of every database and of this one the ring reflects (see
    /// `shared_cache::resets_of_this_database`).
    cache_resets: (u64, u64),
    /// The rollover reasons (bit `1 << reason`) this session already warned it cannot act on.
    pub warned_cannot_rollover: u8,
    /// Encryptions this backend may still do under `budget_key` before it asks the usage
    /// counter again (`usage.rs`): the hot path only decrements it.
    budget: u64,
    budget_key: Option<KeyId>,
    /// The grant was taken where no row could cover it (read-only, standby, parallel): it is
    /// dropped as soon as this backend could write one.
    budget_uncovered: bool,
    nonces: Option<(i32, NonceSource)>,
}

thread_local! {
    pub static BACKEND: RefCell<Backend> = RefCell::new(Backend {
        ring: KeyRing::default(),
        config: None,
        oids: None,
        valid_as_of: 0,
        lxid: 0,
        now: UnixMicros(0),
        rollover_given_up_in: None,
        cache_epoch: 0,
        cache_resets: (0, 0),
        warned_cannot_rollover: 0,
        budget: 0,
        budget_key: None,
        budget_uncovered: false,
        nonces: None,
    });
}

impl Backend {
    /// A nonce from this process's generator. The generator is created lazily, so never in the
    /// postmaster, and re-created if the process id changed (a fork would otherwise repeat nonces).
    fn next_nonce(&mut self) -> [u8; format::NONCE_LEN] {
        // SAFETY: MyProcPid is set by PostgreSQL at process start and only read here.
        let pid = unsafe { pg_sys::MyProcPid };
        match &mut self.nonces {
            Some((owner, source)) if *owner == pid => source.next_nonce(),
            slot => {
                let mut source = NonceSource::from_os();
                let nonce = source.next_nonce();
                *slot = Some((pid, source));
                nonce
            }
        }
    }

    /// The current key and what is left of this backend's grant under it, if the key is not due
    /// and the grant not spent.
    /// A grant no row covers is dropped here, first, once this transaction could write one.
    fn spendable(&mut self, now: UnixMicros) -> Option<(KeyId, u64)> {
        if self.budget_uncovered && usage::grants_are_covered() {
            self.drop_grant();
        }
        let current = self.ring.current().filter(|c| now < c.due_at)?;
        (self.budget > 0 && self.budget_key == Some(current.id)).then_some((current.id, self.budget))
    }

    fn drop_grant(&mut self) {
        self.budget = 0;
        self.budget_key = None;
        self.budget_uncovered = false;
    }

    pub fn config(&self) -> Rc<Config> {
        self.config.as_ref().map(|e| e.config.clone()).unwrap_or_default()
    }

    /// The configuration in force and where it came from.
    pub fn effective(&self) -> Effective {
        self.config.clone().unwrap_or_default()
    }
}

/// Registers the relcache and transaction callbacks. Called from `_PG_init`, once per process.
pub fn register_callbacks() {
    // SAFETY: registering callbacks with static function pointers; PostgreSQL keeps them for the
    // life of the process, and the callbacks only touch atomics and a thread-local flag.
    unsafe {
        pg_sys::CacheRegisterRelcacheCallback(Some(on_relcache_invalidation), pg_sys::Datum::from(0));
        pg_sys::RegisterXactCallback(Some(on_xact_event), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(on_subxact_event), std::ptr::null_mut());
    }
}

#[pg_guard]
extern "C-unwind" fn on_relcache_invalidation(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    let relid = relid.to_u32();
    // InvalidOid means "all relations" (e.g. after an invalidation queue overflow).
    if relid == 0
        || relid == DATA_KEYS_OID.load(Ordering::Relaxed)
        || relid == CONFIG_OID.load(Ordering::Relaxed)
    {
        INVALIDATIONS.fetch_add(1, Ordering::Relaxed);
    }
}

thread_local! {
    /// This transaction created a key and put it in the ring before committing.
    static CREATED_KEY: Cell<bool> = const { Cell::new(false) };
}

/// PostgreSQL replays a transaction's invalidations locally when it aborts, but not those of the
/// command that was running when it failed: a key created by the failing statement itself would
/// stay current in this backend. So an abort after a key creation forces a refresh, which reads
/// the committed keys and drops the uncommitted one.
#[pg_guard]
extern "C-unwind" fn on_xact_event(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    use pg_sys::XactEvent::*;
    match event {
        XACT_EVENT_PRE_PREPARE => keys::before_prepare(),
        XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT => {
            if CREATED_KEY.replace(false) {
                INVALIDATIONS.fetch_add(1, Ordering::Relaxed);
            }
            catalog::at_transaction_end();
            usage::at_transaction_end(false);
        }
        XACT_EVENT_COMMIT | XACT_EVENT_PARALLEL_COMMIT => {
            CREATED_KEY.set(false);
            catalog::at_transaction_end();
            usage::at_transaction_end(true);
        }
        XACT_EVENT_PREPARE => {
            CREATED_KEY.set(false);
            catalog::at_transaction_end();
            usage::at_transaction_end(false);
        }
        _ => {}
    }
}

#[pg_guard]
extern "C-unwind" fn on_subxact_event(
    event: pg_sys::SubXactEvent::Type,
    sub: pg_sys::SubTransactionId,
    parent: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    use pg_sys::SubXactEvent::*;
    match event {
        SUBXACT_EVENT_ABORT_SUB => {
            if CREATED_KEY.get() {
                INVALIDATIONS.fetch_add(1, Ordering::Relaxed);
            }
            crate::restore::forget_checks();
            usage::at_subtransaction_end(sub, parent, false);
        }
        SUBXACT_EVENT_COMMIT_SUB => usage::at_subtransaction_end(sub, parent, true),
        _ => {}
    }
}

/// After inserting or rewrapping key rows: make every other backend reload its ring when this
/// transaction commits, and this one reload if it aborts.
pub fn key_created_in_this_transaction(oids: TableOids) {
    CREATED_KEY.set(true);
    // SAFETY: queues a relcache invalidation for an existing relation inside a transaction.
    unsafe { pg_sys::CacheInvalidateRelcacheByRelid(oids.data_keys) };
}

/// After storing a configuration: every backend reloads it once this transaction commits.
pub fn invalidate_config(oids: TableOids) {
    // SAFETY: queues a relcache invalidation for an existing relation inside a transaction.
    unsafe { pg_sys::CacheInvalidateRelcacheByRelid(oids.config) };
}

/// The transaction start time, which is also the `created_at` of keys this transaction creates.
pub fn transaction_now() -> UnixMicros {
    // SAFETY: reads the start timestamp of the current transaction.
    catalog::from_pg_timestamp(unsafe { pg_sys::GetCurrentTransactionStartTimestamp() })
}

/// Per-call entry: the once-per-transaction checks (configuration file, clock), then a refresh
/// if an invalidation arrived. Returns the transaction's start time. In steady state: one load
/// of MyProc, two comparisons.
pub fn prepare() -> UnixMicros {
    let lxid = crate::compat::local_xid();
    let (stale, now) = BACKEND.with_borrow_mut(|b| {
        if b.lxid != lxid || b.now.0 == 0 {
            b.lxid = lxid;
            b.now = transaction_now();
            if b.config.as_ref().is_some_and(config_source::file_changed) {
                b.valid_as_of = 0;
            }
        }
        let epoch = shared_cache::epoch();
        if b.cache_epoch != epoch {
            // immuta_cache_reset() ran somewhere: if it concerned this database, drop (and
            // zeroize) every key this backend holds.
            b.cache_epoch = epoch;
            let resets = shared_cache::resets_of_this_database();
            if b.cache_resets != resets {
                b.cache_resets = resets;
                b.ring.clear();
                b.valid_as_of = 0;
            }
        }
        (b.valid_as_of != INVALIDATIONS.load(Ordering::Relaxed), b.now)
    });
    if stale {
        refresh();
    }
    now
}

/// Reloads the configuration and the current key, and forgets keys that no longer exist.
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
    CONFIG_OID.store(oids.config.to_u32(), Ordering::Relaxed);
    let previous = BACKEND.with_borrow(|b| b.config.clone());
    let effective = config_source::load(previous.as_ref());
    let current = catalog::current_key();
    let ids = catalog::key_ids();
    BACKEND.with_borrow_mut(|b| {
        if b.oids.is_some_and(|o| o != oids) {
            // The extension was dropped and created again: the old key ids mean other keys now.
            b.ring.clear();
            b.drop_grant();
            usage::forget();
        }
        b.ring.retain(|id| ids.contains(&id));
        b.ring.set_current(
            current
                .map(|(id, created)| CurrentKey { id, due_at: effective.config.rollover().due_at(created) }),
        );
        b.oids = Some(oids);
        b.config = Some(effective);
        b.valid_as_of = as_of;
    });
}

/// `immuta_encrypt`: seals the encoding `plaintext` of a value of `value_type`, with `context` if
/// given, under the current data key, straight into the `bytea` it returns.
pub fn encrypt(value_type: ValueType, context: Option<&[u8]>, plaintext: &[u8]) -> varlena::Bytea {
    let now = prepare();
    let len = format::sealed_len(plaintext.len());
    let seal = |cipher: &DataCipher, nonce: &[u8; format::NONCE_LEN], out: &mut [u8]| {
        cipher.seal_into(nonce, value_type, context, plaintext, out)
    };
    let fast = BACKEND.with_borrow_mut(|b| {
        let (id, _) = b.spendable(now)?;
        let nonce = b.next_nonce();
        let cipher = b.ring.cipher(id, now)?;
        let sealed = varlena::bytea(len, |out| seal(cipher, &nonce, out));
        b.budget -= 1;
        Some(sealed)
    });
    if let Some(sealed) = fast {
        return sealed;
    }
    // The fast path's `spendable` has already dropped a grant that must not be spent here.
    let held = BACKEND.with_borrow(|b| b.budget_key.map(|id| (id, b.budget)));
    let (id, budget) = keys::current_for_encrypt(now, held);
    // Kept before the key is loaded: a failing unwrap must not waste the grant.
    let covered = usage::grants_are_covered();
    BACKEND.with_borrow_mut(|b| {
        let fresh = held != Some((id, budget));
        (b.budget_key, b.budget) = (Some(id), budget);
        if fresh {
            b.budget_uncovered = !covered;
        }
    });
    keys::ensure_cipher(id, now);
    BACKEND.with_borrow_mut(|b| {
        b.budget -= 1;
        let nonce = b.next_nonce();
        let cipher = b.ring.loaded(id).expect("ensure_cipher loaded it");
        varlena::bytea(len, |out| seal(cipher, &nonce, out))
    })
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
    keys::ensure_cipher(sealed.key_id, now);
    let open = open.take().expect("not called yet");
    BACKEND.with_borrow(|b| open(b.ring.loaded(sealed.key_id).expect("ensure_cipher loaded it"), &sealed))
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

/// Forgets this backend's grant of the usage counter (see `usage.rs`). Called from abort
/// callbacks, when no borrow of the state is active (an error unwinds out of every borrow first);
/// if one were, there would be nothing safe to do but skip.
pub fn drop_grant() {
    BACKEND.with(|b| {
        if let Ok(mut b) = b.try_borrow_mut() {
            b.drop_grant()
        }
    });
}

/// Adds a cipher to the ring.
pub fn insert_cipher(cipher: DataCipher, expires_at: UnixMicros) {
    BACKEND.with_borrow_mut(|b| b.ring.insert(cipher, expires_at));
}
