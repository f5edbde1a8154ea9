//! `kura restore` for PostgreSQL.
//!
//! Each database is restored in one transaction that is committed only after the whole part
//! object was read and its size and SHA-256 matched the manifest:
//!
//! ```text
//! object → verify + zstd → pg_restore --file=- --single-transaction → (hold back COMMIT) → psql
//! ```
//! pg_restore turns the archive into a script wrapped in BEGIN … COMMIT. kura forwards it to
//! psql but withholds the final `COMMIT;` until the object is verified; if anything fails, psql
//! is stopped and the server rolls the transaction back, so the target is left as it was. A
//! database kura created for the restore is dropped again on failure.
//!
//! A large table's rows kept as COPY text ([`super::COPY_FORMAT`]) go to the server by kura's
//! own `COPY … FROM STDIN` when loaded side by side, and into psql's session, after a
//! `COPY … FROM stdin;` line, on the one-transaction path; the COMMIT waits the same way.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::os::unix::ffi::OsStringExt;

use futures::SinkExt;
use std::path::PathBuf;
use std::process::{ChildStdin, ChildStdout, Command};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::postdata::PostData;
use super::preflight::{query_error, DatabaseProps};
use super::{
    quote_ident, Connection, CopyText, DataPiece, TableName, Tools, COPY_FORMAT, DATABASE_KIND,
    DATA_FORMAT, GLOBALS_KIND, SCHEMA_FORMAT, TABLE_DATA_KIND,
};
use crate::catalog::{Manifest, Part};
use crate::engine::{select_parts, DatabaseMapping, RestoreContext};
use crate::error::{Error, ErrorKind, Result};
use crate::pipeline;
use crate::process::{ChildProcess, ToolFailure};
use crate::progress::{human_bytes, Progress, ProgressLine};

pub struct PostgresRestore {
    pub target: Connection,
    /// Databases to restore; empty means all in the backup, under their own names.
    pub databases: Vec<DatabaseMapping>,
    /// `schema.table` entries: restore only these tables (of the one selected database).
    pub tables: Vec<String>,
    pub globals: bool,
    pub force: bool,
    /// Replace an existing database by restoring beside it and swapping (`--swap`).
    pub swap: bool,
    /// End the replaced database's other sessions instead of refusing.
    pub terminate_sessions: bool,
    pub bin_dir: Option<PathBuf>,
}

/// One database to restore, decided before anything is touched.
struct Step<'m> {
    /// The whole database, or the schema of a split one.
    part: &'m Part,
    /// The data parts of a split database, in the backup's order; empty for a whole one.
    data: Vec<(&'m Part, DataPiece)>,
    props: DatabaseProps,
    target: String,
    exists: bool,
}

impl Step<'_> {
    fn stored_bytes(&self) -> u64 {
        self.part.stored_bytes + self.data.iter().map(|(p, _)| p.stored_bytes).sum::<u64>()
    }

    fn raw_bytes(&self) -> u64 {
        self.part.raw_bytes + self.data.iter().map(|(p, _)| p.raw_bytes).sum::<u64>()
    }

    /// The data parts a restore of `tables` (all when empty) needs: the table's own part,
    /// and the rest, which holds every table without one.
    fn data_for<'s>(&'s self, tables: &[(String, String)]) -> Vec<&'s (&'s Part, DataPiece)> {
        self.data
            .iter()
            .filter(|(_, piece)| match &piece.table {
                None => true,
                Some(t) => {
                    tables.is_empty() || tables.iter().any(|(s, n)| *s == t.schema && *n == t.name)
                }
            })
            .collect()
    }
}

#[derive(Debug, Default)]
pub struct RestoreSummary {
    pub databases: Vec<String>,
    pub globals: bool,
    pub raw_bytes: u64,
    pub warnings: usize,
}

impl PostgresRestore {
    pub async fn run(
        &self,
        ctx: &RestoreContext<'_>,
        manifest: &Manifest,
    ) -> Result<RestoreSummary> {
        let maintenance = self.target.maintenance_database();
        let client = self.target.connect(&maintenance).await?;
        let row = client
            .query_one(
                "SELECT current_setting('server_version_num')::int, current_user::text",
                &[],
            )
            .await
            .map_err(|e| query_error(&self.target, "reading the server version", e))?;
        let server_major = (row.get::<_, i32>(0) / 10000) as u32;
        let current_user: String = row.get(1);
        // pg_restore must read the archive version pg_dump wrote, and psql must speak to the target.
        let dump_major = manifest
            .tool_version
            .split_whitespace()
            .find_map(|w| w.split('.').next()?.parse::<u32>().ok())
            .unwrap_or(0);
        let tools = Tools::locate(
            self.bin_dir.as_deref(),
            server_major.max(dump_major),
            &format!(
                "the target server is PostgreSQL {server_major} and the backup was written by pg_dump {dump_major}"
            ),
        )
        .await?;

        let steps = self.plan(&client, manifest).await?;
        let tables = parse_tables(&self.tables)?;
        if !tables.is_empty() && steps.len() != 1 {
            return Err(Error::usage(
                "--table needs exactly one --database: name the database the tables belong to",
            ));
        }
        // pg_restore selects by schema and by table name separately: `-n a -n b -t x -t y`
        // would also restore (and with --force drop) a.y and b.x.
        let mut schemas: Vec<&str> = tables.iter().map(|(schema, _)| schema.as_str()).collect();
        schemas.sort();
        schemas.dedup();
        if schemas.len() > 1 {
            return Err(Error::usage(format!(
                "--table names tables of several schemas ({}): restore the tables of one schema per run, since pg_restore would also pick same-named tables of the other schemas",
                schemas.join(", ")
            )));
        }

        if !tables.is_empty() {
            if self.swap {
                return Err(Error::usage(
                    "--swap replaces whole databases; --table restores tables into the existing one: use one or the other",
                ));
            }
            check_tables_in_backup(ctx, &self.target, &steps[0], &tools, &tables).await?;
        }
        if self.swap && !self.terminate_sessions {
            for step in steps.iter().filter(|s| s.exists) {
                let sessions = other_sessions(&client, &self.target, &step.target).await?;
                if !sessions.is_empty() {
                    return Err(busy(&step.target, &sessions));
                }
            }
        }

        // Refuse before touching anything, and name every target that is in the way.
        let mut occupied = Vec::new();
        let roles = existing_roles(&client, &self.target).await?;
        for step in &steps {
            if step.exists {
                let db = self.target.connect(&step.target).await?;
                let in_use = if tables.is_empty() {
                    user_object_count(&db, &self.target).await? > 0
                } else {
                    existing_tables(&db, &self.target, &tables).await?
                };
                if in_use && !self.force {
                    occupied.push(step.target.clone());
                }
            } else if !self.globals && !roles.contains(&step.props.owner) {
                return Err(Error::usage(format!(
                    "role {:?}, owner of database {:?}, does not exist on {}: add --globals to restore roles first, or create the role",
                    step.props.owner,
                    step.part.name,
                    self.target.redacted()
                )));
            }
        }
        if !occupied.is_empty() {
            let databases = crate::engine::name_databases(&occupied);
            let what = match (tables.is_empty(), occupied.len()) {
                (true, 1) => format!("{databases} already holds data"),
                (true, _) => format!("{databases} already hold data"),
                (false, _) => format!("the table(s) to restore already exist in {databases}"),
            };
            return Err(Error::new(
                ErrorKind::TargetNotEmpty,
                format!(
                    "refusing to restore: {what} on {}; restore under another name with --database SRC:DST, or pass --force to replace the objects in the backup",
                    self.target.redacted()
                ),
            ));
        }

        let mut summary = RestoreSummary::default();
        let globals_bytes: u64 = match self.globals {
            true => manifest
                .parts
                .iter()
                .filter(|p| p.kind == GLOBALS_KIND)
                .map(|p| p.stored_bytes)
                .sum(),
            false => 0,
        };
        let total = steps.iter().map(Step::stored_bytes).sum::<u64>() + globals_bytes;
        let line = ProgressLine::start("restoring", ctx.show_progress, Some(total));
        if self.globals {
            let part = manifest
                .parts
                .iter()
                .find(|p| p.kind == GLOBALS_KIND)
                .ok_or_else(|| Error::not_found("this backup has no globals part"))?;
            line.progress().set_label("globals");
            self.restore_globals(ctx, part, &tools, &current_user, &roles, line.progress())
                .await
                .map_err(|e| e.context("restoring roles and tablespaces"))?;
            summary.globals = true;
            tracing::info!("roles and tablespaces restored");
        }
        line.expect(steps.len(), "databases");

        // Databases side by side; each is still one transaction, committed on its own. The
        // index builds of all of them share one budget of --jobs statements.
        let budget = Semaphore::new(ctx.jobs);
        let restored = crate::jobs::run_all(steps, ctx.jobs, &ctx.cancel, |step, stop| {
            let ctx = ctx.with_cancel(stop);
            let (client, tools, tables, line, budget) = (&client, &tools, &tables, &line, &budget);
            async move {
                self.restore_step(
                    &ctx,
                    client,
                    step,
                    tools,
                    tables,
                    server_major,
                    line,
                    budget,
                )
                .await
            }
        })
        .await?;
        for (target, raw_bytes, warnings) in restored {
            summary.raw_bytes += raw_bytes;
            summary.warnings += warnings;
            summary.databases.push(target);
        }
        line.finish().await;
        Ok(summary)
    }

