//! The data key lifecycle on the slow path: the first key, rollover, manual rotation, and
//! loading a key this backend has not unwrapped yet.
//!
//! Creating a key takes the key creation lock ([`KEY_CREATION_LOCK`]), held to the end of the
//! transaction, so key creations are serialised in commit order and the newest id is always the
//! current key. Rollover from an
//! encryption only *tries* that lock: a session that loses keeps encrypting with the current key
//! and does not try again in that transaction, so an encryption never waits behind another
//! session's rotation. (The very first key is the exception: with no key to fall back on, the
//! first encryption waits for a concurrent first encryption and then uses its key.) After taking
//! the lock, the newest key is read again with the latest snapshot (see `catalog.rs`), so a
//! rollover committed meanwhile is adopted, not repeated, at every isolation level. As a last
//! guard, an automatic rollover records the key it replaces in the unique column
//! `rolled_over_from`: two sessions can never both replace the same key.
//!
//! A key is due by age (`schedule.dataKeyRollOverLength`) or by use
//! (`immuta.max_encryptions_per_key`, counted in `usage.rs`). The scheduled
//! `immuta_rotate_if_due()` decides without the lock, and only takes it (waiting) when something
//! is due. Every key creation, rotation and rewrap is appended to `immuta.audit_log` in the same
//! transaction.
//!
//! A key past its usage limit is the one case where an encryption may wait: sessions that lose
//! the try-lock go on under the exhausted key for at most `UsageLimit::overrun()` encryptions
//! (counted by the same counter), then wait for the rollover to commit, so the limit is passed by
//! at most that much whatever the timing.
//!
//! A transaction that holds the key creation lock cannot be prepared (two-phase commit): it would
//! hold the lock until `COMMIT PREPARED`, across restarts, and every first encryption and
//! rotation in the database would wait for it.

use immuta_core::cipher::DataCipher;
use immuta_core::key::{DataKey, KeyId, WrappingKeyRef};
use immuta_core::keyring::CurrentKey;
use immuta_core::rollover::RotationReason;
use immuta_core::time::UnixMicros;
use immuta_core::Error;
use pgrx::{pg_sys, PgSqlErrorCode};

use serde_json::json;

use crate::backend::{self, BACKEND};
use crate::catalog::{self, AuditEvent};
use crate::errors::{self, raise, OrRaise};
use crate::usage::{self, Against};
use crate::{gucs, providers, shared_cache};

/// The key creation lock: SHARE UPDATE EXCLUSIVE on the private sequence `immuta.key_ids`. It
/// conflicts with itself; it does not conflict with ROW EXCLUSIVE, which any role can get on a
/// sequence (`nextval` locks before it checks privileges, and keeps the lock to the end of the
/// transaction even when a savepoint rolls back) and on `immuta.data_keys` (the role that
/// installed immuta may INSERT there, for restores), and could then hold in a prepared
/// transaction. Nothing else takes this mode or a stronger one on a sequence without being its
/// owner (`LOCK TABLE` refuses sequences; `ANALYZE` lets go of one at once).
const KEY_CREATION_LOCK: pg_sys::LOCKMODE = pg_sys::ShareUpdateExclusiveLock as pg_sys::LOCKMODE;
/// `rolled_over_from` of the first key, so that two first uses cannot both create one.
const FIRST_KEY_MARKER: i64 = 0;

thread_local! {
    /// The sequence whose lock this backend last took as the key creation lock (whether it still
    /// holds it is PostgreSQL's lock table's to say: a rolled-back savepoint releases it).
    static LOCKED: std::cell::Cell<pg_sys::Oid> = const { std::cell::Cell::new(pg_sys::InvalidOid) };
}

/// Takes the key creation lock, waiting for it. Held to the end of the transaction.
pub fn lock_key_creation() {
    lock_key_creation_of(oids());
}

/// [`lock_key_creation`] of the installation `oids` (the restore trigger's, which may be newer
/// than this backend's if the extension was created again since it last refreshed).
pub fn lock_key_creation_of(oids: catalog::TableOids) {
    let key_ids = oids.key_ids;
    LOCKED.set(key_ids);
    // SAFETY: a blocking lock on our own sequence by OID, released at transaction end.
    unsafe { pg_sys::LockRelationOid(key_ids, KEY_CREATION_LOCK) };
}

/// Takes the key creation lock if no other transaction holds it; whether it did.
fn try_lock_key_creation() -> bool {
    let key_ids = oids().key_ids;
    LOCKED.set(key_ids);
    // SAFETY: a conditional lock on our own sequence by OID, released at transaction end.
    unsafe { pg_sys::ConditionalLockRelationOid(key_ids, KEY_CREATION_LOCK) }
}

