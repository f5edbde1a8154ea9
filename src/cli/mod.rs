//! Command-line interface: clap definitions (one file per command) and the resolution of raw
//! flags, environment and config file into validated [`Settings`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::catalog::{self, SourcePath};
use crate::config::{self, FileConfig, RetentionFile, Source, SourceKind, SourceUrl};
use crate::error::{Error, Result};
use crate::logging::{self, LogFormat};
use crate::pipeline::encryption::{Identities, Recipients};
use crate::pipeline::PipelineOptions;
use crate::retention::{Policy, DEFAULT_GRACE};
use crate::storage::{self, ObjectStore, S3Options};

pub mod backup;
pub mod exporter;
pub mod list;
pub mod prune;
pub mod reencrypt;
pub mod restore;
pub mod schedule;
pub mod show;
pub mod status;
pub mod table;
pub mod unlock;
pub mod verify;
pub mod wait_for;

/// Where backups go when no storage is configured: a directory in the working directory.
pub const DEFAULT_STORAGE: &str = "kura-backups";
pub const DEFAULT_TENANT: &str = "default";

// No Debug: the raw arguments hold URLs with passwords; `Settings` keeps them redacted.
#[derive(Parser)]
#[command(
    name = "kura",
    version,
    about = "Back up PostgreSQL and CouchDB to IBM Cloud Object Storage (S3) or a local directory, and restore them",
    after_help = "Exit codes: 0 ok, 1 failed, 2 usage or config error, 3 storage error, 4 database unreachable or credentials rejected, 5 backup corrupt, 6 not found, 7 restore target not empty, 8 locked, 130 interrupted."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