    /// One database: created unless it exists, restored in one transaction, its properties
    /// set; a database it created is dropped again if the restore fails. Returns the target,
    /// the bytes restored and the warnings.
    #[allow(clippy::too_many_arguments)]
    async fn restore_step(
        &self,
        ctx: &RestoreContext<'_>,
        client: &tokio_postgres::Client,
        step: Step<'_>,
        tools: &Tools,
        tables: &[(String, String)],
        server_major: u32,
        line: &ProgressLine,
        budget: &Semaphore,
    ) -> Result<(String, u64, usize)> {
        let mut warnings = 0;
        check_cancel(ctx)?;
        let started = Instant::now();
        let job = line.job(&step.target, Some(step.stored_bytes()));
        let through_scratch = match step.exists {
            false => ctx.jobs > 1,
            true => self.swap,
        };
        if through_scratch && tables.is_empty() {
            warnings += self
                .restore_through_scratch(
                    ctx,
                    client,
                    &step,
                    tools,
                    server_major,
                    line,
                    &job,
                    budget,
                )
                .await?;
        } else {
            let created = if step.exists {
                false
            } else {
                let owner_exists = existing_roles(client, &self.target)
                    .await?
                    .contains(&step.props.owner);
                let sql = step.props.create_statement(&step.target, owner_exists);
                client.batch_execute(&sql).await.map_err(|e| {
                    query_error(
                        &self.target,
                        &format!("creating database {:?}", step.target),
                        e,
                    )
                })?;
                true
            };
            let result = match step.data.is_empty() {
                true => {
                    self.restore_database(ctx, &step, tools, tables, server_major, job.clone())
                        .await
                }
                false => {
                    self.restore_split_database(ctx, &step, tools, tables, server_major, &job)
                        .await
                }
            };
            if let Err(err) = result {
                if created {
                    // Ending its sessions: the restore's own may still be rolling back after
                    // its psql was stopped.
                    drop_scratch(client, &step.target, server_major).await;
                }
                return Err(err.or_interrupted(&ctx.cancel).context(format!(
                    "restoring database {:?} into {:?} (left as it was)",
                    step.part.name, step.target
                )));
            }
            if tables.is_empty() {
                for statement in step.props.property_statements(&step.target) {
                    if let Err(e) = client.batch_execute(&statement).await {
                        warnings += 1;
                        tracing::warn!(database = %step.target, error = %e, "could not restore a database property; the data is restored");
                    }
                }
            }
        }
        drop(job);
        line.one_done();
        let raw_bytes = step.raw_bytes();
        tracing::info!(
            database = %step.target,
            source_database = %step.part.name,
            raw_bytes,
            parts = 1 + step.data.len(),
            seconds = started.elapsed().as_secs_f64(),
            "database {:?} restored from {:?} ({})",
            step.target,
            step.part.name,
            human_bytes(raw_bytes)
        );
        Ok((step.target, raw_bytes, warnings))
    }

    /// A new database restored with `--jobs`: schema and data in one transaction into a
    /// scratch database, then the post-data section (indexes, constraints, triggers) on
    /// `jobs` sessions, as `pg_restore -j` builds them, and only then renamed to the target.
    /// The target never exists half-restored: any failure, or a signal, drops the scratch
    /// database (WITH FORCE, which also ends an index build in progress).
    #[allow(clippy::too_many_arguments)]
    async fn restore_through_scratch(
        &self,
        ctx: &RestoreContext<'_>,
        client: &tokio_postgres::Client,
        step: &Step<'_>,
        tools: &Tools,
        server_major: u32,
        line: &ProgressLine,
        job: &Progress,
        budget: &Semaphore,
    ) -> Result<usize> {
        let scratch = format!("kura_restore_{:08x}", rand::random::<u32>());
        let owner_exists = existing_roles(client, &self.target)
            .await?
            .contains(&step.props.owner);
        // Our own sessions must get in whatever limit the database has; it is set at the end.
        let mut unlimited = step.props.clone();
        unlimited.connection_limit = -1;
        let sql = unlimited.create_statement(&scratch, owner_exists);
        client.batch_execute(&sql).await.map_err(|e| {
            query_error(
                &self.target,
                &format!(
                    "creating the scratch database {scratch:?} for {:?}",
                    step.target
                ),
                e,
            )
        })?;
        tracing::info!(database = %step.target, scratch = %scratch, "restoring {:?} into scratch database {scratch}, renamed to {:?} once complete", step.part.name, step.target);
        let restored = async {
            let post_data = self
                .restore_schema_and_data(ctx, step, tools, server_major, &scratch, job.clone())
                .await?;
            check_cancel(ctx)?;
            if !step.data.is_empty() {
                self.load_data_side_by_side(
                    ctx,
                    step,
                    tools,
                    server_major,
                    &scratch,
                    line,
                    job,
                    budget,
                )
                .await?;
            }
            job.set_label(format!("{} (indexes, constraints)", step.target));
            if !post_data.is_empty() {
                post_data
                    .run(&self.target, &scratch, ctx.jobs, budget, &ctx.cancel)
                    .await?;
            }
            check_cancel(ctx)?;
            match step.exists {
                false => self.rename_into_place(client, &scratch, &step.target).await,
                true => {
                    self.swap_into_place(client, &scratch, &step.target, server_major)
                        .await
                }
            }
        }
        .await;
        if let Err(err) = restored {
            drop_scratch(client, &scratch, server_major).await;
            return Err(err.or_interrupted(&ctx.cancel).context(format!(
                "restoring database {:?} into {:?} (not created)",
                step.part.name, step.target
            )));
        }
        let mut statements = Vec::new();
        if step.props.connection_limit != -1 {
            statements.push(format!(
                "ALTER DATABASE {} CONNECTION LIMIT {}",
                quote_ident(&step.target),
                step.props.connection_limit
            ));
        }
        statements.extend(step.props.property_statements(&step.target));
        let mut warnings = 0;
        for statement in statements {
            if let Err(e) = client.batch_execute(&statement).await {
                warnings += 1;
                tracing::warn!(database = %step.target, error = %e, "could not restore a database property; the data is restored");
            }
        }
        Ok(warnings)
    }

    /// Pre-data and data through pg_restore and psql in one transaction, committed once the
    /// part's SHA-256 matched; the post-data section is read from the same download by a
    /// second pg_restore, for [`PostData::run`].
    async fn restore_schema_and_data(
        &self,
        ctx: &RestoreContext<'_>,
        step: &Step<'_>,
        tools: &Tools,
        server_major: u32,
        scratch: &str,
        progress: Progress,
    ) -> Result<PostData> {
        let mut psql = self.target.command(&tools.psql, scratch);
        psql.args(PSQL_SCRIPT_ARGS);
        psql.args(["--tuples-only", "--no-align"]);
        let mut pg_restore = Command::new(&tools.pg_restore);
        pg_restore.args([
            "--file=-",
            "--single-transaction",
            "--section=pre-data",
            "--section=data",
        ]);
        let mut post_data = Command::new(&tools.pg_restore);
        post_data.args(["--file=-", "--section=post-data"]);
        let preamble = self.connection_check(server_major).await;
        let script = restore_in_one_transaction(
            ctx,
            step.part,
            pg_restore,
            psql,
            preamble,
            progress,
            Some(post_data),
        )
        .await?;
        PostData::from_script(script.unwrap_or_default(), &self.target, scratch).await
    }

