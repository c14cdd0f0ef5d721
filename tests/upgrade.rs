//! System tier: upgrades. `ALTER EXTENSION immuta UPDATE` from the frozen 0.1.0 on every version
//! under test, the upgraded objects against a fresh installation's, and `pg_upgrade` from the
//! version under test to newer ones (`IMMUTA_TEST_UPGRADE_TO`; the Makefile upgrades 15 to 16 and
//! to 18).

mod support;

use std::fs;
use std::path::PathBuf;

use support::kms::{kms_yaml, Moto};
use support::*;

/// The version the library builds, and the released versions before it.
const CURRENT: &str = "0.2.0";
const FIRST_RELEASE: &str = "0.1.0";

/// What a database holds that an upgrade must keep: each value with its plaintext, the audit
/// log, the keys with the encryptions counted for them (the usage rows; the view's count is a
/// bound that also covers reservations of running backends, see src/usage.rs).
#[derive(Clone)]
struct Snapshot {
    values: Vec<(Vec<u8>, String)>,
    audit: Vec<String>,
    keys: Vec<String>,
}

fn rows_as_text(c: &mut postgres::Client, query: &str) -> Vec<String> {
    c.query(query, &[]).unwrap().iter().map(|r| r.get::<_, String>(0)).collect()
}

/// The audit log's rows in the columns 0.1.0 had (later versions add columns, such as the
/// keyring, which the update fills).
fn audit_of(c: &mut postgres::Client) -> Vec<String> {
    rows_as_text(
        c,
        "SELECT (id, at, event, key_id, reason, role, session_role, detail)::text FROM immuta.audit_log ORDER BY id",
    )
}

fn keys_of(c: &mut postgres::Client) -> Vec<String> {
    rows_as_text(
        c,
        "SELECT concat_ws(' ', id, created_at, provider, wrapping_key, wrapping_region,
                          (SELECT sum(encryptions) FROM immuta.key_usage u WHERE u.key_id = k.id))
         FROM immuta.keys k ORDER BY id",
    )
}

/// Keys wrapped by the local master key and by AWS KMS (moto), values under each, rotations, a
/// configuration, and the roles granted to application roles.
fn fill(c: &mut postgres::Client, moto: &Moto, kms_key: &str) -> Snapshot {
    c.batch_execute(
        "CREATE ROLE app_writer LOGIN; GRANT immuta_encryptor TO app_writer;
         CREATE ROLE app_reader LOGIN; GRANT immuta_decryptor TO app_reader;
         CREATE ROLE keeper LOGIN; GRANT immuta_admin TO keeper;",
    )
    .unwrap();
    let mut values = Vec::new();
    for text in ["local 1", "local 2"] {
        values.push((encrypt(c, text), text.to_owned()));
    }
    c.execute("SELECT immuta_rotate()", &[]).unwrap();
    values.push((encrypt(c, "local after rotation"), "local after rotation".to_owned()));
    c.execute("SELECT immuta_configure($1)", &[&kms_yaml(kms_key, &moto.endpoint(), "testing", "testing")])
        .unwrap();
    c.execute("SELECT immuta_rotate()", &[]).unwrap();
    for text in ["kms 1", "kms 2", "kms 3"] {
        values.push((encrypt(c, text), text.to_owned()));
    }
    Snapshot { values, audit: audit_of(c), keys: keys_of(c) }
}

/// Every value decrypts, as the role that may, and the audit log and keys are as they were.
fn assert_kept(c: &mut postgres::Client, reader: &mut postgres::Client, before: &Snapshot) {
    for (ciphertext, text) in &before.values {
        assert_eq!(&decrypt(reader, ciphertext).unwrap(), text);
    }
    assert_eq!(audit_of(c), before.audit, "the audit log is intact");
    assert_eq!(keys_of(c), before.keys, "keys and their usage counts are intact");
}

