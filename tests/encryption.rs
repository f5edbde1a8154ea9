//! age encryption end to end: two recipients, either identity restores, a missing or wrong
//! identity is refused before anything is created, the reference `age` CLI decrypts a part,
//! damage is exit 5, `reencrypt` moves a backup to a new key, and no secret key is printed.

mod common;

use std::path::{Path, PathBuf};

use age::secrecy::ExposeSecret;
use common::{kura, psql, run, unique, Run};

struct Key {
    file: PathBuf,
    public: String,
    secret: String,
}

fn key(dir: &Path, name: &str) -> Key {
    let identity = age::x25519::Identity::generate();
    let file = dir.join(format!("{name}.txt"));
    let secret = identity.to_string().expose_secret().to_string();
    std::fs::write(&file, format!("# {name}\n{secret}\n")).unwrap();
    Key {
        file,
        public: identity.to_public().to_string(),
        secret,
    }
}

fn kura_pg(url: &str, storage: &Path) -> std::process::Command {
    let mut command = kura();
    command
        .env("KURA_POSTGRES_URL", url)
        .env("KURA_STORAGE", format!("file://{}", storage.display()));
    command
}

fn database_exists(url: &str, name: &str) -> bool {
    psql(
        url,
        "postgres",
        &format!("SELECT count(*) FROM pg_database WHERE datname = '{name}'"),
    ) == "1"
}

