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
/// Asserts immuta asked KMS for nothing but `kms:Encrypt` and `kms:Decrypt` (the least-privilege
/// policy README gives); returns the actions, in order.
fn only_encrypt_and_decrypt(proxy: &Proxy) -> Vec<String> {
    let actions = proxy.actions();
    assert!(
        actions.iter().all(|a| a == "TrentService.Encrypt" || a == "TrentService.Decrypt"),
        "{actions:?}"
    );
    actions
}

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
    let actions = only_encrypt_and_decrypt(&proxy);
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
    let value = encrypt(&mut c, "v");
    let literal: String = c.query_one("SELECT $1::bytea::text", &[&value]).unwrap().get(0);
    let decrypt_sql = format!("SELECT immuta_decrypt('{literal}'::bytea)");
    proxy.set_mode(Mode::Blackhole);

    // immuta.kms_timeout ends the wait: never before the timeout (neither the SDK's timer nor
    // immuta's fires early), and with its own message.
    let mut timed = pg.connect();
    timed.batch_execute("SET immuta.kms_timeout = '1s'").unwrap();
    let started = Instant::now();
    let result = timed.simple_query(&decrypt_sql);
    let elapsed = started.elapsed();
    let text = error_text(timed.simple_query(&decrypt_sql));
    assert_eq!(sqlstate(result), "08006");
    assert!(text.contains("immuta.kms_timeout"), "{text}");
    assert!(elapsed >= Duration::from_millis(900), "{elapsed:?}");

    // pg_cancel_backend ends a wait that would last a minute, and the session stays usable. The
    // cancel is sent once the statement is running (a cancel that arrives between statements is
    // dropped by PostgreSQL), and again until it lands.
    let mut waiting = pg.connect();
    waiting.batch_execute("SET immuta.kms_timeout = '60s'").unwrap();
    let pid: i32 = waiting.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    let mut canceller = pg.connect();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let cancelling = {
        let done = done.clone();
        std::thread::spawn(move || {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                canceller
                    .execute(
                        "SELECT pg_cancel_backend(pid) FROM pg_stat_activity \
                         WHERE pid = $1 AND state = 'active' AND query LIKE 'SELECT immuta_decrypt%'",
                        &[&pid],
                    )
                    .unwrap();
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let started = Instant::now();
    let result = waiting.simple_query(&decrypt_sql);
    let elapsed = started.elapsed();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    cancelling.join().unwrap();
    assert_eq!(sqlstate(result), "57014");
    assert!(elapsed < Duration::from_secs(50), "ended by the cancel, not the timeout: {elapsed:?}");
    assert_eq!(waiting.query_one("SELECT 1", &[]).unwrap().get::<_, i32>(0), 1);

    // statement_timeout ends it too.
    waiting.batch_execute("SET statement_timeout = '300ms'").unwrap();
    let started = Instant::now();
    assert_eq!(sqlstate(waiting.simple_query(&decrypt_sql)), "57014");
    assert!(started.elapsed() < Duration::from_secs(50), "ended by the statement timeout, not the KMS one");
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

/// A cluster whose server process has an AWS identity of its own (environment credentials and
/// `AWS_ENDPOINT_URL_KMS`, as an instance profile would give it), reaching moto through `proxy`.
fn cluster_with_a_server_identity(proxy: &Proxy) -> Cluster {
    let endpoint = proxy.endpoint();
    Cluster::start_with_env(
        &[],
        &[
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
            ("AWS_ENDPOINT_URL_KMS", &endpoint),
        ],
    )
}

/// The first shape of the Immuta documentation: KMS key `key`, no credentials, no endpoint.
fn server_identity_yaml(key: &str) -> String {
    format!(
        "plugins:\n  awsKms:\n    plugin: awsKms\n    isKms: true\n    keyId: {key}\n    region: {REGION}\n"
    )
}

fn decrypts_sent(proxy: &Proxy) -> usize {
    proxy.actions().iter().filter(|a| *a == "TrentService.Decrypt").count()
}

/// moto with one KMS key, a proxy, a cluster with a server identity reaching moto through it, and
/// a database `shop` in which its owner `tenant`, not a superuser, installed immuta (a session
/// of the tenant's there is returned).
fn tenant_on_a_cluster_with_a_server_identity() -> (Moto, String, Proxy, Cluster, postgres::Client) {
    let moto = Moto::start(None);
    let key = moto.fixture(&["create-key"]);
    let proxy = Proxy::start(moto.port);
    let pg = cluster_with_a_server_identity(&proxy);
    pg.create_database("shop", Some("tenant"));
    let mut tenant = pg.connect_as("tenant", "shop");
    tenant.batch_execute("CREATE EXTENSION immuta").unwrap();
    (moto, key, proxy, pg, tenant)
}

#[test]
fn a_key_row_the_owner_restored_is_never_unwrapped_with_the_servers_identity() {
    let (moto, key, proxy, pg, mut tenant) = tenant_on_a_cluster_with_a_server_identity();
    // The tenant knows a data key, wraps it with a KMS key the server can use, and restores the
    // row into its fresh installation: if immuta unwrapped it as the server, the tenant would know
    // the key that encrypts everyone's values from then on.
    let planted = "5a".repeat(32);
    let blob = moto.fixture(&["encrypt", &planted, &key, "1"]);
    tenant
        .execute(
            "INSERT INTO immuta.data_keys (id, provider, wrapping_key, wrapping_region, wrapped_key, reason) \
             VALUES (1, 'awsKms', $1, $2, decode($3, 'hex'), 'first use')",
            &[&key, &REGION, &blob],
        )
        .unwrap();
    let mut superuser = pg.connect_to("shop");
    for configured_by_superuser in [false, true] {
        if configured_by_superuser {
            superuser.execute("SELECT immuta_configure($1)", &[&server_identity_yaml(&key)]).unwrap();
        }
        let mut session = pg.connect_as("tenant", "shop");
        let result = session.query_one("SELECT immuta_encrypt('everyone''s secret')", &[]);
        let text = error_text(session.query_one("SELECT immuta_encrypt('everyone''s secret')", &[]));
        assert_eq!(sqlstate(result), "42501", "{text}");
        assert!(text.contains("server's own identity"), "{text}");
        assert_eq!(decrypts_sent(&proxy), 0, "KMS was never asked");
    }
    let vouched: bool =
        superuser.query_one("SELECT server_identity FROM immuta.keys WHERE id = 1", &[]).unwrap().get(0);
    assert!(!vouched);
    // A superuser's restore is no more trusted: a dump may come from a tenant.
    superuser
        .execute(
            "INSERT INTO immuta.data_keys (id, provider, wrapping_key, wrapping_region, wrapped_key, reason, server_identity) \
             VALUES (2, 'awsKms', $1, $2, decode($3, 'hex'), 'manual', true)",
            &[&key, &REGION, &blob],
        )
        .unwrap();
    assert_eq!(sqlstate(superuser.query_one("SELECT immuta_encrypt('x')", &[])), "42501");
    superuser.batch_execute("DELETE FROM immuta.data_keys WHERE id = 2").unwrap();
    // A superuser may vouch for the row; then it is unwrapped like any other.
    superuser.batch_execute("UPDATE immuta.data_keys SET server_identity = true").unwrap();
    let mut session = pg.connect_as("tenant", "shop");
    session.query_one("SELECT immuta_encrypt('vouched for')", &[]).unwrap();
    assert_eq!(decrypts_sent(&proxy), 1);
}

#[test]
fn a_configuration_stored_by_an_admin_who_is_not_a_superuser_never_lends_the_servers_identity() {
    let moto = Moto::start(None);
    let key = moto.fixture(&["create-key"]);
    let proxy = Proxy::start(moto.port);
    let pg = cluster_with_a_server_identity(&proxy);
    let mut superuser = pg.connect();
    superuser.batch_execute("CREATE ROLE keeper LOGIN; GRANT immuta_admin TO keeper").unwrap();
    superuser.execute("SELECT immuta_configure($1)", &[&server_identity_yaml(&key)]).unwrap();
    let value = encrypt(&mut superuser, "wrapped by KMS");
    superuser.batch_execute("SELECT immuta_rotate()").unwrap();
    assert_eq!(decrypt(&mut pg.connect(), &value).unwrap(), "wrapped by KMS");
    let sent = decrypts_sent(&proxy);

    // The admin switches new keys to the local master key, keeping the KMS block without
    // credentials, or dropping it altogether: old KMS rows would then unwrap as the server.
    let (mut keeper, notices) = pg.connect_as_recording_notices("keeper", "postgres");
    for switched in [server_identity_yaml(&key).replace("isKms: true", "isKms: false"), String::new()] {
        keeper.execute("SELECT immuta_configure($1)", &[&switched]).unwrap();
        assert!(
            notices.lock().unwrap().iter().any(|n| n.contains("will not be unwrapped")),
            "a warning says so"
        );
        let mut fresh = pg.connect();
        let text = error_text(decrypt(&mut fresh, &value));
        assert_eq!(sqlstate(decrypt(&mut fresh, &value)), "42501", "{text}");
        assert!(text.contains("not put in force by a superuser"), "{text}");
        assert_eq!(sqlstate(keeper.query_one("SELECT immuta_rewrap()", &[])), "42501", "nor a rewrap");
        assert_eq!(decrypts_sent(&proxy), sent, "KMS was never asked");
    }
    // A superuser storing the same configuration lends it again.
    superuser
        .execute(
            "SELECT immuta_configure($1)",
            &[&server_identity_yaml(&key).replace("isKms: true", "isKms: false")],
        )
        .unwrap();
    assert_eq!(decrypt(&mut pg.connect(), &value).unwrap(), "wrapped by KMS");
}

#[test]
fn an_empty_session_token_is_not_sent() {
    let (_moto, key, proxy, pg, mut c) = kms_through_proxy();
    let yaml = kms_yaml(&key, &proxy.endpoint(), "testing", "testing")
        .replace("secretAccessKey: testing\n", "secretAccessKey: testing\n        sessionToken: ''\n");
    configure(&mut c, &yaml);
    let value = encrypt(&mut c, "no token");
    assert_eq!(decrypt(&mut pg.connect(), &value).unwrap(), "no token");
    let headers = proxy.header_names();
    assert!(headers.iter().any(|h| h == "authorization"), "{headers:?}");
    assert!(!headers.iter().any(|h| h == "x-amz-security-token"), "{headers:?}");
}

#[test]
fn a_superusers_rewrap_makes_the_wrapping_its_own() {
    let (_moto, key, proxy, pg, mut tenant) = tenant_on_a_cluster_with_a_server_identity();
    // Keys made under the defaults (nobody's configuration) are wrapped by the local master key.
    let value = encrypt(&mut tenant, "moved to KMS");
    let mut superuser = pg.connect_to("shop");
    superuser.execute("SELECT immuta_configure($1)", &[&server_identity_yaml(&key)]).unwrap();
    superuser.query_one("SELECT immuta_rewrap()", &[]).unwrap();
    let row: (String, bool) = superuser
        .query_one("SELECT provider, server_identity FROM immuta.keys WHERE id = 1", &[])
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(row, ("awsKms".to_owned(), true), "wrapped again under a superuser's configuration");
    assert_eq!(decrypt(&mut pg.connect_as("tenant", "shop"), &value).unwrap(), "moved to KMS");
    assert_eq!(decrypts_sent(&proxy), 1);
}

#[test]
fn a_keyring_with_its_own_kms_key_wraps_its_keys_there_and_shredding_it_leaves_the_others() {
    let moto = Moto::start(None);
    let key_a = moto.fixture(&["create-key"]);
    let key_t = moto.fixture(&["create-key", "tenant-acme"]);
    let proxy = Proxy::start(moto.port);
    let pg = Cluster::start(&[]);
    let mut c = pg.connect();
    configure(&mut c, &kms_yaml(&key_a, &proxy.endpoint(), "testing", "testing"));
    c.batch_execute(
        "SELECT immuta_keyring_create('acme', kms_key => 'alias/tenant-acme');
         SELECT immuta_keyring_create('globex', rollover_days => 7);
         CREATE ROLE adm LOGIN IN ROLE immuta_admin, immuta_encryptor;",
    )
    .unwrap();
    let acme: Vec<u8> =
        c.query_one("SELECT immuta_encrypt('acme 1', keyring => 'acme')", &[]).unwrap().get(0);
    let globex: Vec<u8> =
        c.query_one("SELECT immuta_encrypt('globex 1', keyring => 'globex')", &[]).unwrap().get(0);
    let default = encrypt(&mut c, "default 1");
    let wrapping = |c: &mut postgres::Client, keyring: &str| -> (String, String) {
        let row = c
            .query_one(
                "SELECT wrapping_key, wrapping_region FROM immuta.keys WHERE keyring = $1",
                &[&keyring],
            )
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!(wrapping(&mut c, "acme"), (key_t.clone(), REGION.to_owned()), "bring your own key");
    assert_eq!(wrapping(&mut c, "globex").0, key_a, "the configuration's key");
    assert_eq!(wrapping(&mut c, "default").0, key_a);
    let mut fresh = pg.connect();
    assert_eq!(decrypt(&mut fresh, &acme).unwrap(), "acme 1");
    assert_eq!(decrypt(&mut fresh, &globex).unwrap(), "globex 1");
    assert_eq!(decrypt(&mut fresh, &default).unwrap(), "default 1");
    // The configuration carries credentials, so an administrator who is not a superuser may
    // give a keyring its own KMS key: immuta reaches it with those credentials, not as the server.
    let mut adm = pg.connect_as("adm", "postgres");
    adm.batch_execute("SELECT immuta_keyring_create('initech', kms_key => 'alias/tenant-acme')").unwrap();
    let initech: Vec<u8> =
        adm.query_one("SELECT immuta_encrypt('initech 1', keyring => 'initech')", &[]).unwrap().get(0);
    assert_eq!(decrypt(&mut fresh, &initech).unwrap(), "initech 1");
    // Shredding acme leaves the keyrings that share its KMS key and the others working.
    let shredded: i32 =
        c.query_one("SELECT immuta_keyring_destroy('acme', 'tenant left')", &[]).unwrap().get(0);
    assert_eq!(shredded, 1);
    assert_eq!(sqlstate(decrypt(&mut fresh, &acme)), "42704");
    assert_eq!(decrypt(&mut fresh, &initech).unwrap(), "initech 1");
    assert_eq!(decrypt(&mut fresh, &globex).unwrap(), "globex 1");
    only_encrypt_and_decrypt(&proxy);
}

#[test]
fn tenants_with_their_own_kms_keys_roll_over_there_and_a_key_deleted_in_kms_finishes_the_shredding() {
    let moto = Moto::start(None);
    let key_a = moto.fixture(&["create-key"]);
    let key_one = moto.fixture(&["create-key", "tenant-one"]);
    let key_two = moto.fixture(&["create-key", "tenant-two"]);
    let proxy = Proxy::start(moto.port);
    let pg = Cluster::start(&[]);
    let mut c = pg.connect();
    configure(&mut c, &kms_yaml(&key_a, &proxy.endpoint(), "testing", "testing"));
    c.batch_execute(
        "SELECT immuta_keyring_create('one', rollover_days => 1, kms_key => 'alias/tenant-one');
         SELECT immuta_keyring_create('two', kms_key => 'alias/tenant-two');",
    )
    .unwrap();
    let seal = |c: &mut postgres::Client, text: &str, keyring: &str| -> Vec<u8> {
        c.query_one("SELECT immuta_encrypt($1::text, keyring => $2::text)", &[&text, &keyring])
            .unwrap()
            .get(0)
    };
    let one_1 = seal(&mut c, "one 1", "one");
    let two_1 = seal(&mut c, "two 1", "two");
    let default = encrypt(&mut c, "default 1");
    // Tenant one's key is due (its keyring rolls over daily): the next encryption rolls it over,
    // under the tenant's KMS key; tenant two is rotated by hand, under its own.
    c.batch_execute(
        "UPDATE immuta.data_keys SET created_at = created_at - interval '2 days' WHERE keyring = 'one';
         SELECT immuta_rotate('two');",
    )
    .unwrap();
    let mut app = pg.connect();
    let one_2 = seal(&mut app, "one 2", "one");
    let two_2 = seal(&mut app, "two 2", "two");
    let keys = |c: &mut postgres::Client| -> Vec<(String, String, String, String)> {
        c.query("SELECT keyring, wrapping_key, state, coalesce(reason, '') FROM immuta.keys ORDER BY id", &[])
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect()
    };
    let listed = keys(&mut c);
    assert_eq!(listed.iter().filter(|k| k.0 == "one").count(), 2, "{listed:?}");
    for (keyring, key) in [("one", &key_one), ("two", &key_two), ("default", &key_a)] {
        assert!(listed.iter().filter(|k| k.0 == keyring).all(|k| &k.1 == key), "{keyring}: {listed:?}");
    }
    let one: Vec<(&str, &str)> =
        listed.iter().filter(|k| k.0 == "one").map(|k| (k.2.as_str(), k.3.as_str())).collect();
    assert_eq!((one[0].0, one[1]), ("decrypt-only", ("active", "schedule")), "{listed:?}");
    let newer: i64 = app.query_one("SELECT immuta_key_id($1)", &[&one_2]).unwrap().get(0);
    let older: i64 = app.query_one("SELECT immuta_key_id($1)", &[&one_1]).unwrap().get(0);
    assert!(newer > older);
    let mut fresh = pg.connect();
    for (value, text) in [(&one_1, "one 1"), (&one_2, "one 2"), (&two_1, "two 1"), (&two_2, "two 2")] {
        assert_eq!(decrypt(&mut fresh, value).unwrap(), text);
    }

    // Tenant one schedules its KMS key for deletion. immuta still holds its unwrapped keys (until
    // the cache's TTL, a reset or a restart); once they are gone, nothing of tenant one opens,
    // while tenant two, the configuration's keys and every later encryption there go on.
    proxy.schedule_deletion(&[&key_one, "alias/tenant-one"]);
    assert_eq!(decrypt(&mut fresh, &one_1).unwrap(), "one 1", "still cached");
    c.batch_execute("SELECT immuta_cache_reset()").unwrap();
    let mut after = pg.connect();
    for value in [&one_1, &one_2] {
        let failed = decrypt(&mut after, value);
        let text = error_text(decrypt(&mut after, value));
        assert_eq!(sqlstate(failed), "55000", "{text}");
        assert!(text.contains("KMSInvalidStateException") && text.contains("not usable"), "{text}");
    }
    assert_eq!(sqlstate(after.query_one("SELECT immuta_encrypt('x', keyring => 'one')", &[])), "55000");
    for (value, text) in [(&two_1, "two 1"), (&two_2, "two 2"), (&default, "default 1")] {
        assert_eq!(decrypt(&mut after, value).unwrap(), text);
    }
    let two_3 = seal(&mut after, "two 3", "two");
    assert_eq!(decrypt(&mut after, &two_3).unwrap(), "two 3");
    // immuta's own shredding of the keyring needs nothing of KMS: it erases the wrapped keys.
    let shredded: i32 =
        c.query_one("SELECT immuta_keyring_destroy('one', 'tenant left')", &[]).unwrap().get(0);
    assert_eq!(shredded, 2);
    assert_eq!(sqlstate(decrypt(&mut after, &one_2)), "42704");
    assert_eq!(decrypt(&mut after, &two_1).unwrap(), "two 1");
    only_encrypt_and_decrypt(&proxy);
}
