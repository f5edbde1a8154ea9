//! `kura backup` for PostgreSQL: globals, then every selected database, each streamed through
//! the pipeline as its own part object. The caller writes the manifest after this returns.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use super::preflight::{self, DatabaseProps, ServerInfo};
use super::{Connection, Tools, DATABASE_KIND, GLOBALS_KIND};
use crate::catalog::{BackupId, Part};
use crate::engine::{BackupContext, BackupOutcome, Selection};
use crate::error::{Error, ErrorKind, Result};
use crate::pipeline::{self, Stored};
use crate::process::ChildProcess;
use crate::progress::{human_bytes, ProgressLine};

pub struct PostgresBackup {
    pub connection: Connection,
    pub selection: Selection,
    pub bin_dir: Option<PathBuf>,
    pub lock_wait_timeout: std::time::Duration,
}

/// Checked before anything is uploaded: the server answers, the tools fit, the selection exists.
pub struct Plan {
    pub info: ServerInfo,
    pub tools: Tools,
    pub databases: Vec<DatabaseProps>,
}

impl PostgresBackup {
    pub async fn plan(&self) -> Result<Plan> {
        // A malformed pattern is a usage error before anything connects.
        self.exclusions()?;
        let info = preflight::inspect(&self.connection).await?;
        let tools = Tools::locate(
            self.bin_dir.as_deref(),
            info.major,
            &format!("the server is PostgreSQL {}", info.major),
        )
        .await?;
        for wanted in &self.selection.include {
            if !info.databases.iter().any(|d| &d.name == wanted) {
                return Err(Error::not_found(format!(
                    "database {wanted:?} does not exist on {} (or is a template / refuses connections)",
                    self.connection.redacted()
                )));
            }
        }
        let databases = info
            .databases
            .iter()
            .filter(|d| self.selection.wants(&d.name))
            .cloned()
            .collect::<Vec<_>>();
        self.selection
            .check_planned(databases.len(), &self.connection.redacted())?;
        Ok(Plan {
            info,
            tools,
            databases,
        })
    }

    pub async fn run(
        &self,
        ctx: &BackupContext<'_>,
        id: &BackupId,
        plan: Plan,
    ) -> Result<BackupOutcome> {
        let Plan {
            info,
            tools,
            databases,
        } = plan;
        // On-disk size, a fair estimate of the dump: indexes are not dumped, but TOAST is compressed.
        let total = databases.iter().map(|d| d.size_bytes.max(0) as u64).sum();
        let line = ProgressLine::start("backing up", ctx.show_progress, Some(total));
        let mut parts = Vec::with_capacity(databases.len() + 1);

        let mut globals = self
            .connection
            .command(&tools.pg_dumpall, &self.connection.maintenance_database());
        globals.args(["--globals-only", "--no-password"]);
        if !info.is_superuser {
            // Password hashes live in pg_authid, which only superusers may read.
            tracing::warn!(
                user = %info.current_user,
                "not a superuser: roles are backed up without their passwords"
            );
            globals.arg("--no-role-passwords");
        }
        line.progress().set_label("globals");
        let name = "globals.sql.zst";
        let stored = self
            .dump(ctx, id, name, globals, "pg_dumpall", &line)
            .await
            .map_err(|e| {
                e.context("backing up roles and tablespaces (pg_dumpall --globals-only)")
            })?;
        parts.push(part(
            name,
            "globals",
            GLOBALS_KIND,
            "pg_dumpall-sql",
            &stored,
            ctx,
            serde_json::Value::Null,
        ));

        // Databases side by side, each from its own snapshot, as pg_dump would dump them one
        // by one; the parts keep the databases' order whatever order they finish in.
        let database_parts = crate::jobs::run_all(
            databases.iter().enumerate().collect(),
            ctx.jobs,
            &ctx.cancel,
            |(index, database), stop| {
                let ctx = ctx.with_cancel(stop);
                let (tools, line) = (&tools, &line);
                async move {
                    self.backup_database(&ctx, id, tools, index, database, line)
                        .await
                }
            },
        )
        .await?;
        parts.extend(database_parts);
        line.finish().await;
        Ok(BackupOutcome {
            server_version: info.version,
            tool_version: tools.version,
            parts,
        })
    }