// Global options are listed under their own heading, after each command's own options.
#[derive(Args)]
#[command(next_help_heading = "Global options")]
pub struct GlobalArgs {
    /// Config file (TOML); flags and environment variables override it.
    #[arg(long, env = "KURA_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Where backups live: s3://bucket/prefix or file:///dir [default: ./kura-backups]
    #[arg(long, env = "KURA_STORAGE", global = true)]
    pub storage: Option<String>,
    /// Tenant name: the first level of the storage layout [default: default]
    #[arg(long, env = "KURA_TENANT", global = true)]
    pub tenant: Option<String>,
    /// text (for people, on stderr) or json (one object per line on stdout, for Fluent Bit)
    #[arg(long, env = "KURA_LOG_FORMAT", global = true, value_enum)]
    pub log_format: Option<LogFormat>,
    /// More log output (-v debug, -vv trace)
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Less log output (-q warnings only, -qq errors only)
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub quiet: u8,
    /// Declares the source `postgres`: postgres://user:password@host:5432/postgres
    #[arg(long, env = "KURA_POSTGRES_URL", global = true, hide_env_values = true)]
    pub postgres_url: Option<String>,
    /// Declares the source `couchdb`: http://user:password@host:5984
    #[arg(long, env = "KURA_COUCHDB_URL", global = true, hide_env_values = true)]
    pub couchdb_url: Option<String>,
    /// S3 endpoint, e.g. https://s3.eu-de.cloud-object-storage.appdomain.cloud
    #[arg(long, env = "KURA_S3_ENDPOINT", global = true)]
    pub s3_endpoint: Option<String>,
    /// S3 signing region (ICOS accepts any; e.g. eu-de)
    #[arg(long, env = "KURA_S3_REGION", global = true)]
    pub s3_region: Option<String>,
    /// Path-style bucket addressing (endpoint/bucket/key) instead of virtual hosts
    #[arg(long, env = "KURA_S3_PATH_STYLE", global = true, num_args = 0..=1, default_missing_value = "true")]
    pub s3_path_style: Option<bool>,
    /// A download from the object store, or a CouchDB answer, that moves no byte for this
    /// long is resumed or asked again; an object-store request (a part's upload included)
    /// not answered within twice this is retried, e.g. 60s, 5m [default: 60s]
    #[arg(
        long,
        env = "KURA_READ_TIMEOUT",
        global = true,
        value_name = "DURATION"
    )]
    pub read_timeout: Option<String>,
    /// CA certificate (PEM) trusted for the S3 endpoint besides the system's roots, e.g. a
    /// private CA; repeatable. AWS_CA_BUNDLE is read when this is not given.
    #[arg(
        long,
        env = "KURA_S3_CA_FILE",
        global = true,
        value_name = "FILE",
        value_delimiter = ',',
        help_heading = "TLS"
    )]
    pub s3_ca_file: Vec<PathBuf>,
    /// CA certificate (PEM) trusted for https:// CouchDB URLs besides the system's roots;
    /// repeatable. (PostgreSQL: sslrootcert=FILE in the URL, or PGSSLROOTCERT.)
    #[arg(
        long,
        env = "KURA_COUCHDB_CA_FILE",
        global = true,
        value_name = "FILE",
        value_delimiter = ',',
        help_heading = "TLS"
    )]
    pub couchdb_ca_file: Vec<PathBuf>,
    /// Client certificate (PEM) for a CouchDB server that asks for one; needs --couchdb-key
    #[arg(
        long,
        env = "KURA_COUCHDB_CERT",
        global = true,
        value_name = "FILE",
        help_heading = "TLS"
    )]
    pub couchdb_cert: Option<PathBuf>,
    /// The private key (PEM) of --couchdb-cert
    #[arg(
        long,
        env = "KURA_COUCHDB_KEY",
        global = true,
        value_name = "FILE",
        help_heading = "TLS"
    )]
    pub couchdb_key: Option<PathBuf>,
    /// IBM Cloud API key for ICOS, used when no HMAC keys are configured. Prefer the
    /// environment or --icos-credentials: a command line is visible to the host's other users.
    #[arg(
        long = "ibm-api-key",
        env = "IBM_API_KEY_ID",
        global = true,
        hide_env_values = true,
        value_name = "KEY",
        help_heading = "IBM Cloud IAM"
    )]
    pub ibm_api_key: Option<String>,
    /// ICOS service instance (its CRN), sent on the requests ICOS wants it on
    #[arg(
        long,
        env = "IBM_SERVICE_INSTANCE_ID",
        global = true,
        value_name = "ID",
        help_heading = "IBM Cloud IAM"
    )]
    pub ibm_service_instance_id: Option<String>,
    /// IAM token endpoint; private networks use https://private.iam.cloud.ibm.com/identity/token
    /// [default: https://iam.cloud.ibm.com/identity/token]
    #[arg(
        long,
        env = "IBM_AUTH_ENDPOINT",
        global = true,
        value_name = "URL",
        help_heading = "IBM Cloud IAM"
    )]
    pub ibm_auth_endpoint: Option<String>,
    /// ICOS service credential (JSON, as the IBM Cloud console downloads it): its apikey,
    /// resource_instance_id and cos_hmac_keys
    #[arg(
        long,
        env = "KURA_ICOS_CREDENTIALS",
        global = true,
        value_name = "FILE",
        help_heading = "IBM Cloud IAM"
    )]
    pub icos_credentials: Option<PathBuf>,
    /// Directory of pg_dump, pg_restore, psql (default: PATH, then /usr/lib/postgresql/*/bin)
    #[arg(long, env = "KURA_PG_BIN_DIR", global = true)]
    pub pg_bin_dir: Option<PathBuf>,
    /// Encrypt every part to this age public key (age1…); repeatable, any one of the keys
    /// decrypts. The backup job needs only public keys.
    #[arg(
        long,
        env = "KURA_ENCRYPT_TO",
        global = true,
        value_name = "RECIPIENT",
        value_delimiter = ',',
        help_heading = "Encryption"
    )]
    pub encrypt_to: Vec<String>,
    /// Encrypt to the recipients in FILE (one age1… key per line, as `age -R` reads)
    #[arg(
        long,
        env = "KURA_ENCRYPT_TO_FILE",
        global = true,
        value_name = "FILE",
        help_heading = "Encryption"
    )]
    pub encrypt_to_file: Option<PathBuf>,
    /// Back up unencrypted although recipients are configured
    #[arg(
        long,
        env = "KURA_NO_ENCRYPT",
        global = true,
        help_heading = "Encryption"
    )]
    pub no_encrypt: bool,
    /// age identity file (AGE-SECRET-KEY-1…) to read encrypted backups with; repeatable
    #[arg(
        long,
        env = "KURA_IDENTITY_FILE",
        global = true,
        value_name = "FILE",
        value_delimiter = ',',
        help_heading = "Encryption"
    )]
    pub identity: Vec<PathBuf>,
    /// How long pg_dump waits for a table lock before the backup fails, naming the session
    /// that holds it, e.g. 30s, 10m [default: 10m]
    #[arg(
        long,
        env = "KURA_LOCK_WAIT_TIMEOUT",
        global = true,
        value_name = "DURATION"
    )]
    pub lock_wait_timeout: Option<String>,
    /// Databases backed up, restored or verified (--deep) at the same time, on either
    /// engine; memory grows by one pipeline per job (see README "Memory") [default: the
    /// number of cores, at most 4]
    #[arg(long, env = "KURA_JOBS", global = true, value_name = "N")]
    pub jobs: Option<usize>,
    /// PostgreSQL backup with --jobs > 1: a database with at least two tables of this size
    /// is dumped as several parts from one snapshot (its schema, each such table, the rest),
    /// so its tables are dumped and restored side by side; 0 splits every table
    /// [default: 32MiB]
    #[arg(
        long,
        env = "KURA_SPLIT_TABLE_SIZE",
        global = true,
        value_name = "SIZE"
    )]
    pub split_table_size: Option<String>,
    /// After backup, prune, verify or restore: write the run's Prometheus metrics to FILE
    /// (atomically; for node-exporter's textfile collector)
    #[arg(
        long,
        env = "KURA_METRICS_FILE",
        global = true,
        value_name = "FILE",
        help_heading = "Monitoring"
    )]
    pub metrics_file: Option<PathBuf>,
    /// After backup, prune, verify or restore: push the run's metrics to this Prometheus
    /// Pushgateway, e.g. http://pushgateway.monitoring:9091
    #[arg(
        long,
        env = "KURA_PUSHGATEWAY_URL",
        global = true,
        hide_env_values = true,
        value_name = "URL",
        help_heading = "Monitoring"
    )]
    pub pushgateway: Option<String>,
    /// healthchecks.io-style pings: URL/start when a run begins, URL on success, URL/fail on
    /// failure (the URL is a secret: logs show its host only)
    #[arg(
        long,
        env = "KURA_NOTIFY_URL",
        global = true,
        hide_env_values = true,
        value_name = "URL",
        help_heading = "Monitoring"
    )]
    pub notify: Option<String>,
    /// zstd level, 1-22 [default: 3]
    #[arg(long, env = "KURA_COMPRESSION_LEVEL", global = true)]
    pub compression_level: Option<i32>,
    /// zstd worker threads, 0 = compress inline [default: cores-1, at least 1, at most 4]
    #[arg(long, env = "KURA_COMPRESSION_THREADS", global = true)]
    pub compression_threads: Option<u32>,
    /// Size of multipart parts, e.g. 16MiB (memory ≈ (concurrency+1) × part size) [default: 8MiB]
    #[arg(long, env = "KURA_PART_SIZE", global = true)]
    pub part_size: Option<String>,
    /// Parts uploaded concurrently [default: 2]
    #[arg(long, env = "KURA_UPLOAD_CONCURRENCY", global = true)]
    pub upload_concurrency: Option<usize>,
}

