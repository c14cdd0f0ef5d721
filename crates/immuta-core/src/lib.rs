//! immuta's core: everything about encrypting values and managing data keys that does not need
//! PostgreSQL.
//!
//! The extension crate (`src/` at the repository root) is a thin SQL layer over this crate: it
//! converts datums, reads and writes the extension's tables through SPI, and maps [`Error`] to
//! SQLSTATEs. Everything here is plain Rust and is tested with `cargo test -p immuta-core`, with no
//! server. The crate does not depend on pgrx, so the compiler keeps that boundary for us.
//!
//! | file | concern |
//! |---|---|
//! | `format.rs` | the ciphertext byte layouts, versions 1 and 2 (docs/FORMAT.md) |
//! | `value_type.rs` | the types a value can hold, as recorded in its header |
//! | `encoding.rs` | array framing and the checks on a decrypted plaintext of each type |
//! | `cipher.rs` | AES-256-GCM sealing and opening of values under one data key |
//! | `nonce.rs` | the per-backend nonce generator |
//! | `key.rs` | key ids, data keys, wrapped keys, wrapping-key references |
//! | `provider.rs` | the wrap/unwrap provider trait |
//! | `local.rs` | the local master key provider and its key file |
//! | `aws_kms.rs` | the AWS KMS provider (Encrypt/Decrypt only) |
//! | `config.rs` | the Immuta YAML configuration, bounded and parsed without echoing it |
//! | `server_identity.rs` | when KMS may be called with the server's own AWS identity |
//! | `rollover.rs` | the rollover rule and rotation reasons |
//! | `restore.rs` | what a row added by a restore must satisfy before immuta uses it |
//! | `keyrings.rs` | named keyrings: names, and the settings each may have of its own |
//! | `key_state.rs` | a key's states (enabled, disabled, destroyed) and the rules between them |
//! | `ring.rs` | the backend's set of ready ciphers and the current key of each keyring |
//! | `cache.rs` | the cluster-wide slot table of unwrapped keys (shared memory) |
//! | `usage.rs` | the usage limit per key and how encryptions are counted |
//! | `blind_index.rs` | blind index terms: MAC key derivation, term layout, bounds |
//! | `hmac_sha256.rs` | HMAC-SHA256 from a key's precomputed states, for the terms |

// No unsafe code in the core, but where the standard library offers no safe way (the signal mask
// of aws_kms.rs), each such function allowed explicitly.
#![deny(unsafe_code)]

pub mod aws_kms;
pub mod blind_index;
pub mod cache;
pub mod cipher;
pub mod config;
pub mod encoding;
pub mod error;
pub mod format;
pub(crate) mod hmac_sha256;
pub mod key;
pub mod key_state;
pub mod keyrings;
pub mod local;
pub mod nonce;
pub mod provider;
pub mod restore;
pub mod ring;
pub mod rollover;
pub mod server_identity;
pub mod time;
pub mod usage;
pub mod value_type;

pub use error::Error;

/// Result type of the core.
pub type Result<T, E = Error> = std::result::Result<T, E>;
