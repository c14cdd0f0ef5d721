//! The SQL surface: each function converts its arguments, calls the backend or the core, and
//! returns. The semantics live in `backend.rs`, `keys.rs` and the core crate.

use immuta_core::config::Config;
use immuta_core::format;
use pgrx::prelude::*;
use pgrx::{JsonB, PgSqlErrorCode};

use crate::backend::{self, BACKEND};
use crate::catalog;
use crate::errors::{self, raise, ConfigOrigin, OrRaise};
use crate::gucs;
use crate::varlena::{Bytea, Text};

/// Encrypts a text value under the current data key. VOLATILE: a fresh random nonce per call.
/// The argument is read as the raw bytes of the `text` (UTF-8, checked once per backend).
#[pg_extern(
    volatile,
    strict,
    parallel_safe,
    sql = "CREATE FUNCTION immuta_encrypt(plaintext text) RETURNS bytea \
           VOLATILE STRICT PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'immuta_encrypt_wrapper';"
)]
fn immuta_encrypt(plaintext: &[u8]) -> Bytea {
    backend::encrypt(plaintext)
}

/// Decrypts a value produced by `immuta_encrypt`. STABLE, not IMMUTABLE: the result depends on
/// the keys table and the master key.
#[pg_extern(stable, strict, parallel_safe)]
fn immuta_decrypt(ciphertext: &[u8]) -> Text {
    backend::decrypt(ciphertext)
}

/// The id of the data key a ciphertext was encrypted under (reads the header only), to find the
/// values still under an old key.
#[pg_extern(immutable, strict, parallel_safe)]
fn immuta_key_id(ciphertext: &[u8]) -> i64 {
    format::parse(ciphertext).or_raise().key_id.get()
}

/// Creates a new data key and makes it the one that encrypts; returns its id.
#[pg_extern(volatile, parallel_unsafe)]
fn immuta_rotate() -> i64 {
    crate::keys::rotate().get()
}

/// Wraps every data key again with the provider and key configured now (e.g. from the local
/// master key to AWS KMS, or from one KMS key to another); returns the number of keys. Stored
/// ciphertexts are untouched and all still decrypt.
#[pg_extern(volatile, parallel_unsafe)]
fn immuta_rewrap() -> i32 {
    crate::keys::rewrap()
}

/// Drops every cached unwrapped data key: the shared cache of the cluster and every backend's
/// copies at their next immuta call (without preload: this backend's). Keys are unwrapped again on
/// next use. Not executable by PUBLIC (sql/finalize.sql).
/// Returns the number of keys dropped from the shared cache.
#[pg_extern(volatile, parallel_unsafe)]
fn immuta_cache_reset() -> i64 {
    backend::prepare();
    let dropped = crate::shared_cache::reset();
    BACKEND.with_borrow_mut(|b| b.ring.clear());
    dropped
}

/// Key cache statistics: mode (`shared` when preloaded, else `backend`), capacity, entries, hits
/// and misses of the shared cache, unwraps through KMS and the local master key, evictions (all
/// cluster-wide when shared, this backend's otherwise), the TTL, and this backend's key count.
#[pg_extern(volatile, parallel_safe)]
fn immuta_cache_stats() -> JsonB {
    let local = BACKEND.with_borrow(|b| b.ring.len());
    JsonB(crate::shared_cache::stats_json(local))
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
    if config.has_explicit_credentials() {
        errors::warn(
            PgSqlErrorCode::ERRCODE_WARNING,
            "immuta configuration holds AWS credentials",
            Some("immuta cannot encrypt the credentials it uses to reach AWS KMS.".into()),
            Some("Prefer an IAM role (EC2 instance profile, EKS/IRSA, ECS task role) and remove extraKmsConfig.credentials."),
        );
    }
    backend::prepare();
    catalog::store_config(yaml);
    backend::invalidate_config(BACKEND.with_borrow(|b| b.oids).expect("prepare() looked the tables up"));
    JsonB(config.to_redacted_json())
}

/// The effective configuration, defaults filled in, secrets redacted.
#[pg_extern(stable, parallel_safe)]
fn immuta_config() -> JsonB {
    backend::prepare();
    JsonB(BACKEND.with_borrow(|b| b.config()).to_redacted_json())
}

/// Internal functions, in the schema `immuta` that sql/bootstrap.sql creates.
#[pg_schema]
mod immuta {
    use pgrx::prelude::*;

    use crate::backend::{self, BACKEND};

    /// The effective `schedule.dataKeyRollOverLength`, in days (used by the view `immuta.keys`).
    #[pg_extern(stable, parallel_safe)]
    fn rollover_length_days() -> i32 {
        backend::prepare();
        BACKEND.with_borrow(|b| b.config()).rollover().days() as i32
    }
}
