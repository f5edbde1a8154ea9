//! The retention policy: a pure function of (backups, policy, now) that returns a decision
//! with reasons for every backup. `kura prune` only deletes what this says, and `--dry-run`
//! prints exactly these decisions.
//!
//! Semantics follow restic's `forget`: every rule keeps backups independently and the union is
//! kept. `--keep-daily 7` keeps the newest backup of each of the 7 most recent days *that have
//! a backup* (a gap of a week without backups does not delete the older ones). Periods are
//! calendar periods in UTC; weeks are ISO weeks (Monday to Sunday).
//!
//! Two rules hold whatever the policy says:
//! - only complete backups (with a manifest) count toward a rule, and the newest complete
//!   backup is always kept;
//! - a backup without a manifest is kept while it may still be running (its newest object is
//!   younger than the grace period) and deleted after that.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Datelike, Timelike, Utc};

use crate::error::{Error, Result};

/// Incomplete backups younger than this may belong to a run still in progress.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    pub keep_last: u32,
    pub keep_hourly: u32,
    pub keep_daily: u32,
    pub keep_weekly: u32,
    pub keep_monthly: u32,
    pub keep_yearly: u32,
    pub keep_within: Option<Duration>,
}

impl Policy {
    pub fn is_empty(&self) -> bool {
        self.keep_last == 0
            && self.keep_hourly == 0
            && self.keep_daily == 0
            && self.keep_weekly == 0
            && self.keep_monthly == 0
            && self.keep_yearly == 0
            && self.keep_within.is_none_or(|d| d.is_zero())
    }

    /// An empty policy would keep only the newest backup: far more likely a missing setting
    /// than an intent, so it is refused.
    pub fn validate(&self) -> Result<()> {
        if self.is_empty() {
            return Err(Error::usage(
                "no retention rule is set, which would delete every backup but the newest: give at least one of --keep-last, --keep-hourly, --keep-daily, --keep-weekly, --keep-monthly, --keep-yearly, --keep-within (or KURA_KEEP_*)",
            ));
        }
        Ok(())
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rules = Vec::new();
        for (name, n) in [
            ("last", self.keep_last),
            ("hourly", self.keep_hourly),
            ("daily", self.keep_daily),
            ("weekly", self.keep_weekly),
            ("monthly", self.keep_monthly),
            ("yearly", self.keep_yearly),
        ] {
            if n > 0 {
                rules.push(format!("{name} {n}"));
            }
        }
        if let Some(within) = self.keep_within.filter(|d| !d.is_zero()) {
            rules.push(format!("within {}", crate::config::format_duration(within)));
        }
        f.write_str(&rules.join(", "))
    }
}

/// The calendar period a backup falls in, as a label (`2026-11-28`, `2026-W48`).
type PeriodOf = fn(DateTime<Utc>) -> String;

/// `duration` before `now`, or the beginning of time for durations beyond the calendar
/// (`--keep-within 100000000d` means "forever", not a panic).
pub fn before(now: DateTime<Utc>, duration: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(duration)
        .ok()
        .and_then(|d| now.checked_sub_signed(d))
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// What retention needs to know about one backup folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub id: String,
    /// When the backup started (from its id).
    pub time: DateTime<Utc>,
    pub complete: bool,
    /// The newest object's modification time: a running backup keeps writing parts.
    pub last_activity: Option<DateTime<Utc>>,
    /// A manifest exists but cannot be read (written by a newer kura, or damaged): such a
    /// backup may well be complete, so it is never deleted and never counted.
    pub unreadable: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub id: String,
    pub keep: bool,
    /// Why: every rule that keeps it, or the one reason it goes.
    pub reasons: Vec<String>,
}

impl Decision {
    pub fn action(&self) -> &'static str {
        if self.keep {
            "keep"
        } else {
            "delete"
        }
    }
}

