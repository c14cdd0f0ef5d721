//! System tier: encrypting an existing plaintext column online (issue 15): `immuta_encrypt_column`
//! fills a new bytea column from the plaintext, batch by batch, while a trigger encrypts what the
//! application writes meanwhile; the plaintext column is then dropped as its notice says.

mod support;

use support::*;

/// Rows whose encrypted column does not decrypt to its plaintext (with the row's context).
const MISMATCHED: &str = "SELECT count(*) FROM t
    WHERE immuta_decrypt(ssn_enc, tenant) IS DISTINCT FROM ssn
       OR immuta_decrypt(born_enc, NULL::date) IS DISTINCT FROM born
       OR immuta_decrypt(tags_enc, NULL::text[]) IS DISTINCT FROM tags";

#[test]
fn a_plaintext_column_is_encrypted_online_and_every_concurrent_write_is_encrypted_too() {
    let pg = Cluster::start(&[]);
    let mut c = pg.connect();
    c.batch_execute(
        "SELECT immuta_keyring_create('tenant');
         CREATE TABLE t (id int PRIMARY KEY, ssn text, born date, tags text[], tenant text NOT NULL);
         INSERT INTO t SELECT i, CASE WHEN i % 100 = 0 THEN NULL ELSE 'ssn ' || i END, date '1950-01-01' + i,
                              ARRAY['a' || i, NULL], 'tenant ' || (i % 7)
           FROM generate_series(1, 3000) i;
         ANALYZE t;
         ALTER TABLE t ADD COLUMN ssn_enc bytea, ADD COLUMN born_enc bytea, ADD COLUMN tags_enc bytea;",
    )
    .unwrap();
    // A session holds row 1501 (FOR UPDATE does not keep the trigger from being created): the
    // job's batch waits for it, and meanwhile the application writes before and behind the job.
    let mut holder = pg.connect();
    holder.batch_execute("BEGIN; SELECT FROM t WHERE id = 1501 FOR UPDATE").unwrap();
    let (mut runner, notices) = pg.connect_recording_notices();
    let pid: i32 = one(&mut runner, "SELECT pg_backend_pid()");
    let job_thread = std::thread::spawn(move || {
        runner.batch_execute(
            "CALL immuta_encrypt_column('t', 'ssn', 'ssn_enc', context_column => 'tenant', batch_size => 200)",
        )
    });
    wait_for_lock_wait(&mut c, pid, "the job waiting for row 1501");
    let done_before: i64 = one(&mut c, "SELECT rows_done FROM immuta.jobs_progress WHERE state = 'running'");
    assert!(done_before > 0 && done_before < 1501, "{done_before}");
    c.batch_execute(
        "INSERT INTO t (id, ssn, born, tags, tenant) SELECT i, 'ssn ' || i, date '1950-01-01' + i, ARRAY['a' || i, NULL], 'tenant 1'
           FROM generate_series(3001, 3100) i;
         UPDATE t SET ssn = 'changed behind' WHERE id = 10;
         UPDATE t SET tenant = 'moved' WHERE id = 11;
         UPDATE t SET ssn = 'changed ahead' WHERE id = 2900;
         UPDATE t SET ssn = NULL WHERE id = 2901;
         DELETE FROM t WHERE id BETWEEN 20 AND 29 OR id = 2950;",
    )
    .unwrap();
    let mut copy = c.copy_in("COPY t (id, ssn, born, tags, tenant) FROM STDIN").unwrap();
    std::io::Write::write_all(&mut copy, b"4001\tcopied\t2001-01-01\t{x}\ttenant 2\n").unwrap();
    copy.finish().unwrap();
    // The holder writes the row the job waits for: the job encrypts this version, not the old one.
    holder
        .batch_execute("UPDATE t SET ssn = 'held and changed', tenant = 'held' WHERE id = 1501; COMMIT")
        .unwrap();
    job_thread.join().unwrap().unwrap();

    // Each CALL on its own: a procedure that commits cannot run inside a multi-statement batch.
    c.batch_execute(
        "CALL immuta_encrypt_column('t', 'born', 'born_enc', keyring => 'tenant', batch_size => 1000)",
    )
    .unwrap();
    c.batch_execute("CALL immuta_encrypt_column('t', 'tags', 'tags_enc')").unwrap();
    assert_eq!(one::<i64>(&mut c, MISMATCHED), 0, "every row's encrypted values are its plaintext's");
    assert_eq!(one::<i64>(&mut c, "SELECT count(*) FROM t"), 3090);
    assert_eq!(one::<i64>(&mut c, "SELECT count(*) FROM t WHERE ssn IS NULL AND ssn_enc IS NULL"), 30);
    assert_eq!(
        one::<String>(&mut c, "SELECT immuta_decrypt(ssn_enc, tenant) FROM t WHERE id = 1501"),
        "held and changed"
    );
    assert_eq!(
        one::<Vec<String>>(&mut c, "SELECT array_agg(DISTINCT k.keyring) FROM t JOIN immuta.keys k ON k.id = immuta_key_id(born_enc)"),
        vec!["tenant".to_string()]
    );
    let done: Vec<(String, String, i64)> = c
        .query("SELECT column_name::text, state, rows_left FROM immuta.jobs_progress ORDER BY id", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        done,
        vec![
            ("ssn_enc".into(), "done".into(), 0),
            ("born_enc".into(), "done".into(), 0),
            ("tags_enc".into(), "done".into(), 0)
        ]
    );
    let notice = notices.lock().unwrap().join("\n");
    assert!(
        notice.contains("DROP TRIGGER immuta_encrypt_ssn_enc ON public.t")
            && notice.contains("DROP COLUMN ssn")
            && notice.contains("VACUUM FULL"),
        "{notice}"
    );
    let registered: Vec<String> = c
        .query("SELECT column_name::text FROM immuta.encrypted_columns ORDER BY 1", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(registered, ["born_enc", "ssn_enc", "tags_enc"]);

    // After the job, until the application switches, the trigger keeps the two in step.
    c.batch_execute(
        "INSERT INTO t (id, ssn, born, tags, tenant) VALUES (5000, 'after', '2020-02-02', '{}', 'tenant 3');
         UPDATE t SET ssn = 'after too', tenant = 'tenant 4' WHERE id = 1;
         INSERT INTO t (id, ssn, born, tags, tenant) VALUES (1, 'upserted', '2020-02-03', '{b}', 'tenant 5')
           ON CONFLICT (id) DO UPDATE SET ssn = EXCLUDED.ssn, tenant = EXCLUDED.tenant;",
    )
    .unwrap();
    assert_eq!(one::<i64>(&mut c, MISMATCHED), 0);
    // The switch, as the notice says: the plaintext goes, the encrypted values stay.
    c.batch_execute(
        "DROP TRIGGER immuta_encrypt_ssn_enc ON t; DROP TRIGGER immuta_encrypt_born_enc ON t;
         DROP TRIGGER immuta_encrypt_tags_enc ON t;
         ALTER TABLE t DROP COLUMN ssn, DROP COLUMN born, DROP COLUMN tags;",
    )
    .unwrap();
    c.batch_execute("VACUUM FULL t").unwrap();
    assert_eq!(
        one::<String>(&mut c, "SELECT immuta_decrypt(ssn_enc, tenant) FROM t WHERE id = 1"),
        "upserted"
    );
    assert_eq!(
        one::<String>(&mut c, "SELECT immuta_decrypt(ssn_enc, tenant) FROM t WHERE id = 4001"),
        "copied"
    );
}

#[test]
fn encrypting_a_column_is_refused_before_anything_is_installed_when_it_cannot_succeed() {
    let pg = Cluster::start(&[]);
    let mut c = pg.connect();
    c.batch_execute(
        "CREATE ROLE enc LOGIN IN ROLE immuta_encryptor;
         CREATE ROLE dec LOGIN IN ROLE immuta_decryptor;
         CREATE TABLE t (id int PRIMARY KEY, p point, s text, e bytea, x text);
         INSERT INTO t VALUES (1, '(1,2)', 'one', NULL, 'x');
         GRANT SELECT, UPDATE ON t TO enc, dec;",
    )
    .unwrap();
    let refused = |c: &mut postgres::Client, call: &str| sqlstate(c.batch_execute(call));
    assert_eq!(
        refused(&mut c, "CALL immuta_encrypt_column('t', 'p', 'e')"),
        "0A000",
        "a type immuta does not encrypt"
    );
    assert_eq!(
        refused(&mut c, "CALL immuta_encrypt_column('t', 's', 'x')"),
        "42804",
        "a target that is not bytea"
    );
    assert_eq!(refused(&mut c, "CALL immuta_encrypt_column('t', 's', 's')"), "22023");
    assert_eq!(refused(&mut c, "CALL immuta_encrypt_column('t', 'nope', 'e')"), "42703");
    assert_eq!(refused(&mut c, "CALL immuta_encrypt_column('t', 's', 'e', keyring => 'nope')"), "42704");
    let mut enc = pg.connect_as("enc", "postgres");
    assert_eq!(
        refused(&mut enc, "CALL immuta_encrypt_column('t', 's', 'e')"),
        "42501",
        "no TRIGGER on the table"
    );
    let mut dec = pg.connect_as("dec", "postgres");
    assert_eq!(refused(&mut dec, "CALL immuta_encrypt_column('t', 's', 'e')"), "42501", "not an encryptor");
    assert_eq!(one::<i64>(&mut c, "SELECT count(*) FROM pg_trigger WHERE tgrelid = 't'::regclass"), 0);
    assert_eq!(one::<i64>(&mut c, "SELECT count(*) FROM immuta.jobs"), 0);

    // With TRIGGER granted the encryptor runs it, as itself: its trigger, its job.
    c.batch_execute("GRANT TRIGGER ON t TO enc").unwrap();
    enc.batch_execute("CALL immuta_encrypt_column('t', 's', 'e')").unwrap();
    assert_eq!(one::<String>(&mut c, "SELECT started_by::text FROM immuta.jobs"), "enc");
    // A writer without immuta_encryptor cannot write the plaintext column while the trigger is
    // there: the trigger encrypts as the writer.
    c.batch_execute("CREATE ROLE app LOGIN; GRANT INSERT, SELECT ON t TO app").unwrap();
    let mut app = pg.connect_as("app", "postgres");
    assert_eq!(sqlstate(app.execute("INSERT INTO t (id, s) VALUES (2, 'two')", &[])), "42501");
}
