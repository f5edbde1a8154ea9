//! What a new user meets first, through the real binary: exit codes that tell a Job the truth,
//! typos that are errors rather than empty stores, a new tenant's first backup, `--table`
//! names that are not in the backup, JSON mode that is JSON on every stdout line, and plain
//! text when nobody is at a terminal.

mod common;

use std::path::Path;
use std::process::Command;

use common::{kura, psql, run, unique, Run};
use serde_json::Value;

fn file_storage(dir: &Path) -> String {
    format!("file://{}", dir.display())
}

/// The URL without its password, as a ConfigMap would hold it.
fn without_password(url: &str) -> String {
    let mut parsed = url::Url::parse(url).unwrap();
    parsed.set_password(None).unwrap();
    parsed.to_string()
}

/// Every file below `dir` (none when it does not exist).
fn files_under(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                found.extend(files_under(&path));
            } else {
                found.push(path.display().to_string());
            }
        }
    }
    found
}

/// A new database holding one small table, so a restore into it counts as "holds data".
fn database_with_a_table(pg: &str, prefix: &str) -> String {
    let db = unique(prefix);
    psql(pg, "postgres", &format!("CREATE DATABASE {db}"));
    psql(
        pg,
        &db,
        "CREATE TABLE t (x int); INSERT INTO t VALUES (1), (2);",
    );
    db
}

fn assert_exit(run: &Run, code: i32, kind: &str) -> String {
    assert_eq!(run.code, code, "expected exit {code}:\n{}", run.all());
    let line = run.error_line();
    assert_eq!(line["exit_code"], code, "{line}");
    assert_eq!(line["error_kind"], kind, "{line}");
    line["message"].as_str().unwrap().to_string()
}

#[test]
fn a_missing_password_is_a_configuration_error_that_names_the_variable() {
    let pg = require!("KURA_TEST_PG_URL");
    let couch = require!("KURA_TEST_COUCH_URL");
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().join("backups");

    let missing = run(kura()
        .env("KURA_STORAGE", file_storage(&storage))
        .env("KURA_POSTGRES_URL", without_password(&pg))
        .args(["backup", "postgres"]));
    let message = assert_exit(&missing, 2, "usage");
    assert!(message.contains("KURA_POSTGRES_PASSWORD"), "{message}");
    assert_eq!(
        files_under(&storage),
        Vec::<String>::new(),
        "a backup that failed its preflight wrote to storage (a lock, a part)"
    );

    // The same variable fixes it.
    let password = url::Url::parse(&pg)
        .unwrap()
        .password()
        .unwrap()
        .to_string();
    let db = unique("fc_pw");
    psql(&pg, "postgres", &format!("CREATE DATABASE {db}"));
    run(kura()
        .env("KURA_STORAGE", file_storage(&storage))
        .env("KURA_POSTGRES_URL", without_password(&pg))
        .env("KURA_POSTGRES_PASSWORD", &password)
        .args(["backup", "postgres", "--database", &db]))
    .assert_ok();
    psql(&pg, "postgres", &format!("DROP DATABASE {db}"));

    let couch_missing = run(kura()
        .env("KURA_STORAGE", file_storage(&storage))
        .env("KURA_COUCHDB_URL", without_password(&couch))
        .args(["backup", "couchdb"]));
    let message = assert_exit(&couch_missing, 2, "usage");
    assert!(message.contains("KURA_COUCHDB_PASSWORD"), "{message}");

    // wait-for gives up at once: waiting cannot make a password appear.
    let started = std::time::Instant::now();
    let waited = run(kura().args([
        "wait-for",
        "postgres",
        &without_password(&pg),
        "--timeout",
        "1m",
    ]));
    let message = assert_exit(&waited, 2, "usage");
    assert!(message.contains("KURA_POSTGRES_PASSWORD"), "{message}");
    assert!(
        started.elapsed().as_secs() < 20,
        "wait-for retried a configuration error"
    );
}

