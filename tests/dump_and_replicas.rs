//! Nothing is lost across pg_dump / restore and physical replication: the keys, their sequence,
//! the configuration (without credentials) come along; a standby decrypts everything, follows
//! rotations, and never writes.

mod support;

use std::time::{Duration, Instant};

use support::*;

const CREDENTIALS_YAML: &str = "plugins:
  awsKms:
    plugin: awsKms
    isKms: false
    keyId: alias/unused
    region: us-east-1
    extraKmsConfig:
      credentials:
        accessKeyId: AKIADUMPTEST0000000
        secretAccessKey: dump-secret-never-in-a-dump-0123456789
";

/// A database `app` with 100 values under three keys and a stored configuration.
fn populated(pg: &Cluster) -> postgres::Client {
    pg.connect().batch_execute("CREATE DATABASE app").unwrap();
    let mut app = pg.connect_to("app");
    app.batch_execute(
        "CREATE EXTENSION immuta;
         CREATE TABLE people (id int PRIMARY KEY, ssn bytea);
         INSERT INTO people SELECT i, immuta_encrypt('ssn ' || i) FROM generate_series(1, 40) i;
         SELECT immuta_rotate();
         INSERT INTO people SELECT i, immuta_encrypt('ssn ' || i) FROM generate_series(41, 70) i;
         SELECT immuta_rotate();
         INSERT INTO people SELECT i, immuta_encrypt('ssn ' || i) FROM generate_series(71, 100) i;
         SELECT immuta_configure('schedule: {dataKeyRollOverLength: 90}');",
    )
    .unwrap();
    app
}

fn all_decrypt(c: &mut postgres::Client) -> i64 {
    c.query_one("SELECT count(*) FROM people WHERE immuta_decrypt(ssn) = 'ssn ' || id", &[]).unwrap().get(0)
}

/// `pg_dump` of `app` as plain SQL, restored with psql into a new database `app` of `target`.
fn dump_and_restore(source: &Cluster, target: &Cluster) -> Vec<u8> {
    let dump = source.root.join("app.sql");
    source.run_client("pg_dump", &["-d", "app", "-f", dump.to_str().unwrap()]);
    let text = std::fs::read(&dump).unwrap();
    target.connect().batch_execute("CREATE DATABASE app").unwrap();
    target.run_client(
        "psql",
        &["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", "app", "-f", dump.to_str().unwrap()],
    );
    text
}

#[test]
fn a_restored_database_decrypts_everything_and_continues_the_key_sequence() {
    let source = Cluster::start(&[]);
    populated(&source);
    let target = Cluster::start(&[]);
    // The target cluster has the same master key (copied as an operator would).
    let key = std::fs::read_to_string(source.master_key_file()).unwrap();
    target.write_file(&target.master_key_file(), &key, 0o600);
    let dump = dump_and_restore(&source, &target);
    assert!(String::from_utf8_lossy(&dump).contains("immuta.data_keys"), "the keys are in the dump");

    let mut app = target.connect_to("app");
    assert_eq!(all_decrypt(&mut app), 100);
    assert_eq!(encrypted_key_id(&mut app, "new"), 3, "new values use the restored current key");
    let next: i64 = app.query_one("SELECT immuta_rotate()", &[]).unwrap().get(0);
    assert_eq!(next, 4, "key ids continue after the restored ones");
    let days: i32 = app
        .query_one("SELECT (immuta_config()->'schedule'->>'dataKeyRollOverLength')::int", &[])
        .unwrap()
        .get(0);
    assert_eq!(days, 90, "the configuration came along");
    let audited: i64 = app
        .query_one("SELECT count(*) FROM immuta.audit_log WHERE event = 'key rotated'", &[])
        .unwrap()
        .get(0);
    assert_eq!(audited, 3, "the audit log came along (two rotations there, one here)");
    let counted: i64 = app.query_one("SELECT encryptions FROM immuta.keys WHERE id = 1", &[]).unwrap().get(0);
    assert!(counted >= 40, "usage counts came along: {counted}");
}

#[test]
fn a_database_owner_who_is_not_a_superuser_restores_a_dump_with_pg_restore() {
    let source = Cluster::start(&[]);
    populated(&source);
    let dump = source.root.join("app.dump");
    source.run_client("pg_dump", &["-Fc", "-d", "app", "-f", dump.to_str().unwrap()]);
    let target = Cluster::start(&[]);
    let key = std::fs::read_to_string(source.master_key_file()).unwrap();
    target.write_file(&target.master_key_file(), &key, 0o600);
    target.connect().batch_execute("CREATE ROLE owner LOGIN").unwrap();
    target.connect().batch_execute("CREATE DATABASE app OWNER owner").unwrap();
    // As managed platforms restore: as the database owner, without ownership or privileges.
    target.run_client(
        "pg_restore",
        &[
            "-U",
            "owner",
            "--no-owner",
            "--no-privileges",
            "--exit-on-error",
            "-d",
            "app",
            dump.to_str().unwrap(),
        ],
    );
    let mut app = target.connect_as("owner", "app");
    assert_eq!(all_decrypt(&mut app), 100);
    let next: i64 = app.query_one("SELECT immuta_rotate()", &[]).unwrap().get(0);
    assert_eq!(next, 4);
    // Restoring needed to add rows; it did not open the tables to the owner.
    assert_eq!(sqlstate(app.batch_execute("SELECT * FROM immuta.data_keys")), "42501");
    assert_eq!(sqlstate(app.batch_execute("DELETE FROM immuta.audit_log")), "42501");
}

