//! Crontab expressions for `on = ["schedule"]` triggers, parsed when the
//! trigger folder loads.
//!
//! Trigger files use the standard 5-field crontab syntax (`minute hour
//! day-of-month month day-of-week`, 0 and 7 = Sunday, names like `MON-FRI`),
//! as in crontab and GitHub Actions. The `cron` crate wants a leading seconds
//! field and numbers Sunday as 1, so expressions are translated, never passed
//! through.
//!
//! Schedules are evaluated on the wall clock of the trigger's timezone: a
//! slot that falls into a daylight-saving gap fires at the first instant after
//! the gap, and a slot that occurs twice fires once.

use std::str::FromStr;

use chrono::{DateTime, LocalResult, NaiveDateTime, TimeZone, Utc};
use chrono_tz::Tz;

/// A parsed schedule with its timezone.
#[derive(Debug, Clone)]
pub struct Schedule {
    cron: cron::Schedule,
    pub timezone: Tz,
}

impl Schedule {
    pub fn parse(expression: &str, timezone: Option<&str>) -> Result<Schedule, String> {
        let timezone = match timezone {
            None => Tz::UTC,
            Some(name) => Tz::from_str(name)
                .map_err(|_| format!("unknown timezone `{name}` (use an IANA name like Europe/Berlin)"))?,
        };
        let translated = translate(expression)?;
        let cron =
            cron::Schedule::from_str(&translated).map_err(|e| format!("invalid schedule `{expression}`: {e}"))?;
        Ok(Schedule { cron, timezone })
    }

    /// The first slot strictly after `after`, as an instant. Slots are wall
    /// clock times in the schedule's timezone; one in a DST gap moves to the
    /// end of the gap, one in a repeated hour is taken at its first instance.
    pub(crate) fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        // Walk wall-clock slots (as naive times) from the local time of `after`.
        let local = after.with_timezone(&self.timezone).naive_local();
        let start = Utc.from_utc_datetime(&(local - chrono::Duration::hours(3)));
        for slot in self.cron.after(&start).take(10_000) {
            let instant = match self.to_instant(slot.naive_utc()) {
                Some(i) => i,
                None => continue,
            };
            if instant > after {
                return Some(instant);
            }
        }
        None
    }

    fn to_instant(&self, wall: NaiveDateTime) -> Option<DateTime<Utc>> {
        match self.timezone.from_local_datetime(&wall) {
            LocalResult::Single(t) => Some(t.with_timezone(&Utc)),
            LocalResult::Ambiguous(first, _) => Some(first.with_timezone(&Utc)),
            // In a gap: the first wall-clock minute that exists after it.
            LocalResult::None => (1..=180).find_map(|m| {
                match self.timezone.from_local_datetime(&(wall + chrono::Duration::minutes(m))) {
                    LocalResult::Single(t) | LocalResult::Ambiguous(t, _) => Some(t.with_timezone(&Utc)),
                    LocalResult::None => None,
                }
            }),
        }
    }

    /// Whether a run is due at `now` for a trigger last fired at `last`:
    /// the slot that is due (the latest one, when several were missed).
    pub fn due(&self, last: DateTime<Utc>, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let mut slot = self.next_after(last)?;
        if slot > now {
            return None;
        }
        // Collapse missed slots into one run: the most recent.
        for _ in 0..100_000 {
            match self.next_after(slot) {
                Some(next) if next <= now => slot = next,
                _ => break,
            }
        }
        Some(slot)
    }
}

/// Translates `m h dom mon dow` into the `cron` crate's `s m h dom mon dow`.
pub(crate) fn translate(expression: &str) -> Result<String, String> {
    let fields: Vec<&str> = expression.split_whitespace().collect();
    if fields.len() != 5 {
        return Err(format!(
            "invalid schedule `{expression}`: expected 5 fields (minute hour day-of-month month day-of-week), found {}",
            fields.len()
        ));
    }
    let dow = fields[4]
        .split(',')
        .map(translate_dow_item)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("invalid schedule `{expression}`: {e}"))?
        .join(",");
    Ok(format!("0 {} {} {} {} {dow}", fields[0], fields[1], fields[2], fields[3]))
}

