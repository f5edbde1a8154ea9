//! Running pg_dump, pg_restore and psql: stream their stdout/stdin, drain stderr on its own
//! thread so a chatty child cannot deadlock on a full pipe (ripgrep's `CommandReader`), and
//! turn a bad exit status into an error that carries the child's stderr.
//!
//! Secrets never go on a command line (visible in `ps` and `/proc/*/cmdline`): callers pass
//! passwords through the child's environment.

use std::io::Read;
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;

use crate::error::{Error, ErrorKind, Result};

/// The most of a child's stderr kept for the error message (the tail, where the cause is).
const STDERR_KEEP: usize = 16 * 1024;

pub struct ChildProcess {
    name: String,
    child: Child,
    stderr: Option<JoinHandle<String>>,
    waited: bool,
}

impl ChildProcess {
    /// Spawns `command` with stdin/stdout piped as asked and stderr captured.
    pub fn spawn(
        mut command: Command,
        name: &str,
        pipe_stdin: bool,
        pipe_stdout: bool,
    ) -> Result<Self> {
        command
            .stdin(if pipe_stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(if pipe_stdout {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stderr(Stdio::piped());
        let mut child = command.spawn().map_err(|e| {
            let advice = if e.kind() == std::io::ErrorKind::NotFound {
                " (is the PostgreSQL client installed and on PATH, or --pg-bin-dir set?)"
            } else {
                ""
            };
            Error::with_source(ErrorKind::Failed, format!("cannot run {name}{advice}"), e)
        })?;
        let stderr = child.stderr.take().map(|mut pipe| {
            std::thread::spawn(move || {
                let mut tail: Vec<u8> = Vec::new();
                let mut buf = [0u8; 8192];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    tail.extend_from_slice(&buf[..n]);
                    if tail.len() > 2 * STDERR_KEEP {
                        tail.drain(..tail.len() - STDERR_KEEP);
                    }
                }
                if tail.len() > STDERR_KEEP {
                    tail.drain(..tail.len() - STDERR_KEEP);
                }
                String::from_utf8_lossy(&tail).into_owned()
            })
        });
        Ok(ChildProcess {
            name: name.to_string(),
            child,
            stderr,
            waited: false,
        })
    }

    /// A task that sends SIGTERM to the child when `cancel` fires. Abort it as soon as the
    /// child has been waited for: only in the moment between that wait and the abort could
    /// the pid have been reused.
    pub fn terminator(
        &self,
        cancel: tokio_util::sync::CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let pid = self.child.id() as libc::pid_t;
        tokio::spawn(async move {
            cancel.cancelled().await;
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        })
    }

    pub fn take_stdin(&mut self) -> Option<ChildStdin> {
        self.child.stdin.take()
    }

    pub fn take_stdout(&mut self) -> Option<ChildStdout> {
        self.child.stdout.take()
    }

    /// Stop the child now (on failure elsewhere in the pipeline). Its error is not reported.
    pub fn kill(&mut self) {
        if !self.waited {
            let _ = self.child.kill();
            let _ = self.child.wait();
            self.waited = true;
        }
    }

    /// If the child has exited (or exits within `grace`) with a bad status, its error; else
    /// `None`. Used to find the root cause when a pipe to or from it broke.
    pub fn exited_failure(&mut self, grace: std::time::Duration) -> Option<Error> {
        let deadline = std::time::Instant::now() + grace;
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => return self.wait_success().err(),
                Ok(None) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20))
                }
                _ => return None,
            }
        }
    }

    /// Wait for exit; returns the captured stderr.
    pub fn wait_raw(&mut self) -> Result<(ExitStatus, String)> {
        drop(self.child.stdin.take());
        let status = self.child.wait().map_err(|e| {
            Error::with_source(ErrorKind::Failed, format!("waiting for {}", self.name), e)
        })?;
        self.waited = true;
        let stderr = self
            .stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        Ok((status, stderr))
    }

    /// Wait for exit and fail, with the child's stderr, unless it exited 0.
    pub fn wait_success(&mut self) -> Result<String> {
        let (status, stderr) = self.wait_raw()?;
        if status.success() {
            Ok(stderr)
        } else {
            let failure = ToolFailure {
                tool: self.name.clone(),
                status: describe_status(status),
                stderr,
            };
            Err(Error::with_source(
                ErrorKind::Failed,
                failure.to_string(),
                failure,
            ))
        }
    }
}

/// A child that exited with a bad status, kept as data (not only as a message) so a caller
/// can decide on what the tool reported, e.g. the SQLSTATE of psql's error.
#[derive(Debug, thiserror::Error)]
#[error("{tool} failed ({status}): {}", summarize_stderr(.stderr))]
pub struct ToolFailure {
    pub tool: String,
    pub status: String,
    pub stderr: String,
}

