//! `--jobs`: databases backed up, restored and verified side by side on both engines, with
//! the parts in the databases' order, every database identical after the round trip, and a
//! failure in one job stopping the others with nothing half-restored left behind.

mod common;

use std::path::Path;

use common::{kura, psql, run, unique};

fn file_storage(command: &mut std::process::Command, dir: &Path) {
    command.env("KURA_STORAGE", format!("file://{}", dir.display()));
}

/// The manifest of the only backup under `dir`.
fn manifest(dir: &Path) -> serde_json::Value {
    let file = common::walk(dir)
        .into_iter()
        .find(|p| p.ends_with("manifest.json"))
        .expect("a manifest");
    serde_json::from_slice(&std::fs::read(file).unwrap()).unwrap()
}

fn database_parts(manifest: &serde_json::Value) -> Vec<(String, String)> {
    manifest["parts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["key"].as_str().unwrap().starts_with("db-"))
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_string(),
                p["key"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// `count` PostgreSQL databases named `<prefix>_NN`, each with its own rows and an index.
fn small_databases(url: &str, prefix: &str, count: usize) -> Vec<String> {
    (0..count)
        .map(|i| {
            let name = format!("{prefix}_{i:02}");
            psql(url, "postgres", &format!("CREATE DATABASE {name}"));
            psql(
                url,
                &name,
                &format!(
                    "CREATE TABLE t (id int PRIMARY KEY, v text); \
                     INSERT INTO t SELECT g, md5((g * {}) ::text) FROM generate_series(1, {}) g; \
                     CREATE INDEX t_v ON t (v);",
                    i + 1,
                    100 + i * 37
                ),
            );
            name
        })
        .collect()
}

#[test]
fn forty_postgres_databases_back_up_and_restore_with_four_jobs() {
    let url = require!("KURA_TEST_PG_URL");
    let prefix = unique("par");
    let databases = small_databases(&url, &prefix, 40);
    let dir = tempfile::tempdir().unwrap();
    let mut backup = kura();
    file_storage(&mut backup, dir.path());
    backup
        .env("KURA_POSTGRES_URL", &url)
        .args(["backup", "postgres", "--jobs", "4"]);
    for db in &databases {
        backup.args(["--database", db]);
    }
    let backup = run(&mut backup);
    backup.assert_ok();
    // The parts are in the databases' order, numbered in it, whatever order they finished in.
    let parts = database_parts(&manifest(dir.path()));
    let expected: Vec<(String, String)> = databases
        .iter()
        .enumerate()
        .map(|(i, db)| (db.clone(), format!("db-{:04}.pgdump.zst", i + 1)))
        .collect();
    assert_eq!(parts, expected);

    let mut restore = kura();
    file_storage(&mut restore, dir.path());
    restore.env("KURA_POSTGRES_URL", &url).args([
        "restore",
        "postgres",
        &backup.backup_id(),
        "--jobs",
        "4",
    ]);
    for db in &databases {
        restore.args(["--database", &format!("{db}:{db}_r")]);
    }
    run(&mut restore).assert_ok();
    for db in &databases {
        assert_eq!(
            common::pg_dump_text(&url, db),
            common::pg_dump_text(&url, &format!("{db}_r")),
            "{db}"
        );
    }

    let mut verify = kura();
    file_storage(&mut verify, dir.path());
    verify
        .env("KURA_POSTGRES_URL", &url)
        .args(["verify", "postgres", "latest", "--deep", "--jobs", "4"]);
    let verified = run(&mut verify);
    verified.assert_ok();
    assert_eq!(
        verified.all().matches("counts match").count(),
        40,
        "{}",
        verified.all()
    );
    assert_eq!(
        psql(
            &url,
            "postgres",
            "SELECT count(*) FROM pg_database WHERE datname LIKE 'kura_verify_%'"
        ),
        "0",
        "no scratch database is left"
    );
}

#[test]
fn a_corrupted_part_stops_a_parallel_restore_and_leaves_nothing_half_restored() {
    let url = require!("KURA_TEST_PG_URL");
    let prefix = unique("parbad");
    let databases = small_databases(&url, &prefix, 6);
    // One large database, so jobs are still running when the damaged part is found.
    psql(
        &url,
        &databases[0],
        "INSERT INTO t SELECT g, md5(g::text) FROM generate_series(100000, 400000) g;",
    );
    let dir = tempfile::tempdir().unwrap();
    let mut backup = kura();
    file_storage(&mut backup, dir.path());
    backup
        .env("KURA_POSTGRES_URL", &url)
        .args(["backup", "postgres"]);
    for db in &databases {
        backup.args(["--database", db]);
    }
    let backup = run(&mut backup);
    backup.assert_ok();
    let id = backup.backup_id();
    let damaged = common::walk(dir.path())
        .into_iter()
        .find(|p| p.ends_with("db-0002.pgdump.zst"))
        .unwrap();
    let mut bytes = std::fs::read(&damaged).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&damaged, bytes).unwrap();

    let mut restore = kura();
    file_storage(&mut restore, dir.path());
    restore
        .env("KURA_POSTGRES_URL", &url)
        .args(["restore", "postgres", &id, "--jobs", "3"]);
    for db in &databases {
        restore.args(["--database", &format!("{db}:{db}_r")]);
    }
    let failed = run(&mut restore);
    assert_eq!(failed.code, 5, "{}", failed.all());
    let message = failed.error_line()["message"].as_str().unwrap().to_string();
    assert!(message.contains("db-0002.pgdump.zst"), "{message}");
    // No scratch database is left behind.
    let scratch: Vec<String> = failed
        .stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|line| line["scratch"].as_str().map(str::to_string))
        .collect();
    assert!(!scratch.is_empty(), "{}", failed.all());
    for name in &scratch {
        assert_eq!(
            psql(
                &url,
                "postgres",
                &format!("SELECT count(*) FROM pg_database WHERE datname = '{name}'")
            ),
            "0",
            "{name} was left behind"
        );
    }
    // The damaged database's target does not exist; any other that does is whole.
    for db in &databases {
        let target = format!("{db}_r");
        let exists = psql(
            &url,
            "postgres",
            &format!("SELECT count(*) FROM pg_database WHERE datname = '{target}'"),
        );
        if db == &databases[1] {
            assert_eq!(exists, "0", "the damaged database's target was left");
        } else if exists == "1" {
            assert_eq!(
                common::pg_dump_text(&url, db),
                common::pg_dump_text(&url, &target),
                "{target} exists but is not whole"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_couchdb_databases_back_up_and_restore_with_four_jobs() {
    let couch = require!("KURA_TEST_COUCH_URL");
    let mut base = url::Url::parse(&couch).unwrap();
    let password = base.password().unwrap().to_string();
    base.set_username("").unwrap();
    base.set_password(None).unwrap();
    let base = base.to_string().trim_end_matches('/').to_string();
    let http = reqwest::Client::new();
    let call = |method: reqwest::Method, path: String, body: Option<serde_json::Value>| {
        let mut request = http
            .request(method, format!("{base}/{path}"))
            .basic_auth("admin", Some(&password));
        if let Some(body) = body {
            request = request.json(&body);
        }
        async move {
            let response = request.send().await.unwrap();
            assert!(response.status().is_success(), "{}", response.status());
            response.json::<serde_json::Value>().await.unwrap()
        }
    };
    let prefix = unique("parc");
    let databases: Vec<String> = (0..50).map(|i| format!("{prefix}_{i:02}")).collect();
    for (i, db) in databases.iter().enumerate() {
        call(reqwest::Method::PUT, db.clone(), None).await;
        let docs: Vec<serde_json::Value> = (0..20 + i)
            .map(|n| serde_json::json!({"_id": format!("d{n:03}"), "db": i, "n": n}))
            .collect();
        call(
            reqwest::Method::POST,
            format!("{db}/_bulk_docs"),
            Some(serde_json::json!({ "docs": docs })),
        )
        .await;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut backup = kura();
    file_storage(&mut backup, dir.path());
    backup
        .env("KURA_COUCHDB_URL", &couch)
        .args(["backup", "couchdb", "--jobs", "4"]);
    for db in &databases {
        backup.args(["--database", db]);
    }
    let backup = tokio::task::block_in_place(|| run(&mut backup));
    backup.assert_ok();
    let parts = database_parts(&manifest(dir.path()));
    let names: Vec<&String> = parts.iter().map(|(name, _)| name).collect();
    assert_eq!(names, databases.iter().collect::<Vec<_>>());

    let mut restore = kura();
    file_storage(&mut restore, dir.path());
    restore.env("KURA_COUCHDB_URL", &couch).args([
        "restore",
        "couchdb",
        &backup.backup_id(),
        "--jobs",
        "4",
    ]);
    for db in &databases {
        restore.args(["--database", &format!("{db}:{db}_r")]);
    }
    tokio::task::block_in_place(|| run(&mut restore)).assert_ok();
    for db in &databases {
        let docs = |name: String| {
            let call = &call;
            async move {
                let all = call(
                    reqwest::Method::GET,
                    format!("{name}/_all_docs?include_docs=true"),
                    None,
                )
                .await;
                all["rows"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|row| row["doc"].to_string())
                    .collect::<Vec<_>>()
            }
        };
        let original = docs(db.clone()).await;
        assert!(!original.is_empty());
        assert_eq!(docs(format!("{db}_r")).await, original, "{db}");
    }
}

/// `database` backed up with every table in a part of its own, as 3 jobs allow.
fn backup_split(url: &str, dir: &Path, database: &str) -> common::Run {
    let mut backup = kura();
    file_storage(&mut backup, dir);
    backup.env("KURA_POSTGRES_URL", url).args([
        "backup",
        "postgres",
        "--database",
        database,
        "--jobs",
        "3",
        "--split-table-size",
        "0",
    ]);
    let backed_up = run(&mut backup);
    backed_up.assert_ok();
    backed_up
}

/// Restore `source` of backup `id` as `target` with `args`, and compare the two by pg_dump.
fn restore_identical(url: &str, dir: &Path, id: &str, source: &str, target: &str, args: &[&str]) {
    let mut restore = kura();
    file_storage(&mut restore, dir);
    restore
        .env("KURA_POSTGRES_URL", url)
        .args(["restore", "postgres", id, "--database"])
        .arg(format!("{source}:{target}"))
        .args(args);
    run(&mut restore).assert_ok();
    assert_eq!(
        common::pg_dump_text(url, source),
        common::pg_dump_text(url, target),
        "{target} differs from {source}"
    );
}

fn verify_deep(url: &str, dir: &Path, id: &str) {
    let mut verify = kura();
    file_storage(&mut verify, dir);
    verify
        .env("KURA_POSTGRES_URL", url)
        .args(["verify", "postgres", id, "--deep"]);
    run(&mut verify).assert_ok();
}

/// Large tables are read as COPY text in the backup's snapshot and loaded by COPY: every
/// awkward value survives both ways in (kura's own COPY into a scratch database with
/// `--jobs`, and psql's session with `--jobs 1`), in a LATIN1 database, with generated and
/// dropped columns, quoted names, a table with no columns, and row-level security enabled;
/// and names not in ASCII in a LATIN1 database (columns, a table, an index, a constraint, a
/// comment), on every restore path: the schema's scripts are LATIN1 bytes, the COPY
/// statements UTF-8.
#[test]
fn tables_read_by_copy_keep_every_value_on_every_restore_path() {
    let url = require!("KURA_TEST_PG_URL");
    let source = unique("copytext");
    psql(
        &url,
        "postgres",
        &format!("CREATE DATABASE {source} ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"),
    );
    psql(
        &url,
        &source,
        r#"SET client_encoding = 'UTF8';
           CREATE SCHEMA "Odd ""Schema""";
           CREATE TABLE "Odd ""Schema"""."Mixed Case" ("Total Amount" numeric(30,10), "line
break" text);
           CREATE TABLE awkward (id int PRIMARY KEY, gone text, t text, b bytea, f float8,
             at timestamptz, span interval, rel regclass, arr int[], doc jsonb,
             upper_t text GENERATED ALWAYS AS (upper(t)) STORED);
           ALTER TABLE awkward DROP COLUMN gone;
           ALTER TABLE awkward ENABLE ROW LEVEL SECURITY;
           INSERT INTO awkward (id, t, b, f, at, span, rel, arr, doc) VALUES
             (1, E'tab\there\nnew line\\back slash', '\x00ff5c2e0a', 0.1, '2026-12-07 01:02:03.456789+05', '1 year 2 mons -3 days 04:05:06.7', 'pg_class', '{1,NULL,3}', '{"a": "\\.", "b": [1, 2.50]}'),
             (2, E'\\.', '', 1e-310, 'infinity', '-00:00:01', '"Odd ""Schema"""."Mixed Case"', '{}', 'null'),
             (3, NULL, NULL, 'NaN', '-infinity', NULL, NULL, NULL, NULL),
             (4, '', '\x', '-Infinity', '1999-12-31 23:59:59+00', '0', 'awkward', '{{1,2},{3,4}}', '[]'),
             (5, E'caf\u00e9 na\u00efve \u00c6r\u00f8', '\x5c', 1.7976931348623157e308, '2000-02-29 12:00:00+00', '1 day', 'awkward', '{-2147483648}', '"\u00e9"');
           INSERT INTO awkward (id, t) SELECT g, repeat(md5(g::text), 3) FROM generate_series(6, 3000) g;
           INSERT INTO "Odd ""Schema"""."Mixed Case" VALUES (12345678901234567890.0123456789, 'x'), (NULL, E'\r\n');
           CREATE TABLE nocols ();
           INSERT INTO nocols DEFAULT VALUES; INSERT INTO nocols DEFAULT VALUES;
           CREATE TABLE small (id int);
           INSERT INTO small VALUES (1);
           ANALYZE;"#,
    );
    let names = format!("{source}_names");
    psql(
        &url,
        "postgres",
        &format!("CREATE DATABASE {names} ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"),
    );
    psql(
        &url,
        &names,
        "SET client_encoding = 'UTF8'; \
         CREATE TABLE accented (id int, \"naïve café\" text); \
         INSERT INTO accented SELECT g, 'Ærø ' || g FROM generate_series(1, 500) g; \
         CREATE TABLE \"Grüße\" (\"schlüssel\" int CONSTRAINT \"schlüssel_pk\" PRIMARY KEY, \
           \"straße\" text CHECK (\"straße\" <> 'Ø')); \
         INSERT INTO \"Grüße\" SELECT g, 'Å' || g FROM generate_series(1, 300) g; \
         CREATE VIEW \"Übersicht\" AS SELECT * FROM \"Grüße\" WHERE \"straße\" LIKE 'Å1%'; \
         CREATE INDEX \"café_idx\" ON accented (\"naïve café\"); \
         COMMENT ON TABLE accented IS 'Ærø, naïve'; \
         CREATE TABLE plain (id int); INSERT INTO plain VALUES (1); ANALYZE;",
    );
    let dir = tempfile::tempdir().unwrap();
    let backed_up = backup_split(&url, dir.path(), &source);
    let id = backed_up.backup_id();
    let manifest = manifest(dir.path());
    let copied: Vec<&serde_json::Value> = manifest["parts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["format"] == "pg-copy-text")
        .collect();
    let table = |name: &str| {
        copied
            .iter()
            .find(|p| p["properties"]["table"]["name"] == name)
            .unwrap_or_else(|| panic!("no COPY part for {name}: {manifest:#}"))
    };
    assert_eq!(
        table("awkward")["properties"]["copy"],
        serde_json::json!({"columns": ["id", "t", "b", "f", "at", "span", "rel", "arr", "doc"], "encoding": "LATIN1"})
    );
    assert_eq!(
        table("nocols")["properties"]["copy"]["columns"],
        serde_json::json!([])
    );
    table("Mixed Case");
    // Rows read by COPY are counted as they go by, as the others are counted by the server.
    let schema = manifest["parts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["format"] == "pg_dump-custom-schema")
        .unwrap();
    assert_eq!(schema["counts"]["public.awkward"], 3000, "{schema:#}");
    assert_eq!(schema["counts"]["public.nocols"], 2, "{schema:#}");
    assert_eq!(
        schema["counts"]["Odd \"Schema\".Mixed Case"], 2,
        "{schema:#}"
    );

    for jobs in ["3", "1"] {
        let target = format!("{source}_j{jobs}");
        restore_identical(&url, dir.path(), &id, &source, &target, &["--jobs", jobs]);
    }
    verify_deep(&url, dir.path(), &id);

    // Column names not in ASCII: the COPY statements stay UTF-8, the rows LATIN1.
    let dir = tempfile::tempdir().unwrap();
    let backed_up = backup_split(&url, dir.path(), &names);
    let accented = self::manifest(dir.path())["parts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["properties"]["table"]["name"] == "accented")
        .cloned()
        .expect("a COPY part for accented");
    assert_eq!(
        accented["properties"]["copy"]["columns"],
        serde_json::json!(["id", "naïve café"])
    );
    let id = backed_up.backup_id();
    // Through a scratch database (post-data on kura's sessions), through psql's one
    // transaction, and again onto it with --force.
    for args in [
        &["--jobs", "3"][..],
        &["--jobs", "1"],
        &["--jobs", "1", "--force"],
    ] {
        let target = format!("{names}_j{}", args[1]);
        restore_identical(&url, dir.path(), &id, &names, &target, args);
    }
    // pg_restore matches --table against the archive's names, which are LATIN1 here (in
    // a database backed up whole, a mismatch would restore nothing and report success).
    let whole = tempfile::tempdir().unwrap();
    let mut backup = kura();
    file_storage(&mut backup, whole.path());
    // A client encoding in kura's environment must not reach pg_dump: the archive stays in
    // the database's encoding, which the --table names are converted to.
    backup.env("PGCLIENTENCODING", "UTF8");
    backup.env("KURA_POSTGRES_URL", &url).args([
        "backup",
        "postgres",
        "--database",
        &names,
        "--jobs",
        "1",
    ]);
    let whole_id = run(&mut backup).backup_id();
    for (backup_dir, backup_id, suffix) in
        [(dir.path(), &id, "ts"), (whole.path(), &whole_id, "tw")]
    {
        let selected = format!("{names}_{suffix}");
        // A table (known from the manifest's counts), then a view on it (known only from
        // the archive's table of contents, listed in LATIN1).
        for (table, expected) in [("Grüße", "300|Å1"), ("Übersicht", "111|Å1")] {
            let mut restore = kura();
            file_storage(&mut restore, backup_dir);
            restore.env("KURA_POSTGRES_URL", &url).args([
                "restore",
                "postgres",
                backup_id,
                "--database",
                &format!("{names}:{selected}"),
                "--table",
                table,
            ]);
            run(&mut restore).assert_ok();
            assert_eq!(
                psql(
                    &url,
                    &selected,
                    &format!(
                        "SET client_encoding = 'UTF8'; SELECT count(*), min(\"straße\") FROM \"{table}\";"
                    )
                )
                .trim(),
                expected,
                "{table} in {selected}"
            );
        }
    }
    verify_deep(&url, dir.path(), &id);
}

/// A table truncated between the backup's snapshot and its lock (here: while the backup
/// waited behind the session that truncates it) would look empty to the snapshot and be
/// backed up as an empty table; the backup fails instead, naming it.
#[test]
fn a_table_truncated_under_the_snapshot_fails_the_backup_instead_of_backing_up_nothing() {
    let url = require!("KURA_TEST_PG_URL");
    let db = unique("truncated");
    psql(&url, "postgres", &format!("CREATE DATABASE {db}"));
    psql(
        &url,
        &db,
        "CREATE TABLE a (v int); INSERT INTO a SELECT generate_series(1, 1000); \
         CREATE TABLE b (v int); INSERT INTO b SELECT generate_series(1, 1000); ANALYZE;",
    );
    let mut holder = std::process::Command::new(common::pg_tool("psql"))
        .args(["--no-psqlrc", "--quiet", "--set=ON_ERROR_STOP=1"])
        .envs(common::pg_env(&url, &db))
        .env("PGAPPNAME", "kura-test-truncate")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut holder_input = holder.stdin.take().unwrap();
    {
        use std::io::Write;
        writeln!(
            holder_input,
            "BEGIN; LOCK TABLE a IN ACCESS EXCLUSIVE MODE;"
        )
        .unwrap();
        holder_input.flush().unwrap();
    }
    let granted = "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) \
         WHERE a.application_name = 'kura-test-truncate' AND l.mode = 'AccessExclusiveLock' AND l.granted";
    let started = std::time::Instant::now();
    while psql(&url, &db, granted) == "0" {
        assert!(started.elapsed().as_secs() < 10, "the lock was never taken");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }

    let dir = tempfile::tempdir().unwrap();
    let mut backup = kura();
    file_storage(&mut backup, dir.path());
    backup
        .env("KURA_POSTGRES_URL", &url)
        .env("KURA_LOCK_WAIT_TIMEOUT", "60s")
        .args([
            "backup",
            "postgres",
            "--database",
            &db,
            "--jobs",
            "2",
            "--split-table-size",
            "0",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = backup.spawn().unwrap();
    // The snapshot is taken, and the backup's sessions queue for table a's lock.
    let waiting = "SELECT count(*) FROM pg_stat_activity \
         WHERE application_name = 'kura' AND wait_event_type = 'Lock'";
    let started = std::time::Instant::now();
    while psql(&url, &db, waiting) == "0" {
        assert!(
            started.elapsed().as_secs() < 30,
            "the backup never waited for the lock"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    {
        use std::io::Write;
        writeln!(
            holder_input,
            "TRUNCATE a; INSERT INTO a VALUES (-1); COMMIT;"
        )
        .unwrap();
        holder_input.flush().unwrap();
    }
    drop(holder_input);
    let _ = holder.wait();
    let result = common::Run::from_output(child.wait_with_output().unwrap());
    assert_eq!(result.code, 1, "{}", result.all());
    let message = result.error_line()["message"].as_str().unwrap().to_string();
    assert!(
        message.contains("table public.a") && message.contains("run the backup again"),
        "{message}"
    );
    let manifests: Vec<_> = common::walk(dir.path())
        .into_iter()
        .filter(|p| p.ends_with("manifest.json"))
        .collect();
    assert!(manifests.is_empty(), "{manifests:?}");
}
