//! Streaming stages between a database tool and the object store.
//!
//! Backup: `producer (blocking thread: child stdout → zstd → [age] → ChunkSink)` → bounded
//! channel → `upload::upload_stream` (async multipart upload). Restore: `download` (async) →
//! bounded channel → `VerifyingReader` (blocking: SHA-256 and size) → [age] → zstd decoder →
//! child stdin. The SHA-256 is of the stored bytes, encrypted or not, so checking a backup's
//! integrity never needs a key.
//!
//! Backpressure is the bounded channel: when uploads are slow the sink blocks, zstd stops
//! reading, and the dump tool blocks on its stdout pipe. Peak memory is therefore set by the
//! configuration (about `(upload_concurrency + 1) × part_size` plus the channels between the
//! stages), never by the size of the database.

use std::io::{self, Read, Write};

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use tokio_util::sync::CancellationToken;

use crate::error::{Error, ErrorKind, Result};
use crate::progress::Progress;
use crate::storage::ObjectStore;

pub mod encryption;
pub mod upload;

use encryption::{AgeWriter, Identities, Recipients};
use std::sync::Arc;

/// Size of the chunks handed from the blocking stages to the async ones.
pub const CHUNK_SIZE: usize = 512 << 10;
/// Chunks that may wait in a channel between two stages.
pub const CHANNEL_DEPTH: usize = 4;

#[derive(Debug, Clone)]
pub struct PipelineOptions {
    /// zstd level, 1 (fast) to 19 (small). 3 is zstd's own default.
    pub compression_level: i32,
    /// zstd worker threads; 0 compresses on the calling thread.
    pub compression_threads: u32,
    /// Size of the first multipart parts; grows past 1,000 parts (see `upload::part_size_for`).
    pub part_size: u64,
    /// Parts uploaded at the same time.
    pub upload_concurrency: usize,
    /// Encrypt every part to these age recipients.
    pub encryption: Option<Recipients>,
}

impl Default for PipelineOptions {
    fn default() -> Self {
        PipelineOptions {
            compression_level: 3,
            compression_threads: default_compression_threads(),
            part_size: 8 << 20,
            // Two parts in flight keep a link to ICOS busy; each one more costs a part of memory.
            upload_concurrency: 2,
            encryption: None,
        }
    }
}

/// zstd workers: at least one, so compression runs beside the thread that reads the dump
/// (as `pg_dump | zstd` would); one less than the cores, at most 4, on larger machines.
fn default_compression_threads() -> u32 {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    cores.saturating_sub(1).clamp(1, 4)
}

/// zstd's multi-threaded job size: small jobs keep each worker's buffers to a few MiB.
const ZSTD_JOB_SIZE: u32 = 512 << 10;

impl PipelineOptions {
    pub fn validate(&self) -> Result<()> {
        if !(1..=22).contains(&self.compression_level) {
            return Err(Error::usage(format!(
                "compression level {} is out of range 1-22",
                self.compression_level
            )));
        }
        if self.part_size < crate::storage::MIN_PART_SIZE
            || self.part_size > crate::storage::MAX_PART_SIZE
        {
            return Err(Error::usage(format!(
                "part size {} is out of range 5 MiB - 5 GiB",
                self.part_size
            )));
        }
        if self.upload_concurrency == 0 || self.upload_concurrency > 64 {
            return Err(Error::usage("upload concurrency must be between 1 and 64"));
        }
        Ok(())
    }
}

/// `io::copy` with a buffer sized for dump streams: 8 KiB reads (std's default) cost one
/// syscall and one encoder call per 8 KiB, measurable at hundreds of MB/s.
pub fn copy_large(reader: &mut dyn Read, writer: &mut dyn Write) -> io::Result<u64> {
    let mut buffer = vec![0u8; 256 << 10];
    let mut total = 0u64;
    loop {
        let n = match reader.read(&mut buffer) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        writer.write_all(&buffer[..n])?;
        total += n as u64;
    }
}

