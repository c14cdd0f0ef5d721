//! The AWS KMS provider: data keys are generated here and wrapped with KMS `Encrypt`, unwrapped
//! with KMS `Decrypt`. Those are the only two calls it makes, so it works under the least
//! privilege policy of the Immuta documentation (`kms:Encrypt`, `kms:Decrypt`); no
//! `GenerateDataKey`, no `DescribeKey`.
//!
//! Every wrapped key is bound to its row by the encryption context
//! `{"immuta_key_id": "<id>"}` (docs/FORMAT.md shows how to unwrap one with the AWS CLI). The row
//! records the ARN KMS reports for the key that wrapped it, and `Decrypt` names that key, so an
//! alias later pointed elsewhere, or a configuration moved to another key, never changes which key
//! unwraps an old row.
//!
//! The SDK is async; a backend is not. Each call runs on a current-thread tokio runtime created
//! lazily in the calling process (so never in the postmaster), on the calling thread. The only
//! threads tokio may start are blocking-pool threads (DNS resolution); they block every signal so
//! that PostgreSQL's signal handlers keep running on the backend's own thread. A call ends at
//! whichever comes first: the answer, the timeout, or the caller's interrupt check (polled every
//! 20 ms), so a query cancel or `statement_timeout` ends a KMS wait promptly.

use std::cell::{OnceCell, RefCell};
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::BehaviorVersion;
use aws_credential_types::provider::error::CredentialsError;
use aws_credential_types::Credentials;
use aws_sdk_kms::config::http::HttpResponse;
use aws_sdk_kms::config::Region;
use aws_sdk_kms::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::Client;
use aws_smithy_types::error::display::DisplayErrorContext;
use zeroize::Zeroize;

use crate::config::AwsAccess;
use crate::key::{DataKey, KeyId, WrappedKey, WrappingKeyRef, DATA_KEY_LEN};
use crate::provider::{KeyProvider, Wrapped};
use crate::{Error, Result};

/// The encryption context key that binds a wrapped key to its row.
pub const CONTEXT_KEY: &str = "immuta_key_id";

/// How often a KMS wait checks for an interrupt.
const INTERRUPT_POLL: Duration = Duration::from_millis(20);

/// How a call may end early.
#[derive(Clone, Copy)]
pub struct CallLimits {
    /// The longest a call may take, retries included (`immuta.kms_timeout`).
    pub timeout: Duration,
    /// Polled while waiting; `true` ends the wait with [`Error::Interrupted`].
    pub interrupted: fn() -> bool,
}

/// Wraps and unwraps data keys with one KMS key in one region.
pub struct AwsKmsProvider {
    client: Client,
    reference: WrappingKeyRef,
    limits: CallLimits,
}

/// Identifies a client: region, endpoint, and the credentials (an in-memory hash of the secret,
/// so that changed credentials get a new client).
#[derive(PartialEq, Eq, Hash)]
struct ClientKey {
    region: String,
    endpoint: Option<String>,
    timeout: Duration,
    credentials: Option<(String, u64)>,
}

thread_local! {
    /// One SDK client per region and access settings, kept for the life of the backend: its HTTP
    /// connections and its credentials cache (an STS web identity exchange on EKS, say) are
    /// reused by every wrap and unwrap instead of being set up again per key.
    static CLIENTS: RefCell<HashMap<ClientKey, Client>> = RefCell::new(HashMap::new());
}

