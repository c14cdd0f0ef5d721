//! The SQL surface: each function converts its arguments, calls the backend or the core, and
//! returns. The semantics live in `backend.rs`, `keys.rs` and the core crate.

use immuta_core::config::Config;
use immuta_core::format;
use immuta_core::key::ProviderKind;
use immuta_core::value_type::ValueType;
use pgrx::prelude::*;
use pgrx::{pg_sys, AnyElement, FromDatum, JsonB, PgSqlErrorCode};

use crate::backend;
use crate::catalog;
use crate::errors::{self, raise, ConfigOrigin, OrRaise};
use crate::gucs;
use crate::keys;
use crate::typed;
use crate::varlena::{Bytea, Bytes, Text};

mod blind_index;

/// Encrypts a text value under the current data key. VOLATILE: a fresh random nonce per call.
/// The argument is read as the raw bytes of the `text` (UTF-8, checked once per backend).
#[pg_extern(
    volatile,
    strict,
    parallel_safe,
    sql = "CREATE FUNCTION immuta_encrypt(plaintext text) RETURNS bytea \
           VOLATILE STRICT PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'immuta_encrypt_wrapper';"
)]
fn immuta_encrypt(plaintext: Bytes) -> Bytea {
    keys::encrypt(None, ValueType::TEXT, None, &plaintext)
}

/// The longest context immuta takes (64 KiB): a context names a place, and longer input would
/// only be a way to make immuta allocate.
const MAX_CONTEXT_LEN: usize = 64 * 1024;

/// A context is required where one is named: NULL would bind the value to nothing (when
/// encrypting), or let a value bound to nothing through (when decrypting).
pub(crate) fn required(context: Option<&[u8]>) -> &[u8] {
    let context = context.unwrap_or_else(|| {
        raise(
            PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
            "immuta context is NULL",
            Some(
                "A value encrypted with a context decrypts only with the same context; NULL names none."
                    .into(),
            ),
            Some(
                "Build the context from columns that are never NULL (a primary key). For a value encrypted \
                 without a context, call the function without one.",
            ),
        )
    });
    if context.len() > MAX_CONTEXT_LEN {
        raise(
            PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            "immuta context is too long",
            Some(format!(
                "The context is {} bytes long; immuta takes at most {MAX_CONTEXT_LEN}.",
                context.len()
            )),
            Some("Name the place of the value (table, column, primary key), not its content."),
        );
    }
    context
}

/// Encrypts a text value bound to `context` (authenticated, not stored). Not STRICT: a NULL
/// context is an error, a NULL value gives NULL.
#[pg_extern(
    volatile,
    parallel_safe,
    sql = "CREATE FUNCTION immuta_encrypt(plaintext text, context text) RETURNS bytea \
           VOLATILE PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'immuta_encrypt_text_context_wrapper';"
)]
fn immuta_encrypt_text_context(plaintext: Option<Bytes>, context: Option<Bytes>) -> Option<Bytea> {
    let context = required(context.as_deref());
    Some(keys::encrypt(None, ValueType::TEXT, Some(context), &plaintext?))
}

/// Encrypts a value of any type immuta knows (typed.rs); the ciphertext records the type.
#[pg_extern(
    volatile,
    strict,
    parallel_safe,
    sql = "CREATE FUNCTION immuta_encrypt(value anyelement) RETURNS bytea \
           VOLATILE STRICT PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'immuta_encrypt_value_wrapper';"
)]
fn immuta_encrypt_value(value: AnyElement, fcinfo: pg_sys::FunctionCallInfo) -> Bytea {
    encrypt_typed(&value, fcinfo, None)
}

/// Encrypts a value of any type immuta knows, bound to `context`.
#[pg_extern(
    volatile,
    parallel_safe,
    sql = "CREATE FUNCTION immuta_encrypt(value anyelement, context text) RETURNS bytea \
           VOLATILE PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'immuta_encrypt_value_context_wrapper';"
)]
fn immuta_encrypt_value_context(
    value: Option<AnyElement>,
    context: Option<Bytes>,
    fcinfo: pg_sys::FunctionCallInfo,
) -> Option<Bytea> {
    let context = required(context.as_deref());
    Some(encrypt_typed(&value?, fcinfo, Some(context)))
}

fn encrypt_typed(value: &AnyElement, fcinfo: pg_sys::FunctionCallInfo, context: Option<&[u8]>) -> Bytea {
    encrypt_typed_in(None, value, fcinfo, context)
}

