//! The configuration: the YAML of Immuta's Advanced Configuration, accepted verbatim.
//!
//! ```yaml
//! plugins:
//!   awsKms:
//!     plugin: awsKms
//!     isKms: true
//!     keyId: <key id, key ARN, alias name or alias ARN>
//!     region: <region>
//!     extraKmsConfig:            # optional
//!       endpoint: <url>          # optional: VPC endpoint, or a test server
//!       credentials:             # optional, not recommended: prefer IAM roles
//!         accessKeyId: <id>
//!         secretAccessKey: <secret>
//!         sessionToken: <token>  # optional
//! schedule:
//!   dataKeyRollOverLength: 365   # days, default 365
//! ```
//!
//! Parsing is strict: unknown keys, wrong types and bad values are rejected with the path of the
//! offending entry (`plugins.awsKms.region`), so a typo never silently falls back to a default.
//! Secrets are held in [`Secret`], which cannot be printed and is zeroized on drop, and
//! [`Config::to_redacted_json`] replaces them with a marker.
//!
//! The document comes from users (`immuta_configure()`, a file), so it is bounded before it is
//! parsed: at most [`MAX_DOCUMENT_BYTES`] bytes and [`MAX_FLOW_COLLECTIONS`] flow collections
//! (`[`/`{`). libyaml's cost grows with the square of the flow nesting depth: 60,000 `[` took
//! 20 s in a test, and a megabyte would hold a core for an hour; 256 of them cost a few
//! milliseconds. A real configuration is a few hundred bytes with a handful of brackets at most.
//!
//! Error messages never quote the document: parser and type errors are rewritten into words
//! that name the position, the problem and what was expected (serde would say `invalid value:
//! string "<the secret>", expected an integer` for `secretAccessKey: !!int <the secret>`).

use serde::Deserialize;
use serde_json::{json, Value};
use zeroize::Zeroizing;

use crate::key::{is_aws_region, is_kms_key_reference, AWS_REGION_RULE, KMS_KEY_RULE};
use crate::rollover::RolloverLength;
use crate::{Error, Result};

/// What replaces a secret in [`Config::to_redacted_json`].
pub const REDACTED: &str = "********";

/// The longest configuration document accepted, in bytes (64 KiB: a hundred times a real one,
/// which is a few hundred bytes even with a session token).
pub const MAX_DOCUMENT_BYTES: usize = 64 * 1024;

/// The most `[` and `{` a document may contain (anywhere, quoted or not: counting them all is
/// the bound that a quote cannot hide). Immuta's YAML needs none; a flow-style document a few.
pub const MAX_FLOW_COLLECTIONS: usize = 256;

/// A credential secret: no `Debug`, no `Display`, zeroized on drop.
#[derive(Deserialize)]
#[serde(transparent)]
pub struct Secret(Zeroizing<String>);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// The validated configuration.
#[derive(Default)]
pub struct Config {
    raw: Raw,
    rollover: RolloverLength,
}

/// Settings of the AWS KMS provider, present when `plugins.awsKms.isKms` is true.
pub struct AwsKmsConfig<'a> {
    pub key_id: &'a str,
    pub region: &'a str,
    pub access: AwsAccess<'a>,
}

