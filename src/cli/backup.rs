//! `kura backup <source>...`

use clap::Args;

use super::{RetentionArgs, Settings};
use crate::engine::{self, Selection};
use crate::error::Result;
use crate::logging::LogFormat;
use crate::observe::Done;
use crate::ops::backup::{backup_source, BackupJob};

#[derive(Debug, Args)]
pub struct Options {
    /// Sources to back up: names from the config file, or `postgres` for --postgres-url.
    #[arg(required = true)]
    pub sources: Vec<String>,
    /// Back up only this database (repeatable). Default: every database but PostgreSQL
    /// templates and CouchDB system databases (`_users`, `_replicator`: name them to include).
    #[arg(long = "database", value_name = "NAME")]
    pub databases: Vec<String>,
    /// Skip this database (repeatable).
    #[arg(long = "exclude-database", value_name = "NAME")]
    pub exclude_databases: Vec<String>,
    /// PostgreSQL: leave out tables matching this pg_dump pattern, e.g. 'public.tmp_*'
    /// (repeatable; recorded in the manifest)
    #[arg(long = "exclude-table", value_name = "PATTERN")]
    pub exclude_tables: Vec<String>,
    /// PostgreSQL: keep these tables' definitions but not their rows, e.g. audit_log
    /// (repeatable; recorded in the manifest, and verify --deep expects them empty)
    #[arg(long = "exclude-table-data", value_name = "PATTERN")]
    pub exclude_table_data: Vec<String>,
    /// After each successful backup, prune that source with the retention policy.
    #[arg(long)]
    pub prune: bool,
    #[command(flatten)]
    pub retention: RetentionArgs,
}

pub async fn run(settings: &Settings, options: &Options) -> Result<()> {
    if settings.recipients_dropped {
        tracing::warn!("--no-encrypt: backing up unencrypted although recipients are configured");
    }
    // A missing retention policy is a configuration error: report it before dumping anything.
    let prune = match options.prune {
        true => Some(options.retention.resolve(&settings.retention)?),
        false => None,
    };
    let store = settings.open_store_for_writing().await?;
    let selection = Selection {
        include: options.databases.clone(),
        exclude: options.exclude_databases.clone(),
        exclude_tables: options.exclude_tables.clone(),
        exclude_table_data: options.exclude_table_data.clone(),
    };
    let mut first_error = None;
    // Each source is independent: one unreachable server must not cost the others their backup.
    for name in &options.sources {
        let began = std::time::Instant::now();
        let backed_up = async {
            let source = settings.source(name)?;
            let engine =
                engine::connect(source.kind, source.url.clone(), &settings.engine_options())?;
            let job = BackupJob {
                store: store.clone(),
                path: settings.source_path(name)?,
                kind: source.kind,
                engine: engine.as_ref(),
                selection: selection.clone(),
                pipeline: settings.pipeline.clone(),
                cancel: settings.cancel.clone(),
                show_progress: settings.show_progress(),
                jobs: settings.jobs,
                prune: prune.clone(),
            };
            backup_source(&job).await
        };
        match backed_up.await {
            Ok(manifest) => {
                if settings.log_format == LogFormat::Text {
                    println!("{}", manifest.backup_id);
                }
                settings.run_log.record(
                    name,
                    began.elapsed(),
                    Ok(Done::Backup {
                        backup_id: manifest.backup_id.clone(),
                        stored_bytes: manifest.stored_bytes(),
                        raw_bytes: manifest.raw_bytes(),
                        parts: manifest.parts.len(),
                    }),
                );
            }
            Err(err) => {
                if options.sources.len() > 1 {
                    tracing::error!(source = %name, error_kind = err.kind().as_str(), "{}", err.chain());
                }
                let err = err.context(format!("backup of source {name:?} failed"));
                settings.run_log.record(name, began.elapsed(), Err(&err));
                first_error.get_or_insert(err);
                if settings.cancel.is_cancelled() {
                    break;
                }
            }
        }
    }
    match first_error {
        Some(err) => Err(err),
        None => Ok(()),
    }
}
