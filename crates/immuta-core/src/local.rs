//! The local provider: a 256-bit master key in a file wraps the data keys.
//!
//! This is the embedded default when no KMS is configured. The file holds the key as 64 hex
//! digits (so it can be printed for escrow and typed back), must be a regular file that only its
//! owner can read (mode 0600, as PostgreSQL demands of `ssl_key_file`), and is generated on first
//! use when, and only when, nothing depends on a master key yet: a missing file later on is an
//! error, never a reason to create a new master key that would strand existing data keys.
//!
//! "Nothing depends on it" has two parts. The caller checks its own database's key rows; and
//! because one master key serves every database of the cluster, generating one also writes a
//! *marker* file recording its fingerprint. While the marker exists, a missing master key is an
//! error in every database, including one that has no keys yet.
//!
//! pg_upgrade, like initdb, creates a new data directory and copies neither file. While it runs
//! (binary-upgrade mode), immuta writes a marker of an *unknown* fingerprint into the new data
//! directory if the master key file is missing there ([`mark_upgraded_cluster`]): until the
//! user copies the old master key file, every database fails with the error naming it, and none
//! generates a new master key over the keys that pg_upgrade carried over.
//!
//! Wrapped key layout (docs/FORMAT.md): `0x01 | nonce (12) | AES-256-GCM(master, data key) (32) |
//! tag (16)`, 61 bytes, with associated data `"immuta local wrap v1" | key id (8, big-endian)`.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use aes::Aes256Enc;
use aes_gcm::aead::consts::U12;
use aes_gcm::aead::AeadInPlace;
use aes_gcm::{AesGcm, KeyInit, Nonce, Tag};
use hmac::{Hmac, Mac};
use rand_core::{OsRng, RngCore};
use sha2::Sha256;
use zeroize::{Zeroize, Zeroizing};

use crate::key::{DataKey, Fingerprint, KeyId, WrappedKey, WrappingKeyRef, DATA_KEY_LEN};
use crate::provider::{KeyProvider, Wrapped};
use crate::{Error, Result};

/// First byte of a locally wrapped key.
pub const WRAP_VERSION_1: u8 = 0x01;
/// Length of a locally wrapped key: version, nonce, encrypted key, tag.
pub const WRAPPED_LEN: usize = 1 + 12 + DATA_KEY_LEN + 16;
/// Prefix of the associated data; the key id follows.
pub const WRAP_AAD_PREFIX: &[u8] = b"immuta local wrap v1";
/// HMAC message whose output, truncated, fingerprints a master key.
pub const FINGERPRINT_LABEL: &[u8] = b"immuta master key fingerprint";

/// Whether opening the master key file may create it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Create<'a> {
    /// No key row of the caller's database refers to a local master key: generate the file if it
    /// is absent and the marker at this path does not say one was generated before.
    IfMissing { marker: &'a Path },
    /// Key rows depend on an existing master key: a missing file is an error.
    Never,
}

/// AES-256-GCM over a borrowed schedule, made for each wrap or unwrap: it computes the GHASH key
/// `H` then. An `aes-gcm` kept for the provider's life would keep `H`, and `polyval`'s run-time
/// dispatch wrapper never zeroizes it; `H` with a stored wrapped key is enough to forge tags.
type WrapAead<'a> = AesGcm<&'a Aes256Enc, U12>;

/// The local master key provider.
pub struct LocalProvider {
    /// The master key's AES schedule (zeroized on drop by `aes`).
    master: Aes256Enc,
    reference: WrappingKeyRef,
    path: PathBuf,
}

impl LocalProvider {
    /// Opens (or, with [`Create::IfMissing`], creates) the master key file at `path`.
    pub fn open(path: &Path, create: Create<'_>) -> Result<LocalProvider> {
        let key = match (read_master_key(path), create) {
            (Err(Error::MasterKeyMissing { path, .. }), Create::IfMissing { marker }) => {
                match read_marker(marker) {
                    Marker::Absent => create_master_key(&path)?,
                    Marker::Generated(expected) => {
                        return Err(Error::MasterKeyMissing { path, expected: Some(expected) })
                    }
                    Marker::Upgraded => return Err(Error::MasterKeyMissing { path, expected: None }),
                }
            }
            (other, _) => other?,
        };
        let provider = LocalProvider::from_key(&key, path);
        if let Create::IfMissing { marker } = create {
            if read_marker(marker) != Marker::Generated(provider.fingerprint()) {
                write_marker(marker, provider.fingerprint(), path)?;
            }
        }
        Ok(provider)
    }