/// What the blocking producer sends to the uploader. The upload is only completed after an
/// explicit `Finish`: a channel that closes without one means the producer failed, and the
/// upload is aborted.
#[derive(Debug)]
pub enum Message {
    Data(Bytes),
    Finish,
}

/// Byte counts and digest of one stored object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digested {
    pub bytes: u64,
    pub sha256: String,
}

/// The end of the compression stage: hashes and counts the stored bytes and hands them to the
/// uploader in [`CHUNK_SIZE`] chunks, blocking when the uploader is behind.
pub struct ChunkSink {
    tx: mpsc::Sender<Message>,
    buffer: BytesMut,
    hasher: Sha256,
    bytes: u64,
}

impl ChunkSink {
    pub fn new(tx: mpsc::Sender<Message>) -> Self {
        ChunkSink {
            tx,
            buffer: BytesMut::with_capacity(CHUNK_SIZE),
            hasher: Sha256::new(),
            bytes: 0,
        }
    }

    fn send(&mut self, message: Message) -> io::Result<()> {
        self.tx
            .blocking_send(message)
            .map_err(|_| upload_stopped_io())
    }

    fn send_buffer(&mut self) -> io::Result<()> {
        if !self.buffer.is_empty() {
            let chunk = self.buffer.split().freeze();
            self.send(Message::Data(chunk))?;
        }
        Ok(())
    }

    /// Flush and tell the uploader the stream is whole. Call only after the producer has
    /// verified its own success (e.g. the dump tool exited 0).
    pub fn finish(mut self) -> io::Result<Digested> {
        self.send_buffer()?;
        self.send(Message::Finish)?;
        Ok(Digested {
            bytes: self.bytes,
            sha256: hex::encode(self.hasher.finalize_reset()),
        })
    }
}

/// What a producer sees when the uploader has gone away: the uploader's own error is the one
/// to report. A type, so the decision never depends on message text.
#[derive(Debug, thiserror::Error)]
#[error("the upload stopped")]
pub struct UploadStopped;

/// [`UploadStopped`] as the I/O error a producer's writes fail with.
pub fn upload_stopped_io() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, UploadStopped)
}

/// Whether an I/O error is [`upload_stopped_io`], as it comes out of zstd or a copy.
pub fn is_upload_stopped_io(err: &io::Error) -> bool {
    err.get_ref()
        .is_some_and(|inner| inner.is::<UploadStopped>())
}

impl Error {
    pub fn upload_stopped() -> Error {
        Error::with_source(ErrorKind::Storage, "the upload stopped", UploadStopped)
    }
}

/// Whether a producer failed only because the uploader went away (however it was wrapped).
pub fn is_upload_stopped(err: &Error) -> bool {
    let mut next: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(err);
    while let Some(cause) = next {
        let io_stopped = cause
            .downcast_ref::<io::Error>()
            .is_some_and(is_upload_stopped_io);
        if cause.is::<UploadStopped>() || io_stopped {
            return true;
        }
        next = cause.source();
    }
    false
}

