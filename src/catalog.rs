//! Reading and writing immuta's tables (sql/bootstrap.sql) through SPI.
//!
//! Only the slow path comes here: loading a key the backend has not seen, noticing a rotation,
//! creating a key, storing the configuration. Encryption and decryption of a row never do.
//! Queries are fixed strings with parameters; nothing is spliced into SQL.
//!
//! Every query on immuta's tables runs through [`as_owner`]: with the privileges of the tables'
//! owner and `search_path = pg_catalog, pg_temp`, as a `SECURITY DEFINER` function with a fixed
//! search_path would, but only around these fixed queries, so the SQL functions need no
//! privilege on the tables (no role gets any) and the hot path pays nothing for it (a
//! `SECURITY DEFINER` function with `SET search_path` costs a GUC save and restore on every
//! call). Objects a caller planted in its own schemas or in `pg_temp` are never looked up.

use immuta_core::key::{KeyId, WrappedKey, WrappingKeyRef};
use immuta_core::rollover::RotationReason;
use immuta_core::time::UnixMicros;
use std::ffi::CStr;

use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::{pg_sys, PgSqlErrorCode};

use crate::errors::raise;

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// A PostgreSQL timestamp (microseconds since 2000-01-01) as the core's instant.
pub fn from_pg_timestamp(ts: pg_sys::TimestampTz) -> UnixMicros {
    UnixMicros(ts.saturating_add(PG_EPOCH_OFFSET_MICROS))
}

/// One row of `immuta.data_keys`.
pub struct KeyRow {
    pub id: KeyId,
    pub wrapping: WrappingKeyRef,
    pub wrapped: WrappedKey,
}

/// The OIDs of the tables whose changes invalidate backend caches.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TableOids {
    pub data_keys: pg_sys::Oid,
    pub config: pg_sys::Oid,
}

/// Looks up the extension's tables; an error when the extension is not installed in this database.
pub fn table_oids() -> TableOids {
    // SAFETY: plain catalog lookups with NUL-terminated names, inside a transaction.
    let (namespace, data_keys, config) = unsafe {
        let namespace = pg_sys::get_namespace_oid(c"immuta".as_ptr(), true);
        let rel = |name: &std::ffi::CStr| {
            if namespace == pg_sys::InvalidOid {
                pg_sys::InvalidOid
            } else {
                pg_sys::get_relname_relid(name.as_ptr(), namespace)
            }
        };
        (namespace, rel(c"data_keys"), rel(c"config"))
    };
    if namespace == pg_sys::InvalidOid || data_keys == pg_sys::InvalidOid || config == pg_sys::InvalidOid {
        raise(
            PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            "immuta is not installed in this database",
            Some("The schema immuta and its tables data_keys and config do not exist.".into()),
            Some("Run CREATE EXTENSION immuta."),
        );
    }
    // SAFETY: a syscache lookup of an existing relation by OID; the tuple is read while pinned
    // and released at once.
    let owner = unsafe {
        let tuple = pg_sys::SearchSysCache1(pg_sys::SysCacheIdentifier::RELOID as i32, pg_sys::Datum::from(data_keys));
        if tuple.is_null() {
            pg_sys::InvalidOid
        } else {
            let owner = (*pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_class>(tuple)).relowner;
            pg_sys::ReleaseSysCache(tuple);
            owner
        }
    };
    OWNER.set(owner);
    TableOids { data_keys, config }
}

/// The value of an SPI call; an SPI-level failure (not an SQL error, which raises by itself) is an
/// internal error.
pub fn spi<T>(result: Result<T, pgrx::spi::SpiError>) -> T {
    result.unwrap_or_else(|e| {
        raise(
            PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
            format!("immuta catalog access failed: {e}"),
            None,
            None,
        )
    })
}

thread_local! {
    /// The owner of immuta's tables (set by [`table_oids`]).
    static OWNER: std::cell::Cell<pg_sys::Oid> = const { std::cell::Cell::new(pg_sys::InvalidOid) };
}

