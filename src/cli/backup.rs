//! `kura backup <source>...`

use std::time::Instant;

use chrono::Utc;
use clap::Args;

use super::{RetentionArgs, Settings};
use crate::catalog::lock::Lock;
use crate::catalog::{self, BackupId, Manifest, SourcePath, MANIFEST_FORMAT, MANIFEST_VERSION};
use crate::config::SourceKind;
use crate::engine::couchdb::backup::CouchBackup;
use crate::engine::couchdb::Client as CouchClient;
use crate::engine::postgres::backup::{BackupOutcome, PostgresBackup};
use crate::engine::postgres::Connection;
use crate::engine::{BackupContext, Selection};
use crate::error::{Error, Result};
use crate::progress::human_bytes;
use crate::retention::Policy;
use crate::storage::ObjectStore;

#[derive(Debug, Args)]
pub struct Options {
    /// Sources to back up: names from the config file, or `postgres` for --postgres-url.
    #[arg(required = true)]
    pub sources: Vec<String>,
    /// Back up only this database (repeatable). Default: every database but PostgreSQL
    /// templates and CouchDB system databases (`_users`, `_replicator`: name them to include).
    #[arg(long = "database", value_name = "NAME")]
    pub databases: Vec<String>,
    /// Skip this database (repeatable).
    #[arg(long = "exclude-database", value_name = "NAME")]
    pub exclude_databases: Vec<String>,
    /// After each successful backup, prune that source with the retention policy.
    #[arg(long)]
    pub prune: bool,
    #[command(flatten)]
    pub retention: RetentionArgs,
}

/// An engine with the plan its preflight produced. One exists per source and run, so the
/// size difference between the variants costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
enum Planned {
    Postgres(PostgresBackup, crate::engine::postgres::backup::Plan),
    Couchdb(CouchBackup, crate::engine::couchdb::backup::Plan),
}

pub async fn run(settings: &Settings, options: &Options) -> Result<()> {
    // A missing retention policy is a configuration error: report it before dumping anything.
    let prune = match options.prune {
        true => Some(options.retention.resolve(&settings.retention)?),
        false => None,
    };
    let store = settings.open_store_for_writing().await?;
    let mut first_error = None;
    // Each source is independent: one unreachable server must not cost the others their backup.
    for name in &options.sources {
        let locked = async {
            let path = settings.source_path(name)?;
            // Preflight before the lock: a typo or a wrong password must not touch storage.
            let planned = plan_source(settings, options, name).await?;
            let lock = Lock::acquire(store.clone(), &path, "backup").await?;
            let result =
                backup_then_prune(settings, store.as_ref(), name, planned, prune.as_ref()).await;
            lock.release(store.as_ref()).await;
            result
        };
        if let Err(err) = locked.await {
            if options.sources.len() > 1 {
                tracing::error!(source = %name, error_kind = err.kind().as_str(), "{}", err.chain());
            }
            first_error.get_or_insert(err.context(format!("backup of source {name:?} failed")));
            if settings.cancel.is_cancelled() {
                break;
            }
        }
    }
    match first_error {
        Some(err) => Err(err),
        None => Ok(()),
    }
}

async fn backup_then_prune(
    settings: &Settings,
    store: &dyn ObjectStore,
    name: &str,
    planned: Planned,
    prune: Option<&(Policy, std::time::Duration)>,
) -> Result<()> {
    backup_source(settings, store, name, planned).await?;
    if let Some((policy, grace)) = prune {
        let path = settings.source_path(name)?;
        super::prune::prune_locked(store, &path, policy, *grace, Utc::now())
            .await
            .map_err(|e| {
                e.context(format!(
                    "the backup of {name:?} succeeded, but pruning failed"
                ))
            })?;
    }
    Ok(())
}

/// Everything that can be checked before an upload starts: the server answers, the
/// credentials work, the tools fit, the selection exists.
async fn plan_source(settings: &Settings, options: &Options, name: &str) -> Result<Planned> {
    let source = settings.source(name)?;
    let selection = Selection {
        include: options.databases.clone(),
        exclude: options.exclude_databases.clone(),
    };
    Ok(match source.kind {
        SourceKind::Postgres => {
            let engine = PostgresBackup {
                connection: Connection::new(source.url.clone())?,
                selection,
                bin_dir: settings.pg_bin_dir.clone(),
            };
            let plan = engine.plan().await?;
            Planned::Postgres(engine, plan)
        }
        SourceKind::Couchdb => {
            let engine = CouchBackup {
                client: std::sync::Arc::new(CouchClient::new(&source.url)?),
                selection,
            };
            let plan = engine.plan().await?;
            Planned::Couchdb(engine, plan)
        }
    })
}

