//! Health state machines (pure: the caller passes results and the clock).
//!
//! [`HealthTracker`] turns active probe results into a [`HealthState`]. A backend added while a
//! health check is configured starts [`HealthState::Pending`]: it takes no traffic until one
//! probe passes, and the first probe runs at once, then again soon (from 50 ms, doubling up to
//! the interval, at most 1 s apart) until it passes, so an instance enters the rotation as soon
//! as it answers. One pass is enough to enter (like Envoy's first check of a new host); after
//! that the thresholds apply (like HAProxy's `rise`/`fall`): `unhealthy_threshold` failures in a
//! row take a healthy backend out, `healthy_threshold` passes in a row bring it back.
//! [`OutlierTracker`] is passive: consecutive failed requests eject a backend for a while,
//! longer each time it is ejected again.

use std::time::{Duration, Instant};

/// Where a backend stands with active health checking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HealthState {
    /// Added while a health check is configured and no probe has passed yet: no traffic.
    Pending,
    /// Takes traffic (passed its probes, or no health check is configured).
    Healthy,
    /// Failed `unhealthy_threshold` probes in a row; back after `healthy_threshold` passes.
    Unhealthy,
}

impl HealthState {
    /// Whether the backend may be picked for new traffic (as far as health goes).
    pub fn candidate(self) -> bool {
        self == Self::Healthy
    }

    pub(crate) fn to_u8(self) -> u8 {
        match self {
            Self::Pending => 0,
            Self::Healthy => 1,
            Self::Unhealthy => 2,
        }
    }

    pub(crate) fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Pending,
            1 => Self::Healthy,
            _ => Self::Unhealthy,
        }
    }
}

/// First retry of a pending backend's probe after a failure.
const PENDING_RETRY_FIRST: Duration = Duration::from_millis(50);
/// Longest time between two probes of a pending backend.
const PENDING_RETRY_MAX: Duration = Duration::from_secs(1);
/// Timeout of a pending backend's first probe; it doubles per failure up to the configured
/// timeout (a dropped SYN of a backend not reachable yet then costs little).
const PENDING_TIMEOUT_FIRST: Duration = Duration::from_millis(250);

/// Active health state of one backend.
#[derive(Debug, Clone)]
pub struct HealthTracker {
    state: HealthState,
    ok_streak: u32,
    fail_streak: u32,
    healthy_threshold: u32,
    unhealthy_threshold: u32,
}

impl HealthTracker {
    /// A tracker in `state` (a new backend: [`HealthState::Pending`]; one kept across a
    /// configuration change: its current state).
    pub fn new(state: HealthState, healthy_threshold: u32, unhealthy_threshold: u32) -> Self {
        Self {
            state,
            ok_streak: 0,
            fail_streak: 0,
            healthy_threshold: healthy_threshold.max(1),
            unhealthy_threshold: unhealthy_threshold.max(1),
        }
    }

    /// The current state.
    pub fn state(&self) -> HealthState {
        self.state
    }

    /// Record a probe result; returns the new state when it changed.
    pub fn observe(&mut self, ok: bool) -> Option<HealthState> {
        if ok {
            self.ok_streak = self.ok_streak.saturating_add(1);
            self.fail_streak = 0;
        } else {
            self.fail_streak = self.fail_streak.saturating_add(1);
            self.ok_streak = 0;
        }
        let next = match self.state {
            HealthState::Pending if ok => HealthState::Healthy,
            HealthState::Unhealthy if self.ok_streak >= self.healthy_threshold => {
                HealthState::Healthy
            }
            HealthState::Healthy if self.fail_streak >= self.unhealthy_threshold => {
                HealthState::Unhealthy
            }
            s => s,
        };
        (next != self.state).then(|| {
            self.state = next;
            next
        })
    }

    /// How long to wait before the next probe: `interval` once the backend has passed a
    /// probe; while it is pending, 50 ms after the first failure, doubling per failure, at
    /// most `interval` and 1 s.
    pub fn next_probe_in(&self, interval: Duration) -> Duration {
        if self.state != HealthState::Pending {
            return interval;
        }
        let backoff =
            PENDING_RETRY_FIRST.saturating_mul(1 << self.fail_streak.min(16).saturating_sub(1));
        backoff.min(PENDING_RETRY_MAX).min(interval)
    }

