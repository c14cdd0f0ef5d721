//! Named keyrings: a sequence of data keys per tenant (or column), each with its own current
//! key, rollover length, usage counter, audit trail and, if it says so, its own AWS KMS key.
//!
//! The keys of a database have always been one keyring; it is the keyring `default`, which has no
//! row in `immuta.keyrings` and takes everything from the configuration. Other keyrings are
//! created by an administrator (a typo in `keyring => ...` must be an error, never a new
//! keyring), and live until they are destroyed: destroying a keyring destroys every one of its
//! keys (`key_state.rs`), and the name stays taken by its tombstone, so a value under it can never
//! meet a new keyring of the same name.
//!
//! A keyring with its own KMS key is "bring your own key": its data keys are wrapped by that key
//! alone, and scheduling that KMS key's deletion in KMS finishes what destroying the keyring
//! began (backups taken before still hold wrapped keys that only that KMS key can open).

use crate::key::{is_aws_region, is_kms_key_reference, KMS_KEY_RULE};
use crate::rollover::RolloverLength;

/// The keyring of values encrypted without `keyring =>`: the keys a database had before keyrings.
pub const DEFAULT: &str = "default";

/// The rule a keyring name follows, for messages.
pub const NAME_RULE: &str =
    "1 to 63 characters: ASCII letters, digits, '_', '-', '.' and ':', starting with a letter or digit";

/// Whether `name` may name a keyring: short, printable, unambiguous in logs and identifiers
/// (`tenant_42`, `patients.ssn`, `eu:acme`).
pub fn name_ok(name: &str) -> bool {
    let bytes = name.as_bytes();
    (1..=63).contains(&bytes.len())
        && bytes[0].is_ascii_alphanumeric()
        && bytes.iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
}

/// A keyring's own settings; each one not given falls back to the configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// Its `dataKeyRollOverLength`.
    pub rollover: Option<RolloverLength>,
    /// Its own KMS key and region (bring your own key).
    pub kms: Option<KmsKey>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KmsKey {
    pub key: String,
    pub region: String,
}

/// Why settings were refused (the SQL layer says which argument).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SettingsError {
    RolloverDays,
    KmsKey,
    KmsRegion,
    /// A region without a key, or a key without a region where the configuration names none.
    KmsIncomplete,
}

impl SettingsError {
    pub fn message(self) -> String {
        match self {
            SettingsError::RolloverDays => {
                format!("rollover_days must be a whole number of days from 1 to {}", RolloverLength::MAX_DAYS)
            }
            SettingsError::KmsKey => format!("kms_key {KMS_KEY_RULE}"),
            SettingsError::KmsRegion => "kms_region must be an AWS region name such as eu-west-1".into(),
            SettingsError::KmsIncomplete => {
                "kms_key needs a kms_region (or a configured KMS region), and kms_region needs a kms_key"
                    .into()
            }
        }
    }
}

impl Settings {
    /// Validates the arguments of `immuta_keyring_create()` / `immuta_keyring_alter()`.
    /// `configured_region` is the configuration's KMS region, used when only a key is given.
    pub fn parse(
        rollover_days: Option<i64>,
        kms_key: Option<&str>,
        kms_region: Option<&str>,
        configured_region: Option<&str>,
    ) -> Result<Settings, SettingsError> {
        let rollover = match rollover_days {
            None => None,
            Some(days) => Some(RolloverLength::from_days(days).ok_or(SettingsError::RolloverDays)?),
        };
        let kms = match (kms_key, kms_region.or(configured_region)) {
            (None, _) if kms_region.is_some() => return Err(SettingsError::KmsIncomplete),
            (None, _) => None,
            (Some(_), None) => return Err(SettingsError::KmsIncomplete),
            (Some(key), Some(region)) => {
                if !is_kms_key_reference(key) {
                    return Err(SettingsError::KmsKey);
                }
                if !is_aws_region(region) {
                    return Err(SettingsError::KmsRegion);
                }
                Some(KmsKey { key: key.to_owned(), region: region.to_owned() })
            }
        };
        Ok(Settings { rollover, kms })
    }

    /// The rollover length in force: its own, else the configuration's.
    pub fn rollover_or(&self, configured: RolloverLength) -> RolloverLength {
        self.rollover.unwrap_or(configured)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_short_printable_identifiers() {
        for good in ["default", "tenant_42", "patients.ssn", "eu:acme", "A-1", &"x".repeat(63)] {
            assert!(name_ok(good), "{good}");
        }
        for bad in ["", "_x", "-x", "a b", "a'b", "a\"b", "é", "a/b", "a\0", &"x".repeat(64)] {
            assert!(!name_ok(bad), "{bad:?}");
        }
    }

    #[test]
    fn settings_fall_back_to_the_configuration() {
        let s = Settings::parse(None, None, None, Some("eu-west-1")).unwrap();
        assert_eq!(s, Settings::default());
        assert_eq!(s.rollover_or(RolloverLength::default()).days(), 365);
        let s = Settings::parse(Some(30), Some("alias/acme"), None, Some("eu-west-1")).unwrap();
        assert_eq!(s.rollover_or(RolloverLength::default()).days(), 30);
        assert_eq!(s.kms, Some(KmsKey { key: "alias/acme".into(), region: "eu-west-1".into() }));
    }

    #[test]
    fn settings_are_refused_with_the_argument_at_fault() {
        assert_eq!(Settings::parse(Some(0), None, None, None), Err(SettingsError::RolloverDays));
        assert_eq!(Settings::parse(Some(36_501), None, None, None), Err(SettingsError::RolloverDays));
        assert_eq!(Settings::parse(None, Some("alias/x"), None, None), Err(SettingsError::KmsIncomplete));
        assert_eq!(Settings::parse(None, None, Some("eu-west-1"), None), Err(SettingsError::KmsIncomplete));
        assert_eq!(Settings::parse(None, Some("a b"), Some("eu-west-1"), None), Err(SettingsError::KmsKey));
        assert_eq!(
            Settings::parse(None, Some("alias/x"), Some("evil.example.com/"), None),
            Err(SettingsError::KmsRegion)
        );
    }
}
