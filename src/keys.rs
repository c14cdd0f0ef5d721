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

use std::cell::Cell;

use immuta_core::format;
use immuta_core::key::{DataKey, KeyId, WrappingKeyRef};
use immuta_core::keyrings::{self, Settings};
use immuta_core::ring::{CurrentKey, Named};
use immuta_core::rollover::{RolloverLength, RotationReason};
use immuta_core::time::UnixMicros;
use immuta_core::value_type::ValueType;
use pgrx::{pg_sys, PgSqlErrorCode};

use serde_json::json;

use crate::backend::{self, Reencrypted};
use crate::buffer::Scratch;
use crate::catalog::{self, AuditEvent};
use crate::errors::{self, raise, OrRaise};
use crate::usage::{self, Against};
use crate::xact::write_blocker;
use crate::{gucs, providers, shared_cache, varlena};

/// Why this transaction cannot create or change keys, keyrings or the audit log, if it cannot:
/// a standby, a read-only or parallel transaction (xact.rs), or a database that receives immuta's
/// keys from a publisher by logical replication (docs/DISTRIBUTED.md), which must never take a key id
/// the publisher could also take.
pub fn key_write_blocker() -> Option<&'static str> {
    write_blocker().or_else(subscriber_blocker)
}

thread_local! {
    /// The transaction (`lxid`) whose answer [`subscriber_blocker`] holds, and the answer.
    static SUBSCRIBER: std::cell::Cell<Option<(u32, bool)>> = const { std::cell::Cell::new(None) };
}

/// Why this database may not write keys because it receives them from a publisher (a
/// superuser's subscription includes one of immuta's key tables), if it does. One catalog query
/// per transaction that asks (only key creation and changes ask).
pub fn subscriber_blocker() -> Option<&'static str> {
    let lxid = crate::compat::local_xid();
    let subscribed = match SUBSCRIBER.get() {
        Some((at, subscribed)) if at == lxid => subscribed,
        _ => {
            let subscribed = catalog::subscribes_to_keys();
            SUBSCRIBER.set(Some((lxid, subscribed)));
            subscribed
        }
    };
    subscribed.then_some("this database receives immuta's keys from a publisher (logical replication)")
}

/// Where keys are written, for HINTs.
const ON_THE_WRITER: &str = "on the primary (with logical replication, on the publisher of immuta's keys)";

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

fn oids() -> catalog::TableOids {
    backend::oids()
}

thread_local! {
    /// The transaction in which a rollover lost the try-lock: do not try again in it.
    static ROLLOVER_GIVEN_UP_IN: Cell<Option<u32>> = const { Cell::new(None) };
    /// The rollover reasons (bit `1 << reason`) this session already warned it cannot act on.
    static WARNED_CANNOT_ROLLOVER: Cell<u8> = const { Cell::new(0) };
}

/// A keyring as key creation needs it: its name, its own settings, whether a superuser chose
/// its KMS key. `default` has no settings of its own.
pub struct Target {
    pub name: String,
    pub settings: Settings,
    pub by_superuser: bool,
}

impl Target {
    /// Keyring `name` (`default`, or one that exists and is not destroyed).
    pub fn of(name: &str) -> Target {
        if name == keyrings::DEFAULT {
            return Target { name: name.to_owned(), settings: Settings::default(), by_superuser: true };
        }
        backend::require_keyring_name(name);
        let Some(row) = catalog::keyring(name) else { backend::unknown_keyring(name) };
        if row.destroyed {
            destroyed_keyring(name);
        }
        Target { name: row.name, settings: row.settings, by_superuser: row.by_superuser }
    }

    /// `None` for the default keyring, as the backend's ring names it.
    fn ring_name(&self) -> Option<&str> {
        (self.name != keyrings::DEFAULT).then_some(self.name.as_str())
    }

    fn rollover(&self) -> RolloverLength {
        self.settings.rollover_or(backend::config().rollover())
    }
}

