//! PostgreSQL end to end through the real binary: round trips compared the way wal-g does
//! (pg_dump of the source vs pg_dump of the restored target, and pg_dumpall --globals-only),
//! selective restores, and every failure path leaving nothing that looks complete.

mod common;

use std::path::Path;

use common::{kura, psql, run, unique, Run};

const ROLES_SQL: &str = include_str!("fixtures/roles.sql");
const MAIN_SQL: &str = include_str!("fixtures/main.sql");

/// Database-level facts that live outside pg_dump's plain output.
const DATABASE_FACTS: &str = "SELECT pg_encoding_to_char(encoding), datcollate, datctype, \
    pg_get_userbyid(datdba), datconnlimit, coalesce(datacl::text, '-'), \
    coalesce(shobj_description(oid, 'pg_database'), '-'), \
    coalesce((SELECT string_agg(coalesce(pg_get_userbyid(NULLIF(s.setrole, 0)), '*') || ':' || array_to_string(s.setconfig, ','), ';' ORDER BY s.setrole) \
              FROM pg_db_role_setting s WHERE s.setdatabase = d.oid), '-') \
    FROM pg_database d WHERE datname = current_database()";

fn create_database(url: &str, name: &str, options: &str) {
    psql(
        url,
        "postgres",
        &format!(
            "CREATE DATABASE \"{}\" {options}",
            name.replace('"', "\"\"")
        ),
    );
}

/// A source cluster with several databases covering the fixture list of the issue.
struct Fixture {
    main: String,
    latin1: String,
    spaced: String,
}

fn build_fixture(url: &str) -> Fixture {
    psql(url, "postgres", ROLES_SQL);
    let fixture = Fixture {
        main: unique("rt_main"),
        latin1: unique("rt_latin1"),
        spaced: format!("Sales Data {}", unique("X")),
    };
    create_database(url, &fixture.main, "OWNER kura_app_owner");
    psql(
        url,
        "postgres",
        &format!(
            "ALTER DATABASE \"{0}\" SET search_path = app, public; \
         ALTER DATABASE \"{0}\" SET work_mem = '8MB'; \
         ALTER ROLE kura_analyst IN DATABASE \"{0}\" SET work_mem = '16MB'; \
         REVOKE CONNECT ON DATABASE \"{0}\" FROM PUBLIC; \
         GRANT CONNECT ON DATABASE \"{0}\" TO \"Kura Reader\"; \
         COMMENT ON DATABASE \"{0}\" IS 'main app database';",
            fixture.main
        ),
    );
    psql(url, &fixture.main, MAIN_SQL);
    create_database(
        url,
        &fixture.latin1,
        "ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0",
    );
    psql(
        url,
        &fixture.latin1,
        "CREATE TABLE t (v text); INSERT INTO t VALUES ('café'), ('naïve'), ('Ærø');",
    );
    create_database(url, &fixture.spaced, "CONNECTION LIMIT 7");
    psql(url, &fixture.spaced, "CREATE TABLE \"Orders\" (\"Id\" int, \"Total Amount\" numeric(12,2)); INSERT INTO \"Orders\" VALUES (1, 9.99), (2, 1e9);");
    fixture
}

fn facts(url: &str, database: &str) -> String {
    psql(url, database, DATABASE_FACTS)
}

fn assert_same_database(source_url: &str, source: &str, target_url: &str, target: &str) {
    assert_same_contents(source_url, source, target_url, target);
    assert_eq!(
        facts(source_url, source),
        facts(target_url, target),
        "database properties of {target:?}"
    );
}

/// Everything pg_dump prints of the two databases is the same.
fn assert_same_contents(source_url: &str, source: &str, target_url: &str, target: &str) {
    let (a, b) = (
        common::pg_dump_text(source_url, source),
        common::pg_dump_text(target_url, target),
    );
    if a != b {
        let first = a
            .lines()
            .zip(b.lines())
            .position(|(x, y)| x != y)
            .unwrap_or(0);
        panic!(
            "restored {target:?} differs from {source:?} at line {first}:\n  source: {:?}\n  target: {:?}",
            a.lines().nth(first),
            b.lines().nth(first)
        );
    }
}

/// Globals compared without the bootstrap superuser's own line (each cluster keeps its own
/// password; kura deliberately never changes the role it connects as).
fn globals_without_superuser(url: &str) -> Vec<String> {
    common::pg_dumpall_globals(url)
        .lines()
        .filter(|l| !l.starts_with("ALTER ROLE postgres WITH"))
        .filter(|l| l.contains("kura_") || l.contains("Kura Reader"))
        .map(str::to_string)
        .collect()
}

fn backup(configure: impl Fn(&mut std::process::Command), pg_url: &str, extra: &[&str]) -> String {
    let mut command = kura();
    configure(&mut command);
    command
        .env("KURA_POSTGRES_URL", pg_url)
        .args(["backup", "postgres"])
        .args(extra);
    let result = run(&mut command);
    result.assert_ok();
    result.backup_id()
}

fn restore(
    configure: impl Fn(&mut std::process::Command),
    id: &str,
    target: &str,
    extra: &[&str],
) -> Run {
    let mut command = kura();
    configure(&mut command);
    command
        .args(["restore", "postgres", id, "--to", target])
        .args(extra);
    run(&mut command)
}

fn file_storage(dir: &Path) -> impl Fn(&mut std::process::Command) + '_ {
    move |c: &mut std::process::Command| {
        c.env("KURA_STORAGE", format!("file://{}", dir.display()));
    }
}

