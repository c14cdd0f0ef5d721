//! Blind indexes: the lifecycle of index keys (create, rotate, retire), this backend's cache of
//! their MAC keys, and the terms (`immuta_core::blind_index` makes them).
//!
//! An index is a name within a keyring (`'patients.ssn'` of `default`, of `tenant_42`, ...); each
//! has versions 1, 2, ..., each an index key stored wrapped in `immuta.index_keys` like a data key
//! (same providers, same shared cache, same audit log). The newest enabled version makes terms;
//! every enabled version matches (`immuta_blind_indexes`), so lookups keep working while a job
//! recomputes the stored terms after a rotation; then the older versions are retired (destroyed).
//!
//! Hot path (`term`): after `backend::prepare`, one hash lookup of (keyring, name) in this
//! backend's map and one HMAC; no SPI, no lock. The map is dropped whenever the backend's key
//! ring is refreshed (every change to index keys sends a relcache invalidation for their table)
//! or emptied (`immuta_cache_reset`, an abort after a key write), and a version's MAC key expires
//! with the data key it was derived from (`immuta.cache_ttl`).

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use immuta_core::blind_index::{self, TermKey};
use immuta_core::format;
use immuta_core::key::{DataKey, KeyId};
use immuta_core::key_state::KeyState;
use immuta_core::keyrings;
use immuta_core::time::UnixMicros;
use immuta_core::value_type::ValueType;
use pgrx::PgSqlErrorCode;
use serde_json::json;

use crate::catalog::{self, AuditEvent, IndexKeyRow};
use crate::errors::{raise, OrRaise};
use crate::keys::{self, Target};
use crate::{backend, key_states, providers, shared_cache, varlena};

/// The enabled versions of one index, newest first, and when the first of them expires.
struct Versions {
    keys: Vec<(KeyId, TermKey)>,
    expires_at: UnixMicros,
}

/// Why an index makes no term: it does not exist in the keyring, or it has no enabled version
/// left (its keyring was destroyed).
#[derive(Clone, Copy)]
enum Missing {
    Unknown,
    Retired,
}

/// What the backend's map holds for an index: its versions, or why there are none (kept too, so
/// that a column whose rows name keyrings without the index does not query for each row; the
/// map is dropped when index keys change).
type Found = Result<Rc<Versions>, Missing>;

#[derive(Default)]
struct Cache {
    generation: u64,
    indexes: HashMap<(Rc<str>, Rc<str>), Found>,
    /// The index found last (a query over many rows asks for one index, row after row): found
    /// again by comparing two names, with no allocation and no hashing.
    last: Option<(Rc<str>, Rc<str>, Found)>,
    /// Index keys this transaction (`lxid`) made terms with: checked before it commits.
    used: Vec<KeyId>,
    used_in: u32,
}

/// Enabled versions an index may have at once (each lookup of `immuta_blind_indexes` makes a
/// term with each, and each is unwrapped once per backend and cache lifetime).
const MAX_ENABLED_VERSIONS: usize = 16;

/// How many indexes a backend keeps (each a few hundred bytes); beyond, it starts again.
const MAX_CACHED: usize = 16_384;

thread_local! {
    static CACHE: RefCell<Cache> = RefCell::new(Cache::default());
}

/// Raises `22023` for a name no index can have (not echoed).
fn require_index_name(name: &str) {
    if !blind_index::name_ok(name) {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            "invalid immuta blind index name",
            Some(format!("An index name is {}.", keyrings::NAME_RULE)),
            Some("Name the index after its column, such as 'patients.ssn'."),
        );
    }
}

fn unknown_index(keyring: &str, name: &str) -> ! {
    raise(
        PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
        format!("immuta blind index \"{name}\" does not exist in keyring \"{keyring}\""),
        Some(
            "Index keys are created by immuta_blind_index_create(); computing a term never creates one."
                .into(),
        ),
        Some("Check the name and the keyring, or create the index first (immuta_admin)."),
    )
}

/// The enabled versions of index `name` of `keyring`, from this backend's map or loaded (each
/// version's key taken from the shared cache or unwrapped, then its MAC key derived and the data
/// key zeroized). An index that does not exist, or has no enabled version, raises.
fn versions(keyring: &str, name: &str, now: UnixMicros) -> Rc<Versions> {
    lookup(keyring, name, now).unwrap_or_else(|missing| match missing {
        Missing::Unknown => unknown_index(keyring, name),
        Missing::Retired => retired(keyring, name),
    })
}

