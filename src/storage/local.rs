//! `file:///dir`: the embedded default store, a plain directory.
//!
//! Objects are files under the root. Atomicity comes from writing beside the final name and
//! renaming; an unfinished multipart upload is a `<key>.kura-upload-<id>` file that `list`
//! hides and `list_uploads` reports.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt, TryStreamExt};

use super::{
    validate_key, Created, GetResult, MultipartUpload, ObjectMeta, ObjectStore, PendingUpload,
    Refused,
};
use crate::error::{Error, ErrorKind, Result};

const UPLOAD_MARK: &str = ".kura-upload-";
const TMP_MARK: &str = ".kura-tmp-";

#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
}

impl LocalStore {
    pub fn new(root: impl AsRef<Path>) -> Result<Self> {
        Ok(LocalStore {
            root: root.as_ref().to_path_buf(),
        })
    }

    fn path(&self, key: &str) -> Result<PathBuf> {
        validate_key(key)?;
        Ok(self.root.join(key))
    }

    fn io_error(&self, what: &str, key: &str, err: std::io::Error) -> Error {
        let kind = if err.kind() == std::io::ErrorKind::NotFound {
            ErrorKind::NotFound
        } else {
            ErrorKind::Storage
        };
        Error::with_source(kind, format!("{what} {key} in {}", self.location()), err)
    }
}

fn random_suffix() -> String {
    format!("{:016x}", rand::random::<u64>())
}

fn modified(meta: &fs::Metadata) -> Option<DateTime<Utc>> {
    meta.modified().ok().map(DateTime::<Utc>::from)
}

/// Walks the tree below `dir`, collecting (relative key, metadata) of every regular file.
fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, fs::Metadata)>) -> std::io::Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let meta = entry.metadata()?;
        let path = entry.path();
        if meta.is_dir() {
            walk(root, &path, out)?;
        } else if meta.is_file() {
            if let Ok(rel) = path.strip_prefix(root) {
                if let Some(key) = rel.to_str() {
                    out.push((key.to_string(), meta));
                }
            }
        }
    }
    Ok(())
}

fn write_atomically(path: &Path, data: &[u8]) -> std::io::Result<()> {
    publish(path, data, |tmp, path| fs::rename(tmp, path)).map(|_| ())
}

/// A complete temporary file is hard-linked into place: `link` fails when the name exists,
/// so the check and the write are one atomic step, and no reader sees a partial object.
fn write_if_absent(path: &Path, data: &[u8]) -> std::io::Result<Created> {
    publish(path, data, |tmp, path| fs::hard_link(tmp, path))
        .map(|()| Created::Created)
        .or_else(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => Ok(Created::AlreadyExists),
            _ => Err(e),
        })
}

/// Write `data` to a synced temporary file beside `path`, then `place` it at `path`; the
/// temporary name is gone afterwards whatever happened.
fn publish(
    path: &Path,
    data: &[u8],
    place: impl FnOnce(&Path, &Path) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("object");
    let tmp = dir.join(format!("{name}{TMP_MARK}{}", random_suffix()));
    let result = (|| {
        let mut file = File::create(&tmp)?;
        file.write_all(data)?;
        file.sync_all()?;
        place(&tmp, path)?;
        sync_dir(dir)
    })();
    // After a rename the temporary name no longer exists; after a link it must go.
    let _ = fs::remove_file(&tmp);
    result
}

/// Makes a rename durable: without it a crash can lose the directory entry.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

#[async_trait]
impl ObjectStore for LocalStore {
    fn location(&self) -> String {
        format!("file://{}", self.root.display())
    }

