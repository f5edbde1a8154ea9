//! `kura backup` for PostgreSQL: globals, then every selected database, each streamed through
//! the pipeline as its own part object. The caller writes the manifest after this returns.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::TryStreamExt;

use super::preflight::{self, DatabaseProps, ServerInfo};
use tokio::sync::Semaphore;

use super::{
    quote_literal, Connection, CopyText, DataPiece, TableName, Tools, COPY_FORMAT, DATABASE_KIND,
    DATA_FORMAT, GLOBALS_KIND, SCHEMA_FORMAT, TABLE_DATA_KIND, WHOLE_FORMAT,
};
use crate::catalog::{BackupId, Part};
use crate::engine::{BackupContext, BackupOutcome, Selection};
use crate::error::{Error, ErrorKind, Result};
use crate::pipeline::{self, Stored};
use crate::process::ChildProcess;
use crate::progress::{human_bytes, Progress, ProgressLine};

pub struct PostgresBackup {
    pub connection: Connection,
    pub selection: Selection,
    pub bin_dir: Option<PathBuf>,
    pub lock_wait_timeout: std::time::Duration,
    /// With `--jobs` > 1, tables of at least this size get a part of their own.
    pub split_table_bytes: u64,
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
            .dump(ctx, id, name, globals, "pg_dumpall", line.progress())
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

