//! The pg_cron job that runs scheduled rollover: `immuta_schedule_rotation()`,
//! `immuta_unschedule_rotation()`, and the job's state for `immuta_status()`.
//!
//! pg_cron keeps its jobs in one database, `cron.database_name`, and its functions exist only
//! there; the job must run `immuta_rotate_if_due()` in *this* database. So when this database is
//! pg_cron's, the request runs here through SPI. Otherwise a short-lived background worker
//! connects to pg_cron's database as the calling role, makes the request there with
//! `cron.schedule_in_database`, writes the outcome (or the error, with its SQLSTATE) into a
//! dynamic shared memory segment, and exits; this backend waits for it and reads the outcome. No
//! preload is needed for either. The schedule is always a query parameter, never SQL text.
//!
//! The job runs as the role that scheduled it, in a database whose owner may be a tenant, so its
//! command names nothing that owner controls: [`JOB_COMMAND`] calls a function in `pg_catalog`.
//!
//! The worker connects as the calling role without a client connection, so PostgreSQL checks
//! the role's LOGIN attribute and its CONNECT privilege on pg_cron's database, but not
//! `pg_hba.conf`. immuta checks the first two itself before starting a worker, with a clear
//! error; what pg_hba.conf alone forbids (a role allowed only from some addresses, or rejected
//! for that database) it cannot tell, and the README says so.

use std::ffi::{CStr, CString};

use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime};
use pgrx::pg_sys::panic::{CaughtError, ErrorReportWithLevel};
use pgrx::prelude::*;
use pgrx::{pg_sys, PgSqlErrorCode};

use crate::catalog::{self, spi};
use crate::errors::raise;

/// Longest schedule accepted (it travels in a fixed-size field to the worker); a five-field cron
/// expression is far shorter.
const SCHEDULE_MAX: usize = 255;

/// What the job runs: immuta's own function in `pg_catalog` (see `immuta_rotation_job` in
/// `functions.rs` for why there).
pub const JOB_COMMAND: &str = "SELECT pg_catalog.immuta_rotation_job()";

/// The job as pg_cron holds it.
pub struct Job {
    pub id: i64,
    pub name: String,
    pub schedule: String,
    pub active: bool,
    pub username: String,
    pub command: String,
}

#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
enum Op {
    Schedule = 1,
    Unschedule = 2,
    Lookup = 3,
}

/// A request, made here or in pg_cron's database.
struct Request {
    op: Op,
    /// What the job runs ([`JOB_COMMAND`]).
    command: String,
    role: String,
    cron_database: String,
    database: String,
    job_name: String,
    schedule: String,
}

enum Outcome {
    Scheduled(i64),
    Unscheduled(bool),
    Found(Option<Job>),
}

/// An error raised in pg_cron's database, carried back as data.
pub struct Failure {
    code: PgSqlErrorCode,
    message: String,
    detail: Option<String>,
    hint: Option<String>,
}

impl Failure {
    fn raise(self) -> ! {
        raise(self.code, self.message, self.detail, self.hint.as_deref())
    }
}

/// `immuta_schedule_rotation(schedule)`: creates or updates this database's rotation job.
pub fn schedule(schedule: &str) -> i64 {
    if schedule.len() > SCHEDULE_MAX {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            "pg_cron schedule is too long",
            Some(format!(
                "The schedule is {} bytes long; immuta accepts at most {SCHEDULE_MAX}.",
                schedule.len()
            )),
            Some("Use a cron expression such as '0 3 * * *'."),
        );
    }
    match request(Op::Schedule, schedule).unwrap_or_else(|f| f.raise()) {
        Outcome::Scheduled(id) => id,
        _ => unreachable!("a schedule request returns a job id"),
    }
}

/// `immuta_unschedule_rotation()`: removes this database's rotation job; whether there was one.
pub fn unschedule() -> bool {
    match request(Op::Unschedule, "").unwrap_or_else(|f| f.raise()) {
        Outcome::Unscheduled(removed) => removed,
        _ => unreachable!("an unschedule request returns a flag"),
    }
}

/// This database's rotation job, for `immuta_status()`: `Ok(None)` when there is none, `Err`
/// with the reason when it cannot be known. Never raises for pg_cron's absence.
pub fn lookup() -> Result<Option<Job>, String> {
    let cron_database = cron_database().map_err(|f| f.message)?;
    if cron_database == current_database() && !pg_cron_installed() {
        return Err(not_installed(&cron_database).message);
    }
    match request(Op::Lookup, "") {
        Ok(Outcome::Found(job)) => Ok(job),
        Ok(_) => unreachable!("a lookup returns a job"),
        Err(failure) => Err(failure.message),
    }
}

