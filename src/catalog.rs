//! Reading and writing immuta's tables (sql/bootstrap.sql) through SPI.
//!
//! Only the slow path comes here: loading a key the backend has not seen, noticing a rotation,
//! creating a key, storing the configuration. Encryption and decryption of a row never do.
//! Queries are fixed strings with parameters; nothing is spliced into SQL.

use immuta_core::key::{KeyId, WrappedKey, WrappingKeyRef};
use immuta_core::rollover::RotationReason;
use immuta_core::time::UnixMicros;
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
    TableOids { data_keys, config }
}

fn spi<T>(result: Result<T, pgrx::spi::SpiError>) -> T {
    result.unwrap_or_else(|e| {
        raise(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, format!("immuta catalog access failed: {e}"), None, None)
    })
}

/// Freshness of a read: `Snapshot` reads with the statement's snapshot; `Latest` takes a new
/// snapshot (in READ COMMITTED) so that a key committed by another session after our statement
/// began is seen, as needed after waiting for the keys table lock.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Read {
    Snapshot,
    Latest,
}

/// The newest key (the one that encrypts) and its creation time.
pub fn current_key(read: Read) -> Option<(KeyId, UnixMicros)> {
    const Q: &str = "SELECT id, (extract(epoch FROM created_at) * 1000000)::int8 \
                     FROM immuta.data_keys ORDER BY id DESC LIMIT 1";
    let (id, created) = spi(Spi::connect_mut(|client| {
        let table = match read {
            Read::Snapshot => client.select(Q, Some(1), &[]),
            Read::Latest => client.update(Q, Some(1), &[]),
        }?;
        if table.is_empty() {
            return Ok((None, None));
        }
        table.first().get_two::<i64, i64>()
    }));
    Some((KeyId::new(id?)?, UnixMicros(created?)))
}

/// Every key id that exists.
pub fn key_ids() -> Vec<KeyId> {
    spi(Spi::connect(|client| {
        let table = client.select("SELECT id FROM immuta.data_keys", None, &[])?;
        let mut ids = Vec::with_capacity(table.len());
        for row in table {
            if let Some(id) = row.get::<i64>(1)?.and_then(KeyId::new) {
                ids.push(id);
            }
        }
        Ok(ids)
    }))
}

/// The row of key `id`, if it exists.
pub fn key_row(id: KeyId) -> Option<KeyRow> {
    let row = spi(Spi::connect(|client| {
        let table = client.select(
            "SELECT provider, wrapping_key, wrapping_region, wrapped_key FROM immuta.data_keys WHERE id = $1",
            Some(1),
            &[id.get().into()],
        )?;
        if table.is_empty() {
            return Ok(None);
        }
        let row = table.first();
        Ok(Some((
            row.get::<String>(1)?.unwrap_or_default(),
            row.get::<String>(2)?.unwrap_or_default(),
            row.get::<String>(3)?,
            row.get::<Vec<u8>>(4)?.unwrap_or_default(),
        )))
    }))?;
    let (provider, key, region, wrapped) = row;
    let wrapping = WrappingKeyRef::from_columns(&provider, &key, region.as_deref()).unwrap_or_else(|| {
        raise(
            PgSqlErrorCode::ERRCODE_DATA_CORRUPTED,
            format!("immuta data key {id} has an unrecognised wrapping key"),
            Some(format!("provider \"{provider}\" with wrapping key \"{key}\" is not one this immuta wrote.")),
            Some("The row of immuta.data_keys was altered; restore it from a backup."),
        )
    });
    Some(KeyRow { id, wrapping, wrapped: WrappedKey::new(wrapped) })
}

/// Whether any key is wrapped by a local master key (then a missing master key file is an error,
/// never a reason to generate one).
pub fn any_local_key() -> bool {
    spi(Spi::connect_mut(|client| {
        client
            .update("SELECT EXISTS (SELECT 1 FROM immuta.data_keys WHERE provider = 'local')", Some(1), &[])?
            .first()
            .get_one::<bool>()
    }))
    .unwrap_or(false)
}

/// A new key id from `immuta.data_keys_id_seq`.
pub fn next_key_id() -> KeyId {
    let id = spi(Spi::get_one::<i64>("SELECT nextval('immuta.data_keys_id_seq')"));
    id.and_then(KeyId::new).unwrap_or_else(|| {
        raise(PgSqlErrorCode::ERRCODE_DATA_CORRUPTED, "immuta.data_keys_id_seq returned a non-positive id", None, None)
    })
}

/// Inserts a key row. With `rolled_over_from` set, at most one key may ever succeed a given key
/// (a unique column): returns `false` when another session already rolled that key over.
pub fn insert_key(
    id: KeyId,
    wrapping: &WrappingKeyRef,
    wrapped: &WrappedKey,
    reason: RotationReason,
    rolled_over_from: Option<i64>,
) -> bool {
    spi(Spi::connect_mut(|client| {
        let table = client.update(
            "INSERT INTO immuta.data_keys \
                 (id, provider, wrapping_key, wrapping_region, wrapped_key, reason, rolled_over_from) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT (rolled_over_from) DO NOTHING RETURNING id",
            Some(1),
            &[
                id.get().into(),
                wrapping.provider().as_str().into(),
                wrapping.key_column().into(),
                wrapping.region_column().into(),
                wrapped.as_bytes().into(),
                reason.as_str().into(),
                rolled_over_from.into(),
            ],
        )?;
        Ok(!table.is_empty())
    }))
}

/// The YAML stored by `immuta_configure()`, if any.
pub fn stored_config() -> Option<String> {
    spi(Spi::connect(|client| {
        let table = client.select("SELECT yaml FROM immuta.config", Some(1), &[])?;
        if table.is_empty() {
            return Ok(None);
        }
        table.first().get_one::<String>()
    }))
}

/// Stores the configuration YAML (one row).
pub fn store_config(yaml: &str) {
    spi(Spi::connect_mut(|client| {
        client.update(
            "INSERT INTO immuta.config (singleton, yaml) VALUES (true, $1) \
             ON CONFLICT (singleton) DO UPDATE \
             SET yaml = EXCLUDED.yaml, updated_at = now(), updated_by = current_user",
            None,
            &[yaml.into()],
        )?;
        Ok(())
    }))
}
