//! `kura restore <source> <backup-id|latest>`

use clap::Args;

use super::Settings;
use crate::catalog;
use crate::engine::{self, DatabaseMapping, RestoreRequest};
use crate::error::Result;
use crate::ops;

// No Debug: `to` may hold a password.
#[derive(Args)]
pub struct Options {
    /// The source the backup was taken from.
    pub source: String,
    /// A backup id from `kura list`, or `latest` for the newest complete backup.
    pub backup: String,
    /// Restore into this server instead of the source's (URL like the source's).
    #[arg(
        long,
        value_name = "URL",
        env = "KURA_RESTORE_TO",
        hide_env_values = true
    )]
    pub to: Option<String>,
    /// Restore only this database, optionally under another name (repeatable).
    #[arg(long = "database", value_name = "SRC[:DST]")]
    pub databases: Vec<String>,
    /// Restore only this table of the one --database (repeatable). PostgreSQL only.
    #[arg(long = "table", value_name = "SCHEMA.TABLE")]
    pub tables: Vec<String>,
    /// Also restore roles and tablespaces (PostgreSQL), before the databases.
    #[arg(long)]
    pub globals: bool,
    /// Restore into databases that already hold data: PostgreSQL replaces the objects in the
    /// backup; CouchDB adds only the revisions that are missing.
    #[arg(long)]
    pub force: bool,
    /// PostgreSQL, with --force: restore an existing database beside it, through a scratch
    /// database, and swap the two in one transaction; then drop the old one. Refused while
    /// other sessions use it, unless --terminate-sessions.
    #[arg(long, requires = "force")]
    pub swap: bool,
    /// With --swap: end the other sessions of the database being replaced.
    #[arg(long, requires = "swap")]
    pub terminate_sessions: bool,
    /// CouchDB: upper bound of one _bulk_docs request, e.g. 4MiB (some proxies cap bodies).
    #[arg(long, value_name = "SIZE", default_value = "4MiB", value_parser = parse_batch_bytes)]
    pub batch_bytes: usize,
}

pub async fn run(settings: &Settings, options: &Options) -> Result<()> {
    let path = settings.source_path(&options.source)?;
    let store = settings.open_store().await?;
    settings
        .check_source_known(store.as_ref(), &options.source)
        .await?;
    let manifest = catalog::resolve(store.as_ref(), &path, &options.backup).await?;
    let target_url = match &options.to {
        Some(raw) => super::target_url(raw, &options.source)?,
        None => settings
            .source(&options.source)
            .map_err(|e| e.context("no --to given, so the source's own URL is needed"))?
            .url
            .clone(),
    };
    let engine = engine::connect(manifest.kind, target_url, &settings.engine_options())?;
    let request = RestoreRequest {
        databases: options
            .databases
            .iter()
            .map(|d| DatabaseMapping::parse(d))
            .collect(),
        tables: options.tables.clone(),
        globals: options.globals,
        force: options.force,
        swap: options.swap,
        terminate_sessions: options.terminate_sessions,
        batch_bytes: options.batch_bytes,
    };
    let began = std::time::Instant::now();
    ops::restore::restore(ops::restore::RestoreJob {
        store: store.as_ref(),
        path: &path,
        manifest: &manifest,
        engine: engine.as_ref(),
        request: &request,
        identities: settings.identities()?,
        cancel: &settings.cancel,
        show_progress: settings.show_progress(),
        jobs: settings.jobs,
    })
    .await?;
    settings.run_log.record(
        &options.source,
        began.elapsed(),
        Ok(crate::observe::Done::Restore {
            backup_id: manifest.backup_id.clone(),
        }),
    );
    Ok(())
}

fn parse_batch_bytes(text: &str) -> std::result::Result<usize, String> {
    crate::config::parse_size(text)
        .map(|n| n as usize)
        .map_err(|e| e.to_string())
}
