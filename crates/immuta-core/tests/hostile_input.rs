//! Random and mutated inputs never panic the decoder, and a changed ciphertext never yields a
//! plaintext: it is either the original (unchanged input) or an error.

use immuta_core::cipher::DataCipher;
use immuta_core::format;
use immuta_core::key::{DataKey, KeyId};
use proptest::prelude::*;

fn cipher() -> DataCipher {
    DataCipher::new(KeyId::new(3).unwrap(), &DataKey::from_bytes(&mut [7u8; 32]))
}

/// Decodes like `immuta_decrypt` does with a ring holding only key 3.
fn decrypt(c: &DataCipher, bytes: &[u8]) -> Option<String> {
    let sealed = format::parse(bytes).ok()?;
    if sealed.key_id != c.key_id() {
        return None;
    }
    c.open_text(&sealed).ok()
}

#[derive(Debug, Clone)]
enum Mutation {
    FlipBit(usize, u8),
    Truncate(usize),
    Extend(Vec<u8>),
    SetByte(usize, u8),
    OtherKeyId(u64),
    OtherVersion(u8),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(i, b)| Mutation::FlipBit(i, b)),
        any::<usize>().prop_map(Mutation::Truncate),
        prop::collection::vec(any::<u8>(), 1..40).prop_map(Mutation::Extend),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::SetByte(i, b)),
        any::<u64>().prop_map(Mutation::OtherKeyId),
        any::<u8>().prop_map(Mutation::OtherVersion),
    ]
}

fn apply(mut bytes: Vec<u8>, m: &Mutation) -> Vec<u8> {
    let n = bytes.len();
    if n == 0 {
        return bytes;
    }
    match *m {
        Mutation::FlipBit(i, b) => bytes[i % n] ^= 1 << b,
        Mutation::Truncate(len) => bytes.truncate(len % n),
        Mutation::Extend(ref tail) => bytes.extend_from_slice(tail),
        Mutation::SetByte(i, b) => bytes[i % n] = b,
        Mutation::OtherKeyId(id) if n >= 9 => bytes[1..9].copy_from_slice(&id.to_be_bytes()),
        Mutation::OtherKeyId(_) => {}
        Mutation::OtherVersion(v) => bytes[0] = v,
    }
    bytes
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 20_000, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic_and_never_decrypt(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let c = cipher();
        prop_assert!(decrypt(&c, &bytes).is_none());
    }

    #[test]
    fn mutated_ciphertexts_are_rejected_or_unchanged(
        plaintext in "[^\\x00]{0,64}",
        nonce in any::<[u8; 12]>(),
        mutations in prop::collection::vec(mutation(), 1..4),
    ) {
        let c = cipher();
        let original = c.seal(&nonce, plaintext.as_bytes());
        let mut bytes = original.clone();
        for m in &mutations {
            bytes = apply(bytes, m);
        }
        match decrypt(&c, &bytes) {
            Some(text) => {
                prop_assert_eq!(&bytes, &original, "a changed ciphertext decrypted");
                prop_assert_eq!(text, plaintext);
            }
            None => prop_assert_ne!(&bytes, &original),
        }
    }
}
