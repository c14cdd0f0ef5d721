//! Scheduled rollover through a real pg_cron (Debian's postgresql-15-cron, 1.4.x: the finest
//! schedule is one minute), in a database other than pg_cron's (the background worker path)
//! and in pg_cron's own database (the direct path).
//!
//! pg_cron is Debian's package for PostgreSQL 15; the other versions under test have none, and
//! there the tests that need it say that they are skipped (`pg_cron_here`).

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

/// Whether the PostgreSQL under test has pg_cron (always on 15: `make prereqs` installs it).
fn pg_cron_here(test: &str) -> bool {
    Installation::under_test().has_extension("pg_cron", test)
}

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
    if !pg_cron_here("a_job_every_minute_rolls_an_overdue_key_over_and_does_nothing_while_none_is_due") {
        return;
    }
    let (pg, mut cron_db, mut app) = cluster_with_pg_cron_and_appdb();
    app.batch_execute("CREATE TABLE t (v bytea); INSERT INTO t SELECT immuta_encrypt('value ' || i) FROM generate_series(1, 100) i")
        .unwrap();
    let job: i64 = app.query_one("SELECT immuta_schedule_rotation('* * * * *')", &[]).unwrap().get(0);
    let row = cron_db
        .query_one("SELECT database, command, schedule FROM cron.job WHERE jobid = $1", &[&job])
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "appdb");
    assert_eq!(row.get::<_, String>(1), "SELECT pg_catalog.immuta_rotation_job()");
    assert_eq!(row.get::<_, String>(2), "* * * * *");

    // A run while nothing is due creates no key.
    // pg_cron starts a job at the next minute; a loaded machine may skip a minute.
    wait_for(Duration::from_secs(200), "a first run of the job", &pg, || {
        finished_runs(&mut cron_db, job).0 >= 1
    });
    let (finished, succeeded) = finished_runs(&mut cron_db, job);
    assert_eq!(finished, succeeded, "the runs succeeded");
    assert_eq!(count_keys(&mut app), 1);

    // Back-date the key past the rollover length: the next run rolls it over.
    app.batch_execute("UPDATE immuta.data_keys SET created_at = now() - interval '400 days'").unwrap();
    wait_for(Duration::from_secs(200), "a scheduled rollover", &pg, || count_keys(&mut app) == 2);
    let (event, reason, key): (String, String, i64) = {
        let r = app
            .query_one("SELECT event, reason, key_id FROM immuta.audit_log ORDER BY id DESC LIMIT 1", &[])
            .unwrap();
        (r.get(0), r.get(1), r.get(2))
    };
    assert_eq!((event.as_str(), reason.as_str(), key), ("key rotated", "schedule", 2));
    let all_decrypt: i64 =
        app.query_one("SELECT count(*) FROM t WHERE immuta_decrypt(v) LIKE 'value %'", &[]).unwrap().get(0);
    assert_eq!(all_decrypt, 100, "every old value still decrypts");
    assert_eq!(encrypted_key_id(&mut app, "new"), 2, "new values use the new key");
    let status: serde_json::Value = app
        .query_one("SELECT immuta_status()::text", &[])
        .map(|r| serde_json::from_str(&r.get::<_, String>(0)).unwrap())
        .unwrap();
    assert_eq!(status["rotation_job_present"], true, "{status}");
    assert_eq!(status["rotation_job"]["job_id"], job);
    assert_eq!(status["rotation_job"]["schedule"], "* * * * *");
    assert_eq!(status["current_key"]["id"], 2);
    assert_eq!(status["current_key"]["reason"], "schedule");
    assert_eq!(status["pg_cron_loaded"], true);
}