#[tokio::test]
async fn round_trip_keeps_everything_through_file_and_s3() {
    let source = require!("KURA_TEST_PG_URL");
    let target = require!("KURA_TEST_PG2_URL");
    let moto = require!("KURA_TEST_S3_ENDPOINT");
    let fixture = build_fixture(&source);
    let databases = [&fixture.main, &fixture.latin1, &fixture.spaced];
    let selection: Vec<String> = databases
        .iter()
        .flat_map(|d| ["--database".to_string(), d.to_string()])
        .collect();
    let selection: Vec<&str> = selection.iter().map(String::as_str).collect();

    // file:// into the second cluster under the original names, with roles.
    let dir = tempfile::tempdir().unwrap();
    let id = backup(file_storage(dir.path()), &source, &selection);
    let mut list = kura();
    list.env("KURA_STORAGE", format!("file://{}", dir.path().display()))
        .args(["list", "--json"]);
    let listed = run(&mut list).assert_ok().records();
    assert_eq!(listed[0]["backup_id"], id.as_str());
    assert_eq!(listed[0]["status"], "complete");
    assert_eq!(listed[0]["parts"], 4, "globals + three databases");

    // Both restore paths: parallel through a scratch database, and the single transaction.
    restore(
        file_storage(dir.path()),
        &id,
        &target,
        &["--globals", "--jobs", "3"],
    )
    .assert_ok();
    assert_eq!(
        globals_without_superuser(&source),
        globals_without_superuser(&target),
        "roles and memberships"
    );
    for database in databases {
        assert_same_database(&source, database, &target, database);
    }

    // S3 (moto), multipart with small parts, into new names on the same target.
    let bucket = unique("rt").replace('_', "-");
    common::create_bucket(&moto, "testing", "testing", &bucket).await;
    let s3 = |c: &mut std::process::Command| {
        common::with_moto(c, &moto, &bucket, "nightly");
        c.env("KURA_PART_SIZE", "5MiB");
    };
    let id = backup(s3, &source, &selection);
    let mut mappings = Vec::new();
    for database in databases {
        mappings.push("--database".to_string());
        mappings.push(format!("{database}:{database}_s3"));
    }
    let mappings: Vec<&str> = mappings.iter().map(String::as_str).collect();
    let mut mappings = mappings;
    mappings.extend(["--jobs", "1"]);
    restore(s3, &id, &target, &mappings).assert_ok();
    for database in databases {
        assert_same_database(&source, database, &target, &format!("{database}_s3"));
    }
    let keys = common::bucket_keys(&common::s3_client(&moto, "testing", "testing"), &bucket).await;
    assert!(
        keys.iter()
            .all(|k| k.starts_with(&format!("nightly/default/postgres/{id}/"))),
        "{keys:?}"
    );
    assert!(keys.iter().any(|k| k.ends_with("/manifest.json")));
}

#[test]
fn single_database_and_single_table_restore_into_new_names() {
    let url = require!("KURA_TEST_PG_URL");
    let db = unique("single");
    create_database(&url, &db, "");
    // s.other's data comes after s.keep's in the archive and is larger than a pipe buffer, so
    // pg_restore stops reading early and kura must still read (and verify) the rest.
    psql(&url, &db, "CREATE SCHEMA s; CREATE TABLE s.keep (id int PRIMARY KEY, v text); CREATE TABLE s.other (id int); \
                     INSERT INTO s.keep SELECT i, 'v' || i FROM generate_series(1, 1000) i; INSERT INTO s.other SELECT generate_series(1, 300000);");
    let dir = tempfile::tempdir().unwrap();
    let id = backup(file_storage(dir.path()), &url, &["--database", &db]);

    let copy = format!("{db}_copy");
    restore(
        file_storage(dir.path()),
        &id,
        &url,
        &["--database", &format!("{db}:{copy}")],
    )
    .assert_ok();
    assert_same_database(&url, &db, &url, &copy);

    let only = format!("{db}_table");
    restore(
        file_storage(dir.path()),
        &id,
        &url,
        &["--database", &format!("{db}:{only}"), "--table", "s.keep"],
    )
    .assert_ok();
    assert_eq!(
        psql(&url, &only, "SELECT count(*), sum(id) FROM s.keep"),
        "1000|500500"
    );
    assert_eq!(
        psql(&url, &only, "SELECT to_regclass('s.other') IS NULL"),
        "t",
        "only the asked table"
    );

    // The same table again: it exists now, so it is refused without --force.
    let again = restore(
        file_storage(dir.path()),
        &id,
        &url,
        &["--database", &format!("{db}:{only}"), "--table", "s.keep"],
    );
    assert_eq!(again.code, 7, "{}", again.all());
    // latest resolves to the newest complete backup.
    let latest = restore(
        file_storage(dir.path()),
        "latest",
        &url,
        &["--database", &format!("{db}:{db}_latest")],
    );
    latest.assert_ok();
}

#[test]
fn non_empty_target_is_refused_unless_forced() {
    let url = require!("KURA_TEST_PG_URL");
    let db = unique("busy");
    create_database(&url, &db, "");
    psql(
        &url,
        &db,
        "CREATE TABLE t (v int); INSERT INTO t VALUES (1), (2);",
    );
    let dir = tempfile::tempdir().unwrap();
    let id = backup(file_storage(dir.path()), &url, &["--database", &db]);
    let target = format!("{db}_target");
    create_database(&url, &target, "");
    psql(
        &url,
        &target,
        "CREATE TABLE precious (v text); INSERT INTO precious VALUES ('keep me');",
    );

    let refused = restore(
        file_storage(dir.path()),
        &id,
        &url,
        &["--database", &format!("{db}:{target}")],
    );
    assert_eq!(refused.code, 7, "{}", refused.all());
    let message = refused.error_line()["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        message.contains(&target) && message.contains("--force"),
        "{message}"
    );
    assert_eq!(psql(&url, &target, "SELECT v FROM precious"), "keep me");
    assert_eq!(psql(&url, &target, "SELECT to_regclass('t') IS NULL"), "t");

    restore(
        file_storage(dir.path()),
        &id,
        &url,
        &["--database", &format!("{db}:{target}"), "--force"],
    )
    .assert_ok();
    assert_eq!(psql(&url, &target, "SELECT sum(v) FROM t"), "3");
    // Forced twice: replaces, never duplicates.
    restore(
        file_storage(dir.path()),
        &id,
        &url,
        &["--database", &format!("{db}:{target}"), "--force"],
    )
    .assert_ok();
    assert_eq!(psql(&url, &target, "SELECT count(*) FROM t"), "2");
}