impl Write for ChunkSink {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.hasher.update(data);
        self.bytes += data.len() as u64;
        let mut rest = data;
        while !rest.is_empty() {
            let room = CHUNK_SIZE - self.buffer.len();
            let take = room.min(rest.len());
            self.buffer.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.buffer.len() >= CHUNK_SIZE {
                self.send_buffer()?;
            }
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Counts the raw (uncompressed) bytes written through it and reports them as progress.
struct CountingWriter<W> {
    inner: W,
    bytes: u64,
    progress: Option<Progress>,
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(data)?;
        self.bytes += n as u64;
        if let Some(progress) = &self.progress {
            progress.add(n as u64);
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Where zstd writes: straight to the sink, or through age first.
enum Sealing {
    Plain(ChunkSink),
    Age(AgeWriter<ChunkSink>),
}

impl Sealing {
    fn new(sink: ChunkSink, encryption: Option<&Recipients>) -> io::Result<Sealing> {
        Ok(match encryption {
            None => Sealing::Plain(sink),
            Some(recipients) => Sealing::Age(recipients.encrypt(sink)?),
        })
    }

    fn finish(self) -> io::Result<ChunkSink> {
        match self {
            Sealing::Plain(sink) => Ok(sink),
            Sealing::Age(writer) => writer.finish(),
        }
    }
}

impl Write for Sealing {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        match self {
            Sealing::Plain(sink) => sink.write(data),
            Sealing::Age(writer) => writer.write(data),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sealing::Plain(sink) => sink.flush(),
            Sealing::Age(writer) => writer.flush(),
        }
    }
}

/// What one stored object took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub raw_bytes: u64,
    pub stored: Digested,
    /// Multipart parts used; 0 when it fit in one PUT.
    pub parts: u64,
}

/// Store what `producer` writes, zstd-compressed, at `key`.
///
/// `producer` runs on a blocking thread and writes raw bytes; it must return `Ok` only once its
/// data is known to be whole (e.g. the dump tool exited 0). Only then is the object completed;
/// on any error — the producer's, the store's, or cancellation — the multipart upload is
/// aborted and nothing is visible at `key`.
pub async fn store_stream<F>(
    store: &dyn ObjectStore,
    key: &str,
    options: &PipelineOptions,
    cancel: &CancellationToken,
    progress: Option<Progress>,
    producer: F,
) -> Result<Stored>
where
    F: FnOnce(&mut dyn Write) -> Result<()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
    let compression = options.clone();
    let compress = tokio::task::spawn_blocking(move || -> Result<(u64, Digested)> {
        let io_error = |e: io::Error| {
            if is_upload_stopped_io(&e) {
                Error::upload_stopped()
            } else {
                Error::with_source(ErrorKind::Failed, "compressing", e)
            }
        };
        let sealing =
            Sealing::new(ChunkSink::new(tx), compression.encryption.as_ref()).map_err(io_error)?;
        let mut encoder =
            zstd::Encoder::new(sealing, compression.compression_level).map_err(io_error)?;
        // zstd's own frame checksum lets even a copy taken without the manifest be checked.
        encoder.include_checksum(true).map_err(io_error)?;
        if compression.compression_threads > 0 {
            encoder
                .multithread(compression.compression_threads)
                .map_err(io_error)?;
            encoder
                .set_parameter(zstd::stream::raw::CParameter::JobSize(ZSTD_JOB_SIZE))
                .map_err(io_error)?;
        }
        let mut counting = CountingWriter {
            inner: encoder,
            bytes: 0,
            progress,
        };
        producer(&mut counting)?;
        let raw = counting.bytes;
        let sealing = counting.inner.finish().map_err(io_error)?;
        let digest = sealing
            .finish()
            .and_then(ChunkSink::finish)
            .map_err(io_error)?;
        Ok((raw, digest))
    });
    let uploaded = upload::upload_stream(store, key, rx, options, cancel).await;
    let compressed = compress
        .await
        .map_err(|e| Error::failed(format!("compression task failed: {e}")))?;
    match (compressed, uploaded) {
        (Ok((raw_bytes, stored)), Ok(parts)) => Ok(Stored {
            raw_bytes,
            stored,
            parts,
        }),
        // The producer's own failure is the cause; the uploader only saw the stream stop.
        (Err(e), _) if !is_upload_stopped(&e) => Err(e),
        (_, Err(e)) => Err(e),
        (Err(e), Ok(_)) => Err(e),
    }
}

/// Hand `read` the object's compressed stream: through age when `unseal` holds keys (the
/// object is encrypted), the stored bytes as they are otherwise. `Err` when the age header
/// cannot be opened: the caller reports it with [`unsealing_error`], which needs the reader
/// back, so `read` runs in here and its result carries no borrow of it.
fn with_unsealed<T>(
    reader: &mut VerifyingReader,
    unseal: &Option<Arc<Identities>>,
    read: impl FnOnce(Box<dyn Read + '_>) -> T,
) -> Result<T> {
    let compressed: Box<dyn Read + '_> = match unseal {
        None => Box::new(reader),
        Some(identities) => identities.decrypt(reader)?,
    };
    Ok(read(compressed))
}

/// Why an age file could not be opened, said as exactly as possible: a lost connection is
/// a storage error; a part that does not match its digest (or a damaged header in one that
/// does) is corruption, even where age reports it as "no matching key" (a flipped byte in
/// the wrapped file key); only a part intact by its digest that no key opens is a key problem.
fn unsealing_error(
    err: Error,
    mut verifying: VerifyingReader,
    object: &str,
    expected: &Digested,
) -> Error {
    if let Some(transport) = verifying.transport_error.take() {
        return Error::new(ErrorKind::Storage, transport);
    }
    match (err.kind(), verifying.verify(object, expected)) {
        (_, Err(checked)) => checked,
        (ErrorKind::Integrity, Ok(())) => err.context(format!("backup object {object}")),
        (_, Ok(())) => err,
    }
}

/// Copy the object at `from` to `to` with new recipients: downloaded and checked against
/// `expected`, decrypted with `unseal` if it is encrypted, and encrypted to `options`'
/// recipients (or stored plain without any), never decompressed. Nothing is visible at `to`
/// unless every byte of `from` matched; returns what was stored.
pub async fn reseal(
    store: &dyn ObjectStore,
    from: &str,
    expected: &Digested,
    unseal: Option<Arc<Identities>>,
    to: &str,
    options: &PipelineOptions,
    cancel: &CancellationToken,
) -> Result<Digested> {
    let (in_tx, in_rx) = mpsc::channel(CHANNEL_DEPTH);
    let (out_tx, out_rx) = mpsc::channel(CHANNEL_DEPTH);
    let object = from.to_string();
    let expected = expected.clone();
    let recipients = options.encryption.clone();
    let copy = tokio::task::spawn_blocking(move || -> Result<Digested> {
        let io_error = |e: io::Error| {
            if is_upload_stopped_io(&e) {
                Error::upload_stopped()
            } else {
                Error::with_source(ErrorKind::Failed, format!("re-encrypting {object}"), e)
            }
        };
        let mut verifying = VerifyingReader::new(in_rx, None);
        let mut sealing =
            Sealing::new(ChunkSink::new(out_tx), recipients.as_ref()).map_err(io_error)?;
        let copy = |mut plain: Box<dyn Read + '_>| copy_large(&mut plain, &mut sealing);
        let copied = match with_unsealed(&mut verifying, &unseal, copy) {
            Ok(copied) => copied,
            Err(e) => return Err(unsealing_error(e, verifying, &object, &expected)),
        };
        if let Some(transport) = verifying.transport_error.take() {
            return Err(Error::new(ErrorKind::Storage, transport));
        }
        // The whole object must match before the copy may complete.
        verifying.verify(&object, &expected)?;
        copied.map_err(io_error)?;
        sealing
            .finish()
            .and_then(ChunkSink::finish)
            .map_err(io_error)
    });
    let (downloaded, uploaded) = tokio::join!(
        download(store, from, in_tx, cancel),
        upload::upload_stream(store, to, out_rx, options, cancel)
    );
    let copied = copy
        .await
        .map_err(|e| Error::failed(format!("re-encryption task failed: {e}")))?;
    downloaded?;
    match (copied, uploaded) {
        (Ok(digest), Ok(_)) => Ok(digest),
        (Err(e), _) if !is_upload_stopped(&e) => Err(e),
        (_, Err(e)) => Err(e),
        (Err(e), Ok(_)) => Err(e),
    }
}

/// Read the object at `key`, checking it against `expected` (size and SHA-256 of the stored
/// bytes), and hand its decompressed bytes to `consumer` on a blocking thread.
///
/// The consumer must not make its work permanent: it returns a value (e.g. an open
/// transaction) that the caller commits only after this function returned `Ok`, which happens
/// only when every byte was read and matched. A corrupt or truncated object is an
/// [`ErrorKind::Integrity`] error naming `key`.
///
/// `unseal` holds the keys for an age-encrypted object (`None`: the object is not encrypted).
pub async fn read_verified<F, T>(
    store: &dyn ObjectStore,
    key: &str,
    expected: &Digested,
    unseal: Option<Arc<Identities>>,
    progress: Option<Progress>,
    cancel: &CancellationToken,
    consumer: F,
) -> Result<T>
where
    F: FnOnce(&mut dyn Read) -> Result<T> + Send + 'static,
    T: Send + 'static,
{
    let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
    let object = key.to_string();
    let expected = expected.clone();
    let decode = tokio::task::spawn_blocking(move || -> Result<T> {
        let decode_error = std::sync::Arc::new(std::sync::Mutex::new(None::<String>));
        let mut verifying = VerifyingReader::new(rx, progress);
        let decode = |compressed: Box<dyn Read + '_>| -> Result<T> {
            let decoder = zstd::Decoder::new(compressed).map_err(|e| {
                Error::with_source(ErrorKind::Failed, "starting the zstd decoder", e)
            })?;
            let mut tagged = TaggedReader {
                inner: decoder,
                error: std::sync::Arc::clone(&decode_error),
            };
            consumer(&mut tagged)
        };
        let consumed = match with_unsealed(&mut verifying, &unseal, decode) {
            Ok(consumed) => consumed,
            Err(e) => return Err(unsealing_error(e, verifying, &object, &expected)),
        };
        let decode_error = decode_error.lock().expect("decode error lock").take();
        if let Some(transport) = verifying.transport_error.take() {
            return Err(Error::new(ErrorKind::Storage, transport));
        }
        if let Some(message) = decode_error {
            // A stream that cannot be decoded is either corrupt or truncated; the digest says
            // which when the rest of the object is available, the decoder's message otherwise.
            return Err(match verifying.verify(&object, &expected) {
                Err(e) if e.kind() == ErrorKind::Integrity => e,
                _ => Error::integrity(format!(
                    "backup object {object} cannot be decompressed ({message}): it is corrupt"
                )),
            });
        }
        let value = consumed?;
        verifying.verify(&object, &expected)?;
        Ok(value)
    });
    download_into(store, key, tx, cancel, decode).await
}