    fn from_key(key: &[u8; 32], path: &Path) -> LocalProvider {
        LocalProvider {
            master: Aes256Enc::new(key.into()),
            reference: WrappingKeyRef::Local { fingerprint: fingerprint(key) },
            path: path.to_owned(),
        }
    }

    pub fn fingerprint(&self) -> Fingerprint {
        match self.reference {
            WrappingKeyRef::Local { fingerprint } => fingerprint,
            WrappingKeyRef::AwsKms { .. } => unreachable!("a local provider has a local reference"),
        }
    }
}

impl KeyProvider for LocalProvider {
    fn wrap(&self, id: KeyId, key: &DataKey) -> Result<Wrapped> {
        let mut out = vec![0u8; WRAPPED_LEN];
        out[0] = WRAP_VERSION_1;
        OsRng.fill_bytes(&mut out[1..13]);
        let (head, rest) = out.split_at_mut(13);
        let (body, tag_out) = rest.split_at_mut(DATA_KEY_LEN);
        body.copy_from_slice(key.expose());
        let tag = WrapAead::from(&self.master)
            .encrypt_in_place_detached(Nonce::from_slice(&head[1..13]), &aad(id), body)
            .expect("a 32-byte plaintext always encrypts");
        tag_out.copy_from_slice(&tag);
        Ok(Wrapped { key: WrappedKey::new(out), by: self.reference.clone() })
    }

    fn unwrap(&self, id: KeyId, recorded: &WrappingKeyRef, wrapped: &WrappedKey) -> Result<DataKey> {
        match recorded {
            WrappingKeyRef::Local { fingerprint } if *fingerprint == self.fingerprint() => {}
            WrappingKeyRef::Local { fingerprint } => {
                return Err(Error::MasterKeyMismatch {
                    key_id: id,
                    expected: *fingerprint,
                    found: self.fingerprint(),
                    path: self.path.clone(),
                })
            }
            other => {
                return Err(Error::ProviderUnavailable {
                    key_id: id,
                    wrapping: other.clone(),
                    reason: "the local provider only unwraps keys wrapped by a local master key".into(),
                })
            }
        }
        let bytes = wrapped.as_bytes();
        if bytes.len() != WRAPPED_LEN {
            return Err(Error::WrappedKeyCorrupt {
                key_id: id,
                reason: "wrong length for a locally wrapped key",
            });
        }
        if bytes[0] != WRAP_VERSION_1 {
            return Err(Error::WrappedKeyCorrupt { key_id: id, reason: "unknown local wrapping version" });
        }
        let mut raw = [0u8; DATA_KEY_LEN];
        raw.copy_from_slice(&bytes[13..13 + DATA_KEY_LEN]);
        let tag = Tag::from_slice(&bytes[13 + DATA_KEY_LEN..]);
        if WrapAead::from(&self.master)
            .decrypt_in_place_detached(Nonce::from_slice(&bytes[1..13]), &aad(id), &mut raw, tag)
            .is_err()
        {
            raw.zeroize();
            return Err(Error::WrappedKeyCorrupt {
                key_id: id,
                reason: "authentication of the wrapped key failed",
            });
        }
        Ok(DataKey::from_bytes(&mut raw))
    }
}

fn aad(id: KeyId) -> Vec<u8> {
    let mut aad = WRAP_AAD_PREFIX.to_vec();
    aad.extend_from_slice(&id.to_wire());
    aad
}

/// The fingerprint recorded on each key row wrapped by this master key.
pub fn fingerprint(key: &[u8; 32]) -> Fingerprint {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(FINGERPRINT_LABEL);
    let digest = mac.finalize().into_bytes();
    Fingerprint(digest[..8].try_into().expect("32-byte digest"))
}

