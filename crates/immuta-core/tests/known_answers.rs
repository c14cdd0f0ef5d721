//! Known-answer vectors from docs/vectors/format-v1.json, computed with Python's `cryptography`
//! independently of this crate: immuta must produce and accept exactly these bytes.

use std::os::unix::fs::PermissionsExt;

use immuta_core::cipher::DataCipher;
use immuta_core::format;
use immuta_core::key::{DataKey, Fingerprint, KeyId, WrappedKey, WrappingKeyRef};
use immuta_core::local::{Create, LocalProvider};
use immuta_core::provider::KeyProvider;
use serde_json::Value;

const VECTORS: &str = include_str!("../../../docs/vectors/format-v1.json");
const FORMAT_MD: &str = include_str!("../../../docs/FORMAT.md");

fn vectors() -> Value {
    serde_json::from_str(VECTORS).unwrap()
}

fn bytes<const N: usize>(v: &Value) -> [u8; N] {
    hex::decode(v.as_str().unwrap()).unwrap().try_into().unwrap()
}

macro_rules! ciphertext_vectors {
    ($($name:ident: $index:expr,)*) => {$(
        #[test]
        fn $name() {
            let v = &vectors()["ciphertext_v1"][$index];
            let id = KeyId::new(v["key_id"].as_i64().unwrap()).unwrap();
            let cipher = DataCipher::new(id, &DataKey::from_bytes(&mut bytes::<32>(&v["data_key"])));
            let plaintext = v["plaintext"].as_str().unwrap();
            let expected = hex::decode(v["ciphertext"].as_str().unwrap()).unwrap();
            assert_eq!(cipher.seal(&bytes::<12>(&v["nonce"]), plaintext.as_bytes()), expected, "sealing");
            let sealed = format::parse(&expected).unwrap();
            assert_eq!(sealed.key_id, id);
            assert_eq!(cipher.open_text(&sealed).unwrap(), plaintext, "opening");
        }
    )*};
}

ciphertext_vectors! {
    empty_plaintext_under_key_1: 0,
    ssn_under_key_1: 1,
    multibyte_text_under_key_42: 2,
    long_value_under_a_key_id_above_2_to_the_40: 3,
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
