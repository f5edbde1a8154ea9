//! Re-encrypt a backup for new recipients, so an old key can be retired without losing the
//! history encrypted to it. Commit last, as a backup: each part is copied to a new object
//! (decrypted with the old identity, encrypted to the new recipients, never decompressed),
//! then the manifest is replaced in one atomic PUT, and only then are the old objects
//! deleted. An interruption before the PUT leaves the backup as it was; objects the manifest
//! does not name are removed by the next `reencrypt` of that backup.

use std::sync::Arc;

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use crate::catalog::lock::Lock;
use crate::catalog::{self, Manifest, SourcePath, BASE_MANIFEST_VERSION, MANIFEST_NAME};
use crate::error::{Error, Result};
use crate::pipeline::encryption::{self, Identities};
use crate::pipeline::{self, PipelineOptions};
use crate::storage::ObjectStore;

pub struct ReencryptJob<'a> {
    pub store: Arc<dyn ObjectStore>,
    pub path: SourcePath,
    pub manifest: &'a Manifest,
    pub identities: Option<Arc<Identities>>,
    /// The new recipients are `pipeline.encryption`.
    pub pipeline: PipelineOptions,
    pub cancel: CancellationToken,
}

pub async fn reencrypt(job: &ReencryptJob<'_>) -> Result<Manifest> {
    let Some(recipients) = &job.pipeline.encryption else {
        return Err(Error::usage(
            "reencrypt needs the new recipients: pass --encrypt-to RECIPIENT or --encrypt-to-file FILE",
        ));
    };
    let old = job.manifest;
    encryption::check_can_read(&old.backup_id, &old.parts, job.identities.as_deref())?;
    let lock = Lock::acquire(job.store.clone(), &job.path, "reencrypt").await?;
    let result = rewrite(job, old).await;
    lock.release(job.store.as_ref()).await;
    let manifest = result?;
    tracing::info!(
        source = %job.path.source,
        backup_id = %manifest.backup_id,
        parts = manifest.parts.len(),
        "backup {} of {} re-encrypted to {}",
        manifest.backup_id,
        job.path.source,
        recipients.names().join(", ")
    );
    Ok(manifest)
}

async fn rewrite(job: &ReencryptJob<'_>, old: &Manifest) -> Result<Manifest> {
    let store = job.store.as_ref();
    let id = old.id()?;
    // Read the manifest again under the lock: another reencrypt may have just replaced it.
    let old = catalog::load_manifest(store, &job.path, &id).await?;
    encryption::check_can_read(&old.backup_id, &old.parts, job.identities.as_deref())?;
    remove_unreferenced(store, &job.path, &old).await?;

    // A tag none of the current keys carries, so no new object lands on an old one.
    let tag = loop {
        let tag = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
        if old.parts.iter().all(|p| renamed(&p.key, &tag) != p.key) {
            break tag;
        }
    };
    let mut manifest = old.clone();
    let mut written: Vec<String> = Vec::new();
    let copied = async {
        for part in &mut manifest.parts {
            let from = job.path.object_key(&id, &part.key);
            let new_key = renamed(&part.key, &tag);
            let to = job.path.object_key(&id, &new_key);
            let unseal = match part.encryption {
                Some(_) => job.identities.clone(),
                None => None,
            };
            written.push(to.clone());
            let stored = pipeline::reseal(
                store,
                &from,
                &part.digest(),
                unseal,
                &to,
                &job.pipeline,
                &job.cancel,
            )
            .await
            .map_err(|e| e.or_interrupted(&job.cancel).context(format!("re-encrypting part {}", part.key)))?;
            tracing::info!(part = %part.key, new_key = %new_key, "part {} re-encrypted as {new_key}", part.key);
            part.key = new_key;
            part.stored_bytes = stored.bytes;
            part.sha256 = stored.sha256;
            part.encryption = job.pipeline.encryption.as_ref().map(|r| r.manifest_entry());
        }
        Ok::<(), Error>(())
    }
    .await;
    if let Err(err) = copied {
        let _ = store.delete(&written).await;
        return Err(err);
    }
    // Encrypted parts need version 3; a split database keeps the version it needs.
    manifest.format_version = manifest.format_version.max(BASE_MANIFEST_VERSION);
    manifest
        .labels
        .insert("reencrypted_at".into(), Utc::now().to_rfc3339());
    // The commit point: the manifest names the new parts from here on.
    if let Err(err) = catalog::write_manifest(store, &job.path, &manifest).await {
        // The PUT may have landed although it reported failure: the new parts may only go
        // when the stored manifest is provably still the old one.
        match catalog::load_manifest(store, &job.path, &id).await {
            Ok(stored) if stored == old => {
                let _ = store.delete(&written).await;
            }
            _ => tracing::warn!("the new manifest may have been stored; the new parts are kept (the next reencrypt of this backup removes whichever set is unreferenced)"),
        }
        return Err(err.context(format!("committing the re-encrypted backup {id}")));
    }
    let old_keys: Vec<String> = old
        .parts
        .iter()
        .map(|p| job.path.object_key(&id, &p.key))
        .collect();
    match store.delete(&old_keys).await {
        Ok(refused) if refused.is_empty() => {}
        Ok(refused) => tracing::warn!(
            refused = refused.len(),
            "the store kept {} old part(s) (object lock or retention); they are no longer part of the backup",
            refused.len()
        ),
        Err(e) => tracing::warn!(error = %e.chain(), "could not delete the old parts; the next reencrypt of this backup removes them"),
    }
    Ok(manifest)
}

