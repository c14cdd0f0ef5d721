//! Disabling, enabling and destroying data keys, and destroying whole keyrings
//! (crypto-shredding). The rules are `immuta_core::key_state`; this file reads and writes the rows,
//! audits each change with who made it and why, and makes it reach every cached copy.
//!
//! A change takes the key creation lock, so whether a key is its keyring's active one cannot
//! change under it. It reaches the other sessions as a rotation does: a relcache invalidation at
//! commit, after which each backend reloads its ring at its next immuta call and drops the keys
//! that are no longer enabled (standbys replay the invalidation with the commit). The shared
//! cache's copies of a disabled or destroyed key are zeroized at commit by the session that made
//! the change (and again by any backend that finds it held one), and an unwrap in flight is not
//! published (the cache's epoch moves).
//!
//! Destroying erases the wrapped key from its row in the same statement; the row stays, a
//! tombstone with its id, keyring, dates and who destroyed it. The old row version (until VACUUM),
//! the WAL and backups taken before still hold the wrapped key: README, "Crypto-shredding".

use std::cell::RefCell;

use immuta_core::key::KeyId;
use immuta_core::key_state::{self, Change, KeyState, Refusal};
use immuta_core::keyrings;
use pgrx::PgSqlErrorCode;
use serde_json::json;

use crate::catalog::{self, AuditEvent, KeyRow};
use crate::errors::raise;
use crate::{backend, keys, shared_cache};

thread_local! {
    /// Keys this transaction disabled or destroyed: their shared copies go when it commits.
    static FORGET_AT_COMMIT: RefCell<Vec<KeyId>> = const { RefCell::new(Vec::new()) };
}

/// At the end of the transaction: if it committed, the shared cache drops the keys it disabled
/// or destroyed (a key unwrapped by another backend before the commit would otherwise stay).
pub fn at_transaction_end(committed: bool) {
    let ids = FORGET_AT_COMMIT.take();
    if committed {
        shared_cache::forget(&ids, true);
    }
}

/// Drops the shared copies of key `id` (of either table) when this transaction commits.
pub fn forget_at_commit(id: KeyId) {
    FORGET_AT_COMMIT.with_borrow_mut(|ids| ids.push(id));
}

/// The reason argument: required, not blank, bounded. Never quoted in a message.
pub fn reason(reason: Option<&str>) -> &str {
    let Some(reason) = reason else {
        raise(
            PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
            "immuta needs a reason for a key state change",
            Some("The reason is recorded in immuta.audit_log with the change.".into()),
            Some("Pass a short reason, such as a ticket reference."),
        )
    };
    if !key_state::reason_ok(reason) {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            "immuta reason is blank or too long",
            Some(format!("A reason has from 1 to {} bytes, not only spaces.", key_state::MAX_REASON_BYTES)),
            Some("Pass a short reason, such as a ticket reference."),
        );
    }
    reason
}

fn key_row(id: i64) -> KeyRow {
    KeyId::new(id).and_then(catalog::key_row).unwrap_or_else(|| {
        raise(
            PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            format!("immuta data key {id} does not exist"),
            None,
            Some("immuta.keys lists the keys of this database."),
        )
    })
}

/// Whether key `id` is the active key of `keyring` (its newest, enabled).
fn is_active(id: KeyId, keyring: &str) -> bool {
    catalog::current_key(keyring).is_some_and(|(current, _)| current == id)
}

/// `immuta_key_disable/enable/destroy(key_id, reason)`: whether the key changed (`false` when it
/// was already in that state).
pub fn change(key_id: i64, change: Change, reason: &str) -> bool {
    transition(key_id, change, reason, false)
}

/// `immuta_key_destroy(key_id, reason, force)`: [`change`] to destroyed; unless `force`, refused
/// while a registered column still holds values under the key.
pub fn destroy(key_id: i64, reason: &str, force: bool) -> bool {
    transition(key_id, Change::Destroy, reason, force)
}

fn transition(key_id: i64, change: Change, reason: &str, forced: bool) -> bool {
    keys::lock_for_key_change(change.verb());
    let row = key_row(key_id);
    let active = row.state == KeyState::Enabled && is_active(row.id, &row.keyring);
    match key_state::check(change, row.state, active) {
        Ok(None) => false,
        Ok(Some(to)) => {
            if change == Change::Destroy && !forced {
                refuse_if_referenced(&row);
            }
            apply(&row, change, row.state, to, reason, forced);
            true
        }
        Err(refusal) => refuse(&row, change, refusal),
    }
}

/// Refuses (2BP01, as a DROP without CASCADE) to destroy key `row` while registered columns hold
/// values under it, naming them and their counts. Counted as the caller: a column it may not
/// read, or whose rows row-level security hides from it, is an error of its own.
fn refuse_if_referenced(row: &KeyRow) {
    let references = catalog::key_references(row.id);
    if references.is_empty() {
        return;
    }
    let id = row.id;
    let list: Vec<String> = references
        .iter()
        .map(|(table, column, count)| {
            format!("{table}.{column}: {count} value{}", if *count == 1 { "" } else { "s" })
        })
        .collect();
    raise(
        PgSqlErrorCode::ERRCODE_DEPENDENT_OBJECTS_STILL_EXIST,
        format!("cannot destroy immuta data key {id}: registered columns still hold values under it"),
        Some(format!("{}.", list.join("; "))),
        Some(
            "Re-encrypt them first (CALL immuta_reencrypt_column(table, column)), or destroy with force => true, \
             which leaves those values unreadable for good.",
        ),
    )
}

