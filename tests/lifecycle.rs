//! The life of backups after they land, through the real binary against real servers:
//! prune (scope, dry run, incomplete backups, abandoned uploads), verify (damage of every kind,
//! --deep), status, the backup/prune lock, and wait-for.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use common::{kura, psql, run, unique, Run};
use serde_json::Value;

/// A small database with rows in two schemas, for backups that take a moment, not minutes.
fn small_database(url: &str) -> String {
    let name = unique("life");
    psql(url, "postgres", &format!("CREATE DATABASE {name}"));
    psql(
        url,
        &name,
        "CREATE TABLE items (id int PRIMARY KEY, label text);
         INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 5000) g;
         CREATE SCHEMA \"Odd Schema\";
         CREATE TABLE \"Odd Schema\".\"Mixed Case\" (v jsonb);
         INSERT INTO \"Odd Schema\".\"Mixed Case\" VALUES ('{\"a\": 1}'), ('[]');
         CREATE TABLE empty_table (x int);",
    );
    name
}

fn pg_kura(url: &str, storage: &str, tenant: &str) -> Command {
    let mut command = kura();
    command
        .env("KURA_POSTGRES_URL", url)
        .env("KURA_STORAGE", storage)
        .env("KURA_TENANT", tenant);
    command
}

fn file_storage(dir: &Path) -> String {
    format!("file://{}", dir.display())
}

fn json_stdout(run: &Run) -> Value {
    // JSON log lines and the NDJSON records share stdout; every line must parse.
    Value::Array(run.records())
}

/// Copy a backup folder under another id whose time is `at`, as if it had been taken then.
fn clone_backup(
    root: &Path,
    tenant: &str,
    source: &str,
    id: &str,
    at: DateTime<Utc>,
    complete: bool,
) -> String {
    let new_id = format!(
        "{}-{:06x}",
        at.format("%Y%m%dT%H%M%SZ"),
        rand::random::<u32>() & 0xff_ffff
    );
    let from = root.join(tenant).join(source).join(id);
    let to = root.join(tenant).join(source).join(&new_id);
    std::fs::create_dir_all(&to).unwrap();
    for entry in std::fs::read_dir(&from).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().into_string().unwrap();
        if name == "manifest.json" {
            if complete {
                let mut manifest: Value =
                    serde_json::from_slice(&std::fs::read(entry.path()).unwrap()).unwrap();
                manifest["backup_id"] = new_id.clone().into();
                manifest["started_at"] = at.to_rfc3339().into();
                manifest["finished_at"] = (at + chrono::Duration::seconds(30)).to_rfc3339().into();
                std::fs::write(
                    to.join(&name),
                    serde_json::to_vec_pretty(&manifest).unwrap(),
                )
                .unwrap();
            }
        } else {
            std::fs::copy(entry.path(), to.join(&name)).unwrap();
        }
    }
    new_id
}

fn days_ago(days: i64) -> DateTime<Utc> {
    Utc::now() - chrono::Duration::days(days)
}