fn part_path(dir: &Path, id: &str) -> std::path::PathBuf {
    dir.join("default/postgres")
        .join(id)
        .join("db-0001.pgdump.zst")
}

#[test]
fn corrupt_or_truncated_objects_fail_and_leave_the_target_untouched() {
    let url = require!("KURA_TEST_PG_URL");
    let db = unique("corrupt");
    create_database(&url, &db, "");
    psql(&url, &db, "CREATE TABLE t (id int, v text); INSERT INTO t SELECT i, md5(i::text) FROM generate_series(1, 50000) i;");
    let dir = tempfile::tempdir().unwrap();
    let id = backup(file_storage(dir.path()), &url, &["--database", &db]);
    let part = part_path(dir.path(), &id);
    let original = std::fs::read(&part).unwrap();

    // An existing empty database as target: it must stay empty.
    let target = format!("{db}_t");
    create_database(&url, &target, "");
    for (what, damaged) in [
        ("flipped byte", {
            let mut d = original.clone();
            let middle = d.len() / 2;
            d[middle] ^= 0x40;
            d
        }),
        ("truncated", original[..original.len() * 2 / 3].to_vec()),
        ("flipped last byte", {
            let mut d = original.clone();
            let last = d.len() - 1;
            d[last] ^= 0x01;
            d
        }),
    ] {
        std::fs::write(&part, &damaged).unwrap();
        let failed = restore(
            file_storage(dir.path()),
            &id,
            &url,
            &["--database", &format!("{db}:{target}")],
        );
        assert_eq!(failed.code, 5, "{what}: {}", failed.all());
        let message = failed.error_line()["message"].as_str().unwrap().to_string();
        assert!(
            message.contains("db-0001.pgdump.zst"),
            "{what}: names the object: {message}"
        );
        assert!(
            message.contains("restore from another backup"),
            "{what}: says what to do: {message}"
        );
        assert_eq!(
            psql(
                &url,
                &target,
                "SELECT count(*) FROM pg_class WHERE relname = 't'"
            ),
            "0",
            "{what}: target untouched"
        );
        // A database the restore would have created is not left behind either.
        let fresh = format!("{db}_fresh");
        let failed = restore(
            file_storage(dir.path()),
            &id,
            &url,
            &["--database", &format!("{db}:{fresh}")],
        );
        assert_eq!(failed.code, 5, "{what}: {}", failed.all());
        assert_eq!(
            psql(
                &url,
                "postgres",
                &format!("SELECT count(*) FROM pg_database WHERE datname = '{fresh}'")
            ),
            "0"
        );
    }
    std::fs::write(&part, &original).unwrap();
    restore(
        file_storage(dir.path()),
        &id,
        &url,
        &["--database", &format!("{db}:{target}")],
    )
    .assert_ok();
    assert_eq!(psql(&url, &target, "SELECT count(*) FROM t"), "50000");
}

/// A backup of a large, incompressible database to moto, caught while its multipart upload
/// is open: (database, bucket, S3 client, running kura).
async fn backup_in_flight(
    url: &str,
    moto: &str,
    name: &str,
) -> (String, String, aws_sdk_s3::Client, std::process::Child) {
    let db = unique(name);
    create_database(url, &db, "");
    psql(url, &db, "CREATE TABLE big AS SELECT i, gen_random_uuid()::text || gen_random_uuid()::text || gen_random_uuid()::text AS v FROM generate_series(1, 1500000) i;");
    let bucket = unique(name).replace('_', "-");
    common::create_bucket(moto, "testing", "testing", &bucket).await;
    let mut command = kura();
    common::with_moto(&mut command, moto, &bucket, "p");
    command
        .env("KURA_POSTGRES_URL", url)
        .env("KURA_PART_SIZE", "5MiB")
        .env("KURA_UPLOAD_CONCURRENCY", "1")
        .args(["backup", "postgres", "--database", &db])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = command.spawn().unwrap();
    let client = common::s3_client(moto, "testing", "testing");
    common::wait_for_open_upload(&client, &bucket).await;
    (db, bucket, client, child)
}

#[tokio::test]
async fn dump_killed_mid_stream_leaves_no_manifest_and_no_upload() {
    let url = require!("KURA_TEST_PG_URL");
    let moto = require!("KURA_TEST_S3_ENDPOINT");
    let (db, bucket, client, child) = backup_in_flight(&url, &moto, "killed").await;
    let killed = psql(&url, "postgres", &format!(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = '{db}' AND application_name = 'kura'"
    ));
    assert_eq!(killed, "1", "pg_dump's connection was found and terminated");
    let result = Run::from_output(child.wait_with_output().unwrap());
    assert_eq!(result.code, 1, "{}", result.all());
    let message = result.error_line()["message"].as_str().unwrap().to_string();
    assert!(
        message.contains("pg_dump failed") && message.contains(&db),
        "{message}"
    );
    assert!(
        common::open_uploads(&client, &bucket).await.is_empty(),
        "the multipart upload was aborted"
    );
    let keys = common::bucket_keys(&client, &bucket).await;
    assert!(
        keys.is_empty(),
        "nothing of the failed backup is left: {keys:?}"
    );
}

