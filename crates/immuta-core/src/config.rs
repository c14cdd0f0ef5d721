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

use serde::Deserialize;
use serde_json::{json, Value};
use zeroize::Zeroizing;

use crate::rollover::RolloverLength;
use crate::{Error, Result};

/// What replaces a secret in [`Config::to_redacted_json`].
pub const REDACTED: &str = "********";

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
    /// default configuration.
    pub fn from_yaml(text: &str) -> Result<Config> {
        let value: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| {
            let at = e.location().map(|l| format!("line {} column {}", l.line(), l.column()));
            // serde_yaml's syntax messages describe the structure, never echo the document.
            invalid(at.as_deref().unwrap_or("(document)"), syntax_reason(&e))
        })?;
        if value.is_null() {
            return Ok(Config::default());
        }
        let raw: Raw = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            invalid(if path == "." { "(document)" } else { &path }, type_reason(e.inner()))
        })?;
        Config::validate(raw)
    }

    fn validate(raw: Raw) -> Result<Config> {
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
                let ok = !region.is_empty()
                    && region.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !region.starts_with('-')
                    && !region.ends_with('-');
                if !ok {
                    return Err(invalid(
                        "plugins.awsKms.region",
                        "must be an AWS region name such as us-east-1 (lower-case letters, digits and hyphens)",
                    ));
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

/// The syntax error without the excerpt of the document that serde_yaml may append.
fn syntax_reason(e: &serde_yaml::Error) -> String {
    let text = e.to_string();
    let text = text.split(" at line ").next().unwrap_or(&text);
    format!("YAML syntax error: {text}")
}

/// A structural error from serde. These name types and field names, never values: a wrong-typed
/// secret must not be echoed back. serde reports "invalid type: string \"…\"", so values quoted
/// after a colon are cut.
fn type_reason(e: &serde_yaml::Error) -> String {
    let text = e.to_string();
    if let Some(rest) = text.strip_prefix("invalid type: ") {
        let expected = rest.split(", expected ").nth(1).unwrap_or("another type");
        let found = rest.split([' ', ',']).next().unwrap_or("value");
        return format!("expected {expected}, found a {found}");
    }
    if let Some(rest) = text.strip_prefix("invalid value: ") {
        let expected = rest.split(", expected ").nth(1).unwrap_or("another value");
        return format!("invalid value, expected {expected}");
    }
    text
}

/// `http://` to a loopback address: a KMS stand-in on this machine (tests, a local proxy).
fn is_loopback_http(url: &str) -> bool {
    let Some(rest) = url.strip_prefix("http://") else { return false };
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    host == "localhost" || host == "::1" || host.split('.').next() == Some("127") && host.split('.').count() == 4
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

    #[test]
    fn invalid_yaml_is_a_syntax_error_with_a_location() {
        let e = Config::from_yaml("schedule: [unclosed\n").err().unwrap();
        assert!(matches!(&e, Error::Config { path, .. } if path.starts_with("line ")), "{e}");
    }
}
