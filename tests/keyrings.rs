//! System tier: named keyrings (a keyring per tenant), key states and crypto-shredding, across
//! sessions, parallel workers, a streaming standby, pg_dump/restore and restarts.

mod support;

use std::time::{Duration, Instant};

use support::*;

const PRELOAD: &str = "shared_preload_libraries = 'immuta'";

/// A table `t` of `n` rows, row i under keyring `tenant_{i % keyrings}`, with its value
/// `secret i`.
fn tenants_table(c: &mut postgres::Client, keyrings: i32, n: i32) {
    c.batch_execute(&format!(
        "SELECT immuta_keyring_create('tenant_' || i) FROM generate_series(0, {keyrings} - 1) i;
         CREATE TABLE t (id int PRIMARY KEY, tenant text NOT NULL, v bytea);
         INSERT INTO t SELECT i, 'tenant_' || (i % {keyrings}), NULL FROM generate_series(1, {n}) i;
         UPDATE t SET v = immuta_encrypt('secret ' || id, keyring => tenant);"
    ))
    .unwrap();
}

fn json(c: &mut postgres::Client, query: &str) -> serde_json::Value {
    serde_json::from_str(&one::<String>(c, &format!("SELECT ({query})::text"))).unwrap()
}

/// `immuta_decrypt` of `value` given as a literal in the text of the statement: a statement
/// that locks no table. Run once before, it needs nothing PostgreSQL has not cached either, so
/// PostgreSQL has no occasion of its own to read invalidations during it.
fn literal_decrypt(value: &[u8]) -> String {
    let hex: String = value.iter().map(|b| format!("{b:02x}")).collect();
    format!("SELECT immuta_decrypt('\\x{hex}'::bytea)")
}

fn decrypting(c: &mut postgres::Client, filter: &str) -> i64 {
    one(c, &format!("SELECT count(*) FROM t WHERE {filter} AND immuta_decrypt(v) = 'secret ' || id"))
}

