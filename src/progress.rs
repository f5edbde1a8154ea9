//! Progress for humans at a terminal: a total bar (bytes done of the expected total, rate,
//! ETA, units of work done) and below it one line per running job (`--jobs`), each with what
//! it works on and its own bytes and rate. Nothing at all in a Job or a pipe, which logs one
//! line per part or database instead (the callers do that through `tracing`).

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// The bars being drawn (and the total line), so log lines can be written around them
/// instead of through them. The terminal is one per process, so one slot is its honest model.
static ACTIVE: Mutex<Option<(MultiProgress, ProgressBar)>> = Mutex::new(None);

/// A handle on the total bar and, for a job, its own line (and the lines of the jobs it is
/// part of); cheap to clone into pipeline stages; a no-op when nothing is drawn. A job's
/// line goes away when its last handle does.
#[derive(Clone, Debug)]
pub struct Progress {
    total: ProgressBar,
    /// The job's own line last, after those of the jobs it is a part of.
    jobs: Vec<Arc<JobLine>>,
}

impl Progress {
    pub fn add(&self, n: u64) {
        self.total.inc(n);
        for job in &self.jobs {
            job.bar.inc(n);
        }
    }

    /// What is being worked on now ("shop (indexes, constraints)"): the job's line, or the
    /// total's for work outside any job (the globals).
    pub fn set_label(&self, label: impl Into<String>) {
        match self.jobs.last() {
            Some(job) => job.bar.set_message(label.into()),
            None => self.total.set_message(label.into()),
        }
    }
}

/// One running job's line. Dropping it (with the last [`Progress`] clone) removes the line.
#[derive(Debug)]
struct JobLine {
    bar: ProgressBar,
    multi: MultiProgress,
}

impl Drop for JobLine {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
        self.multi.remove(&self.bar);
    }
}

/// Draws, on stderr while alive:
/// ```text
/// restoring 3/13 databases done [=======>      ] 1.2 GiB/3.0 GiB 85 MiB/s eta 21s
///   shop (indexes, constraints) [=============>] 700 MiB/700 MiB 40 MiB/s
///   billing                     [====>         ] 120 MiB/410 MiB 45 MiB/s
/// ```
pub struct ProgressLine {
    multi: Option<MultiProgress>,
    /// Whether this line drew the total and the terminal is its own; false for one started
    /// while another was drawn, whose jobs join that one.
    owns_terminal: bool,
    total: ProgressBar,
    /// Units of work the command runs and what they are ("databases"), when the caller
    /// said, and those done.
    units: OnceLock<(usize, &'static str)>,
    done: AtomicUsize,
}

/// Width of a job's label column, so the bars of several jobs line up.
const LABEL_WIDTH: usize = 32;

impl ProgressLine {
    /// `total` is what the bar fills up to (the manifest's stored bytes for a restore, the
    /// databases' sizes for a backup); without one it only counts. Drawn only when `enabled`
    /// (text logs) and stderr is a terminal.
    ///
    /// Started while another line is drawn (the scratch restores of `verify --deep`), it
    /// adds its jobs' lines to that one and counts on its total: the terminal has room for
    /// one set of bars.
    pub fn start(verb: &'static str, enabled: bool, total: Option<u64>) -> Self {
        match enabled && std::io::stderr().is_terminal() {
            true => Self::on_terminal(verb, total),
            false => Self::with_bars(None, ProgressBar::hidden()),
        }
    }

    fn on_terminal(verb: &'static str, total: Option<u64>) -> Self {
        let outer = ACTIVE.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match outer {
            Some((multi, total)) => Self::with_bars(Some(multi), total),
            None => Self::drawn_on(verb, total, ProgressDrawTarget::stderr_with_hz(4)),
        }
    }

    fn drawn_on(verb: &'static str, total: Option<u64>, target: ProgressDrawTarget) -> Self {
        let multi = MultiProgress::with_draw_target(target);
        let bar = multi.add(ProgressBar::hidden());
        if let Some(total) = total {
            bar.set_length(total);
        }
        // No colour in the templates: NO_COLOR and dumb terminals need nothing special.
        let template = match total {
            Some(_) => "{prefix} {msg} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
            None => "{spinner} {prefix} {msg}: {binary_bytes} at {binary_bytes_per_sec}",
        };
        bar.set_style(style(template));
        bar.set_prefix(verb);
        bar.enable_steady_tick(Duration::from_millis(250));
        *ACTIVE.lock().unwrap_or_else(|e| e.into_inner()) = Some((multi.clone(), bar.clone()));
        let mut line = Self::with_bars(Some(multi), bar);
        line.owns_terminal = true;
        line
    }