    /// `ALTER DATABASE scratch RENAME TO target`. A rename needs the database to itself: new
    /// connections are refused first and any other session in it (a monitoring agent that
    /// visits every database) is ended, and sessions just closed may linger for a moment on
    /// the server (object_in_use), so that is retried briefly.
    async fn rename_into_place(
        &self,
        client: &tokio_postgres::Client,
        scratch: &str,
        target: &str,
    ) -> Result<()> {
        let shut = format!(
            "ALTER DATABASE {} ALLOW_CONNECTIONS false",
            quote_ident(scratch)
        );
        client.batch_execute(&shut).await.map_err(|e| {
            query_error(
                &self.target,
                &format!("closing {scratch:?} for the rename"),
                e,
            )
        })?;
        // Only the sessions we may end (our own, or any with pg_signal_backend); a rename
        // still blocked by another is the error below.
        let _ = client
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
                &[&scratch],
            )
            .await;
        let sql = format!(
            "ALTER DATABASE {} RENAME TO {}; ALTER DATABASE {} ALLOW_CONNECTIONS true",
            quote_ident(scratch),
            quote_ident(target),
            quote_ident(target)
        );
        let mut attempt = 0;
        loop {
            attempt += 1;
            match client.batch_execute(&sql).await {
                Ok(()) => return Ok(()),
                Err(e)
                    if attempt < 50
                        && e.code() == Some(&tokio_postgres::error::SqlState::OBJECT_IN_USE) =>
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => {
                    return Err(query_error(
                        &self.target,
                        &format!("renaming the restored {scratch:?} to {target:?}"),
                        e,
                    ))
                }
            }
        }
    }

    /// `--swap`: the restored scratch database takes the target's name and the target moves
    /// aside, both renames in one transaction, so the name always means a whole database;
    /// then the old one is dropped. The target takes no new connections meanwhile; its other
    /// sessions are ended with `--terminate-sessions`, else the swap is refused. On any
    /// failure the target is left as it was (the caller drops the scratch database).
    async fn swap_into_place(
        &self,
        client: &tokio_postgres::Client,
        scratch: &str,
        target: &str,
        server_major: u32,
    ) -> Result<()> {
        let failed = |what: &str, e| query_error(&self.target, what, e);
        let allowed: bool = client
            .query_one(
                "SELECT datallowconn FROM pg_database WHERE datname = $1",
                &[&target],
            )
            .await
            .map_err(|e| failed("reading the target's settings", e))?
            .get(0);
        let (quoted_target, quoted_scratch) = (quote_ident(target), quote_ident(scratch));
        for database in [&quoted_target, &quoted_scratch] {
            client
                .batch_execute(&format!(
                    "ALTER DATABASE {database} ALLOW_CONNECTIONS false"
                ))
                .await
                .map_err(|e| failed(&format!("closing {database} for the swap"), e))?;
        }
        let old = format!("kura_replaced_{:08x}", rand::random::<u32>());
        let swapped = async {
            if self.terminate_sessions {
                let ended = client
                    .execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
                        &[&target],
                    )
                    .await
                    .map_err(|e| failed("ending the target's sessions", e))?;
                if ended > 0 {
                    tracing::warn!(database = %target, sessions = ended, "ended {ended} session(s) of {target:?} for the swap (--terminate-sessions)");
                }
            } else {
                let sessions = other_sessions(client, &self.target, target).await?;
                if !sessions.is_empty() {
                    return Err(busy(target, &sessions));
                }
            }
            let _ = client
                .execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
                    &[&scratch],
                )
                .await;
            let sql = format!(
                "BEGIN; ALTER DATABASE {quoted_target} RENAME TO {}; \
                 ALTER DATABASE {quoted_scratch} RENAME TO {quoted_target}; \
                 ALTER DATABASE {quoted_target} ALLOW_CONNECTIONS true; COMMIT",
                quote_ident(&old)
            );
            let mut attempt = 0;
            loop {
                attempt += 1;
                match client.batch_execute(&sql).await {
                    Ok(()) => return Ok(()),
                    Err(e) => {
                        let _ = client.batch_execute("ROLLBACK").await;
                        // Sessions just ended may linger for a moment on the server.
                        if attempt < 50
                            && e.code() == Some(&tokio_postgres::error::SqlState::OBJECT_IN_USE)
                        {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                        return Err(failed(
                            &format!("swapping the restored {scratch:?} with {target:?}"),
                            e,
                        ));
                    }
                }
            }
        }
        .await;
        if let Err(err) = swapped {
            if allowed {
                let _ = client
                    .batch_execute(&format!(
                        "ALTER DATABASE {quoted_target} ALLOW_CONNECTIONS true"
                    ))
                    .await;
            }
            return Err(err);
        }
        tracing::info!(database = %target, replaced = %old, "swapped the restored database in as {target:?}; dropping the one it replaced");
        drop_scratch(client, &old, server_major).await;
        Ok(())
    }

    async fn plan<'m>(
        &self,
        client: &tokio_postgres::Client,
        manifest: &'m Manifest,
    ) -> Result<Vec<Step<'m>>> {
        let selected = select_parts(manifest, DATABASE_KIND, &self.databases)?;
        let existing: Vec<String> = client
            .query("SELECT datname FROM pg_database", &[])
            .await
            .map_err(|e| query_error(&self.target, "listing databases", e))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let mut steps = Vec::new();
        for (part, target) in selected {
            let props: DatabaseProps =
                serde_json::from_value(part.properties.clone()).map_err(|e| {
                    Error::integrity(format!(
                        "manifest entry of database {:?} is malformed: {e}",
                        part.name
                    ))
                })?;
            let mut data = Vec::new();
            for candidate in manifest.parts.iter().filter(|p| p.kind == TABLE_DATA_KIND) {
                let piece: DataPiece = serde_json::from_value(candidate.properties.clone())
                    .map_err(|e| {
                        Error::integrity(format!(
                            "manifest entry of part {} is malformed: {e}",
                            candidate.key
                        ))
                    })?;
                if piece.of != part.key {
                    continue;
                }
                let readable = match candidate.format.as_str() {
                    DATA_FORMAT => piece.copy.is_none(),
                    COPY_FORMAT => piece.copy.is_some() && piece.table.is_some(),
                    _ => false,
                };
                if !readable {
                    return Err(Error::integrity(format!(
                        "part {} of database {:?} has format {:?}, which this kura does not read with these properties; the manifest is damaged, or was written by a newer kura: upgrade kura",
                        candidate.key, part.name, candidate.format
                    )));
                }
                data.push((candidate, piece));
            }
            // A schema without its data would restore as an empty database reported as ok.
            let complete = match part.format == SCHEMA_FORMAT {
                true => data.iter().any(|(_, piece)| piece.table.is_none()),
                false => data.is_empty(),
            };
            if !complete {
                return Err(Error::integrity(format!(
                    "the manifest of backup {} does not list every part of database {:?} (its schema, the rest of its data, or no data parts for a whole one); the backup is damaged",
                    manifest.backup_id, part.name
                )));
            }
            steps.push(Step {
                part,
                data,
                props,
                exists: existing.contains(&target),
                target,
            });
        }
        Ok(steps)
    }

    async fn restore_database(
        &self,
        ctx: &RestoreContext<'_>,
        step: &Step<'_>,
        tools: &Tools,
        tables: &[(String, String)],
        server_major: u32,
        progress: Progress,
    ) -> Result<()> {
        let mut psql = self.target.command(&tools.psql, &step.target);
        psql.args(PSQL_SCRIPT_ARGS);
        // Bare rows, so PendingCommit can spot its marker among the script's set_config
        // and setval results.
        psql.args(["--tuples-only", "--no-align"]);
        let mut pg_restore = Command::new(&tools.pg_restore);
        pg_restore.args(["--file=-", "--single-transaction"]);
        if self.force {
            pg_restore.args(["--clean", "--if-exists"]);
        }
        let mut preamble = self.connection_check(server_major).await;
        let (selection, schemas) = self.table_selection(tables, &step.props.encoding).await?;
        pg_restore.args(selection);
        preamble.push_str(&schemas);
        restore_in_one_transaction(ctx, step.part, pg_restore, psql, preamble, progress, None)
            .await
            .map(|_| ())
    }

    /// pg_restore's `--schema`/`--table` arguments selecting `tables`, and the statements
    /// that create their schemas (pg_restore --table restores a table, not its schema).
    ///
    /// pg_restore matches the names byte for byte against its archive's, which are in the
    /// database's `encoding`: a LATIN1 database's `Grüße` would match nothing typed in UTF-8,
    /// and the restore would "succeed" with nothing in it.
    async fn table_selection(
        &self,
        tables: &[(String, String)],
        encoding: &str,
    ) -> Result<(Vec<OsString>, String)> {
        let mut selection = Vec::new();
        let mut schemas = String::new();
        if !tables.is_empty() {
            // psql's session starts in the database's encoding; these statements are UTF-8.
            schemas.push_str("SET client_encoding = 'UTF8';\n");
        }
        let mut session = None;
        let database = self.target.maintenance_database();
        for (schema, table) in tables {
            for (option, name) in [("--schema=", schema), ("--table=", table)] {
                let encoded = super::convert_encoding(
                    &self.target,
                    &mut session,
                    &database,
                    name.as_bytes(),
                    "UTF8",
                    encoding,
                )
                .await?
                .map_err(|reason| {
                    Error::usage(format!(
                        "{name:?} has no form in the backup's encoding, {encoding} ({reason}): \
                         no table of the backup can have that name"
                    ))
                })?;
                selection.push(OsString::from_vec([option.as_bytes(), &encoded].concat()));
            }
            schemas.push_str(&format!(
                "CREATE SCHEMA IF NOT EXISTS {};\n",
                quote_ident(schema)
            ));
        }
        Ok((selection, schemas))
    }

    /// The data parts of a split database into the scratch database that holds its schema,
    /// side by side: each in its own transaction, committed once its SHA-256 matched (the
    /// scratch database is invisible until renamed, so there is nothing to see half-done).
    /// The loads take their turns from the same budget as the index builds.
    #[allow(clippy::too_many_arguments)]
    async fn load_data_side_by_side(
        &self,
        ctx: &RestoreContext<'_>,
        step: &Step<'_>,
        tools: &Tools,
        server_major: u32,
        scratch: &str,
        line: &ProgressLine,
        job: &Progress,
        budget: &Semaphore,
    ) -> Result<()> {
        let preamble = self.connection_check(server_major).await;
        job.set_label(format!("{} (data, {} parts)", step.target, step.data.len()));
        crate::jobs::run_all(step.data.iter().collect(), ctx.jobs, &ctx.cancel, |(part, piece), stop| {
            let ctx = ctx.with_cancel(stop);
            let preamble = preamble.clone();
            async move {
                let _turn = tokio::select! {
                    turn = budget.acquire() => turn.map_err(|_| Error::interrupted())?,
                    _ = ctx.cancel.cancelled() => return Err(Error::interrupted()),
                };
                let part_job = line.job_within(
                    job,
                    format!("{} ({})", step.target, describe_piece(piece)),
                    Some(part.stored_bytes),
                );
                let started = Instant::now();
                let loaded = match (&piece.table, &piece.copy) {
                    (Some(table), Some(text)) => {
                        let counted = step
                            .part
                            .counts
                            .as_ref()
                            .and_then(|counts| counts.get(&table.to_string()).copied());
                        self.copy_into(
                            &ctx,
                            part,
                            table,
                            text,
                            counted,
                            scratch,
                            server_major,
                            part_job,
                        )
                        .await
                    }
                    _ => {
                        let mut psql = self.target.command(&tools.psql, scratch);
                        psql.args(PSQL_SCRIPT_ARGS);
                        psql.args(["--tuples-only", "--no-align"]);
                        let mut pg_restore = Command::new(&tools.pg_restore);
                        pg_restore.args(["--file=-", "--data-only", "--single-transaction"]);
                        restore_in_one_transaction(
                            &ctx, part, pg_restore, psql, preamble, part_job, None,
                        )
                        .await
                        .map(|_| ())
                    }
                };
                loaded.map_err(|e| {
                    e.context(format!(
                        "loading part {} ({})",
                        part.key,
                        describe_piece(piece)
                    ))
                })?;
                tracing::info!(database = %step.target, part = %part.key, raw_bytes = part.raw_bytes, seconds = started.elapsed().as_secs_f64(), "loaded {} of {:?} ({})", describe_piece(piece), step.target, human_bytes(part.raw_bytes));
                Ok(())
            }
        })
        .await?;
        Ok(())
    }

    /// A [`COPY_FORMAT`] part into `table` of `database` over a session of kura's own, in
    /// one transaction committed once the part's SHA-256 matched and, when the backup counted
    /// the table, the server took as many rows.
    #[allow(clippy::too_many_arguments)]
    async fn copy_into(
        &self,
        ctx: &RestoreContext<'_>,
        part: &Part,
        table: &TableName,
        text: &CopyText,
        counted: Option<u64>,
        database: &str,
        server_major: u32,
        progress: Progress,
    ) -> Result<()> {
        let client = self.target.connect(database).await?;
        let what = format!("loading the rows of table {table} into {database:?}");
        let failed = |e| query_error(&self.target, &what, e);
        // What pg_restore's script sets for its data (the text's encoding is COPY's option).
        client
            .batch_execute(&format!(
                "SET statement_timeout = 0; SET lock_timeout = 0; {}\
                 SET idle_in_transaction_session_timeout = 0; SET row_security = off; \
                 SET xmloption = content; SET search_path = ''; BEGIN",
                super::backup::no_transaction_timeout(server_major)
            ))
            .await
            .map_err(failed)?;
        let sink = client
            .copy_in::<_, bytes::Bytes>(&text.copy_from(table))
            .await
            .map_err(failed)?;
        let key = ctx.path.object_key(&ctx.backup_id, &part.key);
        let cancel = ctx.cancel.clone();
        let target = self.target.clone();
        let loading = what.clone();
        let rows = pipeline::read_verified(
            ctx.store,
            &key,
            &part.digest(),
            ctx.unseal(part)?,
            Some(progress),
            &ctx.cancel,
            move |input: &mut dyn Read| {
                // The reader blocks on the download; this blocking thread drives the sink
                // (tokio's block_on is refused here) while the session's connection runs
                // on the runtime.
                futures::executor::block_on(async move {
                    let mut sink = Box::pin(sink);
                    let mut chunk = vec![0u8; COPY_CHUNK];
                    loop {
                        let filled = fill(input, &mut chunk).map_err(|e| {
                            Error::with_source(ErrorKind::Failed, "reading the backup", e)
                        })?;
                        if filled == 0 {
                            break;
                        }
                        let sent = sink.send(bytes::Bytes::copy_from_slice(&chunk[..filled]));
                        tokio::select! {
                            sent = sent => sent.map_err(|e| query_error(&target, &loading, e))?,
                            _ = cancel.cancelled() => return Err(Error::interrupted()),
                        }
                    }
                    sink.as_mut()
                        .finish()
                        .await
                        .map_err(|e| query_error(&target, &loading, e))
                })
            },
        )
        .await?;
        check_cancel(ctx)?;
        if let Some(counted) = counted.filter(|&counted| counted != rows) {
            return Err(Error::integrity(format!(
                "part {} held {rows} rows of table {table}, but the backup counted {counted}: the part is damaged",
                part.key
            )));
        }
        client.batch_execute("COMMIT").await.map_err(failed)
    }

    /// A split database in one transaction (onto an existing database with `--force`, with
    /// `--table`, or with `--jobs 1`): its schema's pre-data, every data part, then its
    /// post-data, all through one psql session, committed once every part's SHA-256
    /// matched. With `--force`, pg_restore's drops of the post-data section (foreign keys
    /// above all, which would block dropping the tables they point at) go first, where a
    /// restore of a whole archive has them.
    async fn restore_split_database(
        &self,
        ctx: &RestoreContext<'_>,
        step: &Step<'_>,
        tools: &Tools,
        tables: &[(String, String)],
        server_major: u32,
        job: &Progress,
    ) -> Result<()> {
        let mut psql = self.target.command(&tools.psql, &step.target);
        psql.args(PSQL_SCRIPT_ARGS);
        psql.args(["--tuples-only", "--no-align"]);
        let mut preamble = self.connection_check(server_major).await;
        let (selection, schemas) = self.table_selection(tables, &step.props.encoding).await?;
        preamble.push_str(&schemas);
        let script = |section: &str| {
            let mut pg_restore = Command::new(&tools.pg_restore);
            pg_restore.args(["--file=-", "--single-transaction", section]);
            if self.force {
                pg_restore.args(["--clean", "--if-exists"]);
            }
            pg_restore.args(&selection);
            pg_restore
        };
        let (pre_data, post_data) = (script("--section=pre-data"), script("--section=post-data"));
        let key = ctx.path.object_key(&ctx.backup_id, &step.part.key);
        let cancel = ctx.cancel.clone();
        let (mut session, post_data) = pipeline::read_verified(
            ctx.store,
            &key,
            &step.part.digest(),
            ctx.unseal(step.part)?,
            Some(job.clone()),
            &ctx.cancel,
            move |input: &mut dyn Read| {
                let (pre_data, post_data) = two_scripts(input, pre_data, post_data)?;
                let (pre_data, post_data) = (
                    inside_transaction(&pre_data)?,
                    inside_transaction(&post_data)?,
                );
                let (drops, post_data) = split_off_drops(&post_data);
                let mut session = PendingCommit::open(psql, &cancel)?;
                session.write(preamble.as_bytes())?;
                session.write(&drops)?;
                session.write(&pre_data)?;
                Ok((session, post_data))
            },
        )
        .await?;
        for (part, piece) in step.data_for(tables) {
            check_cancel(ctx)?;
            job.set_label(format!("{} ({})", step.target, describe_piece(piece)));
            let mut pg_restore = Command::new(&tools.pg_restore);
            // --clean belongs to the schema: a data-only archive has nothing to drop.
            pg_restore.args(["--file=-", "--data-only", "--single-transaction"]);
            pg_restore.args(&selection);
            let copy = match (&piece.table, &piece.copy) {
                (Some(table), Some(text)) => Some((table.clone(), text.clone())),
                _ => None,
            };
            let key = ctx.path.object_key(&ctx.backup_id, &part.key);
            let cancel = ctx.cancel.clone();
            let force = self.force;
            session = pipeline::read_verified(
                ctx.store,
                &key,
                &part.digest(),
                ctx.unseal(part)?,
                Some(job.clone()),
                &ctx.cancel,
                move |input: &mut dyn Read| {
                    match copy {
                        Some((table, text)) => session.feed_copy(input, &table, &text)?,
                        None => session.feed(input, pg_restore, force, &cancel)?,
                    }
                    Ok(session)
                },
            )
            .await
            .map_err(|e| {
                e.context(format!(
                    "loading part {} ({})",
                    part.key,
                    describe_piece(piece)
                ))
            })?;
        }
        check_cancel(ctx)?;
        job.set_label(format!("{} (indexes, constraints)", step.target));
        let cancel = ctx.cancel.clone();
        tokio::task::spawn_blocking(move || {
            session.write(&post_data)?;
            session.commit(&cancel)
        })
        .await
        .map_err(|e| Error::failed(format!("committing the restore: {e}")))?
    }

    /// `SET client_connection_check_interval`, when the server has it (see
    /// [`Self::checks_client_connection`]), for the start of a restore's transaction.
    async fn connection_check(&self, server_major: u32) -> String {
        match self.checks_client_connection(server_major).await {
            // A stopped restore (SIGTERM, a corrupt part) kills psql; without this the server
            // would notice only after the statement in progress, e.g. an hour-long CREATE
            // INDEX, and hold the target's locks until then.
            true => "SET client_connection_check_interval = '1s';\n".to_string(),
            false => String::new(),
        }
    }

    async fn restore_globals(
        &self,
        ctx: &RestoreContext<'_>,
        part: &Part,
        tools: &Tools,
        current_user: &str,
        roles: &[String],
        progress: Progress,
    ) -> Result<()> {
        let key = ctx.path.object_key(&ctx.backup_id, &part.key);
        // Globals are small and cannot all run in one transaction (CREATE TABLESPACE), so the
        // script is verified whole before any of it runs.
        let script = pipeline::read_verified(
            ctx.store,
            &key,
            &part.digest(),
            ctx.unseal(part)?,
            Some(progress),
            &ctx.cancel,
            |input: &mut dyn Read| {
                let mut script = Vec::new();
                input.take(GLOBALS_LIMIT + 1).read_to_end(&mut script)?;
                if script.len() as u64 > GLOBALS_LIMIT {
                    return Err(Error::integrity(format!(
                        "the globals script is larger than {} MiB, which no sane cluster needs: the part is corrupt",
                        GLOBALS_LIMIT >> 20
                    )));
                }
                Ok(script)
            },
        )
        .await?;
        let existing_tablespaces = self.existing_tablespaces().await?;
        let script = filter_globals(
            &String::from_utf8_lossy(&script),
            current_user,
            roles,
            &existing_tablespaces,
        );
        let mut psql = self
            .target
            .command(&tools.psql, &self.target.maintenance_database());
        psql.args(PSQL_SCRIPT_ARGS);
        if !script.creates_tablespace {
            psql.arg("--single-transaction");
        }
        let mut child = ChildProcess::spawn(psql, "psql", true, false)?;
        let stopper = child.terminator(ctx.cancel.clone());
        let ran = tokio::task::spawn_blocking(move || {
            let mut stdin = child.take_stdin().expect("stdin is piped");
            let written = stdin.write_all(script.sql.as_bytes());
            drop(stdin);
            let exited = child.wait_success();
            // Stopped before the pid can be reused.
            (exited, written)
        })
        .await;
        stopper.abort();
        let (exited, written) =
            ran.map_err(|e| Error::failed(format!("running the globals script: {e}")))?;
        exited.map_err(|e| advise(e).or_interrupted(&ctx.cancel))?;
        written.map_err(|e| Error::with_source(ErrorKind::Failed, "feeding psql", e))
    }

    /// Whether the server can notice a client that went away in the middle of a statement
    /// (`client_connection_check_interval`, PostgreSQL 14+, and only on platforms that can
    /// report closed sockets: elsewhere a non-zero value is refused, and would fail the script).
    async fn checks_client_connection(&self, server_major: u32) -> bool {
        if server_major < 14 {
            return false;
        }
        match self
            .target
            .connect(&self.target.maintenance_database())
            .await
        {
            Ok(client) => client
                .batch_execute("SET client_connection_check_interval = '1s'")
                .await
                .is_ok(),
            Err(_) => false,
        }
    }

    async fn existing_tablespaces(&self) -> Result<Vec<String>> {
        let client = self
            .target
            .connect(&self.target.maintenance_database())
            .await?;
        Ok(client
            .query("SELECT spcname FROM pg_tablespace", &[])
            .await
            .map_err(|e| query_error(&self.target, "listing tablespaces", e))?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }
}

