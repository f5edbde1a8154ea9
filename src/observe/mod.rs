//! What a run reports besides its log, for people who do not read logs: Prometheus metrics
//! (a file for node-exporter's textfile collector, a push to a Pushgateway, since Prometheus
//! cannot scrape a Job that has finished) and healthchecks.io-style pings, so that a backup
//! that fails, and one that never ran, both raise an alert. `kura exporter` (the freshness
//! of every tenant's catalog) lives in [`exporter`].
//!
//! None of it may fail a run: a metrics file that cannot be written or a ping server that is
//! down is a warning, and each network call has a deadline of a few seconds.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::error::Error;

pub mod exporter;
pub mod exposition;
mod notify;
mod push;

pub use notify::Notify;
pub use push::Pushgateway;

use exposition::{Exposition, Family, Labels};

/// The commands that report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Backup,
    Prune,
    Verify,
    Restore,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Backup => "backup",
            Operation::Prune => "prune",
            Operation::Verify => "verify",
            Operation::Restore => "restore",
        }
    }
}

/// What a source's run produced.
#[derive(Debug, Clone)]
pub enum Done {
    Backup {
        backup_id: String,
        stored_bytes: u64,
        raw_bytes: u64,
        parts: usize,
    },
    Prune {
        deleted: usize,
        kept: usize,
    },
    Verify {
        backup_id: String,
    },
    Restore {
        backup_id: String,
    },
}

/// A failed source: its exit code and the one error line the log shows.
#[derive(Debug, Clone)]
pub struct Failure {
    pub exit_code: i32,
    pub message: String,
}