/// [`versions`], or why there are none.
fn lookup(keyring: &str, name: &str, now: UnixMicros) -> Found {
    let generation = backend::generation();
    let found = CACHE.with_borrow_mut(|c| {
        if c.generation != generation {
            c.indexes.clear();
            c.last = None;
            c.generation = generation;
        }
        let fresh = |f: &Found| !matches!(f, Ok(v) if v.expires_at <= now);
        if let Some((k, n, f)) = &c.last {
            if **k == *keyring && **n == *name && fresh(f) {
                return Some(f.clone());
            }
        }
        let key = (Rc::from(keyring), Rc::from(name));
        let found = c.indexes.get(&key).filter(|f| fresh(f)).cloned()?;
        c.last = Some((key.0, key.1, found.clone()));
        Some(found)
    });
    if let Some(found) = found {
        return found;
    }
    let found = load(keyring, name);
    CACHE.with_borrow_mut(|c| {
        if c.indexes.len() >= MAX_CACHED {
            c.indexes.clear();
            c.last = None;
        }
        let (k, n): (Rc<str>, Rc<str>) = (Rc::from(keyring), Rc::from(name));
        c.indexes.insert((k.clone(), n.clone()), found.clone());
        c.last = Some((k, n, found.clone()));
    });
    found
}

/// Reads the index's rows and readies each enabled version's MAC key.
fn load(keyring: &str, name: &str) -> Found {
    require_index_name(name);
    backend::require_keyring_name(keyring);
    let rows = catalog::index_key_rows(keyring, name);
    if rows.is_empty() {
        return Err(Missing::Unknown);
    }
    let effective = backend::effective();
    let mut keys = Vec::with_capacity(rows.len());
    let mut expires_at = UnixMicros(i64::MAX);
    for row in rows.iter().filter(|r| r.key.state == KeyState::Enabled) {
        let id = row.key.id;
        let recheck = || {
            let still = catalog::index_key_rows(keyring, name)
                .into_iter()
                .any(|r| r.key.id == id && r.key.state == KeyState::Enabled);
            if !still {
                retired(keyring, name);
            }
        };
        let (key, expires): (DataKey, UnixMicros) = shared_cache::key_for(&row.key, &effective, recheck);
        keys.push((id, TermKey::derive(&key, id, keyring, name, row.version, row.term_len)));
        expires_at = expires_at.min(expires);
    }
    if keys.is_empty() {
        return Err(Missing::Retired);
    }
    Ok(Rc::new(Versions { keys, expires_at }))
}

fn retired(keyring: &str, name: &str) -> ! {
    raise(
        PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        format!("immuta blind index \"{name}\" of keyring \"{keyring}\" has no enabled key"),
        Some(
            "Its keys were destroyed (its keyring was destroyed): no term can be computed or matched.".into(),
        ),
        Some("immuta.blind_index_keys and immuta.audit_log say when and why."),
    )
}

/// Remembers that this transaction made a term with index key `id` (checked before commit).
fn note_used(id: KeyId) {
    let lxid = crate::compat::local_xid();
    CACHE.with_borrow_mut(|c| {
        if c.used_in != lxid {
            c.used.clear();
            c.used_in = lxid;
        }
        if c.used.last() != Some(&id) && !c.used.contains(&id) {
            c.used.push(id);
        }
    });
}

/// `immuta_blind_index`: the term of a value (its type and encoding) under the newest version of
/// index `name` of `keyring`.
pub fn term(keyring: Option<&str>, name: &str, value_type: ValueType, encoding: &[u8]) -> varlena::Bytea {
    let now = backend::prepare();
    let keyring = keyring.unwrap_or(keyrings::DEFAULT);
    let versions = versions(keyring, name, now);
    let (id, key) = &versions.keys[0];
    note_used(*id);
    varlena::bytea(key.term_size(), |out| key.term_into(value_type, encoding, out))
}

/// `immuta_blind_indexes`: the terms of a value under every enabled version, newest first.
pub fn terms(keyring: Option<&str>, name: &str, value_type: ValueType, encoding: &[u8]) -> Vec<Vec<u8>> {
    let now = backend::prepare();
    let versions = versions(keyring.unwrap_or(keyrings::DEFAULT), name, now);
    versions.keys.iter().map(|(_, key)| key.term(value_type, encoding)).collect()
}