/// psql running a restore script: stop at the first error, and report it with its SQLSTATE
/// (VERBOSITY=verbose) so kura can tell what failed without reading translated text.
const PSQL_SCRIPT_ARGS: [&str; 6] = [
    "--no-psqlrc",
    "--quiet",
    "--no-password",
    "--set=ON_ERROR_STOP=1",
    "--set=VERBOSITY=verbose",
    "--set=SHOW_CONTEXT=never",
];

/// Globals of a sane cluster are kilobytes; this only stops a corrupt part from eating memory.
const GLOBALS_LIMIT: u64 = 256 << 20;

fn check_cancel(ctx: &RestoreContext<'_>) -> Result<()> {
    if ctx.cancel.is_cancelled() {
        Err(Error::interrupted())
    } else {
        Ok(())
    }
}

/// Other sessions connected to `database`, described for people.
async fn other_sessions(
    client: &tokio_postgres::Client,
    target: &Connection,
    database: &str,
) -> Result<Vec<String>> {
    let rows = client
        .query(
            "SELECT pid, coalesce(usename::text, '?'), coalesce(application_name, '') \
               FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid() ORDER BY pid",
            &[&database],
        )
        .await
        .map_err(|e| query_error(target, "listing the sessions of the database to replace", e))?;
    Ok(rows
        .iter()
        .map(|row| {
            format!(
                "pid {} (user {}, application {:?})",
                row.get::<_, i32>(0),
                row.get::<_, String>(1),
                row.get::<_, String>(2)
            )
        })
        .collect())
}

