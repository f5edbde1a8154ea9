//! `kura list [<source>] [--json]`

use clap::Args;
use serde::Serialize;

use super::Settings;
use crate::catalog::{self, BackupEntry};
use crate::error::Result;
use crate::progress::human_bytes;

#[derive(Debug, Args)]
pub struct Options {
    /// Only this source (default: every source of the tenant found in storage).
    pub source: Option<String>,
    /// Print one JSON object per backup and line (NDJSON) instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
pub struct Row {
    pub source: String,
    pub backup_id: String,
    pub status: &'static str,
    pub started_at: String,
    pub duration_seconds: Option<f64>,
    pub parts: Option<usize>,
    pub raw_bytes: Option<u64>,
    pub stored_bytes: u64,
    /// Whether the parts are age-encrypted (`None`: unknown, no manifest).
    pub encrypted: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

impl Row {
    fn new(source: &str, entry: &BackupEntry) -> Row {
        let manifest = entry.manifest.as_ref();
        Row {
            source: source.to_string(),
            backup_id: entry.id.to_string(),
            status: if manifest.is_some() {
                "complete"
            } else {
                "incomplete"
            },
            started_at: manifest
                .map(|m| m.started_at)
                .unwrap_or_else(|| entry.id.time())
                .format("%Y-%m-%dT%H:%M:%SZ")
                .to_string(),
            duration_seconds: manifest.map(|m| m.duration_seconds()),
            parts: manifest.map(|m| m.parts.len()),
            raw_bytes: manifest.map(|m| m.raw_bytes()),
            stored_bytes: manifest
                .map(|m| m.stored_bytes())
                .unwrap_or(entry.object_bytes),
            encrypted: manifest.map(|m| m.parts.iter().any(|p| p.encryption.is_some())),
            problem: entry.problem.clone(),
        }
    }
}

pub async fn run(settings: &Settings, options: &Options) -> Result<()> {
    let store = settings.open_store().await?;
    let sources: Vec<String> = match &options.source {
        Some(source) => {
            settings.check_source_known(store.as_ref(), source).await?;
            vec![source.clone()]
        }
        None => catalog::sources_of_tenant(store.as_ref(), &settings.tenant).await?,
    };
    let mut rows = Vec::new();
    for source in &sources {
        let path = settings.source_path(source)?;
        for entry in catalog::list_backups(store.as_ref(), &path).await? {
            rows.push(Row::new(source, &entry));
        }
    }
    rows.sort_by(|a, b| b.backup_id.cmp(&a.backup_id));
    if options.json {
        super::print_json_lines(&rows);
    } else {
        settings.print_human(&table(&rows));
        if rows.is_empty() {
            eprintln!(
                "no backups of tenant {:?} in {}",
                settings.tenant,
                store.location()
            );
        }
    }
    Ok(())
}

fn table(rows: &[Row]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.source.clone(),
                r.backup_id.clone(),
                r.status.to_string(),
                r.started_at
                    .replace('T', " ")
                    .trim_end_matches('Z')
                    .to_string(),
                r.duration_seconds
                    .map(|s| format!("{s:.1}s"))
                    .unwrap_or_else(|| "-".into()),
                r.parts.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                human_bytes(r.stored_bytes),
                match r.encrypted {
                    Some(true) => "age".into(),
                    Some(false) => "no".into(),
                    None => "-".into(),
                },
            ]
        })
        .collect();
    super::table::render(
        &[
            "SOURCE",
            "BACKUP ID",
            "STATUS",
            "STARTED (UTC)",
            "DURATION",
            "PARTS",
            "SIZE",
            "ENCRYPTED",
        ],
        &cells,
    )
}