fn read_master_key(path: &Path) -> Result<Zeroizing<[u8; 32]>> {
    let invalid = |reason: &str| Error::MasterKeyInvalid { path: path.to_owned(), reason: reason.to_owned() };
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return Err(Error::MasterKeyMissing { path: path.to_owned(), expected: None })
        }
        Err(source) => return Err(Error::MasterKeyIo { action: "open", path: path.to_owned(), source }),
    };
    let meta = file.metadata().map_err(|source| Error::MasterKeyIo {
        action: "stat",
        path: path.to_owned(),
        source,
    })?;
    if !meta.is_file() {
        return Err(invalid("it is not a regular file"));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(invalid("group or other users can access it, and it must be mode 0600"));
    }
    // Capacity for the whole read, so the buffer never reallocates and leaves a copy behind.
    let mut text = Zeroizing::new(Vec::with_capacity(1025));
    Read::take(&mut file, 1024).read_to_end(&mut text).map_err(|source| Error::MasterKeyIo {
        action: "read",
        path: path.to_owned(),
        source,
    })?;
    let digits = text.trim_ascii();
    if digits.len() != 64 {
        return Err(invalid("it does not hold exactly 64 hexadecimal digits"));
    }
    let mut key = Zeroizing::new([0u8; 32]);
    for (i, pair) in digits.chunks(2).enumerate() {
        match (crate::key::hex_digit(pair[0]), crate::key::hex_digit(pair[1])) {
            (Some(hi), Some(lo)) => key[i] = hi << 4 | lo,
            _ => return Err(invalid("it does not hold exactly 64 hexadecimal digits")),
        }
    }
    Ok(key)
}

/// What a marker file says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Marker {
    /// No (readable) marker: nothing says a master key serves this cluster.
    Absent,
    /// A master key with this fingerprint was generated for this cluster.
    Generated(Fingerprint),
    /// pg_upgrade created this data directory: the old cluster's master key, if it had one, must
    /// be copied; its fingerprint is not known here.
    Upgraded,
}

/// What an upgrade marker says in place of a fingerprint.
const UNKNOWN_FINGERPRINT: &str = "unknown (pg_upgrade)";

fn read_marker(marker: &Path) -> Marker {
    let Ok(text) = fs::read_to_string(marker) else { return Marker::Absent };
    match text.lines().find_map(|l| l.strip_prefix("fingerprint ")).map(str::trim) {
        Some(UNKNOWN_FINGERPRINT) => Marker::Upgraded,
        Some(fp) => Fingerprint::parse(fp).map_or(Marker::Absent, Marker::Generated),
        None => Marker::Absent,
    }
}

/// In a data directory that pg_upgrade is creating: unless the master key file at `key_path` or
/// a marker already exists, writes a marker that forbids generating a master key, so that the
/// old cluster's key file must be copied before any database uses a local master key. Returns
/// whether it wrote one.
pub fn mark_upgraded_cluster(marker: &Path, key_path: &Path) -> Result<bool> {
    if key_path.exists() || marker.exists() {
        return Ok(false);
    }
    let text = format!(
        "# immuta: this cluster ran in binary-upgrade mode (pg_upgrade) without a master key file.\n\
         # If it is the new cluster, copy the old cluster's master key file to {}; until\n\
         # then immuta will not generate one. If no cluster used a local master key, delete this file.\nfingerprint {UNKNOWN_FINGERPRINT}\n",
        key_path.display()
    );
    write_file_atomically(marker, &text, key_path).map(|()| true)
}

/// Records that a master key with `fingerprint` serves this cluster.
fn write_marker(marker: &Path, fingerprint: Fingerprint, key_path: &Path) -> Result<()> {
    let text = format!(
        "# immuta: a master key was generated for this cluster. While this file exists, immuta will\n\
         # not generate another one if the key file goes missing.\nfingerprint {fingerprint}\npath {}\n",
        key_path.display()
    );
    write_file_atomically(marker, &text, key_path)
}

/// Writes a marker whole under a temporary name, then renames it into place.
fn write_file_atomically(marker: &Path, text: &str, key_path: &Path) -> Result<()> {
    let io =
        |source| Error::MasterKeyIo { action: "record the generation of", path: key_path.to_owned(), source };
    let tmp = marker.with_extension(format!("tmp.{}.{:016x}", std::process::id(), OsRng.next_u64()));
    fs::write(&tmp, text).and_then(|()| fs::rename(&tmp, marker)).map_err(io)
}