fn client(region: &str, access: &AwsAccess<'_>, limits: CallLimits) -> std::result::Result<Client, Stop> {
    let credentials = access.credentials.map(|c| {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        c.secret_access_key.expose().hash(&mut h);
        c.session_token.as_ref().map(|t| t.expose()).hash(&mut h);
        (c.access_key_id.clone(), h.finish())
    });
    let key = ClientKey {
        region: region.to_owned(),
        endpoint: access.endpoint.map(str::to_owned),
        timeout: limits.timeout,
        credentials,
    };
    if let Some(client) = CLIENTS.with_borrow(|clients| clients.get(&key).cloned()) {
        return Ok(client);
    }
    // Retries must fit in the call's time budget: backoff is capped at a tenth of it, so a
    // throttled call reports the throttling, not a timeout.
    let retry = RetryConfig::standard().with_max_attempts(3).with_max_backoff(limits.timeout / 10);
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(region.to_owned()))
        .retry_config(retry)
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(limits.timeout)
                .operation_timeout(limits.timeout)
                .build(),
        );
    if let Some(endpoint) = access.endpoint {
        loader = loader.endpoint_url(endpoint);
    }
    if let Some(c) = access.credentials {
        loader = loader.credentials_provider(Credentials::new(
            c.access_key_id.clone(),
            c.secret_access_key.expose().to_owned(),
            c.session_token.as_ref().map(|t| t.expose().to_owned()),
            None,
            "immuta configuration",
        ));
    }
    let client = Client::new(&run(limits, loader.load())?);
    CLIENTS.with_borrow_mut(|clients| clients.insert(key, client.clone()));
    Ok(client)
}

/// This thread's runtime. Dropped at process exit without waiting for a blocking thread that may
/// be stuck in DNS resolution, so a backend never hangs on exit.
struct Runtime(Option<tokio::runtime::Runtime>);

impl Drop for Runtime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

thread_local! {
    static RUNTIME: OnceCell<Runtime> = const { OnceCell::new() };
}

/// Blocks every signal in the calling thread and returns the previous mask.
// The core's one exception to `deny(unsafe_code)` (with `build_runtime`): the standard library
// has no safe way to set a thread's signal mask.
#[allow(unsafe_code)]
fn block_all_signals() -> libc::sigset_t {
    // SAFETY: pthread_sigmask on the calling thread with a filled set; it only changes that
    // thread's signal mask and reports the old one.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old);
        old
    }
}

/// Builds the runtime with its single blocking thread (used for DNS resolution) created while
/// this thread blocks every signal, so that the new thread inherits a fully blocked mask from its
/// first instruction and PostgreSQL's signal handlers only ever run on the backend's own thread.
/// The thread is kept for the life of the process, so no later thread creation reopens the gap.
#[allow(unsafe_code)] // restores the signal mask: see block_all_signals
fn build_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(1)
        .thread_keep_alive(Duration::from_secs(100 * 365 * 86_400))
        .build()?;
    let previous = block_all_signals();
    let started = runtime.block_on(runtime.spawn_blocking(|| ()));
    // SAFETY: restores this thread's own signal mask as it was before block_all_signals.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &previous, std::ptr::null_mut()) };
    started.map_err(std::io::Error::other)?;
    Ok(runtime)
}

/// Runs `future` on this thread's runtime, bounded by `limits`.
fn run<T>(limits: CallLimits, future: impl std::future::Future<Output = T>) -> std::result::Result<T, Stop> {
    RUNTIME.with(|cell| {
        if cell.get().is_none() {
            let runtime = build_runtime().map_err(|e| Stop::Runtime(e.to_string()))?;
            let _ = cell.set(Runtime(Some(runtime)));
        }
        let runtime = cell.get().and_then(|r| r.0.as_ref()).expect("set above");
        runtime.block_on(async {
            let interrupt = async {
                loop {
                    tokio::time::sleep(INTERRUPT_POLL).await;
                    if (limits.interrupted)() {
                        return;
                    }
                }
            };
            tokio::select! {
                value = future => Ok(value),
                () = tokio::time::sleep(limits.timeout) => Err(Stop::Timeout),
                () = interrupt => Err(Stop::Interrupted),
            }
        })
    })
}

enum Stop {
    Timeout,
    Interrupted,
    /// The runtime could not be created (e.g. no file descriptors left).
    Runtime(String),
}

impl AwsKmsProvider {
    /// A provider for `key` in `region`, reached with `access` (endpoint and credentials; the
    /// AWS default credential chain when the configuration has none).
    pub fn new(
        key: &str,
        region: &str,
        access: &AwsAccess<'_>,
        limits: CallLimits,
    ) -> Result<AwsKmsProvider> {
        let reference = WrappingKeyRef::AwsKms { key_id: key.to_owned(), region: region.to_owned() };
        let client = client(region, access, limits).map_err(|stop| stop_error(stop, &reference, limits))?;
        Ok(AwsKmsProvider { client, reference, limits })
    }