fn encrypt_typed_in(
    keyring: Option<&str>,
    value: &AnyElement,
    fcinfo: pg_sys::FunctionCallInfo,
    context: Option<&[u8]>,
) -> Bytea {
    let (_, t) = typed::of_argument(fcinfo, 0);
    typed::encode(&t, value.datum(), |plaintext| keys::encrypt(keyring, t.value_type, context, plaintext))
}

/// The keyring argument: NULL is an error (a row whose tenant is unknown must not fall back to
/// the default keyring); `'default'` is the default keyring.
fn keyring_argument(keyring: Option<&str>) -> Option<&str> {
    let keyring = keyring.unwrap_or_else(|| {
        raise(
            PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
            "immuta keyring is NULL",
            Some("A value is encrypted under a keyring that is named; NULL names none.".into()),
            Some("Name the keyring, or call immuta_encrypt without keyring => for the default keyring."),
        )
    });
    (keyring != immuta_core::keyrings::DEFAULT).then_some(keyring)
}

/// Encrypts a value under the current key of keyring `keyring` (created by an administrator;
/// an unknown name is an error). Decryption needs no keyring: the key id says.
#[pg_extern(
    volatile,
    parallel_safe,
    sql = "CREATE FUNCTION immuta_encrypt(value anyelement, keyring @extschema@.immuta_keyring) RETURNS bytea \
           VOLATILE PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'immuta_encrypt_keyring_wrapper';"
)]
fn immuta_encrypt_keyring(
    value: Option<AnyElement>,
    keyring: Option<&str>,
    fcinfo: pg_sys::FunctionCallInfo,
) -> Option<Bytea> {
    let keyring = keyring_argument(keyring);
    Some(encrypt_typed_in(keyring, &value?, fcinfo, None))
}

/// A text value under keyring `keyring` (so that a string literal needs no cast).
#[pg_extern(
    volatile,
    parallel_safe,
    sql = "CREATE FUNCTION immuta_encrypt(plaintext text, keyring @extschema@.immuta_keyring) RETURNS bytea \
           VOLATILE PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'immuta_encrypt_text_keyring_wrapper';"
)]
fn immuta_encrypt_text_keyring(plaintext: Option<Bytes>, keyring: Option<&str>) -> Option<Bytea> {
    let keyring = keyring_argument(keyring);
    Some(keys::encrypt(keyring, ValueType::TEXT, None, &plaintext?))
}

/// A text value under keyring `keyring`, bound to `context`.
#[pg_extern(
    volatile,
    parallel_safe,
    sql = "CREATE FUNCTION immuta_encrypt(plaintext text, context text, keyring @extschema@.immuta_keyring) \
           RETURNS bytea VOLATILE PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'immuta_encrypt_text_context_keyring_wrapper';"
)]
fn immuta_encrypt_text_context_keyring(
    plaintext: Option<Bytes>,
    context: Option<Bytes>,
    keyring: Option<&str>,
) -> Option<Bytea> {
    let context = required(context.as_deref());
    let keyring = keyring_argument(keyring);
    Some(keys::encrypt(keyring, ValueType::TEXT, Some(context), &plaintext?))
}

/// [`immuta_encrypt_keyring`] bound to `context`.
#[pg_extern(
    volatile,
    parallel_safe,
    sql = "CREATE FUNCTION immuta_encrypt(value anyelement, context text, keyring @extschema@.immuta_keyring) \
           RETURNS bytea VOLATILE PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'immuta_encrypt_context_keyring_wrapper';"
)]
fn immuta_encrypt_context_keyring(
    value: Option<AnyElement>,
    context: Option<Bytes>,
    keyring: Option<&str>,
    fcinfo: pg_sys::FunctionCallInfo,
) -> Option<Bytea> {
    let context = required(context.as_deref());
    let keyring = keyring_argument(keyring);
    Some(encrypt_typed_in(keyring, &value?, fcinfo, Some(context)))
}

/// Decrypts a text value produced by `immuta_encrypt` without a context (format 1 or 2).
/// STABLE, not IMMUTABLE: the result depends on the keys table and the master key.
#[pg_extern(stable, strict, parallel_safe)]
fn immuta_decrypt(ciphertext: Bytes) -> Text {
    backend::decrypt_text(&ciphertext, None)
}

/// Decrypts a text value with the context it was encrypted with (NULL: `22004`).
#[pg_extern(
    stable,
    parallel_safe,
    sql = "CREATE FUNCTION immuta_decrypt(ciphertext bytea, context text) RETURNS text \
           STABLE PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'immuta_decrypt_context_wrapper';"
)]
fn immuta_decrypt_context(ciphertext: Option<Bytes>, context: Option<Bytes>) -> Option<Text> {
    let context = required(context.as_deref());
    Some(backend::decrypt_text(&ciphertext?, Some(context)))
}