        line.expect(databases.len(), "databases");
        // Databases side by side, each from its own snapshot, as pg_dump would dump them one
        // by one; the parts keep the databases' order whatever order they finish in.
        let streams = Semaphore::new(ctx.jobs);
        let database_parts = crate::jobs::run_all(
            databases.iter().enumerate().collect(),
            ctx.jobs,
            &ctx.cancel,
            |(index, database), stop| {
                let ctx = ctx.with_cancel(stop);
                let (tools, line, streams) = (&tools, &line, &streams);
                let server_major = info.major;
                async move {
                    self.backup_database(
                        &ctx,
                        id,
                        tools,
                        server_major,
                        index,
                        database,
                        line,
                        streams,
                    )
                    .await
                }
            },
        )
        .await?;
        let split = database_parts.iter().any(|parts| parts.len() > 1);
        parts.extend(database_parts.into_iter().flatten());
        line.finish().await;
        Ok(BackupOutcome {
            server_version: info.version,
            tool_version: tools.version,
            parts,
            format_version: match split {
                true => crate::catalog::MANIFEST_VERSION,
                false => crate::catalog::BASE_MANIFEST_VERSION,
            },
        })
    }

    /// One database from one exported snapshot: a single archive, or (with `--jobs` and
    /// large tables) its schema, each large table's rows and the rest of its data as parts
    /// read side by side, with the rows counted in the same snapshot.
    #[allow(clippy::too_many_arguments)]
    async fn backup_database(
        &self,
        ctx: &BackupContext<'_>,
        id: &BackupId,
        tools: &Tools,
        server_major: u32,
        index: usize,
        database: &DatabaseProps,
        line: &ProgressLine,
        streams: &Semaphore,
    ) -> Result<Vec<Part>> {
        let started = Instant::now();
        let snapshot =
            Snapshot::export(&self.connection, &database.name, self.lock_wait_timeout).await?;
        let exclusions = self.exclusions()?;
        let large = match ctx.jobs {
            1 => Vec::new(),
            jobs => snapshot
                .large_tables(&exclusions, jobs, self.split_table_bytes, tools.major)
                .await
                .map_err(|e| {
                    e.context(format!(
                        "listing the tables of database {:?}",
                        database.name
                    ))
                })?,
        };
        let pieces = Piece::plan(index, large);
        // Every reader of the database starts now and takes its table locks at once, as one
        // pg_dump would; only then do they wait for their turn to stream (one budget of
        // --jobs streams for the whole backup, which is what bounds memory), blocked on a
        // full pipe. One started later would queue its locks behind any DDL that arrived
        // meanwhile, which itself waits for the snapshot's transaction: stuck until
        // --lock-wait-timeout. The COPY sessions lock their tables before any pg_dump
        // starts: a pg_dump holds its locks while nobody reads it yet, and a COPY session
        // queued behind DDL that waits for that pg_dump would wait for the timeout.
        let opened = async {
            let opening = pieces.iter().filter_map(|piece| match &piece.kind {
                PieceKind::Table(table) => Some(TableCopy::open(
                    &self.connection,
                    &database.name,
                    &snapshot.id,
                    table,
                    self.lock_wait_timeout,
                    server_major,
                )),
                _ => None,
            });
            let mut copies = tokio::select! {
                copies = futures::future::try_join_all(opening) => copies?.into_iter(),
                _ = ctx.cancel.cancelled() => return Err(Error::interrupted()),
            };
            let mut readers = Vec::with_capacity(pieces.len());
            for piece in &pieces {
                let reader = match &piece.kind {
                    PieceKind::Table(_) => {
                        Reader::Copy(Box::new(copies.next().expect("opened in order")))
                    }
                    _ => {
                        let dump = self.piece_command(tools, database, &snapshot.id, piece);
                        Reader::Dump(ChildProcess::spawn(dump, "pg_dump", false, true)?)
                    }
                };
                readers.push((piece, reader));
            }
            Ok(readers)
        };
        let readers = match opened.await {
            Ok(readers) => readers,
            Err(e) => {
                let e = e.context(format!("backing up database {:?}", database.name));
                return Err(self
                    .explain_lock_wait(&database.name, e, started.elapsed(), ctx)
                    .await);
            }
        };
        // Rows are counted in the backup's snapshot while it runs, so `verify --deep` can
        // compare a restore with exactly what was dumped; a table read by COPY is counted
        // as its rows go by. The exporting transaction stays open until every reader is
        // done: its snapshot must outlive their imports of it.
        let copied: Vec<TableName> = pieces
            .iter()
            .filter_map(|piece| match &piece.kind {
                PieceKind::Table(table) => Some(table.clone()),
                _ => None,
            })
            .collect();
        let dumping =
            crate::jobs::run_all(readers, ctx.jobs, &ctx.cancel, |(piece, reader), stop| {
                let ctx = ctx.with_cancel(stop);
                async move {
                    let _stream = tokio::select! {
                        permit = streams.acquire() => permit.map_err(|_| Error::interrupted())?,
                        _ = ctx.cancel.cancelled() => return Err(Error::interrupted()),
                    };
                    let job = line.job(piece.label(&database.name), None);
                    match reader {
                        Reader::Dump(child) => Ok(Streamed {
                            stored: self
                                .stream(&ctx, id, &piece.key, child, "pg_dump", job)
                                .await?,
                            copy: None,
                        }),
                        Reader::Copy(copy) => {
                            self.stream_copy(&ctx, id, &piece.key, *copy, job).await
                        }
                    }
                }
            });
        let counting = async {
            tokio::select! {
                counts = snapshot.count_rows(&exclusions, &copied) => counts,
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
        let (streamed, counts) = match (stored, counts) {
            (Ok(streamed), Ok(mut counts)) => {
                for (piece, streamed) in pieces.iter().zip(&streamed) {
                    if let (PieceKind::Table(table), Some((_, rows))) =
                        (&piece.kind, &streamed.copy)
                    {
                        counts.insert(table.to_string(), *rows);
                    }
                }
                (streamed, Some(counts))
            }
            // The dump is whole; only the counting queued behind another session's lock
            // request (a migration waiting for pg_dump). The counts are a check for
            // `verify --deep`, not part of the backup: keep the dump without them.
            (Ok(streamed), Err(e)) if gave_up_on_a_lock(&e) => {
                tracing::warn!(database = %database.name, "counting the rows waited {} for a lock and gave up; the database is backed up without row counts, so verify --deep will only restore it", crate::config::format_duration(self.lock_wait_timeout));
                (streamed, None)
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
        line.one_done();
        let raw_bytes: u64 = streamed.iter().map(|s| s.stored.raw_bytes).sum();
        let stored_bytes: u64 = streamed.iter().map(|s| s.stored.stored.bytes).sum();
        tracing::info!(
            database = %database.name,
            raw_bytes,
            stored_bytes,
            parts = streamed.len(),
            seconds = started.elapsed().as_secs_f64(),
            "database {:?} backed up: {} → {}{}",
            database.name,
            human_bytes(raw_bytes),
            human_bytes(stored_bytes),
            match streamed.len() {
                1 => String::new(),
                n => format!(" in {n} parts from one snapshot"),
            }
        );
        let properties = serde_json::to_value(database)
            .map_err(|e| Error::failed(format!("encoding database properties: {e}")))?;
        let schema_key = pieces[0].key.clone();
        let mut parts = Vec::with_capacity(pieces.len());
        for (piece, streamed) in pieces.iter().zip(&streamed) {
            let stored = &streamed.stored;
            let part = match &piece.kind {
                PieceKind::Whole | PieceKind::Schema => {
                    let format = match piece.kind {
                        PieceKind::Whole => WHOLE_FORMAT,
                        _ => SCHEMA_FORMAT,
                    };
                    let mut database_part = part(
                        &piece.key,
                        &database.name,
                        DATABASE_KIND,
                        format,
                        stored,
                        ctx,
                        properties.clone(),
                    );
                    database_part.counts = counts.clone();
                    database_part
                }
                PieceKind::Table(table) => data_part(
                    &piece.key,
                    database,
                    DataPiece {
                        of: schema_key.clone(),
                        table: Some(table.clone()),
                        copy: streamed.copy.as_ref().map(|(text, _)| text.clone()),
                    },
                    stored,
                    ctx,
                )?,
                PieceKind::Rest(_) => data_part(
                    &piece.key,
                    database,
                    DataPiece {
                        of: schema_key.clone(),
                        table: None,
                        copy: None,
                    },
                    stored,
                    ctx,
                )?,
            };
            if pieces.len() > 1 {
                // A Job's log shows which part of a split database took the bytes.
                let what = match &piece.kind {
                    PieceKind::Table(table) => format!("the data of table {table}"),
                    PieceKind::Rest(_) => "the data of the other tables".to_string(),
                    _ => "the schema".to_string(),
                };
                tracing::info!(database = %database.name, part = %part.key, raw_bytes = part.raw_bytes, stored_bytes = part.stored_bytes, "part {} of {:?}: {what}, {} → {}", part.key, database.name, human_bytes(part.raw_bytes), human_bytes(part.stored_bytes));
            }
            parts.push(part);
        }
        Ok(parts)
    }

    /// The pg_dump that writes `piece`, in `snapshot`.
    fn piece_command(
        &self,
        tools: &Tools,
        database: &DatabaseProps,
        snapshot: &str,
        piece: &Piece,
    ) -> std::process::Command {
        let mut dump = self.connection.command(&tools.pg_dump, &database.name);
        // Custom format: restorable table by table. pg_dump's own compression is off because
        // zstd does it better and faster downstream.
        dump.args(["--format=custom", "--compress=0", "--no-password"]);
        for pattern in &self.selection.exclude_tables {
            dump.arg(format!("--exclude-table={pattern}"));
        }
        for pattern in &self.selection.exclude_table_data {
            dump.arg(format!("--exclude-table-data={pattern}"));
        }
        match &piece.kind {
            PieceKind::Whole => {}
            // Not --schema-only, which would also leave out the materialized views' REFRESH
            // (post-data, but data to pg_dump); large objects are in the rest of the data.
            PieceKind::Schema => {
                dump.args(["--section=pre-data", "--section=post-data", "--no-blobs"]);
            }
            PieceKind::Table(_) => unreachable!("a large table's rows are read by COPY"),
            PieceKind::Rest(tables) => {
                dump.arg("--data-only");
                for table in tables {
                    dump.arg(format!("--exclude-table-data={}", table.pattern()));
                }
            }
        }
        dump.arg(format!(
            "--lock-wait-timeout={}",
            self.lock_wait_timeout.as_millis()
        ));
        dump.arg(format!("--snapshot={snapshot}"));
        dump
    }

    async fn dump(
        &self,
        ctx: &BackupContext<'_>,
        id: &BackupId,
        name: &str,
        command: std::process::Command,
        tool: &'static str,
        progress: Progress,
    ) -> Result<Stored> {
        let child = ChildProcess::spawn(command, tool, false, true)?;
        self.stream(ctx, id, name, child, tool, progress).await
    }

    /// A dump tool's output through the pipeline into part `name`.
    async fn stream(
        &self,
        ctx: &BackupContext<'_>,
        id: &BackupId,
        name: &str,
        mut child: ChildProcess,
        tool: &'static str,
        progress: Progress,
    ) -> Result<Stored> {
        let key = ctx.path.object_key(id, name);
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
            Some(progress),
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

    /// A large table's rows through the pipeline into part `name`, counted on the way.
    async fn stream_copy(
        &self,
        ctx: &BackupContext<'_>,
        id: &BackupId,
        name: &str,
        copy: TableCopy,
        progress: Progress,
    ) -> Result<Streamed> {
        let key = ctx.path.object_key(id, name);
        let text = copy.text.clone();
        let rows = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&rows);
        let cancel = ctx.cancel.clone();
        let stored = pipeline::store_stream(
            ctx.store,
            &key,
            &ctx.pipeline,
            &ctx.cancel,
            Some(progress),
            move |out: &mut dyn Write| {
                // The pipeline's producer is a blocking thread, where tokio's block_on is
                // refused; the session's connection keeps running on the runtime.
                futures::executor::block_on(async {
                    tokio::select! {
                        copied = copy.copy_to(out) => {
                            counted.store(copied?, Ordering::Relaxed);
                            Ok(())
                        }
                        _ = cancel.cancelled() => Err(Error::interrupted()),
                    }
                })
            },
        )
        .await?;
        Ok(Streamed {
            stored,
            copy: Some((text, rows.load(Ordering::Relaxed))),
        })
    }
}

/// What reads a piece of a database: pg_dump, or kura's own COPY of one table.
enum Reader {
    Dump(ChildProcess),
    Copy(Box<TableCopy>),
}

/// A piece in storage; for a table read by COPY, how its text reads back and its rows.
struct Streamed {
    stored: Stored,
    copy: Option<(CopyText, u64)>,
}

/// How much of a table's COPY text is gathered before it goes to the compressor: the server
/// sends a message per row, and zstd pays for every call.
const COPY_CHUNK: usize = 256 << 10;

/// One large table's rows, read with `COPY … TO STDOUT` on a session of its own that
/// imported the database's snapshot and locked the table when it opened, as a `pg_dump -j`
/// worker reads them, without a pg_dump run (which reads the whole catalog) per table.
struct TableCopy {
    client: tokio_postgres::Client,
    table: TableName,
    text: CopyText,
    database: String,
    connection: Connection,
}

/// `SET transaction_timeout = 0;` where the server has it (PostgreSQL 17+), as pg_dump and
/// pg_restore's scripts set it: a role's or database's limit must not end a long COPY.
pub(super) fn no_transaction_timeout(server_major: u32) -> &'static str {
    match server_major >= 17 {
        true => "SET transaction_timeout = 0; ",
        false => "",
    }
}

impl TableCopy {
    async fn open(
        connection: &Connection,
        database: &str,
        snapshot: &str,
        table: &TableName,
        lock_wait_timeout: Duration,
        server_major: u32,
    ) -> Result<TableCopy> {
        let client = connection.connect(database).await?;
        let what =
            format!("reading table {table} of database {database:?} in the backup's snapshot");
        let failed = |e| preflight::query_error(connection, &what, e);
        // pg_dump's own session settings: dates, intervals and floats written so that any
        // server reads them back exactly, names in values (regclass) schema-qualified, and
        // row-level security off, so that a policy that would hide rows is an error rather
        // than a silently smaller table. The lock waits as long as pg_dump's would.
        let setup = format!(
            "SET statement_timeout = 0; SET idle_in_transaction_session_timeout = 0; {}\
             SET lock_timeout = {}; SET DateStyle = ISO; SET IntervalStyle = postgres; \
             SET extra_float_digits = 3; SET synchronize_seqscans = off; \
             SET row_security = off; SET search_path = ''; \
             BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}; \
             LOCK TABLE {} IN ACCESS SHARE MODE",
            no_transaction_timeout(server_major),
            lock_wait_timeout.as_millis(),
            quote_literal(snapshot),
            table.pattern()
        );
        client.batch_execute(&setup).await.map_err(failed)?;
        // The lock came after the snapshot: a TRUNCATE or a rewrite (ALTER TABLE) committed
        // in between, perhaps while this session queued behind it, leaves the table empty to
        // the snapshot (neither is MVCC-safe), which would be backed up as an empty table.
        // The snapshot's pg_class row and the one the lock protects differ then (and a table
        // dropped and created again has no row in the snapshot). VACUUM FULL and CLUSTER
        // change it too; they are MVCC-safe, but rare enough that failing is cheaper than
        // telling them apart.
        let unchanged: Option<bool> = client
            .query_opt(
                "SELECT c.relfilenode = pg_catalog.pg_relation_filenode(c.oid) \
                   FROM pg_catalog.pg_class c WHERE c.oid = $1::text::regclass",
                &[&table.pattern()],
            )
            .await
            .map_err(failed)?
            .map(|row| row.get(0));
        if unchanged != Some(true) {
            return Err(Error::failed(format!(
                "table {table} of database {database:?} was truncated, rewritten or dropped (TRUNCATE, ALTER TABLE, VACUUM FULL, CLUSTER, DROP) after the backup took its snapshot and before it could lock the table, so its rows cannot be read as of the snapshot; run the backup again"
            )));
        }
        // Generated columns (PostgreSQL 12+) are computed again by the server on restore.
        let generated = match server_major >= 12 {
            true => " AND a.attgenerated = ''",
            false => "",
        };
        let columns = client
            .query(
                &format!(
                    "SELECT a.attname::text FROM pg_catalog.pg_attribute a \
                      WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 \
                        AND NOT a.attisdropped{generated} ORDER BY a.attnum"
                ),
                &[&table.pattern()],
            )
            .await
            .map_err(failed)?
            .iter()
            .map(|row| row.get(0))
            .collect();
        let encoding = client
            .query_one("SELECT current_setting('server_encoding')", &[])
            .await
            .map_err(failed)?
            .get(0);
        Ok(TableCopy {
            client,
            table: table.clone(),
            text: CopyText { columns, encoding },
            database: database.to_string(),
            connection: connection.clone(),
        })
    }

    /// The rows into `out` as COPY text in the database's encoding; how many there were.
    async fn copy_to(self, out: &mut dyn Write) -> Result<u64> {
        let what = format!(
            "reading the rows of table {} of database {:?}",
            self.table, self.database
        );
        let failed = |e| preflight::query_error(&self.connection, &what, e);
        let rows = self
            .client
            .copy_out(&self.text.copy_to(&self.table))
            .await
            .map_err(failed)?;
        futures::pin_mut!(rows);
        let mut chunk = Vec::with_capacity(COPY_CHUNK + (64 << 10));
        let mut count = 0u64;
        let written = |out: &mut dyn Write, chunk: &mut Vec<u8>, count: &mut u64| {
            // One line per row: a newline inside a value is written as `\n`. Counted a
            // chunk at a time (a row is one message of some 100 bytes; memchr's SIMD pays
            // off over kilobytes).
            *count += memchr::memchr_iter(b'\n', chunk).count() as u64;
            let result = out.write_all(chunk);
            chunk.clear();
            result.map_err(|e| match pipeline::is_upload_stopped_io(&e) {
                true => Error::upload_stopped(),
                false => Error::with_source(ErrorKind::Failed, "compressing COPY output", e),
            })
        };
        while let Some(data) = rows.try_next().await.map_err(failed)? {
            chunk.extend_from_slice(&data);
            if chunk.len() >= COPY_CHUNK {
                written(out, &mut chunk, &mut count)?;
            }
        }
        written(out, &mut chunk, &mut count)?;
        Ok(count)
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

/// One archive of a database's backup.
struct Piece {
    kind: PieceKind,
    key: String,
}

enum PieceKind {
    /// The whole database: schema and data.
    Whole,
    /// The schema of a split database: pre-data and post-data, with the materialized views'
    /// REFRESH and without large objects.
    Schema,
    /// One large table's rows, read by [`TableCopy`].
    Table(TableName),
    /// Every other row: small tables, sequence values, large objects.
    Rest(Vec<TableName>),
}

impl Piece {
    /// The database as one archive, or (with at least two large tables, which is when
    /// reading them side by side pays for the extra sessions) its schema, then its
    /// largest tables first, so the longest dumps start first, then the rest.
    fn plan(index: usize, large: Vec<TableName>) -> Vec<Piece> {
        let key = BackupContext::database_part_name(index, "pgdump");
        if large.len() < 2 {
            return vec![Piece {
                kind: PieceKind::Whole,
                key,
            }];
        }
        let mut pieces = vec![Piece {
            kind: PieceKind::Schema,
            key,
        }];
        for (n, table) in large.iter().enumerate() {
            pieces.push(Piece {
                kind: PieceKind::Table(table.clone()),
                key: BackupContext::database_piece_name(index, n + 1, "copy"),
            });
        }
        pieces.push(Piece {
            key: BackupContext::database_piece_name(index, large.len() + 1, "pgdump"),
            kind: PieceKind::Rest(large),
        });
        pieces
    }

    fn label(&self, database: &str) -> String {
        match &self.kind {
            PieceKind::Whole => database.to_string(),
            PieceKind::Schema => format!("{database} (schema)"),
            PieceKind::Table(table) => format!("{database} ({table})"),
            PieceKind::Rest(_) => format!("{database} (other tables)"),
        }
    }
}

fn data_part(
    key: &str,
    database: &DatabaseProps,
    piece: DataPiece,
    stored: &Stored,
    ctx: &BackupContext<'_>,
) -> Result<Part> {
    let format = match piece.copy {
        Some(_) => COPY_FORMAT,
        None => DATA_FORMAT,
    };
    let properties = serde_json::to_value(&piece)
        .map_err(|e| Error::failed(format!("encoding a part's properties: {e}")))?;
    Ok(part(
        key,
        &database.name,
        TABLE_DATA_KIND,
        format,
        stored,
        ctx,
        properties,
    ))
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

    /// The tables worth a part of their own, largest first, at most `2 × jobs` (8 at most):
    /// tables pg_dump writes the rows of (as [`super::count_rows`] lists them) of at least
    /// `min_bytes`, and none the backup leaves out or empties. Sizes are the catalog's
    /// page counts, as pg_dump -j orders its work by them: reading the files' sizes would
    /// take a lock on each table and queue behind a migration holding one (a table never
    /// vacuumed or analysed counts as empty, and is dumped with the rest).
    ///
    /// Large objects are data to pg_dump up to version 16: `--data-only` writes them with
    /// their owners, grants and comments, and `--no-blobs` leaves them out. pg_dump 17
    /// reorganised how it dumps them, and that split is not verified here: with a newer
    /// pg_dump, a database that holds large objects is dumped whole.
    async fn large_tables(
        &self,
        exclusions: &super::TableExclusions,
        jobs: usize,
        min_bytes: u64,
        pg_dump_major: u32,
    ) -> Result<Vec<TableName>> {
        let failed = |e| Error::with_source(ErrorKind::Database, "sizing the tables", e);
        let has_large_objects: bool = self
            .client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_largeobject_metadata)",
                &[],
            )
            .await
            .map_err(failed)?
            .get(0);
        if has_large_objects && pg_dump_major > 16 {
            return Ok(Vec::new());
        }
        // Each is a pg_dump session, all open at once (see backup_database).
        let limit = (2 * jobs).min(8) as i64;
        let rows = self
            .client
            .query(
                "SELECT n.nspname::text, c.relname::text
                   FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace,
                        LATERAL (SELECT (c.relpages::bigint + coalesce(
                                          (SELECT t.relpages FROM pg_class t WHERE t.oid = c.reltoastrelid), 0))
                                        * current_setting('block_size')::bigint AS bytes) s
                  WHERE c.relkind = 'r' AND c.relpersistence <> 't'
                    AND n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\\_%'
                    AND NOT EXISTS (SELECT 1 FROM pg_depend d
                                     WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                                       AND d.deptype = 'e')
                    AND s.bytes >= $1
                  ORDER BY s.bytes DESC, 1, 2
                  LIMIT $2",
                &[&(min_bytes.min(i64::MAX as u64) as i64), &limit],
            )
            .await
            .map_err(failed)?;
        // pg_dump reads a --table pattern in the database's encoding; kura's arguments are
        // UTF-8. Elsewhere only ASCII names match for certain.
        let utf8: bool = self
            .client
            .query_one("SELECT current_setting('server_encoding') = 'UTF8'", &[])
            .await
            .map_err(failed)?
            .get(0);
        let left_out = super::TableExclusions::matching(&self.client, &exclusions.tables).await?;
        let emptied = super::TableExclusions::matching(&self.client, &exclusions.data).await?;
        Ok(rows
            .iter()
            .map(|row| TableName {
                schema: row.get(0),
                name: row.get(1),
            })
            .filter(|table| {
                let key = table.to_string();
                (utf8 || key.is_ascii()) && !left_out.contains(&key) && !emptied.contains(&key)
            })
            .collect())
    }

    /// Counted in the snapshot; the transaction stays open until the value is dropped.
    async fn count_rows(
        &self,
        exclusions: &super::TableExclusions,
        counted_elsewhere: &[TableName],
    ) -> Result<std::collections::BTreeMap<String, u64>> {
        super::count_rows(&self.client, exclusions, counted_elsewhere).await
    }
}
