//! The one place where immuta's errors become PostgreSQL errors.
//!
//! Each core [`Error`] variant maps to one SQLSTATE (the table in README.md, "Errors"), with a
//! message that names the problem, a DETAIL with the facts (key ids, fingerprints, paths, sizes)
//! and a HINT with what to do. Nothing here formats plaintext, ciphertext bytes, key bytes or
//! credentials: the core's errors do not carry them.

use immuta_core::Error;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};

/// Where a configuration error came from: the two sources get different SQLSTATEs.
#[derive(Clone, Copy)]
pub enum ConfigOrigin {
    /// `immuta_configure(yaml)`: a bad argument (22023).
    Argument,
    /// The file named by `immuta.config_file` (F0000).
    File,
    /// The row stored in `immuta.config` (F0000): valid when stored, so written by another
    /// version or edited by hand.
    Stored,
}

fn report_at(
    level: PgLogLevel,
    code: PgSqlErrorCode,
    message: String,
    detail: Option<String>,
    hint: Option<&str>,
) {
    let mut report = ErrorReport::new(code, message, "immuta");
    if let Some(detail) = detail {
        report = report.set_detail(detail);
    }
    if let Some(hint) = hint {
        report = report.set_hint(hint);
    }
    report.report(level);
}

/// Raises an ERROR; never returns.
pub fn raise(
    code: PgSqlErrorCode,
    message: impl Into<String>,
    detail: Option<String>,
    hint: Option<&str>,
) -> ! {
    report_at(PgLogLevel::ERROR, code, message.into(), detail, hint);
    unreachable!("ERROR does not return")
}

/// Emits a WARNING.
pub fn warn(code: PgSqlErrorCode, message: impl Into<String>, detail: Option<String>, hint: Option<&str>) {
    report_at(PgLogLevel::WARNING, code, message.into(), detail, hint);
}

/// The call that decrypts a value of `value_type`, for HINTs.
pub fn reader_of(value_type: immuta_core::value_type::ValueType) -> String {
    use immuta_core::value_type::{Scalar, ValueType};
    let call = match value_type {
        ValueType::TEXT => "immuta_decrypt(ciphertext)",
        t if t == ValueType::scalar(Scalar::Bytea) => "immuta_decrypt_bytea(ciphertext)",
        t if t == ValueType::scalar(Scalar::Jsonb) => "immuta_decrypt_jsonb(ciphertext)",
        t => {
            return format!(
                "immuta_decrypt(ciphertext, NULL::{t}), and its context as a third argument if it was encrypted with one"
            )
        }
    };
    format!("{call}, and its context as a second argument if it was encrypted with one")
}