/// Whether pg_cron is loaded (its settings exist only when it is in shared_preload_libraries).
pub fn loaded() -> bool {
    cron_database().is_ok()
}

fn request(op: Op, schedule: &str) -> Result<Outcome, Failure> {
    let cron_database = cron_database()?;
    let database = current_database();
    let request = Request {
        op,
        command: JOB_COMMAND.to_owned(),
        // SAFETY: the current user's name, inside a transaction.
        role: unsafe { owned(pg_sys::GetUserNameFromId(pg_sys::GetUserId(), false)) },
        job_name: job_name(&database),
        cron_database,
        database,
        schedule: schedule.to_owned(),
    };
    // The job will run as this role, here; the worker would connect as it there.
    may_connect(&request.role, &request.database)?;
    if request.cron_database == request.database {
        Ok(run(&request))
    } else {
        may_connect(&request.role, &request.cron_database)?;
        via_worker(&request)
    }
}

/// What PostgreSQL requires of a role to start a session in `database` (LOGIN, CONNECT, the
/// database accepting connections), checked here so that neither the worker nor pg_cron's job
/// is started for a role that could not connect. pg_hba.conf is not consulted (module docs).
fn may_connect(role: &str, database: &str) -> Result<(), Failure> {
    let refused = catalog::read_one::<String>(
        "SELECT CASE \
             WHEN NOT r.rolcanlogin THEN 'the role cannot log in (NOLOGIN)' \
             WHEN NOT d.datallowconn THEN 'the database does not accept connections' \
             WHEN NOT pg_catalog.has_database_privilege(r.oid, d.oid, 'CONNECT') \
                 THEN 'the role has no CONNECT privilege on the database' END \
         FROM pg_catalog.pg_roles r, pg_catalog.pg_database d \
         WHERE r.rolname OPERATOR(pg_catalog.=) $1 AND d.datname OPERATOR(pg_catalog.=) $2",
        &[role.into(), database.into()],
    );
    match refused {
        None => Ok(()),
        Some(why) => Err(Failure {
            code: PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            message: format!("role \"{role}\" may not connect to database \"{database}\""),
            detail: Some(format!(
                "Scheduled rotation runs as the calling role in this database, and reaches pg_cron's database as it: {why}."
            )),
            hint: Some("Schedule the rotation as a role that can log in to both databases.".into()),
        }),
    }
}

/// One job per database: its name says which database it rotates keys in.
fn job_name(database: &str) -> String {
    let name = format!("immuta-rotation-{database}");
    if name.len() < pg_sys::NAMEDATALEN as usize {
        name
    } else {
        // SAFETY: MyDatabaseId is set in every backend.
        format!("immuta-rotation-oid-{}", unsafe { pg_sys::MyDatabaseId.to_u32() })
    }
}

fn current_database() -> String {
    // SAFETY: the name of the database this backend is connected to.
    unsafe { owned(pg_sys::get_database_name(pg_sys::MyDatabaseId)) }
}

/// Copies a palloc'd C string.
///
/// # Safety
/// `ptr` is NULL or a NUL-terminated string.
unsafe fn owned(ptr: *const std::ffi::c_char) -> String {
    if ptr.is_null() {
        String::new()
    } else {
        // SAFETY: per the contract above.
        unsafe { CStr::from_ptr(ptr) }.to_string_lossy().into_owned()
    }
}

/// The database pg_cron runs in, or why there is none.
fn cron_database() -> Result<String, Failure> {
    // SAFETY: looks a setting up by a NUL-terminated name; missing_ok, so NULL when undefined.
    let value = unsafe { pg_sys::GetConfigOption(c"cron.database_name".as_ptr(), true, false) };
    if value.is_null() {
        return Err(Failure {
            code: PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            message: "pg_cron is not installed".into(),
            detail: Some("cron.database_name is not defined: pg_cron is not in shared_preload_libraries.".into()),
            hint: Some("Add pg_cron to shared_preload_libraries, restart the server, and run CREATE EXTENSION pg_cron; in the database named by cron.database_name (default postgres).".into()),
        });
    }
    // SAFETY: a NUL-terminated string owned by the GUC machinery; copied at once.
    let name = unsafe { owned(value) };
    let c_name = CString::new(name.clone()).unwrap_or_default();
    // SAFETY: a catalog lookup by NUL-terminated name, missing_ok.
    if unsafe { pg_sys::get_database_oid(c_name.as_ptr(), true) } == pg_sys::InvalidOid {
        return Err(Failure {
            code: PgSqlErrorCode::ERRCODE_INVALID_CATALOG_NAME,
            message: format!("pg_cron's database \"{name}\" does not exist"),
            detail: Some("cron.database_name names a database that does not exist.".into()),
            hint: Some(
                "Set cron.database_name to the database where CREATE EXTENSION pg_cron was run.".into(),
            ),
        });
    }
    Ok(name)
}