#[derive(Subcommand)]
pub enum Command {
    /// Dump, compress and upload sources; the manifest is written last.
    Backup(backup::Options),
    /// Restore a backup into a database server.
    Restore(restore::Options),
    /// List backups, newest first.
    List(list::Options),
    /// Show one backup's manifest.
    Show(show::Options),
    /// Delete backups the retention policy no longer keeps, and abandoned uploads.
    Prune(prune::Options),
    /// Check a backup: every part's size and SHA-256, and that it decompresses.
    Verify(verify::Options),
    /// Freshness of the newest complete backup per source; exit 1 when one is too old.
    Status(status::Options),
    /// Wait until a database or the object store answers (for initContainers).
    WaitFor(wait_for::Options),
    /// Run a kura command on a cron schedule (for hosts without Kubernetes).
    Schedule(schedule::Options),
    /// Remove the backup/prune lock of a source left behind by a run that died.
    Unlock(unlock::Options),
    /// Rewrite a backup for new age recipients (--identity OLD --encrypt-to NEW), commit-last.
    Reencrypt(reencrypt::Options),
    /// Serve Prometheus metrics of every tenant's catalog (freshness, counts, sizes).
    Exporter(exporter::Options),
}

/// Retention rules shared by `prune` and `backup --prune`.
#[derive(Debug, Args, Clone, Default)]
#[command(next_help_heading = "Retention policy")]
pub struct RetentionArgs {
    /// Keep the N newest complete backups.
    #[arg(long, env = "KURA_KEEP_LAST", value_name = "N")]
    pub keep_last: Option<u32>,
    /// Keep the newest backup of each of the N most recent hours that have one.
    #[arg(long, env = "KURA_KEEP_HOURLY", value_name = "N")]
    pub keep_hourly: Option<u32>,
    /// Keep the newest backup of each of the N most recent days (UTC) that have one.
    #[arg(long, env = "KURA_KEEP_DAILY", value_name = "N")]
    pub keep_daily: Option<u32>,
    /// Keep the newest backup of each of the N most recent ISO weeks that have one.
    #[arg(long, env = "KURA_KEEP_WEEKLY", value_name = "N")]
    pub keep_weekly: Option<u32>,
    /// Keep the newest backup of each of the N most recent months that have one.
    #[arg(long, env = "KURA_KEEP_MONTHLY", value_name = "N")]
    pub keep_monthly: Option<u32>,
    /// Keep the newest backup of each of the N most recent years that have one.
    #[arg(long, env = "KURA_KEEP_YEARLY", value_name = "N")]
    pub keep_yearly: Option<u32>,
    /// Keep every backup younger than this, e.g. 7d, 36h.
    #[arg(long, env = "KURA_KEEP_WITHIN", value_name = "DURATION")]
    pub keep_within: Option<String>,
    /// Incomplete backups and unfinished uploads younger than this may belong to a running
    /// backup and are left alone [default: 24h]
    #[arg(
        long = "prune-grace",
        env = "KURA_PRUNE_GRACE",
        value_name = "DURATION"
    )]
    pub grace: Option<String>,
}

impl RetentionArgs {
    /// Flags and environment over the config file's `[retention]`.
    pub fn resolve(&self, file: &RetentionFile) -> Result<(Policy, Duration)> {
        let within = match self.keep_within.as_ref().or(file.keep_within.as_ref()) {
            Some(text) => Some(config::parse_duration(text)?),
            None => None,
        };
        let policy = Policy {
            keep_last: self.keep_last.or(file.keep_last).unwrap_or(0),
            keep_hourly: self.keep_hourly.or(file.keep_hourly).unwrap_or(0),
            keep_daily: self.keep_daily.or(file.keep_daily).unwrap_or(0),
            keep_weekly: self.keep_weekly.or(file.keep_weekly).unwrap_or(0),
            keep_monthly: self.keep_monthly.or(file.keep_monthly).unwrap_or(0),
            keep_yearly: self.keep_yearly.or(file.keep_yearly).unwrap_or(0),
            keep_within: within,
        };
        policy.validate()?;
        let grace = match self.grace.as_ref().or(file.grace.as_ref()) {
            Some(text) => config::parse_duration(text)?,
            None => DEFAULT_GRACE,
        };
        Ok((policy, grace))
    }
}

/// Validated settings: flags > environment > config file > defaults.
#[derive(Debug)]
pub struct Settings {
    pub storage: String,
    pub tenant: String,
    pub log_format: LogFormat,
    pub s3: S3Options,
    pub pipeline: PipelineOptions,
    pub sources: Vec<Source>,
    pub pg_bin_dir: Option<PathBuf>,
    pub lock_wait_timeout: Duration,
    /// `--jobs`: units of work (databases) run side by side.
    pub jobs: usize,
    /// `--split-table-size`: tables of at least this many bytes get a part of their own.
    pub split_table_bytes: u64,
    /// CA files and client certificate for https:// CouchDB URLs.
    pub couchdb_tls: crate::tls::TlsFiles,
    /// `--identity` files, read when an encrypted backup is opened.
    pub identity_files: Vec<PathBuf>,
    /// `--no-encrypt` although recipients are configured: backups say so in a warning.
    pub recipients_dropped: bool,
    /// The config file's `[retention]`, under the retention flags.
    pub retention: RetentionFile,
    /// Metrics file, Pushgateway and pings for the runs that report.
    pub reporting: crate::observe::Reporting,
    /// What the running command did per source, for `reporting`.
    pub run_log: crate::observe::RunLog,
    /// Reporters that could not be set up, warned about once logging is up.
    pub reporting_problems: Vec<Error>,
    pub cancel: CancellationToken,
}