/// Decrypts a value of the type of `as_type` (usually a typed NULL: `NULL::numeric`), in the
/// manner of `jsonb_populate_record`.
#[pg_extern(
    stable,
    parallel_safe,
    sql = "CREATE FUNCTION immuta_decrypt(ciphertext bytea, as_type anyelement) RETURNS anyelement \
           STABLE PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'immuta_decrypt_as_wrapper';"
)]
fn immuta_decrypt_as(
    ciphertext: Option<Bytes>,
    _as_type: Option<AnyElement>,
    fcinfo: pg_sys::FunctionCallInfo,
) -> Option<AnyElement> {
    decrypt_typed(&ciphertext?, typed::of_argument(fcinfo, 1), None)
}

/// [`immuta_decrypt_as`] with the context the value was encrypted with (NULL: `22004`).
#[pg_extern(
    stable,
    parallel_safe,
    sql = "CREATE FUNCTION immuta_decrypt(ciphertext bytea, as_type anyelement, context text) RETURNS anyelement \
           STABLE PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'immuta_decrypt_as_context_wrapper';"
)]
fn immuta_decrypt_as_context(
    ciphertext: Option<Bytes>,
    _as_type: Option<AnyElement>,
    context: Option<Bytes>,
    fcinfo: pg_sys::FunctionCallInfo,
) -> Option<AnyElement> {
    let context = required(context.as_deref());
    decrypt_typed(&ciphertext?, typed::of_argument(fcinfo, 1), Some(context))
}

/// Decrypts to the SQL type `oid`, whose [`typed::SqlType`] is `t`.
fn decrypt_typed(
    ciphertext: &[u8],
    (oid, t): (pg_sys::Oid, typed::SqlType),
    context: Option<&[u8]>,
) -> Option<AnyElement> {
    typed::refuse_domain(&t, oid);
    let datum =
        backend::decrypt_with(ciphertext, t.value_type, context, |with_nul| typed::decode(&t, with_nul));
    // SAFETY: `datum` is a non-NULL value of type `oid`, which is the call's result type.
    unsafe { AnyElement::from_polymorphic_datum(datum, false, oid) }
}

/// Decrypts a `bytea` value encrypted without a context.
#[pg_extern(
    stable,
    strict,
    parallel_safe,
    sql = "CREATE FUNCTION immuta_decrypt_bytea(ciphertext bytea) RETURNS bytea \
           STABLE STRICT PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'immuta_decrypt_bytea_wrapper';"
)]
fn immuta_decrypt_bytea(ciphertext: Bytes) -> Bytea {
    backend::decrypt_bytea(&ciphertext, None)
}

/// Decrypts a `bytea` value with its context.
#[pg_extern(
    stable,
    parallel_safe,
    sql = "CREATE FUNCTION immuta_decrypt_bytea(ciphertext bytea, context text) RETURNS bytea \
           STABLE PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'immuta_decrypt_bytea_context_wrapper';"
)]
fn immuta_decrypt_bytea_context(ciphertext: Option<Bytes>, context: Option<Bytes>) -> Option<Bytea> {
    let context = required(context.as_deref());
    Some(backend::decrypt_bytea(&ciphertext?, Some(context)))
}

fn jsonb() -> (pg_sys::Oid, typed::SqlType) {
    (pg_sys::JSONBOID, typed::sql_type(pg_sys::JSONBOID))
}

/// Decrypts a `jsonb` value encrypted without a context.
#[pg_extern(
    stable,
    strict,
    parallel_safe,
    sql = "CREATE FUNCTION immuta_decrypt_jsonb(ciphertext bytea) RETURNS jsonb \
           STABLE STRICT PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'immuta_decrypt_jsonb_wrapper';"
)]
fn immuta_decrypt_jsonb(ciphertext: Bytes) -> Option<AnyElement> {
    decrypt_typed(&ciphertext, jsonb(), None)
}

/// Decrypts a `jsonb` value with its context.
#[pg_extern(
    stable,
    parallel_safe,
    sql = "CREATE FUNCTION immuta_decrypt_jsonb(ciphertext bytea, context text) RETURNS jsonb \
           STABLE PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'immuta_decrypt_jsonb_context_wrapper';"
)]
fn immuta_decrypt_jsonb_context(ciphertext: Option<Bytes>, context: Option<Bytes>) -> Option<AnyElement> {
    let context = required(context.as_deref());
    decrypt_typed(&ciphertext?, jsonb(), Some(context))
}