/// Decide every candidate's fate. The result is in the order of `candidates` sorted newest
/// first (by time, then id), one decision per candidate.
pub fn apply(
    candidates: &[Candidate],
    policy: &Policy,
    grace: Duration,
    now: DateTime<Utc>,
) -> Vec<Decision> {
    let mut sorted: Vec<&Candidate> = candidates.iter().collect();
    sorted.sort_by(|a, b| (b.time, &b.id).cmp(&(a.time, &a.id)));

    let mut reasons: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let complete: Vec<&Candidate> = sorted.iter().copied().filter(|c| c.complete).collect();

    if let Some(newest) = complete.first() {
        reasons
            .entry(&newest.id)
            .or_default()
            .push("newest complete backup (always kept)".into());
    }
    for (index, c) in complete.iter().enumerate().take(policy.keep_last as usize) {
        reasons.entry(&c.id).or_default().push(format!(
            "last {} ({} of {})",
            policy.keep_last,
            index + 1,
            policy.keep_last
        ));
    }
    let periods: [(&str, u32, PeriodOf); 5] = [
        ("hourly", policy.keep_hourly, |t| {
            format!("{} {:02}h", t.format("%Y-%m-%d"), t.hour())
        }),
        ("daily", policy.keep_daily, |t| {
            t.format("%Y-%m-%d").to_string()
        }),
        ("weekly", policy.keep_weekly, |t| {
            let week = t.iso_week();
            format!("{}-W{:02}", week.year(), week.week())
        }),
        ("monthly", policy.keep_monthly, |t| {
            t.format("%Y-%m").to_string()
        }),
        ("yearly", policy.keep_yearly, |t| t.year().to_string()),
    ];
    for (rule, count, period_of) in periods {
        let mut last_period: Option<String> = None;
        let mut kept = 0;
        for c in &complete {
            if kept == count {
                break;
            }
            let period = period_of(c.time);
            if last_period.as_ref() != Some(&period) {
                kept += 1;
                reasons
                    .entry(&c.id)
                    .or_default()
                    .push(format!("{rule} {period} ({kept} of {count})"));
                last_period = Some(period);
            }
        }
    }
    if let Some(within) = policy.keep_within.filter(|d| !d.is_zero()) {
        let cutoff = before(now, within);
        for c in complete.iter().filter(|c| c.time >= cutoff) {
            reasons.entry(&c.id).or_default().push(format!(
                "within {} of {}",
                crate::config::format_duration(within),
                now.format("%Y-%m-%d %H:%M:%SZ")
            ));
        }
    }

    let grace_cutoff = before(now, grace);
    sorted
        .iter()
        .map(|c| {
            let id = c.id.clone();
            if let Some(why) = &c.unreadable {
                return Decision {
                    id,
                    keep: true,
                    reasons: vec![format!(
                        "its manifest cannot be read ({why}): kept for a person to look at"
                    )],
                };
            }
            if c.complete {
                match reasons.remove(c.id.as_str()) {
                    Some(why) => Decision { id, keep: true, reasons: why },
                    None => Decision {
                        id,
                        keep: false,
                        reasons: vec![format!("matches no rule of: {policy}")],
                    },
                }
            } else {
                // Without object times (some stores omit them) the id's time stands in.
                let active = c.last_activity.unwrap_or(c.time).max(c.time);
                let age = crate::config::format_duration(
                    (now - active).to_std().unwrap_or(Duration::ZERO),
                );
                if active > grace_cutoff {
                    Decision {
                        id,
                        keep: true,
                        reasons: vec![format!(
                            "incomplete, last written {age} ago: may still be running (grace {})",
                            crate::config::format_duration(grace)
                        )],
                    }
                } else {
                    Decision {
                        id,
                        keep: false,
                        reasons: vec![format!(
                            "incomplete (no manifest), last written {age} ago, older than the grace of {}",
                            crate::config::format_duration(grace)
                        )],
                    }
                }
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    const DAY: u64 = 24 * 3600;

    fn at(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, s).unwrap()
    }

    fn now() -> DateTime<Utc> {
        at(2026, 11, 28, 12, 0, 0)
    }

    fn complete(t: DateTime<Utc>, suffix: &str) -> Candidate {
        Candidate {
            id: format!("{}-{suffix}", t.format("%Y%m%dT%H%M%SZ")),
            time: t,
            complete: true,
            last_activity: Some(t),
            unreadable: None,
        }
    }

    fn incomplete(t: DateTime<Utc>, last: Option<DateTime<Utc>>) -> Candidate {
        Candidate {
            id: format!("{}-ffffff", t.format("%Y%m%dT%H%M%SZ")),
            time: t,
            complete: false,
            last_activity: last,
            unreadable: None,
        }
    }

    /// One backup a day at 02:00 for `days` days up to the day of `now`.
    fn nightly(days: i64) -> Vec<Candidate> {
        (0..days)
            .map(|i| {
                complete(
                    at(2026, 11, 28, 2, 0, 0) - chrono::Duration::days(i),
                    "aaaaaa",
                )
            })
            .collect()
    }

    fn kept(decisions: &[Decision]) -> Vec<String> {
        decisions
            .iter()
            .filter(|d| d.keep)
            .map(|d| d.id[..15].to_string())
            .collect()
    }

    fn run(candidates: &[Candidate], policy: Policy) -> Vec<Decision> {
        apply(candidates, &policy, DEFAULT_GRACE, now())
    }

    struct Case {
        name: &'static str,
        candidates: Vec<Candidate>,
        policy: Policy,
        kept: Vec<&'static str>,
    }

    fn cases() -> Vec<Case> {
        let p = Policy::default;
        vec![
            Case {
                name: "keep-last 3 of 10 nightly",
                candidates: nightly(10),
                policy: Policy {
                    keep_last: 3,
                    ..p()
                },
                kept: vec!["20261128T020000", "20261127T020000", "20261126T020000"],
            },
            Case {
                name: "keep-last larger than the number of backups keeps all",
                candidates: nightly(3),
                policy: Policy {
                    keep_last: 30,
                    ..p()
                },
                kept: vec!["20261128T020000", "20261127T020000", "20261126T020000"],
            },
            Case {
                name: "keep-last 1 keeps only the newest",
                candidates: nightly(5),
                policy: Policy {
                    keep_last: 1,
                    ..p()
                },
                kept: vec!["20261128T020000"],
            },
            Case {
                name: "keep-daily 2 with two backups a day keeps the newest of each day",
                candidates: vec![
                    complete(at(2026, 11, 28, 14, 0, 0), "a"),
                    complete(at(2026, 11, 28, 2, 0, 0), "a"),
                    complete(at(2026, 11, 27, 14, 0, 0), "a"),
                    complete(at(2026, 11, 27, 2, 0, 0), "a"),
                    complete(at(2026, 11, 26, 14, 0, 0), "a"),
                ],
                policy: Policy {
                    keep_daily: 2,
                    ..p()
                },
                kept: vec!["20261128T140000", "20261127T140000"],
            },
            Case {
                name: "keep-daily counts days that have backups, not calendar days",
                candidates: vec![
                    complete(at(2026, 11, 28, 2, 0, 0), "a"),
                    complete(at(2026, 11, 10, 2, 0, 0), "a"),
                    complete(at(2026, 10, 1, 2, 0, 0), "a"),
                ],
                policy: Policy {
                    keep_daily: 2,
                    ..p()
                },
                kept: vec!["20261128T020000", "20261110T020000"],
            },
            Case {
                name: "keep-hourly 3 over one night of half-hourly backups",
                candidates: (0..8)
                    .map(|i| {
                        complete(
                            at(2026, 11, 28, 3, 30, 0) - chrono::Duration::minutes(30 * i),
                            "a",
                        )
                    })
                    .collect(),
                policy: Policy {
                    keep_hourly: 3,
                    ..p()
                },
                kept: vec!["20261128T033000", "20261128T023000", "20261128T013000"],
            },
            Case {
                name: "keep-weekly 2 uses ISO weeks (Monday starts a week)",
                candidates: vec![
                    complete(at(2026, 11, 23, 2, 0, 0), "a"), // Monday, week 48
                    complete(at(2026, 11, 22, 2, 0, 0), "a"), // Sunday, week 47
                    complete(at(2026, 11, 16, 2, 0, 0), "a"), // Monday, week 47
                    complete(at(2026, 11, 15, 2, 0, 0), "a"), // Sunday, week 46
                ],
                policy: Policy {
                    keep_weekly: 2,
                    ..p()
                },
                kept: vec!["20261123T020000", "20261122T020000"],
            },
            Case {
                name: "keep-weekly across a year boundary (2026-W53 and 2027-W01)",
                candidates: vec![
                    complete(at(2027, 1, 4, 2, 0, 0), "a"),   // 2027-W01
                    complete(at(2027, 1, 2, 2, 0, 0), "a"),   // 2026-W53
                    complete(at(2026, 12, 31, 2, 0, 0), "a"), // 2026-W53
                    complete(at(2026, 12, 27, 2, 0, 0), "a"), // 2026-W52
                ],
                policy: Policy {
                    keep_weekly: 2,
                    ..p()
                },
                kept: vec!["20270104T020000", "20270102T020000"],
            },
            Case {
                name: "keep-monthly takes the newest backup of each month",
                candidates: vec![
                    complete(at(2026, 11, 1, 0, 0, 0), "a"),
                    complete(at(2026, 10, 31, 23, 59, 59), "a"),
                    complete(at(2026, 10, 1, 0, 0, 0), "a"),
                    complete(at(2026, 9, 30, 23, 59, 59), "a"),
                ],
                policy: Policy {
                    keep_monthly: 2,
                    ..p()
                },
                kept: vec!["20261101T000000", "20261031T235959"],
            },
            Case {
                name: "month boundary: one second apart, two months",
                candidates: vec![
                    complete(at(2026, 12, 1, 0, 0, 0), "a"),
                    complete(at(2026, 11, 30, 23, 59, 59), "a"),
                    complete(at(2026, 11, 30, 1, 0, 0), "a"),
                ],
                policy: Policy {
                    keep_monthly: 5,
                    ..p()
                },
                kept: vec!["20261201T000000", "20261130T235959"],
            },
            Case {
                name: "leap day is its own day",
                candidates: vec![
                    complete(at(2028, 3, 1, 1, 0, 0), "a"),
                    complete(at(2028, 2, 29, 1, 0, 0), "a"),
                    complete(at(2028, 2, 28, 1, 0, 0), "a"),
                ],
                policy: Policy {
                    keep_daily: 2,
                    ..p()
                },
                kept: vec!["20280301T010000", "20280229T010000"],
            },
            Case {
                name: "keep-yearly across a year boundary",
                candidates: vec![
                    complete(at(2027, 1, 1, 0, 0, 0), "a"),
                    complete(at(2026, 12, 31, 23, 59, 59), "a"),
                    complete(at(2026, 6, 1, 0, 0, 0), "a"),
                    complete(at(2025, 6, 1, 0, 0, 0), "a"),
                ],
                policy: Policy {
                    keep_yearly: 2,
                    ..p()
                },
                kept: vec!["20270101T000000", "20261231T235959"],
            },
            Case {
                name: "keep-within 3d keeps everything younger and nothing older",
                candidates: nightly(10),
                policy: Policy {
                    keep_within: Some(Duration::from_secs(3 * DAY)),
                    ..p()
                },
                // 11-25 02:00 is 3d10h before now.
                kept: vec!["20261128T020000", "20261127T020000", "20261126T020000"],
            },
            Case {
                name: "keep-within keeps a backup exactly at the cutoff",
                candidates: vec![
                    complete(at(2026, 11, 28, 11, 0, 0), "a"),
                    complete(at(2026, 11, 27, 12, 0, 0), "a"),
                    complete(at(2026, 11, 27, 11, 59, 59), "a"),
                ],
                policy: Policy {
                    keep_within: Some(Duration::from_secs(DAY)),
                    ..p()
                },
                kept: vec!["20261128T110000", "20261127T120000"],
            },
            Case {
                name: "keep-within with nothing recent still keeps the newest",
                candidates: vec![
                    complete(at(2026, 1, 1, 0, 0, 0), "a"),
                    complete(at(2025, 1, 1, 0, 0, 0), "a"),
                ],
                policy: Policy {
                    keep_within: Some(Duration::from_secs(DAY)),
                    ..p()
                },
                kept: vec!["20260101T000000"],
            },
            Case {
                name: "daily 7 + weekly 4 + monthly 6 over a year of nightlies",
                candidates: nightly(365),
                policy: Policy {
                    keep_daily: 7,
                    keep_weekly: 4,
                    keep_monthly: 6,
                    ..p()
                },
                kept: vec![
                    "20261128T020000",
                    "20261127T020000",
                    "20261126T020000",
                    "20261125T020000",
                    "20261124T020000",
                    "20261123T020000",
                    "20261122T020000", // daily; 22nd ends W47
                    "20261115T020000",
                    "20261108T020000", // weekly W46, W45
                    "20261031T020000",
                    "20260930T020000",
                    "20260831T020000",
                    "20260731T020000",
                    "20260630T020000", // monthly
                ],
            },
            Case {
                name: "last 2 + within 3d: union, overlaps counted once",
                candidates: nightly(6),
                policy: Policy {
                    keep_last: 2,
                    keep_within: Some(Duration::from_secs(3 * DAY)),
                    ..p()
                },
                kept: vec!["20261128T020000", "20261127T020000", "20261126T020000"],
            },
            Case {
                name: "hourly + yearly combined",
                candidates: vec![
                    complete(at(2026, 11, 28, 11, 0, 0), "a"),
                    complete(at(2026, 11, 28, 10, 0, 0), "a"),
                    complete(at(2026, 11, 28, 9, 0, 0), "a"),
                    complete(at(2025, 12, 31, 9, 0, 0), "a"),
                    complete(at(2025, 3, 1, 9, 0, 0), "a"),
                ],
                policy: Policy {
                    keep_hourly: 2,
                    keep_yearly: 2,
                    ..p()
                },
                kept: vec!["20261128T110000", "20261128T100000", "20251231T090000"],
            },
            Case {
                name: "two backups in the same second: the higher id is the newer",
                candidates: vec![
                    complete(at(2026, 11, 28, 2, 0, 0), "aaaaaa"),
                    complete(at(2026, 11, 28, 2, 0, 0), "bbbbbb"),
                    complete(at(2026, 11, 27, 2, 0, 0), "aaaaaa"),
                ],
                policy: Policy {
                    keep_last: 1,
                    ..p()
                },
                kept: vec!["20261128T020000"],
            },
            Case {
                name: "same-second pair under keep-daily keeps one of them",
                candidates: vec![
                    complete(at(2026, 11, 28, 2, 0, 0), "aaaaaa"),
                    complete(at(2026, 11, 28, 2, 0, 0), "bbbbbb"),
                ],
                policy: Policy {
                    keep_daily: 3,
                    ..p()
                },
                kept: vec!["20261128T020000"],
            },
            Case {
                name: "incomplete backups do not count toward keep-last",
                candidates: vec![
                    incomplete(at(2026, 11, 20, 2, 0, 0), None),
                    complete(at(2026, 11, 19, 2, 0, 0), "a"),
                    complete(at(2026, 11, 18, 2, 0, 0), "a"),
                    complete(at(2026, 11, 17, 2, 0, 0), "a"),
                ],
                policy: Policy {
                    keep_last: 2,
                    ..p()
                },
                kept: vec!["20261119T020000", "20261118T020000"],
            },
            Case {
                name: "an incomplete backup within the grace is kept (may be running)",
                candidates: vec![
                    incomplete(
                        at(2026, 11, 28, 11, 0, 0),
                        Some(at(2026, 11, 28, 11, 50, 0)),
                    ),
                    complete(at(2026, 11, 27, 2, 0, 0), "a"),
                ],
                policy: Policy {
                    keep_last: 1,
                    ..p()
                },
                kept: vec!["20261128T110000", "20261127T020000"],
            },
            Case {
                name: "an old incomplete backup still being written is kept",
                candidates: vec![
                    incomplete(at(2026, 11, 26, 2, 0, 0), Some(at(2026, 11, 28, 11, 0, 0))),
                    complete(at(2026, 11, 25, 2, 0, 0), "a"),
                ],
                policy: Policy {
                    keep_last: 1,
                    ..p()
                },
                kept: vec!["20261126T020000", "20261125T020000"],
            },
            Case {
                name: "an incomplete backup older than the grace is deleted",
                candidates: vec![
                    incomplete(at(2026, 11, 27, 2, 0, 0), Some(at(2026, 11, 27, 3, 0, 0))),
                    complete(at(2026, 11, 26, 2, 0, 0), "a"),
                ],
                policy: Policy {
                    keep_last: 5,
                    ..p()
                },
                kept: vec!["20261126T020000"],
            },
            Case {
                name: "only incomplete backups: nothing complete, old ones deleted",
                candidates: vec![
                    incomplete(at(2026, 11, 28, 10, 0, 0), None),
                    incomplete(at(2026, 11, 1, 2, 0, 0), None),
                ],
                policy: Policy {
                    keep_last: 5,
                    ..p()
                },
                kept: vec!["20261128T100000"],
            },
            Case {
                name: "a policy that would delete everything keeps the newest complete backup",
                candidates: vec![
                    incomplete(at(2026, 11, 28, 2, 0, 0), None),
                    complete(at(2026, 1, 1, 0, 0, 0), "a"),
                    complete(at(2025, 1, 1, 0, 0, 0), "a"),
                ],
                policy: Policy {
                    keep_within: Some(Duration::from_secs(3600)),
                    ..p()
                },
                kept: vec!["20261128T020000", "20260101T000000"],
            },
            Case {
                name: "no backups at all",
                candidates: vec![],
                policy: Policy {
                    keep_last: 3,
                    ..p()
                },
                kept: vec![],
            },
            Case {
                name: "a backup from after --now is kept by keep-within",
                candidates: vec![
                    complete(at(2026, 12, 1, 0, 0, 0), "a"),
                    complete(at(2026, 11, 28, 2, 0, 0), "a"),
                    complete(at(2026, 11, 1, 2, 0, 0), "a"),
                ],
                policy: Policy {
                    keep_within: Some(Duration::from_secs(DAY)),
                    ..p()
                },
                kept: vec!["20261201T000000", "20261128T020000"],
            },
            Case {
                name: "monthly 12 over three years keeps exactly twelve months",
                candidates: nightly(3 * 365),
                policy: Policy {
                    keep_monthly: 12,
                    ..p()
                },
                kept: vec![
                    "20261128T020000",
                    "20261031T020000",
                    "20260930T020000",
                    "20260831T020000",
                    "20260731T020000",
                    "20260630T020000",
                    "20260531T020000",
                    "20260430T020000",
                    "20260331T020000",
                    "20260228T020000",
                    "20260131T020000",
                    "20251231T020000",
                ],
            },
            Case {
                name: "yearly 3 over three years of nightlies",
                candidates: nightly(3 * 365),
                policy: Policy {
                    keep_yearly: 3,
                    ..p()
                },
                kept: vec!["20261128T020000", "20251231T020000", "20241231T020000"],
            },
            Case {
                name: "a manifest a newer kura wrote is never deleted, nor counted",
                candidates: vec![
                    Candidate {
                        unreadable: Some("written by a newer kura".into()),
                        ..incomplete(at(2026, 11, 28, 2, 0, 0), None)
                    },
                    Candidate {
                        unreadable: Some("manifest is malformed".into()),
                        ..incomplete(at(2026, 1, 1, 2, 0, 0), None)
                    },
                    complete(at(2026, 11, 27, 2, 0, 0), "a"),
                    complete(at(2026, 11, 26, 2, 0, 0), "a"),
                ],
                policy: Policy {
                    keep_last: 1,
                    ..p()
                },
                kept: vec!["20261128T020000", "20261127T020000", "20260101T020000"],
            },
            Case {
                name: "input order does not matter",
                candidates: {
                    let mut c = nightly(5);
                    c.reverse();
                    c.swap(1, 3);
                    c
                },
                policy: Policy {
                    keep_last: 2,
                    ..p()
                },
                kept: vec!["20261128T020000", "20261127T020000"],
            },
        ]
    }

    #[test]
    fn table() {
        let cases = cases();
        assert!(cases.len() >= 30, "the issue asks for at least 30 cases");
        for case in cases {
            let decisions = run(&case.candidates, case.policy.clone());
            assert_eq!(
                decisions.len(),
                case.candidates.len(),
                "{}: one decision per backup",
                case.name
            );
            assert_eq!(kept(&decisions), case.kept, "{}", case.name);
            for d in &decisions {
                assert!(
                    !d.reasons.is_empty(),
                    "{}: {} has no reason",
                    case.name,
                    d.id
                );
            }
        }
    }

    #[test]
    fn the_newest_complete_backup_survives_every_policy() {
        let candidates = nightly(40);
        for policy in [
            Policy {
                keep_within: Some(Duration::from_secs(1)),
                ..Policy::default()
            },
            Policy {
                keep_yearly: 1,
                ..Policy::default()
            },
            Policy {
                keep_last: 1,
                ..Policy::default()
            },
        ] {
            let decisions = apply(&candidates, &policy, DEFAULT_GRACE, at(2030, 1, 1, 0, 0, 0));
            assert!(decisions[0].keep, "{policy}");
        }
    }

    #[test]
    fn reasons_say_which_rule_keeps_a_backup() {
        let decisions = run(
            &nightly(3),
            Policy {
                keep_last: 2,
                keep_daily: 1,
                ..Policy::default()
            },
        );
        assert_eq!(
            decisions[0].reasons,
            vec![
                "newest complete backup (always kept)",
                "last 2 (1 of 2)",
                "daily 2026-11-28 (1 of 1)"
            ]
        );
        assert_eq!(
            decisions[2].reasons,
            vec!["matches no rule of: last 2, daily 1"]
        );
        assert!(!decisions[2].keep);
    }

    #[test]
    fn an_empty_policy_is_refused() {
        let err = Policy::default().validate().unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Usage);
        assert!(err.to_string().contains("--keep-last"));
        let zero_within = Policy {
            keep_within: Some(Duration::ZERO),
            ..Policy::default()
        };
        assert!(zero_within.validate().is_err());
        assert!(Policy {
            keep_daily: 1,
            ..Policy::default()
        }
        .validate()
        .is_ok());
    }

    #[test]
    fn durations_beyond_the_calendar_mean_forever() {
        let forever = Duration::from_secs(u64::MAX / 2);
        let policy = Policy {
            keep_within: Some(forever),
            ..Policy::default()
        };
        let decisions = apply(&nightly(3), &policy, forever, now());
        assert!(decisions.iter().all(|d| d.keep));
    }

    #[test]
    fn grace_is_configurable() {
        let candidates = vec![
            incomplete(at(2026, 11, 28, 9, 0, 0), None),
            complete(at(2026, 11, 27, 2, 0, 0), "a"),
        ];
        let policy = Policy {
            keep_last: 3,
            ..Policy::default()
        };
        let short = apply(&candidates, &policy, Duration::from_secs(3600), now());
        assert_eq!(kept(&short), vec!["20261127T020000"]);
        let long = apply(&candidates, &policy, Duration::from_secs(6 * 3600), now());
        assert_eq!(kept(&long).len(), 2);
    }
}