impl Settings {
    pub fn resolve(args: &GlobalArgs) -> Result<Settings> {
        let file = match &args.config {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        let tenant = args
            .tenant
            .clone()
            .or(file.tenant.clone())
            .unwrap_or_else(|| DEFAULT_TENANT.to_string());
        config::validate_tenant(&tenant)?;
        let log_format = match (args.log_format, &file.log_format) {
            (Some(format), _) => format,
            (None, Some(text)) => text.parse()?,
            (None, None) => LogFormat::Text,
        };
        let mut pipeline = PipelineOptions::default();
        if let Some(level) = args.compression_level.or(file.pipeline.compression_level) {
            pipeline.compression_level = level;
        }
        if let Some(threads) = args
            .compression_threads
            .or(file.pipeline.compression_threads)
        {
            pipeline.compression_threads = threads;
        }
        if let Some(size) = args.part_size.as_ref().or(file.pipeline.part_size.as_ref()) {
            pipeline.part_size = config::parse_size(size)?;
        }
        if let Some(n) = args.upload_concurrency.or(file.pipeline.upload_concurrency) {
            pipeline.upload_concurrency = n;
        }
        pipeline.validate()?;
        // Recipients given by flag or environment replace the config file's as a whole: a
        // rotation with --encrypt-to NEW must not keep encrypting to the file's old key.
        let given = !args.encrypt_to.is_empty() || args.encrypt_to_file.is_some();
        if given
            && args.encrypt_to_file.is_none()
            && args.encrypt_to.iter().all(|k| k.trim().is_empty())
        {
            // `KURA_ENCRYPT_TO="$(age-keygen -y missing.txt)"` must not mean "unencrypted".
            return Err(Error::usage(
                "--encrypt-to / KURA_ENCRYPT_TO is set but holds no key: give age1… recipients, or --no-encrypt to back up unencrypted",
            ));
        }
        let (recipient_keys, recipient_files) = match given {
            true => (args.encrypt_to.clone(), args.encrypt_to_file.clone()),
            false => (
                file.encryption.recipients.clone(),
                file.encryption.recipients_file.clone(),
            ),
        };
        let recipient_files: Vec<PathBuf> = recipient_files.into_iter().collect();
        let recipients_dropped =
            args.no_encrypt && (!recipient_keys.is_empty() || !recipient_files.is_empty());
        if !args.no_encrypt {
            pipeline.encryption = Recipients::parse(&recipient_keys, &recipient_files)?;
        }
        let identity_files = match args.identity.is_empty() {
            true => file.encryption.identity_files.clone(),
            false => args.identity.clone(),
        };

        let lock_wait_timeout = match args
            .lock_wait_timeout
            .as_ref()
            .or(file.lock_wait_timeout.as_ref())
        {
            Some(raw) => {
                config::parse_duration(raw).map_err(|e| e.context("--lock-wait-timeout"))?
            }
            None => crate::engine::DEFAULT_LOCK_WAIT_TIMEOUT,
        };
        if lock_wait_timeout.as_millis() > i32::MAX as u128 {
            // PostgreSQL's lock_timeout is an int of milliseconds.
            return Err(Error::usage(
                "--lock-wait-timeout is longer than PostgreSQL accepts (about 24 days)",
            ));
        }
        if lock_wait_timeout.is_zero() {
            return Err(Error::usage(
                "--lock-wait-timeout 0 would wait forever, which is what it exists to prevent: give a duration such as 10m",
            ));
        }

        let split_table_bytes = match args
            .split_table_size
            .as_ref()
            .or(file.split_table_size.as_ref())
        {
            Some(raw) => config::parse_size(raw).map_err(|e| e.context("--split-table-size"))?,
            None => crate::engine::DEFAULT_SPLIT_TABLE_BYTES,
        };

        let jobs = args
            .jobs
            .or(file.jobs)
            .unwrap_or_else(crate::jobs::default_jobs);
        if !(1..=64).contains(&jobs) {
            return Err(Error::usage(format!(
                "--jobs {jobs}: give 1 to 64 (each job is a database session and a pipeline's memory)"
            )));
        }
        let (credentials, credentials_note) = s3_credentials(args, &file)?;
        let mut reporting_problems: Vec<Error> = Vec::new();
        let read_timeout = match args.read_timeout.as_ref().or(file.s3.read_timeout.as_ref()) {
            Some(raw) => config::parse_duration(raw).map_err(|e| e.context("--read-timeout"))?,
            None => storage::DEFAULT_READ_TIMEOUT,
        };
        if read_timeout > Duration::from_secs(24 * 3600) {
            return Err(Error::usage(
                "--read-timeout longer than a day would hide a dead connection: give a duration such as 5m",
            ));
        }
        if read_timeout.is_zero() {
            return Err(Error::usage(
                "--read-timeout 0 would give up on every read: give a duration such as 60s",
            ));
        }
        let couchdb_tls = crate::tls::TlsFiles {
            ca_files: match args.couchdb_ca_file.is_empty() {
                false => args.couchdb_ca_file.clone(),
                true => file.couchdb.ca_files.clone(),
            },
            system_roots: true,
            client_cert: match (
                args.couchdb_cert.clone().or(file.couchdb.cert_file.clone()),
                args.couchdb_key.clone().or(file.couchdb.key_file.clone()),
            ) {
                (Some(cert), Some(key)) => Some(crate::tls::ClientCert { cert, key }),
                (None, None) => None,
                _ => {
                    return Err(Error::usage(
                        "--couchdb-cert and --couchdb-key go together: give both (KURA_COUCHDB_CERT, KURA_COUCHDB_KEY), or neither",
                    ))
                }
            },
        };

        let mut sources = file.sources()?;
        for (name, kind, url) in [
            ("postgres", SourceKind::Postgres, &args.postgres_url),
            ("couchdb", SourceKind::Couchdb, &args.couchdb_url),
        ] {
            if let Some(raw) = url {
                let url = SourceUrl::parse(raw).map_err(|e| e.context(format!("--{name}-url")))?;
                sources.retain(|s| s.name != name);
                sources.push(Source {
                    name: name.to_string(),
                    kind,
                    url,
                });
            }
        }
        // A password apart from the URL (KURA_<SOURCE>_PASSWORD, e.g. from a Kubernetes
        // Secret), so the URL can live in a ConfigMap and needs no percent-encoding.
        for source in &mut sources {
            source.url.fill_password_from_env(&source.name);
        }
        Ok(Settings {
            storage: args
                .storage
                .clone()
                .or(file.storage.clone())
                .unwrap_or_else(|| DEFAULT_STORAGE.to_string()),
            tenant,
            log_format,
            s3: S3Options {
                endpoint: args.s3_endpoint.clone().or(file.s3.endpoint.clone()),
                region: args.s3_region.clone().or(file.s3.region.clone()),
                path_style: args.s3_path_style.or(file.s3.path_style).unwrap_or(false),
                // Flag / KURA_S3_CA_FILE, then AWS_CA_BUNDLE (environment), then the file.
                ca_files: match (
                    args.s3_ca_file.is_empty(),
                    std::env::var_os("AWS_CA_BUNDLE").filter(|v| !v.is_empty()),
                ) {
                    (false, _) => args.s3_ca_file.clone(),
                    (true, Some(bundle)) => vec![PathBuf::from(bundle)],
                    (true, None) => file.s3.ca_files.clone(),
                },
                credentials,
                credentials_note,
                read_timeout,
            },
            couchdb_tls,
            pipeline,
            sources,
            pg_bin_dir: args.pg_bin_dir.clone().or(file.pg_bin_dir.clone()),
            lock_wait_timeout,
            jobs,
            split_table_bytes,
            identity_files,
            recipients_dropped,
            retention: file.retention,
            reporting: crate::observe::Reporting {
                metrics_file: args
                    .metrics_file
                    .clone()
                    .or(file.monitoring.metrics_file.clone()),
                pushgateway: match args
                    .pushgateway
                    .as_ref()
                    .or(file.monitoring.pushgateway.as_ref())
                {
                    // A reporter that cannot be set up is dropped with a warning (logged
                    // once logging is up): a bad URL must not stop the backup itself.
                    Some(url) if !url.trim().is_empty() => {
                        crate::observe::Pushgateway::new(url.trim())
                            .map_err(|e| reporting_problems.push(e))
                            .ok()
                    }
                    _ => None,
                },
                notify: match &args.notify {
                    Some(url) if !url.trim().is_empty() => crate::observe::Notify::new(url.trim())
                        .map_err(|e| reporting_problems.push(e))
                        .ok(),
                    _ => None,
                },
            },
            run_log: crate::observe::RunLog::default(),
            reporting_problems,
            cancel: CancellationToken::new(),
        })
    }

    pub fn source(&self, name: &str) -> Result<&Source> {
        self.sources.iter().find(|s| s.name == name).ok_or_else(|| {
            let known: Vec<&str> = self.sources.iter().map(|s| s.name.as_str()).collect();
            Error::usage(if known.is_empty() {
                format!(
                    "unknown source {name:?}: declare it with --postgres-url / KURA_POSTGRES_URL (source \"postgres\"), --couchdb-url, or [sources.{name}] in the config file"
                )
            } else {
                format!("unknown source {name:?}; configured sources: {}", known.join(", "))
            })
        })
    }

    pub fn source_path(&self, source: &str) -> Result<SourcePath> {
        config::validate_source_name(source)?;
        Ok(SourcePath {
            tenant: self.tenant.clone(),
            source: source.to_string(),
        })
    }

    /// Open the store and check it is usable before any work starts. Creates nothing: a
    /// mistyped storage URL must not look like an empty store.
    pub async fn open_store(&self) -> Result<Arc<dyn ObjectStore>> {
        let store = storage::open(&self.storage, &self.s3).await?;
        store.check().await?;
        Ok(Arc::from(store))
    }

    /// [`open_store`](Self::open_store) for `backup`, the one command that may create the
    /// store (a new local directory).
    pub async fn open_store_for_writing(&self) -> Result<Arc<dyn ObjectStore>> {
        let store = storage::open(&self.storage, &self.s3).await?;
        store.prepare_for_writing().await?;
        Ok(Arc::from(store))
    }

    /// A source named on the command line must be configured or have something stored:
    /// a typo gets an error that lists what exists, not an empty answer.
    pub async fn check_source_known(&self, store: &dyn ObjectStore, name: &str) -> Result<()> {
        config::validate_source_name(name)?;
        if self.sources.iter().any(|s| s.name == name) {
            return Ok(());
        }
        let stored = catalog::sources_of_tenant(store, &self.tenant).await?;
        if stored.iter().any(|s| s == name) {
            return Ok(());
        }
        Err(Error::not_found(format!(
            "source {name:?} of tenant {:?} has no backups in {} and is not configured; {}",
            self.tenant,
            store.location(),
            match stored.is_empty() {
                true => format!(
                    "tenant {:?} has no backups there at all (check --tenant and --storage)",
                    self.tenant
                ),
                false => format!("sources with backups: {}", stored.join(", ")),
            }
        )))
    }

    /// The sources a command acts on: those named, else every configured one.
    pub fn source_names(&self, named: &[String]) -> Result<Vec<String>> {
        if !named.is_empty() {
            return Ok(named.to_vec());
        }
        if self.sources.is_empty() {
            return Err(Error::usage(
                "no source given and none configured: name sources, or declare them with --postgres-url, --couchdb-url or [sources.NAME] in the config file",
            ));
        }
        Ok(self.sources.iter().map(|s| s.name.clone()).collect())
    }

    /// The `--identity` keys, or `None` when none are configured.
    pub fn identities(&self) -> Result<Option<Arc<Identities>>> {
        Identities::load(&self.identity_files)
    }

    /// What the engines need beyond a source's URL.
    pub fn engine_options(&self) -> crate::engine::EngineOptions {
        crate::engine::EngineOptions {
            pg_bin_dir: self.pg_bin_dir.clone(),
            lock_wait_timeout: self.lock_wait_timeout,
            split_table_bytes: self.split_table_bytes,
            single_attempt: false,
            couchdb_tls: self.couchdb_tls.clone(),
            read_timeout: self.s3.read_timeout,
        }
    }

    /// Progress lines only make sense for people reading text logs.
    pub fn show_progress(&self) -> bool {
        self.log_format == LogFormat::Text
    }

    /// A command's answer for people (a table, `show`'s text): on stdout, except with JSON
    /// logs, whose stdout carries only JSON lines; there it goes to stderr.
    pub fn print_human(&self, text: &str) {
        use std::io::Write;
        let _ = match self.log_format {
            LogFormat::Text => std::io::stdout().lock().write_all(text.as_bytes()),
            LogFormat::Json => std::io::stderr().lock().write_all(text.as_bytes()),
        };
    }
}

/// ICOS credentials: HMAC keys win over an API key when both are configured (they need no
/// token round trip, and a service credential with both is common); the note says which was
/// chosen, for the log.
fn s3_credentials(
    args: &GlobalArgs,
    file: &FileConfig,
) -> Result<(storage::S3Credentials, Option<String>)> {
    use storage::iam::{IamSettings, ServiceCredential, DEFAULT_AUTH_ENDPOINT};
    use storage::S3Credentials;
    let credential_file = args
        .icos_credentials
        .as_ref()
        .or(file.s3.icos_credentials.as_ref());
    let credential = match credential_file {
        Some(path) => Some(ServiceCredential::load(path)?),
        None => None,
    };
    let (file_key, file_instance, file_hmac) = match credential {
        Some(c) => (c.apikey, c.resource_instance_id, c.cos_hmac_keys),
        None => (None, None, None),
    };
    let (api_key, key_from) =
        match args.ibm_api_key.as_deref().map(str::trim) {
            Some("") => return Err(Error::usage(
                "IBM_API_KEY_ID / --ibm-api-key is set but empty: give the API key, or unset it",
            )),
            Some(key) => (Some(config::Secret::new(key)), "IBM_API_KEY_ID"),
            None => (file_key, "the service credential's apikey"),
        };
    let env_hmac = std::env::var_os("AWS_ACCESS_KEY_ID").is_some_and(|v| !v.is_empty());
    let unused_key = api_key.as_ref().map(|_| key_from);
    let ignored = |hmac_from: &str| {
        unused_key.map(|key| {
            format!("HMAC keys ({hmac_from}) and an IBM API key ({key}) are both configured: using the HMAC keys")
        })
    };
    Ok(match (env_hmac, file_hmac, api_key) {
        (true, _, _) => (S3Credentials::AwsChain, ignored("AWS_ACCESS_KEY_ID")),
        (false, Some(hmac), _) => (
            S3Credentials::Hmac {
                access_key_id: hmac.access_key_id,
                secret_access_key: hmac.secret_access_key,
            },
            ignored("the service credential's cos_hmac_keys"),
        ),
        (false, None, Some(api_key)) => {
            let auth_endpoint = args
                .ibm_auth_endpoint
                .clone()
                .or(file.s3.ibm_auth_endpoint.clone())
                .unwrap_or_else(|| DEFAULT_AUTH_ENDPOINT.to_string());
            let parsed = url::Url::parse(&auth_endpoint).map_err(|e| {
                Error::usage(format!(
                    "IBM_AUTH_ENDPOINT {auth_endpoint:?} is not a URL ({e}): e.g. {DEFAULT_AUTH_ENDPOINT}"
                ))
            })?;
            if !storage::iam::is_encrypted_or_local(&parsed) {
                return Err(Error::usage(format!(
                    "IBM_AUTH_ENDPOINT {auth_endpoint} is not https: the API key would travel unencrypted (e.g. {DEFAULT_AUTH_ENDPOINT})"
                )));
            }
            (
                S3Credentials::Iam(IamSettings {
                    api_key,
                    service_instance_id: args
                        .ibm_service_instance_id
                        .clone()
                        .or(file.s3.ibm_service_instance_id.clone())
                        .or(file_instance),
                    auth_endpoint,
                }),
                Some(format!(
                    "authenticating to the object store with an IBM Cloud API key ({key_from})"
                )),
            )
        }
        (false, None, None) => (S3Credentials::AwsChain, None),
    })
}

/// `--json` output: one object per line (NDJSON), so it can share stdout with JSON log lines
/// and be read line by line (`jq -c`, Fluent Bit).
pub fn print_json_lines<'a, T: serde::Serialize + 'a>(items: impl IntoIterator<Item = &'a T>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    for item in items {
        let line = serde_json::to_string(item).expect("plain data serializes");
        let _ = writeln!(out, "{line}");
    }
}

