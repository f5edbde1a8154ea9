//! One error type for the library, carrying a [`ErrorKind`] that decides the exit code and
//! whether an operation may be retried.
//!
//! Every message says what failed, on which object or database, and what to do. Causes are
//! kept as `source` so `main` can print the whole chain in one log line.

use std::fmt;
use std::sync::Arc;

/// What class of failure this is. The classes are the contract of kura's exit codes: a
/// Kubernetes Job's `podFailurePolicy` can act on them (e.g. never retry a usage error).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Anything not covered below: a dump tool failed, a restore statement failed.
    Failed,
    /// Bad flags, config file or URL. Retrying cannot help.
    Usage,
    /// The object store is unreachable, refused our credentials, or the bucket is missing.
    Storage,
    /// The database server is unreachable or refused our credentials.
    Database,
    /// A stored object does not match its manifest (checksum, size, undecodable).
    Integrity,
    /// The backup, object or database asked for does not exist.
    NotFound,
    /// Restore refused because the target already holds data and `--force` was not given.
    TargetNotEmpty,
    /// Another kura run holds the lock.
    Locked,
    /// SIGINT or SIGTERM arrived; everything started was rolled back.
    Interrupted,
}

impl ErrorKind {
    /// The documented process exit code (README "Exit codes").
    pub fn exit_code(self) -> i32 {
        match self {
            ErrorKind::Failed => 1,
            ErrorKind::Usage => 2,
            ErrorKind::Storage => 3,
            ErrorKind::Database => 4,
            ErrorKind::Integrity => 5,
            ErrorKind::NotFound => 6,
            ErrorKind::TargetNotEmpty => 7,
            ErrorKind::Locked => 8,
            ErrorKind::Interrupted => 130,
        }
    }

    /// Short machine-readable name, used as the `error_kind` field of JSON log lines.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Failed => "failed",
            ErrorKind::Usage => "usage",
            ErrorKind::Storage => "storage",
            ErrorKind::Database => "database",
            ErrorKind::Integrity => "integrity",
            ErrorKind::NotFound => "not_found",
            ErrorKind::TargetNotEmpty => "target_not_empty",
            ErrorKind::Locked => "locked",
            ErrorKind::Interrupted => "interrupted",
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Cloning keeps the kind, the message and the cause chain, so an error that must be reported
/// on two paths (the stage that failed and the stage it stopped) crosses threads intact
/// instead of as text.
#[derive(Debug, Clone)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    source: Option<Arc<dyn std::error::Error + Send + Sync + 'static>>,
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|e| e as _)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            source: None,
        }
    }

    pub fn with_source(
        kind: ErrorKind,
        message: impl Into<String>,
        source: impl Into<BoxError>,
    ) -> Self {
        Error {
            kind,
            message: message.into(),
            source: Some(Arc::from(source.into())),
        }
    }

    pub fn failed(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Failed, message)
    }

    pub fn usage(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Usage, message)
    }

    pub fn integrity(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Integrity, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }

    pub fn interrupted() -> Self {
        Self::new(
            ErrorKind::Interrupted,
            "interrupted by a signal; the unfinished work was rolled back",
        )
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// Wrap with more context, keeping the kind: "restoring database x: <original>".
    pub fn context(self, what: impl fmt::Display) -> Self {
        Error {
            kind: self.kind,
            message: format!("{what}: {}", self.message),
            source: self.source,
        }
    }

    /// Append what to do next: "<original>; <advice>". For advice that depends on where the
    /// error surfaced (a corrupt part means "use another backup" to restore, not to verify).
    pub fn advise(self, advice: impl fmt::Display) -> Self {
        Error {
            kind: self.kind,
            message: format!("{}; {advice}", self.message),
            source: self.source,
        }
    }

    /// After a signal every stage of a pipeline fails in its own way (a broken pipe, a killed
    /// child); the cause to report is the signal.
    pub fn or_interrupted(self, cancel: &tokio_util::sync::CancellationToken) -> Self {
        if cancel.is_cancelled() {
            Error::interrupted()
        } else {
            self
        }
    }

    /// The message followed by every cause, deduplicated, on one line.
    pub fn chain(&self) -> String {
        let mut out = self.message.clone();
        let mut next: Option<&(dyn std::error::Error + 'static)> =
            self.source.as_deref().map(|e| e as _);
        while let Some(err) = next {
            let text = err.to_string();
            if !text.is_empty() && !out.contains(&text) {
                out.push_str(": ");
                out.push_str(&text);
            }
            next = err.source();
        }
        out
    }
}

impl From<std::io::Error> for Error {
    fn from(err: std::io::Error) -> Self {
        Error::with_source(ErrorKind::Failed, "I/O error", err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_includes_causes_once() {
        let io = std::io::Error::other("disk on fire");
        let err =
            Error::with_source(ErrorKind::Storage, "writing part 3", io).context("backup db1");
        assert_eq!(err.chain(), "backup db1: writing part 3: disk on fire");
        assert_eq!(err.kind().exit_code(), 3);
    }

    #[test]
    fn exit_codes_are_distinct() {
        let kinds = [
            ErrorKind::Failed,
            ErrorKind::Usage,
            ErrorKind::Storage,
            ErrorKind::Database,
            ErrorKind::Integrity,
            ErrorKind::NotFound,
            ErrorKind::TargetNotEmpty,
            ErrorKind::Locked,
            ErrorKind::Interrupted,
        ];
        let mut codes: Vec<i32> = kinds.iter().map(|k| k.exit_code()).collect();
        codes.sort();
        codes.dedup();
        assert_eq!(codes.len(), kinds.len());
    }
}