/// How to reach AWS KMS: a custom endpoint and explicit credentials, each optional (then the
/// regional endpoint, `AWS_ENDPOINT_URL_KMS`, and the AWS default credential chain apply).
/// Taken from the `awsKms` block even when `isKms` is false, so that keys wrapped by KMS
/// earlier can still be unwrapped after switching new keys to the local master key.
#[derive(Default)]
pub struct AwsAccess<'a> {
    pub endpoint: Option<&'a str>,
    pub credentials: Option<&'a Credentials>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Raw {
    plugins: Option<Plugins>,
    schedule: Option<Schedule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Plugins {
    #[serde(rename = "awsKms")]
    aws_kms: Option<AwsKms>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AwsKms {
    plugin: String,
    #[serde(rename = "isKms")]
    is_kms: bool,
    #[serde(rename = "keyId")]
    key_id: Option<String>,
    region: Option<String>,
    #[serde(rename = "extraKmsConfig")]
    extra: Option<ExtraKmsConfig>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExtraKmsConfig {
    credentials: Option<Credentials>,
    endpoint: Option<String>,
}

/// Explicit AWS credentials from `extraKmsConfig.credentials`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    #[serde(rename = "accessKeyId")]
    pub access_key_id: String,
    #[serde(rename = "secretAccessKey")]
    pub secret_access_key: Secret,
    #[serde(rename = "sessionToken")]
    pub session_token: Option<Secret>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Schedule {
    #[serde(rename = "dataKeyRollOverLength")]
    data_key_roll_over_length: Option<i64>,
}

fn invalid(path: &str, reason: impl Into<String>) -> Error {
    Error::Config { path: path.to_owned(), reason: reason.into() }
}

impl Config {
    /// Parses and validates a YAML document. An empty document (or one of only comments) is the
    /// default configuration. The document is bounded ([`check_bounds`]) before it is parsed.
    pub fn from_yaml(text: &str) -> Result<Config> {
        check_bounds(text.len(), text.as_bytes())?;
        let value: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| {
            let at = e.location().map(|l| format!("line {} column {}", l.line(), l.column()));
            invalid(at.as_deref().unwrap_or("(document)"), reason(&e))
        })?;
        if value.is_null() {
            return Ok(Config::default());
        }
        let raw: Raw = serde_path_to_error::deserialize(value)
            .map_err(|e| invalid(&shown_path(e.path()), reason(e.inner())))?;
        Config::validate(raw)
    }

    fn validate(mut raw: Raw) -> Result<Config> {
        // The Immuta template leaves `sessionToken: ''` when there is none: an empty token sent to
        // AWS makes every call fail (InvalidClientTokenId), so empty means absent.
        if let Some(c) = raw.credentials_mut() {
            if c.session_token.as_ref().is_some_and(|t| t.expose().is_empty()) {
                c.session_token = None;
            }
        }
        let mut rollover = RolloverLength::default();
        if let Some(days) = raw.schedule.as_ref().and_then(|s| s.data_key_roll_over_length) {
            rollover = RolloverLength::from_days(days).ok_or_else(|| {
                invalid(
                    "schedule.dataKeyRollOverLength",
                    format!(
                        "must be a whole number of days from 1 to {}, got {days}",
                        RolloverLength::MAX_DAYS
                    ),
                )
            })?;
        }
        if let Some(kms) = raw.plugins.as_ref().and_then(|p| p.aws_kms.as_ref()) {
            if kms.plugin != "awsKms" {
                return Err(invalid("plugins.awsKms.plugin", "must be \"awsKms\""));
            }
            let required = |v: &Option<String>, name: &str| -> Result<()> {
                match v.as_deref() {
                    None | Some("") if kms.is_kms => {
                        Err(invalid(&format!("plugins.awsKms.{name}"), "is required when isKms is true"))
                    }
                    Some(s) if s.chars().any(char::is_whitespace) => {
                        Err(invalid(&format!("plugins.awsKms.{name}"), "must not contain white space"))
                    }
                    _ => Ok(()),
                }
            };
            required(&kms.key_id, "keyId")?;
            required(&kms.region, "region")?;
            if let Some(region) = kms.region.as_deref() {
                if !is_aws_region(region) {
                    return Err(invalid("plugins.awsKms.region", AWS_REGION_RULE));
                }
            }
            if let Some(key) = kms.key_id.as_deref().filter(|k| !k.is_empty()) {
                if !is_kms_key_reference(key) {
                    return Err(invalid("plugins.awsKms.keyId", KMS_KEY_RULE));
                }
            }
            if let Some(extra) = &kms.extra {
                if let Some(endpoint) = &extra.endpoint {
                    if !(endpoint.starts_with("https://") || is_loopback_http(endpoint)) {
                        return Err(invalid(
                            "plugins.awsKms.extraKmsConfig.endpoint",
                            "must be an https:// URL (http:// only to this machine: 127.0.0.1, [::1] or localhost), \
                             since data keys travel to it",
                        ));
                    }
                }
                if let Some(c) = &extra.credentials {
                    if c.access_key_id.is_empty() {
                        return Err(invalid(
                            "plugins.awsKms.extraKmsConfig.credentials.accessKeyId",
                            "must not be empty",
                        ));
                    }
                    if c.secret_access_key.expose().is_empty() {
                        return Err(invalid(
                            "plugins.awsKms.extraKmsConfig.credentials.secretAccessKey",
                            "must not be empty",
                        ));
                    }
                }
            }
        }
        Ok(Config { raw, rollover })
    }

    /// Days after which the current data key is rolled over.
    pub fn rollover(&self) -> RolloverLength {
        self.rollover
    }

    /// The AWS KMS settings, when KMS is configured and enabled (`isKms: true`).
    pub fn aws_kms(&self) -> Option<AwsKmsConfig<'_>> {
        let kms = self.raw.plugins.as_ref()?.aws_kms.as_ref().filter(|k| k.is_kms)?;
        Some(AwsKmsConfig {
            key_id: kms.key_id.as_deref()?,
            region: kms.region.as_deref()?,
            access: self.aws_access(),
        })
    }

    /// Whether the document names a KMS endpoint (`extraKmsConfig.endpoint`), enabled or not.
    pub fn has_custom_endpoint(&self) -> bool {
        self.aws_access().endpoint.is_some()
    }

    /// The endpoint and credentials of the `awsKms` block, whether or not it is enabled.
    pub fn aws_access(&self) -> AwsAccess<'_> {
        let extra = self.raw.plugins.as_ref().and_then(|p| p.aws_kms.as_ref()).and_then(|k| k.extra.as_ref());
        AwsAccess {
            endpoint: extra.and_then(|e| e.endpoint.as_deref()),
            credentials: extra.and_then(|e| e.credentials.as_ref()),
        }
    }

    /// The effective configuration in the shape of the YAML, defaults filled in, every secret
    /// replaced by [`REDACTED`].
    pub fn to_redacted_json(&self) -> Value {
        let mut out = json!({ "schedule": { "dataKeyRollOverLength": self.rollover.days() } });
        if let Some(kms) = self.raw.plugins.as_ref().and_then(|p| p.aws_kms.as_ref()) {
            let mut block = json!({ "plugin": kms.plugin, "isKms": kms.is_kms });
            if let Some(k) = &kms.key_id {
                block["keyId"] = json!(k);
            }
            if let Some(r) = &kms.region {
                block["region"] = json!(r);
            }
            if let Some(extra) = &kms.extra {
                let mut e = json!({});
                if let Some(endpoint) = &extra.endpoint {
                    e["endpoint"] = json!(endpoint);
                }
                if let Some(c) = &extra.credentials {
                    let mut creds = json!({ "accessKeyId": c.access_key_id, "secretAccessKey": REDACTED });
                    if c.session_token.is_some() {
                        creds["sessionToken"] = json!(REDACTED);
                    }
                    e["credentials"] = creds;
                }
                block["extraKmsConfig"] = e;
            }
            out["plugins"] = json!({ "awsKms": block });
        }
        out
    }

    /// Whether the configuration carries explicit credentials (the seed recommends IAM roles).
    pub fn has_explicit_credentials(&self) -> bool {
        self.raw
            .plugins
            .as_ref()
            .and_then(|p| p.aws_kms.as_ref())
            .and_then(|k| k.extra.as_ref())
            .is_some_and(|e| e.credentials.is_some())
    }
}

