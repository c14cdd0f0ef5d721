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
//! 2. for an existing key, its wrapping (KMS key, region, wrapped bytes) was chosen under such a
//!    configuration: immuta created or rewrapped the key while a superuser's configuration was in
//!    force (the row's `server_identity` column). A row added directly (a restore, by anyone: a
//!    dump may come from a tenant) or wrapped under a configuration a non-superuser stored names
//!    a KMS key and bytes that role chose; a superuser may vouch for it by setting the column.
//!
//! With explicit credentials, KMS is called with them, whoever configured them: the caller then
//! acts with its own AWS identity.

use crate::key::KeyId;

/// Why a KMS call with the server's identity is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The configuration in force was not put there by a superuser.
    ConfigurationNotBySuperuser,
    /// The key's wrapping was not chosen under a superuser's configuration (a restored row, or a
    /// key wrapped under a configuration a non-superuser stored).
    WrappingNotBySuperuser,
}

/// Whether the server's own identity may be used to reach KMS: for a new key (`row` is `None`)
/// or to unwrap a key whose row says whether its wrapping was chosen under a superuser's
/// configuration, under a configuration that a superuser did or did not put in force. Callers
/// ask only when the configuration has no explicit credentials.
pub fn check(configured_by_superuser: bool, row: Option<bool>) -> Result<(), Refusal> {
    if row == Some(false) {
        return Err(Refusal::WrappingNotBySuperuser);
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
        assert_eq!(check(true, Some(true)), Ok(()));
        assert_eq!(check(false, None), Err(Refusal::ConfigurationNotBySuperuser));
        assert_eq!(check(false, Some(true)), Err(Refusal::ConfigurationNotBySuperuser));
    }

    #[test]
    fn a_wrapping_no_superuser_chose_never_reaches_kms_as_the_server() {
        assert_eq!(check(true, Some(false)), Err(Refusal::WrappingNotBySuperuser));
        assert_eq!(check(false, Some(false)), Err(Refusal::WrappingNotBySuperuser));
    }
}
