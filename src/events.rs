//! PostgreSQL's transaction events, dispatched to the modules that keep per-transaction state.
//! The one place that depends on all of them, so that none of them depends on another for it.

use pgrx::{pg_guard, pg_sys};

use crate::{backend, blind_index, catalog, key_states, keys, restore, usage};

/// Registers the relcache and transaction callbacks. Called from `_PG_init`, once per process.
pub fn register() {
    backend::register_invalidation_callback();
    // SAFETY: registering callbacks with static function pointers; PostgreSQL keeps them for the
    // life of the process.
    unsafe {
        pg_sys::RegisterXactCallback(Some(on_xact_event), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(on_subxact_event), std::ptr::null_mut());
    }
}

/// PostgreSQL replays a transaction's invalidations locally when it aborts, but not those of the
/// command that was running when it failed: a key created by the failing statement itself would
/// stay current in this backend. So an abort after a key creation (or any write of immuta's)
/// empties the ring, which the next call fills with committed keys only.
#[pg_guard]
extern "C-unwind" fn on_xact_event(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    use pg_sys::XactEvent::*;
    match event {
        XACT_EVENT_PRE_PREPARE => {
            keys::before_prepare();
            backend::before_commit();
            blind_index::before_commit();
        }
        XACT_EVENT_PRE_COMMIT | XACT_EVENT_PARALLEL_PRE_COMMIT => {
            backend::before_commit();
            blind_index::before_commit();
        }
        XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT => {
            // The keys it created are gone, and the audit ids it wrote will be given again.
            if backend::take_keys_written() || catalog::wrote_unpreparable() {
                backend::clear();
            }
            catalog::at_transaction_end();
            usage::at_transaction_end(false);
            key_states::at_transaction_end(false);
        }
        XACT_EVENT_COMMIT | XACT_EVENT_PARALLEL_COMMIT => {
            backend::take_keys_written();
            catalog::at_transaction_end();
            usage::at_transaction_end(true);
            key_states::at_transaction_end(true);
        }
        XACT_EVENT_PREPARE => {
            backend::take_keys_written();
            catalog::at_transaction_end();
            usage::at_transaction_end(false);
            key_states::at_transaction_end(false);
        }
        _ => {}
    }
}

#[pg_guard]
extern "C-unwind" fn on_subxact_event(
    event: pg_sys::SubXactEvent::Type,
    sub: pg_sys::SubTransactionId,
    parent: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    use pg_sys::SubXactEvent::*;
    match event {
        SUBXACT_EVENT_ABORT_SUB => {
            if backend::keys_written() || catalog::wrote_unpreparable() {
                backend::clear();
            }
            restore::forget_checks();
            usage::at_subtransaction_end(sub, parent, false);
        }
        SUBXACT_EVENT_COMMIT_SUB => usage::at_subtransaction_end(sub, parent, true),
        _ => {}
    }
}