/// Runs `f` as the owner of immuta's tables with `search_path = pg_catalog, pg_temp`, then
/// restores the caller's identity and search_path (an error aborts the (sub)transaction, which
/// restores both too).
fn as_owner<R>(f: impl FnOnce() -> R) -> R {
    let owner = OWNER.get();
    if owner == pg_sys::InvalidOid {
        raise(
            PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
            "immuta accessed its tables before looking them up",
            None,
            None,
        );
    }
    let (mut user, mut context) = (pg_sys::InvalidOid, 0);
    // SAFETY: saves the current user and security context, then switches to the tables' owner
    // with a local user id change (SET ROLE is refused meanwhile) and opens a GUC nest level in
    // which search_path is set with GUC_ACTION_SAVE (allowed in parallel workers, undone by
    // AtEOXact_GUC below or by the abort of the (sub)transaction).
    let nest = unsafe {
        pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
        pg_sys::SetUserIdAndSecContext(owner, context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32);
        let nest = pg_sys::NewGUCNestLevel();
        pg_sys::set_config_option(
            c"search_path".as_ptr(),
            c"pg_catalog, pg_temp".as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_SAVE,
            true,
            0,
            false,
        );
        nest
    };
    let result = f();
    // SAFETY: undoes exactly what was done above, in reverse order.
    unsafe {
        pg_sys::AtEOXact_GUC(true, nest);
        pg_sys::SetUserIdAndSecContext(user, context);
    }
    result
}

/// The calling role and the session's login role, as OIDs, for the columns that record who did
/// something (the queries run as the tables' owner, so `current_user` there is not the caller).
fn caller() -> (pg_sys::Oid, pg_sys::Oid) {
    // SAFETY: reads the current and session user ids.
    unsafe { (pg_sys::GetUserId(), pg_sys::GetSessionUserId()) }
}

/// Runs a statement that writes immuta's tables, as their owner.
fn write(query: &str, args: &[DatumWithOid]) {
    as_owner(|| {
        spi(Spi::connect_mut(|client| {
            client.update(query, None, args)?;
            Ok(())
        }))
    })
}

/// A row of a [`read_latest`] result.
struct Row {
    tuple: pg_sys::HeapTuple,
    desc: pg_sys::TupleDesc,
}

impl Row {
    fn get<T: FromDatum>(&self, column: i32) -> Option<T> {
        let mut is_null = false;
        // SAFETY: `tuple` and `desc` come from SPI_tuptable of the query just run, inside the
        // same SPI connection; `column` is 1-based and within the query's target list; the value
        // is converted to an owned Rust value before SPI_finish frees it.
        unsafe {
            let datum = pg_sys::SPI_getbinval(self.tuple, self.desc, column, &mut is_null);
            T::from_datum(datum, is_null)
        }
    }
}

/// Runs a read-only query on immuta's tables with the latest snapshot, the way PostgreSQL reads
/// its own catalogs: it sees every committed key and configuration, including those committed
/// after this statement or this REPEATABLE READ transaction took its snapshot, so an invalidation
/// is never consumed by a read that cannot yet see its cause. It assigns no transaction id, so it
/// works on standbys. Inside a parallel operation, where no new snapshot may be taken, the
/// statement's snapshot is used.
fn read_latest<R>(query: &CStr, args: &[(pg_sys::Oid, pg_sys::Datum)], each: impl FnMut(&Row) -> R) -> Vec<R> {
    as_owner(|| read_with(query, args, Visibility::Latest, each))
}

/// Which rows a catalog read sees.
#[derive(Clone, Copy)]
enum Visibility {
    /// The latest MVCC snapshot (see [`read_latest`]).
    Latest,
    /// Every row committed when it is read, and this transaction's own (PostgreSQL's
    /// `SnapshotSelf`). Not an MVCC snapshot, so it takes no SERIALIZABLE predicate lock: for
    /// `immuta.key_usage`, an append-only tally that many sessions write, a predicate lock would
    /// make concurrent SERIALIZABLE sessions that reserve fail each other with 40001.
    SelfAndCommitted,
}

