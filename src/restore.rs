//! The restore path: rows added to immuta's tables by a role, not by immuta's functions.
//!
//! `pg_restore` and `psql < dump` COPY the rows of `immuta.data_keys`, `immuta.key_usage`,
//! `immuta.audit_log` and `immuta.config` into a freshly created extension. On a managed platform
//! the restoring role is the database owner, not a superuser, so the role that installed immuta
//! may INSERT into those tables (sql/bootstrap.sql), and the trigger here is what confines that to
//! a restore:
//!
//! - **When**: only into a fresh installation. The window closes for good at immuta's first own
//!   write in the database ([`catalog::in_use`], a mark no snapshot can hide, read again for every
//!   row), and a table that already holds rows of other transactions takes none. Both are read
//!   with the key creation lock held, which every writer of keys and audit entries holds, and with
//!   the latest snapshot, so an old snapshot (a REPEATABLE READ transaction begun before immuta
//!   was used) cannot make a table in use look empty. The table check is remembered for the rest
//!   of the transaction, but forgotten when a savepoint rolls back (the lock goes with it).
//! - **What**: each row is held to what immuta itself would have written
//!   (`immuta_core::restore`): bounded ids and counts, a finite creation time not in the future,
//!   only an older key as the one a key replaced, a KMS key and region a configuration could have
//!   named, a wrapped key of its provider's length.
//! - **With what trust**: none. A restored key row gets `server_identity = false`, whoever
//!   restores and whatever the dump says (a dump may come from a tenant), so immuta never reaches
//!   its KMS key with the server's own AWS identity until a superuser vouches for it; a restored
//!   configuration gets `by_superuser = false`, and one added by a role that is not a superuser is
//!   left out, with a WARNING.
//!
//! A superuser may add rows at any time (it could do anything else too); its rows are held to
//! the same rules. Every direct insert into the keys or the configuration tells the other
//! sessions, at commit, as immuta's own changes do.

use std::cell::RefCell;

use immuta_core::key::WrappedKey;
use immuta_core::key_state::KeyState;
use immuta_core::restore;
use pgrx::datum::TryFromDatumError;
use pgrx::prelude::*;
use pgrx::{pg_sys, PgSqlErrorCode, WhoAllocated};

use crate::catalog;
use crate::errors::{self, raise};

/// Checks, and for keys and the configuration marks untrusted, a row added to one of immuta's
/// tables other than by immuta.
#[pg_trigger(sql = "CREATE FUNCTION immuta.guard_direct_insert() RETURNS trigger \
                    LANGUAGE c AS 'MODULE_PATHNAME', 'guard_direct_insert_wrapper';")]