fn destroyed_keyring(name: &str) -> ! {
    raise(
        PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        format!("immuta keyring \"{name}\" was destroyed"),
        Some("Its keys were destroyed (crypto-shredding); nothing is encrypted under it again.".into()),
        Some("Use another keyring; immuta.keyrings and immuta.audit_log say when and why it was destroyed."),
    )
}

/// `immuta_encrypt`: under the current key of `keyring` (`None`: default); the hot path is
/// `backend::encrypt_fast`, and this is where a miss goes: the first key, a rollover, a new
/// grant of the usage counter, loading the key.
pub fn encrypt(
    keyring: Option<&str>,
    value_type: ValueType,
    context: Option<&[u8]>,
    plaintext: &[u8],
) -> varlena::Bytea {
    let now = backend::prepare();
    if let Some(sealed) = backend::encrypt_fast(keyring, now, value_type, context, plaintext) {
        return sealed;
    }
    if let Some(name) = keyring {
        if backend::named(name) == Named::Destroyed {
            destroyed_keyring(name);
        }
    }
    let id = current_for_encrypt(now, keyring);
    backend::seal_under(id, now, value_type, context, plaintext)
}

/// `immuta_reencrypt`: the value `ciphertext` (sealed with `context`, if given) sealed again
/// under the current key of its key's keyring, with the same type and context; `None` when it
/// already is under that key (the caller returns its argument). The value is opened either way,
/// so a wrong context is always an error. The plaintext passes through a buffer zeroed when the
/// new value is sealed, never through SQL.
pub fn reencrypt(ciphertext: &[u8], context: Option<&[u8]>) -> Option<varlena::Bytea> {
    let sealed = format::parse(ciphertext).or_raise();
    let now = backend::prepare();
    match backend::reencrypt_fast(&sealed, context, now) {
        Some(Reencrypted::Unchanged) => return None,
        Some(Reencrypted::Sealed(value)) => return Some(value),
        None => {}
    }
    let keyring = backend::keyring_of(sealed.key_id, now);
    let keyring = keyring.as_deref();
    let is_current = current_of(keyring).is_some_and(|c| c.id == sealed.key_id);
    // Opened even when it stays as it is: a wrong context is an error either way.
    let mut plaintext = Scratch::zeroed(sealed.body.len());
    let plaintext = plaintext.as_mut_slice();
    backend::open_loaded(&sealed, context, plaintext);
    (!is_current).then(|| encrypt(keyring, sealed.value_type, context, plaintext))
}

/// The current key of `keyring` (`None`: default), loading the keyring if need be.
fn current_of(keyring: Option<&str>) -> Option<CurrentKey> {
    match keyring {
        None => backend::current(None),
        Some(name) => match backend::named(name) {
            Named::Live(current) => current,
            Named::Destroyed => destroyed_keyring(name),
        },
    }
}

/// Whether key `id` is the current key of its keyring (the one `immuta_reencrypt` moves values
/// to). A key that is disabled, destroyed or unknown raises, as re-encrypting under it would.
pub fn is_current(id: KeyId) -> bool {
    let now = backend::prepare();
    if let Some(current) = backend::is_current_fast(id, now) {
        return current;
    }
    let keyring = backend::keyring_of(id, now);
    current_of(keyring.as_deref()).is_some_and(|c| c.id == id)
}

