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
//!
//! What PostgreSQL raises inside these queries is never shown as it is: its DETAIL may hold row
//! values (`Key (rolled_over_from)=(7) already exists`). [`guarded`] turns it into immuta's own
//! error, and lets through only the conditions a caller acts on (a cancel, a lock timeout, a
//! serialization failure, a read-only transaction, lack of resources), without their DETAIL.
//!
//! Two facts the restore path (`restore.rs`) relies on live here too: every write of immuta's
//! own is marked as such while it runs ([`immuta_is_writing`]), and the first one in an
//! installation closes the restore window for good ([`in_use`]).

use immuta_core::key::{KeyId, ProviderKind, WrappedKey, WrappingKeyRef};
use immuta_core::key_state::KeyState;
use immuta_core::keyrings::{KmsKey, Settings};
use immuta_core::rollover::RolloverLength;
use immuta_core::rollover::RotationReason;
use immuta_core::time::UnixMicros;
use std::cell::Cell;
use std::ffi::CStr;
use std::panic::AssertUnwindSafe;

use pgrx::datum::DatumWithOid;
use pgrx::pg_sys::panic::CaughtError;
use pgrx::prelude::*;
use pgrx::{pg_sys, PgSqlErrorCode};

use crate::errors::raise;

mod index_keys;
pub use index_keys::{
    all_index_key_rows, blind_index_references, destroy_index_key, id_in_other_table, index_key_rows,
    insert_index_key, update_index_wrapping, IndexKeyRow,
};

use crate::xact::from_pg_timestamp;

/// One row of `immuta.data_keys`.
pub struct KeyRow {
    pub id: KeyId,
    pub wrapping: WrappingKeyRef,
    /// Empty when the key is destroyed.
    pub wrapped: WrappedKey,
    /// Whether its wrapping was chosen under a superuser's configuration (the `server_identity`
    /// column: then KMS may be reached as the server for it).
    pub server_identity: bool,
    pub keyring: String,
    pub state: KeyState,
}

/// The OIDs of the tables whose changes invalidate backend caches, and of the private sequence
/// whose lock serialises key creation.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TableOids {
    pub data_keys: pg_sys::Oid,
    pub config: pg_sys::Oid,
    pub keyrings: pg_sys::Oid,
    pub key_ids: pg_sys::Oid,
    pub index_keys: pg_sys::Oid,
}

/// Looks up the extension's tables; an error when the extension is not installed in this database.
pub fn table_oids() -> TableOids {
    // SAFETY: plain catalog lookups with NUL-terminated names, inside a transaction.
    let (namespace, data_keys, config, keyrings, key_ids, index_keys) = unsafe {
        let namespace = pg_sys::get_namespace_oid(c"immuta".as_ptr(), true);
        let rel = |name: &std::ffi::CStr| {
            if namespace == pg_sys::InvalidOid {
                pg_sys::InvalidOid
            } else {
                pg_sys::get_relname_relid(name.as_ptr(), namespace)
            }
        };
        (namespace, rel(c"data_keys"), rel(c"config"), rel(c"keyrings"), rel(c"key_ids"), rel(c"index_keys"))
    };
    // The schema must be the extension's own: after DROP EXTENSION, a database owner could
    // create a schema `immuta` with tables of these names.
    // SAFETY: catalog lookups by name and by OID, inside a transaction.
    let extension = unsafe {
        let extension = pg_sys::get_extension_oid(c"immuta".as_ptr(), true);
        let owns_schema = namespace != pg_sys::InvalidOid
            && extension != pg_sys::InvalidOid
            && pg_sys::getExtensionOfObject(pg_sys::NamespaceRelationId, namespace) == extension;
        owns_schema.then_some(extension)
    };
    let Some(extension) = extension else {
        raise(
            PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            "immuta is not installed in this database",
            Some("The schema immuta of the extension immuta, with its tables, does not exist.".into()),
            Some("Run CREATE EXTENSION immuta."),
        );
    };
    require_library_version(extension);
    if [data_keys, config, keyrings, key_ids, index_keys].contains(&pg_sys::InvalidOid) {
        raise(
            PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            "immuta's tables are missing in this database",
            Some("The extension immuta is installed, but its schema lacks tables it creates.".into()),
            Some("Run DROP EXTENSION immuta and CREATE EXTENSION immuta, after restoring a backup of the keys."),
        );
    }
    // SAFETY: a syscache lookup of an existing relation by OID; the tuple is read while pinned
    // and released at once.
    let owner = unsafe {
        let tuple = pg_sys::SearchSysCache1(
            pg_sys::SysCacheIdentifier::RELOID as i32,
            pg_sys::Datum::from(data_keys),
        );
        if tuple.is_null() {
            pg_sys::InvalidOid
        } else {
            let owner = (*pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_class>(tuple)).relowner;
            pg_sys::ReleaseSysCache(tuple);
            owner
        }
    };
    OWNER.set(owner);
    OWNER_TABLE.set(data_keys);
    TableOids { data_keys, config, keyrings, key_ids, index_keys }
}

/// Whether the tables `oids` are still immuta's in this database (no error when they are not).
pub fn still_installed(oids: TableOids) -> bool {
    // SAFETY: plain catalog lookups with NUL-terminated names, inside a transaction.
    unsafe {
        let namespace = pg_sys::get_namespace_oid(c"immuta".as_ptr(), true);
        namespace != pg_sys::InvalidOid
            && pg_sys::get_relname_relid(c"data_keys".as_ptr(), namespace) == oids.data_keys
    }
}

