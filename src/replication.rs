//! Logical replication of immuta's keys (docs/DISTRIBUTED.md): a database that subscribes to a
//! publication of immuta's key tables receives every key, keyring, index key, state change and
//! audit entry as the publisher commits them, and creates none of its own.
//!
//! - **One writer of keys.** A database whose subscriptions include one of immuta's key tables is
//!   a *key subscriber*: everything that would write a key, a keyring or an audit entry refuses
//!   there as on a standby (`keys::key_write_blocker`), so
//!   it never takes a key id the publisher could also take. Once the subscription is dropped (a
//!   switchover), it is a writer again and its ids continue above every key it received
//!   (`catalog::next_key_id`).
//! - **Replicated rows reach the caches.** The apply worker writes rows with
//!   `session_replication_role = replica`; PostgreSQL sends no cache invalidation for rows of a
//!   user table, so immuta's trigger `replicated_change` (ENABLE REPLICA: it fires only there)
//!   queues the invalidations immuta's own writes queue, and the shared cache drops at commit the
//!   keys that arrive disabled or destroyed. Every backend then reloads its ring at its next call
//!   and replays the replicated audit log, as after a change made on the same server.
//! - **Only a superuser's replication, and no trust in the publisher's wrapping.** The same
//!   trigger acts only in a logical replication worker (`xact::is_logical_apply`); there it refuses a row
//!   applied by a role that is not a superuser (from PostgreSQL 16 a subscription may belong to a
//!   role with `pg_create_subscription` and run as its owner). A replicated key or keyring may
//!   not reach its KMS key with this server's own AWS identity (`server_identity`,
//!   `by_superuser`) unless the subscriber's superuser vouched for that row and its wrapping is
//!   unchanged: the publisher's word is no more than a dump's (restore.rs). Rows of the tables
//!   that belong to one server (configuration, usage counts, jobs, registered columns) are
//!   dropped if a publication carries them (`FOR ALL TABLES`): a publisher's configuration, and
//!   its credentials, never become the subscriber's. Any other session, `replica` mode or not,
//!   meets the restore guard (enabled ALWAYS).

use std::cell::Cell;

use pgrx::datum::TryFromDatumError;
use pgrx::prelude::*;
use pgrx::{pg_sys, PgSqlErrorCode, WhoAllocated};

use crate::catalog;
use crate::errors::raise;
use crate::{backend, key_states};

thread_local! {
    /// The tables (bits: keys, keyrings, index keys) whose invalidation this transaction (`lxid`)
    /// of the apply worker has queued: one message per table and transaction, however many rows.
    static QUEUED: Cell<(u32, u8)> = const { Cell::new((0, 0)) };
}

/// Queues the invalidation of `bit`'s table once per transaction.
fn invalidate_once(bit: u8, oids: catalog::TableOids) {
    let lxid = crate::compat::local_xid();
    let (at, queued) = QUEUED.get();
    let queued = if at == lxid { queued } else { 0 };
    if queued & bit != 0 {
        return;
    }
    QUEUED.set((lxid, queued | bit));
    match bit {
        KEYS => backend::invalidate_keys(oids),
        KEYRINGS => backend::invalidate_keyrings(oids),
        _ => backend::invalidate_index_keys(oids),
    }
}

const KEYS: u8 = 1;
const KEYRINGS: u8 = 2;
const INDEX_KEYS: u8 = 4;

/// Who may reach a replicated key's or keyring's KMS key with this server's own AWS identity:
/// nobody, unless the subscriber's own row already had that trust and the wrapping is unchanged
/// (a state change of a key the subscriber's superuser vouched for keeps it). As for a restore,
/// the publisher's word is not enough: `flag` is `server_identity` or `by_superuser`.
fn untrusted_wrapping<'a>(
    row: &mut PgHeapTuple<'a, pgrx::AllocatedByRust>,
    old: Option<&PgHeapTuple<'a, pgrx::AllocatedByPostgres>>,
    flag: &str,
    wrapping: &[&str],
) -> Result<(), TryFromDatumError> {
    let keep = match old {
        Some(old) => {
            let mut same = old.get_by_name::<bool>(flag)?.unwrap_or(false);
            for column in wrapping {
                same &= old.get_by_name::<String>(column)? == row.get_by_name::<String>(column)?;
            }
            same
        }
        None => false,
    };
    row.set_by_name(flag, keep)?;
    Ok(())
}

/// `BEFORE INSERT OR UPDATE OR DELETE FOR EACH ROW` on every table of immuta's, enabled for
/// replication only (`ENABLE REPLICA TRIGGER`): see the module documentation. Outside a
/// logical replication worker it does nothing (should it be enabled for every write, by
/// `ALTER TABLE ... ENABLE TRIGGER ALL` after a restore with `--disable-triggers`).
#[pg_trigger(sql = "CREATE FUNCTION immuta.replicated_change() RETURNS trigger \
                    LANGUAGE c AS 'MODULE_PATHNAME', 'replicated_change_wrapper';")]
fn replicated_change<'a>(
    trigger: &'a pgrx::PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, impl WhoAllocated>>, TryFromDatumError> {
    let mut row = match (trigger.new(), trigger.old()) {
        (Some(new), _) => new.into_owned(),
        (None, Some(old)) => old.into_owned(),
        (None, None) => return Ok(None),
    };
    if catalog::immuta_is_writing() || !crate::xact::is_logical_apply() {
        return Ok(Some(row));
    }
    // SAFETY: reads whether the current user is a superuser.
    if !unsafe { pg_sys::superuser() } {
        raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            "only a superuser's subscription may write immuta's tables",
            Some("immuta's keys arrive by logical replication only through a subscription that applies its changes as a superuser.".into()),
            Some("A superuser creates the subscription to the publisher's immuta tables (docs/DISTRIBUTED.md)."),
        );
    }
    let oids = catalog::table_oids();
    let relid = trigger.relid().unwrap_or_else(|_| {
        raise(
            PgSqlErrorCode::ERRCODE_TRIGGERED_ACTION_EXCEPTION,
            "immuta.replicated_change() must be a row trigger of one of immuta's tables",
            None,
            None,
        )
    });
    let deleting = trigger.new().is_none();
    let old = trigger.old();
    if relid == oids.keyrings {
        if !deleting {
            untrusted_wrapping(&mut row, old.as_ref(), "by_superuser", &["kms_key", "kms_region"])?;
        }
        invalidate_once(KEYRINGS, oids);
    } else if relid == oids.data_keys || relid == oids.index_keys {
        if !deleting {
            untrusted_wrapping(
                &mut row,
                old.as_ref(),
                "server_identity",
                &["provider", "wrapping_key", "wrapping_region"],
            )?;
        }
        invalidate_once(KEYS, oids);
        if relid == oids.index_keys {
            invalidate_once(INDEX_KEYS, oids);
        }
        // A key that arrives disabled or destroyed (or goes): its shared copies go at commit.
        let state: Option<String> = if deleting { None } else { row.get_by_name("state")? };
        if state.as_deref() != Some("enabled") {
            if let Some(id) = row.get_by_name::<i64>("id")?.and_then(immuta_core::key::KeyId::new) {
                key_states::forget_at_commit(id);
            }
        }
    } else if relid == catalog::audit_log_oid() {
        // Every backend replays the audit log at its next refresh, which the key tables'
        // invalidations bring; one of its own makes sure an entry alone is seen too.
        invalidate_once(KEYS, oids);
    } else {
        // A table of this server's own (configuration, usage counts, jobs, registered columns):
        // the publisher's row is not applied.
        return Ok(None);
    }
    Ok(Some(row))
}
