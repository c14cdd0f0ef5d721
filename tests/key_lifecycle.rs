//! System tier: data keys across sessions, transactions and restarts, on a real cluster.

mod support;

use std::sync::Arc;

use support::*;

#[test]
fn a_rotation_in_one_session_is_used_by_the_next_encrypt_in_another() {
    let pg = Cluster::start(&[]);
    let (mut a, mut b) = (pg.connect(), pg.connect());
    let first = encrypted_key_id(&mut b, "before");
    let rotated: i64 = a.query_one("SELECT immuta_rotate()", &[]).unwrap().get(0);
    assert!(rotated > first);
    let after = encrypt(&mut b, "after");
    assert_eq!(key_id_of(&mut b, &after), rotated, "session b must see the rotation without reconnecting");
    assert_eq!(decrypt(&mut a, &after).unwrap(), "after");
}

#[test]
fn every_old_value_decrypts_after_a_restart() {
    let pg = Cluster::start(&[]);
    let mut c = pg.connect();
    c.batch_execute("CREATE TABLE patients (id int, ssn bytea)").unwrap();
    for i in 0..30 {
        if i % 10 == 0 {
            c.execute("SELECT immuta_rotate()", &[]).unwrap();
        }
        c.execute("INSERT INTO patients VALUES ($1, immuta_encrypt($2))", &[&i, &format!("{i:03}-45-6789")])
            .unwrap();
    }
    drop(c);
    pg.restart();
    let mut c = pg.connect();
    let rows =
        c.query("SELECT id, immuta_decrypt(ssn), immuta_key_id(ssn) FROM patients ORDER BY id", &[]).unwrap();
    assert_eq!(rows.len(), 30);
    let mut keys = std::collections::BTreeSet::new();
    for row in rows {
        let id: i32 = row.get(0);
        assert_eq!(row.get::<_, String>(1), format!("{id:03}-45-6789"));
        keys.insert(row.get::<_, i64>(2));
    }
    assert_eq!(keys.len(), 3, "values under three keys");
}

#[test]
fn a_rotation_that_rolls_back_leaves_no_trace() {
    let pg = Cluster::start(&[]);
    let (mut a, mut b) = (pg.connect(), pg.connect());
    let kept = encrypted_key_id(&mut a, "x");
    let mut tx = a.transaction().unwrap();
    let doomed: i64 = tx.query_one("SELECT immuta_rotate()", &[]).unwrap().get(0);
    let under_doomed: Vec<u8> = tx.query_one("SELECT immuta_encrypt('gone')", &[]).unwrap().get(0);
    assert_eq!(encrypted_key_id(&mut b, "y"), kept, "uncommitted rotation invisible elsewhere");
    tx.rollback().unwrap();
    assert_eq!(count_keys(&mut a), 1);
    assert_eq!(encrypted_key_id(&mut a, "z"), kept, "the rolled-back key no longer encrypts");
    assert_eq!(sqlstate(decrypt(&mut a, &under_doomed)), "42704", "nor decrypts in the session that made it");
    assert_eq!(sqlstate(decrypt(&mut b, &under_doomed)), "42704");
    let next: i64 = a.query_one("SELECT immuta_rotate()", &[]).unwrap().get(0);
    assert!(next > doomed, "key ids are never reused");
}

#[test]
fn concurrent_rotations_give_distinct_keys() {
    let pg = Arc::new(Cluster::start(&[]));
    let per_session = in_parallel_sessions(&pg, 4, |_, c| {
        (0..5)
            .map(|_| c.query_one("SELECT immuta_rotate()", &[]).unwrap().get::<_, i64>(0))
            .collect::<Vec<_>>()
    });
    let mut ids: Vec<i64> = per_session.into_iter().flatten().collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 20);
    let mut c = pg.connect();
    assert_eq!(count_keys(&mut c), 20);
    let current: i64 = c.query_one("SELECT id FROM immuta.keys WHERE is_current", &[]).unwrap().get(0);
    assert_eq!(current, *ids.last().unwrap(), "the newest key is current");
    assert_eq!(encrypted_key_id(&mut c, "v"), current);
}

#[test]
fn concurrent_first_uses_create_exactly_one_key() {
    let pg = Arc::new(Cluster::start(&[]));
    let ids = in_parallel_sessions(&pg, 8, |i, c| encrypted_key_id(c, &format!("value {i}")));
    assert!(ids.iter().all(|&id| id == ids[0]), "{ids:?}");
    let mut c = pg.connect();
    assert_eq!(count_keys(&mut c), 1);
    let reason: String = c.query_one("SELECT reason FROM immuta.keys", &[]).unwrap().get(0);
    assert_eq!(reason, "first use");
    assert!(pg.master_key_file().exists());
}

/// Makes the current key look `days` old.
fn backdate_current_key(c: &mut postgres::Client, days: i32) {
    c.execute(
        "UPDATE immuta.data_keys SET created_at = now() - make_interval(days => $1) \
         WHERE id = (SELECT max(id) FROM immuta.data_keys)",
        &[&days],
    )
    .unwrap();
}

