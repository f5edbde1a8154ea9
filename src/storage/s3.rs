//! `s3://bucket/prefix`: IBM Cloud Object Storage and other S3-compatible stores.
//!
//! ICOS (and MinIO, Ceph, older S3 clones) reject what recent aws-sdk-s3 versions send by
//! default: `x-amz-checksum-crc32` headers and `aws-chunked` bodies with checksum trailers.
//! The client is therefore built with checksum calculation and validation "when required",
//! every body is a sized buffer (so no chunked encoding is ever needed), and DeleteObjects —
//! which the SDK still checksums with CRC32 in that mode — gets `Content-MD5` instead.
//! `tests/s3_wire.rs` inspects the requests on the wire to hold this in place.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{Region, RequestChecksumCalculation, ResponseChecksumValidation};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, Delete, ObjectIdentifier};
use aws_sdk_s3::Client;
use base64::Engine;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use md5::{Digest, Md5};

use super::iam::{IamAuth, Tokens};
use super::{
    join_key, validate_key, Created, GetResult, MultipartUpload, ObjectMeta, ObjectStore,
    PendingUpload, Refused, S3Credentials, S3Options,
};
use crate::error::{Error, ErrorKind, Result};
use crate::retry::RetryPolicy;

/// S3 accepts at most this many keys per DeleteObjects request.
const DELETE_BATCH: usize = 1000;

#[derive(Debug, Clone)]
pub struct S3Store {
    client: Client,
    bucket: String,
    prefix: String,
    endpoint: String,
    read_timeout: Duration,
    /// Where the credentials come from, for advice on a refusal.
    credentials_hint: &'static str,
}

const HMAC_HINT: &str =
    "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (ICOS HMAC keys) or the service credential's cos_hmac_keys";
const IAM_HINT: &str = "check the API key's service ID or user has a role on the bucket (IBM_API_KEY_ID / the service credential's apikey)";

