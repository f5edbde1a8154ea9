//! `kura schedule "<cron>" [--timezone TZ] -- <kura arguments>`: a tiny cron for hosts without
//! Kubernetes (a VM, docker compose). Runs are never concurrent: a run that overruns the next
//! scheduled time makes the scheduler skip that time, as a CronJob with
//! `concurrencyPolicy: Forbid` would. SIGTERM/SIGINT are passed on to the running command,
//! which rolls back its work, and the scheduler exits once it has stopped.

use std::ffi::OsString;

use chrono::Utc;
use clap::Args;

use super::{GlobalArgs, Settings};
use crate::calendar::CronSchedule;
use crate::error::{Error, ErrorKind, Result};

#[derive(Debug, Args)]
pub struct Options {
    /// When to run, in crontab syntax: "30 2 * * *" is 02:30 every day; @daily, @hourly work.
    pub expression: String,
    /// Time zone of the expression (IANA name) [default: UTC]
    #[arg(long, value_name = "TZ")]
    pub timezone: Option<String>,
    /// The kura command to run, after `--`, e.g. `-- backup --prune postgres`.
    #[arg(last = true, required = true, value_name = "KURA ARGS")]
    pub command: Vec<String>,
}

pub async fn run(settings: &Settings, global: &GlobalArgs, options: &Options) -> Result<()> {
    let schedule = CronSchedule::parse(&options.expression, options.timezone.as_deref())?;
    if options.command.first().map(String::as_str) == Some("schedule") {
        return Err(Error::usage("kura schedule cannot schedule itself"));
    }
    let program = std::env::current_exe()
        .map_err(|e| Error::with_source(ErrorKind::Failed, "cannot find the kura executable", e))?;
    let mut missed_since = Utc::now();
    loop {
        let now = Utc::now();
        let skipped = count_between(&schedule, missed_since, now);
        if skipped > 0 {
            tracing::warn!(
                skipped,
                "the previous run overran {skipped} scheduled time(s); they were skipped"
            );
        }
        let Some(next) = schedule.next_after(now) else {
            tracing::info!(
                "the schedule {:?} has no future runs",
                schedule.expression()
            );
            return Ok(());
        };
        tracing::info!(next_run = %next.to_rfc3339(), "next run of `kura {}` at {next}", shown_command(&options.command));
        let wait = (next - now).to_std().unwrap_or_default();
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = settings.cancel.cancelled() => {
                tracing::info!("stopping the scheduler: no run was in progress");
                return Ok(());
            }
        }
        let mut child = tokio::process::Command::new(&program);
        child.args(child_args(global, &options.command));
        child.envs(child_env(global));
        child.kill_on_drop(false);
        let started = std::time::Instant::now();
        let mut child = child.spawn().map_err(|e| {
            Error::with_source(
                ErrorKind::Failed,
                format!("cannot start {}", program.display()),
                e,
            )
        })?;
        let status = tokio::select! {
            status = child.wait() => status,
            _ = settings.cancel.cancelled() => {
                if let Some(pid) = child.id() {
                    tracing::info!(pid, "passing the stop signal to the running command and waiting for it to roll back");
                    // SAFETY: kill(2) on a child we spawned and have not reaped.
                    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
                }
                let status = child.wait().await;
                let code = status.as_ref().ok().and_then(|s| s.code()).unwrap_or(-1);
                return Err(Error::new(
                    ErrorKind::Interrupted,
                    format!("stopped by a signal; the running command exited with {code}"),
                ));
            }
        };
        let status = status.map_err(|e| {
            Error::with_source(ErrorKind::Failed, "waiting for the scheduled run", e)
        })?;
        let seconds = started.elapsed().as_secs_f64();
        match status.code() {
            Some(0) => tracing::info!(exit_code = 0, seconds, "scheduled run succeeded"),
            code => tracing::error!(
                exit_code = code.unwrap_or(-1),
                seconds,
                "scheduled run `kura {}` failed with exit code {}; the schedule continues",
                shown_command(&options.command),
                code.map_or("none (killed by a signal)".to_string(), |c| c.to_string())
            ),
        }
        missed_since = next;
    }
}