/// A `--to` URL; without a password of its own it takes the source's `KURA_<SOURCE>_PASSWORD`,
/// so a restore Job can name another host without putting a password in the URL.
pub fn target_url(raw: &str, source: &str) -> Result<SourceUrl> {
    let mut url = SourceUrl::parse(raw).map_err(|e| e.context("--to"))?;
    url.fill_password_from_env(source);
    Ok(url)
}

/// How long a command may take to roll back after SIGTERM/SIGINT.
const CLEANUP_GRACE: Duration = Duration::from_secs(20);

/// Run the CLI; returns the process exit code.
pub async fn run(cli: Cli) -> i32 {
    let verbosity = cli.global.verbose as i8 - cli.global.quiet as i8;
    let settings = match Settings::resolve(&cli.global) {
        Ok(settings) => settings,
        Err(err) => {
            logging::init(cli.global.log_format.unwrap_or(LogFormat::Text), verbosity);
            return report(&err);
        }
    };
    logging::init(settings.log_format, verbosity);
    for problem in &settings.reporting_problems {
        tracing::warn!("not reporting there: {problem}");
    }
    let cancel = settings.cancel.clone();
    // Registered before any work starts, so a signal that arrives in the first milliseconds
    // is not left to the default action (death without rollback).
    let stop_signals = StopSignals::register();
    let signals = tokio::spawn(async move {
        stop_signals.received().await;
        tracing::warn!("signal received: stopping and rolling back unfinished work");
        cancel.cancel();
    });
    let work = async {
        match &cli.command {
            Command::Backup(options) => backup::run(&settings, options).await,
            Command::Restore(options) => restore::run(&settings, options).await,
            Command::List(options) => list::run(&settings, options).await,
            Command::Show(options) => show::run(&settings, options).await,
            Command::Prune(options) => prune::run(&settings, options).await,
            Command::Verify(options) => verify::run(&settings, options).await,
            Command::Status(options) => status::run(&settings, options).await,
            Command::WaitFor(options) => wait_for::run(&settings, options).await,
            Command::Schedule(options) => schedule::run(&settings, options).await,
            Command::Unlock(options) => unlock::run(&settings, options).await,
            Command::Reencrypt(options) => reencrypt::run(&settings, options).await,
            Command::Exporter(options) => exporter::run(&settings, options).await,
        }
    };
    let reported = reported_run(&cli.command, &settings);
    let started = reported.as_ref().map(|(operation, sources)| {
        crate::observe::start(&settings.reporting, *operation, &settings.tenant, sources)
    });
    tokio::pin!(work);
    let result = tokio::select! {
        result = &mut work => result,
        _ = settings.cancel.cancelled() => {
            // Give the command time to abort uploads and roll back, within Kubernetes' default
            // 30 s grace period; what it returns is the truth (it may even have finished).
            // The scheduler waits for its child, which has a grace of its own to roll back.
            let grace = match cli.command {
                Command::Schedule(_) => CLEANUP_GRACE + Duration::from_secs(5),
                _ => CLEANUP_GRACE,
            };
            match tokio::time::timeout(grace, &mut work).await {
                Ok(result) => result,
                Err(_) => Err(Error::new(
                    crate::ErrorKind::Interrupted,
                    format!(
                        "interrupted, and cleanup did not finish within {}s: an unfinished multipart upload may remain until prune removes it; no manifest was written",
                        grace.as_secs()
                    ),
                )),
            }
        }
    };
    // The outcome's log line first: reporting after it may be cut short by SIGKILL.
    let code = match &result {
        Ok(()) => 0,
        Err(err) => report(err),
    };
    if let (Some(started), Some((_, sources))) = (started, &reported) {
        // After a signal the pod is killed 30 s after it: report in what is left.
        let budget = match settings.cancel.is_cancelled() {
            true => crate::observe::BUDGET.min(Duration::from_secs(3)),
            false => crate::observe::BUDGET,
        };
        crate::observe::finish(
            &settings.reporting,
            &settings.run_log,
            started,
            &settings.tenant,
            sources,
            &result,
            budget,
        )
        .await;
    }
    signals.abort();
    code
}

