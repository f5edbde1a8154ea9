//! Fault injection for tests (restic's `BackendTestHook`): a wrapper that fails a chosen
//! multipart part, so tests can prove every failure path aborts the upload and commits nothing,
//! and that refuses to delete chosen keys the way a bucket with object lock / retention does.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;

use super::{Created, GetResult, MultipartUpload, ObjectMeta, ObjectStore, PendingUpload, Refused};
use crate::error::{Error, ErrorKind, Result};

/// Delegates everything to `inner`, but the `fail_at_part`-th part put through any multipart
/// upload (counted across uploads, 1-based) fails with a storage error.
#[derive(Debug)]
pub struct FailingStore<S> {
    inner: S,
    fail_at_part: u64,
    parts_seen: Arc<AtomicU64>,
    protected: Option<String>,
}

impl<S: ObjectStore> FailingStore<S> {
    pub fn new(inner: S, fail_at_part: u64) -> Self {
        FailingStore {
            inner,
            fail_at_part,
            parts_seen: Arc::new(AtomicU64::new(0)),
            protected: None,
        }
    }

    /// Refuse to delete every key containing `pattern`, as a retention policy would.
    pub fn protecting(mut self, pattern: &str) -> Self {
        self.protected = Some(pattern.to_string());
        self
    }
}

#[async_trait]
impl<S: ObjectStore> ObjectStore for FailingStore<S> {
    fn location(&self) -> String {
        self.inner.location()
    }
    async fn check(&self) -> Result<()> {
        self.inner.check().await
    }
    async fn prepare_for_writing(&self) -> Result<()> {
        self.inner.prepare_for_writing().await
    }
    async fn put(&self, key: &str, data: Bytes) -> Result<()> {
        self.inner.put(key, data).await
    }
    async fn put_multipart(&self, key: &str) -> Result<Box<dyn MultipartUpload>> {
        Ok(Box::new(FailingUpload {
            inner: self.inner.put_multipart(key).await?,
            fail_at_part: self.fail_at_part,
            parts_seen: Arc::clone(&self.parts_seen),
        }))
    }
    async fn get(&self, key: &str) -> Result<GetResult> {
        self.inner.get(key).await
    }
    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>> {
        self.inner.head(key).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        self.inner.list(prefix).await
    }
    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<Created> {
        self.inner.put_if_absent(key, data).await
    }
    async fn delete(&self, keys: &[String]) -> Result<Vec<Refused>> {
        let (refused, allowed): (Vec<String>, Vec<String>) = keys.iter().cloned().partition(|k| {
            self.protected
                .as_ref()
                .is_some_and(|p| k.contains(p.as_str()))
        });
        let mut out = self.inner.delete(&allowed).await?;
        out.extend(refused.into_iter().map(|key| Refused {
            key,
            reason: "AccessDenied object is protected by a retention policy (injected)".into(),
        }));
        Ok(out)
    }
    async fn list_uploads(&self, prefix: &str) -> Result<Vec<PendingUpload>> {
        self.inner.list_uploads(prefix).await
    }
    async fn abort_upload(&self, upload: &PendingUpload) -> Result<()> {
        self.inner.abort_upload(upload).await
    }
}

struct FailingUpload {
    inner: Box<dyn MultipartUpload>,
    fail_at_part: u64,
    parts_seen: Arc<AtomicU64>,
}

#[async_trait]
impl MultipartUpload for FailingUpload {
    fn put_part(&mut self, data: Bytes) -> BoxFuture<'static, Result<()>> {
        let seen = self.parts_seen.fetch_add(1, Ordering::SeqCst) + 1;
        if seen == self.fail_at_part {
            async move {
                Err(Error::new(
                    ErrorKind::Storage,
                    format!("injected failure at part {seen}"),
                ))
            }
            .boxed()
        } else {
            self.inner.put_part(data)
        }
    }
    async fn complete(&mut self) -> Result<()> {
        self.inner.complete().await
    }
    async fn abort(&mut self) -> Result<()> {
        self.inner.abort().await
    }
}
