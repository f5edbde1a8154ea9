//! PostgreSQL behind the [`Engine`] contract: the glue between the commands' operations and
//! this folder's preflight, backup and restore.

use std::collections::BTreeMap;

use async_trait::async_trait;

use super::backup::{Plan, PostgresBackup};
use super::restore::PostgresRestore;
use super::{count_rows, quote_ident, Connection, DATABASE_KIND};
use crate::catalog::{BackupId, Manifest, Part};
use crate::config::SourceUrl;
use crate::engine::{
    BackupContext, BackupOutcome, BackupPlan, DatabaseMapping, Engine, EngineOptions,
    RestoreContext, RestoreRequest, RestoreSummary, Selection,
};
use crate::error::{Error, ErrorKind, Result};

pub struct PostgresEngine {
    connection: Connection,
    options: EngineOptions,
}

impl PostgresEngine {
    pub fn new(url: SourceUrl, options: &EngineOptions) -> Result<Self> {
        Ok(PostgresEngine {
            connection: Connection::new(url)?,
            options: options.clone(),
        })
    }
}

struct PlannedBackup {
    backup: PostgresBackup,
    plan: Plan,
}

#[async_trait]
impl BackupPlan for PlannedBackup {
    fn databases(&self) -> usize {
        self.plan.databases.len()
    }

    async fn run(self: Box<Self>, ctx: &BackupContext<'_>, id: &BackupId) -> Result<BackupOutcome> {
        let PlannedBackup { backup, plan } = *self;
        backup.run(ctx, id, plan).await
    }
}

#[async_trait]
impl Engine for PostgresEngine {
    fn target(&self) -> String {
        self.connection.redacted()
    }

    async fn probe(&self) -> Result<String> {
        let client = self
            .connection
            .connect(&self.connection.maintenance_database())
            .await?;
        let row = client
            .query_one("SELECT current_setting('server_version')", &[])
            .await
            .map_err(|e| Error::with_source(ErrorKind::Database, "the test query failed", e))?;
        let version: String = row.get(0);
        Ok(format!("PostgreSQL {version}"))
    }

    async fn plan_backup(&self, selection: &Selection) -> Result<Box<dyn BackupPlan>> {
        let backup = PostgresBackup {
            connection: self.connection.clone(),
            selection: selection.clone(),
            bin_dir: self.options.pg_bin_dir.clone(),
            lock_wait_timeout: self.options.lock_wait_timeout,
            split_table_bytes: self.options.split_table_bytes,
        };
        let plan = backup.plan().await?;
        Ok(Box::new(PlannedBackup { backup, plan }))
    }

    async fn restore(
        &self,
        ctx: &RestoreContext<'_>,
        manifest: &Manifest,
        request: &RestoreRequest,
    ) -> Result<RestoreSummary> {
        let restore = PostgresRestore {
            target: self.connection.clone(),
            databases: request.databases.clone(),
            tables: request.tables.clone(),
            globals: request.globals,
            force: request.force,
            swap: request.swap,
            terminate_sessions: request.terminate_sessions,
            bin_dir: self.options.pg_bin_dir.clone(),
        };
        let summary = restore.run(ctx, manifest).await?;
        Ok(RestoreSummary {
            databases: summary.databases,
            raw_bytes: summary.raw_bytes,
            detail: vec![
                ("globals".into(), u64::from(summary.globals)),
                ("warnings".into(), summary.warnings as u64),
            ],
        })
    }

    fn database_kind(&self) -> &'static str {
        DATABASE_KIND
    }

    async fn count_in_scratch(
        &self,
        ctx: &RestoreContext<'_>,
        manifest: &Manifest,
        part: &Part,
        scratch: &str,
    ) -> Result<BTreeMap<String, u64>> {
        let restore = PostgresRestore {
            target: self.connection.clone(),
            databases: vec![DatabaseMapping {
                source: part.name.clone(),
                target: scratch.to_string(),
            }],
            tables: Vec::new(),
            globals: false,
            force: false,
            swap: false,
            terminate_sessions: false,
            bin_dir: self.options.pg_bin_dir.clone(),
        };
        let counted = async {
            restore.run(ctx, manifest).await?;
            let client = self.connection.connect(scratch).await?;
            count_rows(&client, &super::TableExclusions::default(), &[]).await
        }
        .await;
        drop_database(&self.connection, scratch).await;
        counted
    }
}

/// Tables and rows a part held, from the counts recorded at backup time.
pub fn describe_part(part: &Part) -> Option<String> {
    if part.kind == super::TABLE_DATA_KIND {
        let piece: super::DataPiece = serde_json::from_value(part.properties.clone()).ok()?;
        return Some(match piece.table {
            Some(table) => format!("rows of table {table}"),
            None => "rows of the other tables, sequence values".to_string(),
        });
    }
    let counts = part.counts.as_ref()?;
    let rows: u64 = counts.values().sum();
    Some(format!("{} tables, {rows} rows", counts.len()))
}

/// Drop a scratch database, ending its sessions first; a failure is only a warning, since
/// the verification itself is already decided.
async fn drop_database(connection: &Connection, scratch: &str) {
    let dropped = async {
        let client = connection
            .connect(&connection.maintenance_database())
            .await?;
        let failed = |e| Error::with_source(ErrorKind::Database, "DROP DATABASE", e);
        let version: i32 = client
            .query_one("SELECT current_setting('server_version_num')::int", &[])
            .await
            .map_err(failed)?
            .get(0);
        let quoted = quote_ident(scratch);
        if version >= 130000 {
            client
                .batch_execute(&format!("DROP DATABASE IF EXISTS {quoted} WITH (FORCE)"))
                .await
                .map_err(failed)
        } else {
            // Before PostgreSQL 13 there is no FORCE: end the sessions, then drop.
            client
                .execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
                    &[&scratch],
                )
                .await
                .map_err(failed)?;
            client
                .batch_execute(&format!("DROP DATABASE IF EXISTS {quoted}"))
                .await
                .map_err(failed)
        }
    }
    .await;
    if let Err(e) = dropped {
        tracing::warn!(scratch = %scratch, error = %e.chain(), "could not drop the scratch database; drop it by hand");
    }
}
