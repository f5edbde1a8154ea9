//! Small servers in front of the real ones, for the TLS and IAM tests: a TLS-terminating front
//! with the private CA of `scripts/services`, an IBM IAM token endpoint, and an S3 front that
//! lets through only requests with a live bearer token from it (as ICOS does).
//!
//! Each runs on its own thread and runtime (the tests are synchronous: they run the kura
//! binary) and stops with the test process.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Run `serve` on a listener of its own; returns the port.
fn spawn<F, Fut>(serve: F) -> u16
where
    F: FnOnce(TcpListener) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move { serve(TcpListener::from_std(listener).unwrap()).await });
    });
    port
}

fn upstream_addr(url: &str) -> SocketAddr {
    let parsed = url::Url::parse(url).unwrap();
    format!(
        "{}:{}",
        parsed.host_str().unwrap(),
        parsed.port_or_known_default().unwrap()
    )
    .parse()
    .unwrap()
}

/// `https://localhost:<port>` terminating TLS with `cert`/`key` and passing the bytes on to
/// the plain HTTP server at `upstream` (a URL such as `http://127.0.0.1:5984`).
pub fn tls_front(upstream: &str, cert: &Path, key: &Path) -> u16 {
    let upstream = upstream_addr(upstream);
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    spawn(move |listener| async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                // A client that refuses the certificate ends here, as it should.
                let Ok(mut tls) = acceptor.accept(client).await else {
                    return;
                };
                let Ok(mut server) = TcpStream::connect(upstream).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut server).await;
            });
        }
    })
}

/// Tokens issued by [`token_server`], with their end of life.
#[derive(Default)]
pub struct Issued {
    live: Mutex<HashMap<String, Instant>>,
    pub token_requests: AtomicUsize,
    pub refused_keys: AtomicUsize,
}

impl Issued {
    fn is_live(&self, token: &str) -> bool {
        self.live
            .lock()
            .unwrap()
            .get(token)
            .is_some_and(|end| Instant::now() < *end)
    }

    /// Ends every token now, as a revocation would.
    pub fn revoke_all(&self) {
        self.live.lock().unwrap().clear();
    }
}

pub struct TokenServer {
    pub url: String,
    pub issued: Arc<Issued>,
}

/// An IBM IAM token endpoint: `POST /identity/token` with the API-key grant; `good_key` gets
/// a token that lives `lifetime`, any other key IAM's 400 answer.
pub fn token_server(good_key: &str, lifetime: Duration) -> TokenServer {
    let issued = Arc::new(Issued::default());
    let state = Arc::clone(&issued);
    let good_key = good_key.to_string();
    let port = spawn(move |listener| async move {
        let counter = Arc::new(AtomicUsize::new(0));
        loop {
            let Ok((mut client, _)) = listener.accept().await else {
                continue;
            };
            let (state, good_key, counter) =
                (Arc::clone(&state), good_key.clone(), Arc::clone(&counter));
            tokio::spawn(async move {
                let Some((head, body)) = read_request(&mut client).await else {
                    return;
                };
                let form: HashMap<String, String> =
                    url::form_urlencoded::parse(&body).into_owned().collect();
                let grant_ok = form.get("grant_type").map(String::as_str)
                    == Some("urn:ibm:params:oauth:grant-type:apikey");
                let (status, answer) = if head.starts_with("POST /identity/token ")
                    && grant_ok
                    && form.get("apikey") == Some(&good_key)
                {
                    let token = format!(
                        "tok-{}-{:08x}",
                        counter.fetch_add(1, Ordering::SeqCst),
                        rand::random::<u32>()
                    );
                    state
                        .live
                        .lock()
                        .unwrap()
                        .insert(token.clone(), Instant::now() + lifetime);
                    let answer = serde_json::json!({
                        "access_token": token,
                        "refresh_token": "not_supported",
                        "token_type": "Bearer",
                        "expires_in": lifetime.as_secs(),
                        "expiration": chrono::Utc::now().timestamp() + lifetime.as_secs() as i64,
                        "scope": "ibm openid",
                    });
                    ("200 OK", answer)
                } else {
                    state.refused_keys.fetch_add(1, Ordering::SeqCst);
                    let answer = serde_json::json!({
                        "context": {"requestId": "test"},
                        "errorCode": "BXNIM0415E",
                        "errorMessage": "Provided API key could not be found.",
                    });
                    ("400 Bad Request", answer)
                };
                // Counted once the token is live, so a test that waits for a new token can
                // revoke it.
                state.token_requests.fetch_add(1, Ordering::SeqCst);
                let body = answer.to_string();
                let response = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = client.write_all(response.as_bytes()).await;
                let _ = client.shutdown().await;
            });
        }
    });
    TokenServer {
        url: format!("http://127.0.0.1:{port}/identity/token"),
        issued,
    }
}