    /// The timeout of the next probe: `timeout`, except for a pending backend, whose first
    /// probes get 250 ms, doubling per failure up to `timeout`.
    pub fn probe_timeout(&self, timeout: Duration) -> Duration {
        if self.state != HealthState::Pending {
            return timeout;
        }
        PENDING_TIMEOUT_FIRST
            .saturating_mul(1 << self.fail_streak.min(16))
            .min(timeout)
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
        let mut h = HealthTracker::new(HealthState::Healthy, 2, 3);
        assert_eq!(h.state(), HealthState::Healthy);
        assert_eq!(h.observe(false), None);
        assert_eq!(h.observe(false), None);
        assert_eq!(h.observe(true), None, "a success resets the failure streak");
        assert_eq!(h.observe(false), None);
        assert_eq!(h.observe(false), None);
        assert_eq!(h.observe(false), Some(HealthState::Unhealthy));
        assert_eq!(h.observe(false), None, "already unhealthy");
        assert_eq!(h.observe(true), None);
        assert_eq!(h.observe(true), Some(HealthState::Healthy));
        assert!(h.state().candidate());
    }

    #[test]
    fn a_pending_backend_enters_on_its_first_passed_probe_whatever_the_threshold() {
        for healthy_threshold in [1, 2, 5] {
            let mut h = HealthTracker::new(HealthState::Pending, healthy_threshold, 3);
            assert!(!h.state().candidate());
            assert_eq!(h.observe(true), Some(HealthState::Healthy));
            assert!(h.state().candidate());
        }
        // Failures keep it pending (never "unhealthy", which would need `healthy_threshold`
        // passes to leave).
        let mut h = HealthTracker::new(HealthState::Pending, 3, 1);
        for _ in 0..10 {
            assert_eq!(h.observe(false), None);
            assert_eq!(h.state(), HealthState::Pending);
        }
        assert_eq!(h.observe(true), Some(HealthState::Healthy));
        // From then on the thresholds apply.
        assert_eq!(h.observe(false), Some(HealthState::Unhealthy));
        assert_eq!(h.observe(true), None);
        assert_eq!(h.observe(true), None);
        assert_eq!(h.observe(true), Some(HealthState::Healthy));
    }

    #[test]
    fn a_tracker_made_for_a_kept_backend_keeps_its_state() {
        let mut h = HealthTracker::new(HealthState::Unhealthy, 2, 2);
        assert_eq!(h.observe(true), None, "one pass is not enough to come back");
        assert_eq!(h.observe(true), Some(HealthState::Healthy));
        let mut h = HealthTracker::new(HealthState::Healthy, 2, 2);
        assert_eq!(h.observe(false), None, "one failure is not enough to leave");
        assert_eq!(h.observe(false), Some(HealthState::Unhealthy));
    }

    #[test]
    fn pending_backends_are_probed_soon_settled_ones_on_the_interval() {
        let ms = Duration::from_millis;
        let interval = ms(2_000);
        let mut h = HealthTracker::new(HealthState::Pending, 2, 3);
        let mut delays = Vec::new();
        let mut timeouts = Vec::new();
        for _ in 0..8 {
            timeouts.push(h.probe_timeout(ms(1_000)));
            h.observe(false);
            delays.push(h.next_probe_in(interval));
        }
        assert_eq!(
            delays,
            [50, 100, 200, 400, 800, 1_000, 1_000, 1_000].map(ms),
            "retries back off to at most 1 s"
        );
        assert_eq!(
            timeouts,
            [250, 500, 1_000, 1_000, 1_000, 1_000, 1_000, 1_000].map(ms),
            "probe timeouts grow to the configured one"
        );
        assert_eq!(
            h.next_probe_in(ms(300)),
            ms(300),
            "never slower than the interval"
        );
        h.observe(true);
        assert_eq!(h.next_probe_in(interval), interval);
        assert_eq!(h.probe_timeout(ms(1_000)), ms(1_000));
        for _ in 0..100 {
            h.observe(false);
        }
        assert_eq!(h.state(), HealthState::Unhealthy);
        assert_eq!(h.next_probe_in(interval), interval);
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
