//! The retry schedule: when to try a deferred message again, when to tell
//! the sender it is late, and when to give up.
//!
//! Two named profiles, from the relays operators know:
//! - `postfix` (the default): the delay doubles from 300 s to 4,000 s
//!   (`minimal_backoff_time`, `maximal_backoff_time`); no delay notice
//!   (`delay_warning_time = 0`); give up after 5 days (`maximal_queue_lifetime`).
//! - `iis`: retry after 15, 30 and 60 minutes, then every 240 minutes; a
//!   delay notice after 12 hours; give up after 2 days.
//!
//! RFC 5321 4.5.4.1 asks for retries no more often than every 30 minutes by
//! default. Both profiles retry sooner at first (Postfix after 5 minutes, IIS
//! after 15), as their relays always have: most temporary failures (greylisting,
//! a busy server) clear within minutes. Later retries are 66 and 240 minutes apart.
//!
//! Decisions take "now" as an argument: the clock is injected, and the
//! schedule is tested without waiting.

/// How the delay between attempts grows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Intervals {
    /// Fixed delays in seconds after the 1st, 2nd, ... attempt; the last repeats.
    Steps(Vec<u32>),
    /// Doubling from `min` seconds after the first attempt, capped at `max`.
    Doubling { min: u32, max: u32 },
}

/// A retry schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    pub intervals: Intervals,
    /// Seconds after arrival when the sender gets one delay notice.
    pub delay_notice_after: Option<u32>,
    /// Seconds after arrival when the relay gives up (status 4.4.7).
    pub give_up_after: u32,
}

const MINUTE: u32 = 60;
const HOUR: u32 = 60 * MINUTE;
const DAY: u32 = 24 * HOUR;

impl Schedule {
    /// Postfix 3.x defaults.
    pub fn postfix() -> Self {
        Schedule {
            intervals: Intervals::Doubling {
                min: 300,
                max: 4000,
            },
            delay_notice_after: None,
            give_up_after: 5 * DAY,
        }
    }

    /// IIS 6 SMTP defaults.
    pub fn iis() -> Self {
        Schedule {
            intervals: Intervals::Steps(vec![15 * MINUTE, 30 * MINUTE, 60 * MINUTE, 240 * MINUTE]),
            delay_notice_after: Some(12 * HOUR),
            give_up_after: 2 * DAY,
        }
    }

    /// A profile by name: `postfix` or `iis`.
    pub fn named(name: &str) -> Option<Self> {
        match name {
            "postfix" => Some(Self::postfix()),
            "iis" => Some(Self::iis()),
            _ => None,
        }
    }

    /// Seconds to wait after attempt number `attempts` (1 for the first).
    pub fn delay_after(&self, attempts: u32) -> u32 {
        let index = attempts.saturating_sub(1);
        match &self.intervals {
            Intervals::Steps(steps) => steps
                .get(index as usize)
                .or(steps.last())
                .copied()
                .unwrap_or(5 * MINUTE),
            Intervals::Doubling { min, max } => {
                let factor = 1u64 << index.min(31);
                u32::try_from(u64::from(*min).saturating_mul(factor))
                    .unwrap_or(u32::MAX)
                    .min(*max)
                    .max(1)
            }
        }
    }

    /// What to do after an attempt that left recipients pending.
    pub fn decide(
        &self,
        attempts: u32,
        arrival_ms: u64,
        now_ms: u64,
        delay_notice_sent: bool,
    ) -> Decision {
        let give_up_ms = arrival_ms.saturating_add(u64::from(self.give_up_after) * 1000);
        if now_ms >= give_up_ms {
            return Decision {
                next_attempt_ms: None,
                expired: true,
                delay_notice_due: false,
                give_up_ms,
            };
        }
        // The last attempt happens at the give-up time itself, not after it.
        let next = now_ms
            .saturating_add(u64::from(self.delay_after(attempts)) * 1000)
            .min(give_up_ms);
        let delay_notice_due = !delay_notice_sent
            && self
                .delay_notice_after
                .is_some_and(|after| now_ms >= arrival_ms.saturating_add(u64::from(after) * 1000));
        Decision {
            next_attempt_ms: Some(next),
            expired: false,
            delay_notice_due,
            give_up_ms,
        }
    }
}

/// The schedule's verdict after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// When to try again; `None` once expired.
    pub next_attempt_ms: Option<u64>,
    /// The give-up time has passed: pending recipients fail with 4.4.7.
    pub expired: bool,
    /// Time to send the one delay notice.
    pub delay_notice_due: bool,
    /// When the relay gives up (`Will-Retry-Until`).
    pub give_up_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    const ARRIVAL: u64 = 1_800_000_000_000;

    fn minutes(ms: u64) -> u64 {
        ms / 60_000
    }

    /// Follow a message that is deferred at every attempt, attempting exactly
    /// when the schedule says: (minutes after arrival of each attempt, delay notice at).
    fn simulate(schedule: &Schedule) -> (Vec<u64>, Option<u64>, u64) {
        let mut now = ARRIVAL;
        let mut attempts = 0;
        let mut times = Vec::new();
        let mut notice = None;
        loop {
            attempts += 1;
            times.push(minutes(now - ARRIVAL));
            let decision = schedule.decide(attempts, ARRIVAL, now, notice.is_some());
            if decision.delay_notice_due {
                notice = Some(minutes(now - ARRIVAL));
            }
            match decision.next_attempt_ms {
                Some(next) => now = next,
                None => return (times, notice, minutes(now - ARRIVAL)),
            }
        }
    }

    #[test]
    fn postfix_doubles_from_300_to_4000_seconds_and_gives_up_after_5_days() {
        let s = Schedule::postfix();
        let delays: Vec<u32> = (1..=7).map(|n| s.delay_after(n)).collect();
        assert_eq!(delays, vec![300, 600, 1200, 2400, 4000, 4000, 4000]);
        let (times, notice, gave_up) = simulate(&s);
        assert_eq!(&times[..5], &[0, 5, 15, 35, 75]);
        assert_eq!(notice, None, "no delay notice by default");
        assert_eq!(gave_up, 5 * 24 * 60);
        assert_eq!(
            *times.last().unwrap(),
            5 * 24 * 60,
            "a last attempt at the give-up time"
        );
    }

    #[test]
    fn iis_steps_notice_after_12_hours_and_gives_up_after_2_days() {
        let s = Schedule::iis();
        let (times, notice, gave_up) = simulate(&s);
        assert_eq!(&times[..6], &[0, 15, 45, 105, 345, 585]);
        // Attempts at 585, 825 min: the first at or after 720 min (12 h) sends the notice, once.
        assert_eq!(notice, Some(825));
        assert_eq!(gave_up, 2 * 24 * 60);
    }

    #[test]
    fn delay_notice_only_once_and_never_after_expiry() {
        let s = Schedule::iis();
        let late = ARRIVAL + 13 * 3_600_000;
        assert!(s.decide(5, ARRIVAL, late, false).delay_notice_due);
        assert!(!s.decide(5, ARRIVAL, late, true).delay_notice_due);
        let expired = s.decide(9, ARRIVAL, ARRIVAL + 2 * 86_400_000, false);
        assert!(expired.expired && !expired.delay_notice_due && expired.next_attempt_ms.is_none());
        assert_eq!(expired.give_up_ms, ARRIVAL + 2 * 86_400_000);
    }

    #[test]
    fn named_profiles() {
        assert_eq!(Schedule::named("postfix"), Some(Schedule::postfix()));
        assert_eq!(Schedule::named("iis"), Some(Schedule::iis()));
        assert_eq!(Schedule::named("exchange"), None);
    }
}