/// The key to encrypt with under `keyring` when the fast path cannot: no current key, the
/// current key is due, this backend's grant is spent, or the key is not loaded. On return this
/// backend holds a grant of at least one encryption under it (`usage.rs`): what was left of the
/// last grant is used up before another is taken (a key that is due but cannot be rolled over
/// here comes back here for every row).
fn current_for_encrypt(now: UnixMicros, keyring: Option<&str>) -> KeyId {
    let name = keyring.unwrap_or(keyrings::DEFAULT);
    let id = match backend::current(keyring) {
        Some(current) if now < current.due_at => current.id,
        Some(due) => rollover(name, due.id, RotationReason::Schedule, now),
        None => first_key(name),
    };
    let mut id = id;
    loop {
        if usage::ensure_grant(id, || usage::take(id, Against::Soft)).is_some() {
            return id;
        }
        let next = rollover(name, id, RotationReason::UsageLimit, now);
        if next != id {
            // A newer key, ours or another session's: it may be exhausted too by now.
            id = next;
            continue;
        }
        if key_write_blocker().is_some() {
            break;
        }
        // Another session is rolling the key over: go on under it for a little while, then wait
        // for that rollover to commit (module documentation).
        if usage::ensure_grant(id, || usage::take(id, Against::Overrun)).is_some() {
            return id;
        }
        id = rollover_waiting(name, id);
    }
    // The key cannot be rolled over here (read-only, standby): it may go on up to the hard
    // limit of AES-GCM, and not one encryption further.
    match usage::ensure_grant(id, || usage::take(id, Against::Hard)) {
        Some(_) => id,
        None => raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("immuta data key {id} has reached the AES-GCM limit of 2^32 encryptions"),
            Some(format!("NIST SP 800-38D forbids more encryptions with random nonces under one key; it could not be rolled over earlier because no read-write transaction {ON_THE_WRITER} encrypted after it reached immuta.max_encryptions_per_key.")),
            Some(&format!("Run SELECT immuta_rotate({}); {ON_THE_WRITER}.", rotate_argument(name))),
        ),
    }
}

/// The argument of `immuta_rotate` for keyring `name`, for HINTs.
fn rotate_argument(name: &str) -> String {
    if name == keyrings::DEFAULT {
        String::new()
    } else {
        format!("'{name}'")
    }
}

/// Replaces key `from` of keyring `name`, which is due for `reason`, by a new key, or adopts the
/// key another session created meanwhile. Returns `from` when this transaction cannot or should
/// not wait.
fn rollover(name: &str, from: KeyId, reason: RotationReason, now: UnixMicros) -> KeyId {
    if let Some(why) = key_write_blocker() {
        let flag = 1u8 << (reason as u8);
        let warned = WARNED_CANNOT_ROLLOVER.get();
        WARNED_CANNOT_ROLLOVER.set(warned | flag);
        if warned & flag == 0 {
            let state = match reason {
                RotationReason::UsageLimit => {
                    format!("has reached immuta.max_encryptions_per_key ({})", gucs::usage_limit().get())
                }
                _ => "is due for rollover".to_string(),
            };
            errors::warn(
                PgSqlErrorCode::ERRCODE_WARNING,
                format!("immuta data key {from} {state}, but {why}"),
                Some(format!("Values are encrypted with the current key until a writable transaction {ON_THE_WRITER} rolls it over. This warning is given once per session.")),
                Some(&format!("Run SELECT immuta_rotate(); {ON_THE_WRITER}, or encrypt in a read-write transaction there.")),
            );
        }
        return from;
    }
    let lxid = crate::compat::local_xid();
    let given_up = ROLLOVER_GIVEN_UP_IN.get() == Some(lxid) || !try_lock_key_creation();
    if given_up {
        ROLLOVER_GIVEN_UP_IN.set(Some(lxid));
        // Another session is rolling a key over. A key past its usage limit is left as soon as
        // that session commits (checked once per grant); a key that is merely old is kept for
        // the rest of this transaction.
        if reason == RotationReason::UsageLimit {
            if let Some((id, created)) = catalog::current_key(name).filter(|(id, _)| *id != from) {
                let target = Target::of(name);
                set_current(&target, id, created);
                return id;
            }
        }
        return from;
    }
    let target = Target::of(name);
    match adopt_latest(&target) {
        // Another session rolled over (or rotated) first.
        Some((id, _)) if id != from => id,
        // The configured length grew meanwhile: not due after all.
        Some((id, created))
            if reason == RotationReason::Schedule && !target.rollover().is_due(created, now) =>
        {
            id
        }
        Some((id, _)) => create_key(&target, reason, Some(id)),
        None => create_key(&target, RotationReason::FirstUse, None),
    }
}

