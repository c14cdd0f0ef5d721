//! Scheduled rollover through a real pg_cron (Debian's postgresql-15-cron, 1.4.x: the finest
//! schedule is one minute), in a database other than pg_cron's (the background worker path)
//! and in pg_cron's own database (the direct path).

mod support;

use std::time::{Duration, Instant};

use support::*;

/// pg_cron preloaded, running its jobs in background workers (no TCP: the clusters listen on a
/// socket only).
const WITH_PG_CRON: &[&str] = &[
    "shared_preload_libraries = 'pg_cron'",
    "cron.database_name = 'postgres'",
    "cron.use_background_workers = on",
    "max_worker_processes = 16",
];

fn cluster_with_pg_cron_and_appdb() -> (Cluster, postgres::Client, postgres::Client) {
    let pg = Cluster::start(WITH_PG_CRON);
    let mut cron_db = pg.connect();
    cron_db.batch_execute("CREATE EXTENSION pg_cron").unwrap();
    cron_db.batch_execute("CREATE DATABASE appdb").unwrap();
    let mut app = pg.connect_to("appdb");
    app.batch_execute("CREATE EXTENSION immuta").unwrap();
    (pg, cron_db, app)
}

/// Waits until `done` holds, polling every second, for at most `limit`.
fn wait_for(limit: Duration, what: &str, pg: &Cluster, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "{what} did not happen within {limit:?}\n{}", pg.log());
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Runs of the job that have finished, and how many of them succeeded.
fn finished_runs(cron_db: &mut postgres::Client, job: i64) -> (i64, i64) {
    let row = cron_db
        .query_one(
            "SELECT count(*) FILTER (WHERE status IN ('succeeded', 'failed')), \
                    count(*) FILTER (WHERE status = 'succeeded') \
             FROM cron.job_run_details WHERE jobid = $1",
            &[&job],
        )
        .unwrap();
    (row.get(0), row.get(1))
}

#[test]
fn a_job_every_minute_rolls_an_overdue_key_over_and_does_nothing_while_none_is_due() {
    let (pg, mut cron_db, mut app) = cluster_with_pg_cron_and_appdb();
    app.batch_execute("CREATE TABLE t (v bytea); INSERT INTO t SELECT immuta_encrypt('value ' || i) FROM generate_series(1, 100) i")
        .unwrap();
    let job: i64 = app.query_one("SELECT immuta_schedule_rotation('* * * * *')", &[]).unwrap().get(0);
    let row = cron_db.query_one("SELECT database, command, schedule FROM cron.job WHERE jobid = $1", &[&job]).unwrap();
    assert_eq!(row.get::<_, String>(0), "appdb");
    assert_eq!(row.get::<_, String>(1), "SELECT public.immuta_rotate_if_due()");
    assert_eq!(row.get::<_, String>(2), "* * * * *");

    // A run while nothing is due creates no key.
    wait_for(Duration::from_secs(90), "a first run of the job", &pg, || finished_runs(&mut cron_db, job).0 >= 1);
    let (finished, succeeded) = finished_runs(&mut cron_db, job);
    assert_eq!(finished, succeeded, "the runs succeeded");
    assert_eq!(count_keys(&mut app), 1);

    // Back-date the key past the rollover length: the next run rolls it over.
    app.batch_execute("UPDATE immuta.data_keys SET created_at = now() - interval '400 days'").unwrap();
    wait_for(Duration::from_secs(90), "a scheduled rollover", &pg, || count_keys(&mut app) == 2);
    let (event, reason, key): (String, String, i64) = {
        let r = app
            .query_one("SELECT event, reason, key_id FROM immuta.audit_log ORDER BY id DESC LIMIT 1", &[])
            .unwrap();
        (r.get(0), r.get(1), r.get(2))
    };
    assert_eq!((event.as_str(), reason.as_str(), key), ("key rotated", "schedule", 2));
    let all_decrypt: i64 = app
        .query_one("SELECT count(*) FROM t WHERE immuta_decrypt(v) LIKE 'value %'", &[])
        .unwrap()
        .get(0);
    assert_eq!(all_decrypt, 100, "every old value still decrypts");
    assert_eq!(encrypted_key_id(&mut app, "new"), 2, "new values use the new key");
    let status: serde_json::Value = app.query_one("SELECT immuta_status()::text", &[]).map(|r| {
        serde_json::from_str(&r.get::<_, String>(0)).unwrap()
    }).unwrap();
    assert_eq!(status["rotation_job_present"], true, "{status}");
    assert_eq!(status["rotation_job"]["job_id"], job);
    assert_eq!(status["rotation_job"]["schedule"], "* * * * *");
    assert_eq!(status["current_key"]["id"], 2);
    assert_eq!(status["current_key"]["reason"], "schedule");
    assert_eq!(status["pg_cron_loaded"], true);
}