/// Generates a master key and publishes it at `path` without ever overwriting a file that
/// appeared meanwhile: the key is written and synced under a unique temporary name, then
/// hard-linked to `path`, which fails if another backend won the race; the loser reads the
/// winner's key.
fn create_master_key(path: &Path) -> Result<Zeroizing<[u8; 32]>> {
    let io =
        |action: &'static str| move |source| Error::MasterKeyIo { action, path: path.to_owned(), source };
    let mut key = Zeroizing::new([0u8; 32]);
    OsRng.fill_bytes(key.as_mut());
    // Written digit by digit into a zeroizing buffer: no temporary string holds key digits.
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut text = Zeroizing::new(Vec::with_capacity(65));
    for b in key.iter() {
        text.push(HEX[usize::from(b >> 4)]);
        text.push(HEX[usize::from(b & 0x0f)]);
    }
    text.push(b'\n');

    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.{}.{:016x}.tmp",
        path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(),
        std::process::id(),
        OsRng.next_u64()
    ));
    let mut file =
        OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(io("create"))?;
    let written = file.write_all(&text).and_then(|()| file.sync_all());
    drop(file);
    let linked = written.and_then(|()| fs::hard_link(&tmp, path));
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
            Ok(key)
        }
        Err(e) if e.kind() == ErrorKind::AlreadyExists => read_master_key(path),
        Err(e) => Err(io("create")(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn after_pg_upgrade_no_master_key_is_generated_until_the_old_one_is_copied() {
        let dir = tempfile::tempdir().unwrap();
        let (path, marker) = (dir.path().join("immuta_master.key"), dir.path().join("marker"));
        let old_cluster = dir.path().join("old.key");
        let old =
            LocalProvider::open(&old_cluster, Create::IfMissing { marker: &dir.path().join("m0") }).unwrap();
        assert!(mark_upgraded_cluster(&marker, &path).unwrap());
        assert!(!mark_upgraded_cluster(&marker, &path).unwrap(), "written once");
        match LocalProvider::open(&path, Create::IfMissing { marker: &marker }) {
            Err(Error::MasterKeyMissing { expected: None, .. }) => {}
            other => panic!("expected the missing master key error, got {:?}", other.err()),
        }
        assert!(!path.exists(), "no master key generated");
        fs::copy(&old_cluster, &path).unwrap();
        let copied = LocalProvider::open(&path, Create::IfMissing { marker: &marker }).unwrap();
        assert_eq!(copied.fingerprint(), old.fingerprint());
        assert_eq!(read_marker(&marker), Marker::Generated(old.fingerprint()), "the marker now names it");
    }

    #[test]
    fn an_upgrade_marker_is_not_written_where_the_master_key_file_exists() {
        let dir = tempfile::tempdir().unwrap();
        let (path, marker) = (dir.path().join("immuta_master.key"), dir.path().join("marker"));
        fs::write(&path, format!("{}\n", "ab".repeat(32))).unwrap();
        assert!(!mark_upgraded_cluster(&marker, &path).unwrap());
        assert!(!marker.exists());
    }

    fn id(n: i64) -> KeyId {
        KeyId::new(n).unwrap()
    }

    #[test]
    fn first_use_creates_a_0600_key_file_that_later_opens_give_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("immuta_master.key");
        let first =
            LocalProvider::open(&path, Create::IfMissing { marker: &dir.path().join("marker") }).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        let again = LocalProvider::open(&path, Create::Never).unwrap();
        assert_eq!(first.fingerprint(), again.fingerprint());
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text.trim().len(), 64);
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 2, "the key and the marker, no temporary file left behind: {names:?}");
    }

    #[test]
    fn a_missing_file_is_an_error_when_keys_depend_on_it() {
        let dir = tempfile::tempdir().unwrap();
        let err = LocalProvider::open(&dir.path().join("gone.key"), Create::Never).err().unwrap();
        assert!(matches!(err, Error::MasterKeyMissing { .. }));
    }

    #[test]
    fn a_generated_master_key_is_never_generated_again_once_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let (path, marker) = (dir.path().join("k"), dir.path().join("marker"));
        let first = LocalProvider::open(&path, Create::IfMissing { marker: &marker }).unwrap();
        fs::remove_file(&path).unwrap();
        match LocalProvider::open(&path, Create::IfMissing { marker: &marker }) {
            Err(Error::MasterKeyMissing { expected, .. }) => {
                assert_eq!(expected, Some(first.fingerprint()))
            }
            other => panic!("expected the missing-key error, got {:?}", other.err()),
        }
        assert!(!path.exists());
        fs::remove_file(&marker).unwrap();
        assert!(
            LocalProvider::open(&path, Create::IfMissing { marker: &marker }).is_ok(),
            "an operator may reset it"
        );
    }

    #[test]
    fn concurrent_first_uses_agree_on_one_master_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("race.key");
        let fps: Vec<Fingerprint> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        LocalProvider::open(&path, Create::IfMissing { marker: &dir.path().join("marker") })
                            .unwrap()
                            .fingerprint()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(fps.windows(2).all(|w| w[0] == w[1]));
    }

    #[test]
    fn files_readable_by_others_or_with_bad_content_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        fs::write(&path, "ab".repeat(32)).unwrap();
        fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
        let err = LocalProvider::open(&path, Create::Never).err().unwrap();
        assert!(matches!(err, Error::MasterKeyInvalid { .. }), "{err}");
        fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        assert!(LocalProvider::open(&path, Create::Never).is_ok());
        fs::write(&path, "not hex at all").unwrap();
        let err = LocalProvider::open(&path, Create::Never).err().unwrap();
        assert!(matches!(err, Error::MasterKeyInvalid { .. }));
        assert!(!err.to_string().contains("not hex"), "the message never echoes file content");
    }

    #[test]
    fn wrap_then_unwrap_round_trips_and_is_bound_to_the_key_id() {
        let dir = tempfile::tempdir().unwrap();
        let p = LocalProvider::open(
            &dir.path().join("k"),
            Create::IfMissing { marker: &dir.path().join("marker") },
        )
        .unwrap();
        let key = DataKey::generate();
        let Wrapped { key: wrapped, by } = p.wrap(id(3), &key).unwrap();
        assert_eq!(by, WrappingKeyRef::Local { fingerprint: p.fingerprint() });
        assert_eq!(wrapped.as_bytes().len(), WRAPPED_LEN);
        assert_eq!(p.unwrap(id(3), &by, &wrapped).unwrap().expose(), key.expose());
        let moved = p.unwrap(id(4), &by, &wrapped).err().unwrap();
        assert!(matches!(moved, Error::WrappedKeyCorrupt { .. }));
        let mut bad = wrapped.as_bytes().to_vec();
        bad[20] ^= 1;
        let tampered = p.unwrap(id(3), &by, &WrappedKey::new(bad)).err().unwrap();
        assert!(matches!(tampered, Error::WrappedKeyCorrupt { .. }));
    }

    #[test]
    fn another_master_key_is_reported_as_a_mismatch_with_both_fingerprints() {
        let dir = tempfile::tempdir().unwrap();
        let a =
            LocalProvider::open(&dir.path().join("a"), Create::IfMissing { marker: &dir.path().join("ma") })
                .unwrap();
        let b =
            LocalProvider::open(&dir.path().join("b"), Create::IfMissing { marker: &dir.path().join("mb") })
                .unwrap();
        let wrapped = a.wrap(id(1), &DataKey::generate()).unwrap();
        match b.unwrap(id(1), &wrapped.by, &wrapped.key) {
            Err(Error::MasterKeyMismatch { expected, found, .. }) => {
                assert_eq!(expected, a.fingerprint());
                assert_eq!(found, b.fingerprint());
            }
            other => panic!("expected a mismatch, got {:?}", other.err()),
        }
    }

    #[test]
    fn fingerprint_known_answer() {
        // HMAC-SHA256(key = bytes 0x00..0x1f, "immuta master key fingerprint"), first 8 bytes,
        // computed with Python's hmac module.
        let key: [u8; 32] = core::array::from_fn(|i| i as u8);
        assert_eq!(fingerprint(&key).to_string(), "15494487b7a6c23a");
    }
}
