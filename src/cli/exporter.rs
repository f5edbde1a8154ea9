//! `kura exporter --listen ADDR [--interval 5m]`: Prometheus `/metrics` of every tenant's
//! catalog, refreshed in the background, and `/healthz` for probes.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use clap::Args;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::Settings;
use crate::config;
use crate::error::{Error, ErrorKind, Result};
use crate::observe::exporter::{scan, ManifestCache};
use crate::observe::exposition::{Exposition, Family};

#[derive(Debug, Args)]
pub struct Options {
    /// Address to serve /metrics and /healthz on
    #[arg(
        long,
        env = "KURA_EXPORTER_LISTEN",
        default_value = "127.0.0.1:9187",
        value_name = "ADDR"
    )]
    pub listen: SocketAddr,
    /// How often the storage is read (with ±10% jitter), e.g. 5m
    #[arg(
        long,
        env = "KURA_EXPORTER_INTERVAL",
        default_value = "5m",
        value_name = "DURATION"
    )]
    pub interval: String,
}

const SCRAPE_ERRORS: Family = Family {
    name: "kura_exporter_scrape_errors_total",
    kind: "counter",
    help: "Refreshes of the catalog that failed (the last good one is still served).",
};
const LAST_REFRESH: Family = Family {
    name: "kura_exporter_last_refresh_timestamp_seconds",
    kind: "gauge",
    help: "When the catalog was last read successfully, in seconds since the Unix epoch.",
};

/// What `/metrics` answers, replaced whole after each refresh.
#[derive(Default)]
struct Served {
    catalog: Option<String>,
    errors: u64,
    last_refresh: Option<f64>,
}

impl Served {
    fn render(&self) -> String {
        let mut own = Exposition::default();
        own.add(SCRAPE_ERRORS, Vec::new(), self.errors as f64);
        if let Some(at) = self.last_refresh {
            own.add(LAST_REFRESH, Vec::new(), at);
        }
        format!("{}{}", self.catalog.as_deref().unwrap_or(""), own.render())
    }
}

pub async fn run(settings: &Settings, options: &Options) -> Result<()> {
    let interval = config::parse_duration(&options.interval)
        .map_err(|e| e.context("--interval"))?
        .max(Duration::from_secs(1));
    let listener = TcpListener::bind(options.listen).await.map_err(|e| {
        Error::with_source(
            ErrorKind::Usage,
            format!(
                "cannot listen on {}: is another process using it?",
                options.listen
            ),
            e,
        )
    })?;
    tracing::info!(
        listen = %options.listen,
        interval = %config::format_duration(interval),
        "exporter serving /metrics"
    );
    let served = Arc::new(RwLock::new(Served::default()));
    let server = tokio::spawn(serve(listener, Arc::clone(&served)));
    // Opened (and checked) in the loop: a store that is down when the exporter starts is a
    // counted error that the next refresh may clear, not a crash loop.
    let mut store = None;
    let mut cache = ManifestCache::default();
    loop {
        let began = std::time::Instant::now();
        let refreshed = async {
            if store.is_none() {
                store = Some(settings.open_store().await?);
            }
            let store = store.as_ref().expect("opened above");
            scan(store.as_ref(), &mut cache).await
        };
        let refreshed = tokio::select! {
            refreshed = refreshed => refreshed,
            _ = settings.cancel.cancelled() => break,
        };
        match refreshed {
            Ok(catalog) => {
                let mut served = served.write().expect("served lock");
                served.catalog = Some(catalog.render());
                served.last_refresh = Some(chrono::Utc::now().timestamp_millis() as f64 / 1000.0);
                tracing::debug!(seconds = began.elapsed().as_secs_f64(), "catalog refreshed");
            }
            Err(err) => {
                served.write().expect("served lock").errors += 1;
                tracing::warn!(
                    error_kind = err.kind().as_str(),
                    "cannot read the catalog: {}",
                    err.chain()
                );
            }
        }
        // Jitter keeps exporters of several clusters from listing the same bucket in step.
        let jitter = 0.9 + rand::random::<f64>() * 0.2;
        tokio::select! {
            _ = tokio::time::sleep(interval.mul_f64(jitter)) => {}
            _ = settings.cancel.cancelled() => break,
        }
    }
    server.abort();
    tracing::info!("exporter stopped");
    Ok(())
}

/// Connections served at once: Prometheus and probes need a handful.
const CONNECTIONS: usize = 64;

async fn serve(listener: TcpListener, served: Arc<RwLock<Served>>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(CONNECTIONS));
    loop {
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, say: wait instead of spinning.
                tracing::debug!("accepting a connection failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let served = Arc::clone(&served);
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(10), answer(stream, served)).await;
            drop(slot);
        });
    }
}

/// One request per connection: Prometheus and kubelet probes need nothing more.
async fn answer(mut stream: TcpStream, served: Arc<RwLock<Served>>) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&chunk[..n]);
    }
    let request = String::from_utf8_lossy(&head);
    let mut words = request.split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            served.read().expect("served lock").render(),
        ),
        ("GET", "/healthz") => ("200 OK", "text/plain", "ok\n".to_string()),
        ("GET", _) => ("404 Not Found", "text/plain", "try /metrics\n".to_string()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_string(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
