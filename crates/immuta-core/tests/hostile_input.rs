//! Random and mutated inputs never panic the decoder, and a changed ciphertext never yields a
//! plaintext: it is either the original (unchanged input) or an error. Both formats: version 1
//! (text, sealed here with `aes-gcm` as immuta 0.1.0 did) and version 2 (every type, with and
//! without a context).

use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, KeyInit};
use immuta_core::cipher::{expect_type, DataCipher};
use immuta_core::encoding;
use immuta_core::format;
use immuta_core::key::{DataKey, KeyId};
use immuta_core::value_type::{Scalar, ValueType};
use immuta_core::Error;
use proptest::prelude::*;
use rand_chacha::rand_core::{RngCore, SeedableRng};

const KEY: [u8; 32] = [7u8; 32];

fn cipher() -> DataCipher {
    DataCipher::new(KeyId::new(3).unwrap(), &DataKey::from_bytes(&mut KEY.clone()))
}

/// A version-1 value, as 0.1.0 wrote it.
fn seal_v1(nonce: &[u8; 12], plaintext: &[u8]) -> Vec<u8> {
    let mut out = vec![1u8];
    out.extend_from_slice(&3u64.to_be_bytes());
    out.extend_from_slice(nonce);
    let mut body = plaintext.to_vec();
    let tag =
        Aes256Gcm::new((&KEY).into()).encrypt_in_place_detached(nonce.into(), &out[..9], &mut body).unwrap();
    out.extend_from_slice(&body);
    out.extend_from_slice(&tag);
    out
}

/// Reads like the SQL layer does with a ring holding only key 3: as `wanted`, with `context`,
/// naming the documented SQLSTATE of each failure (docs/FORMAT.md, section 1.5).
fn outcome(
    c: &DataCipher,
    bytes: &[u8],
    wanted: ValueType,
    context: Option<&[u8]>,
) -> Result<Vec<u8>, &'static str> {
    let code = |e: Error| match e {
        Error::CiphertextTruncated { .. } => "22P03",
        Error::UnsupportedVersion { .. } | Error::UnsupportedFeature { .. } => "0A000",
        Error::UnknownKey { .. } => "42704",
        Error::TypeMismatch { .. } => "42804",
        Error::AuthenticationFailed { .. } => "22000",
        Error::ContextMismatch { .. } => "22023",
        Error::InvalidText { .. } => "22021",
        Error::InvalidEncoding { .. } => "22P03",
        _ => "undocumented error",
    };
    let sealed = format::parse(bytes).map_err(code)?;
    if sealed.key_id != c.key_id() {
        return Err("42704");
    }
    expect_type(&sealed, wanted).map_err(code)?;
    let mut out = vec![0u8; sealed.body.len()];
    c.open_into(&sealed, context, &mut out).map_err(code)?;
    if wanted.array {
        encoding::decode_array(&out, wanted.scalar.fixed_len()).map_err(|_| "22P03")?;
    }
    Ok(out)
}

#[derive(Debug, Clone)]
enum Mutation {
    FlipBit(usize, u8),
    Truncate(usize),
    Extend(Vec<u8>),
    SetByte(usize, u8),
    OtherKeyId(u64),
    OtherVersion(u8),
    OtherFlags(u8),
    OtherType(u8),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(i, b)| Mutation::FlipBit(i, b)),
        any::<usize>().prop_map(Mutation::Truncate),
        prop::collection::vec(any::<u8>(), 1..40).prop_map(Mutation::Extend),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::SetByte(i, b)),
        any::<u64>().prop_map(Mutation::OtherKeyId),
        any::<u8>().prop_map(Mutation::OtherVersion),
        any::<u8>().prop_map(Mutation::OtherFlags),
        any::<u8>().prop_map(Mutation::OtherType),
    ]
}

