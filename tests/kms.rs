//! System tier: AWS KMS envelope encryption against moto's KMS on loopback, through a proxy that
//! can simulate outages and a hung KMS.

mod support;

use std::time::{Duration, Instant};

use support::kms::{kms_yaml, Mode, Moto, Proxy, REGION};
use support::*;

fn configure(c: &mut postgres::Client, yaml: &str) {
    c.execute("SELECT immuta_configure($1)", &[&yaml]).unwrap();
}

fn key_rows(c: &mut postgres::Client) -> Vec<(i64, String, String)> {
    c.query("SELECT id, provider, wrapping_key FROM immuta.keys ORDER BY id", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// moto with one KMS key, a proxy in front of it, and a cluster configured (with the test
/// credentials) to wrap new keys with that key through the proxy.
fn kms_through_proxy() -> (Moto, String, Proxy, Cluster, postgres::Client) {
    let moto = Moto::start(None);
    let key = moto.fixture(&["create-key"]);
    let proxy = Proxy::start(moto.port);
    let pg = Cluster::start(&[]);
    let mut c = pg.connect();
    configure(&mut c, &kms_yaml(&key, &proxy.endpoint(), "testing", "testing"));
    (moto, key, proxy, pg, c)
}

#[test]
fn kms_wrapped_keys_round_trip_and_old_keys_unwrap_after_a_key_change() {
    let moto = Moto::start(None);
    let key_a = moto.fixture(&["create-key"]);
    let key_b = moto.fixture(&["create-key", "immuta-b"]);
    let proxy = Proxy::start(moto.port);
    let pg = Cluster::start(&[]);
    let (mut c, notices) = pg.connect_recording_notices();
    configure(&mut c, &kms_yaml(&key_a, &proxy.endpoint(), "testing", "testing"));
    assert!(
        notices.lock().unwrap().iter().any(|n| n.starts_with("WARNING") && n.contains("credentials")),
        "explicit credentials draw a warning recommending IAM roles"
    );
    let under_a = encrypt(&mut c, "123-45-6789");
    let rotated: i64 = c.query_one("SELECT immuta_rotate()", &[]).unwrap().get(0);
    let under_a2 = encrypt(&mut c, "987-65-4321");
    assert_eq!(key_id_of(&mut c, &under_a2), rotated);
    // New keys go to key B (named by its alias); old keys stay with A.
    configure(&mut c, &kms_yaml("alias/immuta-b", &proxy.endpoint(), "testing", "testing"));
    c.execute("SELECT immuta_rotate()", &[]).unwrap();
    let under_b = encrypt(&mut c, "555-12-3456");
    let rows = key_rows(&mut c);
    assert_eq!(rows.len(), 3);
    assert!(rows.iter().all(|r| r.1 == "awsKms"));
    assert_eq!((rows[0].2.as_str(), rows[1].2.as_str()), (key_a.as_str(), key_a.as_str()));
    assert_eq!(rows[2].2, key_b, "the row records the ARN behind the alias");
    let region: String = c.query_one("SELECT DISTINCT wrapping_region FROM immuta.keys", &[]).unwrap().get(0);
    assert_eq!(region, REGION);
    // A fresh session unwraps every key through KMS.
    let mut fresh = pg.connect();
    assert_eq!(decrypt(&mut fresh, &under_a).unwrap(), "123-45-6789");
    assert_eq!(decrypt(&mut fresh, &under_a2).unwrap(), "987-65-4321");
    assert_eq!(decrypt(&mut fresh, &under_b).unwrap(), "555-12-3456");
    let actions = proxy.actions();
    assert!(
        actions.iter().all(|a| a == "TrentService.Encrypt" || a == "TrentService.Decrypt"),
        "{actions:?}"
    );
    assert!(actions.iter().filter(|a| *a == "TrentService.Decrypt").count() >= 3);
}

#[test]
fn the_least_privilege_policy_of_encrypt_and_decrypt_is_enough_and_is_enforced() {
    // moto answers 7 set-up requests unauthenticated, then enforces IAM.
    let moto = Moto::start(Some(7));
    let key = moto.fixture(&["create-key"]);
    let full = moto.fixture(&["create-user", "immuta", "kms:Encrypt", "kms:Decrypt"]);
    let decrypt_only = moto.fixture(&["create-user", "reader", "kms:Decrypt"]);
    let (full_id, full_secret) = full.split_once(' ').unwrap();
    let (reader_id, reader_secret) = decrypt_only.split_once(' ').unwrap();
    let pg = Cluster::start(&["log_min_messages = debug5"]);
    let mut c = pg.connect();
    configure(&mut c, &kms_yaml(&key, &moto.endpoint(), full_id, full_secret));
    let value = encrypt(&mut c, "4111 1111 1111 1111");
    let mut fresh = pg.connect();
    assert_eq!(decrypt(&mut fresh, &value).unwrap(), "4111 1111 1111 1111");

    // A user without kms:Encrypt cannot create keys: a clear 42501 with the KMS error code.
    configure(&mut c, &kms_yaml(&key, &moto.endpoint(), reader_id, reader_secret));
    let denied = c.execute("SELECT immuta_rotate()", &[]);
    let text = error_text(c.execute("SELECT immuta_rotate()", &[]));
    assert_eq!(sqlstate(denied), "42501", "{text}");
    assert!(text.contains("AccessDenied"), "{text}");
    // Wrong credentials are refused the same way.
    configure(&mut c, &kms_yaml(&key, &moto.endpoint(), full_id, "not-the-secret"));
    let mut fresh = pg.connect();
    assert_eq!(sqlstate(decrypt(&mut fresh, &value)), "42501");

    let log = pg.log();
    for secret in [full_secret, reader_secret] {
        assert!(!log.contains(secret), "a credential secret reached the server log");
    }
}

#[test]
fn a_kms_outage_keeps_cached_keys_working_and_recovers_without_a_restart() {
    let (_moto, _key, proxy, pg, mut c) = kms_through_proxy();
    let value = encrypt(&mut c, "cached");
    let mut warm = pg.connect();
    assert_eq!(decrypt(&mut warm, &value).unwrap(), "cached");

    proxy.set_mode(Mode::Refuse);
    assert_eq!(decrypt(&mut warm, &value).unwrap(), "cached", "an unwrapped key needs no KMS");
    let mut cold = pg.connect();
    let failed = decrypt(&mut cold, &value);
    let text = error_text(decrypt(&mut cold, &value));
    assert_eq!(sqlstate(failed), "08006");
    assert!(text.contains("unreachable"), "{text}");

    proxy.set_mode(Mode::Forward);
    assert_eq!(decrypt(&mut cold, &value).unwrap(), "cached", "back without restarting PostgreSQL");
}

#[test]
fn a_kms_that_never_answers_times_out_and_a_cancel_ends_the_wait() {
    let (_moto, _key, proxy, pg, mut c) = kms_through_proxy();
    let pg = std::sync::Arc::new(pg);
    let value = encrypt(&mut c, "v");
    proxy.set_mode(Mode::Blackhole);

    let mut timed = pg.connect();
    timed.batch_execute("SET immuta.kms_timeout = '1s'").unwrap();
    let started = Instant::now();
    let result = decrypt(&mut timed, &value);
    let elapsed = started.elapsed();
    let text = error_text(decrypt(&mut timed, &value));
    assert_eq!(sqlstate(result), "08006");
    assert!(text.contains("immuta.kms_timeout"), "{text}");
    assert!(elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(5), "{elapsed:?}");

    // pg_cancel_backend ends a long wait well within a second, and the session stays usable.
    let mut waiting = pg.connect();
    waiting.batch_execute("SET immuta.kms_timeout = '60s'").unwrap();
    let pid: i32 = waiting.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    let canceller = {
        let pg = pg.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(500));
            let sent = Instant::now();
            pg.connect().execute("SELECT pg_cancel_backend($1)", &[&pid]).unwrap();
            sent
        })
    };
    let result = decrypt(&mut waiting, &value);
    let ended = Instant::now();
    let sent = canceller.join().unwrap();
    assert_eq!(sqlstate(result), "57014");
    assert!(ended.duration_since(sent) < Duration::from_millis(900), "{:?}", ended.duration_since(sent));
    assert_eq!(waiting.query_one("SELECT 1", &[]).unwrap().get::<_, i32>(0), 1);

    // statement_timeout ends it too.
    waiting.batch_execute("SET statement_timeout = '300ms'").unwrap();
    let started = Instant::now();
    assert_eq!(sqlstate(decrypt(&mut waiting, &value)), "57014");
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[test]
fn rewrap_moves_every_key_between_local_and_kms_and_all_values_still_decrypt() {
    let moto = Moto::start(None);
    let key_a = moto.fixture(&["create-key"]);
    let key_b = moto.fixture(&["create-key"]);
    let pg = Cluster::start(&[]);
    let mut c = pg.connect();
    let mut values = vec![encrypt(&mut c, "local one")];
    c.execute("SELECT immuta_rotate()", &[]).unwrap();
    values.push(encrypt(&mut c, "local two"));
    let plaintexts = ["local one", "local two"];
    let check_all = |pg: &Cluster| {
        let mut fresh = pg.connect();
        for (v, p) in values.iter().zip(plaintexts) {
            assert_eq!(decrypt(&mut fresh, v).unwrap(), p);
        }
    };

    configure(&mut c, &kms_yaml(&key_a, &moto.endpoint(), "testing", "testing"));
    let n: i32 = c.query_one("SELECT immuta_rewrap()", &[]).unwrap().get(0);
    assert_eq!(n, 2);
    assert!(key_rows(&mut c).iter().all(|r| r.1 == "awsKms" && r.2 == key_a));
    check_all(&pg);

    configure(&mut c, &kms_yaml(&key_b, &moto.endpoint(), "testing", "testing"));
    assert_eq!(c.query_one("SELECT immuta_rewrap()", &[]).unwrap().get::<_, i32>(0), 2);
    assert!(key_rows(&mut c).iter().all(|r| r.2 == key_b));
    check_all(&pg);

    // Back to the local master key (the awsKms block stays for reaching KMS, disabled).
    let local =
        kms_yaml(&key_b, &moto.endpoint(), "testing", "testing").replace("isKms: true", "isKms: false");
    configure(&mut c, &local);
    assert_eq!(c.query_one("SELECT immuta_rewrap()", &[]).unwrap().get::<_, i32>(0), 2);
    assert!(key_rows(&mut c).iter().all(|r| r.1 == "local"));
    check_all(&pg);
}