fn refuse(row: &KeyRow, change: Change, refusal: Refusal) -> ! {
    let (id, keyring, verb) = (row.id, &row.keyring, change.verb());
    let (detail, hint) = match refusal {
        Refusal::Active => (
            format!("Key {id} is the active key of keyring \"{keyring}\": it encrypts new values."),
            format!("Rotate the keyring first (SELECT immuta_rotate('{keyring}')), then {verb} the old key."),
        ),
        Refusal::NotDisabled => (
            format!("Key {id} is enabled; a key is destroyed only once it is disabled."),
            format!("Disable it first (SELECT immuta_key_disable({id}, reason)), check that nothing still needs it, then destroy it."),
        ),
        Refusal::Destroyed => (
            format!("Key {id} was destroyed; nothing brings a destroyed key back."),
            "Values under it can never be decrypted.".to_owned(),
        ),
    };
    raise(
        PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        format!("cannot {verb} immuta data key {id}"),
        Some(detail),
        Some(&hint),
    )
}

/// Records the change of key `row` from `from` to `to`, audits it, and tells every session.
fn apply(row: &KeyRow, change: Change, from: KeyState, to: KeyState, reason: &str, forced: bool) {
    catalog::set_key_state(row.id, to);
    catalog::insert_audit(AuditEvent {
        event: change.event(),
        key_id: Some(row.id),
        reason: "manual",
        detail: if forced {
            json!({ "reason": reason, "from": from.as_str(), "to": to.as_str(), "forced": true })
        } else {
            json!({ "reason": reason, "from": from.as_str(), "to": to.as_str() })
        },
        keyring: Some(&row.keyring),
    });
    backend::invalidate_keys(backend::oids());
    if to != KeyState::Enabled {
        FORGET_AT_COMMIT.with_borrow_mut(|ids| ids.push(row.id));
    }
}

/// `immuta_disable_keys_before(keyring, key_id, reason)` (Vault's `min_decryption_version`):
/// disables every enabled key of `keyring` older than its key `key_id`; returns how many.
pub fn disable_before(keyring: &str, key_id: i64, reason: &str) -> i32 {
    keys::lock_for_key_change("disable");
    let keyring = existing_keyring(keyring);
    let row = key_row(key_id);
    if row.keyring != keyring {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("immuta data key {key_id} is not a key of keyring \"{keyring}\""),
            Some(format!("It belongs to keyring \"{}\".", row.keyring)),
            Some("Name a key of the keyring: the oldest one that must still decrypt."),
        );
    }
    let mut disabled = 0;
    for (id, state) in catalog::key_states(&keyring) {
        if id < row.id && state == KeyState::Enabled {
            let older = key_row(id.get());
            apply(&older, Change::Disable, state, KeyState::Disabled, reason, false);
            disabled += 1;
        }
    }
    disabled
}

/// A keyring that exists (`default`, or one with a row); an error otherwise.
fn existing_keyring(name: &str) -> String {
    backend::require_keyring_name(name);
    if name == keyrings::DEFAULT || catalog::keyring(name).is_some() {
        name.to_owned()
    } else {
        backend::unknown_keyring(name)
    }
}

/// `immuta_keyring_destroy(name, reason)`: crypto-shreds keyring `name`: every key of it is
/// destroyed (disabled first, the active one too), and the keyring is marked destroyed, so that
/// nothing encrypts under it again. Returns how many keys were destroyed (0 when it already was).
pub fn destroy_keyring(name: &str, reason: &str) -> i32 {
    if name == keyrings::DEFAULT {
        raise(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            "the keyring \"default\" cannot be destroyed",
            Some("It is the keyring of every value encrypted without keyring =>; it has no row to mark destroyed.".into()),
            Some("Rotate it, then disable and destroy its old keys one by one (immuta_key_disable, immuta_key_destroy)."),
        );
    }
    backend::require_keyring_name(name);
    keys::lock_for_key_change("destroy");
    let Some(keyring) = catalog::keyring(name) else { backend::unknown_keyring(name) };
    if keyring.destroyed {
        return 0;
    }
    let mut destroyed = 0;
    for (id, state) in catalog::key_states(name) {
        if state == KeyState::Destroyed {
            continue;
        }
        let row = key_row(id.get());
        if state == KeyState::Enabled {
            apply(&row, Change::Disable, state, KeyState::Disabled, reason, false);
        }
        apply(&row, Change::Destroy, KeyState::Disabled, KeyState::Destroyed, reason, false);
        destroyed += 1;
    }
    catalog::mark_keyring_destroyed(name);
    catalog::insert_audit(AuditEvent {
        event: "keyring destroyed",
        key_id: None,
        reason: "manual",
        detail: json!({ "reason": reason, "keys_destroyed": destroyed }),
        keyring: Some(name),
    });
    backend::invalidate_keyrings(backend::oids());
    destroyed
}