#[test]
fn each_keyring_has_its_own_keys_rollover_audit_and_status_and_a_typo_creates_nothing() {
    let pg = Cluster::start(&[]);
    let mut c = pg.connect();
    tenants_table(&mut c, 3, 30);
    // One key per keyring, no key shared between keyrings; decryption names no keyring.
    let pairs: i64 = one(&mut c, "SELECT count(DISTINCT (tenant, immuta_key_id(v))) FROM t");
    let keys: i64 = one(&mut c, "SELECT count(DISTINCT immuta_key_id(v)) FROM t");
    assert_eq!((pairs, keys), (3, 3));
    assert_eq!(decrypting(&mut c, "true"), 30);
    let keyring_of_keys: i64 = one(
        &mut c,
        "SELECT count(*) FROM t JOIN immuta.keys k ON k.id = immuta_key_id(t.v) WHERE k.keyring <> t.tenant",
    );
    assert_eq!(keyring_of_keys, 0, "immuta.keys names each key's keyring");

    // Every type and a context work under a keyring; a positional second text is a context.
    let typed: bool = one(
        &mut c,
        "SELECT immuta_decrypt(immuta_encrypt(42.5::numeric, 'row 1', keyring => 'tenant_1'), NULL::numeric, 'row 1') = 42.5",
    );
    assert!(typed);
    assert_eq!(sqlstate(c.query_one("SELECT immuta_decrypt(immuta_encrypt('x', 'ctx'))", &[])), "22023");
    let default_key: i64 = one(&mut c, "SELECT immuta_key_id(immuta_encrypt('d', keyring => 'default'))");
    let plain_key: i64 = one(&mut c, "SELECT immuta_key_id(immuta_encrypt('d'))");
    assert_eq!(default_key, plain_key, "'default' is the keyring of values encrypted without one");

    // A typo is an error, and creates nothing.
    assert_eq!(sqlstate(c.query_one("SELECT immuta_encrypt('x', keyring => 'tenant_9')", &[])), "42704");
    assert_eq!(sqlstate(c.query_one("SELECT immuta_encrypt('x', keyring => 'no such; DROP')", &[])), "22023");
    assert_eq!(sqlstate(c.query_one("SELECT immuta_encrypt('x', keyring => NULL)", &[])), "22004");
    assert_eq!(one::<i64>(&mut c, "SELECT count(*) FROM immuta.keyrings"), 3);

    // Rollover per keyring: tenant_0 rolls over daily; its key is made two days old.
    c.batch_execute(
        "SELECT immuta_keyring_configure('tenant_0', rollover_days => 1);
         UPDATE immuta.data_keys SET created_at = created_at - interval '2 days' WHERE keyring IN ('tenant_0', 'tenant_1');",
    )
    .unwrap();
    let mut fresh = pg.connect();
    let before: i64 = one(&mut fresh, "SELECT max(id) FROM immuta.data_keys WHERE keyring = 'tenant_0'");
    let after: i64 = one(&mut fresh, "SELECT immuta_key_id(immuta_encrypt('new', keyring => 'tenant_0'))");
    assert!(after > before, "a due key of a daily keyring rolls over at its next encryption");
    let t1: i64 = one(&mut fresh, "SELECT immuta_key_id(immuta_encrypt('new', keyring => 'tenant_1'))");
    let t1_first: i64 = one(&mut fresh, "SELECT min(id) FROM immuta.data_keys WHERE keyring = 'tenant_1'");
    assert_eq!(t1, t1_first, "a keyring on the configuration's yearly length does not");
    let reason: String = one(&mut fresh, &format!("SELECT reason FROM immuta.keys WHERE id = {after}"));
    assert_eq!(reason, "schedule");
    // The scheduled job rolls over what is due, per keyring.
    c.batch_execute(
        "UPDATE immuta.data_keys SET created_at = created_at - interval '2 days' WHERE keyring = 'tenant_0'",
    )
    .unwrap();
    let rolled: Option<i64> = one(&mut c, "SELECT immuta_rotate_if_due()");
    assert!(rolled.is_some_and(|id| id > after));
    assert_eq!(one::<Option<i64>>(&mut c, "SELECT immuta_rotate_if_due()"), None, "nothing else is due");

    // Status and audit per keyring.
    let status = json(&mut c, "SELECT immuta_status('tenant_0')");
    assert_eq!(status["keyring"], "tenant_0");
    assert_eq!(status["rollover_length_days"], 1);
    assert_eq!(status["keys"]["total"], 3);
    assert_eq!(status["current_key"]["id"], rolled.unwrap());
    let audited: i64 = one(
        &mut c,
        "SELECT count(*) FROM immuta.audit_log WHERE keyring = 'tenant_0' AND event IN ('keyring created', 'keyring configured', 'key created', 'key rotated')",
    );
    assert_eq!(audited, 5);
    assert_eq!(sqlstate(c.query_one("SELECT immuta_status('nope')", &[])), "42704");
    assert_eq!(sqlstate(c.execute("SELECT immuta_keyring_create('tenant_0')", &[])), "42710");
    assert_eq!(sqlstate(c.execute("SELECT immuta_keyring_create('default')", &[])), "42710");
    assert_eq!(sqlstate(c.execute("SELECT immuta_keyring_create('x', rollover_days => 0)", &[])), "22023");
}

/// More keyrings than a backend keeps (`KeyRing::DEFAULT_CAPACITY`, 16,384 keys and as many
/// keyrings' entries): 10,000 is the scale the issue names, and past the bound the backend must
/// evict and still encrypt and decrypt everything.
const MANY_KEYRINGS: i32 = 17_000;

