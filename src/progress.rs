//! Progress for humans at a terminal; nothing at all in a Job, which logs one line per
//! database instead (the callers do that through `tracing`).

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// A shared byte counter with a label ("db1"), cheap to clone into pipeline stages.
#[derive(Clone, Debug)]
pub struct Progress {
    bytes: Arc<AtomicU64>,
    label: Arc<Mutex<String>>,
}

impl Progress {
    pub fn add(&self, n: u64) {
        self.bytes.fetch_add(n, Ordering::Relaxed);
    }
    pub fn set_label(&self, label: impl Into<String>) {
        *self.label.lock().expect("progress label lock") = label.into();
    }
}

/// Draws `verb label: 1.2 GiB at 85.0 MiB/s` on stderr every half second while alive.
pub struct ProgressLine {
    progress: Progress,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl ProgressLine {
    /// Starts drawing only when stderr is a terminal and logs are for humans.
    pub fn start(verb: &'static str, enabled: bool) -> Self {
        let progress = Progress {
            bytes: Arc::new(AtomicU64::new(0)),
            label: Arc::new(Mutex::new(String::new())),
        };
        let stop = CancellationToken::new();
        let task = (enabled && std::io::stderr().is_terminal()).then(|| {
            let (progress, stop) = (progress.clone(), stop.clone());
            tokio::spawn(async move {
                let started = Instant::now();
                let mut tick = tokio::time::interval(Duration::from_millis(500));
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tick.tick() => {}
                    }
                    let bytes = progress.bytes.load(Ordering::Relaxed);
                    let rate = bytes as f64 / started.elapsed().as_secs_f64().max(0.001);
                    let label = progress.label.lock().expect("progress label lock").clone();
                    let mut err = std::io::stderr().lock();
                    // The cursor goes back to column 0, so a log line printed next
                    // overwrites the progress text instead of continuing it.
                    let _ = write!(
                        err,
                        "\r\x1b[2K{verb} {label}: {} at {}/s\r",
                        human_bytes(bytes),
                        human_bytes(rate as u64)
                    );
                    let _ = err.flush();
                }
                let _ = write!(std::io::stderr(), "\r\x1b[2K");
            })
        });
        ProgressLine {
            progress,
            stop,
            task,
        }
    }

    pub fn progress(&self) -> Progress {
        self.progress.clone()
    }

    pub async fn finish(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for ProgressLine {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn human_bytes() {
        assert_eq!(super::human_bytes(512), "512 B");
        assert_eq!(super::human_bytes(1536), "1.5 KiB");
        assert_eq!(super::human_bytes(5 << 30), "5.0 GiB");
    }
}