fn guard_direct_insert<'a>(
    trigger: &'a pgrx::PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, impl WhoAllocated>>, TryFromDatumError> {
    let mut new = trigger.new().expect("a BEFORE INSERT FOR EACH ROW trigger has a new row").into_owned();
    // A subscription's rows are replication.rs's to check (this trigger fires in every
    // session_replication_role, so that a session in `replica` mode is not a way around it).
    if catalog::immuta_is_writing() || crate::xact::is_logical_apply() {
        return Ok(Some(new));
    }
    let table = trigger.table_name().unwrap_or_default();
    // SAFETY: reads whether the current user is a superuser.
    let superuser = unsafe { pg_sys::superuser() };
    let oids = catalog::table_oids();
    if table == "config" {
        if !superuser {
            errors::warn(
                PgSqlErrorCode::ERRCODE_WARNING,
                "immuta configuration not restored",
                Some(
                    "Only a superuser may store a configuration other than through immuta_configure()."
                        .into(),
                ),
                Some("Run SELECT immuta_configure(...) with the configuration."),
            );
            return Ok(None);
        }
        new.set_by_name("by_superuser", false)?;
        crate::backend::invalidate_config(oids);
        return Ok(Some(new));
    }
    if !superuser {
        require_fresh_installation(&table, oids);
    }
    match table.as_str() {
        "data_keys" | "index_keys" => {
            let id = new.get_by_name::<i64>("id")?.unwrap_or_default();
            if !restore::id_ok(id) {
                refuse(&table, "Its id is out of range.".into());
            }
            // One id names one key: a data key and an index key never share one.
            if catalog::id_in_other_table(&table, id) {
                refuse(&table, "Its id is the id of a key of the other key table.".into());
            }
            let keyring = new.get_by_name::<&str>("keyring")?.unwrap_or_default();
            if !immuta_core::keyrings::name_ok(keyring) {
                refuse(&table, "Its keyring name is not one a keyring may have.".into());
            }
            if table == "index_keys" {
                let name_ok = new.get_by_name::<&str>("name")?.is_some_and(immuta_core::blind_index::name_ok);
                let version_ok = new
                    .get_by_name::<i32>("version")?
                    .is_some_and(|v| (1..=immuta_core::blind_index::MAX_VERSION).contains(&v));
                let length_ok = new
                    .get_by_name::<i16>("term_length")?
                    .is_some_and(|l| immuta_core::blind_index::term_len_ok(i32::from(l)));
                if !(name_ok && version_ok && length_ok) {
                    refuse(
                        &table,
                        "Its index name, version or term length is not one immuta would have stored.".into(),
                    );
                }
            }
            let state = new.get_by_name::<&str>("state")?.and_then(KeyState::parse);
            let provider = new.get_by_name::<&str>("provider")?.unwrap_or_default();
            let wrapping_key = new.get_by_name::<&str>("wrapping_key")?.unwrap_or_default();
            let region = new.get_by_name::<&str>("wrapping_region")?;
            let parsed = match state {
                None => Err("has an unknown state"),
                // A tombstone: nothing to unwrap (the table's check keeps its wrapped key NULL).
                Some(KeyState::Destroyed) => {
                    immuta_core::key::WrappingKeyRef::from_columns(provider, wrapping_key, region)
                        .map(|_| ())
                        .ok_or("names an unknown provider or wrapping key")
                }
                Some(_) => {
                    // Borrowed from the row; copied no further than one byte past the longest
                    // key, which is enough to refuse a longer one.
                    let wrapped = new.get_by_name::<&[u8]>("wrapped_key")?.unwrap_or_default();
                    let wrapped = WrappedKey::new(
                        wrapped[..wrapped.len().min(restore::MAX_KMS_WRAPPED_LEN + 1)].to_vec(),
                    );
                    restore::key_row(id, provider, wrapping_key, region, &wrapped).map(|_| ())
                }
            };
            if let Err(why) = parsed {
                refuse(&table, format!("The row {why}."));
            }
            if table == "data_keys"
                && !restore::rolled_over_from_ok(id, new.get_by_name::<i64>("rolled_over_from")?)
            {
                refuse(
                    &table,
                    "The row names a key that is not older than itself as the one it replaced.".into(),
                );
            }
            let created_at = new.get_by_name::<TimestampWithTimeZone>("created_at")?;
            let created_at =
                crate::xact::from_pg_timestamp(created_at.map_or(i64::MAX, pg_sys::TimestampTz::from));
            if !restore::created_at_ok(created_at, crate::xact::from_pg_timestamp(now())) {
                refuse(&table, "Its creation time is not a time from 1970 up to now.".into());
            }
            new.set_by_name("server_identity", false)?;
            // Sessions that hold keys learn of it as of a rotation: when this transaction commits.
            crate::backend::keys_written_in_this_transaction(oids);
            Ok(Some(new))
        }
        "keyrings" => {
            let name = new.get_by_name::<&str>("name")?.unwrap_or_default();
            let kms_key = new.get_by_name::<&str>("kms_key")?;
            let kms_region = new.get_by_name::<&str>("kms_region")?;
            let settings_ok = immuta_core::keyrings::Settings::parse(None, kms_key, kms_region, None).is_ok();
            if !immuta_core::keyrings::name_ok(name) || !settings_ok {
                refuse(&table, "Its name, KMS key or region is not one immuta would have stored.".into());
            }
            // Nobody vouches for a restored keyring's KMS key (as for a restored key row).
            new.set_by_name("by_superuser", false)?;
            crate::backend::invalidate_keyrings(oids);
            // No event is audited for it: if this transaction aborts, this backend forgets what it
            // loaded meanwhile (as after a rotation that rolled back).
            crate::backend::keys_written_in_this_transaction(oids);
            Ok(Some(new))
        }
        "key_usage" => {
            let key_ok = new.get_by_name::<i64>("key_id")?.is_some_and(restore::id_ok);
            let count_ok = new.get_by_name::<i64>("encryptions")?.is_some_and(restore::encryptions_ok);
            if !(key_ok && count_ok) {
                refuse(
                    &table,
                    "Its key id or its count of encryptions is out of range (at most 2^32 a row).".into(),
                );
            }
            Ok(Some(new))
        }
        _ => {
            if !new.get_by_name::<i64>("id")?.is_some_and(restore::id_ok) {
                refuse(&table, "Its id is out of range.".into());
            }
            if table == "audit_log" {
                // A backend's watermark of the audit log may pass this row: if this transaction
                // aborts, it must not keep it.
                crate::backend::keys_written_in_this_transaction(oids);
            }
            Ok(Some(new))
        }
    }
}

