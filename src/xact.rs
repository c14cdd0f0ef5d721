//! Facts about the transaction in progress that every layer asks: whether it may write, and when
//! it started. A leaf: it depends on nothing of immuta's but the version shims.

use immuta_core::time::UnixMicros;
use pgrx::pg_sys;

/// Why this transaction cannot create a key (or write a usage reservation), if it cannot.
pub fn write_blocker() -> Option<&'static str> {
    // SAFETY: reads of PostgreSQL's transaction and recovery state.
    unsafe {
        if pg_sys::RecoveryInProgress() {
            Some("the server is a standby in recovery")
        } else if pg_sys::XactReadOnly {
            Some("the transaction is read-only")
        } else if pg_sys::IsInParallelMode() {
            Some("the key was needed inside a parallel operation, which cannot write")
        } else {
            None
        }
    }
}

/// Whether this server is a standby in recovery.
pub fn in_recovery() -> bool {
    // SAFETY: reads the recovery state (a local flag once recovery has ended).
    unsafe { pg_sys::RecoveryInProgress() }
}

/// Reads the invalidations other sessions (or, on a standby, the replay of the primary's commits)
/// have queued for this one, as PostgreSQL does at a transaction's start or a new lock; the
/// relcache callbacks run (backend.rs).
pub fn accept_invalidations() {
    // SAFETY: processes this backend's shared invalidation queue inside a transaction, as any
    // lock acquisition may.
    unsafe { pg_sys::AcceptInvalidationMessages() }
}

/// Whether this process is a logical replication worker (a subscription's apply, parallel apply
/// or table synchronisation): the only writer of immuta's tables besides immuta itself and a
/// restore (replication.rs).
pub fn is_logical_apply() -> bool {
    // SAFETY: reads this process's worker state.
    unsafe { pg_sys::IsLogicalWorker() }
}

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// A PostgreSQL timestamp (microseconds since 2000-01-01) as the core's instant.
pub fn from_pg_timestamp(ts: pg_sys::TimestampTz) -> UnixMicros {
    UnixMicros(ts.saturating_add(PG_EPOCH_OFFSET_MICROS))
}

/// The transaction start time, which is also the `created_at` of keys this transaction creates.
pub fn transaction_now() -> UnixMicros {
    // SAFETY: reads the start timestamp of the current transaction.
    from_pg_timestamp(unsafe { pg_sys::GetCurrentTransactionStartTimestamp() })
}

/// Wall-clock now.
pub fn wall_now() -> UnixMicros {
    // SAFETY: reads the current time.
    from_pg_timestamp(unsafe { pg_sys::GetCurrentTimestamp() })
}
