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
//! A provider for an HSM or another KMS implements three methods:
//!
//! ```
//! use immuta_core::key::{DataKey, KeyId, WrappedKey, WrappingKeyRef, Fingerprint};
//! use immuta_core::provider::KeyProvider;
//! use immuta_core::{Error, Result};
//!
//! /// Wraps keys with an HSM session (here a stand-in that XORs, for the example only).
//! struct Hsm { slot: WrappingKeyRef }
//!
//! impl KeyProvider for Hsm {
//!     fn wrapping_key(&self) -> &WrappingKeyRef { &self.slot }
//!     fn wrap(&self, _id: KeyId, key: &DataKey) -> Result<WrappedKey> {
//!         Ok(WrappedKey::new(key.expose().iter().map(|b| b ^ 0x5a).collect()))
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
//! let back = hsm.unwrap(id, hsm.wrapping_key(), &hsm.wrap(id, &key).unwrap()).unwrap();
//! assert_eq!(back.expose(), key.expose());
//! ```
//!
//! The SQL layer records `wrapping_key()` on each key row and, to unwrap a row later, asks for the
//! provider that matches the row's recorded reference, not the one configured now; so changing
//! the configured key only affects new keys.

use crate::key::{DataKey, KeyId, WrappedKey, WrappingKeyRef};
use crate::Result;

/// Wraps and unwraps data keys with a key the database never stores.
pub trait KeyProvider {
    /// The wrapping key new keys are wrapped with, as recorded on their rows.
    fn wrapping_key(&self) -> &WrappingKeyRef;

    /// Encrypts a data key for storage on the row of key `id`.
    fn wrap(&self, id: KeyId, key: &DataKey) -> Result<WrappedKey>;

    /// Decrypts the data key stored on the row of key `id`, which recorded `recorded` as its
    /// wrapping key. A provider whose own key is not `recorded` says so with a specific error
    /// rather than failing to decrypt.
    fn unwrap(&self, id: KeyId, recorded: &WrappingKeyRef, wrapped: &WrappedKey)
        -> Result<DataKey>;
}