fn read_with<R>(
    query: &CStr,
    args: &[(pg_sys::Oid, pg_sys::Datum)],
    visibility: Visibility,
    mut each: impl FnMut(&Row) -> R,
) -> Vec<R> {
    let mut types: Vec<pg_sys::Oid> = args.iter().map(|a| a.0).collect();
    let mut values: Vec<pg_sys::Datum> = args.iter().map(|a| a.1).collect();
    Spi::connect(|_client| {
        // SAFETY: inside an SPI connection (Spi::connect); the query is a fixed, NUL-terminated
        // string with as many parameters as `types`; the snapshot is a fresh MVCC snapshot,
        // PostgreSQL's static SnapshotSelf (SPI copies it; plans from SPI_prepare are never
        // parallel, so it is not serialized), or InvalidSnapshot ("the usual one");
        // SPI_tuptable and SPI_processed describe
        // the result of this very call and are read before the connection closes.
        unsafe {
            let plan = pg_sys::SPI_prepare(query.as_ptr(), types.len() as i32, types.as_mut_ptr());
            if plan.is_null() {
                raise(
                    PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
                    "immuta could not prepare a catalog query",
                    None,
                    None,
                );
            }
            let snapshot = match visibility {
                _ if pg_sys::IsInParallelMode() => std::ptr::null_mut(),
                Visibility::Latest => pg_sys::GetLatestSnapshot(),
                Visibility::SelfAndCommitted => &raw mut pg_sys::SnapshotSelfData,
            };
            let status = pg_sys::SPI_execute_snapshot(
                plan,
                values.as_mut_ptr(),
                std::ptr::null(),
                snapshot,
                std::ptr::null_mut(),
                true,
                false,
                0,
            );
            if status != pg_sys::SPI_OK_SELECT as i32 {
                raise(
                    PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
                    format!("immuta catalog query failed with SPI status {status}"),
                    None,
                    None,
                );
            }
            let table = pg_sys::SPI_tuptable;
            let mut out = Vec::with_capacity(pg_sys::SPI_processed as usize);
            for i in 0..pg_sys::SPI_processed as usize {
                out.push(each(&Row { tuple: *(*table).vals.add(i), desc: (*table).tupdesc }));
            }
            pg_sys::SPI_freeplan(plan);
            out
        }
    })
}

/// The newest key (the one that encrypts) and its creation time.
pub fn current_key() -> Option<(KeyId, UnixMicros)> {
    let rows = read_latest(
        c"SELECT id, (extract(epoch FROM created_at) * 1000000)::int8 FROM immuta.data_keys ORDER BY id DESC LIMIT 1",
        &[],
        |row| Some((KeyId::new(row.get::<i64>(1)?)?, UnixMicros(row.get::<i64>(2)?))),
    );
    rows.into_iter().next().flatten()
}

/// Every key id that exists.
pub fn key_ids() -> Vec<KeyId> {
    read_latest(c"SELECT id FROM immuta.data_keys", &[], |row| row.get::<i64>(1).and_then(KeyId::new))
        .into_iter()
        .flatten()
        .collect()
}

/// The row of key `id`, if it exists.
pub fn key_row(id: KeyId) -> Option<KeyRow> {
    key_rows(Some(id)).into_iter().next()
}

/// The rows of key `id`, or of every key, in id order.
pub fn key_rows(id: Option<KeyId>) -> Vec<KeyRow> {
    let rows = match id {
        Some(id) => read_latest(
            c"SELECT id, provider, wrapping_key, wrapping_region, wrapped_key FROM immuta.data_keys WHERE id = $1",
            &[(pg_sys::INT8OID, pg_sys::Datum::from(id.get()))],
            key_row_columns,
        ),
        None => read_latest(
            c"SELECT id, provider, wrapping_key, wrapping_region, wrapped_key FROM immuta.data_keys ORDER BY id",
            &[],
            key_row_columns,
        ),
    };
    rows.into_iter()
        .map(|(id, provider, key, region, wrapped)| {
            let id = KeyId::new(id).unwrap_or_else(|| corrupt_row(id, &provider, &key));
            let wrapping = WrappingKeyRef::from_columns(&provider, &key, region.as_deref())
                .unwrap_or_else(|| corrupt_row(id.get(), &provider, &key));
            KeyRow { id, wrapping, wrapped: WrappedKey::new(wrapped) }
        })
        .collect()
}