/// The library serves only the SQL objects of its own version: between installing a new library
/// and `ALTER EXTENSION immuta UPDATE`, every immuta function refuses, naming the command,
/// instead of failing on a column or table the old objects lack (or, after a downgrade of the
/// library, ignoring one they have). Checked when the backend (re)loads its view of the tables,
/// never per row.
fn require_library_version(extension: pg_sys::Oid) {
    const LIBRARY: &str = env!("CARGO_PKG_VERSION");
    let installed = read_one::<String>(
        "SELECT extversion FROM pg_catalog.pg_extension WHERE oid OPERATOR(pg_catalog.=) $1",
        &[extension.into()],
    );
    let Some(installed) = installed else { return };
    if installed != LIBRARY {
        raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("immuta's SQL objects in this database are version {installed}, its library is version {LIBRARY}"),
            Some("The library serves only the objects of its own version.".into()),
            Some("Run ALTER EXTENSION immuta UPDATE in this database (as after every installation of a new immuta)."),
        );
    }
}

/// The one value of a read-only query. pgrx's `Spi::get_one*` run their query through its
/// mutable client, which assigns a transaction id first: on a standby that fails ("cannot
/// assign TransactionIds during recovery"), and elsewhere it makes a read cost a transaction id.
/// Every query that only reads goes through here.
pub fn read_one<T: FromDatum + IntoDatum>(query: &str, args: &[DatumWithOid<'_>]) -> Option<T> {
    spi(Spi::connect(|client| client.select(query, Some(1), args)?.first().get_one::<T>()))
}

/// The value of an SPI call; an SPI-level failure (not an SQL error, which raises by itself, see
/// [`guarded`]) is an internal error.
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
    static OWNER: Cell<pg_sys::Oid> = const { Cell::new(pg_sys::InvalidOid) };
    /// `immuta.data_keys` as [`table_oids`] found it: which installation this backend serves.
    static OWNER_TABLE: Cell<pg_sys::Oid> = const { Cell::new(pg_sys::InvalidOid) };
    /// An insert of immuta's own is running (see [`immuta_is_writing`]).
    static WRITING: Cell<bool> = const { Cell::new(false) };
    /// The `immuta.data_keys` whose installation this backend has marked as in use.
    static MARKED_IN_USE: Cell<pg_sys::Oid> = const { Cell::new(pg_sys::InvalidOid) };
    /// This transaction wrote something of immuta's other than a usage reservation.
    static UNPREPARABLE: Cell<bool> = const { Cell::new(false) };
}

/// `immuta.data_keys` of the installation this backend last looked up (0 before): part of the
/// identity of a key's usage counter, so that a counter outlives no installation.
pub fn keys_table() -> u32 {
    OWNER_TABLE.get().to_u32()
}

/// Whether this transaction wrote something of immuta's other than a usage reservation: keys,
/// the audit log, the configuration, a compaction of usage rows (see `keys::before_prepare`).
pub fn wrote_unpreparable() -> bool {
    UNPREPARABLE.get()
}

/// At the end of the transaction (commit, abort or prepare).
pub fn at_transaction_end() {
    UNPREPARABLE.set(false);
}

/// Whether the row being inserted comes from immuta's own functions (through [`write`]), not
/// from a role inserting directly. Only immuta's fixed statements run while it is set: no user
/// code runs inside them (immuta's tables have no triggers, rules or defaults but immuta's).
pub fn immuta_is_writing() -> bool {
    WRITING.get()
}

/// SQLSTATEs of conditions that are not about immuta's data and that callers act on: they pass
/// through (without DETAIL, which could hold row values).
const PASSED_THROUGH: &[PgSqlErrorCode] = &[
    PgSqlErrorCode::ERRCODE_QUERY_CANCELED,
    PgSqlErrorCode::ERRCODE_ADMIN_SHUTDOWN,
    PgSqlErrorCode::ERRCODE_CRASH_SHUTDOWN,
    PgSqlErrorCode::ERRCODE_LOCK_NOT_AVAILABLE,
    PgSqlErrorCode::ERRCODE_T_R_SERIALIZATION_FAILURE,
    PgSqlErrorCode::ERRCODE_T_R_DEADLOCK_DETECTED,
    PgSqlErrorCode::ERRCODE_READ_ONLY_SQL_TRANSACTION,
    PgSqlErrorCode::ERRCODE_OUT_OF_MEMORY,
    PgSqlErrorCode::ERRCODE_INSUFFICIENT_RESOURCES,
    PgSqlErrorCode::ERRCODE_STATEMENT_TOO_COMPLEX,
    PgSqlErrorCode::ERRCODE_DISK_FULL,
    PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
    PgSqlErrorCode::ERRCODE_IO_ERROR,
    PgSqlErrorCode::ERRCODE_IDLE_IN_TRANSACTION_SESSION_TIMEOUT,
];