#[tokio::test]
async fn prune_on_s3_deletes_by_policy_within_one_source_only() {
    let pg = require!("KURA_TEST_PG_URL");
    let moto = require!("KURA_TEST_S3_ENDPOINT");
    let db = small_database(&pg);
    let bucket = unique("prune").replace('_', "-");
    common::create_bucket(&moto, "testing", "testing", &bucket).await;
    let client = common::s3_client(&moto, "testing", "testing");
    let with_s3 = |tenant: &str| {
        let mut command = kura();
        common::with_moto(&mut command, &moto, &bucket, "nightly");
        command
            .env("KURA_POSTGRES_URL", &pg)
            .env("KURA_TENANT", tenant);
        command
    };
    // Three real backups of tenant acme, one of tenant other (same source name).
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(
            run(with_s3("acme").args(["backup", "postgres", "--database", &db]))
                .assert_ok()
                .backup_id(),
        );
    }
    let other = run(with_s3("other").args(["backup", "postgres", "--database", &db]))
        .assert_ok()
        .backup_id();
    // An incomplete backup (a part, no manifest), an abandoned upload, and an object of
    // another source and one outside every tenant, all of which must survive or go by rule.
    let put = |key: String| {
        let client = client.clone();
        let bucket = bucket.clone();
        async move {
            client
                .put_object()
                .bucket(&bucket)
                .key(key)
                .body(aws_sdk_s3::primitives::ByteStream::from_static(b"partial"))
                .send()
                .await
                .unwrap();
        }
    };
    put("nightly/acme/postgres/20200101T000000Z-dead00/db-0001.pgdump.zst".into()).await;
    put("nightly/acme/couchdb/20200101T000000Z-dead01/db-0001.ndjson.zst".into()).await;
    put("nightly/unrelated/file.txt".into()).await;
    for key in [
        "nightly/acme/postgres/20200101T000000Z-dead02/db-0001.pgdump.zst",
        "nightly/other/postgres/20200101T000000Z-dead03/db-0001.pgdump.zst",
    ] {
        client
            .create_multipart_upload()
            .bucket(&bucket)
            .key(key)
            .send()
            .await
            .unwrap();
    }
    let before = common::bucket_keys(&client, &bucket).await;

    // No policy: refused, nothing touched.
    let refused = run(with_s3("acme").args(["prune", "postgres"]));
    assert_eq!(refused.code, 2, "{}", refused.all());
    assert!(refused.error_line()["message"]
        .as_str()
        .unwrap()
        .contains("--keep-last"));

    // Two days ahead, everything written now is past the 24 h grace.
    let later = (Utc::now() + chrono::Duration::days(2)).to_rfc3339();
    let dry = run(with_s3("acme").args([
        "prune",
        "postgres",
        "--keep-last",
        "2",
        "--dry-run",
        "--json",
        "--now",
        &later,
    ]));
    dry.assert_ok();
    assert_eq!(
        common::bucket_keys(&client, &bucket).await,
        before,
        "--dry-run deletes nothing"
    );
    assert_eq!(common::open_uploads(&client, &bucket).await.len(), 2);
    let plan = &json_stdout(&dry)[0];
    let action = |id: &str| {
        plan["backups"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["backup_id"] == id)
            .unwrap_or_else(|| panic!("{id} not in {plan}"))["action"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(action(&ids[2]), "keep");
    assert_eq!(action(&ids[1]), "keep");
    assert_eq!(action(&ids[0]), "delete");
    assert_eq!(action("20200101T000000Z-dead00"), "delete");
    assert_eq!(plan["stale_uploads"].as_array().unwrap().len(), 1);

    // --now only rehearses; a real prune needs a zero grace to treat fresh objects as old.
    let real_now =
        run(with_s3("acme").args(["prune", "postgres", "--keep-last", "2", "--now", &later]));
    assert_eq!(real_now.code, 2, "{}", real_now.all());
    let pruned = run(with_s3("acme").args([
        "prune",
        "postgres",
        "--keep-last",
        "2",
        "--prune-grace",
        "0s",
    ]));
    pruned.assert_ok();
    let after = common::bucket_keys(&client, &bucket).await;
    let acme_ids: std::collections::BTreeSet<&str> = after
        .iter()
        .filter_map(|k| k.strip_prefix("nightly/acme/postgres/"))
        .filter_map(|k| k.split('/').next())
        .collect();
    assert_eq!(
        acme_ids,
        [ids[1].as_str(), ids[2].as_str()].into(),
        "{after:#?}"
    );
    for survivor in [
        format!("nightly/other/postgres/{other}/manifest.json"),
        "nightly/acme/couchdb/20200101T000000Z-dead01/db-0001.ndjson.zst".into(),
        "nightly/unrelated/file.txt".into(),
    ] {
        assert!(
            after.contains(&survivor),
            "{survivor} must survive: {after:#?}"
        );
    }
    assert_eq!(
        common::open_uploads(&client, &bucket).await,
        vec!["nightly/other/postgres/20200101T000000Z-dead03/db-0001.pgdump.zst".to_string()],
        "only the pruned source's abandoned upload is aborted"
    );
    assert!(
        !after.iter().any(|k| k.ends_with("lock.json")),
        "the lock is released"
    );
    let restored = run(with_s3("acme").args([
        "restore",
        "postgres",
        "latest",
        "--database",
        &format!("{db}:{db}_after_prune"),
    ]));
    restored.assert_ok();
    psql(&pg, "postgres", &format!("DROP DATABASE {db}_after_prune"));
}

#[test]
fn backup_with_prune_applies_the_policy_after_a_good_backup() {
    let pg = require!("KURA_TEST_PG_URL");
    let db = small_database(&pg);
    let dir = tempfile::tempdir().unwrap();
    let storage = file_storage(dir.path());
    let first = run(pg_kura(&pg, &storage, "t").args(["backup", "postgres", "--database", &db]))
        .assert_ok()
        .backup_id();
    let old: Vec<String> = [40, 20, 10]
        .into_iter()
        .map(|days| clone_backup(dir.path(), "t", "postgres", &first, days_ago(days), true))
        .collect();
    // A missing policy is a config error before any dump starts.
    let no_policy =
        run(pg_kura(&pg, &storage, "t").args(["backup", "--prune", "postgres", "--database", &db]));
    assert_eq!(no_policy.code, 2, "{}", no_policy.all());
    let backed_up = run(pg_kura(&pg, &storage, "t")
        .env("KURA_KEEP_WITHIN", "15d")
        .args(["backup", "--prune", "postgres", "--database", &db]));
    backed_up.assert_ok();
    let listed = run(pg_kura(&pg, &storage, "t").args(["list", "postgres", "--json"]));
    let rows = json_stdout(&listed);
    let mut survivors: Vec<&str> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row["backup_id"].as_str().unwrap())
        .collect();
    survivors.sort();
    let mut expected = vec![backed_up.backup_id(), first.clone(), old[2].clone()];
    expected.sort();
    assert_eq!(
        survivors, expected,
        "the new one, the first and the 10-day-old survive; the 40- and 20-day-old are gone"
    );
    for gone in &old[..2] {
        assert!(
            !dir.path().join("t/postgres").join(gone).exists(),
            "{gone} was deleted"
        );
    }
}

