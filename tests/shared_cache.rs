//! System tier: the shared-memory key cache, with immuta preloaded, against moto's KMS behind a
//! counting proxy.

mod support;

use std::time::Duration;

use support::kms::{Moto, Proxy, REGION};
use support::*;

const PRELOAD: &str = "shared_preload_libraries = 'immuta'";

fn kms_yaml(key: &str, endpoint: &str) -> String {
    format!(
        "plugins:\n  awsKms:\n    plugin: awsKms\n    isKms: true\n    keyId: {key}\n    region: {REGION}\n    \
         extraKmsConfig:\n      endpoint: {endpoint}\n      credentials:\n        accessKeyId: testing\n        \
         secretAccessKey: testing\n"
    )
}

/// moto, a counting proxy, and a cluster whose table `t` holds values under three KMS keys.
fn three_kms_keys(settings: &[&str]) -> (Moto, Proxy, Cluster) {
    let moto = Moto::start(None);
    let key = moto.fixture(&["create-key"]);
    let proxy = Proxy::start(moto.port);
    let pg = Cluster::start(settings);
    let mut c = pg.connect();
    c.execute("SELECT immuta_configure($1)", &[&kms_yaml(&key, &proxy.endpoint())]).unwrap();
    c.batch_execute("CREATE TABLE t (i int, v text, c bytea)").unwrap();
    for k in 0..3 {
        if k > 0 {
            c.execute("SELECT immuta_rotate()", &[]).unwrap();
        }
        c.execute(
            "INSERT INTO t SELECT i, md5(i::text), immuta_encrypt(md5(i::text)) FROM generate_series($1, $1 + 999) i",
            &[&(k * 1000)],
        )
        .unwrap();
    }
    c.batch_execute("ANALYZE t").unwrap();
    (moto, proxy, pg)
}

fn kms_decrypts(proxy: &Proxy) -> usize {
    proxy.actions().iter().filter(|a| *a == "TrentService.Decrypt").count()
}

fn stat(c: &mut postgres::Client, field: &str) -> String {
    c.query_one("SELECT immuta_cache_stats()->>$1", &[&field]).unwrap().get(0)
}

fn all_decrypt(c: &mut postgres::Client) -> bool {
    c.query_one("SELECT bool_and(immuta_decrypt(c) = v) AND count(*) = 3000 FROM t", &[]).unwrap().get(0)
}

#[test]
fn eight_sessions_after_a_restart_make_one_kms_unwrap_per_key() {
    let (_moto, proxy, pg) = three_kms_keys(&[PRELOAD]);
    pg.restart();
    let before = kms_decrypts(&proxy);
    let pg = std::sync::Arc::new(pg);
    let results = in_parallel_sessions(&pg, 8, |_, c| all_decrypt(c));
    assert!(results.iter().all(|&ok| ok));
    assert_eq!(kms_decrypts(&proxy) - before, 3, "one KMS Decrypt per key for the whole cluster");
    let mut c = pg.connect();
    assert_eq!(stat(&mut c, "mode"), "shared");
    assert_eq!(stat(&mut c, "kms_unwraps"), "3");
    assert_eq!(stat(&mut c, "entries"), "3");
}

#[test]
fn without_preload_everything_works_with_at_most_one_unwrap_per_key_per_backend() {
    let (_moto, proxy, pg) = three_kms_keys(&[]);
    pg.restart();
    let before = kms_decrypts(&proxy);
    let pg = std::sync::Arc::new(pg);
    let results = in_parallel_sessions(&pg, 8, |_, c| {
        let ok = all_decrypt(c);
        let mode: String = c.query_one("SELECT immuta_cache_stats()->>'mode'", &[]).unwrap().get(0);
        ok && mode == "backend"
    });
    assert!(results.iter().all(|&ok| ok));
    let calls = kms_decrypts(&proxy) - before;
    assert!((3..=24).contains(&calls), "{calls} KMS Decrypt calls for 3 keys and 8 backends");
}