/// The same value under the current key of its keyring (same type, no context): the same bytes
/// when it already is. The plaintext never reaches SQL.
#[pg_extern(
    volatile,
    strict,
    parallel_safe,
    sql = "CREATE FUNCTION immuta_reencrypt(ciphertext bytea) RETURNS bytea \
           VOLATILE STRICT PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'immuta_reencrypt_wrapper';"
)]
fn immuta_reencrypt(ciphertext: Bytes) -> Option<Bytea> {
    keys::reencrypt(&ciphertext, None).or_else(|| Some(same_bytes(&ciphertext)))
}

/// [`immuta_reencrypt`] of a value sealed with `context`, which it keeps.
#[pg_extern(
    volatile,
    parallel_safe,
    sql = "CREATE FUNCTION immuta_reencrypt(ciphertext bytea, context text) RETURNS bytea \
           VOLATILE PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'immuta_reencrypt_context_wrapper';"
)]
fn immuta_reencrypt_context(ciphertext: Option<Bytes>, context: Option<Bytes>) -> Option<Bytea> {
    let context = required(context.as_deref());
    let ciphertext = ciphertext?;
    keys::reencrypt(&ciphertext, Some(context)).or_else(|| Some(same_bytes(&ciphertext)))
}

fn same_bytes(value: &[u8]) -> Bytea {
    crate::varlena::bytea(value.len(), |out| out.copy_from_slice(value))
}

/// Whether data key `key_id` is the current key of its keyring: the filter of an online
/// re-encryption (`immuta_reencrypt_column`) that moves values off every other key.
#[pg_extern(
    stable,
    strict,
    parallel_safe,
    sql = "CREATE FUNCTION immuta_key_is_current(key_id bigint) RETURNS boolean \
           STABLE STRICT PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'immuta_key_is_current_wrapper';"
)]
fn immuta_key_is_current(key_id: i64) -> bool {
    let id = immuta_core::key::KeyId::new(key_id).unwrap_or_else(|| {
        raise(
            PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            "immuta data key does not exist",
            Some("Key ids are positive.".into()),
            None,
        )
    });
    keys::is_current(id)
}

/// Whether a ciphertext is under the current key of its key's keyring (reads the header only):
/// `immuta_key_is_current(immuta_key_id(c))` in one call, the filter of an online re-encryption.
#[pg_extern(
    stable,
    strict,
    parallel_safe,
    sql = "CREATE FUNCTION immuta_is_current(ciphertext bytea) RETURNS boolean \
           STABLE STRICT PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'immuta_is_current_wrapper';"
)]
fn immuta_is_current(ciphertext: Bytes) -> bool {
    keys::is_current(format::parse(&ciphertext).or_raise().key_id)
}

/// The id of the data key a ciphertext was encrypted under (reads the header only), to find the
/// values still under an old key.
#[pg_extern(immutable, strict, parallel_safe)]
fn immuta_key_id(ciphertext: Bytes) -> i64 {
    format::parse(&ciphertext).or_raise().key_id.get()
}

/// Creates a new data key and makes it the one that encrypts; returns its id.
#[pg_extern(volatile, parallel_unsafe)]
fn immuta_rotate() -> i64 {
    keys::rotate(immuta_core::keyrings::DEFAULT).get()
}

/// Creates a new data key of keyring `keyring` and makes it the one that encrypts there.
#[pg_extern(
    volatile,
    strict,
    parallel_unsafe,
    sql = "CREATE FUNCTION immuta_rotate(keyring text) RETURNS bigint \
           VOLATILE STRICT PARALLEL UNSAFE LANGUAGE c AS 'MODULE_PATHNAME', 'immuta_rotate_keyring_wrapper';"
)]
fn immuta_rotate_keyring(keyring: &str) -> i64 {
    keys::rotate(keyring).get()
}

/// Rolls the current key over if it is `schedule.dataKeyRollOverLength` days old or has reached
/// `immuta.max_encryptions_per_key`; returns the new key's id, or NULL when nothing was due, no
/// key exists yet, or the server is a standby or the transaction read-only (so one scheduled job
/// can run on every node of a replicated cluster).
#[pg_extern(volatile, parallel_unsafe)]
fn immuta_rotate_if_due() -> Option<i64> {
    keys::rotate_if_due().map(|id| id.get())
}