#[test]
fn an_overdue_key_rolls_over_on_the_next_encrypt_and_old_values_still_decrypt() {
    let pg = Cluster::start(&[]);
    let mut c = pg.connect();
    let old = encrypt(&mut c, "old value");
    let old_key = key_id_of(&mut c, &old);
    backdate_current_key(&mut c, 400);
    drop(c);
    let mut c = pg.connect();
    let new = encrypt(&mut c, "new value");
    let new_key = key_id_of(&mut c, &new);
    assert!(new_key > old_key, "encryption moved to a new key");
    let row = c
        .query_one("SELECT reason, rolled_over_from FROM immuta.data_keys WHERE id = $1", &[&new_key])
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "schedule");
    assert_eq!(row.get::<_, Option<i64>>(1), Some(old_key));
    assert_eq!(decrypt(&mut c, &old).unwrap(), "old value");
    assert_eq!(encrypted_key_id(&mut c, "again"), new_key, "one rollover, not one per row");
}

#[test]
fn a_shorter_configured_rollover_length_is_honoured() {
    let pg = Cluster::start(&[]);
    let mut c = pg.connect();
    let first = encrypted_key_id(&mut c, "v");
    backdate_current_key(&mut c, 10);
    drop(c);
    let mut c = pg.connect();
    assert_eq!(encrypted_key_id(&mut c, "v"), first, "10 days is not due under the 365-day default");
    c.execute("SELECT immuta_configure('schedule:\n  dataKeyRollOverLength: 7\n')", &[]).unwrap();
    assert!(encrypted_key_id(&mut c, "v") > first, "due under a 7-day length");
}

#[test]
fn many_sessions_meeting_an_overdue_key_roll_it_over_once() {
    let pg = Arc::new(Cluster::start(&[]));
    let mut c = pg.connect();
    encrypt(&mut c, "v");
    backdate_current_key(&mut c, 400);
    in_parallel_sessions(&pg, 6, |_, c| {
        for _ in 0..20 {
            encrypt(c, "v");
        }
    });
    assert_eq!(count_keys(&mut c), 2, "exactly one rollover");
}

#[test]
fn a_read_only_transaction_keeps_the_overdue_key_and_warns_once_per_session() {
    let pg = Cluster::start(&[]);
    let mut c = pg.connect();
    let key = encrypted_key_id(&mut c, "v");
    backdate_current_key(&mut c, 400);
    let (mut ro, notices) = pg.connect_recording_notices();
    ro.batch_execute("SET default_transaction_read_only = on").unwrap();
    for _ in 0..3 {
        assert_eq!(encrypted_key_id(&mut ro, "v"), key);
    }
    let warnings: Vec<String> =
        notices.lock().unwrap().iter().filter(|n| n.starts_with("WARNING")).cloned().collect();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("due for rollover"), "{warnings:?}");
    assert_eq!(count_keys(&mut c), 1);
    assert_eq!(sqlstate(ro.execute("SELECT immuta_rotate()", &[])), "25006");
}

#[test]
fn a_read_only_transaction_cannot_create_the_first_key() {
    let pg = Cluster::start(&[]);
    let mut c = pg.connect();
    c.batch_execute("SET default_transaction_read_only = on").unwrap();
    let err = c.query_one("SELECT immuta_encrypt('x')", &[]);
    let text = error_text(c.query_one("SELECT immuta_encrypt('x')", &[]));
    assert_eq!(sqlstate(err), "25006");
    assert!(text.contains("no immuta data key exists yet"), "{text}");
}

#[test]
fn a_key_created_by_a_statement_that_fails_is_never_used_afterwards() {
    let pg = Cluster::start(&[]);
    let mut c = pg.connect();
    c.batch_execute("CREATE TABLE never (v bytea CHECK (v IS NULL))").unwrap();
    // The first key is created inside the failing statement itself.
    assert_eq!(sqlstate(c.execute("INSERT INTO never VALUES (immuta_encrypt('x'))", &[])), "23514");
    assert_eq!(count_keys(&mut c), 0);
    let first = encrypted_key_id(&mut c, "y");
    let stored: i64 = c.query_one("SELECT id FROM immuta.data_keys", &[]).unwrap().get(0);
    assert_eq!(first, stored, "the session encrypts under the key that exists");
    // A rotation in a statement that then fails.
    assert_eq!(sqlstate(c.execute("SELECT immuta_rotate(), 1/0", &[])), "22012");
    assert_eq!(encrypted_key_id(&mut c, "z"), first);
    // A rotation in a subtransaction that rolls back, inside a transaction that commits.
    c.batch_execute(
        "DO $$ BEGIN BEGIN PERFORM immuta_rotate(); RAISE EXCEPTION 'undo'; \
         EXCEPTION WHEN OTHERS THEN NULL; END; END $$",
    )
    .unwrap();
    assert_eq!(encrypted_key_id(&mut c, "w"), first);
    assert_eq!(count_keys(&mut c), 1);
}