fn pg_cron_installed() -> bool {
    catalog::read_one::<bool>(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname OPERATOR(pg_catalog.=) 'pg_cron')",
        &[],
    )
    .unwrap_or(false)
}

fn not_installed(cron_database: &str) -> Failure {
    Failure {
        code: PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
        message: format!("pg_cron is not installed in database \"{cron_database}\""),
        detail: Some("pg_cron is loaded, but its extension does not exist in the database named by cron.database_name.".into()),
        hint: Some(format!("Run CREATE EXTENSION pg_cron; in database \"{cron_database}\".")),
    }
}

/// Makes the request in pg_cron's database, which is the one this process is connected to.
fn run(request: &Request) -> Outcome {
    if !pg_cron_installed() {
        not_installed(&request.cron_database).raise();
    }
    match request.op {
        Op::Schedule => Outcome::Scheduled(
            spi(Spi::get_one_with_args::<i64>(
                "SELECT cron.schedule_in_database($1, $2, $3, $4)",
                &[
                    request.job_name.as_str().into(),
                    request.schedule.as_str().into(),
                    request.command.as_str().into(),
                    request.database.as_str().into(),
                ],
            ))
            .expect("cron.schedule_in_database returns the job id"),
        ),
        Op::Unschedule => {
            let ids = spi(Spi::connect(|client| {
                client
                    .select(
                        "SELECT jobid FROM cron.job WHERE jobname OPERATOR(pg_catalog.=) $1 \
                         AND username OPERATOR(pg_catalog.=) CURRENT_USER",
                        None,
                        &[request.job_name.as_str().into()],
                    )?
                    .map(|row| row.get::<i64>(1))
                    .collect::<Result<Vec<_>, _>>()
            }));
            for id in ids.iter().flatten() {
                spi(Spi::run_with_args("SELECT cron.unschedule($1)", &[(*id).into()]));
            }
            Outcome::Unscheduled(!ids.is_empty())
        }
        Op::Lookup => Outcome::Found(spi(Spi::connect(|client| {
            let rows = client.select(
                "SELECT jobid, jobname::pg_catalog.text, schedule, active, username, command FROM cron.job \
                 WHERE jobname OPERATOR(pg_catalog.=) $1 AND username OPERATOR(pg_catalog.=) CURRENT_USER \
                 ORDER BY jobid LIMIT 1",
                None,
                &[request.job_name.as_str().into()],
            )?;
            let mut found = None;
            for row in rows {
                found = Some(Job {
                    id: row.get::<i64>(1)?.unwrap_or_default(),
                    name: row.get::<String>(2)?.unwrap_or_default(),
                    schedule: row.get::<String>(3)?.unwrap_or_default(),
                    active: row.get::<bool>(4)?.unwrap_or_default(),
                    username: row.get::<String>(5)?.unwrap_or_default(),
                    command: row.get::<String>(6)?.unwrap_or_default(),
                });
            }
            Ok::<_, pgrx::spi::SpiError>(found)
        }))),
    }
}

/// Fixed-size, NUL-terminated text in the exchange segment.
#[repr(C)]
struct Text<const N: usize>([u8; N]);

impl<const N: usize> Text<N> {
    fn set(&mut self, value: &str) {
        let mut end = value.len().min(N - 1);
        while !value.is_char_boundary(end) {
            end -= 1;
        }
        self.0[..end].copy_from_slice(&value.as_bytes()[..end]);
        self.0[end] = 0;
    }

    fn get(&self) -> String {
        let end = self.0.iter().position(|&b| b == 0).unwrap_or(N);
        String::from_utf8_lossy(&self.0[..end]).into_owned()
    }
}

/// The request and its outcome, in a dynamic shared memory segment that this backend creates
/// and the worker attaches to.
#[repr(C)]
struct Exchange {
    op: u32,
    /// Set by the worker last, once the outcome fields are written.
    done: u32,
    failed: u32,
    sqlstate: i32,
    job_id: i64,
    found: u32,
    active: u32,
    role: Text<64>,
    cron_database: Text<64>,
    database: Text<64>,
    job_name: Text<64>,
    command: Text<256>,
    schedule: Text<{ SCHEDULE_MAX + 1 }>,
    username: Text<64>,
    job_command: Text<256>,
    message: Text<1024>,
    detail: Text<1024>,
    hint: Text<512>,
}