/// What the pg_cron job of `immuta_schedule_rotation()` runs: `immuta_rotate_if_due()`.
///
/// It lives in `pg_catalog`, the one schema in which no database owner can create, rename or
/// replace anything, because the job runs as the role that scheduled it (often a superuser):
/// a job command naming any other schema (`public`, even `immuta`, which a database owner could
/// create after dropping the extension) could be made to run the owner's code as that role. After
/// `DROP EXTENSION` the function is gone with it, and a job left behind fails harmlessly.
#[pg_extern(
    volatile,
    parallel_unsafe,
    sql = "CREATE FUNCTION pg_catalog.immuta_rotation_job() RETURNS bigint \
           VOLATILE PARALLEL UNSAFE LANGUAGE c AS 'MODULE_PATHNAME', 'immuta_rotation_job_wrapper';"
)]
fn immuta_rotation_job() -> Option<i64> {
    // A job that waits for a lock must not wait forever: it holds one of pg_cron's job slots,
    // which the whole cluster shares. Five minutes, unless the session chose a limit itself.
    // SAFETY: reads the lock_timeout setting.
    if unsafe { pg_sys::LockTimeout } == 0 {
        gucs::set_for(c"lock_timeout", c"5min", pg_sys::GucAction::GUC_ACTION_LOCAL);
    }
    crate::keys::rotate_if_due().map(|id| id.get())
}

/// Registers, or updates, this database's pg_cron job that runs `immuta_rotate_if_due()` on
/// `schedule` (cron syntax, in GMT as pg_cron reads it); returns the pg_cron job id.
#[pg_extern(
    volatile,
    strict,
    parallel_unsafe,
    sql = "CREATE FUNCTION immuta_schedule_rotation(schedule text DEFAULT '0 3 * * *') RETURNS bigint \
           VOLATILE STRICT PARALLEL UNSAFE LANGUAGE c AS 'MODULE_PATHNAME', 'immuta_schedule_rotation_wrapper';"
)]
fn immuta_schedule_rotation(schedule: &str) -> i64 {
    crate::cron::schedule(schedule)
}

/// Removes this database's rotation job; returns whether there was one.
#[pg_extern(volatile, parallel_unsafe)]
fn immuta_unschedule_rotation() -> bool {
    crate::cron::unschedule()
}

/// A summary of key management in this database: the current key (age, rollover due date,
/// encryptions against the limit, provider and wrapping key), the key count, the provider for
/// new keys, the cache mode, and the pg_cron rotation job.
#[pg_extern(volatile, parallel_unsafe)]
fn immuta_status() -> JsonB {
    JsonB(crate::status::status())
}

/// The state of keyring `keyring`: its current key (age, due date, usage), its keys by state,
/// its settings.
#[pg_extern(
    volatile,
    strict,
    parallel_unsafe,
    sql = "CREATE FUNCTION immuta_status(keyring text) RETURNS jsonb \
           VOLATILE STRICT PARALLEL UNSAFE LANGUAGE c AS 'MODULE_PATHNAME', 'immuta_status_keyring_wrapper';"
)]
fn immuta_status_keyring(keyring: &str) -> JsonB {
    JsonB(crate::keyrings::status(keyring))
}

fn name_argument(name: Option<&str>) -> &str {
    name.unwrap_or_else(|| {
        raise(PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED, "immuta keyring name is NULL", None, None)
    })
}

/// Creates keyring `name`, with its own rollover length and KMS key if given (NULL: the
/// configuration's).
#[pg_extern(
    volatile,
    parallel_unsafe,
    sql = "CREATE FUNCTION immuta_keyring_create(name text, rollover_days integer DEFAULT NULL, \
           kms_key text DEFAULT NULL, kms_region text DEFAULT NULL) RETURNS void \
           VOLATILE PARALLEL UNSAFE LANGUAGE c AS 'MODULE_PATHNAME', 'immuta_keyring_create_wrapper';"
)]
fn immuta_keyring_create(
    name: Option<&str>,
    rollover_days: Option<i32>,
    kms_key: Option<&str>,
    kms_region: Option<&str>,
) {
    crate::keyrings::create(name_argument(name), rollover_days, kms_key, kms_region)
}

/// Replaces the settings of keyring `name` (NULL: the configuration's).
#[pg_extern(
    volatile,
    parallel_unsafe,
    sql = "CREATE FUNCTION immuta_keyring_configure(name text, rollover_days integer DEFAULT NULL, \
           kms_key text DEFAULT NULL, kms_region text DEFAULT NULL) RETURNS void \
           VOLATILE PARALLEL UNSAFE LANGUAGE c AS 'MODULE_PATHNAME', 'immuta_keyring_configure_wrapper';"
)]
fn immuta_keyring_configure(
    name: Option<&str>,
    rollover_days: Option<i32>,
    kms_key: Option<&str>,
    kms_region: Option<&str>,
) {
    crate::keyrings::configure(name_argument(name), rollover_days, kms_key, kms_region)
}

