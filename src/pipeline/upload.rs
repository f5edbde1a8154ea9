//! The async end of the backup pipeline: buffer chunks into parts and upload them with bounded
//! concurrency. Like object_store's `WriteMultipart::finish`, every failure path aborts the
//! multipart upload before returning.

use bytes::BytesMut;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Message, PipelineOptions};
use crate::error::{Error, Result};
use crate::storage::{MultipartUpload, ObjectStore, MAX_PART_SIZE};

/// Parts per size tier: the part size doubles every 1,000 parts, so S3's 10,000-part limit
/// holds `base × 1,000 × (2¹⁰ − 1)` bytes — about 5 TiB from the 5 MiB minimum, 8 TiB from the
/// 8 MiB default — while small dumps keep small, cheap-to-retry parts.
const PARTS_PER_TIER: u64 = 1_000;

/// Size of the part with 0-based `index`.
pub fn part_size_for(index: u64, base: u64) -> u64 {
    let tier = (index / PARTS_PER_TIER).min(20) as u32;
    base.saturating_mul(1u64 << tier).min(MAX_PART_SIZE)
}

/// Upload what arrives on `rx` to `key`. Completes the object only when a `Message::Finish`
/// arrives; if the channel closes without one, the cancel token fires, or any part fails, the
/// multipart upload is aborted and an error returned. Small streams (less than one part) are
/// written with a single PUT. Returns the number of parts used (0 for a single PUT).
pub async fn upload_stream(
    store: &dyn ObjectStore,
    key: &str,
    mut rx: mpsc::Receiver<Message>,
    options: &PipelineOptions,
    cancel: &CancellationToken,
) -> Result<u64> {
    let mut state = UploadState {
        upload: None,
        in_flight: FuturesUnordered::new(),
        parts: 0,
    };
    let result = state.run(store, key, &mut rx, options, cancel).await;
    if result.is_err() {
        // Close the channel first so the producer stops, then drop unfinished part requests.
        drop(rx);
        state.in_flight.clear();
        if let Some(upload) = state.upload.as_mut() {
            if let Err(abort_error) = upload.abort().await {
                tracing::warn!(
                    key,
                    error = %abort_error.chain(),
                    "could not abort the multipart upload; `kura prune` aborts it after the grace period"
                );
            }
        }
    }
    result.map(|()| state.parts)
}

type PartFuture = futures::future::BoxFuture<'static, Result<()>>;

struct UploadState {
    upload: Option<Box<dyn MultipartUpload>>,
    in_flight: FuturesUnordered<PartFuture>,
    parts: u64,
}

impl UploadState {
    async fn run(
        &mut self,
        store: &dyn ObjectStore,
        key: &str,
        rx: &mut mpsc::Receiver<Message>,
        options: &PipelineOptions,
        cancel: &CancellationToken,
    ) -> Result<()> {
        // Each part gets one exact allocation, so memory is (parts in flight + 1) × part
        // size and never the doubling a growing buffer would do.
        let mut buffer = BytesMut::with_capacity(part_size_for(0, options.part_size) as usize);
        loop {
            let message = tokio::select! {
                biased;
                _ = cancel.cancelled() => return Err(Error::interrupted()),
                Some(done) = self.in_flight.next(), if !self.in_flight.is_empty() => {
                    done?;
                    continue;
                }
                message = rx.recv() => message,
            };
            let mut chunk = match message {
                Some(Message::Data(chunk)) => chunk,
                Some(Message::Finish) => break,
                None => {
                    return Err(Error::failed(format!(
                        "the data for {key} ended before it was complete"
                    )))
                }
            };
            while !chunk.is_empty() {
                let size = part_size_for(self.parts, options.part_size) as usize;
                let take = (size - buffer.len()).min(chunk.len());
                buffer.extend_from_slice(&chunk.split_to(take));
                if buffer.len() == size {
                    let next = part_size_for(self.parts + 1, options.part_size) as usize;
                    let part = std::mem::replace(&mut buffer, BytesMut::with_capacity(next));
                    self.push_part(store, key, part.freeze(), options, cancel)
                        .await?;
                }
            }
        }
        if self.upload.is_none() {
            return store.put(key, buffer.freeze()).await;
        }
        if !buffer.is_empty() {
            let part = buffer.split().freeze();
            self.push_part(store, key, part, options, cancel).await?;
        }
        while let Some(done) = self.next_done(cancel).await? {
            done?;
        }
        if cancel.is_cancelled() {
            return Err(Error::interrupted());
        }
        self.upload
            .as_mut()
            .expect("multipart upload was started")
            .complete()
            .await
    }

    async fn push_part(
        &mut self,
        store: &dyn ObjectStore,
        key: &str,
        part: bytes::Bytes,
        options: &PipelineOptions,
        cancel: &CancellationToken,
    ) -> Result<()> {
        if self.upload.is_none() {
            self.upload = Some(store.put_multipart(key).await?);
        }
        while self.in_flight.len() >= options.upload_concurrency {
            if let Some(done) = self.next_done(cancel).await? {
                done?;
            }
        }
        if self.parts >= crate::storage::MAX_PARTS {
            return Err(Error::failed(format!(
                "{key} needs more than 10,000 parts: raise --part-size"
            )));
        }
        let upload = self.upload.as_mut().expect("multipart upload was started");
        self.in_flight.push(upload.put_part(part));
        self.parts += 1;
        Ok(())
    }

    /// The next finished part, or `None` when none are in flight; fails on cancellation.
    async fn next_done(&mut self, cancel: &CancellationToken) -> Result<Option<Result<()>>> {
        if self.in_flight.is_empty() {
            return Ok(None);
        }
        tokio::select! {
            biased;
            _ = cancel.cancelled() => Err(Error::interrupted()),
            done = self.in_flight.next() => Ok(done),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{MAX_PARTS, MIN_PART_SIZE};

    #[test]
    fn part_sizes_grow_so_large_streams_fit() {
        assert_eq!(part_size_for(0, MIN_PART_SIZE), MIN_PART_SIZE);
        assert_eq!(part_size_for(999, MIN_PART_SIZE), MIN_PART_SIZE);
        assert_eq!(part_size_for(1000, MIN_PART_SIZE), 2 * MIN_PART_SIZE);
        let capacity: u64 = (0..MAX_PARTS)
            .map(|i| part_size_for(i, MIN_PART_SIZE))
            .sum();
        assert!(
            capacity > 50 << 30,
            "10,000 parts hold only {capacity} bytes"
        );
        assert!(
            capacity > 4 << 40,
            "10,000 parts hold only {capacity} bytes"
        );
        assert!((0..MAX_PARTS).all(|i| part_size_for(i, 4 << 30) <= MAX_PART_SIZE));
    }
}