#[test]
fn scheduling_is_idempotent_and_unscheduling_removes_the_job_in_either_database() {
    if !pg_cron_here("scheduling_is_idempotent_and_unscheduling_removes_the_job_in_either_database") {
        return;
    }
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
    if !pg_cron_here("without_pg_cron_scheduling_fails_with_a_hint_to_install_it (its second half)") {
        return;
    }

    // Loaded but not created in its database: the hint names that database.
    let pg = Cluster::start(WITH_PG_CRON);
    let mut c = pg.connect();
    let text = error_text(c.query_one("SELECT immuta_schedule_rotation()", &[]));
    assert!(
        text.contains("not installed in database \"postgres\"") && text.contains("CREATE EXTENSION pg_cron"),
        "{text}"
    );
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

/// Runs job `job` as pg_cron does: its command, in its database, as its user.
fn run_job_as_pg_cron_would(
    pg: &Cluster,
    cron_db: &mut postgres::Client,
    job: i64,
) -> Result<(), postgres::Error> {
    let row = cron_db
        .query_one("SELECT database, username, command FROM cron.job WHERE jobid = $1", &[&job])
        .unwrap();
    let (database, username, command): (String, String, String) = (row.get(0), row.get(1), row.get(2));
    pg.connect_as(&username, &database).batch_execute(&command)
}

fn is_superuser(c: &mut postgres::Client, role: &str) -> bool {
    c.query_one("SELECT rolsuper FROM pg_roles WHERE rolname = $1", &[&role]).unwrap().get(0)
}

#[test]
fn the_rotation_job_never_runs_code_the_database_owner_planted() {
    if !pg_cron_here("the_rotation_job_never_runs_code_the_database_owner_planted") {
        return;
    }
    let pg = Cluster::start(WITH_PG_CRON);
    let mut cron_db = pg.connect();
    cron_db.batch_execute("CREATE EXTENSION pg_cron").unwrap();
    pg.create_database("shop", Some("tenant"));
    let mut tenant = pg.connect_as("tenant", "shop");
    tenant.batch_execute("CREATE EXTENSION immuta; SELECT immuta_encrypt('x')").unwrap();
    // A superuser schedules the rotation in the tenant's database: the job runs as the superuser.
    let job: i64 = pg.connect_to("shop").query_one("SELECT immuta_schedule_rotation()", &[]).unwrap().get(0);
    run_job_as_pg_cron_would(&pg, &mut cron_db, job).unwrap();

    // The tenant owns schema public: it moves it aside and plants look-alikes everywhere a name
    // could be looked up, each making the tenant a superuser if it ever runs.
    let escalate = "LANGUAGE plpgsql AS $$ BEGIN EXECUTE 'ALTER ROLE tenant SUPERUSER'; RETURN 1; END $$";
    tenant
        .batch_execute(&format!(
            "ALTER SCHEMA public RENAME TO moved;
             CREATE SCHEMA public;
             CREATE FUNCTION public.immuta_rotate_if_due() RETURNS bigint {escalate};
             CREATE FUNCTION public.immuta_rotation_job() RETURNS bigint {escalate};"
        ))
        .unwrap();
    assert_eq!(
        sqlstate(tenant.batch_execute(&format!(
            "CREATE FUNCTION pg_catalog.immuta_rotation_job2() RETURNS bigint {escalate}"
        ))),
        "42501",
        "nobody but a superuser creates anything in pg_catalog"
    );
    run_job_as_pg_cron_would(&pg, &mut cron_db, job).unwrap();
    assert!(!is_superuser(&mut cron_db, "tenant"), "the job ran the tenant's function");

    // Dropping the extension, and creating a schema immuta of its own: a job left behind fails,
    // harmlessly, and runs nothing of the tenant's.
    tenant
        .batch_execute(&format!(
            "DROP EXTENSION immuta;
             CREATE SCHEMA immuta;
             CREATE FUNCTION immuta.rotate_if_due() RETURNS bigint {escalate};
             CREATE FUNCTION immuta.immuta_rotation_job() RETURNS bigint {escalate};"
        ))
        .unwrap();
    assert_eq!(
        sqlstate(run_job_as_pg_cron_would(&pg, &mut cron_db, job)),
        "42883",
        "function does not exist"
    );
    assert!(!is_superuser(&mut cron_db, "tenant"));

    // The extension created again, in another schema: the job reaches immuta's function again.
    tenant.batch_execute("DROP SCHEMA immuta CASCADE; CREATE EXTENSION immuta SCHEMA moved").unwrap();
    run_job_as_pg_cron_would(&pg, &mut cron_db, job).unwrap();
    assert!(!is_superuser(&mut cron_db, "tenant"));
}

#[test]
fn scheduling_requires_what_a_connection_to_pg_crons_database_would() {
    if !pg_cron_here("scheduling_requires_what_a_connection_to_pg_crons_database_would") {
        return;
    }
    let (pg, mut cron_db, mut app) = cluster_with_pg_cron_and_appdb();
    cron_db
        .batch_execute(
            "CREATE ROLE keeper LOGIN; GRANT immuta_admin TO keeper;
             CREATE ROLE robot NOLOGIN; GRANT immuta_admin TO robot; GRANT robot TO keeper;
             REVOKE CONNECT ON DATABASE postgres FROM PUBLIC;",
        )
        .unwrap();
    app.batch_execute("SELECT immuta_encrypt('x')").unwrap();
    let mut keeper = pg.connect_as("keeper", "appdb");
    // No CONNECT on pg_cron's database: no worker reaches it as this role.
    let result = keeper.query_one("SELECT immuta_schedule_rotation()", &[]);
    let text = error_text(keeper.query_one("SELECT immuta_schedule_rotation()", &[]));
    assert_eq!(sqlstate(result), "42501", "{text}");
    assert!(text.contains("CONNECT privilege") && text.contains("\"postgres\""), "{text}");
    let status: String =
        keeper.query_one("SELECT immuta_status()->>'rotation_job_error'", &[]).unwrap().get(0);
    assert!(status.contains("may not connect"), "{status}");
    // A role that cannot log in cannot have a job run as it, nor a worker connect as it.
    cron_db.batch_execute("GRANT CONNECT ON DATABASE postgres TO keeper, robot").unwrap();
    keeper.batch_execute("SET ROLE robot").unwrap();
    let text = error_text(keeper.query_one("SELECT immuta_schedule_rotation()", &[]));
    assert!(text.contains("cannot log in"), "{text}");
    assert_eq!(sqlstate(keeper.query_one("SELECT immuta_schedule_rotation()", &[])), "42501");
    let jobs: i64 = cron_db.query_one("SELECT count(*) FROM cron.job", &[]).unwrap().get(0);
    assert_eq!(jobs, 0);
    assert!(!pg.log().contains("FATAL:  permission denied for database"), "no worker was started");
}

#[test]
fn an_online_reencryption_scheduled_with_pg_cron_runs_as_its_role_to_the_end() {
    if !pg_cron_here("an_online_reencryption_scheduled_with_pg_cron_runs_as_its_role_to_the_end") {
        return;
    }
    let (pg, mut cron_db, mut app) = cluster_with_pg_cron_and_appdb();
    app.batch_execute(
        "CREATE ROLE dec LOGIN IN ROLE immuta_decryptor;
         CREATE TABLE t (id int PRIMARY KEY, v bytea);
         INSERT INTO t SELECT i, immuta_encrypt('value ' || i) FROM generate_series(1, 2000) i;
         GRANT SELECT, UPDATE ON t TO dec;
         ANALYZE t;",
    )
    .unwrap();
    let newest: i64 = app.query_one("SELECT immuta_rotate()", &[]).unwrap().get(0);
    // Scheduled in the application's database, as the decryptor: the job runs with its privileges,
    // committing batch by batch inside pg_cron's background worker.
    let job: i64 = cron_db
        .query_one(
            "SELECT cron.schedule_in_database('reencrypt-t', '* * * * *',
                 $$CALL immuta_reencrypt_column('t', 'v', batch_size => 300)$$, 'appdb', 'dec')",
            &[],
        )
        .unwrap()
        .get(0);
    wait_for(Duration::from_secs(200), "a run of the scheduled re-encryption", &pg, || {
        finished_runs(&mut cron_db, job).0 >= 1
    });
    cron_db.batch_execute(&format!("SELECT cron.unschedule({job}::bigint)")).unwrap();
    let (finished, succeeded) = finished_runs(&mut cron_db, job);
    assert_eq!(finished, succeeded, "the runs succeeded");
    let row = app
        .query_one(
            "SELECT started_by::text, state, rows_done FROM immuta.jobs_progress ORDER BY id LIMIT 1",
            &[],
        )
        .unwrap();
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, String>(1), row.get::<_, i64>(2)),
        ("dec".into(), "done".into(), 2000)
    );
    let under_newest: i64 = app
        .query_one(
            "SELECT count(*) FROM t WHERE immuta_key_id(v) = $1 AND immuta_decrypt(v) = 'value ' || id",
            &[&newest],
        )
        .unwrap()
        .get(0);
    assert_eq!(under_newest, 2000);
}
