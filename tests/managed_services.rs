//! Managed services as IBM Cloud runs them: a PostgreSQL that accepts only TLS (verify-full
//! with a private CA, and every way of getting it wrong), CouchDB and S3 behind TLS with a
//! private CA, and ICOS authenticated with an IAM API key whose tokens expire mid-backup.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::front::{bearer_front, tls_front, token_server};
use common::{kura, psql, run, unique, Run};

const PG_PASSWORD: &str = "kura-test-pw";

fn tls_dir() -> Option<PathBuf> {
    common::service("KURA_TEST_TLS_DIR").map(PathBuf::from)
}

/// The TLS-only cluster's URL with `query`, by `host` (the certificate names localhost only).
fn tls_url(base: &str, host: &str, query: &str) -> String {
    let mut url = url::Url::parse(base).unwrap();
    url.set_host(Some(host)).unwrap();
    url.set_query(Some(query));
    url.to_string()
}

fn assert_quiet_about(run: &Run, secrets: &[&str]) {
    for secret in secrets {
        assert!(
            !run.all().contains(secret),
            "a secret was printed: {}",
            run.all()
        );
    }
}

/// Restore backup `id` of `db` into `<db>_copy` with `command` and compare the two dumps.
fn assert_restores_identically(mut command: std::process::Command, pg: &str, db: &str, id: &str) {
    let copy = format!("{db}_copy");
    run(command.args([
        "restore",
        "postgres",
        id,
        "--database",
        &format!("{db}:{copy}"),
    ]))
    .assert_ok();
    assert_eq!(
        common::pg_dump_text(pg, db),
        common::pg_dump_text(pg, &copy)
    );
}

fn create_fixture(url: &str, db: &str) {
    psql(url, "postgres", &format!("CREATE DATABASE {db}"));
    psql(
        url,
        db,
        "CREATE TABLE t (id int PRIMARY KEY, note text);
         INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 2000) g;
         CREATE INDEX t_note ON t (note);",
    );
}

