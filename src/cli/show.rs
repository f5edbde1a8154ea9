//! `kura show <source> <backup-id|latest>`

use clap::Args;

use super::Settings;
use crate::catalog;
use crate::error::Result;
use crate::progress::human_bytes;

#[derive(Debug, Args)]
pub struct Options {
    pub source: String,
    /// A backup id from `kura list`, or `latest`.
    pub backup: String,
    /// Print the manifest as stored (JSON).
    #[arg(long)]
    pub json: bool,
}

pub async fn run(settings: &Settings, options: &Options) -> Result<()> {
    let store = settings.open_store().await?;
    let path = settings.source_path(&options.source)?;
    let manifest = catalog::resolve(store.as_ref(), &path, &options.backup).await?;
    if options.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&manifest).expect("manifest serializes")
        );
        return Ok(());
    }
    println!("backup      {}", manifest.backup_id);
    println!(
        "source      {}/{} ({})",
        manifest.tenant, manifest.source, manifest.kind
    );
    println!("server      {}", manifest.server_version);
    println!("tool        {}", manifest.tool_version);
    println!(
        "started     {}",
        manifest.started_at.format("%Y-%m-%d %H:%M:%S UTC")
    );
    println!(
        "finished    {} ({:.1}s)",
        manifest.finished_at.format("%Y-%m-%d %H:%M:%S UTC"),
        manifest.duration_seconds()
    );
    println!(
        "size        {} raw, {} stored (zstd)",
        human_bytes(manifest.raw_bytes()),
        human_bytes(manifest.stored_bytes())
    );
    println!(
        "kura        {} (manifest format {})",
        manifest.kura_version, manifest.format_version
    );
    println!();
    println!("parts:");
    for part in &manifest.parts {
        println!(
            "  {:<22} {:<28} {:>10} → {:>10}  sha256 {}",
            part.key,
            format!("{:?}", part.name),
            human_bytes(part.raw_bytes),
            human_bytes(part.stored_bytes),
            &part.sha256[..16.min(part.sha256.len())]
        );
        if let Some(summary) = contents(part) {
            println!("  {:<22} {summary}", "");
        }
    }
    Ok(())
}

/// What a part held, from the counts recorded at backup time.
fn contents(part: &crate::catalog::Part) -> Option<String> {
    let counts = part.counts.as_ref()?;
    if let Some(documents) = counts.get("documents") {
        let deleted = counts.get("deleted_documents").copied().unwrap_or(0);
        return Some(format!("{documents} documents, {deleted} deleted"));
    }
    let rows: u64 = counts.values().sum();
    Some(format!("{} tables, {rows} rows", counts.len()))
}