impl S3Store {
    pub async fn new(bucket: &str, prefix: &str, options: &S3Options) -> Result<Self> {
        let region = options
            .region
            .clone()
            .or_else(|| std::env::var("AWS_REGION").ok())
            .or_else(|| std::env::var("AWS_DEFAULT_REGION").ok())
            // ICOS ignores the signing region for its regional endpoints; any value signs.
            .unwrap_or_else(|| "us-east-1".to_string());
        let mut loader =
            aws_config::defaults(aws_config::BehaviorVersion::latest()).region(Region::new(region));
        loader = match &options.credentials {
            S3Credentials::AwsChain => loader,
            S3Credentials::Hmac {
                access_key_id,
                secret_access_key,
            } => loader.credentials_provider(aws_sdk_s3::config::Credentials::new(
                access_key_id,
                secret_access_key.expose(),
                None,
                None,
                "ICOS service credential",
            )),
            // Bearer tokens replace SigV4: no AWS credential chain to probe.
            S3Credentials::Iam(_) => loader.no_credentials(),
        };
        let shared = loader.load().await;
        let mut builder = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(options.path_style)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            // The SDK's standard mode retries only transient failures (5xx, throttling,
            // timeouts, connection errors); 4xx answers such as AccessDenied fail at once.
            .retry_config(RetryPolicy::REQUESTS.for_aws_sdk())
            // A certificate the store presents will not change on the next attempt.
            .retry_classifier(CertificateFailure)
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(10))
                    // The SDK's "read" timeout spans a whole request, a part's upload
                    // included, until its answer starts: twice the stall limit, so slow
                    // links still fit a part. Bodies being downloaded are timed per byte
                    // by `Download`.
                    .read_timeout(options.read_timeout.saturating_mul(2))
                    .build(),
            );
        let endpoint = match &options.endpoint {
            Some(endpoint) => {
                builder = builder.endpoint_url(endpoint);
                endpoint.clone()
            }
            None => "AWS S3".to_string(),
        };
        if !options.ca_files.is_empty() {
            builder = builder.http_client(https_client(&options.ca_files)?);
        }
        if let Some(note) = &options.credentials_note {
            tracing::info!("{note}");
        }
        let mut credentials_hint = HMAC_HINT;
        if let S3Credentials::Iam(settings) = &options.credentials {
            if let Some(endpoint) = options
                .endpoint
                .as_deref()
                .and_then(|e| url::Url::parse(e).ok())
            {
                if !super::iam::is_encrypted_or_local(&endpoint) {
                    return Err(Error::usage(format!(
                        "--s3-endpoint {endpoint} is not https: an IAM bearer token would travel unencrypted and could be replayed for an hour; use the https endpoint"
                    )));
                }
            }
            let tls = crate::tls::TlsFiles {
                ca_files: options.ca_files.clone(),
                ..Default::default()
            };
            let tokens = Tokens::new(settings.clone(), &tls)?;
            // A wrong key fails here, in seconds, with IAM's reason, before any work starts.
            tokens.token().await?;
            builder = IamAuth::new(tokens).install(builder, settings.service_instance_id.clone());
            credentials_hint = IAM_HINT;
        }
        Ok(S3Store {
            client: Client::from_conf(builder.build()),
            bucket: bucket.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
            endpoint,
            read_timeout: options.read_timeout,
            credentials_hint,
        })
    }

    fn full_key(&self, key: &str) -> Result<String> {
        validate_key(key)?;
        Ok(join_key(&self.prefix, key))
    }

    fn relative_key(&self, full: &str) -> String {
        if self.prefix.is_empty() {
            full.to_string()
        } else {
            full.strip_prefix(&self.prefix)
                .map(|rest| rest.trim_start_matches('/').to_string())
                .unwrap_or_else(|| full.to_string())
        }
    }

    /// One DeleteObjects request; per-key errors come back as refusals.
    async fn delete_batch(
        &self,
        batch: &[String],
    ) -> std::result::Result<Vec<Refused>, BatchDelete> {
        let mut identifiers = Vec::with_capacity(batch.len());
        for key in batch {
            let full = self.full_key(key).map_err(BatchDelete::Failed)?;
            identifiers.push(ObjectIdentifier::builder().key(full).build().map_err(|e| {
                BatchDelete::Failed(Error::failed(format!("building delete request: {e}")))
            })?);
        }
        let delete = Delete::builder()
            .set_objects(Some(identifiers))
            .quiet(true)
            .build()
            .map_err(|e| {
                BatchDelete::Failed(Error::failed(format!("building delete request: {e}")))
            })?;
        let output = self
            .client
            .delete_objects()
            .bucket(&self.bucket)
            .delete(delete)
            .customize()
            .mutate_request(|request| {
                // ICOS requires Content-MD5 on DeleteObjects and rejects the CRC32 the SDK
                // computes for it even in "when required" mode.
                let md5 = request.body().bytes().map(content_md5);
                let headers = request.headers_mut();
                let checksum_headers: Vec<String> = headers
                    .iter()
                    .map(|(name, _)| name.to_ascii_lowercase())
                    .filter(|name| {
                        name.starts_with("x-amz-checksum-")
                            || name == "x-amz-sdk-checksum-algorithm"
                    })
                    .collect();
                for name in checksum_headers {
                    headers.remove(name);
                }
                if let Some(md5) = md5 {
                    headers.insert("content-md5", md5);
                }
            })
            .send()
            .await;
        let output = match output {
            Ok(output) => output,
            Err(err) => {
                let status = err.raw_response().map(|r| r.status().as_u16());
                return Err(match (err.code(), status) {
                    // Gateways and some S3 implementations do not offer the batch API.
                    (Some("NotImplemented" | "MethodNotAllowed"), _) | (_, Some(501 | 405)) => {
                        BatchDelete::Unsupported(err.code().unwrap_or("HTTP 501/405").to_string())
                    }
                    _ => BatchDelete::Failed(self.error(
                        "cannot delete",
                        &format!("{} objects", batch.len()),
                        err,
                    )),
                });
            }
        };
        // Per-key server trouble is not a refusal: the caller must see the delete failed.
        if let Some(failed) = output.errors().iter().find(|e| {
            matches!(
                e.code(),
                Some("InternalError" | "SlowDown" | "ServiceUnavailable" | "RequestTimeout")
            )
        }) {
            return Err(BatchDelete::Failed(Error::new(
                ErrorKind::Storage,
                format!(
                    "cannot delete {} in bucket {}: {} {}; try again later",
                    failed.key().unwrap_or("?"),
                    self.bucket,
                    failed.code().unwrap_or(""),
                    failed.message().unwrap_or("")
                ),
            )));
        }
        Ok(output
            .errors()
            .iter()
            .map(|failed| {
                let key = failed.key().unwrap_or("?");
                Refused {
                    key: self.relative_key(key),
                    reason: format!(
                        "{} {}",
                        failed.code().unwrap_or(""),
                        failed.message().unwrap_or("")
                    )
                    .trim()
                    .to_string(),
                }
            })
            .collect())
    }

    async fn delete_one(&self, key: &str) -> Result<Option<Refused>> {
        let full = self.full_key(key)?;
        match self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await
        {
            Ok(_) => Ok(None),
            Err(err) => {
                let status = err.raw_response().map(|r| r.status().as_u16());
                match (err.code(), status) {
                    (Some("NoSuchKey"), _) | (_, Some(404)) => Ok(None),
                    // Object lock / retention answers 403 on the object, not on the store.
                    (Some(code @ ("AccessDenied" | "ObjectLocked" | "InvalidRequest")), _) => {
                        Ok(Some(Refused {
                            key: key.to_string(),
                            reason: format!("{code} {}", err.message().unwrap_or(""))
                                .trim()
                                .to_string(),
                        }))
                    }
                    _ => Err(self.error("cannot delete", &full, err)),
                }
            }
        }
    }

    /// Turn an SDK error into one that says what failed and what to do about it.
    fn error<E>(&self, action: &str, key: &str, err: SdkError<E>) -> Error
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let status = err.raw_response().map(|r| r.status().as_u16());
        let code = err.code().map(str::to_string);
        let object = format!("{} in bucket {} at {}", key, self.bucket, self.endpoint);
        // A token refresh that failed mid-run carries kura's own error (IAM's reason).
        if let Some(own) = find_own_error(&err) {
            return own.clone().context(format!("{action} {object}"));
        }
        if let Some(failure) = crate::tls::explain_failure(&err, &self.endpoint, &TLS_FIXES) {
            return Error::with_source(
                ErrorKind::Storage,
                format!("{action} {object}: {failure}"),
                std::io::Error::other(aws_sdk_s3::error::DisplayErrorContext(&err).to_string()),
            );
        }
        let credentials_hint = self.credentials_hint;
        let (kind, advice) = match (&err, code.as_deref(), status) {
            (SdkError::DispatchFailure(_), _, _) | (SdkError::TimeoutError(_), _, _) => (
                ErrorKind::Storage,
                "cannot reach the object store: check --s3-endpoint / KURA_S3_ENDPOINT and the network".to_string(),
            ),
            (_, Some("NoSuchBucket"), _) => (
                ErrorKind::Storage,
                format!("bucket {} does not exist: create it or fix the storage URL", self.bucket),
            ),
            // HEAD answers have no body: the SDK reports them as NotFound or without a code.
            // Other 404s (NoSuchUpload, NoSuchBucket) are failures, not missing objects.
            (_, Some("NoSuchKey" | "NotFound"), _) | (_, None, Some(404)) => {
                (ErrorKind::NotFound, "no such object".to_string())
            }
            // Who refused decides the advice: a key the store does not know or a signature
            // it cannot check is a credentials problem; AccessDenied is a known key without
            // the permission. A HEAD answer has no body, so its bare 403 could be either.
            (_, Some("InvalidAccessKeyId" | "SignatureDoesNotMatch"), _) | (_, None, Some(401)) => (
                ErrorKind::Storage,
                format!("the object store rejected the credentials: {credentials_hint}"),
            ),
            (_, Some("AccessDenied"), _) => (
                ErrorKind::Storage,
                "the credentials were accepted but lack the permission for this request (AccessDenied): check the bucket's access policy and the key's role (backup and prune need Writer, restore and verify Reader)".to_string(),
            ),
            (_, None, Some(403)) => (
                ErrorKind::Storage,
                format!("the object store rejected the credentials or does not allow this request: {credentials_hint}, and the bucket's access policy"),
            ),
            _ => (
                ErrorKind::Storage,
                match (code.as_deref(), err.message(), status) {
                    (Some(code), Some(msg), _) => format!("{code}: {msg}"),
                    (Some(code), None, _) => code.to_string(),
                    (None, _, Some(status)) => format!("HTTP {status}"),
                    _ => "request failed".to_string(),
                },
            ),
        };
        let cause = aws_sdk_s3::error::DisplayErrorContext(&err).to_string();
        Error::with_source(
            kind,
            format!("{action} {object}: {advice}"),
            std::io::Error::other(cause),
        )
    }
}