/// The extension's objects as `pg_dump --binary-upgrade --schema-only` lists them (that mode
/// dumps every member of an extension, with its grants and comments), without the object ids,
/// sequence positions and transaction ids that differ between any two databases.
fn extension_objects(pg: &Cluster, dbname: &str) -> String {
    let dump = pg.run_client("pg_dump", &["--schema-only", "--binary-upgrade", "-d", dbname]);
    let text = String::from_utf8(dump).unwrap();
    let mut out = String::new();
    for line in text.lines() {
        if line.starts_with("SELECT pg_catalog.binary_upgrade_set_next_")
            || line.starts_with("SELECT pg_catalog.setval(")
            || line.starts_with("-- Dumped")
            || line.starts_with("SET relfrozenxid")
            || line.starts_with("WHERE oid = '")
            || line.starts_with("\\restrict")
            || line.starts_with("\\unrestrict")
        {
            continue;
        }
        out.push_str(&strip_oid_arrays(line));
        out.push('\n');
    }
    out
}

/// `binary_upgrade_create_empty_extension(..., '{16390,16401}', ...)` names its configuration
/// tables by oid; the names are compared through the tables themselves.
fn strip_oid_arrays(line: &str) -> String {
    if !line.contains("binary_upgrade_create_empty_extension") {
        return line.to_owned();
    }
    line.split('\'')
        .map(|part| {
            if part.starts_with('{') && part[1..].starts_with(|c: char| c.is_ascii_digit()) {
                "{oids}"
            } else {
                part
            }
        })
        .collect::<Vec<_>>()
        .join("'")
}

#[test]
fn the_update_chain_from_0_1_0_builds_exactly_the_objects_a_fresh_installation_has() {
    // The fresh installation runs the script pgrx generates from the code of this version; the
    // updated one runs the frozen 0.1.0 script and every upgrade script. A change to the SQL
    // surface that is not in the upgrade script of the version being built fails here.
    let pg = Cluster::init(Installation::under_test(), &[], &[]);
    pg.start_server();
    pg.create_database("fresh", None);
    pg.create_database("updated", None);
    pg.connect_to("fresh").batch_execute("CREATE EXTENSION immuta").unwrap();
    let mut updated = pg.connect_to("updated");
    updated.batch_execute(&format!("CREATE EXTENSION immuta VERSION '{FIRST_RELEASE}'")).unwrap();
    updated.batch_execute("ALTER EXTENSION immuta UPDATE").unwrap();
    let (fresh, updated) = (extension_objects(&pg, "fresh"), extension_objects(&pg, "updated"));
    if fresh != updated {
        let dir = std::env::temp_dir();
        fs::write(dir.join("immuta-objects-fresh.sql"), &fresh).unwrap();
        fs::write(dir.join("immuta-objects-updated.sql"), &updated).unwrap();
        panic!(
            "a fresh {CURRENT} and 0.1.0 updated to it differ; compare {0}/immuta-objects-fresh.sql and \
             {0}/immuta-objects-updated.sql",
            dir.display()
        );
    }
    assert!(fresh.contains("immuta_rotation_job") && fresh.contains("CREATE TABLE immuta.data_keys"));
}

/// The library of the released 0.1.0, built for PostgreSQL 15 from its commit by the Makefile
/// (`IMMUTA_TEST_RELEASED_LIBRARY`). 0.1.0 was built for 15 only: on other versions, a 0.1.0
/// installation reaches them through pg_upgrade, which this test does too.
fn released_library(test: &str) -> Option<PathBuf> {
    let pg = Installation::under_test();
    let lib = std::env::var_os("IMMUTA_TEST_RELEASED_LIBRARY").map(PathBuf::from);
    match lib {
        Some(lib) if pg.major == 15 => Some(lib),
        _ if pg.major == 15 => panic!("IMMUTA_TEST_RELEASED_LIBRARY is not set (make test sets it)"),
        _ => {
            eprintln!("SKIPPED {test} on PostgreSQL {}: 0.1.0 was released for 15 only", pg.major);
            None
        }
    }
}

const PRELOADED: &[&str] = &["shared_preload_libraries = 'immuta'"];

