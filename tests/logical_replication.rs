//! System tier: immuta's keys by logical replication (issue 17, docs/DISTRIBUTED.md). A
//! subscriber of the key tables decrypts what the publisher encrypted, follows its rotations,
//! keyrings, index keys and state changes in sessions already open, never creates a key of its
//! own, and never takes the publisher's configuration or usage counts; then a blue/green
//! switchover: the subscriber becomes the writer, continues the key ids above every id the old
//! publisher had, and the old publisher, now its subscriber, follows it. On one version, and from
//! the version under test to each newer one (`IMMUTA_TEST_UPGRADE_TO`: the major-version upgrade
//! of a blue/green deployment).

mod support;

use std::time::{Duration, Instant};

use support::*;

/// What a publication of immuta's keys holds (docs/DISTRIBUTED.md), with the application's table.
const PUBLISHED: &str = "immuta.data_keys, immuta.index_keys, immuta.keyrings, immuta.audit_log, public.t";

/// Everything the key tables and the application's table hold, as one digest: equal on both
/// sides once the subscriber has applied everything the publisher committed.
const DIGEST: &str = "SELECT md5(coalesce(string_agg(x, ',' ORDER BY x), '')) FROM (
      SELECT 'k' || id || state || coalesce(encode(wrapped_key, 'hex'), '-') AS x FROM immuta.data_keys
      UNION ALL SELECT 'i' || id || state || coalesce(encode(wrapped_key, 'hex'), '-') FROM immuta.index_keys
      UNION ALL SELECT 'r' || name FROM immuta.keyrings
      UNION ALL SELECT 'a' || id FROM immuta.audit_log
      UNION ALL SELECT 't' || id || encode(c, 'hex') FROM t) s";

/// A cluster that can publish (`wal_level = logical`), with immuta preloaded (its shared key
/// cache) and the application's table.
fn node(pg: Installation) -> Cluster {
    let node = Cluster::init(pg, &["wal_level = logical", "shared_preload_libraries = 'immuta'"], &[]);
    node.start_server();
    node.connect()
        .batch_execute("CREATE EXTENSION immuta; CREATE TABLE t (id int PRIMARY KEY, c bytea)")
        .unwrap();
    node
}

