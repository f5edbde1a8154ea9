//! CouchDB behind the [`Engine`] contract: the glue between the commands' operations and this
//! folder's client, backup and restore.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use reqwest::Method;

use super::backup::{CouchBackup, Plan};
use super::restore::CouchRestore;
use super::{Client, DATABASE_KIND};
use crate::catalog::{BackupId, Manifest, Part};
use crate::config::SourceUrl;
use crate::engine::{
    BackupContext, BackupOutcome, BackupPlan, DatabaseMapping, Engine, EngineOptions,
    RestoreContext, RestoreRequest, RestoreSummary, Selection,
};
use crate::error::{Error, Result};

/// `_bulk_docs` bound of `verify --deep`'s scratch restores.
const SCRATCH_BATCH_BYTES: usize = 4 << 20;

pub struct CouchEngine {
    client: Arc<Client>,
}

impl CouchEngine {
    pub fn new(url: SourceUrl, options: &EngineOptions) -> Result<Self> {
        let client = Client::new(&url, &options.couchdb_tls, options.read_timeout)?;
        let client = match options.single_attempt {
            true => client.without_retries(),
            false => client,
        };
        Ok(CouchEngine {
            client: Arc::new(client),
        })
    }
}

struct PlannedBackup {
    backup: CouchBackup,
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
impl Engine for CouchEngine {
    fn target(&self) -> String {
        self.client.redacted().to_string()
    }

    async fn probe(&self) -> Result<String> {
        // "" is the base URL itself: a path prefix (a proxy's /couchdb/) is kept.
        let welcome = self
            .client
            .json(Method::GET, "", None, "the welcome page")
            .await?;
        Ok(format!(
            "CouchDB-compatible {}",
            welcome
                .get("version")
                .and_then(|v| v.as_str())
                .unwrap_or("(unknown version)")
        ))
    }

    async fn plan_backup(&self, selection: &Selection) -> Result<Box<dyn BackupPlan>> {
        let backup = CouchBackup {
            client: Arc::clone(&self.client),
            selection: selection.clone(),
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
        if !request.tables.is_empty() || request.globals || request.swap {
            return Err(Error::usage(
                "--table, --globals and --swap apply to PostgreSQL backups only",
            ));
        }
        let restore = CouchRestore {
            target: Arc::clone(&self.client),
            databases: request.databases.clone(),
            force: request.force,
            batch_bytes: request.batch_bytes,
        };
        let summary = restore.run(ctx, manifest).await?;
        Ok(RestoreSummary {
            databases: summary.databases,
            raw_bytes: summary.raw_bytes,
            detail: vec![("revisions".into(), summary.revisions)],
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
        let restore = CouchRestore {
            target: Arc::clone(&self.client),
            databases: vec![DatabaseMapping {
                source: part.name.clone(),
                target: scratch.to_string(),
            }],
            force: false,
            batch_bytes: SCRATCH_BATCH_BYTES,
        };
        let path = Client::db_path(scratch, "");
        let counted = async {
            restore.run(ctx, manifest).await?;
            let info = self
                .client
                .json(
                    Method::GET,
                    &path,
                    None,
                    &format!("reading scratch database {scratch}"),
                )
                .await?;
            let mut counts = BTreeMap::new();
            counts.insert(
                "documents".to_string(),
                info["doc_count"].as_u64().unwrap_or(0),
            );
            // pouchdb-server (and some proxies) omit doc_del_count: compare it only where
            // the server reports it.
            if let Some(deleted) = info["doc_del_count"].as_u64() {
                counts.insert("deleted_documents".to_string(), deleted);
            }
            Ok::<_, Error>(counts)
        }
        .await;
        if let Err(e) = self
            .client
            .json(
                Method::DELETE,
                &path,
                None,
                &format!("deleting scratch database {scratch}"),
            )
            .await
        {
            tracing::warn!(scratch = %scratch, error = %e.chain(), "could not delete the scratch database; delete it by hand");
        }
        counted
    }
}

/// Documents a part held, from the counts recorded at backup time.
pub fn describe_part(part: &Part) -> Option<String> {
    let counts = part.counts.as_ref()?;
    let documents = counts.get("documents")?;
    let deleted = counts.get("deleted_documents").copied().unwrap_or(0);
    Some(format!("{documents} documents, {deleted} deleted"))
}
