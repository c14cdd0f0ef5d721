//! System-test harness: real PostgreSQL clusters started and stopped by the tests themselves.
//!
//! Each [`Cluster`] lives in its own directory under /tmp, runs as the `postgres` operating-system
//! user (PostgreSQL refuses root), listens on a Unix socket in that directory only
//! (`listen_addresses = ''`, so no test traffic touches any network), loads the immuta installed
//! in the PostgreSQL under test (`make install`), and is stopped and removed when dropped, also
//! when the test fails.
//!
//! The PostgreSQL under test is the one whose programs are in `IMMUTA_TEST_PG_BIN` (the Makefile
//! sets it for each version it tests; Debian's 15 when unset): the same tests run on every
//! version. A test that needs a contrib module some installations lack (pg_cron, pgcrypto) asks
//! [`Installation::has_extension`] and says when it is skipped.

#![allow(dead_code)]

pub mod kms;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Debian's PostgreSQL 15, the default installation under test.
const DEFAULT_PG_BIN: &str = "/usr/lib/postgresql/15/bin";
const PORT: u16 = 5432;

/// One PostgreSQL installation: its programs, and what its pg_config says.
#[derive(Clone, Debug)]
pub struct Installation {
    pub bin: PathBuf,
    /// The major version, e.g. 15.
    pub major: u32,
}

impl Installation {
    /// The installation under test (`IMMUTA_TEST_PG_BIN`, else Debian's 15).
    pub fn under_test() -> Installation {
        Installation::at(&std::env::var("IMMUTA_TEST_PG_BIN").unwrap_or_else(|_| DEFAULT_PG_BIN.to_owned()))
    }

    /// The newer installations that pg_upgrade tests upgrade to (`IMMUTA_TEST_UPGRADE_TO`,
    /// a space-separated list of bin directories).
    pub fn upgrade_targets() -> Vec<Installation> {
        std::env::var("IMMUTA_TEST_UPGRADE_TO")
            .unwrap_or_default()
            .split_whitespace()
            .map(Installation::at)
            .collect()
    }

    pub fn at(bin: &str) -> Installation {
        let bin = PathBuf::from(bin);
        let out = Command::new(bin.join("pg_config")).arg("--version").output();
        let out = out.unwrap_or_else(|e| panic!("cannot run {}/pg_config: {e}", bin.display()));
        let text = String::from_utf8_lossy(&out.stdout);
        // "PostgreSQL 16.2" (possibly followed by a distribution's suffix)
        let major = text
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.split('.').next())
            .and_then(|m| m.parse().ok())
            .unwrap_or_else(|| panic!("unexpected pg_config --version: {text}"));
        Installation { bin, major }
    }

    fn pg_config(&self, what: &str) -> PathBuf {
        let out = Command::new(self.bin.join("pg_config")).arg(what).output().unwrap();
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    }

    fn sharedir(&self) -> PathBuf {
        self.pg_config("--sharedir")
    }

    /// Where this installation's extension libraries are.
    pub fn pkglibdir(&self) -> PathBuf {
        self.pg_config("--pkglibdir")
    }

    /// A private copy of this installation under `dest` (PostgreSQL finds its libraries and
    /// share directory relative to its programs), for a test that installs another build of
    /// immuta into it. Owned by `postgres`; `dest` is a [`ScratchDir`], which removes it.
    pub fn private_copy(&self, dest: &Path) -> Installation {
        for dir in [self.bin.clone(), self.pkglibdir(), self.sharedir()] {
            let to = dest.join(dir.strip_prefix("/").unwrap());
            fs::create_dir_all(to.parent().unwrap()).unwrap();
            let ok = Command::new("cp").arg("-a").arg(&dir).arg(&to).status().unwrap().success();
            assert!(ok, "cp -a {} {}", dir.display(), to.display());
        }
        chown_to_postgres(dest);
        let copy = Installation::at(dest.join(self.bin.strip_prefix("/").unwrap()).to_str().unwrap());
        assert_eq!(copy.pkglibdir(), dest.join(self.pkglibdir().strip_prefix("/").unwrap()), "relocated");
        copy
    }

    /// Whether extension `name` is installed here. On Debian's 15, where `make test` installs
    /// pg_cron and pgcrypto, a missing one fails the test; elsewhere the test is skipped, and says
    /// so on its output.
    pub fn has_extension(&self, name: &str, test: &str) -> bool {
        let there = self.sharedir().join("extension").join(format!("{name}.control")).exists();
        assert!(there || self.major != 15, "{name} must be installed in PostgreSQL 15 (make prereqs)");
        if !there {
            eprintln!(
                "SKIPPED {test} on PostgreSQL {}: it needs {name}, which this installation lacks",
                self.major
            );
        }
        there
    }
}

static NEXT: AtomicU32 = AtomicU32::new(0);

