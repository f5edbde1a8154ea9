//! Verify a backup: every part's size, SHA-256 and zstd stream; with an engine (`--deep`),
//! each database restored into a scratch database, counted against what the backup
//! recorded, and removed again.

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::catalog::{self, Manifest, Part, SourcePath};
use crate::engine::{Engine, RestoreContext};
use crate::error::{Error, ErrorKind, Result};
use crate::pipeline;
use crate::pipeline::encryption::{self, Identities};
use crate::progress::{human_bytes, Progress, ProgressLine};
use crate::storage::ObjectStore;

pub struct VerifyJob<'a> {
    pub store: &'a dyn ObjectStore,
    pub path: SourcePath,
    pub manifest: &'a Manifest,
    /// The server for `--deep`'s scratch databases; `None` checks the parts only.
    pub deep: Option<&'a dyn Engine>,
    pub cancel: CancellationToken,
    pub show_progress: bool,
    /// Scratch restores of `--deep` at the same time.
    pub jobs: usize,
    /// Keys for encrypted parts. Without them encrypted parts are checked by size and
    /// SHA-256 only; `--deep` needs them.
    pub identities: Option<Arc<Identities>>,
}

pub async fn verify(job: &VerifyJob<'_>) -> Result<()> {
    match verify_manifest(job, job.manifest).await? {
        None => Ok(()),
        // `reencrypt` replaced the parts while this read the old ones: verify what is there now.
        Some(current) => match verify_manifest(job, &current).await? {
            None => Ok(()),
            Some(_) => Err(Error::failed(format!(
                "backup {} changed twice while it was being verified (reencrypt running?): verify it again",
                job.manifest.backup_id
            ))),
        },
    }
}

/// Verify `manifest`'s parts; `Some(current)` when a part went missing because the backup's
/// manifest was replaced meanwhile.
async fn verify_manifest(job: &VerifyJob<'_>, manifest: &Manifest) -> Result<Option<Manifest>> {
    let VerifyJob { store, path, .. } = job;
    let source = &path.source;
    tracing::info!(
        source = %source,
        backup_id = %manifest.backup_id,
        parts = manifest.parts.len(),
        "verifying backup {} of {}: {} parts, {}",
        manifest.backup_id,
        source,
        manifest.parts.len(),
        human_bytes(manifest.stored_bytes())
    );

    if job.deep.is_some() {
        encryption::check_can_read(
            &manifest.backup_id,
            &manifest.parts,
            job.identities.as_deref(),
        )?;
    }
    let mut bad = Vec::new();
    let line = ProgressLine::start(
        "verifying",
        job.show_progress,
        Some(manifest.stored_bytes()),
    );
    for part in &manifest.parts {
        let key = path.object_key(&manifest.id()?, &part.key);
        line.progress().set_label(&part.name);
        let unseal = match (&part.encryption, &job.identities) {
            (None, _) => Some(None),
            (Some(e), Some(ids)) if ids.opens(&e.recipients) => Some(Some(Arc::clone(ids))),
            // No key that opens it: what can be checked without one is checked.
            (Some(_), _) => None,
        };
        let checked = match unseal {
            Some(unseal) => check_part(&job.cancel, *store, &key, part, unseal, line.progress())
                .await
                .map(Some),
            None => pipeline::check_stored(*store, &key, &part.digest(), &job.cancel)
                .await
                .map(|_| None),
        };
        if checked
            .as_ref()
            .is_err_and(|e| e.kind() == ErrorKind::NotFound)
        {
            let current = catalog::load_manifest(*store, path, &manifest.id()?).await;
            if let Ok(current) = current {
                if current != *manifest {
                    tracing::info!(backup_id = %manifest.backup_id, "the backup was re-encrypted while being verified; verifying its new parts");
                    return Ok(Some(current));
                }
            }
        }
        let checked = checked.map_err(|e| missing_part(e, &key));
        match checked {
            Ok(None) => tracing::info!(
                part = %part.key,
                name = %part.name,
                stored_bytes = part.stored_bytes,
                "part {} ({}) is intact: {} stored, SHA-256 matches (encrypted; {})",
                part.key,
                part.name,
                human_bytes(part.stored_bytes),
                match &job.identities {
                    None => "pass --identity to also decrypt and decompress it",
                    Some(_) => "none of the --identity keys is one of its recipients, so it was not decrypted",
                }
            ),
            Ok(Some(raw)) => tracing::info!(
                part = %part.key,
                name = %part.name,
                stored_bytes = part.stored_bytes,
                raw_bytes = raw,
                "part {} ({}) is intact: {} stored, SHA-256 matches, {} decompressed{}",
                part.key,
                part.name,
                human_bytes(part.stored_bytes),
                human_bytes(raw),
                if part.encryption.is_some() { " (decrypted)" } else { "" }
            ),
            Err(err) if err.kind() == ErrorKind::Interrupted || job.cancel.is_cancelled() => {
                return Err(Error::interrupted())
            }
            Err(err) if matches!(err.kind(), ErrorKind::Integrity | ErrorKind::NotFound) => {
                tracing::error!(part = %part.key, error_kind = "integrity", "{}", err.chain());
                bad.push(err.to_string());
            }
            Err(err) => return Err(err),
        }
    }
    drop(line);
    if !bad.is_empty() {
        return Err(Error::integrity(format!(
            "backup {} of {}/{} is damaged: {} of {} parts failed verification: {}. Restore from another backup (`kura list {}`)",
            manifest.backup_id,
            path.tenant,
            path.source,
            bad.len(),
            manifest.parts.len(),
            bad.join("; "),
            path.source
        )));
    }
    if let Some(engine) = job.deep {
        deep(job, manifest, engine).await?;
    }
    tracing::info!(
        source = %source,
        backup_id = %manifest.backup_id,
        deep = job.deep.is_some(),
        "backup {} of {} verified{}",
        manifest.backup_id,
        source,
        if job.deep.is_some() { " (restored and counted)" } else { "" }
    );
    Ok(None)
}