/// Crontab numbers Sunday 0 (and 7), Monday 1 … Saturday 6; the `cron`
/// crate numbers Sunday 1 … Saturday 7. Names are the same in both.
fn translate_dow_item(item: &str) -> Result<String, String> {
    let (range, step) = match item.split_once('/') {
        Some((r, s)) => (r, Some(s)),
        None => (item, None),
    };
    let num = |s: &str| -> Result<Option<u32>, String> {
        if s.chars().all(|c| c.is_ascii_digit()) && !s.is_empty() {
            match s.parse::<u32>() {
                Ok(n) if n <= 7 => Ok(Some(n)),
                _ => Err(format!("day of week `{s}` is out of range 0-7")),
            }
        } else {
            Ok(None)
        }
    };
    let shift = |n: u32| n % 7 + 1;
    let translated = match range.split_once('-') {
        Some((a, b)) => match (num(a)?, num(b)?) {
            (Some(a), Some(7)) if step.is_none() && a > 0 => {
                // `5-7` is Friday to Sunday: Friday..Saturday, then Sunday.
                return Ok(format!("{}-7,1", shift(a)));
            }
            (Some(a), Some(b)) => format!("{}-{}", shift(a), if b == 7 { 7 } else { shift(b) }),
            (None, None) => range.to_string(),
            _ => return Err(format!("day-of-week range `{range}` mixes names and numbers")),
        },
        None => match num(range)? {
            Some(n) => shift(n).to_string(),
            None => range.to_string(),
        },
    };
    Ok(match step {
        Some(s) => format!("{translated}/{s}"),
        None => translated,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn translation_adds_seconds_and_renumbers_days() {
        for (input, want) in [
            ("0 9 * * 1-5", "0 0 9 * * 2-6"),
            ("*/15 * * * *", "0 */15 * * * *"),
            ("0 3 * * 0", "0 0 3 * * 1"),
            ("0 3 * * 7", "0 0 3 * * 1"),
            ("0 3 * * 5-7", "0 0 3 * * 6-7,1"),
            ("0 3 * * 0-6", "0 0 3 * * 1-7"),
            ("0 3 * * MON-FRI", "0 0 3 * * MON-FRI"),
            ("0 3 * * 1,3", "0 0 3 * * 2,4"),
            ("0 3 * * */2", "0 0 3 * * */2"),
        ] {
            assert_eq!(translate(input).unwrap(), want, "{input}");
        }
        assert!(translate("0 9 * *").is_err());
        assert!(translate("0 9 * * 8").is_err());
    }

    #[test]
    fn weekdays_at_nine_fire_monday_to_friday_and_never_on_sunday() {
        let s = Schedule::parse("0 9 * * 1-5", None).unwrap();
        // 2026-11-22 is a Sunday.
        let mut t = at("2026-11-21T12:00:00Z");
        let mut fired = Vec::new();
        for _ in 0..7 {
            t = s.next_after(t).unwrap();
            fired.push(t.format("%a %H:%M").to_string());
        }
        assert_eq!(fired, ["Mon 09:00", "Tue 09:00", "Wed 09:00", "Thu 09:00", "Fri 09:00", "Mon 09:00", "Tue 09:00"]);
        let names = Schedule::parse("0 9 * * MON-FRI", None).unwrap();
        assert_eq!(names.next_after(at("2026-11-21T12:00:00Z")), Some(at("2026-11-23T09:00:00Z")));
        let sunday = Schedule::parse("30 6 * * 0", None).unwrap();
        assert_eq!(sunday.next_after(at("2026-11-20T00:00:00Z")), Some(at("2026-11-22T06:30:00Z")));
    }

    #[test]
    fn timezones_and_daylight_saving() {
        let s = Schedule::parse("0 9 * * *", Some("Europe/Berlin")).unwrap();
        assert_eq!(s.next_after(at("2026-11-24T00:00:00Z")), Some(at("2026-11-24T08:00:00Z")));
        assert_eq!(s.next_after(at("2026-07-01T00:00:00Z")), Some(at("2026-07-01T07:00:00Z")));
        // 2026-03-29 02:00 → 03:00 in Berlin: a 02:30 run happens at 03:00 local, not never.
        let gap = Schedule::parse("30 2 * * *", Some("Europe/Berlin")).unwrap();
        assert_eq!(gap.next_after(at("2026-03-28T12:00:00Z")), Some(at("2026-03-29T01:00:00Z")));
        assert_eq!(gap.next_after(at("2026-03-29T01:00:00Z")), Some(at("2026-03-30T00:30:00Z")));
        // 2026-10-25 03:00 → 02:00: 02:30 happens twice, the run once.
        let twice = gap.next_after(at("2026-10-24T12:00:00Z")).unwrap();
        assert_eq!(twice, at("2026-10-25T00:30:00Z"));
        assert_eq!(gap.next_after(twice), Some(at("2026-10-26T01:30:00Z")));
        assert!(Schedule::parse("0 9 * * *", Some("Mars/Olympus")).is_err());
    }

    #[test]
    fn missed_slots_collapse_into_one_run() {
        let s = Schedule::parse("0 * * * *", None).unwrap();
        let last = at("2026-11-24T00:30:00Z");
        assert_eq!(s.due(last, at("2026-11-24T00:59:00Z")), None);
        assert_eq!(s.due(last, at("2026-11-24T01:00:00Z")), Some(at("2026-11-24T01:00:00Z")));
        // Down from 01:30 to 05:10: one run, for the latest slot.
        assert_eq!(s.due(last, at("2026-11-24T05:10:00Z")), Some(at("2026-11-24T05:00:00Z")));
    }
}
