//! The rollover rule: when the current data key stops encrypting new values.
//!
//! The Immuta model: a new data key every `schedule.dataKeyRollOverLength` days (default 365);
//! the newest key encrypts, older keys stay to decrypt. A key is due once it is that many days
//! old, measured from its `created_at`.

use crate::time::UnixMicros;

/// `schedule.dataKeyRollOverLength`, in whole days.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RolloverLength(u32);

impl RolloverLength {
    /// The default of Immuta's model: one year.
    pub const DEFAULT_DAYS: u32 = 365;
    /// A hundred years; beyond that the setting is surely a typo.
    pub const MAX_DAYS: u32 = 36_500;

    pub fn from_days(days: i64) -> Option<RolloverLength> {
        u32::try_from(days).ok().filter(|d| (1..=Self::MAX_DAYS).contains(d)).map(RolloverLength)
    }

    pub fn days(self) -> u32 {
        self.0
    }

    /// When a key created at `created_at` is due for rollover.
    pub fn due_at(self, created_at: UnixMicros) -> UnixMicros {
        created_at.plus_days(self.0)
    }

    /// Whether a key created at `created_at` is due at `now`.
    pub fn is_due(self, created_at: UnixMicros, now: UnixMicros) -> bool {
        now >= self.due_at(created_at)
    }
}

impl Default for RolloverLength {
    fn default() -> Self {
        RolloverLength(Self::DEFAULT_DAYS)
    }
}

/// Why a data key was created; recorded on its row and in the audit log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RotationReason {
    /// The first encryption found no key.
    FirstUse,
    /// `immuta_rotate()`.
    Manual,
    /// The current key was `dataKeyRollOverLength` days old: rolled over by the scheduled
    /// `immuta_rotate_if_due()` or by the first encryption that noticed.
    Schedule,
    /// The current key had counted `immuta.max_encryptions_per_key` encryptions.
    UsageLimit,
}

impl RotationReason {
    /// The value of the `reason` columns.
    pub fn as_str(self) -> &'static str {
        match self {
            RotationReason::FirstUse => "first use",
            RotationReason::Manual => "manual",
            RotationReason::Schedule => "schedule",
            RotationReason::UsageLimit => "usage limit",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_one_year() {
        assert_eq!(RolloverLength::default().days(), 365);
    }

    #[test]
    fn lengths_must_be_whole_positive_days_within_a_century() {
        assert!(RolloverLength::from_days(0).is_none());
        assert!(RolloverLength::from_days(-1).is_none());
        assert!(RolloverLength::from_days(36_501).is_none());
        assert_eq!(RolloverLength::from_days(1).unwrap().days(), 1);
    }

    #[test]
    fn a_key_is_due_exactly_when_it_is_as_old_as_the_length() {
        let len = RolloverLength::from_days(2).unwrap();
        let created = UnixMicros(1_000);
        assert!(!len.is_due(created, UnixMicros(1_000 + 2 * UnixMicros::DAY - 1)));
        assert!(len.is_due(created, UnixMicros(1_000 + 2 * UnixMicros::DAY)));
        assert_eq!(len.due_at(UnixMicros(i64::MAX - 5)), UnixMicros(i64::MAX), "saturates");
    }
}
