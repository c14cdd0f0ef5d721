//! System tier: blind indexes (issue 16). Equality lookups and uniqueness on encrypted columns
//! through a plain btree index on a term column, kept in step by immuta's trigger and job; index
//! key rotation with lookups working throughout; keyrings keeping terms apart; crypto-shredding
//! reaching the terms; dump/restore and a standby.

mod support;

use std::time::{Duration, Instant};

use support::*;

/// Rows whose term column is not the term of their encrypted column (trigger or job missed one).
const OUT_OF_STEP: &str = "SELECT count(*) FROM patients
    WHERE ssn_bi IS DISTINCT FROM immuta.blind_index_of(ssn, false, NULL, 'patients.ssn', NULL)";

fn explain(c: &mut postgres::Client, query: &str) -> String {
    c.query(&format!("EXPLAIN (COSTS OFF) {query}"), &[])
        .unwrap()
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A table of `n` patients whose SSNs are encrypted, with a term column kept by immuta and a
/// UNIQUE btree index on it.
fn patients(c: &mut postgres::Client, n: i32) {
    c.batch_execute(&format!(
        "SELECT immuta_blind_index_create('patients.ssn');
         CREATE TABLE patients (id int PRIMARY KEY, ssn bytea, ssn_bi bytea);
         INSERT INTO patients SELECT i, immuta_encrypt(pg_catalog.format('123-45-%s', i)) FROM generate_series(1, {n}) i;
         CREATE UNIQUE INDEX patients_ssn_bi ON patients (ssn_bi);
         ANALYZE patients;"
    ))
    .unwrap();
    c.batch_execute(
        "CALL immuta_blind_index_column('patients', 'ssn', 'ssn_bi', 'patients.ssn', batch_size => 500)",
    )
    .unwrap();
}

fn find(c: &mut postgres::Client, ssn: &str) -> Vec<i32> {
    c.query(
        "SELECT id FROM patients WHERE ssn_bi = immuta_blind_index($1::text, 'patients.ssn') ORDER BY id",
        &[&ssn],
    )
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

fn find_any(c: &mut postgres::Client, ssn: &str) -> Vec<i32> {
    c.query(
        "SELECT id FROM patients WHERE ssn_bi = ANY(immuta_blind_indexes($1::text, 'patients.ssn')) ORDER BY id",
        &[&ssn],
    )
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

#[test]
fn lookups_and_uniqueness_go_through_a_btree_index_and_the_trigger_covers_every_write() {
    let pg = Cluster::start(&[]);
    let mut c = pg.connect();
    patients(&mut c, 20_000);
    assert_eq!(one::<i64>(&mut c, OUT_OF_STEP), 0, "the job filled every term");
    assert_eq!(find(&mut c, "123-45-4242"), vec![4242]);
    assert_eq!(find(&mut c, "123-45-999999"), Vec::<i32>::new());
    let plan = explain(
        &mut c,
        "SELECT id FROM patients WHERE ssn_bi = immuta_blind_index('123-45-4242', 'patients.ssn')",
    );
    assert!(plan.contains("Index Scan using patients_ssn_bi") || plan.contains("Index Only Scan"), "{plan}");
    let plan = explain(
        &mut c,
        "SELECT id FROM patients WHERE ssn_bi = ANY(immuta_blind_indexes('123-45-4242', 'patients.ssn'))",
    );
    assert!(plan.contains("patients_ssn_bi"), "{plan}");
    // Terms are 2 bytes of version and 16 of MAC by default.
    assert_eq!(one::<i32>(&mut c, "SELECT length(immuta_blind_index('x', 'patients.ssn'))"), 18);

    // The UNIQUE index enforces uniqueness of the plaintext, whatever the random ciphertext.
    let dup = c.execute("INSERT INTO patients (id, ssn) VALUES (20001, immuta_encrypt('123-45-77'))", &[]);
    assert_eq!(sqlstate(dup), "23505");

    // INSERT, UPDATE, upsert and COPY all leave the term in step.
    c.batch_execute(
        "INSERT INTO patients (id, ssn) VALUES (30001, immuta_encrypt('999-00-0001')), (30002, NULL);
         UPDATE patients SET ssn = immuta_encrypt('999-00-0003') WHERE id = 3;
         UPDATE patients SET ssn = NULL WHERE id = 4;
         INSERT INTO patients (id, ssn) VALUES (5, immuta_encrypt('999-00-0005'))
             ON CONFLICT (id) DO UPDATE SET ssn = EXCLUDED.ssn;
         INSERT INTO patients (id, ssn) VALUES (30003, immuta_encrypt('999-00-0006'))
             ON CONFLICT (id) DO UPDATE SET ssn = EXCLUDED.ssn;
         -- A term written directly is the writer's business; the next write of a value fixes it,
         -- and an UPDATE that leaves the value alone computes nothing.
         UPDATE patients SET ssn_bi = NULL WHERE id = 6;
         UPDATE patients SET ssn_bi = NULL WHERE id = 7;
         UPDATE patients SET ssn = immuta_encrypt('123-45-6') WHERE id = 6;",
    )
    .unwrap();
    let copied: Vec<u8> = c.query_one("SELECT immuta_encrypt('999-00-0007')", &[]).unwrap().get(0);
    let hex: String = copied.iter().map(|b| format!("{b:02x}")).collect();
    let mut copy = c.copy_in("COPY patients (id, ssn) FROM STDIN").unwrap();
    std::io::Write::write_all(&mut copy, format!("30004\t\\\\x{hex}\n").as_bytes()).unwrap();
    copy.finish().unwrap();
    assert_eq!(one::<i64>(&mut c, OUT_OF_STEP), 1, "every write's term is its value's, but row 7's");
    c.batch_execute("UPDATE patients SET ssn = immuta_encrypt('123-45-7') WHERE id = 7").unwrap();
    assert_eq!(one::<i64>(&mut c, OUT_OF_STEP), 0);
    assert_eq!(find(&mut c, "999-00-0001"), vec![30001]);
    assert_eq!(find(&mut c, "999-00-0003"), vec![3]);
    assert_eq!(find(&mut c, "123-45-3"), Vec::<i32>::new(), "the old term went with the old value");
    assert_eq!(find(&mut c, "999-00-0005"), vec![5]);
    assert_eq!(find(&mut c, "999-00-0006"), vec![30003]);
    assert_eq!(find(&mut c, "999-00-0007"), vec![30004]);
    assert_eq!(find(&mut c, "123-45-6"), vec![6]);
    assert_eq!(
        one::<i64>(&mut c, "SELECT count(*) FROM patients WHERE id IN (4, 30002) AND ssn_bi IS NULL"),
        2
    );

    // Writing a value and having its term computed is opening it: a writer without
    // immuta_decryptor is refused, not given an equality oracle on ciphertexts.
    c.batch_execute(
        "CREATE ROLE writer LOGIN; GRANT immuta_encryptor TO writer; GRANT ALL ON patients TO writer;
         CREATE ROLE looker LOGIN; GRANT immuta_decryptor TO looker; GRANT SELECT ON patients TO looker;",
    )
    .unwrap();
    let mut writer = pg.connect_as("writer", "postgres");
    assert_eq!(
        sqlstate(writer.execute("INSERT INTO patients (id, ssn) VALUES (40001, immuta_encrypt('a'))", &[])),
        "42501"
    );
    assert_eq!(
        sqlstate(writer.query_one(
            "SELECT immuta.blind_index_of(ssn, false, NULL, 'patients.ssn', NULL) FROM patients WHERE id = 1",
            &[]
        )),
        "42501"
    );
    // Nor may it compute terms at all: with a guess at an SSN, a term is as good as decrypting.
    assert_eq!(
        sqlstate(writer.query_one("SELECT immuta_blind_index('123-45-4242', 'patients.ssn')", &[])),
        "42501"
    );
    // A reader (immuta_decryptor) looks rows up.
    let mut looker = pg.connect_as("looker", "postgres");
    assert_eq!(find(&mut looker, "123-45-4242"), vec![4242]);
    // Administration is the admin's.
    assert_eq!(sqlstate(looker.query_one("SELECT immuta_blind_index_rotate('patients.ssn')", &[])), "42501");

    // Errors: unknown index, bad names and lengths, NULL arguments, a duplicate.
    assert_eq!(sqlstate(c.query_one("SELECT immuta_blind_index('x', 'no.such.index')", &[])), "42704");
    assert_eq!(sqlstate(c.query_one("SELECT immuta_blind_index('x', 'bad name!')", &[])), "22023");
    assert_eq!(sqlstate(c.query_one("SELECT immuta_blind_index('x', NULL)", &[])), "22004");
    assert_eq!(
        sqlstate(c.query_one("SELECT immuta_blind_index('x', 'patients.ssn', 'no_such_keyring')", &[])),
        "42704"
    );
    assert_eq!(sqlstate(c.query_one("SELECT immuta_blind_index_create('patients.ssn')", &[])), "42710");
    // A term is made by the index of the value's own keyring, never another's.
    c.batch_execute(
        "SELECT immuta_keyring_create('other'), immuta_blind_index_create('patients.ssn', 'other')",
    )
    .unwrap();
    let foreign = c.query_one(
        "SELECT immuta.blind_index_of(immuta_encrypt('x'), false, NULL, 'patients.ssn', 'other')",
        &[],
    );
    assert_eq!(sqlstate(foreign), "22023");
    assert_eq!(
        sqlstate(c.query_one("SELECT immuta_blind_index_create('short', term_length => 3)", &[])),
        "22023"
    );
    assert_eq!(
        sqlstate(c.query_one("SELECT immuta_blind_index_create('long', term_length => 33)", &[])),
        "22023"
    );
    assert_eq!(one::<Option<Vec<u8>>>(&mut c, "SELECT immuta_blind_index(NULL::text, 'patients.ssn')"), None);
    let short: i32 = one(&mut c, "SELECT length(immuta_blind_index('x', 'short8', 'default')) FROM (SELECT immuta_blind_index_create('short8', term_length => 8)) k");
    assert_eq!(short, 10);
    // An index key's id is no data key's: a ciphertext naming it names an unknown key.
    let index_key: i64 = one(
        &mut c,
        "SELECT id FROM immuta.blind_index_keys WHERE name = 'patients.ssn' AND keyring = 'default'",
    );
    assert_eq!(sqlstate(c.query_one("SELECT immuta_key_disable($1, 'no')", &[&index_key])), "42704");
    let audit: i64 = one(&mut c, "SELECT count(*) FROM immuta.audit_log WHERE event = 'index key created'");
    assert_eq!(audit, 3);
}

#[test]
fn every_type_has_its_own_terms_and_a_stored_value_has_the_term_of_its_plaintext() {
    let pg = Cluster::start(&[]);
    let mut c = pg.connect();
    c.batch_execute(
        "SELECT immuta_blind_index_create('typed');
         CREATE TABLE typed (id serial PRIMARY KEY, v bytea, bi bytea);",
    )
    .unwrap();
    c.batch_execute("CALL immuta_blind_index_column('typed', 'v', 'bi', 'typed')").unwrap();
    let values = [
        "'00123'::text",
        "'123'::int4",
        "'123'::int2",
        "'123'::int8",
        "'123.50'::numeric",
        "'1.5'::float4",
        "'1.5'::float8",
        "true",
        "'2024-02-29'::date",
        "'12:34:56'::time",
        "'12:34:56+02'::timetz",
        "'2024-02-29 12:00'::timestamp",
        "'2024-02-29 12:00+00'::timestamptz",
        "'1 day 2 hours'::interval",
        "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid",
        "'\\x0102ff'::bytea",
        "'{\"a\": [1, 2]}'::jsonb",
        "'{\"a\": 1}'::json",
        "'192.168.0.1'::inet",
        "'10.0.0.0/8'::cidr",
        "'08:00:2b:01:02:03'::macaddr",
        "'08:00:2b:01:02:03:04:05'::macaddr8",
        "'12.34'::money",
        "ARRAY['a', NULL, 'c']::text[]",
        "ARRAY[1, 2, 3]::int4[]",
    ];
    for v in values {
        c.batch_execute(&format!("INSERT INTO typed (v) VALUES (immuta_encrypt({v}))")).unwrap();
        let same: bool = one(
            &mut c,
            &format!("SELECT bi = immuta_blind_index({v}, 'typed') FROM typed ORDER BY id DESC LIMIT 1"),
        );
        assert!(same, "the stored {v} has the term of its plaintext");
    }
    let distinct: i64 = one(&mut c, "SELECT count(DISTINCT bi) FROM typed");
    assert_eq!(distinct as usize, values.len(), "no two types share a term");
    // A string literal is text; '00123' and 123 differ.
    let text_vs_int: bool =
        one(&mut c, "SELECT immuta_blind_index('00123', 'typed') <> immuta_blind_index(123, 'typed')");
    assert!(text_vs_int);
    // Normalisation is the caller's.
    let case: bool = one(
        &mut c,
        "SELECT immuta_blind_index(lower('A@Example.com'), 'typed') = immuta_blind_index('a@example.com', 'typed')
            AND immuta_blind_index('A@Example.com', 'typed') <> immuta_blind_index('a@example.com', 'typed')",
    );
    assert!(case);
    // With a context: the trigger opens each value with its row's context.
    c.batch_execute(
        "CREATE TABLE bound (id int PRIMARY KEY, v bytea, bi bytea);
         INSERT INTO bound VALUES (1, immuta_encrypt('x', 'row 1'), NULL);",
    )
    .unwrap();
    c.batch_execute("ALTER TABLE bound ADD COLUMN ctx text; UPDATE bound SET ctx = 'row 1';").unwrap();
    c.batch_execute("CALL immuta_blind_index_column('bound', 'v', 'bi', 'typed', context_column => 'ctx')")
        .unwrap();
    assert!(one::<bool>(&mut c, "SELECT bi = immuta_blind_index('x', 'typed') FROM bound"));
    assert_eq!(
        sqlstate(c.execute("INSERT INTO bound VALUES (2, immuta_encrypt('y', 'row 2'), NULL, 'row 3')", &[])),
        "22023"
    );
}

#[test]
fn an_index_key_is_rotated_with_lookups_working_throughout_and_then_retired() {
    let pg = Cluster::start(&[]);
    let mut c = pg.connect();
    patients(&mut c, 3000);
    assert_eq!(one::<i32>(&mut c, "SELECT immuta_blind_index_rotate('patients.ssn')"), 2);
    // Rows written from now on get version 2; the others still have version 1; either is found.
    c.batch_execute("INSERT INTO patients (id, ssn) VALUES (5001, immuta_encrypt('555-55-5555'))").unwrap();
    assert_eq!(one::<i32>(&mut c, "SELECT get_byte(ssn_bi, 1) FROM patients WHERE id = 5001"), 2);
    assert_eq!(find_any(&mut c, "123-45-10"), vec![10]);
    assert_eq!(find_any(&mut c, "555-55-5555"), vec![5001]);
    assert_eq!(find(&mut c, "123-45-10"), Vec::<i32>::new(), "the newest version alone misses old terms");
    let states: Vec<String> = c
        .query("SELECT state FROM immuta.blind_index_keys WHERE name = 'patients.ssn' ORDER BY version", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(states, ["previous", "active"]);
    // Retiring version 1 now would make 3000 rows unfindable: refused, naming the column.
    let refused = c.query_one("SELECT immuta_blind_index_retire('patients.ssn', 'too early')", &[]);
    let text = error_text(refused);
    assert!(text.contains("2BP01") || text.contains("public.patients.ssn_bi: 3000 terms"), "{text}");

    // The job recomputes the terms; a session holds row 1501, so the job waits half-way: lookups
    // of rows on both sides of it work with immuta_blind_indexes.
    let mut holder = pg.connect();
    holder.batch_execute("BEGIN; SELECT FROM patients WHERE id = 1501 FOR UPDATE").unwrap();
    let mut runner = pg.connect();
    let pid: i32 = one(&mut runner, "SELECT pg_backend_pid()");
    let job = std::thread::spawn(move || {
        runner.batch_execute(
            "CALL immuta_blind_index_column('patients', 'ssn', 'ssn_bi', 'patients.ssn', batch_size => 200)",
        )
    });
    wait_for_lock_wait(&mut c, pid, "the job waiting for row 1501");
    assert_eq!(one::<i32>(&mut c, "SELECT get_byte(ssn_bi, 1) FROM patients WHERE id = 10"), 2);
    assert_eq!(one::<i32>(&mut c, "SELECT get_byte(ssn_bi, 1) FROM patients WHERE id = 2900"), 1);
    for (ssn, id) in [("123-45-10", 10), ("123-45-1501", 1501), ("123-45-2900", 2900), ("555-55-5555", 5001)]
    {
        assert_eq!(find_any(&mut c, ssn), vec![id], "{ssn} during the job");
    }
    holder.batch_execute("COMMIT").unwrap();
    job.join().unwrap().unwrap();
    assert_eq!(one::<i64>(&mut c, "SELECT count(*) FROM patients WHERE get_byte(ssn_bi, 1) <> 2"), 0);
    assert_eq!(find(&mut c, "123-45-2900"), vec![2900]);

    // Now version 1 retires: its key is erased, its terms no longer match, lookups go on.
    assert_eq!(one::<i32>(&mut c, "SELECT immuta_blind_index_retire('patients.ssn', 'rotation done')"), 1);
    let erased: bool = one(&mut c, "SELECT wrapped_key IS NULL FROM immuta.index_keys WHERE version = 1");
    assert!(erased);
    let terms: i32 = one(&mut c, "SELECT cardinality(immuta_blind_indexes('x', 'patients.ssn'))");
    assert_eq!(terms, 1);
    assert_eq!(find_any(&mut c, "123-45-2900"), vec![2900]);
    assert_eq!(one::<i64>(&mut c, OUT_OF_STEP), 0);
    let events: Vec<String> = c
        .query("SELECT event FROM immuta.audit_log WHERE event LIKE 'index key%' ORDER BY id", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(events, ["index key created", "index key rotated", "index key destroyed"]);
    // Retiring again has nothing to do.
    assert_eq!(one::<i32>(&mut c, "SELECT immuta_blind_index_retire('patients.ssn', 'again')"), 0);

    // A transaction that computed terms with a version retired meanwhile does not commit.
    assert_eq!(one::<i32>(&mut c, "SELECT immuta_blind_index_rotate('patients.ssn')"), 3);
    let mut late = pg.connect();
    late.batch_execute("BEGIN; SELECT immuta_blind_index('x', 'patients.ssn')").unwrap();
    c.batch_execute("CALL immuta_blind_index_column('patients', 'ssn', 'ssn_bi', 'patients.ssn')").unwrap();
    c.batch_execute("SELECT immuta_blind_index_rotate('patients.ssn')").unwrap();
    c.batch_execute("SELECT immuta_blind_index_retire('patients.ssn', 'forced', force => true)").unwrap();
    assert_eq!(sqlstate(late.batch_execute("COMMIT")), "40001");
}

#[test]
fn keyrings_keep_terms_apart_and_destroying_a_keyring_shreds_its_terms() {
    let pg = Cluster::start(&[]);
    let mut c = pg.connect();
    c.batch_execute(
        "SELECT immuta_keyring_create('t1'), immuta_keyring_create('t2');
         SELECT immuta_blind_index_create('users.email'), immuta_blind_index_create('users.email', 't1'),
                immuta_blind_index_create('users.email', 't2');
         CREATE TABLE users (id int PRIMARY KEY, tenant text, email bytea, email_bi bytea);
         CREATE INDEX ON users (email_bi);",
    )
    .unwrap();
    // Each value's term is made by its own keyring's index (keyring NULL: the value's keyring).
    c.batch_execute("CALL immuta_blind_index_column('users', 'email', 'email_bi', 'users.email')").unwrap();
    c.batch_execute(
        "INSERT INTO users VALUES
           (1, 't1', immuta_encrypt('same@example.com', keyring => 't1'), NULL),
           (2, 't2', immuta_encrypt('same@example.com', keyring => 't2'), NULL),
           (3, NULL, immuta_encrypt('same@example.com'), NULL);",
    )
    .unwrap();
    let distinct: i64 = one(&mut c, "SELECT count(DISTINCT email_bi) FROM users");
    assert_eq!(distinct, 3, "one value, three keyrings, three unrelated terms");
    let found = |c: &mut postgres::Client, keyring: &str| -> Vec<i32> {
        c.query(
            "SELECT id FROM users WHERE email_bi = immuta_blind_index('same@example.com', 'users.email', $1) ORDER BY id",
            &[&keyring],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
    };
    assert_eq!(found(&mut c, "t1"), vec![1]);
    assert_eq!(found(&mut c, "t2"), vec![2]);
    assert_eq!(found(&mut c, "default"), vec![3]);
    // A keyring without the index: writing a value of it is refused, clearly.
    c.batch_execute("SELECT immuta_keyring_create('t3')").unwrap();
    assert_eq!(
        sqlstate(
            c.execute("INSERT INTO users VALUES (4, 't3', immuta_encrypt('x', keyring => 't3'), NULL)", &[])
        ),
        "42704"
    );

    // Crypto-shredding t1 destroys its index key too: its terms can no longer be computed (a
    // guess cannot be tested against them), while t2 goes on.
    let destroyed: i32 = one(&mut c, "SELECT immuta_keyring_destroy('t1', 'tenant left')");
    assert_eq!(destroyed, 2, "its data key and its index key");
    assert_eq!(
        sqlstate(c.query_one("SELECT immuta_blind_index('same@example.com', 'users.email', 't1')", &[])),
        "55000"
    );
    assert_eq!(found(&mut c, "t2"), vec![2]);
    let erased: bool =
        one(&mut c, "SELECT bool_and(wrapped_key IS NULL) FROM immuta.index_keys WHERE keyring = 't1'");
    assert!(erased);
    let state: String = one(&mut c, "SELECT state FROM immuta.blind_index_keys WHERE keyring = 't1'");
    assert_eq!(state, "destroyed");
    // A rewrap rewraps the index keys left (default's and t2's) with the data keys.
    let rewrapped: i32 = one(&mut c, "SELECT immuta_rewrap()");
    assert_eq!(rewrapped, 4, "two data keys (default, t2) and two index keys");
    assert_eq!(found(&mut c, "t2"), vec![2]);
}

/// A value whose term cannot be computed (a keyring without the index, a disabled key, a
/// destroyed keyring, bytes that are not immuta's) does not stop the job: it is left as it is,
/// counted and reported; once its key is enabled again, the next call computes it.
#[test]
fn the_job_leaves_and_reports_values_whose_term_cannot_be_computed() {
    let pg = Cluster::start(&[]);
    let (mut c, notices) = pg.connect_recording_notices();
    c.batch_execute(
        "SELECT immuta_keyring_create('no_index'), immuta_keyring_create('paused'), immuta_keyring_create('gone');
         SELECT immuta_blind_index_create('t.v'), immuta_blind_index_create('t.v', 'paused'),
                immuta_blind_index_create('t.v', 'gone');
         CREATE TABLE t (id int PRIMARY KEY, v bytea, v_bi bytea);
         INSERT INTO t SELECT i, immuta_encrypt('value ' || i) FROM generate_series(1, 50) i;
         INSERT INTO t VALUES (51, immuta_encrypt('a', keyring => 'no_index')),
                              (52, immuta_encrypt('b', keyring => 'paused')),
                              (53, immuta_encrypt('c', keyring => 'gone')),
                              (54, '\\x0102030405'::bytea);",
    )
    .unwrap();
    // In transactions of their own: a key state change fails a transaction that encrypted under it.
    c.batch_execute("SELECT immuta_rotate('paused')").unwrap();
    c.batch_execute(
        "SELECT immuta_key_disable(immuta_key_id(v), 'paused for the test') FROM t WHERE id = 52",
    )
    .unwrap();
    c.batch_execute("SELECT immuta_keyring_destroy('gone', 'tenant left')").unwrap();
    let pending = |c: &mut postgres::Client, id: i32| -> Option<bool> {
        one(c, &format!("SELECT immuta.blind_index_pending(v_bi, v, 't.v', NULL) FROM t WHERE id = {id}"))
    };
    assert_eq!(pending(&mut c, 1), Some(true), "no term yet");
    for id in 51..=54 {
        assert_eq!(pending(&mut c, id), None, "row {id}: its term cannot be computed");
    }

    notices.lock().unwrap().clear();
    c.batch_execute("CALL immuta_blind_index_column('t', 'v', 'v_bi', 't.v', batch_size => 10)").unwrap();
    let warned = notices.lock().unwrap().join("\n");
    assert!(
        warned.contains("WARNING: 4 values of column v of public.t have no current term in column v_bi"),
        "{warned}"
    );
    assert!(!warned.contains("\\x01"), "no value is echoed: {warned}");
    let out_of_step: i64 = one(
        &mut c,
        "SELECT count(*) FROM t WHERE id <= 50 AND v_bi IS DISTINCT FROM immuta.blind_index_of(v, false, NULL, 't.v', NULL)",
    );
    assert_eq!(out_of_step, 0, "every other row has its term");
    let untouched: i64 = one(&mut c, "SELECT count(*) FROM t WHERE id > 50 AND v_bi IS NULL");
    assert_eq!(untouched, 4);
    assert_eq!(pending(&mut c, 1), Some(false), "current");
    let progress = |c: &mut postgres::Client| -> (String, i64) {
        let row = c
            .query_one("SELECT state, rows_skipped FROM immuta.jobs_progress ORDER BY id DESC LIMIT 1", &[])
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!(progress(&mut c), ("done".to_string(), 4));
    let found: i32 = one(&mut c, "SELECT id FROM t WHERE v_bi = immuta_blind_index('value 7', 't.v')");
    assert_eq!(found, 7);

    // The paused key enabled again: the next call computes that row's term, and only it.
    c.batch_execute("SELECT immuta_key_enable(immuta_key_id(v), 'resumed') FROM t WHERE id = 52").unwrap();
    assert_eq!(pending(&mut c, 52), Some(true));
    notices.lock().unwrap().clear();
    c.batch_execute("CALL immuta_blind_index_column('t', 'v', 'v_bi', 't.v', batch_size => 10)").unwrap();
    let warned = notices.lock().unwrap().join("\n");
    assert!(warned.contains("WARNING: 3 values of column v of public.t"), "{warned}");
    assert_eq!(progress(&mut c), ("done".to_string(), 3));
    let found: i32 = one(&mut c, "SELECT id FROM t WHERE v_bi = immuta_blind_index('b', 't.v', 'paused')");
    assert_eq!(found, 52);

    // A value that fails to open (its context is wrong) is damage, not a key's state: it still
    // stops the job, with decryption's own error.
    c.batch_execute(
        "CREATE TABLE u (id int PRIMARY KEY, ctx text, v bytea, v_bi bytea);
         INSERT INTO u VALUES (1, 'a', immuta_encrypt('x', 'a'), NULL), (2, 'b', immuta_encrypt('y', 'not b'), NULL);",
    )
    .unwrap();
    let err = c
        .batch_execute("CALL immuta_blind_index_column('u', 'v', 'v_bi', 't.v', context_column => 'ctx')")
        .unwrap_err();
    assert_eq!(err.code().map(|s| s.code()), Some("22023"), "{err}");
}

fn wait_until_replayed(standby: &Cluster, query: &str) {
    let start = Instant::now();
    let mut c = standby.connect();
    while !c.query_one(query, &[]).unwrap().get::<_, bool>(0) {
        assert!(start.elapsed() < Duration::from_secs(120), "standby did not replay\n{}", standby.log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_dump_restores_the_index_keys_and_a_standby_looks_up_and_follows_rotations() {
    let primary = Cluster::start(&["shared_preload_libraries = 'immuta'"]);
    let mut c = primary.connect();
    patients(&mut c, 500);

    // pg_dump / restore into another cluster with the same master key: lookups work there.
    let target = Cluster::start(&[]);
    let key = std::fs::read_to_string(primary.master_key_file()).unwrap();
    target.write_file(&target.master_key_file(), &key, 0o600);
    let dump = primary.root.join("bi.sql");
    primary.run_client("pg_dump", &["-d", "postgres", "-f", dump.to_str().unwrap()]);
    target.connect().batch_execute("CREATE DATABASE restored").unwrap();
    target.run_client(
        "psql",
        &["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", "restored", "-f", dump.to_str().unwrap()],
    );
    let mut r = target.connect_to("restored");
    assert_eq!(find(&mut r, "123-45-321"), vec![321]);
    assert_eq!(one::<i64>(&mut r, "SELECT count(*) FROM immuta.index_keys"), 1);
    r.batch_execute("INSERT INTO patients (id, ssn) VALUES (9001, immuta_encrypt('restored'))").unwrap();
    assert_eq!(find(&mut r, "restored"), vec![9001]);
    // A new key there does not reuse the restored index key's id.
    let ids: i64 = one(
        &mut r,
        "SELECT count(*) FROM (SELECT id FROM immuta.data_keys UNION SELECT id FROM immuta.index_keys) k",
    );
    let keys: i64 = one(
        &mut r,
        "SELECT (SELECT count(*) FROM immuta.data_keys) + (SELECT count(*) FROM immuta.index_keys)",
    );
    r.batch_execute("SELECT immuta_rotate()").unwrap();
    assert_eq!(ids, keys);
    let rotated_apart: bool =
        one(&mut r, "SELECT max(id) NOT IN (SELECT id FROM immuta.index_keys) FROM immuta.data_keys");
    assert!(rotated_apart);

    // A standby looks rows up, sees rotations as they replay, and changes no index key.
    let standby = primary.start_standby();
    let mut s = standby.connect();
    assert_eq!(find(&mut s, "123-45-321"), vec![321]);
    c.batch_execute("SELECT immuta_blind_index_rotate('patients.ssn')").unwrap();
    wait_until_replayed(&standby, "SELECT count(*) = 2 FROM immuta.index_keys");
    assert_eq!(one::<i32>(&mut s, "SELECT cardinality(immuta_blind_indexes('x', 'patients.ssn'))"), 2);
    assert_eq!(find_any(&mut s, "123-45-321"), vec![321]);
    assert_eq!(sqlstate(s.query_one("SELECT immuta_blind_index_rotate('patients.ssn')", &[])), "25006");
    c.batch_execute("CALL immuta_blind_index_column('patients', 'ssn', 'ssn_bi', 'patients.ssn')").unwrap();
    c.batch_execute("SELECT immuta_blind_index_retire('patients.ssn', 'done')").unwrap();
    wait_until_replayed(&standby, "SELECT count(*) = 1 FROM immuta.index_keys WHERE state = 'destroyed'");
    assert_eq!(one::<i32>(&mut s, "SELECT cardinality(immuta_blind_indexes('x', 'patients.ssn'))"), 1);
    assert_eq!(find(&mut s, "123-45-321"), vec![321]);
    drop(s);
    standby.stop();
}
