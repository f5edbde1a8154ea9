//! What a run reports for operators who do not read logs: the metrics file and Pushgateway
//! push (read by the reference exposition parser), healthchecks-style pings, and `kura
//! exporter` over a store with several tenants.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::front::{recorder, Recorded};
use common::{kura, parse_exposition, psql, run, unique, ParsedSample};

const PG_PASSWORD: &str = "kura-test-pw";

fn tiny_database(url: &str) -> String {
    let db = unique("obs");
    psql(url, "postgres", &format!("CREATE DATABASE {db}"));
    psql(
        url,
        &db,
        "CREATE TABLE t AS SELECT g FROM generate_series(1, 100) g;",
    );
    db
}

fn value(samples: &[ParsedSample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
}

fn manifest(storage: &Path, tenant: &str, source: &str, id: &str) -> serde_json::Value {
    let path = storage
        .join(tenant)
        .join(source)
        .join(id)
        .join("manifest.json");
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn stored_bytes(manifest: &serde_json::Value) -> f64 {
    manifest["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["stored_bytes"].as_f64().unwrap())
        .sum()
}

fn taken(requests: &std::sync::Mutex<Vec<Recorded>>) -> Vec<Recorded> {
    std::mem::take(&mut *requests.lock().unwrap())
}

#[test]
fn metrics_file_and_pushgateway_after_a_success_and_a_failure() {
    let url = require!("KURA_TEST_PG_URL");
    require!("KURA_TEST_PYTHON");
    let db = tiny_database(&url);
    let storage = tempfile::tempdir().unwrap();
    let metrics = storage.path().join("metrics").join("kura.prom");
    std::fs::create_dir_all(metrics.parent().unwrap()).unwrap();
    let (port, pushes) = recorder();
    let backup = |pg_url: &str| {
        let mut command = kura();
        command
            .env("KURA_POSTGRES_URL", pg_url)
            .env(
                "KURA_STORAGE",
                format!("file://{}", storage.path().display()),
            )
            .env("KURA_TENANT", "acme")
            .env("KURA_METRICS_FILE", &metrics)
            .env("KURA_PUSHGATEWAY_URL", format!("http://127.0.0.1:{port}"))
            .args(["backup", "postgres", "--database", &db]);
        run(&mut command)
    };
    let labels = [
        ("tenant", "acme"),
        ("source", "postgres"),
        ("operation", "backup"),
    ];

    let ok = backup(&url);
    ok.assert_ok();
    let id = ok.backup_id();
    let written = std::fs::read_to_string(&metrics).unwrap();
    let samples = parse_exposition(&written);
    let manifest = manifest(storage.path(), "acme", "postgres", &id);
    assert_eq!(value(&samples, "kura_last_run_success", &labels), Some(1.0));
    assert_eq!(
        value(&samples, "kura_last_run_exit_code", &labels),
        Some(0.0)
    );
    assert_eq!(
        value(&samples, "kura_backup_stored_bytes", &labels),
        Some(stored_bytes(&manifest))
    );
    assert_eq!(
        value(&samples, "kura_backup_parts", &labels),
        Some(manifest["parts"].as_array().unwrap().len() as f64)
    );
    let success_at = value(&samples, "kura_last_success_timestamp_seconds", &labels).unwrap();
    let now = chrono::Utc::now().timestamp() as f64;
    assert!(
        (now - success_at).abs() < 60.0,
        "a Unix time in seconds: {success_at}"
    );
    for sample in &samples {
        assert_eq!(sample.kind, "gauge", "{}", sample.name);
        assert!(!sample.help.is_empty());
    }
    // No temp file left beside it, only the lock that serialises writers (not *.prom, so
    // the textfile collector ignores it).
    let mut beside: Vec<String> = std::fs::read_dir(metrics.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    beside.sort();
    assert_eq!(beside, ["kura.prom", "kura.prom.lock"]);

    let pushed = taken(&pushes);
    assert_eq!(pushed.len(), 1, "{pushed:?}");
    assert_eq!(pushed[0].method, "PUT", "a success replaces its group");
    assert_eq!(
        pushed[0].path,
        "/metrics/job/kura/tenant/acme/source/postgres/operation/backup"
    );
    let pushed_samples = parse_exposition(&pushed[0].body);
    assert_eq!(
        value(&pushed_samples, "kura_last_run_success", &labels),
        Some(1.0)
    );

    // The same source, now unreachable.
    let dead = url::Url::parse(&url)
        .map(|mut u| {
            u.set_port(Some(1)).unwrap();
            u.to_string()
        })
        .unwrap();
    let failed = backup(&dead);
    assert_eq!(failed.code, 4, "{}", failed.all());
    let samples = parse_exposition(&std::fs::read_to_string(&metrics).unwrap());
    assert_eq!(value(&samples, "kura_last_run_success", &labels), Some(0.0));
    assert_eq!(
        value(&samples, "kura_last_run_exit_code", &labels),
        Some(4.0)
    );
    assert_eq!(
        value(&samples, "kura_last_success_timestamp_seconds", &labels),
        Some(success_at),
        "the last success survives a failure"
    );
    assert_eq!(
        value(&samples, "kura_backup_stored_bytes", &labels),
        Some(stored_bytes(&manifest))
    );
    let pushed = taken(&pushes);
    assert_eq!(pushed.len(), 1);
    assert_eq!(
        pushed[0].method, "POST",
        "a failure leaves the success's series in place"
    );
    let pushed_samples = parse_exposition(&pushed[0].body);
    assert_eq!(
        value(&pushed_samples, "kura_last_run_exit_code", &labels),
        Some(4.0)
    );
    assert_eq!(
        value(
            &pushed_samples,
            "kura_last_success_timestamp_seconds",
            &labels
        ),
        None
    );
    for text in [
        std::fs::read_to_string(&metrics).unwrap(),
        pushed[0].body.clone(),
        ok.all(),
        failed.all(),
    ] {
        assert!(!text.contains(PG_PASSWORD), "a password leaked: {text}");
    }

    // A Pushgateway that is down is a warning, not a failed backup.
    let closed = closed_port();
    let mut command = kura();
    command
        .env("KURA_POSTGRES_URL", &url)
        .env(
            "KURA_STORAGE",
            format!("file://{}", storage.path().display()),
        )
        .env("KURA_PUSHGATEWAY_URL", format!("http://127.0.0.1:{closed}"))
        .args(["backup", "postgres", "--database", &db]);
    let unpushed = run(&mut command);
    unpushed.assert_ok();
    assert!(
        unpushed.all().contains("cannot push metrics"),
        "{}",
        unpushed.all()
    );
}

fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    port
}

#[test]
fn pings_start_and_success_or_fail_with_the_error_line() {
    let url = require!("KURA_TEST_PG_URL");
    let db = tiny_database(&url);
    let storage = tempfile::tempdir().unwrap();
    let (port, pings) = recorder();
    let secret_path = "/ping/8f3c0b2e-secret-uuid";
    let backup = |notify: &str, pg_url: &str| {
        let mut command = kura();
        command
            .env("KURA_POSTGRES_URL", pg_url)
            .env(
                "KURA_STORAGE",
                format!("file://{}", storage.path().display()),
            )
            .env("KURA_NOTIFY_URL", notify)
            .args(["backup", "postgres", "--database", &db]);
        let started = Instant::now();
        (run(&mut command), started.elapsed())
    };
    let notify = format!("http://127.0.0.1:{port}{secret_path}");

    let (ok, _) = backup(&notify, &url);
    ok.assert_ok();
    let sent = taken(&pings);
    let paths: Vec<(&str, &str)> = sent
        .iter()
        .map(|r| (r.method.as_str(), r.path.as_str()))
        .collect();
    assert_eq!(
        paths,
        [
            ("POST", &*format!("{secret_path}/start")),
            ("POST", secret_path)
        ]
    );
    assert!(sent[1].body.contains(&ok.backup_id()), "{}", sent[1].body);
    assert!(sent[1].body.contains("succeeded"), "{}", sent[1].body);

    let wrong_password = url.replace(PG_PASSWORD, "not-the-password");
    let (failed, _) = backup(&notify, &wrong_password);
    assert_eq!(failed.code, 4);
    let sent = taken(&pings);
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[1].path, format!("{secret_path}/fail"));
    let error_line = failed.error_line()["message"].as_str().unwrap().to_string();
    assert!(
        sent[1].body.contains("password authentication failed"),
        "the fail ping carries the error line ({error_line}): {}",
        sent[1].body
    );
    for text in [&sent[0].body, &sent[1].body, &ok.all(), &failed.all()] {
        assert!(!text.contains("not-the-password") && !text.contains(PG_PASSWORD));
        assert!(
            !text.contains("secret-uuid"),
            "the ping URL was logged: {text}"
        );
    }

    // A ping server that is down, or that accepts and never answers, costs seconds at most.
    let quiet = (0..2).map(|_| backup(&notify, &url).1).min().unwrap();
    let (down, refused) = backup(&format!("http://127.0.0.1:{}/x", closed_port()), &url);
    down.assert_ok();
    assert!(down.all().contains("ping failed"), "{}", down.all());
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let (hung, silence) = backup(&format!("http://127.0.0.1:{silent_port}/x"), &url);
    hung.assert_ok();
    drop(silent);
    // The start ping runs beside the backup; the end ping has a 5 s budget.
    for (what, took) in [("refused", refused), ("silent", silence)] {
        assert!(
            took < quiet + Duration::from_secs(7),
            "{what} ping server: {took:?} against {quiet:?}"
        );
    }
}

fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nhost: localhost\r\n\r\n").ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    let (head, body) = answer.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

#[test]
fn the_exporter_serves_every_tenant_and_source_and_follows_new_backups() {
    let url = require!("KURA_TEST_PG_URL");
    require!("KURA_TEST_PYTHON");
    let db = tiny_database(&url);
    let storage = tempfile::tempdir().unwrap();
    let config = storage.path().join("kura.toml");
    std::fs::write(
        &config,
        format!(
            "[sources.main]\nkind = \"postgres\"\nurl = \"{url}\"\n[sources.reports]\nkind = \"postgres\"\nurl = \"{url}\"\n"
        ),
    )
    .unwrap();
    let backup = |tenant: &str, source: &str| {
        let mut command = kura();
        command
            .env("KURA_CONFIG", &config)
            .env(
                "KURA_STORAGE",
                format!("file://{}", storage.path().display()),
            )
            .env("KURA_TENANT", tenant)
            .args(["backup", source, "--database", &db]);
        let done = run(&mut command);
        done.assert_ok();
        done.backup_id()
    };
    let mut ids = BTreeMap::new();
    for tenant in ["t1", "t2", "t3"] {
        for source in ["main", "reports"] {
            if (tenant, source) == ("t3", "reports") {
                continue;
            }
            ids.insert((tenant, source), backup(tenant, source));
        }
    }
    // t3/reports has only a backup that never finished: parts, no manifest.
    let unfinished = storage.path().join("t3/reports/20261201T010000Z-0a0b0c");
    std::fs::create_dir_all(&unfinished).unwrap();
    std::fs::write(unfinished.join("db-0001.pgdump.zst"), b"partial").unwrap();

    let port = closed_port();
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut exporter = std::process::Command::new(common::kura_bin())
        .env(
            "KURA_STORAGE",
            format!("file://{}", storage.path().display()),
        )
        .env("KURA_LOG_FORMAT", "json")
        .args([
            "exporter",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--interval",
            "1s",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map(KillOnDrop)
        .unwrap();
    let scrape = |want: &dyn Fn(&[ParsedSample]) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(body) = http_get(port, "/metrics") {
                let samples = parse_exposition(&body);
                if want(&samples) {
                    return samples;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the exporter did not serve what was expected"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let samples = scrape(&|s: &[ParsedSample]| {
        value(
            s,
            "kura_backups_incomplete",
            &[("tenant", "t3"), ("source", "reports")],
        )
        .is_some()
    });
    assert_eq!(http_get(port, "/healthz").as_deref(), Some("ok\n"));
    for ((tenant, source), id) in &ids {
        let labels = [("tenant", *tenant), ("source", *source)];
        assert_eq!(value(&samples, "kura_backups_complete", &labels), Some(1.0));
        assert_eq!(
            value(&samples, "kura_backups_incomplete", &labels),
            Some(0.0)
        );
        let manifest = manifest(storage.path(), tenant, source, id);
        assert_eq!(
            value(&samples, "kura_backup_last_complete_bytes", &labels),
            Some(stored_bytes(&manifest))
        );
        let finished =
            chrono::DateTime::parse_from_rfc3339(manifest["finished_at"].as_str().unwrap())
                .unwrap()
                .timestamp_millis() as f64
                / 1000.0;
        assert_eq!(
            value(
                &samples,
                "kura_backup_last_complete_timestamp_seconds",
                &labels
            ),
            Some(finished)
        );
        assert!(value(
            &samples,
            "kura_backup_oldest_complete_timestamp_seconds",
            &labels
        )
        .is_some());
    }
    let only_unfinished = [("tenant", "t3"), ("source", "reports")];
    assert_eq!(
        value(&samples, "kura_backups_complete", &only_unfinished),
        Some(0.0)
    );
    assert_eq!(
        value(&samples, "kura_backups_incomplete", &only_unfinished),
        Some(1.0)
    );
    assert_eq!(
        value(
            &samples,
            "kura_backup_last_complete_timestamp_seconds",
            &only_unfinished
        ),
        None
    );
    assert_eq!(
        value(&samples, "kura_exporter_scrape_errors_total", &[]),
        Some(0.0)
    );
    let counter = samples
        .iter()
        .find(|s| s.name == "kura_exporter_scrape_errors_total")
        .unwrap();
    assert_eq!(counter.kind, "counter");

    // A new backup shows after the next refresh.
    backup("t1", "main");
    scrape(&|s: &[ParsedSample]| {
        value(
            s,
            "kura_backups_complete",
            &[("tenant", "t1"), ("source", "main")],
        ) == Some(2.0)
    });

    unsafe { libc::kill(exporter.0.id() as i32, libc::SIGTERM) };
    let status = exporter.0.wait().unwrap();
    assert_eq!(status.code(), Some(0), "SIGTERM stops the exporter cleanly");
}