#[test]
fn exit_codes_separate_configuration_from_what_a_retry_can_fix() {
    let pg = require!("KURA_TEST_PG_URL");
    let dir = tempfile::tempdir().unwrap();
    let storage = file_storage(dir.path());

    // A URL naming a database that does not exist: retrying cannot create it.
    let no_db = run(kura()
        .env("KURA_STORAGE", &storage)
        .env(
            "KURA_POSTGRES_URL",
            common::with_database(&pg, "no_such_database_kura"),
        )
        .args(["backup", "postgres"]));
    let message = assert_exit(&no_db, 2, "usage");
    assert!(
        message.contains("no_such_database_kura") && message.contains("does not exist"),
        "{message}"
    );

    // A rejected password may be a Secret being rotated: retry later (4).
    let mut wrong = url::Url::parse(&pg).unwrap();
    wrong.set_password(Some("not-the-password")).unwrap();
    let rejected = run(kura()
        .env("KURA_STORAGE", &storage)
        .env("KURA_POSTGRES_URL", wrong.as_str())
        .args(["backup", "postgres"]));
    let message = assert_exit(&rejected, 4, "database");
    assert!(
        message.contains("password authentication failed"),
        "{message}"
    );
    assert!(!rejected.all().contains("not-the-password"));

    // Nothing listening: retry later (4).
    let closed = run(kura()
        .env("KURA_STORAGE", &storage)
        .env("KURA_POSTGRES_URL", "postgres://u:pw@127.0.0.1:9/postgres")
        .args(["backup", "postgres"]));
    assert_exit(&closed, 4, "database");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "no failed run wrote to storage"
    );
}

#[test]
fn commands_that_read_never_create_a_missing_storage_directory() {
    let dir = tempfile::tempdir().unwrap();
    let typo = dir.path().join("backpus");
    let storage = file_storage(&typo);
    let id = "20261128T020304Z-a1b2c3";
    let commands: Vec<Vec<&str>> = vec![
        vec!["list"],
        vec!["list", "postgres"],
        vec!["show", "postgres", "latest"],
        vec![
            "restore",
            "postgres",
            id,
            "--to",
            "postgres://u:pw@127.0.0.1:9/postgres",
        ],
        vec!["verify", "postgres", "latest"],
        vec!["status", "postgres"],
        vec!["prune", "postgres", "--keep-last", "1"],
        vec!["prune", "postgres", "--keep-last", "1", "--dry-run"],
        vec!["unlock", "postgres", "--force"],
    ];
    for args in commands {
        let result = run(kura().env("KURA_STORAGE", &storage).args(&args));
        let message = assert_exit(&result, 6, "not_found");
        assert!(
            message.contains(&typo.display().to_string()),
            "{args:?}: {message}"
        );
        assert!(!typo.exists(), "{args:?} created {}", typo.display());
    }

    // The default storage is ./kura-backups: a bare `kura list` must not leave one behind.
    let cwd = tempfile::tempdir().unwrap();
    let bare = run(kura().current_dir(cwd.path()).arg("list"));
    assert_exit(&bare, 6, "not_found");
    assert_eq!(
        std::fs::read_dir(cwd.path()).unwrap().count(),
        0,
        "kura list left something in the working directory"
    );

    // A source that has nothing stored and is not configured is a typo too.
    std::fs::create_dir(&typo).unwrap();
    let unknown = run(kura()
        .env("KURA_STORAGE", &storage)
        .args(["list", "postgress"]));
    let message = assert_exit(&unknown, 6, "not_found");
    assert!(message.contains("postgress"), "{message}");
}

#[tokio::test]
async fn a_couchdb_server_without_databases_backs_up_as_complete_and_empty() {
    let npm = require!("KURA_TEST_NPM_BIN");
    let dir = tempfile::tempdir().unwrap();
    let (mut server, url) = common::start_private_pouchdb(&npm, dir.path()).await;
    let backups = tempfile::tempdir().unwrap();
    let couch = |args: &[&str]| {
        run(kura()
            .env("KURA_STORAGE", file_storage(backups.path()))
            .env("KURA_COUCHDB_URL", &url)
            .args(args))
    };
    let backed_up = couch(&["backup", "couchdb"]);
    backed_up.assert_ok();
    let id = backed_up.backup_id();
    assert!(
        backed_up
            .stdout
            .lines()
            .any(|l| l.contains("\"WARN\"") && l.contains("no databases")),
        "a warning says the backup is empty:\n{}",
        backed_up.all()
    );
    let listed = couch(&["list", "couchdb", "--json"]);
    listed.assert_ok();
    let rows = listed.records();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["backup_id"], id.as_str());
    assert_eq!(rows[0]["status"], "complete");
    assert_eq!(rows[0]["parts"], 0);
    couch(&["verify", "couchdb", "latest"]).assert_ok();
    couch(&["status", "couchdb", "--max-age", "1h"]).assert_ok();

    // Naming a database that is not there stays an error.
    let named = couch(&["backup", "couchdb", "--database", "orders"]);
    let message = assert_exit(&named, 6, "not_found");
    assert!(message.contains("orders"), "{message}");
    server.kill().unwrap();
    let _ = server.wait();
}