impl S3Store {
    /// Sends a request that finished work rides on: once the SDK's own attempts are spent on
    /// a transient failure, waits and sends it again, for [`RetryPolicy::IN_FLIGHT`]'s rounds,
    /// each logged. A failover of the store costs a minute, not the run.
    async fn in_flight<T, E, F, Fut>(
        &self,
        what: &str,
        key: &str,
        mut send: F,
    ) -> std::result::Result<T, SdkError<E>>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, SdkError<E>>>,
        E: std::error::Error + Send + Sync + 'static,
    {
        let policy = RetryPolicy::IN_FLIGHT;
        let mut round = 1;
        loop {
            match send().await {
                Err(err) if transient(&err) && policy.allows_another(round) => {
                    let wait = policy.delay(round);
                    tracing::warn!(
                        key,
                        round,
                        "{what} {key} failed ({}); trying again in {} (round {round} of {})",
                        aws_sdk_s3::error::DisplayErrorContext(&err),
                        crate::config::format_duration(wait),
                        policy.max_attempts
                    );
                    tokio::time::sleep(wait).await;
                    round += 1;
                }
                outcome => return outcome,
            }
        }
    }
}

/// Whether sending the same request again may succeed: the store could not be reached, did
/// not answer in time, broke off its answer, or answered 5xx or 429. A certificate the
/// store's TLS failed on is not: it fails the same way every time.
fn transient<E>(err: &SdkError<E>) -> bool
where
    E: std::error::Error + Send + Sync + 'static,
{
    if crate::tls::explain_failure(err, "", &TLS_FIXES).is_some() {
        return false;
    }
    let status = err.raw_response().map(|r| r.status().as_u16());
    matches!(
        err,
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) | SdkError::ResponseError(_)
    ) || status.is_some_and(|s| s >= 500 || s == 429)
}

