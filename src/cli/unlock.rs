//! `kura unlock <source> [--force]`

use clap::Args;

use super::Settings;
use crate::catalog::lock;
use crate::error::Result;

#[derive(Debug, Args)]
pub struct Options {
    /// The source whose backup/prune lock to remove.
    pub source: String,
    /// Remove the lock even if it has not expired. Only when its holder is known to be gone:
    /// two backups of one source would then run at once.
    #[arg(long)]
    pub force: bool,
}

pub async fn run(settings: &Settings, options: &Options) -> Result<()> {
    let path = settings.source_path(&options.source)?;
    let store = settings.open_store().await?;
    settings
        .check_source_known(store.as_ref(), &options.source)
        .await?;
    let message = lock::unlock(store.as_ref(), &path, options.force).await?;
    tracing::info!(source = %options.source, "{message}");
    Ok(())
}