/// Download `key` into `tx` while `decode` (a blocking task reading the channel) runs; the
/// decoder's outcome is the answer unless the download itself failed.
async fn download_into<T>(
    store: &dyn ObjectStore,
    key: &str,
    tx: mpsc::Sender<io::Result<Bytes>>,
    cancel: &CancellationToken,
    decode: tokio::task::JoinHandle<Result<T>>,
) -> Result<T> {
    let downloaded = download(store, key, tx, cancel).await;
    let decoded = decode
        .await
        .map_err(|e| Error::failed(format!("decompression task failed: {e}")))?;
    downloaded?;
    decoded
}

/// Hand the decompressed start of the object at `key` to `consumer`, which may stop reading
/// whenever it has what it needs; the rest of the object is not downloaded. Nothing is
/// verified, so what the consumer reads may only be looked at (an archive's table of
/// contents), never restored: restores go through [`read_verified`].
///
/// `expected` is read only when the object cannot be opened (an encrypted one whose age
/// header fails): then the whole object is checked, so damage is reported as damage.
pub async fn peek<F, T>(
    store: &dyn ObjectStore,
    key: &str,
    expected: &Digested,
    unseal: Option<Arc<Identities>>,
    cancel: &CancellationToken,
    consumer: F,
) -> Result<T>
where
    F: FnOnce(&mut dyn Read) -> Result<T> + Send + 'static,
    T: Send + 'static,
{
    let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
    let object = key.to_string();
    let expected = expected.clone();
    let decode = tokio::task::spawn_blocking(move || -> Result<T> {
        // Dropping the reader at the end closes the channel, which stops the download.
        let mut reader = VerifyingReader::new(rx, None);
        let decode = |compressed: Box<dyn Read + '_>| -> Result<T> {
            let mut decoder = zstd::Decoder::new(compressed).map_err(|e| {
                Error::with_source(ErrorKind::Failed, "starting the zstd decoder", e)
            })?;
            consumer(&mut decoder)
        };
        match with_unsealed(&mut reader, &unseal, decode) {
            Ok(peeked) => peeked,
            Err(e) => Err(unsealing_error(e, reader, &object, &expected)),
        }
    });
    download_into(store, key, tx, cancel, decode).await
}