/// moto does not refuse Encrypt or Decrypt for a disabled key, so the "unusable key" class is
/// exercised with a key that does not exist (NotFoundException); DisabledException and
/// KMSInvalidStateException map to the same SQLSTATE (src/errors.rs).
#[test]
fn an_unusable_kms_key_gives_its_own_error() {
    let moto = Moto::start(None);
    let key = moto.fixture(&["create-key"]);
    let missing = format!("{}00000000-0000-0000-0000-000000000000", &key[..key.rfind('/').unwrap() + 1]);
    let pg = Cluster::start(&[]);
    let mut c = pg.connect();
    configure(&mut c, &kms_yaml(&missing, &moto.endpoint(), "testing", "testing"));
    let text = error_text(c.execute("SELECT immuta_encrypt('v')", &[]));
    assert_eq!(sqlstate(c.execute("SELECT immuta_encrypt('v')", &[])), "55000", "{text}");
    assert!(text.contains("NotFoundException"), "{text}");
    assert_eq!(count_keys(&mut c), 0, "nothing was stored");
}

#[test]
fn throttling_and_a_wrapped_key_moved_to_another_row_give_their_own_errors() {
    let (_moto, _key, proxy, pg, mut c) = kms_through_proxy();
    encrypt(&mut c, "under key 1");
    c.execute("SELECT immuta_rotate()", &[]).unwrap();
    let under_2 = encrypt(&mut c, "under key 2");

    proxy.set_mode(Mode::Throttle);
    let mut fresh = pg.connect();
    fresh.batch_execute("SET immuta.kms_timeout = '10s'").unwrap();
    let text = error_text(decrypt(&mut fresh, &under_2));
    assert_eq!(sqlstate(decrypt(&mut fresh, &under_2)), "53000", "{text}");
    assert!(text.contains("ThrottlingException"), "{text}");
    proxy.set_mode(Mode::Forward);

    // Key 1's wrapped bytes on key 2's row: the encryption context (the key id) no longer matches.
    c.execute(
        "UPDATE immuta.data_keys SET wrapped_key = (SELECT wrapped_key FROM immuta.data_keys WHERE id = 1) \
         WHERE id = 2",
        &[],
    )
    .unwrap();
    let mut fresh = pg.connect();
    let text = error_text(decrypt(&mut fresh, &under_2));
    assert_eq!(sqlstate(decrypt(&mut fresh, &under_2)), "XX001", "{text}");
    assert!(text.contains("InvalidCiphertextException"), "{text}");
}

