//! Logs: human text on stderr, or one JSON object per line on stdout for Fluent Bit → Loki.

use clap::ValueEnum;
use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl LogFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

impl std::str::FromStr for LogFormat {
    type Err = crate::error::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(crate::error::Error::usage(format!(
                "log format {other:?} is not one of text, json"
            ))),
        }
    }
}

/// `verbosity`: 0 info, positive more, negative less.
pub fn init(format: LogFormat, verbosity: i8) {
    let level = match verbosity {
        i8::MIN..=-2 => "error",
        -1 => "warn",
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    // The SDKs' own logs stay at warn unless asked for, so a nightly run logs a few lines.
    let filter = EnvFilter::try_from_env("KURA_LOG")
        .unwrap_or_else(|_| EnvFilter::new(format!("warn,kura={level}")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_writer(std::io::stdout)
            .try_init(),
        LogFormat::Text => builder
            .with_ansi(colour_on_stderr())
            .with_writer(|| crate::progress::LogWriter)
            .try_init(),
    };
}

/// Colour only for a person at a terminal who has not asked for none (https://no-color.org:
/// any non-empty NO_COLOR). Files, pipes and Kubernetes logs get plain text.
pub fn colour_on_stderr() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}
