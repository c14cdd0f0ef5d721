//! The core's errors, as data.
//!
//! Every variant is a distinct condition a user can meet, and the SQL layer maps each one to its
//! own SQLSTATE in a single place (`src/errors.rs`). Messages name the problem and the objects
//! involved (key ids, fingerprints, file paths, configuration paths) and never carry plaintext,
//! ciphertext bytes, key bytes or credentials.

use std::path::PathBuf;

use crate::key::{Fingerprint, KeyId, WrappingKeyRef};
use crate::server_identity::Refusal;
use crate::value_type::ValueType;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Shorter than the fixed header, nonce and tag of any immuta value.
    #[error("ciphertext is truncated: {len} bytes, but an immuta value is at least {min} bytes")]
    CiphertextTruncated { len: usize, min: usize },

    /// The first byte names a format this build does not know.
    #[error("unsupported ciphertext format version {version}")]
    UnsupportedVersion { version: u8 },

    /// A version-2 header sets a flag, or names a type, that this build does not know: the value
    /// was written by a newer immuta.
    #[error("unsupported ciphertext format {version} {what} {value:#04x}")]
    UnsupportedFeature { version: u8, what: &'static str, value: u8 },

    /// The value holds another type than the one it is read as.
    #[error("the encrypted value is of type {held}, not {wanted}")]
    TypeMismatch { held: ValueType, wanted: ValueType },

    /// The context given does not open the value: none was given for a value sealed with one,
    /// one was given for a value sealed without, or another one than the value was sealed with
    /// (which AES-GCM cannot tell from changed bytes).
    #[error("the context does not match the encrypted value")]
    ContextMismatch { key_id: KeyId, problem: ContextProblem },

    /// The value authenticated, but its plaintext is not a valid encoding of its type (only
    /// possible for values made outside immuta with the data key).
    #[error("decrypted value under data key {key_id} is not a valid {value_type} encoding")]
    InvalidEncoding { key_id: KeyId, value_type: ValueType },

    /// The header names a key id that no key row has.
    #[error("data key {key_id} does not exist")]
    UnknownKey { key_id: u64 },

    /// The AES-GCM tag did not verify: the bytes were changed, or the key is not the one that
    /// encrypted them.
    #[error("ciphertext failed authentication under data key {key_id}")]
    AuthenticationFailed { key_id: KeyId },

    /// The value authenticated, but its bytes are not valid text (only possible for values made
    /// outside immuta with the data key).
    #[error("decrypted value under data key {key_id} is not valid UTF-8 text")]
    InvalidText { key_id: KeyId },

    /// The master key file does not exist.
    #[error("master key file \"{}\" does not exist", path.display())]
    MasterKeyMissing { path: PathBuf, expected: Option<Fingerprint> },

    /// The master key file holds a different key than the one that wrapped the data key.
    #[error("data key {key_id} was wrapped by master key {expected}, but master key file \"{}\" holds master key {found}", path.display())]
    MasterKeyMismatch { key_id: KeyId, expected: Fingerprint, found: Fingerprint, path: PathBuf },

    /// The master key file exists but cannot be used: wrong content, wrong permissions.
    #[error("master key file \"{}\" is not usable: {reason}", path.display())]
    MasterKeyInvalid { path: PathBuf, reason: String },

    /// Reading or creating the master key file failed at the operating-system level.
    #[error("could not {action} master key file \"{}\": {source}", path.display())]
    MasterKeyIo { action: &'static str, path: PathBuf, source: std::io::Error },

    /// A wrapped data key could not be unwrapped although its wrapping key was found.
    #[error("wrapped data key {key_id} is corrupt: {reason}")]
    WrappedKeyCorrupt { key_id: KeyId, reason: &'static str },

    /// A key row names a provider or wrapping key that is not available in this configuration.
    #[error("data key {key_id} is wrapped by {wrapping}, which is not available: {reason}")]
    ProviderUnavailable { key_id: KeyId, wrapping: WrappingKeyRef, reason: String },

    /// A query cancel or statement timeout arrived while waiting for a key service; the SQL layer
    /// lets PostgreSQL raise the cancel.
    #[error("interrupted while waiting for the key service")]
    Interrupted,

    /// AWS KMS could not be reached, or did not answer within `immuta.kms_timeout`.
    #[error("AWS KMS is unreachable for {wrapping}: {reason}")]
    KmsUnreachable { wrapping: WrappingKeyRef, reason: String },

    /// KMS refused the credentials or the permission (e.g. `AccessDeniedException`).
    #[error("AWS KMS denied access to {wrapping}: {code}")]
    KmsDenied { wrapping: WrappingKeyRef, code: String, message: String },

    /// The KMS key cannot be used: disabled, pending deletion, not found, unavailable.
    #[error("AWS KMS key is not usable ({wrapping}): {code}")]
    KmsKeyUnusable { wrapping: WrappingKeyRef, code: String, message: String },

    /// KMS throttled the request.
    #[error("AWS KMS throttled the request for {wrapping}: {code}")]
    KmsThrottled { wrapping: WrappingKeyRef, code: String, message: String },

    /// KMS refused to unwrap this row's key: the ciphertext or its encryption context (the key
    /// id) does not match, or another KMS key wrapped it.
    #[error("AWS KMS refused to unwrap data key {key_id} with {wrapping}: {code}")]
    KmsRejectedWrappedKey { key_id: KeyId, wrapping: WrappingKeyRef, code: String, message: String },

    /// A KMS call would use the server's own AWS identity on behalf of someone who is not a
    /// superuser (`server_identity.rs`). `key_id` is the key to unwrap, `None` for a new key.
    #[error("immuta may not call AWS KMS with the server's own identity here")]
    ServerIdentityRefused { key_id: Option<KeyId>, refusal: Refusal },

    /// Any other KMS failure.
    #[error("AWS KMS request for {wrapping} failed: {code}")]
    KmsFailed { wrapping: WrappingKeyRef, code: String, message: String },

    /// The configuration text was rejected; nothing changed.
    #[error("invalid immuta configuration at {path}: {reason}")]
    Config { path: String, reason: String },
}

/// How a context failed to open a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContextProblem {
    /// The value was sealed with a context and none was given.
    Missing,
    /// The value was sealed without a context and one was given.
    NotExpected,
    /// A context was given and the value did not authenticate with it.
    Different,
}