#[test]
fn restoring_a_table_the_backup_lacks_names_it_and_creates_nothing() {
    let pg = require!("KURA_TEST_PG_URL");
    let db = unique("fc_table");
    psql(&pg, "postgres", &format!("CREATE DATABASE {db}"));
    psql(
        &pg,
        &db,
        "CREATE TABLE public.orders (id int PRIMARY KEY);
         INSERT INTO public.orders SELECT generate_series(1, 100);
         CREATE SCHEMA sales; CREATE TABLE sales.orders (id int);
         CREATE VIEW public.order_totals AS SELECT count(*) FROM public.orders;",
    );
    let dir = tempfile::tempdir().unwrap();
    let with = |command: &mut Command| {
        command
            .env("KURA_STORAGE", file_storage(dir.path()))
            .env("KURA_POSTGRES_URL", &pg);
    };
    let mut backup = kura();
    with(&mut backup);
    run(backup.args(["backup", "postgres", "--database", &db])).assert_ok();

    let target = format!("{db}_t");
    let mut restore = kura();
    with(&mut restore);
    let missing = run(restore.args([
        "restore",
        "postgres",
        "latest",
        "--database",
        &format!("{db}:{target}"),
        "--table",
        "public.ordres",
    ]));
    let message = assert_exit(&missing, 6, "not_found");
    assert!(message.contains("public.ordres"), "{message}");
    assert!(
        message.contains("public.orders") && message.contains("sales.orders"),
        "near matches: {message}"
    );
    let exists = psql(
        &pg,
        "postgres",
        &format!("SELECT count(*) FROM pg_database WHERE datname = '{target}'"),
    );
    assert_eq!(
        exists, "0",
        "the refused restore created the target database"
    );

    // Tables of two schemas in one run would make pg_restore pick the cross product.
    let mut restore = kura();
    with(&mut restore);
    let mixed = run(restore.args([
        "restore",
        "postgres",
        "latest",
        "--database",
        &format!("{db}:{target}"),
        "--table",
        "public.orders",
        "--table",
        "sales.orders",
    ]));
    let message = assert_exit(&mixed, 2, "usage");
    assert!(message.contains("one schema per run"), "{message}");

    // A view has no row count in the manifest; the archive's table of contents knows it.
    let mut restore = kura();
    with(&mut restore);
    run(restore.args([
        "restore",
        "postgres",
        "latest",
        "--database",
        &format!("{db}:{target}"),
        "--table",
        "public.orders",
        "--table",
        "public.order_totals",
    ]))
    .assert_ok();
    assert_eq!(
        psql(&pg, &target, "SELECT count(*) FROM public.orders"),
        "100"
    );
    psql(&pg, "postgres", &format!("DROP DATABASE {target}"));
    psql(&pg, "postgres", &format!("DROP DATABASE {db}"));
}

#[test]
fn json_mode_prints_only_json_lines_on_stdout() {
    let pg = require!("KURA_TEST_PG_URL");
    let db = database_with_a_table(&pg, "fc_json");
    let dir = tempfile::tempdir().unwrap();
    let kura_here = || {
        let mut command = kura();
        command
            .env("KURA_STORAGE", file_storage(dir.path()))
            .env("KURA_POSTGRES_URL", &pg);
        command
    };
    let every_line_is_json = |run: &Run, what: &str| {
        assert!(!run.stdout.trim().is_empty(), "{what} printed nothing");
        for line in run.stdout.lines() {
            let value: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{what}: stdout line is not JSON ({e}): {line:?}"));
            assert!(value.is_object(), "{what}: {line}");
        }
    };
    for _ in 0..2 {
        let backed_up = run(kura_here().args(["backup", "postgres", "--database", &db]));
        backed_up.assert_ok();
        every_line_is_json(&backed_up, "backup");
    }
    for (args, records) in [
        (vec!["list", "--json"], 2),
        (vec!["show", "postgres", "latest", "--json"], 1),
        (vec!["prune", "--keep-last", "1", "--dry-run", "--json"], 1),
        (vec!["status", "--max-age", "1h", "--json"], 1),
    ] {
        let result = run(kura_here().args(&args));
        result.assert_ok();
        every_line_is_json(&result, &args.join(" "));
        assert_eq!(
            result.records().len(),
            records,
            "{args:?}:\n{}",
            result.stdout
        );
    }
    // Without --json the tables are for people: on stderr, never mixed into stdout.
    for args in [
        vec!["list"],
        vec!["show", "postgres", "latest"],
        vec!["prune", "--keep-last", "1", "--dry-run"],
    ] {
        let result = run(kura_here().args(&args));
        result.assert_ok();
        assert!(
            result.records().is_empty(),
            "{args:?} printed records without --json"
        );
        assert!(
            result.stderr.contains("BACKUP ID") || result.stderr.contains("backup "),
            "{args:?}: {}",
            result.stderr
        );
    }
    // A usage error too: one JSON line with the kind and exit code, whether JSON was asked
    // for by the environment or by the flag.
    for usage in [
        vec!["list", "--no-such-flag"],
        vec!["show"],
        vec!["--log-format", "json", "restore", "postgres"],
    ] {
        let result = run(kura().args(&usage));
        assert_eq!(result.code, 2, "{usage:?}: {}", result.all());
        every_line_is_json(&result, &format!("{usage:?}"));
        let line = result.error_line();
        assert_eq!(line["error_kind"], "usage");
        assert_eq!(line["exit_code"], 2);
        let message = line["message"].as_str().unwrap();
        assert!(
            !message.contains("--log-format <"),
            "env makes no flag look required: {message}"
        );
    }
    psql(&pg, "postgres", &format!("DROP DATABASE {db}"));
}

