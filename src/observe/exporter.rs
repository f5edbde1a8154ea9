//! `kura exporter`'s view of the storage: for every tenant and source, how many backups are
//! complete and incomplete, when the newest and the oldest complete one were taken, and how
//! big the newest is. This is the freshness signal that works even when a CronJob never ran.
//!
//! Cost per refresh: one listing of the whole storage prefix, plus one manifest GET per source
//! whose newest complete backup changed since the last refresh (manifests are cached by key,
//! size and modification time; a re-encrypted manifest has a new size or time).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use super::exposition::{Exposition, Family};
use crate::catalog::{self, BackupId, SourcePath};
use crate::error::{ErrorKind, Result};
use crate::storage::{ObjectMeta, ObjectStore};

const MANIFEST: &str = "manifest.json";

/// One source's backups, from a listing.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Tally {
    /// Complete backups (a manifest object exists), oldest first.
    pub complete: Vec<(BackupId, ObjectMeta)>,
    pub incomplete: u64,
}

/// Group a listing of the storage by tenant and source. Keys not shaped like
/// `<tenant>/<source>/<backup-id>/<object>` (locks, foreign files) are ignored.
pub fn tally(objects: &[ObjectMeta]) -> BTreeMap<(String, String), Tally> {
    let mut folders: BTreeMap<(String, String), BTreeMap<BackupId, Option<ObjectMeta>>> =
        BTreeMap::new();
    for object in objects {
        let mut parts = object.key.splitn(4, '/');
        let (Some(tenant), Some(source), Some(id), Some(name)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let Ok(id) = BackupId::parse(id) else {
            continue;
        };
        let folder = folders
            .entry((tenant.to_string(), source.to_string()))
            .or_default()
            .entry(id)
            .or_default();
        if name == MANIFEST {
            *folder = Some(object.clone());
        }
    }
    folders
        .into_iter()
        .map(|(key, backups)| {
            let mut tally = Tally::default();
            for (id, manifest) in backups {
                match manifest {
                    Some(meta) => tally.complete.push((id, meta)),
                    None => tally.incomplete += 1,
                }
            }
            (key, tally)
        })
        .collect()
}

/// What the newest complete backup's manifest says.
#[derive(Debug, Clone, Copy)]
struct Newest {
    finished_at: DateTime<Utc>,
    stored_bytes: u64,
}

/// Manifests already read, by (key, size, modification time).
#[derive(Default)]
pub struct ManifestCache {
    entries: BTreeMap<(String, u64, Option<DateTime<Utc>>), Newest>,
}

pub const LAST_COMPLETE: Family = Family {
    name: "kura_backup_last_complete_timestamp_seconds",
    kind: "gauge",
    help:
        "When the newest complete backup of this source finished, in seconds since the Unix epoch.",
};
pub const LAST_COMPLETE_BYTES: Family = Family {
    name: "kura_backup_last_complete_bytes",
    kind: "gauge",
    help: "Bytes stored by the newest complete backup of this source.",
};
pub const COMPLETE: Family = Family {
    name: "kura_backups_complete",
    kind: "gauge",
    help: "Complete backups (with a manifest) of this source in the storage.",
};
pub const INCOMPLETE: Family = Family {
    name: "kura_backups_incomplete",
    kind: "gauge",
    help: "Backups of this source without a manifest: running, failed or interrupted.",
};
pub const OLDEST_COMPLETE: Family = Family {
    name: "kura_backup_oldest_complete_timestamp_seconds",
    kind: "gauge",
    help: "When the oldest complete backup of this source was started (its id's time), in seconds since the Unix epoch.",
};

/// Read the storage once and render every tenant's and source's series.
pub async fn scan(store: &dyn ObjectStore, cache: &mut ManifestCache) -> Result<Exposition> {
    let listing = store.list("").await?;
    let tallies = tally(&listing);
    let mut exposition = Exposition::default();
    let mut seen = std::collections::BTreeSet::new();
    for ((tenant, source), tally) in &tallies {
        let labels = vec![("tenant", tenant.clone()), ("source", source.clone())];
        exposition.add(COMPLETE, labels.clone(), tally.complete.len() as f64);
        exposition.add(INCOMPLETE, labels.clone(), tally.incomplete as f64);
        if let Some((oldest, _)) = tally.complete.first() {
            exposition.add(
                OLDEST_COMPLETE,
                labels.clone(),
                oldest.time().timestamp() as f64,
            );
        }
        let path = SourcePath {
            tenant: tenant.clone(),
            source: source.clone(),
        };
        // Newest first; a manifest that does not parse (damage, a newer format) is skipped,
        // as `list` and `restore latest` skip it.
        for (id, meta) in tally.complete.iter().rev() {
            let key = (meta.key.clone(), meta.size, meta.last_modified);
            seen.insert(key.clone());
            let newest = match cache.entries.get(&key) {
                Some(newest) => *newest,
                None => match catalog::load_manifest(store, &path, id).await {
                    Ok(manifest) => {
                        let newest = Newest {
                            finished_at: manifest.finished_at,
                            stored_bytes: manifest.stored_bytes(),
                        };
                        cache.entries.insert(key, newest);
                        newest
                    }
                    Err(e) if e.kind() == ErrorKind::Storage => return Err(e),
                    Err(e) => {
                        tracing::debug!(tenant, source, backup = %id.as_str(), "skipping an unreadable manifest: {e}");
                        continue;
                    }
                },
            };
            exposition.add(
                LAST_COMPLETE,
                labels.clone(),
                newest.finished_at.timestamp_millis() as f64 / 1000.0,
            );
            exposition.add(
                LAST_COMPLETE_BYTES,
                labels.clone(),
                newest.stored_bytes as f64,
            );
            break;
        }
    }
    // Forget what is no longer the newest, so the cache stays as small as the catalog.
    cache.entries.retain(|key, _| seen.contains(key));
    Ok(exposition)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(key: &str) -> ObjectMeta {
        ObjectMeta {
            key: key.to_string(),
            size: 10,
            last_modified: None,
        }
    }

    #[test]
    fn a_listing_is_grouped_by_tenant_and_source() {
        let listing = [
            "acme/pg/20261201T010000Z-aaaaaa/globals.sql.zst",
            "acme/pg/20261201T010000Z-aaaaaa/manifest.json",
            "acme/pg/20261202T010000Z-bbbbbb/manifest.json",
            "acme/pg/20261203T010000Z-cccccc/db-0001.pgdump.zst",
            "acme/pg/lock.json",
            "acme/couch/20261203T010000Z-dddddd/db-0001.ndjson.zst",
            "beta/pg/not-an-id/manifest.json",
            "stray.txt",
        ]
        .map(object);
        let tallies = tally(&listing);
        let pg = &tallies[&("acme".to_string(), "pg".to_string())];
        assert_eq!(pg.complete.len(), 2);
        assert_eq!(pg.incomplete, 1);
        assert_eq!(pg.complete[0].0.as_str(), "20261201T010000Z-aaaaaa");
        let couch = &tallies[&("acme".to_string(), "couch".to_string())];
        assert_eq!((couch.complete.len(), couch.incomplete), (0, 1));
        assert!(!tallies.contains_key(&("beta".to_string(), "pg".to_string())));
    }
}
