//! Database engines: one folder per kind, each behind the [`Engine`] contract, found through
//! [`connect`], the registry. Commands never name an engine: `ops/` and `cli/` hold a
//! `Box<dyn Engine>` and the manifest's parts.
//!
//! # Contract
//!
//! Every engine MUST behave as follows (the integration tests drive each through the binary):
//!
//! - **`probe`** makes one real request (a query, `GET /`) and says what answered. It does not
//!   retry: `wait-for` has the retry loop. A missing password or a bad URL is
//!   [`ErrorKind::Usage`]; an unreachable server or rejected credentials are
//!   [`ErrorKind::Database`].
//! - **`plan_backup`** is the preflight: everything that can fail before an upload starts
//!   (connect, credentials, tool versions, the selection) fails here, and it writes nothing
//!   anywhere, so the caller takes the source's lock only after it succeeded. A `--database`
//!   that does not exist is [`ErrorKind::NotFound`]; a server with no databases is an empty
//!   plan ([`Selection::check_planned`]).
//! - **[`BackupPlan::run`]** writes one part object per database (plus what the server holds
//!   outside databases) through [`crate::pipeline::store_stream`] and returns the parts for the
//!   manifest. It never writes the manifest: the caller commits last. A part is reported only
//!   once its producer is known to have succeeded. On any failure it returns `Err` with child
//!   processes killed and the open upload aborted; parts already stored are the caller's to
//!   delete. On cancellation (`ctx.cancel`) it stops as soon as it can and returns `Err`.
//! - **`restore`** reads parts through [`crate::pipeline::read_verified`] and makes nothing
//!   permanent before that returned `Ok` for the part. A target that already holds data is
//!   refused with [`ErrorKind::TargetNotEmpty`] before anything is written, unless
//!   `request.force`. A database it created for a restore that then failed is removed again.
//!   Options it does not support (`--table` on CouchDB) are [`ErrorKind::Usage`].
//! - **`count_in_scratch`** restores one part into a new scratch database of the given name,
//!   counts what the backup recorded in [`Part::counts`] (same keys), and removes the scratch
//!   database again whatever happened.
//! - No password is passed on a child process's command line, nor printed.

use std::collections::BTreeMap;
use std::path::PathBuf;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use std::sync::Arc;

use crate::catalog::{BackupId, Compression, Encryption, Manifest, Part, SourcePath};
use crate::config::{SourceKind, SourceUrl};
use crate::error::{Error, Result};
use crate::pipeline::encryption::Identities;
use crate::pipeline::PipelineOptions;
use crate::storage::ObjectStore;

pub mod couchdb;
pub mod postgres;

/// How long a backup waits for a lock on a table before it fails (`--lock-wait-timeout`).
pub const DEFAULT_LOCK_WAIT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// Below this, a table's own pg_dump run (which reads the whole catalog) costs more than
/// dumping it beside the others saves.
pub const DEFAULT_SPLIT_TABLE_BYTES: u64 = 32 << 20;

/// Settings an engine may need beyond its URL.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Directory of the PostgreSQL client tools.
    pub pg_bin_dir: Option<PathBuf>,
    /// How long a dump waits for a table lock held by another session.
    pub lock_wait_timeout: std::time::Duration,
    /// With `--jobs` > 1, a PostgreSQL table of at least this size gets a part of its own.
    pub split_table_bytes: u64,
    /// One attempt per request (`wait-for`, which retries on its own).
    pub single_attempt: bool,
    /// CA files and client certificate for `https://` CouchDB URLs. PostgreSQL takes its TLS
    /// settings from the URL and the `PGSSL*` environment, as libpq does.
    pub couchdb_tls: crate::tls::TlsFiles,
    /// A CouchDB answer that moves no byte for this long is given up and asked again
    /// (`--read-timeout`, shared with the object store).
    pub read_timeout: std::time::Duration,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            pg_bin_dir: None,
            lock_wait_timeout: DEFAULT_LOCK_WAIT_TIMEOUT,
            split_table_bytes: DEFAULT_SPLIT_TABLE_BYTES,
            single_attempt: false,
            couchdb_tls: crate::tls::TlsFiles::default(),
            read_timeout: crate::storage::DEFAULT_READ_TIMEOUT,
        }
    }
}

/// The registry: the one place that knows which engine serves which kind of source.
pub fn connect(
    kind: SourceKind,
    url: SourceUrl,
    options: &EngineOptions,
) -> Result<Box<dyn Engine>> {
    Ok(match kind {
        SourceKind::Postgres => Box::new(postgres::PostgresEngine::new(url, options)?),
        SourceKind::Couchdb => Box::new(couchdb::CouchEngine::new(url, options)?),
    })
}

/// What a part held, in words, from the counts recorded at backup time (for `show`).
pub fn describe_part(kind: SourceKind, part: &Part) -> Option<String> {
    match kind {
        SourceKind::Postgres => postgres::describe_part(part),
        SourceKind::Couchdb => couchdb::describe_part(part),
    }
}

/// One kind of database server, reached through one URL. See the module's contract.
#[async_trait]
pub trait Engine: Send + Sync {
    /// The server, safe to print.
    fn target(&self) -> String;

