//! Object storage: one trait, its contract, and the implementations (`file://`, `s3://`).
//!
//! # Contract
//!
//! Every implementation MUST behave as follows; `tests/storage_conformance.rs` runs the same
//! suite against each of them.
//!
//! - **Keys** are `/`-separated relative paths (`acme/main/20261128T010203Z-ab12cd/manifest.json`).
//!   They never start with `/` and never contain `..` segments; implementations may reject such keys.
//! - **`put`** is atomic: a reader sees either the previous object or the whole new one, never
//!   a prefix of it.
//! - **`put_multipart`** makes nothing visible at the key until [`MultipartUpload::complete`]
//!   returns `Ok`. After [`MultipartUpload::abort`] (or a failed `complete`) no part of the
//!   upload remains stored, and [`ObjectStore::list_uploads`] no longer reports it. Dropping an
//!   upload without completing or aborting it leaves an unfinished upload that `list_uploads`
//!   reports, so callers MUST abort on every failure path (`pipeline::upload` does).
//! - **`get`** of a missing key fails with [`ErrorKind::NotFound`]. The stream yields exactly the
//!   stored bytes; a connection lost mid-stream yields an error item, never a silent end.
//! - **`head`** of a missing key is `Ok(None)`.
//! - **`list`** returns every complete object whose key starts with the prefix, sorted by key,
//!   across as many pages as the store needs. Unfinished multipart uploads are not objects.
//! - **`put_if_absent`** writes only when no object exists at the key, atomically where the
//!   store supports conditional writes (`If-None-Match: *`); it never replaces an object that
//!   existed before the call.
//! - **`delete`** of a key that does not exist succeeds (deletes are idempotent). A key the
//!   store refuses to delete (object lock, retention, permissions on that one object) is
//!   returned as [`Refused`] and the other keys are still deleted; only a failure of the store
//!   as a whole is an `Err`.
//! - **`check`** only reads: it never creates a bucket or a directory, so a mistyped storage
//!   URL given to `list` or `restore` is an error, not a new empty store. Only
//!   **`prepare_for_writing`** (used by `backup`) may create what the store needs.
//! - **Errors**: unreachable store, rejected credentials and missing bucket are
//!   [`ErrorKind::Storage`]; a missing `file://` directory is [`ErrorKind::NotFound`]; each
//!   message names the store location and the key.
//! - **Retries** of transient failures (5xx, throttling, timeouts, connection resets) happen
//!   inside the implementation; an error returned to the caller is final.
//! - **Cancellation**: dropping a returned future cancels the request; it never leaves a
//!   partially written object visible.

use std::fmt;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use futures::stream::BoxStream;

use crate::error::{Error, Result};

pub mod iam;
pub mod local;
pub mod s3;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    pub key: String,
    pub size: u64,
    pub last_modified: Option<DateTime<Utc>>,
}

/// An upload that was started with `put_multipart` and neither completed nor aborted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingUpload {
    pub key: String,
    pub upload_id: String,
    pub initiated: Option<DateTime<Utc>>,
}

/// Whether [`ObjectStore::put_if_absent`] wrote the object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    Created,
    AlreadyExists,
}

/// A key `delete` could not remove, and the store's reason (e.g. object lock retention).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub key: String,
    pub reason: String,
}

pub struct GetResult {
    pub size: u64,
    pub stream: BoxStream<'static, Result<Bytes>>,
}

#[async_trait]
pub trait ObjectStore: Send + Sync + fmt::Debug {
    /// Where this store points, safe to print (no credentials).
    fn location(&self) -> String;

    /// Fails unless the store is reachable, the credentials are accepted and the
    /// bucket/directory exists. Run before any work starts; creates nothing.
    async fn check(&self) -> Result<()>;

    /// [`check`](Self::check) for a command that will write: a store that can be created
    /// (a local directory) is created first.
    async fn prepare_for_writing(&self) -> Result<()> {
        self.check().await
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<()>;

    async fn put_multipart(&self, key: &str) -> Result<Box<dyn MultipartUpload>>;

    /// The object's bytes as a stream. A read that breaks off mid-body (a reset, a closed
    /// connection, no bytes for the read timeout) MUST be resumed where it stopped, not
    /// restarted or failed, within the retry policy; the resumed read MUST be of the same
    /// object (S3: `If-Match` on the first answer's ETag), and an object replaced meanwhile
    /// MUST fail as [`ErrorKind::Integrity`] naming it, never splice two objects. Callers
    /// still check size and SHA-256 end to end.
    async fn get(&self, key: &str) -> Result<GetResult>;

    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>>;

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>>;

    /// Create the object unless one exists at the key.
    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<Created>;

    async fn delete(&self, keys: &[String]) -> Result<Vec<Refused>>;

    /// Unfinished multipart uploads under the prefix (for prune and for tests of the abort rule).
    async fn list_uploads(&self, prefix: &str) -> Result<Vec<PendingUpload>>;

    /// Abort an unfinished upload found by `list_uploads`.
    async fn abort_upload(&self, upload: &PendingUpload) -> Result<()>;
}

/// One multipart upload. Parts are numbered in the order `put_part` is called; the returned
/// futures may run concurrently and complete in any order.
#[async_trait]
pub trait MultipartUpload: Send {
    /// Stage the next part. Every part but the last must be at least [`MIN_PART_SIZE`] bytes.
    fn put_part(&mut self, data: Bytes) -> BoxFuture<'static, Result<()>>;