impl From<&Error> for Failure {
    fn from(err: &Error) -> Self {
        Failure {
            exit_code: err.kind().exit_code(),
            message: err.chain(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct SourceResult {
    pub source: String,
    pub duration: Duration,
    pub outcome: Result<Done, Failure>,
}

/// Where a run reports to (flags and environment).
#[derive(Debug, Clone, Default)]
pub struct Reporting {
    pub metrics_file: Option<PathBuf>,
    pub pushgateway: Option<Pushgateway>,
    pub notify: Option<Notify>,
}

/// The per-source outcomes of one run, recorded by the command as each source finishes.
#[derive(Debug, Default)]
pub struct RunLog {
    results: Mutex<Vec<SourceResult>>,
}

impl RunLog {
    pub fn record(&self, source: &str, duration: Duration, outcome: Result<Done, &Error>) {
        self.results
            .lock()
            .expect("run log lock")
            .push(SourceResult {
                source: source.to_string(),
                duration,
                outcome: outcome.map_err(Failure::from),
            });
    }

    /// What was recorded, plus a failure for every source in `sources` that the command never
    /// reached (it failed before: storage unreachable, a bad option).
    fn complete(
        &self,
        sources: &[String],
        run: &Result<(), Error>,
        duration: Duration,
    ) -> Vec<SourceResult> {
        let mut results = self.results.lock().expect("run log lock").clone();
        if let Err(err) = run {
            for source in sources {
                if !results.iter().any(|r| &r.source == source) {
                    results.push(SourceResult {
                        source: source.clone(),
                        duration,
                        outcome: Err(Failure::from(err)),
                    });
                }
            }
        }
        results
    }
}

/// The start of a run: the start ping goes out in the background, so a slow ping server
/// costs the run nothing unless the run is shorter than the ping.
pub struct Started {
    operation: Operation,
    at: DateTime<Utc>,
    clock: std::time::Instant,
    start_ping: Option<tokio::task::JoinHandle<()>>,
}

pub fn start(
    reporting: &Reporting,
    operation: Operation,
    tenant: &str,
    sources: &[String],
) -> Started {
    let start_ping = reporting.notify.clone().map(|notify| {
        let body = format!(
            "kura {} started: tenant {tenant}, {}\n",
            operation.as_str(),
            describe_sources(sources)
        );
        tokio::spawn(async move { notify.ping(notify::Event::Start, body).await })
    });
    Started {
        operation,
        at: Utc::now(),
        clock: std::time::Instant::now(),
        start_ping,
    }
}

fn describe_sources(sources: &[String]) -> String {
    match sources {
        [] => "no source".to_string(),
        [one] => format!("source {one}"),
        many => format!("sources {}", many.join(", ")),
    }
}

/// All of a run's reporting together must end within this: a Job stopped by SIGTERM has 30 s
/// in all, most of which the command's own cleanup may take.
pub const BUDGET: Duration = Duration::from_secs(5);

/// The end of a run: metrics and the final ping, concurrently and within `budget`; failures
/// are warnings. The caller logs the run's own outcome first, so nothing here can hide it.
pub async fn finish(
    reporting: &Reporting,
    log: &RunLog,
    started: Started,
    tenant: &str,
    sources: &[String],
    run: &Result<(), Error>,
    budget: Duration,
) {
    let duration = started.clock.elapsed();
    let finished_at = Utc::now();
    let results = log.complete(sources, run, duration);
    if let Some(path) = &reporting.metrics_file {
        if let Err(e) = update_metrics_file(path, &results, started.operation, tenant, finished_at)
        {
            tracing::warn!(path = %path.display(), "cannot write the metrics file: {e}");
        }
    }
    // A start ping still under way is dropped: a success without a start is fine for
    // healthchecks, a late start after the end would not be.
    if let Some(ping) = started.start_ping {
        ping.abort();
    }
    let pushes = async {
        if let Some(gateway) = &reporting.pushgateway {
            futures::future::join_all(results.iter().map(|result| {
                let metrics = source_metrics(result, started.operation, tenant, finished_at);
                async move {
                    gateway
                        .push(
                            tenant,
                            &result.source,
                            started.operation,
                            &metrics,
                            result.outcome.is_ok(),
                        )
                        .await
                }
            }))
            .await;
        }
    };
    let ping = async {
        if let Some(notify) = &reporting.notify {
            let failed = run.is_err() || results.iter().any(|r| r.outcome.is_err());
            let mut body = summary(started.operation, tenant, &results, duration, started.at);
            if let (Err(err), true) = (run, results.is_empty()) {
                body.push_str(&format!(
                    "exit {}: {}\n",
                    err.kind().exit_code(),
                    err.chain()
                ));
            }
            let event = match failed {
                true => notify::Event::Fail,
                false => notify::Event::Success,
            };
            notify.ping(event, body).await;
        }
    };
    if tokio::time::timeout(budget, futures::future::join(pushes, ping))
        .await
        .is_err()
    {
        tracing::warn!(
            "metrics push or ping did not finish within {:.1}s; the run's outcome is not changed",
            budget.as_secs_f64()
        );
    }
}

fn summary(
    operation: Operation,
    tenant: &str,
    results: &[SourceResult],
    duration: Duration,
    started: DateTime<Utc>,
) -> String {
    use crate::progress::human_bytes;
    let failed = results.iter().filter(|r| r.outcome.is_err()).count();
    let mut text = format!(
        "kura {} of tenant {tenant} {} in {:.1}s (started {})\n",
        operation.as_str(),
        match (failed, results.len()) {
            (_, 0) => "FAILED".to_string(),
            (0, _) => "succeeded".to_string(),
            (n, all) => format!("FAILED for {n} of {all} sources"),
        },
        duration.as_secs_f64(),
        started.format("%Y-%m-%dT%H:%M:%SZ"),
    );
    for result in results {
        let line = match &result.outcome {
            Ok(Done::Backup {
                backup_id,
                stored_bytes,
                raw_bytes,
                parts,
            }) => format!(
                "backup {backup_id}: {} stored ({} raw), {parts} parts",
                human_bytes(*stored_bytes),
                human_bytes(*raw_bytes)
            ),
            Ok(Done::Prune { deleted, kept }) => {
                format!("{deleted} backups deleted, {kept} kept")
            }
            Ok(Done::Verify { backup_id }) => format!("backup {backup_id} verified"),
            Ok(Done::Restore { backup_id }) => format!("backup {backup_id} restored"),
            Err(failure) => format!("exit {}: {}", failure.exit_code, failure.message),
        };
        text.push_str(&format!(
            "{}: {line} ({:.1}s)\n",
            result.source,
            result.duration.as_secs_f64()
        ));
    }
    text
}

pub const LAST_RUN: Family = Family {
    name: "kura_last_run_timestamp_seconds",
    kind: "gauge",
    help: "When the last run of this operation on this source finished, in seconds since the Unix epoch.",
};
pub const LAST_SUCCESS: Family = Family {
    name: "kura_last_success_timestamp_seconds",
    kind: "gauge",
    help: "When the last successful run of this operation on this source finished, in seconds since the Unix epoch.",
};
pub const LAST_RUN_SUCCESS: Family = Family {
    name: "kura_last_run_success",
    kind: "gauge",
    help: "1 if the last run of this operation on this source succeeded, else 0.",
};
pub const LAST_RUN_DURATION: Family = Family {
    name: "kura_last_run_duration_seconds",
    kind: "gauge",
    help: "How long the last run of this operation on this source took.",
};
pub const LAST_RUN_EXIT_CODE: Family = Family {
    name: "kura_last_run_exit_code",
    kind: "gauge",
    help: "The exit code of the last run of this operation on this source (README: Exit codes).",
};
pub const STORED_BYTES: Family = Family {
    name: "kura_backup_stored_bytes",
    kind: "gauge",
    help: "Bytes stored (compressed, encrypted) by the last successful backup.",
};
pub const RAW_BYTES: Family = Family {
    name: "kura_backup_raw_bytes",
    kind: "gauge",
    help: "Bytes dumped (before compression) by the last successful backup.",
};
pub const PARTS: Family = Family {
    name: "kura_backup_parts",
    kind: "gauge",
    help: "Part objects of the last successful backup.",
};
pub const PRUNE_DELETED: Family = Family {
    name: "kura_prune_deleted_backups",
    kind: "gauge",
    help: "Backups the last successful prune deleted.",
};
pub const PRUNE_KEPT: Family = Family {
    name: "kura_prune_kept_backups",
    kind: "gauge",
    help: "Backups the last successful prune kept.",
};

/// Every family a run writes, in output order.
const RUN_FAMILIES: [Family; 10] = [
    LAST_RUN,
    LAST_SUCCESS,
    LAST_RUN_SUCCESS,
    LAST_RUN_DURATION,
    LAST_RUN_EXIT_CODE,
    STORED_BYTES,
    RAW_BYTES,
    PARTS,
    PRUNE_DELETED,
    PRUNE_KEPT,
];

/// Families that describe the last *success*: a failed run leaves them as they were.
const SUCCESS_FAMILIES: [&str; 6] = [
    LAST_SUCCESS.name,
    STORED_BYTES.name,
    RAW_BYTES.name,
    PARTS.name,
    PRUNE_DELETED.name,
    PRUNE_KEPT.name,
];

fn labels(tenant: &str, source: &str, operation: Operation) -> Labels {
    vec![
        ("tenant", tenant.to_string()),
        ("source", source.to_string()),
        ("operation", operation.as_str().to_string()),
    ]
}

/// One source's samples: the run's own, and for a success the success's.
fn source_samples(result: &SourceResult, finished_at: DateTime<Utc>) -> Vec<(Family, f64)> {
    let now = finished_at.timestamp_millis() as f64 / 1000.0;
    let mut samples = vec![
        (LAST_RUN, now),
        (
            LAST_RUN_SUCCESS,
            f64::from(u8::from(result.outcome.is_ok())),
        ),
        (LAST_RUN_DURATION, result.duration.as_secs_f64()),
        (
            LAST_RUN_EXIT_CODE,
            match &result.outcome {
                Ok(_) => 0.0,
                Err(failure) => f64::from(failure.exit_code),
            },
        ),
    ];
    if let Ok(done) = &result.outcome {
        samples.push((LAST_SUCCESS, now));
        match done {
            Done::Backup {
                stored_bytes,
                raw_bytes,
                parts,
                ..
            } => {
                samples.push((STORED_BYTES, *stored_bytes as f64));
                samples.push((RAW_BYTES, *raw_bytes as f64));
                samples.push((PARTS, *parts as f64));
            }
            Done::Prune { deleted, kept } => {
                samples.push((PRUNE_DELETED, *deleted as f64));
                samples.push((PRUNE_KEPT, *kept as f64));
            }
            Done::Verify { .. } | Done::Restore { .. } => {}
        }
    }
    samples
}

fn source_metrics(
    result: &SourceResult,
    operation: Operation,
    tenant: &str,
    finished_at: DateTime<Utc>,
) -> Exposition {
    let mut exposition = Exposition::default();
    let labels = labels(tenant, &result.source, operation);
    let samples = source_samples(result, finished_at);
    for family in RUN_FAMILIES {
        if let Some((_, value)) = samples.iter().find(|(f, _)| f.name == family.name) {
            exposition.add(family, labels.clone(), *value);
        }
    }
    exposition
}

/// The metrics file after this run: this run's samples, the previous success's samples of a
/// source that failed now, and every other source and operation's samples as they were (one
/// file may serve several CronJobs of a host).
fn metrics_file_text(
    path: &std::path::Path,
    results: &[SourceResult],
    operation: Operation,
    tenant: &str,
    finished_at: DateTime<Utc>,
) -> String {
    let previous = std::fs::read_to_string(path)
        .map(|text| exposition::parse(&text))
        .unwrap_or_default();
    let label_key = |tenant: &str, source: &str, operation: &str| {
        (
            tenant.to_string(),
            source.to_string(),
            operation.to_string(),
        )
    };
    // (tenant, source, operation) → family name → value
    let mut series: std::collections::BTreeMap<(String, String, String), Vec<(String, f64)>> =
        Default::default();
    for sample in previous {
        if !RUN_FAMILIES.iter().any(|f| f.name == sample.name) {
            continue;
        }
        let get = |name: &str| sample.labels.get(name).cloned().unwrap_or_default();
        let key = label_key(&get("tenant"), &get("source"), &get("operation"));
        series
            .entry(key)
            .or_default()
            .push((sample.name, sample.value));
    }
    for result in results {
        let key = label_key(tenant, &result.source, operation.as_str());
        let kept: Vec<(String, f64)> = match result.outcome.is_ok() {
            true => Vec::new(),
            false => series
                .remove(&key)
                .unwrap_or_default()
                .into_iter()
                .filter(|(name, _)| SUCCESS_FAMILIES.contains(&name.as_str()))
                .collect(),
        };
        let mut fresh: Vec<(String, f64)> = source_samples(result, finished_at)
            .into_iter()
            .map(|(family, value)| (family.name.to_string(), value))
            .collect();
        fresh.extend(kept);
        series.insert(key, fresh);
    }
    let mut exposition = Exposition::default();
    for family in RUN_FAMILIES {
        for ((tenant, source, operation), values) in &series {
            if let Some((_, value)) = values.iter().find(|(name, _)| name == family.name) {
                exposition.add(
                    family,
                    vec![
                        ("tenant", tenant.clone()),
                        ("source", source.clone()),
                        ("operation", operation.clone()),
                    ],
                    *value,
                );
            }
        }
    }
    exposition.render()
}

/// Read, merge and replace the metrics file under an exclusive lock (`<file>.lock`), so runs
/// of several CronJobs sharing one file do not lose each other's updates.
fn update_metrics_file(
    path: &std::path::Path,
    results: &[SourceResult],
    operation: Operation,
    tenant: &str,
    finished_at: DateTime<Utc>,
) -> std::io::Result<()> {
    use std::os::unix::io::AsRawFd;
    let mut lock_name = path.as_os_str().to_os_string();
    lock_name.push(".lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(PathBuf::from(lock_name))?;
    // Released when `lock` is closed, at the end of this function.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let text = metrics_file_text(path, results, operation, tenant, finished_at);
    write_atomically(path, &text)
}

/// Temp file in the same directory, then rename: a collector reading the file sees the old
/// text or the new, never half of one.
fn write_atomically(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    let dir = dir.unwrap_or_else(|| std::path::Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "metrics".to_string());
    // A leading dot: the textfile collector reads only *.prom files. A random suffix: two
    // pods are often both PID 1.
    let temp = dir.join(format!(".{name}.{:016x}.tmp", rand::random::<u64>()));
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&temp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(source: &str, outcome: Result<Done, Failure>) -> SourceResult {
        SourceResult {
            source: source.to_string(),
            duration: Duration::from_millis(1500),
            outcome,
        }
    }

    /// A failed run replaces the run's own series but keeps the last success's time and
    /// sizes; other sources' series stay as they were.
    #[test]
    fn the_metrics_file_keeps_the_last_success_through_a_failure() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kura.prom");
        let first = chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        let done = Done::Backup {
            backup_id: "b1".into(),
            stored_bytes: 100,
            raw_bytes: 400,
            parts: 2,
        };
        let text = metrics_file_text(
            &path,
            &[result("pg", Ok(done.clone())), result("couch", Ok(done))],
            Operation::Backup,
            "acme",
            first,
        );
        std::fs::write(&path, &text).unwrap();
        let later = first + chrono::Duration::hours(24);
        let failure = Failure {
            exit_code: 4,
            message: "cannot connect".into(),
        };
        let text = metrics_file_text(
            &path,
            &[result("pg", Err(failure))],
            Operation::Backup,
            "acme",
            later,
        );
        let samples = exposition::parse(&text);
        let value = |name: &str, source: &str| {
            samples
                .iter()
                .find(|s| s.name == name && s.labels["source"] == source)
                .map(|s| s.value)
        };
        assert_eq!(value("kura_last_run_success", "pg"), Some(0.0));
        assert_eq!(value("kura_last_run_exit_code", "pg"), Some(4.0));
        assert_eq!(
            value("kura_last_run_timestamp_seconds", "pg"),
            Some(later.timestamp() as f64)
        );
        assert_eq!(
            value("kura_last_success_timestamp_seconds", "pg"),
            Some(first.timestamp() as f64)
        );
        assert_eq!(value("kura_backup_stored_bytes", "pg"), Some(100.0));
        assert_eq!(value("kura_last_run_success", "couch"), Some(1.0));
        // One HELP and TYPE per family, however many sources.
        assert_eq!(
            text.matches("# TYPE kura_last_run_success gauge").count(),
            1
        );
    }
}