/// `immuta.blind_index_of`: the term of the value sealed in `ciphertext` (opened with `context`),
/// without returning the value. For the trigger and the job that keep a term column in step. A
/// value of another keyring than the one named is refused: its terms must go with its own keyring
/// (and become untestable when that keyring is crypto-shredded).
pub fn term_of_ciphertext(
    ciphertext: &[u8],
    context: Option<&[u8]>,
    name: &str,
    keyring: Option<&str>,
) -> varlena::Bytea {
    let sealed = format::parse(ciphertext).or_raise();
    let now = backend::prepare();
    let own = backend::keyring_of(sealed.key_id, now).unwrap_or_else(|| Rc::from(keyrings::DEFAULT));
    if keyring.is_some_and(|k| k != &*own) {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            "the value is under another keyring than its blind index",
            Some("A value's term is made by an index of the value's own keyring, so that crypto-shredding the keyring reaches its terms too.".into()),
            Some("Keep the term column with keyring => NULL (each value's own keyring), and create the index in every keyring the column holds."),
        );
    }
    let versions = versions(&own, name, now);
    let (id, key) = &versions.keys[0];
    note_used(*id);
    let value_type = sealed.value_type;
    let size = key.term_size();
    backend::decrypt_with(ciphertext, value_type, context, |with_nul| {
        let encoding = &with_nul[..with_nul.len() - 1];
        varlena::bytea(size, |out| key.term_into(value_type, encoding, out))
    })
}

/// `immuta.blind_index_pending`, the filter of the job that keeps a term column in step: whether
/// the row's `term` is to be computed again (`Some(true)`: missing, or made by an older version
/// of the index), is current (`Some(false)`), or cannot be computed (`None`): bytes that are not
/// an immuta value, a key the database does not have, a disabled or destroyed key, a value of
/// another keyring than `keyring`, or a keyring without the index. The job leaves such rows as
/// they are and counts them, instead of stopping at the first. Reads only the value's header.
pub fn pending(term: Option<&[u8]>, ciphertext: &[u8], name: &str, keyring: Option<&str>) -> Option<bool> {
    let sealed = format::parse(ciphertext).ok()?;
    let now = backend::prepare();
    let (own, enabled) = backend::probe_key(sealed.key_id, now)?;
    if keyring.is_some_and(|k| k != &*own) {
        return None;
    }
    let versions = lookup(&own, name, now).ok()?;
    let newest = &versions.keys[0].1;
    let current = term.is_some_and(|t| {
        t.len() == newest.term_size() && blind_index::version_of(t) == Some(newest.version())
    });
    if current {
        Some(false)
    } else {
        enabled.then_some(true)
    }
}

/// Before this transaction commits: if an index key it made terms with was retired meanwhile,
/// the commit fails (its terms would never be matched again). One atomic read in steady state.
pub fn before_commit() {
    let lxid = crate::compat::local_xid();
    let used = CACHE.with_borrow(|c| if c.used_in == lxid { c.used.clone() } else { Vec::new() });
    if used.is_empty() {
        return;
    }
    let Some((_, oids)) = backend::changed_during_transaction() else { return };
    if !catalog::still_installed(oids) {
        return;
    }
    if !catalog::not_enabled_among(&used).is_empty() {
        raise(
            PgSqlErrorCode::ERRCODE_T_R_SERIALIZATION_FAILURE,
            "an immuta blind index key was retired while this transaction computed terms with it",
            Some("Another session retired the index key and committed first; the terms computed here would never match.".into()),
            Some("Retry the transaction: it computes terms with the index's current key."),
        );
    }
}

// The administration: immuta_admin's functions.

fn term_len_argument(term_length: i32) -> u8 {
    if !blind_index::term_len_ok(term_length) {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            "invalid immuta blind index term length",
            Some(format!(
                "A term is {} to {} bytes long (plus 2 bytes of version).",
                blind_index::MIN_TERM_LEN,
                blind_index::MAX_TERM_LEN
            )),
            Some("16 bytes (the default) keep collisions negligible up to billions of values."),
        );
    }
    term_length as u8
}