fn busy(database: &str, sessions: &[String]) -> Error {
    Error::new(
        ErrorKind::TargetNotEmpty,
        format!(
            "refusing to swap database {database:?}: {} other session(s) use it ({}); stop them (scale the app down), or pass --terminate-sessions to end them; nothing was changed",
            sessions.len(),
            sessions.join(", ")
        ),
    )
}

/// Drop a database created for a restore that failed, ending the sessions still in it, such
/// as an index build: FORCE on PostgreSQL 13+, pg_terminate_backend before.
async fn drop_scratch(client: &tokio_postgres::Client, scratch: &str, server_major: u32) {
    let force = if server_major >= 13 {
        " WITH (FORCE)"
    } else {
        ""
    };
    if server_major < 13 {
        let _ = client
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
                &[&scratch],
            )
            .await;
    }
    let drop = format!("DROP DATABASE IF EXISTS {}{force}", quote_ident(scratch));
    if let Err(e) = client.batch_execute(&drop).await {
        tracing::warn!(database = %scratch, error = %e, "could not drop the database created for the failed restore; drop it by hand");
    }
}

/// The archive on its way to pg_restore, copied to a second pg_restore that prints only the
/// post-data section. That one may stop reading once it has what it needs (its section has
/// no data), so a closed pipe to it only ends the copy; its exit status is what counts.
///
/// The script is bytes in the dump's encoding (its `SET client_encoding` line), not
/// necessarily UTF-8: a LATIN1 database's names are LATIN1 there.
struct Tee<'a> {
    input: &'a mut dyn Read,
    copy: Option<ChildStdin>,
    tool: ChildProcess,
    script: std::thread::JoinHandle<std::io::Result<Vec<u8>>>,
}

impl<'a> Tee<'a> {
    fn start(input: &'a mut dyn Read, command: Command) -> Result<Tee<'a>> {
        let mut tool = ChildProcess::spawn(command, "pg_restore", true, true)?;
        let copy = tool.take_stdin();
        let stdout = tool.take_stdout().expect("stdout is piped");
        let script = std::thread::spawn(move || {
            let mut script = Vec::new();
            // The post-data section of a sane schema is megabytes; the cap only stops a
            // damaged archive from eating memory.
            stdout.take(POST_DATA_LIMIT).read_to_end(&mut script)?;
            Ok(script)
        });
        Ok(Tee {
            input,
            copy,
            tool,
            script,
        })
    }

    fn finish(mut self) -> Result<Vec<u8>> {
        drop(self.copy.take());
        self.tool.wait_success()?;
        self.script
            .join()
            .map_err(|_| Error::failed("reading the post-data section panicked"))?
            .map_err(|e| Error::with_source(ErrorKind::Failed, "reading the post-data section", e))
    }
}

impl Read for Tee<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.input.read(buf)?;
        if let Some(copy) = self.copy.as_mut() {
            if copy.write_all(&buf[..n]).is_err() {
                self.copy = None;
            }
        }
        Ok(n)
    }
}

const POST_DATA_LIMIT: u64 = 256 << 20;

/// A restore whose script has been fed to psql except its final COMMIT.
struct PendingCommit {
    psql: ChildProcess,
    /// `None` once closed (the end of input that lets psql finish).
    stdin: Option<ChildStdin>,
    /// Signalled when psql prints `marker`: it has then run every statement before it.
    /// (A `\echo` would be simpler, but pg_dump 15.14+ scripts run under `\restrict`, which
    /// forbids backslash commands until the end.)
    applied: std::sync::mpsc::Receiver<()>,
    marker: String,
    held: Vec<u8>,
    /// Stops psql on a signal until the COMMIT is sent.
    stopper: tokio::task::JoinHandle<()>,
}

impl Drop for PendingCommit {
    fn drop(&mut self) {
        // An uncommitted restore dropped on a failure path: psql is killed (ChildProcess's
        // own Drop), and its terminator must not outlive it to signal a reused pid.
        self.stopper.abort();
    }
}

impl PendingCommit {
    /// Blocking: wait until psql has run the whole script (the last statements, such as
    /// index builds, can take long), then send the COMMIT and wait for psql.
    ///
    /// A signal before the COMMIT is sent stops psql, which rolls the restore back; once
    /// the COMMIT is on its way it is let through, so an interrupted restore is never one
    /// that perhaps committed.
    fn commit(mut self, cancel: &CancellationToken) -> Result<()> {
        if !String::from_utf8_lossy(&self.held).starts_with("COMMIT;") {
            self.stopper.abort();
            self.psql.kill();
            return Err(Error::integrity(
                "the restore script has no final COMMIT: the archive is incomplete",
            ));
        }
        let stdin = self.stdin.as_mut().expect("open until the end");
        let applied = writeln!(stdin, "SELECT '{}';", self.marker)
            .and_then(|_| stdin.flush())
            .and_then(|_| {
                self.applied.recv().map_err(|_| {
                    std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "psql ended before running the whole script",
                    )
                })
            });
        self.stopper.abort();
        if cancel.is_cancelled() {
            self.psql.kill();
            return Err(Error::interrupted());
        }
        if let Err(e) = applied {
            // psql stopped before reaching the marker: its exit says why.
            return Err(match self.psql.exited_failure(Duration::from_secs(2)) {
                Some(failure) => advise(failure),
                None => Error::with_source(ErrorKind::Failed, "waiting for psql", e),
            });
        }
        let stdin = self.stdin.as_mut().expect("open until the end");
        let sent = stdin.write_all(&self.held).and_then(|_| stdin.flush());
        // End of input: psql commits, then exits.
        drop(self.stdin.take());
        self.psql.wait_success()?;
        sent.map_err(|e| Error::with_source(ErrorKind::Failed, "sending COMMIT to psql", e))
    }
}

impl PendingCommit {
    /// psql with a transaction open, for scripts fed one after another ([`Self::write`],
    /// [`Self::feed`]) and committed as one by [`Self::commit`].
    fn open(psql: Command, cancel: &CancellationToken) -> Result<PendingCommit> {
        let mut psql = ChildProcess::spawn(psql, "psql", true, true)?;
        let stopper = psql.terminator(cancel.clone());
        let stdin = psql.take_stdin().expect("stdin is piped");
        crate::process::enlarge_pipe(&stdin);
        let marker = format!("kura: script applied {:016x}", rand::random::<u64>());
        let applied = watch_output(psql.take_stdout().expect("stdout is piped"), marker.clone());
        let mut session = PendingCommit {
            psql,
            stdin: Some(stdin),
            applied,
            marker,
            held: b"COMMIT;\n".to_vec(),
            stopper,
        };
        session.write(b"BEGIN;\n")?;
        Ok(session)
    }

    /// Blocking: send `sql` into the transaction.
    fn write(&mut self, sql: &[u8]) -> Result<()> {
        let stdin = self.stdin.as_mut().expect("open until the end");
        match stdin.write_all(sql) {
            Ok(()) => Ok(()),
            Err(e) => Err(self.failure(e)),
        }
    }

    /// Blocking: run an archive through `pg_restore --single-transaction` into the
    /// transaction, without its BEGIN and COMMIT ([`inside_transaction`] says why). With
    /// `replace_large_objects`, a large object the target already has is unlinked before it
    /// is created again.
    fn feed(
        &mut self,
        input: &mut dyn Read,
        pg_restore: Command,
        replace_large_objects: bool,
        cancel: &CancellationToken,
    ) -> Result<()> {
        let mut restore = ChildProcess::spawn(pg_restore, "pg_restore", true, true)?;
        let restore_stopper = restore.terminator(cancel.clone());
        let mut restore_stdin = restore.take_stdin().expect("stdin is piped");
        let mut restore_stdout = restore.take_stdout().expect("stdout is piped");
        // Every byte of the data passes these pipes and psql's: a 64 KiB pipe wakes the
        // other side (and switches tasks) every 64 KiB, measurable at hundreds of MB/s.
        crate::process::enlarge_pipe(&restore_stdin);
        crate::process::enlarge_pipe(&restore_stdout);
        let mut psql_stdin = self.stdin.take().expect("open until the end");
        let forwarder = std::thread::spawn(move || {
            let forwarded =
                forward_script(&mut restore_stdout, &mut psql_stdin, replace_large_objects)
                    .map(|(_, held)| held);
            (psql_stdin, forwarded)
        });
        let fed = pipeline::copy_large(input, &mut restore_stdin);
        drop(restore_stdin);
        let restored = restore.wait_success();
        restore_stopper.abort();
        // A selective restore (--table) stops reading once it has its data; the checksum
        // still covers the whole object.
        let fed = match fed {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe && restored.is_ok() => {
                std::io::copy(input, &mut std::io::sink())
            }
            other => other,
        };
        let (psql_stdin, forwarded) = forwarder
            .join()
            .map_err(|_| Error::failed("the script forwarder panicked"))?;
        self.stdin = Some(psql_stdin);
        let held = match forwarded {
            Ok(held) => held,
            Err(e) => return Err(self.failure(e)),
        };
        restored?;
        fed.map_err(|e| Error::with_source(ErrorKind::Failed, "reading the backup", e))?;
        let after_commit = held.strip_prefix(b"COMMIT;\n").ok_or_else(|| {
            Error::integrity("the restore script has no final COMMIT: the archive is incomplete")
        })?;
        // The `\unrestrict` after it ends the script's restricted mode for the next one.
        self.write(after_commit)
    }

    /// Blocking: a [`COPY_FORMAT`] part's rows into `table` in the transaction, through
    /// psql's `COPY … FROM stdin`. psql reads the rows up to a `\.` line and runs what
    /// follows as SQL, so a line that starts with `\.` (which COPY never writes) or a last
    /// line cut short is refused before psql could see it.
    fn feed_copy(
        &mut self,
        input: &mut dyn Read,
        table: &TableName,
        text: &CopyText,
    ) -> Result<()> {
        // The statement is UTF-8 whatever the scripts before it set; the rows are in the
        // encoding COPY's option names.
        self.write(
            format!(
                "SET client_encoding = 'UTF8';\n{};\n",
                text.copy_from(table)
            )
            .as_bytes(),
        )?;
        let mut lines = CopyLines::default();
        let mut chunk = vec![0u8; COPY_CHUNK];
        loop {
            let filled = fill(input, &mut chunk)
                .map_err(|e| Error::with_source(ErrorKind::Failed, "reading the backup", e))?;
            if filled == 0 {
                break;
            }
            lines.check(&chunk[..filled], table)?;
            self.write(&chunk[..filled])?;
        }
        lines.finish(table)?;
        self.write(b"\\.\n")
    }

