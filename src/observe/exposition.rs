//! The Prometheus text exposition format (version 0.0.4), written and, for the metrics file
//! kura maintains itself, read back.

use std::collections::BTreeMap;
use std::fmt::Write;

/// A metric family: name, type and help, as Prometheus' naming conventions want them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Family {
    pub name: &'static str,
    pub kind: &'static str,
    pub help: &'static str,
}

/// Label pairs in a fixed order, so equal label sets compare and print equal.
pub type Labels = Vec<(&'static str, String)>;

/// Samples to print, grouped by family in the order the families are added.
#[derive(Debug, Default)]
pub struct Exposition {
    families: Vec<(Family, Vec<(Labels, f64)>)>,
}

impl Exposition {
    pub fn add(&mut self, family: Family, labels: Labels, value: f64) {
        match self
            .families
            .iter_mut()
            .find(|(f, _)| f.name == family.name)
        {
            Some((_, samples)) => samples.push((labels, value)),
            None => self.families.push((family, vec![(labels, value)])),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.families.is_empty()
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        for (family, samples) in &self.families {
            let _ = writeln!(out, "# HELP {} {}", family.name, family.help);
            let _ = writeln!(out, "# TYPE {} {}", family.name, family.kind);
            for (labels, value) in samples {
                out.push_str(family.name);
                if !labels.is_empty() {
                    out.push('{');
                    for (i, (name, value)) in labels.iter().enumerate() {
                        if i > 0 {
                            out.push(',');
                        }
                        let _ = write!(out, "{name}=\"{}\"", escape_label(value));
                    }
                    out.push('}');
                }
                let _ = writeln!(out, " {}", format_value(*value));
            }
        }
        out
    }
}

fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn format_value(value: f64) -> String {
    if value.is_finite() && value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{}", value as i64)
    } else {
        format!("{value}")
    }
}

/// One sample line read back: its metric name, labels and value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// The samples of a text written by [`Exposition::render`]; lines that do not parse (someone
/// else's, a half-written file of an older version) are skipped, not fatal: the file is
/// rewritten whole anyway.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(parse_line)
        .collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let (series, value) = line.trim_end().rsplit_once(' ')?;
    let value: f64 = value.parse().ok()?;
    let (name, labels) = match series.split_once('{') {
        None => (series.to_string(), BTreeMap::new()),
        Some((name, rest)) => (name.to_string(), parse_labels(rest.strip_suffix('}')?)?),
    };
    Some(Sample {
        name,
        labels,
        value,
    })
}

fn parse_labels(text: &str) -> Option<BTreeMap<String, String>> {
    let mut labels = BTreeMap::new();
    let mut chars = text.chars().peekable();
    loop {
        let name: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if name.is_empty() {
            return Some(labels);
        }
        if chars.next()? != '"' {
            return None;
        }
        let mut value = String::new();
        loop {
            match chars.next()? {
                '\\' => match chars.next()? {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => break,
                other => value.push(other),
            }
        }
        labels.insert(name.trim().to_string(), value);
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GAUGE: Family = Family {
        name: "kura_test_seconds",
        kind: "gauge",
        help: "A test.",
    };

    #[test]
    fn what_is_written_reads_back() {
        let mut exposition = Exposition::default();
        exposition.add(
            GAUGE,
            vec![("tenant", "a\"b\\c\nd".into()), ("source", "pg".into())],
            1.5,
        );
        exposition.add(GAUGE, vec![("tenant", "x".into())], 1_700_000_000.0);
        let text = exposition.render();
        assert!(
            text.starts_with("# HELP kura_test_seconds A test.\n# TYPE kura_test_seconds gauge\n")
        );
        assert!(
            text.contains("kura_test_seconds{tenant=\"x\"} 1700000000\n"),
            "{text}"
        );
        let samples = parse(&text);
        assert_eq!(samples.len(), 2);
        assert_eq!(samples[0].labels["tenant"], "a\"b\\c\nd");
        assert_eq!(samples[0].labels["source"], "pg");
        assert_eq!(samples[0].value, 1.5);
        assert!(parse("garbage line\nkura_x{broken 1\n").is_empty());
    }
}
