//! Reads and writes of `immuta.index_keys`: the keys of blind indexes (`blind_index.rs`). Rows
//! have the wrapping columns of `immuta.data_keys`, read into the same [`KeyRow`], so that they
//! are unwrapped, cached and rewrapped as data keys are; they are never data keys (a ciphertext
//! header naming one of their ids names no data key).

use immuta_core::blind_index;
use immuta_core::key::{KeyId, WrappedKey, WrappingKeyRef};
use pgrx::prelude::*;
use pgrx::{pg_sys, PgSqlErrorCode};

use super::{
    caller, key_row_columns, key_row_from, read_latest, text_arg, wrapping_args, write, KeyColumns, KeyRow,
    Row,
};
use crate::errors::raise;

/// One row of `immuta.index_keys`.
pub struct IndexKeyRow {
    pub key: KeyRow,
    pub name: String,
    pub version: u16,
    pub term_len: u8,
}

type Columns = (KeyColumns, String, i32, i16);

fn columns(row: &Row) -> Columns {
    (
        key_row_columns(row),
        row.get::<String>(9).unwrap_or_default(),
        row.get::<i32>(10).unwrap_or_default(),
        row.get::<i16>(11).unwrap_or_default(),
    )
}

fn parse((key, name, version, term_len): Columns) -> IndexKeyRow {
    let key = key_row_from(key, corrupt);
    let id = key.id.get();
    let version = u16::try_from(version)
        .ok()
        .filter(|v| *v >= 1)
        .unwrap_or_else(|| corrupt(id, "has a version out of range"));
    if !blind_index::term_len_ok(i32::from(term_len)) {
        corrupt(id, "has a term length out of range");
    }
    IndexKeyRow { key, name, version, term_len: term_len as u8 }
}

fn corrupt(id: i64, why: &str) -> ! {
    raise(
        PgSqlErrorCode::ERRCODE_DATA_CORRUPTED,
        format!("immuta index key {id} has a row immuta cannot use"),
        Some(format!("The row of immuta.index_keys {why}.")),
        Some("The row was altered or restored from a damaged dump; restore it from a backup."),
    )
}

/// The versions of index `name` of `keyring`, newest first (destroyed ones included: a keyring
/// destroyed makes every one of them destroyed).
pub fn index_key_rows(keyring: &str, name: &str) -> Vec<IndexKeyRow> {
    read_latest(
        c"SELECT k.id, k.provider, k.wrapping_key, k.wrapping_region, k.wrapped_key, k.server_identity, \
                 k.keyring, CASE WHEN r.destroyed_at IS NOT NULL THEN 'destroyed' ELSE k.state END, k.name, \
                 k.version, k.term_length \
          FROM immuta.index_keys k LEFT JOIN immuta.keyrings r ON r.name = k.keyring \
          WHERE k.keyring = $1 AND k.name = $2 ORDER BY k.version DESC",
        &[text_arg(keyring), text_arg(name)],
        columns,
    )
    .into_iter()
    .map(parse)
    .collect()
}

/// Every index key of `keyring`, or of every keyring, in id order, with the state of its row
/// (whether or not its keyring was destroyed).
pub fn all_index_key_rows(keyring: Option<&str>) -> Vec<IndexKeyRow> {
    let rows = match keyring {
        Some(keyring) => read_latest(
            c"SELECT k.id, k.provider, k.wrapping_key, k.wrapping_region, k.wrapped_key, k.server_identity, \
                     k.keyring, k.state, k.name, k.version, k.term_length \
              FROM immuta.index_keys k WHERE k.keyring = $1 ORDER BY k.id",
            &[text_arg(keyring)],
            columns,
        ),
        None => read_latest(
            c"SELECT k.id, k.provider, k.wrapping_key, k.wrapping_region, k.wrapped_key, k.server_identity, \
                     k.keyring, k.state, k.name, k.version, k.term_length \
              FROM immuta.index_keys k ORDER BY k.id",
            &[],
            columns,
        ),
    };
    rows.into_iter().map(parse).collect()
}

/// Stores a new version of an index key.
#[allow(clippy::too_many_arguments)]
pub fn insert_index_key(
    id: KeyId,
    wrapping: &WrappingKeyRef,
    wrapped: &WrappedKey,
    server_identity: bool,
    keyring: &str,
    name: &str,
    version: u16,
    term_len: u8,
) {
    let [id_, provider, key, region, bytes] = wrapping_args(id, wrapping, wrapped);
    let (role, _) = caller();
    write(
        "immuta.index_keys",
        "INSERT INTO immuta.index_keys \
             (id, provider, wrapping_key, wrapping_region, wrapped_key, server_identity, keyring, name, version, \
              term_length, created_by) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, pg_catalog.pg_get_userbyid($11))",
        &[
            id_,
            provider,
            key,
            region,
            bytes,
            server_identity.into(),
            keyring.into(),
            name.into(),
            i32::from(version).into(),
            i16::from(term_len).into(),
            role.into(),
        ],
    )
}

/// Records a new wrapping of index key `id` (`immuta_rewrap()`).
pub fn update_index_wrapping(
    id: KeyId,
    wrapping: &WrappingKeyRef,
    wrapped: &WrappedKey,
    server_identity: bool,
) {
    let [id_, provider, key, region, bytes] = wrapping_args(id, wrapping, wrapped);
    write(
        "immuta.index_keys",
        "UPDATE immuta.index_keys SET provider = $2, wrapping_key = $3, wrapping_region = $4, wrapped_key = $5, \
         server_identity = $6 WHERE id = $1",
        &[id_, provider, key, region, bytes, server_identity.into()],
    )
}

/// Destroys index key `id`: its wrapped key is erased, the row stays as a tombstone.
pub fn destroy_index_key(id: KeyId) {
    let (role, _) = caller();
    write(
        "immuta.index_keys",
        "UPDATE immuta.index_keys SET state = 'destroyed', wrapped_key = NULL, state_changed_at = pg_catalog.now(), \
             state_changed_by = pg_catalog.pg_get_userbyid($2) WHERE id = $1",
        &[id.get().into(), role.into()],
    )
}

/// Whether a key of id `id` is in the other key table than `table` (a restore must not give one
/// id to a data key and an index key).
pub fn id_in_other_table(table: &str, id: i64) -> bool {
    let query = if table == "data_keys" {
        c"SELECT 1 FROM immuta.index_keys WHERE id = $1"
    } else {
        c"SELECT 1 FROM immuta.data_keys WHERE id = $1"
    };
    !read_latest(query, &[(pg_sys::INT8OID, pg_sys::Datum::from(id))], |_| ()).is_empty()
}

/// The registered term columns (`immuta.blind_index_columns`) of index `name` of `keyring` that
/// hold terms older than `version`: table, column and count. Run as the caller, with the caller's
/// privileges on those tables (`immuta.blind_index_references`).
pub fn blind_index_references(name: &str, keyring: &str, version: u16) -> Vec<(String, String, i64)> {
    super::spi(Spi::connect(|client| {
        let rows = client.select(
            "SELECT pg_catalog.format('%I.%I', n.nspname, c.relname), r.column_name::pg_catalog.text, r.term_count \
             FROM immuta.blind_index_references($1::pg_catalog.text, $2::pg_catalog.text, $3::pg_catalog.int4) r \
             JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) r.table_name::pg_catalog.oid \
             JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace \
             WHERE r.term_count OPERATOR(pg_catalog.>) 0",
            None,
            &[name.into(), keyring.into(), i32::from(version).into()],
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