/// The commands whose runs are reported (metrics, pings), and the sources they act on.
fn reported_run(
    command: &Command,
    settings: &Settings,
) -> Option<(crate::observe::Operation, Vec<String>)> {
    use crate::observe::Operation;
    let reporting = &settings.reporting;
    if reporting.metrics_file.is_none()
        && reporting.pushgateway.is_none()
        && reporting.notify.is_none()
    {
        return None;
    }
    match command {
        Command::Backup(options) => Some((Operation::Backup, options.sources.clone())),
        // A dry run deletes nothing: reporting "deleted 0" would hide the real prune's numbers.
        Command::Prune(options) if !options.dry_run => Some((
            Operation::Prune,
            settings.source_names(&options.sources).unwrap_or_default(),
        )),
        Command::Verify(options) => Some((Operation::Verify, vec![options.source.clone()])),
        Command::Restore(options) => Some((Operation::Restore, vec![options.source.clone()])),
        _ => None,
    }
}

/// A command line clap could not parse: help and version are printed as asked (exit 0); a
/// usage error ends like every other failure, with one error line, exit code 2. JSON logs
/// are known from `--log-format` or `KURA_LOG_FORMAT` only here: the config file is not read
/// for a command line that does not parse.
pub fn report_parse_error(err: clap::Error) -> i32 {
    if !err.use_stderr() {
        let _ = err.print();
        return 0;
    }
    let rendered = err.render().to_string();
    // clap's usage line counts options set through the environment as given, which makes
    // them look required (`kura show --log-format <LOG_FORMAT> <SOURCE> …`); the command's
    // own usage line does not.
    let usage = clean_usage();
    if requested_log_format(lossy_args()) != Some(LogFormat::Json) {
        let text: Vec<String> = rendered
            .lines()
            .map(|line| match (&usage, line.starts_with("Usage: ")) {
                (Some(usage), true) => usage.clone(),
                _ => line.to_string(),
            })
            .collect();
        eprintln!("{}", text.join("\n").trim_end());
        return crate::ErrorKind::Usage.exit_code();
    }
    logging::init(LogFormat::Json, 0);
    report(&Error::usage(one_line_usage_error(
        &rendered,
        usage.as_deref(),
    )))
}

