//! The usage limit (`immuta.max_encryptions_per_key`): rollover after exactly that many
//! encryptions, across sessions with the shared counter, in read-only sessions, and across a
//! crash.

mod support;

use support::*;

const PRELOADED: &str = "shared_preload_libraries = 'immuta'";

fn keys_by_use(c: &mut postgres::Client, table: &str) -> Vec<(i64, i64)> {
    c.query(&format!("SELECT immuta_key_id(v), count(*) FROM {table} GROUP BY 1 ORDER BY 1"), &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[test]
fn after_exactly_the_limit_the_next_encryption_is_under_a_new_key_with_or_without_preload() {
    for settings in [&[][..], &[PRELOADED][..]] {
        let pg = Cluster::start(settings);
        let mut c = pg.connect();
        set_server_setting(&mut c, "immuta.max_encryptions_per_key", "1000");
        drop(c);
        let mut c = pg.connect();
        c.batch_execute(
            "CREATE TABLE t AS SELECT immuta_encrypt('v' || i) AS v FROM generate_series(1, 1000) i",
        )
        .unwrap();
        assert_eq!(keys_by_use(&mut c, "t"), vec![(1, 1000)], "{settings:?}");
        assert_eq!(encrypted_key_id(&mut c, "the 1001st"), 2, "{settings:?}");
        let row = c
            .query_one(
                "SELECT k.reason, k.rolled_over_from, a.reason, a.detail->>'previous_key_encryptions' \
                 FROM immuta.data_keys k JOIN immuta.audit_log a ON a.key_id = k.id AND a.event = 'key rotated' \
                 WHERE k.id = 2",
                &[],
            )
            .unwrap();
        assert_eq!(row.get::<_, String>(0), "usage limit");
        assert_eq!(row.get::<_, Option<i64>>(1), Some(1));
        assert_eq!(row.get::<_, String>(2), "usage limit");
        // Exact with the shared counter; without it, the table is ahead by the unspent rest of
        // the session's last block (at most 64 with this limit).
        let slack = if settings.is_empty() { 64 } else { 0 };
        let audited: i64 = row.get::<_, String>(3).parse().unwrap();
        assert!((1000..=1000 + slack).contains(&audited), "{settings:?}: {audited}");
        let counted: i64 =
            c.query_one("SELECT encryptions FROM immuta.keys WHERE id = 1", &[]).unwrap().get(0);
        assert!((1000..=1000 + slack).contains(&counted), "{settings:?}: {counted}");
        let all: i64 =
            c.query_one("SELECT count(*) FROM t WHERE immuta_decrypt(v) LIKE 'v%'", &[]).unwrap().get(0);
        assert_eq!(all, 1000);
    }
}

#[test]
fn each_keyring_rolls_over_at_the_limit_of_its_own_keys() {
    let pg = Cluster::start(&[PRELOADED]);
    let mut c = pg.connect();
    set_server_setting(&mut c, "immuta.max_encryptions_per_key", "1000");
    drop(c);
    let mut c = pg.connect();
    // 750 rows under each of two keyrings: together past the limit, each below it.
    c.batch_execute(
        "SELECT immuta_keyring_create('a'); SELECT immuta_keyring_create('b');
         CREATE TABLE t AS SELECT immuta_encrypt('v' || i, keyring => CASE WHEN i % 2 = 0 THEN 'a' ELSE 'b' END) AS v
           FROM generate_series(1, 1500) i",
    )
    .unwrap();
    let first = |c: &mut postgres::Client, keyring: &str| -> i64 {
        c.query_one("SELECT min(id) FROM immuta.data_keys WHERE keyring = $1", &[&keyring]).unwrap().get(0)
    };
    let (a, b) = (first(&mut c, "a"), first(&mut c, "b"));
    assert_eq!(keys_by_use(&mut c, "t"), vec![(a.min(b), 750), (a.max(b), 750)]);
    // a's key reaches the limit; its next encryption is under a new key of a, and b goes on.
    c.batch_execute(
        "INSERT INTO t SELECT immuta_encrypt('w' || i, keyring => 'a') FROM generate_series(1, 250) i",
    )
    .unwrap();
    let next: i64 = c
        .query_one("SELECT immuta_key_id(immuta_encrypt('the 1001st', keyring => 'a'))", &[])
        .unwrap()
        .get(0);
    assert!(next > a.max(b), "{next}");
    let row = c
        .query_one("SELECT keyring, reason, rolled_over_from FROM immuta.data_keys WHERE id = $1", &[&next])
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "a");
    assert_eq!(row.get::<_, String>(1), "usage limit");
    assert_eq!(row.get::<_, Option<i64>>(2), Some(a));
    let audited: String = c
        .query_one(
            "SELECT keyring FROM immuta.audit_log WHERE key_id = $1 AND event = 'key rotated'",
            &[&next],
        )
        .unwrap()
        .get(0);
    assert_eq!(audited, "a");
    let counted: i64 =
        c.query_one("SELECT encryptions FROM immuta.keys WHERE id = $1", &[&a]).unwrap().get(0);
    assert_eq!(counted, 1000, "exact with the shared counter");
    let b_now: i64 =
        c.query_one("SELECT immuta_key_id(immuta_encrypt('x', keyring => 'b'))", &[]).unwrap().get(0);
    assert_eq!(b_now, b, "b's key has its own counter, at 751 of 1000");
    let default_keys: i64 =
        c.query_one("SELECT count(*) FROM immuta.data_keys WHERE keyring = 'default'", &[]).unwrap().get(0);
    assert!(default_keys <= 1, "the default keyring did not roll over: {default_keys}");
}

#[test]
fn sessions_taking_turns_share_one_exact_counter_when_preloaded() {
    let pg = Cluster::start(&[PRELOADED]);
    let mut c = pg.connect();
    set_server_setting(&mut c, "immuta.max_encryptions_per_key", "200");
    c.batch_execute("CREATE TABLE t (v bytea)").unwrap();
    let mut sessions = [pg.connect(), pg.connect()];
    for turn in 0..10 {
        sessions[turn % 2]
            .batch_execute("INSERT INTO t SELECT immuta_encrypt('v' || i) FROM generate_series(1, 60) i")
            .unwrap();
    }
    // Without a shared counter each session would count what it reserved but did not use, and
    // roll over early.
    assert_eq!(keys_by_use(&mut c, "t"), vec![(1, 200), (2, 200), (3, 200)]);
}

#[test]
fn concurrent_sessions_roll_over_and_leave_an_exhausted_key_promptly() {
    let pg = std::sync::Arc::new(Cluster::start(&[PRELOADED, "immuta.max_encryptions_per_key = 200"]));
    let mut c = pg.connect();
    c.batch_execute("CREATE TABLE t (v bytea)").unwrap();
    drop(c);
    in_parallel_sessions(&pg, 4, |_, c| {
        for i in 0..15 {
            c.execute(
                "INSERT INTO t SELECT immuta_encrypt($1 || g) FROM generate_series(1, 10) g",
                &[&format!("v{i}-")],
            )
            .unwrap();
        }
    });
    let mut c = pg.connect();
    let keys = keys_by_use(&mut c, "t");
    assert_eq!(keys.iter().map(|k| k.1).sum::<i64>(), 600);
    // A session that finds the key exhausted while another is rolling it over goes on with it for
    // at most UsageLimit::overrun() encryptions (64 here), counted by the shared counter, then
    // waits for that rollover: no key takes more than 264, whatever the scheduling, so 600 values
    // need at least three keys.
    let bound = 200 + immuta_core::usage::UsageLimit::new(200).overrun() as i64;
    assert_eq!(bound, 264);
    assert!(keys.iter().all(|k| k.1 <= bound), "{keys:?}");
    assert!(keys.len() >= 3, "{keys:?}");
    assert!(
        keys[..keys.len() - 1].iter().all(|k| k.1 >= 200),
        "every key but the newest reached the limit: {keys:?}"
    );
    let all: i64 =
        c.query_one("SELECT count(*) FROM t WHERE immuta_decrypt(v) LIKE 'v%'", &[]).unwrap().get(0);
    assert_eq!(all, 600);
}

#[test]
fn a_read_only_session_past_the_limit_warns_once_and_is_counted() {
    let pg = Cluster::start(&[PRELOADED]);
    let mut c = pg.connect();
    set_server_setting(&mut c, "immuta.max_encryptions_per_key", "100");
    encrypt(&mut c, "first");
    drop(c);
    let (mut ro, notices) = pg.connect_recording_notices();
    ro.batch_execute("SET default_transaction_read_only = on").unwrap();
    let ids: Vec<i64> = ro
        .query("SELECT immuta_key_id(immuta_encrypt('v' || i)) FROM generate_series(1, 150) i", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(ids.iter().all(|&id| id == 1), "a read-only transaction cannot roll over");
    let notices = notices.lock().unwrap().clone();
    assert_eq!(notices.len(), 1, "{notices:?}");
    assert!(notices[0].contains("has reached immuta.max_encryptions_per_key (100)"), "{notices:?}");
    let mut c = pg.connect();
    let counted: i64 = c.query_one("SELECT encryptions FROM immuta.keys WHERE id = 1", &[]).unwrap().get(0);
    assert!(counted >= 151, "the shared counter holds the read-only encryptions: {counted}");
    assert_eq!(encrypted_key_id(&mut c, "read-write"), 2);
}

#[test]
fn a_crash_loses_no_committed_count() {
    for settings in [&["synchronous_commit = on"][..], &["synchronous_commit = on", PRELOADED][..]] {
        let pg = Cluster::start(settings);
        let mut c = pg.connect();
        c.batch_execute(
            "CREATE TABLE t AS SELECT immuta_encrypt('v' || i) AS v FROM generate_series(1, 20000) i",
        )
        .unwrap();
        drop(c);
        pg.crash_and_restart();
        let mut c = pg.connect();
        let counted: i64 =
            c.query_one("SELECT encryptions FROM immuta.keys WHERE is_current", &[]).unwrap().get(0);
        assert!(counted >= 20000, "{settings:?}: {counted}");
        assert!(counted <= 20000 + 2_000_000, "at most one block ahead: {counted}");
    }
}

fn usage_sum(c: &mut impl postgres::GenericClient) -> i64 {
    c.query_one("SELECT COALESCE(sum(encryptions), 0)::int8 FROM immuta.key_usage", &[]).unwrap().get(0)
}

#[test]
fn committed_encryptions_are_covered_by_committed_rows_after_a_rollback_or_a_read_only_transaction() {
    for settings in [&[][..], &[PRELOADED][..]] {
        let pg = Cluster::start(settings);
        let mut c = pg.connect();
        encrypt(&mut c, "creates the key");
        drop(c);
        let before = usage_sum(&mut pg.connect());

        // A grant whose row rolls back must not be spent by the transactions that follow.
        let mut c = pg.connect();
        let mut tx = c.transaction().unwrap();
        tx.batch_execute("SELECT immuta_encrypt('v' || i) FROM generate_series(1, 10) i").unwrap();
        assert!(usage_sum(&mut tx) > before, "{settings:?}: the session reserved a row");
        tx.rollback().unwrap();
        for i in 0..5 {
            encrypt(&mut c, &format!("committed {i}"));
        }
        let after = usage_sum(&mut pg.connect());
        assert!(after - before >= 10 + 5, "{settings:?}: {before} -> {after}");
        drop(c);

        // Nor a grant taken in a read-only transaction.
        let before = after;
        let mut c = pg.connect();
        c.batch_execute("BEGIN READ ONLY; SELECT immuta_encrypt('read only'); COMMIT").unwrap();
        for i in 0..5 {
            encrypt(&mut c, &format!("committed {i}"));
        }
        let after = usage_sum(&mut pg.connect());
        // The read-only transaction's encryption and the five committed ones.
        assert!(after - before > 5, "{settings:?}: {before} -> {after}");
    }
}

#[test]
fn serializable_sessions_reserving_at_once_do_not_fail_each_other() {
    let pg = std::sync::Arc::new(Cluster::start(&[]));
    let mut c = pg.connect();
    c.batch_execute("CREATE TABLE t (v bytea)").unwrap();
    encrypt(&mut c, "creates the key");
    drop(c);
    for _ in 0..5 {
        // Fresh sessions: each reads the key's rows and writes its own at the same moment.
        let failures = in_parallel_sessions(&pg, 4, |_, c| {
            let mut tx = c
                .build_transaction()
                .isolation_level(postgres::IsolationLevel::Serializable)
                .start()
                .unwrap();
            let inserted = tx
                .execute("INSERT INTO t SELECT immuta_encrypt('v' || i) FROM generate_series(1, 100) i", &[]);
            sqlstate(inserted.and_then(|_| tx.commit()))
        });
        assert!(failures.iter().all(|s| s == "00000"), "{failures:?}");
    }
    let mut c = pg.connect();
    let rows: i64 = c.query_one("SELECT count(*) FROM t", &[]).unwrap().get(0);
    assert_eq!(rows, 5 * 4 * 100);
}

#[test]
fn sessions_wait_for_a_rollover_in_progress_once_the_overrun_is_spent() {
    // The limit from postgresql.conf: a reload reaches a session that is already connected only
    // at a moment of its own choosing.
    let pg = Cluster::start(&[PRELOADED, "immuta.max_encryptions_per_key = 200"]);
    let mut c = pg.connect();
    c.batch_execute("CREATE TABLE t (v bytea); INSERT INTO t VALUES (immuta_encrypt('first'))").unwrap();
    drop(c);
    // The winner passes the limit in an open transaction: it rolls the key over and holds the
    // key creation lock until it commits.
    let mut winner = pg.connect();
    winner
        .batch_execute("BEGIN; INSERT INTO t SELECT immuta_encrypt('w' || i) FROM generate_series(1, 200) i")
        .unwrap();
    // Another session goes on under the exhausted key for the overrun (64), then waits.
    let pg = std::sync::Arc::new(pg);
    let other = {
        let pg = pg.clone();
        std::thread::spawn(move || {
            let mut c = pg.connect();
            c.batch_execute("SET lock_timeout = '120s'").unwrap();
            c.batch_execute("INSERT INTO t SELECT immuta_encrypt('o' || i) FROM generate_series(1, 100) i")
                .unwrap();
        })
    };
    let mut watcher = pg.connect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let waiting: bool = watcher
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE 'INSERT INTO t%')",
                &[],
            )
            .unwrap()
            .get(0);
        if waiting {
            break;
        }
        assert!(!other.is_finished(), "the other session did not wait for the rollover");
        assert!(std::time::Instant::now() < deadline, "the other session never waited");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    winner.batch_execute("COMMIT").unwrap();
    other.join().unwrap();
    let mut c = pg.connect();
    // Key 1: the first value, the winner's 199 and the other's 64; key 2: the winner's last and
    // the other's 36.
    assert_eq!(keys_by_use(&mut c, "t"), vec![(1, 264), (2, 37)]);
}
