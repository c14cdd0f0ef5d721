//! The SQL surface of blind indexes (`blind_index.rs`): terms for lookups and for term columns,
//! and the administration of index keys.

use immuta_core::value_type::ValueType;
use pgrx::prelude::*;
use pgrx::{pg_sys, AnyElement, PgSqlErrorCode};

use crate::blind_index;
use crate::errors::raise;
use crate::typed;
use crate::varlena::{Bytea, Bytes};

/// An index or keyring argument: NULL is an error (a lookup must not silently match nothing).
fn required<'a>(value: Option<&'a str>, what: &str) -> &'a str {
    value.unwrap_or_else(|| {
        raise(
            PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
            format!("immuta blind index {what} is NULL"),
            None,
            Some("Name the index, and its keyring if it is not the default one."),
        )
    })
}

fn keyring_of(keyring: Option<&str>) -> Option<&str> {
    Some(required(keyring, "keyring")).filter(|k| *k != immuta_core::keyrings::DEFAULT)
}

/// The term of a text value under index `name` (of `keyring`): what a term column holds and what
/// a lookup compares it with. STABLE, so `WHERE term = immuta_blind_index(...)` is an index scan.
#[pg_extern(
    stable,
    parallel_safe,
    sql = "CREATE FUNCTION immuta_blind_index(value text, name text, keyring text DEFAULT 'default') RETURNS bytea \
           STABLE PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'immuta_blind_index_text_wrapper';"
)]
fn immuta_blind_index_text(value: Option<Bytes>, name: Option<&str>, keyring: Option<&str>) -> Option<Bytea> {
    let (name, keyring) = (required(name, "name"), keyring_of(keyring));
    Some(blind_index::term(keyring, name, ValueType::TEXT, &value?))
}

/// The term of a value of any type immuta encrypts (its type is part of what is hashed).
#[pg_extern(
    stable,
    parallel_safe,
    sql = "CREATE FUNCTION immuta_blind_index(value anyelement, name text, keyring text DEFAULT 'default') \
           RETURNS bytea STABLE PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'immuta_blind_index_value_wrapper';"
)]
fn immuta_blind_index_value(
    value: Option<AnyElement>,
    name: Option<&str>,
    keyring: Option<&str>,
    fcinfo: pg_sys::FunctionCallInfo,
) -> Option<Bytea> {
    let (name, keyring) = (required(name, "name"), keyring_of(keyring));
    let value = value?;
    let (_, t) = typed::of_argument(fcinfo, 0);
    Some(typed::encode(&t, value.datum(), |encoding| {
        blind_index::term(keyring, name, t.value_type, encoding)
    }))
}

/// The terms of a text value under every enabled version of index `name`, newest first: while
/// an index key is rotated, `WHERE term = ANY(immuta_blind_indexes(...))` finds rows of either.
#[pg_extern(
    stable,
    parallel_safe,
    sql = "CREATE FUNCTION immuta_blind_indexes(value text, name text, keyring text DEFAULT 'default') \
           RETURNS bytea[] STABLE PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'immuta_blind_indexes_text_wrapper';"
)]
fn immuta_blind_indexes_text(
    value: Option<Bytes>,
    name: Option<&str>,
    keyring: Option<&str>,
) -> Option<Vec<Vec<u8>>> {
    let (name, keyring) = (required(name, "name"), keyring_of(keyring));
    Some(blind_index::terms(keyring, name, ValueType::TEXT, &value?))
}

/// The terms of a value of any type under every enabled version of index `name`.
#[pg_extern(
    stable,
    parallel_safe,
    sql = "CREATE FUNCTION immuta_blind_indexes(value anyelement, name text, keyring text DEFAULT 'default') \
           RETURNS bytea[] STABLE PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'immuta_blind_indexes_value_wrapper';"
)]
fn immuta_blind_indexes_value(
    value: Option<AnyElement>,
    name: Option<&str>,
    keyring: Option<&str>,
    fcinfo: pg_sys::FunctionCallInfo,
) -> Option<Vec<Vec<u8>>> {
    let (name, keyring) = (required(name, "name"), keyring_of(keyring));
    let value = value?;
    let (_, t) = typed::of_argument(fcinfo, 0);
    Some(typed::encode(&t, value.datum(), |encoding| {
        blind_index::terms(keyring, name, t.value_type, encoding)
    }))
}

