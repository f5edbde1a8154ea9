//! Shared helpers for integration tests: real services from `scripts/services`, unique names
//! so tests run in parallel, and a `kura` command with a clean environment.
#![allow(dead_code)]

pub mod front;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// A service's address from the environment. Outside CI a missing service skips the test with
/// a note; in CI (`CI=true`) it fails it, so a broken service setup never passes silently.
pub fn service(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(value) if !value.is_empty() => Some(value),
        _ => {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("{var} is not set: run the tests through scripts/test, which starts the services");
            }
            eprintln!("skipping: {var} is not set (run scripts/test to start the services)");
            None
        }
    }
}

/// `let Some(x) = require!("VAR") else { return };` in a shorter form.
#[macro_export]
macro_rules! require {
    ($var:expr) => {
        match common::service($var) {
            Some(value) => value,
            None => return,
        }
    };
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name no other test (or earlier run on the same services) uses.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}_{}_{}_{:04x}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst),
        rand::random::<u16>()
    )
}

pub fn kura_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_kura"))
}

/// `kura` with no inherited KURA_*/AWS_* settings, logging JSON, quick zstd.
pub fn kura() -> Command {
    let mut command = Command::new(kura_bin());
    for (key, _) in std::env::vars() {
        if ["KURA_", "AWS_", "PG", "IBM_"]
            .iter()
            .any(|prefix| key.starts_with(prefix))
        {
            command.env_remove(key);
        }
    }
    command
        .env("KURA_LOG_FORMAT", "json")
        .env("KURA_COMPRESSION_LEVEL", "1")
        .stdin(Stdio::null());
    command
}

/// Point a kura command at the moto S3 server.
pub fn with_moto(command: &mut Command, endpoint: &str, bucket: &str, prefix: &str) {
    command
        .env("KURA_STORAGE", format!("s3://{bucket}/{prefix}"))
        .env("KURA_S3_ENDPOINT", endpoint)
        .env("KURA_S3_PATH_STYLE", "true")
        .env("KURA_S3_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing");
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn all(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
    pub fn assert_ok(&self) -> &Self {
        assert_eq!(self.code, 0, "kura failed:\n{}", self.all());
        self
    }
    /// The id a successful `kura backup` logged (JSON logs).
    pub fn backup_id(&self) -> String {
        self.stdout
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find_map(|v| {
                v["backup_id"]
                    .as_str()
                    .filter(|_| v["message"].as_str().unwrap_or("").contains("complete"))
                    .map(str::to_string)
            })
            .unwrap_or_else(|| panic!("no backup id in:\n{}", self.all()))
    }

    /// The `--json` output: stdout lines that are JSON objects but not log lines. Every
    /// stdout line must be JSON (kura's JSON mode promises it), or this panics.
    pub fn records(&self) -> Vec<serde_json::Value> {
        self.stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap_or_else(|e| {
                    panic!("stdout line is not JSON ({e}): {l:?}\n{}", self.all())
                })
            })
            .filter(|v| v.get("level").is_none())
            .collect()
    }

    /// The `error` log line kura ends a failure with.
    pub fn error_line(&self) -> serde_json::Value {
        self.stdout
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .rfind(|v| v["level"] == "ERROR")
            .unwrap_or_else(|| panic!("no error log line in:\n{}", self.all()))
    }
}

pub fn run(command: &mut Command) -> Run {
    Run::from_output(command.output().expect("kura runs"))
}

