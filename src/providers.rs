//! Choosing the provider that wraps a new key, and the one that unwraps an existing key.
//!
//! New keys go to the provider the configuration names now. An existing key is unwrapped by the
//! provider its row recorded, whatever the configuration says today: changing the configured
//! wrapping key only affects keys created afterwards.

use immuta_core::config::Config;
use immuta_core::key::{DataKey, WrappingKeyRef};
use immuta_core::local::{Create, LocalProvider};
use immuta_core::provider::KeyProvider;
use immuta_core::Error;
use pgrx::PgSqlErrorCode;

use crate::catalog::{self, KeyRow};
use crate::errors::{raise, OrRaise};
use crate::gucs;

/// The provider new data keys are wrapped with.
pub fn for_new_keys(config: &Config) -> Box<dyn KeyProvider> {
    if let Some(kms) = config.aws_kms() {
        raise(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            "the AWS KMS provider is not available in this version of immuta",
            Some(format!(
                "The configuration enables plugins.awsKms with key {} in {}.",
                kms.key_id, kms.region
            )),
            Some("Set plugins.awsKms.isKms to false to use the local master key."),
        );
    }
    // The master key may be generated only while no key row of this database depends on a local
    // master key, and no other database's (the marker in the data directory records that).
    let marker = gucs::master_key_marker();
    let create = if catalog::any_local_key() {
        Create::Never
    } else {
        Create::IfMissing { marker: &marker }
    };
    Box::new(LocalProvider::open(&gucs::master_key_file(), create).or_raise())
}

/// Unwraps the data key of `row` with the provider its row recorded.
pub fn unwrap(row: &KeyRow) -> DataKey {
    match &row.wrapping {
        WrappingKeyRef::Local { fingerprint } => {
            let provider = LocalProvider::open(&gucs::master_key_file(), Create::Never)
                .map_err(|e| match e {
                    Error::MasterKeyMissing { path, .. } => Error::MasterKeyMissing {
                        path,
                        expected: Some(*fingerprint),
                    },
                    other => other,
                })
                .or_raise();
            provider
                .unwrap(row.id, &row.wrapping, &row.wrapped)
                .or_raise()
        }
        WrappingKeyRef::AwsKms { .. } => Err(Error::ProviderUnavailable {
            key_id: row.id,
            wrapping: row.wrapping.clone(),
            reason: "this version of immuta has no AWS KMS provider".into(),
        })
        .or_raise(),
    }
}