/// Creates blind index `name` in `keyring`: version 1 of its index key. Returns the key's id.
#[pg_extern(
    volatile,
    parallel_unsafe,
    sql = "CREATE FUNCTION immuta_blind_index_create(name text, keyring text DEFAULT 'default', \
           term_length integer DEFAULT 16) RETURNS bigint VOLATILE PARALLEL UNSAFE LANGUAGE c \
           AS 'MODULE_PATHNAME', 'immuta_blind_index_create_wrapper';"
)]
fn immuta_blind_index_create(name: Option<&str>, keyring: Option<&str>, term_length: Option<i32>) -> i64 {
    let term_length = term_length.unwrap_or_else(|| {
        raise(
            PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
            "immuta blind index term length is NULL",
            None,
            None,
        )
    });
    blind_index::create(required(name, "name"), required(keyring, "keyring"), term_length)
}

/// A new version of index `name`'s key: it makes the terms from now on. Returns the version.
#[pg_extern(
    volatile,
    parallel_unsafe,
    sql = "CREATE FUNCTION immuta_blind_index_rotate(name text, keyring text DEFAULT 'default') RETURNS integer \
           VOLATILE PARALLEL UNSAFE LANGUAGE c AS 'MODULE_PATHNAME', 'immuta_blind_index_rotate_wrapper';"
)]
fn immuta_blind_index_rotate(name: Option<&str>, keyring: Option<&str>) -> i32 {
    blind_index::rotate(required(name, "name"), required(keyring, "keyring"))
}

/// Destroys the versions of index `name` older than its newest; refused while registered term
/// columns hold their terms, unless `force`. Returns how many versions were destroyed.
#[pg_extern(
    volatile,
    parallel_unsafe,
    sql = "CREATE FUNCTION immuta_blind_index_retire(name text, reason text, keyring text DEFAULT 'default', \
           force boolean DEFAULT false) RETURNS integer VOLATILE PARALLEL UNSAFE LANGUAGE c \
           AS 'MODULE_PATHNAME', 'immuta_blind_index_retire_wrapper';"
)]
fn immuta_blind_index_retire(
    name: Option<&str>,
    reason: Option<&str>,
    keyring: Option<&str>,
    force: Option<bool>,
) -> i32 {
    let reason = crate::key_states::reason(reason);
    blind_index::retire(required(name, "name"), required(keyring, "keyring"), reason, force.unwrap_or(false))
}

/// The functions of immuta's own schema that the term trigger and job call.
mod internal {
    use super::*;

    /// The term of the value sealed in `ciphertext` (opened with `context` when `bound`), under
    /// index `name` of `keyring` (NULL: the keyring of the value's key). Opening a value is the
    /// decryptor's: the term of any ciphertext is an equality test on its plaintext.
    #[pg_extern(
        stable,
        parallel_safe,
        sql = "CREATE FUNCTION immuta.blind_index_of(ciphertext bytea, bound boolean, context text, name text, \
               keyring text) RETURNS bytea STABLE PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'blind_index_of_wrapper';"
    )]
    fn blind_index_of(
        ciphertext: Option<Bytes>,
        bound: Option<bool>,
        context: Option<Bytes>,
        name: Option<&str>,
        keyring: Option<&str>,
    ) -> Option<Bytea> {
        let name = required(name, "name");
        let context = bound.unwrap_or(false).then(|| crate::functions::required(context.as_deref()));
        let keyring = keyring.filter(|k| !k.is_empty());
        Some(blind_index::term_of_ciphertext(&ciphertext?, context, name, keyring))
    }

    /// For the job that keeps a term column in step: true when the row's term is to be computed
    /// (missing, or made by an older version of the index), false when it is current, NULL when
    /// it cannot be computed (the value is not an immuta value, its key is unknown, disabled or
    /// destroyed, or its keyring is not `keyring` or has no such index). Reads only the header.
    #[pg_extern(
        stable,
        parallel_safe,
        sql = "CREATE FUNCTION immuta.blind_index_pending(term bytea, ciphertext bytea, name text, keyring text) \
               RETURNS boolean STABLE PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'blind_index_pending_wrapper';"
    )]
    fn blind_index_pending(
        term: Option<Bytes>,
        ciphertext: Option<Bytes>,
        name: Option<&str>,
        keyring: Option<&str>,
    ) -> Option<bool> {
        let name = required(name, "name");
        let keyring = keyring.filter(|k| !k.is_empty());
        blind_index::pending(term.as_deref(), &ciphertext?, name, keyring)
    }
}
