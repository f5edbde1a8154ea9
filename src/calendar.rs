//! Cron schedules as Kubernetes and crontab write them, for `status --schedule` and `schedule`.
//!
//! The `cron` crate speaks the Quartz dialect: a seconds field first and days of the week
//! numbered 1-7 from Sunday. Operators copy expressions from a CronJob (`0 2 * * 0` = Sundays
//! at 02:00, days 0-7 with 0 and 7 both Sunday), so kura accepts exactly that dialect and
//! translates it; reading a crontab expression with Quartz numbering would silently shift every
//! weekly schedule by a day.

use std::collections::BTreeSet;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;

use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct CronSchedule {
    expression: String,
    schedule: cron::Schedule,
    timezone: Tz,
}

impl CronSchedule {
    /// Parse a five-field crontab expression or a macro (`@hourly`, `@daily`, `@midnight`,
    /// `@weekly`, `@monthly`, `@yearly`, `@annually`), evaluated in `timezone` (IANA name).
    pub fn parse(expression: &str, timezone: Option<&str>) -> Result<Self> {
        let timezone = match timezone {
            None => Tz::UTC,
            Some(name) => name.parse::<Tz>().map_err(|_| {
                Error::usage(format!(
                    "unknown time zone {name:?}: use an IANA name such as Europe/Berlin or UTC"
                ))
            })?,
        };
        let quartz = to_quartz(expression).map_err(|why| {
            Error::usage(format!(
                "invalid cron expression {expression:?}: {why}; expected five fields \"minute hour day-of-month month day-of-week\", e.g. \"30 2 * * *\" (02:30 daily) or @daily"
            ))
        })?;
        let schedule = cron::Schedule::from_str(&quartz).map_err(|e| {
            Error::usage(format!(
                "invalid cron expression {expression:?}: {e}; expected five fields \"minute hour day-of-month month day-of-week\", e.g. \"30 2 * * *\""
            ))
        })?;
        Ok(CronSchedule {
            expression: expression.trim().to_string(),
            schedule,
            timezone,
        })
    }

    pub fn expression(&self) -> &str {
        &self.expression
    }

    /// The first scheduled time strictly after `after`.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.schedule
            .after(&after.with_timezone(&self.timezone))
            .next()
            .map(|t| t.with_timezone(&Utc))
    }

    /// The last scheduled time at or before `at`.
    pub fn previous(&self, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
        // `after(t).next_back()` walks backwards from t, exclusive; one second later makes it
        // inclusive (schedules have minute resolution).
        let from = (at + chrono::Duration::seconds(1)).with_timezone(&self.timezone);
        self.schedule
            .after(&from)
            .next_back()
            .map(|t| t.with_timezone(&Utc))
    }
}

const DAY_NAMES: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];
const MONTH_NAMES: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];

fn to_quartz(expression: &str) -> std::result::Result<String, String> {
    let text = expression.trim();
    if let Some(name) = text.strip_prefix('@') {
        return match name {
            "yearly" | "annually" => Ok("0 0 0 1 1 *".into()),
            "monthly" => Ok("0 0 0 1 * *".into()),
            "weekly" => Ok("0 0 0 * * 1".into()),
            "daily" | "midnight" => Ok("0 0 0 * * *".into()),
            "hourly" => Ok("0 0 * * * *".into()),
            _ => Err(format!("unknown macro @{name}")),
        };
    }
    let fields: Vec<&str> = text.split_whitespace().collect();
    if fields.len() != 5 {
        return Err(format!("it has {} fields", fields.len()));
    }
    let [minute, hour, day_of_month, month, day_of_week] = [0, 1, 2, 3, 4].map(|i| fields[i]);
    for (name, field) in [
        ("minute", minute),
        ("hour", hour),
        ("day-of-month", day_of_month),
    ] {
        if field.chars().any(|c| c.is_ascii_alphabetic() || c == '?') {
            return Err(format!("the {name} field {field:?} must be numeric"));
        }
    }
    let month = expand(month, 1, 12, 12, &MONTH_NAMES, 1, "month")?;
    // `1/2` means Mon, Wed, Fri in crontab: a step from a start runs to Saturday (6), not to
    // the Sunday-again 7.
    let days = expand(day_of_week, 0, 7, 6, &DAY_NAMES, 0, "day-of-week")?;
    if day_of_month != "*" && days.is_some() {
        // crontab fires when EITHER field matches; Quartz needs one of them to be `?`.
        return Err(
            "restricting both day-of-month and day-of-week means \"either\" in crontab, which this schedule cannot express; restrict only one"
                .into(),
        );
    }
    let month = month.map_or("*".to_string(), |m| join(&m));
    let day_of_week = match days {
        None => "*".to_string(),
        // Quartz numbers Sunday 1 … Saturday 7; crontab's 7 is Sunday again.
        Some(days) => join(&days.iter().map(|d| d % 7 + 1).collect()),
    };
    Ok(format!(
        "0 {minute} {hour} {day_of_month} {month} {day_of_week}"
    ))
}

