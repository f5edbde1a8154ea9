//! `--jobs N`: a command's units of work (databases of a backup or a restore, the scratch
//! restores of `verify --deep`) side by side, with one failure rule for all of them.

use std::future::Future;

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};

/// Jobs when `--jobs` is not given: one per core, at most 4. Past that, the database server's
/// disks and the link to the object store are the limit, not kura.
pub fn default_jobs() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 4)
}

/// Runs `work` on every item, at most `jobs` at once, and returns the results in the items'
/// order.
///
/// Each work gets a token to stop on: a child of `cancel` that is also cancelled by the first
/// failure. So a failure (or SIGTERM) stops the running jobs through their own cleanup (a dump
/// tool killed, an upload aborted, a database created for the restore dropped) and starts no
/// new one; once every started job has ended, the first failure is returned, never the
/// interruptions it caused in the others.
pub async fn run_all<T, R, F, Fut>(
    items: Vec<T>,
    jobs: usize,
    cancel: &CancellationToken,
    work: F,
) -> Result<Vec<R>>
where
    F: Fn(T, CancellationToken) -> Fut,
    Fut: Future<Output = Result<R>>,
{
    let stop = cancel.child_token();
    let count = items.len();
    let mut running = futures::stream::iter(items.into_iter().enumerate())
        .map(|(index, item)| {
            let job_stop = stop.clone();
            let job = work(item, stop.clone());
            async move {
                if job_stop.is_cancelled() {
                    return (index, Err(Error::interrupted()));
                }
                (index, job.await)
            }
        })
        .buffer_unordered(jobs.max(1));
    let mut done: Vec<Option<R>> = (0..count).map(|_| None).collect();
    let mut failure = None;
    while let Some((index, outcome)) = running.next().await {
        match outcome {
            Ok(result) => done[index] = Some(result),
            Err(err) if failure.is_none() => {
                stop.cancel();
                failure = Some(err);
            }
            // A second, independent failure (another damaged part) is not the one reported,
            // but is not lost either.
            Err(err) if err.kind() != crate::error::ErrorKind::Interrupted => {
                tracing::error!(error = %err.chain(), "another job failed as well");
            }
            Err(_) => {}
        }
    }
    match failure {
        Some(err) => Err(err),
        None => Ok(done
            .into_iter()
            .map(|r| r.expect("every job ended"))
            .collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn results_keep_the_items_order_and_jobs_bound_the_concurrency() {
        let running = AtomicUsize::new(0);
        let most = AtomicUsize::new(0);
        let cancel = CancellationToken::new();
        let results = run_all((0..12u64).collect(), 3, &cancel, |n, _| {
            let (running, most) = (&running, &most);
            async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                // Later items finish first: the order must come from the items.
                tokio::time::sleep(Duration::from_millis(30 - 2 * n)).await;
                running.fetch_sub(1, Ordering::SeqCst);
                Ok(n * 10)
            }
        })
        .await
        .unwrap();
        assert_eq!(results, (0..12).map(|n| n * 10).collect::<Vec<_>>());
        assert_eq!(most.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn the_first_failure_stops_the_others_and_is_the_one_returned() {
        let started = AtomicUsize::new(0);
        let cleaned_up = AtomicUsize::new(0);
        let cancel = CancellationToken::new();
        let outcome: Result<Vec<()>> = run_all((0..10).collect(), 2, &cancel, |n, stop| {
            let (started, cleaned_up) = (&started, &cleaned_up);
            async move {
                started.fetch_add(1, Ordering::SeqCst);
                if n == 1 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    return Err(Error::integrity("part 2 is damaged"));
                }
                tokio::select! {
                    _ = stop.cancelled() => {
                        cleaned_up.fetch_add(1, Ordering::SeqCst);
                        Err(Error::interrupted())
                    }
                    _ = tokio::time::sleep(Duration::from_secs(30)) => Ok(()),
                }
            }
        })
        .await;
        let err = outcome.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Integrity, "{err}");
        // Job 0 was running and cleaned up; none after the failure started its work.
        assert_eq!(started.load(Ordering::SeqCst), 2);
        assert_eq!(cleaned_up.load(Ordering::SeqCst), 1);
        assert!(!cancel.is_cancelled(), "the caller's token is left alone");
    }
}