    async fn check(&self) -> Result<()> {
        let root = self.root.clone();
        let meta = tokio::task::spawn_blocking(move || fs::metadata(&root))
            .await
            .map_err(|e| Error::failed(format!("storage task failed: {e}")))?;
        match meta {
            Ok(meta) if meta.is_dir() => Ok(()),
            Ok(_) => Err(Error::usage(format!(
                "{} is not a directory: point --storage / KURA_STORAGE at the backup directory",
                self.location()
            ))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::not_found(format!(
                "backup storage {} does not exist: check --storage / KURA_STORAGE for a typo (only `kura backup` creates a new directory)",
                self.location()
            ))),
            Err(e) => Err(Error::with_source(
                ErrorKind::Storage,
                format!("cannot read backup storage {}", self.location()),
                e,
            )),
        }
    }

    async fn prepare_for_writing(&self) -> Result<()> {
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || fs::create_dir_all(&root))
            .await
            .map_err(|e| Error::failed(format!("storage task failed: {e}")))?
            .map_err(|e| {
                Error::with_source(
                    ErrorKind::Storage,
                    format!(
                        "cannot use {} as backup storage: check the directory exists and is writable",
                        self.location()
                    ),
                    e,
                )
            })?;
        self.check().await
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<()> {
        let path = self.path(key)?;
        tokio::task::spawn_blocking(move || write_atomically(&path, &data))
            .await
            .map_err(|e| Error::failed(format!("storage task failed: {e}")))?
            .map_err(|e| self.io_error("cannot write", key, e))
    }

    async fn put_multipart(&self, key: &str) -> Result<Box<dyn MultipartUpload>> {
        let path = self.path(key)?;
        let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("object");
        let staging = dir.join(format!("{name}{UPLOAD_MARK}{}", random_suffix()));
        let file = {
            let staging = staging.clone();
            tokio::task::spawn_blocking(move || {
                fs::create_dir_all(&dir)?;
                OpenOptions::new()
                    .create_new(true)
                    .write(true)
                    .open(&staging)
            })
            .await
            .map_err(|e| Error::failed(format!("storage task failed: {e}")))?
            .map_err(|e| self.io_error("cannot start upload of", key, e))?
        };
        Ok(Box::new(LocalUpload {
            key: key.to_string(),
            location: self.location(),
            target: path,
            staging,
            file: Arc::new(file),
            offset: 0,
        }))
    }

