//! When immuta may call AWS KMS with the server's own AWS identity.
//!
//! Without `extraKmsConfig.credentials`, the AWS SDK signs KMS requests with whatever identity
//! the server process has: its instance profile, task role, web identity or environment. That
//! identity belongs to whoever runs the server, and it may reach KMS keys of other databases, or
//! of other systems altogether. A KMS `Decrypt` made with it on behalf of someone who chose the
//! key, the region or the wrapped bytes is a confused deputy: a tenant could have the server
//! unwrap another tenant's data key into its own database, or, with a key (or an endpoint) whose
//! answers it controls, plant a data key it knows as the one that encrypts everyone's values.
//!
//! So the rule is: **only a superuser makes immuta call KMS as the server.** Concretely, a KMS
//! call without explicit credentials is made only when both hold:
//!
//! 1. the configuration in force was put there by a superuser: the file named by
//!    `immuta.config_file` (a superuser-only setting), or a configuration stored by
//!    `immuta_configure()` while a superuser called it; the built-in default (nothing
//!    configured) authorises nothing;
//! 2. for an existing key, its row was written by immuta itself or added by a superuser, not
//!    added directly by the database owner (the restore path of a managed platform), which could
//!    name any KMS key, region and wrapped bytes.
//!
//! With explicit credentials, KMS is called with them, whoever configured them: the caller then
//! acts with its own AWS identity.

use crate::key::KeyId;

/// Who added a key row: the `origin` column of `immuta.data_keys`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyOrigin {
    /// Created by immuta's own functions.
    Immuta,
    /// Added directly (a restore) by a superuser.
    Superuser,
    /// Added directly (a restore) by the role that installed immuta, not a superuser.
    Owner,
}

impl KeyOrigin {
    /// The value of the `origin` column.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyOrigin::Immuta => "immuta",
            KeyOrigin::Superuser => "superuser",
            KeyOrigin::Owner => "owner",
        }
    }

    pub fn parse(text: &str) -> Option<KeyOrigin> {
        match text {
            "immuta" => Some(KeyOrigin::Immuta),
            "superuser" => Some(KeyOrigin::Superuser),
            "owner" => Some(KeyOrigin::Owner),
            _ => None,
        }
    }
}

/// Why a KMS call with the server's identity is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The configuration in force was not put there by a superuser.
    ConfigurationNotBySuperuser,
    /// The key row was added directly by the database owner.
    RowAddedByOwner,
}

/// Whether the server's own identity may be used to reach KMS: for a new key (`row` is `None`)
/// or to unwrap the key of a row of `row` origin, under a configuration that a superuser did or
/// did not put in force. Callers ask only when the configuration has no explicit credentials.
pub fn check(configured_by_superuser: bool, row: Option<KeyOrigin>) -> Result<(), Refusal> {
    if row == Some(KeyOrigin::Owner) {
        return Err(Refusal::RowAddedByOwner);
    }
    if !configured_by_superuser {
        return Err(Refusal::ConfigurationNotBySuperuser);
    }
    Ok(())
}

/// The refusal as the core's error, for key `key_id` (none for a new key).
pub fn error(key_id: Option<KeyId>, refusal: Refusal) -> crate::Error {
    crate::Error::ServerIdentityRefused { key_id, refusal }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_superusers_configuration_lends_the_server_identity() {
        assert_eq!(check(true, None), Ok(()));
        assert_eq!(check(true, Some(KeyOrigin::Immuta)), Ok(()));
        assert_eq!(check(true, Some(KeyOrigin::Superuser)), Ok(()));
        assert_eq!(check(false, None), Err(Refusal::ConfigurationNotBySuperuser));
        assert_eq!(check(false, Some(KeyOrigin::Immuta)), Err(Refusal::ConfigurationNotBySuperuser));
    }

    #[test]
    fn a_row_the_owner_added_never_reaches_kms_as_the_server() {
        assert_eq!(check(true, Some(KeyOrigin::Owner)), Err(Refusal::RowAddedByOwner));
        assert_eq!(check(false, Some(KeyOrigin::Owner)), Err(Refusal::RowAddedByOwner));
    }

    #[test]
    fn origins_round_trip_through_their_column_text() {
        for origin in [KeyOrigin::Immuta, KeyOrigin::Superuser, KeyOrigin::Owner] {
            assert_eq!(KeyOrigin::parse(origin.as_str()), Some(origin));
        }
        assert_eq!(KeyOrigin::parse("root"), None);
    }
}
