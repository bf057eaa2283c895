//! `max_items_per_second`: a cap on what the sink sends, kept by the sampling percentage. The
//! sink counts the items its records would send at 100 %, window after window, and sets the
//! percentage for the next window so that they stay under the cap: lower at once when the
//! traffic grows, higher again only once the traffic has stayed lower for a while, and never
//! above `sampling_percentage`. Failures are always sent and come off the cap first.

use std::time::{Duration, Instant};

/// How long the sink counts items before it reconsiders the percentage.
pub const WINDOW: Duration = Duration::from_secs(5);

/// How long every window must have called for a higher percentage before it goes up (a lower
/// one applies at once): a burst that comes back does not make the percentage swing.
pub const RAISE_AFTER: Duration = Duration::from_secs(30);

/// A window ends early once it has sent a whole window's items, but not before this part of
/// it has passed.
const SHORTEST: u32 = 50;

/// The lowest percentage the cap sets: one operation in a thousand.
pub const MIN_PERCENTAGE: f64 = 0.1;

/// The percentage in effect and this window's counts.
#[derive(Debug, Clone)]
pub struct Adaptive {
    max_per_second: f64,
    ceiling: f64,
    window: Duration,
    percentage: f64,
    window_start: Instant,
    /// Items this window's records would have sent at 100 %, failures left out.
    offered: u64,
    /// Items of failures this window (sent whatever the sampling).
    forced: u64,
    /// Since when every window has called for more than the percentage in effect, and the
    /// least it called for.
    higher: Option<(Instant, f64)>,
}

impl Adaptive {
    /// A cap of `max_per_second` items under a configured percentage of `ceiling`, which is
    /// where it starts.
    pub fn new(max_per_second: f64, ceiling: f64, now: Instant) -> Adaptive {
        Adaptive::with_window(max_per_second, ceiling, WINDOW, now)
    }

    /// The same with another window (tests).
    pub fn with_window(
        max_per_second: f64,
        ceiling: f64,
        window: Duration,
        now: Instant,
    ) -> Adaptive {
        Adaptive {
            max_per_second,
            ceiling,
            window,
            percentage: ceiling,
            window_start: now,
            offered: 0,
            forced: 0,
            higher: None,
        }
    }

    /// The percentage in effect.
    pub fn percentage(&self) -> f64 {
        self.percentage
    }

    /// Counts a batch: `offered` items its records would send at 100 % (failures left out) and
    /// `forced` items of failures. At the end of a window, sets the percentage for the next
    /// one, and returns it when it changed.
    pub fn count(&mut self, offered: u64, forced: u64, now: Instant) -> Option<f64> {
        self.offered += offered;
        self.forced += forced;
        let elapsed = now.saturating_duration_since(self.window_start);
        // A window ends early once it has sent what a whole window may (a burst, or traffic
        // back after an idle spell at a higher percentage), when it is long enough to say what
        // the traffic is.
        let sent = self.offered as f64 * self.percentage / 100.0 + self.forced as f64;
        let spent = sent > self.max_per_second * self.window.as_secs_f64();
        if elapsed < self.window && !(spent && elapsed >= self.window / SHORTEST) {
            return None;
        }
        let secs = elapsed.as_secs_f64();
        let budget = (self.max_per_second - self.forced as f64 / secs).max(0.0);
        let offered = self.offered as f64 / secs;
        let wanted = if offered * self.ceiling <= budget * 100.0 {
            self.ceiling
        } else {
            whole_share(100.0 * budget / offered).min(self.ceiling)
        };
        let started = self.window_start;
        self.window_start = now;
        self.offered = 0;
        self.forced = 0;
        let before = self.percentage;
        if wanted < before {
            self.percentage = wanted;
            self.higher = None;
        } else if wanted > before {
            let (since, least) = self.higher.get_or_insert((started, wanted));
            *least = least.min(wanted);
            if now.saturating_duration_since(*since) >= RAISE_AFTER {
                self.percentage = *least;
                self.higher = None;
            }
        } else {
            self.higher = None;
        }
        (self.percentage != before).then_some(self.percentage)
    }
}