fn join(values: &BTreeSet<u32>) -> String {
    values
        .iter()
        .map(|v| v.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// The values a field selects, or `None` for `*`. Supports lists, ranges, steps and names.
fn expand(
    field: &str,
    min: u32,
    max: u32,
    step_end: u32,
    names: &[&str],
    first_name_value: u32,
    what: &str,
) -> std::result::Result<Option<BTreeSet<u32>>, String> {
    if field == "*" {
        return Ok(None);
    }
    let value = |text: &str| -> std::result::Result<u32, String> {
        let lower = text.to_ascii_lowercase();
        if let Some(i) = names.iter().position(|n| *n == lower) {
            return Ok(i as u32 + first_name_value);
        }
        match text.parse::<u32>() {
            Ok(v) if (min..=max).contains(&v) => Ok(v),
            _ => Err(format!("{what} value {text:?} is not in {min}-{max}")),
        }
    };
    let mut out = BTreeSet::new();
    for item in field.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((range, step)) => (
                range,
                step.parse::<u32>()
                    .ok()
                    .filter(|s| *s > 0)
                    .ok_or_else(|| format!("{what} step {step:?} is not a positive number"))?,
            ),
            None => (item, 1),
        };
        let (low, high) = match range {
            "*" => (min, max),
            _ => match range.split_once('-') {
                Some((low, high)) => (value(low)?, value(high)?),
                None if step > 1 => (value(range)?, step_end),
                None => (value(range)?, value(range)?),
            },
        };
        if low > high {
            return Err(format!("{what} range {range:?} runs backwards"));
        }
        out.extend((low..=high).step_by(step as usize));
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, 0).unwrap()
    }

    #[test]
    fn crontab_days_of_week_mean_what_kubernetes_means() {
        // 2026-11-28 is a Saturday; crontab 0 and 7 are Sunday.
        for sunday in ["0 2 * * 0", "0 2 * * 7", "0 2 * * SUN", "0 2 * * sun"] {
            let s = CronSchedule::parse(sunday, None).unwrap();
            assert_eq!(
                s.next_after(utc(2026, 11, 28, 12, 0)),
                Some(utc(2026, 11, 29, 2, 0)),
                "{sunday}"
            );
        }
        let weekdays = CronSchedule::parse("30 1 * * 1-5", None).unwrap();
        assert_eq!(
            weekdays.next_after(utc(2026, 11, 28, 12, 0)),
            Some(utc(2026, 11, 30, 1, 30))
        );
        // A step from a start ends on Saturday: Mon, Wed, Fri, never Sunday.
        let odd = CronSchedule::parse("0 4 * * 1/2", None).unwrap();
        assert_eq!(
            odd.next_after(utc(2026, 11, 27, 12, 0)),
            Some(utc(2026, 11, 30, 4, 0))
        );
        let weekend = CronSchedule::parse("0 3 * * 6-7", None).unwrap();
        assert_eq!(
            weekend.next_after(utc(2026, 11, 28, 12, 0)),
            Some(utc(2026, 11, 29, 3, 0))
        );
    }

    #[test]
    fn previous_is_inclusive_and_next_is_exclusive() {
        let daily = CronSchedule::parse("17 2 * * *", None).unwrap();
        assert_eq!(
            daily.previous(utc(2026, 11, 28, 2, 17)),
            Some(utc(2026, 11, 28, 2, 17))
        );
        assert_eq!(
            daily.previous(utc(2026, 11, 28, 2, 16)),
            Some(utc(2026, 11, 27, 2, 17))
        );
        assert_eq!(
            daily.next_after(utc(2026, 11, 28, 2, 17)),
            Some(utc(2026, 11, 29, 2, 17))
        );
    }

    #[test]
    fn time_zones_and_macros() {
        let berlin = CronSchedule::parse("0 2 * * *", Some("Europe/Berlin")).unwrap();
        assert_eq!(
            berlin.next_after(utc(2026, 11, 28, 12, 0)),
            Some(utc(2026, 11, 29, 1, 0))
        );
        let daily = CronSchedule::parse("@daily", None).unwrap();
        assert_eq!(
            daily.previous(utc(2026, 11, 28, 12, 0)),
            Some(utc(2026, 11, 28, 0, 0))
        );
        let steps = CronSchedule::parse("*/15 * * * *", None).unwrap();
        assert_eq!(
            steps.next_after(utc(2026, 11, 28, 12, 1)),
            Some(utc(2026, 11, 28, 12, 15))
        );
        let months = CronSchedule::parse("0 0 1 jan,jul *", None).unwrap();
        assert_eq!(
            months.next_after(utc(2026, 11, 28, 12, 0)),
            Some(utc(2027, 1, 1, 0, 0))
        );
    }

    #[test]
    fn bad_expressions_say_what_is_wrong() {
        for (bad, says) in [
            ("0 2 * *", "4 fields"),
            ("0 0 2 * * *", "6 fields"),
            ("0 25 * * *", "25"),
            ("0 2 * * 8", "not in 0-7"),
            ("0 2 * * MON-", "not in 0-7"),
            ("0 2 1 * 1", "restrict only one"),
            ("0 2 * * */0", "positive"),
            ("@fortnightly", "unknown macro"),
            ("nonsense", "1 fields"),
        ] {
            let err = CronSchedule::parse(bad, None).unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::Usage);
            let text = err.to_string();
            assert!(text.contains(says), "{bad:?}: {text}");
            assert!(text.contains("five fields"), "{bad:?}: {text}");
        }
        let err = CronSchedule::parse("@daily", Some("Mars/Olympus")).unwrap_err();
        assert!(err.to_string().contains("Mars/Olympus"));
    }
}
