//! System tier: the local master key file.

mod support;

use std::fs;

use support::*;

#[test]
fn the_master_key_file_is_generated_on_first_use_with_mode_0600() {
    let pg = Cluster::start(&[]);
    assert!(!pg.master_key_file().exists(), "nothing before first use");
    let mut c = pg.connect();
    encrypt(&mut c, "x");
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(pg.master_key_file()).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o600);
    let fp: String = c.query_one("SELECT wrapping_key FROM immuta.keys", &[]).unwrap().get(0);
    assert_eq!(fp.len(), 16);
}

#[test]
fn a_removed_master_key_file_gives_the_documented_error_and_is_never_regenerated() {
    let pg = Cluster::start(&[]);
    let mut c = pg.connect();
    let value = encrypt(&mut c, "123-45-6789");
    drop(c);
    pg.stop();
    let saved = pg.root.join("saved.key");
    fs::rename(pg.master_key_file(), &saved).unwrap();
    pg.start_again();
    let mut c = pg.connect();
    let text = error_text(decrypt(&mut c, &value));
    assert_eq!(sqlstate(decrypt(&mut c, &value)), "58P01");
    assert!(text.contains("immuta_master.key\" does not exist"), "{text}");
    assert!(text.contains("fingerprint"), "{text}");
    // Rotation would need the master key too, and must not create a new one that strands the old keys.
    assert_eq!(sqlstate(c.execute("SELECT immuta_rotate()", &[])), "58P01");
    assert!(!pg.master_key_file().exists(), "no new master key was generated");
    fs::rename(&saved, pg.master_key_file()).unwrap();
    assert_eq!(decrypt(&mut c, &value).unwrap(), "123-45-6789", "restoring the file is enough, no restart");
}

#[test]
fn a_different_master_key_is_reported_as_a_mismatch_naming_both_fingerprints() {
    let pg = Cluster::start(&[]);
    let mut c = pg.connect();
    let value = encrypt(&mut c, "secret");
    let recorded: String = c.query_one("SELECT wrapping_key FROM immuta.keys", &[]).unwrap().get(0);
    drop(c);
    pg.stop();
    pg.write_file(&pg.master_key_file(), &format!("{}\n", "ab".repeat(32)), 0o600);
    pg.start_again();
    let mut c = pg.connect();
    let result = decrypt(&mut c, &value);
    let text = error_text(decrypt(&mut c, &value));
    assert_eq!(sqlstate(result), "55000");
    assert!(text.contains("mismatch") && text.contains(&recorded), "{text}");
    assert!(!text.contains(&"ab".repeat(32)), "the key itself is never shown");
}

#[test]
fn a_master_key_file_readable_by_others_is_refused() {
    let pg = Cluster::start(&[]);
    let mut c = pg.connect();
    let value = encrypt(&mut c, "secret");
    drop(c);
    pg.stop();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(pg.master_key_file(), fs::Permissions::from_mode(0o644)).unwrap();
    pg.start_again();
    let mut c = pg.connect();
    let text = error_text(decrypt(&mut c, &value));
    assert_eq!(sqlstate(decrypt(&mut c, &value)), "F0000");
    assert!(text.contains("0600"), "{text}");
}

#[test]
fn the_master_key_file_setting_points_at_another_file_and_only_the_server_config_can_set_it() {
    let pg = Cluster::start(&[]);
    let custom = pg.root.join("custom.key");
    let mut c = pg.connect();
    set_server_setting(&mut c, "immuta.master_key_file", custom.to_str().unwrap());
    drop(c);
    let mut c = pg.connect();
    let v = encrypt(&mut c, "x");
    assert!(custom.exists());
    assert!(!pg.master_key_file().exists());
    assert_eq!(decrypt(&mut c, &v).unwrap(), "x");
    assert_eq!(
        sqlstate(c.batch_execute("SET immuta.master_key_file = '/tmp/elsewhere'")),
        "55P02",
        "a session cannot redirect the master key file"
    );
}

#[test]
fn a_database_without_keys_does_not_replace_a_lost_master_key_that_another_database_uses() {
    let pg = Cluster::start(&[]);
    let mut c = pg.connect();
    encrypt(&mut c, "in postgres");
    c.batch_execute("CREATE DATABASE second").unwrap();
    drop(c);
    pg.stop();
    fs::rename(pg.master_key_file(), pg.root.join("saved.key")).unwrap();
    pg.start_again();
    let mut second = pg.config().dbname("second").connect(postgres::NoTls).unwrap();
    second.batch_execute("CREATE EXTENSION immuta").unwrap();
    let result = second.query_one("SELECT immuta_encrypt('x')", &[]);
    assert_eq!(sqlstate(result), "58P01");
    assert!(!pg.master_key_file().exists(), "no new master key");
}