/// The largest `100 / n` (n a whole number, at most 1000) not above `p`: each item sent then
/// stands for a whole number of operations, as its `sampleRate` tells Application Insights.
pub fn whole_share(p: f64) -> f64 {
    let n = (100.0 / p.max(MIN_PERCENTAGE)).ceil().clamp(1.0, 1000.0);
    100.0 / n
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn shares_are_whole_fractions_and_never_below_the_minimum() {
        assert_eq!(whole_share(100.0), 100.0);
        assert_eq!(whole_share(60.0), 50.0);
        assert_eq!(whole_share(50.0), 50.0);
        assert_eq!(whole_share(34.0), 100.0 / 3.0);
        assert_eq!(whole_share(2.5), 2.5);
        assert_eq!(whole_share(2.4), 100.0 / 42.0);
        assert_eq!(whole_share(0.0), 0.1);
        assert_eq!(whole_share(0.01), 0.1);
    }

    #[test]
    fn a_busy_window_lowers_the_percentage_at_once() {
        let t = Instant::now();
        let mut a = Adaptive::new(100.0, 100.0, t);
        assert_eq!(a.percentage(), 100.0);
        // Under the window's share (500 items) nothing changes before the window ends.
        assert_eq!(a.count(400, 0, t + 4 * S), None);
        assert_eq!(a.percentage(), 100.0);
        // 5 000 items in 5 s is 1 000 a second: a tenth of them is the cap.
        assert_eq!(a.count(4_600, 0, t + 5 * S), Some(10.0));
        // Twice the traffic: half that.
        assert_eq!(a.count(10_000, 0, t + 10 * S), Some(5.0));
        // The same again: no change.
        assert_eq!(a.count(10_000, 0, t + 15 * S), None);
    }

    #[test]
    fn a_window_that_has_sent_its_share_ends_early() {
        let t = Instant::now();
        let mut a = Adaptive::new(100.0, 100.0, t);
        let ms = Duration::from_millis(1);
        // 1 000 items in 50 ms are twice a window's 500, but too short a time to go by.
        assert_eq!(a.count(1_000, 0, t + 50 * ms), None);
        // At 100 ms (a fiftieth of the window) the window ends: 10 000 a second, 1 %.
        assert_eq!(a.count(0, 0, t + 100 * ms), Some(1.0));
        // At 1 %, 10 000 a second send 100 a second: the window runs its full length.
        assert_eq!(a.count(45_000, 0, t + 4_600 * ms), None);
        assert_eq!(a.count(5_000, 0, t + 5_100 * ms), None);
        // Traffic back after a long idle spell raises the percentage at once, and the window
        // that follows ends as soon as it has sent its share.
        assert_eq!(a.count(0, 0, t + 120 * S), Some(100.0));
        assert_eq!(a.count(1_000, 0, t + 120 * S + 100 * ms), Some(1.0));
    }

    #[test]
    fn failures_come_off_the_cap_first() {
        let t = Instant::now();
        let mut a = Adaptive::new(100.0, 100.0, t);
        // 50 failure items a second leave 50 for 1 000 offered: 5 %.
        assert_eq!(a.count(5_000, 250, t + 5 * S), Some(5.0));
        // Failures alone over the cap: the lowest percentage.
        assert_eq!(a.count(5_000, 1_000, t + 10 * S), Some(MIN_PERCENTAGE));
    }

    #[test]
    fn the_percentage_goes_back_up_only_after_a_quiet_spell_and_never_past_the_ceiling() {
        let t = Instant::now();
        let mut a = Adaptive::new(100.0, 25.0, t);
        // Under the cap at the ceiling: it stays at the ceiling, not at a whole share below.
        assert_eq!(a.count(1_000, 0, t + 5 * S), None);
        assert_eq!(a.percentage(), 25.0);
        assert_eq!(a.count(50_000, 0, t + 10 * S), Some(1.0));
        // Quieter windows call for more, but the percentage waits for RAISE_AFTER.
        let mut at = 10;
        let mut raised = None;
        while raised.is_none() {
            at += 5;
            raised = a.count(2_500, 0, t + at * S);
            if raised.is_none() {
                assert_eq!(a.percentage(), 1.0, "at {at} s");
            }
        }
        assert_eq!(u64::from(at), 10 + RAISE_AFTER.as_secs());
        assert_eq!(raised, Some(20.0));
        // A busy window during the wait starts it again.
        assert_eq!(a.count(100_000, 0, t + (at + 5) * S), Some(0.5));
        assert_eq!(a.count(2_500, 0, t + (at + 10) * S), None);
        assert_eq!(a.count(100_000, 0, t + (at + 15) * S), None);
        assert_eq!(a.count(2_500, 0, t + (at + 20) * S), None);
        assert_eq!(a.percentage(), 0.5);
        // Idle for a long time: the next count finds a quiet window as long as the spell, and
        // goes straight up, to the least the quiet windows called for.
        assert_eq!(a.count(10, 0, t + (at + 120) * S), Some(20.0));
    }

    #[test]
    fn a_zero_ceiling_stays_zero() {
        let t = Instant::now();
        let mut a = Adaptive::new(100.0, 0.0, t);
        assert_eq!(a.count(1_000_000, 0, t + 5 * S), None);
        assert_eq!(a.percentage(), 0.0);
    }
}