impl ToolFailure {
    /// The [`ToolFailure`] anywhere in `err`'s chain of causes.
    pub fn find(err: &Error) -> Option<&ToolFailure> {
        let mut next: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(err);
        while let Some(cause) = next {
            if let Some(failure) = cause.downcast_ref::<ToolFailure>() {
                return Some(failure);
            }
            next = cause.source();
        }
        None
    }

    /// The SQLSTATE of the first error psql reported. psql prints it when run with
    /// `VERBOSITY=verbose` (`ERROR:  42704: role "x" does not exist`); the severity word and
    /// the message are translated by the server's `lc_messages`, the five-character code never is.
    ///
    /// Notices and warnings carry codes too (class 00 success, 01 warning, 02 no data, e.g.
    /// `WARNING:  01007: no privileges were granted`); they are skipped.
    pub fn sqlstate(&self) -> Option<&str> {
        self.stderr.lines().find_map(|line| {
            let (_, rest) = line.split_once(":  ")?;
            let (code, _) = rest.split_once(": ")?;
            let is_sqlstate = code.len() == 5
                && code
                    .bytes()
                    .all(|b| b.is_ascii_digit() || b.is_ascii_uppercase());
            let is_error = !matches!(&code[..code.len().min(2)], "00" | "01" | "02");
            (is_sqlstate && is_error).then_some(code)
        })
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        // A child left running would keep a dump or a restore transaction open.
        self.kill();
    }
}

/// Let a child write up to 1 MiB ahead instead of the default 64 KiB, so a dump tool and kura
/// switch less often. Best effort: the pipe still works at the default size.
pub fn enlarge_pipe(pipe: &impl std::os::fd::AsRawFd) {
    // SAFETY: fcntl on a file descriptor we own; F_SETPIPE_SZ has no memory effects.
    unsafe {
        libc::fcntl(pipe.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20);
    }
}

fn describe_status(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        _ => status.to_string(),
    }
}

/// The child's stderr on one line, for a log message.
pub fn summarize_stderr(stderr: &str) -> String {
    let lines: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if lines.is_empty() {
        "(no error output)".to_string()
    } else {
        lines.join(" | ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_exit_carries_stderr() {
        let mut command = Command::new("sh");
        command.args(["-c", "echo out; echo 'pg_dump: error: boom' >&2; exit 3"]);
        let mut child = ChildProcess::spawn(command, "fake-dump", false, true).unwrap();
        let mut out = String::new();
        child
            .take_stdout()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        assert_eq!(out, "out\n");
        let err = child.wait_success().unwrap_err();
        assert_eq!(
            err.to_string(),
            "fake-dump failed (exit status 3): pg_dump: error: boom"
        );
    }

    #[test]
    fn the_sqlstate_of_a_verbose_psql_error_is_read_whatever_the_language() {
        let failure = |stderr: &str| ToolFailure {
            tool: "psql".into(),
            status: "exit status 3".into(),
            stderr: stderr.into(),
        };
        let english = failure(
            "psql:<stdin>:12: ERROR:  42704: role \"app\" does not exist\nLOCATION:  get_role_oid, acl.c:5201\n",
        );
        assert_eq!(english.sqlstate(), Some("42704"));
        let after_notices = failure(
            "NOTICE:  00000: role \"x\" is already a member\nWARNING:  01007: no privileges were granted for \"t\"\nERROR:  42704: role \"app\" does not exist\n",
        );
        assert_eq!(after_notices.sqlstate(), Some("42704"));
        let german = failure("FEHLER:  42704: Rolle »app« existiert nicht\n");
        assert_eq!(german.sqlstate(), Some("42704"));
        assert_eq!(
            failure("ERROR:  role \"app\" does not exist").sqlstate(),
            None
        );
        assert_eq!(
            failure("pg_restore: error: input file is too short").sqlstate(),
            None
        );

        let mut command = Command::new("sh");
        command.args(["-c", "echo 'ERROR:  23505: duplicate key' >&2; exit 3"]);
        let err = ChildProcess::spawn(command, "psql", false, false)
            .unwrap()
            .wait_success()
            .unwrap_err()
            .context("restoring database x");
        let found = ToolFailure::find(&err).expect("kept as the cause");
        assert_eq!(found.sqlstate(), Some("23505"));
        assert_eq!(
            err.chain(),
            "restoring database x: psql failed (exit status 3): ERROR:  23505: duplicate key"
        );
    }

    #[test]
    fn large_stderr_does_not_deadlock() {
        let mut command = Command::new("sh");
        command.args([
            "-c",
            "head -c 1000000 /dev/zero | tr '\\0' x >&2; echo done",
        ]);
        let mut child = ChildProcess::spawn(command, "chatty", false, true).unwrap();
        let mut out = String::new();
        child
            .take_stdout()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        let stderr = child.wait_success().unwrap();
        assert_eq!(out, "done\n");
        assert_eq!(stderr.len(), STDERR_KEEP);
    }
}