    async fn get(&self, key: &str) -> Result<GetResult> {
        let path = self.path(key)?;
        let file = tokio::fs::File::open(&path)
            .await
            .map_err(|e| self.io_error("cannot read", key, e))?;
        let size = file
            .metadata()
            .await
            .map_err(|e| self.io_error("cannot read", key, e))?
            .len();
        let what = format!("reading {key} in {}", self.location());
        let stream = tokio_util::io::ReaderStream::with_capacity(file, 1 << 20)
            .map_err(move |e| Error::with_source(ErrorKind::Storage, what.clone(), e))
            .boxed();
        Ok(GetResult { size, stream })
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>> {
        let path = self.path(key)?;
        match tokio::fs::metadata(&path).await {
            Ok(meta) if meta.is_file() => Ok(Some(ObjectMeta {
                key: key.to_string(),
                size: meta.len(),
                last_modified: modified(&meta),
            })),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io_error("cannot stat", key, e)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        let files = self.walk_prefix(prefix).await?;
        let mut objects: Vec<ObjectMeta> = files
            .into_iter()
            .filter(|(key, _)| !key.contains(UPLOAD_MARK) && !key.contains(TMP_MARK))
            .map(|(key, meta)| ObjectMeta {
                size: meta.len(),
                last_modified: modified(&meta),
                key,
            })
            .collect();
        objects.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(objects)
    }

    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<Created> {
        let path = self.path(key)?;
        tokio::task::spawn_blocking(move || write_if_absent(&path, &data))
            .await
            .map_err(|e| Error::failed(format!("storage task failed: {e}")))?
            .map_err(|e| self.io_error("cannot write", key, e))
    }

    async fn delete(&self, keys: &[String]) -> Result<Vec<Refused>> {
        let mut refused = Vec::new();
        for key in keys {
            let path = self.path(key)?;
            match tokio::fs::remove_file(&path).await {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                    refused.push(Refused {
                        key: key.clone(),
                        reason: e.to_string(),
                    });
                    continue;
                }
                Err(e) => return Err(self.io_error("cannot delete", key, e)),
            }
            // Leave no empty backup directories behind; failure here is harmless.
            let mut dir = path.parent();
            while let Some(d) = dir {
                if d == self.root || tokio::fs::remove_dir(d).await.is_err() {
                    break;
                }
                dir = d.parent();
            }
        }
        Ok(refused)
    }

    async fn list_uploads(&self, prefix: &str) -> Result<Vec<PendingUpload>> {
        let files = self.walk_prefix(prefix).await?;
        Ok(files
            .into_iter()
            .filter_map(|(key, meta)| {
                let (target, id) = key.split_once(UPLOAD_MARK)?;
                Some(PendingUpload {
                    key: target.to_string(),
                    upload_id: id.to_string(),
                    initiated: modified(&meta),
                })
            })
            .collect())
    }

    async fn abort_upload(&self, upload: &PendingUpload) -> Result<()> {
        let staging = format!("{}{UPLOAD_MARK}{}", upload.key, upload.upload_id);
        self.delete(&[staging]).await.map(|_| ())
    }
}

impl LocalStore {
    async fn walk_prefix(&self, prefix: &str) -> Result<Vec<(String, fs::Metadata)>> {
        let root = self.root.clone();
        let prefix_owned = prefix.to_string();
        // Only walk the deepest directory the prefix names, not the whole store.
        let start = match prefix.rfind('/') {
            Some(i) => root.join(&prefix[..i]),
            None => root.clone(),
        };
        let mut files = tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            walk(&root, &start, &mut out).map(|_| out)
        })
        .await
        .map_err(|e| Error::failed(format!("storage task failed: {e}")))?
        .map_err(|e| self.io_error("cannot list", prefix, e))?;
        files.retain(|(key, _)| key.starts_with(&prefix_owned));
        Ok(files)
    }
}

struct LocalUpload {
    key: String,
    location: String,
    target: PathBuf,
    staging: PathBuf,
    file: Arc<File>,
    offset: u64,
}

#[async_trait]
impl MultipartUpload for LocalUpload {
    fn put_part(&mut self, data: Bytes) -> BoxFuture<'static, Result<()>> {
        // Parts arrive in order, so each one's offset is known now even though the writes
        // themselves may finish in any order.
        let offset = self.offset;
        self.offset += data.len() as u64;
        let file = Arc::clone(&self.file);
        let what = format!("cannot write {} in {}", self.key, self.location);
        async move {
            tokio::task::spawn_blocking(move || file.write_all_at(&data, offset))
                .await
                .map_err(|e| Error::failed(format!("storage task failed: {e}")))?
                .map_err(|e| Error::with_source(ErrorKind::Storage, what, e))
        }
        .boxed()
    }

    async fn complete(&mut self) -> Result<()> {
        let file = Arc::clone(&self.file);
        let (staging, target) = (self.staging.clone(), self.target.clone());
        tokio::task::spawn_blocking(move || {
            file.sync_all()?;
            fs::rename(&staging, &target)?;
            sync_dir(target.parent().unwrap_or(Path::new(".")))
        })
        .await
        .map_err(|e| Error::failed(format!("storage task failed: {e}")))?
        .map_err(|e| {
            Error::with_source(
                ErrorKind::Storage,
                format!("cannot complete {} in {}", self.key, self.location),
                e,
            )
        })
    }

    async fn abort(&mut self) -> Result<()> {
        match tokio::fs::remove_file(&self.staging).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::with_source(
                ErrorKind::Storage,
                format!("cannot abort upload of {} in {}", self.key, self.location),
                e,
            )),
        }
    }
}
