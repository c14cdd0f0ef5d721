//! The restore path: rows added to immuta's tables by a role, not by immuta's functions.
//!
//! `pg_restore` and `psql < dump` COPY the rows of `immuta.data_keys`, `immuta.key_usage`,
//! `immuta.audit_log` and `immuta.config` into a freshly created extension. On a managed platform
//! the restoring role is the database owner, not a superuser, so the role that installed immuta
//! may INSERT into those tables (sql/bootstrap.sql), and the trigger here is what confines that to
//! a restore:
//!
//! - **When**: only into a fresh installation. The window closes for good at immuta's first own
//!   write in the database ([`catalog::in_use`], a mark no snapshot can hide), and a table that
//!   already holds rows of other transactions takes none. Both are read with the key creation
//!   lock held, which every writer of keys and audit entries holds, and with the latest snapshot,
//!   so an old snapshot (a REPEATABLE READ transaction begun before immuta was used) cannot make
//!   a table in use look empty.
//! - **What**: each row is held to what immuta itself would have written
//!   (`immuta_core::restore`): bounded ids and counts, no creation time in the future, only an
//!   older key as the one a key replaced, a KMS key and region a configuration could have named,
//!   a wrapped key of its provider's length.
//! - **With what trust**: a key row added by the owner is marked `origin = 'owner'`, and immuta
//!   never reaches its KMS key with the server's own AWS identity (`server_identity.rs`). A
//!   configuration added by a role that is not a superuser is left out, with a WARNING.
//!
//! A superuser may add rows at any time (it could do anything else too); its rows are held to
//! the same rules, and keep `origin = 'owner'` if the dump says so.

use immuta_core::key::WrappedKey;
use immuta_core::restore;
use immuta_core::server_identity::KeyOrigin;
use pgrx::datum::TryFromDatumError;
use pgrx::prelude::*;
use pgrx::{pg_sys, PgSqlErrorCode, WhoAllocated};

use crate::catalog::{self, KeyRow};
use crate::errors::{self, raise};

/// Checks, and for a key row marks, a row added to one of immuta's tables.
#[pg_trigger(sql = "CREATE FUNCTION immuta.guard_direct_insert() RETURNS trigger \
                    LANGUAGE c AS 'MODULE_PATHNAME', 'guard_direct_insert_wrapper';")]
fn guard_direct_insert<'a>(
    trigger: &'a pgrx::PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, impl WhoAllocated>>, TryFromDatumError> {
    let new = trigger.new().expect("a BEFORE INSERT FOR EACH ROW trigger has a new row").into_owned();
    if catalog::immuta_is_writing() {
        return Ok(Some(new));
    }
    let table = trigger.table_name().unwrap_or_default();
    // SAFETY: reads whether the current user is a superuser.
    let superuser = unsafe { pg_sys::superuser() };
    catalog::table_oids();
    if table == "config" {
        if superuser {
            return Ok(Some(new));
        }
        errors::warn(
            PgSqlErrorCode::ERRCODE_WARNING,
            "immuta configuration not restored",
            Some("Only a superuser may store a configuration other than through immuta_configure().".into()),
            Some("Run SELECT immuta_configure(...) with the configuration."),
        );
        return Ok(None);
    }
    if !superuser {
        require_fresh_installation(&table);
    }
    match table.as_str() {
        "data_keys" => {
            let id = new.get_by_name::<i64>("id")?.unwrap_or_default();
            let wrapped = new.get_by_name::<&[u8]>("wrapped_key")?.map(<[u8]>::to_vec);
            let parsed = restore::key_row(
                id,
                &new.get_by_name::<String>("provider")?.unwrap_or_default(),
                &new.get_by_name::<String>("wrapping_key")?.unwrap_or_default(),
                new.get_by_name::<String>("wrapping_region")?.as_deref(),
                &WrappedKey::new(wrapped.unwrap_or_default()),
            );
            if let Err(why) = parsed {
                refuse(&table, format!("The row {why}."));
            }
            if !restore::rolled_over_from_ok(id, new.get_by_name::<i64>("rolled_over_from")?) {
                refuse(
                    &table,
                    "The row names a key that is not older than itself as the one it replaced.".into(),
                );
            }
            let created_at = new.get_by_name::<TimestampWithTimeZone>("created_at")?;
            let created_at =
                catalog::from_pg_timestamp(created_at.map_or(i64::MAX, pg_sys::TimestampTz::from));
            if !restore::created_at_ok(created_at, catalog::from_pg_timestamp(now())) {
                refuse(&table, "The row was created in the future: it would never roll over.".into());
            }
            let dumped = new.get_by_name::<String>("origin")?.as_deref().and_then(KeyOrigin::parse);
            let origin = if superuser && dumped != Some(KeyOrigin::Owner) {
                KeyOrigin::Superuser
            } else {
                KeyOrigin::Owner
            };
            let mut new = new;
            new.set_by_name("origin", origin.as_str())?;
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
            Ok(Some(new))
        }
    }
}

/// Raises unless this is a fresh installation that `table` may be restored into (see the module
/// documentation). The answer holds for the rest of the transaction: the key creation lock,
/// taken here, keeps immuta from creating keys or audit entries meanwhile.
fn require_fresh_installation(table: &str) {
    crate::keys::lock_key_creation();
    let lxid = crate::backend::local_xid();
    let known = CHECKED.with_borrow(|c| c.iter().any(|(x, t)| *x == lxid && t == table));
    if known {
        return;
    }
    let refusal = if catalog::in_use() {
        Some("immuta has been used in this database")
    } else if catalog::has_rows_of_others(table) {
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
    CHECKED.with_borrow_mut(|c| {
        c.retain(|(x, _)| *x == lxid);
        c.push((lxid, table.to_owned()));
    });
}

thread_local! {
    /// The tables this transaction was found allowed to restore into.
    static CHECKED: std::cell::RefCell<Vec<(u32, String)>> = const { std::cell::RefCell::new(Vec::new()) };
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

/// A row of `immuta.data_keys` as read, held to the rules of a restored one; the error completes
/// "The row of immuta.data_keys ...".
pub fn key_row(
    id: i64,
    provider: &str,
    key: &str,
    region: Option<&str>,
    wrapped: Vec<u8>,
    origin: &str,
) -> Result<KeyRow, &'static str> {
    let wrapped = WrappedKey::new(wrapped);
    let (id, wrapping) = restore::key_row(id, provider, key, region, &wrapped)?;
    let origin = KeyOrigin::parse(origin).ok_or("has an origin immuta does not write")?;
    Ok(KeyRow { id, wrapping, wrapped, origin })
}
