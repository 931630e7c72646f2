//! Health state machines (pure: the caller passes results and the clock).
//!
//! [`HealthTracker`] turns active probe results into healthy/unhealthy with thresholds (like
//! HAProxy's `rise`/`fall`). [`OutlierTracker`] is passive: consecutive failed requests eject a
//! backend for a while, longer each time it is ejected again.

use std::time::{Duration, Instant};

/// Active health state of one backend.
#[derive(Debug, Clone)]
pub struct HealthTracker {
    healthy: bool,
    ok_streak: u32,
    fail_streak: u32,
    healthy_threshold: u32,
    unhealthy_threshold: u32,
}

impl HealthTracker {
    /// A new tracker; backends start healthy so traffic flows before the first probe.
    pub fn new(healthy_threshold: u32, unhealthy_threshold: u32) -> Self {
        Self {
            healthy: true,
            ok_streak: 0,
            fail_streak: 0,
            healthy_threshold: healthy_threshold.max(1),
            unhealthy_threshold: unhealthy_threshold.max(1),
        }
    }

    /// Whether the backend is healthy.
    pub fn healthy(&self) -> bool {
        self.healthy
    }

    /// Record a probe result; returns the new state when it changed.
    pub fn observe(&mut self, ok: bool) -> Option<bool> {
        if ok {
            self.ok_streak = self.ok_streak.saturating_add(1);
            self.fail_streak = 0;
            if !self.healthy && self.ok_streak >= self.healthy_threshold {
                self.healthy = true;
                return Some(true);
            }
        } else {
            self.fail_streak = self.fail_streak.saturating_add(1);
            self.ok_streak = 0;
            if self.healthy && self.fail_streak >= self.unhealthy_threshold {
                self.healthy = false;
                return Some(false);
            }
        }
        None
    }
}

/// Passive outlier ejection of one backend.
#[derive(Debug, Clone, Default)]
pub struct OutlierTracker {
    consecutive_errors: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
}

/// Outcome of recording a request result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutlierEvent {
    /// Nothing changed.
    None,
    /// The backend was ejected until the given time.
    Ejected(Instant),
}

impl OutlierTracker {
    /// Record a request outcome at `now`. `threshold` 0 disables ejection.
    pub fn record(
        &mut self,
        success: bool,
        now: Instant,
        threshold: u32,
        base: Duration,
    ) -> OutlierEvent {
        if success {
            self.consecutive_errors = 0;
            if self.ejected_until.is_some_and(|t| now >= t) {
                self.ejected_until = None;
            }
            return OutlierEvent::None;
        }
        self.consecutive_errors = self.consecutive_errors.saturating_add(1);
        if threshold == 0 || self.consecutive_errors < threshold || self.is_ejected(now) {
            return OutlierEvent::None;
        }
        self.ejections = self.ejections.saturating_add(1);
        self.consecutive_errors = 0;
        let until = now + base * self.ejections.min(10);
        self.ejected_until = Some(until);
        OutlierEvent::Ejected(until)
    }

    /// Whether the backend is ejected at `now`.
    pub fn is_ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|t| now < t)
    }

    /// A healthy probe after the ejection ends resets the backoff.
    pub fn reset_backoff(&mut self, now: Instant) {
        if !self.is_ejected(now) {
            self.ejections = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_flip_state_once() {
        let mut h = HealthTracker::new(2, 3);
        assert!(h.healthy());
        assert_eq!(h.observe(false), None);
        assert_eq!(h.observe(false), None);
        assert_eq!(h.observe(true), None, "a success resets the failure streak");
        assert_eq!(h.observe(false), None);
        assert_eq!(h.observe(false), None);
        assert_eq!(h.observe(false), Some(false));
        assert_eq!(h.observe(false), None, "already unhealthy");
        assert_eq!(h.observe(true), None);
        assert_eq!(h.observe(true), Some(true));
        assert!(h.healthy());
    }

    #[test]
    fn outlier_ejects_after_consecutive_errors_and_backs_off() {
        let t0 = Instant::now();
        let base = Duration::from_secs(10);
        let mut o = OutlierTracker::default();
        for _ in 0..4 {
            assert_eq!(o.record(false, t0, 5, base), OutlierEvent::None);
        }
        assert_eq!(
            o.record(false, t0, 5, base),
            OutlierEvent::Ejected(t0 + base)
        );
        assert!(o.is_ejected(t0 + Duration::from_secs(9)));
        assert!(!o.is_ejected(t0 + base));
        // Second ejection lasts twice as long.
        let t1 = t0 + base;
        for _ in 0..4 {
            o.record(false, t1, 5, base);
        }
        assert_eq!(
            o.record(false, t1, 5, base),
            OutlierEvent::Ejected(t1 + base * 2)
        );
        // Successes in between reset the streak.
        let mut o = OutlierTracker::default();
        for _ in 0..10 {
            o.record(false, t0, 5, base);
            o.record(true, t0, 5, base);
        }
        assert!(!o.is_ejected(t0));
        // Threshold 0 disables.
        let mut o = OutlierTracker::default();
        for _ in 0..100 {
            assert_eq!(o.record(false, t0, 0, base), OutlierEvent::None);
        }
    }
}