#[test]
fn unreachable_storage_and_wrong_password_are_clear_errors() {
    let url = require!("KURA_TEST_PG_URL");
    // Nothing listens on port 9.
    let mut command = kura();
    common::with_moto(&mut command, "http://127.0.0.1:9", "bucket", "p");
    command
        .env("KURA_POSTGRES_URL", &url)
        .args(["backup", "postgres"]);
    let result = run(&mut command);
    assert_eq!(result.code, 3, "{}", result.all());
    let message = result.error_line()["message"].as_str().unwrap().to_string();
    assert!(
        message.contains("cannot reach the object store"),
        "{message}"
    );

    let wrong = url.replace("kura-test-pw", "wrong-password");
    let dir = tempfile::tempdir().unwrap();
    let mut command = kura();
    command
        .env("KURA_STORAGE", format!("file://{}", dir.path().display()))
        .env("KURA_POSTGRES_URL", &wrong)
        .args(["backup", "postgres"]);
    let result = run(&mut command);
    assert_eq!(result.code, 4, "{}", result.all());
    let message = result.error_line()["message"].as_str().unwrap().to_string();
    assert!(
        message.contains("password authentication failed"),
        "{message}"
    );
    assert!(
        !result.all().contains("wrong-password"),
        "the password is never printed"
    );
    let stored = common::walk(dir.path());
    assert!(
        stored.is_empty(),
        "nothing was uploaded, not even a lock: {stored:?}"
    );

    let mut command = kura();
    command
        .env("KURA_STORAGE", format!("file://{}", dir.path().display()))
        .args(["restore", "postgres", "latest", "--to", &url]);
    let result = run(&mut command);
    assert_eq!(result.code, 6, "no backup yet: {}", result.all());
}