type KeyColumns = (i64, String, String, Option<String>, Vec<u8>);

fn key_row_columns(row: &Row) -> KeyColumns {
    (
        row.get::<i64>(1).unwrap_or_default(),
        row.get::<String>(2).unwrap_or_default(),
        row.get::<String>(3).unwrap_or_default(),
        row.get::<String>(4),
        row.get::<Vec<u8>>(5).unwrap_or_default(),
    )
}

fn corrupt_row(id: i64, provider: &str, key: &str) -> ! {
    raise(
        PgSqlErrorCode::ERRCODE_DATA_CORRUPTED,
        format!("immuta data key {id} has an unrecognised wrapping key"),
        Some(format!("provider \"{provider}\" with wrapping key \"{key}\" is not one this immuta wrote.")),
        Some("The row of immuta.data_keys was altered; restore it from a backup."),
    )
}

/// Parameters $1 to $5 of the statements that store a key: id, provider, wrapping key, region,
/// wrapped key.
fn wrapping_args<'a>(
    id: KeyId,
    wrapping: &'a WrappingKeyRef,
    wrapped: &'a WrappedKey,
) -> [DatumWithOid<'a>; 5] {
    [
        id.get().into(),
        wrapping.provider().as_str().into(),
        wrapping.key_column().into(),
        wrapping.region_column().into(),
        wrapped.as_bytes().into(),
    ]
}

/// Records a new wrapping of key `id` (`immuta_rewrap()`).
pub fn update_wrapping(id: KeyId, wrapping: &WrappingKeyRef, wrapped: &WrappedKey) {
    write(
        "UPDATE immuta.data_keys SET provider = $2, wrapping_key = $3, wrapping_region = $4, wrapped_key = $5 \
         WHERE id = $1",
        &wrapping_args(id, wrapping, wrapped),
    )
}

/// Whether any key is wrapped by a local master key (then a missing master key file is an error,
/// never a reason to generate one).
pub fn any_local_key() -> bool {
    !read_latest(c"SELECT 1 FROM immuta.data_keys WHERE provider = 'local' LIMIT 1", &[], |_| ()).is_empty()
}

/// A new key id from `immuta.data_keys_id_seq`.
pub fn next_key_id() -> KeyId {
    let id = as_owner(|| spi(Spi::get_one::<i64>("SELECT nextval('immuta.data_keys_id_seq')")));
    id.and_then(KeyId::new).unwrap_or_else(|| {
        raise(
            PgSqlErrorCode::ERRCODE_DATA_CORRUPTED,
            "immuta.data_keys_id_seq returned a non-positive id",
            None,
            None,
        )
    })
}

/// Inserts a key row. `rolled_over_from` (unique) names the key an automatic rollover replaces.
pub fn insert_key(
    id: KeyId,
    wrapping: &WrappingKeyRef,
    wrapped: &WrappedKey,
    reason: RotationReason,
    rolled_over_from: Option<i64>,
) {
    let [id_, provider, key, region, bytes] = wrapping_args(id, wrapping, wrapped);
    let (role, _) = caller();
    write(
        "INSERT INTO immuta.data_keys \
             (id, provider, wrapping_key, wrapping_region, wrapped_key, reason, rolled_over_from, created_by) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, pg_catalog.pg_get_userbyid($8))",
        &[id_, provider, key, region, bytes, reason.as_str().into(), rolled_over_from.into(), role.into()],
    )
}

/// The YAML stored by `immuta_configure()`, if any.
pub fn stored_config() -> Option<String> {
    read_latest(c"SELECT yaml FROM immuta.config", &[], |row| row.get::<String>(1))
        .into_iter()
        .next()
        .flatten()
}

/// Stores the configuration YAML (one row), noting whether it holds credentials (then pg_dump
/// leaves it out).
pub fn store_config(yaml: &str, has_credentials: bool) {
    let (role, _) = caller();
    write(
        "INSERT INTO immuta.config (singleton, yaml, has_credentials, updated_by) \
         VALUES (true, $1, $2, pg_catalog.pg_get_userbyid($3)) \
         ON CONFLICT (singleton) DO UPDATE \
         SET yaml = EXCLUDED.yaml, has_credentials = EXCLUDED.has_credentials, \
             updated_at = pg_catalog.now(), updated_by = EXCLUDED.updated_by",
        &[yaml.into(), has_credentials.into(), role.into()],
    )
}

