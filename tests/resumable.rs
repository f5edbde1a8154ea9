//! Restores that survive the network: a download answered 503, cut mid-body or stalled past
//! the read timeout (on every 2nd download, by a front in front of moto) is resumed with a
//! ranged, If-Match read, and the restore is identical; an object replaced between two
//! ranged reads is exit 5, never a splice; a store gone for good is exit 3 within the bound.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::front::{fault_front, Fault};
use common::{kura, psql, run, unique};

struct Fixture {
    pg: String,
    moto: String,
    bucket: String,
    db: String,
    id: String,
}

/// A database whose dump is several multipart parts (5 MiB parts), backed up straight to moto.
async fn fixture() -> Option<Fixture> {
    let pg = common::service("KURA_TEST_PG_URL")?;
    let moto = common::service("KURA_TEST_S3_ENDPOINT")?;
    let bucket = unique("resume").replace('_', "-");
    common::create_bucket(&moto, "testing", "testing", &bucket).await;
    let db = unique("resume");
    psql(&pg, "postgres", &format!("CREATE DATABASE {db}"));
    psql(
        &pg,
        &db,
        "CREATE TABLE t AS SELECT g, md5(random()::text) || md5(random()::text) AS a FROM generate_series(1, 300000) g;",
    );
    let mut command = kura();
    common::with_moto(&mut command, &moto, &bucket, "r");
    command
        .env("KURA_POSTGRES_URL", &pg)
        .env("KURA_PART_SIZE", "5MiB")
        .args(["backup", "postgres", "--database", &db]);
    let backup = tokio::task::block_in_place(|| run(&mut command));
    backup.assert_ok();
    Some(Fixture {
        id: backup.backup_id(),
        pg,
        moto,
        bucket,
        db,
    })
}

fn through(fixture: &Fixture, port: u16) -> std::process::Command {
    let mut command = kura();
    common::with_moto(
        &mut command,
        &format!("http://127.0.0.1:{port}"),
        &fixture.bucket,
        "r",
    );
    command
        .env("KURA_POSTGRES_URL", &fixture.pg)
        .env("KURA_READ_TIMEOUT", "5s");
    command
}