/// Creates version `version` of index `name` of keyring `target`: a new key, wrapped by the
/// keyring's provider, stored and audited. Under the key creation lock.
fn create_version(target: &Target, name: &str, version: u16, term_len: u8, event: &str) -> KeyId {
    let effective = backend::effective();
    let (provider, server_identity) =
        providers::for_new_keys_of(&effective, &target.settings, target.by_superuser);
    let id = catalog::next_key_id();
    let key = DataKey::generate();
    let wrapped = provider.wrap(id, &key).or_raise();
    catalog::insert_index_key(
        id,
        &wrapped.by,
        &wrapped.key,
        server_identity,
        &target.name,
        name,
        version,
        term_len,
    );
    catalog::insert_audit(AuditEvent {
        event,
        key_id: Some(id),
        reason: "manual",
        detail: json!({
            "index": name,
            "version": version,
            "term_length": term_len,
            "provider": wrapped.by.provider().as_str(),
            "wrapping_key": wrapped.by.key_column(),
        }),
        keyring: Some(&target.name),
    });
    let oids = backend::oids();
    backend::keys_written_in_this_transaction(oids);
    invalidate(oids);
    id
}

fn invalidate(oids: catalog::TableOids) {
    backend::invalidate_index_keys(oids);
}

/// `immuta_blind_index_create(name, keyring, term_length)`: version 1 of a new index. Returns
/// the index key's id.
pub fn create(name: &str, keyring: &str, term_length: i32) -> i64 {
    require_index_name(name);
    let term_len = term_len_argument(term_length);
    keys::lock_for_key_change("create");
    let target = Target::of(keyring);
    if !catalog::index_key_rows(&target.name, name).is_empty() {
        raise(
            PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT,
            format!("immuta blind index \"{name}\" already exists in keyring \"{}\"", target.name),
            None,
            Some("Rotate it (immuta_blind_index_rotate), or choose another name."),
        );
    }
    if term_len < blind_index::WARN_BELOW_TERM_LEN {
        crate::errors::warn(
            PgSqlErrorCode::ERRCODE_WARNING,
            format!("immuta blind index terms of {term_len} bytes collide among many values"),
            Some("Among 10^9 distinct values, two share a term with probability about 6e-12 at 12 bytes, 3e-2 at 8 bytes, and certainly at 4 bytes.".into()),
            Some("A collision makes a lookup return an extra row (and a UNIQUE index refuse a distinct value); check the value after the lookup."),
        );
    }
    create_version(&target, name, 1, term_len, "index key created").get()
}

/// `immuta_blind_index_rotate(name, keyring)`: a new version of index `name`, which makes the
/// terms from now on; the older versions still match until they are retired. Returns the version.
pub fn rotate(name: &str, keyring: &str) -> i32 {
    require_index_name(name);
    keys::lock_for_key_change("rotate");
    let target = Target::of(keyring);
    let rows = catalog::index_key_rows(&target.name, name);
    let Some(newest) = rows.first() else { unknown_index(&target.name, name) };
    if newest.version == u16::MAX {
        raise(
            PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            format!("immuta blind index \"{name}\" has no version left"),
            Some(format!("An index has at most {} versions.", blind_index::MAX_VERSION)),
            Some("Create an index of another name and fill a new term column."),
        );
    }
    let enabled = rows.iter().filter(|r| r.key.state == KeyState::Enabled).count();
    if enabled >= MAX_ENABLED_VERSIONS {
        raise(
            PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            format!("immuta blind index \"{name}\" has {enabled} enabled versions"),
            Some(format!("Every enabled version is loaded by each lookup; an index keeps at most {MAX_ENABLED_VERSIONS}.")),
            Some("Recompute the terms (CALL immuta_blind_index_column) and retire the older versions first."),
        );
    }
    let version = newest.version + 1;
    create_version(&target, name, version, newest.term_len, "index key rotated");
    i32::from(version)
}

