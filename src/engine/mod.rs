//! Database engines: one folder per kind. Each provides preflight (fail before any upload if
//! the server, the credentials or the tools are wrong), backup (one part object per database,
//! plus what the server holds outside databases), and restore.
//!
//! # Contract every engine keeps
//! - A backup writes its parts through [`crate::pipeline::store_stream`] and returns the parts
//!   for the manifest; it never writes the manifest itself (the caller commits last).
//! - A part is only reported once its producer is known to have succeeded.
//! - Restore reads parts through [`crate::pipeline::read_verified`] and makes nothing permanent
//!   before that returned `Ok`; a target that already holds data is refused unless forced.
//! - No password is passed on a child process's command line.

use tokio_util::sync::CancellationToken;

use crate::catalog::{Manifest, Part, SourcePath};
use crate::error::{Error, Result};
use crate::pipeline::PipelineOptions;
use crate::storage::ObjectStore;

pub mod couchdb;
pub mod postgres;

/// What every engine needs to write a backup.
pub struct BackupContext<'a> {
    pub store: &'a dyn ObjectStore,
    pub path: SourcePath,
    pub pipeline: PipelineOptions,
    pub cancel: CancellationToken,
    /// Draw a progress line on a terminal (false for JSON logs).
    pub show_progress: bool,
}

/// What every engine needs to restore.
pub struct RestoreContext<'a> {
    pub store: &'a dyn ObjectStore,
    pub path: SourcePath,
    pub backup_id: crate::catalog::BackupId,
    pub cancel: CancellationToken,
    pub show_progress: bool,
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
            include: vec![],
            exclude: vec!["b".into()],
        };
        assert!(s.wants("a") && !s.wants("b"));
        let s = Selection {
            include: vec!["a".into()],
            exclude: vec![],
        };
        assert!(s.wants("a") && !s.wants("c"));
    }
}