/// Before PREPARE TRANSACTION: refuses a transaction that holds the key creation lock (only
/// immuta takes it), or wrote anything of immuta's but a usage reservation (a prepared
/// compaction or configuration change would hold rows every later one waits for).
pub fn before_prepare() {
    if catalog::wrote_unpreparable() {
        raise(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            "cannot PREPARE a transaction that changed immuta's keys, configuration or audit log",
            Some("Prepared, it would keep rows or locks that every later key change or scheduled rollover waits for, until COMMIT PREPARED.".into()),
            Some("Commit the transaction instead; manage keys in a transaction that is not prepared."),
        );
    }
    let key_ids = LOCKED.get();
    if key_ids == pg_sys::InvalidOid {
        return;
    }
    // A relation lock tag as SET_LOCKTAG_RELATION builds it.
    let tag = pg_sys::LOCKTAG {
        // SAFETY: MyDatabaseId is set in every backend before any function runs.
        locktag_field1: unsafe { pg_sys::MyDatabaseId }.to_u32(),
        locktag_field2: key_ids.to_u32(),
        locktag_field3: 0,
        locktag_field4: 0,
        locktag_type: pg_sys::LockTagType::LOCKTAG_RELATION as u8,
        locktag_lockmethodid: pg_sys::DEFAULT_LOCKMETHOD as u8,
    };
    if crate::compat::lock_held_by_me(&tag, KEY_CREATION_LOCK) {
        raise(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            "cannot PREPARE a transaction that created or changed immuta data keys",
            Some("The transaction holds the lock that serialises key creation; prepared, it would hold it until COMMIT PREPARED, and every first encryption and rotation in this database would wait for it.".into()),
            Some("Commit the transaction instead; create or rotate keys in a transaction that is not prepared."),
        );
    }
}

/// Why this transaction cannot create a key (or write a usage reservation), if it cannot.
pub fn write_blocker() -> Option<&'static str> {
    // SAFETY: reads of PostgreSQL's transaction and recovery state.
    unsafe {
        if pg_sys::RecoveryInProgress() {
            Some("the server is a standby in recovery")
        } else if pg_sys::XactReadOnly {
            Some("the transaction is read-only")
        } else if pg_sys::IsInParallelMode() {
            Some("the key was needed inside a parallel operation, which cannot write")
        } else {
            None
        }
    }
}

fn oids() -> catalog::TableOids {
    BACKEND.with_borrow(|b| b.oids).unwrap_or_else(catalog::table_oids)
}

/// The key to encrypt with, and how many encryptions this backend may do under it (at least
/// one), when the fast path cannot encrypt: no current key, the current key is due, this
/// backend's grant is spent, or the key is not loaded. `held` is what is left of the grant this
/// backend holds, and for which key: it is used up before another is taken (a key that is due
/// but cannot be rolled over here comes back here for every row).
pub fn current_for_encrypt(now: UnixMicros, held: Option<(KeyId, u64)>) -> (KeyId, u64) {
    let id = match BACKEND.with_borrow(|b| b.ring.current()) {
        Some(current) if now < current.due_at => current.id,
        Some(due) => rollover(due.id, RotationReason::Schedule, now),
        None => first_key(),
    };
    match held {
        Some((held_id, left)) if held_id == id && left > 0 => return (id, left),
        _ => {}
    }
    let mut id = id;
    loop {
        if let Some(granted) = usage::take(id, Against::Soft) {
            return (id, granted);
        }
        let next = rollover(id, RotationReason::UsageLimit, now);
        if next != id {
            // A newer key, ours or another session's: it may be exhausted too by now.
            id = next;
            continue;
        }
        if write_blocker().is_some() {
            break;
        }
        // Another session is rolling the key over: go on under it for a little while, then wait
        // for that rollover to commit (module documentation).
        if let Some(granted) = usage::take(id, Against::Overrun) {
            return (id, granted);
        }
        id = rollover_waiting(id);
    }
    // The key cannot be rolled over here (read-only, standby): it may go on up to the hard
    // limit of AES-GCM, and not one encryption further.
    match usage::take(id, Against::Hard) {
        Some(granted) => (id, granted),
        None => raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("immuta data key {id} has reached the AES-GCM limit of 2^32 encryptions"),
            Some("NIST SP 800-38D forbids more encryptions with random nonces under one key; it could not be rolled over earlier because no read-write transaction on the primary encrypted after it reached immuta.max_encryptions_per_key.".into()),
            Some("Run SELECT immuta_rotate(); on the primary."),
        ),
    }
}