/// Key `exhausted` has passed its usage limit and its overrun while another session rolls it
/// over: waits for that session (the key creation lock), then adopts its key, or rolls over here
/// if it gave up.
fn rollover_waiting(name: &str, exhausted: KeyId) -> KeyId {
    lock_key_creation();
    let target = Target::of(name);
    match adopt_latest(&target) {
        Some((id, _)) if id != exhausted => id,
        Some((id, _)) => create_key(&target, RotationReason::UsageLimit, Some(id)),
        None => create_key(&target, RotationReason::FirstUse, None),
    }
}

fn first_key(name: &str) -> KeyId {
    if let Some(why) = key_write_blocker() {
        raise(
            PgSqlErrorCode::ERRCODE_READ_ONLY_SQL_TRANSACTION,
            format!("no immuta data key exists yet, and {why}"),
            Some(format!("The first data key is created by the first encryption in a read-write transaction {ON_THE_WRITER}.")),
            Some(&format!("Run SELECT immuta_rotate({}); {ON_THE_WRITER} once.", rotate_argument(name))),
        );
    }
    lock_key_creation();
    let target = Target::of(name);
    match adopt_latest(&target) {
        Some((id, _)) => id,
        None => create_key(&target, RotationReason::FirstUse, None),
    }
}

/// Makes the newest committed key of the keyring (read with the latest snapshot) current in this
/// backend.
fn adopt_latest(target: &Target) -> Option<(KeyId, UnixMicros)> {
    let latest = catalog::current_key(&target.name)?;
    set_current(target, latest.0, latest.1);
    Some(latest)
}

fn set_current(target: &Target, id: KeyId, created: UnixMicros) {
    let due_at = target.rollover().due_at(created);
    backend::set_current(target.ring_name(), Some(CurrentKey { id, due_at }));
}

/// `immuta_rotate([keyring])`: a new key that encrypts from now on under `keyring`.
pub fn rotate(keyring: &str) -> KeyId {
    lock_for_key_change("rotate");
    let target = Target::of(keyring);
    let previous = adopt_latest(&target).map(|(id, _)| id);
    create_key(&target, RotationReason::Manual, previous)
}

/// `immuta_rotate_if_due()`: rolls over the current key of every keyring that is due (by its
/// rollover length or the usage limit); returns the newest key created, `None` when nothing was
/// due, no key exists yet, or this transaction cannot write (a standby, a read-only
/// transaction), so that one scheduled job can run on every node. Also folds each key's rows of
/// `immuta.key_usage` into one.
pub fn rotate_if_due() -> Option<KeyId> {
    if key_write_blocker().is_some() {
        return None;
    }
    let now = backend::prepare();
    // The scheduled job also keeps the usage table small.
    catalog::compact_usage();
    // Decide without the lock first: a job that finds nothing due never waits for a session
    // that holds the lock.
    let limit = gucs::usage_limit().get();
    let candidates = catalog::due_keyrings(backend::config().rollover().days(), limit);
    if candidates.is_empty() {
        return None;
    }
    lock_key_creation();
    let mut newest = None;
    for name in candidates {
        pgrx::check_for_interrupts!();
        let target = Target::of(&name);
        let Some(latest) = adopt_latest(&target) else { continue };
        if let Some(reason) = due_reason(&target, latest, now) {
            newest = Some(create_key(&target, reason, Some(latest.0)));
        }
    }
    newest
}

fn due_reason(
    target: &Target,
    (id, created): (KeyId, UnixMicros),
    now: UnixMicros,
) -> Option<RotationReason> {
    if target.rollover().is_due(created, now) {
        Some(RotationReason::Schedule)
    } else if usage::counted(id) >= gucs::usage_limit().get() {
        Some(RotationReason::UsageLimit)
    } else {
        None
    }
}

/// Checks that this transaction may write keys, and takes the key creation lock (blocking).
pub fn lock_for_key_change(verb: &str) {
    if let Some(why) = key_write_blocker() {
        raise(
            PgSqlErrorCode::ERRCODE_READ_ONLY_SQL_TRANSACTION,
            format!("cannot {verb} immuta data keys: {why}"),
            None,
            Some(&format!("Run it in a read-write transaction {ON_THE_WRITER}.")),
        );
    }
    backend::prepare();
    // No key is created or rewrapped concurrently.
    lock_key_creation();
}

