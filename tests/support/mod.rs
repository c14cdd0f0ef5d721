//! System-test harness: real PostgreSQL clusters started and stopped by the tests themselves.
//!
//! Each [`Cluster`] lives in its own directory under /tmp, runs as the `postgres` operating-system
//! user (PostgreSQL refuses root), listens on a Unix socket in that directory only
//! (`listen_addresses = ''`, so no test traffic touches any network), loads the immuta installed
//! in the system's PostgreSQL 15 (`make install`), and is stopped and removed when dropped, also
//! when the test fails.

#![allow(dead_code)]

pub mod kms;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
const PORT: u16 = 5432;

static NEXT: AtomicU32 = AtomicU32::new(0);

pub struct Cluster {
    pub root: PathBuf,
    pub data: PathBuf,
    /// Extra environment of the server process.
    env: Vec<(String, String)>,
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| o.stdout.trim_ascii() == b"0").unwrap_or(false)
}

/// The environment every test server gets: the AWS SDK in the server never probes instance
/// metadata or reads the host's AWS profile, so its traffic stays on loopback.
const SERVER_ENV: &[(&str, &str)] = &[
    ("AWS_EC2_METADATA_DISABLED", "true"),
    ("AWS_CONFIG_FILE", "/dev/null"),
    ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null"),
];

/// Runs a PostgreSQL program as the `postgres` user.
pub fn as_postgres(program: &str, args: &[&str]) -> Output {
    as_postgres_with_env(program, args, &[])
}

fn as_postgres_with_env(program: &str, args: &[&str], env: &[(String, String)]) -> Output {
    let path = format!("{PG_BIN}/{program}");
    // `env -i`: nothing of the test runner's environment (AWS_*, HTTPS_PROXY, ...) reaches the
    // server, only what the test chose.
    let mut cmd = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", "env", "-i"]);
        c
    } else {
        let mut c = Command::new("env");
        c.arg("-i");
        c
    };
    cmd.arg("PATH=/usr/local/bin:/usr/bin:/bin");
    for (k, v) in SERVER_ENV {
        cmd.arg(format!("{k}={v}"));
    }
    for (k, v) in env {
        cmd.arg(format!("{k}={v}"));
    }
    cmd.arg(&path);
    let out = cmd.args(args).output().unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    out
}

/// Runs a PostgreSQL program as `postgres` and fails the test, with its output, if it fails.
fn as_postgres_ok(program: &str, args: &[&str], env: &[(String, String)], log: impl FnOnce() -> String) {
    let out = as_postgres_with_env(program, args, env);
    assert!(out.status.success(), "{program} failed: {}\n{}", String::from_utf8_lossy(&out.stderr), log());
}