pub struct Cluster {
    pub root: PathBuf,
    pub data: PathBuf,
    /// The PostgreSQL this cluster runs on.
    pub pg: Installation,
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

/// Runs a PostgreSQL program of `pg` as the `postgres` user.
pub fn as_postgres(pg: &Installation, program: &str, args: &[&str]) -> Output {
    as_postgres_with_env(pg, program, args, &[])
}

fn as_postgres_with_env(pg: &Installation, program: &str, args: &[&str], env: &[(String, String)]) -> Output {
    postgres_command(pg, program, args, env).output().unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

fn postgres_command(pg: &Installation, program: &str, args: &[&str], env: &[(String, String)]) -> Command {
    let path = pg.bin.join(program);
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
    cmd.args(args);
    cmd
}

/// Runs a PostgreSQL program of `pg` as `postgres` in directory `cwd` (pg_upgrade writes there).
pub fn as_postgres_in(pg: &Installation, cwd: &Path, program: &str, args: &[&str]) -> Output {
    postgres_command(pg, program, args, &[]).current_dir(cwd).output().unwrap()
}

/// Runs a PostgreSQL program as `postgres` and fails the test, with its output, if it fails.
fn as_postgres_ok(
    pg: &Installation,
    program: &str,
    args: &[&str],
    env: &[(String, String)],
    log: impl FnOnce() -> String,
) {
    let out = as_postgres_with_env(pg, program, args, env);
    assert!(out.status.success(), "{program} failed: {}\n{}", String::from_utf8_lossy(&out.stderr), log());
}

/// A new, empty directory for one cluster, owned by `postgres`.
pub fn fresh_root() -> PathBuf {
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

/// A directory from [`fresh_root`] for files other than a cluster's (a private installation),
/// removed when dropped, as a [`Cluster`]'s root is. Declare it before the clusters that use it:
/// they are dropped (stopped) first.
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    pub fn new() -> ScratchDir {
        ScratchDir(fresh_root())
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if std::env::var_os("IMMUTA_KEEP_TEST_CLUSTERS").is_none() {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

pub fn chown_to_postgres(path: &Path) {
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
        let cluster = Cluster::init(Installation::under_test(), settings, env);
        cluster.pg_ctl_start();
        cluster.connect().batch_execute("CREATE EXTENSION immuta").unwrap();
        cluster
    }

    /// initdb with PostgreSQL `pg` and the test settings plus `settings`; not started.
    pub fn init(pg: Installation, settings: &[&str], env: &[(&str, &str)]) -> Cluster {
        let root = fresh_root();
        let data = root.join("data");
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let cluster = Cluster { root, data, pg, env };
        as_postgres_ok(
            &cluster.pg,
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
                // 18 enables checksums by default; every test cluster goes without, as on 15 and
                // 16, so that pg_upgrade between them is possible.
                if cluster.pg.major >= 18 { "--no-data-checksums" } else { "--no-sync" },
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
        cluster
    }

    /// Starts a cluster made by [`Cluster::init`] (or stopped).
    pub fn start_server(&self) {
        self.pg_ctl_start();
    }

    fn pg_ctl_start(&self) {
        let log = self.root.join("server.log");
        as_postgres_ok(
            &self.pg,
            "pg_ctl",
            &["-D", self.data.to_str().unwrap(), "-l", log.to_str().unwrap(), "-w", "-t", "60", "start"],
            &self.env,
            || self.log(),
        );
    }

    pub fn stop(&self) {
        as_postgres_ok(
            &self.pg,
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

    /// Waits until the server log, past its first `log_before` bytes, says the postmaster
    /// reinitialized after a crash and is ready again; fails after two minutes.
    pub fn wait_for_crash_restart(&self, log_before: usize) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            let log = self.log();
            let after = &log[log_before.min(log.len())..];
            if after
                .find("reinitializing")
                .is_some_and(|at| after[at..].contains("ready to accept connections"))
            {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "no crash restart\n{log}");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
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
        let out = as_postgres(&self.pg, program, &all);
        assert!(
            out.status.success(),
            "{program} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        out.stdout
    }

    /// A libpq connection string to database `dbname` of this cluster, over its socket: what a
    /// subscription of another cluster connects with.
    pub fn conninfo(&self, dbname: &str) -> String {
        format!("host={} port={PORT} user=postgres dbname={dbname}", self.root.display())
    }

    /// A streaming standby of this cluster, made with `pg_basebackup -R` (so it has this
    /// cluster's master key file), listening on its own socket directory, and started.
    pub fn start_standby(&self) -> Cluster {
        let root = fresh_root();
        let data = root.join("data");
        self.run_client("pg_basebackup", &["-D", data.to_str().unwrap(), "-R", "-X", "stream", "-c", "fast"]);
        let standby = Cluster { root, data, pg: self.pg.clone(), env: self.env.clone() };
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
            &self.pg,
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

    /// A connection as `user` to `dbname` that records every NOTICE/WARNING it receives, with
    /// its DETAIL and HINT lines.
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
            .notice_callback(move |n| {
                let mut text = format!("{}: {}", n.severity(), n.message());
                for (label, part) in [("DETAIL", n.detail()), ("HINT", n.hint())] {
                    if let Some(part) = part {
                        text.push_str(&format!("\n{label}: {part}"));
                    }
                }
                sink.lock().unwrap().push(text)
            })
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
            &self.pg,
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

/// The one value of the first row of `query`.
pub fn one<T: for<'a> postgres::types::FromSql<'a>>(c: &mut postgres::Client, query: &str) -> T {
    c.query_one(query, &[]).unwrap().get(0)
}

/// Waits (as [`wait_until`]) until the backend `pid` waits for a lock: a job blocked on a row
/// another session holds.
pub fn wait_for_lock_wait(c: &mut postgres::Client, pid: i32, what: &str) {
    let query = format!(
        "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE pid = {pid} AND wait_event_type = 'Lock')"
    );
    wait_until(c, &query, what);
}

/// Polls `query` (a boolean) on `c` every 20 ms until it is true; fails after two minutes. For
/// states another session reaches by itself (a job waiting for a row lock), never as a bound.
pub fn wait_until(c: &mut postgres::Client, query: &str, what: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !one::<bool>(c, query) {
        assert!(std::time::Instant::now() < deadline, "timed out waiting: {what}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
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