/// What the bearer front saw.
#[derive(Default)]
pub struct FrontLog {
    pub passed: AtomicUsize,
    pub refused: AtomicUsize,
    /// Requests that came with AWS SigV4 (or no) authorization instead of a bearer token.
    pub unsigned_or_sigv4: AtomicUsize,
}

/// An S3 front that checks `Authorization: Bearer <live token>` as ICOS does (403
/// AccessDenied otherwise), then passes the request on to `upstream` without it. `delay`
/// holds every request back, to stretch a backup over several token lifetimes.
pub fn bearer_front(upstream: &str, issued: Arc<Issued>, delay: Duration) -> (u16, Arc<FrontLog>) {
    let upstream = upstream_addr(upstream);
    let log = Arc::new(FrontLog::default());
    let state = Arc::clone(&log);
    let port = spawn(move |listener| async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                continue;
            };
            let (issued, log) = (Arc::clone(&issued), Arc::clone(&state));
            tokio::spawn(async move {
                let _ = bearer_connection(client, upstream, issued, log, delay).await;
            });
        }
    });
    (port, log)
}

async fn bearer_connection(
    mut client: TcpStream,
    upstream: SocketAddr,
    issued: Arc<Issued>,
    log: Arc<FrontLog>,
    delay: Duration,
) -> std::io::Result<()> {
    let Some((head, rest)) = read_head(&mut client).await else {
        return Ok(());
    };
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default().to_string();
    let mut headers: Vec<String> = Vec::new();
    let mut token = None;
    for line in lines.filter(|l| !l.is_empty()) {
        let (name, value) = line.split_once(':').unwrap_or((line, ""));
        match name.trim().to_ascii_lowercase().as_str() {
            "authorization" => token = Some(value.trim().to_string()),
            "connection" => {}
            _ => headers.push(line.to_string()),
        }
    }
    let bearer = token.as_deref().and_then(|t| t.strip_prefix("Bearer "));
    if bearer.is_none() {
        log.unsigned_or_sigv4.fetch_add(1, Ordering::SeqCst);
    }
    if !bearer.is_some_and(|t| issued.is_live(t)) {
        log.refused.fetch_add(1, Ordering::SeqCst);
        let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>";
        let response = format!(
            "HTTP/1.1 403 Forbidden\r\ncontent-type: application/xml\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        client.write_all(response.as_bytes()).await?;
        return client.shutdown().await;
    }
    log.passed.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(delay).await;
    let mut server = TcpStream::connect(upstream).await?;
    let mut forwarded = format!("{request_line}\r\n");
    for header in headers {
        forwarded.push_str(&header);
        forwarded.push_str("\r\n");
    }
    // moto treats a request without credentials as anonymous (and refuses reads); it does not
    // check signatures, so any SigV4-shaped header stands in for the checked token.
    forwarded.push_str("authorization: AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=0\r\n");
    // One request per connection: the next one is checked again.
    forwarded.push_str("connection: close\r\n\r\n");
    server.write_all(forwarded.as_bytes()).await?;
    server.write_all(&rest).await?;
    let (mut client_read, mut client_write) = client.split();
    let (mut server_read, mut server_write) = server.split();
    let upload = tokio::io::copy(&mut client_read, &mut server_write);
    let download = async {
        let copied = tokio::io::copy(&mut server_read, &mut client_write).await;
        let _ = client_write.shutdown().await;
        copied
    };
    // The answer ends the exchange; the client's side may stay open (keep-alive) forever.
    tokio::select! {
        _ = download => {}
        _ = async { let _ = upload.await; std::future::pending::<()>().await } => {}
    }
    Ok(())
}

/// The request head (up to the blank line) as text, and whatever body bytes came with it.
async fn read_head<S: AsyncRead + Unpin>(stream: &mut S) -> Option<(String, Vec<u8>)> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buffer[..end]).into_owned();
            return Some((head, buffer[end + 4..].to_vec()));
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
}

/// A whole request with a `content-length` body.
async fn read_request<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
) -> Option<(String, Vec<u8>)> {
    let (head, mut body) = read_head(stream).await?;
    let length = head
        .split("\r\n")
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, value)| value.trim().parse::<usize>().ok())
        .unwrap_or(0);
    while body.len() < length {
        let mut chunk = vec![0u8; length - body.len()];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some((head, body))
}

