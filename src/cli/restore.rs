//! `kura restore <source> <backup-id|latest>`

use clap::Args;

use super::Settings;
use crate::catalog::{self};
use crate::config::SourceKind;
use crate::engine::couchdb::restore::CouchRestore;
use crate::engine::couchdb::Client as CouchClient;
use crate::engine::postgres::restore::PostgresRestore;
use crate::engine::postgres::Connection;
use crate::engine::{DatabaseMapping, RestoreContext};
use crate::error::{Error, Result};
use crate::progress::human_bytes;

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
    tracing::info!(
        source = %options.source,
        backup_id = %manifest.backup_id,
        target = %target_url.redacted(),
        "restoring backup {} of {} into {}",
        manifest.backup_id,
        options.source,
        target_url.redacted()
    );
    let ctx = RestoreContext {
        store: store.as_ref(),
        path,
        backup_id: manifest.id()?,
        cancel: settings.cancel.clone(),
        show_progress: settings.show_progress(),
    };
    match manifest.kind {
        SourceKind::Postgres => {
            let restore = PostgresRestore {
                target: Connection::new(target_url)?,
                databases: options
                    .databases
                    .iter()
                    .map(|d| DatabaseMapping::parse(d))
                    .collect(),
                tables: options.tables.clone(),
                globals: options.globals,
                force: options.force,
                bin_dir: settings.pg_bin_dir.clone(),
            };
            let summary = restore
                .run(&ctx, &manifest)
                .await
                .map_err(|e| advise_on_damage(e, &options.source))?;
            tracing::info!(
                backup_id = %manifest.backup_id,
                databases = summary.databases.len(),
                globals = summary.globals,
                raw_bytes = summary.raw_bytes,
                warnings = summary.warnings,
                "restore of {} complete: {} database(s), {}",
                manifest.backup_id,
                summary.databases.len(),
                human_bytes(summary.raw_bytes)
            );
            Ok(())
        }
        SourceKind::Couchdb => {
            if !options.tables.is_empty() || options.globals {
                return Err(Error::usage(
                    "--table and --globals apply to PostgreSQL backups only",
                ));
            }
            let restore = CouchRestore {
                target: std::sync::Arc::new(CouchClient::new(&target_url)?),
                databases: options
                    .databases
                    .iter()
                    .map(|d| DatabaseMapping::parse(d))
                    .collect(),
                force: options.force,
                batch_bytes: options.batch_bytes,
            };
            let summary = restore
                .run(&ctx, &manifest)
                .await
                .map_err(|e| advise_on_damage(e, &options.source))?;
            tracing::info!(
                backup_id = %manifest.backup_id,
                databases = summary.databases.len(),
                revisions = summary.revisions,
                raw_bytes = summary.raw_bytes,
                "restore of {} complete: {} database(s), {} revisions",
                manifest.backup_id,
                summary.databases.len(),
                summary.revisions
            );
            Ok(())
        }
    }
}

/// A damaged part cannot be retried into shape: the way forward is another backup.
fn advise_on_damage(err: Error, source: &str) -> Error {
    match err.kind() {
        crate::ErrorKind::Integrity => err.advise(format!(
            "restore from another backup (`kura list {source}`)"
        )),
        _ => err,
    }
}

fn parse_batch_bytes(text: &str) -> std::result::Result<usize, String> {
    crate::config::parse_size(text)
        .map(|n| n as usize)
        .map_err(|e| e.to_string())
}