/// A real deployment's life: 0.1.0's library and SQL on PostgreSQL 15, in use (local and KMS
/// keys, rotations, grants, a scheduled job, the shared cache); the new library installed;
/// `ALTER EXTENSION immuta UPDATE`; then pg_upgrade to each newer PostgreSQL under test.
#[test]
fn a_0_1_0_deployment_takes_the_new_library_the_update_and_pg_upgrade_to_newer_postgresql() {
    let test = "a_0_1_0_deployment_takes_the_new_library_the_update_and_pg_upgrade_to_newer_postgresql";
    let Some(released) = released_library(test) else { return };
    let moto = Moto::start(None);
    let kms_key = moto.fixture(&["create-key"]);

    // PostgreSQL 15 of our own, with 0.1.0's library in place of the current one.
    let installed = Installation::under_test();
    let copy_root = ScratchDir::new();
    let pg15 = installed.private_copy(copy_root.path());
    let library = pg15.pkglibdir().join("immuta.so");
    let current_library = fs::read(&library).unwrap();
    fs::copy(&released, &library).unwrap();
    let mut settings = vec!["shared_preload_libraries = 'immuta,pg_cron'", "cron.database_name = 'postgres'"];
    settings.push("cron.use_background_workers = on");
    let old = Cluster::init(pg15.clone(), &settings, &[]);
    old.start_server();
    let mut c = old.connect();
    c.batch_execute(&format!("CREATE EXTENSION immuta VERSION '{FIRST_RELEASE}'; CREATE EXTENSION pg_cron"))
        .unwrap();
    let before = fill(&mut c, &moto, &kms_key);
    let job: i64 = c.query_one("SELECT immuta_schedule_rotation()", &[]).unwrap().get(0);
    drop(c);

    // The new library, as a package upgrade installs it; the objects are still 0.1.0's.
    old.stop();
    fs::write(&library, &current_library).unwrap();
    old.start_server();
    let mut c = old.connect();
    let refused = c.query_one("SELECT immuta_decrypt($1)", &[&before.values[0].0]);
    let text = error_text(c.query_one("SELECT immuta_decrypt($1)", &[&before.values[0].0]));
    assert_eq!(sqlstate(refused), "55000");
    assert!(text.contains("ALTER EXTENSION immuta UPDATE") && text.contains(FIRST_RELEASE), "{text}");

    c.batch_execute("ALTER EXTENSION immuta UPDATE").unwrap();
    let version: String =
        c.query_one("SELECT extversion FROM pg_extension WHERE extname = 'immuta'", &[]).unwrap().get(0);
    assert_eq!(version, CURRENT);
    // The installation was in use: the restore window stays closed after the update, before
    // immuta wrote anything.
    c.batch_execute(
        "CREATE ROLE restorer LOGIN; GRANT USAGE ON SCHEMA immuta TO restorer;
         GRANT INSERT ON immuta.audit_log TO restorer",
    )
    .unwrap();
    let planted = old.connect_as("restorer", "postgres").execute(
        "INSERT INTO immuta.audit_log (id, event, key_id, reason) VALUES (1000, 'key created', 99, 'manual')",
        &[],
    );
    assert_eq!(sqlstate(planted), "42501", "a row added directly to a used installation is refused");
    let mut reader = old.connect_as("app_reader", "postgres");
    assert_kept(&mut c, &mut reader, &before);
    // The roles and their grants: the writer encrypts, the reader decrypts, neither does the other.
    let mut writer = old.connect_as("app_writer", "postgres");
    let written = encrypt(&mut writer, "written after the update");
    assert_eq!(decrypt(&mut reader, &written).unwrap(), "written after the update");
    assert_eq!(sqlstate(decrypt(&mut writer, &written)), "42501");
    assert_eq!(sqlstate(reader.query_one("SELECT immuta_encrypt('x')", &[])), "42501");
    // What 0.2.0 added works for the admin role granted under 0.1.0.
    let mut keeper = old.connect_as("keeper", "postgres");
    keeper
        .batch_execute("SELECT immuta_cache_reset(false); SELECT pg_catalog.immuta_rotation_job()")
        .unwrap();
    // The update vouches for nothing: 0.1.0 cannot tell its own rows from planted ones, and the
    // stored configuration is not taken for a superuser's until one stores it again. (The values
    // above decrypted anyway: the configuration gives explicit credentials.) A superuser vouches.
    let vouched = |c: &mut postgres::Client| -> Vec<bool> {
        c.query("SELECT server_identity FROM immuta.keys", &[]).unwrap().iter().map(|r| r.get(0)).collect()
    };
    assert_eq!(vouched(&mut c), vec![false; before.keys.len()]);
    let by_superuser: bool = c.query_one("SELECT by_superuser FROM immuta.config", &[]).unwrap().get(0);
    assert!(!by_superuser);
    c.batch_execute("UPDATE immuta.data_keys SET server_identity = true").unwrap();
    assert_eq!(vouched(&mut c), vec![true; before.keys.len()]);
    // The job 0.1.0 scheduled is reported as outdated until it is scheduled again.
    let status: serde_json::Value = c
        .query_one("SELECT immuta_status()::text", &[])
        .map(|r| serde_json::from_str(r.get::<_, &str>(0)).unwrap())
        .unwrap();
    assert!(status.to_string().contains("outdated"), "{status}");
    let again: i64 = c.query_one("SELECT immuta_schedule_rotation()", &[]).unwrap().get(0);
    assert_eq!(again, job, "the same job, with the new command");
    let command: String =
        c.query_one("SELECT command FROM cron.job WHERE jobid = $1", &[&again]).unwrap().get(0);
    assert_eq!(command, "SELECT pg_catalog.immuta_rotation_job()");
    // Every key of 0.1.0 is an enabled key of the keyring `default`, and its events are the
    // keyring's; keyrings work after the update.
    let outside: i64 = c
        .query_one(
            "SELECT (SELECT count(*) FROM immuta.keys WHERE keyring <> 'default' OR state NOT IN ('active', 'decrypt-only'))
                  + (SELECT count(*) FROM immuta.audit_log WHERE key_id IS NOT NULL AND keyring IS DISTINCT FROM 'default')",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(outside, 0);
    let rotated: i64 = c.query_one("SELECT immuta_rotate()", &[]).unwrap().get(0);
    assert_eq!(rotated, before.keys.len() as i64 + 1);
    c.batch_execute("SELECT immuta_keyring_create('after_update')").unwrap();
    let tenant: String = c
        .query_one("SELECT immuta_decrypt(immuta_encrypt('tenant value', keyring => 'after_update'))", &[])
        .unwrap()
        .get(0);
    assert_eq!(tenant, "tenant value");
    // A keyring shredded before pg_upgrade stays shredded after it.
    c.batch_execute(
        "SELECT immuta_keyring_create('shredded');
         CREATE TABLE shredded_values AS SELECT immuta_encrypt('gone', keyring => 'shredded') AS v;",
    )
    .unwrap();
    c.batch_execute("SELECT immuta_keyring_destroy('shredded', 'customer left')").unwrap();
    let mut values = before.values.clone();
    values.push((written, "written after the update".to_owned()));
    values.push((encrypt(&mut c, "under the newest key"), "under the newest key".to_owned()));
    let after_update = Snapshot { values, audit: audit_of(&mut c), keys: keys_of(&mut c) };
    // pg_cron is not in the other installations; pg_upgrade needs every library the old cluster
    // uses there.
    c.batch_execute("SELECT cron.unschedule(jobid) FROM cron.job; DROP EXTENSION pg_cron").unwrap();
    // Debian's PostgreSQL 15 on the test machine records an attribute option `pg_attver` on
    // every column it creates, which upstream 16 and 18 reject: pg_upgrade from it fails while
    // restoring the schema of any table, immuta's or not. A superuser clears the option first
    // (README, "Upgrading").
    c.batch_execute(
        "UPDATE pg_catalog.pg_attribute
         SET attoptions = (SELECT array_agg(o) FROM unnest(attoptions) o WHERE o NOT LIKE 'pg_attver=%')
         WHERE attrelid >= 16384 AND attoptions::text LIKE '%pg_attver=%'",
    )
    .unwrap();
    drop((c, reader, writer, keeper));
    old.stop();
    fs::write(old.data.join("postgresql.conf"), {
        let conf = fs::read_to_string(old.data.join("postgresql.conf")).unwrap();
        conf.replace("shared_preload_libraries = 'immuta,pg_cron'", "shared_preload_libraries = 'immuta'")
    })
    .unwrap();

    for target in Installation::upgrade_targets() {
        upgrade_with_pg_upgrade(&old, target, &after_update);
    }
}

/// pg_upgrade from the stopped cluster `old` to a new cluster of `target`, then what a DBA sees:
/// the master key file is missing there, the error names it, no database generates a new one;
/// copied over, every value decrypts, the ids, the audit log and rollover go on.
fn upgrade_with_pg_upgrade(old: &Cluster, target: Installation, before: &Snapshot) {
    let new = Cluster::init(target.clone(), PRELOADED, &[]);
    let out = as_postgres_in(
        &target,
        &new.root,
        "pg_upgrade",
        &[
            "-b",
            old.pg.bin.to_str().unwrap(),
            "-B",
            target.bin.to_str().unwrap(),
            "-d",
            old.data.to_str().unwrap(),
            "-D",
            new.data.to_str().unwrap(),
            "-s",
            new.root.to_str().unwrap(),
            "-p",
            "50432",
            "-P",
            "50433",
        ],
    );
    assert!(
        out.status.success(),
        "pg_upgrade to {} failed: {}{}",
        target.major,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let marker = fs::read_to_string(new.data.join("immuta_master_key.generated")).unwrap_or_default();
    assert!(marker.contains("pg_upgrade"), "pg_upgrade left a marker: {marker:?}");
    new.start_server();
    let mut c = new.connect();
    let (local_value, _) = &before.values[0];
    let text = error_text(decrypt(&mut c, local_value));
    assert_eq!(sqlstate(decrypt(&mut c, local_value)), "58P01", "{text}");
    assert!(text.contains("immuta_master.key") && text.contains("old data directory"), "{text}");
    // A database without keys would generate a master key; it must not.
    c.batch_execute("CREATE DATABASE other").unwrap();
    let mut other = new.connect_to("other");
    other.batch_execute("CREATE EXTENSION immuta").unwrap();
    assert_eq!(sqlstate(other.query_one("SELECT immuta_encrypt('x')", &[])), "58P01");
    assert!(!new.master_key_file().exists(), "no master key generated over the carried-over keys");

    // What README tells the DBA to do: copy the file.
    let key = fs::read_to_string(old.master_key_file()).unwrap();
    new.write_file(&new.master_key_file(), &key, 0o600);
    let mut reader = new.connect_as("app_reader", "postgres");
    assert_kept(&mut c, &mut reader, before);
    let next: i64 = c.query_one("SELECT immuta_rotate()", &[]).unwrap().get(0);
    assert_eq!(next, before.keys.len() as i64 + 1, "new keys continue the ids on {}", target.major);
    let fresh = encrypt(&mut c, "on the new cluster");
    assert_eq!(decrypt(&mut reader, &fresh).unwrap(), "on the new cluster");
    let audit = audit_of(&mut c);
    assert_eq!(&audit[..before.audit.len()], &before.audit[..]);
    assert!(audit.last().unwrap().contains("key rotated"), "the audit log goes on: {:?}", audit.last());
    // Rollover by age goes on too.
    c.batch_execute("UPDATE immuta.data_keys SET created_at = created_at - interval '400 days'").unwrap();
    let rolled: Option<i64> = c.query_one("SELECT immuta_rotate_if_due()", &[]).unwrap().get(0);
    assert_eq!(rolled, Some(next + 2), "both keyrings, default and after_update, roll over");
    let by_schedule: i64 = c
        .query_one("SELECT count(DISTINCT keyring) FROM immuta.keys WHERE reason = 'schedule'", &[])
        .unwrap()
        .get(0);
    assert_eq!(by_schedule, 2);
    // The keyring shredded before the upgrade: tombstones only, its values gone for good.
    let shredded: (i64, i64) = c
        .query_one(
            "SELECT count(*) FILTER (WHERE k.state = 'destroyed'), count(d.wrapped_key)
             FROM immuta.keys k JOIN immuta.data_keys d USING (id) WHERE k.keyring = 'shredded'",
            &[],
        )
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(shredded, (1, 0), "one tombstone, no wrapped key");
    assert_eq!(sqlstate(c.query_one("SELECT immuta_decrypt(v) FROM shredded_values", &[])), "42704");
    assert_eq!(sqlstate(c.query_one("SELECT immuta_encrypt('x', keyring => 'shredded')", &[])), "55000");
    let stats: String = c.query_one("SELECT immuta_cache_stats()::text", &[]).unwrap().get(0);
    assert!(stats.contains("\"mode\": \"shared\""), "the shared cache serves the new cluster: {stats}");
    other.batch_execute("SELECT immuta_encrypt('now it may')").unwrap();
}
