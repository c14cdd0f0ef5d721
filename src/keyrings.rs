//! Creating and configuring named keyrings (`immuta_core::keyrings`), and what
//! `immuta_status(keyring)` says of one. Destroying one is crypto-shredding: `key_states.rs`.

use immuta_core::keyrings::{self, Settings};
use pgrx::{pg_sys, PgSqlErrorCode};
use serde_json::{json, Value};

use crate::catalog::{self, AuditEvent};
use crate::errors::raise;
use crate::{backend, keys};

/// Validates the settings arguments, and refuses a KMS key that immuta would reach with the
/// server's own AWS identity on behalf of a role that is not a superuser.
fn settings(rollover_days: Option<i32>, kms_key: Option<&str>, kms_region: Option<&str>) -> (Settings, bool) {
    let config = backend::config();
    let configured_region = config.aws_kms().map(|kms| kms.region.to_owned());
    let settings =
        Settings::parse(rollover_days.map(i64::from), kms_key, kms_region, configured_region.as_deref())
            .unwrap_or_else(|e| {
                raise(
                    PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                    format!("invalid immuta keyring setting: {}", e.message()),
                    None,
                    Some("Pass NULL for a setting the keyring takes from the configuration."),
                )
            });
    // SAFETY: reads whether the current user is a superuser.
    let superuser = unsafe { pg_sys::superuser() };
    if settings.kms.is_some() && !superuser && !config.has_explicit_credentials() {
        raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            "only a superuser may give a keyring a KMS key reached with the server's own AWS identity",
            Some("The configuration has no extraKmsConfig.credentials, so immuta would call KMS as the server (its instance profile or task role), an identity that belongs to whoever runs the server.".into()),
            Some("Ask a superuser to create or configure the keyring, or configure credentials in extraKmsConfig.credentials."),
        );
    }
    (settings, superuser)
}

fn settings_json(settings: &Settings) -> Value {
    json!({
        "rollover_days": settings.rollover.map(|r| r.days()),
        "kms_key": settings.kms.as_ref().map(|k| k.key.as_str()),
        "kms_region": settings.kms.as_ref().map(|k| k.region.as_str()),
    })
}

/// `immuta_keyring_create(name, rollover_days, kms_key, kms_region)`.
pub fn create(name: &str, rollover_days: Option<i32>, kms_key: Option<&str>, kms_region: Option<&str>) {
    backend::require_keyring_name(name);
    keys::lock_for_key_change("create");
    if name == keyrings::DEFAULT || catalog::keyring(name).is_some() {
        let destroyed = catalog::keyring(name).is_some_and(|k| k.destroyed);
        raise(
            PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT,
            format!("immuta keyring \"{name}\" already exists"),
            destroyed.then(|| "It was destroyed; its name stays taken by its tombstone, so that no value under it ever meets a new keyring of the same name.".to_owned()),
            Some("Choose another name."),
        );
    }
    let (settings, superuser) = settings(rollover_days, kms_key, kms_region);
    catalog::insert_keyring(name, &settings, superuser);
    catalog::insert_audit(AuditEvent {
        event: "keyring created",
        key_id: None,
        reason: "manual",
        detail: settings_json(&settings),
        keyring: Some(name),
    });
    backend::invalidate_keyrings(backend::oids());
}

/// `immuta_keyring_configure(name, rollover_days, kms_key, kms_region)`: replaces the keyring's
/// settings (NULL: the configuration's). Its existing keys keep their wrapping; its next keys
/// take the new settings (`immuta_rewrap()` rewraps the old ones).
pub fn configure(name: &str, rollover_days: Option<i32>, kms_key: Option<&str>, kms_region: Option<&str>) {
    if name == keyrings::DEFAULT {
        raise(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            "the keyring \"default\" takes its settings from the configuration",
            None,
            Some("Change schedule.dataKeyRollOverLength or the KMS key with immuta_configure()."),
        );
    }
    keys::lock_for_key_change("configure");
    let target = keys::Target::of(name);
    let (settings, superuser) = settings(rollover_days, kms_key, kms_region);
    catalog::update_keyring(&target.name, &settings, superuser);
    catalog::insert_audit(AuditEvent {
        event: "keyring configured",
        key_id: None,
        reason: "manual",
        detail: json!({ "from": settings_json(&target.settings), "to": settings_json(&settings) }),
        keyring: Some(name),
    });
    backend::invalidate_keyrings(backend::oids());
}

/// What `immuta_status(keyring)` says of keyring `name`.
pub fn status(name: &str) -> Value {
    backend::prepare();
    let config = backend::config();
    let (settings, destroyed) = if name == keyrings::DEFAULT {
        (Settings::default(), false)
    } else {
        backend::require_keyring_name(name);
        let Some(row) = catalog::keyring(name) else { backend::unknown_keyring(name) };
        (row.settings, row.destroyed)
    };
    let days = settings.rollover_or(config.rollover()).days();
    let limit = crate::gucs::usage_limit().get();
    let current = catalog::current_key_summary(name, days).map(|mut key| {
        if let Some(id) = key["id"].as_i64().and_then(immuta_core::key::KeyId::new) {
            let counted = crate::usage::counted(id);
            key["encryptions"] = json!(counted);
            key["max_encryptions_per_key"] = json!(limit);
            key["usage_limit_reached"] = json!(counted >= limit);
        }
        key
    });
    json!({
        "keyring": name,
        "destroyed": destroyed,
        "current_key": current,
        "keys": catalog::key_counts(name),
        "rollover_length_days": days,
        "settings": settings_json(&settings),
        "provider_for_new_keys": if settings.kms.is_some() || config.aws_kms().is_some() { "awsKms" } else { "local" },
    })
}