const TLS_FIXES: crate::tls::Fixes<'static> = crate::tls::Fixes {
    unknown_ca: "give the CA certificate that signed it with --s3-ca-file FILE (KURA_S3_CA_FILE) or AWS_CA_BUNDLE",
    name_mismatch: "use a host name the certificate lists in --s3-endpoint (KURA_S3_ENDPOINT)",
};

/// Stops the SDK from retrying a TLS handshake that failed on the certificate: it reports
/// such failures as I/O errors, which it would otherwise retry for seconds.
#[derive(Debug)]
struct CertificateFailure;

impl aws_smithy_runtime_api::client::retries::classifiers::ClassifyRetry for CertificateFailure {
    fn classify_retry(
        &self,
        ctx: &aws_smithy_runtime_api::client::interceptors::context::InterceptorContext,
    ) -> aws_smithy_runtime_api::client::retries::classifiers::RetryAction {
        use aws_smithy_runtime_api::client::retries::classifiers::RetryAction;
        let connector = ctx
            .output_or_error()
            .and_then(|outcome| outcome.err())
            .and_then(|err| err.as_connector_error());
        match connector {
            Some(err) if crate::tls::explain_failure(err, "", &TLS_FIXES).is_some() => {
                RetryAction::RetryForbidden
            }
            _ => RetryAction::NoActionIndicated,
        }
    }

    fn name(&self) -> &'static str {
        "TLS certificate failure"
    }
}

/// The SDK's HTTPS client, trusting `ca_files` besides the system's roots.
fn https_client(ca_files: &[std::path::PathBuf]) -> Result<aws_sdk_s3::config::SharedHttpClient> {
    use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode, TlsContext, TrustStore};
    let mut trust = TrustStore::empty().with_native_roots(true);
    for file in ca_files {
        trust = trust.with_pem_certificate(crate::tls::read_pem_certificates(file)?);
    }
    let context = TlsContext::builder()
        .with_trust_store(trust)
        .build()
        .map_err(|e| Error::usage(format!("the S3 CA files cannot be used: {e}")))?;
    Ok(aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(CryptoMode::AwsLc))
        .tls_context(context)
        .build_https())
}

fn find_own_error<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a Error> {
    let mut next = Some(err);
    while let Some(current) = next {
        if let Some(own) = current.downcast_ref::<Error>() {
            return Some(own);
        }
        next = current.source();
    }
    None
}