/// Records decoder errors so they can be told apart from the consumer's own failures.
struct TaggedReader<R> {
    inner: R,
    error: std::sync::Arc<std::sync::Mutex<Option<String>>>,
}

impl<R: Read> Read for TaggedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf).inspect_err(|e| {
            *self.error.lock().expect("decode error lock") = Some(e.to_string());
        })
    }
}

/// Check the object at `key` against `expected` (size and SHA-256 of the stored bytes)
/// without decompressing it: for a restore that may write only once the whole object is known
/// to be intact (CouchDB has no transaction to roll back).
pub async fn check_stored(
    store: &dyn ObjectStore,
    key: &str,
    expected: &Digested,
    cancel: &CancellationToken,
) -> Result<()> {
    let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
    let object = key.to_string();
    let expected = expected.clone();
    let check = tokio::task::spawn_blocking(move || {
        VerifyingReader::new(rx, None).verify(&object, &expected)
    });
    download_into(store, key, tx, cancel, check).await
}

/// Stream an object into a channel, for a blocking consumer (`VerifyingReader`).
pub async fn download(
    store: &dyn ObjectStore,
    key: &str,
    tx: mpsc::Sender<io::Result<Bytes>>,
    cancel: &CancellationToken,
) -> Result<()> {
    let mut object = store.get(key).await?;
    loop {
        let chunk = tokio::select! {
            biased;
            _ = cancel.cancelled() => {
                // The consumer sees an error, never a clean end it could mistake for success.
                let _ = tx.send(Err(io::Error::other("interrupted"))).await;
                return Err(Error::interrupted());
            }
            // A consumer that has what it needs (a peek) ends the download, whatever
            // the store would say next.
            _ = tx.closed() => return Ok(()),
            chunk = object.stream.next() => chunk,
        };
        let Some(chunk) = chunk else { break };
        match chunk {
            Ok(chunk) => {
                if tx.send(Ok(chunk)).await.is_err() {
                    // The consumer stopped; it reports why.
                    break;
                }
            }
            // The consumer sees an error (never a clean end); the caller gets the store's own,
            // whose kind says what happened (an object replaced mid-read is corruption).
            Err(_) if tx.is_closed() => return Ok(()),
            Err(err) => {
                let _ = tx.send(Err(io::Error::other(err.chain()))).await;
                return Err(err);
            }
        }
    }
    Ok(())
}

