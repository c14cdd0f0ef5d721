//! System tier: configuration sources and their precedence.

mod support;

use support::*;

fn rollover_days(c: &mut postgres::Client) -> i64 {
    c.query_one("SELECT (immuta_config()->'schedule'->>'dataKeyRollOverLength')::int8", &[]).unwrap().get(0)
}

#[test]
fn the_configuration_file_takes_precedence_and_is_reread_when_it_changes() {
    let pg = Cluster::start(&[]);
    let file = pg.root.join("immuta.yaml");
    pg.write_file(&file, "schedule:\n  dataKeyRollOverLength: 10\n", 0o600);
    let mut c = pg.connect();
    c.execute("SELECT immuta_configure('schedule:\n  dataKeyRollOverLength: 99\n')", &[]).unwrap();
    set_server_setting(&mut c, "immuta.config_file", file.to_str().unwrap());
    drop(c);
    let (mut c, notices) = pg.connect_recording_notices();
    assert_eq!(rollover_days(&mut c), 10, "the file wins over the stored configuration");
    let refused = c.execute("SELECT immuta_configure('')", &[]);
    assert_eq!(sqlstate(refused), "55P02");

    // A new file renamed over the old one (a new inode: noticed whatever the clock's resolution).
    let next = pg.root.join("immuta.yaml.new");
    pg.write_file(&next, "schedule:\n  dataKeyRollOverLength: 20\n", 0o600);
    std::fs::rename(&next, &file).unwrap();
    assert_eq!(rollover_days(&mut c), 20, "picked up at the next transaction");

    pg.write_file(&file, "schedule:\n  dataKeyRollOverLenth: 30\n", 0o600);
    assert_eq!(rollover_days(&mut c), 20, "an invalid file leaves the previous configuration in force");
    let warned = notices
        .lock()
        .unwrap()
        .iter()
        .any(|n| n.starts_with("WARNING") && n.contains("previous configuration"));
    assert!(warned, "{:?}", notices.lock().unwrap());

    let mut fresh = pg.connect();
    let err = fresh.query_one("SELECT immuta_config()", &[]);
    let text = error_text(fresh.query_one("SELECT immuta_config()", &[]));
    assert_eq!(sqlstate(err), "F0000");
    assert!(text.contains("schedule.dataKeyRollOverLenth"), "the error names the offending path: {text}");
}

#[test]
fn a_stored_configuration_reaches_other_sessions_and_survives_restart() {
    let pg = Cluster::start(&[]);
    let (mut a, mut b) = (pg.connect(), pg.connect());
    assert_eq!(rollover_days(&mut b), 365);
    a.execute("SELECT immuta_configure('schedule:\n  dataKeyRollOverLength: 30\n')", &[]).unwrap();
    assert_eq!(rollover_days(&mut b), 30);
    drop((a, b));
    pg.restart();
    let mut c = pg.connect();
    assert_eq!(rollover_days(&mut c), 30);
}

