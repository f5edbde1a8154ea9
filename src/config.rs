//! Configuration: flags > environment (`KURA_*`) > config file.
//!
//! clap already resolves flags over environment variables; this module layers the TOML config
//! file underneath and turns raw strings into validated objects (the "low args → high args"
//! split of ripgrep). Secrets are wrapped so that `Debug` and `Display` never show them.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use url::Url;

use crate::error::{Error, ErrorKind, Result};

/// A string that must never be printed. `Debug`/`Display` show `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    /// The only way to get the value out; grep for it to audit where secrets go.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Secret, D::Error> {
        String::deserialize(d).map(Secret::new)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// A database URL split into its redacted form and its password.
///
/// The password is percent-decoded and kept apart, so the URL itself can be printed freely.
#[derive(Clone, PartialEq, Eq)]
pub struct SourceUrl {
    url: Url,
    password: Option<Secret>,
    /// The environment variable a password may come from (`KURA_POSTGRES_PASSWORD`), named
    /// in the error when the server wants a password and there is none.
    password_variable: Option<String>,
}

impl SourceUrl {
    pub fn parse(raw: &str) -> Result<Self> {
        let mut url = Url::parse(raw).map_err(|e| {
            // The raw string may hold a password: never echo it back.
            Error::usage(format!(
                "invalid database URL {}: {e}",
                redact_unparsed_url(raw)
            ))
        })?;
        if url.fragment().is_some() {
            // An unencoded '#' in a password silently cuts the URL short.
            return Err(Error::usage(format!(
                "database URL {} contains '#': percent-encode special characters of the password ('#' is %23)",
                redact_unparsed_url(raw)
            )));
        }
        let mut password = url.password().map(|p| {
            Secret::new(
                percent_encoding::percent_decode_str(p)
                    .decode_utf8_lossy()
                    .into_owned(),
            )
        });
        let _ = url.set_password(None);
        // libpq also accepts `?password=`; keep it with the other secret, out of the URL.
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        if let Some((_, value)) = pairs.iter().find(|(k, _)| k == "password") {
            password = Some(Secret::new(value.clone()));
            let rest: Vec<&(String, String)> =
                pairs.iter().filter(|(k, _)| k != "password").collect();
            if rest.is_empty() {
                url.set_query(None);
            } else {
                url.query_pairs_mut()
                    .clear()
                    .extend_pairs(rest.iter().map(|(k, v)| (k.as_str(), v.as_str())));
            }
        }
        Ok(SourceUrl {
            url,
            password,
            password_variable: None,
        })
    }

    pub fn scheme(&self) -> &str {
        self.url.scheme()
    }
    pub fn host(&self) -> Option<String> {
        self.url
            .host_str()
            .map(|h| h.trim_matches(['[', ']']).to_string())
    }
    pub fn port(&self) -> Option<u16> {
        self.url.port()
    }
    pub fn username(&self) -> Option<String> {
        let user = self.url.username();
        (!user.is_empty()).then(|| {
            percent_encoding::percent_decode_str(user)
                .decode_utf8_lossy()
                .into_owned()
        })
    }
    pub fn password(&self) -> Option<&Secret> {
        self.password.as_ref()
    }
    pub fn set_password(&mut self, password: Secret) {
        self.password = Some(password);
    }
    /// Take the password from `KURA_<SOURCE>_PASSWORD` unless the URL has one, and remember
    /// the variable for the advice of [`missing_password`](Self::missing_password).
    pub fn fill_password_from_env(&mut self, source: &str) {
        let variable = format!(
            "KURA_{}_PASSWORD",
            source.to_ascii_uppercase().replace('-', "_")
        );
        if self.password.is_none() {
            if let Some(password) = std::env::var(&variable).ok().filter(|p| !p.is_empty()) {
                self.password = Some(Secret::new(password));
            }
        }
        self.password_variable = Some(variable);
    }
    /// A server asked for a password and none was given: a configuration error (exit 2),
    /// which no retry can fix, saying where the password goes.
    pub fn missing_password(&self, server: &str) -> Error {
        let user = self.username().unwrap_or_else(|| "(no user)".into());
        Error::usage(match &self.password_variable {
            Some(variable) => format!(
                "{server} at {} wants a password for user {user:?} and none is set: set {variable} (e.g. from a Secret) or put the password in the URL",
                self.redacted()
            ),
            None => format!(
                "{server} at {} wants a password for user {user:?} and none is set: put the password in the URL",
                self.redacted()
            ),
        })
    }
    /// The first path segment, percent-decoded (the database name for PostgreSQL).
    pub fn path_database(&self) -> Option<String> {
        let path = self.url.path().trim_start_matches('/');
        (!path.is_empty()).then(|| {
            percent_encoding::percent_decode_str(path)
                .decode_utf8_lossy()
                .into_owned()
        })
    }
    pub fn query_pairs(&self) -> Vec<(String, String)> {
        self.url
            .query_pairs()
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect()
    }
    /// The URL with the password removed, safe for logs.
    pub fn redacted(&self) -> String {
        let mut shown = self.url.clone();
        if self.password.is_some() {
            let _ = shown.set_password(Some("***"));
        }
        // libpq's passphrase of an encrypted client key (refused, but never shown).
        if shown.query_pairs().any(|(k, _)| k == "sslpassword") {
            let pairs: Vec<(String, String)> = shown
                .query_pairs()
                .map(|(k, v)| match k.as_ref() {
                    "sslpassword" => (k.into_owned(), "***".to_string()),
                    _ => (k.into_owned(), v.into_owned()),
                })
                .collect();
            shown.query_pairs_mut().clear().extend_pairs(pairs);
        }
        shown.to_string()
    }
}