thread_local! {
    /// The tables this transaction was found allowed to restore into.
    static CHECKED: RefCell<Vec<(u32, String)>> = const { RefCell::new(Vec::new()) };
}

/// Raises unless this is a fresh installation that `table` may be restored into (see the module
/// documentation). Whether the table had rows of other transactions is remembered for the rest of
/// the transaction: the key creation lock, taken here and held to its end, keeps immuta from
/// adding keys or audit entries meanwhile, and immuta's usage rows come only after the in-use
/// mark, which is read for every row. A rolled-back savepoint releases the lock, and
/// [`forget_checks`] forgets what was found under it.
fn require_fresh_installation(table: &str, oids: catalog::TableOids) {
    crate::keys::lock_key_creation_of(oids);
    let lxid = crate::compat::local_xid();
    let known = CHECKED.with_borrow(|c| c.iter().any(|(x, t)| *x == lxid && t == table));
    let refusal = if catalog::in_use() {
        Some("immuta has been used in this database")
    } else if crate::keys::subscriber_blocker().is_some() {
        Some("this database receives immuta's keys from a publisher")
    } else if !known && catalog::has_rows_of_others(table) {
        Some("the table already has rows")
    } else {
        None
    };
    if let Some(why) = refusal {
        raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!(
                "rows may be added to immuta.{table} directly only by a restore into a fresh installation"
            ),
            Some(format!(
                "Direct inserts are refused because {why}: immuta adds rows itself, through its functions."
            )),
            Some(
                "Restore into a new database where CREATE EXTENSION immuta has just run, or ask a superuser.",
            ),
        );
    }
    if !known {
        CHECKED.with_borrow_mut(|c| {
            c.retain(|(x, _)| *x == lxid);
            c.push((lxid, table.to_owned()));
        });
    }
}

/// A subtransaction rolled back: the key creation lock it may have taken is gone, and so is what
/// was found under it.
pub fn forget_checks() {
    CHECKED.with_borrow_mut(Vec::clear);
}

fn refuse(table: &str, detail: String) -> ! {
    raise(
        PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
        format!("this row cannot be added to immuta.{table}"),
        Some(detail),
        Some("Restore the table from a dump of immuta's own, unchanged."),
    )
}

fn now() -> pg_sys::TimestampTz {
    // SAFETY: reads the current time.
    unsafe { pg_sys::GetCurrentTimestamp() }
}
