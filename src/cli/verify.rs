//! `kura verify <source> <backup-id|latest> [--deep]`
//!
//! Without `--deep`: every part is read, its size and SHA-256 compared with the manifest, and
//! the zstd stream decoded to the end (its length compared with the recorded raw size).
//! With `--deep`: each database is also restored into a scratch database on the same server
//! (or `--to`), its rows per table / documents counted and compared with what the backup
//! recorded, and the scratch database dropped again, whatever happened.

use std::collections::BTreeMap;
use std::io::Read;

use clap::Args;
use reqwest::Method;

use super::Settings;
use crate::catalog::{self, Manifest, Part};
use crate::config::{SourceKind, SourceUrl};
use crate::engine::couchdb::restore::CouchRestore;
use crate::engine::couchdb::Client as CouchClient;
use crate::engine::postgres::restore::PostgresRestore;
use crate::engine::postgres::{self, Connection};
use crate::engine::{DatabaseMapping, RestoreContext};
use crate::error::{Error, ErrorKind, Result};
use crate::pipeline;
use crate::progress::{human_bytes, Progress, ProgressLine};
use crate::storage::ObjectStore;

// No Debug: `to` may hold a password.
#[derive(Args)]
pub struct Options {
    /// The source the backup was taken from.
    pub source: String,
    /// A backup id from `kura list`, or `latest`.
    pub backup: String,
    /// Also restore every database into a scratch database, compare the row/document counts
    /// recorded at backup time, and drop it.
    #[arg(long)]
    pub deep: bool,
    /// Server for --deep's scratch databases [default: the source's own server]
    #[arg(long, value_name = "URL", requires = "deep")]
    pub to: Option<String>,
}

pub async fn run(settings: &Settings, options: &Options) -> Result<()> {
    let path = settings.source_path(&options.source)?;
    let store = settings.open_store().await?;
    settings
        .check_source_known(store.as_ref(), &options.source)
        .await?;
    let manifest = catalog::resolve(store.as_ref(), &path, &options.backup).await?;
    let target = if options.deep {
        Some(match &options.to {
            Some(raw) => super::target_url(raw, &options.source)?,
            None => settings
                .source(&options.source)
                .map_err(|e| {
                    e.context("--deep restores into the source's server, so its URL is needed (or give --to)")
                })?
                .url
                .clone(),
        })
    } else {
        None
    };
    tracing::info!(
        source = %options.source,
        backup_id = %manifest.backup_id,
        parts = manifest.parts.len(),
        "verifying backup {} of {}: {} parts, {}",
        manifest.backup_id,
        options.source,
        manifest.parts.len(),
        human_bytes(manifest.stored_bytes())
    );

    let mut bad = Vec::new();
    let line = ProgressLine::start(
        "verifying",
        settings.show_progress(),
        Some(manifest.stored_bytes()),
    );
    for part in &manifest.parts {
        let key = path.object_key(&manifest.id()?, &part.key);
        line.progress().set_label(&part.name);
        match check_part(settings, store.as_ref(), &key, part, line.progress()).await {
            Ok(raw) => tracing::info!(
                part = %part.key,
                name = %part.name,
                stored_bytes = part.stored_bytes,
                raw_bytes = raw,
                "part {} ({}) is intact: {} stored, SHA-256 matches, {} decompressed",
                part.key,
                part.name,
                human_bytes(part.stored_bytes),
                human_bytes(raw)
            ),
            Err(err) if err.kind() == ErrorKind::Interrupted || settings.cancel.is_cancelled() => {
                return Err(Error::interrupted())
            }
            Err(err) if matches!(err.kind(), ErrorKind::Integrity | ErrorKind::NotFound) => {
                tracing::error!(part = %part.key, error_kind = "integrity", "{}", err.chain());
                bad.push(err.to_string());
            }
            Err(err) => return Err(err),
        }
    }
    drop(line);
    if !bad.is_empty() {
        return Err(Error::integrity(format!(
            "backup {} of {}/{} is damaged: {} of {} parts failed verification: {}. Restore from another backup (`kura list {}`)",
            manifest.backup_id,
            path.tenant,
            path.source,
            bad.len(),
            manifest.parts.len(),
            bad.join("; "),
            path.source
        )));
    }
    if let Some(target) = target {
        deep(settings, store.as_ref(), &path, &manifest, target).await?;
    }
    tracing::info!(
        source = %options.source,
        backup_id = %manifest.backup_id,
        deep = options.deep,
        "backup {} of {} verified{}",
        manifest.backup_id,
        options.source,
        if options.deep { " (restored and counted)" } else { "" }
    );
    Ok(())
}

/// Read the part to the end; returns its decompressed length.
async fn check_part(
    settings: &Settings,
    store: &dyn ObjectStore,
    key: &str,
    part: &Part,
    progress: Progress,
) -> Result<u64> {
    let raw = pipeline::read_verified(
        store,
        key,
        &part.digest(),
        Some(progress),
        &settings.cancel,
        |reader: &mut dyn Read| {
            std::io::copy(reader, &mut std::io::sink())
                .map_err(|e| Error::with_source(ErrorKind::Integrity, "decompressing", e))
        },
    )
    .await
    .map_err(|e| match e.kind() {
        ErrorKind::NotFound => Error::integrity(format!(
            "part {key} is missing from storage (the manifest lists it)"
        )),
        _ => e,
    })?;
    if raw != part.raw_bytes {
        return Err(Error::integrity(format!(
            "part {key} decompresses to {raw} bytes, but the manifest recorded {}",
            part.raw_bytes
        )));
    }
    Ok(raw)
}