/// Replaces key `from`, which is due for `reason`, by a new key, or adopts the key another
/// session created meanwhile. Returns `from` when this transaction cannot or should not wait.
fn rollover(from: KeyId, reason: RotationReason, now: UnixMicros) -> KeyId {
    if let Some(why) = write_blocker() {
        let flag = 1u8 << (reason as u8);
        let warn = BACKEND.with_borrow_mut(|b| {
            let first = b.warned_cannot_rollover & flag == 0;
            b.warned_cannot_rollover |= flag;
            first
        });
        if warn {
            let state = match reason {
                RotationReason::UsageLimit => {
                    format!("has reached immuta.max_encryptions_per_key ({})", gucs::usage_limit().get())
                }
                _ => "is due for rollover".to_string(),
            };
            errors::warn(
                PgSqlErrorCode::ERRCODE_WARNING,
                format!("immuta data key {from} {state}, but {why}"),
                Some("Values are encrypted with the current key until a writable transaction on the primary rolls it over. This warning is given once per session.".into()),
                Some("Run SELECT immuta_rotate(); on the primary, or encrypt in a read-write transaction."),
            );
        }
        return from;
    }
    let lxid = crate::compat::local_xid();
    let given_up = BACKEND.with_borrow(|b| b.rollover_given_up_in == Some(lxid)) || !try_lock_key_creation();
    if given_up {
        BACKEND.with_borrow_mut(|b| b.rollover_given_up_in = Some(lxid));
        // Another session is rolling the key over. A key past its usage limit is left as soon
        // as that session commits (checked once per grant); a key that is merely old is kept
        // for the rest of this transaction.
        if reason == RotationReason::UsageLimit {
            if let Some((id, created)) = catalog::current_key().filter(|(id, _)| *id != from) {
                set_current(id, created);
                return id;
            }
        }
        return from;
    }
    let length = BACKEND.with_borrow(|b| b.config().rollover());
    match adopt_latest() {
        // Another session rolled over (or rotated) first.
        Some((id, _)) if id != from => id,
        // The configured length grew meanwhile: not due after all.
        Some((id, created)) if reason == RotationReason::Schedule && !length.is_due(created, now) => id,
        Some((id, _)) => create_key(reason, Some(id)),
        None => create_key(RotationReason::FirstUse, None),
    }
}

/// Key `exhausted` has passed its usage limit and its overrun while another session rolls it
/// over: waits for that session (the key creation lock), then adopts its key, or rolls over here
/// if it gave up.
fn rollover_waiting(exhausted: KeyId) -> KeyId {
    lock_key_creation();
    match adopt_latest() {
        Some((id, _)) if id != exhausted => id,
        Some((id, _)) => create_key(RotationReason::UsageLimit, Some(id)),
        None => create_key(RotationReason::FirstUse, None),
    }
}

fn first_key() -> KeyId {
    if let Some(why) = write_blocker() {
        raise(
            PgSqlErrorCode::ERRCODE_READ_ONLY_SQL_TRANSACTION,
            format!("no immuta data key exists yet, and {why}"),
            Some("The first data key is created by the first encryption in a read-write transaction on the primary.".into()),
            Some("Run SELECT immuta_rotate(); on the primary once."),
        );
    }
    lock_key_creation();
    match adopt_latest() {
        Some((id, _)) => id,
        None => create_key(RotationReason::FirstUse, None),
    }
}

/// Makes the newest committed key (read with the latest snapshot) current in this backend.
fn adopt_latest() -> Option<(KeyId, UnixMicros)> {
    let latest = catalog::current_key()?;
    set_current(latest.0, latest.1);
    Some(latest)
}

fn set_current(id: KeyId, created: UnixMicros) {
    BACKEND.with_borrow_mut(|b| {
        let due_at = b.config().rollover().due_at(created);
        b.ring.set_current(Some(CurrentKey { id, due_at }));
    });
}

/// `immuta_rotate()`: a new key that encrypts from now on.
pub fn rotate() -> KeyId {
    lock_for_key_change("rotate");
    let previous = adopt_latest().map(|(id, _)| id);
    create_key(RotationReason::Manual, previous)
}

/// `immuta_rotate_if_due()`: rolls the current key over if it is `dataKeyRollOverLength` days
/// old or has reached the usage limit; `None` when nothing is due, no key exists yet, or this
/// transaction cannot write (a standby, a read-only transaction), so that one scheduled job can
/// run on every node. Also folds each key's rows of `immuta.key_usage` into one.
pub fn rotate_if_due() -> Option<KeyId> {
    if write_blocker().is_some() {
        return None;
    }
    let now = backend::prepare();
    // The scheduled job also keeps the usage table small.
    catalog::compact_usage();
    // Decide without the lock first: a job that finds nothing due never waits for a session
    // that holds the lock.
    due_reason(catalog::current_key()?, now)?;
    lock_key_creation();
    let latest = adopt_latest()?;
    let reason = due_reason(latest, now)?;
    Some(create_key(reason, Some(latest.0)))
}