/// One request a [`recorder`] received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub body: String,
}

/// An HTTP server that answers 200 to everything and remembers what it was sent (a stand-in
/// for a Pushgateway or a healthchecks.io endpoint).
pub fn recorder() -> (u16, Arc<Mutex<Vec<Recorded>>>) {
    let requests = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&requests);
    let port = spawn(move |listener| async move {
        loop {
            let Ok((mut client, _)) = listener.accept().await else {
                continue;
            };
            let log = Arc::clone(&log);
            tokio::spawn(async move {
                let Some((head, body)) = read_request(&mut client).await else {
                    return;
                };
                let mut words = head.split_whitespace();
                log.lock().unwrap().push(Recorded {
                    method: words.next().unwrap_or_default().to_string(),
                    path: words.next().unwrap_or_default().to_string(),
                    body: String::from_utf8_lossy(&body).into_owned(),
                });
                let _ = client
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nOK",
                    )
                    .await;
                let _ = client.shutdown().await;
            });
        }
    });
    (port, requests)
}

/// What [`fault_front`] does to a faulty download.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Answer `503 SlowDown` instead.
    SlowDown,
    /// Pass the answer's head and this many body bytes, then close the connection.
    CloseAfter(usize),
    /// Pass the head and this many body bytes, then send nothing for the duration, then close.
    Stall(usize, Duration),
    /// As `CloseAfter`, then overwrite the object upstream before the client can resume.
    ReplaceAfter(usize),
    /// For uploads (a PUT with a body): read this many body bytes, then close without an
    /// answer; nothing reaches the store.
    UploadReset(usize),
    /// For uploads: read this many body bytes, stop reading for the duration, then close.
    UploadStall(usize, Duration),
    /// For uploads, once: from the faulty one on, every connection is closed unanswered for
    /// the duration, as when the store fails over or the network to it goes away.
    Outage(Duration),
}

/// Counts of what went through a [`fault_front`].
#[derive(Default)]
pub struct Faults {
    pub downloads: AtomicUsize,
    pub injected: AtomicUsize,
    /// Connections refused during an [`Fault::Outage`].
    pub refused: AtomicUsize,
    outage_until: Mutex<Option<Instant>>,
}

/// Which requests a front counts (and so may fault): the method and the request target.
pub type Selects = fn(&str, &str) -> bool;

/// An object GET: path-style /bucket/key, with no query but the SDK's `x-id=GetObject`.
pub fn s3_download(method: &str, target: &str) -> bool {
    let query = target.split_once('?').map(|(_, q)| q).unwrap_or("");
    method == "GET"
        && (query.is_empty() || query == "x-id=GetObject")
        && target.split('?').next().unwrap_or("").matches('/').count() >= 2
}

/// An S3 front that passes everything through, except that every `every`-th object
/// download (a GET without a query), or upload (a PUT) for the upload faults, gets `fault`.
pub fn fault_front(upstream: &str, fault: Fault, every: usize) -> (u16, Arc<Faults>) {
    let selects: Selects = match fault {
        Fault::UploadReset(_) | Fault::UploadStall(..) | Fault::Outage(_) => {
            |method, _| method == "PUT"
        }
        _ => s3_download,
    };
    fault_front_where(upstream, fault, every, selects)
}

/// A front to any HTTP server in which every `every`-th request that `selects` picks gets
/// `fault` (the download faults cut or stall the answer's body).
pub fn fault_front_where(
    upstream: &str,
    fault: Fault,
    every: usize,
    selects: Selects,
) -> (u16, Arc<Faults>) {
    let upstream = upstream_addr(upstream);
    let faults = Arc::new(Faults::default());
    let state = Arc::clone(&faults);
    let port = spawn(move |listener| async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                continue;
            };
            let state = Arc::clone(&state);
            tokio::spawn(async move {
                let _ = fault_connection(client, upstream, fault, every, selects, state).await;
            });
        }
    });
    (port, faults)
}

