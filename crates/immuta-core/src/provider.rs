//! The wrap/unwrap provider: the one seam between immuta's key ring and whatever holds the root
//! of trust.
//!
//! A provider turns a fresh [`DataKey`] into a [`WrappedKey`] that can be stored in a table, and
//! back. It is told the key id on both sides so that it can bind the wrapped bytes to their row
//! (the local provider puts the id in the AES-GCM associated data; AWS KMS puts it in the
//! encryption context): a wrapped key copied onto another row does not unwrap.
//!
//! # Plugging in another key service
//!
//! A provider for an HSM or another KMS implements two methods:
//!
//! ```
//! use immuta_core::key::{DataKey, KeyId, WrappedKey, WrappingKeyRef, Fingerprint};
//! use immuta_core::provider::{KeyProvider, Wrapped};
//! use immuta_core::{Error, Result};
//!
//! /// Wraps keys with an HSM session (here a stand-in that XORs, for the example only).
//! struct Hsm { slot: WrappingKeyRef }
//!
//! impl KeyProvider for Hsm {
//!     fn wrap(&self, _id: KeyId, key: &DataKey) -> Result<Wrapped> {
//!         let bytes = key.expose().iter().map(|b| b ^ 0x5a).collect();
//!         Ok(Wrapped { key: WrappedKey::new(bytes), by: self.slot.clone() })
//!     }
//!     fn unwrap(&self, id: KeyId, _recorded: &WrappingKeyRef, wrapped: &WrappedKey) -> Result<DataKey> {
//!         let mut raw: [u8; 32] = wrapped.as_bytes().try_into()
//!             .map_err(|_| Error::WrappedKeyCorrupt { key_id: id, reason: "wrong length" })?;
//!         raw.iter_mut().for_each(|b| *b ^= 0x5a);
//!         Ok(DataKey::from_bytes(&mut raw))
//!     }
//! }
//!
//! let hsm = Hsm { slot: WrappingKeyRef::Local { fingerprint: Fingerprint([0; 8]) } };
//! let id = KeyId::new(1).unwrap();
//! let key = DataKey::generate();
//! let wrapped = hsm.wrap(id, &key).unwrap();
//! let back = hsm.unwrap(id, &wrapped.by, &wrapped.key).unwrap();
//! assert_eq!(back.expose(), key.expose());
//! ```
//!
//! The SQL layer records `Wrapped::by` on each key row and, to unwrap a row later, asks for the
//! provider that matches the row's recorded reference, not the one configured now; so changing
//! the configured key only affects new keys.

use crate::key::{DataKey, KeyId, WrappedKey, WrappingKeyRef};
use crate::Result;

/// A wrapped data key and the wrapping key to record on its row.
pub struct Wrapped {
    pub key: WrappedKey,
    /// Exactly which key wrapped it (for KMS: the key ARN, even if the configuration names an
    /// alias), so that the row can always be unwrapped by that key.
    pub by: WrappingKeyRef,
}

/// Wraps and unwraps data keys with a key the database never stores.
pub trait KeyProvider {
    /// Encrypts a data key for storage on the row of key `id`.
    fn wrap(&self, id: KeyId, key: &DataKey) -> Result<Wrapped>;

    /// Decrypts the data key stored on the row of key `id`, which recorded `recorded` as its
    /// wrapping key. A provider whose own key is not `recorded` says so with a specific error
    /// rather than failing to decrypt.
    fn unwrap(&self, id: KeyId, recorded: &WrappingKeyRef, wrapped: &WrappedKey) -> Result<DataKey>;
}