/// One object's download, resumed with a ranged GET where the body broke off (the SDK
/// retries a request until its answer starts; a body cut or stalled later is ours).
struct Download {
    store: S3Store,
    key: String,
    /// Of the first answer: every resumed read must be of that same object. Without a strong
    /// ETag (or a length) a broken read is not resumed: it could not be told from another.
    etag: Option<String>,
    size: Option<u64>,
    offset: u64,
    /// `None` once the stream has ended or failed.
    body: Option<ByteStream>,
    /// Resumptions since the last byte arrived.
    failures: u32,
}

impl Download {
    fn complete(&self) -> bool {
        self.size.is_some_and(|size| self.offset >= size)
    }

    async fn next_chunk(&mut self) -> Option<Result<Bytes>> {
        let policy = RetryPolicy::IN_FLIGHT;
        loop {
            let body = self.body.as_mut()?;
            let why = match tokio::time::timeout(self.store.read_timeout, body.try_next()).await {
                Ok(Ok(Some(chunk))) if chunk.is_empty() => continue,
                Ok(Ok(Some(chunk))) => {
                    self.offset += chunk.len() as u64;
                    self.failures = 0;
                    return Some(Ok(chunk));
                }
                Ok(Ok(None)) if self.complete() || self.size.is_none() => {
                    self.body = None;
                    return None;
                }
                Ok(Ok(None)) => "the connection closed early".to_string(),
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!(
                    "no data for {}",
                    crate::config::format_duration(self.store.read_timeout)
                ),
            };
            self.body = None;
            // Every byte arrived: a failure after the last one loses nothing.
            if self.complete() {
                return None;
            }
            if let Err(e) = self.resume(why, &policy).await {
                return Some(Err(e));
            }
        }
    }

    fn object(&self) -> String {
        format!(
            "{} in bucket {} at {}",
            self.key, self.store.bucket, self.store.endpoint
        )
    }

    fn replaced(&self, how: &str) -> Error {
        Error::integrity(format!(
            "{} was replaced while it was read ({how}): the backup changed under the reader; run again, and check what else writes to this prefix",
            self.object()
        ))
    }

    /// Ask for the rest of the object, from `offset`, of the same ETag; each attempt is
    /// kura's own (the SDK's retries are off for it), so each is logged with the offset.
    async fn resume(&mut self, mut why: String, policy: &RetryPolicy) -> Result<()> {
        let (Some(size), Some(etag)) = (
            self.size,
            self.etag.clone().filter(|e| !e.starts_with("W/")),
        ) else {
            return Err(Error::new(
                ErrorKind::Storage,
                format!(
                    "reading {} broke off at byte {} ({why}), and the store gave no length and strong ETag to resume it by: run again",
                    self.object(),
                    self.offset
                ),
            ));
        };
        loop {
            self.failures += 1;
            if !policy.allows_another(self.failures) {
                return Err(Error::new(
                    ErrorKind::Storage,
                    format!(
                        "reading {} stopped at byte {} of {size}, {} times in a row (last: {why}): check the network to the object store{}",
                        self.object(),
                        self.offset,
                        self.failures - 1,
                        if why.starts_with("no data") { ", or raise --read-timeout" } else { "" }
                    ),
                ));
            }
            tracing::warn!(
                key = %self.key,
                offset = self.offset,
                size,
                attempt = self.failures,
                "download interrupted ({why}); resuming from byte {}",
                self.offset
            );
            tokio::time::sleep(policy.delay(self.failures)).await;
            let sent = self
                .store
                .client
                .get_object()
                .bucket(&self.store.bucket)
                .key(&self.key)
                .range(format!("bytes={}-", self.offset))
                .if_match(&etag)
                .customize()
                .config_override(
                    aws_sdk_s3::config::Builder::default()
                        .retry_config(aws_sdk_s3::config::retry::RetryConfig::disabled()),
                )
                .send()
                .await;
            let output = match sent {
                Ok(output) => output,
                Err(err) => {
                    let status = err.raw_response().map(|r| r.status().as_u16());
                    if err.code() == Some("PreconditionFailed") || status == Some(412) {
                        return Err(self.replaced(&format!("its ETag is no longer {etag}")));
                    }
                    if err.code() == Some("InvalidRange") || status == Some(416) {
                        return Err(
                            self.replaced(&format!("it is now shorter than byte {}", self.offset))
                        );
                    }
                    if !transient(&err) {
                        return Err(self.store.error("cannot resume reading", &self.key, err));
                    }
                    why = aws_sdk_s3::error::DisplayErrorContext(&err).to_string();
                    continue;
                }
            };
            // What came back must be exactly the rest of the same object: a store or proxy
            // that ignores Range or If-Match must not splice or repeat bytes.
            if output.e_tag().is_some_and(|answered| answered != etag) {
                return Err(self.replaced(&format!("its ETag changed from {etag}")));
            }
            let expected = format!("bytes {}-{}/{size}", self.offset, size - 1);
            if output.content_range() != Some(expected.as_str()) {
                return Err(Error::new(
                    ErrorKind::Storage,
                    format!(
                        "resuming {} at byte {} got {} instead of {expected}: the store (or a proxy in front of it) does not honour ranged reads; run again",
                        self.object(),
                        self.offset,
                        output.content_range().unwrap_or("a whole object")
                    ),
                ));
            }
            self.body = Some(output.body);
            return Ok(());
        }
    }
}