    /// One database's part: its dump from an exported snapshot, with the rows counted in it.
    async fn backup_database(
        &self,
        ctx: &BackupContext<'_>,
        id: &BackupId,
        tools: &Tools,
        index: usize,
        database: &DatabaseProps,
        line: &ProgressLine,
    ) -> Result<Part> {
        let started = Instant::now();
        line.progress().set_label(&database.name);
        let snapshot =
            Snapshot::export(&self.connection, &database.name, self.lock_wait_timeout).await?;
        let mut dump = self.connection.command(&tools.pg_dump, &database.name);
        // Custom format: one snapshot per database, restorable table by table. pg_dump's own
        // compression is off because zstd does it better and faster downstream.
        dump.args(["--format=custom", "--compress=0", "--no-password"]);
        for pattern in &self.selection.exclude_tables {
            dump.arg(format!("--exclude-table={pattern}"));
        }
        for pattern in &self.selection.exclude_table_data {
            dump.arg(format!("--exclude-table-data={pattern}"));
        }
        dump.arg(format!(
            "--lock-wait-timeout={}",
            self.lock_wait_timeout.as_millis()
        ));
        dump.arg(format!("--snapshot={}", snapshot.id));
        let name = BackupContext::database_part_name(index, "pgdump");
        // Rows are counted in pg_dump's own snapshot while it runs, so `verify --deep` can
        // compare a restore with exactly what was dumped. The exporting transaction stays
        // open until pg_dump is done: its snapshot must outlive pg_dump's import of it.
        let dumping = self.dump(ctx, id, &name, dump, "pg_dump", line);
        let exclusions = self.exclusions()?;
        let counting = async {
            tokio::select! {
                counts = snapshot.count_rows(&exclusions) => counts,
                _ = ctx.cancel.cancelled() => Err(Error::interrupted()),
            }
        };
        tokio::pin!(dumping, counting);
        // A failed dump ends the database at once; the counts wait for nothing.
        let (stored, counts) = tokio::select! {
            stored = &mut dumping => match stored {
                Ok(stored) => (Ok(stored), counting.await),
                Err(e) => (Err(e), Ok(Default::default())),
            },
            counts = &mut counting => (dumping.await, counts),
        };
        let (stored, counts) = match (stored, counts) {
            (Ok(stored), Ok(counts)) => (stored, Some(counts)),
            // The dump is whole; only the counting queued behind another session's lock
            // request (a migration waiting for pg_dump). The counts are a check for
            // `verify --deep`, not part of the backup: keep the dump without them.
            (Ok(stored), Err(e)) if gave_up_on_a_lock(&e) => {
                tracing::warn!(database = %database.name, "counting the rows waited {} for a lock and gave up; the database is backed up without row counts, so verify --deep will only restore it", crate::config::format_duration(self.lock_wait_timeout));
                (stored, None)
            }
            (stored, counts) => {
                let err = match stored {
                    Err(e) => e.context(format!("backing up database {:?}", database.name)),
                    Ok(_) => counts
                        .expect_err("one failed")
                        .context(format!("counting the rows of database {:?}", database.name)),
                };
                let waited = started.elapsed();
                return Err(self
                    .explain_lock_wait(&database.name, err, waited, ctx)
                    .await);
            }
        };
        tracing::info!(
            database = %database.name,
            raw_bytes = stored.raw_bytes,
            stored_bytes = stored.stored.bytes,
            seconds = started.elapsed().as_secs_f64(),
            "database {:?} backed up: {} → {}",
            database.name,
            human_bytes(stored.raw_bytes),
            human_bytes(stored.stored.bytes),
        );
        let properties = serde_json::to_value(database)
            .map_err(|e| Error::failed(format!("encoding database properties: {e}")))?;
        let mut database_part = part(
            &name,
            &database.name,
            DATABASE_KIND,
            "pg_dump-custom",
            &stored,
            ctx,
            properties,
        );
        database_part.counts = counts;
        Ok(database_part)
    }

