//! Back up one source: preflight, lock, parts, the manifest last, then (optionally) prune.
//! The commit rule lives here, once, for every engine.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use crate::catalog::lock::Lock;
use crate::catalog::{self, BackupId, Manifest, SourcePath, MANIFEST_FORMAT};
use crate::config::SourceKind;
use crate::engine::{BackupContext, BackupPlan, Engine, Selection};
use crate::error::{Error, Result};
use crate::pipeline::PipelineOptions;
use crate::progress::human_bytes;
use crate::retention::Policy;
use crate::storage::ObjectStore;

/// One source's backup, as the command line asked for it.
pub struct BackupJob<'a> {
    pub store: Arc<dyn ObjectStore>,
    pub path: SourcePath,
    pub kind: SourceKind,
    pub engine: &'a dyn Engine,
    pub selection: Selection,
    pub pipeline: PipelineOptions,
    pub cancel: CancellationToken,
    pub show_progress: bool,
    pub jobs: usize,
    /// Prune the source with this policy and grace after the backup committed.
    pub prune: Option<(Policy, Duration)>,
}

/// Preflight first (a wrong password or a typo touches no storage), then the source's lock,
/// the backup and the prune. Returns the committed manifest.
pub async fn backup_source(job: &BackupJob<'_>) -> Result<Manifest> {
    let plan = job.engine.plan_backup(&job.selection).await?;
    let lock = Lock::acquire(job.store.clone(), &job.path, "backup").await?;
    let result = async {
        let manifest = commit_backup(job, plan).await?;
        if let Some((policy, grace)) = &job.prune {
            super::prune::prune_locked(job.store.as_ref(), &job.path, policy, *grace, Utc::now())
                .await
                .map_err(|e| {
                    e.context(format!(
                        "the backup of {:?} succeeded, but pruning failed",
                        job.path.source
                    ))
                })?;
        }
        Ok(manifest)
    }
    .await;
    lock.release(job.store.as_ref()).await;
    result
}

/// Run the plan and write the manifest last; on any failure, remove what was stored.
async fn commit_backup(job: &BackupJob<'_>, plan: Box<dyn BackupPlan>) -> Result<Manifest> {
    let store = job.store.as_ref();
    let path = &job.path;
    let name = &path.source;
    let started_at = Utc::now();
    let clock = Instant::now();
    let id = BackupId::new(started_at);
    tracing::info!(
        source = %name,
        backup_id = %id,
        databases = plan.databases(),
        storage = %store.location(),
        "backup {id} of {name} started"
    );
    let ctx = BackupContext {
        store,
        path: path.clone(),
        pipeline: job.pipeline.clone(),
        cancel: job.cancel.clone(),
        show_progress: job.show_progress,
        jobs: job.jobs,
    };
    let outcome = match plan.run(&ctx, &id).await {
        Ok(outcome) if !job.cancel.is_cancelled() => outcome,
        Ok(_) => {
            discard(store, path, &id).await;
            return Err(Error::interrupted());
        }
        Err(err) => {
            discard(store, path, &id).await;
            return Err(err.or_interrupted(&job.cancel));
        }
    };
    let manifest = Manifest {
        format: MANIFEST_FORMAT.to_string(),
        format_version: outcome.format_version,
        kura_version: env!("CARGO_PKG_VERSION").to_string(),
        backup_id: id.to_string(),
        tenant: path.tenant.clone(),
        source: name.to_string(),
        kind: job.kind,
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
        exclusions: crate::catalog::Exclusions {
            tables: job.selection.exclude_tables.clone(),
            table_data: job.selection.exclude_table_data.clone(),
        },
    };
    // The commit point: before this line the backup does not exist for list/restore/prune.
    if let Err(err) = catalog::write_manifest(store, path, &manifest).await {
        discard(store, path, &id).await;
        return Err(err.context(format!("committing backup {id}")));
    }
    tracing::info!(
        source = %name,
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
    Ok(manifest)
}

/// Remove what a failed backup uploaded. It has no manifest, so it is invisible to every
/// command either way; this only saves the space before prune's grace period would.
async fn discard(store: &dyn ObjectStore, path: &SourcePath, id: &BackupId) {
    let prefix = path.backup_prefix(id);
    let mut keys = match store.list(&prefix).await {
        Ok(objects) => objects.into_iter().map(|o| o.key).collect::<Vec<_>>(),
        Err(e) => {
            tracing::warn!(error = %e.chain(), "could not list the parts of the failed backup; prune will remove them");
            return;
        }
    };
    // A manifest that landed although its PUT reported failure goes first, alone, as prune
    // does: a partial delete must never leave a complete-looking backup with parts missing.
    let manifest = path.manifest_key(id);
    if keys.contains(&manifest) {
        match store.delete(std::slice::from_ref(&manifest)).await {
            Ok(refused) if refused.is_empty() => keys.retain(|k| *k != manifest),
            _ => {
                tracing::error!(manifest = %manifest, "could not delete the manifest of a failed backup: delete it by hand, or the backup looks complete");
                return;
            }
        }
    }
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