async fn backup_source(
    settings: &Settings,
    store: &dyn ObjectStore,
    name: &str,
    planned: Planned,
) -> Result<()> {
    let source = settings.source(name)?;
    let path = settings.source_path(name)?;
    let databases = match &planned {
        Planned::Postgres(_, plan) => plan.databases.len(),
        Planned::Couchdb(_, plan) => plan.databases.len(),
    };
    let started_at = Utc::now();
    let clock = Instant::now();
    let id = BackupId::new(started_at);
    tracing::info!(
        source = name,
        backup_id = %id,
        databases,
        storage = %store.location(),
        "backup {id} of {name} started"
    );
    let ctx = BackupContext {
        store,
        path: path.clone(),
        pipeline: settings.pipeline.clone(),
        cancel: settings.cancel.clone(),
        show_progress: settings.show_progress(),
    };
    let ran = match planned {
        Planned::Postgres(engine, plan) => engine.run(&ctx, &id, plan).await,
        Planned::Couchdb(engine, plan) => {
            engine
                .run(&ctx, &id, plan)
                .await
                .map(|outcome| BackupOutcome {
                    server_version: outcome.server_version,
                    tool_version: format!("kura {} (CouchDB HTTP API)", env!("CARGO_PKG_VERSION")),
                    parts: outcome.parts,
                })
        }
    };
    let outcome = match ran {
        Ok(outcome) if !settings.cancel.is_cancelled() => outcome,
        Ok(_) => {
            discard(store, &path, &id).await;
            return Err(Error::interrupted());
        }
        Err(err) => {
            discard(store, &path, &id).await;
            return Err(err.or_interrupted(&settings.cancel));
        }
    };
    let manifest = Manifest {
        format: MANIFEST_FORMAT.to_string(),
        format_version: MANIFEST_VERSION,
        kura_version: env!("CARGO_PKG_VERSION").to_string(),
        backup_id: id.to_string(),
        tenant: path.tenant.clone(),
        source: name.to_string(),
        kind: source.kind,
        server_version: outcome.server_version,
        tool_version: outcome.tool_version,
        started_at,
        finished_at: Utc::now(),
        parts: outcome.parts,
        labels: [(
            "host".to_string(),
            std::env::var("HOSTNAME").unwrap_or_default(),
        )]
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .collect(),
    };
    // The commit point: before this line the backup does not exist for list/restore/prune.
    if let Err(err) = catalog::write_manifest(store, &path, &manifest).await {
        discard(store, &path, &id).await;
        return Err(err.context(format!("committing backup {id}")));
    }
    tracing::info!(
        source = name,
        backup_id = %id,
        parts = manifest.parts.len(),
        raw_bytes = manifest.raw_bytes(),
        stored_bytes = manifest.stored_bytes(),
        seconds = clock.elapsed().as_secs_f64(),
        "backup {id} of {name} complete: {} parts, {} → {} in {:.1}s",
        manifest.parts.len(),
        human_bytes(manifest.raw_bytes()),
        human_bytes(manifest.stored_bytes()),
        clock.elapsed().as_secs_f64()
    );
    if settings.log_format == crate::logging::LogFormat::Text {
        println!("{id}");
    }
    Ok(())
}

/// Remove what a failed backup uploaded. It has no manifest, so it is invisible to every
/// command either way; this only saves the space before prune's grace period would.
async fn discard(store: &dyn ObjectStore, path: &SourcePath, id: &BackupId) {
    let prefix = path.backup_prefix(id);
    let keys = match store.list(&prefix).await {
        Ok(objects) => objects.into_iter().map(|o| o.key).collect::<Vec<_>>(),
        Err(e) => {
            tracing::warn!(error = %e.chain(), "could not list the parts of the failed backup; prune will remove them");
            return;
        }
    };
    if let Err(e) = store
        .delete(&keys)
        .await
        .and_then(|refused| match refused.first() {
            None => Ok(()),
            Some(r) => Err(Error::new(
                crate::ErrorKind::Storage,
                format!("the store refused to delete {}: {}", r.key, r.reason),
            )),
        })
    {
        tracing::warn!(error = %e.chain(), "could not delete the parts of the failed backup; prune will remove them");
    }
    if let Ok(uploads) = store.list_uploads(&prefix).await {
        for upload in uploads {
            let _ = store.abort_upload(&upload).await;
        }
    }
}
