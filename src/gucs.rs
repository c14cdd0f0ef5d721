//! Every setting immuta defines, in one place.
//!
//! The file settings are `PGC_SIGHUP`: they can only be set in `postgresql.conf` (or with
//! `ALTER SYSTEM`) and take effect on reload, so only a superuser decides which file holds the
//! master key or the configuration; a session cannot point immuta at a file of its choosing.

use std::ffi::CStr;
use std::path::PathBuf;

use pgrx::{pg_sys, GucContext, GucFlags, GucRegistry, GucSetting};

/// `immuta.master_key_file`: the file that holds the local master key (64 hex digits, mode 0600).
///
/// Default `immuta_master.key`; a relative path is relative to the data directory, as for
/// `ssl_key_file`, so the key travels with `pg_basebackup` to standbys but not with `pg_dump`.
/// Generated on first use when no key row depends on a local master key yet. Read whenever a data
/// key is wrapped or unwrapped, so a change applies to the next unwrap after reload.
pub static MASTER_KEY_FILE: GucSetting<Option<std::ffi::CString>> =
    GucSetting::<Option<std::ffi::CString>>::new(Some(c"immuta_master.key"));

/// `immuta.config_file`: a YAML file holding the configuration (Immuta's Advanced Configuration
/// format). Default empty: the configuration stored by `immuta_configure()` applies. When set,
/// the file is the configuration and `immuta_configure()` refuses to run, so there is one source
/// of truth. A relative path is relative to the data directory. Changes to the file are picked up
/// at the next transaction that uses immuta.
pub static CONFIG_FILE: GucSetting<Option<std::ffi::CString>> =
    GucSetting::<Option<std::ffi::CString>>::new(None);

/// `immuta.kms_timeout`: the longest one AWS KMS call may take, retries included, in
/// milliseconds. Default 5 s: long enough for a KMS round trip with a retry across regions, short
/// enough that a KMS outage fails a query quickly instead of holding it. Superuser-settable (also
/// per session, e.g. for a migration with `immuta_rewrap()`). A query cancel or
/// `statement_timeout` ends a KMS wait sooner, within 20 ms.
pub static KMS_TIMEOUT: GucSetting<i32> = GucSetting::<i32>::new(5000);

/// `immuta.shared_cache_keys`: how many unwrapped data keys the shared cache holds for the whole
/// cluster (the least recently used is evicted when it is full). Postmaster-only: it sizes a
/// shared memory segment (about 130 bytes a slot: an unwrapped key, and a key's usage counter),
/// and only when immuta is preloaded. Default 128:
/// a cluster of a few databases with yearly, or even monthly, rollover over many years fits.
pub static SHARED_CACHE_KEYS: GucSetting<i32> = GucSetting::<i32>::new(128);

/// `immuta.cache_ttl`: seconds an unwrapped key may be used before it is unwrapped again, in the
/// shared cache and in every backend. Revoking KMS access takes effect within this time; a KMS
/// outage shorter than what is left of it goes unnoticed for cached keys. 0 keeps keys until
/// rotation, rewrap, `immuta_cache_reset()` or restart. Default one hour. Checked at transaction
/// start in each backend.
pub static CACHE_TTL: GucSetting<i32> = GucSetting::<i32>::new(3600);

/// `immuta.max_encryptions_per_key`: encryptions after which a data key rolls over (reason
/// `usage limit`), whatever its age. AES-GCM with random nonces allows at most 2^32 per key
/// (NIST SP 800-38D); the default, 2·10^9, keeps more than half of that as a margin for what a
/// crash or read-only sessions can leave uncounted (README, "Usage limit"). Past 2^32 immuta
/// refuses to encrypt under the key at all. Reload-time (`SIGHUP`) so that every backend of the
/// cluster applies the same limit; set low (it goes down to 1) to exercise rollover in tests.
pub static MAX_ENCRYPTIONS_PER_KEY: GucSetting<i32> = GucSetting::<i32>::new(2_000_000_000);