#[test]
fn verify_names_a_flipped_byte_a_truncated_part_and_a_missing_part() {
    let pg = require!("KURA_TEST_PG_URL");
    let db = small_database(&pg);
    let dir = tempfile::tempdir().unwrap();
    let storage = file_storage(dir.path());
    let id = run(pg_kura(&pg, &storage, "t").args(["backup", "postgres", "--database", &db]))
        .assert_ok()
        .backup_id();
    run(pg_kura(&pg, &storage, "t").args(["verify", "postgres", &id])).assert_ok();

    let deep = run(pg_kura(&pg, &storage, "t").args(["verify", "postgres", "latest", "--deep"]));
    deep.assert_ok();
    assert!(deep.stdout.contains("3 counts match"), "{}", deep.all());
    let leftovers = psql(
        &pg,
        "postgres",
        "SELECT count(*) FROM pg_database WHERE datname LIKE 'kura_verify_%'",
    );
    assert_eq!(leftovers.trim(), "0", "the scratch database is dropped");

    let folder = dir.path().join("t/postgres").join(&id);
    let part = folder.join("db-0001.pgdump.zst");
    let original = std::fs::read(&part).unwrap();
    let damaged = |name: &str, bytes: Option<Vec<u8>>| {
        match bytes {
            Some(bytes) => std::fs::write(&part, bytes).unwrap(),
            None => std::fs::remove_file(&part).unwrap(),
        }
        let result = run(pg_kura(&pg, &storage, "t").args(["verify", "postgres", &id]));
        assert_eq!(result.code, 5, "{name}: {}", result.all());
        let message = result.error_line()["message"].as_str().unwrap().to_string();
        assert!(message.contains("db-0001.pgdump.zst"), "{name}: {message}");
        assert!(message.contains("1 of 2 parts"), "{name}: {message}");
        assert_eq!(
            message.to_lowercase().matches("another backup").count(),
            1,
            "{name}: the advice once: {message}"
        );
        message
    };
    let mut flipped = original.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x01;
    damaged("flipped byte", Some(flipped));
    let truncated = damaged("truncated", Some(original[..original.len() - 100].to_vec()));
    assert!(
        truncated.contains("SHA-256") || truncated.contains("size") || truncated.contains("bytes"),
        "{truncated}"
    );
    let missing = damaged("missing", None);
    assert!(missing.contains("missing"), "{missing}");
    std::fs::write(&part, &original).unwrap();
    run(pg_kura(&pg, &storage, "t").args(["verify", "postgres", &id])).assert_ok();
    psql(&pg, "postgres", &format!("DROP DATABASE {db}"));
}