fn manifest_of(storage: &Path, source: &str, id: &str) -> serde_json::Value {
    let path = storage
        .join("default")
        .join(source)
        .join(id)
        .join("manifest.json");
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn assert_no_secret(runs: &[&Run], keys: &[&Key], storage: &Path) {
    for run in runs {
        for key in keys {
            assert!(!run.all().contains(&key.secret), "a secret key was printed");
        }
    }
    for entry in common::walk(storage) {
        let bytes = std::fs::read(&entry).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        for key in keys {
            assert!(
                !text.contains(&key.secret),
                "{} holds a secret key",
                entry.display()
            );
        }
    }
}

#[test]
fn postgres_round_trip_with_two_recipients() {
    let url = require!("KURA_TEST_PG_URL");
    let keys = tempfile::tempdir().unwrap();
    let (operator, escrow, stranger) = (
        key(keys.path(), "operator"),
        key(keys.path(), "escrow"),
        key(keys.path(), "stranger"),
    );
    let db = unique("enc");
    psql(&url, "postgres", &format!("CREATE DATABASE {db}"));
    psql(
        &url,
        &db,
        "CREATE TABLE secret_orders (id int PRIMARY KEY, card text); \
         INSERT INTO secret_orders SELECT i, 'card-' || i FROM generate_series(1, 5000) i;",
    );
    let storage = tempfile::tempdir().unwrap();
    let recipients_file = keys.path().join("recipients.txt");
    std::fs::write(&recipients_file, format!("# escrow\n{}\n", escrow.public)).unwrap();

    // The backup job holds public keys only: one as a flag, one in a recipients file.
    let backup = run(kura_pg(&url, storage.path())
        .env("KURA_ENCRYPT_TO", &operator.public)
        .env("KURA_ENCRYPT_TO_FILE", &recipients_file)
        .args(["backup", "postgres", "--database", &db]));
    backup.assert_ok();
    let id = backup.backup_id();
    let manifest = manifest_of(storage.path(), "postgres", &id);
    assert_eq!(manifest["format_version"], 3);
    for part in manifest["parts"].as_array().unwrap() {
        assert_eq!(part["encryption"]["algorithm"], "age", "{part}");
        let recipients = part["encryption"]["recipients"].as_array().unwrap();
        assert!(recipients.contains(&operator.public.clone().into()));
        assert!(recipients.contains(&escrow.public.clone().into()));
    }
    let shown =
        run(kura_pg(&url, storage.path()).args(["--log-format", "text", "show", "postgres", &id]));
    shown.assert_ok();
    assert!(
        shown.all().contains("encrypted   age, to"),
        "{}",
        shown.all()
    );
    let listed = run(kura_pg(&url, storage.path()).args(["list", "postgres", "--json"]));
    assert_eq!(listed.records()[0]["encrypted"], true, "{}", listed.all());

    // Interoperability: the reference age CLI decrypts the parts, and they decompress to a
    // pg_dump archive and to the globals script.
    let dir = storage.path().join("default/postgres").join(&id);
    let decrypt = |part: &str| {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "age -d -i '{}' '{}' | zstd -dq",
                escrow.file.display(),
                dir.join(part).display()
            ))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    let globals = String::from_utf8(decrypt("globals.sql.zst")).unwrap();
    assert!(globals.contains("CREATE ROLE"), "{globals}");
    let archive = keys.path().join("db.pgdump");
    std::fs::write(&archive, decrypt("db-0001.pgdump.zst")).unwrap();
    let listing = std::process::Command::new(common::pg_tool("pg_restore"))
        .arg("--list")
        .arg(&archive)
        .output()
        .unwrap();
    assert!(listing.status.success());
    assert!(String::from_utf8_lossy(&listing.stdout).contains("TABLE public secret_orders"));

    // No identity, or one that is no recipient: refused before anything is created.
    let target = format!("{db}_restored");
    let mapping = format!("{db}:{target}");
    let without = run(kura_pg(&url, storage.path()).args([
        "restore",
        "postgres",
        &id,
        "--database",
        &mapping,
    ]));
    assert_eq!(without.code, 2, "{}", without.all());
    let message = without.error_line()["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        message.contains(&id)
            && message.contains(&operator.public)
            && message.contains(&escrow.public)
            && message.contains("--identity"),
        "{message}"
    );
    let wrong = run(kura_pg(&url, storage.path())
        .env("KURA_IDENTITY_FILE", &stranger.file)
        .args(["restore", "postgres", &id, "--database", &mapping]));
    assert_eq!(wrong.code, 2, "{}", wrong.all());
    assert!(
        wrong.error_line()["message"]
            .as_str()
            .unwrap()
            .contains(&stranger.public),
        "{}",
        wrong.all()
    );
    assert!(!database_exists(&url, &target), "nothing was created");

    // Either identity restores.
    let restored = run(kura_pg(&url, storage.path())
        .args(["--identity", operator.file.to_str().unwrap()])
        .args(["restore", "postgres", &id, "--database", &mapping]));
    restored.assert_ok();
    assert_eq!(
        common::pg_dump_text(&url, &db),
        common::pg_dump_text(&url, &target)
    );
    let second = format!("{db}_escrow");
    let by_escrow = run(kura_pg(&url, storage.path())
        .env("KURA_IDENTITY_FILE", &escrow.file)
        .args([
            "restore",
            "postgres",
            &id,
            "--database",
            &format!("{db}:{second}"),
        ]));
    by_escrow.assert_ok();
    assert_eq!(
        psql(&url, &second, "SELECT count(*) FROM secret_orders"),
        "5000"
    );

    // Integrity checks need no key; --deep does.
    let verified = run(kura_pg(&url, storage.path()).args(["verify", "postgres", &id]));
    verified.assert_ok();
    assert!(
        verified.all().contains("pass --identity to also decrypt"),
        "{}",
        verified.all()
    );
    let deep = run(kura_pg(&url, storage.path())
        .env("KURA_IDENTITY_FILE", &operator.file)
        .args(["verify", "postgres", &id, "--deep"]));
    deep.assert_ok();
    let deep_without =
        run(kura_pg(&url, storage.path()).args(["verify", "postgres", &id, "--deep"]));
    assert_eq!(deep_without.code, 2, "{}", deep_without.all());

    // Damage: a flipped byte inside the age payload, then a truncated part: exit 5, nothing left.
    let part = dir.join("db-0001.pgdump.zst");
    let original = std::fs::read(&part).unwrap();
    let mut flipped = original.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x01;
    std::fs::write(&part, &flipped).unwrap();
    let damaged_target = format!("{db}_damaged");
    let damaged = run(kura_pg(&url, storage.path())
        .env("KURA_IDENTITY_FILE", &operator.file)
        .args([
            "restore",
            "postgres",
            &id,
            "--database",
            &format!("{db}:{damaged_target}"),
        ]));
    assert_eq!(damaged.code, 5, "{}", damaged.all());
    assert!(damaged.error_line()["message"]
        .as_str()
        .unwrap()
        .contains("db-0001.pgdump.zst"));
    // A damaged age header: one character of the wrapped file key, still valid base64. age
    // reports "no matching key" for it; kura checks the digest and says it is damage.
    let mut header = original.clone();
    let stanza = header.windows(10).position(|w| w == b"-> X25519 ").unwrap();
    let body = stanza + header[stanza..].iter().position(|b| *b == b'\n').unwrap() + 1;
    header[body + 5] = if header[body + 5] == b'A' { b'B' } else { b'A' };
    std::fs::write(&part, &header).unwrap();
    let header_damaged = run(kura_pg(&url, storage.path())
        .env("KURA_IDENTITY_FILE", &operator.file)
        .args([
            "restore",
            "postgres",
            &id,
            "--database",
            &format!("{db}:{damaged_target}"),
        ]));
    assert_eq!(header_damaged.code, 5, "{}", header_damaged.all());
    std::fs::write(&part, &original[..original.len() - 100]).unwrap();
    let truncated = run(kura_pg(&url, storage.path())
        .env("KURA_IDENTITY_FILE", &operator.file)
        .args([
            "restore",
            "postgres",
            &id,
            "--database",
            &format!("{db}:{damaged_target}"),
        ]));
    assert_eq!(truncated.code, 5, "{}", truncated.all());
    assert!(!database_exists(&url, &damaged_target));
    std::fs::write(&part, &original).unwrap();

    // Rotation: the backup moves to a new key; the old one no longer opens it.
    let successor = key(keys.path(), "successor");
    let rotated = run(kura_pg(&url, storage.path())
        .env("KURA_IDENTITY_FILE", &operator.file)
        .env("KURA_ENCRYPT_TO", &successor.public)
        .args(["reencrypt", "postgres", &id]));
    rotated.assert_ok();
    let manifest = manifest_of(storage.path(), "postgres", &id);
    for part in manifest["parts"].as_array().unwrap() {
        assert_eq!(
            part["encryption"]["recipients"],
            serde_json::json!([successor.public]),
            "{part}"
        );
        assert!(dir.join(part["key"].as_str().unwrap()).exists());
    }
    let files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        files.len(),
        manifest["parts"].as_array().unwrap().len() + 1,
        "old parts removed: {files:?}"
    );
    let old_key = run(kura_pg(&url, storage.path())
        .env("KURA_IDENTITY_FILE", &operator.file)
        .args([
            "restore",
            "postgres",
            &id,
            "--database",
            &format!("{db}:{db}_old"),
        ]));
    assert_eq!(old_key.code, 2, "{}", old_key.all());
    let third = format!("{db}_rotated");
    let new_key = run(kura_pg(&url, storage.path())
        .env("KURA_IDENTITY_FILE", &successor.file)
        .args([
            "restore",
            "postgres",
            &id,
            "--database",
            &format!("{db}:{third}"),
        ]));
    new_key.assert_ok();
    assert_eq!(
        psql(&url, &third, "SELECT count(*) FROM secret_orders"),
        "5000"
    );

    // --no-encrypt must be explicit, and then the parts are plain.
    let plain = run(kura_pg(&url, storage.path())
        .env("KURA_ENCRYPT_TO", &operator.public)
        .args(["backup", "--no-encrypt", "postgres", "--database", &db]));
    plain.assert_ok();
    let manifest = manifest_of(storage.path(), "postgres", &plain.backup_id());
    assert!(manifest["parts"][0]["encryption"].is_null());

    assert_no_secret(
        &[
            &backup, &shown, &listed, &without, &wrong, &restored, &by_escrow, &verified, &deep,
            &damaged, &rotated, &old_key, &new_key,
        ],
        &[&operator, &escrow, &stranger, &successor],
        storage.path(),
    );
}