#[test]
fn scheduling_is_idempotent_and_unscheduling_removes_the_job_in_either_database() {
    let (pg, mut cron_db, mut app) = cluster_with_pg_cron_and_appdb();
    let jobs = |c: &mut postgres::Client, db: &str| -> Vec<(i64, String)> {
        c.query("SELECT jobid, schedule FROM cron.job WHERE database = $1 ORDER BY jobid", &[&db])
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    };
    // From another database, through the background worker.
    let first: i64 = app.query_one("SELECT immuta_schedule_rotation()", &[]).unwrap().get(0);
    let second: i64 = app.query_one("SELECT immuta_schedule_rotation('30 2 * * *')", &[]).unwrap().get(0);
    assert_eq!(first, second, "the same job, updated");
    assert_eq!(jobs(&mut cron_db, "appdb"), vec![(first, "30 2 * * *".to_string())]);
    assert!(app.query_one("SELECT immuta_unschedule_rotation()", &[]).unwrap().get::<_, bool>(0));
    assert!(jobs(&mut cron_db, "appdb").is_empty());
    assert!(!app.query_one("SELECT immuta_unschedule_rotation()", &[]).unwrap().get::<_, bool>(0));

    // In pg_cron's own database, directly.
    let here: i64 = cron_db.query_one("SELECT immuta_schedule_rotation()", &[]).unwrap().get(0);
    cron_db.query_one("SELECT immuta_schedule_rotation()", &[]).unwrap();
    assert_eq!(jobs(&mut cron_db, "postgres"), vec![(here, "0 3 * * *".to_string())]);
    assert!(cron_db.query_one("SELECT immuta_unschedule_rotation()", &[]).unwrap().get::<_, bool>(0));
    assert!(jobs(&mut cron_db, "postgres").is_empty());

    // pg_cron's own errors come back with their SQLSTATE, through the worker too; the schedule
    // is data, never SQL.
    let bad = app.query_one("SELECT immuta_schedule_rotation('not a schedule''); DROP TABLE x; --')", &[]);
    let state = sqlstate(bad);
    assert!(state != "XX000" && state != "00000", "{state}");
    assert!(jobs(&mut cron_db, "appdb").is_empty());
    drop(pg);
}

#[test]
fn without_pg_cron_scheduling_fails_with_a_hint_to_install_it() {
    let pg = Cluster::start(&[]);
    let mut c = pg.connect();
    let result = c.query_one("SELECT immuta_schedule_rotation()", &[]);
    let text = error_text(c.query_one("SELECT immuta_schedule_rotation()", &[]));
    assert_eq!(sqlstate(result), "42704");
    assert!(text.contains("pg_cron is not installed") && text.contains("CREATE EXTENSION pg_cron"), "{text}");
    assert_eq!(sqlstate(c.query_one("SELECT immuta_unschedule_rotation()", &[])), "42704");
    drop(c);

    // Loaded but not created in its database: the hint names that database.
    let pg = Cluster::start(WITH_PG_CRON);
    let mut c = pg.connect();
    let text = error_text(c.query_one("SELECT immuta_schedule_rotation()", &[]));
    assert!(text.contains("not installed in database \"postgres\"") && text.contains("CREATE EXTENSION pg_cron"), "{text}");
    c.batch_execute("CREATE DATABASE appdb").unwrap();
    let mut app = pg.connect_to("appdb");
    app.batch_execute("CREATE EXTENSION immuta").unwrap();
    let result = app.query_one("SELECT immuta_schedule_rotation()", &[]);
    assert_eq!(sqlstate(result), "42704", "the worker's error comes back");
}

#[test]
fn rotate_if_due_does_nothing_in_a_read_only_transaction() {
    let pg = Cluster::start(&[]);
    let mut c = pg.connect();
    encrypt(&mut c, "v");
    c.batch_execute("UPDATE immuta.data_keys SET created_at = now() - interval '400 days'").unwrap();
    let mut tx = c.build_transaction().read_only(true).start().unwrap();
    let id: Option<i64> = tx.query_one("SELECT immuta_rotate_if_due()", &[]).unwrap().get(0);
    assert_eq!(id, None);
    tx.commit().unwrap();
    assert_eq!(count_keys(&mut c), 1);
    let id: Option<i64> = c.query_one("SELECT immuta_rotate_if_due()", &[]).unwrap().get(0);
    assert_eq!(id, Some(2));
}