impl Raw {
    fn credentials_mut(&mut self) -> Option<&mut Credentials> {
        self.plugins.as_mut()?.aws_kms.as_mut()?.extra.as_mut()?.credentials.as_mut()
    }
}

/// Refuses a document too large or with too many flow collections to parse cheaply. `len` is
/// the whole document's length; `head` what is at hand of it (a file is read only up to the
/// limit, so a huge one is never read whole).
pub fn check_bounds(len: usize, head: &[u8]) -> Result<()> {
    if len > MAX_DOCUMENT_BYTES {
        return Err(invalid(
            "(document)",
            format!("is {len} bytes long; a configuration may have at most {MAX_DOCUMENT_BYTES} bytes"),
        ));
    }
    let brackets = head.iter().filter(|&&b| b == b'[' || b == b'{').count();
    if brackets > MAX_FLOW_COLLECTIONS {
        return Err(invalid(
            "(document)",
            format!(
                "has {brackets} '[' or '{{'; a configuration may have at most {MAX_FLOW_COLLECTIONS} \
                 (write it in block style)"
            ),
        ));
    }
    Ok(())
}

/// The path of a type error as it may be shown: the document's keys are shown, except under
/// `credentials`, where a key that is not one of the three might be a pasted secret.
fn shown_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut shown = Vec::new();
    let mut in_credentials = false;
    for segment in path.iter() {
        let text = match segment {
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if in_credentials
                    && !["accessKeyId", "secretAccessKey", "sessionToken"].contains(&key.as_str())
                {
                    "(unknown key)".to_owned()
                } else {
                    in_credentials = key == "credentials";
                    key.chars().take(64).collect()
                }
            }
            Segment::Seq { index } => format!("[{index}]"),
            Segment::Unknown => "?".to_owned(),
        };
        shown.push(text);
    }
    if shown.is_empty() {
        "(document)".to_owned()
    } else {
        shown.join(".")
    }
}