/// Reads a downloaded object from a channel on a blocking thread, hashing and counting it so
/// the caller can compare with the manifest once the whole object was read.
pub struct VerifyingReader {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    current: Bytes,
    hasher: Sha256,
    bytes: u64,
    progress: Option<Progress>,
    /// A download failure, which must not be mistaken for corruption.
    transport_error: Option<String>,
}

impl VerifyingReader {
    pub fn new(rx: mpsc::Receiver<io::Result<Bytes>>, progress: Option<Progress>) -> Self {
        VerifyingReader {
            rx,
            current: Bytes::new(),
            hasher: Sha256::new(),
            bytes: 0,
            progress,
            transport_error: None,
        }
    }

    /// Read to the end (a decoder may stop before trailing bytes) and compare with what the
    /// manifest recorded. `object` names the object in the error.
    pub fn verify(mut self, object: &str, expected: &Digested) -> Result<()> {
        io::copy(&mut self, &mut io::sink())
            .map_err(|e| Error::with_source(ErrorKind::Storage, format!("reading {object}"), e))?;
        if self.bytes != expected.bytes {
            return Err(Error::integrity(format!(
                "backup object {object} is {} bytes but the manifest records {}: it is truncated or was replaced",
                self.bytes, expected.bytes
            )));
        }
        let actual = hex::encode(self.hasher.finalize_reset());
        if actual != expected.sha256 {
            return Err(Error::integrity(format!(
                "backup object {object} is corrupt: its SHA-256 is {actual} but the manifest records {}",
                expected.sha256
            )));
        }
        Ok(())
    }
}

