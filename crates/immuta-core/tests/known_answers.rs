//! Known-answer vectors from docs/vectors/format-v1.json and format-v2.json, computed with Python's `cryptography`
//! independently of this crate: immuta must produce and accept exactly these bytes.

use std::os::unix::fs::PermissionsExt;

use immuta_core::cipher::DataCipher;
use immuta_core::format;
use immuta_core::key::{DataKey, Fingerprint, KeyId, WrappedKey, WrappingKeyRef};
use immuta_core::local::{Create, LocalProvider};
use immuta_core::provider::KeyProvider;
use immuta_core::value_type::ValueType;
use serde_json::Value;

const VECTORS: &str = include_str!("../../../docs/vectors/format-v1.json");
const VECTORS_V2: &str = include_str!("../../../docs/vectors/format-v2.json");
const FORMAT_MD: &str = include_str!("../../../docs/FORMAT.md");

fn vectors() -> Value {
    serde_json::from_str(VECTORS).unwrap()
}

fn bytes<const N: usize>(v: &Value) -> [u8; N] {
    hex::decode(v.as_str().unwrap()).unwrap().try_into().unwrap()
}

macro_rules! ciphertext_vectors {
    ($($name:ident: $index:expr,)*) => {$(
        /// Version 1 is no longer written; every value of it opens forever.
        #[test]
        fn $name() {
            let v = &vectors()["ciphertext_v1"][$index];
            let id = KeyId::new(v["key_id"].as_i64().unwrap()).unwrap();
            let cipher = DataCipher::new(id, &DataKey::from_bytes(&mut bytes::<32>(&v["data_key"])));
            let plaintext = v["plaintext"].as_str().unwrap();
            let expected = hex::decode(v["ciphertext"].as_str().unwrap()).unwrap();
            let sealed = format::parse(&expected).unwrap();
            assert_eq!((sealed.version, sealed.key_id, sealed.value_type), (1, id, ValueType::TEXT));
            assert_eq!(&expected[9..21], &bytes::<12>(&v["nonce"]));
            assert_eq!(cipher.open_text(&sealed, None).unwrap(), plaintext, "opening");
            assert!(cipher.open_text(&sealed, Some(b"")).is_err(), "a version-1 value has no context");
        }
    )*};
}

ciphertext_vectors! {
    empty_plaintext_under_key_1: 0,
    ssn_under_key_1: 1,
    multibyte_text_under_key_42: 2,
    long_value_under_a_key_id_above_2_to_the_40: 3,
}

/// Every version-2 vector: immuta seals exactly its bytes and opens them to its encoding, with
/// its context only.
#[test]
fn version_2_vectors_seal_and_open_exactly() {
    let all: Value = serde_json::from_str(VECTORS_V2).unwrap();
    let vectors = all["ciphertext_v2"].as_array().unwrap();
    assert!(vectors.len() >= 20);
    for v in vectors {
        let id = KeyId::new(v["key_id"].as_i64().unwrap()).unwrap();
        let cipher = DataCipher::new(id, &DataKey::from_bytes(&mut bytes::<32>(&v["data_key"])));
        let value_type = ValueType::from_byte(v["type_byte"].as_u64().unwrap() as u8).unwrap();
        assert_eq!(value_type.sql_name(), v["type"].as_str().unwrap());
        let encoding = hex::decode(v["encoding"].as_str().unwrap()).unwrap();
        let context = v["context"].as_str().map(str::as_bytes);
        let expected = hex::decode(v["ciphertext"].as_str().unwrap()).unwrap();
        let what = v["sql"].as_str().unwrap();
        assert_eq!(
            cipher.seal(&bytes::<12>(&v["nonce"]), value_type, context, &encoding),
            expected,
            "sealing {what}"
        );
        let sealed = format::parse(&expected).unwrap();
        assert_eq!(
            (sealed.version, sealed.key_id, sealed.value_type, sealed.has_context),
            (2, id, value_type, context.is_some())
        );
        let mut out = vec![0u8; sealed.body.len()];
        cipher.open_into(&sealed, context, &mut out).unwrap();
        assert_eq!(out, encoding, "opening {what}");
        let wrong: Option<&[u8]> = if context.is_some() { None } else { Some(b"another row") };
        assert!(cipher.open_into(&sealed, wrong, &mut out).is_err(), "{what} opened with another context");
    }
}

#[test]
fn local_wrap_vector_unwraps_to_its_data_key() {
    let v = &vectors()["local_wrap_v1"][0];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("master.key");
    std::fs::write(&path, format!("{}\n", v["master_key"].as_str().unwrap())).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let provider = LocalProvider::open(&path, Create::Never).unwrap();
    let fp = &vectors()["master_key_fingerprint"];
    assert_eq!(provider.fingerprint().to_string(), fp["fingerprint"].as_str().unwrap());
    let id = KeyId::new(v["key_id"].as_i64().unwrap()).unwrap();
    let recorded = WrappingKeyRef::Local {
        fingerprint: Fingerprint::parse(fp["fingerprint"].as_str().unwrap()).unwrap(),
    };
    let wrapped = WrappedKey::new(hex::decode(v["wrapped_key"].as_str().unwrap()).unwrap());
    let key = provider.unwrap(id, &recorded, &wrapped).unwrap();
    assert_eq!(key.expose(), &bytes::<32>(&v["data_key"]));
}

#[test]
fn format_md_shows_every_vector() {
    let all = vectors();
    let mut shown = vec![all["master_key_fingerprint"]["fingerprint"].as_str().unwrap()];
    for v in all["ciphertext_v1"].as_array().unwrap().iter().take(3) {
        shown.push(v["ciphertext"].as_str().unwrap());
    }
    shown.push(all["local_wrap_v1"][0]["wrapped_key"].as_str().unwrap());
    let v2: Value = serde_json::from_str(VECTORS_V2).unwrap();
    for i in [1, 4, 6, 17, 23] {
        shown.push(v2["ciphertext_v2"][i]["ciphertext"].as_str().unwrap());
        shown.push(v2["ciphertext_v2"][i]["encoding"].as_str().unwrap());
    }
    for hex in shown {
        assert!(FORMAT_MD.contains(hex), "docs/FORMAT.md lacks {hex}");
    }
}

#[test]
fn the_example_configurations_in_pgrx_config_are_valid() {
    use immuta_core::config::Config;
    let local = Config::from_yaml(include_str!("../../../pgrx-config/immuta.local.yaml")).unwrap();
    assert_eq!(local.rollover().days(), 90);
    assert!(local.aws_kms().is_none());
    let kms = Config::from_yaml(include_str!("../../../pgrx-config/immuta.aws-kms.yaml")).unwrap();
    assert_eq!(kms.aws_kms().unwrap().key_id, "alias/immuta-data-keys");
    let creds =
        Config::from_yaml(include_str!("../../../pgrx-config/immuta.aws-kms-credentials.yaml")).unwrap();
    assert!(creds.has_explicit_credentials());
}