/// Why serde_yaml rejected a document, in words that never quote it. serde and serde_yaml put
/// scalars of the document in their messages (`invalid value: string "…"`, `duplicate entry
/// with key "…"`, after a path prefix of their own), so each known kind of message is rewritten
/// from its fixed parts, and anything unrecognised is reported without its text.
fn reason(e: &serde_yaml::Error) -> String {
    let text = e.to_string();
    let text = text.split(" at line ").next().unwrap_or(&text);
    let expected = || {
        text.split(", expected ")
            .nth(1)
            .map(|e| e.replace('`', ""))
            .filter(|e| !e.contains(['"', '\'']))
            .unwrap_or_else(|| "another value".to_owned())
    };
    if let Some(at) = text.find("invalid type: ") {
        let found = text[at + 14..].split([' ', ',']).next().unwrap_or("value");
        let found = if found.chars().all(|c| c.is_ascii_alphabetic()) { found } else { "value" };
        return format!("expected {}, found a {found}", expected());
    }
    if text.contains("invalid value: ") || text.contains("invalid length ") {
        return format!("invalid value, expected {}", expected());
    }
    if text.contains("unknown variant ") {
        return format!("unknown value, expected {}", expected());
    }
    if text.contains("unknown field ") {
        return format!("unknown key, expected {}", expected());
    }
    if let Some(at) = text.find("missing field `") {
        let field = text[at + 15..].split('`').next().unwrap_or_default();
        return format!("missing key {field}");
    }
    if text.contains("duplicate entry") {
        return "a key appears twice in the same mapping".to_owned();
    }
    const FIXED: [(&str, &str); 7] = [
        ("recursion limit exceeded", "nests too deeply"),
        ("repetition limit exceeded", "expands aliases too many times"),
        ("unknown anchor", "refers to an anchor that is not defined"),
        ("more than one document", "holds more than one YAML document"),
        ("EOF while parsing", "ends before a value is complete"),
        ("empty YAML tag", "has an empty tag"),
        ("failed to parse YAML number", "has a number that cannot be read"),
    ];
    if let Some((_, said)) = FIXED.iter().find(|(key, _)| text.contains(key)) {
        return (*said).to_owned();
    }
    // libyaml's scanner and parser messages are fixed strings ("did not find expected key",
    // "found character that cannot start any token"); they quote nothing but single punctuation
    // characters. Anything else is not shown.
    let problem = text.split(", while ").next().unwrap_or_default();
    let quotes_only_punctuation = problem
        .split('\'')
        .skip(1)
        .step_by(2)
        .all(|quoted| quoted.chars().count() <= 1 && !quoted.chars().any(char::is_alphanumeric));
    if !problem.is_empty()
        && !problem.contains(['"', '`', ':'])
        && quotes_only_punctuation
        && problem.chars().all(|c| c.is_ascii_alphabetic() || " ',[]{}-".contains(c))
    {
        format!("YAML syntax error: {problem}")
    } else {
        "not valid YAML".to_owned()
    }
}