    fn with_bars(multi: Option<MultiProgress>, total: ProgressBar) -> Self {
        ProgressLine {
            multi,
            owns_terminal: false,
            total,
            units: OnceLock::new(),
            done: AtomicUsize::new(0),
        }
    }

    /// The total line counts `count` units of work (`noun`: "databases") as [`Self::one_done`]
    /// reports them; a unit may run as several jobs (a database split into parts). Said once.
    pub fn expect(&self, count: usize, noun: &'static str) {
        if !self.owns_terminal {
            return;
        }
        let _ = self.units.set((count, noun));
        self.show_counts();
    }

    pub fn one_done(&self) {
        if !self.owns_terminal {
            return;
        }
        self.done.fetch_add(1, Ordering::Relaxed);
        self.show_counts();
    }

    fn show_counts(&self) {
        if let Some(&(expected, noun)) = self.units.get() {
            let done = self.done.load(Ordering::Relaxed).min(expected);
            self.total
                .set_message(format!("{done}/{expected} {noun} done"));
        }
    }

    /// Progress that counts toward the total only, labelled on the total line.
    pub fn progress(&self) -> Progress {
        Progress {
            total: self.total.clone(),
            jobs: Vec::new(),
        }
    }

    /// A line of its own for one job, below the total, until the returned handle and all
    /// its clones are dropped. `expected` bytes give the line a bar; without, it counts.
    pub fn job(&self, label: impl Into<String>, expected: Option<u64>) -> Progress {
        self.job_within(&self.progress(), label, expected)
    }

    /// A line for a job that is part of `parent` (one part of a database's restore): its
    /// bytes count on the parent's line as well.
    pub fn job_within(
        &self,
        parent: &Progress,
        label: impl Into<String>,
        expected: Option<u64>,
    ) -> Progress {
        let Some(multi) = &self.multi else {
            return parent.clone();
        };
        // Into the group before anything is set: each setter draws, and a bar still on its
        // own would draw at the cursor, through the group's lines.
        let bar = match parent.jobs.last() {
            Some(above) => multi.insert_after(&above.bar, ProgressBar::hidden()),
            None => multi.add(ProgressBar::hidden()),
        };
        let template = match expected {
            Some(bytes) => {
                bar.set_length(bytes);
                format!("  {{msg:{LABEL_WIDTH}!}} [{{bar:20}}] {{binary_bytes}}/{{binary_total_bytes}} {{binary_bytes_per_sec}}")
            }
            None => format!(
                "  {{msg:{LABEL_WIDTH}!}} {{spinner}} {{binary_bytes}} at {{binary_bytes_per_sec}}"
            ),
        };
        bar.set_style(style(&template));
        bar.set_message(label.into());
        bar.enable_steady_tick(Duration::from_millis(250));
        let mut jobs = parent.jobs.clone();
        jobs.push(Arc::new(JobLine {
            bar,
            multi: multi.clone(),
        }));
        Progress {
            total: self.total.clone(),
            jobs,
        }
    }