fn due_reason((id, created): (KeyId, UnixMicros), now: UnixMicros) -> Option<RotationReason> {
    if BACKEND.with_borrow(|b| b.config().rollover()).is_due(created, now) {
        Some(RotationReason::Schedule)
    } else if usage::counted(id) >= gucs::usage_limit().get() {
        Some(RotationReason::UsageLimit)
    } else {
        None
    }
}

/// Checks that this transaction may write keys, and takes the key creation lock (blocking).
fn lock_for_key_change(verb: &str) {
    if let Some(why) = write_blocker() {
        raise(
            PgSqlErrorCode::ERRCODE_READ_ONLY_SQL_TRANSACTION,
            format!("cannot {verb} immuta data keys: {why}"),
            None,
            Some("Run it in a read-write transaction on the primary."),
        );
    }
    backend::prepare();
    // No key is created or rewrapped concurrently.
    lock_key_creation();
}

/// Creates, wraps and stores a key replacing `previous`, records the event in the audit log,
/// and makes the key current in this backend. We hold the key creation lock and have read the
/// newest key with the latest snapshot, so the unique `rolled_over_from` cannot conflict; if it
/// ever did, the INSERT's error would stand.
fn create_key(reason: RotationReason, previous: Option<KeyId>) -> KeyId {
    let effective = BACKEND.with_borrow(|b| b.effective());
    let provider = providers::for_new_keys(&effective);
    let id = catalog::next_key_id();
    let key = DataKey::generate();
    let wrapped = provider.wrap(id, &key).or_raise();
    let rolled_over_from = match reason {
        RotationReason::FirstUse => Some(FIRST_KEY_MARKER),
        RotationReason::Manual => None,
        RotationReason::Schedule | RotationReason::UsageLimit => previous.map(KeyId::get),
    };
    catalog::insert_key(id, &wrapped.by, &wrapped.key, reason, rolled_over_from, effective.by_superuser);
    catalog::insert_audit(AuditEvent {
        event: if reason == RotationReason::FirstUse { "key created" } else { "key rotated" },
        key_id: Some(id),
        reason: reason.as_str(),
        detail: json!({
            "previous_key": previous.map(KeyId::get),
            "previous_key_encryptions": previous.map(usage::counted),
            "provider": wrapped.by.provider().as_str(),
            "wrapping_key": wrapped.by.key_column(),
        }),
    });
    backend::key_created_in_this_transaction(oids());
    backend::insert_cipher(DataCipher::new(id, &key), shared_cache::expiry_from_now());
    set_current(id, backend::transaction_now());
    id
}

/// `immuta_rewrap()`: wraps every data key again with the provider and key configured now
/// (local to KMS, KMS key A to key B, KMS to local), in this transaction. The data keys
/// themselves, and so every stored ciphertext, are unchanged. Each key's rewrap is audited.
pub fn rewrap() -> i32 {
    lock_for_key_change("rewrap");
    let effective = BACKEND.with_borrow(|b| b.effective());
    let rows = catalog::key_rows(None);
    let keys: Vec<_> = rows.iter().map(|row| (row, providers::unwrap(row, &effective))).collect();
    let provider = providers::for_new_keys(&effective);
    for (row, key) in &keys {
        let wrapped = provider.wrap(row.id, key).or_raise();
        catalog::update_wrapping(row.id, &wrapped.by, &wrapped.key, effective.by_superuser);
        catalog::insert_audit(AuditEvent {
            event: "key rewrapped",
            key_id: Some(row.id),
            reason: RotationReason::Manual.as_str(),
            detail: json!({ "from": wrapping_json(&row.wrapping), "to": wrapping_json(&wrapped.by) }),
        });
    }
    backend::key_created_in_this_transaction(oids());
    keys.len() as i32
}

fn wrapping_json(wrapping: &WrappingKeyRef) -> serde_json::Value {
    json!({
        "provider": wrapping.provider().as_str(),
        "wrapping_key": wrapping.key_column(),
        "region": wrapping.region_column(),
    })
}

/// Makes sure the ring holds an unexpired cipher of key `id`, taking the key from the shared
/// cache or unwrapping it.
pub fn ensure_cipher(id: KeyId, now: UnixMicros) {
    if BACKEND.with_borrow(|b| b.ring.cipher(id, now).is_some()) {
        return;
    }
    let row = catalog::key_row(id).ok_or(Error::UnknownKey { key_id: id.get() as u64 }).or_raise();
    let effective = BACKEND.with_borrow(|b| b.effective());
    let (key, expires_at) = shared_cache::key_for(&row, &effective);
    backend::insert_cipher(DataCipher::new(id, &key), expires_at);
}