enum BatchDelete {
    Unsupported(String),
    Failed(Error),
}

fn to_utc(time: Option<&aws_smithy_types::DateTime>) -> Option<DateTime<Utc>> {
    time.and_then(|t| DateTime::<Utc>::from_timestamp(t.secs(), t.subsec_nanos()))
}

fn content_md5(body: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(Md5::digest(body))
}

#[async_trait]
impl ObjectStore for S3Store {
    fn location(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{} ({})", self.bucket, self.endpoint)
        } else {
            format!("s3://{}/{} ({})", self.bucket, self.prefix, self.endpoint)
        }
    }

    async fn check(&self) -> Result<()> {
        self.client
            .head_bucket()
            .bucket(&self.bucket)
            .send()
            .await
            .map_err(|e| match self.error("cannot access", "the bucket", e) {
                // HEAD has no body, so a missing bucket only shows as a 404.
                err if err.kind() == ErrorKind::NotFound => Error::new(
                    ErrorKind::Storage,
                    format!(
                        "bucket {} does not exist at {}: create it or fix the storage URL",
                        self.bucket, self.endpoint
                    ),
                ),
                err => err,
            })?;
        Ok(())
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<()> {
        let full = self.full_key(key)?;
        self.in_flight("writing", &full, || {
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(&full)
                .content_length(data.len() as i64)
                .body(ByteStream::from(data.clone()))
                .send()
        })
        .await
        .map_err(|e| self.error("cannot write", &full, e))?;
        Ok(())
    }

    async fn put_multipart(&self, key: &str) -> Result<Box<dyn MultipartUpload>> {
        let full = self.full_key(key)?;
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await
            .map_err(|e| self.error("cannot start upload of", &full, e))?;
        let upload_id = created.upload_id().unwrap_or_default().to_string();
        if upload_id.is_empty() {
            return Err(Error::new(
                ErrorKind::Storage,
                format!("the object store returned no upload id for {full}"),
            ));
        }
        Ok(Box::new(S3Upload {
            store: self.clone(),
            key: full,
            upload_id,
            next_part: 1,
            parts: Arc::new(Mutex::new(Vec::new())),
            aborted: false,
            bytes: 0,
        }))
    }

    async fn get(&self, key: &str) -> Result<GetResult> {
        let full = self.full_key(key)?;
        // A restore reads its parts one after another: the store going away before the next
        // part is as costly as during one.
        let output = self
            .in_flight("reading", &full, || {
                self.client
                    .get_object()
                    .bucket(&self.bucket)
                    .key(&full)
                    .send()
            })
            .await
            .map_err(|e| self.error("cannot read", &full, e))?;
        let length = output.content_length().map(|n| n.max(0) as u64);
        let size = length.unwrap_or(0);
        let download = Download {
            store: self.clone(),
            etag: output.e_tag().map(str::to_string),
            key: full,
            size: length,
            offset: 0,
            body: Some(output.body),
            failures: 0,
        };
        let stream = futures::stream::unfold(download, |mut download| async move {
            download.next_chunk().await.map(|chunk| (chunk, download))
        })
        .boxed();
        Ok(GetResult { size, stream })
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>> {
        let full = self.full_key(key)?;
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await
        {
            Ok(out) => Ok(Some(ObjectMeta {
                key: key.to_string(),
                size: out.content_length().unwrap_or(0).max(0) as u64,
                last_modified: to_utc(out.last_modified()),
            })),
            Err(e) => {
                let err = self.error("cannot stat", &full, e);
                if err.kind() == ErrorKind::NotFound {
                    Ok(None)
                } else {
                    Err(err)
                }
            }
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        let full_prefix = join_key(&self.prefix, prefix);
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&full_prefix)
            .into_paginator()
            .send();
        let mut objects = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| self.error("cannot list", &full_prefix, e))?;
            for object in page.contents() {
                if let Some(key) = object.key() {
                    objects.push(ObjectMeta {
                        key: self.relative_key(key),
                        size: object.size().unwrap_or(0).max(0) as u64,
                        last_modified: to_utc(object.last_modified()),
                    });
                }
            }
        }
        objects.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(objects)
    }

    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<Created> {
        let full = self.full_key(key)?;
        let sent = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(&full)
            .if_none_match("*")
            .content_length(data.len() as i64)
            .body(ByteStream::from(data.clone()))
            .send()
            .await;
        match sent {
            Ok(_) => Ok(Created::Created),
            Err(err) => {
                let status = err.raw_response().map(|r| r.status().as_u16());
                match (err.code(), status) {
                    // 409 is S3's answer when a concurrent conditional write won the race.
                    (Some("PreconditionFailed" | "ConditionalRequestConflict"), _)
                    | (_, Some(412 | 409)) => Ok(Created::AlreadyExists),
                    // Stores without conditional writes: check, then write. The caller (the
                    // lock) reads its object back, which catches the rare lost race.
                    (Some("NotImplemented"), _) | (_, Some(501)) => {
                        tracing::debug!(store = %self.location(), "no conditional writes: falling back to HEAD then PUT");
                        if self.head(key).await?.is_some() {
                            return Ok(Created::AlreadyExists);
                        }
                        self.put(key, data).await.map(|_| Created::Created)
                    }
                    _ => Err(self.error("cannot write", &full, err)),
                }
            }
        }
    }

    async fn delete(&self, keys: &[String]) -> Result<Vec<Refused>> {
        let mut refused = Vec::new();
        for batch in keys.chunks(DELETE_BATCH) {
            match self.delete_batch(batch).await {
                Ok(mut batch_refused) => refused.append(&mut batch_refused),
                Err(BatchDelete::Unsupported(why)) => {
                    tracing::debug!(store = %self.location(), reason = %why, "batch delete rejected: deleting one object at a time");
                    for key in batch {
                        if let Some(r) = self.delete_one(key).await? {
                            refused.push(r);
                        }
                    }
                }
                Err(BatchDelete::Failed(e)) => return Err(e),
            }
        }
        Ok(refused)
    }

    async fn list_uploads(&self, prefix: &str) -> Result<Vec<PendingUpload>> {
        let full_prefix = join_key(&self.prefix, prefix);
        let mut uploads = Vec::new();
        let (mut key_marker, mut id_marker) = (None::<String>, None::<String>);
        loop {
            let page = self
                .client
                .list_multipart_uploads()
                .bucket(&self.bucket)
                .prefix(&full_prefix)
                .set_key_marker(key_marker.clone())
                .set_upload_id_marker(id_marker.clone())
                .send()
                .await
                .map_err(|e| self.error("cannot list uploads under", &full_prefix, e))?;
            for upload in page.uploads() {
                if let (Some(key), Some(id)) = (upload.key(), upload.upload_id()) {
                    uploads.push(PendingUpload {
                        key: self.relative_key(key),
                        upload_id: id.to_string(),
                        initiated: to_utc(upload.initiated()),
                    });
                }
            }
            if page.is_truncated() != Some(true) {
                break;
            }
            key_marker = page.next_key_marker().map(str::to_string);
            id_marker = page.next_upload_id_marker().map(str::to_string);
            if key_marker.is_none() && id_marker.is_none() {
                break;
            }
        }
        Ok(uploads)
    }

    async fn abort_upload(&self, upload: &PendingUpload) -> Result<()> {
        let full = self.full_key(&upload.key)?;
        abort(&self.client, &self.bucket, &full, &upload.upload_id)
            .await
            .map_err(|e| self.error("cannot abort upload of", &full, e))
    }
}