    async fn dump(
        &self,
        ctx: &BackupContext<'_>,
        id: &BackupId,
        name: &str,
        command: std::process::Command,
        tool: &'static str,
        line: &ProgressLine,
    ) -> Result<Stored> {
        let key = ctx.path.object_key(id, name);
        let mut child = ChildProcess::spawn(command, tool, false, true)?;
        let mut stdout = child.take_stdout().expect("stdout is piped");
        crate::process::enlarge_pipe(&stdout);
        // pg_dump waiting on a lock writes nothing, so the pipeline alone would not notice a
        // SIGTERM; stop it directly.
        let stopper = child.terminator(ctx.cancel.clone());
        let stored = pipeline::store_stream(
            ctx.store,
            &key,
            &ctx.pipeline,
            &ctx.cancel,
            Some(line.progress()),
            move |out: &mut dyn Write| {
                let copied = pipeline::copy_large(&mut stdout, out);
                // A dump tool that dies closes its stdout (the copy ends) and its exit status
                // says why; a copy error is ours: compression failed, or the upload stopped.
                if let Err(e) = copied {
                    child.kill();
                    if pipeline::is_upload_stopped_io(&e) {
                        return Err(Error::upload_stopped());
                    }
                    return Err(Error::with_source(
                        ErrorKind::Failed,
                        format!("compressing {tool} output"),
                        e,
                    ));
                }
                child.wait_success().map(|_| ())
            },
        )
        .await;
        stopper.abort();
        stored
    }
}

impl PostgresBackup {
    fn exclusions(&self) -> Result<super::TableExclusions> {
        super::TableExclusions::parse(
            &self.selection.exclude_tables,
            &self.selection.exclude_table_data,
        )
    }

    /// A dump that failed after `--lock-wait-timeout` while another session holds an ACCESS
    /// EXCLUSIVE lock in the database (the one lock mode that blocks pg_dump's ACCESS SHARE)
    /// gave up waiting for it: say which session holds it, from the catalog, not from
    /// pg_dump's translated text.
    async fn explain_lock_wait(
        &self,
        database: &str,
        err: Error,
        waited: std::time::Duration,
        ctx: &BackupContext<'_>,
    ) -> Error {
        if waited < self.lock_wait_timeout
            || ctx.cancel.is_cancelled()
            || pipeline::is_upload_stopped(&err)
            || !gave_up_on_a_lock(&err)
        {
            return err;
        }
        let holders = match lock_holders(&self.connection, database).await {
            Ok(holders) if !holders.is_empty() => holders,
            Ok(_) => return err,
            Err(e) => {
                tracing::debug!(error = %e.chain(), "could not look for lock holders");
                return err;
            }
        };
        Error::with_source(
            ErrorKind::Failed,
            format!(
                "backing up database {database:?}: pg_dump waited {} for a table lock and gave up: {}; end that session (pg_terminate_backend) or raise --lock-wait-timeout / KURA_LOCK_WAIT_TIMEOUT",
                crate::config::format_duration(self.lock_wait_timeout),
                holders.join("; ")
            ),
            err,
        )
    }
}

/// Whether `err` is a lock wait that timed out: pg_dump failing on its `LOCK TABLE` (its
/// "Query was:" detail quotes the SQL, which is never translated), or a query of kura's own
/// failing with SQLSTATE 55P03 (lock_not_available).
fn gave_up_on_a_lock(err: &Error) -> bool {
    if crate::process::ToolFailure::find(err).is_some_and(|f| f.stderr.contains("LOCK TABLE ")) {
        return true;
    }
    let mut next: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(err);
    while let Some(cause) = next {
        if let Some(db) = cause.downcast_ref::<tokio_postgres::Error>() {
            if db.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) {
                return true;
            }
        }
        next = cause.source();
    }
    false
}

