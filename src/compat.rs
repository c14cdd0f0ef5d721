//! What differs between the PostgreSQL versions immuta builds for, and nothing else.
//!
//! immuta is tested on PostgreSQL 15, 16 and 18 and declares pgrx's features for 13, 14 and 17
//! too (README, "Supported PostgreSQL versions"). Every `#[cfg(feature = "pgNN")]` of the
//! extension is in this file, so that the rest of the code reads the same on every version:
//!
//! | difference | versions | here |
//! |---|---|---|
//! | the local transaction id moved into `PGPROC.vxid` | 17 and later | [`local_xid`] |
//! | `LockHeldByMe` takes `orstronger` | 17 and later | [`lock_held_by_me`] |
//! | `MarkGUCPrefixReserved` replaces `EmitWarningsOnPlaceholders` | 15 and later | [`reserve_guc_prefix`] |
//! | shared memory is requested from `shmem_request_hook` | 15 and later | [`install_shmem_request_hook`] |

use pgrx::pg_sys;
use std::ffi::CStr;

/// The process-local id of the current transaction (`MyProc->lxid`, `MyProc->vxid.lxid` from 17).
pub fn local_xid() -> u32 {
    // SAFETY: MyProc is set for every backend and parallel worker before any function runs.
    #[cfg(any(feature = "pg13", feature = "pg14", feature = "pg15", feature = "pg16"))]
    let lxid = unsafe { (*pg_sys::MyProc).lxid };
    // SAFETY: as above; from 17 the id is part of the virtual transaction id in PGPROC.
    #[cfg(not(any(feature = "pg13", feature = "pg14", feature = "pg15", feature = "pg16")))]
    let lxid = unsafe { (*pg_sys::MyProc).vxid.lxid };
    lxid
}

/// Whether this backend holds the lock `tag` in exactly `mode`.
pub fn lock_held_by_me(tag: &pg_sys::LOCKTAG, mode: pg_sys::LOCKMODE) -> bool {
    // SAFETY: looks the tag up in this backend's own lock table; reads nothing shared.
    #[cfg(any(feature = "pg13", feature = "pg14", feature = "pg15", feature = "pg16"))]
    let held = unsafe { pg_sys::LockHeldByMe(tag, mode) };
    // SAFETY: as above; `orstronger = false` keeps the meaning of the older signature.
    #[cfg(not(any(feature = "pg13", feature = "pg14", feature = "pg15", feature = "pg16")))]
    let held = unsafe { pg_sys::LockHeldByMe(tag, mode, false) };
    held
}

/// After every setting of `prefix` is defined: a setting of that prefix that immuta does not
/// define (a misspelling) is an error from now on, not a placeholder that silently does nothing.
/// Before 15, PostgreSQL can only warn about the placeholders that exist at this moment.
pub fn reserve_guc_prefix(prefix: &CStr) {
    // SAFETY: called from _PG_init with a NUL-terminated string that outlives the call (PostgreSQL
    // copies it).
    #[cfg(not(any(feature = "pg13", feature = "pg14")))]
    unsafe {
        pg_sys::MarkGUCPrefixReserved(prefix.as_ptr())
    };
    // SAFETY: as above.
    #[cfg(any(feature = "pg13", feature = "pg14"))]
    unsafe {
        pg_sys::EmitWarningsOnPlaceholders(prefix.as_ptr())
    };
}

/// Arranges for `request` to run when the postmaster sizes shared memory: from the
/// `shmem_request_hook` (15 and later, where requesting space elsewhere is an error), or at once
/// while shared_preload_libraries is being loaded (13 and 14, which have no such hook).
///
/// # Safety
/// Only in the postmaster, while shared_preload_libraries is being processed.
pub unsafe fn install_shmem_request_hook(request: unsafe extern "C-unwind" fn()) {
    #[cfg(not(any(feature = "pg13", feature = "pg14")))]
    // SAFETY: the caller runs in the postmaster during preload, before any backend exists; the
    // hook chains to the previous one, as PostgreSQL expects.
    unsafe {
        PREV_REQUEST_HOOK = pg_sys::shmem_request_hook;
        REQUEST = Some(request);
        pg_sys::shmem_request_hook = Some(chained_request);
    }
    #[cfg(any(feature = "pg13", feature = "pg14"))]
    // SAFETY: before 15, space is requested directly from _PG_init during preload.
    unsafe {
        request()
    };
}

#[cfg(not(any(feature = "pg13", feature = "pg14")))]
static mut PREV_REQUEST_HOOK: pg_sys::shmem_request_hook_type = None;
#[cfg(not(any(feature = "pg13", feature = "pg14")))]
static mut REQUEST: Option<unsafe extern "C-unwind" fn()> = None;

#[cfg(not(any(feature = "pg13", feature = "pg14")))]
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn chained_request() {
    // SAFETY: the shmem request hook, in the postmaster: the previous hook first, then ours; both
    // were set once during preload and never change afterwards.
    unsafe {
        if let Some(prev) = PREV_REQUEST_HOOK {
            prev();
        }
        if let Some(request) = REQUEST {
            request();
        }
    }
}