    /// Make the object visible. Every `put_part` future must have completed successfully.
    async fn complete(&mut self) -> Result<()>;

    /// Remove everything staged. Safe to call after a failed `complete`.
    async fn abort(&mut self) -> Result<()>;
}

/// S3's lower bound for every part but the last.
pub const MIN_PART_SIZE: u64 = 5 * 1024 * 1024;
/// S3's upper bound for one part.
pub const MAX_PART_SIZE: u64 = 5 * 1024 * 1024 * 1024;
/// S3's upper bound on parts per upload.
pub const MAX_PARTS: u64 = 10_000;

/// S3-specific settings; ignored by `file://`.
#[derive(Debug, Clone)]
pub struct S3Options {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub path_style: bool,
    /// PEM CA files trusted besides the system's roots (`--s3-ca-file`, `AWS_CA_BUNDLE`).
    pub ca_files: Vec<std::path::PathBuf>,
    pub credentials: S3Credentials,
    /// Which credentials were chosen and why, logged when the store is opened.
    pub credentials_note: Option<String>,
    /// A download or upload that moves no byte for this long is given up and retried.
    pub read_timeout: std::time::Duration,
}

impl Default for S3Options {
    fn default() -> Self {
        S3Options {
            endpoint: None,
            region: None,
            path_style: false,
            ca_files: Vec::new(),
            credentials: S3Credentials::default(),
            credentials_note: None,
            read_timeout: DEFAULT_READ_TIMEOUT,
        }
    }
}

/// `--read-timeout`'s default.
pub const DEFAULT_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// How requests to the store are authenticated.
#[derive(Debug, Clone, Default)]
pub enum S3Credentials {
    /// The AWS SDK's chain: `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY` (ICOS HMAC keys),
    /// profiles, web identity.
    #[default]
    AwsChain,
    /// HMAC keys from an ICOS service credential file (`cos_hmac_keys`).
    Hmac {
        access_key_id: String,
        secret_access_key: crate::config::Secret,
    },
    /// An IBM Cloud IAM API key, exchanged for bearer tokens.
    Iam(iam::IamSettings),
}

/// Open the store named by a storage URL (`s3://bucket/prefix` or `file:///dir`).
pub async fn open(url: &str, s3: &S3Options) -> Result<Box<dyn ObjectStore>> {
    if let Some(rest) = url.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(Error::usage(format!(
                "storage URL {url:?} has no bucket: expected s3://bucket/prefix"
            )));
        }
        Ok(Box::new(s3::S3Store::new(bucket, prefix, s3).await?))
    } else if let Some(path) = url.strip_prefix("file://") {
        if path.is_empty() {
            return Err(Error::usage(format!(
                "storage URL {url:?} has no directory: expected file:///path/to/dir"
            )));
        }
        Ok(Box::new(local::LocalStore::new(path)?))
    } else if url.contains("://") {
        Err(Error::usage(format!(
            "storage URL {url:?} is not supported: use s3://bucket/prefix or file:///dir"
        )))
    } else {
        // A bare path is the friendliest reading of "a local directory".
        Ok(Box::new(local::LocalStore::new(url)?))
    }
}

/// Reject keys that could escape a prefix or a directory.
pub(crate) fn validate_key(key: &str) -> Result<()> {
    let bad = key.is_empty()
        || key.starts_with('/')
        || key
            .split('/')
            .any(|seg| seg.is_empty() || seg == ".." || seg == ".");
    if bad {
        Err(Error::usage(format!("invalid object key {key:?}")))
    } else {
        Ok(())
    }
}

/// Joins a prefix and a key with exactly one `/`.
pub(crate) fn join_key(prefix: &str, key: &str) -> String {
    let prefix = prefix.trim_matches('/');
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}/{key}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        assert!(validate_key("a/b/c.json").is_ok());
        assert!(validate_key("a/../b").is_err());
        assert!(validate_key("/a").is_err());
        assert!(validate_key("a//b").is_err());
        assert_eq!(join_key("", "a"), "a");
        assert_eq!(join_key("/p/q/", "a"), "p/q/a");
    }
}
