//! The catalog: backup ids, where objects live, and the manifest that marks a backup complete.
//!
//! ```text
//! <prefix>/<tenant>/<source>/<backup-id>/manifest.json    written LAST: its presence = complete
//! <prefix>/<tenant>/<source>/<backup-id>/<part objects>
//! ```
//! Everything that decides "is this backup usable" (`list`, `restore`, later `prune` and
//! `verify`) goes through [`list_backups`] and [`load_manifest`], so the commit rule lives in
//! one place.

use std::collections::BTreeMap;
use std::fmt;

use bytes::Bytes;
use chrono::{DateTime, NaiveDateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::config::SourceKind;
use crate::error::{Error, ErrorKind, Result};
use crate::storage::ObjectStore;

pub mod lock;
pub mod prune;

pub const MANIFEST_NAME: &str = "manifest.json";
pub const MANIFEST_FORMAT: &str = "kura-backup-manifest";
/// Bump when a reader of the previous version would misread a new manifest.
/// 2: CouchDB parts stream attachments after their document (`kura-couchdb-ndjson-v2`).
/// 3: parts may be age-encrypted (`encryption: {algorithm: "age", recipients: [...]}`); a
/// version-2 kura would try to decompress their ciphertext.
/// 4: a PostgreSQL database may be split into a schema part and table-data parts
/// (`postgres.table-data`); a version-3 kura would restore the schema alone.
/// 5: a large table's data part may be COPY text (`pg-copy-text`), which a version-4 kura
/// would hand to pg_restore.
/// Manifests of versions 1 to 4 are still read, and their parts restored.
pub const MANIFEST_VERSION: u32 = 5;
/// What a backup that needs nothing newer is written as, so that kura releases that read
/// only version 3 still restore it.
pub const BASE_MANIFEST_VERSION: u32 = 3;

/// `20261128T020304Z-a1b2c3`: UTC time to the second, then a suffix of the millisecond and
/// random bits so two runs in the same second never collide. Lexical order is time order.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackupId(String);

const ID_TIME_FORMAT: &str = "%Y%m%dT%H%M%SZ";

impl BackupId {
    pub fn new(at: DateTime<Utc>) -> Self {
        // The suffix starts with the millisecond (10 bits) and ends with 14 random bits, so
        // two backups in one second still sort in the order they started.
        let millis = at.timestamp_subsec_millis().min(999);
        let suffix = (millis << 14) | (rand::random::<u32>() & 0x3fff);
        BackupId(format!("{}-{suffix:06x}", at.format(ID_TIME_FORMAT)))
    }

    pub fn parse(text: &str) -> Result<Self> {
        let valid = text.len() == 23
            && text.as_bytes()[16] == b'-'
            && NaiveDateTime::parse_from_str(&text[..16], ID_TIME_FORMAT).is_ok()
            && text[17..].chars().all(|c| c.is_ascii_hexdigit());
        if valid {
            Ok(BackupId(text.to_string()))
        } else {
            Err(Error::usage(format!(
                "{text:?} is not a backup id (like 20261128T020304Z-a1b2c3) or \"latest\"; `kura list` shows the ids"
            )))
        }
    }

    pub fn time(&self) -> DateTime<Utc> {
        NaiveDateTime::parse_from_str(&self.0[..16], ID_TIME_FORMAT)
            .map(|t| t.and_utc())
            .unwrap_or_default()
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for BackupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where one source's backups live: `<tenant>/<source>/`.
#[derive(Debug, Clone)]
pub struct SourcePath {
    pub tenant: String,
    pub source: String,
}

impl SourcePath {
    pub fn prefix(&self) -> String {
        format!("{}/{}/", self.tenant, self.source)
    }
    pub fn backup_prefix(&self, id: &BackupId) -> String {
        format!("{}{}/", self.prefix(), id)
    }
    pub fn object_key(&self, id: &BackupId, name: &str) -> String {
        format!("{}{}", self.backup_prefix(id), name)
    }
    pub fn manifest_key(&self, id: &BackupId) -> String {
        self.object_key(id, MANIFEST_NAME)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compression {
    pub algorithm: String,
    pub level: i32,
}

/// How a part is encrypted: `age` to these recipients (public keys, not secrets: recorded so
/// a restore can say which key it needs before it touches anything).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Encryption {
    pub algorithm: String,
    pub recipients: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Part {
    /// Object name inside the backup's folder.
    pub key: String,
    /// Logical name: `globals`, or the database name.
    pub name: String,
    /// What the part holds, e.g. `postgres.globals`, `postgres.database`.
    pub kind: String,
    /// Format of the raw bytes, e.g. `pg_dumpall-sql`, `pg_dump-custom`.
    pub format: String,
    pub raw_bytes: u64,
    pub stored_bytes: u64,
    /// SHA-256 of the stored (compressed) bytes, hex.
    pub sha256: String,
    pub compression: Compression,
    pub encryption: Option<Encryption>,
    /// Engine-specific facts needed to restore (encoding, owner, …).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub properties: serde_json::Value,
    /// What the part held when it was taken, for `verify --deep` to compare a restore with:
    /// rows per table (`schema.table`, PostgreSQL) or `documents` / `deleted_documents`
    /// (CouchDB). `None` in backups made before kura recorded them; an empty map is a
    /// database without tables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counts: Option<BTreeMap<String, u64>>,
}

impl Part {
    pub fn digest(&self) -> crate::pipeline::Digested {
        crate::pipeline::Digested {
            bytes: self.stored_bytes,
            sha256: self.sha256.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    pub kura_version: String,
    pub backup_id: String,
    pub tenant: String,
    pub source: String,
    pub kind: SourceKind,
    pub server_version: String,
    /// The dump tool and its version, e.g. `pg_dump (PostgreSQL) 15.18`.
    pub tool_version: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub parts: Vec<Part>,
    /// Free-form facts about the run (host, options).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// What the backup left out of every database on purpose.
    #[serde(default, skip_serializing_if = "Exclusions::is_empty")]
    pub exclusions: Exclusions,
}

/// Tables left out by pattern, as given (`--exclude-table`, `--exclude-table-data`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exclusions {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tables: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub table_data: Vec<String>,
}

impl Exclusions {
    pub fn is_empty(&self) -> bool {
        self.tables.is_empty() && self.table_data.is_empty()
    }
}

impl Manifest {
    pub fn stored_bytes(&self) -> u64 {
        self.parts.iter().map(|p| p.stored_bytes).sum()
    }
    pub fn raw_bytes(&self) -> u64 {
        self.parts.iter().map(|p| p.raw_bytes).sum()
    }
    pub fn duration_seconds(&self) -> f64 {
        (self.finished_at - self.started_at).num_milliseconds() as f64 / 1000.0
    }
    pub fn id(&self) -> Result<BackupId> {
        BackupId::parse(&self.backup_id)
    }
}

/// Commit the backup: write its manifest, the last object of a backup.
pub async fn write_manifest(
    store: &dyn ObjectStore,
    path: &SourcePath,
    manifest: &Manifest,
) -> Result<()> {
    let id = manifest.id()?;
    let json = serde_json::to_vec_pretty(manifest)
        .map_err(|e| Error::failed(format!("cannot encode manifest: {e}")))?;
    store.put(&path.manifest_key(&id), Bytes::from(json)).await
}

pub async fn load_manifest(
    store: &dyn ObjectStore,
    path: &SourcePath,
    id: &BackupId,
) -> Result<Manifest> {
    let key = path.manifest_key(id);
    let mut object = store.get(&key).await.map_err(|e| {
        if e.kind() == ErrorKind::NotFound {
            Error::not_found(format!(
                "backup {id} of {}/{} has no manifest in {}: it does not exist or never completed; `kura list {}` shows complete backups",
                path.tenant, path.source, store.location(), path.source
            ))
        } else {
            e
        }
    })?;
    let mut json = Vec::with_capacity(object.size as usize);
    use futures::StreamExt;
    while let Some(chunk) = object.stream.next().await {
        json.extend_from_slice(&chunk?);
    }
    parse_manifest(&json).map_err(|e| e.context(format!("manifest {key}")))
}

pub fn parse_manifest(json: &[u8]) -> Result<Manifest> {
    #[derive(Deserialize)]
    struct Header {
        format: String,
        format_version: u32,
    }
    let header: Header = serde_json::from_slice(json)
        .map_err(|e| Error::integrity(format!("not a kura manifest: {e}")))?;
    if header.format != MANIFEST_FORMAT {
        return Err(Error::integrity(format!(
            "not a kura manifest (format {:?})",
            header.format
        )));
    }
    if header.format_version > MANIFEST_VERSION {
        return Err(Error::usage(format!(
            "written by a newer kura (manifest format {}, this kura reads up to {MANIFEST_VERSION}): upgrade kura",
            header.format_version
        )));
    }
    let manifest: Manifest = serde_json::from_slice(json)
        .map_err(|e| Error::integrity(format!("manifest is malformed: {e}")))?;
    Ok(manifest)
}

/// One backup folder found in storage.
#[derive(Debug, Clone)]
pub struct BackupEntry {
    pub id: BackupId,
    /// `Some` only for complete backups (the manifest exists and parses).
    pub manifest: Option<Manifest>,
    /// Why an incomplete backup is not usable.
    pub problem: Option<String>,
    /// A manifest object exists, whether or not it could be read (a newer format, damage).
    pub has_manifest: bool,
    /// Bytes of all objects under the backup's folder.
    pub object_bytes: u64,
    pub last_modified: Option<DateTime<Utc>>,
}

impl BackupEntry {
    pub fn is_complete(&self) -> bool {
        self.manifest.is_some()
    }
}

/// Concurrent manifest reads in [`list_backups`].
const MANIFEST_READS: usize = 16;

/// What one listing says about a backup folder, before any manifest is read.
#[derive(Default)]
struct Folder {
    has_manifest: bool,
    bytes: u64,
    last_modified: Option<DateTime<Utc>>,
}

/// The backup folders of a source from one listing, oldest first.
async fn folders(store: &dyn ObjectStore, path: &SourcePath) -> Result<BTreeMap<BackupId, Folder>> {
    let prefix = path.prefix();
    let mut folders: BTreeMap<BackupId, Folder> = BTreeMap::new();
    for object in store.list(&prefix).await? {
        let rest = &object.key[prefix.len()..];
        let Some((id, name)) = rest.split_once('/') else {
            continue;
        };
        // Anything not shaped like a backup id is not ours to judge.
        let Ok(id) = BackupId::parse(id) else {
            continue;
        };
        let folder = folders.entry(id).or_default();
        folder.has_manifest |= name == MANIFEST_NAME;
        folder.bytes += object.size;
        folder.last_modified = folder.last_modified.max(object.last_modified);
    }
    Ok(folders)
}

/// Every backup folder of a source, newest first; manifests are loaded for complete ones.
pub async fn list_backups(store: &dyn ObjectStore, path: &SourcePath) -> Result<Vec<BackupEntry>> {
    // Manifests are read MANIFEST_READS at a time: a tenant with hourly backups has hundreds,
    // and one round trip each, in sequence, is most of the time `list` and `prune` take.
    use futures::{StreamExt, TryStreamExt};
    let entries: Vec<BackupEntry> =
        futures::stream::iter(folders(store, path).await?.into_iter().rev())
            .map(|(id, folder)| async move {
                let Folder {
                    has_manifest,
                    bytes,
                    last_modified: modified,
                } = folder;
                let (manifest, problem) = if has_manifest {
                    match load_manifest(store, path, &id).await {
                        Ok(m) => (Some(m), None),
                        Err(e) if e.kind() == ErrorKind::Storage => return Err(e),
                        Err(e) => (None, Some(e.to_string())),
                    }
                } else {
                    (None, Some("no manifest: unfinished or failed".to_string()))
                };
                Ok(BackupEntry {
                    id,
                    manifest,
                    problem,
                    has_manifest,
                    object_bytes: bytes,
                    last_modified: modified,
                })
            })
            .buffered(MANIFEST_READS)
            .try_collect()
            .await?;
    Ok(entries)
}

/// The names of the sources a tenant has anything stored for, sorted.
pub async fn sources_of_tenant(store: &dyn ObjectStore, tenant: &str) -> Result<Vec<String>> {
    let prefix = format!("{tenant}/");
    Ok(store
        .list(&prefix)
        .await?
        .iter()
        .filter_map(|o| o.key[prefix.len()..].split('/').next().map(str::to_string))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect())
}

/// The newest backup whose manifest exists and parses. Reads manifests newest first and stops
/// at the first good one, so `restore latest` and `status` cost one listing and (usually) one
/// GET, however many backups the source has.
pub async fn newest_complete(
    store: &dyn ObjectStore,
    path: &SourcePath,
) -> Result<Option<Manifest>> {
    for (id, _) in folders(store, path)
        .await?
        .into_iter()
        .rev()
        .filter(|(_, folder)| folder.has_manifest)
    {
        match load_manifest(store, path, &id).await {
            Ok(manifest) => return Ok(Some(manifest)),
            Err(e) if e.kind() == ErrorKind::Storage => return Err(e),
            Err(_) => continue,
        }
    }
    Ok(None)
}

/// The manifest for `id`, or for the newest complete backup when `id` is `latest`.
pub async fn resolve(store: &dyn ObjectStore, path: &SourcePath, id: &str) -> Result<Manifest> {
    if id == "latest" {
        newest_complete(store, path).await?.ok_or_else(|| {
            Error::not_found(format!(
                "no complete backup of {}/{} in {}",
                path.tenant,
                path.source,
                store.location()
            ))
        })
    } else {
        load_manifest(store, path, &BackupId::parse(id)?).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn ids_sort_by_time_and_round_trip() {
        let early = BackupId::new(Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap());
        let late = BackupId::new(Utc.with_ymd_and_hms(2026, 11, 2, 3, 4, 5).unwrap());
        assert!(early < late);
        assert!(early.as_str().starts_with("20260102T030405Z-"));
        assert_eq!(BackupId::parse(early.as_str()).unwrap(), early);
        assert_eq!(
            early.time(),
            Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap()
        );
        assert!(BackupId::parse("latest").is_err());
        assert!(BackupId::parse("20261302T030405Z-abcdef").is_err());
    }

    #[test]
    fn ids_within_one_second_sort_by_millisecond() {
        let base = Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap();
        let mut previous = BackupId::new(base);
        for ms in [1, 2, 500, 999] {
            let next = BackupId::new(base + chrono::Duration::milliseconds(ms));
            assert!(next > previous, "{next} after {previous}");
            assert_eq!(BackupId::parse(next.as_str()).unwrap().time(), base);
            previous = next;
        }
    }

    #[test]
    fn newer_or_encrypted_manifests_are_refused() {
        let newer = br#"{"format":"kura-backup-manifest","format_version":99}"#;
        assert!(parse_manifest(newer)
            .unwrap_err()
            .to_string()
            .contains("newer kura"));
        assert_eq!(
            parse_manifest(br#"{"format":"other","format_version":1}"#)
                .unwrap_err()
                .kind(),
            ErrorKind::Integrity
        );

        let manifest = |encryption: serde_json::Value| {
            serde_json::to_vec(&serde_json::json!({
                "format": MANIFEST_FORMAT, "format_version": MANIFEST_VERSION,
                "kura_version": "0.1.0", "backup_id": "20260102T030405Z-abcdef",
                "tenant": "t", "source": "main", "kind": "postgres",
                "server_version": "15.18", "tool_version": "pg_dump 15.18",
                "started_at": "2026-01-02T03:04:05Z", "finished_at": "2026-01-02T03:05:05Z",
                "parts": [{
                    "key": "db-0001.pgdump.zst", "name": "app", "kind": "postgres.database",
                    "format": "pg_dump-custom", "raw_bytes": 10, "stored_bytes": 8,
                    "sha256": "00", "compression": {"algorithm": "zstd", "level": 3},
                    "encryption": encryption
                }]
            }))
            .unwrap()
        };
        assert!(parse_manifest(&manifest(serde_json::Value::Null)).is_ok());
        let parsed = parse_manifest(&manifest(
            serde_json::json!({"algorithm": "age", "recipients": ["age1example"]}),
        ))
        .unwrap();
        // Readable without a key (list, status, prune); restoring it needs one.
        let part = &parsed.parts[0];
        assert_eq!(
            part.encryption.as_ref().unwrap().recipients,
            ["age1example"]
        );
        let err = crate::pipeline::encryption::check_can_read("b", [part], None).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Usage);
        assert!(
            err.to_string().contains("age1example") && err.to_string().contains("--identity"),
            "{err}"
        );
        // An algorithm this kura does not know is refused, not misread.
        let other = parse_manifest(&manifest(
            serde_json::json!({"algorithm": "rot13", "recipients": []}),
        ))
        .unwrap();
        let err = crate::pipeline::encryption::check_can_read("b", &other.parts, None).unwrap_err();
        assert!(err.to_string().contains("upgrade kura"), "{err}");
    }
}