#[test]
fn ten_thousand_keyrings_and_more_encrypt_a_table_whose_rows_belong_to_all_of_them_through_bounded_caches() {
    // A shared cache far smaller than the keyrings: it must evict, and everything still works.
    let pg = Cluster::start(&[PRELOAD, "immuta.shared_cache_keys = 256"]);
    let mut c = pg.connect();
    tenants_table(&mut c, MANY_KEYRINGS, 2 * MANY_KEYRINGS);
    let distinct = "SELECT count(DISTINCT immuta_key_id(v)) FROM t";
    assert_eq!(one::<i64>(&mut c, distinct), i64::from(MANY_KEYRINGS));
    // A second pass in the same session: every keyring is met again, in turn, with the backend's
    // bound passed; nothing rolls over.
    c.batch_execute("UPDATE t SET v = immuta_encrypt('secret ' || id, keyring => tenant)").unwrap();
    assert_eq!(one::<i64>(&mut c, distinct), i64::from(MANY_KEYRINGS), "no rollover");
    let held =
        |c: &mut postgres::Client| json(c, "SELECT immuta_cache_stats()")["backend_keys"].as_i64().unwrap();
    assert!(held(&mut c) <= 16_384, "the backend's bound holds: {}", held(&mut c));
    // A fresh session decrypts every row, loading the keys through the shared cache.
    let mut fresh = pg.connect();
    assert_eq!(decrypting(&mut fresh, "true"), 2 * i64::from(MANY_KEYRINGS));
    let stats = json(&mut fresh, "SELECT immuta_cache_stats()");
    assert!(stats["evictions"].as_i64().unwrap() > 0, "{stats}");
    assert!(stats["entries"].as_i64().unwrap() <= 256, "{stats}");
    assert!(stats["backend_keys"].as_i64().unwrap() <= 16_384, "{stats}");
    let keys: i64 = one(&mut c, "SELECT count(*) FROM immuta.keys WHERE state = 'active'");
    assert_eq!(keys, i64::from(MANY_KEYRINGS), "one active key per keyring");
}

#[test]
fn a_change_to_one_keyring_reaches_another_session_which_keeps_the_other_keyrings_it_loaded() {
    let pg = Cluster::start(&[]);
    let mut admin = pg.connect();
    tenants_table(&mut admin, 4, 40);
    let mut app = pg.connect();
    let key = |c: &mut postgres::Client, keyring: &str| -> i64 {
        one(c, &format!("SELECT immuta_key_id(immuta_encrypt('x', keyring => '{keyring}'))"))
    };
    let before: Vec<i64> = (0..4).map(|i| key(&mut app, &format!("tenant_{i}"))).collect();
    // Another session rotates tenant_1, makes tenant_2 roll over daily with a key two days old,
    // destroys tenant_3 and creates tenant_9; tenant_0 is left alone.
    admin
        .batch_execute(
            "SELECT immuta_rotate('tenant_1');
             UPDATE immuta.data_keys SET created_at = created_at - interval '2 days' WHERE keyring = 'tenant_2';
             SELECT immuta_keyring_configure('tenant_2', rollover_days => 1);
             SELECT immuta_keyring_destroy('tenant_3', 'customer left');
             SELECT immuta_keyring_create('tenant_9');",
        )
        .unwrap();
    let rotated: i64 = one(&mut admin, "SELECT max(id) FROM immuta.data_keys WHERE keyring = 'tenant_1'");
    assert_eq!(key(&mut app, "tenant_0"), before[0], "unchanged");
    assert_eq!(key(&mut app, "tenant_1"), rotated, "the rotation is seen");
    assert!(key(&mut app, "tenant_2") > before[2], "the new rollover length is seen");
    assert_eq!(sqlstate(app.query_one("SELECT immuta_encrypt('x', keyring => 'tenant_3')", &[])), "55000");
    assert!(key(&mut app, "tenant_9") > rotated, "a keyring created since works");
    // A new rollover length in the configuration reaches every keyring without its own.
    admin
        .batch_execute(
            "UPDATE immuta.data_keys SET created_at = created_at - interval '2 days' WHERE keyring = 'tenant_0';
             SELECT immuta_configure('schedule:\n  dataKeyRollOverLength: 1\n');",
        )
        .unwrap();
    assert!(key(&mut app, "tenant_0") > before[0], "the configuration's rollover is seen");
    assert_eq!(decrypting(&mut app, "tenant <> 'tenant_3'"), 30);

    // Within one transaction, without preload (no shared cache to tell): a key disabled
    // meanwhile stops at the session's next statement, even one that locks no table (which
    // PostgreSQL would give no occasion to read the invalidation).
    let value: Vec<u8> = one(&mut admin, "SELECT v FROM t WHERE tenant = 'tenant_0' LIMIT 1");
    let old: i64 = one(&mut admin, "SELECT min(immuta_key_id(v)) FROM t WHERE tenant = 'tenant_0'");
    app.batch_execute("BEGIN").unwrap();
    assert_eq!(decrypting(&mut app, "tenant = 'tenant_0'"), 10);
    app.simple_query(&literal_decrypt(&value)).unwrap();
    assert!(one::<bool>(&mut admin, &format!("SELECT immuta_key_disable({old}, 'suspected leak')")));
    assert_eq!(sqlstate(app.simple_query(&literal_decrypt(&value))), "55000");
    app.batch_execute("ROLLBACK").unwrap();

    // Several statements sent in one string (one protocol message, one statement timestamp):
    // a disable that commits while the string waits on an advisory lock, which reads no
    // invalidation, stops the string's next call.
    assert!(one::<bool>(&mut admin, &format!("SELECT immuta_key_enable({old}, 'check')")));
    admin.batch_execute("SELECT pg_advisory_lock(4242)").unwrap();
    let literal = literal_decrypt(&value);
    let string = format!("BEGIN; {literal}; SELECT pg_advisory_lock(4242); {literal}; COMMIT");
    let waiter = std::thread::spawn(move || sqlstate(app.batch_execute(&string)));
    wait_until(
        &mut admin,
        "SELECT count(*) = 1 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
        "the string waits on the advisory lock",
    );
    assert!(one::<bool>(&mut admin, &format!("SELECT immuta_key_disable({old}, 'during the string')")));
    admin.batch_execute("SELECT pg_advisory_unlock(4242)").unwrap();
    assert_eq!(waiter.join().unwrap(), "55000");
}

