//! `kura status [<source>...] [--max-age DURATION | --schedule CRON]`: is the newest complete
//! backup of each source recent enough? For alerting (exit 1) and for people (a table).

use std::time::Duration;

use chrono::{DateTime, Utc};
use clap::Args;
use serde::Serialize;

use super::Settings;
use crate::calendar::CronSchedule;
use crate::catalog;
use crate::config;
use crate::error::{Error, Result};

#[derive(Debug, Args)]
pub struct Options {
    /// Sources to check (default: the configured ones, else every source of the tenant in storage).
    pub sources: Vec<String>,
    /// Stale when the newest complete backup finished longer ago than this, e.g. 26h.
    #[arg(long, value_name = "DURATION", conflicts_with = "schedule")]
    pub max_age: Option<String>,
    /// Stale when a run of this cron schedule (crontab syntax, as in the CronJob) plus
    /// --slack has passed without a backup starting, e.g. "30 2 * * *".
    #[arg(long, value_name = "CRON")]
    pub schedule: Option<String>,
    /// Time zone of --schedule (IANA name, as the CronJob's timeZone) [default: UTC]
    #[arg(long, value_name = "TZ", requires = "schedule")]
    pub timezone: Option<String>,
    /// How long a scheduled backup may take before it counts as missed.
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "1h",
        requires = "schedule"
    )]
    pub slack: String,
    /// Print one JSON object per source and line (NDJSON) instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
pub struct SourceStatus {
    pub source: String,
    /// `fresh`, `stale` or `empty` (no complete backup at all).
    pub status: &'static str,
    pub backup_id: Option<String>,
    pub finished_at: Option<DateTime<Utc>>,
    pub age_seconds: Option<i64>,
    pub reason: String,
}

/// What "recent enough" means.
enum Rule {
    MaxAge(Duration),
    Schedule(Box<CronSchedule>, Duration),
    /// Only an empty source is a problem.
    Exists,
}

pub async fn run(settings: &Settings, options: &Options) -> Result<()> {
    let rule = match (&options.max_age, &options.schedule) {
        (Some(age), _) => Rule::MaxAge(config::parse_duration(age)?),
        (None, Some(expr)) => Rule::Schedule(
            Box::new(CronSchedule::parse(expr, options.timezone.as_deref())?),
            config::parse_duration(&options.slack)?,
        ),
        (None, None) => Rule::Exists,
    };
    let store = settings.open_store().await?;
    let names = if !options.sources.is_empty() || !settings.sources.is_empty() {
        settings.source_names(&options.sources)?
    } else {
        catalog::sources_of_tenant(store.as_ref(), &settings.tenant).await?
    };
    if names.is_empty() {
        return Err(Error::not_found(format!(
            "no sources configured and no backups of tenant {:?} in {}",
            settings.tenant,
            store.location()
        )));
    }
    let now = Utc::now();
    let mut rows = Vec::new();
    for name in &names {
        let path = settings.source_path(name)?;
        let newest = catalog::newest_complete(store.as_ref(), &path).await?;
        rows.push(judge(name, newest.as_ref(), &rule, now));
    }
    for row in &rows {
        tracing::info!(
            source = %row.source,
            status = row.status,
            backup_id = row.backup_id.as_deref().unwrap_or(""),
            age_seconds = row.age_seconds.unwrap_or(-1),
            "{}: {} ({})",
            row.source,
            row.status,
            row.reason
        );
    }
    if options.json {
        super::print_json_lines(&rows);
    } else if settings.log_format == crate::logging::LogFormat::Text {
        // With JSON logs the line per source above already says all the table would.
        print!("{}", table(&rows));
    }
    let bad: Vec<String> = rows
        .iter()
        .filter(|r| r.status != "fresh")
        .map(|r| format!("{} is {}: {}", r.source, r.status, r.reason))
        .collect();
    if bad.is_empty() {
        Ok(())
    } else {
        Err(Error::failed(format!(
            "{} of {} source(s) of tenant {:?} lack a recent backup: {}",
            bad.len(),
            rows.len(),
            settings.tenant,
            bad.join("; ")
        )))
    }
}

fn judge(
    source: &str,
    newest: Option<&catalog::Manifest>,
    rule: &Rule,
    now: DateTime<Utc>,
) -> SourceStatus {
    let Some(m) = newest else {
        return SourceStatus {
            source: source.to_string(),
            status: "empty",
            backup_id: None,
            finished_at: None,
            age_seconds: None,
            reason: "no complete backup".into(),
        };
    };
    let age = now - m.finished_at;
    let age_text = config::format_duration(age.to_std().unwrap_or(Duration::ZERO));
    let (fresh, reason) = match rule {
        Rule::Exists => (true, format!("newest finished {age_text} ago")),
        Rule::MaxAge(max) => {
            let fresh = age.to_std().unwrap_or(Duration::ZERO) <= *max;
            (
                fresh,
                format!(
                    "newest finished {age_text} ago, limit {}",
                    config::format_duration(*max)
                ),
            )
        }
        Rule::Schedule(schedule, slack) => {
            match schedule.previous(crate::retention::before(now, *slack)) {
                None => (
                    true,
                    format!("no run of {:?} is due yet", schedule.expression()),
                ),
                // Ids carry the start to the second; a minute covers clock skew between the
                // scheduler and the pod.
                Some(due) => {
                    let fresh = m.started_at + chrono::Duration::seconds(60) >= due;
                    (
                        fresh,
                        if fresh {
                            format!(
                                "newest started {} for the run due {}",
                                m.started_at.format("%Y-%m-%d %H:%M:%SZ"),
                                due.format("%Y-%m-%d %H:%M:%SZ")
                            )
                        } else {
                            format!(
                                "the run due {} ({:?}) has no backup after {} of slack; newest started {}",
                                due.format("%Y-%m-%d %H:%M:%SZ"),
                                schedule.expression(),
                                config::format_duration(*slack),
                                m.started_at.format("%Y-%m-%d %H:%M:%SZ")
                            )
                        },
                    )
                }
            }
        }
    };
    SourceStatus {
        source: source.to_string(),
        status: if fresh { "fresh" } else { "stale" },
        backup_id: Some(m.backup_id.clone()),
        finished_at: Some(m.finished_at),
        age_seconds: Some(age.num_seconds()),
        reason,
    }
}

fn table(rows: &[SourceStatus]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.source.clone(),
                r.status.to_uppercase(),
                r.backup_id.clone().unwrap_or_else(|| "-".into()),
                r.finished_at
                    .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                    .unwrap_or_else(|| "-".into()),
                r.reason.clone(),
            ]
        })
        .collect();
    super::table::render(
        &["SOURCE", "STATUS", "NEWEST BACKUP", "FINISHED (UTC)", "WHY"],
        &cells,
    )
}