#[test]
fn text_logs_to_a_pipe_have_no_escape_codes() {
    let pg = require!("KURA_TEST_PG_URL");
    let db = database_with_a_table(&pg, "fc_text");
    let dir = tempfile::tempdir().unwrap();
    let text = |args: &[&str], no_color: bool| {
        let mut command = kura();
        command
            .env("KURA_LOG_FORMAT", "text")
            .env("KURA_STORAGE", file_storage(dir.path()))
            .env("KURA_POSTGRES_URL", &pg)
            .args(args);
        if no_color {
            command.env("NO_COLOR", "1");
        }
        run(&mut command)
    };
    let mapping = format!("{db}:{db}_r");
    // The first restore creates the target, the second is refused: both say so in text.
    let restore = ["restore", "postgres", "latest", "--database", &mapping];
    for no_color in [false, true] {
        for result in [
            text(&["backup", "postgres", "--database", &db], no_color),
            text(&["verify", "postgres", "latest"], no_color),
            text(&restore, no_color),
            text(&["list", "--bogus"], no_color),
            text(&restore, no_color),
        ] {
            assert!(
                !result.all().contains("\x1b["),
                "escape codes in:\n{}",
                result.all()
            );
            assert!(
                result.stderr.contains("INFO")
                    || result.stderr.contains("ERROR")
                    || result.stderr.contains("error:"),
                "{}",
                result.all()
            );
        }
    }
    let refused = text(&restore, false);
    assert_eq!(refused.code, 7);
    assert!(
        refused.stderr.contains("already holds data"),
        "{}",
        refused.stderr
    );
    psql(&pg, "postgres", &format!("DROP DATABASE {db}_r"));
    psql(&pg, "postgres", &format!("DROP DATABASE {db}"));
}

#[test]
fn help_lists_a_commands_own_options_before_the_global_ones() {
    for command in [
        "backup", "restore", "list", "show", "prune", "verify", "status", "wait-for", "schedule",
        "unlock",
    ] {
        let help = run(kura().args([command, "--help"]));
        help.assert_ok();
        let text = help.stdout;
        let own = text
            .find("Options:")
            .unwrap_or_else(|| panic!("{command}: no Options:\n{text}"));
        let global = text
            .find("Global options:")
            .unwrap_or_else(|| panic!("{command}: no Global options:\n{text}"));
        assert!(own < global, "{command}: own options first\n{text}");
        assert!(
            !text[..global].contains("--storage"),
            "{command}: --storage among its own options"
        );
        // Every positional argument says what it is.
        if let Some(start) = text.find("Arguments:") {
            for line in text[start..own].lines().skip(1).filter(|l| {
                // `<SOURCE>` or `[SOURCE]`, not a continuation such as `[possible values: …]`.
                let l = l.trim_start();
                l.starts_with('<')
                    || (l.starts_with('[') && l[1..].starts_with(|c: char| c.is_ascii_uppercase()))
            }) {
                let described = line
                    .trim()
                    .split_once("  ")
                    .is_some_and(|(_, d)| !d.trim().is_empty());
                assert!(described, "{command}: undescribed argument {line:?}");
            }
        }
    }
}