/// Waits until `standby` has replayed the state `state` of key `key`.
fn wait_for_state(standby: &Cluster, key: i64, state: &str) {
    let start = Instant::now();
    let mut c = standby.connect();
    loop {
        let now: Option<String> = c
            .query_opt("SELECT state FROM immuta.data_keys WHERE id = $1", &[&key])
            .unwrap()
            .map(|r| r.get(0));
        if now.as_deref() == Some(state) {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "standby did not replay\n{}", standby.log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn shared_entries(c: &mut postgres::Client) -> i64 {
    one(c, "SELECT (immuta_cache_stats()->>'entries')::int8")
}

#[test]
fn disabling_and_destroying_reach_every_session_a_parallel_query_and_a_standby() {
    let primary = Cluster::start(&[PRELOAD]);
    let mut admin = primary.connect();
    tenants_table(&mut admin, 2, 2_000);
    let old: i64 = one(&mut admin, "SELECT max(id) FROM immuta.data_keys WHERE keyring = 'tenant_0'");
    admin.batch_execute("SELECT immuta_rotate('tenant_0')").unwrap();
    let standby = primary.start_standby();
    let mut replica = standby.connect();
    let mut reader = primary.connect();
    let parallel = "SET max_parallel_workers_per_gather = 2; SET parallel_setup_cost = 0; \
                    SET parallel_tuple_cost = 0; SET min_parallel_table_scan_size = 0; SET parallel_leader_participation = off";
    reader.batch_execute(parallel).unwrap();
    let plan: String = reader
        .query("EXPLAIN SELECT count(*) FROM t WHERE immuta_decrypt(v) IS NOT NULL", &[])
        .unwrap()
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(plan.contains("Gather"), "{plan}");
    let all = "SELECT count(*) FROM t WHERE immuta_decrypt(v) = 'secret ' || id";
    assert_eq!(one::<i64>(&mut reader, all), 2_000, "the reader and its workers hold the keys");
    assert_eq!(decrypting(&mut replica, "true"), 2_000);
    let entries = shared_entries(&mut admin);

    // Disabled: every session fails at its next statement with 55000; the value is intact.
    assert!(one::<bool>(&mut admin, &format!("SELECT immuta_key_disable({old}, 'suspected leak')")));
    assert_eq!(sqlstate(reader.query_one(all, &[])), "55000");
    assert_eq!(decrypting(&mut reader, "tenant = 'tenant_1'"), 1_000, "other keyrings are untouched");
    wait_for_state(&standby, old, "disabled");
    assert_eq!(sqlstate(replica.query_one(all, &[])), "55000");
    assert_eq!(shared_entries(&mut admin), entries - 1, "the shared copy was dropped at commit");
    let state: String = one(&mut admin, &format!("SELECT state FROM immuta.keys WHERE id = {old}"));
    assert_eq!(state, "disabled");

    // A parallel worker of a REPEATABLE READ transaction whose snapshot predates the change
    // does not unwrap the key from the old row version.
    let mut old_snapshot = primary.connect();
    old_snapshot.batch_execute(parallel).unwrap();
    assert!(one::<bool>(&mut admin, &format!("SELECT immuta_key_enable({old}, 'check')")));
    old_snapshot.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM t").unwrap();
    assert!(one::<bool>(&mut admin, &format!("SELECT immuta_key_disable({old}, 'again')")));
    assert_eq!(sqlstate(old_snapshot.query_one(all, &[])), "55000");
    old_snapshot.batch_execute("ROLLBACK").unwrap();

    // Within one transaction: a key the session holds stops at its next statement (preloaded).
    assert!(one::<bool>(&mut admin, &format!("SELECT immuta_key_enable({old}, 'check')")));
    let mut long = primary.connect();
    long.batch_execute("BEGIN").unwrap();
    assert_eq!(decrypting(&mut long, "tenant = 'tenant_0'"), 1_000);
    assert!(one::<bool>(&mut admin, &format!("SELECT immuta_key_disable({old}, 'again')")));
    assert_eq!(sqlstate(long.query_one(all, &[])), "55000");
    long.batch_execute("ROLLBACK").unwrap();

    // The same on the standby, where the change arrives by the replay of its commit: the
    // primary's shared cache is not the standby's.
    assert!(one::<bool>(&mut admin, &format!("SELECT immuta_key_enable({old}, 'check')")));
    wait_for_state(&standby, old, "enabled");
    let value: Vec<u8> = one(&mut admin, &format!("SELECT v FROM t WHERE immuta_key_id(v) = {old} LIMIT 1"));
    let mut long_replica = standby.connect();
    long_replica.batch_execute("BEGIN").unwrap();
    assert_eq!(decrypting(&mut long_replica, "tenant = 'tenant_0'"), 1_000);
    long_replica.simple_query(&literal_decrypt(&value)).unwrap();
    assert!(one::<bool>(&mut admin, &format!("SELECT immuta_key_disable({old}, 'again')")));
    wait_for_state(&standby, old, "disabled");
    // A statement that locks no table, as above.
    assert_eq!(sqlstate(long_replica.simple_query(&literal_decrypt(&value))), "55000");
    long_replica.batch_execute("ROLLBACK").unwrap();

    // Enabled again: everything decrypts, here and on the standby.
    assert!(one::<bool>(&mut admin, &format!("SELECT immuta_key_enable({old}, 'false alarm')")));
    assert_eq!(one::<i64>(&mut reader, all), 2_000);
    wait_for_state(&standby, old, "enabled");
    assert_eq!(decrypting(&mut replica, "true"), 2_000);

    // A transaction that encrypted under a key another session disables and destroys before it
    // commits does not commit values nobody can decrypt: its commit fails with 40001.
    let current: i64 = one(&mut admin, "SELECT max(id) FROM immuta.data_keys WHERE keyring = 'tenant_1'");
    let mut writer = primary.connect();
    writer
        .batch_execute(
            "BEGIN; CREATE TABLE late (id int, v bytea);
             INSERT INTO late SELECT i, immuta_encrypt('late ' || i, keyring => 'tenant_1') FROM generate_series(1, 10) i",
        )
        .unwrap();
    admin
        .batch_execute(&format!(
            "BEGIN; SELECT immuta_rotate('tenant_1'); SELECT immuta_key_disable({current}, 'r'); \
             SELECT immuta_key_destroy({current}, 'r'); COMMIT"
        ))
        .unwrap();
    assert_eq!(sqlstate(writer.batch_execute("COMMIT")), "40001");
    let orphans: i64 = one(&mut admin, "SELECT count(*) FROM pg_class WHERE relname = 'late'");
    assert_eq!(orphans, 0, "nothing was stored");
    assert_eq!(
        sqlstate(reader.query_one("SELECT count(immuta_decrypt(v)) FROM t WHERE tenant = 'tenant_1'", &[])),
        "42704",
        "the values under the destroyed key are gone, as asked"
    );
    let renewed: bool = one(
        &mut reader,
        "SELECT immuta_decrypt(immuta_encrypt('renewed', keyring => 'tenant_1')) = 'renewed'",
    );
    assert!(renewed, "the keyring encrypts under its new key");

    // Destroyed: 42704 for good, the wrapped key erased, on the standby too.
    admin
        .batch_execute(&format!(
            "SELECT immuta_key_disable({old}, 'retire'); SELECT immuta_key_destroy({old}, 'retire')"
        ))
        .unwrap();
    assert_eq!(sqlstate(reader.query_one(all, &[])), "42704");
    let erased: bool =
        one(&mut admin, &format!("SELECT wrapped_key IS NULL FROM immuta.data_keys WHERE id = {old}"));
    assert!(erased);
    wait_for_state(&standby, old, "destroyed");
    assert_eq!(
        sqlstate(replica.query_one("SELECT count(immuta_decrypt(v)) FROM t WHERE tenant = 'tenant_0'", &[])),
        "42704"
    );
    // New values under the keyring use its new key and decrypt.
    let fresh: bool =
        one(&mut reader, "SELECT immuta_decrypt(immuta_encrypt('after', keyring => 'tenant_0')) = 'after'");
    assert!(fresh);
    let audit: Vec<(String, String)> = admin
        .query(
            "SELECT event, detail->>'reason' FROM immuta.audit_log WHERE key_id = $1 AND event IN ('key disabled', 'key enabled', 'key destroyed') ORDER BY id",
            &[&old],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let events: Vec<(&str, &str)> = audit.iter().map(|(e, r)| (e.as_str(), r.as_str())).collect();
    assert_eq!(
        events,
        [
            ("key disabled", "suspected leak"),
            ("key enabled", "check"),
            ("key disabled", "again"),
            ("key enabled", "check"),
            ("key disabled", "again"),
            ("key enabled", "check"),
            ("key disabled", "again"),
            ("key enabled", "false alarm"),
            ("key disabled", "retire"),
            ("key destroyed", "retire")
        ]
    );
}

#[test]
fn forbidden_transitions_are_refused_with_their_sqlstates_and_only_the_admin_changes_states() {
    let pg = Cluster::start(&[]);
    let mut c = pg.connect();
    tenants_table(&mut c, 1, 10);
    let first: i64 = one(&mut c, "SELECT max(id) FROM immuta.data_keys WHERE keyring = 'tenant_0'");
    let refused =
        |c: &mut postgres::Client, call: &str| sqlstate(c.query_one(&format!("SELECT {call}"), &[]));
    assert_eq!(refused(&mut c, &format!("immuta_key_disable({first}, 'r')")), "55000", "the active key");
    assert_eq!(refused(&mut c, &format!("immuta_key_destroy({first}, 'r')")), "55000", "the active key");
    c.batch_execute("SELECT immuta_rotate('tenant_0')").unwrap();
    assert_eq!(refused(&mut c, &format!("immuta_key_destroy({first}, 'r')")), "55000", "not disabled first");
    assert_eq!(refused(&mut c, &format!("immuta_key_disable({first}, NULL)")), "22004");
    assert_eq!(refused(&mut c, &format!("immuta_key_disable({first}, '   ')")), "22023");
    assert_eq!(refused(&mut c, &format!("immuta_key_disable({first}, repeat('x', 1001))")), "22023");
    assert_eq!(refused(&mut c, "immuta_key_disable(999, 'r')"), "42704");
    assert!(one::<bool>(&mut c, &format!("SELECT immuta_key_disable({first}, 'r')")));
    assert!(!one::<bool>(&mut c, &format!("SELECT immuta_key_disable({first}, 'r')")), "already disabled");
    assert!(one::<bool>(&mut c, &format!("SELECT immuta_key_destroy({first}, 'r')")));
    assert_eq!(
        refused(&mut c, &format!("immuta_key_enable({first}, 'r')")),
        "55000",
        "nothing leaves destroyed"
    );
    assert_eq!(refused(&mut c, &format!("immuta_key_disable({first}, 'r')")), "55000");
    assert!(!one::<bool>(&mut c, &format!("SELECT immuta_key_destroy({first}, 'r')")));
    assert_eq!(refused(&mut c, "immuta_keyring_destroy('default', 'r')"), "0A000");
    assert_eq!(refused(&mut c, "immuta_keyring_destroy('nope', 'r')"), "42704");
    let default_key: i64 = one(&mut c, "SELECT immuta_key_id(immuta_encrypt('d'))");
    assert_eq!(
        refused(&mut c, &format!("immuta_disable_keys_before('tenant_0', {default_key}, 'r')")),
        "22023"
    );

    // Vault's min_decryption_version: every older key of the keyring at once.
    c.batch_execute("SELECT immuta_rotate('tenant_0'); SELECT immuta_rotate('tenant_0')").unwrap();
    let newest: i64 = one(&mut c, "SELECT max(id) FROM immuta.data_keys WHERE keyring = 'tenant_0'");
    let disabled: i32 = one(
        &mut c,
        &format!("SELECT immuta_disable_keys_before('tenant_0', {newest}, 'only the newest decrypts')"),
    );
    assert_eq!(disabled, 2, "the two older enabled keys (the destroyed one stays destroyed)");

    // Only immuta_admin changes states; the encryptor and decryptor cannot.
    c.batch_execute(
        "CREATE ROLE enc LOGIN IN ROLE immuta_encryptor; CREATE ROLE adm LOGIN IN ROLE immuta_admin;
         GRANT SELECT ON t TO enc;",
    )
    .unwrap();
    let mut enc = pg.connect_as("enc", "postgres");
    assert_eq!(refused(&mut enc, &format!("immuta_key_enable({newest}, 'r')")), "42501");
    assert_eq!(refused(&mut enc, "immuta_keyring_create('mine')"), "42501");
    assert_eq!(refused(&mut enc, "immuta_keyring_destroy('tenant_0', 'r')"), "42501");
    let mut adm = pg.connect_as("adm", "postgres");
    adm.batch_execute("SELECT immuta_keyring_create('by_admin')").unwrap();
    let by: String = one(&mut adm, "SELECT created_by FROM immuta.keyrings WHERE name = 'by_admin'");
    assert_eq!(by, "adm");
    // A KMS key reached with the server's own identity is a superuser's choice.
    assert_eq!(
        refused(
            &mut adm,
            "immuta_keyring_create('byok', kms_key => 'alias/tenant', kms_region => 'us-east-1')"
        ),
        "42501"
    );

    // The commit-time check of the keys a transaction used does not trip over a transaction that
    // dropped the extension after encrypting.
    c.batch_execute("DROP TABLE t").unwrap();
    c.batch_execute(
        "BEGIN; SELECT immuta_encrypt('x', keyring => 'tenant_0'); DROP EXTENSION immuta; COMMIT",
    )
    .unwrap();
}

#[test]
fn a_shredded_keyring_survives_nothing_rewrap_dump_restore_or_restart_while_other_keyrings_work() {
    let source = Cluster::start(&[PRELOAD]);
    let mut c = source.connect();
    tenants_table(&mut c, 2, 200);
    c.batch_execute("SELECT immuta_rotate('tenant_0')").unwrap();
    c.batch_execute("UPDATE t SET v = immuta_encrypt('secret ' || id, keyring => tenant) WHERE id % 4 = 0")
        .unwrap();
    let wrapped: Vec<String> = c
        .query("SELECT encode(wrapped_key, 'hex') FROM immuta.data_keys WHERE keyring = 'tenant_0'", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(wrapped.len(), 2);
    let destroyed: i32 = one(&mut c, "SELECT immuta_keyring_destroy('tenant_0', 'customer left, ticket 42')");
    assert_eq!(destroyed, 2);
    assert_eq!(one::<i32>(&mut c, "SELECT immuta_keyring_destroy('tenant_0', 'again')"), 0);
    let shredded = "SELECT immuta_decrypt(v) FROM t WHERE tenant = 'tenant_0' LIMIT 1";
    assert_eq!(sqlstate(c.query_one(shredded, &[])), "42704");
    assert_eq!(sqlstate(c.query_one("SELECT immuta_encrypt('x', keyring => 'tenant_0')", &[])), "55000");
    assert_eq!(sqlstate(c.query_one("SELECT immuta_rotate('tenant_0')", &[])), "55000");
    assert_eq!(sqlstate(c.execute("SELECT immuta_keyring_create('tenant_0')", &[])), "42710");
    assert_eq!(decrypting(&mut c, "tenant = 'tenant_1'"), 100, "the other keyring keeps working");

    // A disabled key of another keyring stays disabled through all of what follows.
    c.batch_execute(
        "SELECT immuta_keyring_create('held');
         CREATE TABLE h AS SELECT immuta_encrypt('held', keyring => 'held') AS v;
         SELECT immuta_rotate('held');",
    )
    .unwrap();
    let held: i64 = one(&mut c, "SELECT immuta_key_id(v) FROM h");
    assert!(one::<bool>(&mut c, &format!("SELECT immuta_key_disable({held}, 'legal hold')")));
    let held_value = "SELECT immuta_decrypt(v) FROM h";
    assert_eq!(sqlstate(c.query_one(held_value, &[])), "55000");

    // A rewrap wraps what is left, and brings nothing back.
    c.batch_execute("SELECT immuta_rewrap()").unwrap();
    let left: i64 = one(
        &mut c,
        "SELECT count(*) FROM immuta.data_keys WHERE keyring = 'tenant_0' AND wrapped_key IS NOT NULL",
    );
    assert_eq!(left, 0);
    assert_eq!(decrypting(&mut c, "tenant = 'tenant_1'"), 100);

    // A restart brings nothing back either.
    source.restart();
    let mut c = source.connect();
    assert_eq!(sqlstate(c.query_one(shredded, &[])), "42704");
    assert_eq!(decrypting(&mut c, "tenant = 'tenant_1'"), 100);
    assert_eq!(sqlstate(c.query_one(held_value, &[])), "55000", "still disabled after a restart");

    // A dump taken now holds no trace of the key bytes; restored, the tombstones stay tombstones.
    let dump = source.root.join("shredded.sql");
    source.run_client("pg_dump", &["-d", "postgres", "-f", dump.to_str().unwrap()]);
    let text = std::fs::read_to_string(&dump).unwrap();
    for hex in &wrapped {
        assert!(!text.contains(hex.as_str()), "the dump holds a destroyed wrapped key");
    }
    let target = Cluster::init(Installation::under_test(), &[PRELOAD], &[]);
    let key = std::fs::read_to_string(source.master_key_file()).unwrap();
    target.write_file(&target.master_key_file(), &key, 0o600);
    target.start_server();
    target.connect().batch_execute("CREATE DATABASE app").unwrap();
    target.run_client(
        "psql",
        &["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", "app", "-f", dump.to_str().unwrap()],
    );
    let mut app = target.connect_to("app");
    assert_eq!(sqlstate(app.query_one(shredded, &[])), "42704");
    assert_eq!(decrypting(&mut app, "tenant = 'tenant_1'"), 100);
    assert_eq!(sqlstate(app.query_one("SELECT immuta_encrypt('x', keyring => 'tenant_0')", &[])), "55000");
    let states: Vec<String> = app
        .query("SELECT state FROM immuta.keys WHERE keyring = 'tenant_0'", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(states, ["destroyed", "destroyed"]);
    let reason: String =
        one(&mut app, "SELECT detail->>'reason' FROM immuta.audit_log WHERE event = 'keyring destroyed'");
    assert_eq!(reason, "customer left, ticket 42");
    // The disabled key came back disabled, and decrypts once enabled again.
    assert_eq!(sqlstate(app.query_one(held_value, &[])), "55000", "still disabled after a restore");
    assert!(one::<bool>(&mut app, &format!("SELECT immuta_key_enable({held}, 'hold lifted')")));
    assert_eq!(one::<String>(&mut app, held_value), "held");
}