#[tokio::test]
async fn couchdb_round_trip_with_either_identity() {
    let url = require!("KURA_TEST_COUCH_URL");
    let keys = tempfile::tempdir().unwrap();
    let (one, two) = (key(keys.path(), "one"), key(keys.path(), "two"));
    let db = unique("couch_enc");
    let client = reqwest::Client::new();
    let base = url::Url::parse(&url).unwrap();
    let call = |method: reqwest::Method, path: &str| {
        client
            .request(method, base.join(path).unwrap())
            .basic_auth(base.username(), base.password())
    };
    let created = call(reqwest::Method::PUT, &db).send().await.unwrap();
    assert!(created.status().is_success());
    for i in 0..20 {
        let response = call(reqwest::Method::PUT, &format!("{db}/doc{i}"))
            .json(&serde_json::json!({"i": i, "secret": "pii"}))
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success());
    }
    let storage = tempfile::tempdir().unwrap();
    let kura_couch = || {
        let mut command = kura();
        command.env("KURA_COUCHDB_URL", &url).env(
            "KURA_STORAGE",
            format!("file://{}", storage.path().display()),
        );
        command
    };
    let backup = run(kura_couch()
        .env("KURA_ENCRYPT_TO", format!("{},{}", one.public, two.public))
        .args(["backup", "couchdb", "--database", &db]));
    backup.assert_ok();
    let id = backup.backup_id();
    let manifest = manifest_of(storage.path(), "couchdb", &id);
    assert_eq!(
        manifest["parts"][0]["encryption"]["recipients"]
            .as_array()
            .unwrap()
            .len(),
        2
    );

    let target = format!("{db}_r");
    let refused = run(kura_couch().args([
        "restore",
        "couchdb",
        &id,
        "--database",
        &format!("{db}:{target}"),
    ]));
    assert_eq!(refused.code, 2, "{}", refused.all());
    let status = call(reqwest::Method::GET, &target)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 404, "no database was created");
    for (key, name) in [(&one, format!("{db}_one")), (&two, format!("{db}_two"))] {
        let restored = run(kura_couch().env("KURA_IDENTITY_FILE", &key.file).args([
            "restore",
            "couchdb",
            &id,
            "--database",
            &format!("{db}:{name}"),
        ]));
        restored.assert_ok();
        let info: serde_json::Value = call(reqwest::Method::GET, &name)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(info["doc_count"], 20, "{info}");
        assert_no_secret(&[&restored], &[&one, &two], storage.path());
    }
}
