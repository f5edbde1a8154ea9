//! `kura prune [<source>...] [--dry-run] [--keep-* ...]`

use chrono::{DateTime, NaiveDate, Utc};
use clap::Args;

use super::{RetentionArgs, Settings};
use crate::catalog::prune::Plan;
use crate::error::{Error, Result};
use crate::ops;
use crate::progress::human_bytes;

#[derive(Debug, Args)]
pub struct Options {
    /// Sources to prune (default: every configured source). Only `<tenant>/<source>/` is
    /// listed and deleted.
    pub sources: Vec<String>,
    /// Show every decision and its reasons; delete nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the decisions as JSON, one object per source and line (NDJSON).
    #[arg(long)]
    pub json: bool,
    /// With --dry-run: evaluate the policy as if it were this time (RFC 3339 or YYYY-MM-DD).
    #[arg(long, value_name = "TIME", value_parser = parse_now, requires = "dry_run")]
    pub now: Option<DateTime<Utc>>,
    // Last: the flattened group's heading applies to the options after it.
    #[command(flatten)]
    pub retention: RetentionArgs,
}

pub async fn run(settings: &Settings, options: &Options) -> Result<()> {
    let (policy, grace) = options.retention.resolve(&settings.retention)?;
    let names = settings.source_names(&options.sources)?;
    let store = settings.open_store().await?;
    let now = options.now.unwrap_or_else(Utc::now);
    let mut plans = Vec::new();
    let mut first_error = None;
    // Like backup: one source that fails (locked, refused deletes) does not keep the others
    // from being pruned; the run still fails with the first error.
    for name in &names {
        let began = std::time::Instant::now();
        let pruned = async {
            let path = settings.source_path(name)?;
            settings.check_source_known(store.as_ref(), name).await?;
            ops::prune::prune_source(store.clone(), &path, &policy, grace, now, options.dry_run)
                .await
        };
        match pruned.await {
            Ok(pruned) => {
                settings.run_log.record(
                    name,
                    began.elapsed(),
                    Ok(crate::observe::Done::Prune {
                        deleted: pruned.deleted,
                        kept: pruned.kept,
                    }),
                );
                plans.push(pruned.plan);
            }
            Err(err) => {
                if names.len() > 1 {
                    tracing::error!(source = %name, error_kind = err.kind().as_str(), "{}", err.chain());
                }
                let err = err.context(format!("prune of source {name:?} failed"));
                settings.run_log.record(name, began.elapsed(), Err(&err));
                first_error.get_or_insert(err);
                if settings.cancel.is_cancelled() {
                    break;
                }
            }
        }
    }
    if options.json {
        super::print_json_lines(&plans);
    } else if options.dry_run || settings.log_format == crate::logging::LogFormat::Text {
        for plan in &plans {
            settings.print_human(&table(plan));
        }
    }
    match first_error {
        Some(err) => Err(err),
        None => Ok(()),
    }
}

fn table(plan: &Plan) -> String {
    let mut rows: Vec<Vec<String>> = plan
        .backups
        .iter()
        .map(|b| {
            vec![
                format!("{}/{}", plan.tenant, plan.source),
                b.backup_id.clone(),
                if b.complete { "complete" } else { "incomplete" }.into(),
                b.action.to_uppercase(),
                human_bytes(b.bytes),
                b.reasons.join("; "),
            ]
        })
        .collect();
    for upload in &plan.stale_uploads {
        rows.push(vec![
            format!("{}/{}", plan.tenant, plan.source),
            upload.key.clone(),
            "unfinished upload".into(),
            "ABORT".into(),
            "-".into(),
            match upload.initiated {
                Some(t) => format!(
                    "started {}, older than the grace",
                    t.format("%Y-%m-%d %H:%M:%SZ")
                ),
                None => "older than the grace".into(),
            },
        ]);
    }
    if rows.is_empty() {
        return format!("{}/{}: no backups\n", plan.tenant, plan.source);
    }
    super::table::render(
        &["SOURCE", "BACKUP ID", "STATUS", "ACTION", "SIZE", "REASONS"],
        &rows,
    )
}

fn parse_now(text: &str) -> std::result::Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(t.with_timezone(&Utc));
    }
    NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .map(|d| d.and_hms_opt(0, 0, 0).expect("midnight exists").and_utc())
        .map_err(|_| {
            Error::usage(format!(
                "invalid time {text:?}: expected RFC 3339 (2026-11-28T02:00:00Z) or a date (2026-11-28)"
            ))
            .to_string()
        })
}