    /// A write to psql failed: psql stopping at a failed statement closes its input, and
    /// its error is the cause.
    fn failure(&mut self, e: std::io::Error) -> Error {
        match self.psql.exited_failure(Duration::from_secs(2)) {
            Some(failure) => advise(failure),
            None => Error::with_source(ErrorKind::Failed, "feeding psql", e),
        }
    }
}

/// One part through pg_restore and psql in one transaction, committed once its SHA-256
/// matched; with `post_data`, the same download also goes to that second pg_restore, and
/// its script is returned.
async fn restore_in_one_transaction(
    ctx: &RestoreContext<'_>,
    part: &Part,
    pg_restore: Command,
    psql: Command,
    preamble: String,
    progress: Progress,
    post_data: Option<Command>,
) -> Result<Option<Vec<u8>>> {
    let key = ctx.path.object_key(&ctx.backup_id, &part.key);
    let cancel = ctx.cancel.clone();
    let (pending, script) = pipeline::read_verified(
        ctx.store,
        &key,
        &part.digest(),
        ctx.unseal(part)?,
        Some(progress),
        &ctx.cancel,
        move |input: &mut dyn Read| {
            let preamble = preamble.into_bytes();
            match post_data {
                None => Ok((
                    run_restore_tools(input, pg_restore, psql, preamble, &cancel)?,
                    None,
                )),
                Some(post_data) => {
                    let mut tee = Tee::start(input, post_data)?;
                    let pending = run_restore_tools(&mut tee, pg_restore, psql, preamble, &cancel);
                    let script = tee.finish();
                    Ok((pending?, Some(script?)))
                }
            }
        },
    )
    .await?;
    check_cancel(ctx)?;
    let cancel = ctx.cancel.clone();
    tokio::task::spawn_blocking(move || pending.commit(&cancel))
        .await
        .map_err(|e| Error::failed(format!("committing the restore: {e}")))??;
    Ok(script)
}

/// How much COPY text goes to the server (or psql) at a time.
const COPY_CHUNK: usize = 256 << 10;

/// Blocking: read until `buffer` is full or the input ends; how much was read.
fn fill(input: &mut dyn Read, buffer: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match input.read(&mut buffer[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Checks COPY text on its way into psql: every line whole, and none that would end the
/// rows early (`\.`), after which psql would run the rest as SQL.
#[derive(Debug)]
struct CopyLines {
    line_start: bool,
    after_leading_backslash: bool,
}

impl Default for CopyLines {
    fn default() -> Self {
        CopyLines {
            line_start: true,
            after_leading_backslash: false,
        }
    }
}

impl CopyLines {
    fn check(&mut self, text: &[u8], table: &TableName) -> Result<()> {
        for &byte in text {
            if self.after_leading_backslash {
                if byte == b'.' {
                    return Err(Error::integrity(format!(
                        "the rows of table {table} hold a line starting with \\., which COPY never writes: the part is damaged"
                    )));
                }
                self.after_leading_backslash = false;
            } else if self.line_start && byte == b'\\' {
                self.after_leading_backslash = true;
            }
            self.line_start = byte == b'\n';
        }
        Ok(())
    }

    fn finish(&self, table: &TableName) -> Result<()> {
        match self.line_start {
            true => Ok(()),
            false => Err(Error::integrity(format!(
                "the rows of table {table} end in the middle of a line: the part is truncated"
            ))),
        }
    }
}

/// What a data part holds, for people.
fn describe_piece(piece: &DataPiece) -> String {
    match &piece.table {
        Some(table) => format!("table {table}"),
        None => "the other tables".to_string(),
    }
}

/// Blocking: the scripts two pg_restores print from one archive (a schema, small enough to
/// hold), read once.
fn two_scripts(
    input: &mut dyn Read,
    first: Command,
    second: Command,
) -> Result<(Vec<u8>, Vec<u8>)> {
    let mut second = Tee::start(input, second)?;
    let mut first = Tee::start(&mut second, first)?;
    let drained = std::io::copy(&mut first, &mut std::io::sink());
    let first = first.finish();
    let second = second.finish();
    drained.map_err(|e| Error::with_source(ErrorKind::Failed, "reading the backup", e))?;
    Ok((first?, second?))
}

/// `pg_restore --clean` prints its drops before the first entry, with no header of their
/// own: split them from the script that creates. (A statement is one line there, unless an
/// identifier holds a newline; its lines stay together and in order either way.) The
/// script's settings before them (`lock_timeout = 0`, the empty search_path) go with them.
fn split_off_drops(script: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let mut drops = Vec::new();
    let mut rest = Vec::with_capacity(script.len());
    let mut in_preamble = true;
    for line in script.split_inclusive(|b| *b == b'\n') {
        if is_entry_header(line) {
            in_preamble = false;
        }
        let setting =
            line.starts_with(b"SET ") || line.starts_with(b"SELECT pg_catalog.set_config(");
        let statement = !(line.trim_ascii().is_empty()
            || line.starts_with(b"--")
            || line.starts_with(b"\\")
            || setting);
        if in_preamble && setting {
            drops.extend_from_slice(line);
        }
        if in_preamble && statement {
            match guard_drop(line) {
                Some(guarded) => drops.extend_from_slice(&guarded),
                None => drops.extend_from_slice(line),
            }
        } else {
            rest.extend_from_slice(line);
        }
    }
    (drops, rest)
}

/// A script of `pg_restore --single-transaction` without its BEGIN and final COMMIT, for a
/// transaction already open; an integrity error if the script never ends (a truncated
/// archive). Without `--single-transaction` pg_restore would wrap large objects in a
/// BEGIN/COMMIT of their own, committing the open transaction halfway.
fn inside_transaction(script: &[u8]) -> Result<Vec<u8>> {
    let (mut body, held) = forward_script(script, Vec::new(), false)
        .map_err(|e| Error::with_source(ErrorKind::Failed, "reading a restore script", e))?;
    let rest = held.strip_prefix(b"COMMIT;\n").ok_or_else(|| {
        Error::integrity("the restore script has no final COMMIT: the archive is incomplete")
    })?;
    // The `\unrestrict` after the COMMIT ends the script's restricted mode.
    body.extend_from_slice(rest);
    Ok(body)
}

/// The first line of the comment block pg_restore prints above each entry.
fn is_entry_header(line: &[u8]) -> bool {
    line.starts_with(b"-- Name: ") || line.starts_with(b"-- Data for Name: ")
}

/// pg_restore --clean drops a partition's primary key or unique constraint before its
/// parent's, which PostgreSQL refuses ("cannot drop inherited constraint", 42P16: pg_restore
/// itself fails on such a database). Dropping the parent's constraint, next, drops the
/// partition's with it, so that one refusal is passed over, in a subtransaction.
fn guard_drop(line: &[u8]) -> Option<Vec<u8>> {
    let statement = line.trim_ascii_end();
    if !(statement.starts_with(b"ALTER TABLE IF EXISTS ONLY ")
        && statement
            .windows(b" DROP CONSTRAINT IF EXISTS ".len())
            .any(|w| w == b" DROP CONSTRAINT IF EXISTS ")
        && statement.ends_with(b";"))
    {
        return None;
    }
    // Bytes, not text: the names are in the dump's encoding.
    Some(
        [
            b"DO $kura_drop$ BEGIN ".as_slice(),
            statement,
            b" EXCEPTION WHEN invalid_table_definition THEN NULL; END $kura_drop$;\n",
        ]
        .concat(),
    )
}

/// Blocking: feed the archive to pg_restore and its script to psql, holding back the COMMIT.
///
/// A signal stops both tools at once (`cancel`), whatever they are doing: psql may be busy
/// with one long statement, such as building an index, while nothing flows through the pipes.
fn run_restore_tools(
    input: &mut dyn Read,
    pg_restore: Command,
    psql: Command,
    preamble: Vec<u8>,
    cancel: &CancellationToken,
) -> Result<PendingCommit> {
    let mut session = PendingCommit::open(psql, cancel)?;
    session.write(&preamble)?;
    session.feed(input, pg_restore, false, cancel)?;
    Ok(session)
}

/// Drain psql's output (never let it block on a full pipe) and signal when `marker` passes.
fn watch_output(stdout: ChildStdout, marker: String) -> std::sync::mpsc::Receiver<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = Vec::new();
        while matches!(reader.read_until(b'\n', &mut line), Ok(n) if n > 0) {
            if line.strip_suffix(b"\n").unwrap_or(&line) == marker.as_bytes() {
                let _ = tx.send(());
            }
            line.clear();
        }
    });
    rx
}

/// Object types `pg_restore --table` selects ("table" includes these, says its manual).
const TABLE_LIKE: [&str; 5] = [
    "TABLE",
    "VIEW",
    "MATERIALIZED VIEW",
    "SEQUENCE",
    "FOREIGN TABLE",
];