/// Wraps the PostgreSQL tools to record the argv of every child kura starts.
fn recording_bin_dir(dir: &Path, log: &Path) -> std::path::PathBuf {
    let real = std::env::var("KURA_TEST_PG_BIN").unwrap_or_else(|_| "/usr/bin".into());
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for tool in ["pg_dump", "pg_dumpall", "pg_restore", "psql"] {
        let script = format!(
            "#!/bin/sh\necho \"{tool} $*\" >> '{}'\nexec '{real}/{tool}' \"$@\"\n",
            log.display()
        );
        let path = bin.join(tool);
        std::fs::write(&path, script).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    bin
}

#[test]
fn passwords_never_leak_into_logs_errors_manifests_or_argv() {
    let url = require!("KURA_TEST_PG_URL");
    let db = unique("secret");
    create_database(&url, &db, "");
    psql(
        &url,
        &db,
        "CREATE TABLE t (v int); INSERT INTO t VALUES (1);",
    );
    let role = unique("leak");
    let password = "S3cr3t-Pa$$-w0rd";
    psql(
        &url,
        "postgres",
        &format!("CREATE ROLE {role} LOGIN SUPERUSER PASSWORD '{password}'"),
    );
    let secret_url = url.replace(
        "postgres:kura-test-pw",
        &format!("{role}:{}", "S3cr3t-Pa%24%24-w0rd"),
    );

    let dir = tempfile::tempdir().unwrap();
    let argv_log = dir.path().join("argv.log");
    let bin = recording_bin_dir(dir.path(), &argv_log);
    let storage = dir.path().join("store");
    let with = |c: &mut std::process::Command| {
        c.env("KURA_STORAGE", format!("file://{}", storage.display()))
            .env("KURA_PG_BIN_DIR", &bin);
    };
    let mut outputs = String::new();
    for format in ["json", "text"] {
        let mut command = kura();
        with(&mut command);
        command
            .env("KURA_LOG_FORMAT", format)
            .env("KURA_POSTGRES_URL", &secret_url)
            .args(["-v", "backup", "postgres", "--database", &db]);
        let result = run(&mut command);
        result.assert_ok();
        outputs.push_str(&result.all());
    }
    let mut list = kura();
    with(&mut list);
    let listed = run(list.args(["list", "postgres", "--json"])).records();
    let id = listed[0]["backup_id"].as_str().unwrap().to_string();
    let result = restore(
        with,
        &id,
        &secret_url,
        &["--database", &format!("{db}:{db}_r"), "-v"],
    );
    result.assert_ok();
    outputs.push_str(&result.all());
    // Failing paths print URLs too: a refused restore and a wrong database.
    outputs.push_str(
        &restore(
            with,
            &id,
            &secret_url,
            &["--database", &format!("{db}:{db}_r")],
        )
        .all(),
    );
    let mut help = kura();
    help.env("KURA_POSTGRES_URL", &secret_url)
        .args(["backup", "--help"]);
    outputs.push_str(&run(&mut help).all());

    let argv = std::fs::read_to_string(&argv_log).unwrap();
    assert!(
        argv.contains("pg_dump") && argv.contains("pg_restore") && argv.contains("psql"),
        "{argv}"
    );
    let mut manifests = String::new();
    for entry in common::walk(&storage) {
        if entry.ends_with("manifest.json") {
            manifests.push_str(&std::fs::read_to_string(&entry).unwrap());
        }
    }
    assert!(manifests.contains(&db));
    for (what, text) in [
        ("logs and errors", &outputs),
        ("child argv", &argv),
        ("manifests", &manifests),
    ] {
        assert!(
            !text.contains(password) && !text.contains("S3cr3t-Pa%24%24-w0rd"),
            "password found in {what}:\n{text}"
        );
    }
    assert!(
        outputs.contains(&format!("{role}:***@")),
        "URLs are shown redacted:\n{outputs}"
    );
}

#[tokio::test]
async fn sigterm_mid_backup_aborts_and_commits_nothing() {
    let url = require!("KURA_TEST_PG_URL");
    let moto = require!("KURA_TEST_S3_ENDPOINT");
    let (db, bucket, client, child) = backup_in_flight(&url, &moto, "sigterm").await;
    let pid = child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let result = Run::from_output(child.wait_with_output().unwrap());
    assert_eq!(result.code, 130, "{}", result.all());
    assert_eq!(result.error_line()["error_kind"], "interrupted");
    assert!(
        common::open_uploads(&client, &bucket).await.is_empty(),
        "the multipart upload was aborted"
    );
    assert!(
        common::bucket_keys(&client, &bucket).await.is_empty(),
        "no manifest, no parts"
    );
    // The server notices the closed connection of the stopped pg_dump within moments.
    let sessions = format!("SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}'");
    let started = std::time::Instant::now();
    while psql(&url, "postgres", &sessions) != "0" {
        assert!(started.elapsed().as_secs() < 10, "pg_dump was not stopped");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// psql stops at `ALTER TABLE … OWNER TO` a role the target lacks; kura recognises that by
/// its SQLSTATE (not the translated message) and says to add --globals.
#[test]
fn a_missing_role_is_named_with_the_way_out() {
    let url = require!("KURA_TEST_PG_URL");
    let db = unique("orphan");
    let role = unique("kura_gone");
    create_database(&url, &db, "");
    psql(
        &url,
        &db,
        &format!("CREATE ROLE {role}; CREATE TABLE t (v int); ALTER TABLE t OWNER TO {role};"),
    );
    let dir = tempfile::tempdir().unwrap();
    let id = backup(file_storage(dir.path()), &url, &["--database", &db]);
    psql(
        &url,
        &db,
        &format!("REASSIGN OWNED BY {role} TO postgres; DROP OWNED BY {role}; DROP ROLE {role};"),
    );

    let copy = format!("{db}_copy");
    let failed = restore(
        file_storage(dir.path()),
        &id,
        &url,
        &["--database", &format!("{db}:{copy}")],
    );
    assert_eq!(failed.code, 1, "{}", failed.all());
    let message = failed.error_line()["message"].as_str().unwrap().to_string();
    assert!(
        message.contains(&role) && message.contains("add --globals"),
        "{message}"
    );
    assert_eq!(
        psql(
            &url,
            "postgres",
            &format!("SELECT count(*) FROM pg_database WHERE datname = '{copy}'")
        ),
        "0",
        "the database created for the restore is dropped again"
    );
}

/// The last statements of a restore script can run for a long time with nothing flowing
/// through the pipes (an index build). A SIGTERM then still stops the restore at once, and
/// the target is left as it was.
#[tokio::test]
async fn sigterm_while_an_index_builds_rolls_the_restore_back() {
    let url = require!("KURA_TEST_PG_URL");
    let db = unique("slowidx");
    create_database(&url, &db, "");
    // An index whose expression sleeps 1 ms per row, except in the session that fills the
    // table: restoring it takes 20 s or more.
    psql(
        &url,
        &db,
        "CREATE FUNCTION slow(v int) RETURNS int IMMUTABLE LANGUAGE plpgsql AS $$ BEGIN \
           IF coalesce(current_setting('kura_test.fast', true), '') <> 'on' THEN PERFORM pg_sleep(0.001); END IF; \
           RETURN v; END $$; \
         CREATE TABLE t (v int); SET kura_test.fast = 'on'; \
         INSERT INTO t SELECT generate_series(1, 20000); CREATE INDEX t_slow ON t (slow(v)); \
         CREATE TABLE u (v int); INSERT INTO u SELECT generate_series(1, 100);",
    );
    let dir = tempfile::tempdir().unwrap();
    let whole = backup(file_storage(dir.path()), &url, &["--database", &db]);
    let split = backup(
        file_storage(dir.path()),
        &url,
        &["--database", &db, "--jobs", "2", "--split-table-size", "0"],
    );

    // Both ways a restore builds indexes: in its one transaction (--jobs 1), and on the
    // post-data sessions of a scratch database (--jobs 2), which must then be dropped; from
    // a whole archive and from a database split into parts.
    for (n, (id, jobs)) in [(&whole, "1"), (&whole, "2"), (&split, "1"), (&split, "2")]
        .into_iter()
        .enumerate()
    {
        let copy = format!("{db}_copy{n}");
        let mut command = kura();
        file_storage(dir.path())(&mut command);
        let child = command
            .args(["restore", "postgres", id, "--to", &url, "--jobs", jobs])
            .args(["--database", &format!("{db}:{copy}")])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let building = format!(
            "SELECT count(*) FROM pg_stat_activity WHERE (datname = '{copy}' OR datname LIKE 'kura\\_restore\\_%') AND query LIKE '%CREATE INDEX t_slow%' AND pid <> pg_backend_pid()"
        );
        let started = std::time::Instant::now();
        while psql(&url, "postgres", &building) != "1" {
            assert!(
                started.elapsed().as_secs() < 20,
                "--jobs {jobs}: the index build never started"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let signalled = std::time::Instant::now();
        assert!(std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success());
        let result = Run::from_output(child.wait_with_output().unwrap());
        let took = signalled.elapsed();
        assert_eq!(result.code, 130, "--jobs {jobs}: {}", result.all());
        assert_eq!(result.error_line()["error_kind"], "interrupted");
        assert!(
            took.as_secs() < 10,
            "--jobs {jobs}: kura took {took:?} to stop"
        );
        assert_eq!(
            psql(
                &url,
                "postgres",
                &format!("SELECT count(*) FROM pg_database WHERE datname = '{copy}'")
            ),
            "0",
            "--jobs {jobs}: the half-restored database is gone"
        );
        assert_eq!(
            psql(&url, "postgres", &building),
            "0",
            "--jobs {jobs}: the index build was stopped, its scratch database dropped"
        );
    }
}

/// A session holding a table's ACCESS EXCLUSIVE lock would keep pg_dump waiting until the
/// Job's deadline; with --lock-wait-timeout the backup fails soon, naming that session.
#[test]
fn a_backup_blocked_by_a_lock_fails_and_names_the_holder() {
    let url = require!("KURA_TEST_PG_URL");
    let db = unique("locked");
    create_database(&url, &db, "");
    psql(
        &url,
        &db,
        "CREATE TABLE busy (v int); INSERT INTO busy VALUES (1);",
    );
    let mut holder = std::process::Command::new(common::pg_tool("psql"))
        .args(["--no-psqlrc", "--quiet", "--set=ON_ERROR_STOP=1"])
        .envs(common::pg_env(&url, &db))
        .env("PGAPPNAME", "kura-test-migration")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let stdin = holder.stdin.as_mut().unwrap();
        writeln!(stdin, "BEGIN; LOCK TABLE busy IN ACCESS EXCLUSIVE MODE;").unwrap();
        stdin.flush().unwrap();
    }
    let granted = "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) \
         WHERE a.application_name = 'kura-test-migration' AND l.mode = 'AccessExclusiveLock' AND l.granted";
    let started = std::time::Instant::now();
    while psql(&url, &db, granted) == "0" {
        assert!(started.elapsed().as_secs() < 10, "the lock was never taken");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let holder_pid = psql(
        &url,
        &db,
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'kura-test-migration'",
    );

    let dir = tempfile::tempdir().unwrap();
    let mut command = kura();
    file_storage(dir.path())(&mut command);
    let started = std::time::Instant::now();
    let result = run(command
        .env("KURA_POSTGRES_URL", &url)
        .env("KURA_LOCK_WAIT_TIMEOUT", "2s")
        .args(["backup", "postgres", "--database", &db]));
    let took = started.elapsed();
    let _ = holder.kill();
    let _ = holder.wait();

    assert_eq!(result.code, 1, "{}", result.all());
    assert!(took.as_secs() < 30, "the backup waited {took:?}");
    let message = result.error_line()["message"].as_str().unwrap().to_string();
    for wanted in [
        format!("pid {holder_pid}"),
        "kura-test-migration".to_string(),
        "idle in transaction".to_string(),
        "busy".to_string(),
        "--lock-wait-timeout".to_string(),
    ] {
        assert!(message.contains(&wanted), "{wanted:?} not in {message}");
    }
    let manifests: Vec<_> = common::walk(dir.path())
        .into_iter()
        .filter(|p| p.ends_with("manifest.json"))
        .collect();
    assert!(manifests.is_empty(), "{manifests:?}");
}

#[test]
fn excluded_tables_and_table_data_are_left_out_shown_and_verified() {
    let url = require!("KURA_TEST_PG_URL");
    let db = unique("excl");
    create_database(&url, &db, "");
    psql(
        &url,
        &db,
        "CREATE SCHEMA app; \
         CREATE TABLE app.orders (id int PRIMARY KEY); INSERT INTO app.orders SELECT generate_series(1, 50); \
         CREATE TABLE app.tmp_a (id int); INSERT INTO app.tmp_a VALUES (1); \
         CREATE TABLE app.tmp_b (id int); \
         CREATE TABLE public.tmp_keep (id int); INSERT INTO public.tmp_keep VALUES (7); \
         CREATE TABLE \"Audit Log\" (at timestamptz DEFAULT now(), what text); \
         INSERT INTO \"Audit Log\" (what) SELECT md5(g::text) FROM generate_series(1, 500) g;",
    );
    let dir = tempfile::tempdir().unwrap();
    let id = backup(
        file_storage(dir.path()),
        &url,
        &[
            "--database",
            &db,
            "--exclude-table",
            "app.tmp_*",
            "--exclude-table-data",
            "\"Audit Log\"",
        ],
    );
    let target = format!("{db}_r");
    restore(
        file_storage(dir.path()),
        &id,
        &url,
        &["--database", &format!("{db}:{target}")],
    )
    .assert_ok();
    let tables = psql(
        &url,
        &target,
        "SELECT string_agg(n.nspname || '.' || c.relname, ',' ORDER BY 1) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'r' AND n.nspname IN ('app', 'public')",
    );
    assert_eq!(tables, "app.orders,public.Audit Log,public.tmp_keep");
    assert_eq!(
        psql(&url, &target, "SELECT count(*) FROM \"Audit Log\""),
        "0"
    );
    assert_eq!(psql(&url, &target, "SELECT count(*) FROM app.orders"), "50");
    assert_eq!(psql(&url, &target, "SELECT count(*) FROM tmp_keep"), "1");

    let mut show = kura();
    file_storage(dir.path())(&mut show);
    show.args(["show", "postgres", &id]);
    let shown = run(&mut show);
    shown.assert_ok();
    assert!(shown.all().contains("app.tmp_*"), "{}", shown.all());
    assert!(shown.all().contains("\"Audit Log\""), "{}", shown.all());
    // The emptied table is expected empty, the left-out ones are not expected at all.
    let mut verify = kura();
    file_storage(dir.path())(&mut verify);
    verify
        .env("KURA_POSTGRES_URL", &url)
        .args(["verify", "postgres", &id, "--deep"]);
    let verified = run(&mut verify);
    verified.assert_ok();
    assert!(
        verified.all().contains("counts match"),
        "{}",
        verified.all()
    );

    let mut bad = kura();
    file_storage(dir.path())(&mut bad);
    bad.env("KURA_POSTGRES_URL", &url).args([
        "backup",
        "postgres",
        "--database",
        &db,
        "--exclude-table",
        "\"unclosed",
    ]);
    let refused = run(&mut bad);
    assert_eq!(refused.code, 2, "{}", refused.all());
    assert!(
        refused.all().contains("unclosed double quote"),
        "{}",
        refused.all()
    );
}

/// A database split into parts from one snapshot (its schema, a part per table, the rest)
/// restores identically on every path: side by side through a scratch database, in one
/// transaction with `--jobs 1`, onto itself with `--force`, one table with `--table`, and
/// through `verify --deep`. A damaged data part fails each path with nothing changed. The
/// same database backed up whole (format 3) restores on the same paths.
#[test]
fn split_and_whole_backups_restore_identically_on_every_path() {
    let source = require!("KURA_TEST_PG_URL");
    let target = require!("KURA_TEST_PG2_URL");
    let fixture = build_fixture(&source);
    let main = fixture.main.as_str();
    let dir = tempfile::tempdir().unwrap();
    let storage = file_storage(dir.path());
    // Tables are sized from the catalog's page counts, as autovacuum keeps them.
    psql(&source, main, "ANALYZE");
    // Every table is large enough for a part of its own.
    let mut command = kura();
    storage(&mut command);
    command.env("KURA_POSTGRES_URL", &source).args([
        "backup",
        "postgres",
        "--database",
        main,
        "--jobs",
        "3",
        "--split-table-size",
        "0",
    ]);
    let backed_up = run(&mut command);
    backed_up.assert_ok();
    let id = backed_up.backup_id();
    let log = backed_up.all();
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            dir.path()
                .join("default/postgres")
                .join(&id)
                .join("manifest.json"),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["format_version"], 5, "{manifest:#}");
    let parts = manifest["parts"].as_array().unwrap();
    let schema = parts
        .iter()
        .find(|p| p["kind"] == "postgres.database")
        .unwrap();
    assert_eq!(schema["format"], "pg_dump-custom-schema");
    assert!(schema["counts"]["app.bulk"] == 150000, "{schema:#}");
    let data: Vec<&serde_json::Value> = parts
        .iter()
        .filter(|p| p["kind"] == "postgres.table-data")
        .collect();
    // Every table its own part, as many as 3 jobs allow (6), the largest first, then the
    // rest.
    let tables = schema["counts"].as_object().unwrap().len().min(6);
    assert!(tables >= 3, "{schema:#}");
    assert_eq!(data.len(), tables + 1, "{manifest:#}");
    assert!(data.iter().all(|p| p["properties"]["of"] == schema["key"]));
    // A Job's log names every part of the split database, with what it holds.
    for part in data.iter().copied().chain([schema]) {
        let key = part["key"].as_str().unwrap();
        assert!(
            log.lines()
                .any(|line| line.contains(&format!("part {key} of"))),
            "no log line for {key}:\n{log}"
        );
    }
    assert_eq!(
        data[0]["properties"]["table"],
        serde_json::json!({"schema": "app", "name": "bulk"})
    );
    assert!(
        data[tables]["properties"]["table"].is_null(),
        "the rest comes last"
    );
    // The large tables' rows are COPY text (tests/parallel.rs reads awkward values back);
    // the rest is pg_dump's.
    assert!(data[..tables]
        .iter()
        .all(|p| p["format"] == "pg-copy-text" && p["properties"]["copy"]["encoding"] == "UTF8"));
    assert_eq!(data[tables]["format"], "pg_dump-custom-data");
    let mut show = kura();
    storage(&mut show);
    show.args(["show", "postgres", &id]);
    let shown = run(&mut show).assert_ok().all();
    assert!(shown.contains("rows of table app.bulk"), "{shown}");

    // Side by side through a scratch database.
    restore(&storage, &id, &target, &["--globals", "--jobs", "3"]).assert_ok();
    assert_same_database(&source, main, &target, main);
    // One transaction.
    let single = format!("{main}_one");
    restore(
        &storage,
        &id,
        &target,
        &["--database", &format!("{main}:{single}"), "--jobs", "1"],
    )
    .assert_ok();
    assert_same_database(&source, main, &target, &single);
    // Onto itself, changed, with --force: the foreign keys are dropped before the tables
    // they point at, as a whole archive's restore drops them.
    psql(
        &target,
        &single,
        "DELETE FROM app.payments; UPDATE app.bulk SET filler = 'changed'; DELETE FROM app.people;",
    );
    restore(
        &storage,
        &id,
        &target,
        &[
            "--database",
            &format!("{main}:{single}"),
            "--force",
            "--jobs",
            "3",
        ],
    )
    .assert_ok();
    // (Its grants are granted again, in another order: the same, but not the same text.)
    assert_same_contents(&source, main, &target, &single);
    // One table with a part of its own.
    let bulk = format!("{main}_bulk");
    restore(
        &storage,
        &id,
        &target,
        &[
            "--database",
            &format!("{main}:{bulk}"),
            "--table",
            "app.bulk",
        ],
    )
    .assert_ok();
    assert_eq!(
        psql(&target, &bulk, "SELECT count(*), sum(id) FROM app.bulk"),
        psql(&source, main, "SELECT count(*), sum(id) FROM app.bulk")
    );
    assert_eq!(
        psql(&target, &bulk, "SELECT to_regclass('app.people') IS NULL"),
        "t",
        "only the asked table"
    );
    let mut verify = kura();
    storage(&mut verify);
    verify
        .env("KURA_POSTGRES_URL", &target)
        .args(["verify", "postgres", &id, "--deep", "--jobs", "2"]);
    let verified = run(&mut verify);
    verified.assert_ok();
    assert!(
        verified.all().contains("counts match"),
        "{}",
        verified.all()
    );

    // The largest table's data damaged: neither path changes anything.
    let damaged = dir
        .path()
        .join("default/postgres")
        .join(&id)
        .join(data[0]["key"].as_str().unwrap());
    let good_part = std::fs::read(&damaged).unwrap();
    let mut bytes = good_part.clone();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&damaged, bytes).unwrap();
    let fresh = format!("{main}_bad");
    let failed = restore(
        &storage,
        &id,
        &target,
        &["--database", &format!("{main}:{fresh}"), "--jobs", "3"],
    );
    assert_eq!(failed.code, 5, "{}", failed.all());
    let message = failed.error_line()["message"].as_str().unwrap().to_string();
    assert!(
        message.contains(data[0]["key"].as_str().unwrap()),
        "{message}"
    );
    let scratch: Vec<String> = failed
        .stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|line| line["scratch"].as_str().map(str::to_string))
        .collect();
    assert_eq!(scratch.len(), 1, "{}", failed.all());
    assert_eq!(
        psql(
            &target,
            "postgres",
            &format!(
                "SELECT count(*) FROM pg_database WHERE datname IN ('{fresh}', '{}')",
                scratch[0]
            )
        ),
        "0",
        "neither the target nor the scratch database is left"
    );
    let forced = restore(
        &storage,
        &id,
        &target,
        &[
            "--database",
            &format!("{main}:{single}"),
            "--force",
            "--jobs",
            "1",
        ],
    );
    assert_eq!(forced.code, 5, "{}", forced.all());
    assert_same_contents(&source, main, &target, &single);
    // The rest of the data (with the large objects, which pg_restore would wrap in a
    // transaction of their own) damaged at its very end: still nothing changes.
    std::fs::write(&damaged, &good_part).unwrap();
    psql(&target, &single, "DELETE FROM app.people;");
    let rest = dir
        .path()
        .join("default/postgres")
        .join(&id)
        .join(data[tables]["key"].as_str().unwrap());
    let mut bytes = std::fs::read(&rest).unwrap();
    let last = bytes.len() - 2;
    bytes[last] ^= 0x40;
    std::fs::write(&rest, bytes).unwrap();
    let forced = restore(
        &storage,
        &id,
        &target,
        &[
            "--database",
            &format!("{main}:{single}"),
            "--force",
            "--jobs",
            "1",
        ],
    );
    assert_eq!(forced.code, 5, "{}", forced.all());
    assert_eq!(
        psql(&target, &single, "SELECT count(*) FROM app.people"),
        "0",
        "the failed restore changed the target"
    );

    // Backed up whole (manifest format 3, as earlier kura wrote it): the same paths.
    let whole_dir = tempfile::tempdir().unwrap();
    let whole_storage = file_storage(whole_dir.path());
    let whole = backup(
        &whole_storage,
        &source,
        &["--database", main, "--jobs", "3"],
    );
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            whole_dir
                .path()
                .join("default/postgres")
                .join(&whole)
                .join("manifest.json"),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["format_version"], 3, "{manifest:#}");
    assert!(manifest["parts"]
        .as_array()
        .unwrap()
        .iter()
        .all(|p| p["kind"] != "postgres.table-data"));
    let copy = format!("{main}_whole");
    restore(
        &whole_storage,
        &whole,
        &target,
        &["--database", &format!("{main}:{copy}"), "--jobs", "3"],
    )
    .assert_ok();
    assert_same_database(&source, main, &target, &copy);
    // --force onto the fixture's partitioned primary key, which pg_restore --clean alone
    // cannot drop (it drops the partitions' constraints before the parent's).
    psql(&target, &single, "DELETE FROM app.payments;");
    restore(
        &whole_storage,
        &whole,
        &target,
        &["--database", &format!("{main}:{single}"), "--force"],
    )
    .assert_ok();
    assert_same_contents(&source, main, &target, &single);
    let bulk = format!("{main}_wbulk");
    restore(
        &whole_storage,
        &whole,
        &target,
        &[
            "--database",
            &format!("{main}:{bulk}"),
            "--table",
            "app.bulk",
        ],
    )
    .assert_ok();
    assert_eq!(
        psql(&target, &bulk, "SELECT count(*), sum(id) FROM app.bulk"),
        psql(&source, main, "SELECT count(*), sum(id) FROM app.bulk")
    );
}

/// `--force --swap`: the existing database is replaced whole, by a rename in one
/// transaction, or not at all: refused while an application is connected (unless
/// `--terminate-sessions`), and a damaged part leaves it as it was.
#[test]
fn swap_replaces_an_existing_database_whole_or_not_at_all() {
    let url = require!("KURA_TEST_PG_URL");
    let db = unique("swap");
    create_database(&url, &db, "");
    psql(
        &url,
        &db,
        "CREATE TABLE t (id int PRIMARY KEY, v text); \
         INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 5000) g; CREATE INDEX t_v ON t (v);",
    );
    let dir = tempfile::tempdir().unwrap();
    let id = backup(file_storage(dir.path()), &url, &["--database", &db]);
    let live = format!("{db}_live");
    create_database(&url, &live, "");
    psql(
        &url,
        &live,
        "CREATE TABLE before (x int); INSERT INTO before VALUES (1);",
    );
    let swap = |extra: &[&str]| {
        let mut args = vec!["--database".to_string(), format!("{db}:{live}")];
        args.extend(["--force", "--swap"].map(String::from));
        args.extend(extra.iter().map(|a| a.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        restore(file_storage(dir.path()), &id, &url, &args)
    };
    // The scratch and replaced databases a run names in its log are gone after it.
    let left_behind = |run: &Run| -> Vec<String> {
        run.stdout
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .flat_map(|line| {
                ["scratch", "replaced"].map(|field| line[field].as_str().map(str::to_string))
            })
            .flatten()
            .filter(|name| {
                psql(
                    &url,
                    "postgres",
                    &format!("SELECT count(*) FROM pg_database WHERE datname = '{name}'"),
                ) != "0"
            })
            .collect()
    };

    // An application holds a session in the database to replace.
    let mut app = std::process::Command::new(common::pg_tool("psql"))
        .args(["-X", "-q", "-c", "SELECT pg_sleep(120)"])
        .envs(common::pg_env(&url, &live))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while psql(
        &url,
        "postgres",
        &format!("SELECT count(*) FROM pg_stat_activity WHERE datname = '{live}'"),
    ) != "1"
    {
        assert!(
            started.elapsed().as_secs() < 20,
            "the app session never connected"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let refused = swap(&[]);
    assert_eq!(refused.code, 7, "{}", refused.all());
    let message = refused.error_line()["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        message.contains(&live) && message.contains("--terminate-sessions"),
        "{message}"
    );
    assert_eq!(psql(&url, &live, "SELECT x FROM before"), "1", "untouched");

    // A damaged part: the swap never happens.
    let part = part_path(dir.path(), &id);
    let good = std::fs::read(&part).unwrap();
    let mut bad = good.clone();
    let middle = bad.len() / 2;
    bad[middle] ^= 0x40;
    std::fs::write(&part, &bad).unwrap();
    let failed = swap(&["--terminate-sessions"]);
    assert_eq!(failed.code, 5, "{}", failed.all());
    assert_eq!(psql(&url, &live, "SELECT x FROM before"), "1", "untouched");
    assert!(failed.all().contains("scratch"), "{}", failed.all());
    assert_eq!(left_behind(&failed), Vec::<String>::new());
    std::fs::write(&part, &good).unwrap();

    let swapped = swap(&["--terminate-sessions"]);
    swapped.assert_ok();
    assert!(swapped.all().contains("replaced"), "{}", swapped.all());
    let _ = app.kill();
    let _ = app.wait();
    assert_same_database(&url, &db, &url, &live);
    assert_eq!(
        psql(&url, &live, "SELECT to_regclass('before') IS NULL"),
        "t",
        "the old database is replaced whole, not merged into"
    );
    assert_eq!(left_behind(&swapped), Vec::<String>::new());
}