async fn deep(
    settings: &Settings,
    store: &dyn ObjectStore,
    path: &catalog::SourcePath,
    manifest: &Manifest,
    target: SourceUrl,
) -> Result<()> {
    let ctx = RestoreContext {
        store,
        path: path.clone(),
        backup_id: manifest.id()?,
        cancel: settings.cancel.clone(),
        show_progress: settings.show_progress(),
    };
    let tag = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
    let kind = match manifest.kind {
        SourceKind::Postgres => postgres::DATABASE_KIND,
        SourceKind::Couchdb => crate::engine::couchdb::DATABASE_KIND,
    };
    let mut mismatches = Vec::new();
    for (index, part) in manifest.parts.iter().filter(|p| p.kind == kind).enumerate() {
        let scratch = format!("kura_verify_{tag}_{}", index + 1);
        let mapping = vec![DatabaseMapping {
            source: part.name.clone(),
            target: scratch.clone(),
        }];
        tracing::info!(database = %part.name, scratch = %scratch, "restoring {:?} into scratch database {scratch}", part.name);
        let counted = match manifest.kind {
            SourceKind::Postgres => {
                let connection = Connection::new(target.clone())?;
                let restore = PostgresRestore {
                    target: Connection::new(target.clone())?,
                    databases: mapping,
                    tables: Vec::new(),
                    globals: false,
                    force: false,
                    bin_dir: settings.pg_bin_dir.clone(),
                };
                let result = async {
                    restore.run(&ctx, manifest).await?;
                    let client = connection.connect(&scratch).await?;
                    postgres::count_rows(&client).await
                }
                .await;
                drop_postgres(&connection, &scratch).await;
                result?
            }
            SourceKind::Couchdb => {
                let client = std::sync::Arc::new(CouchClient::new(&target)?);
                let restore = CouchRestore {
                    target: client.clone(),
                    databases: mapping,
                    force: false,
                    batch_bytes: 4 << 20,
                };
                let result = async {
                    restore.run(&ctx, manifest).await?;
                    let info = client
                        .json(
                            Method::GET,
                            &CouchClient::db_path(&scratch, ""),
                            None,
                            &format!("reading scratch database {scratch}"),
                        )
                        .await?;
                    let mut counts = BTreeMap::new();
                    counts.insert(
                        "documents".to_string(),
                        info["doc_count"].as_u64().unwrap_or(0),
                    );
                    // pouchdb-server (and some proxies) omit doc_del_count: compare it only
                    // where the server reports it.
                    if let Some(deleted) = info["doc_del_count"].as_u64() {
                        counts.insert("deleted_documents".to_string(), deleted);
                    }
                    Ok::<_, Error>(counts)
                }
                .await;
                if let Err(e) = client
                    .json(
                        Method::DELETE,
                        &CouchClient::db_path(&scratch, ""),
                        None,
                        &format!("deleting scratch database {scratch}"),
                    )
                    .await
                {
                    tracing::warn!(scratch = %scratch, error = %e.chain(), "could not delete the scratch database; delete it by hand");
                }
                result?
            }
        };
        let Some(recorded) = &part.counts else {
            tracing::warn!(database = %part.name, "this backup recorded no counts (made by an older kura): the restore succeeded, nothing to compare");
            continue;
        };
        let differences = compare(recorded, &counted);
        if differences.is_empty() {
            tracing::info!(
                database = %part.name,
                compared = recorded.len(),
                "database {:?} restores completely: {} counts match",
                part.name,
                recorded.len()
            );
        } else {
            tracing::error!(database = %part.name, "{}", differences.join("; "));
            mismatches.push(format!("{:?}: {}", part.name, differences.join("; ")));
        }
    }
    if mismatches.is_empty() {
        Ok(())
    } else {
        Err(Error::integrity(format!(
            "backup {} restores, but not to what was backed up: {}",
            manifest.backup_id,
            mismatches.join(" | ")
        )))
    }
}

/// Differences between recorded and restored counts; a count only one side has is compared
/// only when the backup recorded it (servers differ in what they report).
fn compare(recorded: &BTreeMap<String, u64>, restored: &BTreeMap<String, u64>) -> Vec<String> {
    let mut out = Vec::new();
    for (name, expected) in recorded {
        match restored.get(name) {
            Some(actual) if actual == expected => {}
            Some(actual) => out.push(format!("{name}: backed up {expected}, restored {actual}")),
            None if name == "deleted_documents" => {}
            None => out.push(format!(
                "{name}: backed up {expected}, missing after restore"
            )),
        }
    }
    for name in restored.keys().filter(|n| !recorded.contains_key(*n)) {
        out.push(format!("{name}: restored but not in the backup's counts"));
    }
    out
}

async fn drop_postgres(connection: &Connection, scratch: &str) {
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
        let quoted = postgres::quote_ident(scratch);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_compare_by_name() {
        let recorded: BTreeMap<String, u64> =
            [("public.a".into(), 3), ("public.b".into(), 0)].into();
        assert!(compare(&recorded, &recorded.clone()).is_empty());
        let mut restored = recorded.clone();
        restored.insert("public.a".into(), 2);
        restored.remove("public.b");
        let diff = compare(&recorded, &restored);
        assert_eq!(diff.len(), 2, "{diff:?}");
        assert!(diff[0].contains("backed up 3, restored 2"));
        let couch: BTreeMap<String, u64> =
            [("documents".into(), 5), ("deleted_documents".into(), 1)].into();
        let pouch: BTreeMap<String, u64> = [("documents".into(), 5)].into();
        assert!(compare(&couch, &pouch).is_empty());
    }
}
