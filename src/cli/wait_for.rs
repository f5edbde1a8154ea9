//! `kura wait-for postgres|couchdb|s3 URL [--timeout DURATION]`: for initContainers, so an app
//! starts only once its database really answers (a query, not an open port).

use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};

use super::Settings;
use crate::config::{self, SourceKind, SourceUrl};
use crate::engine::{self, Engine, EngineOptions};
use crate::error::{Error, ErrorKind, Result};
use crate::retry::RetryPolicy;
use crate::storage;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Service {
    Postgres,
    Couchdb,
    S3,
}

// No Debug: the URL may hold a password.
#[derive(Args)]
pub struct Options {
    /// What to wait for.
    #[arg(value_enum)]
    pub service: Service,
    /// postgres://user@host:5432/db, http://user@host:5984, or s3://bucket. A password missing
    /// from the URL comes from KURA_POSTGRES_PASSWORD / KURA_COUCHDB_PASSWORD.
    pub url: String,
    /// Give up after this long.
    #[arg(long, value_name = "DURATION", default_value = "5m")]
    pub timeout: String,
}

/// One attempt may not eat the whole budget on a black-holed connection.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn run(settings: &Settings, options: &Options) -> Result<()> {
    let timeout = config::parse_duration(&options.timeout)?;
    let probe = Probe::new(settings, options).await?;
    let started = Instant::now();
    let retry = RetryPolicy::PROBE;
    for attempt in 1.. {
        let outcome = match tokio::time::timeout(ATTEMPT_TIMEOUT, probe.attempt()).await {
            Ok(outcome) => outcome,
            Err(_) => Err(Error::new(
                probe.failure_kind(),
                format!("no answer within {}s", ATTEMPT_TIMEOUT.as_secs()),
            )),
        };
        let err = match outcome {
            Ok(what) => {
                tracing::info!(
                    service = %probe.name(),
                    attempt,
                    seconds = started.elapsed().as_secs_f64(),
                    "{} answers: {what}",
                    probe.target()
                );
                return Ok(());
            }
            // A bad URL or setting will not fix itself while we wait.
            Err(err) if err.kind() == ErrorKind::Usage => return Err(err),
            Err(err) => err,
        };
        let elapsed = started.elapsed();
        let delay = retry.delay(attempt);
        if elapsed + delay > timeout || !retry.allows_another(attempt) {
            return Err(Error::new(
                probe.failure_kind(),
                format!(
                    "{} did not answer within {} ({attempt} attempts); last error: {}",
                    probe.target(),
                    config::format_duration(timeout),
                    err.chain()
                ),
            ));
        }
        tracing::info!(
            service = %probe.name(),
            attempt,
            retry_in_ms = delay.as_millis() as u64,
            "waiting for {}: {}",
            probe.target(),
            err.chain()
        );
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = settings.cancel.cancelled() => return Err(Error::interrupted()),
        }
    }
    unreachable!("the loop returns")
}

enum Probe {
    Database(Box<dyn Engine>, &'static str),
    S3(String, storage::S3Options),
}

impl Probe {
    async fn new(settings: &Settings, options: &Options) -> Result<Probe> {
        Ok(match options.service {
            Service::Postgres | Service::Couchdb => {
                let (kind, source) = match options.service {
                    Service::Postgres => (SourceKind::Postgres, "postgres"),
                    _ => (SourceKind::Couchdb, "couchdb"),
                };
                let mut url = SourceUrl::parse(&options.url)?;
                url.fill_password_from_env(source);
                let engine_options = EngineOptions {
                    // One attempt per probe: this loop retries, and logs each attempt.
                    single_attempt: true,
                    ..settings.engine_options()
                };
                Probe::Database(engine::connect(kind, url, &engine_options)?, source)
            }
            Service::S3 => {
                if !options.url.starts_with("s3://") && !options.url.starts_with("file://") {
                    return Err(Error::usage(format!(
                        "{:?} is not a storage URL: expected s3://bucket[/prefix]",
                        options.url
                    )));
                }
                Probe::S3(options.url.clone(), settings.s3.clone())
            }
        })
    }

    fn name(&self) -> &'static str {
        match self {
            Probe::Database(_, name) => name,
            Probe::S3(..) => "s3",
        }
    }

    fn target(&self) -> String {
        match self {
            Probe::Database(engine, _) => engine.target(),
            Probe::S3(url, _) => url.clone(),
        }
    }

    fn failure_kind(&self) -> ErrorKind {
        match self {
            Probe::S3(..) => ErrorKind::Storage,
            Probe::Database(..) => ErrorKind::Database,
        }
    }

    async fn attempt(&self) -> Result<String> {
        match self {
            Probe::Database(engine, _) => engine.probe().await,
            Probe::S3(url, options) => {
                let store = storage::open(url, options).await?;
                store.check().await?;
                Ok(format!("bucket reachable at {}", store.location()))
            }
        }
    }
}