impl Run {
    pub fn from_output(output: Output) -> Run {
        Run {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }
}

/// Wait (at most a minute) until kura has a multipart upload open in `bucket`.
pub async fn wait_for_open_upload(client: &aws_sdk_s3::Client, bucket: &str) {
    let started = std::time::Instant::now();
    while open_uploads(client, bucket).await.is_empty() {
        assert!(
            started.elapsed().as_secs() < 60,
            "no multipart upload started"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// libpq environment for a postgres:// URL (tests pass passwords the same way kura does).
pub fn pg_env(url: &str, database: &str) -> Vec<(String, String)> {
    let parsed = url::Url::parse(url).expect("test URL parses");
    vec![
        ("PGHOST".into(), parsed.host_str().unwrap().to_string()),
        ("PGPORT".into(), parsed.port().unwrap_or(5432).to_string()),
        ("PGUSER".into(), parsed.username().to_string()),
        (
            "PGPASSWORD".into(),
            parsed.password().unwrap_or("").to_string(),
        ),
        ("PGDATABASE".into(), database.to_string()),
    ]
}

/// The URL with another database in its path.
pub fn with_database(url: &str, database: &str) -> String {
    let mut parsed = url::Url::parse(url).unwrap();
    parsed.set_path(&format!("/{}", urlencode(database)));
    parsed.to_string()
}

fn urlencode(text: &str) -> String {
    percent_encoding::utf8_percent_encode(text, percent_encoding::NON_ALPHANUMERIC).to_string()
}

pub fn pg_tool(name: &str) -> PathBuf {
    match std::env::var("KURA_TEST_PG_BIN") {
        Ok(dir) => Path::new(&dir).join(name),
        Err(_) => PathBuf::from(name),
    }
}

/// Run SQL through psql; panics with psql's error output on failure.
pub fn psql(url: &str, database: &str, sql: &str) -> String {
    let mut child = Command::new(pg_tool("psql"))
        .args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-f", "-"])
        .envs(pg_env(url, database))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("psql runs");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(sql.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "psql on {database} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A plain-text dump for comparing databases, without the random `\restrict` keys that newer
/// pg_dump releases write.
pub fn pg_dump_text(url: &str, database: &str) -> String {
    let out = Command::new(pg_tool("pg_dump"))
        .args(["--no-password"])
        .envs(pg_env(url, database))
        .output()
        .expect("pg_dump runs");
    assert!(
        out.status.success(),
        "pg_dump {database} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    strip_restrict(&String::from_utf8_lossy(&out.stdout))
}

pub fn pg_dumpall_globals(url: &str) -> String {
    let out = Command::new(pg_tool("pg_dumpall"))
        .args(["--globals-only", "--no-password"])
        .envs(pg_env(url, "postgres"))
        .output()
        .expect("pg_dumpall runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    strip_restrict(&String::from_utf8_lossy(&out.stdout))
}

fn strip_restrict(text: &str) -> String {
    text.lines()
        .filter(|l| !l.starts_with("\\restrict") && !l.starts_with("\\unrestrict"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Create a bucket on an S3 endpoint with the given credentials.
pub async fn create_bucket(endpoint: &str, access: &str, secret: &str, bucket: &str) {
    let client = s3_client(endpoint, access, secret);
    client
        .create_bucket()
        .bucket(bucket)
        .send()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "creating bucket {bucket}: {}",
                aws_sdk_s3::error::DisplayErrorContext(e)
            )
        });
}

pub fn s3_client(endpoint: &str, access: &str, secret: &str) -> aws_sdk_s3::Client {
    let config = aws_sdk_s3::config::Builder::new()
        .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
        .region(aws_sdk_s3::config::Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .force_path_style(true)
        .credentials_provider(aws_sdk_s3::config::Credentials::new(
            access, secret, None, None, "test",
        ))
        .build();
    aws_sdk_s3::Client::from_conf(config)
}

/// Every key in a bucket (tests inspect what kura left behind).
pub async fn bucket_keys(client: &aws_sdk_s3::Client, bucket: &str) -> Vec<String> {
    let out = client
        .list_objects_v2()
        .bucket(bucket)
        .send()
        .await
        .unwrap();
    out.contents()
        .iter()
        .filter_map(|o| o.key().map(str::to_string))
        .collect()
}

pub async fn open_uploads(client: &aws_sdk_s3::Client, bucket: &str) -> Vec<String> {
    let out = client
        .list_multipart_uploads()
        .bucket(bucket)
        .send()
        .await
        .unwrap();
    out.uploads()
        .iter()
        .filter_map(|u| u.key().map(str::to_string))
        .collect()
}

/// Incompressible bytes, so a compressed stream stays as long as its input.
pub fn noise(len: usize) -> Vec<u8> {
    use rand::RngCore;
    let mut data = vec![0u8; len];
    rand::thread_rng().fill_bytes(&mut data);
    data
}

/// A private pouchdb-server on `port` with its data in `dir`, for tests that stop or start a
/// CouchDB-compatible server themselves without disturbing the shared one.
pub fn spawn_pouchdb(npm_bin: &str, port: u16, dir: &Path) -> std::process::Child {
    Command::new(format!("{npm_bin}/pouchdb-server"))
        .args(["-o", "127.0.0.1", "-p", &port.to_string(), "-n", "-d"])
        .arg(format!("{}/", dir.display()))
        .arg("-c")
        .arg(dir.join("config.json"))
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("pouchdb-server starts")
}

/// A private pouchdb-server on a free port, answering once this returns: `(server, url)`.
pub async fn start_private_pouchdb(npm_bin: &str, dir: &Path) -> (std::process::Child, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server = spawn_pouchdb(npm_bin, port, dir);
    let url = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let started = std::time::Instant::now();
    while http.get(&url).send().await.is_err() {
        assert!(
            started.elapsed().as_secs() < 30,
            "pouchdb-server did not start"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    (server, url)
}

/// Every file under `dir`, at any depth (objects of a `file://` store).
pub fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// One sample of a Prometheus text exposition, as the reference parser (the Python
/// `prometheus_client` package) reads it.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct ParsedSample {
    pub family: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub help: String,
    pub name: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub value: f64,
}

/// Parse exposition text with `prometheus_client`'s parser; panics if it rejects the text.
pub fn parse_exposition(text: &str) -> Vec<ParsedSample> {
    let python =
        service("KURA_TEST_PYTHON").expect("KURA_TEST_PYTHON: the venv with prometheus-client");
    let script = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = []
for family in text_string_to_metric_families(sys.stdin.read()):
    for sample in family.samples:
        out.append({"family": family.name, "type": family.type, "help": family.documentation,
                    "name": sample.name, "labels": sample.labels, "value": sample.value})
print(json.dumps(out))
"#;
    let mut child = Command::new(python)
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python runs");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "prometheus_client rejected the exposition: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}