#[test]
fn a_repeatable_read_session_sees_a_rotation_by_its_next_transaction() {
    let pg = Cluster::start(&[]);
    let (mut a, mut b) = (pg.connect(), pg.connect());
    let first = encrypted_key_id(&mut b, "v");
    b.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ").unwrap();
    assert_eq!(encrypted_key_id(&mut b, "v"), first);
    let rotated: i64 = a.query_one("SELECT immuta_rotate()", &[]).unwrap().get(0);
    encrypted_key_id(&mut b, "v");
    b.batch_execute("COMMIT").unwrap();
    assert_eq!(encrypted_key_id(&mut b, "v"), rotated);
}

#[test]
fn encrypting_under_a_current_key_takes_no_lock_and_no_transaction_id() {
    let pg = Cluster::start(&[]);
    let mut c = pg.connect();
    encrypt(&mut c, "v");
    drop(c);
    let (mut c, notices) = pg.connect_recording_notices();
    // The session's first encryption reserves a block of the key's usage counter (a row in
    // immuta.key_usage); the encryptions after it spend that reservation.
    encrypt(&mut c, "warm-up");
    // Rows under twenty named keyrings in turn: the same, with each row's keyring looked up.
    c.batch_execute("SELECT immuta_keyring_create('tenant_' || i) FROM generate_series(1, 20) i").unwrap();
    let named = "SELECT count(immuta_encrypt('v' || i, keyring => 'tenant_' || (i % 20 + 1))) \
                 FROM generate_series(1, 1000) i";
    // The first pass creates the keyrings' keys, whose invalidation reaches this session too:
    // the second reloads what changed, once.
    c.execute(named, &[]).unwrap();
    c.execute(named, &[]).unwrap();
    // Scans of immuta's tables by this backend not yet reported (earlier transactions' too).
    let scans = "SELECT COALESCE(sum(seq_scan + COALESCE(idx_scan, 0)), 0)::int8 \
                 FROM pg_stat_xact_user_tables WHERE schemaname = 'immuta'";
    let mut tx = c.transaction().unwrap();
    let before: i64 = tx.query_one(scans, &[]).unwrap().get(0);
    tx.query_one("SELECT immuta_encrypt('v')", &[]).unwrap();
    tx.query_one(named, &[]).unwrap();
    let after: i64 = tx.query_one(scans, &[]).unwrap().get(0);
    assert_eq!(after, before, "no query read immuta's tables: the keyrings and keys came from the ring");
    let row = tx
        .query_one(
            "SELECT pg_current_xact_id_if_assigned() IS NULL, \
                    (SELECT count(*) FROM pg_locks WHERE pid = pg_backend_pid() \
                       AND relation IN ('immuta.data_keys'::regclass, 'immuta.keyrings'::regclass, \
                                        'immuta.key_usage'::regclass) \
                       AND mode <> 'AccessShareLock')",
            &[],
        )
        .unwrap();
    assert!(row.get::<_, bool>(0), "no transaction id was assigned");
    assert_eq!(row.get::<_, i64>(1), 0, "no lock stronger than a read on the keys table");
    tx.commit().unwrap();
    c.batch_execute("SET default_transaction_read_only = on").unwrap();
    encrypt(&mut c, "v");
    assert!(notices.lock().unwrap().is_empty(), "{:?}", notices.lock().unwrap());
}

#[test]
fn parallel_workers_decrypt_and_encrypt_correctly_in_a_fresh_session() {
    let pg = Cluster::start(&["max_worker_processes = 8", "max_parallel_workers = 4"]);
    let mut c = pg.connect();
    c.batch_execute(
        "CREATE TABLE t AS SELECT i, md5(i::text) AS v, immuta_encrypt(md5(i::text)) AS c \
         FROM generate_series(1, 20000) i; ANALYZE t",
    )
    .unwrap();
    c.execute("SELECT immuta_rotate()", &[]).unwrap();
    drop(c);
    // A fresh session: the workers load the key ring themselves.
    let mut c = pg.connect();
    c.batch_execute(
        "SET max_parallel_workers_per_gather = 2; SET parallel_setup_cost = 0; SET parallel_tuple_cost = 0; \
         SET min_parallel_table_scan_size = 0; SET parallel_leader_participation = off",
    )
    .unwrap();
    let query = "SELECT count(*) FILTER (WHERE immuta_decrypt(c) = v), \
                        count(*) FILTER (WHERE immuta_decrypt(immuta_encrypt(v)) = v) FROM t";
    let plan: Vec<String> = c
        .query(&format!("EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) {query}"), &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(plan.iter().any(|l| l.contains("Workers Launched: 2")), "{plan:?}");
    let row = c.query_one(query, &[]).unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (20000, 20000));
}