/// Crypto-shreds keyring `name`: destroys all its keys and the keyring; returns how many keys.
#[pg_extern(
    volatile,
    parallel_unsafe,
    sql = "CREATE FUNCTION immuta_keyring_destroy(name text, reason text) RETURNS integer \
           VOLATILE PARALLEL UNSAFE LANGUAGE c AS 'MODULE_PATHNAME', 'immuta_keyring_destroy_wrapper';"
)]
fn immuta_keyring_destroy(name: Option<&str>, reason: Option<&str>) -> i32 {
    let reason = crate::key_states::reason(reason);
    let name = name_argument(name);
    // Its data keys, then its blind indexes' keys (crypto-shredding reaches the terms too).
    crate::key_states::destroy_keyring(name, reason) + crate::blind_index::destroy_keyring(name, reason)
}

fn key_id_argument(key_id: Option<i64>) -> i64 {
    key_id.unwrap_or_else(|| {
        raise(PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED, "immuta key id is NULL", None, None)
    })
}

/// Disables key `key_id`: values under it fail to decrypt until it is enabled again.
#[pg_extern(
    volatile,
    parallel_unsafe,
    sql = "CREATE FUNCTION immuta_key_disable(key_id bigint, reason text) RETURNS boolean \
           VOLATILE PARALLEL UNSAFE LANGUAGE c AS 'MODULE_PATHNAME', 'immuta_key_disable_wrapper';"
)]
fn immuta_key_disable(key_id: Option<i64>, reason: Option<&str>) -> bool {
    let reason = crate::key_states::reason(reason);
    crate::key_states::change(key_id_argument(key_id), immuta_core::key_state::Change::Disable, reason)
}

/// Enables a disabled key `key_id` again.
#[pg_extern(
    volatile,
    parallel_unsafe,
    sql = "CREATE FUNCTION immuta_key_enable(key_id bigint, reason text) RETURNS boolean \
           VOLATILE PARALLEL UNSAFE LANGUAGE c AS 'MODULE_PATHNAME', 'immuta_key_enable_wrapper';"
)]
fn immuta_key_enable(key_id: Option<i64>, reason: Option<&str>) -> bool {
    let reason = crate::key_states::reason(reason);
    crate::key_states::change(key_id_argument(key_id), immuta_core::key_state::Change::Enable, reason)
}

/// Destroys a disabled key `key_id`: its wrapped key is erased, for good. Refused while a
/// registered column still holds values under it (`immuta_key_references`), unless `force`.
#[pg_extern(
    volatile,
    parallel_unsafe,
    sql = "CREATE FUNCTION immuta_key_destroy(key_id bigint, reason text, force boolean DEFAULT false) \
           RETURNS boolean VOLATILE PARALLEL UNSAFE LANGUAGE c AS 'MODULE_PATHNAME', 'immuta_key_destroy_wrapper';"
)]
fn immuta_key_destroy(key_id: Option<i64>, reason: Option<&str>, force: Option<bool>) -> bool {
    let reason = crate::key_states::reason(reason);
    crate::key_states::destroy(key_id_argument(key_id), reason, force.unwrap_or(false))
}

/// Disables every enabled key of `keyring` older than its key `key_id` (Vault's
/// `min_decryption_version`); returns how many.
#[pg_extern(
    volatile,
    parallel_unsafe,
    sql = "CREATE FUNCTION immuta_disable_keys_before(keyring text, key_id bigint, reason text) RETURNS integer \
           VOLATILE PARALLEL UNSAFE LANGUAGE c AS 'MODULE_PATHNAME', 'immuta_disable_keys_before_wrapper';"
)]
fn immuta_disable_keys_before(keyring: Option<&str>, key_id: Option<i64>, reason: Option<&str>) -> i32 {
    let reason = crate::key_states::reason(reason);
    crate::key_states::disable_before(name_argument(keyring), key_id_argument(key_id), reason)
}

/// Wraps every data key again with the provider and key configured now (e.g. from the local
/// master key to AWS KMS, or from one KMS key to another); returns the number of keys. Stored
/// ciphertexts are untouched and all still decrypt.
#[pg_extern(volatile, parallel_unsafe)]
fn immuta_rewrap() -> i32 {
    crate::keys::rewrap() + crate::blind_index::rewrap()
}