/// The command for log lines, with any password in a URL argument replaced by `***`
/// (`-- backup --postgres-url postgres://u:pw@db/...` must not reach Loki).
fn shown_command(command: &[String]) -> String {
    command
        .iter()
        .map(|arg| redact_userinfo(arg))
        .collect::<Vec<_>>()
        .join(" ")
}

fn redact_userinfo(arg: &str) -> String {
    let Some(scheme_end) = arg.find("://") else {
        return arg.to_string();
    };
    let authority_start = scheme_end + 3;
    let rest = &arg[authority_start..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return arg.to_string();
    };
    match rest[..at].find(':') {
        Some(colon) => format!(
            "{}{}:***{}",
            &arg[..authority_start],
            &rest[..colon],
            &rest[at..]
        ),
        None => arg.to_string(),
    }
}

/// Scheduled times strictly after `from` and at or before `to`.
fn count_between(
    schedule: &CronSchedule,
    from: chrono::DateTime<Utc>,
    to: chrono::DateTime<Utc>,
) -> usize {
    let mut count = 0;
    let mut at = from;
    while let Some(next) = schedule.next_after(at) {
        if next > to {
            break;
        }
        count += 1;
        at = next;
    }
    count
}

/// Verbosity travels as flags; everything else as KURA_* variables (below), so no URL with a
/// password ever appears on a command line.
fn child_args(global: &GlobalArgs, command: &[String]) -> Vec<String> {
    let mut args = Vec::new();
    for _ in 0..global.verbose {
        args.push("-v".to_string());
    }
    for _ in 0..global.quiet {
        args.push("-q".to_string());
    }
    args.extend(command.iter().cloned());
    args
}

fn child_env(global: &GlobalArgs) -> Vec<(&'static str, OsString)> {
    let mut env: Vec<(&'static str, OsString)> = Vec::new();
    let mut set = |name: &'static str, value: Option<OsString>| {
        if let Some(value) = value {
            env.push((name, value));
        }
    };
    set("KURA_CONFIG", global.config.clone().map(Into::into));
    set("KURA_STORAGE", global.storage.clone().map(Into::into));
    set("KURA_TENANT", global.tenant.clone().map(Into::into));
    set(
        "KURA_LOG_FORMAT",
        global.log_format.map(|f| f.as_str().to_string().into()),
    );
    set(
        "KURA_POSTGRES_URL",
        global.postgres_url.clone().map(Into::into),
    );
    set(
        "KURA_COUCHDB_URL",
        global.couchdb_url.clone().map(Into::into),
    );
    set(
        "KURA_S3_ENDPOINT",
        global.s3_endpoint.clone().map(Into::into),
    );
    set("KURA_S3_REGION", global.s3_region.clone().map(Into::into));
    set(
        "KURA_S3_PATH_STYLE",
        global.s3_path_style.map(|b| b.to_string().into()),
    );
    set("KURA_PG_BIN_DIR", global.pg_bin_dir.clone().map(Into::into));
    set(
        "KURA_COMPRESSION_LEVEL",
        global.compression_level.map(|v| v.to_string().into()),
    );
    set(
        "KURA_COMPRESSION_THREADS",
        global.compression_threads.map(|v| v.to_string().into()),
    );
    set("KURA_PART_SIZE", global.part_size.clone().map(Into::into));
    set(
        "KURA_UPLOAD_CONCURRENCY",
        global.upload_concurrency.map(|v| v.to_string().into()),
    );
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_in_scheduled_commands_are_not_logged() {
        let command: Vec<String> = [
            "backup",
            "--postgres-url=postgres://kura:s3cr%40t@db:5432/postgres?sslmode=disable",
            "--couchdb-url",
            "http://admin:pw@couch:5984",
            "postgres",
        ]
        .map(String::from)
        .to_vec();
        let shown = shown_command(&command);
        assert!(
            !shown.contains("s3cr") && !shown.contains(":pw@"),
            "{shown}"
        );
        assert!(shown.contains("postgres://kura:***@db:5432/postgres?sslmode=disable"));
        assert!(shown.contains("http://admin:***@couch:5984"));
        assert_eq!(redact_userinfo("s3://bucket/a@b"), "s3://bucket/a@b");
    }
}