#[test]
fn a_parallel_query_unwraps_no_key_more_than_once() {
    let (_moto, proxy, pg) =
        three_kms_keys(&[PRELOAD, "max_worker_processes = 8", "max_parallel_workers = 4"]);
    pg.restart();
    let before = kms_decrypts(&proxy);
    let mut c = pg.connect();
    c.batch_execute(
        "SET max_parallel_workers_per_gather = 2; SET parallel_setup_cost = 0; SET parallel_tuple_cost = 0; \
         SET min_parallel_table_scan_size = 0; SET parallel_leader_participation = off",
    )
    .unwrap();
    let plan: Vec<String> = c
        .query("EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) SELECT count(immuta_decrypt(c)) FROM t", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(plan.iter().any(|l| l.contains("Workers Launched: 2")), "{plan:?}");
    assert!(all_decrypt(&mut c));
    assert_eq!(kms_decrypts(&proxy) - before, 3);
}

#[test]
fn within_the_ttl_nothing_is_unwrapped_again_after_it_every_key_once_and_a_reset_drops_every_key() {
    let (_moto, proxy, pg) = three_kms_keys(&[PRELOAD]);
    pg.restart();
    let before = kms_decrypts(&proxy);
    let mut c = pg.connect();
    assert!(all_decrypt(&mut c));
    assert_eq!(kms_decrypts(&proxy) - before, 3);
    assert!(all_decrypt(&mut pg.connect()));
    assert!(all_decrypt(&mut c));
    assert_eq!(kms_decrypts(&proxy) - before, 3, "within the TTL (one hour) nothing is unwrapped again");

    // A TTL of one second; the reset drops the copies that carry the old expiry. A copy's expiry
    // is fixed when it is unwrapped and checked against the transaction's start, so a statement
    // never sees its keys expire, and one that starts 1.5 s after the last unwrap sees them all
    // expired, whatever the machine's speed.
    let mut admin = pg.connect();
    set_server_setting(&mut admin, "immuta.cache_ttl", "1s");
    let mut c = pg.connect();
    let dropped: i64 = c.query_one("SELECT immuta_cache_reset()", &[]).unwrap().get(0);
    assert_eq!(dropped, 3);
    assert_eq!(stat(&mut c, "entries"), "0");
    let at_reset = kms_decrypts(&proxy);
    assert!(all_decrypt(&mut c));
    assert_eq!(kms_decrypts(&proxy) - at_reset, 3, "after a reset every key is unwrapped again, once");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(all_decrypt(&mut c));
    assert_eq!(kms_decrypts(&proxy) - at_reset, 6, "after the TTL every key is unwrapped again, once");

    // A reset reaches a session that holds the keys.
    set_server_setting(&mut admin, "immuta.cache_ttl", "1h");
    c.query_one("SELECT immuta_cache_reset()", &[]).unwrap();
    let mut holder = pg.connect();
    assert!(all_decrypt(&mut holder));
    let held = kms_decrypts(&proxy);
    c.query_one("SELECT immuta_cache_reset()", &[]).unwrap();
    assert!(all_decrypt(&mut holder), "a session that held the keys drops them too");
    assert_eq!(kms_decrypts(&proxy) - held, 3);
}

/// `(local_unwraps, entries)` of database `db` after a fresh session there decrypted all of
/// table `t`.
fn read_everything(pg: &Cluster, db: &str) -> (i64, i64) {
    let mut c = pg.connect_to(db);
    let ok: bool =
        c.query_one("SELECT bool_and(immuta_decrypt(v) LIKE 'value %') FROM t", &[]).unwrap().get(0);
    assert!(ok);
    let row = c
        .query_one(
            "SELECT (s->>'local_unwraps')::int8, (s->>'entries')::int8 FROM (SELECT immuta_cache_stats() s) x",
            &[],
        )
        .unwrap();
    (row.get(0), row.get(1))
}

/// Values under `keys` keys in table `t` of the session's database.
fn values_under_keys(c: &mut postgres::Client, keys: usize) {
    c.batch_execute("CREATE TABLE t (v bytea)").unwrap();
    for k in 0..keys {
        if k > 0 {
            c.batch_execute("SELECT immuta_rotate()").unwrap();
        }
        c.batch_execute("INSERT INTO t SELECT immuta_encrypt('value ' || i) FROM generate_series(1, 5) i")
            .unwrap();
    }
}

#[test]
fn one_database_cannot_empty_or_crowd_out_anothers_cache_nor_see_its_statistics() {
    let pg = Cluster::start(&[PRELOAD, "immuta.shared_cache_keys = 8"]);
    pg.create_database("a", Some("tenant"));
    pg.create_database("b", None);
    let mut b = pg.connect_to("b");
    b.batch_execute("CREATE EXTENSION immuta").unwrap();
    values_under_keys(&mut b, 3);
    assert_eq!(read_everything(&pg, "b"), (3, 3), "b's three keys are in the shared cache");

    // The tenant of database a makes forty keys and has each loaded into the shared cache: a
    // takes the free slots, then gives up its own, never b's (b holds less than its share).
    let mut tenant = pg.connect_as("tenant", "a");
    tenant.batch_execute("CREATE EXTENSION immuta").unwrap();
    values_under_keys(&mut tenant, 40);
    let mut reader = pg.connect_as("tenant", "a");
    let ok: bool =
        reader.query_one("SELECT bool_and(immuta_decrypt(v) LIKE 'value %') FROM t", &[]).unwrap().get(0);
    assert!(ok);
    assert_eq!(read_everything(&pg, "b"), (3, 3), "no key of b was evicted");

    // The tenant's reset empties a's entries only, and is audited in a.
    tenant.query_one("SELECT immuta_cache_reset()", &[]).unwrap();
    assert_eq!(read_everything(&pg, "b"), (3, 3), "b's keys stayed");
    let scope: String = tenant
        .query_one("SELECT detail->>'scope' FROM immuta.audit_log WHERE event = 'cache reset'", &[])
        .unwrap()
        .get(0);
    assert_eq!(scope, "database");

    // Statistics: a's own for the tenant; the cluster's too for a superuser.
    let stats = |c: &mut postgres::Client| -> serde_json::Value {
        serde_json::from_str(
            &c.query_one("SELECT immuta_cache_stats()::text", &[]).unwrap().get::<_, String>(0),
        )
        .unwrap()
    };
    let mine = stats(&mut tenant);
    assert!(mine.get("cluster").is_none(), "{mine}");
    let everyone = stats(&mut pg.connect_to("a"));
    let b_stats = stats(&mut pg.connect_to("b"));
    assert_eq!(
        everyone["cluster"]["misses"],
        mine["misses"].as_i64().unwrap() + b_stats["misses"].as_i64().unwrap()
    );
    assert_eq!(mine["local_unwraps"].as_i64().unwrap(), 40, "{mine}");

    // Dropping every database's keys is a superuser's decision.
    assert_eq!(sqlstate(tenant.query_one("SELECT immuta_cache_reset(all_databases => true)", &[])), "42501");
    pg.connect_to("a").query_one("SELECT immuta_cache_reset(all_databases => true)", &[]).unwrap();
    assert_eq!(read_everything(&pg, "b"), (6, 3), "then b unwraps its keys again");
}

#[test]
fn a_backend_killed_mid_workload_leads_to_a_crash_restart_after_which_everything_decrypts() {
    // Commits are flushed before they return: with the test clusters' synchronous_commit = off,
    // the crash could take the table with it on a loaded machine.
    let (_moto, _proxy, pg) = three_kms_keys(&[PRELOAD, "synchronous_commit = on"]);
    let mut victim = pg.connect();
    let pid: i32 = victim.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    let worker = std::thread::spawn(move || {
        let _ = victim.query_one("SELECT count(immuta_decrypt(c)) FROM t, generate_series(1, 50000)", &[]);
    });
    // Kill it once it is running the statement.
    let mut watcher = pg.connect();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let active: bool = watcher
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1 AND state = 'active')",
                &[&pid],
            )
            .unwrap()
            .get(0);
        if active {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the workload did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(watcher);
    let log_before = pg.log().len();
    let killed = std::process::Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
    assert!(killed.success());
    let _ = worker.join();
    // The postmaster restarts every backend and re-creates shared memory: wait until its log says
    // it is ready again, then connect.
    pg.wait_for_crash_restart(log_before);
    let mut c = pg.connect();
    assert!(all_decrypt(&mut c));
    assert_eq!(stat(&mut c, "mode"), "shared");
    assert_eq!(stat(&mut c, "entries"), "3", "the cache was rebuilt");
    assert!(pg.log().contains("terminated by signal 9"), "a crash restart happened");
}