async fn fault_connection(
    mut client: TcpStream,
    upstream: SocketAddr,
    fault: Fault,
    every: usize,
    selects: Selects,
    faults: Arc<Faults>,
) -> std::io::Result<()> {
    let Some((head, rest)) = read_head(&mut client).await else {
        return Ok(());
    };
    let request_line = head.split("\r\n").next().unwrap_or_default().to_string();
    let mut words = request_line.split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let upload_fault = matches!(fault, Fault::UploadReset(_) | Fault::UploadStall(..));
    let faulty = selects(method, target)
        && (faults.downloads.fetch_add(1, Ordering::SeqCst) + 1).is_multiple_of(every);
    if let Fault::Outage(length) = fault {
        let mut until = faults.outage_until.lock().unwrap();
        if faulty && until.is_none() {
            faults.injected.fetch_add(1, Ordering::SeqCst);
            *until = Some(Instant::now() + length);
        }
        if until.is_some_and(|end| Instant::now() < end) {
            drop(until);
            faults.refused.fetch_add(1, Ordering::SeqCst);
            // Closed unanswered, as by a load balancer with no store behind it.
            return Ok(());
        }
    }
    if faulty && upload_fault {
        faults.injected.fetch_add(1, Ordering::SeqCst);
        let (limit, quiet) = match fault {
            Fault::UploadReset(n) => (n, Duration::ZERO),
            Fault::UploadStall(n, quiet) => (n, quiet),
            _ => unreachable!(),
        };
        let mut received = rest.len();
        let mut chunk = vec![0u8; 64 * 1024];
        while received < limit {
            match tokio::time::timeout(Duration::from_secs(1), client.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
                Ok(Ok(n)) => received += n,
            }
        }
        tokio::time::sleep(quiet).await;
        return client.shutdown().await;
    }
    if faulty && fault == Fault::SlowDown {
        faults.injected.fetch_add(1, Ordering::SeqCst);
        let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>";
        let response = format!(
            "HTTP/1.1 503 Slow Down\r\ncontent-type: application/xml\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        client.write_all(response.as_bytes()).await?;
        return client.shutdown().await;
    }
    let mut forwarded = String::new();
    for line in head.split("\r\n").filter(|l| !l.is_empty()) {
        if !line.to_ascii_lowercase().starts_with("connection:") {
            forwarded.push_str(line);
            forwarded.push_str("\r\n");
        }
    }
    forwarded.push_str("connection: close\r\n\r\n");
    let mut server = TcpStream::connect(upstream).await?;
    server.write_all(forwarded.as_bytes()).await?;
    server.write_all(&rest).await?;
    let limit = match (faulty, fault) {
        (true, Fault::CloseAfter(n) | Fault::ReplaceAfter(n) | Fault::Stall(n, _)) => Some(n),
        _ => None,
    };
    let Some(limit) = limit else {
        let (mut client_read, mut client_write) = client.split();
        let (mut server_read, mut server_write) = server.split();
        tokio::select! {
            _ = async {
                let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
                let _ = client_write.shutdown().await;
            } => {}
            _ = async { let _ = tokio::io::copy(&mut client_read, &mut server_write).await; std::future::pending::<()>().await } => {}
        }
        return Ok(());
    };
    // The answer's head, then `limit` bytes of its body.
    let Some((answer_head, mut body)) = read_head(&mut server).await else {
        return Ok(());
    };
    if !answer_head.starts_with("HTTP/1.1 200") && !answer_head.starts_with("HTTP/1.1 206") {
        client
            .write_all(format!("{answer_head}\r\n\r\n").as_bytes())
            .await?;
        client.write_all(&body).await?;
        let _ = tokio::io::copy(&mut server, &mut client).await;
        return client.shutdown().await;
    }
    client
        .write_all(format!("{answer_head}\r\n\r\n").as_bytes())
        .await?;
    while body.len() <= limit {
        let mut chunk = vec![0u8; 64 * 1024];
        let n = server.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    if body.len() <= limit {
        // The whole object fits under the limit: nothing to cut.
        client.write_all(&body).await?;
        return client.shutdown().await;
    }
    faults.injected.fetch_add(1, Ordering::SeqCst);
    client.write_all(&body[..limit]).await?;
    client.flush().await?;
    match fault {
        Fault::Stall(_, quiet) => tokio::time::sleep(quiet).await,
        Fault::ReplaceAfter(_) => {
            let path = target.split('?').next().unwrap_or("").to_string();
            let mut writer = TcpStream::connect(upstream).await?;
            let replacement = b"this object was replaced";
            writer
                .write_all(
                    format!(
                        "PUT {path} HTTP/1.1\r\nhost: {upstream}\r\nauthorization: AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=0\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                        replacement.len()
                    )
                    .as_bytes(),
                )
                .await?;
            writer.write_all(replacement).await?;
            let mut answer = Vec::new();
            let _ = writer.read_to_end(&mut answer).await;
        }
        _ => {}
    }
    // The connection ends short of the content-length the head announced.
    drop(server);
    client.shutdown().await
}
