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

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use immuta_core::config::Config;
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
}

/// Loads the configuration from its source. `previous` is what this backend had before: a file
/// that fails to parse keeps it in force.
pub fn load(previous: Option<&Effective>) -> Effective {
    let Some(path) = gucs::config_file() else {
        return match catalog::stored_config() {
            // Stored YAML was validated when stored; an error here means a newer or edited row.
            Some(yaml) => Effective {
                config: Rc::new(
                    Config::from_yaml(&yaml).unwrap_or_else(|e| errors::report(e, ConfigOrigin::Stored)),
                ),
                source: Source::Stored,
            },
            None => Effective { config: Rc::new(Config::default()), source: Source::Default },
        };
    };
    let stamp = FileStamp::of(&path);
    let parsed = match std::fs::read_to_string(&path) {
        Ok(text) => Config::from_yaml(&text),
        Err(e) => Err(Error::Config {
            path: path.display().to_string(),
            reason: format!("cannot read the file: {e}"),
        }),
    };
    match (parsed, previous) {
        (Ok(config), _) => Effective { config: Rc::new(config), source: Source::File { path, stamp } },
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
            Effective { config: prev.config.clone(), source: Source::File { path, stamp } }
        }
        (Err(e), None) => errors::report(e, ConfigOrigin::File),
    }
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