/// `http://` to a loopback address: a KMS stand-in on this machine (tests, a local proxy).
fn is_loopback_http(url: &str) -> bool {
    let Some(rest) = url.strip_prefix("http://") else { return false };
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    host == "localhost"
        || host == "::1"
        || host.split('.').next() == Some("127") && host.split('.').count() == 4
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err_path(yaml: &str) -> String {
        match Config::from_yaml(yaml) {
            Err(Error::Config { path, .. }) => path,
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("accepted: {yaml}"),
        }
    }

    #[test]
    fn empty_and_comment_only_documents_are_the_defaults() {
        for doc in ["", "   \n", "# nothing here\n"] {
            let c = Config::from_yaml(doc).unwrap();
            assert_eq!(c.rollover().days(), 365);
            assert!(c.aws_kms().is_none());
        }
    }

    #[test]
    fn the_seed_rollover_block_is_accepted_verbatim() {
        let c = Config::from_yaml("schedule:\n  dataKeyRollOverLength: 30\n").unwrap();
        assert_eq!(c.rollover().days(), 30);
    }

    #[test]
    fn both_seed_kms_shapes_are_accepted_verbatim() {
        let role = "plugins:\n  awsKms:\n    plugin: 'awsKms'\n    isKms: true\n    keyId: alias/pii\n    region: us-east-1\n";
        let c = Config::from_yaml(role).unwrap();
        let kms = c.aws_kms().unwrap();
        assert_eq!((kms.key_id, kms.region), ("alias/pii", "us-east-1"));
        assert!(kms.access.credentials.is_none() && !c.has_explicit_credentials());

        let creds = "plugins:\n  awsKms:\n    plugin: awsKms\n    isKms: true\n    keyId: 1234abcd-12ab-34cd-56ef-1234567890ab\n    region: eu-west-1\n    extraKmsConfig:\n      credentials:\n        accessKeyId: AKIAEXAMPLE\n        secretAccessKey: s3cr3t-value\n        sessionToken: t0ken-value\n";
        let c = Config::from_yaml(creds).unwrap();
        let kms = c.aws_kms().unwrap();
        assert_eq!(kms.access.credentials.unwrap().secret_access_key.expose(), "s3cr3t-value");
        assert!(c.has_explicit_credentials());
        let shown = c.to_redacted_json().to_string();
        assert!(!shown.contains("s3cr3t") && !shown.contains("t0ken"), "{shown}");
        assert!(shown.contains("AKIAEXAMPLE") && shown.contains(REDACTED));
    }

    #[test]
    fn is_kms_false_keeps_the_block_but_uses_the_local_master_key() {
        let c = Config::from_yaml("plugins:\n  awsKms:\n    plugin: awsKms\n    isKms: false\n").unwrap();
        assert!(c.aws_kms().is_none());
        assert_eq!(c.to_redacted_json()["plugins"]["awsKms"]["isKms"], json!(false));
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_path() {
        assert_eq!(err_path("schedule:\n  dataKeyRolloverLength: 5\n"), "schedule.dataKeyRolloverLength");
        assert_eq!(err_path("plugins:\n  awsKms:\n    plugin: awsKms\n    isKms: true\n    keyId: k\n    region: us-east-1\n    extra: 1\n"), "plugins.awsKms.extra");
        assert_eq!(err_path("nonsense: 1\n"), "nonsense");
        let msg = Config::from_yaml("schedule:\n  dataKeyRolloverLength: 5\n").err().unwrap().to_string();
        assert!(msg.contains("dataKeyRolloverLength"), "{msg}");
    }

    #[test]
    fn bad_rollover_lengths_name_their_path() {
        for bad in ["0", "-5", "1.5", "'soon'", "36501"] {
            let path = err_path(&format!("schedule:\n  dataKeyRollOverLength: {bad}\n"));
            assert_eq!(path, "schedule.dataKeyRollOverLength", "for {bad}");
        }
    }

    #[test]
    fn kms_blocks_are_validated_field_by_field() {
        let base = |body: &str| format!("plugins:\n  awsKms:\n{body}");
        assert_eq!(
            err_path(&base("    plugin: vault\n    isKms: true\n    keyId: k\n    region: us-east-1\n")),
            "plugins.awsKms.plugin"
        );
        assert_eq!(
            err_path(&base("    plugin: awsKms\n    isKms: true\n    region: us-east-1\n")),
            "plugins.awsKms.keyId"
        );
        assert_eq!(
            err_path(&base("    plugin: awsKms\n    isKms: true\n    keyId: k\n")),
            "plugins.awsKms.region"
        );
        assert_eq!(
            err_path(&base("    plugin: awsKms\n    isKms: true\n    keyId: k\n    region: US East\n")),
            "plugins.awsKms.region"
        );
        assert_eq!(
            err_path(&base(
                "    plugin: awsKms\n    isKms: 'yes please'\n    keyId: k\n    region: us-east-1\n"
            )),
            "plugins.awsKms.isKms"
        );
        assert_eq!(
            err_path(&base("    plugin: awsKms\n    isKms: true\n    keyId: k\n    region: us-east-1\n    extraKmsConfig:\n      endpoint: ftp://x\n")),
            "plugins.awsKms.extraKmsConfig.endpoint"
        );
        assert_eq!(
            err_path(&base("    plugin: awsKms\n    isKms: true\n    keyId: k\n    region: us-east-1\n    extraKmsConfig:\n      endpoint: http://kms.example.com\n")),
            "plugins.awsKms.extraKmsConfig.endpoint"
        );
        assert_eq!(
            err_path(&base("    plugin: awsKms\n    isKms: true\n    keyId: k\n    region: us-east-1\n    extraKmsConfig:\n      credentials:\n        accessKeyId: A\n")),
            "plugins.awsKms.extraKmsConfig.credentials"
        );
    }

    #[test]
    fn errors_never_echo_secret_values() {
        // A secret of the wrong type must not come back in the message.
        let yaml = "plugins:\n  awsKms:\n    plugin: awsKms\n    isKms: true\n    keyId: k\n    region: us-east-1\n    extraKmsConfig:\n      credentials:\n        accessKeyId: A\n        secretAccessKey: [hunter2-secret]\n";
        let msg = Config::from_yaml(yaml).err().unwrap().to_string();
        assert!(!msg.contains("hunter2"), "{msg}");
        let yaml = "plugins:\n  awsKms:\n    plugin: awsKms\n    isKms: true\n    keyId: k\n    region: us-east-1\n    extraKmsConfig:\n      credentials:\n        accessKeyId: A\n        secretAccessKey: 'hunter2-secret\n";
        let msg = Config::from_yaml(yaml).err().unwrap().to_string();
        assert!(!msg.contains("hunter2"), "{msg}");
    }

    /// A credentials block with `field` written as `value` (raw YAML text after the colon); the
    /// other fields are valid.
    fn with_credential(field: &str, value: &str) -> String {
        let secret = if field == "secretAccessKey" { "" } else { "        secretAccessKey: s\n" };
        format!(
            "plugins:\n  awsKms:\n    plugin: awsKms\n    isKms: true\n    keyId: k\n    region: us-east-1\n    \
             extraKmsConfig:\n      credentials:\n        accessKeyId: A\n{secret}        {field}: {value}\n"
        )
    }

    #[test]
    fn no_parse_error_quotes_a_secret_whatever_its_kind() {
        const SECRET: &str = "wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY";
        let values = [
            format!("!!int {SECRET}"),
            format!("!!float {SECRET}"),
            format!("!!bool {SECRET}"),
            format!("!!null {SECRET}"),
            format!("!<tag:yaml.org,2002:int> {SECRET}"),
            format!("!custom {SECRET}"),
            format!("[{SECRET}]"),
            format!("{{{SECRET}: 1}}"),
            format!("'{SECRET}"),
            format!("\"{SECRET}\\q\""),
            format!("*{SECRET}"),
            format!("{SECRET}\n        secretAccessKey: {SECRET}"),
            format!("{SECRET}\n\t{SECRET}"),
            format!("{SECRET}: {SECRET}"),
            format!("- {SECRET}"),
            format!("%{SECRET}"),
            format!("{SECRET}\n       {SECRET}"),
        ];
        for field in ["secretAccessKey", "sessionToken"] {
            for value in &values {
                let doc = with_credential(field, value);
                if let Err(e) = Config::from_yaml(&doc) {
                    let shown = e.to_string();
                    assert!(!shown.contains("wJalr"), "{field}: {value}\n-> {shown}");
                }
            }
        }
        // A secret pasted as a key under credentials is not echoed either.
        let doc = with_credential(SECRET, "x");
        let shown = Config::from_yaml(&doc).err().expect("an unknown key").to_string();
        assert!(!shown.contains("wJalr") && shown.contains("(unknown key)"), "{shown}");
    }

    #[test]
    fn parse_errors_still_say_what_is_wrong_and_where() {
        let e =
            Config::from_yaml(&with_credential("secretAccessKey", "!!int nope")).err().unwrap().to_string();
        assert!(e.contains("invalid value, expected an integer") && e.contains("line 10"), "{e}");
        let e = Config::from_yaml(&with_credential("sessionToken", "[x]")).err().unwrap().to_string();
        assert!(
            e.contains("credentials.sessionToken") && e.contains("expected a string, found a sequence"),
            "{e}"
        );
        let e = Config::from_yaml("schedule: 1\nschedule: 2\n").err().unwrap().to_string();
        assert!(e.contains("a key appears twice"), "{e}");
        let e = Config::from_yaml("schedule: [1\n").err().unwrap().to_string();
        assert!(e.contains("YAML syntax error: did not find expected ',' or ']'"), "{e}");
        let e = Config::from_yaml("schedule:\n  dataKeyRollOverLength: [1]\n").err().unwrap().to_string();
        assert!(e.contains("schedule.dataKeyRollOverLength") && e.contains("found a sequence"), "{e}");
    }

    #[test]
    fn documents_are_bounded_before_they_are_parsed() {
        // Quadratic in libyaml: 60,000 '[' took 20 s before this bound.
        let deep = format!("schedule: {}", "[".repeat(60_000));
        let started = std::time::Instant::now();
        let e = Config::from_yaml(&deep).err().unwrap().to_string();
        assert!(e.contains("at most 256"), "{e}");
        assert!(started.elapsed() < std::time::Duration::from_secs(1), "refused before parsing");
        let big = format!("# {}\n", "x".repeat(MAX_DOCUMENT_BYTES));
        let e = Config::from_yaml(&big).err().unwrap().to_string();
        assert!(e.contains("at most 65536 bytes"), "{e}");
        let at_limit = format!("#{}\n", "x".repeat(MAX_DOCUMENT_BYTES - 2));
        assert_eq!(at_limit.len(), MAX_DOCUMENT_BYTES);
        assert!(Config::from_yaml(&at_limit).is_ok());
        let flow =
            format!("schedule: {{dataKeyRollOverLength: 30}}\n# {}\n", "[".repeat(MAX_FLOW_COLLECTIONS - 1));
        assert!(Config::from_yaml(&flow).is_ok(), "256 brackets are allowed, even in a comment");
    }

    #[test]
    fn an_empty_session_token_is_absent() {
        let c = Config::from_yaml(&with_credential("sessionToken", "''")).unwrap();
        let creds = c.aws_kms().unwrap().access.credentials.unwrap();
        assert!(creds.session_token.is_none());
        assert!(c.to_redacted_json()["plugins"]["awsKms"]["extraKmsConfig"]["credentials"]
            .get("sessionToken")
            .is_none());
        let c = Config::from_yaml(&with_credential("sessionToken", "tok")).unwrap();
        assert!(c.aws_kms().unwrap().access.credentials.unwrap().session_token.is_some());
    }

    #[test]
    fn bad_key_references_name_their_path() {
        let base =
            "plugins:\n  awsKms:\n    plugin: awsKms\n    isKms: true\n    region: us-east-1\n    keyId: ";
        assert_eq!(err_path(&format!("{base}\"a\\tb\"\n")), "plugins.awsKms.keyId");
    }

    #[test]
    fn invalid_yaml_is_a_syntax_error_with_a_location() {
        let e = Config::from_yaml("schedule: [unclosed\n").err().unwrap();
        assert!(matches!(&e, Error::Config { path, .. } if path.starts_with("line ")), "{e}");
    }
}