    /// Runs one KMS request within the limits and sorts its failure.
    fn call<T, E: ProvideErrorMetadata + std::error::Error + 'static>(
        &self,
        id: KeyId,
        about: &WrappingKeyRef,
        request: impl std::future::Future<Output = std::result::Result<T, SdkError<E, HttpResponse>>>,
    ) -> Result<T> {
        run(self.limits, request)
            .map_err(|stop| stop_error(stop, about, self.limits))?
            .map_err(|e| sdk_error(e, id, about, self.limits))
    }

    fn key_and_region(&self) -> (&str, &str) {
        match &self.reference {
            WrappingKeyRef::AwsKms { key_id, region } => (key_id, region),
            WrappingKeyRef::Local { .. } => unreachable!("a KMS provider has a KMS reference"),
        }
    }
}

fn stop_error(stop: Stop, wrapping: &WrappingKeyRef, limits: CallLimits) -> Error {
    match stop {
        Stop::Interrupted => Error::Interrupted,
        Stop::Runtime(reason) => Error::KmsFailed {
            wrapping: wrapping.clone(),
            code: "RuntimeUnavailable".into(),
            message: format!("could not start the AWS SDK's runtime: {reason}"),
        },
        Stop::Timeout => Error::KmsUnreachable {
            wrapping: wrapping.clone(),
            reason: format!("no answer within {} ms (immuta.kms_timeout)", limits.timeout.as_millis()),
        },
    }
}

/// Sorts an SDK error into the conditions immuta reports distinctly.
fn sdk_error<E: ProvideErrorMetadata + std::error::Error + 'static>(
    err: SdkError<E, HttpResponse>,
    key_id: KeyId,
    wrapping: &WrappingKeyRef,
    limits: CallLimits,
) -> Error {
    let status = err.raw_response().map(|r| r.status().as_u16());
    let (mut code, mut message) =
        (err.code().unwrap_or_default().to_owned(), err.message().unwrap_or_default().to_owned());
    if code.is_empty() {
        // Not a KMS JSON error (e.g. a proxy's or an IAM layer's XML): take what it names.
        let body = err.raw_response().and_then(|r| r.body().bytes()).map(String::from_utf8_lossy);
        let tag = |name: &str| {
            let body = body.as_deref()?;
            let start = body.find(&format!("<{name}>"))? + name.len() + 2;
            let end = body[start..].find(&format!("</{name}>"))? + start;
            Some(body[start..end].trim().to_owned())
        };
        code = tag("Code").unwrap_or_else(|| status.map(|s| format!("HTTP {s}")).unwrap_or_default());
        message = tag("Message").unwrap_or(message);
    }
    let message = sanitize(&message);
    let wrapping = wrapping.clone();
    match &err {
        SdkError::TimeoutError(_) => stop_error(Stop::Timeout, &wrapping, limits),
        SdkError::DispatchFailure(d) => {
            // Missing credentials surface as a dispatch failure too; they are an access problem.
            let mut source = std::error::Error::source(&err);
            while let Some(e) = source {
                if let Some(c) = e.downcast_ref::<CredentialsError>() {
                    return Error::KmsDenied {
                        wrapping,
                        code: "CredentialsError".into(),
                        message: sanitize(&DisplayErrorContext(c).to_string()),
                    };
                }
                source = e.source();
            }
            Error::KmsUnreachable {
                wrapping,
                reason: if d.is_timeout() {
                    format!("no answer within {} ms (immuta.kms_timeout)", limits.timeout.as_millis())
                } else {
                    // The whole cause chain: connection refused, DNS failure, TLS failure.
                    sanitize(&DisplayErrorContext(&err).to_string())
                },
            }
        }
        SdkError::ServiceError(_) | SdkError::ResponseError(_) => match code.as_str() {
            "AccessDeniedException"
            | "AccessDenied"
            | "UnrecognizedClientException"
            | "InvalidClientTokenId"
            | "InvalidSignatureException"
            | "SignatureDoesNotMatch"
            | "ExpiredTokenException"
            | "IncompleteSignature"
            | "MissingAuthenticationToken" => Error::KmsDenied { wrapping, code, message },
            _ if status == Some(403) => Error::KmsDenied { wrapping, code, message },
            "DisabledException"
            | "KMSInvalidStateException"
            | "NotFoundException"
            | "KeyUnavailableException"
            | "InvalidKeyUsageException" => Error::KmsKeyUnusable { wrapping, code, message },
            "ThrottlingException" | "LimitExceededException" | "TooManyRequestsException" => {
                Error::KmsThrottled { wrapping, code, message }
            }
            "InvalidCiphertextException" | "IncorrectKeyException" => {
                Error::KmsRejectedWrappedKey { key_id, wrapping, code, message }
            }
            _ => Error::KmsFailed { wrapping, code, message },
        },
        _ => Error::KmsFailed {
            wrapping,
            code: if code.is_empty() { "client error".into() } else { code },
            message: sanitize(&DisplayErrorContext(&err).to_string()),
        },
    }
}