/// Raises the ERROR for a core error.
pub fn report(error: Error, origin: ConfigOrigin) -> ! {
    use PgSqlErrorCode::*;
    match error {
        Error::CiphertextTruncated { len, min } => raise(
            ERRCODE_INVALID_BINARY_REPRESENTATION,
            "immuta ciphertext is truncated",
            Some(format!("The value is {len} bytes long; an immuta ciphertext is at least {min} bytes.")),
            Some("The value was cut short, or it is not a value produced by immuta_encrypt()."),
        ),
        Error::UnsupportedVersion { version } => raise(
            ERRCODE_FEATURE_NOT_SUPPORTED,
            format!("unsupported immuta ciphertext format version {version}"),
            Some(format!(
                "This immuta reads format versions {} and {}.",
                immuta_core::format::VERSION_1,
                immuta_core::format::VERSION_2
            )),
            Some("The value was written by a newer immuta, or it is not a value produced by immuta_encrypt()."),
        ),
        Error::UnsupportedFeature { version, what, value } => raise(
            ERRCODE_FEATURE_NOT_SUPPORTED,
            format!("unsupported immuta ciphertext format {version} {what}"),
            Some(format!("The header's {what} byte is {value:#04x}, which this immuta does not know.")),
            Some("The value was written by a newer immuta, or it is not a value produced by immuta_encrypt()."),
        ),
        Error::TypeMismatch { held, wanted } => raise(
            ERRCODE_DATATYPE_MISMATCH,
            format!("immuta value holds {held}, not {wanted}"),
            Some(format!("The value was encrypted from a {held} and is decrypted only as one.")),
            Some(&format!("Read it with {}.", reader_of(held))),
        ),
        Error::ContextMismatch { key_id, problem } => {
            use immuta_core::error::ContextProblem::*;
            let detail = match problem {
                Missing => "The value was encrypted with a context, and none was given.".to_owned(),
                NotExpected => "The value was encrypted without a context, and one was given.".to_owned(),
                Different => format!(
                    "The value does not verify under data key {key_id} with the context given: the \
                     context differs from the one it was encrypted with (the value was moved from \
                     another row, column or table), or its bytes were altered."
                ),
            };
            raise(
                ERRCODE_INVALID_PARAMETER_VALUE,
                "immuta context does not match the encrypted value",
                Some(detail),
                Some("Decrypt with exactly the context the value was encrypted with (the same expression over the same row)."),
            )
        }
        Error::InvalidEncoding { key_id, value_type } => raise(
            ERRCODE_INVALID_BINARY_REPRESENTATION,
            format!("immuta decrypted value is not a valid {value_type}"),
            Some(format!("The value authenticated under data key {key_id}, but its bytes are not an encoding of {value_type}.")),
            Some("Only values produced by immuta_encrypt() decrypt; this one was made otherwise with the data key."),
        ),
        Error::UnknownKey { key_id } => raise(
            ERRCODE_UNDEFINED_OBJECT,
            format!("immuta data key {key_id} does not exist"),
            Some(format!("The value was encrypted under data key {key_id}, which immuta.data_keys does not hold.")),
            Some("The keys table must come along with the data: restore it (pg_dump includes it) from the database the value came from."),
        ),
        Error::AuthenticationFailed { key_id } => raise(
            ERRCODE_DATA_EXCEPTION,
            "immuta ciphertext failed authentication",
            Some(format!(
                "The value names data key {key_id} but does not verify under it: its bytes were altered, \
                 or it was encrypted by a different key that also had id {key_id}."
            )),
            Some("Values from another database decrypt only with that database's keys table and master key."),
        ),
        Error::InvalidText { key_id } => raise(
            ERRCODE_CHARACTER_NOT_IN_REPERTOIRE,
            "immuta decrypted value is not valid text",
            Some(format!("The value authenticated under data key {key_id}, but is not UTF-8 text without NUL bytes.")),
            Some("Only values produced by immuta_encrypt() can be decrypted to text."),
        ),
        Error::MasterKeyMissing { path, expected } => raise(
            ERRCODE_UNDEFINED_FILE,
            format!("immuta master key file \"{}\" does not exist", path.display()),
            expected.map(|fp| format!("immuta's data keys depend on the local master key with fingerprint {fp}.")),
            Some(
                "Copy the master key file from the old data directory (pg_upgrade and initdb do not copy \
                 it) or restore it from your backup, and point immuta.master_key_file at it. immuta \
                 never creates a new master key while data keys, or the marker immuta_master_key.generated \
                 in the data directory, depend on one.",
            ),
        ),
        Error::MasterKeyMismatch { key_id, expected, found, path } => raise(
            ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("immuta master key mismatch for data key {key_id}"),
            Some(format!(
                "Data key {key_id} was wrapped by the master key with fingerprint {expected}, \
                 but \"{}\" holds the master key with fingerprint {found}.",
                path.display()
            )),
            Some("Set immuta.master_key_file to the master key that wrapped the data keys of this database."),
        ),
        Error::MasterKeyInvalid { path, reason } => raise(
            ERRCODE_CONFIG_FILE_ERROR,
            format!("immuta master key file \"{}\" is not usable", path.display()),
            Some(sentence(&reason)),
            Some("The file must be a regular file holding 64 hexadecimal digits, with mode 0600 (no access for group or others)."),
        ),
        Error::MasterKeyIo { action, path, source } => raise(
            ERRCODE_IO_ERROR,
            format!("could not {action} immuta master key file \"{}\"", path.display()),
            Some(source.to_string()),
            None,
        ),
        Error::WrappedKeyCorrupt { key_id, reason } => raise(
            ERRCODE_DATA_CORRUPTED,
            format!("immuta wrapped data key {key_id} is corrupt"),
            Some(format!("The master key matches the one recorded for the key, but {reason}.")),
            Some("The row of immuta.data_keys was altered; restore it from a backup."),
        ),
        Error::ProviderUnavailable { key_id, wrapping, reason } => raise(
            ERRCODE_FEATURE_NOT_SUPPORTED,
            format!("immuta data key {key_id} needs {wrapping}, which is not available"),
            Some(reason),
            None,
        ),
        Error::Interrupted => {
            // A cancel or termination is pending: let PostgreSQL raise it as usual.
            pgrx::check_for_interrupts!();
            raise(ERRCODE_QUERY_CANCELED, "canceling statement due to user request", None, None)
        }
        Error::KmsUnreachable { wrapping, reason } => raise(
            ERRCODE_CONNECTION_FAILURE,
            format!("AWS KMS is unreachable for {wrapping}"),
            Some(reason),
            Some("Check the network path to KMS (plugins.awsKms.region, extraKmsConfig.endpoint). Keys already unwrapped by this session keep working."),
        ),
        Error::KmsDenied { wrapping, code, message } => raise(
            ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("AWS KMS denied access to {wrapping}"),
            Some(kms_detail(&code, &message)),
            Some("The identity immuta uses needs kms:Encrypt and kms:Decrypt on this key; check its IAM policy and credentials."),
        ),
        Error::KmsKeyUnusable { wrapping, code, message } => raise(
            ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("AWS KMS key is not usable: {wrapping}"),
            Some(kms_detail(&code, &message)),
            Some("The key is disabled, pending deletion, missing or unavailable; data keys it wrapped cannot be unwrapped until it is usable again."),
        ),
        Error::KmsThrottled { wrapping, code, message } => raise(
            ERRCODE_INSUFFICIENT_RESOURCES,
            format!("AWS KMS throttled the request for {wrapping}"),
            Some(kms_detail(&code, &message)),
            Some("Retry later, or raise the KMS request quota."),
        ),
        Error::KmsRejectedWrappedKey { key_id, wrapping, code, message } => raise(
            ERRCODE_DATA_CORRUPTED,
            format!("AWS KMS refused to unwrap immuta data key {key_id} with {wrapping}"),
            Some(kms_detail(&code, &message)),
            Some("The wrapped key, its encryption context (the key id) or its KMS key does not match the row of immuta.data_keys; restore the row from a backup."),
        ),
        Error::ServerIdentityRefused { key_id, refusal } => {
            use immuta_core::server_identity::Refusal;
            let what = match key_id {
                Some(id) => format!("to unwrap immuta data key {id}"),
                None => "to wrap a new data key".to_owned(),
            };
            let (detail, hint) = match refusal {
                Refusal::ConfigurationNotBySuperuser => (
                    "The configuration in force has no extraKmsConfig.credentials, so KMS would be called as the server itself (its instance profile, task role or environment), and it was not put in force by a superuser.",
                    "Give credentials in extraKmsConfig.credentials, or ask a superuser to store the configuration (immuta_configure()) or to set immuta.config_file.",
                ),
                Refusal::WrappingNotBySuperuser => (
                    "The key's KMS key, region and wrapped bytes were not chosen under a superuser's configuration (the row was restored, existed before the update from immuta 0.1.0, or was wrapped under a configuration a role that is not a superuser stored), so immuta does not unwrap it as the server itself.",
                    "Give credentials in extraKmsConfig.credentials, or ask a superuser to vouch for the row (UPDATE immuta.data_keys SET server_identity = true WHERE id = ...).",
                ),
            };
            raise(
                ERRCODE_INSUFFICIENT_PRIVILEGE,
                format!("immuta may not call AWS KMS with the server's own identity {what}"),
                Some(detail.into()),
                Some(hint),
            )
        }
        Error::KmsFailed { wrapping, code, message } => raise(
            ERRCODE_SYSTEM_ERROR,
            format!("AWS KMS request failed for {wrapping}"),
            Some(kms_detail(&code, &message)),
            None,
        ),
        Error::Config { path, reason } => match origin {
            ConfigOrigin::Argument => raise(
                ERRCODE_INVALID_PARAMETER_VALUE,
                format!("invalid immuta configuration at {path}"),
                Some(reason),
                Some("The configuration takes the YAML of Immuta's Advanced Configuration: plugins.awsKms and schedule. The previous configuration stays in force."),
            ),
            ConfigOrigin::File => raise(
                ERRCODE_CONFIG_FILE_ERROR,
                format!("invalid immuta configuration file at {path}"),
                Some(reason),
                Some("Fix the file named by immuta.config_file."),
            ),
            ConfigOrigin::Stored => raise(
                ERRCODE_CONFIG_FILE_ERROR,
                format!("invalid stored immuta configuration at {path}"),
                Some(reason),
                Some("The row of immuta.config was edited by hand or written by another immuta version; store a valid configuration with immuta_configure()."),
            ),
        },
    }
}

/// The KMS error code (what an operator searches for) and KMS's message, which names ARNs and
/// actions but never credentials.
fn kms_detail(code: &str, message: &str) -> String {
    if message.is_empty() {
        format!("KMS error code: {code}.")
    } else {
        format!("KMS error code: {code}. {message}")
    }
}

/// The five characters of a SQLSTATE (PostgreSQL packs them six bits each, `MAKE_SQLSTATE`).
pub fn sqlstate_text(code: PgSqlErrorCode) -> String {
    let packed = code as isize as u32;
    (0..5).map(|i| char::from(b'0' + ((packed >> (6 * i)) & 0x3F) as u8)).collect()
}

/// "it is x" -> "It is x."
fn sentence(fragment: &str) -> String {
    let mut chars = fragment.chars();
    match chars.next() {
        Some(first) => format!("{}{}.", first.to_uppercase(), chars.as_str()),
        None => String::new(),
    }
}

/// Unwraps a core result or raises its ERROR.
pub trait OrRaise<T> {
    fn or_raise(self) -> T;
}

impl<T> OrRaise<T> for Result<T, Error> {
    fn or_raise(self) -> T {
        self.unwrap_or_else(|e| report(e, ConfigOrigin::Argument))
    }
}