fn apply(mut bytes: Vec<u8>, m: &Mutation) -> Vec<u8> {
    let n = bytes.len();
    if n == 0 {
        return bytes;
    }
    // Where the key id is depends on the version byte as it is now.
    let id_at = if bytes[0] == 1 { 1 } else { 3 };
    match *m {
        Mutation::FlipBit(i, b) => bytes[i % n] ^= 1 << b,
        Mutation::Truncate(len) => bytes.truncate(len % n),
        Mutation::Extend(ref tail) => bytes.extend_from_slice(tail),
        Mutation::SetByte(i, b) => bytes[i % n] = b,
        Mutation::OtherKeyId(id) if n >= id_at + 8 => {
            bytes[id_at..id_at + 8].copy_from_slice(&id.to_be_bytes())
        }
        Mutation::OtherVersion(v) => bytes[0] = v,
        Mutation::OtherFlags(f) if n > 1 => bytes[1] = f,
        Mutation::OtherType(t) if n > 2 => bytes[2] = t,
        Mutation::OtherKeyId(_) | Mutation::OtherFlags(_) | Mutation::OtherType(_) => {}
    }
    bytes
}

/// A random value of a random type, encoded: its type, its encoding.
fn random_value(rng: &mut impl RngCore) -> (ValueType, Vec<u8>) {
    let scalar = Scalar::ALL[rng.next_u32() as usize % Scalar::ALL.len()];
    let one = |rng: &mut dyn RngCore| -> Vec<u8> {
        let len = scalar.fixed_len().unwrap_or(rng.next_u32() as usize % 40);
        match scalar {
            Scalar::Text | Scalar::Json => (0..len).map(|_| b' ' + (rng.next_u32() % 95) as u8).collect(),
            Scalar::Jsonb => {
                std::iter::once(1).chain((0..len).map(|_| b'a' + (rng.next_u32() % 26) as u8)).collect()
            }
            // Values within PostgreSQL's ranges (encoding::check_scalar).
            Scalar::Bool => vec![(rng.next_u32() % 2) as u8],
            Scalar::Date => ((rng.next_u32() % 100_000) as i32).to_be_bytes().to_vec(),
            Scalar::Time => i64::from(rng.next_u32()).to_be_bytes().to_vec(),
            Scalar::Timestamp | Scalar::Timestamptz => {
                i64::from(rng.next_u32() as i32).to_be_bytes().to_vec()
            }
            _ => {
                let mut bytes = vec![0u8; len];
                rng.fill_bytes(&mut bytes);
                bytes
            }
        }
    };
    if rng.next_u32().is_multiple_of(3) {
        let elements: Vec<Option<Vec<u8>>> = (0..rng.next_u32() % 5)
            .map(|_| if rng.next_u32().is_multiple_of(4) { None } else { Some(one(rng)) })
            .collect();
        let mut out = Vec::new();
        encoding::encode_array(1, elements.iter().map(|e| e.as_deref()), &mut out);
        (ValueType::array_of(scalar), out)
    } else {
        (ValueType::scalar(scalar), one(rng))
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 20_000, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic_and_never_decrypt(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let c = cipher();
        prop_assert!(outcome(&c, &bytes, ValueType::TEXT, None).is_err());
        prop_assert!(outcome(&c, &bytes, ValueType::array_of(Scalar::Int8), Some(b"ctx")).is_err());
    }

    #[test]
    fn mutated_ciphertexts_are_rejected_or_unchanged(
        plaintext in "[^\\x00]{0,64}",
        context in prop::option::of("[a-z0-9.:]{0,24}"),
        nonce in any::<[u8; 12]>(),
        mutations in prop::collection::vec(mutation(), 1..4),
    ) {
        let c = cipher();
        let context = context.as_deref().map(str::as_bytes);
        let original = c.seal(&nonce, ValueType::TEXT, context, plaintext.as_bytes());
        let mut bytes = original.clone();
        for m in &mutations {
            bytes = apply(bytes, m);
        }
        match outcome(&c, &bytes, ValueType::TEXT, context) {
            Ok(text) => {
                prop_assert_eq!(&bytes, &original, "a changed ciphertext decrypted");
                prop_assert_eq!(text, plaintext.as_bytes());
            }
            Err(_) => prop_assert_ne!(&bytes, &original),
        }
    }
}

/// A million inputs, from a seeded generator so a failure can be replayed: an eighth random
/// bytes; the rest valid ciphertexts (an eighth of them version 1, the others version 2 of a
/// random type, a third of them arrays, half with a context) changed by zero to three mutations
/// (bit flips, truncations, extensions, byte changes, other key ids, versions, flags and types),
/// and read as their type with their context, or now and then as another type or with another
/// context. Each is the original plaintext (only if unchanged and read rightly) or a documented
/// error.
#[test]
fn a_million_random_and_mutated_ciphertexts_give_the_original_or_a_documented_error() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0x2_33_7a);
    let c = cipher();
    let mut counts = std::collections::BTreeMap::<&str, u32>::new();
    for _ in 0..1_000_000 {
        if rng.next_u32() % 8 == 0 {
            let mut bytes = vec![0u8; (rng.next_u32() % 200) as usize];
            rng.fill_bytes(&mut bytes);
            let result = outcome(&c, &bytes, ValueType::TEXT, None);
            assert!(result.is_err(), "random bytes decrypted: {bytes:?}");
            *counts.entry(result.unwrap_err()).or_default() += 1;
            continue;
        }
        let mut nonce = [0u8; 12];
        rng.fill_bytes(&mut nonce);
        let (value_type, plaintext, context, original) = if rng.next_u32() % 8 == 0 {
            let text: Vec<u8> =
                (0..rng.next_u32() % 80).map(|_| b' ' + (rng.next_u32() % 95) as u8).collect();
            let sealed = seal_v1(&nonce, &text);
            (ValueType::TEXT, text, None, sealed)
        } else {
            let (value_type, plaintext) = random_value(&mut rng);
            let context = (rng.next_u32() % 2 == 0).then(|| format!("t.c:{}", rng.next_u32() % 1000));
            let sealed = c.seal(&nonce, value_type, context.as_deref().map(str::as_bytes), &plaintext);
            (value_type, plaintext, context, sealed)
        };
        let mut bytes = original.clone();
        for _ in 0..rng.next_u32() % 4 {
            let r = rng.next_u64() as usize;
            let m = match rng.next_u32() % 8 {
                0 => Mutation::FlipBit(r, (r % 8) as u8),
                1 => Mutation::Truncate(r),
                2 => {
                    let mut tail = vec![0u8; 1 + r % 40];
                    rng.fill_bytes(&mut tail);
                    Mutation::Extend(tail)
                }
                3 => Mutation::SetByte(r, (r >> 8) as u8),
                4 => Mutation::OtherKeyId(rng.next_u64() % 8),
                5 => Mutation::OtherVersion((r % 4) as u8),
                6 => Mutation::OtherFlags((r % 4) as u8),
                _ => Mutation::OtherType((r % 0x100) as u8),
            };
            bytes = apply(bytes, &m);
        }
        // Now and then read with another context or as another type.
        let (read_as, read_context, rightly) = match rng.next_u32() % 16 {
            0 => (value_type, Some(format!("t.c:{}", 1000 + rng.next_u32() % 1000)), false),
            1 => (value_type, None, context.is_none()),
            2 => (
                ValueType::scalar(Scalar::Numeric),
                context.clone(),
                value_type == ValueType::scalar(Scalar::Numeric),
            ),
            _ => (value_type, context.clone(), true),
        };
        match outcome(&c, &bytes, read_as, read_context.as_deref().map(str::as_bytes)) {
            Ok(opened) => {
                assert_eq!(bytes, original, "a changed ciphertext decrypted");
                assert!(rightly, "opened with another context or as another type");
                assert_eq!(opened, plaintext);
                *counts.entry("original").or_default() += 1;
            }
            Err(state) => {
                assert!(bytes != original || !rightly, "the unchanged ciphertext failed: {state}");
                assert!(!state.starts_with("undocumented"), "{state}");
                *counts.entry(state).or_default() += 1;
            }
        }
    }
    for state in ["original", "22P03", "0A000", "42704", "42804", "22000", "22023"] {
        assert!(counts.get(state).copied().unwrap_or(0) > 1000, "too few {state}: {counts:?}");
    }
}