impl Read for VerifyingReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(chunk)) => {
                    self.hasher.update(&chunk);
                    self.bytes += chunk.len() as u64;
                    if let Some(progress) = &self.progress {
                        progress.add(chunk.len() as u64);
                    }
                    self.current = chunk;
                }
                Some(Err(e)) => {
                    self.transport_error = Some(e.to_string());
                    return Err(e);
                }
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_stopped_is_recognised_by_type_however_wrapped() {
        assert!(is_upload_stopped_io(&upload_stopped_io()));
        assert!(!is_upload_stopped_io(&io::Error::new(
            io::ErrorKind::BrokenPipe,
            "the upload stopped"
        )));
        let wrapped = Error::with_source(ErrorKind::Failed, "compressing", upload_stopped_io())
            .context("backing up db1");
        assert!(is_upload_stopped(&wrapped));
        assert!(is_upload_stopped(&Error::upload_stopped()));
        // The same words in a message are not the condition.
        assert!(!is_upload_stopped(&Error::failed("the upload stopped")));
    }

    #[test]
    fn sink_hashes_counts_and_chunks() {
        let (tx, mut rx) = mpsc::channel(64);
        let handle = std::thread::spawn(move || {
            let mut sink = ChunkSink::new(tx);
            sink.write_all(&vec![7u8; CHUNK_SIZE * 2 + 10]).unwrap();
            sink.finish().unwrap()
        });
        let mut sizes = Vec::new();
        let mut finished = false;
        while let Some(message) = rx.blocking_recv() {
            match message {
                Message::Data(chunk) => sizes.push(chunk.len()),
                Message::Finish => finished = true,
            }
        }
        let digest = handle.join().unwrap();
        assert!(finished);
        assert_eq!(sizes, vec![CHUNK_SIZE, CHUNK_SIZE, 10]);
        assert_eq!(digest.bytes, (CHUNK_SIZE * 2 + 10) as u64);
        assert_eq!(
            digest.sha256,
            hex::encode(Sha256::digest(vec![7u8; CHUNK_SIZE * 2 + 10]))
        );
    }

    #[test]
    fn sink_reports_a_vanished_uploader() {
        let (tx, rx) = mpsc::channel(1);
        drop(rx);
        let mut sink = ChunkSink::new(tx);
        let err = sink.write_all(&vec![0u8; CHUNK_SIZE]).unwrap_err();
        assert!(is_upload_stopped_io(&err), "{err}");
    }

    #[test]
    fn verifying_reader_detects_flipped_and_missing_bytes() {
        let data = Bytes::from_static(b"hello backup");
        let good = Digested {
            bytes: data.len() as u64,
            sha256: hex::encode(Sha256::digest(&data)),
        };
        let feed = |payload: Bytes| {
            let (tx, rx) = mpsc::channel(4);
            tx.try_send(Ok(payload)).unwrap();
            drop(tx);
            VerifyingReader::new(rx, None)
        };
        assert!(feed(data.clone()).verify("obj", &good).is_ok());
        let err = feed(Bytes::from_static(b"hello backuq"))
            .verify("obj", &good)
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Integrity);
        assert!(err.to_string().contains("corrupt"), "{err}");
        let err = feed(data.slice(..5)).verify("obj", &good).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
    }
}
