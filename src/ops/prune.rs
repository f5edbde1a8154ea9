//! Prune one source: lock, plan with reasons, delete (manifest first), report.

use chrono::{DateTime, Utc};

use crate::catalog::lock::Lock;
use crate::catalog::prune::{self, Plan};
use crate::catalog::SourcePath;
use crate::error::{Error, Result};
use crate::progress::human_bytes;
use crate::retention::Policy;
use crate::storage::ObjectStore;

/// Prune one source under its lock; with `dry_run`, only the plan, no lock and no delete.
pub async fn prune_source(
    store: std::sync::Arc<dyn ObjectStore>,
    path: &SourcePath,
    policy: &Policy,
    grace: std::time::Duration,
    now: DateTime<Utc>,
    dry_run: bool,
) -> Result<Pruned> {
    if dry_run {
        let plan = prune::plan(store.as_ref(), path, policy, grace, now).await?;
        return Ok(Pruned {
            deleted: 0,
            kept: plan.backups.iter().filter(|b| b.action == "keep").count(),
            plan,
        });
    }
    let lock = Lock::acquire(store.clone(), path, "prune").await?;
    let result = prune_locked(store.as_ref(), path, policy, grace, now).await;
    lock.release(store.as_ref()).await;
    result
}

/// A prune's plan and what it did: backups deleted, and kept (by the policy, or because the
/// store refused to delete them).
pub struct Pruned {
    pub plan: Plan,
    pub deleted: usize,
    pub kept: usize,
}

/// Plan and delete for one source; the caller holds its lock.
pub async fn prune_locked(
    store: &dyn ObjectStore,
    path: &SourcePath,
    policy: &Policy,
    grace: std::time::Duration,
    now: DateTime<Utc>,
) -> Result<Pruned> {
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
    let refused_backups =
        plan.to_delete().count() - outcome.deleted_backups.len().min(plan.to_delete().count());
    let kept = plan.backups.iter().filter(|b| b.action == "keep").count() + refused_backups;
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
    Ok(Pruned {
        deleted: outcome.deleted_backups.len(),
        kept,
        plan,
    })
}