/// Creates, wraps and stores a key of keyring `target` replacing `previous`, records the event in
/// the audit log, and makes the key current in this backend. We hold the key creation lock and
/// have read the keyring's newest key with the latest snapshot, so the unique
/// `(keyring, rolled_over_from)` cannot conflict; if it ever did, the INSERT's error would stand.
fn create_key(target: &Target, reason: RotationReason, previous: Option<KeyId>) -> KeyId {
    let effective = backend::effective();
    let (provider, server_identity) =
        providers::for_new_keys_of(&effective, &target.settings, target.by_superuser);
    let id = catalog::next_key_id();
    let key = DataKey::generate();
    let wrapped = provider.wrap(id, &key).or_raise();
    let rolled_over_from = match reason {
        RotationReason::FirstUse => Some(FIRST_KEY_MARKER),
        RotationReason::Manual => None,
        RotationReason::Schedule | RotationReason::UsageLimit => previous.map(KeyId::get),
    };
    catalog::insert_key(
        id,
        &wrapped.by,
        &wrapped.key,
        reason,
        rolled_over_from,
        server_identity,
        &target.name,
    );
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
        keyring: Some(&target.name),
    });
    backend::keys_written_in_this_transaction(oids());
    backend::insert_key(id, &key, &target.name, shared_cache::expiry_from_now());
    set_current(target, id, crate::xact::transaction_now());
    id
}

/// `immuta_rewrap()`: wraps every data key that is not destroyed again with the provider and key
/// configured now (local to KMS, KMS key A to key B, KMS to local), or its keyring's own KMS
/// key, in this transaction. The data keys themselves, and so every stored ciphertext, are
/// unchanged. Each key's rewrap is audited. A destroyed key has nothing left to rewrap.
pub fn rewrap() -> i32 {
    lock_for_key_change("rewrap");
    let effective = backend::effective();
    let rows: Vec<_> = catalog::key_rows(None)
        .into_iter()
        .filter(|row| row.state != immuta_core::key_state::KeyState::Destroyed)
        .collect();
    let keys: Vec<_> = rows.iter().map(|row| (row, providers::unwrap(row, &effective))).collect();
    let mut targets: std::collections::HashMap<String, (Box<dyn immuta_core::provider::KeyProvider>, bool)> =
        std::collections::HashMap::new();
    for (row, key) in &keys {
        if !targets.contains_key(&row.keyring) {
            let target = Target::of_any(&row.keyring);
            targets.insert(
                row.keyring.clone(),
                providers::for_new_keys_of(&effective, &target.settings, target.by_superuser),
            );
        }
        let (provider, server_identity) = &targets[&row.keyring];
        let wrapped = provider.wrap(row.id, key).or_raise();
        catalog::update_wrapping(row.id, &wrapped.by, &wrapped.key, *server_identity);
        catalog::insert_audit(AuditEvent {
            event: "key rewrapped",
            key_id: Some(row.id),
            reason: RotationReason::Manual.as_str(),
            detail: json!({ "from": wrapping_json(&row.wrapping), "to": wrapping_json(&wrapped.by) }),
            keyring: Some(&row.keyring),
        });
    }
    backend::keys_written_in_this_transaction(oids());
    keys.len() as i32
}

impl Target {
    /// Keyring `name` whatever its state (a rewrap also rewraps the disabled keys of a keyring
    /// that was not destroyed; a destroyed keyring has no key left to rewrap).
    pub fn of_any(name: &str) -> Target {
        match catalog::keyring(name) {
            Some(row) => Target { name: row.name, settings: row.settings, by_superuser: row.by_superuser },
            None => Target { name: name.to_owned(), settings: Settings::default(), by_superuser: true },
        }
    }
}

fn wrapping_json(wrapping: &WrappingKeyRef) -> serde_json::Value {
    json!({
        "provider": wrapping.provider().as_str(),
        "wrapping_key": wrapping.key_column(),
        "region": wrapping.region_column(),
    })
}
