//! `kura reencrypt <source> <backup-id|latest> --identity OLD --encrypt-to NEW…`

use clap::Args;

use super::Settings;
use crate::catalog;
use crate::error::Result;
use crate::ops::reencrypt::{reencrypt, ReencryptJob};

#[derive(Debug, Args)]
pub struct Options {
    /// The source the backup was taken from.
    pub source: String,
    /// A backup id from `kura list`, or `latest`.
    pub backup: String,
}

pub async fn run(settings: &Settings, options: &Options) -> Result<()> {
    let store = settings.open_store().await?;
    settings
        .check_source_known(store.as_ref(), &options.source)
        .await?;
    let path = settings.source_path(&options.source)?;
    let manifest = catalog::resolve(store.as_ref(), &path, &options.backup).await?;
    let rewritten = reencrypt(&ReencryptJob {
        store,
        path,
        manifest: &manifest,
        identities: settings.identities()?,
        pipeline: settings.pipeline.clone(),
        cancel: settings.cancel.clone(),
    })
    .await?;
    if settings.log_format == crate::logging::LogFormat::Text {
        println!("{}", rewritten.backup_id);
    }
    Ok(())
}