/// Every `--table` must be in the database's part: otherwise pg_restore restores nothing and
/// the user gets an empty database reported as a success. Tables with recorded row counts
/// are known from the manifest; anything else (a view, a sequence, a backup without counts)
/// is looked up in the archive's table of contents, the first bytes of the part.
async fn check_tables_in_backup(
    ctx: &RestoreContext<'_>,
    target: &Connection,
    step: &Step<'_>,
    tools: &Tools,
    tables: &[(String, String)],
) -> Result<()> {
    let part = step.part;
    let counted = |schema: &str, table: &str| {
        part.counts
            .as_ref()
            .is_some_and(|c| c.contains_key(&format!("{schema}.{table}")))
    };
    if tables.iter().all(|(schema, table)| counted(schema, table)) {
        return Ok(());
    }
    let key = ctx.path.object_key(&ctx.backup_id, &part.key);
    let mut list = Command::new(&tools.pg_restore);
    list.arg("--list");
    let unseal = ctx.unseal(part)?;
    let toc = pipeline::peek(
        ctx.store,
        &key,
        &part.digest(),
        unseal,
        &ctx.cancel,
        move |input: &mut dyn Read| {
            let mut child = ChildProcess::spawn(list, "pg_restore --list", true, true)?;
            let mut stdin = child.take_stdin().expect("stdin is piped");
            let mut stdout = child.take_stdout().expect("stdout is piped");
            let reader = std::thread::spawn(move || {
                let mut listing = Vec::new();
                stdout.read_to_end(&mut listing).map(|_| listing)
            });
            // pg_restore stops reading once it has the table of contents: a broken pipe is the
            // expected end of feeding it.
            match pipeline::copy_large(input, &mut stdin) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                    return Err(Error::with_source(
                        ErrorKind::Failed,
                        "reading the backup",
                        e,
                    ))
                }
                _ => {}
            }
            drop(stdin);
            child.wait_success()?;
            reader
                .join()
                .map_err(|_| Error::failed("the pg_restore --list reader panicked"))?
                .map_err(|e| Error::with_source(ErrorKind::Failed, "reading pg_restore --list", e))
        },
    )
    .await
    .map_err(|e| e.context(format!("reading the table of contents of {key}")))?;
    // The listing is in the dump's encoding; the names asked for are UTF-8.
    let toc = match super::convert_encoding(
        target,
        &mut None,
        &target.maintenance_database(),
        &toc,
        &step.props.encoding,
        "UTF8",
    )
    .await?
    {
        Ok(utf8) => String::from_utf8_lossy(&utf8).into_owned(),
        // Not valid in its own encoding: the names that are still match.
        Err(_) => String::from_utf8_lossy(&toc).into_owned(),
    };
    let entries: Vec<&str> = toc
        .lines()
        .filter(|l| !l.starts_with(';'))
        // "215; 1259 16385 TABLE public items owner": past the dump id and the two OIDs.
        .filter_map(|l| l.split_once("; ")?.1.splitn(3, ' ').nth(2))
        .collect();
    let in_toc = |schema: &str, table: &str| {
        entries.iter().any(|entry| {
            TABLE_LIKE.iter().any(|kind| {
                entry
                    .strip_prefix(&format!("{kind} {schema} {table} "))
                    .is_some_and(|owner| !owner.contains(' '))
            })
        })
    };
    let missing: Vec<String> = tables
        .iter()
        .filter(|(schema, table)| !counted(schema, table) && !in_toc(schema, table))
        .map(|(schema, table)| format!("{schema}.{table}"))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    // Candidates for "did you mean": recorded tables, and table-like TOC entries whose
    // schema and name have no spaces (the listing does not quote them).
    let mut known: Vec<String> = part.counts.iter().flat_map(|c| c.keys().cloned()).collect();
    for entry in &entries {
        for kind in TABLE_LIKE {
            let fields = entry.strip_prefix(kind).and_then(|r| r.strip_prefix(' '));
            if let Some(fields) = fields {
                let words: Vec<&str> = fields.split(' ').collect();
                if words.len() == 3 {
                    known.push(format!("{}.{}", words[0], words[1]));
                }
            }
        }
    }
    known.sort();
    known.dedup();
    let near: Vec<String> = missing
        .iter()
        .flat_map(|wanted| near_matches(wanted, &known))
        .collect();
    Err(Error::not_found(format!(
        "table(s) {} not in database {:?} of backup {}{}; nothing was restored",
        missing.join(", "),
        part.name,
        ctx.backup_id,
        match near.is_empty() {
            true => String::new(),
            false => format!("; did you mean {}?", near.join(", ")),
        }
    )))
}

/// Names close to `wanted` ("schema.table"): the same table in another schema, another
/// case, or a typo or two away.
fn near_matches(wanted: &str, known: &[String]) -> Vec<String> {
    let table = |name: &str| name.split_once('.').map_or(name, |(_, t)| t).to_lowercase();
    let wanted_table = table(wanted);
    let mut scored: Vec<(usize, &String)> = known
        .iter()
        .filter_map(|name| {
            let distance = edit_distance(&wanted.to_lowercase(), &name.to_lowercase())
                .min(edit_distance(&wanted_table, &table(name)));
            (distance <= 2).then_some((distance, name))
        })
        .collect();
    scored.sort();
    scored.into_iter().take(5).map(|(_, n)| n.clone()).collect()
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

/// SQLSTATE `undefined_object`: what psql reports for a role (or type, collation) the script
/// refers to and the target lacks. Missing roles are the usual case on a fresh cluster.
const UNDEFINED_OBJECT: &str = "42704";

fn advise(err: Error) -> Error {
    match ToolFailure::find(&err).and_then(ToolFailure::sqlstate) {
        Some(UNDEFINED_OBJECT) => err.advise(
            "an object the backup refers to is missing on the target, usually a role: add --globals to restore roles first, or create it",
        ),
        _ => err,
    }
}

/// Copy pg_restore's script to psql, withholding the final `COMMIT;` (and the comments and
/// `\unrestrict` after it). A `COMMIT;` line followed by anything significant was not the final one — e.g. a line
/// of COPY data or of a procedure body — and is forwarded unchanged.
///
/// The script goes into a transaction already open ([`PendingCommit::open`]): its opening
/// `BEGIN;` is left out. With
/// `unlink_large_objects`, a large object the target already has is unlinked before its
/// `lo_create`, as `--clean` does (which pg_restore refuses with `--data-only`).
fn forward_script<R: Read, W: Write>(
    script: R,
    psql: W,
    unlink_large_objects: bool,
) -> std::io::Result<(W, Vec<u8>)> {
    let mut reader = BufReader::with_capacity(1 << 20, script);
    let mut writer = BufWriter::with_capacity(1 << 20, psql);
    let mut line = Vec::with_capacity(8192);
    let mut held: Vec<u8> = Vec::new();
    let mut opened = false;
    // --clean's drops come before the first entry, and nothing else there looks like one.
    let mut in_drops = true;
    // Lines of COPY data are passed through untouched, whatever they say.
    let mut in_copy = false;
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        if in_copy {
            in_copy = line != b"\\.\n";
            writer.write_all(&line)?;
            continue;
        }
        if line.starts_with(b"COPY ") && line.ends_with(b" FROM stdin;\n") {
            in_copy = true;
        } else if unlink_large_objects {
            if let Some(oid) = line
                .strip_prefix(b"SELECT pg_catalog.lo_create('")
                .and_then(|rest| rest.strip_suffix(b"');\n"))
                .filter(|oid| !oid.is_empty() && oid.iter().all(u8::is_ascii_digit))
            {
                writer.write_all(b"SELECT pg_catalog.lo_unlink(oid) FROM pg_catalog.pg_largeobject_metadata WHERE oid = '")?;
                writer.write_all(oid)?;
                writer.write_all(b"';\n")?;
            }
        }
        if in_drops {
            if is_entry_header(&line) {
                in_drops = false;
            } else if let Some(guarded) = guard_drop(&line) {
                writer.write_all(&guarded)?;
                continue;
            }
        }
        if !opened && line == b"BEGIN;\n" {
            opened = true;
            continue;
        }
        if !held.is_empty() {
            // pg_dump 15.14+ ends scripts with `\unrestrict <key>`, after the final COMMIT.
            let insignificant = line.iter().all(u8::is_ascii_whitespace)
                || line.starts_with(b"--")
                || line.starts_with(b"\\unrestrict ");
            if insignificant {
                held.extend_from_slice(&line);
                continue;
            }
            writer.write_all(&held)?;
            held.clear();
        }
        if line == b"COMMIT;\n" {
            held.extend_from_slice(&line);
        } else {
            writer.write_all(&line)?;
        }
    }
    writer.flush()?;
    let psql = writer.into_inner().map_err(|e| e.into_error())?;
    Ok((psql, held))
}

/// Drop the statements of a pg_dumpall globals script that would fail or do harm on this
/// target: creating roles and tablespaces that already exist, and changing the role kura is
/// connected as (restoring its old password would lock the operator out mid-restore).
fn filter_globals(
    script: &str,
    current_user: &str,
    roles: &[String],
    tablespaces: &[String],
) -> GlobalsScript {
    let mut out = GlobalsScript {
        sql: String::with_capacity(script.len()),
        creates_tablespace: false,
    };
    for line in script.lines() {
        let skip = if let Some(rest) = line.strip_prefix("CREATE ROLE ") {
            parse_ident(rest).is_some_and(|(name, _)| roles.contains(&name))
        } else if let Some(rest) = line.strip_prefix("ALTER ROLE ") {
            parse_ident(rest)
                .is_some_and(|(name, tail)| name == current_user && tail.starts_with(" WITH "))
        } else if let Some(rest) = line.strip_prefix("CREATE TABLESPACE ") {
            parse_ident(rest).is_some_and(|(name, _)| tablespaces.contains(&name))
        } else {
            false
        };
        if skip {
            tracing::debug!("skipping a globals statement that exists on the target already");
        } else {
            // pg_dumpall writes one statement per line, so a statement starts a line.
            out.creates_tablespace |= line.starts_with("CREATE TABLESPACE ");
            out.sql.push_str(line);
            out.sql.push('\n');
        }
    }
    out
}

/// The globals statements to run on this target.
struct GlobalsScript {
    sql: String,
    /// CREATE TABLESPACE cannot run inside a transaction block.
    creates_tablespace: bool,
}

/// Parse one SQL identifier (quoted or not) at the start of `text`: (name, rest).
fn parse_ident(text: &str) -> Option<(String, &str)> {
    if let Some(rest) = text.strip_prefix('"') {
        let mut name = String::new();
        let mut chars = rest.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            if c == '"' {
                if matches!(chars.peek(), Some((_, '"'))) {
                    chars.next();
                    name.push('"');
                } else {
                    return Some((name, &rest[i + 1..]));
                }
            } else {
                name.push(c);
            }
        }
        None
    } else {
        let end = text
            .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == '$'))
            .unwrap_or(text.len());
        (end > 0).then(|| (text[..end].to_lowercase(), &text[end..]))
    }
}

fn parse_tables(tables: &[String]) -> Result<Vec<(String, String)>> {
    tables
        .iter()
        .map(|t| match t.split_once('.') {
            Some((schema, table)) if !schema.is_empty() && !table.is_empty() => {
                Ok((schema.to_string(), table.to_string()))
            }
            None if !t.is_empty() => Ok(("public".to_string(), t.clone())),
            _ => Err(Error::usage(format!(
                "--table {t:?}: expected SCHEMA.TABLE"
            ))),
        })
        .collect()
}

