//! The types that carry key material and key identity.
//!
//! Key material lives only in [`DataKey`] (and the local provider's master key): no `Debug`, no
//! `Display`, no `Clone`, zeroized when dropped. A [`KeyId`], a [`WrappedKey`] and a
//! [`WrappingKeyRef`] are not secret, but they are distinct types so that a wrapped key can never
//! be passed where a key id or a plaintext key is expected.

use std::fmt;

use rand_core::{OsRng, RngCore};
use zeroize::{Zeroize, ZeroizeOnDrop};

/// Length of a data key in bytes (AES-256).
pub const DATA_KEY_LEN: usize = 32;

/// Identifier of a data key: the `id` column of `immuta.data_keys`, always positive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyId(i64);

impl KeyId {
    /// A key id from the keys table; `None` for zero or negative values, which never name a key.
    pub fn new(id: i64) -> Option<KeyId> {
        (id > 0).then_some(KeyId(id))
    }

    /// A key id read from a ciphertext header; `None` when no key could carry it.
    pub fn from_wire(id: u64) -> Option<KeyId> {
        i64::try_from(id).ok().and_then(KeyId::new)
    }

    pub fn get(self) -> i64 {
        self.0
    }

    /// The key id as it is written into a ciphertext header (big-endian).
    pub fn to_wire(self) -> [u8; 8] {
        (self.0 as u64).to_be_bytes()
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A plaintext 256-bit data key. Never stored, printed or logged; zeroized on drop.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct DataKey([u8; DATA_KEY_LEN]);

impl DataKey {
    /// 256 fresh bits from the operating system's CSPRNG.
    pub fn generate() -> DataKey {
        let mut key = DataKey([0u8; DATA_KEY_LEN]);
        OsRng.fill_bytes(&mut key.0);
        key
    }

    /// Takes ownership of key bytes produced by an unwrap. The caller's buffer is zeroized.
    pub fn from_bytes(bytes: &mut [u8; DATA_KEY_LEN]) -> DataKey {
        let key = DataKey(*bytes);
        bytes.zeroize();
        key
    }

    pub fn expose(&self) -> &[u8; DATA_KEY_LEN] {
        &self.0
    }
}

/// A data key encrypted by a provider. Opaque bytes whose layout belongs to the provider that
/// produced them (docs/FORMAT.md documents each).
#[derive(Clone, PartialEq, Eq)]
pub struct WrappedKey(Vec<u8>);

impl WrappedKey {
    pub fn new(bytes: Vec<u8>) -> WrappedKey {
        WrappedKey(bytes)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// Short, non-secret identifier of a local master key: the first 8 bytes of
/// HMAC-SHA256(master key, "immuta master key fingerprint"), shown as 16 hex digits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 8]);

impl Fingerprint {
    /// Parses the 16 hex digits stored in the keys table.
    pub fn parse(text: &str) -> Option<Fingerprint> {
        let text = text.as_bytes();
        if text.len() != 16 {
            return None;
        }
        let mut out = [0u8; 8];
        for (i, pair) in text.chunks(2).enumerate() {
            out[i] = hex_digit(pair[0])? << 4 | hex_digit(pair[1])?;
        }
        Some(Fingerprint(out))
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// The value of one hexadecimal digit (either case).
pub fn hex_digit(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

/// The rule [`is_aws_region`] checks, as an error reason.
pub const AWS_REGION_RULE: &str =
    "must be an AWS region name such as us-east-1 (lower-case letters, digits and hyphens, at most 32)";

/// The rule [`is_kms_key_reference`] checks, as an error reason.
pub const KMS_KEY_RULE: &str =
    "must be a KMS key id, key ARN, alias name or alias ARN (at most 2048 printable characters, no white space)";

/// An AWS region name: it becomes part of the KMS endpoint's host name, so nothing else may
/// pass (a dot or a slash would send data keys to another host).
pub fn is_aws_region(region: &str) -> bool {
    (1..=32).contains(&region.len())
        && region.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !region.starts_with('-')
        && !region.ends_with('-')
}

/// A KMS key reference as KMS accepts it: id, ARN, alias name or alias ARN.
pub fn is_kms_key_reference(key: &str) -> bool {
    (1..=2048).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_graphic())
}

/// Which provider wrapped a data key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProviderKind {
    /// The local master key file.
    Local,
    /// AWS KMS.
    AwsKms,
}

impl ProviderKind {
    /// The value of the `provider` column.
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Local => "local",
            ProviderKind::AwsKms => "awsKms",
        }
    }

    pub fn parse(text: &str) -> Option<ProviderKind> {
        match text {
            "local" => Some(ProviderKind::Local),
            "awsKms" => Some(ProviderKind::AwsKms),
            _ => None,
        }
    }
}

/// What a key row records about the key that wrapped it: enough to find that key again even after
/// the configuration has moved on to another one.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum WrappingKeyRef {
    /// The local master key with this fingerprint.
    Local { fingerprint: Fingerprint },
    /// An AWS KMS key (id, ARN or alias) in a region.
    AwsKms { key_id: String, region: String },
}

impl WrappingKeyRef {
    pub fn provider(&self) -> ProviderKind {
        match self {
            WrappingKeyRef::Local { .. } => ProviderKind::Local,
            WrappingKeyRef::AwsKms { .. } => ProviderKind::AwsKms,
        }
    }

    /// The `wrapping_key` column: the fingerprint, or the KMS key id/ARN/alias.
    pub fn key_column(&self) -> String {
        match self {
            WrappingKeyRef::Local { fingerprint } => fingerprint.to_string(),
            WrappingKeyRef::AwsKms { key_id, .. } => key_id.clone(),
        }
    }

    /// The `wrapping_region` column (KMS only).
    pub fn region_column(&self) -> Option<&str> {
        match self {
            WrappingKeyRef::Local { .. } => None,
            WrappingKeyRef::AwsKms { region, .. } => Some(region),
        }
    }

    /// Rebuilds the reference from a key row; `None` when the row is not one this version wrote.
    /// A row may have been restored by hand, so a KMS key and region are held to the rules of a
    /// configured one before they are ever sent anywhere.
    pub fn from_columns(provider: &str, key: &str, region: Option<&str>) -> Option<WrappingKeyRef> {
        match ProviderKind::parse(provider)? {
            ProviderKind::Local => Some(WrappingKeyRef::Local { fingerprint: Fingerprint::parse(key)? }),
            ProviderKind::AwsKms => {
                let region = region.filter(|r| is_aws_region(r))?;
                is_kms_key_reference(key)
                    .then(|| WrappingKeyRef::AwsKms { key_id: key.to_owned(), region: region.to_owned() })
            }
        }
    }
}

impl fmt::Display for WrappingKeyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WrappingKeyRef::Local { fingerprint } => write!(f, "local master key {fingerprint}"),
            WrappingKeyRef::AwsKms { key_id, region } => {
                write!(f, "AWS KMS key {key_id} in {region}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_ids_are_positive_and_fit_a_bigint() {
        assert!(KeyId::new(0).is_none());
        assert!(KeyId::new(-3).is_none());
        assert_eq!(KeyId::new(7).unwrap().get(), 7);
        assert!(KeyId::from_wire(u64::MAX).is_none());
        assert!(KeyId::from_wire(0).is_none());
        assert_eq!(KeyId::from_wire(42).unwrap().to_wire(), 42u64.to_be_bytes());
    }

    #[test]
    fn fingerprint_round_trips_through_its_column_text() {
        let fp = Fingerprint([0xde, 0xad, 0xbe, 0xef, 0, 1, 2, 0xff]);
        assert_eq!(fp.to_string(), "deadbeef000102ff");
        assert_eq!(Fingerprint::parse("deadbeef000102ff"), Some(fp));
        assert_eq!(Fingerprint::parse("deadbeef"), None);
        assert_eq!(Fingerprint::parse("zzadbeef000102ff"), None);
    }

    #[test]
    fn wrapping_reference_round_trips_through_row_columns() {
        let local = WrappingKeyRef::Local { fingerprint: Fingerprint([9; 8]) };
        let back = WrappingKeyRef::from_columns("local", &local.key_column(), local.region_column());
        assert_eq!(back, Some(local));
        let kms = WrappingKeyRef::AwsKms { key_id: "alias/pii".into(), region: "eu-west-1".into() };
        let back = WrappingKeyRef::from_columns("awsKms", &kms.key_column(), kms.region_column());
        assert_eq!(back, Some(kms));
        assert_eq!(WrappingKeyRef::from_columns("vault", "x", None), None);
    }

    #[test]
    fn regions_and_key_references_are_validated_for_what_they_become() {
        for good in ["us-east-1", "eu-central-2", "us-gov-west-1", "cn-north-1"] {
            assert!(is_aws_region(good), "{good}");
        }
        for bad in ["", "US-EAST-1", "us-east-1.evil.example", "x/y", "-us", "us-", "a b", &"a".repeat(33)] {
            assert!(!is_aws_region(bad), "{bad}");
        }
        assert!(is_kms_key_reference(
            "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
        ));
        assert!(is_kms_key_reference("alias/pii"));
        for bad in ["", "alias /x", "a\nb", &"k".repeat(2049)] {
            assert!(!is_kms_key_reference(bad), "{bad:?}");
        }
        assert_eq!(WrappingKeyRef::from_columns("awsKms", "alias/x", Some("us-east-1.evil.example#")), None);
        assert_eq!(WrappingKeyRef::from_columns("awsKms", "alias /x", Some("us-east-1")), None);
    }

    #[test]
    fn generated_data_keys_differ() {
        assert_ne!(DataKey::generate().expose(), DataKey::generate().expose());
    }
}