/// `db-0001.pgdump.zst` → `db-0001.pgdump.r1a2b3c.zst`: a new object beside the old one, so
/// the old stays whole until the new manifest is committed.
fn renamed(key: &str, tag: &str) -> String {
    // A key renamed before carries its old tag: replace it rather than grow a chain.
    let (stem, extension) = key.rsplit_once('.').unwrap_or((key, ""));
    let stem = match stem.rsplit_once('.') {
        Some((base, last))
            if last.len() == 7
                && last.starts_with('r')
                && last[1..].bytes().all(|b| b.is_ascii_hexdigit()) =>
        {
            base
        }
        _ => stem,
    };
    match extension.is_empty() {
        true => format!("{stem}.r{tag}"),
        false => format!("{stem}.r{tag}.{extension}"),
    }
}

/// Objects in the backup's folder that its manifest does not name: copies an interrupted
/// reencrypt left behind.
async fn remove_unreferenced(
    store: &dyn ObjectStore,
    path: &SourcePath,
    manifest: &Manifest,
) -> Result<()> {
    let id = manifest.id()?;
    let prefix = path.backup_prefix(&id);
    let referenced: Vec<String> = manifest
        .parts
        .iter()
        .map(|p| path.object_key(&id, &p.key))
        .chain([path.object_key(&id, MANIFEST_NAME)])
        .collect();
    let stray: Vec<String> = store
        .list(&prefix)
        .await?
        .into_iter()
        .map(|o| o.key)
        .filter(|k| !referenced.contains(k))
        .collect();
    if !stray.is_empty() {
        tracing::info!(
            objects = stray.len(),
            "removing {} object(s) an interrupted reencrypt left",
            stray.len()
        );
        store.delete(&stray).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_keys_sit_beside_the_old_and_do_not_grow() {
        assert_eq!(
            renamed("db-0001.pgdump.zst", "1a2b3c"),
            "db-0001.pgdump.r1a2b3c.zst"
        );
        assert_eq!(
            renamed("db-0001.pgdump.r1a2b3c.zst", "ffffff"),
            "db-0001.pgdump.rffffff.zst"
        );
        assert_eq!(
            renamed("globals.sql.zst", "000001"),
            "globals.sql.r000001.zst"
        );
        assert_eq!(renamed("plain", "000001"), "plain.r000001");
    }
}
