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
fn the_ttl_makes_keys_unwrap_again_and_a_reset_drops_every_key() {
    let (_moto, proxy, pg) = three_kms_keys(&[PRELOAD]);
    pg.restart();
    let mut c = pg.connect();
    set_server_setting(&mut c, "immuta.cache_ttl", "2s");
    drop(c);
    let before = kms_decrypts(&proxy);
    let mut c = pg.connect();
    assert!(all_decrypt(&mut c));
    assert_eq!(kms_decrypts(&proxy) - before, 3);
    assert!(all_decrypt(&mut c));
    assert_eq!(kms_decrypts(&proxy) - before, 3, "within the TTL nothing is unwrapped again");
    std::thread::sleep(Duration::from_millis(2500));
    assert!(all_decrypt(&mut c));
    assert_eq!(kms_decrypts(&proxy) - before, 6, "after the TTL every key is unwrapped again, once");

    let mut other = pg.connect();
    assert!(all_decrypt(&mut other));
    let dropped: i64 = c.query_one("SELECT immuta_cache_reset()", &[]).unwrap().get(0);
    assert_eq!(dropped, 3);
    assert_eq!(stat(&mut c, "entries"), "0");
    let at_reset = kms_decrypts(&proxy);
    assert!(all_decrypt(&mut other), "a session that held the keys drops them too");
    assert_eq!(kms_decrypts(&proxy) - at_reset, 3);
}

#[test]
fn a_backend_killed_mid_workload_leads_to_a_crash_restart_after_which_everything_decrypts() {
    let (_moto, _proxy, pg) = three_kms_keys(&[PRELOAD]);
    let mut victim = pg.connect();
    let pid: i32 = victim.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    let worker = std::thread::spawn(move || {
        let _ = victim.query_one("SELECT count(immuta_decrypt(c)) FROM t, generate_series(1, 5000)", &[]);
    });
    std::thread::sleep(Duration::from_millis(300));
    let killed = std::process::Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
    assert!(killed.success(), "the backend was still running its workload");
    let _ = worker.join();
    // The postmaster restarts every backend and re-creates shared memory.
    let mut c = None;
    for _ in 0..100 {
        if let Ok(client) = pg.config().connect(postgres::NoTls) {
            c = Some(client);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut c = c.expect("the cluster came back");
    assert!(all_decrypt(&mut c));
    assert_eq!(stat(&mut c, "mode"), "shared");
    assert_eq!(stat(&mut c, "entries"), "3", "the cache was rebuilt");
    assert!(pg.log().contains("terminated by signal 9"), "a crash restart happened");
}
