//! Applying the retention policy to one tenant's source in storage.
//!
//! Everything listed and deleted is under `<tenant>/<source>/`: nothing outside that prefix is
//! read or touched. A backup is deleted manifest first, so an interrupted prune leaves an
//! incomplete backup (which the next prune removes), never a complete-looking one with parts
//! missing.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::{list_backups, SourcePath, MANIFEST_NAME};
use crate::error::Result;
use crate::retention::{self, Candidate, Policy};
use crate::storage::{ObjectStore, PendingUpload, Refused};

/// The decisions for one source, before anything is deleted.
#[derive(Debug, Serialize)]
pub struct Plan {
    pub tenant: String,
    pub source: String,
    pub now: DateTime<Utc>,
    pub backups: Vec<PlannedBackup>,
    /// Unfinished multipart uploads older than the grace period.
    pub stale_uploads: Vec<StaleUpload>,
}

#[derive(Debug, Serialize)]
pub struct PlannedBackup {
    pub backup_id: String,
    pub complete: bool,
    pub action: &'static str,
    pub reasons: Vec<String>,
    pub bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct StaleUpload {
    pub key: String,
    pub initiated: Option<DateTime<Utc>>,
    #[serde(skip)]
    pub upload: PendingUpload,
}

impl Plan {
    pub fn to_delete(&self) -> impl Iterator<Item = &PlannedBackup> {
        self.backups.iter().filter(|b| b.action == "delete")
    }
}

/// What [`execute`] did.
#[derive(Debug, Default, Serialize)]
pub struct Outcome {
    pub deleted_backups: Vec<String>,
    pub deleted_bytes: u64,
    pub aborted_uploads: usize,
    /// Objects the store refused to delete (object lock, retention): reported, not fatal.
    pub refused: Vec<RefusedObject>,
}

#[derive(Debug, Serialize)]
pub struct RefusedObject {
    pub key: String,
    pub reason: String,
}

pub async fn plan(
    store: &dyn ObjectStore,
    path: &SourcePath,
    policy: &Policy,
    grace: Duration,
    now: DateTime<Utc>,
) -> Result<Plan> {
    policy.validate()?;
    let entries = list_backups(store, path).await?;
    let candidates: Vec<Candidate> = entries
        .iter()
        .map(|e| Candidate {
            id: e.id.to_string(),
            time: e.id.time(),
            complete: e.is_complete(),
            last_activity: e.last_modified,
            unreadable: match (e.has_manifest, e.is_complete()) {
                (true, false) => Some(e.problem.clone().unwrap_or_default()),
                _ => None,
            },
        })
        .collect();
    let decisions = retention::apply(&candidates, policy, grace, now);
    let backups = decisions
        .into_iter()
        .map(|d| {
            let entry = entries.iter().find(|e| e.id.as_str() == d.id);
            PlannedBackup {
                complete: entry.is_some_and(|e| e.is_complete()),
                bytes: entry.map_or(0, |e| e.object_bytes),
                action: d.action(),
                reasons: d.reasons,
                backup_id: d.id,
            }
        })
        .collect();
    let grace_cutoff = retention::before(now, grace);
    let stale_uploads = store
        .list_uploads(&path.prefix())
        .await?
        .into_iter()
        // A store that does not say when an upload started gets the benefit of the doubt
        // only while its backup id is younger than the grace.
        .filter(|u| {
            let started = u.initiated.or_else(|| backup_time_of(path, &u.key));
            started.is_some_and(|t| t < grace_cutoff)
        })
        .map(|upload| StaleUpload {
            key: upload.key.clone(),
            initiated: upload.initiated,
            upload,
        })
        .collect();
    Ok(Plan {
        tenant: path.tenant.clone(),
        source: path.source.clone(),
        now,
        backups,
        stale_uploads,
    })
}

fn backup_time_of(path: &SourcePath, key: &str) -> Option<DateTime<Utc>> {
    let rest = key.strip_prefix(&path.prefix())?;
    let (id, _) = rest.split_once('/')?;
    super::BackupId::parse(id).ok().map(|id| id.time())
}

/// Delete what the plan says. A refusal (object lock) is recorded and the rest goes on.
pub async fn execute(store: &dyn ObjectStore, path: &SourcePath, plan: &Plan) -> Result<Outcome> {
    let mut outcome = Outcome::default();
    for upload in &plan.stale_uploads {
        store.abort_upload(&upload.upload).await?;
        outcome.aborted_uploads += 1;
    }
    for backup in plan.to_delete() {
        let prefix = format!("{}{}/", path.prefix(), backup.backup_id);
        let keys: Vec<String> = store
            .list(&prefix)
            .await?
            .into_iter()
            .map(|o| o.key)
            .collect();
        let manifest = format!("{prefix}{MANIFEST_NAME}");
        // The manifest goes first: from then on the backup is incomplete, never half-deleted
        // but complete-looking. If the store refuses it, the backup stays whole.
        if keys.contains(&manifest) {
            let refused = store.delete(std::slice::from_ref(&manifest)).await?;
            if !refused.is_empty() {
                record(&mut outcome, refused);
                continue;
            }
        }
        let parts: Vec<String> = keys.into_iter().filter(|k| *k != manifest).collect();
        let refused = store.delete(&parts).await?;
        let partial = !refused.is_empty();
        record(&mut outcome, refused);
        if !partial {
            outcome.deleted_backups.push(backup.backup_id.clone());
            outcome.deleted_bytes += backup.bytes;
        }
    }
    Ok(outcome)
}

fn record(outcome: &mut Outcome, refused: Vec<Refused>) {
    for r in refused {
        tracing::warn!(object = %r.key, reason = %r.reason, "the store refused to delete an object (object lock or retention?); it stays");
        outcome.refused.push(RefusedObject {
            key: r.key,
            reason: r.reason,
        });
    }
}