/// What of a KMS or SDK message may be shown. AWS's signature errors append the canonical
/// request and string to sign, which contain the session token header: everything from there on
/// is cut, as is anything past the first line, and the rest is bounded.
fn sanitize(message: &str) -> String {
    let mut text = message.lines().next().unwrap_or_default();
    for marker in ["The Canonical String", "String-to-Sign", "x-amz-security-token", "X-Amz-Security-Token"] {
        if let Some(at) = text.find(marker) {
            text = &text[..at];
        }
    }
    text.trim().chars().take(400).collect()
}

impl KeyProvider for AwsKmsProvider {
    /// Encrypts the data key under the configured KMS key. The reference to record is the key's
    /// ARN as KMS reports it (the configuration may name an alias), and the region.
    fn wrap(&self, id: KeyId, key: &DataKey) -> Result<Wrapped> {
        let (key_id, region) = self.key_and_region();
        let request = self
            .client
            .encrypt()
            .key_id(key_id)
            .plaintext(Blob::new(key.expose().to_vec()))
            .encryption_context(CONTEXT_KEY, id.to_string())
            .send();
        let output = self.call(id, &self.reference, request)?;
        let arn = output.key_id.unwrap_or_else(|| key_id.to_owned());
        let wrapped =
            output.ciphertext_blob.map(Blob::into_inner).filter(|b| !b.is_empty()).ok_or_else(|| {
                Error::KmsFailed {
                    wrapping: self.reference.clone(),
                    code: "EmptyResponse".into(),
                    message: "Encrypt returned no ciphertext".into(),
                }
            })?;
        Ok(Wrapped {
            key: WrappedKey::new(wrapped),
            by: WrappingKeyRef::AwsKms { key_id: arn, region: region.to_owned() },
        })
    }

    fn unwrap(&self, id: KeyId, recorded: &WrappingKeyRef, wrapped: &WrappedKey) -> Result<DataKey> {
        let WrappingKeyRef::AwsKms { key_id: key, .. } = recorded else {
            return Err(Error::ProviderUnavailable {
                key_id: id,
                wrapping: recorded.clone(),
                reason: "the AWS KMS provider only unwraps keys wrapped by AWS KMS".into(),
            });
        };
        let request = self
            .client
            .decrypt()
            .key_id(key)
            .ciphertext_blob(Blob::new(wrapped.as_bytes().to_vec()))
            .encryption_context(CONTEXT_KEY, id.to_string())
            .send();
        let output = self.call(id, recorded, request)?;
        let mut plaintext = output.plaintext.map(Blob::into_inner).unwrap_or_default();
        let key = <[u8; DATA_KEY_LEN]>::try_from(plaintext.as_slice())
            .ok()
            .map(|mut raw| DataKey::from_bytes(&mut raw));
        plaintext.zeroize();
        key.ok_or(Error::WrappedKeyCorrupt {
            key_id: id,
            reason: "KMS returned a plaintext that is not a 256-bit key",
        })
    }
}