#[test]
fn stored_credentials_are_not_dumped() {
    let source = Cluster::start(&[]);
    let mut app = populated(&source);
    app.query_one("SELECT immuta_configure($1)", &[&CREDENTIALS_YAML]).unwrap();
    let target = Cluster::start(&[]);
    let key = std::fs::read_to_string(source.master_key_file()).unwrap();
    target.write_file(&target.master_key_file(), &key, 0o600);
    let dump = dump_and_restore(&source, &target);
    let text = String::from_utf8_lossy(&dump);
    assert!(!text.contains("dump-secret-never-in-a-dump"), "the secret is not in the dump");
    let mut app = target.connect_to("app");
    let stored: i64 = app.query_one("SELECT count(*) FROM immuta.config", &[]).unwrap().get(0);
    assert_eq!(stored, 0, "a configuration with credentials is left out entirely");
    assert_eq!(all_decrypt(&mut app), 100);
}

#[test]
fn restoring_without_the_master_key_fails_clearly_and_destroys_nothing() {
    let source = Cluster::start(&[]);
    populated(&source);
    let target = Cluster::start(&[]);
    dump_and_restore(&source, &target);
    let mut app = target.connect_to("app");
    let decrypt = app.query_one("SELECT immuta_decrypt(ssn) FROM people WHERE id = 1", &[]);
    let text = error_text(app.query_one("SELECT immuta_decrypt(ssn) FROM people WHERE id = 1", &[]));
    assert_eq!(sqlstate(decrypt), "58P01", "{text}");
    assert_eq!(sqlstate(app.query_one("SELECT immuta_encrypt('x')", &[])), "58P01");
    assert!(!target.master_key_file().exists(), "no master key was made up");
    assert_eq!(count_keys(&mut app), 3, "the key rows are intact");
    // With the key in place, everything decrypts.
    let key = std::fs::read_to_string(source.master_key_file()).unwrap();
    target.write_file(&target.master_key_file(), &key, 0o600);
    let mut app = target.connect_to("app");
    assert_eq!(all_decrypt(&mut app), 100);
}

/// Waits until `standby` has replayed key `key` of database `app` (polled: an LSN-based wait can
/// stall until the next WAL record when a commit record ends on a page boundary).
fn wait_for_key(standby: &Cluster, key: i64) {
    let start = Instant::now();
    let mut c = standby.connect_to("app");
    loop {
        let done: bool = c
            .query_one("SELECT EXISTS (SELECT 1 FROM immuta.data_keys WHERE id = $1)", &[&key])
            .unwrap()
            .get(0);
        if done {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "standby did not replay\n{}", standby.log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_streaming_standby_decrypts_everything_follows_rotations_and_never_writes() {
    let primary = Cluster::start(&["shared_preload_libraries = 'immuta'"]);
    populated(&primary);
    let standby = primary.start_standby();
    let mut replica = standby.connect_to("app");
    assert_eq!(all_decrypt(&mut replica), 100);
    assert_eq!(encrypted_key_id(&mut replica, "on the standby"), 3);

    // A rotation on the primary is used by the standby's encryptions once replayed.
    let rotated: i64 = primary.connect_to("app").query_one("SELECT immuta_rotate()", &[]).unwrap().get(0);
    wait_for_key(&standby, rotated);
    assert_eq!(encrypted_key_id(&mut replica, "after the rotation"), rotated);
    let v: Vec<u8> =
        replica.query_one("SELECT immuta_encrypt('written on the standby')", &[]).unwrap().get(0);
    let back: String =
        primary.connect_to("app").query_one("SELECT immuta_decrypt($1)", &[&v]).unwrap().get(0);
    assert_eq!(back, "written on the standby");

    // Nothing on the standby writes: the scheduled job does nothing there, key changes are refused
    // with the documented error, and status works.
    let due: Option<i64> = replica.query_one("SELECT immuta_rotate_if_due()", &[]).unwrap().get(0);
    assert_eq!(due, None);
    assert_eq!(sqlstate(replica.query_one("SELECT immuta_rotate()", &[])), "25006");
    let status: String =
        replica.query_one("SELECT immuta_status()->'current_key'->>'id'", &[]).unwrap().get(0);
    assert_eq!(status, rotated.to_string());
    replica
        .batch_execute("SELECT immuta_encrypt('v' || i) FROM generate_series(1, 5000) i")
        .expect("encrypting in bulk on a standby writes nothing");
    let log = standby.log();
    assert!(!log.contains("read-only transaction"), "nothing tried to write:\n{log}");
}