impl fmt::Debug for SourceUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Display for SourceUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// Best effort for strings that do not parse: keep the scheme and what follows the last `@`
/// (host, path), drop the query and fragment, and hide everything else.
pub fn redact_unparsed_url(raw: &str) -> String {
    let Some(start) = raw.find("://") else {
        return "***".to_string();
    };
    let rest = &raw[start + 3..];
    let host_and_path = match rest.rfind('@') {
        Some(at) => &rest[at + 1..],
        None => return format!("{}://***", &raw[..start]),
    };
    let host_and_path = host_and_path.split(['?', '#']).next().unwrap_or_default();
    format!("{}://***@{host_and_path}", &raw[..start])
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    Postgres,
    Couchdb,
}

impl SourceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Postgres => "postgres",
            SourceKind::Couchdb => "couchdb",
        }
    }
}

impl fmt::Display for SourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A named database instance to back up.
#[derive(Debug, Clone)]
pub struct Source {
    pub name: String,
    pub kind: SourceKind,
    pub url: SourceUrl,
}

/// The config file, as written by a human. Every field is optional: flags and environment
/// variables fill in or override.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub storage: Option<String>,
    pub tenant: Option<String>,
    pub log_format: Option<String>,
    /// Directory of pg_dump, pg_restore and psql (`--pg-bin-dir`).
    pub pg_bin_dir: Option<PathBuf>,
    /// `--lock-wait-timeout`, e.g. "10m".
    pub lock_wait_timeout: Option<String>,
    /// `--jobs`: databases backed up, restored or verified at once.
    pub jobs: Option<usize>,
    /// `--split-table-size`, e.g. "32MiB".
    pub split_table_size: Option<String>,
    #[serde(default)]
    pub s3: S3File,
    #[serde(default)]
    pub couchdb: CouchdbFile,
    #[serde(default)]
    pub monitoring: MonitoringFile,
    #[serde(default)]
    pub pipeline: PipelineFile,
    #[serde(default)]
    pub retention: RetentionFile,
    #[serde(default)]
    pub encryption: EncryptionFile,
    #[serde(default)]
    pub sources: BTreeMap<String, SourceFile>,
}

/// `[encryption]`: age public keys to encrypt to, and identity files to read with.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncryptionFile {
    #[serde(default)]
    pub recipients: Vec<String>,
    pub recipients_file: Option<PathBuf>,
    #[serde(default)]
    pub identity_files: Vec<PathBuf>,
}

/// `[retention]`: the policy of `prune` and `backup --prune`; flags and KURA_KEEP_* override.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionFile {
    pub keep_last: Option<u32>,
    pub keep_hourly: Option<u32>,
    pub keep_daily: Option<u32>,
    pub keep_weekly: Option<u32>,
    pub keep_monthly: Option<u32>,
    pub keep_yearly: Option<u32>,
    pub keep_within: Option<String>,
    /// How long an incomplete backup may be a running one, e.g. "24h".
    pub grace: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3File {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub path_style: Option<bool>,
    /// CA files trusted for the endpoint besides the system's roots.
    #[serde(default)]
    pub ca_files: Vec<PathBuf>,
    /// An ICOS service credential JSON file (API key and/or HMAC keys).
    pub icos_credentials: Option<PathBuf>,
    pub ibm_service_instance_id: Option<String>,
    pub ibm_auth_endpoint: Option<String>,
    /// `--read-timeout`, e.g. "60s".
    pub read_timeout: Option<String>,
}

/// `[monitoring]`: where runs report (the ping URL is a secret: environment or flag only).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MonitoringFile {
    pub metrics_file: Option<PathBuf>,
    pub pushgateway: Option<String>,
}