async fn existing_roles(
    client: &tokio_postgres::Client,
    target: &Connection,
) -> Result<Vec<String>> {
    Ok(client
        .query("SELECT rolname::text FROM pg_roles", &[])
        .await
        .map_err(|e| query_error(target, "listing roles", e))?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Objects a fresh `CREATE DATABASE … TEMPLATE template0` does not have.
async fn user_object_count(client: &tokio_postgres::Client, target: &Connection) -> Result<i64> {
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                     WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname !~ '^pg_(toast|temp)') \
                  + (SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
                     WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')) \
                  + (SELECT count(*) FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace \
                     WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname !~ '^pg_(toast|temp)' \
                       AND t.typrelid = 0 AND t.typelem = 0) \
                  + (SELECT count(*) FROM pg_extension WHERE extname <> 'plpgsql') \
                  + (SELECT count(*) FROM pg_largeobject_metadata) \
                  + (SELECT count(*) FROM pg_namespace WHERE nspname NOT IN ('public', 'information_schema') \
                     AND nspname !~ '^pg_')",
            &[],
        )
        .await
        .map_err(|e| query_error(target, "checking whether the target database is empty", e))?;
    Ok(row.get(0))
}

async fn existing_tables(
    client: &tokio_postgres::Client,
    target: &Connection,
    tables: &[(String, String)],
) -> Result<bool> {
    for (schema, table) in tables {
        let name = format!("{}.{}", quote_ident(schema), quote_ident(table));
        let row = client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&name])
            .await
            .map_err(|e| query_error(target, "checking the target table", e))?;
        if row.get::<_, bool>(0) {
            return Ok(true);
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy_lines(chunks: &[&[u8]]) -> Result<()> {
        let table = TableName {
            schema: "public".into(),
            name: "t".into(),
        };
        let mut lines = CopyLines::default();
        for chunk in chunks {
            lines.check(chunk, &table)?;
        }
        lines.finish(&table)
    }

    #[test]
    fn copy_text_that_would_end_psqls_rows_early_or_is_cut_short_is_refused() {
        // Whole lines, with escapes COPY does write: a leading NULL or backslash.
        assert!(copy_lines(&[b"1\tx\n\\N\t\\\\.\n"]).is_ok());
        assert!(copy_lines(&[]).is_ok());
        assert!(copy_lines(&[b"a.\n", b".\\.\n"]).is_ok());
        // An end-of-data line, also when split between reads.
        assert!(copy_lines(&[b"1\n\\.\nDROP TABLE t;\n"]).is_err());
        assert!(copy_lines(&[b"\\.\n"]).is_err());
        assert!(copy_lines(&[b"1\n", b"\\", b".\n"]).is_err());
        assert!(copy_lines(&[b"1\n\\", b".x\n"]).is_err());
        // A last line without its newline.
        assert!(copy_lines(&[b"1\n2"]).is_err());
    }

    fn forward(script: &str) -> (String, String) {
        let (out, held) = forward_script(script.as_bytes(), Vec::new(), false).unwrap();
        (
            String::from_utf8(out).unwrap(),
            String::from_utf8(held).unwrap(),
        )
    }

    #[test]
    fn near_matches_find_typos_schemas_and_case() {
        let known: Vec<String> = [
            "public.orders",
            "sales.orders",
            "public.customers",
            "public.Order Lines",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            near_matches("public.ordres", &known),
            vec!["public.orders".to_string(), "sales.orders".to_string()]
        );
        assert_eq!(
            near_matches("public.CUSTOMERS", &known),
            vec!["public.customers".to_string()]
        );
        assert!(near_matches("public.invoices", &known).is_empty());
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn final_commit_is_held_back() {
        let (sent, held) =
            forward("BEGIN;\nCREATE TABLE t();\nCOMMIT;\n\n--\n-- done\n--\n\\unrestrict abc\n\n");
        assert_eq!(sent, "CREATE TABLE t();\n");
        assert_eq!(held, "COMMIT;\n\n--\n-- done\n--\n\\unrestrict abc\n\n");
    }

    #[test]
    fn inner_commit_lines_pass_through() {
        let script = "BEGIN;\nCOPY t (x) FROM stdin;\nCOMMIT;\n\\.\nCOMMIT;\n";
        let (sent, held) = forward(script);
        assert_eq!(sent, "COPY t (x) FROM stdin;\nCOMMIT;\n\\.\n");
        assert_eq!(held, "COMMIT;\n");
    }

    #[test]
    fn drops_are_split_from_the_creates_and_inherited_constraints_tolerated() {
        let script = "--\n-- PostgreSQL database dump\n--\n\n\\restrict k\n\nSET lock_timeout = 0;\n\
            SELECT pg_catalog.set_config('search_path', '', false);\n\n\
            ALTER TABLE IF EXISTS ONLY app.p DROP CONSTRAINT IF EXISTS p_fkey;\n\
            DROP INDEX IF EXISTS app.p_v;\nSET default_tablespace = '';\n\n\
            --\n-- Name: p p_pkey; Type: CONSTRAINT; Schema: app; Owner: o\n--\n\n\
            ALTER TABLE ONLY app.p\n    ADD CONSTRAINT p_pkey PRIMARY KEY (id);\n\n\\unrestrict k\n";
        let split = |script: &str| {
            let (drops, rest) = split_off_drops(script.as_bytes());
            (
                String::from_utf8(drops).unwrap(),
                String::from_utf8(rest).unwrap(),
            )
        };
        let (drops, rest) = split(script);
        assert_eq!(
            drops,
            "SET lock_timeout = 0;\nSELECT pg_catalog.set_config('search_path', '', false);\n\
             DO $kura_drop$ BEGIN ALTER TABLE IF EXISTS ONLY app.p DROP CONSTRAINT IF EXISTS p_fkey; \
             EXCEPTION WHEN invalid_table_definition THEN NULL; END $kura_drop$;\nDROP INDEX IF EXISTS app.p_v;\n\
             SET default_tablespace = '';\n"
        );
        assert!(rest.starts_with("--\n-- PostgreSQL database dump"));
        assert!(rest.contains("\\restrict k\n") && rest.contains("SET default_tablespace = '';"));
        assert!(rest.contains("ADD CONSTRAINT p_pkey") && !rest.contains("DROP"));
        // Without --clean there is nothing to split off.
        let (drops, rest) = split(
            &script
                .replace(
                    "ALTER TABLE IF EXISTS ONLY app.p DROP CONSTRAINT IF EXISTS p_fkey;\n",
                    "",
                )
                .replace("DROP INDEX IF EXISTS app.p_v;\n", ""),
        );
        assert!(!drops.contains("DROP"), "{drops}");
        assert!(rest.contains("ADD CONSTRAINT p_pkey"));
        // Names in the dump's encoding (LATIN1 here) pass through as the bytes they are.
        let (drops, _) = split_off_drops(
            b"SET client_encoding = 'LATIN1';\nALTER TABLE IF EXISTS ONLY app.\"gr\xfc\" DROP CONSTRAINT IF EXISTS \"k\xe9\";\n",
        );
        assert_eq!(
            drops,
            b"SET client_encoding = 'LATIN1';\nDO $kura_drop$ BEGIN ALTER TABLE IF EXISTS ONLY app.\"gr\xfc\" \
              DROP CONSTRAINT IF EXISTS \"k\xe9\"; EXCEPTION WHEN invalid_table_definition THEN NULL; END $kura_drop$;\n"
        );
        // The same guard in a whole archive's script, before its first entry only.
        let (sent, _) = forward("BEGIN;\nALTER TABLE IF EXISTS ONLY a.b DROP CONSTRAINT IF EXISTS c;\n-- Name: t; Type: TABLE\nALTER TABLE IF EXISTS ONLY a.b DROP CONSTRAINT IF EXISTS c;\nCOMMIT;\n");
        assert_eq!(sent.matches("DO $kura_drop$").count(), 1, "{sent}");
    }

    #[test]
    fn large_objects_are_unlinked_before_they_are_created_again() {
        let script = "SELECT pg_catalog.lo_create('16408');\nCOPY a.t (v) FROM stdin;\nSELECT pg_catalog.lo_create('1');\n\\.\nSELECT pg_catalog.lo_open('16408', 131072);\n";
        let (out, _) = forward_script(script.as_bytes(), Vec::new(), true).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "SELECT pg_catalog.lo_unlink(oid) FROM pg_catalog.pg_largeobject_metadata WHERE oid = '16408';\n\
             SELECT pg_catalog.lo_create('16408');\nCOPY a.t (v) FROM stdin;\nSELECT pg_catalog.lo_create('1');\n\\.\n\
             SELECT pg_catalog.lo_open('16408', 131072);\n"
        );
    }

    #[test]
    fn truncated_script_holds_nothing() {
        let (_, held) = forward("BEGIN;\nCREATE TABLE t();\n");
        assert!(held.is_empty());
    }

    #[test]
    fn globals_filter() {
        let script = "CREATE ROLE app;\nALTER ROLE app WITH LOGIN;\nCREATE ROLE postgres;\nALTER ROLE postgres WITH SUPERUSER PASSWORD 'x';\nCREATE ROLE \"New \"\"Role\"\"\";\nGRANT app TO \"New \"\"Role\"\"\" GRANTED BY postgres;\n";
        let roles = vec!["postgres".to_string(), "app".to_string()];
        let out = filter_globals(script, "postgres", &roles, &[]);
        assert_eq!(
            out.sql,
            "ALTER ROLE app WITH LOGIN;\nCREATE ROLE \"New \"\"Role\"\"\";\nGRANT app TO \"New \"\"Role\"\"\" GRANTED BY postgres;\n"
        );
        assert!(!out.creates_tablespace);

        // Only a statement creates a tablespace; the words inside a comment do not.
        let script = "-- CREATE TABLESPACE is below\nCOMMENT ON ROLE app IS 'after CREATE TABLESPACE';\nCREATE TABLESPACE fast OWNER app LOCATION '/ssd';\n";
        assert!(filter_globals(script, "postgres", &roles, &[]).creates_tablespace);
        let existing = vec!["fast".to_string()];
        assert!(!filter_globals(script, "postgres", &roles, &existing).creates_tablespace);
    }

    #[test]
    fn identifiers() {
        assert_eq!(
            parse_ident("\"a \"\"b\"\"\";"),
            Some(("a \"b\"".into(), ";"))
        );
        assert_eq!(parse_ident("App_1 WITH"), Some(("app_1".into(), " WITH")));
        assert_eq!(
            parse_tables(&["s.t".into(), "t".into()]).unwrap()[1].0,
            "public"
        );
    }
}