#[tokio::test(flavor = "multi_thread")]
async fn downloads_cut_stalled_or_refused_resume_and_restore_identically() {
    let Some(fixture) = fixture().await else {
        return;
    };
    let original = common::pg_dump_text(&fixture.pg, &fixture.db);
    for (name, fault) in [
        ("slowdown", Fault::SlowDown),
        ("reset", Fault::CloseAfter(1 << 20)),
        // Longer than the read timeout by far: only kura's own timeout gets past it.
        ("stall", Fault::Stall(1 << 20, Duration::from_secs(60))),
    ] {
        let (port, faults) = fault_front(&fixture.moto, fault, 2);
        let target = format!("{}_{name}", fixture.db);
        let restore = tokio::task::block_in_place(|| {
            run(through(&fixture, port).args([
                "restore",
                "postgres",
                &fixture.id,
                "--database",
                &format!("{}:{target}", fixture.db),
            ]))
        });
        restore.assert_ok();
        assert!(
            faults.injected.load(Ordering::SeqCst) >= 1,
            "{name}: no fault was injected ({} downloads)",
            faults.downloads.load(Ordering::SeqCst)
        );
        if fault != Fault::SlowDown {
            assert!(
                restore.all().contains("resuming from byte"),
                "{name}: {}",
                restore.all()
            );
        }
        if name == "stall" {
            assert!(
                restore.all().contains("no data for 5s"),
                "{}",
                restore.all()
            );
        }
        assert_eq!(
            common::pg_dump_text(&fixture.pg, &target),
            original,
            "{name}: the restore differs"
        );
        let verified = tokio::task::block_in_place(|| {
            run(through(&fixture, port).args(["verify", "postgres", &fixture.id]))
        });
        verified.assert_ok();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_object_replaced_between_ranged_reads_is_exit_5_not_a_splice() {
    let Some(fixture) = fixture().await else {
        return;
    };
    let (port, faults) = fault_front(&fixture.moto, Fault::ReplaceAfter(1 << 20), 1);
    let target = format!("{}_spliced", fixture.db);
    let restore = tokio::task::block_in_place(|| {
        run(through(&fixture, port).args([
            "restore",
            "postgres",
            &fixture.id,
            "--database",
            &format!("{}:{target}", fixture.db),
        ]))
    });
    assert_eq!(restore.code, 5, "{}", restore.all());
    assert!(faults.injected.load(Ordering::SeqCst) >= 1);
    let line = restore.error_line()["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(line.contains("was replaced while it was read"), "{line}");
    assert!(line.contains(&fixture.id), "the object is named: {line}");
    assert_eq!(
        psql(
            &fixture.pg,
            "postgres",
            &format!("SELECT count(*) FROM pg_database WHERE datname = '{target}'")
        ),
        "0",
        "the target is left as it was"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_store_gone_for_good_is_exit_3_within_the_bound() {
    let Some(fixture) = fixture().await else {
        return;
    };
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let started = Instant::now();
    let restore = tokio::task::block_in_place(|| {
        run(through(&fixture, closed).args(["restore", "postgres", &fixture.id]))
    });
    assert_eq!(restore.code, 3, "{}", restore.all());
    // The retry policy waits 8 to 15.5 s in all (README: what kura retries).
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn uploads_reset_or_stalled_are_retried_and_the_backup_restores_identically() {
    let Some(fixture) = fixture().await else {
        return;
    };
    let original = common::pg_dump_text(&fixture.pg, &fixture.db);
    for (name, fault) in [
        ("slowdown", Fault::SlowDown),
        ("reset", Fault::UploadReset(1 << 20)),
        // Held far past the request timeout (2 × 5 s): only the timeout gets past it.
        (
            "stall",
            Fault::UploadStall(1 << 20, Duration::from_secs(60)),
        ),
    ] {
        // Every 2nd upload request (a PUT of a part or an object) gets the fault.
        let (port, faults) = match fault {
            Fault::SlowDown => {
                common::front::fault_front_where(&fixture.moto, fault, 2, |m, _| m == "PUT")
            }
            _ => fault_front(&fixture.moto, fault, 2),
        };
        let backup = tokio::task::block_in_place(|| {
            run(through(&fixture, port).env("KURA_PART_SIZE", "5MiB").args([
                "backup",
                "postgres",
                "--database",
                &fixture.db,
            ]))
        });
        backup.assert_ok();
        assert!(
            faults.injected.load(Ordering::SeqCst) >= 1,
            "{name}: no upload was disturbed ({} counted)",
            faults.downloads.load(Ordering::SeqCst)
        );
        // Read back straight from the store, not through the front.
        let target = format!("{}_up_{name}", fixture.db);
        let mut restore = kura();
        common::with_moto(&mut restore, &fixture.moto, &fixture.bucket, "r");
        restore.env("KURA_POSTGRES_URL", &fixture.pg).args([
            "restore",
            "postgres",
            &backup.backup_id(),
            "--database",
            &format!("{}:{target}", fixture.db),
        ]);
        tokio::task::block_in_place(|| run(&mut restore)).assert_ok();
        assert_eq!(
            common::pg_dump_text(&fixture.pg, &target),
            original,
            "{name}: the restore differs"
        );
    }
}

/// A CouchDB server reached as admin, for building and reading test databases.
struct Couch {
    url: String,
    base: String,
    password: String,
    http: reqwest::Client,
}

impl Couch {
    fn new(url: &str) -> Couch {
        let mut base = url::Url::parse(url).unwrap();
        let password = base.password().unwrap().to_string();
        base.set_username("").unwrap();
        base.set_password(None).unwrap();
        Couch {
            url: url.to_string(),
            base: base.to_string().trim_end_matches('/').to_string(),
            password,
            http: reqwest::Client::new(),
        }
    }

    /// The same server with credentials, through a front on `port`.
    fn through(&self, port: u16) -> String {
        let mut url = url::Url::parse(&self.url).unwrap();
        url.set_port(Some(port)).unwrap();
        url.to_string()
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> serde_json::Value {
        let mut request = self
            .http
            .request(method, format!("{}/{path}", self.base))
            .basic_auth("admin", Some(&self.password));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        assert!(response.status().is_success(), "{}", response.status());
        response.json().await.unwrap()
    }

    /// 2,000 documents of random text, two revisions each (so `_bulk_get` reads their
    /// history), 100 of them with a conflicting branch: a part of about 2 MB.
    async fn fixture(&self, db: &str) {
        self.call(reqwest::Method::PUT, db, None).await;
        let noise = || -> String {
            (0..32)
                .map(|_| format!("{:08x}", rand::random::<u32>()))
                .collect()
        };
        let docs: Vec<serde_json::Value> = (0..2000)
            .map(|i| serde_json::json!({"_id": format!("doc{i:04}"), "noise": noise()}))
            .collect();
        let bulk = |docs| Some(serde_json::json!({ "docs": docs }));
        let path = format!("{db}/_bulk_docs");
        let written = self.call(reqwest::Method::POST, &path, bulk(docs)).await;
        let edits: Vec<serde_json::Value> = written
            .as_array()
            .unwrap()
            .iter()
            .map(|w| serde_json::json!({"_id": w["id"], "_rev": w["rev"], "edited": true, "noise": noise()}))
            .collect();
        self.call(reqwest::Method::POST, &path, bulk(edits)).await;
        let conflicts: Vec<serde_json::Value> = (0..100)
            .map(|i| serde_json::json!({"_id": format!("doc{i:04}"), "_rev": format!("2-{:032x}", i + 1), "branch": noise()}))
            .collect();
        self.call(
            reqwest::Method::POST,
            &path,
            Some(serde_json::json!({ "docs": conflicts, "new_edits": false })),
        )
        .await;
    }

    /// Every document with all its leaf revisions, bodies and histories.
    async fn leaves(&self, db: &str) -> Vec<(String, Vec<String>)> {
        let all = self
            .call(reqwest::Method::GET, &format!("{db}/_all_docs"), None)
            .await;
        let mut out = Vec::new();
        for row in all["rows"].as_array().unwrap() {
            let id = row["id"].as_str().unwrap();
            let path = format!("{db}/{id}?open_revs=all&revs=true");
            let answer = self
                .http
                .get(format!("{}/{path}", self.base))
                .basic_auth("admin", Some(&self.password))
                .header("accept", "application/json")
                .send()
                .await
                .unwrap();
            let revisions: Vec<serde_json::Value> = answer.json().await.unwrap();
            let mut docs: Vec<String> = revisions.iter().map(|r| r["ok"].to_string()).collect();
            docs.sort();
            out.push((id.to_string(), docs));
        }
        out
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_couchdb_restore_survives_cut_downloads_with_every_revision() {
    let couch = Couch::new(&require!("KURA_TEST_COUCH_URL"));
    let moto = require!("KURA_TEST_S3_ENDPOINT");
    let bucket = unique("resume-couch").replace('_', "-");
    common::create_bucket(&moto, "testing", "testing", &bucket).await;
    let db = unique("resumedb");
    couch.fixture(&db).await;
    let kura_at = |endpoint: &str| {
        let mut command = kura();
        common::with_moto(&mut command, endpoint, &bucket, "c");
        command
            .env("KURA_COUCHDB_URL", &couch.url)
            .env("KURA_READ_TIMEOUT", "5s");
        command
    };
    let backup = tokio::task::block_in_place(|| {
        run(kura_at(&moto).args(["backup", "couchdb", "--database", &db]))
    });
    backup.assert_ok();
    let original = couch.leaves(&db).await;
    assert_eq!(original.len(), 2000);
    for (name, fault, every) in [
        ("slowdown", Fault::SlowDown, 2),
        ("reset", Fault::CloseAfter(256 << 10), 2),
        ("stall", Fault::Stall(256 << 10, Duration::from_secs(60)), 2),
        // Every download cut after 64 KiB: the part is read in many resumed pieces.
        ("cut_often", Fault::CloseAfter(64 << 10), 1),
    ] {
        let (port, faults) = fault_front(&moto, fault, every);
        let copy = format!("{db}_{name}");
        let restore = tokio::task::block_in_place(|| {
            run(kura_at(&format!("http://127.0.0.1:{port}")).args([
                "restore",
                "couchdb",
                &backup.backup_id(),
                "--database",
                &format!("{db}:{copy}"),
            ]))
        });
        restore.assert_ok();
        assert!(
            faults.injected.load(Ordering::SeqCst) >= 1,
            "{name}: no download was disturbed"
        );
        if fault != Fault::SlowDown {
            assert!(
                restore.all().contains("resuming from byte"),
                "{name}: {}",
                restore.all()
            );
        }
        assert_eq!(couch.leaves(&copy).await, original, "{name}");
    }
}

/// The revisions in a CouchDB part: (id, rev) of every document line, in order.
fn part_revisions(storage: &std::path::Path) -> Vec<(String, String)> {
    let part = common::walk(storage)
        .into_iter()
        .find(|p| p.to_string_lossy().ends_with(".ndjson.zst"))
        .expect("a CouchDB part");
    let text = zstd::decode_all(std::fs::File::open(part).unwrap()).unwrap();
    String::from_utf8(text)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
        .filter(|line| line["doc"].is_object())
        .map(|line| {
            let doc = &line["doc"];
            (
                doc["_id"].as_str().unwrap().to_string(),
                doc["_rev"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn couchdb_pages_cut_or_stalled_mid_answer_are_read_again_with_no_revision_lost_or_doubled() {
    let couch = Couch::new(&require!("KURA_TEST_COUCH_URL"));
    let db = unique("resumesrc");
    couch.fixture(&db).await;
    let original = couch.leaves(&db).await;
    let leaf_count: usize = original.iter().map(|(_, revs)| revs.len()).sum();
    assert_eq!(leaf_count, 2100);
    let pages: common::front::Selects =
        |_, target| target.contains("/_changes?") || target.contains("/_bulk_get?");
    for (name, fault) in [
        ("cut", Fault::CloseAfter(8 << 10)),
        // Far past the read timeout: only kura's own timeout gets past it.
        ("stall", Fault::Stall(8 << 10, Duration::from_secs(60))),
    ] {
        let (port, faults) = common::front::fault_front_where(&couch.url, fault, 2, pages);
        let storage = tempfile::tempdir().unwrap();
        let backup = tokio::task::block_in_place(|| {
            run(kura()
                .env(
                    "KURA_STORAGE",
                    format!("file://{}", storage.path().display()),
                )
                .env("KURA_COUCHDB_URL", couch.through(port))
                .env("KURA_READ_TIMEOUT", "3s")
                .args(["backup", "couchdb", "--database", &db]))
        });
        backup.assert_ok();
        assert!(
            faults.injected.load(Ordering::SeqCst) >= 2,
            "{name}: {} of {} page requests disturbed",
            faults.injected.load(Ordering::SeqCst),
            faults.downloads.load(Ordering::SeqCst)
        );
        let mut revisions = part_revisions(storage.path());
        let in_part = revisions.len();
        revisions.sort();
        revisions.dedup();
        assert_eq!(
            revisions.len(),
            in_part,
            "{name}: a revision is in the part twice"
        );
        assert_eq!(
            in_part, leaf_count,
            "{name}: revisions missing from the part"
        );
        let copy = format!("{db}_{name}");
        let restore = tokio::task::block_in_place(|| {
            run(kura()
                .env(
                    "KURA_STORAGE",
                    format!("file://{}", storage.path().display()),
                )
                .env("KURA_COUCHDB_URL", &couch.url)
                .args([
                    "restore",
                    "couchdb",
                    "latest",
                    "--database",
                    &format!("{db}:{copy}"),
                ]))
        });
        restore.assert_ok();
        assert_eq!(
            couch.leaves(&copy).await,
            original,
            "{name}: the restore differs"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backup_rides_out_the_store_gone_for_30_seconds_in_the_middle() {
    let Some(fixture) = fixture().await else {
        return;
    };
    let outage = Duration::from_secs(30);
    let (port, faults) = fault_front(&fixture.moto, Fault::Outage(outage), 2);
    let started = Instant::now();
    let backup = tokio::task::block_in_place(|| {
        run(through(&fixture, port).env("KURA_PART_SIZE", "5MiB").args([
            "backup",
            "postgres",
            "--database",
            &fixture.db,
        ]))
    });
    backup.assert_ok();
    let took = started.elapsed();
    eprintln!("a backup through a 30 s outage took {took:?}");
    assert_eq!(faults.injected.load(Ordering::SeqCst), 1);
    assert!(faults.refused.load(Ordering::SeqCst) >= 2);
    assert!(
        took > outage,
        "{took:?}: the outage was not in the backup's way"
    );
    assert!(
        backup.all().contains("trying again in"),
        "each round is logged: {}",
        backup.all()
    );
    let target = format!("{}_outage", fixture.db);
    let mut restore = kura();
    common::with_moto(&mut restore, &fixture.moto, &fixture.bucket, "r");
    restore.env("KURA_POSTGRES_URL", &fixture.pg).args([
        "restore",
        "postgres",
        &backup.backup_id(),
        "--database",
        &format!("{}:{target}", fixture.db),
    ]);
    tokio::task::block_in_place(|| run(&mut restore)).assert_ok();
    assert_eq!(
        common::pg_dump_text(&fixture.pg, &target),
        common::pg_dump_text(&fixture.pg, &fixture.db)
    );
}