/// Runs a statement on immuta's tables; an error PostgreSQL raises in it becomes immuta's own
/// (see the module documentation). `table` names the table for the message.
fn guarded<R>(table: &str, f: impl FnOnce() -> R) -> R {
    PgTryBuilder::new(AssertUnwindSafe(f))
        .catch_others(|caught| {
            let CaughtError::PostgresError(report) = &caught else { caught.rethrow() };
            let code = report.sql_error_code();
            if PASSED_THROUGH.contains(&code) {
                raise(code, report.message().to_owned(), None, report.hint());
            }
            if code == PgSqlErrorCode::ERRCODE_UNIQUE_VIOLATION {
                raise(
                    PgSqlErrorCode::ERRCODE_T_R_SERIALIZATION_FAILURE,
                    format!("immuta could not add a row to {table}: another one took its place"),
                    Some("A row was added to the table outside immuta's key creation lock (by a superuser, or a restore running at the same time).".into()),
                    Some("Retry the statement."),
                );
            }
            raise(
                PgSqlErrorCode::ERRCODE_DATA_CORRUPTED,
                format!("immuta could not use its table {table}"),
                Some(format!("PostgreSQL refused immuta's statement with SQLSTATE {}.", crate::errors::sqlstate_text(report.sql_error_code()))),
                Some("The table or its constraints were changed by hand; restore the extension's objects from a backup, or recreate the extension."),
            )
        })
        .execute()
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
    // with a local user id change (SET ROLE is refused meanwhile) and opens a GUC nest level.
    let nest = unsafe {
        pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
        pg_sys::SetUserIdAndSecContext(owner, context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32);
        pg_sys::NewGUCNestLevel()
    };
    // GUC_ACTION_SAVE is allowed in parallel workers; undone by AtEOXact_GUC below or by the
    // abort of the (sub)transaction.
    crate::gucs::set_for(c"search_path", c"pg_catalog, pg_temp", pg_sys::GucAction::GUC_ACTION_SAVE);
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

/// Runs a statement that writes immuta's tables, as their owner, marked as immuta's own. The
/// first write of this backend in an installation marks the installation as in use first.
fn write(table: &str, query: &str, args: &[DatumWithOid]) {
    UNPREPARABLE.set(true);
    write_preparable(table, query, args)
}

/// [`write`] for a statement a prepared transaction may hold: a usage reservation (an insert
/// that nobody waits for).
fn write_preparable(table: &str, query: &str, args: &[DatumWithOid]) {
    mark_in_use();
    as_owner(|| {
        guarded(table, || {
            let was = WRITING.replace(true);
            PgTryBuilder::new(AssertUnwindSafe(|| {
                spi(Spi::connect_mut(|client| {
                    client.update(query, None, args)?;
                    Ok(())
                }))
            }))
            .finally(|| WRITING.set(was))
            .execute()
        })
    })
}

/// Marks the installation as in use: its restore window is closed for good (`restore.rs`). The
/// mark is a call of `nextval` on the private sequence `immuta.in_use_marker`: not rolled back,
/// seen at once by every transaction whatever its snapshot, and never waited for. Once per
/// backend and installation.
fn mark_in_use() {
    let data_keys = OWNER_TABLE.get();
    if MARKED_IN_USE.get() == data_keys {
        return;
    }
    as_owner(|| {
        guarded("immuta.in_use_marker", || {
            spi(Spi::get_one::<i64>("SELECT pg_catalog.nextval('immuta.in_use_marker'::pg_catalog.regclass)"))
        })
    });
    MARKED_IN_USE.set(data_keys);
}

/// Whether immuta has written in this installation (see [`mark_in_use`]).
pub fn in_use() -> bool {
    as_owner(|| {
        guarded("immuta.in_use_marker", || {
            read_one::<bool>(
                "SELECT pg_catalog.pg_sequence_last_value('immuta.in_use_marker'::pg_catalog.regclass) IS NOT NULL",
                &[],
            )
        })
    })
    .unwrap_or(true)
}

/// Whether `table` (one of immuta's) holds rows committed by other transactions, read with the
/// latest snapshot: the caller's own rows (a restore adding rows in several statements of one
/// transaction) do not count.
pub fn has_rows_of_others(table: &str) -> bool {
    let query = match table {
        "data_keys" => c"SELECT xmin::text::int8 FROM immuta.data_keys",
        "key_usage" => c"SELECT xmin::text::int8 FROM immuta.key_usage",
        "audit_log" => c"SELECT xmin::text::int8 FROM immuta.audit_log",
        "keyrings" => c"SELECT xmin::text::int8 FROM immuta.keyrings",
        "index_keys" => c"SELECT xmin::text::int8 FROM immuta.index_keys",
        _ => c"SELECT xmin::text::int8 FROM immuta.config",
    };
    read_latest(query, &[], |row| row.get::<i64>(1))
        .into_iter()
        .flatten()
        // SAFETY: asks whether an xid is one of this transaction's, inside a transaction.
        .any(|xmin| !unsafe {
            pg_sys::TransactionIdIsCurrentTransactionId(pg_sys::TransactionId::from(xmin as u32))
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
fn read_latest<R>(
    query: &CStr,
    args: &[(pg_sys::Oid, pg_sys::Datum)],
    each: impl FnMut(&Row) -> R,
) -> Vec<R> {
    as_owner(|| guarded("immuta's tables", || read_with(query, args, Visibility::Latest, each)))
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
        // string with as many parameters as `types`; the snapshot is a fresh MVCC snapshot (a
        // query's or the catalog's), PostgreSQL's static SnapshotSelf (SPI copies both static
        // ones; plans from SPI_prepare are never parallel, so they are not serialized), or
        // InvalidSnapshot ("the usual one");
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
                // A parallel worker cannot take a new query snapshot, and the statement's may be
                // a REPEATABLE READ transaction's, older than a key's disabling: it reads key
                // rows with a fresh catalog snapshot (MVCC, taken now). A usage sum keeps the
                // statement's (see `Visibility::SelfAndCommitted`).
                Visibility::Latest if pg_sys::IsInParallelMode() => {
                    pg_sys::GetCatalogSnapshot(pg_sys::InvalidOid)
                }
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

fn text_arg(text: &str) -> (pg_sys::Oid, pg_sys::Datum) {
    (pg_sys::TEXTOID, text.into_datum().expect("text"))
}

fn created_at(row: &Row, column: i32) -> Option<UnixMicros> {
    let created = row.get::<TimestampWithTimeZone>(column)?;
    Some(from_pg_timestamp(pg_sys::TimestampTz::from(created)))
}

/// The newest key of `keyring` (the one that encrypts, unless the keyring was destroyed) and its
/// creation time. (The creation time is converted here, saturating, not in SQL, where an
/// infinite time could not be cast.)
pub fn current_key(keyring: &str) -> Option<(KeyId, UnixMicros)> {
    let rows = read_latest(
        c"SELECT id, created_at FROM immuta.data_keys WHERE keyring = $1 ORDER BY id DESC LIMIT 1",
        &[text_arg(keyring)],
        |row| Some((KeyId::new(row.get::<i64>(1)?)?, created_at(row, 2)?)),
    );
    rows.into_iter().next().flatten()
}

/// What the audit log's events after event `since` changed (see [`audit_since`]).
pub struct AuditReplay {
    /// The id of the newest event (0 when there is none).
    pub latest: i64,
    /// The keys they disabled or destroyed that are still not enabled.
    pub gone: Vec<KeyId>,
    /// The keyrings they concern (a key created, rotated, rewrapped, disabled, enabled or
    /// destroyed; a keyring created, configured or destroyed).
    pub keyrings: Vec<String>,
    /// Too many keyrings to name, or a key was added without an event (a restore, a
    /// superuser's own `INSERT`): take every keyring as changed.
    pub all_keyrings: bool,
    /// The log went back below `since` (it was restored, or an event this backend saw was
    /// rolled back): nothing held can be trusted to be up to date.
    pub went_back: bool,
    /// The highest key id in `immuta.data_keys`.
    pub keys_max: i64,
}

/// Keyrings named one by one in an [`AuditReplay`]; beyond, all of them count as changed.
const REPLAY_KEYRINGS: i64 = 1024;

/// What changed since event `since` (and since key `keys_seen` was the newest key), from the
/// audit log. Every change that immuta's functions make to keys and keyrings is audited under
/// the key creation lock with the next id, so ids follow commit order and no event can appear
/// below one already seen; a key row that arrived without its event shows in the newest key id.
/// With `latest_only`, just the watermarks (a backend that holds no key and no keyring has
/// nothing to drop).
pub fn audit_since(since: i64, keys_seen: i64, latest_only: bool) -> AuditReplay {
    let (latest, keys_max) = read_latest(
        c"SELECT (SELECT COALESCE(max(id), 0) FROM immuta.audit_log), \
                 (SELECT COALESCE(max(id), 0) FROM immuta.data_keys)",
        &[],
        |row| (row.get::<i64>(1).unwrap_or(0), row.get::<i64>(2).unwrap_or(0)),
    )
    .into_iter()
    .next()
    .unwrap_or((0, 0));
    let mut replay = AuditReplay {
        latest,
        gone: Vec::new(),
        keyrings: Vec::new(),
        all_keyrings: false,
        went_back: latest < since,
        keys_max,
    };
    if latest_only || replay.went_back {
        return replay;
    }
    // Aggregated here, not read row by row: however many events came since, one row comes back.
    let rows = read_latest(
        c"SELECT COALESCE(array_agg(DISTINCT key_id) FILTER (WHERE event IN ('key disabled', 'key destroyed', 'index key destroyed') \
                                                              AND key_id IS NOT NULL), '{}'), \
                 (SELECT COALESCE(array_agg(keyring), '{}') FROM \
                    (SELECT DISTINCT keyring FROM immuta.audit_log \
                      WHERE id > $1 AND keyring IS NOT NULL LIMIT $2 + 1) k), \
                 COALESCE(max(key_id) FILTER (WHERE event IN ('key created', 'key rotated')), 0) \
          FROM immuta.audit_log WHERE id > $1",
        &[(pg_sys::INT8OID, pg_sys::Datum::from(since)), (pg_sys::INT8OID, pg_sys::Datum::from(REPLAY_KEYRINGS))],
        |row| {
            (
                row.get::<Vec<i64>>(1).unwrap_or_default(),
                row.get::<Vec<String>>(2).unwrap_or_default(),
                row.get::<i64>(3).unwrap_or(0),
            )
        },
    );
    let (ids, keyrings, created_max) = rows.into_iter().next().unwrap_or_default();
    let ids: Vec<KeyId> = ids.into_iter().filter_map(KeyId::new).collect();
    replay.all_keyrings =
        keyrings.len() as i64 > REPLAY_KEYRINGS || (keys_max > keys_seen && created_max < keys_max);
    replay.gone = not_enabled_among(&ids);
    replay.keyrings = keyrings;
    replay
}

/// Which of `ids` name keys that are no longer enabled (or whose keyring was destroyed), read
/// now.
pub fn not_enabled_among(ids: &[KeyId]) -> Vec<KeyId> {
    if ids.is_empty() {
        return Vec::new();
    }
    let ids: Vec<i64> = ids.iter().map(|id| id.get()).collect();
    read_latest(
        c"SELECT k.id FROM (SELECT id, keyring, state FROM immuta.data_keys \
                             UNION ALL SELECT id, keyring, state FROM immuta.index_keys) k \
                  LEFT JOIN immuta.keyrings r ON r.name = k.keyring \
          WHERE k.id = ANY($1) AND (k.state <> 'enabled' OR r.destroyed_at IS NOT NULL) ORDER BY k.id",
        &[(pg_sys::INT8ARRAYOID, ids.into_datum().expect("int8[]"))],
        |row| row.get::<i64>(1).and_then(KeyId::new),
    )
    .into_iter()
    .flatten()
    .collect()
}

/// One row of `immuta.keyrings`, with the current key of the keyring.
pub struct KeyringRow {
    pub name: String,
    pub settings: Settings,
    /// Whether a superuser chose its KMS key.
    pub by_superuser: bool,
    pub destroyed: bool,
    pub current: Option<(KeyId, UnixMicros)>,
}

const KEYRING_COLUMNS: &str = "r.name, r.rollover_days, r.kms_key, r.kms_region, r.by_superuser, \
     r.destroyed_at IS NOT NULL, k.id, k.created_at \
     FROM immuta.keyrings r LEFT JOIN LATERAL \
     (SELECT id, created_at FROM immuta.data_keys d WHERE d.keyring = r.name ORDER BY id DESC LIMIT 1) k ON true";

fn keyring_row(row: &Row) -> Option<KeyringRow> {
    let name = row.get::<String>(1)?;
    let rollover = row.get::<i32>(2).and_then(|d| RolloverLength::from_days(d.into()));
    let kms = match (row.get::<String>(3), row.get::<String>(4)) {
        (Some(key), Some(region)) => Some(KmsKey { key, region }),
        _ => None,
    };
    let current = row.get::<i64>(7).and_then(KeyId::new).zip(created_at(row, 8));
    Some(KeyringRow {
        name,
        settings: Settings { rollover, kms },
        by_superuser: row.get::<bool>(5).unwrap_or(false),
        destroyed: row.get::<bool>(6).unwrap_or(false),
        current,
    })
}

/// Keyring `name` (not `default`, which has no row), if it exists.
pub fn keyring(name: &str) -> Option<KeyringRow> {
    let query =
        std::ffi::CString::new(format!("SELECT {KEYRING_COLUMNS} WHERE r.name = $1")).expect("no NUL");
    read_latest(&query, &[text_arg(name)], keyring_row).into_iter().flatten().next()
}

/// Up to `limit` keyrings with their current keys, to fill a backend's ring in one query.
pub fn keyrings(limit: usize) -> Vec<KeyringRow> {
    let query =
        std::ffi::CString::new(format!("SELECT {KEYRING_COLUMNS} ORDER BY r.name LIMIT $1")).expect("no NUL");
    read_latest(
        &query,
        &[(pg_sys::INT8OID, pg_sys::Datum::from(limit.min(i64::MAX as usize) as i64))],
        keyring_row,
    )
    .into_iter()
    .flatten()
    .collect()
}

/// Adds keyring `name`.
pub fn insert_keyring(name: &str, settings: &Settings, by_superuser: bool) {
    let (role, _) = caller();
    let (key, region) = kms_columns(settings);
    write(
        "immuta.keyrings",
        "INSERT INTO immuta.keyrings (name, rollover_days, kms_key, kms_region, by_superuser, created_by) \
         VALUES ($1, $2, $3, $4, $5, pg_catalog.pg_get_userbyid($6))",
        &[
            name.into(),
            settings.rollover.map(|r| r.days() as i32).into(),
            key.into(),
            region.into(),
            by_superuser.into(),
            role.into(),
        ],
    )
}

fn kms_columns(settings: &Settings) -> (Option<&str>, Option<&str>) {
    match &settings.kms {
        Some(kms) => (Some(kms.key.as_str()), Some(kms.region.as_str())),
        None => (None, None),
    }
}

/// Replaces the settings of keyring `name`.
pub fn update_keyring(name: &str, settings: &Settings, by_superuser: bool) {
    let (key, region) = kms_columns(settings);
    write(
        "immuta.keyrings",
        "UPDATE immuta.keyrings SET rollover_days = $2, kms_key = $3, kms_region = $4, by_superuser = $5 \
         WHERE name = $1",
        &[
            name.into(),
            settings.rollover.map(|r| r.days() as i32).into(),
            key.into(),
            region.into(),
            by_superuser.into(),
        ],
    )
}

/// Marks keyring `name` destroyed (its row stays, a tombstone).
pub fn mark_keyring_destroyed(name: &str) {
    let (role, _) = caller();
    write(
        "immuta.keyrings",
        "UPDATE immuta.keyrings SET destroyed_at = pg_catalog.now(), destroyed_by = pg_catalog.pg_get_userbyid($2) \
         WHERE name = $1",
        &[name.into(), role.into()],
    )
}

/// The keys of `keyring` and their states, in id order.
pub fn key_states(keyring: &str) -> Vec<(KeyId, KeyState)> {
    read_latest(
        c"SELECT id, state FROM immuta.data_keys WHERE keyring = $1 ORDER BY id",
        &[text_arg(keyring)],
        |row| Some((KeyId::new(row.get::<i64>(1)?)?, KeyState::parse(&row.get::<String>(2)?)?)),
    )
    .into_iter()
    .flatten()
    .collect()
}

/// Records key `id`'s new state; a destroyed key's wrapped key is erased in the same statement.
pub fn set_key_state(id: KeyId, state: KeyState) {
    let (role, _) = caller();
    write(
        "immuta.data_keys",
        "UPDATE immuta.data_keys SET state = $2, state_changed_at = pg_catalog.now(), \
             state_changed_by = pg_catalog.pg_get_userbyid($3), \
             wrapped_key = CASE WHEN $2 = 'destroyed' THEN NULL ELSE wrapped_key END \
         WHERE id = $1",
        &[id.get().into(), state.as_str().into(), role.into()],
    )
}

/// The row of key `id`, if it exists.
pub fn key_row(id: KeyId) -> Option<KeyRow> {
    key_rows(Some(id)).into_iter().next()
}

/// The registered columns (`immuta.encrypted_columns`) that hold values under key `id`: table
/// (with its schema), column and count, in the order of `immuta.key_references`. Run as the caller, never as
/// immuta's owner: it reads the caller's tables with the caller's privileges.
pub fn key_references(id: KeyId) -> Vec<(String, String, i64)> {
    spi(Spi::connect(|client| {
        let rows = client.select(
            "SELECT pg_catalog.format('%I.%I', n.nspname, c.relname), r.column_name::pg_catalog.text, r.value_count \
             FROM immuta.key_references($1::pg_catalog.int8) r \
             JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) r.table_name::pg_catalog.oid \
             JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace \
             WHERE r.value_count OPERATOR(pg_catalog.>) 0",
            None,
            &[id.get().into()],
        )?;
        let mut found = Vec::new();
        for row in rows {
            let table = row.get::<String>(1)?.unwrap_or_default();
            let column = row.get::<String>(2)?.unwrap_or_default();
            found.push((table, column, row.get::<i64>(3)?.unwrap_or(0)));
        }
        Ok(found)
    }))
}

/// The rows of key `id`, or of every key, in id order.
pub fn key_rows(id: Option<KeyId>) -> Vec<KeyRow> {
    let rows = match id {
        Some(id) => read_latest(
            c"SELECT k.id, k.provider, k.wrapping_key, k.wrapping_region, k.wrapped_key, k.server_identity, k.keyring, \
                     CASE WHEN r.destroyed_at IS NOT NULL THEN 'destroyed' ELSE k.state END \
              FROM immuta.data_keys k LEFT JOIN immuta.keyrings r ON r.name = k.keyring WHERE k.id = $1",
            &[(pg_sys::INT8OID, pg_sys::Datum::from(id.get()))],
            key_row_columns,
        ),
        None => read_latest(
            c"SELECT k.id, k.provider, k.wrapping_key, k.wrapping_region, k.wrapped_key, k.server_identity, k.keyring, \
                     CASE WHEN r.destroyed_at IS NOT NULL THEN 'destroyed' ELSE k.state END \
              FROM immuta.data_keys k LEFT JOIN immuta.keyrings r ON r.name = k.keyring ORDER BY k.id",
            &[],
            key_row_columns,
        ),
    };
    rows.into_iter().map(|columns| key_row_from(columns, corrupt_row)).collect()
}

/// A key row (of either key table) from its first eight columns, checked as immuta wrote it;
/// `corrupt` raises the table's error for a row it cannot have written.
fn key_row_from(columns: KeyColumns, corrupt: fn(i64, &str) -> !) -> KeyRow {
    let (id, provider, key, region, wrapped, server_identity, keyring, state) = columns;
    let state = KeyState::parse(&state).unwrap_or_else(|| corrupt(id, "has an unknown state"));
    let wrapped = WrappedKey::new(wrapped.unwrap_or_default());
    let parsed = if state == KeyState::Destroyed {
        // Nothing left to check but the id and the wrapping key it names.
        KeyId::new(id)
            .zip(WrappingKeyRef::from_columns(&provider, &key, region.as_deref()))
            .ok_or("names an unknown provider or wrapping key")
    } else {
        immuta_core::restore::key_row(id, &provider, &key, region.as_deref(), &wrapped)
    };
    let (id, wrapping) = parsed.unwrap_or_else(|why| corrupt(id, why));
    KeyRow { id, wrapping, wrapped, server_identity, keyring, state }
}

type KeyColumns = (i64, String, String, Option<String>, Option<Vec<u8>>, bool, String, String);

fn key_row_columns(row: &Row) -> KeyColumns {
    (
        row.get::<i64>(1).unwrap_or_default(),
        row.get::<String>(2).unwrap_or_default(),
        row.get::<String>(3).unwrap_or_default(),
        row.get::<String>(4),
        row.get::<Vec<u8>>(5),
        row.get::<bool>(6).unwrap_or(false),
        row.get::<String>(7).unwrap_or_default(),
        row.get::<String>(8).unwrap_or_default(),
    )
}

/// A key row immuta cannot have written. Its values are not quoted: a row restored by hand
/// holds whatever its author chose.
fn corrupt_row(id: i64, why: &str) -> ! {
    raise(
        PgSqlErrorCode::ERRCODE_DATA_CORRUPTED,
        format!("immuta data key {id} has a row immuta cannot use"),
        Some(format!("The row of immuta.data_keys {why}.")),
        Some("The row was altered or restored from a damaged dump; restore it from a backup."),
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

/// Records a new wrapping of key `id` (`immuta_rewrap()`), chosen under a configuration a
/// superuser did or did not put in force (`server_identity`).
pub fn update_wrapping(id: KeyId, wrapping: &WrappingKeyRef, wrapped: &WrappedKey, server_identity: bool) {
    let [id_, provider, key, region, bytes] = wrapping_args(id, wrapping, wrapped);
    write(
        "immuta.data_keys",
        "UPDATE immuta.data_keys SET provider = $2, wrapping_key = $3, wrapping_region = $4, wrapped_key = $5, \
         server_identity = $6 WHERE id = $1",
        &[id_, provider, key, region, bytes, server_identity.into()],
    )
}

/// Whether any key is wrapped by `provider` (a local master key: then a missing master key file
/// is an error, never a reason to generate one).
pub fn any_key_wrapped_by(provider: ProviderKind) -> bool {
    !read_latest(
        c"SELECT 1 FROM immuta.data_keys WHERE provider = $1 \
          UNION ALL SELECT 1 FROM immuta.index_keys WHERE provider = $1 LIMIT 1",
        &[(pg_sys::TEXTOID, provider.as_str().into_datum().expect("text"))],
        |_| (),
    )
    .is_empty()
}

/// A new key id, above every id that exists and every id ever handed out: from the private
/// sequence `immuta.key_ids`, first raised past the highest id in the table (restored rows come
/// with their ids). Only with the key creation lock held, so no other key is being created.
/// (`immuta.data_keys_id_seq`, which dumps carry and restores set, decides nothing: the role
/// that installed immuta may move it.)
pub fn next_key_id() -> KeyId {
    // Index keys take their ids from the same sequence: an id names one key of either table.
    let highest = highest_id(
        c"SELECT GREATEST((SELECT COALESCE(max(id), 0) FROM immuta.data_keys), \
                          (SELECT COALESCE(max(id), 0) FROM immuta.index_keys))",
    );
    let id = as_owner(|| {
        guarded("immuta.key_ids", || {
            spi(Spi::get_one_with_args::<i64>(
                "SELECT CASE WHEN pg_catalog.nextval('immuta.key_ids'::pg_catalog.regclass) OPERATOR(pg_catalog.>) $1 \
                             THEN pg_catalog.currval('immuta.key_ids'::pg_catalog.regclass) \
                             ELSE pg_catalog.setval('immuta.key_ids'::pg_catalog.regclass, $1 OPERATOR(pg_catalog.+) 1) END",
                &[highest.into()],
            ))
        })
    });
    id.and_then(KeyId::new).unwrap_or_else(|| ids_exhausted("immuta.data_keys"))
}

/// Whether a subscription of this database, owned by a superuser (only such a subscription can
/// apply rows to immuta's tables), receives one of immuta's key tables (its keys, index keys or
/// keyrings): then this database must not create keys (replication.rs).
pub fn subscribes_to_keys() -> bool {
    let oids = table_oids();
    read_latest(
        c"SELECT EXISTS (SELECT FROM pg_catalog.pg_subscription_rel r \
                          JOIN pg_catalog.pg_subscription s ON s.oid OPERATOR(pg_catalog.=) r.srsubid \
                          JOIN pg_catalog.pg_roles a ON a.oid OPERATOR(pg_catalog.=) s.subowner \
                          WHERE a.rolsuper \
                            AND r.srrelid OPERATOR(pg_catalog.=) ANY (ARRAY[$1, $2, $3]::pg_catalog.oid[]))",
        &[
            (pg_sys::OIDOID, pg_sys::Datum::from(oids.data_keys)),
            (pg_sys::OIDOID, pg_sys::Datum::from(oids.index_keys)),
            (pg_sys::OIDOID, pg_sys::Datum::from(oids.keyrings)),
        ],
        |row| row.get::<bool>(1),
    )
    .into_iter()
    .flatten()
    .next()
    .unwrap_or(false)
}

/// The OID of `immuta.audit_log` (of the installed extension: call after [`table_oids`]).
pub fn audit_log_oid() -> pg_sys::Oid {
    // SAFETY: plain catalog lookups with NUL-terminated names, inside a transaction.
    unsafe {
        let namespace = pg_sys::get_namespace_oid(c"immuta".as_ptr(), true);
        if namespace == pg_sys::InvalidOid {
            pg_sys::InvalidOid
        } else {
            pg_sys::get_relname_relid(c"audit_log".as_ptr(), namespace)
        }
    }
}

/// The highest id of a table, read with the latest snapshot.
fn highest_id(query: &CStr) -> i64 {
    read_latest(query, &[], |row| row.get::<i64>(1)).into_iter().flatten().next().unwrap_or(0)
}

fn ids_exhausted(table: &str) -> ! {
    raise(
        PgSqlErrorCode::ERRCODE_SEQUENCE_GENERATOR_LIMIT_EXCEEDED,
        format!("{table} has no id left"),
        Some("Its highest id is the largest bigint; rows with such ids were restored by hand.".into()),
        Some("Restore the table from a dump of immuta's own."),
    )
}

/// Inserts a key row. `rolled_over_from` (unique) names the key an automatic rollover replaces;
/// `server_identity` says whether the wrapping was chosen under a superuser's configuration.
pub fn insert_key(
    id: KeyId,
    wrapping: &WrappingKeyRef,
    wrapped: &WrappedKey,
    reason: RotationReason,
    rolled_over_from: Option<i64>,
    server_identity: bool,
    keyring: &str,
) {
    let [id_, provider, key, region, bytes] = wrapping_args(id, wrapping, wrapped);
    let (role, _) = caller();
    let (reason, rolled_over_from, role) = (reason.as_str().into(), rolled_over_from.into(), role.into());
    write(
        "immuta.data_keys",
        "INSERT INTO immuta.data_keys \
             (id, provider, wrapping_key, wrapping_region, wrapped_key, reason, rolled_over_from, created_by, \
              server_identity, keyring) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, pg_catalog.pg_get_userbyid($8), $9, $10)",
        &[id_, provider, key, region, bytes, reason, rolled_over_from, role, server_identity.into(), keyring.into()],
    )
}

/// The configuration stored by `immuta_configure()`.
pub struct StoredConfig {
    /// The YAML; `None` when it is longer than a configuration may be (then only its length is
    /// read, not the text).
    pub yaml: Option<String>,
    pub len: usize,
    /// Stored while a superuser called `immuta_configure()` (`server_identity.rs`).
    pub by_superuser: bool,
}

/// The configuration stored by `immuta_configure()`, if any.
pub fn stored_config() -> Option<StoredConfig> {
    read_latest(
        c"SELECT CASE WHEN octet_length(yaml) <= $1 THEN yaml END, octet_length(yaml), by_superuser \
          FROM immuta.config",
        &[(pg_sys::INT4OID, pg_sys::Datum::from(immuta_core::config::MAX_DOCUMENT_BYTES as i32))],
        |row| StoredConfig {
            yaml: row.get::<String>(1),
            len: row.get::<i32>(2).unwrap_or_default().max(0) as usize,
            by_superuser: row.get::<bool>(3).unwrap_or(false),
        },
    )
    .into_iter()
    .next()
}

/// Stores the configuration YAML (one row), noting whether it holds credentials (then pg_dump
/// leaves it out) and whether a superuser stored it.
pub fn store_config(yaml: &str, has_credentials: bool, by_superuser: bool) {
    let (role, _) = caller();
    write(
        "immuta.config",
        "INSERT INTO immuta.config (singleton, yaml, has_credentials, by_superuser, updated_by) \
         VALUES (true, $1, $2, $3, pg_catalog.pg_get_userbyid($4)) \
         ON CONFLICT (singleton) DO UPDATE \
         SET yaml = EXCLUDED.yaml, has_credentials = EXCLUDED.has_credentials, \
             by_superuser = EXCLUDED.by_superuser, updated_at = pg_catalog.now(), updated_by = EXCLUDED.updated_by",
        &[yaml.into(), has_credentials.into(), by_superuser.into(), role.into()],
    )
}

/// The encryptions reserved for key `id` in `immuta.key_usage` (committed, plus this
/// transaction's own rows), read without predicate locks.
pub fn usage_sum(id: KeyId) -> u64 {
    // Capped below 2^63: rows restored by hand could sum past it.
    as_owner(|| {
        guarded("immuta.key_usage", || {
            read_with(
                c"SELECT LEAST(COALESCE(sum(encryptions), 0), 4611686018427387904)::int8 \
                  FROM immuta.key_usage WHERE key_id = $1",
                &[(pg_sys::INT8OID, pg_sys::Datum::from(id.get()))],
                Visibility::SelfAndCommitted,
                |row| row.get::<i64>(1),
            )
        })
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
    write_preparable(
        "immuta.key_usage",
        "INSERT INTO immuta.key_usage (key_id, encryptions) VALUES ($1, $2)",
        &[id.get().into(), encryptions.into()],
    )
}

/// A row of `immuta.audit_log`.
pub struct AuditEvent<'a> {
    pub event: &'a str,
    pub key_id: Option<KeyId>,
    pub reason: &'a str,
    pub detail: serde_json::Value,
    /// The keyring of the key or keyring concerned; `None` for the whole database.
    pub keyring: Option<&'a str>,
}

/// Appends a key event to `immuta.audit_log` (the time is the column's default). Its id is one
/// above the highest, read with the latest snapshot under the key creation lock, which the caller
/// holds, as every writer of the audit log does (immuta's events, and restores): ids follow
/// commit order, and nothing a role other than a superuser can move decides them.
pub fn insert_audit(event: AuditEvent) {
    let id = highest_id(c"SELECT COALESCE(max(id), 0) FROM immuta.audit_log")
        .checked_add(1)
        .unwrap_or_else(|| ids_exhausted("immuta.audit_log"));
    let (role, session_role) = caller();
    write(
        "immuta.audit_log",
        "INSERT INTO immuta.audit_log (id, event, key_id, reason, detail, role, session_role, keyring) \
         VALUES ($7, $1, $2, $3, $4, pg_catalog.pg_get_userbyid($5), pg_catalog.pg_get_userbyid($6), $8)",
        &[
            event.event.into(),
            event.key_id.map(KeyId::get).into(),
            event.reason.into(),
            pgrx::JsonB(event.detail).into(),
            role.into(),
            session_role.into(),
            id.into(),
            event.keyring.into(),
        ],
    )
}

/// The current key of `keyring` as `immuta_status()` shows it: id, creation, age, when and
/// whether it is due for rollover after `rollover_days`, and its wrapping. `None` before the
/// keyring's first key, or once its newest key is no longer enabled (a destroyed keyring).
pub fn current_key_summary(keyring: &str, rollover_days: u32) -> Option<serde_json::Value> {
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
          FROM (SELECT * FROM immuta.data_keys WHERE keyring = $2 ORDER BY id DESC LIMIT 1) k
          WHERE state = 'enabled'",
        &[(pg_sys::INT4OID, pg_sys::Datum::from(rollover_days as i32)), text_arg(keyring)],
        |row| row.get::<pgrx::JsonB>(1).map(|j| j.0),
    )
    .into_iter()
    .next()
    .flatten()
}

/// How many data keys `keyring` has in each state.
pub fn key_counts(keyring: &str) -> serde_json::Value {
    read_latest(
        c"SELECT jsonb_build_object(
                'total', count(*),
                'enabled', count(*) FILTER (WHERE state = 'enabled'),
                'disabled', count(*) FILTER (WHERE state = 'disabled'),
                'destroyed', count(*) FILTER (WHERE state = 'destroyed'))
          FROM immuta.data_keys WHERE keyring = $1",
        &[text_arg(keyring)],
        |row| row.get::<pgrx::JsonB>(1).map(|j| j.0),
    )
    .into_iter()
    .next()
    .flatten()
    .unwrap_or_default()
}

/// How many keyrings exist besides `default`, and how many of them were destroyed.
pub fn keyring_count() -> (i64, i64) {
    read_latest(c"SELECT count(*), count(destroyed_at) FROM immuta.keyrings", &[], |row| {
        (row.get::<i64>(1).unwrap_or(0), row.get::<i64>(2).unwrap_or(0))
    })
    .into_iter()
    .next()
    .unwrap_or((0, 0))
}

/// The keyrings whose newest key is enabled and due: by age (its keyring's rollover length, else
/// `rollover_days`), or by the encryptions reserved for it (at least `limit`). Read without the
/// key creation lock; the caller decides again under it.
pub fn due_keyrings(rollover_days: u32, limit: u64) -> Vec<String> {
    read_latest(
        c"SELECT c.keyring
          FROM (SELECT DISTINCT ON (keyring) keyring, id, created_at, state
                FROM immuta.data_keys ORDER BY keyring, id DESC) c
          LEFT JOIN immuta.keyrings r ON r.name = c.keyring
          WHERE c.state = 'enabled' AND r.destroyed_at IS NULL
            AND (now() >= c.created_at + make_interval(secs => COALESCE(r.rollover_days, $1) * 86400.0)
                 OR (SELECT COALESCE(sum(u.encryptions), 0) FROM immuta.key_usage u WHERE u.key_id = c.id) >= $2)
          ORDER BY c.keyring",
        &[
            (pg_sys::INT4OID, pg_sys::Datum::from(rollover_days as i32)),
            (pg_sys::INT8OID, pg_sys::Datum::from(limit.min(i64::MAX as u64) as i64)),
        ],
        |row| row.get::<String>(1),
    )
    .into_iter()
    .flatten()
    .collect()
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
        "immuta.key_usage",
        "WITH gone AS (
             DELETE FROM immuta.key_usage
             WHERE key_id IN (SELECT key_id FROM immuta.key_usage GROUP BY key_id HAVING count(*) > 1)
             RETURNING key_id, encryptions)
         INSERT INTO immuta.key_usage (key_id, encryptions)
         SELECT key_id, sum(encryptions) FROM gone GROUP BY key_id",
        &[],
    )
}