/// A new, empty directory for one cluster, owned by `postgres`.
fn fresh_root() -> PathBuf {
    let root = PathBuf::from(format!(
        "/tmp/immuta-systest-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = fs::remove_dir_all(&root);
    fs::create_dir_all(&root).unwrap();
    chown_to_postgres(&root);
    root
}

fn chown_to_postgres(path: &Path) {
    if is_root() {
        let ok =
            Command::new("chown").args(["-R", "postgres:postgres"]).arg(path).status().unwrap().success();
        assert!(ok, "chown {}", path.display());
    }
}

impl Cluster {
    /// initdb, append `settings` to postgresql.conf, start, and CREATE EXTENSION immuta in the
    /// database `postgres`.
    pub fn start(settings: &[&str]) -> Cluster {
        Cluster::start_with_env(settings, &[])
    }

    /// [`Cluster::start`] with extra environment variables for the server process.
    pub fn start_with_env(settings: &[&str], env: &[(&str, &str)]) -> Cluster {
        let root = fresh_root();
        let data = root.join("data");
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let cluster = Cluster { root, data, env };
        as_postgres_ok(
            "initdb",
            &[
                "-D",
                cluster.data.to_str().unwrap(),
                "-E",
                "UTF8",
                "--locale=C",
                "-A",
                "trust",
                "-U",
                "postgres",
            ],
            &[],
            String::new,
        );
        let mut conf =
            fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/pgrx-config/postgresql.test.conf"))
                .unwrap();
        conf.push_str(&format!("\nunix_socket_directories = '{}'\nport = {PORT}\n", cluster.root.display()));
        for s in settings {
            conf.push_str(s);
            conf.push('\n');
        }
        let conf_path = cluster.data.join("postgresql.conf");
        let mut existing = fs::read_to_string(&conf_path).unwrap();
        existing.push('\n');
        existing.push_str(&conf);
        fs::write(&conf_path, existing).unwrap();
        cluster.pg_ctl_start();
        cluster.connect().batch_execute("CREATE EXTENSION immuta").unwrap();
        cluster
    }

    fn pg_ctl_start(&self) {
        let log = self.root.join("server.log");
        as_postgres_ok(
            "pg_ctl",
            &["-D", self.data.to_str().unwrap(), "-l", log.to_str().unwrap(), "-w", "-t", "60", "start"],
            &self.env,
            || self.log(),
        );
    }

    pub fn stop(&self) {
        as_postgres_ok(
            "pg_ctl",
            &["-D", self.data.to_str().unwrap(), "-w", "-t", "60", "-m", "fast", "stop"],
            &[],
            || self.log(),
        );
    }

    pub fn restart(&self) {
        self.stop();
        self.pg_ctl_start();
    }

    pub fn start_again(&self) {
        self.pg_ctl_start();
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.root.join("server.log")).unwrap_or_default()
    }

    pub fn config(&self) -> postgres::Config {
        let mut c = postgres::Config::new();
        c.host_path(&self.root)
            .port(PORT)
            .user("postgres")
            .dbname("postgres")
            .connect_timeout(Duration::from_secs(30));
        c
    }

    pub fn connect(&self) -> postgres::Client {
        self.connect_to("postgres")
    }

    /// Creates database `name` (owned by `owner`, a role created here with LOGIN, when given):
    /// CREATE DATABASE cannot share a statement batch.
    pub fn create_database(&self, name: &str, owner: Option<&str>) {
        let mut c = self.connect();
        match owner {
            Some(owner) => {
                c.batch_execute(&format!("CREATE ROLE {owner} LOGIN")).unwrap();
                c.batch_execute(&format!("CREATE DATABASE {name} OWNER {owner}")).unwrap();
            }
            None => c.batch_execute(&format!("CREATE DATABASE {name}")).unwrap(),
        }
    }

    /// A connection to database `dbname`.
    pub fn connect_to(&self, dbname: &str) -> postgres::Client {
        self.config()
            .dbname(dbname)
            .connect(postgres::NoTls)
            .unwrap_or_else(|e| panic!("connect: {e}\n{}", self.log()))
    }

    /// A connection as `user` to database `dbname`.
    pub fn connect_as(&self, user: &str, dbname: &str) -> postgres::Client {
        self.config()
            .user(user)
            .dbname(dbname)
            .connect(postgres::NoTls)
            .unwrap_or_else(|e| panic!("connect as {user}: {e}\n{}", self.log()))
    }

    /// Runs a PostgreSQL client program (pg_dump, psql, ...) as `postgres` against this cluster's
    /// socket; fails the test, with the program's output, if it fails. Returns its stdout.
    pub fn run_client(&self, program: &str, args: &[&str]) -> Vec<u8> {
        let port = PORT.to_string();
        let mut all = vec!["-h", self.root.to_str().unwrap(), "-p", &port, "-U", "postgres"];
        all.extend_from_slice(args);
        let out = as_postgres(program, &all);
        assert!(
            out.status.success(),
            "{program} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        out.stdout
    }

    /// A streaming standby of this cluster, made with `pg_basebackup -R` (so it has this
    /// cluster's master key file), listening on its own socket directory, and started.
    pub fn start_standby(&self) -> Cluster {
        let root = fresh_root();
        let data = root.join("data");
        self.run_client("pg_basebackup", &["-D", data.to_str().unwrap(), "-R", "-X", "stream", "-c", "fast"]);
        let standby = Cluster { root, data, env: self.env.clone() };
        let conf = standby.data.join("postgresql.conf");
        let mut text = fs::read_to_string(&conf).unwrap();
        text.push_str(&format!("\nunix_socket_directories = '{}'\n", standby.root.display()));
        fs::write(&conf, text).unwrap();
        chown_to_postgres(&standby.root);
        standby.pg_ctl_start();
        standby
    }

    /// Stops the server as a crash would (no checkpoint, no shutdown of backends), then starts
    /// it again: crash recovery runs.
    pub fn crash_and_restart(&self) {
        as_postgres_ok(
            "pg_ctl",
            &["-D", self.data.to_str().unwrap(), "-w", "-t", "60", "-m", "immediate", "stop"],
            &[],
            || self.log(),
        );
        self.pg_ctl_start();
    }

    /// A connection that records every NOTICE/WARNING it receives.
    pub fn connect_recording_notices(&self) -> (postgres::Client, Arc<Mutex<Vec<String>>>) {
        self.connect_as_recording_notices("postgres", "postgres")
    }

    /// A connection as `user` to `dbname` that records every NOTICE/WARNING it receives.
    pub fn connect_as_recording_notices(
        &self,
        user: &str,
        dbname: &str,
    ) -> (postgres::Client, Arc<Mutex<Vec<String>>>) {
        let notices = Arc::new(Mutex::new(Vec::new()));
        let sink = notices.clone();
        let client = self
            .config()
            .user(user)
            .dbname(dbname)
            .notice_callback(move |n| sink.lock().unwrap().push(format!("{}: {}", n.severity(), n.message())))
            .connect(postgres::NoTls)
            .unwrap();
        (client, notices)
    }

    pub fn master_key_file(&self) -> PathBuf {
        self.data.join("immuta_master.key")
    }

    /// Writes a file owned by `postgres` with the given mode.
    pub fn write_file(&self, path: &Path, content: &str, mode: u32) {
        fs::write(path, content).unwrap();
        chown_to_postgres(path);
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = as_postgres(
            "pg_ctl",
            &["-D", self.data.to_str().unwrap(), "-w", "-t", "30", "-m", "immediate", "stop"],
        );
        if std::env::var_os("IMMUTA_KEEP_TEST_CLUSTERS").is_none() {
            let _ = fs::remove_dir_all(&self.root);
        }
    }
}

/// Runs `work` in `n` sessions at once (released together by a barrier) and returns their results
/// in session order.
pub fn in_parallel_sessions<T: Send + 'static>(
    pg: &std::sync::Arc<Cluster>,
    n: usize,
    work: impl Fn(usize, &mut postgres::Client) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let barrier = Arc::new(std::sync::Barrier::new(n));
    let work = Arc::new(work);
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let (pg, barrier, work) = (pg.clone(), barrier.clone(), work.clone());
            std::thread::spawn(move || {
                let mut c = pg.connect();
                barrier.wait();
                work(i, &mut c)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// The SQLSTATE of a failed statement.
pub fn sqlstate(result: Result<impl Sized, postgres::Error>) -> String {
    match result {
        Ok(_) => "00000".into(),
        Err(e) => e.code().map(|c| c.code().to_owned()).unwrap_or_else(|| format!("no SQLSTATE: {e}")),
    }
}

/// Message, detail and hint of a failed statement.
pub fn error_text(result: Result<impl Sized, postgres::Error>) -> String {
    match result {
        Ok(_) => String::new(),
        Err(e) => match e.as_db_error() {
            Some(db) => {
                format!("{} | {} | {}", db.message(), db.detail().unwrap_or(""), db.hint().unwrap_or(""))
            }
            None => e.to_string(),
        },
    }
}

pub fn key_id_of(c: &mut postgres::Client, ciphertext: &[u8]) -> i64 {
    c.query_one("SELECT immuta_key_id($1)", &[&ciphertext]).unwrap().get(0)
}

/// `ALTER SYSTEM SET name = 'value'` and a reload; new sessions see it. PostgreSQL only accepts
/// an extension's settings in ALTER SYSTEM once the library is loaded in the session.
pub fn set_server_setting(c: &mut postgres::Client, name: &str, value: &str) {
    c.batch_execute("LOAD 'immuta'").unwrap();
    c.batch_execute(&format!("ALTER SYSTEM SET {name} = '{}'", value.replace('\'', "''"))).unwrap();
    c.batch_execute("SELECT pg_reload_conf()").unwrap();
}

/// Encrypts `text` and returns the id of the key that encrypted it.
pub fn encrypted_key_id(c: &mut postgres::Client, text: &str) -> i64 {
    let v = encrypt(c, text);
    key_id_of(c, &v)
}

pub fn encrypt(c: &mut postgres::Client, text: &str) -> Vec<u8> {
    c.query_one("SELECT immuta_encrypt($1)", &[&text]).unwrap().get(0)
}

pub fn decrypt(c: &mut postgres::Client, ciphertext: &[u8]) -> Result<String, postgres::Error> {
    c.query_one("SELECT immuta_decrypt($1)", &[&ciphertext]).map(|r| r.get(0))
}

pub fn count_keys(c: &mut postgres::Client) -> i64 {
    c.query_one("SELECT count(*) FROM immuta.data_keys", &[]).unwrap().get(0)
}