/// Read the part to the end; returns its decompressed length.
async fn check_part(
    cancel: &CancellationToken,
    store: &dyn ObjectStore,
    key: &str,
    part: &Part,
    unseal: Option<Arc<Identities>>,
    progress: Progress,
) -> Result<u64> {
    let raw = pipeline::read_verified(
        store,
        key,
        &part.digest(),
        unseal,
        Some(progress),
        cancel,
        |reader: &mut dyn Read| {
            std::io::copy(reader, &mut std::io::sink())
                .map_err(|e| Error::with_source(ErrorKind::Integrity, "decompressing", e))
        },
    )
    .await?;
    if raw != part.raw_bytes {
        return Err(Error::integrity(format!(
            "part {key} decompresses to {raw} bytes, but the manifest recorded {}",
            part.raw_bytes
        )));
    }
    Ok(raw)
}

fn missing_part(err: Error, key: &str) -> Error {
    match err.kind() {
        ErrorKind::NotFound => Error::integrity(format!(
            "part {key} is missing from storage (the manifest lists it)"
        )),
        _ => err,
    }
}

async fn deep(job: &VerifyJob<'_>, manifest: &Manifest, engine: &dyn Engine) -> Result<()> {
    let tag = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
    let databases: Vec<(usize, &Part)> = manifest
        .parts
        .iter()
        .filter(|p| p.kind == engine.database_kind())
        .enumerate()
        .collect();
    let ctx = RestoreContext {
        store: job.store,
        path: job.path.clone(),
        backup_id: manifest.id()?,
        cancel: job.cancel.clone(),
        show_progress: job.show_progress,
        identities: job.identities.clone(),
        jobs: jobs_per_database(job.jobs, databases.len()),
    };
    // The scratch restores' own bars join this one (see ProgressLine::start).
    let line = ProgressLine::start("verifying by restoring", job.show_progress, None);
    line.expect(databases.len(), "databases");
    // Scratch restores side by side; each removes its own scratch database, also when a
    // sibling's failure stops it.
    let outcomes = crate::jobs::run_all(databases, job.jobs, &job.cancel, |(index, part), stop| {
        let ctx = ctx.with_cancel(stop);
        let scratch = format!("kura_verify_{tag}_{}", index + 1);
        let line = &line;
        async move {
            tracing::info!(database = %part.name, scratch = %scratch, "restoring {:?} into scratch database {scratch}", part.name);
            let counted = engine
                .count_in_scratch(&ctx, manifest, part, &scratch)
                .await?;
            line.one_done();
            let Some(recorded) = &part.counts else {
                tracing::warn!(database = %part.name, "this backup recorded no counts (made by an older kura): the restore succeeded, nothing to compare");
                return Ok(None);
            };
            let differences = compare(recorded, &counted);
            if differences.is_empty() {
                tracing::info!(
                    database = %part.name,
                    compared = recorded.len(),
                    "database {:?} restores completely: {} counts match",
                    part.name,
                    recorded.len()
                );
                return Ok(None);
            }
            tracing::error!(database = %part.name, "{}", differences.join("; "));
            Ok(Some(format!("{:?}: {}", part.name, differences.join("; "))))
        }
    })
    .await?;
    let mismatches: Vec<String> = outcomes.into_iter().flatten().collect();
    if mismatches.is_empty() {
        Ok(())
    } else {
        Err(Error::integrity(format!(
            "backup {} restores, but not to what was backed up: {}",
            manifest.backup_id,
            mismatches.join(" | ")
        )))
    }
}

