//! `immuta_status()`: one document that answers "is key management healthy here?": the current
//! key (age, due date, usage against the limit, wrapping), the provider for new keys, the cache
//! mode, whether the scheduled rollover job exists in pg_cron, and whether this transaction may
//! write keys here (not on a standby, nor on a logical subscriber of immuta's keys).

use serde_json::{json, Value};

use crate::backend;
use crate::{catalog, cron, gucs, keyrings, shared_cache};

pub fn status() -> Value {
    let default = keyrings::status(immuta_core::keyrings::DEFAULT);
    let config = backend::config();
    let limit = gucs::usage_limit().get();
    let days = config.rollover().days();
    let current = default["current_key"].clone();
    let (keyrings, destroyed) = catalog::keyring_count();
    let (job, job_error) = match cron::lookup() {
        Ok(Some(job)) => {
            // A job scheduled by immuta 0.1.0 named the function by the extension's schema,
            // which the database owner controls: it must be scheduled again.
            let outdated = job.command != cron::JOB_COMMAND;
            (
                json!({
                    "job_id": job.id,
                    "job_name": job.name,
                    "schedule": job.schedule,
                    "active": job.active,
                    "username": job.username,
                    "command": job.command,
                }),
                if outdated {
                    json!("the job runs an outdated command that the database owner could redirect; run SELECT immuta_schedule_rotation() again")
                } else {
                    Value::Null
                },
            )
        }
        Ok(None) => (Value::Null, Value::Null),
        Err(why) => (Value::Null, json!(why)),
    };
    json!({
        "current_key": current,
        "keys": catalog::key_count(),
        "keyrings": { "named": keyrings, "destroyed": destroyed },
        "rollover_length_days": days,
        "max_encryptions_per_key": limit,
        "provider_for_new_keys": if config.aws_kms().is_some() { "awsKms" } else { "local" },
        "cache_mode": shared_cache::mode(),
        "pg_cron_loaded": cron::loaded(),
        "rotation_job_present": !job.is_null(),
        "rotation_job": job,
        "rotation_job_error": job_error,
        "key_writes": match crate::keys::key_write_blocker() {
            None => json!("allowed"),
            Some(why) => json!(format!("refused: {why}")),
        },
    })
}