    /// One request that proves the server answers; returns what answered ("PostgreSQL 15.4").
    async fn probe(&self) -> Result<String>;

    /// The preflight of a backup.
    async fn plan_backup(&self, selection: &Selection) -> Result<Box<dyn BackupPlan>>;

    /// Restore the parts of `manifest` that `request` selects.
    async fn restore(
        &self,
        ctx: &RestoreContext<'_>,
        manifest: &Manifest,
        request: &RestoreRequest,
    ) -> Result<RestoreSummary>;

    /// The manifest kind of the parts that are databases (what `verify --deep` restores).
    fn database_kind(&self) -> &'static str;

    /// Restore `part` into the new database `scratch`, count it, and remove it again.
    async fn count_in_scratch(
        &self,
        ctx: &RestoreContext<'_>,
        manifest: &Manifest,
        part: &Part,
        scratch: &str,
    ) -> Result<BTreeMap<String, u64>>;
}

/// A backup whose preflight passed.
#[async_trait]
pub trait BackupPlan: Send {
    /// How many databases the backup will hold.
    fn databases(&self) -> usize;

    /// Dump everything planned into parts of backup `id`.
    async fn run(self: Box<Self>, ctx: &BackupContext<'_>, id: &BackupId) -> Result<BackupOutcome>;
}

/// What a backup wrote, for the manifest.
pub struct BackupOutcome {
    pub server_version: String,
    pub tool_version: String,
    pub parts: Vec<Part>,
    /// The oldest manifest format that describes these parts (see [`crate::catalog::MANIFEST_VERSION`]).
    pub format_version: u32,
}

/// What to restore, and how.
#[derive(Debug, Clone)]
pub struct RestoreRequest {
    /// Databases to restore, each under a name; empty means all, under their own names.
    pub databases: Vec<DatabaseMapping>,
    /// `schema.table`: only these tables of the one database (PostgreSQL).
    pub tables: Vec<String>,
    /// Also roles and tablespaces, first (PostgreSQL).
    pub globals: bool,
    /// Write into targets that already hold data.
    pub force: bool,
    /// With `force`, replace an existing database by restoring beside it and swapping the
    /// two (PostgreSQL).
    pub swap: bool,
    /// With `swap`, end the other sessions of the database being replaced instead of
    /// refusing.
    pub terminate_sessions: bool,
    /// Upper bound of one write request (CouchDB `_bulk_docs`).
    pub batch_bytes: usize,
}

/// What a restore did, for its closing log line.
#[derive(Debug, Default)]
pub struct RestoreSummary {
    pub databases: Vec<String>,
    pub raw_bytes: u64,
    /// Engine-specific facts for the log line ("2003 revisions", "with globals").
    pub detail: Vec<(String, u64)>,
}

/// What every engine needs to write a backup.
pub struct BackupContext<'a> {
    pub store: &'a dyn ObjectStore,
    pub path: SourcePath,
    pub pipeline: PipelineOptions,
    pub cancel: CancellationToken,
    /// Draw a progress line on a terminal (false for JSON logs).
    pub show_progress: bool,
    /// Databases dumped at the same time (`--jobs`).
    pub jobs: usize,
}

impl BackupContext<'_> {
    /// How the pipeline compresses, as every part's manifest entry records it.
    pub fn compression(&self) -> Compression {
        Compression {
            algorithm: "zstd".into(),
            level: self.pipeline.compression_level,
        }
    }

    /// How the pipeline encrypts, as every part's manifest entry records it.
    pub fn encryption(&self) -> Option<Encryption> {
        self.pipeline
            .encryption
            .as_ref()
            .map(|recipients| recipients.manifest_entry())
    }

    /// The object name of the `index`-th database (from 0): `db-0001.<extension>.zst`. Names
    /// carry no database name, which may hold any character.
    pub fn database_part_name(index: usize, extension: &str) -> String {
        format!("db-{:04}.{extension}.zst", index + 1)
    }

    /// The object name of the `piece`-th extra part (from 1) of the `index`-th database, when
    /// one database is written as several parts: `db-0001.data-001.<extension>.zst`.
    pub fn database_piece_name(index: usize, piece: usize, extension: &str) -> String {
        format!("db-{:04}.data-{piece:03}.{extension}.zst", index + 1)
    }
}

/// What every engine needs to restore.
pub struct RestoreContext<'a> {
    pub store: &'a dyn ObjectStore,
    pub path: SourcePath,
    pub backup_id: BackupId,
    pub cancel: CancellationToken,
    pub show_progress: bool,
    /// Keys for encrypted parts; the operation checked they open every part it reads.
    pub identities: Option<Arc<Identities>>,
    /// Databases restored at the same time (`--jobs`).
    pub jobs: usize,
}

impl<'a> BackupContext<'a> {
    /// The same context, stopping on `cancel`: one job's view of a run of parallel jobs.
    pub fn with_cancel(&self, cancel: CancellationToken) -> BackupContext<'a> {
        BackupContext {
            store: self.store,
            path: self.path.clone(),
            pipeline: self.pipeline.clone(),
            cancel,
            show_progress: self.show_progress,
            jobs: self.jobs,
        }
    }
}