/// Defines every `immuta.*` setting, then reserves the prefix: a misspelt `immuta.` setting in
/// postgresql.conf is reported and ignored, and `SET immuta.misspelt` is an error, instead of a
/// placeholder that silently does nothing.
///
/// `immuta.shared_cache_keys` is postmaster-only when immuta is preloaded (it sizes shared
/// memory, and PostgreSQL refuses postmaster-context settings defined after startup). Loaded on
/// demand, there is no shared cache to size; the setting is still defined, for the superuser
/// alone, so that a configuration naming it is not reported as misspelt.
pub fn init(preloading: bool) {
    GucRegistry::define_int_guc(
        c"immuta.shared_cache_keys",
        c"Unwrapped data keys the shared cache holds (when immuta is preloaded).",
        c"0 disables the shared cache. Takes effect at server start.",
        &SHARED_CACHE_KEYS,
        0,
        65_536,
        if preloading { GucContext::Postmaster } else { GucContext::Suset },
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"immuta.max_encryptions_per_key",
        c"Encryptions after which a data key rolls over.",
        c"AES-GCM with random nonces allows at most 2^32 per key; immuta refuses to encrypt past that.",
        &MAX_ENCRYPTIONS_PER_KEY,
        1,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"immuta.cache_ttl",
        c"Seconds an unwrapped data key may be used before it is unwrapped again.",
        c"0 keeps keys until rotation, rewrap, immuta_cache_reset() or restart.",
        &CACHE_TTL,
        0,
        31_536_000,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"immuta.kms_timeout",
        c"Longest time one AWS KMS call may take, retries included.",
        c"A query cancel or statement_timeout ends the wait sooner.",
        &KMS_TIMEOUT,
        100,
        600_000,
        GucContext::Suset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_string_guc(
        c"immuta.master_key_file",
        c"File holding immuta's local master key.",
        c"64 hexadecimal digits, mode 0600. Relative paths are relative to the data directory. \
          Generated on first use while no data key depends on a local master key.",
        &MASTER_KEY_FILE,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY,
    );
    GucRegistry::define_string_guc(
        c"immuta.config_file",
        c"YAML file holding immuta's configuration.",
        c"When set, this file is the configuration and immuta_configure() is refused. \
          Relative paths are relative to the data directory.",
        &CONFIG_FILE,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY,
    );
    crate::compat::reserve_guc_prefix(c"immuta");
}

/// Sets PostgreSQL setting `name` to `value` as immuta's own code needs it: with
/// `GUC_ACTION_LOCAL`, for the rest of the transaction (as SET LOCAL); with `GUC_ACTION_SAVE`,
/// until the enclosing GUC nest level ends (`AtEOXact_GUC`).
pub fn set_for(name: &CStr, value: &CStr, action: pg_sys::GucAction::Type) {
    // SAFETY: sets an existing, user-settable setting from NUL-terminated strings, inside a
    // transaction; PostgreSQL undoes it at the end of the transaction or nest level.
    unsafe {
        pg_sys::set_config_option(
            name.as_ptr(),
            value.as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
            action,
            true,
            0,
            false,
        );
    }
}

pub fn shared_cache_keys() -> usize {
    SHARED_CACHE_KEYS.get().max(0) as usize
}

/// `immuta.max_encryptions_per_key`.
pub fn usage_limit() -> immuta_core::usage::UsageLimit {
    immuta_core::usage::UsageLimit::new(MAX_ENCRYPTIONS_PER_KEY.get().max(1) as u64)
}

pub fn cache_ttl_seconds() -> i32 {
    CACHE_TTL.get().max(0)
}

/// `immuta.kms_timeout` as a duration.
pub fn kms_timeout() -> std::time::Duration {
    std::time::Duration::from_millis(KMS_TIMEOUT.get().max(1) as u64)
}

/// The master key file, resolved against the data directory.
pub fn master_key_file() -> PathBuf {
    resolve(MASTER_KEY_FILE.get().as_deref())
        .unwrap_or_else(|| resolve(Some(c"immuta_master.key")).expect("non-empty"))
}

/// Where immuta records that it generated a master key for this cluster (always in the data
/// directory, whatever `immuta.master_key_file` says).
pub fn master_key_marker() -> PathBuf {
    resolve(Some(c"immuta_master_key.generated")).expect("non-empty")
}

/// The configuration file, if one is set.
pub fn config_file() -> Option<PathBuf> {
    resolve(CONFIG_FILE.get().as_deref())
}

fn resolve(setting: Option<&CStr>) -> Option<PathBuf> {
    let text = setting?.to_str().ok()?.trim();
    if text.is_empty() {
        return None;
    }
    let path = PathBuf::from(text);
    if path.is_absolute() {
        return Some(path);
    }
    // SAFETY: DataDir is set by the postmaster before any backend runs extension code and never
    // changes afterwards; we only read it.
    let data_dir = unsafe { pg_sys::DataDir };
    if data_dir.is_null() {
        return Some(path);
    }
    // SAFETY: DataDir is a NUL-terminated string owned by PostgreSQL for the life of the process.
    let data_dir = unsafe { CStr::from_ptr(data_dir) };
    Some(PathBuf::from(data_dir.to_string_lossy().into_owned()).join(path))
}