async fn abort(
    client: &Client,
    bucket: &str,
    key: &str,
    upload_id: &str,
) -> std::result::Result<
    (),
    SdkError<aws_sdk_s3::operation::abort_multipart_upload::AbortMultipartUploadError>,
> {
    match client
        .abort_multipart_upload()
        .bucket(bucket)
        .key(key)
        .upload_id(upload_id)
        .send()
        .await
    {
        Ok(_) => Ok(()),
        // Already gone: aborting is idempotent.
        Err(e) if e.code() == Some("NoSuchUpload") => Ok(()),
        Err(e) => Err(e),
    }
}

struct S3Upload {
    store: S3Store,
    key: String,
    upload_id: String,
    next_part: i32,
    parts: Arc<Mutex<Vec<CompletedPart>>>,
    /// Some stores (s3s) answer a second abort with AccessDenied instead of NoSuchUpload.
    aborted: bool,
    /// Bytes handed to `put_part`: what the completed object must hold.
    bytes: u64,
}

impl S3Upload {
    async fn completed_already(&self, part_count: usize) -> bool {
        let head = self
            .store
            .client
            .head_object()
            .bucket(&self.store.bucket)
            .key(&self.key)
            .send()
            .await;
        head.is_ok_and(|object| {
            object.content_length() == Some(self.bytes as i64)
                && object
                    .e_tag()
                    .is_some_and(|tag| tag.trim_matches('"').ends_with(&format!("-{part_count}")))
        })
    }
}