/// clap's multi-line error as one sentence: "the following required arguments were not
/// provided: <SOURCE>, <BACKUP>; Usage: kura show [OPTIONS] <SOURCE> <BACKUP>".
fn one_line_usage_error(rendered: &str, usage: Option<&str>) -> String {
    let mut message = String::new();
    for line in rendered.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.starts_with("Usage: ") || line.starts_with("For more information") {
            continue;
        }
        let line = line.strip_prefix("error: ").unwrap_or(line);
        if message.is_empty() {
            message.push_str(line);
        } else if message.ends_with(':') {
            message.push(' ');
            message.push_str(line);
        } else if message.contains(": <") || message.contains(": -") {
            message.push_str(", ");
            message.push_str(line);
        } else {
            message.push_str("; ");
            message.push_str(line);
        }
    }
    if let Some(usage) = usage {
        message.push_str("; ");
        message.push_str(usage);
    }
    message
}

/// The usage line of the subcommand on the command line (or of kura itself).
fn clean_usage() -> Option<String> {
    use clap::CommandFactory;
    let mut command = Cli::command();
    command.build();
    let named = lossy_args()
        .skip(1)
        .find(|arg| command.get_subcommands().any(|s| s.get_name() == arg));
    let usage = match named {
        Some(name) => command.find_subcommand_mut(&name)?.render_usage(),
        None => command.render_usage(),
    };
    Some(usage.to_string().trim().to_string())
}