/// Drops the cached unwrapped data keys of this database: from the shared cache and from every
/// backend of this database at its next immuta call (without preload: this backend's). With
/// `all_databases` (superusers only), those of every database of the cluster. Keys are unwrapped
/// again on next use. Not executable by PUBLIC (sql/finalize.sql).
/// Returns the number of keys dropped from the shared cache.
#[pg_extern(volatile, parallel_unsafe, name = "immuta_cache_reset")]
fn immuta_cache_reset_scoped(all_databases: default!(bool, false)) -> i64 {
    // SAFETY: reads whether the current user is a superuser.
    if all_databases && !unsafe { pg_sys::superuser() } {
        raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            "only a superuser may reset the key cache of every database",
            Some("Other databases' cached keys belong to them; dropping them costs their sessions a KMS call each.".into()),
            Some("Call immuta_cache_reset() without all_databases to reset this database's keys."),
        );
    }
    backend::prepare();
    let dropped = crate::shared_cache::reset(all_databases);
    backend::clear();
    let scope = match (crate::shared_cache::is_shared(), all_databases) {
        (false, _) => "backend",
        (true, false) => "database",
        (true, true) => "cluster",
    };
    let detail = serde_json::json!({ "scope": scope, "shared_keys_dropped": dropped });
    match crate::keys::key_write_blocker() {
        None => {
            crate::keys::lock_key_creation();
            catalog::insert_audit(catalog::AuditEvent {
                event: "cache reset",
                key_id: None,
                reason: "manual",
                detail,
                keyring: None,
            })
        }
        // A standby's cache is reset too, but nothing can be written there: the server log keeps it.
        Some(why) => pgrx::log!("immuta key cache reset ({detail}); not in immuta.audit_log because {why}"),
    }
    dropped
}

/// `immuta_cache_reset()` as 0.1.0 defined it, without an argument: its SQL names this symbol,
/// and released SQL is never edited, so the library keeps it (README, "Upgrading"). Resets this
/// database's keys, as it did. Not part of the SQL of any later version.
#[pg_extern(volatile, parallel_unsafe, sql = false)]
fn immuta_cache_reset() -> i64 {
    immuta_cache_reset_scoped(false)
}

/// Key cache statistics of this database: mode (`shared` when preloaded, else `backend`),
/// capacity, this database's entries, hits and misses of the shared cache, unwraps through KMS
/// and the local master key, evictions of its keys (this backend's alone without preload), the
/// TTL, and this backend's key count; for a superuser also the cluster's totals (`cluster`).
#[pg_extern(volatile, parallel_safe)]
fn immuta_cache_stats() -> JsonB {
    let local = backend::key_count();
    // SAFETY: reads whether the current user is a superuser.
    let superuser = unsafe { pg_sys::superuser() };
    JsonB(crate::shared_cache::stats_json(local, superuser))
}