#[tokio::test]
async fn verify_deep_restores_and_counts_couchdb() {
    let url = require!("KURA_TEST_COUCH_URL");
    let http = reqwest::Client::new();
    let db = unique("verifydeep");
    let base = url::Url::parse(&url).unwrap();
    let (user, password) = (
        base.username().to_string(),
        base.password().unwrap().to_string(),
    );
    let mut plain = base.clone();
    plain.set_username("").unwrap();
    plain.set_password(None).unwrap();
    let call = |method: reqwest::Method, path: String, body: Option<Value>| {
        let mut request = http
            .request(method, format!("{}{path}", plain.as_str()))
            .basic_auth(&user, Some(&password));
        if let Some(body) = body {
            request = request.json(&body);
        }
        async move {
            let response = request.send().await.unwrap();
            assert!(
                response.status().is_success(),
                "{:?}",
                response.text().await
            );
        }
    };
    call(reqwest::Method::PUT, db.clone(), None).await;
    for i in 0..30 {
        call(
            reqwest::Method::PUT,
            format!("{db}/doc{i}"),
            Some(serde_json::json!({"n": i})),
        )
        .await;
    }
    call(
        reqwest::Method::POST,
        format!("{db}/_bulk_docs"),
        Some(serde_json::json!({"docs": [{"_id": "gone", "_rev": "1-aaaa", "_deleted": true}], "new_edits": false})),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut backup = kura();
    backup
        .env("KURA_COUCHDB_URL", &url)
        .env("KURA_STORAGE", file_storage(dir.path()))
        .args(["backup", "couchdb", "--database", &db]);
    run(&mut backup).assert_ok();
    let mut verify = kura();
    verify
        .env("KURA_COUCHDB_URL", &url)
        .env("KURA_STORAGE", file_storage(dir.path()))
        .args(["verify", "couchdb", "latest", "--deep"]);
    let verified = run(&mut verify);
    verified.assert_ok();
    assert!(
        verified.stdout.contains("counts match"),
        "{}",
        verified.all()
    );
    let all: Vec<String> = http
        .get(format!("{}_all_dbs", plain.as_str()))
        .basic_auth(&user, Some(&password))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        !all.iter().any(|d| d.starts_with("kura_verify_")),
        "scratch deleted: {all:?}"
    );
}

#[test]
fn status_is_fresh_stale_or_empty() {
    let pg = require!("KURA_TEST_PG_URL");
    let db = small_database(&pg);
    let dir = tempfile::tempdir().unwrap();
    let storage = file_storage(dir.path());
    let status = |args: &[&str]| {
        let mut command = pg_kura(&pg, &storage, "t");
        command.arg("status").args(args);
        run(&mut command)
    };
    let empty = status(&["postgres", "--max-age", "1d"]);
    assert_eq!(empty.code, 1, "{}", empty.all());
    assert!(empty.error_line()["message"]
        .as_str()
        .unwrap()
        .contains("postgres is empty"));

    let id = run(pg_kura(&pg, &storage, "t").args(["backup", "postgres", "--database", &db]))
        .assert_ok()
        .backup_id();
    status(&["postgres", "--max-age", "1h"]).assert_ok();
    status(&["--schedule", "*/5 * * * *", "--slack", "10m"]).assert_ok();
    let fresh = status(&["--max-age", "1h", "--json"]);
    assert_eq!(json_stdout(&fresh)[0]["status"], "fresh");

    // Only an old backup left: stale by age and by schedule.
    std::fs::remove_dir_all(dir.path().join("t/postgres").join(&id)).unwrap();
    let old = clone_backup_from(&pg, &db, dir.path(), days_ago(3));
    let stale = status(&["postgres", "--max-age", "26h"]);
    assert_eq!(stale.code, 1, "{}", stale.all());
    let message = stale.error_line()["message"].as_str().unwrap().to_string();
    assert!(
        message.contains("stale") && message.contains("limit 1d2h"),
        "{message}"
    );
    let missed = status(&["postgres", "--schedule", "30 2 * * *", "--json"]);
    assert_eq!(missed.code, 1, "{}", missed.all());
    assert_eq!(json_stdout(&missed)[0]["backup_id"], old);
    assert_eq!(json_stdout(&missed)[0]["status"], "stale");

    for (bad, says) in [
        ("0 2 * *", "4 fields"),
        ("0 2 * * 9", "0-7"),
        ("@fortnightly", "unknown macro"),
    ] {
        let result = status(&["postgres", "--schedule", bad]);
        assert_eq!(result.code, 2, "{bad}: {}", result.all());
        let message = result.error_line()["message"].as_str().unwrap().to_string();
        assert!(
            message.contains(says) && message.contains(bad),
            "{bad}: {message}"
        );
    }
    psql(&pg, "postgres", &format!("DROP DATABASE {db}"));
}