/// `[couchdb]`: TLS for https:// CouchDB URLs.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CouchdbFile {
    #[serde(default)]
    pub ca_files: Vec<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineFile {
    pub compression_level: Option<i32>,
    pub compression_threads: Option<u32>,
    pub part_size: Option<String>,
    pub upload_concurrency: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceFile {
    pub kind: SourceKind,
    /// Connection URL; may omit the password when `password_file` is given.
    pub url: String,
    /// A file holding the password (a mounted Kubernetes Secret), so it is not in the config.
    pub password_file: Option<PathBuf>,
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::with_source(
                ErrorKind::Usage,
                format!("cannot read config file {}", path.display()),
                e,
            )
        })?;
        toml::from_str(&text).map_err(|e| {
            let at = match e.span() {
                Some(span) => {
                    let (line, column) = line_and_column(&text, span.start);
                    format!(" at line {line}, column {column}")
                }
                None => String::new(),
            };
            Error::usage(format!(
                "config file {} is invalid{at}: {}",
                path.display(),
                e.message().trim_end()
            ))
        })
    }

    /// Validated sources declared in the file.
    pub fn sources(&self) -> Result<Vec<Source>> {
        self.sources
            .iter()
            .map(|(name, declared)| {
                validate_source_name(name)?;
                let mut url = SourceUrl::parse(&declared.url)
                    .map_err(|e| e.context(format!("source {name:?} in the config file")))?;
                if let Some(path) = &declared.password_file {
                    let password = std::fs::read_to_string(path).map_err(|e| {
                        Error::with_source(
                            ErrorKind::Usage,
                            format!(
                                "cannot read password_file {} of source {name:?}",
                                path.display()
                            ),
                            e,
                        )
                    })?;
                    url.set_password(Secret::new(password.trim_end_matches(['\n', '\r'])));
                }
                Ok(Source {
                    name: name.clone(),
                    kind: declared.kind,
                    url,
                })
            })
            .collect()
    }
}

/// 1-based line and column (in characters) of a byte offset, as editors count them.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (
        before.matches('\n').count() + 1,
        before[line_start..].chars().count() + 1,
    )
}

/// Source, tenant and backup names become key segments: keep them to a safe alphabet.
pub fn validate_source_name(name: &str) -> Result<()> {
    validate_segment("source name", name)
}

pub fn validate_tenant(name: &str) -> Result<()> {
    validate_segment("tenant", name)
}

fn validate_segment(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(Error::usage(format!(
            "{what} {name:?} is invalid: use 1-63 characters from a-z, A-Z, 0-9, '-', '_', '.'"
        )))
    }
}

/// Parses sizes such as `16MiB`, `8 MB`, `5242880`.
pub fn parse_size(raw: &str) -> Result<u64> {
    let text = raw.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let number: u64 = digits
        .parse()
        .map_err(|_| Error::usage(format!("invalid size {raw:?}: expected e.g. 16MiB")))?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        other => {
            return Err(Error::usage(format!(
                "invalid size {raw:?}: unknown unit {other:?}"
            )))
        }
    };
    number
        .checked_mul(factor)
        .ok_or_else(|| Error::usage(format!("size {raw:?} is too large")))
}

/// Parses durations like `36h`, `7d`, `2w`, `1d12h`, `90s`, `15m`.
pub fn parse_duration(raw: &str) -> Result<Duration> {
    let text = raw.trim();
    let invalid = || {
        Error::usage(format!(
            "invalid duration {raw:?}: expected a number with a unit, e.g. 30m, 36h, 7d, 2w (units s, m, h, d, w)"
        ))
    };
    if text.is_empty() {
        return Err(invalid());
    }
    let mut total: u64 = 0;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(invalid)?;
        if digits == 0 {
            return Err(invalid());
        }
        let number: u64 = rest[..digits].parse().map_err(|_| invalid())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let seconds: u64 = match &rest[..unit_len] {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86_400,
            "w" => 7 * 86_400,
            _ => return Err(invalid()),
        };
        rest = &rest[unit_len..];
        total = number
            .checked_mul(seconds)
            .and_then(|s| total.checked_add(s))
            .ok_or_else(invalid)?;
    }
    Ok(Duration::from_secs(total))
}