#[async_trait]
impl MultipartUpload for S3Upload {
    fn put_part(&mut self, data: Bytes) -> BoxFuture<'static, Result<()>> {
        let part_number = self.next_part;
        self.next_part += 1;
        self.bytes += data.len() as u64;
        let store = self.store.clone();
        let (key, upload_id, parts) = (
            self.key.clone(),
            self.upload_id.clone(),
            Arc::clone(&self.parts),
        );
        async move {
            // The part is the only copy of these bytes: the dump has moved past them.
            let output = store
                .in_flight(&format!("uploading part {part_number} of"), &key, || {
                    store
                        .client
                        .upload_part()
                        .bucket(&store.bucket)
                        .key(&key)
                        .upload_id(&upload_id)
                        .part_number(part_number)
                        .content_length(data.len() as i64)
                        .body(ByteStream::from(data.clone()))
                        .send()
                })
                .await
                .map_err(|e| {
                    store.error(&format!("cannot upload part {part_number} of"), &key, e)
                })?;
            let part = CompletedPart::builder()
                .part_number(part_number)
                .set_e_tag(output.e_tag().map(str::to_string))
                .build();
            parts.lock().expect("parts lock poisoned").push(part);
            Ok(())
        }
        .boxed()
    }

    async fn complete(&mut self) -> Result<()> {
        let mut parts = self.parts.lock().expect("parts lock poisoned").clone();
        parts.sort_by_key(|p| p.part_number());
        let part_count = parts.len();
        let completed = CompletedMultipartUpload::builder()
            .set_parts(Some(parts))
            .build();
        let outcome = self
            .store
            .in_flight("completing the upload of", &self.key, || {
                self.store
                    .client
                    .complete_multipart_upload()
                    .bucket(&self.store.bucket)
                    .key(&self.key)
                    .upload_id(&self.upload_id)
                    .multipart_upload(completed.clone())
                    .send()
            })
            .await;
        match outcome {
            Ok(_) => Ok(()),
            // A Complete sent again after the first one succeeded but its answer was lost:
            // the upload is gone because it became the object. Accept it only if the object
            // is exactly that upload (its length, and the `-<parts>` of a multipart ETag).
            Err(e)
                if e.code() == Some("NoSuchUpload") && self.completed_already(part_count).await =>
            {
                tracing::warn!(key = %self.key, "the store had already completed the upload whose answer was lost");
                Ok(())
            }
            Err(e) => Err(self.store.error("cannot complete upload of", &self.key, e)),
        }
    }

    async fn abort(&mut self) -> Result<()> {
        if self.aborted {
            return Ok(());
        }
        abort(
            &self.store.client,
            &self.store.bucket,
            &self.key,
            &self.upload_id,
        )
        .await
        .map_err(|e| self.store.error("cannot abort upload of", &self.key, e))?;
        self.aborted = true;
        Ok(())
    }
}