fn via_worker(request: &Request) -> Result<Outcome, Failure> {
    let size = std::mem::size_of::<Exchange>();
    // SAFETY: creates a segment owned by the current resource owner (detached at transaction end
    // even if we error out) and zero-fills it; every field of Exchange is valid as zeroes. The
    // request is written before the worker exists.
    let segment = unsafe {
        let segment = pg_sys::dsm_create(size, 0);
        std::ptr::write_bytes(pg_sys::dsm_segment_address(segment).cast::<u8>(), 0, size);
        segment
    };
    // SAFETY: see above; this is the only reference while no worker runs.
    let exchange = unsafe { &mut *pg_sys::dsm_segment_address(segment).cast::<Exchange>() };
    exchange.op = request.op as u32;
    exchange.role.set(&request.role);
    exchange.cron_database.set(&request.cron_database);
    exchange.database.set(&request.database);
    exchange.job_name.set(&request.job_name);
    exchange.command.set(&request.command);
    exchange.schedule.set(&request.schedule);
    // SAFETY: the handle of the segment just created; MyProcPid is this backend; reads whether
    // this server is a standby.
    let (handle, pid, standby) =
        unsafe { (pg_sys::dsm_segment_handle(segment), pg_sys::MyProcPid, pg_sys::RecoveryInProgress()) };
    let builder = BackgroundWorkerBuilder::new("immuta pg_cron request")
        .set_type("immuta pg_cron request")
        .set_library("immuta")
        .set_function("immuta_cron_worker_main")
        .set_argument(Some(pg_sys::Datum::from(handle)))
        .enable_spi_access()
        // A standby starts workers once consistent (a lookup reads the replicated cron.job);
        // one that waited for the end of recovery would never start there.
        .set_start_time(if standby {
            BgWorkerStartTime::ConsistentState
        } else {
            BgWorkerStartTime::RecoveryFinished
        })
        .set_restart_time(None)
        .set_notify_pid(pid);
    let mut worker: pg_sys::BackgroundWorker = (&builder).into();
    let mut bgw_handle: *mut pg_sys::BackgroundWorkerHandle = std::ptr::null_mut();
    // SAFETY: registers a dynamic worker described by `worker`; on success PostgreSQL sets the
    // handle, valid for this backend's lifetime.
    if !unsafe { pg_sys::RegisterDynamicBackgroundWorker(&mut worker, &mut bgw_handle) } {
        // SAFETY: the segment was created above and no worker uses it.
        unsafe { pg_sys::dsm_detach(segment) };
        return Err(Failure {
            code: PgSqlErrorCode::ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
            message: "could not start a background worker to reach pg_cron's database".into(),
            detail: Some(format!(
                "pg_cron runs in database \"{}\"; immuta reaches it with a background worker.",
                request.cron_database
            )),
            hint: Some("Raise max_worker_processes, or call this function in that database.".into()),
        });
    }
    // Wait for the worker to exit. If this backend is cancelled meanwhile, stop the worker too,
    // so that a request the caller saw fail is not carried out behind its back.
    PgTryBuilder::new(|| {
        // SAFETY: waits on the handle registered above (interrupts are checked while waiting).
        unsafe { pg_sys::WaitForBackgroundWorkerShutdown(bgw_handle) };
    })
    .catch_others(|caught| {
        // SAFETY: asks the postmaster to stop the worker of a valid handle.
        unsafe { pg_sys::TerminateBackgroundWorker(bgw_handle) };
        caught.rethrow()
    })
    .execute();
    // SAFETY: the worker has exited, so nothing writes the segment any more; read it through a
    // volatile copy, as another process wrote it.
    let exchange: Exchange =
        unsafe { std::ptr::read_volatile(pg_sys::dsm_segment_address(segment).cast::<Exchange>()) };
    // SAFETY: the segment was created above and the worker has exited.
    unsafe { pg_sys::dsm_detach(segment) };
    if exchange.done == 0 {
        return Err(Failure {
            code: PgSqlErrorCode::ERRCODE_CONNECTION_FAILURE,
            message: format!("could not reach pg_cron's database \"{}\"", request.cron_database),
            detail: Some(format!(
                "The background worker could not connect to it as role \"{}\" (see the server log).",
                request.role
            )),
            hint: Some("The role must be allowed to log in and to connect to that database.".into()),
        });
    }
    if exchange.failed != 0 {
        let text = |t: String| Some(t).filter(|s| !s.is_empty());
        return Err(Failure {
            code: PgSqlErrorCode::from(exchange.sqlstate),
            message: exchange.message.get(),
            detail: text(exchange.detail.get()),
            hint: text(exchange.hint.get()),
        });
    }
    Ok(match request.op {
        Op::Schedule => Outcome::Scheduled(exchange.job_id),
        Op::Unschedule => Outcome::Unscheduled(exchange.found != 0),
        Op::Lookup => Outcome::Found((exchange.found != 0).then(|| Job {
            id: exchange.job_id,
            name: request.job_name.clone(),
            schedule: exchange.schedule.get(),
            active: exchange.active != 0,
            username: exchange.username.get(),
            command: exchange.job_command.get(),
        })),
    })
}