/// The inverse of [`parse_duration`], largest units first: `1d12h`, `90s` → `1m30s`.
pub fn format_duration(duration: Duration) -> String {
    let mut secs = duration.as_secs();
    if secs == 0 {
        return "0s".into();
    }
    let mut out = String::new();
    for (unit, size) in [("d", 86_400), ("h", 3600), ("m", 60), ("s", 1)] {
        if secs >= size {
            out.push_str(&format!("{}{unit}", secs / size));
            secs %= size;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(
            parse_duration("36h").unwrap(),
            Duration::from_secs(36 * 3600)
        );
        assert_eq!(
            parse_duration("1d12h").unwrap(),
            Duration::from_secs(36 * 3600)
        );
        assert_eq!(
            parse_duration("2w").unwrap(),
            Duration::from_secs(14 * 86_400)
        );
        for bad in ["", "7", "d", "7x", "-1d", "1.5h", "7 d"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        assert_eq!(format_duration(Duration::from_secs(36 * 3600)), "1d12h");
        assert_eq!(format_duration(Duration::from_secs(90)), "1m30s");
    }

    #[test]
    fn password_is_decoded_and_never_shown() {
        let url = SourceUrl::parse("postgres://kura:p%40ss%3Aw0rd@db:5432/app").unwrap();
        assert_eq!(url.password().unwrap().expose(), "p@ss:w0rd");
        assert_eq!(url.redacted(), "postgres://kura:***@db:5432/app");
        assert!(!format!("{url:?} {url}").contains("w0rd"));
        assert_eq!(url.username().as_deref(), Some("kura"));
        assert_eq!(url.path_database().as_deref(), Some("app"));
    }

    #[test]
    fn passwords_in_query_or_after_a_hash_never_show() {
        let url = SourceUrl::parse("postgres://u@db/app?sslmode=disable&password=qx7").unwrap();
        assert_eq!(url.password().unwrap().expose(), "qx7");
        assert_eq!(url.redacted(), "postgres://u:***@db/app?sslmode=disable");
        let err = SourceUrl::parse("postgres://u:12#pw9@db/app").unwrap_err();
        assert!(!err.to_string().contains("pw9"), "{err}");
        assert_eq!(redact_unparsed_url("postgres://u:secret"), "postgres://***");
        assert_eq!(redact_unparsed_url("no scheme secret"), "***");
    }

    #[test]
    fn unparsable_url_is_redacted_in_errors() {
        let err = SourceUrl::parse("postgres://u:secret@[bad").unwrap_err();
        assert!(!err.to_string().contains("secret"), "{err}");
        assert_eq!(err.kind(), ErrorKind::Usage);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("16MiB").unwrap(), 16 << 20);
        assert_eq!(parse_size("5 MB").unwrap(), 5_000_000);
        assert_eq!(parse_size("42").unwrap(), 42);
        assert!(parse_size("12 parsecs").is_err());
    }

    #[test]
    fn names() {
        assert!(validate_tenant("acme-prod_1").is_ok());
        assert!(validate_tenant("../etc").is_err());
        assert!(validate_tenant("").is_err());
        assert!(validate_source_name("a/b").is_err());
    }

    #[test]
    fn example_config_parses() {
        let example: FileConfig = toml::from_str(include_str!("../examples/kura.toml"))
            .expect("examples/kura.toml parses");
        assert_eq!(example.tenant.as_deref(), Some("acme"));
        assert_eq!(example.sources["main"].kind, SourceKind::Postgres);
        assert!(example.sources["main"].password_file.is_some());
        parse_size(example.pipeline.part_size.as_deref().unwrap()).unwrap();
        assert_eq!(
            parse_size(example.split_table_size.as_deref().unwrap()).unwrap(),
            crate::engine::DEFAULT_SPLIT_TABLE_BYTES
        );
    }

    #[test]
    fn config_errors_name_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kura.toml");
        std::fs::write(&path, "tenant = 'acme'\n[s3]\nendpont = 'https://x'\n").unwrap();
        let err = FileConfig::load(&path).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Usage);
        let text = err.to_string();
        assert!(text.contains("at line 3, column 1"), "{text}");
        assert!(text.contains("endpont"), "{text}");
        assert_eq!(line_and_column("ab\ncd", 4), (2, 2));
        assert_eq!(line_and_column("", 0), (1, 1));
    }

    #[test]
    fn config_file_rejects_unknown_keys() {
        let err = toml::from_str::<FileConfig>("storge = 's3://x'").unwrap_err();
        assert!(err.message().contains("storge"));
        let with_tools: FileConfig =
            toml::from_str("pg_bin_dir = '/usr/lib/postgresql/17/bin'").unwrap();
        assert_eq!(
            with_tools.pg_bin_dir.as_deref(),
            Some(Path::new("/usr/lib/postgresql/17/bin"))
        );
        let ok: FileConfig = toml::from_str(
            "storage = 'file:///tmp/x'\n[sources.main]\nkind = 'postgres'\nurl = 'postgres://u@h/db'\n",
        )
        .unwrap();
        assert_eq!(ok.sources().unwrap()[0].kind, SourceKind::Postgres);
    }
}