/// A backup that looks `at` old: taken now, then moved to an id of that time.
fn clone_backup_from(pg: &str, db: &str, root: &Path, at: DateTime<Utc>) -> String {
    let scratch = tempfile::tempdir().unwrap();
    let id = run(pg_kura(pg, &file_storage(scratch.path()), "t").args([
        "backup",
        "postgres",
        "--database",
        db,
    ]))
    .assert_ok()
    .backup_id();
    let new_id = clone_backup(scratch.path(), "t", "postgres", &id, at, true);
    let from = scratch.path().join("t/postgres").join(&new_id);
    let to = root.join("t/postgres").join(&new_id);
    std::fs::create_dir_all(&to).unwrap();
    for entry in std::fs::read_dir(&from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
    new_id
}

#[test]
fn concurrent_backups_of_one_source_one_wins_the_other_is_locked() {
    let pg = require!("KURA_TEST_PG_URL");
    let db = small_database(&pg);
    let dir = tempfile::tempdir().unwrap();
    let storage = file_storage(dir.path());
    // Hold a table lock so the first backup's pg_dump waits while holding kura's lock.
    let mut blocker = Command::new(common::pg_tool("psql"));
    blocker
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-c"])
        .arg("BEGIN; LOCK TABLE items IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(4); COMMIT;")
        .envs(common::pg_env(&pg, &db))
        .stdout(Stdio::null());
    let mut blocker = blocker.spawn().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let first = pg_kura(&pg, &storage, "t")
        .args(["backup", "postgres", "--database", &db])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lock = dir.path().join("t/postgres/lock.json");
    let started = Instant::now();
    while !lock.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the first backup never took the lock"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let second = run(pg_kura(&pg, &storage, "t").args(["backup", "postgres", "--database", &db]));
    assert_eq!(second.code, 8, "{}", second.all());
    let message = second.error_line()["message"].as_str().unwrap().to_string();
    assert!(
        message.contains("locked by backup") && message.contains("kura unlock"),
        "{message}"
    );
    blocker.wait().unwrap();
    let first = Run::from_output(first.wait_with_output().unwrap());
    first.assert_ok();
    assert!(!lock.exists(), "released after the backup");
    let listed = run(pg_kura(&pg, &storage, "t").args(["list", "--json"]));
    let rows = json_stdout(&listed);
    assert_eq!(
        rows.as_array().unwrap().len(),
        1,
        "exactly one backup: {rows:#}"
    );
    psql(&pg, "postgres", &format!("DROP DATABASE {db}"));
}

#[test]
fn an_expired_lock_is_taken_over_and_a_live_one_needs_unlock_force() {
    let pg = require!("KURA_TEST_PG_URL");
    let db = small_database(&pg);
    let dir = tempfile::tempdir().unwrap();
    let storage = file_storage(dir.path());
    let lock = dir.path().join("t/postgres/lock.json");
    std::fs::create_dir_all(lock.parent().unwrap()).unwrap();
    let write_lock = |expires: DateTime<Utc>| {
        let info = serde_json::json!({
            "operation": "backup", "host": "node-that-died", "pid": 4242, "nonce": "0123456789abcdef",
            "kura_version": "0.1.0", "created_at": (expires - chrono::Duration::minutes(15)).to_rfc3339(),
            "expires_at": expires.to_rfc3339(),
        });
        std::fs::write(&lock, serde_json::to_vec(&info).unwrap()).unwrap();
    };
    write_lock(Utc::now() - chrono::Duration::minutes(1));
    let taken = run(pg_kura(&pg, &storage, "t").args(["backup", "postgres", "--database", &db]));
    taken.assert_ok();
    assert!(
        taken.stdout.contains("taking over an expired lock")
            && taken.stdout.contains("node-that-died"),
        "{}",
        taken.all()
    );
    assert!(!lock.exists());

    write_lock(Utc::now() + chrono::Duration::minutes(10));
    let blocked = run(pg_kura(&pg, &storage, "t").args(["prune", "--keep-last", "1"]));
    assert_eq!(blocked.code, 8, "{}", blocked.all());
    let refused = run(pg_kura(&pg, &storage, "t").args(["unlock", "postgres"]));
    assert_eq!(refused.code, 8, "{}", refused.all());
    assert!(lock.exists());
    run(pg_kura(&pg, &storage, "t").args(["unlock", "postgres", "--force"])).assert_ok();
    assert!(!lock.exists());
    run(pg_kura(&pg, &storage, "t").args(["prune", "--keep-last", "1"])).assert_ok();
    psql(&pg, "postgres", &format!("DROP DATABASE {db}"));
}

#[tokio::test]
async fn wait_for_returns_once_a_late_server_answers_and_times_out_clearly() {
    let npm = require!("KURA_TEST_NPM_BIN");
    let pg = require!("KURA_TEST_PG_URL");
    let free_port = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let waiting = kura()
        .args(["wait-for", "couchdb", &url, "--timeout", "60s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let dir = tempfile::tempdir().unwrap();
    let mut server = common::spawn_pouchdb(&npm, port, dir.path());
    let waited = Run::from_output(waiting.wait_with_output().unwrap());
    server.kill().unwrap();
    server.wait().unwrap();
    waited.assert_ok();
    let attempts = waited
        .stdout
        .lines()
        .filter(|l| l.contains("waiting for"))
        .count();
    assert!(
        attempts >= 2,
        "one log line per failed attempt:\n{}",
        waited.all()
    );
    assert!(waited.stdout.contains("answers"), "{}", waited.all());

    // PostgreSQL: the password comes from the environment, never the command line.
    let mut parsed = url::Url::parse(&pg).unwrap();
    let password = parsed.password().unwrap().to_string();
    parsed.set_password(None).unwrap();
    let mut ok = kura();
    ok.env("KURA_POSTGRES_PASSWORD", &password).args([
        "wait-for",
        "postgres",
        parsed.as_str(),
        "--timeout",
        "10s",
    ]);
    run(&mut ok).assert_ok();

    let started = Instant::now();
    let closed = format!("postgres://postgres@127.0.0.1:{}/postgres", free_port());
    let timed_out = run(kura().args(["wait-for", "postgres", &closed, "--timeout", "2s"]));
    assert_eq!(timed_out.code, 4, "{}", timed_out.all());
    assert!(started.elapsed() < Duration::from_secs(10));
    let message = timed_out.error_line()["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        message.contains("did not answer within 2s") && message.contains(&closed[..20]),
        "{message}"
    );
}

/// A bucket with retention refuses some deletes: prune reports them, deletes the rest, and a
/// backup whose manifest cannot go stays complete rather than losing its parts.
#[tokio::test]
async fn objects_the_store_refuses_to_delete_are_reported_not_fatal() {
    use bytes::Bytes;
    use kura::catalog::{prune, SourcePath};
    use kura::retention::Policy;
    use kura::storage::local::LocalStore;
    use kura::storage::testing::FailingStore;
    use kura::storage::ObjectStore;

    let dir = tempfile::tempdir().unwrap();
    let store = FailingStore::new(
        LocalStore::new(dir.path().to_str().unwrap()).unwrap(),
        u64::MAX,
    )
    .protecting("20260101T000000Z-aaaaaa");
    let path = SourcePath {
        tenant: "t".into(),
        source: "postgres".into(),
    };
    let manifest = |id: &str| {
        serde_json::json!({
            "format": "kura-backup-manifest", "format_version": 1, "kura_version": "0.1.0",
            "backup_id": id, "tenant": "t", "source": "postgres", "kind": "postgres",
            "server_version": "15", "tool_version": "pg_dump 15",
            "started_at": "2026-01-01T00:00:00Z", "finished_at": "2026-01-01T00:00:01Z", "parts": [],
        })
    };
    for id in [
        "20260101T000000Z-aaaaaa",
        "20260102T000000Z-bbbbbb",
        "20260103T000000Z-cccccc",
    ] {
        store
            .put(
                &format!("t/postgres/{id}/db-0001.pgdump.zst"),
                Bytes::from_static(b"x"),
            )
            .await
            .unwrap();
        store
            .put(
                &format!("t/postgres/{id}/manifest.json"),
                Bytes::from(serde_json::to_vec(&manifest(id)).unwrap()),
            )
            .await
            .unwrap();
    }
    let policy = Policy {
        keep_last: 1,
        ..Policy::default()
    };
    let now = "2026-02-01T00:00:00Z".parse().unwrap();
    let plan = prune::plan(&store, &path, &policy, Duration::from_secs(3600), now)
        .await
        .unwrap();
    assert_eq!(plan.to_delete().count(), 2);
    let outcome = prune::execute(&store, &path, &plan).await.unwrap();
    assert_eq!(
        outcome.deleted_backups,
        vec!["20260102T000000Z-bbbbbb".to_string()]
    );
    assert_eq!(outcome.refused.len(), 1);
    assert!(outcome.refused[0]
        .key
        .ends_with("20260101T000000Z-aaaaaa/manifest.json"));
    let left: Vec<String> = store
        .list("t/")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert!(
        left.contains(&"t/postgres/20260101T000000Z-aaaaaa/db-0001.pgdump.zst".to_string()),
        "{left:?}"
    );
    assert!(
        left.contains(&"t/postgres/20260101T000000Z-aaaaaa/manifest.json".to_string()),
        "{left:?}"
    );
    assert!(!left.iter().any(|k| k.contains("bbbbbb")), "{left:?}");
}

/// Lines of a child's stdout as they come, on a thread, so a test can wait for one.
fn line_reader(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn wait_for_line(
    lines: &std::sync::mpsc::Receiver<String>,
    needle: &str,
    within: Duration,
) -> Vec<String> {
    let deadline = Instant::now() + within;
    let mut seen = Vec::new();
    while let Ok(line) = lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        let found = line.contains(needle);
        seen.push(line);
        if found {
            return seen;
        }
    }
    panic!(
        "no line with {needle:?} within {within:?}:\n{}",
        seen.join("\n")
    );
}

fn sigterm(child: &std::process::Child) {
    // SAFETY: kill(2) on our own child process.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
}

#[test]
fn schedule_runs_the_command_and_passes_sigterm_on() {
    let bad = run(kura().args(["schedule", "0 2 * *", "--", "list"]));
    assert_eq!(bad.code, 2, "{}", bad.all());
    assert!(bad.error_line()["message"]
        .as_str()
        .unwrap()
        .contains("five fields"));

    // Idle: a stop signal ends the scheduler at once, successfully.
    let mut idle = kura()
        .args(["schedule", "0 3 1 1 *", "--", "list"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = line_reader(&mut idle);
    wait_for_line(&lines, "next run", Duration::from_secs(10));
    sigterm(&idle);
    assert_eq!(idle.wait().unwrap().code(), Some(0));

    // Busy: the running command gets the signal, rolls back, and its exit is reported. A
    // wait-for on a closed port keeps the command running until then.
    let closed = format!(
        "postgres://nobody@127.0.0.1:{}/postgres",
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    );
    let mut busy = kura()
        .args([
            "schedule",
            "* * * * *",
            "--",
            "wait-for",
            "postgres",
            &closed,
            "--timeout",
            "5m",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = line_reader(&mut busy);
    wait_for_line(&lines, "waiting for", Duration::from_secs(75));
    sigterm(&busy);
    let rest: Vec<String> = lines.iter().collect();
    let status = busy.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{}", rest.join("\n"));
    assert!(
        rest.iter()
            .any(|l| l.contains("the running command exited with 130")),
        "{}",
        rest.join("\n")
    );
    assert!(!rest.join("\n").contains("nobody:"), "no secrets in logs");
}
