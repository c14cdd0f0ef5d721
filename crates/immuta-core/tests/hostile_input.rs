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

/// Decodes like `immuta_decrypt`, naming the documented error a value gets.
fn outcome(c: &DataCipher, bytes: &[u8]) -> Result<String, &'static str> {
    use immuta_core::Error;
    let sealed = format::parse(bytes).map_err(|e| match e {
        Error::CiphertextTruncated { .. } => "22P03",
        Error::UnsupportedVersion { .. } => "0A000",
        Error::UnknownKey { .. } => "42704",
        _ => "undocumented parse error",
    })?;
    if sealed.key_id != c.key_id() {
        return Err("42704");
    }
    c.open_text(&sealed).map_err(|e| match e {
        Error::AuthenticationFailed { .. } => "22000",
        Error::InvalidText { .. } => "22021",
        _ => "undocumented open error",
    })
}

/// A million inputs, from a seeded generator so a failure can be replayed: a quarter random
/// bytes, the rest valid ciphertexts of random text changed by one to three mutations (bit
/// flips, truncations, extensions, byte changes, other key ids, other versions), plus the
/// unchanged ciphertexts. Each is the original plaintext (only if unchanged) or a documented error.
#[test]
fn a_million_random_and_mutated_ciphertexts_give_the_original_or_a_documented_error() {
    use rand_chacha::rand_core::{RngCore, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0x1_33_7a);
    let c = cipher();
    let mut counts = std::collections::BTreeMap::<&str, u32>::new();
    for _ in 0..1_000_000 {
        let len = (rng.next_u32() % 80) as usize;
        if rng.next_u32() % 4 == 0 {
            let mut bytes = vec![0u8; (rng.next_u32() % 200) as usize];
            rng.fill_bytes(&mut bytes);
            let result = outcome(&c, &bytes);
            assert!(result.is_err(), "random bytes decrypted: {bytes:?}");
            *counts.entry(result.unwrap_err()).or_default() += 1;
            continue;
        }
        let plaintext: String = (0..len).map(|_| char::from(b' ' + (rng.next_u32() % 95) as u8)).collect();
        let mut nonce = [0u8; 12];
        rng.fill_bytes(&mut nonce);
        let original = c.seal(&nonce, plaintext.as_bytes());
        let mut bytes = original.clone();
        for _ in 0..rng.next_u32() % 4 {
            let r = rng.next_u64() as usize;
            let m = match rng.next_u32() % 6 {
                0 => Mutation::FlipBit(r, (r % 8) as u8),
                1 => Mutation::Truncate(r),
                2 => {
                    let mut tail = vec![0u8; 1 + r % 40];
                    rng.fill_bytes(&mut tail);
                    Mutation::Extend(tail)
                }
                3 => Mutation::SetByte(r, (r >> 8) as u8),
                4 => Mutation::OtherKeyId(rng.next_u64() % 8),
                _ => Mutation::OtherVersion((r % 4) as u8),
            };
            bytes = apply(bytes, &m);
        }
        match outcome(&c, &bytes) {
            Ok(text) => {
                assert_eq!(bytes, original, "a changed ciphertext decrypted");
                assert_eq!(text, plaintext);
                *counts.entry("original").or_default() += 1;
            }
            Err(state) => {
                assert_ne!(bytes, original, "the unchanged ciphertext failed: {state}");
                assert!(!state.starts_with("undocumented"), "{state}");
                *counts.entry(state).or_default() += 1;
            }
        }
    }
    for state in ["original", "22P03", "0A000", "42704", "22000"] {
        assert!(counts.get(state).copied().unwrap_or(0) > 1000, "too few {state}: {counts:?}");
    }
}