/// The background worker: connects to pg_cron's database, makes the request found in the
/// segment `arg`, writes the outcome there, exits.
#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn immuta_cron_worker_main(arg: pg_sys::Datum) {
    // Keep PostgreSQL's default SIGTERM handler for workers (it ends the worker at once), so a
    // fast shutdown or pg_terminate_backend() stops a request stuck on a lock.
    // SAFETY: unblocks signals in a background worker, as every worker must.
    unsafe { pg_sys::BackgroundWorkerUnblockSignals() };
    // SAFETY: attaches the segment whose handle the requesting backend passed; NULL if that
    // backend already gave up (then there is nobody to answer).
    let segment = unsafe { pg_sys::dsm_attach(arg.value() as pg_sys::dsm_handle) };
    if segment.is_null() {
        return;
    }
    // SAFETY: the segment holds an Exchange written by the requesting backend, which waits for
    // this worker to exit before it reads the outcome or detaches.
    let exchange = unsafe { pg_sys::dsm_segment_address(segment).cast::<Exchange>() };
    // SAFETY: see above; read before the worker writes anything.
    let request = unsafe { request_in(&*exchange) };
    BackgroundWorker::connect_worker_to_spi(Some(&request.cron_database), Some(&request.role));
    // SAFETY: a transaction of our own around the request, as BackgroundWorker::transaction
    // does; an error aborts it through the worker's normal error exit after being recorded.
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    PgTryBuilder::new(|| {
        // Never wait long on pg_cron's tables: the requesting backend waits for this worker.
        spi(Spi::run("SET LOCAL search_path = pg_catalog, pg_temp"));
        spi(Spi::run("SET LOCAL lock_timeout = '10s'"));
        spi(Spi::run("SET LOCAL statement_timeout = '60s'"));
        let outcome = run(&request);
        // SAFETY: this worker is the only writer of the segment until it exits.
        let exchange = unsafe { &mut *exchange };
        match outcome {
            Outcome::Scheduled(id) => exchange.job_id = id,
            Outcome::Unscheduled(removed) => exchange.found = removed as u32,
            Outcome::Found(job) => {
                if let Some(job) = job {
                    exchange.found = 1;
                    exchange.job_id = job.id;
                    exchange.active = job.active as u32;
                    exchange.schedule.set(&job.schedule);
                    exchange.username.set(&job.username);
                    exchange.job_command.set(&job.command);
                }
            }
        }
    })
    .catch_others(|caught| {
        // SAFETY: as above.
        let exchange = unsafe { &mut *exchange };
        let report = report_of(&caught);
        exchange.failed = 1;
        exchange.sqlstate = report.sql_error_code() as isize as i32;
        exchange.message.set(report.message());
        exchange.detail.set(report.detail().unwrap_or(""));
        exchange.hint.set(report.hint().unwrap_or(""));
        exchange.done = 1;
        caught.rethrow()
    })
    .execute();
    // SAFETY: ends the transaction started above (the request succeeded; a failing commit
    // raises and leaves `done` unset), then hands the outcome over.
    unsafe {
        pg_sys::PopActiveSnapshot();
        pg_sys::CommitTransactionCommand();
        (*exchange).done = 1;
        pg_sys::dsm_detach(segment);
    }
}

fn request_in(exchange: &Exchange) -> Request {
    Request {
        op: match exchange.op {
            1 => Op::Schedule,
            2 => Op::Unschedule,
            _ => Op::Lookup,
        },
        role: exchange.role.get(),
        cron_database: exchange.cron_database.get(),
        database: exchange.database.get(),
        job_name: exchange.job_name.get(),
        command: exchange.command.get(),
        schedule: exchange.schedule.get(),
    }
}

fn report_of(caught: &CaughtError) -> &ErrorReportWithLevel {
    match caught {
        CaughtError::PostgresError(report) | CaughtError::ErrorReport(report) => report,
        CaughtError::RustPanic { ereport, .. } => ereport,
    }
}
