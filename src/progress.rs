//! Progress for humans at a terminal: one bar with bytes done of the expected total, rate, ETA
//! and the current database. Nothing at all in a Job or a pipe, which logs one line per
//! database instead (the callers do that through `tracing`).

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// The bar being drawn, so log lines can be written around it instead of through it. The
/// terminal is one per process, so one slot is its honest model.
static ACTIVE: Mutex<Option<ProgressBar>> = Mutex::new(None);

/// A handle on the bar, cheap to clone into pipeline stages; a no-op when nothing is drawn.
#[derive(Clone, Debug)]
pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    pub fn add(&self, n: u64) {
        self.bar.inc(n);
    }
    /// What is being worked on now ("db1", "globals").
    pub fn set_label(&self, label: impl Into<String>) {
        self.bar.set_message(label.into());
    }
}

/// Draws `backing up shop [=====>    ] 1.2 GiB/3.0 GiB 85 MiB/s eta 21s` on stderr while alive.
pub struct ProgressLine {
    bar: ProgressBar,
}

impl ProgressLine {
    /// `total` is what the bar fills up to (the manifest's stored bytes for a restore, the
    /// databases' sizes for a backup); without one it only counts. Drawn only when `enabled`
    /// (text logs) and stderr is a terminal.
    pub fn start(verb: &'static str, enabled: bool, total: Option<u64>) -> Self {
        let drawn = enabled && std::io::stderr().is_terminal();
        let bar = if drawn {
            let bar = ProgressBar::with_draw_target(total, ProgressDrawTarget::stderr_with_hz(4));
            // No colour in the template: NO_COLOR and dumb terminals need nothing special.
            let template = match total {
                Some(_) => "{prefix} {msg} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
                None => "{spinner} {prefix} {msg}: {binary_bytes} at {binary_bytes_per_sec}",
            };
            bar.set_style(
                ProgressStyle::with_template(template)
                    .expect("the progress template is valid")
                    .progress_chars("=> "),
            );
            bar.set_prefix(verb);
            bar.enable_steady_tick(Duration::from_millis(250));
            *ACTIVE.lock().unwrap_or_else(|e| e.into_inner()) = Some(bar.clone());
            bar
        } else {
            ProgressBar::hidden()
        };
        ProgressLine { bar }
    }

    pub fn progress(&self) -> Progress {
        Progress {
            bar: self.bar.clone(),
        }
    }

    pub async fn finish(self) {
        // Drop does the work; this keeps call sites explicit about where the bar ends.
    }
}

impl Drop for ProgressLine {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
        let mut active = ACTIVE.lock().unwrap_or_else(|e| e.into_inner());
        if active.as_ref().is_some_and(|b| b.is_finished()) {
            *active = None;
        }
    }
}

/// stderr for log lines: while a bar is drawn, a line is written above it (the bar is hidden,
/// the line printed, the bar redrawn) instead of through it.
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let bar = ACTIVE.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match bar {
            Some(bar) if !bar.is_finished() => bar.suspend(|| std::io::stderr().write(buf)),
            _ => std::io::stderr().write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
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
