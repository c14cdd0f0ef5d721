//! Choosing the provider that wraps a new key, and the one that unwraps an existing key.
//!
//! New keys go to the provider the configuration names now. An existing key is unwrapped by the
//! provider its row recorded, whatever the configuration says today: changing the configured
//! wrapping key only affects keys created afterwards.
//!
//! Every AWS KMS call made without explicit credentials, which would sign with the server's own
//! identity, is first put to `immuta_core::server_identity`: only a configuration a superuser
//! put in force lends that identity, and only to a key whose wrapping was chosen under one.

use immuta_core::aws_kms::{AwsKmsProvider, CallLimits};
use immuta_core::config::AwsAccess;
use immuta_core::key::{DataKey, KeyId, ProviderKind, WrappingKeyRef};
use immuta_core::keyrings::Settings;
use immuta_core::local::{Create, LocalProvider};
use immuta_core::provider::KeyProvider;
use immuta_core::server_identity;
use immuta_core::Error;
use pgrx::pg_sys;

use crate::catalog::{self, KeyRow};
use crate::config_source::Effective;
use crate::errors::OrRaise;
use crate::gucs;

/// The provider new data keys are wrapped with.
pub fn for_new_keys(effective: &Effective) -> Box<dyn KeyProvider> {
    if let Some(kms) = effective.config.aws_kms() {
        may_reach_kms(&kms.access, effective, None, None);
        return Box::new(aws_kms(kms.key_id, kms.region, &kms.access));
    }
    // The master key may be generated only while no key row of this database depends on a local
    // master key, and no other database's (the marker in the data directory records that).
    let marker = gucs::master_key_marker();
    let create = if catalog::any_key_wrapped_by(ProviderKind::Local) {
        Create::Never
    } else {
        Create::IfMissing { marker: &marker }
    };
    Box::new(LocalProvider::open(&gucs::master_key_file(), create).or_raise())
}

/// The provider that wraps the new keys of a keyring with `settings` (its own KMS key, else the
/// configuration's provider), and whether the server's own AWS identity may later reach the
/// key (the `server_identity` column): only under a configuration a superuser put in force, and
/// for a keyring's own KMS key only if a superuser chose it too.
pub fn for_new_keys_of(
    effective: &Effective,
    settings: &Settings,
    keyring_by_superuser: bool,
) -> (Box<dyn KeyProvider>, bool) {
    match &settings.kms {
        None => (for_new_keys(effective), effective.by_superuser),
        Some(kms) => {
            let access = effective.config.aws_access();
            let trusted = effective.by_superuser && keyring_by_superuser;
            if access.credentials.is_none() {
                server_identity::check(effective.by_superuser, None)
                    .map_err(|refusal| server_identity::error(None, refusal))
                    .or_raise();
                if !keyring_by_superuser {
                    crate::errors::raise(
                        pgrx::PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
                        "immuta may not call AWS KMS with the server's own identity for this keyring's KMS key",
                        Some("The keyring's KMS key was not chosen by a superuser (it was restored, or set while the configuration carried credentials).".into()),
                        Some("A superuser may run SELECT immuta_keyring_configure(...) with the keyring's KMS key to vouch for it."),
                    );
                }
            }
            (Box::new(aws_kms(&kms.key, &kms.region, &access)), trusted)
        }
    }
}

/// Refuses a KMS call that would sign with the server's own identity when the rule of
/// `server_identity.rs` does not allow it, for a new key or the key of row `key`, whose
/// `server_identity` column is `row_allows`.
fn may_reach_kms(
    access: &AwsAccess<'_>,
    effective: &Effective,
    key: Option<KeyId>,
    row_allows: Option<bool>,
) {
    if access.credentials.is_some() {
        return;
    }
    server_identity::check(effective.by_superuser, row_allows)
        .map_err(|refusal| server_identity::error(key, refusal))
        .or_raise();
}

/// Unwraps the data key of `row` with the provider its row recorded. A KMS key is reached with
/// the endpoint and credentials the configuration has now.
pub fn unwrap(row: &KeyRow, effective: &Effective) -> DataKey {
    match &row.wrapping {
        WrappingKeyRef::Local { fingerprint } => {
            let provider = LocalProvider::open(&gucs::master_key_file(), Create::Never)
                .map_err(|e| match e {
                    Error::MasterKeyMissing { path, .. } => {
                        Error::MasterKeyMissing { path, expected: Some(*fingerprint) }
                    }
                    other => other,
                })
                .or_raise();
            provider.unwrap(row.id, &row.wrapping, &row.wrapped).or_raise()
        }
        WrappingKeyRef::AwsKms { key_id, region } => {
            let access = effective.config.aws_access();
            may_reach_kms(&access, effective, Some(row.id), Some(row.server_identity));
            aws_kms(key_id, region, &access).unwrap(row.id, &row.wrapping, &row.wrapped).or_raise()
        }
    }
}

fn aws_kms(key: &str, region: &str, access: &AwsAccess<'_>) -> AwsKmsProvider {
    let limits = CallLimits { timeout: gucs::kms_timeout(), interrupted: cancel_pending };
    AwsKmsProvider::new(key, region, access, limits).or_raise()
}

/// Whether a query cancel, `statement_timeout` or termination is pending: then a KMS wait stops
/// and PostgreSQL raises it (see `errors.rs`).
fn cancel_pending() -> bool {
    // SAFETY: volatile reads of sig_atomic_t flags that PostgreSQL's signal handlers set on this
    // thread (tokio's own threads block all signals).
    unsafe {
        std::ptr::read_volatile(&raw const pg_sys::QueryCancelPending) != 0
            || std::ptr::read_volatile(&raw const pg_sys::ProcDiePending) != 0
    }
}

/// While pg_upgrade creates this cluster (binary-upgrade mode): keeps any database from
/// generating a master key until the old cluster's master key file is copied (`local.rs`).
pub fn mark_upgraded_cluster() {
    let key_file = gucs::master_key_file();
    if let Err(e) = immuta_core::local::mark_upgraded_cluster(&gucs::master_key_marker(), &key_file) {
        crate::errors::warn(
            pgrx::PgSqlErrorCode::ERRCODE_IO_ERROR,
            "immuta could not record that pg_upgrade created this data directory",
            Some(format!("{e}")),
            Some("Copy the master key file of the old cluster into the new data directory before using immuta."),
        );
    }
}
