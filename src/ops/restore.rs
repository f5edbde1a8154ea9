//! Restore a backup through its engine: the engine decides what "holds data" means and how
//! to hold back the commit; this says what to do when the backup itself is damaged.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::catalog::{Manifest, SourcePath};
use crate::engine::{Engine, RestoreContext, RestoreRequest, RestoreSummary};
use crate::error::{Error, ErrorKind, Result};
use crate::pipeline::encryption::{self, Identities};
use crate::progress::human_bytes;
use crate::storage::ObjectStore;

/// One restore, as the command line asked for it.
pub struct RestoreJob<'a> {
    pub store: &'a dyn ObjectStore,
    pub path: &'a SourcePath,
    pub manifest: &'a Manifest,
    pub engine: &'a dyn Engine,
    pub request: &'a RestoreRequest,
    /// Keys for an encrypted backup.
    pub identities: Option<Arc<Identities>>,
    pub cancel: &'a CancellationToken,
    pub show_progress: bool,
    pub jobs: usize,
}

pub async fn restore(job: RestoreJob<'_>) -> Result<RestoreSummary> {
    let RestoreJob {
        store,
        path,
        manifest,
        engine,
        request,
        identities,
        cancel,
        show_progress,
        jobs,
    } = job;
    // Before anything is created on the target: the keys open every part (all of them, the
    // parts a selection skips included, so a wrong key is found at once, not halfway).
    encryption::check_can_read(&manifest.backup_id, &manifest.parts, identities.as_deref())?;
    tracing::info!(
        source = %path.source,
        backup_id = %manifest.backup_id,
        target = %engine.target(),
        "restoring backup {} of {} into {}",
        manifest.backup_id,
        path.source,
        engine.target()
    );
    let ctx = RestoreContext {
        store,
        path: path.clone(),
        backup_id: manifest.id()?,
        cancel: cancel.clone(),
        show_progress,
        identities,
        jobs,
    };
    let summary = engine
        .restore(&ctx, manifest, request)
        .await
        .map_err(|e| advise_on_damage(e, &path.source))?;
    let detail: Vec<String> = summary
        .detail
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(what, n)| format!("{n} {what}"))
        .collect();
    tracing::info!(
        backup_id = %manifest.backup_id,
        databases = summary.databases.len(),
        raw_bytes = summary.raw_bytes,
        "restore of {} complete: {} database(s), {}{}",
        manifest.backup_id,
        summary.databases.len(),
        human_bytes(summary.raw_bytes),
        match detail.is_empty() {
            true => String::new(),
            false => format!(" ({})", detail.join(", ")),
        }
    );
    Ok(summary)
}

/// A damaged part cannot be retried into shape: the way forward is another backup.
fn advise_on_damage(err: Error, source: &str) -> Error {
    match err.kind() {
        ErrorKind::Integrity => err.advise(format!(
            "restore from another backup (`kura list {source}`)"
        )),
        _ => err,
    }
}
