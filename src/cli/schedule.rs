//! `kura schedule "<cron>" [--timezone TZ] -- <kura arguments>`: a tiny cron for hosts without
//! Kubernetes (a VM, docker compose). Runs are never concurrent: a run that overruns the next
//! scheduled time makes the scheduler skip that time, as a CronJob with
//! `concurrencyPolicy: Forbid` would. SIGTERM/SIGINT are passed on to the running command,
//! which rolls back its work, and the scheduler exits once it has stopped.

use std::ffi::OsString;

use chrono::Utc;
use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches, Args, CommandFactory};

use super::{Cli, Settings};
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

pub async fn run(settings: &Settings, options: &Options) -> Result<()> {
    let schedule = CronSchedule::parse(&options.expression, options.timezone.as_deref())?;
    // Parsed again (it parsed once already): only the matches tell where each value came from.
    let matches = Cli::command()
        .try_get_matches_from(std::env::args_os())
        .map_err(|e| Error::usage(e.to_string()))?;
    let globals = ChildGlobals::from_matches(&matches)?;
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
        child.args(&globals.args).args(&options.command);
        child.envs(globals.env.iter().map(|(k, v)| (k, v)));
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

/// The scheduler's global options, for its child. Read from clap's own definition of the
/// options, so an option added later reaches the child without anyone remembering to forward
/// it: each one given on the command line travels as the `KURA_*` variable it reads (so a
/// password in a URL never appears in the child's argv); the environment is inherited anyway;
/// verbosity, which has no variable, travels as flags.
struct ChildGlobals {
    args: Vec<String>,
    env: Vec<(String, OsString)>,
}

impl ChildGlobals {
    fn from_matches(matches: &ArgMatches) -> Result<ChildGlobals> {
        let mut globals = ChildGlobals {
            args: Vec::new(),
            env: Vec::new(),
        };
        for arg in Cli::command().get_arguments().filter(|a| a.is_global_set()) {
            let id = arg.get_id().as_str();
            if matches.value_source(id) != Some(ValueSource::CommandLine) {
                continue;
            }
            match (arg.get_env(), arg.get_action()) {
                (Some(var), ArgAction::SetTrue) => {
                    globals
                        .env
                        .push((var.to_string_lossy().into_owned(), OsString::from("true")));
                }
                (_, ArgAction::Count) => {
                    let long = arg.get_long().expect("count options have a long name");
                    let times = matches.get_count(id);
                    globals.args.extend((0..times).map(|_| format!("--{long}")));
                }
                (Some(var), _) => {
                    let values: Vec<&std::ffi::OsStr> =
                        matches.get_raw(id).into_iter().flatten().collect();
                    // Repeatable options read their variable comma-separated.
                    let joined = values.join(std::ffi::OsStr::new(","));
                    globals
                        .env
                        .push((var.to_string_lossy().into_owned(), joined));
                }
                (None, _) => {
                    return Err(Error::failed(format!(
                    "the global option --{} has no environment variable to reach a scheduled run",
                    arg.get_long().unwrap_or(id)
                )))
                }
            }
        }
        Ok(globals)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every global option, given on the command line, reaches the scheduled child.
    #[test]
    fn every_global_option_reaches_the_child() {
        let mut argv = vec!["kura".to_string()];
        let mut expected = Vec::new();
        for arg in Cli::command().get_arguments().filter(|a| a.is_global_set()) {
            let long = arg.get_long().expect("global options have a long name");
            if matches!(arg.get_action(), ArgAction::Count) {
                argv.push(format!("--{long}"));
                continue;
            }
            let var = arg
                .get_env()
                .expect("a variable")
                .to_string_lossy()
                .into_owned();
            if matches!(arg.get_action(), ArgAction::SetTrue) {
                argv.push(format!("--{long}"));
                expected.push((var, OsString::from("true")));
                continue;
            }
            let value = match arg.get_possible_values().last() {
                Some(possible) => possible.get_name().to_string(),
                None => "7".to_string(),
            };
            argv.push(format!("--{long}={value}"));
            expected.push((var, OsString::from(value)));
        }
        assert!(expected.len() >= 12, "{expected:?}");
        argv.extend(["schedule", "@daily", "--", "list"].map(String::from));
        let matches = Cli::command().try_get_matches_from(&argv).unwrap();
        let globals = ChildGlobals::from_matches(&matches).unwrap();
        for pair in &expected {
            assert!(
                globals.env.contains(pair),
                "{pair:?} not in {:?}",
                globals.env
            );
        }
        assert_eq!(globals.args, vec!["--verbose", "--quiet"]);

        // After the command name too, and only what was given.
        let matches = Cli::command()
            .try_get_matches_from([
                "kura", "schedule", "@daily", "--tenant", "acme", "-vv", "--", "list",
            ])
            .unwrap();
        let globals = ChildGlobals::from_matches(&matches).unwrap();
        assert_eq!(
            globals.env,
            vec![("KURA_TENANT".to_string(), OsString::from("acme"))]
        );
        assert_eq!(globals.args, vec!["--verbose", "--verbose"]);
    }

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