/// Stores a new configuration (Immuta Advanced Configuration YAML) and returns it as effective,
/// secrets redacted. An invalid document changes nothing.
#[pg_extern(volatile, parallel_unsafe)]
fn immuta_configure(yaml: Option<&str>) -> JsonB {
    let Some(yaml) = yaml else {
        raise(
            PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
            "immuta configuration must not be NULL",
            None,
            Some("Pass '' to return to the default configuration."),
        );
    };
    if let Some(path) = gucs::config_file() {
        raise(
            PgSqlErrorCode::ERRCODE_CANT_CHANGE_RUNTIME_PARAM,
            "immuta configuration is managed by a file",
            Some(format!("immuta.config_file is set to \"{}\".", path.display())),
            Some("Edit that file, or clear immuta.config_file to configure with immuta_configure()."),
        );
    }
    let config = Config::from_yaml(yaml).unwrap_or_else(|e| errors::report(e, ConfigOrigin::Argument));
    pgrx::check_for_interrupts!();
    if config.has_explicit_credentials() {
        errors::warn(
            PgSqlErrorCode::ERRCODE_WARNING,
            "immuta configuration holds AWS credentials",
            Some("immuta cannot encrypt the credentials it uses to reach AWS KMS.".into()),
            Some("Prefer an IAM role (EC2 instance profile, EKS/IRSA, ECS task role) and remove extraKmsConfig.credentials."),
        );
    }
    // SAFETY: reads whether the current user is a superuser.
    let superuser = unsafe { pg_sys::superuser() };
    if config.has_custom_endpoint() && !superuser {
        raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            "only a superuser may set the AWS KMS endpoint",
            Some(
                "Data keys are sent to that endpoint to be wrapped, and existing keys to be unwrapped."
                    .into(),
            ),
            Some(
                "Leave extraKmsConfig.endpoint out (the regional AWS endpoint is used), or ask a superuser.",
            ),
        );
    }
    if config.aws_kms().is_some() && !config.has_explicit_credentials() && !superuser {
        raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            "only a superuser may configure AWS KMS with the server's own AWS identity",
            Some("Without extraKmsConfig.credentials, immuta calls KMS as the server (its instance profile, task role or environment), an identity that belongs to whoever runs the server.".into()),
            Some("Ask a superuser to store this configuration, or give credentials in extraKmsConfig.credentials."),
        );
    }
    backend::prepare();
    if !superuser && !config.has_explicit_credentials() && catalog::any_key_wrapped_by(ProviderKind::AwsKms) {
        errors::warn(
            PgSqlErrorCode::ERRCODE_WARNING,
            "keys wrapped by AWS KMS will not be unwrapped under this configuration",
            Some("It has no extraKmsConfig.credentials and is not stored by a superuser, so immuta will not call KMS as the server itself.".into()),
            Some("Give credentials in extraKmsConfig.credentials, or ask a superuser to store the configuration."),
        );
    }
    catalog::store_config(yaml, config.has_explicit_credentials(), superuser);
    backend::invalidate_config(backend::oids());
    JsonB(config.to_redacted_json())
}

/// The effective configuration, defaults filled in, secrets redacted.
#[pg_extern(stable, parallel_safe)]
fn immuta_config() -> JsonB {
    backend::prepare();
    JsonB(backend::config().to_redacted_json())
}

/// Internal functions, in the schema `immuta` that sql/bootstrap.sql creates.
#[pg_schema]
mod immuta {
    use pgrx::prelude::*;

    use crate::backend;

    /// The effective `schedule.dataKeyRollOverLength`, in days (used by the view `immuta.keys`).
    #[pg_extern(stable, parallel_safe)]
    fn rollover_length_days() -> i32 {
        backend::prepare();
        backend::config().rollover().days() as i32
    }

    /// Encryptions counted under key `key_id` (used by the view `immuta.keys`).
    #[pg_extern(stable, strict, parallel_unsafe)]
    fn encryptions_counted(key_id: i64) -> Option<i64> {
        backend::prepare();
        let id = immuta_core::key::KeyId::new(key_id)?;
        Some(crate::usage::counted(id).min(i64::MAX as u64) as i64)
    }

    /// `immuta_encrypt` for the column jobs and their trigger (`immuta.encrypt_expression`): one
    /// function, in immuta's own schema, whose place no overload planted in the extension's
    /// schema can take. `bound`: a context column is named, and its NULL is an error; a NULL
    /// keyring is the default one.
    #[pg_extern(
        volatile,
        parallel_safe,
        sql = "CREATE FUNCTION immuta.encrypt_value(value anyelement, bound boolean, context text, keyring text) \
               RETURNS bytea VOLATILE PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'encrypt_value_wrapper';"
    )]
    fn encrypt_value(
        value: Option<pgrx::AnyElement>,
        bound: Option<bool>,
        context: Option<super::Bytes>,
        keyring: Option<&str>,
        fcinfo: pg_sys::FunctionCallInfo,
    ) -> Option<super::Bytea> {
        let context = bound.unwrap_or(false).then(|| super::required(context.as_deref()));
        let keyring = keyring.filter(|k| *k != immuta_core::keyrings::DEFAULT);
        Some(super::encrypt_typed_in(keyring, &value?, fcinfo, context))
    }

    /// Raises immuta's error for a type it does not encrypt (`immuta_encrypt_column` checks its
    /// source column before it installs a trigger that would make the writes fail).
    #[pg_extern(
        stable,
        strict,
        parallel_safe,
        sql = "CREATE FUNCTION immuta.check_encryptable(value_type regtype) RETURNS boolean \
               STABLE STRICT PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'check_encryptable_wrapper';"
    )]
    fn check_encryptable(value_type: pg_sys::Oid) -> bool {
        crate::typed::sql_type(value_type);
        true
    }

    /// `immuta.max_encryptions_per_key` (used by the view `immuta.keys`).
    #[pg_extern(stable, parallel_safe)]
    fn max_encryptions_per_key() -> i64 {
        crate::gucs::usage_limit().get() as i64
    }
}