    pub async fn finish(self) {
        // Drop does the work; this keeps call sites explicit about where the bars end.
    }
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .expect("the progress templates are valid")
        .progress_chars("=> ")
}

impl Drop for ProgressLine {
    fn drop(&mut self) {
        if !self.owns_terminal {
            return;
        }
        self.total.finish_and_clear();
        if let Some(multi) = &self.multi {
            let _ = multi.clear();
        }
        *ACTIVE.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// stderr for log lines: while bars are drawn, a line is written above them (the bars are
/// hidden, the line printed, the bars redrawn) instead of through them.
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let active = ACTIVE.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match active {
            Some((multi, _)) => multi.suspend(|| std::io::stderr().write(buf)),
            None => std::io::stderr().write(buf),
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
    use super::*;
    use indicatif::InMemoryTerm;

    #[test]
    fn human_bytes() {
        assert_eq!(super::human_bytes(512), "512 B");
        assert_eq!(super::human_bytes(1536), "1.5 KiB");
        assert_eq!(super::human_bytes(5 << 30), "5.0 GiB");
    }

    /// What the terminal shows once the total and `jobs` have been drawn again (a draw is
    /// otherwise rate limited).
    fn screen(term: &InMemoryTerm, line: &ProgressLine, jobs: &[&Progress]) -> String {
        line.total.force_draw();
        for job in jobs {
            job.jobs.iter().for_each(|j| j.bar.force_draw());
        }
        term.contents()
    }

    #[test]
    fn each_running_job_has_a_line_of_its_own_under_the_total() {
        let term = InMemoryTerm::new(12, 120);
        let target = ProgressDrawTarget::term_like(Box::new(term.clone()));
        let line = ProgressLine::drawn_on("restoring", Some(10 << 20), target);
        line.expect(3, "databases");
        let shop = line.job("shop", Some(6 << 20));
        let billing = line.job("billing", None);
        shop.add(3 << 20);
        billing.add(1 << 20);
        shop.set_label("shop (indexes, constraints)");

        let shown = screen(&term, &line, &[&shop, &billing]);
        let rows: Vec<&str> = shown.lines().collect();
        assert_eq!(rows.len(), 3, "the total and one line per job:\n{shown}");
        assert!(
            rows[0].starts_with("restoring 0/3 databases done ["),
            "{shown}"
        );
        assert!(
            rows[0].contains("4.00 MiB/10.00 MiB"),
            "the total adds both jobs:\n{shown}"
        );
        assert!(rows[1].contains("shop (indexes, constraints)"), "{shown}");
        assert!(rows[1].contains("3.00 MiB/6.00 MiB"), "{shown}");
        assert!(
            rows[2].contains("billing") && rows[2].contains("1.00 MiB"),
            "{shown}"
        );

        // A clone in a pipeline stage keeps the line; the last one removes it.
        let stage = shop.clone();
        drop(shop);
        assert_eq!(screen(&term, &line, &[&stage, &billing]).lines().count(), 3);
        drop(stage);
        line.one_done();
        let shown = screen(&term, &line, &[&billing]);
        assert_eq!(
            shown.lines().count(),
            2,
            "the finished job's line is gone:\n{shown}"
        );
        assert!(
            shown.starts_with("restoring 1/3 databases done ["),
            "{shown}"
        );
        assert!(shown.contains("billing"), "{shown}");

        // A part of a job has a line under it, and its bytes count on both.
        let part = line.job_within(&billing, "billing (public.orders)", Some(2 << 20));
        part.add(1 << 20);
        let shown = screen(&term, &line, &[&part]);
        let rows: Vec<&str> = shown.lines().collect();
        assert_eq!(rows.len(), 3, "{shown}");
        assert!(
            rows[1].contains("billing") && rows[1].contains("2.00 MiB"),
            "{shown}"
        );
        assert!(
            rows[2].contains("billing (public.orders)") && rows[2].contains("1.00 MiB/2.00 MiB"),
            "{shown}"
        );
        drop(part);

        // Work outside any job labels the total line.
        line.progress().set_label("globals");
        drop(billing);
        line.one_done();
        assert!(screen(&term, &line, &[]).starts_with("restoring 2/3 databases done ["));

        // A line started meanwhile (a scratch restore of verify --deep) joins this one.
        let inner = ProgressLine::on_terminal("restoring", Some(1 << 20));
        inner.expect(1, "databases");
        let scratch = inner.job("kura_verify_1", Some(1 << 20));
        scratch.add(1 << 20);
        let shown = screen(&term, &line, &[&scratch]);
        assert_eq!(shown.lines().count(), 2, "{shown}");
        assert!(shown.contains("kura_verify_1"), "{shown}");
        assert!(
            shown.contains("2/3 databases done"),
            "the outer line keeps its counts:\n{shown}"
        );
        assert!(
            shown.contains("6.00 MiB/10.00 MiB"),
            "its bytes count on the total:\n{shown}"
        );
        drop((scratch, inner));
        assert_eq!(screen(&term, &line, &[]).lines().count(), 1);
    }

    #[test]
    fn nothing_is_drawn_when_hidden() {
        let line = ProgressLine::start("backing up", false, None);
        line.expect(2, "databases");
        let job = line.job("shop", Some(10));
        job.add(5);
        job.set_label("shop (schema)");
        assert!(line.multi.is_none());
    }
}