/// The encryptions reserved for key `id` in `immuta.key_usage` (committed, plus this
/// transaction's own rows), read without predicate locks.
pub fn usage_sum(id: KeyId) -> u64 {
    as_owner(|| {
        read_with(
            c"SELECT COALESCE(sum(encryptions), 0)::int8 FROM immuta.key_usage WHERE key_id = $1",
            &[(pg_sys::INT8OID, pg_sys::Datum::from(id.get()))],
            Visibility::SelfAndCommitted,
            |row| row.get::<i64>(1),
        )
    })
    .into_iter()
    .next()
    .flatten()
    .unwrap_or(0)
    .max(0) as u64
}

/// Appends a reservation of `encryptions` for key `id`.
pub fn insert_usage(id: KeyId, encryptions: u64) {
    let encryptions = i64::try_from(encryptions).unwrap_or(i64::MAX);
    write("INSERT INTO immuta.key_usage (key_id, encryptions) VALUES ($1, $2)", &[id.get().into(), encryptions.into()])
}

/// A row of `immuta.audit_log`.
pub struct AuditEvent<'a> {
    pub event: &'a str,
    pub key_id: Option<KeyId>,
    pub reason: &'a str,
    pub detail: serde_json::Value,
}

/// Appends a key event to `immuta.audit_log` (time and roles are the columns' defaults).
pub fn insert_audit(event: AuditEvent) {
    let (role, session_role) = caller();
    write(
        "INSERT INTO immuta.audit_log (event, key_id, reason, detail, role, session_role) \
         VALUES ($1, $2, $3, $4, pg_catalog.pg_get_userbyid($5), pg_catalog.pg_get_userbyid($6))",
        &[
            event.event.into(),
            event.key_id.map(KeyId::get).into(),
            event.reason.into(),
            pgrx::JsonB(event.detail).into(),
            role.into(),
            session_role.into(),
        ],
    )
}

/// The current key as `immuta_status()` shows it: id, creation, age, when and whether it is due
/// for rollover after `rollover_days`, and its wrapping. `None` before the first key.
pub fn current_key_summary(rollover_days: u32) -> Option<serde_json::Value> {
    read_latest(
        c"SELECT jsonb_build_object(
                'id', id,
                'created_at', created_at,
                'age_days', round((extract(epoch FROM now() - created_at) / 86400)::numeric, 2),
                'rollover_due_at', created_at + make_interval(secs => $1 * 86400.0),
                'rollover_due', now() >= created_at + make_interval(secs => $1 * 86400.0),
                'provider', provider,
                'wrapping_key', wrapping_key,
                'wrapping_region', wrapping_region,
                'reason', reason)
          FROM immuta.data_keys ORDER BY id DESC LIMIT 1",
        &[(pg_sys::INT4OID, pg_sys::Datum::from(rollover_days as i32))],
        |row| row.get::<pgrx::JsonB>(1).map(|j| j.0),
    )
    .into_iter()
    .next()
    .flatten()
}

/// How many data keys exist.
pub fn key_count() -> i64 {
    read_latest(c"SELECT count(*) FROM immuta.data_keys", &[], |row| row.get::<i64>(1))
        .into_iter()
        .next()
        .flatten()
        .unwrap_or(0)
}

/// Folds each key's reservation rows into one, so that `immuta.key_usage` stays small however
/// many sessions reserved. Only committed rows are folded; rows of transactions in progress are
/// left to them.
pub fn compact_usage() {
    write(
        "WITH gone AS (
             DELETE FROM immuta.key_usage
             WHERE key_id IN (SELECT key_id FROM immuta.key_usage GROUP BY key_id HAVING count(*) > 1)
             RETURNING key_id, encryptions)
         INSERT INTO immuta.key_usage (key_id, encryptions)
         SELECT key_id, sum(encryptions) FROM gone GROUP BY key_id",
        &[],
    )
}