/// Waits until `to` has applied everything `from` committed (both digests equal).
fn caught_up(from: &Cluster, to: &Cluster) {
    let (mut f, mut t) = (from.connect(), to.connect());
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let want: String = one(&mut f, DIGEST);
        if one::<String>(&mut t, DIGEST) == want {
            return;
        }
        assert!(Instant::now() < deadline, "the subscriber did not catch up\n{}", to.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn subscribe(subscriber: &Cluster, publisher: &Cluster, name: &str, publications: &str, copy_data: bool) {
    let mut c = subscriber.connect();
    c.batch_execute(&format!(
        "CREATE SUBSCRIPTION {name} CONNECTION '{}' PUBLICATION {publications} WITH (copy_data = {copy_data})",
        publisher.conninfo("postgres")
    ))
    .unwrap();
    wait_until(
        &mut c,
        "SELECT count(*) > 0 AND bool_and(srsubstate = 'r') FROM pg_subscription_rel",
        "the subscription's tables are synchronised",
    );
}

/// Retries `check`, each time in new statements, until it holds: the rows a subscription applies
/// become visible a moment before its commit's invalidations reach the other sessions. (A cached
/// key expires only after `immuta.cache_ttl`, an hour: only the invalidation can make it hold.)
fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !check() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn decrypts(c: &mut postgres::Client, id: i32) -> Result<String, postgres::Error> {
    c.query_one(&format!("SELECT immuta_decrypt(c) FROM t WHERE id = {id}"), &[]).map(|r| r.get(0))
}

fn new_key_id(c: &mut postgres::Client) -> i64 {
    one(c, "SELECT immuta_key_id(immuta_encrypt('probe'))")
}

fn highest_key_id(c: &mut postgres::Client) -> i64 {
    one(
        c,
        "SELECT GREATEST((SELECT coalesce(max(id), 0) FROM immuta.data_keys),
                         (SELECT coalesce(max(id), 0) FROM immuta.index_keys))",
    )
}

/// A subscriber refuses everything that would write a key, a keyring or the audit log, as a
/// standby does (25006), and says why.
fn refuses_key_writes(c: &mut postgres::Client, publisher_audit: i64) {
    for statement in [
        "SELECT immuta_rotate()",
        "SELECT immuta_keyring_create('elsewhere')",
        "SELECT immuta_key_disable(1, 'not here')",
        "SELECT immuta_blind_index_create('t.other')",
        "SELECT immuta_rewrap()",
    ] {
        let err = c.batch_execute(statement).expect_err(statement);
        assert_eq!(err.code().map(|s| s.code()), Some("25006"), "{statement}: {err}");
        let text = err.as_db_error().map(|e| e.message().to_owned()).unwrap_or_default();
        assert!(text.contains("receives immuta's keys from a publisher"), "{statement}: {text}");
    }
    let writes: String = one(c, "SELECT immuta_status()->>'key_writes'");
    assert!(writes.starts_with("refused: this database receives immuta's keys"), "{writes}");
    let due: Option<i64> = one(c, "SELECT immuta_rotate_if_due()");
    assert_eq!(due, None, "the scheduled job does nothing on a subscriber");
    c.batch_execute("SELECT immuta_cache_reset()").unwrap();
    let audit: i64 = one(c, "SELECT max(id) FROM immuta.audit_log");
    assert_eq!(audit, publisher_audit, "a cache reset writes no audit entry the publisher could also write");
}

/// The whole lifecycle between `blue` (publisher first) and `green` (subscriber first).
fn replicate_and_switch_over(blue: Cluster, green: Cluster) {
    let mut b = blue.connect();
    b.batch_execute(&format!(
        "SELECT immuta_keyring_create('t1');
         INSERT INTO t SELECT i, immuta_encrypt('v' || i) FROM generate_series(1, 20) i;
         INSERT INTO t SELECT i, immuta_encrypt('v' || i, keyring => 't1') FROM generate_series(21, 25) i;
         SELECT immuta_rotate();
         INSERT INTO t SELECT i, immuta_encrypt('v' || i) FROM generate_series(26, 30) i;
         SELECT immuta_configure('schedule: {{dataKeyRollOverLength: 45}}');
         CREATE PUBLICATION immuta_keys FOR TABLE {PUBLISHED};
         -- The tables of one server, published by mistake: their rows must not be applied.
         CREATE PUBLICATION per_node FOR TABLE immuta.config, immuta.key_usage WITH (publish = 'insert');"
    ))
    .unwrap();
    let first_key: i64 = one(&mut b, "SELECT immuta_key_id(c) FROM t WHERE id = 1");

    // The subscriber: the same master key file, then the subscription (a superuser's).
    let key = std::fs::read_to_string(blue.master_key_file()).unwrap();
    green.write_file(&green.master_key_file(), &key, 0o600);
    subscribe(&green, &blue, "blue", "immuta_keys, per_node", true);
    caught_up(&blue, &green);
    let mut g = green.connect();
    let decrypted: i64 = one(&mut g, "SELECT count(*) FROM t WHERE immuta_decrypt(c) = 'v' || id");
    assert_eq!(decrypted, 30);
    let (config, usage): (i64, i64) = {
        let row = g
            .query_one(
                "SELECT (SELECT count(*) FROM immuta.config), (SELECT count(*) FROM immuta.key_usage)",
                &[],
            )
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!((config, usage), (0, 0), "the publisher's configuration and usage rows stay there");
    let published: i64 =
        one(&mut b, "SELECT (SELECT count(*) FROM immuta.config) + (SELECT count(*) FROM immuta.key_usage)");
    assert!(published >= 2, "the publisher has both");
    let audit: i64 = one(&mut b, "SELECT max(id) FROM immuta.audit_log");
    refuses_key_writes(&mut g, audit);

    // A session of the subscriber, open throughout, follows what the publisher does.
    let mut gs = green.connect();
    let current: i64 = one(&mut b, "SELECT id FROM immuta.keys WHERE is_current AND keyring = 'default'");
    assert_eq!(new_key_id(&mut gs), current, "a subscriber encrypts under the publisher's current key");
    assert_eq!(decrypts(&mut gs, 1).unwrap(), "v1");
    let rotated: i64 = one(&mut b, "SELECT immuta_rotate()");
    b.batch_execute("INSERT INTO t VALUES (31, immuta_encrypt('v31'))").unwrap();
    caught_up(&blue, &green);
    let usage = format!("SELECT count(*) FROM immuta.key_usage WHERE key_id = {rotated}");
    assert!(one::<i64>(&mut b, &usage) > 0);
    assert_eq!(one::<i64>(&mut g, &usage), 0, "the publisher's usage rows, streamed, are not applied");
    assert_eq!(decrypts(&mut gs, 31).unwrap(), "v31");
    eventually("the rotation reaches the open session", || new_key_id(&mut gs) == rotated);
    b.batch_execute(&format!("SELECT immuta_key_disable({first_key}, 'replication test')")).unwrap();
    caught_up(&blue, &green);
    eventually("disabled on the publisher, refused here", || sqlstate(decrypts(&mut gs, 1)) == "55000");
    let mut fresh = green.connect();
    assert_eq!(sqlstate(decrypts(&mut fresh, 1)), "55000", "and in a new session (the shared cache)");
    b.batch_execute(&format!("SELECT immuta_key_enable({first_key}, 'replication test')")).unwrap();
    caught_up(&blue, &green);
    eventually("enabled again", || decrypts(&mut gs, 1).ok().as_deref() == Some("v1"));
    assert_eq!(decrypts(&mut gs, 21).unwrap(), "v21");
    b.batch_execute("SELECT immuta_keyring_destroy('t1', 'tenant left')").unwrap();
    caught_up(&blue, &green);
    eventually("crypto-shredded on the publisher, here too", || sqlstate(decrypts(&mut gs, 21)) == "42704");
    b.batch_execute("SELECT immuta_blind_index_create('t.c')").unwrap();
    caught_up(&blue, &green);
    let term: Vec<u8> = one(&mut b, "SELECT immuta_blind_index('v2', 't.c')");
    assert_eq!(one::<Vec<u8>>(&mut gs, "SELECT immuta_blind_index('v2', 't.c')"), term, "index keys too");

    // The switchover: writes stop on blue, green catches up, leaves the subscription and
    // publishes; blue subscribes to green without copying what it has.
    caught_up(&blue, &green);
    let mut bs = blue.connect();
    assert_eq!(decrypts(&mut bs, 2).unwrap(), "v2");
    let blue_highest = highest_key_id(&mut b);
    g.batch_execute("DROP SUBSCRIPTION blue").unwrap();
    g.batch_execute(&format!("CREATE PUBLICATION immuta_keys FOR TABLE {PUBLISHED}")).unwrap();
    subscribe(&blue, &green, "green", "immuta_keys", false);
    let audit: i64 = one(&mut g, "SELECT max(id) FROM immuta.audit_log");
    refuses_key_writes(&mut b, audit);

    // Green writes keys now, above every id blue ever had; blue follows it.
    assert_eq!(one::<String>(&mut g, "SELECT immuta_status()->>'key_writes'"), "allowed");
    let green_key: i64 = one(&mut g, "SELECT immuta_rotate()");
    assert!(green_key > blue_highest, "{green_key} continues above {blue_highest}");
    g.batch_execute("INSERT INTO t VALUES (32, immuta_encrypt('v32'))").unwrap();
    caught_up(&green, &blue);
    assert_eq!(decrypts(&mut bs, 32).unwrap(), "v32");
    eventually("the old publisher's open session follows the new writer", || {
        new_key_id(&mut bs) == green_key
    });
    g.batch_execute(&format!("SELECT immuta_key_disable({first_key}, 'after the switchover')")).unwrap();
    caught_up(&green, &blue);
    eventually("disabled on the new writer, refused on the old", || {
        sqlstate(decrypts(&mut bs, 1)) == "55000"
    });
    b.batch_execute("DROP SUBSCRIPTION green").unwrap();
}

#[test]
fn keys_replicate_to_a_subscriber_which_takes_over_in_a_switchover() {
    let pg = Installation::under_test();
    replicate_and_switch_over(node(pg.clone()), node(pg));
}

#[test]
fn a_blue_green_switchover_to_a_newer_major_version() {
    let pg = Installation::under_test();
    let targets: Vec<Installation> =
        Installation::upgrade_targets().into_iter().filter(|t| t.major > pg.major).collect();
    if targets.is_empty() {
        eprintln!("SKIPPED a_blue_green_switchover_to_a_newer_major_version: no newer PostgreSQL to switch over to (IMMUTA_TEST_UPGRADE_TO)");
        return;
    }
    for target in targets {
        replicate_and_switch_over(node(pg.clone()), node(target));
    }
}