impl<'a> RestoreContext<'a> {
    /// The same context, stopping on `cancel`: one job's view of a run of parallel jobs.
    pub fn with_cancel(&self, cancel: CancellationToken) -> RestoreContext<'a> {
        RestoreContext {
            store: self.store,
            path: self.path.clone(),
            backup_id: self.backup_id.clone(),
            cancel,
            show_progress: self.show_progress,
            identities: self.identities.clone(),
            jobs: self.jobs,
        }
    }
}

impl RestoreContext<'_> {
    /// The keys to read `part` with: `None` for a part that is not encrypted.
    pub fn unseal(&self, part: &Part) -> Result<Option<Arc<Identities>>> {
        match (&part.encryption, &self.identities) {
            (None, _) => Ok(None),
            (Some(_), Some(identities)) => Ok(Some(Arc::clone(identities))),
            (Some(encryption), None) => Err(Error::usage(format!(
                "part {} is encrypted to {}: pass --identity FILE",
                part.key,
                encryption.recipients.join(", ")
            ))),
        }
    }
}

/// `--database SRC[:DST]`: restore SRC from the backup under the name DST.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseMapping {
    pub source: String,
    pub target: String,
}

impl DatabaseMapping {
    pub fn parse(text: &str) -> Self {
        match text.split_once(':') {
            Some((source, target)) if !target.is_empty() => DatabaseMapping {
                source: source.to_string(),
                target: target.to_string(),
            },
            _ => DatabaseMapping {
                source: text.trim_end_matches(':').to_string(),
                target: text.trim_end_matches(':').to_string(),
            },
        }
    }
}

/// The database parts of `kind` to restore, each with its target name: all of them under
/// their own names when `mappings` is empty. A source database the backup lacks is an error
/// that lists what the backup has.
pub fn select_parts<'m>(
    manifest: &'m Manifest,
    kind: &str,
    mappings: &[DatabaseMapping],
) -> Result<Vec<(&'m Part, String)>> {
    let available: Vec<&Part> = manifest.parts.iter().filter(|p| p.kind == kind).collect();
    if mappings.is_empty() {
        return Ok(available.into_iter().map(|p| (p, p.name.clone())).collect());
    }
    mappings
        .iter()
        .map(|mapping| {
            let part = available
                .iter()
                .find(|p| p.name == mapping.source)
                .ok_or_else(|| {
                    Error::not_found(format!(
                        "database {:?} is not in backup {}; it has: {}",
                        mapping.source,
                        manifest.backup_id,
                        available
                            .iter()
                            .map(|p| format!("{:?}", p.name))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                })?;
            Ok((*part, mapping.target.clone()))
        })
        .collect()
}

/// `database "a"` or `databases "a", "b"`, for messages about one or several.
pub fn name_databases(names: &[String]) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("{n:?}")).collect();
    match quoted.len() {
        1 => format!("database {}", quoted[0]),
        _ => format!("databases {}", quoted.join(", ")),
    }
}

/// Include/exclude lists for backup.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    pub include: Vec<String>,
    pub exclude: Vec<String>,
    /// Tables left out, by pg_dump pattern (`--exclude-table`; PostgreSQL).
    pub exclude_tables: Vec<String>,
    /// Tables whose definition is kept but not their rows (`--exclude-table-data`).
    pub exclude_table_data: Vec<String>,
}

impl Selection {
    pub fn wants(&self, name: &str) -> bool {
        (self.include.is_empty() || self.include.iter().any(|n| n == name))
            && !self.exclude.iter().any(|n| n == name)
    }

    /// The "nothing to back up" rule, for every engine: a server without databases (a tenant
    /// created today) makes a complete, empty backup with a warning, not a failed nightly
    /// Job; `--database` names that `--exclude-database` cancels out are a usage error.
    /// (Names that do not exist on the server are the engine's NotFound, found earlier.)
    pub fn check_planned(&self, planned: usize, server: &str) -> Result<()> {
        if planned > 0 {
            return Ok(());
        }
        if !self.include.is_empty() {
            return Err(Error::usage(format!(
                "nothing to back up on {server}: --exclude-database excludes every database --database names"
            )));
        }
        tracing::warn!(
            server,
            "{server} has no databases to back up; the backup will be complete but empty"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mappings() {
        assert_eq!(
            DatabaseMapping::parse("shop:shop_copy"),
            DatabaseMapping {
                source: "shop".into(),
                target: "shop_copy".into()
            }
        );
        assert_eq!(DatabaseMapping::parse("Sales Data").target, "Sales Data");
    }

    #[test]
    fn selection() {
        let s = Selection {
            exclude_tables: Vec::new(),
            exclude_table_data: Vec::new(),
            include: vec![],
            exclude: vec!["b".into()],
        };
        assert!(s.wants("a") && !s.wants("b"));
        let s = Selection {
            exclude_tables: Vec::new(),
            exclude_table_data: Vec::new(),
            include: vec!["a".into()],
            exclude: vec![],
        };
        assert!(s.wants("a") && !s.wants("c"));
    }
}