/// The `--jobs` of each scratch restore when `jobs` of them run side by side: the whole
/// verify stays within `jobs` sessions (one large database gets them all), not jobs².
fn jobs_per_database(jobs: usize, databases: usize) -> usize {
    (jobs / databases.clamp(1, jobs.max(1))).max(1)
}

/// Differences between recorded and restored counts; a count only one side has is compared
/// only when the backup recorded it (servers differ in what they report).
fn compare(recorded: &BTreeMap<String, u64>, restored: &BTreeMap<String, u64>) -> Vec<String> {
    let mut out = Vec::new();
    for (name, expected) in recorded {
        match restored.get(name) {
            Some(actual) if actual == expected => {}
            Some(actual) => out.push(format!("{name}: backed up {expected}, restored {actual}")),
            None if name == "deleted_documents" => {}
            None => out.push(format!(
                "{name}: backed up {expected}, missing after restore"
            )),
        }
    }
    for name in restored.keys().filter(|n| !recorded.contains_key(*n)) {
        out.push(format!("{name}: restored but not in the backup's counts"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_restores_share_the_jobs() {
        assert_eq!(jobs_per_database(4, 1), 4);
        assert_eq!(jobs_per_database(4, 2), 2);
        assert_eq!(jobs_per_database(4, 3), 1);
        assert_eq!(jobs_per_database(4, 40), 1);
        assert_eq!(jobs_per_database(1, 0), 1);
        assert_eq!(jobs_per_database(0, 5), 1);
    }

    #[test]
    fn counts_compare_by_name() {
        let recorded: BTreeMap<String, u64> =
            [("public.a".into(), 3), ("public.b".into(), 0)].into();
        assert!(compare(&recorded, &recorded.clone()).is_empty());
        let mut restored = recorded.clone();
        restored.insert("public.a".into(), 2);
        restored.remove("public.b");
        let diff = compare(&recorded, &restored);
        assert_eq!(diff.len(), 2, "{diff:?}");
        assert!(diff[0].contains("backed up 3, restored 2"));
        let couch: BTreeMap<String, u64> =
            [("documents".into(), 5), ("deleted_documents".into(), 1)].into();
        let pouch: BTreeMap<String, u64> = [("documents".into(), 5)].into();
        assert!(compare(&couch, &pouch).is_empty());
    }
}