#[test]
fn secrets_in_the_configuration_never_reach_the_server_log() {
    let pg = Cluster::start(&["log_min_messages = debug1", "log_min_error_statement = error"]);
    let mut c = pg.connect();
    let yaml = "plugins:\n  awsKms:\n    plugin: awsKms\n    isKms: false\n    keyId: alias/x\n    region: us-east-1\n    extraKmsConfig:\n      credentials:\n        accessKeyId: AKIDEXAMPLE\n        secretAccessKey: Sup3rS3cretValue\n";
    c.execute("SELECT immuta_configure($1)", &[&yaml]).unwrap();
    let shown: String = c
        .query_one(
            "SELECT immuta_config()#>>'{plugins,awsKms,extraKmsConfig,credentials,secretAccessKey}'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(shown, "********");
    let bad = "plugins:\n  awsKms:\n    plugin: awsKms\n    isKms: true\n    keyId: alias/x\n    region: us-east-1\n    extraKmsConfig:\n      credentials:\n        accessKeyId: AKIDEXAMPLE\n        secretAccessKey: [Sup3rS3cretValue]\n";
    assert_eq!(sqlstate(c.execute("SELECT immuta_configure($1)", &[&bad])), "22023");
    assert!(!pg.log().contains("Sup3rS3cretValue"), "{}", pg.log());
}

#[test]
fn configuration_documents_are_bounded_before_they_are_parsed() {
    let pg = Cluster::start(&[]);
    let mut c = pg.connect();
    // Quadratic in the parser: 60,000 '[' held a backend for 20 s, deaf to cancel. A statement
    // timeout makes a regression fail here instead of hanging.
    c.batch_execute("SET statement_timeout = '20s'").unwrap();
    let deep = c.query_one("SELECT immuta_configure('schedule: ' || repeat('[', 60000))", &[]);
    let text = error_text(c.query_one("SELECT immuta_configure('schedule: ' || repeat('[', 60000))", &[]));
    assert_eq!(sqlstate(deep), "22023", "{text}");
    assert!(text.contains("at most 256"), "{text}");
    let huge = c.query_one("SELECT immuta_configure('# ' || repeat('x', 1000000))", &[]);
    let text = error_text(c.query_one("SELECT immuta_configure('# ' || repeat('x', 1000000))", &[]));
    assert_eq!(sqlstate(huge), "22023", "{text}");
    assert!(text.contains("at most 65536 bytes"), "{text}");

    // The same limits for the file, which is not even read whole.
    let file = pg.root.join("immuta.yaml");
    pg.write_file(&file, &format!("# {}\n", "x".repeat(2 << 20)), 0o600);
    set_server_setting(&mut c, "immuta.config_file", file.to_str().unwrap());
    let mut fresh = pg.connect();
    fresh.batch_execute("SET statement_timeout = '20s'").unwrap();
    let text = error_text(fresh.query_one("SELECT immuta_config()", &[]));
    assert_eq!(sqlstate(fresh.query_one("SELECT immuta_config()", &[])), "F0000", "{text}");
    assert!(text.contains("at most 65536 bytes"), "{text}");
}

#[test]
fn no_configuration_error_shows_a_secret_whatever_the_mistake() {
    let pg = Cluster::start(&["log_min_messages = debug1", "log_error_verbosity = verbose"]);
    let mut c = pg.connect();
    const SECRET: &str = "wJalrXUtnFEMIK7MDENGbPxRfiCYSECRETVALUE";
    let doc = |value: &str| {
        format!(
            "plugins:\n  awsKms:\n    plugin: awsKms\n    isKms: true\n    keyId: alias/x\n    region: us-east-1\n    \
             extraKmsConfig:\n      credentials:\n        accessKeyId: AKIDEXAMPLE\n        secretAccessKey: {value}\n"
        )
    };
    for mistake in [
        format!("!!int {SECRET}"),
        format!("!!bool {SECRET}"),
        format!("{SECRET}\n        secretAccessKey: {SECRET}"),
        format!("\"{SECRET}\\q\""),
        format!("{SECRET}\n\t{SECRET}"),
        format!("{{{SECRET}: 1}}"),
    ] {
        let yaml = doc(&mistake);
        let text = error_text(c.query_one("SELECT immuta_configure($1)", &[&yaml]));
        assert_eq!(
            sqlstate(c.query_one("SELECT immuta_configure($1)", &[&yaml])),
            "22023",
            "{mistake}: {text}"
        );
        assert!(!text.contains("wJalr"), "{mistake}: {text}");
    }
    assert!(!pg.log().contains("wJalr"), "{}", pg.log());
}

#[test]
fn a_misspelt_immuta_setting_is_an_error_not_a_placeholder_that_silently_does_nothing() {
    // Preloaded: the misspelling in postgresql.conf is reported when the server starts, and no
    // session can set it.
    let pg = Cluster::start(&["shared_preload_libraries = 'immuta'", "immuta.kms_timout = '10s'"]);
    assert!(
        pg.log().contains("invalid configuration parameter name \"immuta.kms_timout\""),
        "the server log names the misspelt setting:\n{}",
        pg.log()
    );
    let mut c = pg.connect();
    let result = c.batch_execute("SET immuta.kms_timout = '1s'");
    let text = error_text(c.batch_execute("SET immuta.kms_timout = '1s'"));
    assert_eq!(sqlstate(result), "42602");
    assert!(text.contains("reserved prefix"), "{text}");
    assert_eq!(
        sqlstate(c.batch_execute("SET immuta.kms_timeout = '1s'")),
        "00000",
        "real settings still are"
    );

    // Loaded on demand: from the first use of immuta in the session on.
    let pg = Cluster::start(&[]);
    let mut c = pg.connect();
    encrypt(&mut c, "loads immuta");
    assert_eq!(sqlstate(c.batch_execute("SET immuta.max_encryption_per_key = 5")), "42602");
}
