//! System tier: data under old keys (issue 15): `immuta_reencrypt`, the inventory of a column by
//! key, and retiring a key end to end once nothing is left under it.

mod support;

use support::*;

/// `(key_id, keyring, state, is_current, value_count)` rows of the inventory of `t.col`.
fn inventory(c: &mut postgres::Client, col: &str) -> Vec<(i64, String, String, bool, i64)> {
    c.query(&format!("SELECT * FROM immuta_inventory('t', '{col}')"), &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect()
}

#[test]
fn reencryption_moves_every_kind_of_value_to_its_keyrings_current_key_and_leaves_current_ones_as_they_are() {
    let pg = Cluster::start(&[]);
    let mut c = pg.connect();
    c.batch_execute(
        "SELECT immuta_keyring_create('tenant');
         CREATE TABLE t (id int PRIMARY KEY, s bytea, n bytea, a bytea, j bytea, k bytea, big bytea);
         INSERT INTO t SELECT i,
             immuta_encrypt('ssn ' || i, 'row ' || i),
             immuta_encrypt(i * 1.5),
             immuta_encrypt(ARRAY[i, NULL, -i]::int8[]),
             immuta_encrypt(jsonb_build_object('i', i)),
             immuta_encrypt('tenant value ' || i, keyring => 'tenant'),
             immuta_encrypt(repeat('x', 100000) || i)
           FROM generate_series(1, 20) i;",
    )
    .unwrap();
    let old: i64 = one(&mut c, "SELECT immuta_key_id(s) FROM t LIMIT 1");
    let old_tenant: i64 = one(&mut c, "SELECT immuta_key_id(k) FROM t LIMIT 1");
    // Under the current key: the same bytes, and the value is still opened (a wrong context fails).
    assert!(one::<bool>(&mut c, "SELECT bool_and(immuta_reencrypt(n) = n) FROM t"));
    assert!(one::<bool>(&mut c, "SELECT bool_and(immuta_reencrypt(s, 'row ' || id) = s) FROM t"));
    assert_eq!(sqlstate(c.query_one("SELECT immuta_reencrypt(s, 'row 0') FROM t LIMIT 1", &[])), "22023");
    assert_eq!(sqlstate(c.query_one("SELECT immuta_reencrypt(s) FROM t LIMIT 1", &[])), "22023");
    assert_eq!(sqlstate(c.query_one("SELECT immuta_reencrypt(s, NULL) FROM t LIMIT 1", &[])), "22004");
    assert_eq!(sqlstate(c.query_one("SELECT immuta_reencrypt('\\x0102'::bytea)", &[])), "22P03");
    assert_eq!(sqlstate(c.query_one("SELECT immuta_is_current('\\x0102'::bytea)", &[])), "22P03");
    assert!(one::<bool>(&mut c, "SELECT bool_and(immuta_is_current(s) AND immuta_is_current(k)) FROM t"));

    let new: i64 = one(&mut c, "SELECT immuta_rotate()");
    let new_tenant: i64 = one(&mut c, "SELECT immuta_rotate('tenant')");
    assert!(one::<bool>(
        &mut c,
        "SELECT bool_and(NOT immuta_is_current(s) AND NOT immuta_is_current(k)) FROM t"
    ));
    // Both keys in the ring (the hot path): a wrong context is still refused, and the session
    // goes on re-encrypting afterwards.
    assert!(one::<bool>(&mut c, "SELECT bool_and(immuta_reencrypt(s, 'row ' || id) <> s) FROM t"));
    assert_eq!(sqlstate(c.query_one("SELECT immuta_reencrypt(s, 'row 0') FROM t LIMIT 1", &[])), "22023");
    assert_eq!(sqlstate(c.query_one("SELECT immuta_reencrypt(s) FROM t LIMIT 1", &[])), "22023");
    c.batch_execute(
        "UPDATE t SET s = immuta_reencrypt(s, 'row ' || id), n = immuta_reencrypt(n), a = immuta_reencrypt(a),
                      j = immuta_reencrypt(j), k = immuta_reencrypt(k), big = immuta_reencrypt(big)",
    )
    .unwrap();
    let keys: Vec<(i64, i64)> = c
        .query("SELECT DISTINCT immuta_key_id(s), immuta_key_id(k) FROM t", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(keys, vec![(new, new_tenant)], "each value under its own keyring's current key");
    assert!(old != new && old_tenant != new_tenant);
    let intact: i64 = one(
        &mut c,
        "SELECT count(*) FROM t WHERE immuta_decrypt(s, 'row ' || id) = 'ssn ' || id
            AND immuta_decrypt(n, NULL::numeric) = id * 1.5
            AND immuta_decrypt(a, NULL::int8[]) = ARRAY[id, NULL, -id]::int8[]
            AND immuta_decrypt_jsonb(j) = jsonb_build_object('i', id)
            AND immuta_decrypt(k) = 'tenant value ' || id
            AND immuta_decrypt(big) = repeat('x', 100000) || id",
    );
    assert_eq!(intact, 20, "same values, same types, same context");
    // The type travels with the value: a re-encrypted number is still a number.
    assert_eq!(sqlstate(c.query_one("SELECT immuta_decrypt(n) FROM t LIMIT 1", &[])), "42804");
}

#[test]
fn the_inventory_counts_values_per_key_and_a_key_is_retired_once_nothing_is_left_under_it() {
    let pg = Cluster::start(&[]);
    let mut c = pg.connect();
    c.batch_execute(
        "SELECT immuta_keyring_create('tenant');
         CREATE TABLE t (id int PRIMARY KEY, v bytea, other int);
         INSERT INTO t SELECT i, immuta_encrypt('v' || i) FROM generate_series(1, 30) i;
         INSERT INTO t SELECT i, immuta_encrypt('v' || i, keyring => 'tenant') FROM generate_series(31, 40) i;
         INSERT INTO t VALUES (41, NULL);",
    )
    .unwrap();
    let first: i64 = one(&mut c, "SELECT immuta_key_id(v) FROM t WHERE id = 1");
    let tenant_key: i64 = one(&mut c, "SELECT immuta_key_id(v) FROM t WHERE id = 31");
    let second: i64 = one(&mut c, "SELECT immuta_rotate()");
    c.batch_execute("UPDATE t SET v = immuta_encrypt('v' || id) WHERE id <= 10").unwrap();
    assert_eq!(
        inventory(&mut c, "v"),
        vec![
            (first, "default".into(), "decrypt-only".into(), false, 20),
            (tenant_key, "tenant".into(), "active".into(), true, 10),
            (second, "default".into(), "active".into(), true, 10),
        ]
    );
    assert_eq!(sqlstate(c.query("SELECT * FROM immuta_inventory('t', 'other')", &[])), "42804");
    assert_eq!(sqlstate(c.query("SELECT * FROM immuta_inventory('t', 'nope')", &[])), "42703");
    assert_eq!(sqlstate(c.query("SELECT * FROM immuta_inventory('nope', 'v')", &[])), "42P01");

    // Retirement: re-encrypt what is left under the old key, check, disable, destroy.
    c.batch_execute(&format!("UPDATE t SET v = immuta_reencrypt(v) WHERE immuta_key_id(v) = {first}"))
        .unwrap();
    assert!(inventory(&mut c, "v").iter().all(|(id, ..)| *id != first), "nothing left under the old key");
    c.batch_execute(&format!(
        "SELECT immuta_key_disable({first}, 'retired'); SELECT immuta_key_destroy({first}, 'retired')"
    ))
    .unwrap();
    let readable: i64 = one(&mut c, "SELECT count(*) FROM t WHERE immuta_decrypt(v) = 'v' || id");
    assert_eq!(readable, 40, "every value still decrypts after the old key is destroyed");
}

#[test]
fn reencryption_needs_the_decryptor_and_refuses_values_under_disabled_or_destroyed_keys() {
    let pg = Cluster::start(&[]);
    let mut c = pg.connect();
    c.batch_execute(
        "CREATE ROLE dec LOGIN IN ROLE immuta_decryptor;
         CREATE ROLE enc LOGIN IN ROLE immuta_encryptor;
         CREATE ROLE adm LOGIN IN ROLE immuta_admin;
         CREATE TABLE t (id int PRIMARY KEY, v bytea);
         GRANT SELECT, UPDATE ON t TO dec, enc, adm;
         INSERT INTO t SELECT i, immuta_encrypt('v' || i) FROM generate_series(1, 10) i;",
    )
    .unwrap();
    let old: i64 = one(&mut c, "SELECT immuta_key_id(v) FROM t LIMIT 1");
    c.batch_execute("SELECT immuta_rotate()").unwrap();
    let mut enc = pg.connect_as("enc", "postgres");
    assert_eq!(sqlstate(enc.execute("UPDATE t SET v = immuta_reencrypt(v)", &[])), "42501");
    assert_eq!(sqlstate(enc.query("SELECT * FROM immuta_inventory('t', 'v')", &[])), "42501");
    let mut adm = pg.connect_as("adm", "postgres");
    assert_eq!(inventory(&mut adm, "v").len(), 1, "the admin takes the inventory");
    let mut dec = pg.connect_as("dec", "postgres");
    assert_eq!(dec.execute("UPDATE t SET v = immuta_reencrypt(v) WHERE id <= 5", &[]).unwrap(), 5);

    c.batch_execute(&format!("SELECT immuta_key_disable({old}, 'compromised')")).unwrap();
    assert_eq!(sqlstate(dec.execute("UPDATE t SET v = immuta_reencrypt(v)", &[])), "55000");
    c.batch_execute(&format!("SELECT immuta_key_destroy({old}, 'compromised')")).unwrap();
    assert_eq!(sqlstate(dec.execute("UPDATE t SET v = immuta_reencrypt(v)", &[])), "42704");
    let moved: i64 = one(
        &mut dec,
        &format!("SELECT count(*) FROM t WHERE immuta_key_id(v) <> {old} AND immuta_decrypt(v) = 'v' || id"),
    );
    assert_eq!(moved, 5, "the values moved before the key was destroyed are safe");
}

/// A table `t` of `n` rows under a key that is then rotated away: `v` is `'ssn ' || id` bound to
/// the context `ctx` (`'row ' || id`).
fn old_values(c: &mut postgres::Client, n: i32) {
    c.batch_execute(&format!(
        "CREATE TABLE t (id int PRIMARY KEY, v bytea, ctx text NOT NULL);
         INSERT INTO t SELECT i, immuta_encrypt('ssn ' || i, 'row ' || i), 'row ' || i FROM generate_series(1, {n}) i;
         ANALYZE t;
         SELECT immuta_rotate();"
    ))
    .unwrap();
}

fn job(c: &mut postgres::Client) -> (i64, i32, i64, String) {
    let r = c
        .query_one(
            "SELECT id, passes, rows_done, state FROM immuta.jobs_progress ORDER BY id DESC LIMIT 1",
            &[],
        )
        .unwrap();
    (r.get(0), r.get(1), r.get(2), r.get(3))
}

#[test]
fn an_online_job_loses_no_concurrent_write_overwrites_none_and_survives_a_rollover_in_its_middle() {
    let pg = Cluster::start(&[]);
    let mut c = pg.connect();
    old_values(&mut c, 3000);
    // A writer holds row 1500, which it gave the value (and context) of row 2000: still under the
    // old key, so the job must re-encrypt it, from this version and not the one it first read.
    let mut writer = pg.connect();
    writer
        .batch_execute(
            "BEGIN; UPDATE t SET v = (SELECT v FROM t WHERE id = 2000), ctx = 'row 2000' WHERE id = 1500;",
        )
        .unwrap();
    let mut runner = pg.connect();
    let pid: i32 = one(&mut runner, "SELECT pg_backend_pid()");
    let job_thread = std::thread::spawn(move || {
        runner.batch_execute(
            "CALL immuta_reencrypt_column('t', 'v', context_column => 'ctx', batch_size => 200)",
        )
    });
    wait_for_lock_wait(&mut c, pid, "the job waiting for the writer's row");
    let moved_before: i64 = one(&mut c, "SELECT rows_done FROM immuta.jobs");
    assert!(moved_before > 0, "batches before the writer's row are committed");
    // Meanwhile: a rollover, and other writers' inserts, deletes and updates, all committed.
    let newest: i64 = one(&mut c, "SELECT immuta_rotate()");
    c.batch_execute(
        "INSERT INTO t SELECT i, immuta_encrypt('ssn ' || i, 'row ' || i), 'row ' || i FROM generate_series(3001, 3100) i;
         DELETE FROM t WHERE id <= 10;
         UPDATE t SET v = immuta_encrypt('changed', 'row 2900') WHERE id = 2900;",
    )
    .unwrap();
    writer.batch_execute("COMMIT").unwrap();
    job_thread.join().unwrap().unwrap();

    let wrong: i64 = one(
        &mut c,
        "SELECT count(*) FROM t WHERE immuta_decrypt(v, ctx) IS DISTINCT FROM
           CASE id WHEN 1500 THEN 'ssn 2000' WHEN 2900 THEN 'changed' ELSE 'ssn ' || id END",
    );
    assert_eq!(wrong, 0, "every row holds what its last writer wrote");
    assert_eq!(one::<i64>(&mut c, "SELECT count(*) FROM t"), 3090, "nothing lost, nothing revived");
    assert_eq!(
        inventory(&mut c, "v").iter().map(|r| r.0).collect::<Vec<_>>(),
        vec![newest],
        "all under the newest key"
    );
    let (_, _, done, state) = job(&mut c);
    assert_eq!(state, "done");
    // 2,989 rows were the job's to move (the writers wrote the others, or deleted them, under the
    // newest key), and those it had moved before the rollover, deleted ones aside, twice.
    assert!(done >= 2979 + moved_before, "{done} rows moved, {moved_before} before the rollover");
}

#[test]
fn a_cancelled_or_crashed_job_resumes_where_it_stopped_and_loses_nothing() {
    // Commits are flushed before they return, so the crash keeps every finished batch.
    let pg = Cluster::start(&["synchronous_commit = on"]);
    let mut c = pg.connect();
    old_values(&mut c, 3000);
    let call =
        "CALL immuta_reencrypt_column('t', 'v', context_column => 'ctx', batch_size => 100, pause => '1 ms')";

    // Cancelled while it waits for a row another session holds: the batch in progress rolls
    // back, the ones before it stay.
    let mut holder = pg.connect();
    holder.batch_execute("BEGIN; SELECT FROM t WHERE id = 1500 FOR UPDATE").unwrap();
    let mut runner = pg.connect();
    let pid: i32 = one(&mut runner, "SELECT pg_backend_pid()");
    let job_thread =
        std::thread::spawn(move || (runner.batch_execute(call).map_err(|e| e.code().cloned()), runner));
    wait_for_lock_wait(&mut c, pid, "the job waiting for row 1500");
    assert_eq!(job(&mut c).3, "running");
    c.batch_execute(&format!("SELECT pg_cancel_backend({pid})")).unwrap();
    let (outcome, mut runner) = job_thread.join().unwrap();
    assert_eq!(outcome.unwrap_err(), Some(postgres::error::SqlState::QUERY_CANCELED));
    // The client has the error before the backend reports itself idle: the view says
    // interrupted once it has (the session keeps the job's lock, idle).
    wait_until(
        &mut c,
        "SELECT state = 'interrupted' FROM immuta.jobs_progress ORDER BY id DESC LIMIT 1",
        "the cancelled job shown interrupted",
    );
    let (id, _, done, state) = job(&mut c);
    assert_eq!(state, "interrupted");
    assert!(done > 0 && done < 1500, "{done}");
    let moved: i64 = one(&mut c, "SELECT count(*) FROM t WHERE immuta_key_is_current(immuta_key_id(v))");
    assert_eq!(moved, done, "what the job counts is exactly what was committed");
    holder.batch_execute("ROLLBACK; BEGIN; SELECT FROM t WHERE id = 2800 FOR UPDATE").unwrap();

    // Crashed: the backend is killed while it waits for row 2800; the server restarts.
    let pid: i32 = one(&mut runner, "SELECT pg_backend_pid()");
    let job_thread = std::thread::spawn(move || runner.batch_execute(call).map(|_| ()));
    wait_for_lock_wait(&mut c, pid, "the job waiting for row 2800");
    let log_before = pg.log().len();
    assert!(std::process::Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap().success());
    assert!(job_thread.join().unwrap().is_err());
    drop(holder);
    pg.wait_for_crash_restart(log_before);
    let mut c = pg.connect();
    let (same, _, done_before_crash, state) = job(&mut c);
    assert_eq!((same, state.as_str()), (id, "interrupted"));
    assert!(done_before_crash > done);

    // Resumed in a new session: the same job, from where it stopped, to the end.
    c.batch_execute("CALL immuta_reencrypt_column('t', 'v', context_column => 'ctx', batch_size => 500)")
        .unwrap();
    let (same, passes, total, state) = job(&mut c);
    assert_eq!((same, passes, state.as_str()), (id, 1, "done"));
    assert_eq!(total, 3000, "each row moved exactly once over the three runs");
    let readable: i64 = one(&mut c, "SELECT count(*) FROM t WHERE immuta_decrypt(v, ctx) = 'ssn ' || id");
    assert_eq!(readable, 3000);
    assert_eq!(one::<i64>(&mut c, "SELECT count(*) FROM immuta.jobs"), 1);
}

#[test]
fn a_job_runs_with_its_callers_privileges_and_each_role_sees_its_own_jobs() {
    let pg = Cluster::start(&[]);
    let mut c = pg.connect();
    old_values(&mut c, 100);
    c.batch_execute(
        "CREATE ROLE dec LOGIN IN ROLE immuta_decryptor;
         CREATE ROLE dec2 LOGIN IN ROLE immuta_decryptor;
         CREATE ROLE enc LOGIN IN ROLE immuta_encryptor;
         GRANT SELECT, UPDATE ON t TO dec, enc;
         GRANT SELECT ON t TO dec2;",
    )
    .unwrap();
    let call = "CALL immuta_reencrypt_column('t', 'v', context_column => 'ctx')";
    assert_eq!(sqlstate(pg.connect_as("enc", "postgres").batch_execute(call)), "42501", "not a decryptor");
    assert_eq!(
        sqlstate(pg.connect_as("dec2", "postgres").batch_execute(call)),
        "42501",
        "no UPDATE on the table"
    );
    let mut dec = pg.connect_as("dec", "postgres");
    dec.batch_execute(call).unwrap();
    assert_eq!(one::<i64>(&mut dec, "SELECT count(*) FROM immuta.jobs_progress WHERE state = 'done'"), 1);
    let mut dec2 = pg.connect_as("dec2", "postgres");
    assert_eq!(
        one::<i64>(&mut dec2, "SELECT count(*) FROM immuta.jobs"),
        0,
        "another role's job is not seen"
    );
    assert_eq!(one::<i64>(&mut dec2, "SELECT count(*) FROM immuta.jobs_progress"), 0);
    assert_eq!(dec2.execute("UPDATE immuta.jobs SET next_block = 0", &[]).unwrap(), 0, "nor touched");
    assert_eq!(
        sqlstate(dec2.execute("INSERT INTO immuta.jobs (kind, relid, column_name, batch_size, pause, started_by) VALUES ('reencrypt', 't'::regclass, 'v', 1, '0', 'dec')", &[])),
        "42501",
        "nobody writes a job in another role's name"
    );
    assert_eq!(sqlstate(c.batch_execute("CALL immuta_reencrypt_column('t', 'ctx')")), "42804");
    c.batch_execute(
        "CREATE VIEW tv AS SELECT * FROM t;
         CREATE TABLE hidden (id int, v bytea); ALTER TABLE hidden ENABLE ROW LEVEL SECURITY;
         GRANT SELECT, UPDATE ON hidden TO dec;",
    )
    .unwrap();
    assert_eq!(sqlstate(c.batch_execute("CALL immuta_reencrypt_column('tv', 'v')")), "0A000", "not a table");
    let hidden = "CALL immuta_reencrypt_column('hidden', 'v')";
    assert_eq!(sqlstate(dec.batch_execute(hidden)), "0A000", "rows the caller cannot see would stay behind");
    assert_eq!(
        sqlstate(c.batch_execute("CALL immuta_reencrypt_column('t', 'v', context_column => 'nope')")),
        "42703"
    );
    assert_eq!(sqlstate(c.batch_execute("CALL immuta_reencrypt_column('t', 'v', batch_size => 0)")), "22023");
}

/// `(table, column, count)` rows of `immuta_key_references(key)`.
fn references(c: &mut postgres::Client, key: i64) -> Vec<(String, String, i64)> {
    c.query("SELECT table_name::text, column_name::text, value_count FROM immuta_key_references($1)", &[&key])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

#[test]
fn destroying_a_key_that_registered_columns_still_hold_is_refused_naming_them_unless_forced() {
    let pg = Cluster::start(&[]);
    let mut c = pg.connect();
    c.batch_execute(
        "CREATE ROLE adm LOGIN IN ROLE immuta_admin;
         CREATE ROLE dec LOGIN IN ROLE immuta_decryptor;
         CREATE TABLE t (id int PRIMARY KEY, v bytea, ctx text);
         CREATE TABLE u (id int PRIMARY KEY, w bytea);
         CREATE TABLE gone (w bytea);
         INSERT INTO t SELECT i, immuta_encrypt('t' || i, 'c' || i), 'c' || i FROM generate_series(1, 50) i;
         INSERT INTO u SELECT i, immuta_encrypt('u' || i) FROM generate_series(1, 7) i;
         INSERT INTO gone SELECT immuta_encrypt('g');
         GRANT SELECT, UPDATE ON t, u TO dec;
         GRANT SELECT ON t, u TO adm;
         SELECT immuta_register_column('u', 'w');
         SELECT immuta_register_column('gone', 'w');
         DROP TABLE gone;",
    )
    .unwrap();
    let old: i64 = one(&mut c, "SELECT immuta_key_id(v) FROM t LIMIT 1");
    let new: i64 = one(&mut c, "SELECT immuta_rotate()");
    // Rotate, re-encrypt: the job registers t.v; u.w was registered by hand and is not done yet.
    let mut dec = pg.connect_as("dec", "postgres");
    dec.batch_execute("CALL immuta_reencrypt_column('t', 'v', context_column => 'ctx')").unwrap();
    let mut adm = pg.connect_as("adm", "postgres");
    assert_eq!(
        references(&mut adm, old),
        vec![("t".into(), "v".into(), 0), ("u".into(), "w".into(), 7)],
        "a dropped table is no longer counted"
    );
    adm.batch_execute(&format!("SELECT immuta_key_disable({old}, 'retiring')")).unwrap();
    let refused = adm.batch_execute(&format!("SELECT immuta_key_destroy({old}, 'retiring')"));
    let text = error_text(adm.batch_execute(&format!("SELECT immuta_key_destroy({old}, 'retiring')")));
    assert_eq!(sqlstate(refused), "2BP01");
    assert!(text.contains("public.u.w: 7 values") && !text.contains("public.t.v"), "{text}");
    assert_eq!(one::<String>(&mut c, &format!("SELECT state FROM immuta.keys WHERE id = {old}")), "disabled");

    // The workflow: enable, re-encrypt what is left, nothing references the key, disable, destroy.
    adm.batch_execute(&format!("SELECT immuta_key_enable({old}, 'one column left')")).unwrap();
    dec.batch_execute("CALL immuta_reencrypt_column('u', 'w')").unwrap();
    assert!(references(&mut adm, old).iter().all(|r| r.2 == 0));
    adm.batch_execute(&format!(
        "SELECT immuta_key_disable({old}, 'retired'); SELECT immuta_key_destroy({old}, 'retired')"
    ))
    .unwrap();
    let readable: i64 = one(
        &mut c,
        "SELECT (SELECT count(*) FROM t WHERE immuta_decrypt(v, ctx) = 't' || id)
              + (SELECT count(*) FROM u WHERE immuta_decrypt(w) = 'u' || id)",
    );
    assert_eq!(readable, 57);

    // Forced: the values are given up on purpose, and the audit log says it was forced.
    c.batch_execute(&format!("SELECT immuta_rotate(); SELECT immuta_key_disable({new}, 'compromised')"))
        .unwrap();
    let text = error_text(adm.batch_execute(&format!("SELECT immuta_key_destroy({new}, 'compromised')")));
    assert!(text.contains("public.t.v: 50 values; public.u.w: 7 values"), "{text}");
    assert!(one::<bool>(
        &mut adm,
        &format!("SELECT immuta_key_destroy({new}, 'compromised', force => true)")
    ));
    let forced: bool = one(
        &mut c,
        &format!("SELECT (detail->>'forced')::bool FROM immuta.audit_log WHERE key_id = {new} ORDER BY id DESC LIMIT 1"),
    );
    assert!(forced);
    assert_eq!(sqlstate(c.query_one("SELECT immuta_decrypt(w) FROM u LIMIT 1", &[])), "42704");

    // An admin who cannot read a registered column cannot tell whether it holds the key: refused,
    // unless forced. Registering takes UPDATE on the column; unregistering too.
    c.batch_execute(
        "CREATE TABLE secret (s bytea); INSERT INTO secret SELECT immuta_encrypt('s');
         SELECT immuta_register_column('secret', 's');",
    )
    .unwrap();
    let third: i64 = one(&mut c, "SELECT immuta_key_id(s) FROM secret");
    c.batch_execute(&format!("SELECT immuta_rotate(); SELECT immuta_key_disable({third}, 'x')")).unwrap();
    assert_eq!(sqlstate(adm.batch_execute(&format!("SELECT immuta_key_destroy({third}, 'x')"))), "42501");
    assert_eq!(sqlstate(dec.batch_execute("SELECT immuta_register_column('secret', 's')")), "42501");
    assert!(!one::<bool>(&mut dec, "SELECT immuta_unregister_column('secret', 's')"), "not its column");
    assert_eq!(
        sqlstate(dec.batch_execute(
            "INSERT INTO immuta.encrypted_columns (relid, column_name) VALUES ('secret'::regclass, 's')"
        )),
        "42501"
    );
    assert!(one::<bool>(&mut adm, &format!("SELECT immuta_key_destroy({third}, 'x', force => true)")));
    // The admin may remove any column from the registry, so that nobody can keep destruction
    // refused for good.
    assert!(one::<bool>(&mut adm, "SELECT immuta_unregister_column('secret', 's')"));
    assert_eq!(
        one::<i64>(&mut c, "SELECT count(*) FROM immuta.encrypted_columns WHERE relid = 'secret'::regclass"),
        0
    );
}
