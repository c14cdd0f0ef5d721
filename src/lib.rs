//! immuta: envelope encryption of column values inside PostgreSQL.
//!
//! This crate is the SQL layer. The core (format, crypto, providers, configuration, rollover
//! rule) is `crates/immuta-core` and knows nothing of PostgreSQL. Dependencies run one way:
//! functions -> blind_index -> keys, keyrings, key_states -> backend -> usage -> catalog, shared_cache, gucs,
//! xact (`events.rs` and the triggers of `restore.rs` and `replication.rs`, which PostgreSQL calls,
//! are the modules that reach across them).
//!
//! | file | concern |
//! |---|---|
//! | `functions.rs` | the SQL functions (`functions/blind_index.rs`: those of blind indexes) |
//! | `blind_index.rs` | blind indexes: index keys' lifecycle, their MAC keys in this backend, terms |
//! | `keys.rs` | the key lifecycle: encryption's slow path, key creation, rollover, rotation, rewrap |
//! | `keyrings.rs` | creating and configuring named keyrings, and their status |
//! | `key_states.rs` | disabling, enabling and destroying keys; crypto-shredding a keyring |
//! | `backend.rs` | the backend's private state: key ring, invalidation, the hot path, loading keys |
//! | `usage.rs` | counting encryptions per key (the usage limit), and this backend's grants |
//! | `events.rs` | transaction events, dispatched to the modules above |
//! | `xact.rs` | facts about the transaction in progress (a leaf) |
//! | `cron.rs` | the pg_cron job that runs scheduled rollover |
//! | `status.rs` | `immuta_status()` |
//! | `providers.rs` | which provider wraps new keys and unwraps existing ones |
//! | `shared_cache.rs` | the cluster-wide cache of unwrapped keys in shared memory |
//! | `config_source.rs` | where the configuration comes from, and when it is re-read |
//! | `catalog.rs` | SPI access to the extension's tables (`catalog/index_keys.rs`: `immuta.index_keys`) |
//! | `restore.rs` | rows added to the tables by a restore: when, what, with what trust |
//! | `replication.rs` | keys received by logical replication: one writer, caches kept in step |
//! | `gucs.rs` | the settings |
//! | `errors.rs` | errors to SQLSTATEs |
//! | `varlena.rs` | results built in place |
//! | `compat.rs` | what differs between PostgreSQL versions |

use pgrx::prelude::*;

mod backend;
mod blind_index;
mod buffer;
mod catalog;
mod compat;
mod config_source;
mod cron;
mod errors;
mod events;
mod functions;
mod gucs;
mod key_states;
mod keyrings;
mod keys;
mod providers;
mod replication;
mod restore;
mod shared_cache;
mod status;
mod typed;
mod usage;
mod varlena;
mod xact;

::pgrx::pg_module_magic!(name, version);

extension_sql_file!("../sql/bootstrap.sql", name = "bootstrap", bootstrap);
extension_sql_file!("../sql/finalize.sql", name = "finalize", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    quiet_panics();
    require_cpu_features();
    // SAFETY: reads a flag PostgreSQL sets while it loads shared_preload_libraries.
    let preloading = unsafe { pg_sys::process_shared_preload_libraries_in_progress };
    gucs::init(preloading);
    events::register();
    if preloading && gucs::shared_cache_keys() > 0 {
        shared_cache::request_shared_memory();
    }
    // SAFETY: reads a flag the postmaster sets from its command line before it loads libraries;
    // backends inherit it.
    if unsafe { pg_sys::IsBinaryUpgrade } {
        providers::mark_upgraded_cluster();
    }
}

/// Replaces pgrx's panic hook, which records a backtrace (when `RUST_BACKTRACE` or
/// `RUST_LIB_BACKTRACE` is set in the server's environment) that pgrx then appends to the DETAIL
/// of the error every client sees. An error immuta raises itself never carries one; a panic (a
/// bug) becomes an XX000 error with its message only. A panic on one of the AWS SDK's helper
/// threads is reported as one line on standard error (the server log), without its message.
fn quiet_panics() {
    std::panic::set_hook(Box::new(|_| {
        // SAFETY: gettid and getpid only read the calling thread's and process's ids.
        let helper_thread = unsafe { libc::syscall(libc::SYS_gettid) != libc::getpid() as libc::c_long };
        if helper_thread {
            use std::io::Write;
            let _ = std::io::stderr().write_all(b"immuta: a helper thread of the AWS SDK panicked\n");
        }
    }));
}

/// immuta is compiled with AES-NI and PCLMULQDQ enabled (.cargo/config.toml): refuse to load on a
/// CPU without them rather than die of an illegal instruction later. `is_x86_feature_detected!`
/// cannot tell (it answers from the compile-time features), so ask CPUID leaf 1 directly:
/// ECX bit 25 is AES-NI, bit 1 is PCLMULQDQ.
fn require_cpu_features() {
    #[cfg(target_arch = "x86_64")]
    {
        // CPUID exists on every x86-64 processor, and leaf 1 always does.
        let ecx = std::arch::x86_64::__cpuid(1).ecx;
        if ecx & (1 << 25) == 0 || ecx & (1 << 1) == 0 {
            errors::raise(
                pgrx::PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                "immuta requires a CPU with AES-NI and PCLMULQDQ",
                None,
                Some("Every x86-64 server processor since 2010 has them; check the virtual machine's CPU model."),
            );
        }
    }
}

#[cfg(any(test, feature = "pg_test"))]
mod pg_tests;

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![]
    }
}
