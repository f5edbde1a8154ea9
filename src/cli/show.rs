//! `kura show <source> <backup-id|latest>`

use clap::Args;

use super::Settings;
use crate::catalog;
use crate::error::Result;
use crate::progress::human_bytes;

#[derive(Debug, Args)]
pub struct Options {
    /// The source the backup was taken from (a name from the config, or `postgres`/`couchdb`).
    pub source: String,
    /// A backup id from `kura list`, or `latest`.
    pub backup: String,
    /// Print the manifest as stored, on one line (JSON).
    #[arg(long)]
    pub json: bool,
}

pub async fn run(settings: &Settings, options: &Options) -> Result<()> {
    let store = settings.open_store().await?;
    settings
        .check_source_known(store.as_ref(), &options.source)
        .await?;
    let path = settings.source_path(&options.source)?;
    let manifest = catalog::resolve(store.as_ref(), &path, &options.backup).await?;
    if options.json {
        super::print_json_lines([&manifest]);
    } else {
        settings.print_human(&describe(&manifest));
    }
    Ok(())
}

fn describe(manifest: &crate::catalog::Manifest) -> String {
    let mut out = String::new();
    let mut line = |text: String| {
        out.push_str(&text);
        out.push('\n');
    };
    line(format!("backup      {}", manifest.backup_id));
    line(format!(
        "source      {}/{} ({})",
        manifest.tenant, manifest.source, manifest.kind
    ));
    line(format!("server      {}", manifest.server_version));
    line(format!("tool        {}", manifest.tool_version));
    line(format!(
        "started     {}",
        manifest.started_at.format("%Y-%m-%d %H:%M:%S UTC")
    ));
    line(format!(
        "finished    {} ({:.1}s)",
        manifest.finished_at.format("%Y-%m-%d %H:%M:%S UTC"),
        manifest.duration_seconds()
    ));
    line(format!(
        "size        {} raw, {} stored (zstd)",
        human_bytes(manifest.raw_bytes()),
        human_bytes(manifest.stored_bytes())
    ));
    let mut recipients: Vec<&str> = manifest
        .parts
        .iter()
        .filter_map(|p| p.encryption.as_ref())
        .flat_map(|e| e.recipients.iter().map(String::as_str))
        .collect();
    recipients.sort();
    recipients.dedup();
    line(match recipients.is_empty() {
        true => "encrypted   no".to_string(),
        false => format!("encrypted   age, to {}", recipients.join(", ")),
    });
    if !manifest.exclusions.tables.is_empty() {
        line(format!(
            "left out    tables {} (--exclude-table)",
            manifest.exclusions.tables.join(", ")
        ));
    }
    if !manifest.exclusions.table_data.is_empty() {
        line(format!(
            "no rows of  {} (--exclude-table-data: restored empty)",
            manifest.exclusions.table_data.join(", ")
        ));
    }
    line(format!(
        "kura        {} (manifest format {})",
        manifest.kura_version, manifest.format_version
    ));
    line(String::new());
    line("parts:".into());
    for part in &manifest.parts {
        line(format!(
            "  {:<28} {:<28} {:>10} → {:>10}  sha256 {}",
            part.key,
            format!("{:?}", part.name),
            human_bytes(part.raw_bytes),
            human_bytes(part.stored_bytes),
            part.sha256.get(..16).unwrap_or(&part.sha256)
        ));
        if let Some(summary) = crate::engine::describe_part(manifest.kind, part) {
            line(format!("  {:<28} {summary}", ""));
        }
    }
    out
}