#[test]
fn postgres_over_verified_tls_round_trips_and_every_wrong_setting_is_exit_4() {
    let base = require!("KURA_TEST_PGTLS_URL");
    let Some(certs) = tls_dir() else { return };
    let ca = certs.join("ca.crt");
    let storage = tempfile::tempdir().unwrap();
    let db = unique("tls");
    create_fixture(&base, &db);
    let kura_at = |url: &str| {
        let mut command = kura();
        command.env("KURA_POSTGRES_URL", url).env(
            "KURA_STORAGE",
            format!("file://{}", storage.path().display()),
        );
        command
    };
    let verified = tls_url(
        &base,
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={}", ca.display()),
    );

    let backup = run(kura_at(&verified).args(["backup", "postgres", "--database", &db]));
    backup.assert_ok();
    let id = backup.backup_id();
    let copy = format!("{db}_copy");
    let restore = run(kura_at(&verified).args([
        "restore",
        "postgres",
        &id,
        "--database",
        &format!("{db}:{copy}"),
    ]));
    restore.assert_ok();
    assert_eq!(
        common::pg_dump_text(&base, &db),
        common::pg_dump_text(&base, &copy)
    );
    // The scratch database of a deep verify is created and compared over TLS too.
    let deep = run(kura_at(&verified).args(["verify", "postgres", &id, "--deep"]));
    deep.assert_ok();

    // The server's certificate from another CA.
    let wrong_ca = tls_url(
        &base,
        "localhost",
        &format!(
            "sslmode=verify-full&sslrootcert={}",
            certs.join("other-ca.crt").display()
        ),
    );
    let unknown = run(kura_at(&wrong_ca).args(["backup", "postgres", "--database", &db]));
    assert_eq!(unknown.code, 4, "{}", unknown.all());
    let line = unknown.error_line()["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        line.contains("unknown CA") && line.contains("sslrootcert"),
        "{line}"
    );
    assert!(line.contains("localhost:"), "the host is named: {line}");

    // By address, while the certificate names localhost only.
    let by_ip = tls_url(
        &base,
        "127.0.0.1",
        &format!("sslmode=verify-full&sslrootcert={}", ca.display()),
    );
    let mismatch = run(kura_at(&by_ip).args(["backup", "postgres", "--database", &db]));
    assert_eq!(mismatch.code, 4, "{}", mismatch.all());
    let line = mismatch.error_line()["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        line.contains("name mismatch") && line.contains("verify-ca"),
        "{line}"
    );
    // verify-ca checks the chain only, as libpq does.
    let chain_only = tls_url(
        &base,
        "127.0.0.1",
        &format!("sslmode=verify-ca&sslrootcert={}", ca.display()),
    );
    run(kura_at(&chain_only).args(["backup", "postgres", "--database", &db])).assert_ok();

    // No TLS at all, to a server that accepts only TLS.
    let plain = tls_url(&base, "localhost", "sslmode=disable");
    let refused = run(kura_at(&plain).args(["backup", "postgres", "--database", &db]));
    assert_eq!(refused.code, 4, "{}", refused.all());
    let line = refused.error_line()["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(line.contains("sslmode=verify-full"), "{line}");

    // verify-full without a CA is a configuration error, found before connecting.
    let no_ca = tls_url(&base, "localhost", "sslmode=verify-full");
    let unconfigured = run(kura_at(&no_ca).env("HOME", storage.path()).args([
        "backup",
        "postgres",
        "--database",
        &db,
    ]));
    assert_eq!(unconfigured.code, 2, "{}", unconfigured.all());

    for run in [
        &backup,
        &restore,
        &deep,
        &unknown,
        &mismatch,
        &refused,
        &unconfigured,
    ] {
        assert_quiet_about(run, &[PG_PASSWORD]);
    }
}

#[test]
fn postgres_client_certificates_authenticate_kura_and_its_tools() {
    let base = require!("KURA_TEST_PGTLS_URL");
    let Some(certs) = tls_dir() else { return };
    let storage = tempfile::tempdir().unwrap();
    let db = unique("tls_cert");
    create_fixture(&base, &db);
    let port = url::Url::parse(&base).unwrap().port().unwrap();
    let url = format!(
        "postgres://kura_cert@localhost:{port}/postgres?sslmode=verify-full&sslrootcert={}&sslcert={}&sslkey={}",
        certs.join("ca.crt").display(),
        certs.join("client.crt").display(),
        certs.join("client.key").display()
    );
    let backup = run(kura()
        .env("KURA_POSTGRES_URL", &url)
        .env(
            "KURA_STORAGE",
            format!("file://{}", storage.path().display()),
        )
        .args(["backup", "postgres", "--database", &db]));
    backup.assert_ok();

    // A key others can read is refused before anything starts, as libpq would refuse it later.
    let open_key = storage.path().join("open.key");
    std::fs::copy(certs.join("client.key"), &open_key).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&open_key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let loose = run(kura()
        .env(
            "KURA_POSTGRES_URL",
            url.replace(
                certs.join("client.key").to_str().unwrap(),
                open_key.to_str().unwrap(),
            ),
        )
        .env(
            "KURA_STORAGE",
            format!("file://{}", storage.path().display()),
        )
        .args(["backup", "postgres", "--database", &db]));
    assert_eq!(loose.code, 2, "{}", loose.all());
    assert!(loose.all().contains("chmod 600"), "{}", loose.all());
}

struct CouchFixture {
    plain: String,
    http: reqwest::Client,
}

impl CouchFixture {
    async fn put(&self, path: &str, body: serde_json::Value) {
        let response = self
            .http
            .put(format!("{}/{path}", self.plain_base()))
            .basic_auth("admin", Some(self.password()))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(
            response.status().is_success(),
            "{path}: {}",
            response.status()
        );
    }

    async fn get(&self, path: &str) -> serde_json::Value {
        self.http
            .get(format!("{}/{path}", self.plain_base()))
            .basic_auth("admin", Some(self.password()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    fn plain_base(&self) -> String {
        let mut url = url::Url::parse(&self.plain).unwrap();
        url.set_username("").unwrap();
        url.set_password(None).unwrap();
        url.to_string().trim_end_matches('/').to_string()
    }

    fn password(&self) -> String {
        url::Url::parse(&self.plain)
            .unwrap()
            .password()
            .unwrap()
            .to_string()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn couchdb_over_https_with_a_private_ca_round_trips_and_a_wrong_ca_is_exit_4() {
    let plain = require!("KURA_TEST_COUCH_URL");
    let Some(certs) = tls_dir() else { return };
    let port = tls_front(&plain, &certs.join("server.crt"), &certs.join("server.key"));
    let couch = CouchFixture {
        plain: plain.clone(),
        http: reqwest::Client::new(),
    };
    let password = couch.password();
    let db = unique("tlsdb");
    couch.put(&db, serde_json::json!({})).await;
    for i in 0..20 {
        couch
            .put(&format!("{db}/doc{i}"), serde_json::json!({"n": i}))
            .await;
    }
    let https = format!("https://admin:{password}@localhost:{port}");
    let storage = tempfile::tempdir().unwrap();
    let kura_https = |ca: &Path| {
        let mut command = kura();
        command
            .env("KURA_COUCHDB_URL", &https)
            .env("KURA_COUCHDB_CA_FILE", ca)
            .env(
                "KURA_STORAGE",
                format!("file://{}", storage.path().display()),
            );
        command
    };
    let ca = certs.join("ca.crt");
    let backup = tokio::task::block_in_place(|| {
        run(kura_https(&ca).args(["backup", "couchdb", "--database", &db]))
    });
    backup.assert_ok();
    let copy = format!("{db}_copy");
    let restore = tokio::task::block_in_place(|| {
        run(kura_https(&ca).args([
            "restore",
            "couchdb",
            &backup.backup_id(),
            "--database",
            &format!("{db}:{copy}"),
        ]))
    });
    restore.assert_ok();
    let count = |v: serde_json::Value| v["doc_count"].as_u64();
    assert_eq!(count(couch.get(&copy).await), Some(20));

    // A self-signed server certificate, trusted as itself.
    let self_signed = tls_front(
        &plain,
        &certs.join("selfsigned.crt"),
        &certs.join("selfsigned.key"),
    );
    let pinned = tokio::task::block_in_place(|| {
        run(kura()
            .env(
                "KURA_COUCHDB_URL",
                format!("https://admin:{password}@localhost:{self_signed}"),
            )
            .env("KURA_COUCHDB_CA_FILE", certs.join("selfsigned.crt"))
            .env(
                "KURA_STORAGE",
                format!("file://{}", storage.path().display()),
            )
            .args(["backup", "couchdb", "--database", &db]))
    });
    pinned.assert_ok();

    let started = Instant::now();
    let wrong = tokio::task::block_in_place(|| {
        run(kura_https(&certs.join("other-ca.crt")).args(["backup", "couchdb", "--database", &db]))
    });
    assert_eq!(wrong.code, 4, "{}", wrong.all());
    let line = wrong.error_line()["message"].as_str().unwrap().to_string();
    assert!(
        line.contains("unknown CA") && line.contains("--couchdb-ca-file"),
        "{line}"
    );
    // A certificate problem is not retried for seconds like a lost connection.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    for run in [&backup, &restore, &wrong] {
        assert_quiet_about(run, &[&password]);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn s3_behind_tls_with_a_private_ca_from_aws_ca_bundle() {
    let moto = require!("KURA_TEST_S3_ENDPOINT");
    let pg = require!("KURA_TEST_PG_URL");
    let Some(certs) = tls_dir() else { return };
    let port = tls_front(&moto, &certs.join("server.crt"), &certs.join("server.key"));
    let bucket = unique("tls-bucket").replace('_', "-");
    common::create_bucket(&moto, "testing", "testing", &bucket).await;
    let db = unique("s3tls");
    create_fixture(&pg, &db);
    let endpoint = format!("https://localhost:{port}");
    let kura_s3 = |ca: Option<&Path>| {
        let mut command = kura();
        common::with_moto(&mut command, &endpoint, &bucket, "p");
        command.env("KURA_POSTGRES_URL", &pg);
        if let Some(ca) = ca {
            command.env("AWS_CA_BUNDLE", ca);
        }
        command
    };
    let ca = certs.join("ca.crt");
    let backup = tokio::task::block_in_place(|| {
        run(kura_s3(Some(&ca)).args(["backup", "postgres", "--database", &db]))
    });
    backup.assert_ok();
    tokio::task::block_in_place(|| {
        assert_restores_identically(kura_s3(Some(&ca)), &pg, &db, &backup.backup_id())
    });

    let untrusted = tokio::task::block_in_place(|| run(kura_s3(None).args(["list"])));
    assert_eq!(untrusted.code, 3, "{}", untrusted.all());
    let line = untrusted.error_line()["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        line.contains("unknown CA") && line.contains("--s3-ca-file"),
        "{line}"
    );
}

const API_KEY: &str = "kura-test-api-key-0123456789";

#[tokio::test(flavor = "multi_thread")]
async fn iam_api_key_backup_outlives_its_tokens_and_a_wrong_key_is_exit_3() {
    let moto = require!("KURA_TEST_S3_ENDPOINT");
    let pg = require!("KURA_TEST_PG_URL");
    // Refreshed at 80 %: 600 ms of slack for a token request on a busy machine.
    let lifetime = Duration::from_secs(3);
    let iam = token_server(API_KEY, lifetime);
    // Every request waits, so one backup spans several token lifetimes.
    let (port, front) = bearer_front(&moto, iam.issued.clone(), Duration::from_millis(1000));
    let bucket = unique("iam-bucket").replace('_', "-");
    common::create_bucket(&moto, "testing", "testing", &bucket).await;
    let db = unique("iam");
    create_fixture(&pg, &db);
    psql(
        &pg,
        &db,
        "CREATE TABLE bulk AS SELECT g, md5(g::text) || md5((g * 7)::text) AS filler FROM generate_series(1, 200000) g;",
    );
    let storage = format!("s3://{bucket}/iam");
    let endpoint = format!("http://127.0.0.1:{port}");
    let kura_iam = |key: &str| {
        let mut command = kura();
        command
            .env("KURA_STORAGE", &storage)
            .env("KURA_S3_ENDPOINT", &endpoint)
            .env("KURA_S3_PATH_STYLE", "true")
            .env("KURA_PART_SIZE", "5MiB")
            .env("KURA_UPLOAD_CONCURRENCY", "2")
            .env("IBM_API_KEY_ID", key)
            .env("IBM_AUTH_ENDPOINT", &iam.url)
            .env("KURA_POSTGRES_URL", &pg);
        command
    };

    let started = Instant::now();
    let backup = tokio::task::block_in_place(|| {
        run(kura_iam(API_KEY).args(["-v", "backup", "postgres", "--database", &db]))
    });
    backup.assert_ok();
    let took = started.elapsed();
    assert!(
        took > lifetime * 3,
        "the backup must outlive several tokens to prove the refresh: took {took:?}"
    );
    // A refusal on a busy machine is retried with a new token; the backup passing proves it.
    assert!(
        iam.issued.token_requests.load(Ordering::SeqCst) >= 3,
        "tokens were refreshed during the backup"
    );
    assert_eq!(front.unsigned_or_sigv4.load(Ordering::SeqCst), 0);
    assert!(
        backup.all().contains("IBM Cloud API key"),
        "the log says which credentials are used"
    );

    tokio::task::block_in_place(|| {
        assert_restores_identically(kura_iam(API_KEY), &pg, &db, &backup.backup_id())
    });

    // A token revoked early: the refusal is retried once with a new token.
    let refused_before = front.refused.load(Ordering::SeqCst);
    let listing = tokio::task::block_in_place(|| {
        let mut command = kura_iam(API_KEY);
        // Revoked after kura fetched its first token, before its first S3 request lands.
        let revoker = {
            let issued = iam.issued.clone();
            let before = issued.token_requests.load(Ordering::SeqCst);
            std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(10);
                while issued.token_requests.load(Ordering::SeqCst) == before
                    && Instant::now() < deadline
                {
                    std::thread::sleep(Duration::from_millis(5));
                }
                issued.revoke_all();
            })
        };
        // Trace logging of every crate: not even the SDK's request dumps may show a token.
        let listing = run(command.env("KURA_LOG", "trace").args(["list", "postgres"]));
        revoker.join().unwrap();
        listing
    });
    listing.assert_ok();
    assert!(
        listing.all().contains(&backup.backup_id()),
        "{}",
        listing.all()
    );
    assert!(
        front.refused.load(Ordering::SeqCst) > refused_before,
        "the revoked token was refused, and the retry with a new one passed"
    );
    assert!(!listing.all().contains("tok-"), "a bearer token was logged");

    // A wrong key: IAM's reason, exit 3, in seconds, never the key.
    let started = Instant::now();
    let wrong = tokio::task::block_in_place(|| run(kura_iam("not-the-key").args(["list"])));
    assert_eq!(wrong.code, 3, "{}", wrong.all());
    assert!(started.elapsed() < Duration::from_secs(5));
    let line = wrong.error_line()["message"].as_str().unwrap().to_string();
    assert!(
        line.contains("refused the API key")
            && line.contains("Provided API key could not be found"),
        "{line}"
    );
    for run in [&backup, &listing, &wrong] {
        assert_quiet_about(run, &[API_KEY, "not-the-key"]);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_service_credential_file_and_the_precedence_of_hmac_keys() {
    let moto = require!("KURA_TEST_S3_ENDPOINT");
    let iam = token_server(API_KEY, Duration::from_secs(60));
    let (port, front) = bearer_front(&moto, iam.issued.clone(), Duration::ZERO);
    let bucket = unique("cred-bucket").replace('_', "-");
    common::create_bucket(&moto, "testing", "testing", &bucket).await;
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, value: serde_json::Value| {
        let path = dir.path().join(name);
        std::fs::write(&path, serde_json::to_vec_pretty(&value).unwrap()).unwrap();
        path
    };
    let key_only = write(
        "key.json",
        serde_json::json!({
            "apikey": API_KEY,
            "endpoints": "https://control.cloud-object-storage.cloud.ibm.com/v2/endpoints",
            "iam_apikey_name": "kura-test",
            "resource_instance_id": "crn:v1:bluemix:public:cloud-object-storage:global:a/0::",
        }),
    );
    let both = write(
        "both.json",
        serde_json::json!({
            "apikey": API_KEY,
            "cos_hmac_keys": {"access_key_id": "hmac-id", "secret_access_key": "hmac-secret-value"},
            "resource_instance_id": "crn:v1:bluemix:public:cloud-object-storage:global:a/0::",
        }),
    );
    let kura_with = |file: &Path| {
        let mut command = kura();
        command
            .env("KURA_STORAGE", format!("s3://{bucket}/c"))
            .env("KURA_S3_ENDPOINT", format!("http://127.0.0.1:{port}"))
            .env("KURA_S3_PATH_STYLE", "true")
            .env("IBM_AUTH_ENDPOINT", &iam.url)
            .env("KURA_ICOS_CREDENTIALS", file);
        command
    };
    let listed = tokio::task::block_in_place(|| run(kura_with(&key_only).args(["list"])));
    listed.assert_ok();
    assert!(front.passed.load(Ordering::SeqCst) >= 1);

    // With HMAC keys in the file too, they are used (documented), and the log says so: the
    // bearer-only front turns the SigV4 request away.
    let hmac = tokio::task::block_in_place(|| run(kura_with(&both).args(["list"])));
    assert_eq!(hmac.code, 3, "{}", hmac.all());
    assert!(hmac.all().contains("using the HMAC keys"), "{}", hmac.all());
    assert!(front.unsigned_or_sigv4.load(Ordering::SeqCst) >= 1);
    for run in [&listed, &hmac] {
        assert_quiet_about(run, &[API_KEY, "hmac-secret-value"]);
    }
}