/// Sessions holding an ACCESS EXCLUSIVE lock on a relation of `database`, described for people.
async fn lock_holders(connection: &Connection, database: &str) -> Result<Vec<String>> {
    // A fresh session: pg_stat_activity is read once per transaction, and the snapshot's
    // transaction is too old to see the present.
    let client = connection.connect(database).await?;
    let rows = client
        .query(
            "SELECT a.pid, coalesce(a.usename::text, '?'), coalesce(a.application_name, ''),                     coalesce(a.state, '?'),                     coalesce(to_char(coalesce(a.xact_start, a.backend_start) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), 'an unknown time'),                     string_agg(DISTINCT coalesce(l.relation::regclass::text, l.relation::text), ', ')              FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid              WHERE l.granted AND l.locktype = 'relation' AND l.mode = 'AccessExclusiveLock'                AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())                AND a.pid <> pg_backend_pid()              GROUP BY 1, 2, 3, 4, 5 ORDER BY 5, 1",
            &[],
        )
        .await
        .map_err(|e| preflight::query_error(connection, "looking for sessions holding locks", e))?;
    Ok(rows
        .iter()
        .map(|row| {
            format!(
                "session pid {} (user {}, application {:?}, {} since {}) holds an ACCESS EXCLUSIVE lock on {}",
                row.get::<_, i32>(0),
                row.get::<_, String>(1),
                row.get::<_, String>(2),
                row.get::<_, String>(3),
                row.get::<_, String>(4),
                row.get::<_, String>(5),
            )
        })
        .collect())
}

fn part(
    key: &str,
    name: &str,
    kind: &str,
    format: &str,
    stored: &Stored,
    ctx: &BackupContext<'_>,
    properties: serde_json::Value,
) -> Part {
    Part {
        key: key.to_string(),
        name: name.to_string(),
        kind: kind.to_string(),
        format: format.to_string(),
        raw_bytes: stored.raw_bytes,
        stored_bytes: stored.stored.bytes,
        sha256: stored.stored.sha256.clone(),
        compression: ctx.compression(),
        encryption: ctx.encryption(),
        properties,
        counts: None,
    }
}

/// A transaction whose snapshot pg_dump imports (`--snapshot`), kept open while in use.
struct Snapshot {
    client: tokio_postgres::Client,
    id: String,
}

impl Snapshot {
    async fn export(
        connection: &Connection,
        database: &str,
        lock_wait_timeout: std::time::Duration,
    ) -> Result<Snapshot> {
        let client = connection.connect(database).await?;
        let failed = |e: tokio_postgres::Error| {
            Error::with_source(
                ErrorKind::Database,
                format!("cannot export a snapshot of database {database:?} for pg_dump"),
                e,
            )
        };
        // Named apart from pg_dump's own session, so a DBA looking at pg_stat_activity (or a
        // test terminating pg_dump) can tell the two apart.
        // pg_dump lifts these limits for its own session; the counts must not trip on a
        // role's or database's statement_timeout where the dump would not, and wait for
        // locks as long as pg_dump does.
        let setup = format!(
            "SET application_name = 'kura snapshot'; SET statement_timeout = 0; \
             SET lock_timeout = {}; SET idle_in_transaction_session_timeout = 0; \
             BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
            lock_wait_timeout.as_millis()
        );
        client.batch_execute(&setup).await.map_err(failed)?;
        let id: String = client
            .query_one("SELECT pg_export_snapshot()", &[])
            .await
            .map_err(failed)?
            .get(0);
        Ok(Snapshot { client, id })
    }

    /// Counted in the snapshot; the transaction stays open until the value is dropped.
    async fn count_rows(
        &self,
        exclusions: &super::TableExclusions,
    ) -> Result<std::collections::BTreeMap<String, u64>> {
        super::count_rows(&self.client, exclusions).await
    }
}
