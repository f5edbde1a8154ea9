//! One lock per tenant's source, held by `backup` and `prune` so they never overlap.
//!
//! The lock is an object, `<tenant>/<source>/lock.json`, created with a conditional write so
//! exactly one run can create it. It names its holder (operation, host, pid) and an expiry
//! that the holder pushes forward while it works; a lock whose holder died (SIGKILL, node
//! loss) expires by itself and is taken over with a warning, so a crash never blocks every
//! later run the way a lock without expiry would. `kura unlock` removes one by hand.
//!
//! The holder reads the lock back after creating it: on a store that ignores conditional
//! writes, the one whose nonce is in the object is the holder.

use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use super::SourcePath;
use crate::error::{Error, ErrorKind, Result};
use crate::storage::{Created, ObjectStore};

pub const LOCK_NAME: &str = "lock.json";
/// How long a lock outlives its last refresh: long enough to ride out a slow store, short
/// enough that the next nightly run is not blocked by a dead one.
pub const LOCK_TTL: Duration = Duration::from_secs(15 * 60);
const REFRESH_EVERY: Duration = Duration::from_secs(5 * 60);
/// Long enough for a racing takeover's delete-and-create to land before we look again.
const TAKEOVER_SETTLE: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockInfo {
    /// What holds it: `backup` or `prune`.
    pub operation: String,
    pub host: String,
    pub pid: u32,
    pub nonce: String,
    pub kura_version: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

impl LockInfo {
    pub fn is_expired(&self, now: DateTime<Utc>) -> bool {
        self.expires_at <= now
    }

    pub fn describe(&self) -> String {
        format!(
            "{} on host {:?} (pid {}) since {}, expires {}",
            self.operation,
            self.host,
            self.pid,
            self.created_at.format("%Y-%m-%d %H:%M:%SZ"),
            self.expires_at.format("%Y-%m-%d %H:%M:%SZ")
        )
    }
}

pub fn lock_key(path: &SourcePath) -> String {
    format!("{}{LOCK_NAME}", path.prefix())
}

/// A held lock. Call [`Lock::release`] when done; dropping it stops the refresh and leaves
/// the object to expire.
pub struct Lock {
    key: String,
    info: LockInfo,
    refresher: JoinHandle<()>,
}

impl Lock {
    /// Take the lock of `path` for `operation`, or fail with [`ErrorKind::Locked`] naming the
    /// holder.
    pub async fn acquire(
        store: std::sync::Arc<dyn ObjectStore>,
        path: &SourcePath,
        operation: &str,
    ) -> Result<Lock> {
        let key = lock_key(path);
        let now = Utc::now();
        let info = LockInfo {
            operation: operation.to_string(),
            host: hostname(),
            pid: std::process::id(),
            nonce: format!("{:016x}", rand::random::<u64>()),
            kura_version: env!("CARGO_PKG_VERSION").to_string(),
            created_at: now,
            expires_at: now + chrono::Duration::from_std(LOCK_TTL).expect("small duration"),
        };
        let body = encode(&info)?;
        let mut took_over = false;
        let mut attempts = 0;
        loop {
            attempts += 1;
            // A HEAD first narrows the window on stores that ignore If-None-Match.
            let free = store.head(&key).await?.is_none();
            if free && store.put_if_absent(&key, body.clone()).await? == Created::Created {
                break;
            }
            let held = match read(store.as_ref(), &key).await? {
                // Released between our write and our read: try again, a few times.
                None if attempts < 5 => continue,
                None => {
                    return Err(Error::new(
                        ErrorKind::Locked,
                        format!(
                        "lock {key} keeps changing hands: other kura runs are starting; try again"
                    ),
                    ))
                }
                Some(held) => held,
            };
            match held {
                Ok(held) if !held.is_expired(Utc::now()) || took_over => {
                    return Err(locked(path, &key, &held));
                }
                Ok(held) => {
                    tracing::warn!(
                        lock = %key,
                        holder = %held.describe(),
                        "taking over an expired lock: its holder stopped without releasing it (crash, SIGKILL or lost node)"
                    );
                }
                Err(why) => {
                    return Err(Error::new(
                        ErrorKind::Locked,
                        format!(
                            "{}/{} is locked by an unreadable lock object {key} ({why}): if no kura run is active, remove it with `kura unlock {} --force`",
                            path.tenant, path.source, path.source
                        ),
                    ));
                }
            }
            delete_lock(store.as_ref(), &key).await?;
            took_over = true;
        }
        // Read back: on a store that ignored the condition, the last writer holds the lock.
        // After a takeover, read again a moment later: another run that saw the same expired
        // lock may have deleted ours and written its own (stores offer no compare-and-delete).
        let checks = if took_over { 2 } else { 1 };
        for check in 0..checks {
            if check > 0 {
                tokio::time::sleep(TAKEOVER_SETTLE).await;
            }
            match read(store.as_ref(), &key).await {
                Ok(Some(Ok(held))) if held.nonce == info.nonce => {}
                Ok(Some(Ok(held))) => return Err(locked(path, &key, &held)),
                Ok(_) => {
                    return Err(Error::new(
                        ErrorKind::Locked,
                        format!("lock {key} changed while it was being taken: another kura run is starting; try again"),
                    ))
                }
                Err(e) => {
                    // Ours or not, a lock nobody can confirm must not linger for its TTL.
                    let _ = delete_lock(store.as_ref(), &key).await;
                    return Err(e.context(format!("confirming lock {key}")));
                }
            }
        }
        tracing::debug!(lock = %key, "lock taken");
        let refresher = tokio::spawn(refresh(store, key.clone(), info.clone()));
        Ok(Lock {
            key,
            info,
            refresher,
        })
    }

    /// Delete the lock if it is still ours. Failures are logged: the lock then expires.
    pub async fn release(mut self, store: &dyn ObjectStore) {
        // The refresher must be gone before the delete, or a refresh in flight could write
        // the lock back after it.
        self.refresher.abort();
        let _ = (&mut self.refresher).await;
        match read(store, &self.key).await {
            Ok(Some(Ok(held))) if held.nonce == self.info.nonce => {
                if let Err(e) = delete_lock(store, &self.key).await {
                    tracing::warn!(lock = %self.key, error = %e.chain(), "could not release the lock; it expires by itself");
                }
            }
            Ok(Some(Ok(held))) => {
                tracing::warn!(lock = %self.key, holder = %held.describe(), "the lock was taken over by another run while this one held it");
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(lock = %self.key, error = %e.chain(), "could not release the lock; it expires by itself")
            }
        }
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        self.refresher.abort();
    }
}

/// Push the expiry forward while the holder works.
async fn refresh(store: std::sync::Arc<dyn ObjectStore>, key: String, mut info: LockInfo) {
    loop {
        tokio::time::sleep(REFRESH_EVERY).await;
        match read(store.as_ref(), &key).await {
            Ok(Some(Ok(held))) if held.nonce != info.nonce => {
                tracing::error!(lock = %key, holder = %held.describe(), "this run's lock was taken over by another run: they may now overlap");
                return;
            }
            Err(e) => {
                tracing::warn!(lock = %key, error = %e.chain(), "could not read the lock to refresh it");
                continue;
            }
            _ => {}
        }
        info.expires_at =
            Utc::now() + chrono::Duration::from_std(LOCK_TTL).expect("small duration");
        let written = match encode(&info) {
            Ok(body) => store.put(&key, body).await,
            Err(e) => Err(e),
        };
        if let Err(e) = written {
            tracing::warn!(lock = %key, error = %e.chain(), "could not refresh the lock");
        }
    }
}

/// `None` when there is no lock; `Some(Err(why))` when the object is not a lock kura can read.
pub async fn read(
    store: &dyn ObjectStore,
    key: &str,
) -> Result<Option<std::result::Result<LockInfo, String>>> {
    let mut object = match store.get(key).await {
        Ok(object) => object,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut json = Vec::new();
    while let Some(chunk) = object.stream.next().await {
        json.extend_from_slice(&chunk?);
    }
    Ok(Some(
        serde_json::from_slice(&json).map_err(|e| e.to_string()),
    ))
}

/// Remove the lock of `path`. Without `force` only an expired lock is removed.
pub async fn unlock(store: &dyn ObjectStore, path: &SourcePath, force: bool) -> Result<String> {
    let key = lock_key(path);
    let message = match read(store, &key).await? {
        None => return Ok(format!("{}/{} is not locked", path.tenant, path.source)),
        Some(Ok(held)) if !held.is_expired(Utc::now()) && !force => {
            return Err(Error::new(
                ErrorKind::Locked,
                format!(
                    "{}/{} is locked by {}, which has not expired: if that run is really gone (check the pod or process), remove the lock with `kura unlock {} --force`",
                    path.tenant,
                    path.source,
                    held.describe(),
                    path.source
                ),
            ));
        }
        Some(Ok(held)) => format!("removed the lock held by {}", held.describe()),
        Some(Err(_)) if !force => {
            return Err(Error::usage(format!(
                "{key} is not a lock kura can read: remove it with `kura unlock {} --force`",
                path.source
            )))
        }
        Some(Err(_)) => format!("removed the unreadable lock {key}"),
    };
    delete_lock(store, &key).await?;
    Ok(message)
}

/// Delete the lock object; a store that refuses (retention, permissions) is an error here,
/// since a lock that cannot be removed blocks every later run.
async fn delete_lock(store: &dyn ObjectStore, key: &str) -> Result<()> {
    match store.delete(&[key.to_string()]).await?.first() {
        None => Ok(()),
        Some(refused) => Err(Error::new(
            ErrorKind::Storage,
            format!(
                "the store refused to delete the lock {key} ({}): exclude the lock objects from retention rules and grant delete permission",
                refused.reason
            ),
        )),
    }
}

fn locked(path: &SourcePath, key: &str, held: &LockInfo) -> Error {
    Error::new(
        ErrorKind::Locked,
        format!(
            "{}/{} is locked by {} ({key}): another backup or prune of this source is running; try again after it finishes, or, if that run is gone, `kura unlock {} --force`",
            path.tenant,
            path.source,
            held.describe(),
            path.source
        ),
    )
}

fn encode(info: &LockInfo) -> Result<Bytes> {
    serde_json::to_vec_pretty(info)
        .map(Bytes::from)
        .map_err(|e| Error::failed(format!("cannot encode the lock: {e}")))
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}