/// The command line as text; an argument that is not UTF-8 (which clap reports as a usage
/// error) must not panic here.
fn lossy_args() -> impl Iterator<Item = String> {
    std::env::args_os().map(|a| a.to_string_lossy().into_owned())
}

/// `--log-format X`, `--log-format=X`, else `KURA_LOG_FORMAT`.
fn requested_log_format(args: impl Iterator<Item = String>) -> Option<LogFormat> {
    // After `--` come the arguments of the command `schedule` runs, not kura's own.
    let args: Vec<String> = args.take_while(|a| a != "--").collect();
    let from_args =
        args.iter()
            .enumerate()
            .find_map(|(i, arg)| match arg.strip_prefix("--log-format") {
                Some(value) if value.starts_with('=') => Some(value[1..].to_string()),
                Some("") => args.get(i + 1).cloned(),
                _ => None,
            });
    from_args
        .or_else(|| std::env::var("KURA_LOG_FORMAT").ok())
        .and_then(|text| text.parse().ok())
}

fn report(err: &Error) -> i32 {
    let code = err.kind().exit_code();
    tracing::error!(
        error_kind = err.kind().as_str(),
        exit_code = code,
        "{}",
        err.chain()
    );
    code
}

/// SIGTERM (Kubernetes stopping the pod) and SIGINT (Ctrl-C).
struct StopSignals(Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>);

impl StopSignals {
    fn register() -> Self {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(term), Ok(int)) => StopSignals(Some((term, int))),
            _ => StopSignals(None),
        }
    }

    async fn received(self) {
        match self.0 {
            Some((mut term, mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            None => std::future::pending::<()>().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(config: &std::path::Path, args: &[&str]) -> Result<Settings> {
        let mut argv = vec!["kura", "--config", config.to_str().unwrap()];
        argv.extend_from_slice(args);
        argv.extend(["list"]);
        Settings::resolve(&Cli::try_parse_from(argv).unwrap().global)
    }

    /// Recipients from flags (or the environment) replace the config file's as a whole, so a
    /// key rotation cannot silently keep the old key; blank ones are an error, not "plain".
    #[test]
    fn encryption_recipients_follow_flags_over_the_file_as_a_whole() {
        let dir = tempfile::tempdir().unwrap();
        let old = age::x25519::Identity::generate().to_public().to_string();
        let new = age::x25519::Identity::generate().to_public().to_string();
        let old_file = dir.path().join("old.txt");
        std::fs::write(&old_file, format!("{old}\n")).unwrap();
        let config = dir.path().join("kura.toml");
        std::fs::write(
            &config,
            format!(
                "[encryption]\nrecipients = [\"{old}\"]\nrecipients_file = \"{}\"\n",
                old_file.display()
            ),
        )
        .unwrap();
        let names = |s: &Settings| s.pipeline.encryption.as_ref().map(|r| r.names().to_vec());

        assert_eq!(
            names(&settings(&config, &[]).unwrap()),
            Some(vec![old.clone()])
        );
        let flag = settings(&config, &["--encrypt-to", &new]).unwrap();
        assert_eq!(names(&flag), Some(vec![new.clone()]));
        let unencrypted = settings(&config, &["--no-encrypt"]).unwrap();
        assert_eq!(names(&unencrypted), None);
        assert!(unencrypted.recipients_dropped);
        let blank = settings(&config, &["--encrypt-to", " "]).unwrap_err();
        assert_eq!(blank.kind(), crate::ErrorKind::Usage);
    }
}
