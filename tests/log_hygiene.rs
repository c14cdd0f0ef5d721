//! With the most verbose logging PostgreSQL has, and an error forced on every path (bad
//! ciphertexts, bad configuration argument and file, KMS denied), the server log holds no data
//! key, no master key and no credential secret.

mod support;

use immuta_core::key::{KeyId, WrappedKey, WrappingKeyRef};
use immuta_core::local::{Create, LocalProvider};
use immuta_core::provider::KeyProvider;
use support::kms::{kms_yaml, Moto};
use support::*;

const FILE_SECRET: &str = "file-secret-in-a-bad-config-file-000000";
const WRONG_SECRET: &str = "wrong-secret-that-kms-refuses-1111111111";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// Points `immuta.config_file` at a new file holding `yaml`.
fn use_config_file(pg: &Cluster, name: &str, yaml: &str) {
    let path = pg.root.join(name);
    pg.write_file(&path, yaml, 0o600);
    set_server_setting(&mut pg.connect(), "immuta.config_file", path.to_str().unwrap());
}

#[test]
fn the_server_log_at_debug5_holds_no_key_and_no_secret_whatever_fails() {
    // moto answers the 4 set-up requests unauthenticated, then enforces IAM.
    let moto = Moto::start(Some(4));
    let kms_key = moto.fixture(&["create-key"]);
    let user = moto.fixture(&["create-user", "immuta", "kms:Encrypt", "kms:Decrypt"]);
    let (access, secret) = user.split_once(' ').unwrap();
    let pg = Cluster::start(&[
        "shared_preload_libraries = 'immuta'",
        "log_min_messages = debug5",
        "log_min_error_statement = debug5",
        "log_statement = 'all'",
        "log_error_verbosity = verbose",
    ]);
    let mut c = pg.connect();

    // Local master key: keys created, values encrypted and decrypted, then every ciphertext error.
    c.batch_execute(
        "CREATE TABLE t AS SELECT immuta_encrypt('v' || i) AS v FROM generate_series(1, 20) i;
         SELECT immuta_rotate();
         INSERT INTO t SELECT immuta_encrypt('w' || i) FROM generate_series(1, 20) i;",
    )
    .unwrap();
    let mut fresh = pg.connect();
    fresh.batch_execute("SELECT immuta_decrypt(v) FROM t").unwrap();
    for (bad, state) in [
        ("SELECT immuta_decrypt('\\x0102'::bytea)", "22P03"),
        ("SELECT immuta_decrypt(set_byte(v, 30, get_byte(v, 30) # 1)) FROM t LIMIT 1", "22000"),
        (
            "SELECT immuta_decrypt(overlay(v PLACING '\\x00000000000000ff'::bytea FROM 4)) FROM t LIMIT 1",
            "42704",
        ),
        ("SELECT immuta_decrypt(set_byte(v, 0, 3)) FROM t LIMIT 1", "0A000"),
        ("SELECT immuta_decrypt(v, 'another row') FROM t LIMIT 1", "22023"),
        ("SELECT immuta_decrypt(v, NULL::jsonb) FROM t LIMIT 1", "42804"),
    ] {
        assert_eq!(sqlstate(fresh.batch_execute(bad)), state, "{bad}");
    }

    // Bad configuration: as an argument, and as a file that also holds a secret.
    assert_eq!(
        sqlstate(c.query_one("SELECT immuta_configure('schedule: {dataKeyRollOverLength: -5}')", &[])),
        "22023"
    );
    let bad_file = format!(
        "{}schedule:\n  dataKeyRollOverLength: -5\n",
        kms_yaml(&kms_key, &moto.endpoint(), access, FILE_SECRET)
    );
    use_config_file(&pg, "bad.yaml", &bad_file);
    assert_eq!(sqlstate(pg.connect().batch_execute("SELECT immuta_encrypt('x')")), "F0000");

    // AWS KMS, configured by file (a configuration passed to immuta_configure() would be in the
    // statement log: see README, "Security notes"): a KMS-wrapped key, then KMS refusing.
    use_config_file(&pg, "kms.yaml", &kms_yaml(&kms_key, &moto.endpoint(), access, secret));
    let mut k = pg.connect();
    k.batch_execute(
        "SELECT immuta_rotate(); INSERT INTO t SELECT immuta_encrypt('k' || i) FROM generate_series(1, 20) i",
    )
    .unwrap();
    pg.connect().batch_execute("SELECT immuta_cache_reset(); SELECT immuta_decrypt(v) FROM t").unwrap();
    use_config_file(&pg, "denied.yaml", &kms_yaml(&kms_key, &moto.endpoint(), access, WRONG_SECRET));
    let mut denied = pg.connect();
    denied.batch_execute("SELECT immuta_cache_reset()").unwrap();
    assert_eq!(sqlstate(denied.batch_execute("SELECT immuta_decrypt(v) FROM t")), "42501");

    // Everything secret there is: the master key, every data key, every credential secret.
    let master = std::fs::read_to_string(pg.master_key_file()).unwrap().trim().to_string();
    let local = LocalProvider::open(&pg.master_key_file(), Create::Never).unwrap();
    let mut secrets = vec![
        master.to_lowercase(),
        master.to_uppercase(),
        secret.to_string(),
        WRONG_SECRET.into(),
        FILE_SECRET.into(),
    ];
    let rows = c
        .query("SELECT id, provider, wrapping_key, wrapping_region, wrapped_key FROM immuta.data_keys ORDER BY id", &[])
        .unwrap();
    assert_eq!(rows.len(), 3);
    for row in rows {
        let id: i64 = row.get(0);
        let (provider, key, region): (String, String, Option<String>) = (row.get(1), row.get(2), row.get(3));
        let wrapped: Vec<u8> = row.get(4);
        let data_key = if provider == "local" {
            let wrapping = WrappingKeyRef::from_columns(&provider, &key, region.as_deref()).unwrap();
            let key = local.unwrap(KeyId::new(id).unwrap(), &wrapping, &WrappedKey::new(wrapped)).unwrap();
            key.expose().to_vec()
        } else {
            let plain = moto.fixture(&["decrypt", &hex(&wrapped), &id.to_string(), access, secret]);
            (0..plain.len() / 2).map(|i| u8::from_str_radix(&plain[2 * i..2 * i + 2], 16).unwrap()).collect()
        };
        assert_eq!(data_key.len(), 32);
        secrets.extend([hex(&data_key), hex(&data_key).to_uppercase(), base64(&data_key)]);
    }
    let log = pg.log();
    assert!(
        log.contains("DEBUG") && log.contains("statement: SELECT immuta_rotate()"),
        "logging was verbose"
    );
    assert!(
        log.contains("AccessDenied") || log.contains("42501") || log.contains("UnrecognizedClient"),
        "KMS refused"
    );
    for s in &secrets {
        assert!(!log.contains(s.as_str()), "a secret reached the server log: {}...", &s[..6]);
    }
}
