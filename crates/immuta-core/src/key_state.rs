//! The life of a data key after its creation: enabled, disabled, destroyed.
//!
//! The vocabulary is Tink's (a key is enabled, disabled or destroyed; the primary key encrypts)
//! and Vault transit's (`min_decryption_version`: every version older than a given one stops
//! decrypting). A key is stored in one of three states; `immuta.keys` shows four, because an
//! enabled key is either the *active* key of its keyring (it encrypts) or *decrypt-only*:
//!
//! | stored | shown | encrypts | decrypts | reversible |
//! |---|---|---|---|---|
//! | `enabled`, newest of its keyring | `active` | yes | yes | |
//! | `enabled`, older | `decrypt-only` | no | yes | |
//! | `disabled` | `disabled` | no | no (its own SQLSTATE) | enable again |
//! | `destroyed` | `destroyed` | no | never (its own SQLSTATE) | no: the wrapped key is erased |
//!
//! The rules, which [`check`] enforces and nothing else decides:
//! - the active key is never disabled or destroyed on its own (rotate the keyring first): a
//!   keyring always has a key to encrypt with until the keyring itself is destroyed;
//! - a key is destroyed only once it is disabled, so that destroying is always the second of two
//!   deliberate steps, and a disabled key can be watched for failures before it is gone;
//! - nothing leaves `destroyed`;
//! - asking for the state a key is already in changes nothing (so a retried script is harmless).
//!
//! Destroying a whole keyring (crypto-shredding a tenant) takes every key of it, the active one
//! included, straight to `destroyed`: that is the point of the operation, and the keyring is
//! destroyed with it so that nothing encrypts under it again.

use std::fmt;

/// A data key's stored state (the `state` column of `immuta.data_keys`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyState {
    Enabled,
    Disabled,
    Destroyed,
}

impl KeyState {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Enabled => "enabled",
            KeyState::Disabled => "disabled",
            KeyState::Destroyed => "destroyed",
        }
    }

    pub fn parse(text: &str) -> Option<KeyState> {
        match text {
            "enabled" => Some(KeyState::Enabled),
            "disabled" => Some(KeyState::Disabled),
            "destroyed" => Some(KeyState::Destroyed),
            _ => None,
        }
    }
}

impl fmt::Display for KeyState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A change asked of one key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    Disable,
    Enable,
    Destroy,
}

impl Change {
    /// The verb, for messages (`cannot disable ...`).
    pub fn verb(self) -> &'static str {
        match self {
            Change::Disable => "disable",
            Change::Enable => "enable",
            Change::Destroy => "destroy",
        }
    }

    /// The audit log's event for it.
    pub fn event(self) -> &'static str {
        match self {
            Change::Disable => "key disabled",
            Change::Enable => "key enabled",
            Change::Destroy => "key destroyed",
        }
    }

    fn target(self) -> KeyState {
        match self {
            Change::Disable => KeyState::Disabled,
            Change::Enable => KeyState::Enabled,
            Change::Destroy => KeyState::Destroyed,
        }
    }
}

/// Why a change is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The key is the active key of its keyring.
    Active,
    /// Destroying a key that is not disabled.
    NotDisabled,
    /// The key is destroyed: nothing brings it back.
    Destroyed,
}

/// The state key in `state` goes to under `change`, `None` when it is already there; `active`
/// says whether it is its keyring's newest key.
pub fn check(change: Change, state: KeyState, active: bool) -> Result<Option<KeyState>, Refusal> {
    let target = change.target();
    match (state, change) {
        (KeyState::Destroyed, Change::Destroy) => Ok(None),
        (KeyState::Destroyed, _) => Err(Refusal::Destroyed),
        (s, _) if s == target => Ok(None),
        (_, Change::Disable | Change::Destroy) if active => Err(Refusal::Active),
        (KeyState::Enabled, Change::Destroy) => Err(Refusal::NotDisabled),
        _ => Ok(Some(target)),
    }
}

/// The longest reason a state change takes: a sentence or a ticket reference, not a document.
pub const MAX_REASON_BYTES: usize = 1000;

/// Whether `reason` may be recorded: not blank, at most [`MAX_REASON_BYTES`].
pub fn reason_ok(reason: &str) -> bool {
    !reason.trim().is_empty() && reason.len() <= MAX_REASON_BYTES
}

#[cfg(test)]
mod tests {
    use super::*;
    use Change::*;
    use KeyState::*;

    #[test]
    fn every_state_and_change_has_one_outcome() {
        // (state, active, change) -> outcome, for every combination.
        let table = [
            (Enabled, false, Disable, Ok(Some(Disabled))),
            (Enabled, false, Enable, Ok(None)),
            (Enabled, false, Destroy, Err(Refusal::NotDisabled)),
            (Enabled, true, Disable, Err(Refusal::Active)),
            (Enabled, true, Enable, Ok(None)),
            (Enabled, true, Destroy, Err(Refusal::Active)),
            (Disabled, false, Disable, Ok(None)),
            (Disabled, false, Enable, Ok(Some(Enabled))),
            (Disabled, false, Destroy, Ok(Some(Destroyed))),
            (Destroyed, false, Disable, Err(Refusal::Destroyed)),
            (Destroyed, false, Enable, Err(Refusal::Destroyed)),
            (Destroyed, false, Destroy, Ok(None)),
        ];
        for (state, active, change, outcome) in table {
            assert_eq!(
                check(change, state, active),
                outcome,
                "{change:?} of a {state} key (active: {active})"
            );
        }
    }

    #[test]
    fn nothing_leaves_destroyed() {
        for change in [Disable, Enable, Destroy] {
            for active in [false, true] {
                assert!(!matches!(check(change, Destroyed, active), Ok(Some(_))));
            }
        }
    }

    #[test]
    fn a_key_is_destroyed_only_from_disabled() {
        for state in [Enabled, Disabled, Destroyed] {
            for active in [false, true] {
                if let Ok(Some(Destroyed)) = check(Destroy, state, active) {
                    assert_eq!(state, Disabled);
                }
            }
        }
    }

    #[test]
    fn states_round_trip_through_their_column_values() {
        for state in [Enabled, Disabled, Destroyed] {
            assert_eq!(KeyState::parse(state.as_str()), Some(state));
        }
        assert_eq!(KeyState::parse("active"), None);
    }

    #[test]
    fn reasons_are_required_and_bounded() {
        assert!(reason_ok("ticket SEC-42"));
        assert!(!reason_ok("   "));
        assert!(reason_ok(&"x".repeat(MAX_REASON_BYTES)));
        assert!(!reason_ok(&"x".repeat(MAX_REASON_BYTES + 1)));
    }
}