#[test]
fn a_signature_error_quoting_the_session_token_never_shows_it() {
    let (_moto, key, proxy, pg, mut c) = kms_through_proxy();
    let token = "immuta-test-session-token-8c1f2e";
    let yaml = kms_yaml(&key, &proxy.endpoint(), "testing", "testing").replace(
        "secretAccessKey: testing\n",
        &format!("secretAccessKey: testing\n        sessionToken: {token}\n"),
    );
    configure(&mut c, &yaml);
    proxy.set_mode(Mode::BadSignature);
    let result = c.execute("SELECT immuta_encrypt('v')", &[]);
    let text = error_text(c.execute("SELECT immuta_encrypt('v')", &[]));
    assert_eq!(sqlstate(result), "42501", "{text}");
    assert!(text.contains("InvalidSignatureException"), "{text}");
    assert!(!text.contains(token), "{text}");
    assert!(!pg.log().contains(token), "the session token reached the server log");
    let shown: String = c.query_one("SELECT immuta_config()::text", &[]).unwrap().get(0);
    assert!(!shown.contains(token));
}

#[test]
fn the_default_credential_chain_and_the_standard_endpoint_variable_are_honoured() {
    let moto = Moto::start(None);
    let key = moto.fixture(&["create-key"]);
    let endpoint = moto.endpoint();
    let pg = Cluster::start_with_env(
        &[],
        &[
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
            ("AWS_ENDPOINT_URL_KMS", &endpoint),
        ],
    );
    let mut c = pg.connect();
    // The first shape of the Immuta documentation: no credentials, no endpoint in the YAML.
    let yaml = format!("plugins:\n  awsKms:\n    plugin: 'awsKms'\n    isKms: true\n    keyId: {key}\n    region: {REGION}\n");
    let (mut c2, notices) = pg.connect_recording_notices();
    c2.execute("SELECT immuta_configure($1)", &[&yaml]).unwrap();
    assert!(notices.lock().unwrap().is_empty(), "no credential warning without credentials");
    let value = encrypt(&mut c, "from the environment");
    let mut fresh = pg.connect();
    assert_eq!(decrypt(&mut fresh, &value).unwrap(), "from the environment");
    let provider: String = c.query_one("SELECT provider FROM immuta.keys", &[]).unwrap().get(0);
    assert_eq!(provider, "awsKms");
}
