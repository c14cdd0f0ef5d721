//! Instants as the core sees them: microseconds since the Unix epoch.
//!
//! PostgreSQL counts from 2000-01-01; the SQL layer converts at the boundary so that the rollover
//! rule can be tested here without a server.

/// Microseconds since 1970-01-01 00:00:00 UTC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UnixMicros(pub i64);

impl UnixMicros {
    /// Microseconds in one day.
    pub const DAY: i64 = 86_400 * 1_000_000;

    /// This instant plus `days` days, saturating instead of overflowing.
    pub fn plus_days(self, days: u32) -> UnixMicros {
        UnixMicros(self.0.saturating_add(i64::from(days).saturating_mul(Self::DAY)))
    }
}