/// `immuta_blind_index_retire(name, keyring, reason, force)`: destroys every version of index
/// `name` older than the newest. Refused while a registered term column still holds terms of
/// them (the count waits for writers in progress and holds them off until this transaction
/// ends), unless forced. Returns how many versions were destroyed.
pub fn retire(name: &str, keyring: &str, reason: &str, force: bool) -> i32 {
    require_index_name(name);
    keys::lock_for_key_change("retire");
    backend::require_keyring_name(keyring);
    let rows = catalog::index_key_rows(keyring, name);
    let Some(newest) = rows.first() else { unknown_index(keyring, name) };
    let older: Vec<&IndexKeyRow> = rows.iter().skip(1).filter(|r| r.key.state == KeyState::Enabled).collect();
    if older.is_empty() {
        return 0;
    }
    // The count must see what committed up to its table lock: a snapshot taken earlier (REPEATABLE
    // READ, SERIALIZABLE) would miss the terms written meanwhile.
    // SAFETY: reads the isolation level of the transaction in progress.
    let snapshot_per_transaction =
        unsafe { pgrx::pg_sys::XactIsoLevel } >= pgrx::pg_sys::XACT_REPEATABLE_READ as i32;
    if snapshot_per_transaction && !force {
        raise(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            "immuta_blind_index_retire must run in a READ COMMITTED transaction",
            Some(
                "Its count of old terms must see every write committed before it locks the term columns."
                    .into(),
            ),
            Some("Run it in its own transaction at the default isolation level."),
        );
    }
    let stale =
        if force { Vec::new() } else { catalog::blind_index_references(name, keyring, newest.version) };
    if !stale.is_empty() && !force {
        let detail = stale
            .iter()
            .map(|(table, column, n)| format!("{table}.{column}: {n} terms"))
            .collect::<Vec<_>>()
            .join(", ");
        raise(
            PgSqlErrorCode::ERRCODE_DEPENDENT_OBJECTS_STILL_EXIST,
            format!("cannot retire the older versions of immuta blind index \"{name}\""),
            Some(format!("Registered term columns still hold terms of them: {detail}.")),
            Some("Recompute them first (CALL immuta_blind_index_column(...)), or pass force => true to make those rows unfindable."),
        );
    }
    for row in &older {
        catalog::destroy_index_key(row.key.id);
        audit_destroyed(row, reason, force);
    }
    invalidate(backend::oids());
    older.len() as i32
}

fn audit_destroyed(row: &IndexKeyRow, reason: &str, forced: bool) {
    let mut detail = json!({ "reason": reason, "index": row.name, "version": row.version });
    if forced {
        detail["forced"] = json!(true);
    }
    catalog::insert_audit(AuditEvent {
        event: "index key destroyed",
        key_id: Some(row.key.id),
        reason: "manual",
        detail,
        keyring: Some(&row.key.keyring),
    });
    key_states::forget_at_commit(row.key.id);
}

/// Destroys every index key of keyring `keyring` (crypto-shredding it): called with the key
/// creation lock held. Returns how many.
pub fn destroy_keyring(keyring: &str, reason: &str) -> i32 {
    let rows: Vec<IndexKeyRow> = catalog::all_index_key_rows(Some(keyring))
        .into_iter()
        .filter(|r| r.key.state != KeyState::Destroyed)
        .collect();
    for row in &rows {
        catalog::destroy_index_key(row.key.id);
        audit_destroyed(row, reason, false);
    }
    if !rows.is_empty() {
        invalidate(backend::oids());
    }
    rows.len() as i32
}

/// `immuta_rewrap()`, for index keys: wraps every index key that is not destroyed again with
/// the provider its keyring's keys are wrapped with now, audited one by one. Returns how many.
pub fn rewrap() -> i32 {
    keys::lock_for_key_change("rewrap");
    let effective = backend::effective();
    let rows: Vec<IndexKeyRow> = catalog::all_index_key_rows(None)
        .into_iter()
        .filter(|r| r.key.state != KeyState::Destroyed)
        .collect();
    for row in &rows {
        let key = providers::unwrap(&row.key, &effective);
        let target = Target::of_any(&row.key.keyring);
        let (provider, server_identity) =
            providers::for_new_keys_of(&effective, &target.settings, target.by_superuser);
        let wrapped = provider.wrap(row.key.id, &key).or_raise();
        catalog::update_index_wrapping(row.key.id, &wrapped.by, &wrapped.key, server_identity);
        catalog::insert_audit(AuditEvent {
            event: "key rewrapped",
            key_id: Some(row.key.id),
            reason: "manual",
            detail: json!({
                "index": row.name,
                "version": row.version,
                "from": { "provider": row.key.wrapping.provider().as_str(), "wrapping_key": row.key.wrapping.key_column() },
                "to": { "provider": wrapped.by.provider().as_str(), "wrapping_key": wrapped.by.key_column() },
            }),
            keyring: Some(&row.key.keyring),
        });
    }
    if !rows.is_empty() {
        let oids = backend::oids();
        backend::keys_written_in_this_transaction(oids);
        invalidate(oids);
    }
    rows.len() as i32
}
