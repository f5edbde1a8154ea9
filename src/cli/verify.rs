//! `kura verify <source> <backup-id|latest> [--deep]`
//!
//! Without `--deep`: every part is read, its size and SHA-256 compared with the manifest, and
//! the zstd stream decoded to the end (its length compared with the recorded raw size).
//! With `--deep`: each database is also restored into a scratch database on the same server
//! (or `--to`), its rows per table / documents counted and compared with what the backup
//! recorded, and the scratch database dropped again, whatever happened.

use clap::Args;

use super::Settings;
use crate::catalog;
use crate::engine;
use crate::error::Result;
use crate::ops::verify::{verify, VerifyJob};

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
    let deep = if options.deep {
        let url = match &options.to {
            Some(raw) => super::target_url(raw, &options.source)?,
            None => settings
                .source(&options.source)
                .map_err(|e| {
                    e.context("--deep restores into the source's server, so its URL is needed (or give --to)")
                })?
                .url
                .clone(),
        };
        Some(engine::connect(
            manifest.kind,
            url,
            &settings.engine_options(),
        )?)
    } else {
        None
    };
    let began = std::time::Instant::now();
    verify(&VerifyJob {
        store: store.as_ref(),
        path,
        manifest: &manifest,
        deep: deep.as_deref(),
        cancel: settings.cancel.clone(),
        show_progress: settings.show_progress(),
        identities: settings.identities()?,
        jobs: settings.jobs,
    })
    .await?;
    settings.run_log.record(
        &options.source,
        began.elapsed(),
        Ok(crate::observe::Done::Verify {
            backup_id: manifest.backup_id.clone(),
        }),
    );
    Ok(())
}
