//! CouchDB end to end through the real binary against pouchdb-server: every leaf revision
//! (winners, conflicts, deleted leaves), revision histories, attachments, design documents
//! and `_security` survive a backup and restore; failures leave nothing that looks complete.

mod common;

use std::collections::BTreeMap;

use base64::Engine;
use common::{kura, run, unique, Run};
use serde_json::{json, Value};

struct Couch {
    http: reqwest::Client,
    base: url::Url,
    user: String,
    password: String,
}

impl Couch {
    fn new(url: &str) -> Couch {
        let mut base = url::Url::parse(url).unwrap();
        let user = base.username().to_string();
        let password = base.password().unwrap_or_default().to_string();
        base.set_username("").unwrap();
        base.set_password(None).unwrap();
        Couch {
            // pouchdb-server closes idle connections after 5 s; a reused one fails.
            http: reqwest::Client::builder()
                .pool_idle_timeout(std::time::Duration::from_secs(2))
                .build()
                .unwrap(),
            base,
            user,
            password,
        }
    }

    fn db(name: &str, rest: &str) -> String {
        let encoded =
            percent_encoding::utf8_percent_encode(name, percent_encoding::NON_ALPHANUMERIC)
                .to_string();
        if rest.is_empty() {
            encoded
        } else {
            format!("{encoded}/{rest}")
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut request = self.http.request(method, self.base.join(path).unwrap());
        if !self.user.is_empty() {
            request = request.basic_auth(&self.user, Some(&self.password));
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn ok(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let (status, value) = self.call(method, path, body).await;
        assert!(
            (200..300).contains(&status),
            "{path}: HTTP {status} {value}"
        );
        value
    }

    /// Every leaf revision of every document, normalised for comparison.
    async fn snapshot(&self, db: &str) -> (BTreeMap<String, Value>, Value) {
        let changes = self
            .ok(
                reqwest::Method::GET,
                &Self::db(db, "_changes?style=all_docs"),
                None,
            )
            .await;
        let mut wanted = Vec::new();
        for change in changes["results"].as_array().unwrap() {
            for rev in change["changes"].as_array().unwrap() {
                wanted.push(json!({"id": change["id"], "rev": rev["rev"]}));
            }
        }
        let got = self
            .ok(
                reqwest::Method::POST,
                &Self::db(db, "_bulk_get?revs=true"),
                Some(json!({"docs": wanted})),
            )
            .await;
        let mut docs = BTreeMap::new();
        for result in got["results"].as_array().unwrap() {
            for entry in result["docs"].as_array().unwrap() {
                let mut doc = entry["ok"].clone();
                assert!(doc.is_object(), "bulk_get error: {entry}");
                if let Some(attachments) = doc["_attachments"].as_object_mut() {
                    for stub in attachments.values_mut() {
                        *stub = json!({"content_type": stub["content_type"], "digest": stub["digest"], "length": stub["length"]});
                    }
                }
                docs.insert(
                    format!(
                        "{}@{}",
                        doc["_id"].as_str().unwrap(),
                        doc["_rev"].as_str().unwrap()
                    ),
                    doc,
                );
            }
        }
        let security = self
            .ok(reqwest::Method::GET, &Self::db(db, "_security"), None)
            .await;
        (docs, security)
    }
}

fn attachment(data: &[u8], content_type: &str) -> Value {
    json!({"content_type": content_type, "data": base64::engine::general_purpose::STANDARD.encode(data)})
}

/// A database with everything the issue lists; the design document (whose
/// validate_doc_update rejects documents without a `type`) goes in last.
async fn build_fixture(couch: &Couch, db: &str) {
    use reqwest::Method;
    couch.ok(Method::PUT, &Couch::db(db, ""), None).await;
    couch
        .ok(
            Method::PUT,
            &Couch::db(db, "plain"),
            Some(json!({"n": 1, "text": "héllo\n\t\"quoted\""})),
        )
        .await;
    let mut rev = couch
        .ok(Method::PUT, &Couch::db(db, "edited"), Some(json!({"v": 0})))
        .await["rev"]
        .clone();
    for v in 1..=4 {
        rev = couch
            .ok(
                Method::PUT,
                &Couch::db(db, "edited"),
                Some(json!({"v": v, "_rev": rev})),
            )
            .await["rev"]
            .clone();
    }
    let gone = couch
        .ok(
            Method::PUT,
            &Couch::db(db, "gone"),
            Some(json!({"bye": true})),
        )
        .await["rev"]
        .clone();
    couch
        .ok(
            Method::DELETE,
            &Couch::db(db, &format!("gone?rev={}", gone.as_str().unwrap())),
            None,
        )
        .await;
    couch
        .ok(Method::POST, &Couch::db(db, "_bulk_docs"), Some(json!({"new_edits": false, "docs": [
            {"_id": "conflicted", "_rev": "2-aaaa", "side": "a", "_revisions": {"start": 2, "ids": ["aaaa", "root"]}},
            {"_id": "conflicted", "_rev": "2-bbbb", "side": "b", "_revisions": {"start": 2, "ids": ["bbbb", "root"]}},
            {"_id": "conflicted", "_rev": "2-cccc", "_deleted": true, "_revisions": {"start": 2, "ids": ["cccc", "root"]}},
            {"_id": "ユーザー/42?x=1#frag with space", "_rev": "1-dddd", "name": "山田"}
        ]})))
        .await;
    let small = common::noise(8 * 1024);
    let big = common::noise(3 * 1024 * 1024);
    couch
        .ok(Method::PUT, &Couch::db(db, "files"), Some(json!({
            "title": "with attachments",
            "_attachments": {"small.bin": attachment(&small, "application/octet-stream"), "big photo.jpg": attachment(&big, "image/jpeg")}
        })))
        .await;
    for i in 0..300 {
        couch
            .ok(
                Method::PUT,
                &Couch::db(db, &format!("bulk-{i:04}")),
                Some(json!({"i": i, "pad": "x".repeat(i)})),
            )
            .await;
    }
    couch
        .ok(Method::PUT, &Couch::db(db, "_security"), Some(json!({
            "admins": {"names": ["boss"], "roles": []}, "members": {"names": [], "roles": ["staff"]}
        })))
        .await;
    couch
        .ok(Method::PUT, &Couch::db(db, "_design/app"), Some(json!({
            "views": {"by_n": {"map": "function (doc) { if (doc.n) { emit(doc.n, null); } }"}},
            "validate_doc_update": "function (newDoc) { if (!newDoc._deleted && !newDoc.type) { throw({forbidden: 'type required'}); } }"
        })))
        .await;
}

/// Run kura against a CouchDB URL with backups in a local directory.
fn kura_couch(url: &str, storage: &std::path::Path, args: &[&str]) -> Run {
    let mut command = kura();
    command
        .env("KURA_COUCHDB_URL", url)
        .env("KURA_STORAGE", format!("file://{}", storage.display()))
        .args(args);
    run(&mut command)
}

#[tokio::test]
async fn round_trip_keeps_revisions_conflicts_deletions_attachments_and_security() {
    let url = require!("KURA_TEST_COUCH_URL");
    let couch = Couch::new(&url);
    let source = unique("couch_rt");
    // CouchDB allows '/' in database names, but pouchdb-server lists such names mangled
    // ("a/b" as "ab"), so the fixture keeps to names both servers report faithfully.
    let second = format!("{}-(2)", unique("couch_rt"));
    build_fixture(&couch, &source).await;
    couch
        .ok(reqwest::Method::PUT, &Couch::db(&second, ""), None)
        .await;
    for i in 0..50 {
        couch
            .ok(
                reqwest::Method::PUT,
                &Couch::db(&second, &format!("d{i}")),
                Some(json!({"i": i})),
            )
            .await;
    }
    let dir = tempfile::tempdir().unwrap();
    let result = kura_couch(
        &url,
        dir.path(),
        &[
            "backup",
            "couchdb",
            "--database",
            &source,
            "--database",
            &second,
        ],
    );
    result.assert_ok();
    let id = result.backup_id();

    let target = format!("{source}_copy");
    let second_target = format!("{second}_copy");
    kura_couch(
        &url,
        dir.path(),
        &[
            "restore",
            "couchdb",
            &id,
            "--database",
            &format!("{source}:{target}"),
            "--database",
            &format!("{second}:{second_target}"),
        ],
    )
    .assert_ok();

    let (source_docs, source_security) = couch.snapshot(&source).await;
    let (target_docs, target_security) = couch.snapshot(&target).await;
    assert!(
        source_docs.contains_key("conflicted@2-cccc"),
        "the fixture has a deleted conflict"
    );
    assert!(source_docs.len() > 300);
    assert_eq!(
        source_docs.keys().collect::<Vec<_>>(),
        target_docs.keys().collect::<Vec<_>>(),
        "same leaf revisions"
    );
    for (key, doc) in &source_docs {
        assert_eq!(doc, &target_docs[key], "document {key}");
    }
    assert_eq!(source_security, target_security);
    assert_eq!(
        couch.snapshot(&second).await.0.len(),
        couch.snapshot(&second_target).await.0.len()
    );

    // Non-empty target: refused without --force; with --force nothing is duplicated.
    let refused = kura_couch(
        &url,
        dir.path(),
        &[
            "restore",
            "couchdb",
            &id,
            "--database",
            &format!("{source}:{target}"),
        ],
    );
    assert_eq!(refused.code, 7, "{}", refused.all());
    kura_couch(
        &url,
        dir.path(),
        &[
            "restore",
            "couchdb",
            &id,
            "--database",
            &format!("{source}:{target}"),
            "--force",
        ],
    )
    .assert_ok();
    let (again, _) = couch.snapshot(&target).await;
    assert_eq!(
        again, target_docs,
        "a forced restore adds nothing that is already there"
    );

    // A target that lacks revisions: half of the attachment-free leaves, plus a document of
    // its own. --force adds exactly the missing revisions and leaves the rest alone.
    let partial = format!("{source}_partial");
    couch
        .ok(reqwest::Method::PUT, &Couch::db(&partial, ""), None)
        .await;
    let subset: Vec<Value> = source_docs
        .values()
        // Without the design document: its validate_doc_update would judge the restored
        // revisions (CouchDB validates replicated writes too).
        .filter(|doc| {
            doc["_attachments"].is_null() && !doc["_id"].as_str().unwrap().starts_with("_design/")
        })
        .step_by(2)
        .map(|doc| {
            let mut doc = doc.clone();
            doc.as_object_mut().unwrap().remove("_attachments");
            doc
        })
        .collect();
    assert!(subset.len() > 100, "{}", subset.len());
    couch
        .ok(
            reqwest::Method::POST,
            &Couch::db(&partial, "_bulk_docs"),
            Some(json!({"docs": subset, "new_edits": false})),
        )
        .await;
    let own = couch
        .ok(
            reqwest::Method::PUT,
            &Couch::db(&partial, "only-in-target"),
            Some(json!({"type": "local", "keep": true})),
        )
        .await;
    let (before, _) = couch.snapshot(&partial).await;
    assert!(before.len() < source_docs.len() / 2 + 2);
    kura_couch(
        &url,
        dir.path(),
        &[
            "restore",
            "couchdb",
            &id,
            "--database",
            &format!("{source}:{partial}"),
            "--force",
        ],
    )
    .assert_ok();
    let (mut after, _) = couch.snapshot(&partial).await;
    let own_key = format!("only-in-target@{}", own["rev"].as_str().unwrap());
    assert!(
        after.remove(&own_key).is_some(),
        "the target's own document is kept"
    );
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        source_docs.keys().collect::<Vec<_>>(),
        "every missing revision was added, none twice"
    );
    for (key, doc) in &source_docs {
        assert_eq!(doc, &after[key], "document {key}");
    }

    // A corrupted part fails, names the part, and leaves no database behind. The part of
    // the database without attachments: a damaged one with attachments makes kura abort an
    // attachment's upload, which CouchDB discards but pouchdb-server 4.2 answers by exiting
    // (its multipart parser throws on an aborted request), which would take the other tests
    // with it; `corrupt_attachment_aborts_its_upload` covers that on a private server.
    let part = dir
        .path()
        .join("default/couchdb")
        .join(&id)
        .join("db-0002.ndjson.zst");
    let mut bytes = std::fs::read(&part).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x10;
    std::fs::write(&part, &bytes).unwrap();
    let fresh = format!("{source}_fresh");
    let failed = kura_couch(
        &url,
        dir.path(),
        &[
            "restore",
            "couchdb",
            &id,
            "--database",
            &format!("{second}:{fresh}"),
        ],
    );
    assert_eq!(failed.code, 5, "{}", failed.all());
    assert!(failed.error_line()["message"]
        .as_str()
        .unwrap()
        .contains("db-0002.ndjson.zst"));
    let (status, _) = couch
        .call(reqwest::Method::GET, &Couch::db(&fresh, ""), None)
        .await;
    assert_eq!(
        status, 404,
        "the database created for the failed restore was removed"
    );
}

#[test]
fn wrong_password_is_a_clear_error() {
    let url = require!("KURA_TEST_COUCH_URL");
    let wrong = url.replace("kura-couch-pw", "not-it");
    let dir = tempfile::tempdir().unwrap();
    let result = kura_couch(&wrong, dir.path(), &["backup", "couchdb"]);
    assert_eq!(result.code, 4, "{}", result.all());
    assert!(result.error_line()["message"]
        .as_str()
        .unwrap()
        .contains("rejected the credentials"));
    assert!(!result.all().contains("not-it"));
}

#[tokio::test]
async fn server_stopping_mid_backup_leaves_no_manifest_and_no_upload() {
    let npm = require!("KURA_TEST_NPM_BIN");
    let moto = require!("KURA_TEST_S3_ENDPOINT");
    // A private server, so stopping it disturbs no other test.
    let dir = tempfile::tempdir().unwrap();
    let (mut server, url) = common::start_private_pouchdb(&npm, dir.path()).await;
    let couch = Couch::new(&url);
    couch.ok(reqwest::Method::PUT, "big", None).await;
    for i in 0..60 {
        couch
            .ok(reqwest::Method::PUT, &format!("big/doc{i}"), Some(json!({"_attachments": {"blob": attachment(&common::noise(1 << 20), "application/octet-stream")}})))
            .await;
    }
    let bucket = unique("couchkill").replace('_', "-");
    common::create_bucket(&moto, "testing", "testing", &bucket).await;
    let mut command = kura();
    common::with_moto(&mut command, &moto, &bucket, "p");
    command
        .env("KURA_COUCHDB_URL", &url)
        .env("KURA_PART_SIZE", "5MiB")
        .env("KURA_UPLOAD_CONCURRENCY", "1")
        .args(["backup", "couchdb"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = command.spawn().unwrap();
    let client = common::s3_client(&moto, "testing", "testing");
    common::wait_for_open_upload(&client, &bucket).await;
    server.kill().unwrap();
    server.wait().unwrap();
    let result = Run::from_output(child.wait_with_output().unwrap());
    assert_ne!(result.code, 0, "{}", result.all());
    assert!(
        result.error_line()["message"]
            .as_str()
            .unwrap()
            .contains("big"),
        "{}",
        result.all()
    );
    assert!(
        common::open_uploads(&client, &bucket).await.is_empty(),
        "the multipart upload was aborted"
    );
    assert!(
        common::bucket_keys(&client, &bucket).await.is_empty(),
        "no manifest, no parts"
    );
}

#[tokio::test]
async fn corrupt_attachment_aborts_its_upload() {
    let npm = require!("KURA_TEST_NPM_BIN");
    // A private server: pouchdb-server exits on an aborted multipart request (CouchDB does
    // not), so this must not be the server the other tests share.
    let dir = tempfile::tempdir().unwrap();
    let (mut server, url) = common::start_private_pouchdb(&npm, dir.path()).await;
    let couch = Couch::new(&url);
    couch.ok(reqwest::Method::PUT, "photos", None).await;
    couch
        .ok(
            reqwest::Method::PUT,
            "photos/one",
            Some(json!({"_attachments": {"p.jpg": attachment(&common::noise(2 << 20), "image/jpeg")}})),
        )
        .await;
    let storage = tempfile::tempdir().unwrap();
    let id = kura_couch(&url, storage.path(), &["backup", "couchdb"]).backup_id();
    let part = storage
        .path()
        .join("default/couchdb")
        .join(&id)
        .join("db-0001.ndjson.zst");
    let mut bytes = std::fs::read(&part).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x10;
    std::fs::write(&part, &bytes).unwrap();
    let failed = kura_couch(
        &url,
        storage.path(),
        &[
            "restore",
            "couchdb",
            &id,
            "--database",
            "photos:photos_copy",
        ],
    );
    assert_eq!(failed.code, 5, "{}", failed.all());
    let message = failed.error_line()["message"].as_str().unwrap().to_string();
    assert!(message.contains("db-0001.ndjson.zst"), "{message}");
    let _ = server.kill();
    let _ = server.wait();
}

/// A backup as kura wrote it before attachments were streamed (manifest format 1, part
/// format `kura-couchdb-ndjson-v1`: attachment bytes inline in the document, the design
/// document wherever the changes feed put it) still restores, revision for revision.
#[tokio::test]
async fn a_backup_in_the_first_format_still_restores() {
    use sha2::Digest;
    let url = require!("KURA_TEST_COUCH_URL");
    let couch = Couch::new(&url);
    let target = unique("couch_v1");
    let lines = [
        json!({"kura": "couchdb-database", "version": 1, "name": "shop", "partitioned": false,
               "security": {"members": {"names": [], "roles": ["staff"]}}, "revs_limit": null}),
        json!({"doc": {"_id": "a", "_rev": "1-aaaa", "_revisions": {"start": 1, "ids": ["aaaa"]}, "type": "x"}}),
        json!({"doc": {"_id": "_design/app", "_rev": "1-dddd", "_revisions": {"start": 1, "ids": ["dddd"]},
               "validate_doc_update": "function (newDoc) { if (!newDoc._deleted && !newDoc.type) { throw({forbidden: 'type required'}); } }"}}),
        json!({"doc": {"_id": "b", "_rev": "2-bbbb", "_revisions": {"start": 2, "ids": ["bbbb", "b000"]},
               "_attachments": {"note.txt": {"content_type": "text/plain", "revpos": 2,
                                             "data": base64::engine::general_purpose::STANDARD.encode("old format")}}}}),
    ];
    let raw: Vec<u8> = lines
        .iter()
        .flat_map(|l| format!("{l}\n").into_bytes())
        .collect();
    let stored = zstd::encode_all(&raw[..], 3).unwrap();
    let id = "20250101T000000Z-000001";
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("default/couchdb").join(id);
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(folder.join("db-0001.ndjson.zst"), &stored).unwrap();
    let manifest = json!({
        "format": "kura-backup-manifest", "format_version": 1, "kura_version": "0.1.0",
        "backup_id": id, "tenant": "default", "source": "couchdb", "kind": "couchdb",
        "server_version": "CouchDB 3.3.3", "tool_version": "kura 0.1.0 (CouchDB HTTP API)",
        "started_at": "2025-01-01T00:00:00Z", "finished_at": "2025-01-01T00:00:01Z",
        "parts": [{
            "key": "db-0001.ndjson.zst", "name": "shop", "kind": "couchdb.database",
            "format": "kura-couchdb-ndjson-v1", "raw_bytes": raw.len(), "stored_bytes": stored.len(),
            "sha256": hex::encode(sha2::Sha256::digest(&stored)),
            "compression": {"algorithm": "zstd", "level": 3}, "encryption": null,
            "properties": {"partitioned": false},
            "counts": {"documents": 3, "deleted_documents": 0}
        }],
        "labels": {}
    });
    std::fs::write(folder.join("manifest.json"), manifest.to_string()).unwrap();

    kura_couch(
        &url,
        dir.path(),
        &[
            "restore",
            "couchdb",
            id,
            "--database",
            &format!("shop:{target}"),
        ],
    )
    .assert_ok();
    let b = couch
        .ok(
            reqwest::Method::GET,
            &Couch::db(&target, "b?revs=true&attachments=true"),
            None,
        )
        .await;
    assert_eq!(b["_rev"], "2-bbbb");
    assert_eq!(b["_revisions"]["ids"], json!(["bbbb", "b000"]));
    let data = b["_attachments"]["note.txt"]["data"].as_str().unwrap();
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(data)
            .unwrap(),
        b"old format"
    );
    let design = couch
        .ok(
            reqwest::Method::GET,
            &Couch::db(&target, "_design/app"),
            None,
        )
        .await;
    assert_eq!(design["_rev"], "1-dddd");
    kura_couch(&url, dir.path(), &["verify", "couchdb", id]).assert_ok();
}

/// Large documents are paged by bytes: a first page that would weigh more than kura's cap is
/// asked again with a smaller limit, and every revision still arrives exactly once.
#[tokio::test]
async fn large_documents_are_paged_by_bytes_and_round_trip() {
    let url = require!("KURA_TEST_COUCH_URL");
    let couch = Couch::new(&url);
    let source = unique("couch_big_docs");
    couch
        .ok(reqwest::Method::PUT, &Couch::db(&source, ""), None)
        .await;
    // 18 documents of 2.5 MB: the first page (16 changes) would be 40 MB, past the 32 MiB cap.
    let filler = "x".repeat(2_500_000);
    for i in 0..18 {
        let created = couch
            .ok(
                reqwest::Method::PUT,
                &Couch::db(&source, &format!("big{i:02}")),
                Some(json!({"i": i, "filler": filler})),
            )
            .await;
        if i % 6 == 0 {
            // An edited one goes through _bulk_get with its history.
            couch
                .ok(
                    reqwest::Method::PUT,
                    &Couch::db(&source, &format!("big{i:02}")),
                    Some(json!({"_rev": created["rev"], "i": i, "edited": true, "filler": filler})),
                )
                .await;
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let result = kura_couch(
        &url,
        dir.path(),
        &["-v", "backup", "couchdb", "--database", &source],
    );
    result.assert_ok();
    assert!(
        result.all().contains("a page of changes is too large"),
        "the cap was never reached: {}",
        result.all()
    );
    let target = format!("{source}_copy");
    kura_couch(
        &url,
        dir.path(),
        &[
            "restore",
            "couchdb",
            &result.backup_id(),
            "--database",
            &format!("{source}:{target}"),
        ],
    )
    .assert_ok();
    let (before, _) = couch.snapshot(&source).await;
    let (after, _) = couch.snapshot(&target).await;
    assert_eq!(before.len(), 18);
    assert!(before == after, "the restored documents differ");
}
