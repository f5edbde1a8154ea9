//! `kura prune [<source>...] [--dry-run] [--keep-* ...]`

use chrono::{DateTime, NaiveDate, Utc};
use clap::Args;

use super::{RetentionArgs, Settings};
use crate::catalog::lock::Lock;
use crate::catalog::prune::{self, Plan};
use crate::catalog::SourcePath;
use crate::error::{Error, Result};
use crate::progress::human_bytes;
use crate::retention::Policy;
use crate::storage::ObjectStore;

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
    for name in &names {
        let path = settings.source_path(name)?;
        settings.check_source_known(store.as_ref(), name).await?;
        if options.dry_run {
            plans.push(prune::plan(store.as_ref(), &path, &policy, grace, now).await?);
            continue;
        }
        let lock = Lock::acquire(store.clone(), &path, "prune").await?;
        let result = prune_locked(store.as_ref(), &path, &policy, grace, now).await;
        lock.release(store.as_ref()).await;
        plans.push(result?);
    }
    if options.json {
        super::print_json_lines(&plans);
    } else if options.dry_run || settings.log_format == crate::logging::LogFormat::Text {
        for plan in &plans {
            settings.print_human(&table(plan));
        }
    }
    Ok(())
}

/// Plan and delete for one source; the caller holds its lock.
pub async fn prune_locked(
    store: &dyn ObjectStore,
    path: &SourcePath,
    policy: &Policy,
    grace: std::time::Duration,
    now: DateTime<Utc>,
) -> Result<Plan> {
    let plan = prune::plan(store, path, policy, grace, now).await?;
    for backup in plan.to_delete() {
        tracing::info!(
            source = %path.source,
            backup_id = %backup.backup_id,
            reasons = %backup.reasons.join("; "),
            "deleting backup {}: {}",
            backup.backup_id,
            backup.reasons.join("; ")
        );
    }
    for upload in &plan.stale_uploads {
        tracing::info!(source = %path.source, object = %upload.key, "aborting abandoned upload {}", upload.key);
    }
    let outcome = prune::execute(store, path, &plan).await?;
    // Some objects under retention are expected; a store refusing every delete is a
    // credential without delete permission, and a nightly prune must not pass silently.
    if plan.to_delete().count() > 0
        && outcome.deleted_backups.is_empty()
        && !outcome.refused.is_empty()
    {
        return Err(Error::new(
            crate::ErrorKind::Storage,
            format!(
                "the store refused every delete under {}/{} (first: {} — {}): give the credentials delete permission, or, if these objects are under a retention policy, wait for it to expire",
                path.tenant,
                path.source,
                outcome.refused[0].key,
                outcome.refused[0].reason
            ),
        ));
    }
    let kept = plan.backups.iter().filter(|b| b.action == "keep").count();
    tracing::info!(
        source = %path.source,
        deleted = outcome.deleted_backups.len(),
        kept,
        deleted_bytes = outcome.deleted_bytes,
        aborted_uploads = outcome.aborted_uploads,
        refused_objects = outcome.refused.len(),
        "prune of {}/{} ({policy}): deleted {} backup(s), {}, kept {kept}, aborted {} upload(s){}",
        path.tenant,
        path.source,
        outcome.deleted_backups.len(),
        human_bytes(outcome.deleted_bytes),
        outcome.aborted_uploads,
        if outcome.refused.is_empty() {
            String::new()
        } else {
            format!(
                "; {} object(s) are protected by the store (object lock/retention) and stay",
                outcome.refused.len()
            )
        }
    );
    Ok(plan)
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
