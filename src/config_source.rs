//! Where the configuration comes from, and when it is read again.
//!
//! Precedence, highest first:
//! 1. the file named by `immuta.config_file`, when that setting is not empty;
//! 2. the YAML stored by `immuta_configure()` in `immuta.config`;
//! 3. the defaults (local master key, rollover every 365 days).
//!
//! There is no merging: the first source present is the whole configuration. A backend keeps the
//! parsed configuration until `immuta.config` changes (a relcache invalidation, see `backend.rs`)
//! or, for a file, until the file's path, size, modification time or inode changes (checked once
//! per transaction). A file that becomes invalid leaves the last good configuration in force in a
//! backend that had one, with a WARNING; a backend with none gets the ERROR.
//!
//! Each source is bounded before it is parsed (`immuta_core::config::MAX_DOCUMENT_BYTES`): a
//! file is read only up to the limit, a stored document only if its length is within it.
//!
//! Which source is in force also says whether immuta may call AWS KMS with the server's own
//! identity (`immuta_core::server_identity`): the file (only a superuser names it) and a
//! configuration a superuser stored may lend it; the defaults, and a configuration stored by a
//! role that is not a superuser, do not.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use immuta_core::config::{self, Config, MAX_DOCUMENT_BYTES};
use immuta_core::Error;
use pgrx::PgSqlErrorCode;

use crate::catalog;
use crate::errors::{self, ConfigOrigin};
use crate::gucs;

/// Which source the effective configuration came from.
#[derive(Clone, PartialEq, Eq)]
pub enum Source {
    Default,
    Stored,
    File { path: PathBuf, stamp: Option<FileStamp> },
}

/// Identity of a version of the configuration file.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    len: u64,
    mtime_ns: i128,
    ino: u64,
}

impl FileStamp {
    pub fn of(path: &Path) -> Option<FileStamp> {
        let m = std::fs::metadata(path).ok()?;
        Some(FileStamp {
            len: m.len(),
            mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
            ino: m.ino(),
        })
    }
}

/// The configuration in force in this backend.
#[derive(Clone)]
pub struct Effective {
    pub config: Rc<Config>,
    pub source: Source,
    /// A superuser put this configuration in force: it may lend the server's own AWS identity.
    pub by_superuser: bool,
}

impl Default for Effective {
    fn default() -> Self {
        Effective { config: Rc::new(Config::default()), source: Source::Default, by_superuser: false }
    }
}

/// Loads the configuration from its source. `previous` is what this backend had before: a file
/// that fails to parse keeps it in force.
pub fn load(previous: Option<&Effective>) -> Effective {
    let Some(path) = gucs::config_file() else {
        return match catalog::stored_config() {
            // Stored YAML was validated when stored; an error here means a newer or edited row.
            Some(stored) => {
                let parsed = match stored.yaml {
                    Some(yaml) => Config::from_yaml(&yaml),
                    None => config::check_bounds(stored.len, &[]).map(|()| Config::default()),
                };
                pgrx::check_for_interrupts!();
                Effective {
                    config: Rc::new(parsed.unwrap_or_else(|e| errors::report(e, ConfigOrigin::Stored))),
                    source: Source::Stored,
                    by_superuser: stored.by_superuser,
                }
            }
            None => Effective::default(),
        };
    };
    let stamp = FileStamp::of(&path);
    let parsed = read_bounded(&path).and_then(|text| Config::from_yaml(&text));
    pgrx::check_for_interrupts!();
    match (parsed, previous) {
        (Ok(config), _) => {
            Effective { config: Rc::new(config), source: Source::File { path, stamp }, by_superuser: true }
        }
        (Err(e), Some(prev)) => {
            errors::warn(
                PgSqlErrorCode::ERRCODE_CONFIG_FILE_ERROR,
                format!(
                    "immuta configuration file \"{}\" is invalid; the previous configuration stays in force",
                    path.display()
                ),
                Some(e.to_string()),
                Some("Fix the file named by immuta.config_file."),
            );
            // Remember the bad version so that the warning is not repeated for it.
            Effective { source: Source::File { path, stamp }, ..prev.clone() }
        }
        (Err(e), None) => errors::report(e, ConfigOrigin::File),
    }
}

/// The configuration file's text, read only up to the longest configuration accepted (a file
/// of 100 MB is refused after reading 64 KiB of it, not after parsing it).
fn read_bounded(path: &Path) -> Result<String, Error> {
    let cannot = |e: std::io::Error| Error::Config {
        path: path.display().to_string(),
        reason: format!("cannot read the file: {e}"),
    };
    let file = std::fs::File::open(path).map_err(cannot)?;
    let len = file.metadata().map_err(cannot)?.len();
    config::check_bounds(usize::try_from(len).unwrap_or(usize::MAX), &[])?;
    // Taken up to one byte more than the limit: a file that grew since it was measured is
    // refused by the check below, having been read no further.
    let mut bytes = Vec::new();
    file.take(MAX_DOCUMENT_BYTES as u64 + 1).read_to_end(&mut bytes).map_err(cannot)?;
    config::check_bounds(bytes.len(), &bytes)?;
    String::from_utf8(bytes).map_err(|_| Error::Config {
        path: path.display().to_string(),
        reason: "the file is not UTF-8 text".into(),
    })
}

/// Whether the configuration file changed since `effective` was loaded (a cheap `stat`).
pub fn file_changed(effective: &Effective) -> bool {
    let now = gucs::config_file();
    match (&effective.source, now) {
        (Source::File { path, stamp }, Some(p)) => *path != p || FileStamp::of(&p) != *stamp,
        (Source::File { .. }, None) => true,
        (_, Some(_)) => true,
        (_, None) => false,
    }
}
