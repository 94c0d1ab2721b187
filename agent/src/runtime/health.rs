//! What to do with a guest that keeps exiting: restart it on this host after an
//! exponentially growing pause, and after too many failures in a window, give up so that
//! the leader can place it elsewhere.
//!
//! Pure: no clock, no I/O. The caller passes a monotonic time in milliseconds (the
//! node's tick clock in production, any counter in tests and in the simulator) and acts
//! on the [`Verdict`]: restart at `at_ms`, or report the VM `failed`.
//!
//! With the systemd runtime, microvm.nix's unit restarts a guest by itself too
//! (`Restart=always`, `RestartSec=5s`); the reconciler's start after the back-off is
//! then a no-op or comes first, and giving up (a stop) cancels systemd's pending restart.
//! What this module adds is the count: a guest that crashes in a loop is declared failed
//! instead of restarting forever on a host where it cannot run.

use std::collections::VecDeque;

/// When to restart and when to give up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthPolicy {
    /// Pause before the restart that follows a first failure.
    pub backoff_initial_ms: u64,
    /// Longest pause: each further failure in the window doubles it up to this.
    pub backoff_max_ms: u64,
    /// This many failures within `window_ms` declare the guest failed.
    pub max_failures: u32,
    /// Failures older than this are forgotten: a guest that ran well for a while starts
    /// again from the initial back-off.
    pub window_ms: u64,
}

impl Default for HealthPolicy {
    /// 1 s, 2 s, 4 s, 8 s between restarts; the fifth failure within 5 minutes gives up.
    fn default() -> Self {
        Self { backoff_initial_ms: 1_000, backoff_max_ms: 30_000, max_failures: 5, window_ms: 300_000 }
    }
}

impl HealthPolicy {
    /// Whether the policy makes sense; the error says what to change. For config checks.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_failures == 0 {
            return Err("max_failures must be at least 1".into());
        }
        if self.window_ms == 0 {
            return Err("window_ms must be more than 0".into());
        }
        if self.backoff_initial_ms > self.backoff_max_ms {
            return Err(format!(
                "backoff_initial_ms ({}) must not exceed backoff_max_ms ({})",
                self.backoff_initial_ms, self.backoff_max_ms
            ));
        }
        Ok(())
    }

    /// The pause before restarting after the `failures`-th failure in the window
    /// (`failures >= 1`): initial, doubled per further failure, capped.
    pub fn backoff_ms(&self, failures: u32) -> u64 {
        assert!(failures >= 1, "a back-off follows at least one failure");
        let doublings = failures - 1;
        // 2^63 ms is longer than any cap; past that, shifting would overflow.
        let factor = if doublings >= 63 { u64::MAX } else { 1u64 << doublings };
        self.backoff_initial_ms.saturating_mul(factor).min(self.backoff_max_ms)
    }
}

/// What to do after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Start the guest again, not before `at_ms`.
    Restart { at_ms: u64, failures_in_window: u32 },
    /// Stop trying on this host: report the VM failed.
    GiveUp { failures_in_window: u32 },
}

/// The failure record of one guest on this host.
#[derive(Debug, Clone)]
pub struct Health {
    policy: HealthPolicy,
    /// Times of the failures within the window, oldest first; at most `max_failures`.
    failures_ms: VecDeque<u64>,
    gave_up: bool,
}

impl Health {
    pub fn new(policy: HealthPolicy) -> Self {
        assert_eq!(policy.validate(), Ok(()), "a validated policy");
        Self { policy, failures_ms: VecDeque::new(), gave_up: false }
    }

    /// Records that the guest exited unexpectedly (or failed to start) at `now_ms`.
    /// Once it has given up, it stays given up until [`Health::reset`].
    pub fn record_failure(&mut self, now_ms: u64) -> Verdict {
        if let Some(&last) = self.failures_ms.back() {
            assert!(now_ms >= last, "time went backwards: {now_ms} < {last}");
        }
        self.forget_old(now_ms);
        self.failures_ms.push_back(now_ms);
        if self.failures_ms.len() > self.policy.max_failures as usize {
            self.failures_ms.pop_front();
        }
        let failures_in_window = self.failures_in_window();
        if self.gave_up || failures_in_window >= self.policy.max_failures {
            self.gave_up = true;
            return Verdict::GiveUp { failures_in_window };
        }
        let at_ms = now_ms.saturating_add(self.policy.backoff_ms(failures_in_window));
        Verdict::Restart { at_ms, failures_in_window }
    }

    /// Whether it has given up: the guest should not be restarted on this host.
    pub fn gave_up(&self) -> bool {
        self.gave_up
    }

    /// Failures recorded within the window as of the last call.
    pub fn failures_in_window(&self) -> u32 {
        u32::try_from(self.failures_ms.len()).expect("bounded by max_failures")
    }

    /// Forgets every failure: for a VM placed here anew or started again by an operator.
    pub fn reset(&mut self) {
        self.failures_ms.clear();
        self.gave_up = false;
    }

    fn forget_old(&mut self, now_ms: u64) {
        while let Some(&oldest) = self.failures_ms.front() {
            if now_ms - oldest < self.policy.window_ms {
                break;
            }
            self.failures_ms.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: HealthPolicy =
        HealthPolicy { backoff_initial_ms: 1_000, backoff_max_ms: 8_000, max_failures: 6, window_ms: 60_000 };

    fn restart_delay(verdict: Verdict, now_ms: u64) -> u64 {
        match verdict {
            Verdict::Restart { at_ms, .. } => at_ms - now_ms,
            Verdict::GiveUp { .. } => panic!("gave up too early"),
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let mut health = Health::new(POLICY);
        let mut now_ms = 0;
        let mut delays = Vec::new();
        for _ in 0..5 {
            let delay = restart_delay(health.record_failure(now_ms), now_ms);
            delays.push(delay);
            now_ms += delay + 100; // restarted on time, ran briefly, crashed again
        }
        assert_eq!(delays, [1_000, 2_000, 4_000, 8_000, 8_000]);
        assert!(!health.gave_up());
    }

    #[test]
    fn max_failures_within_the_window_gives_up_and_stays_given_up() {
        let mut health = Health::new(POLICY);
        for i in 0..5 {
            assert!(matches!(health.record_failure(i * 1_000), Verdict::Restart { .. }));
        }
        assert_eq!(health.record_failure(5_000), Verdict::GiveUp { failures_in_window: 6 });
        assert!(health.gave_up());
        // Long after, still given up: only a reset (new placement) tries again.
        assert!(matches!(health.record_failure(1_000_000), Verdict::GiveUp { .. }));
        health.reset();
        assert!(!health.gave_up());
        assert_eq!(restart_delay(health.record_failure(1_000_001), 1_000_001), 1_000);
    }

    #[test]
    fn failures_outside_the_window_are_forgotten() {
        let mut health = Health::new(POLICY);
        // Five failures, one every 20 s: never more than three in any 60 s window.
        let mut now_ms = 0;
        for _ in 0..50 {
            assert!(matches!(health.record_failure(now_ms), Verdict::Restart { .. }));
            assert!(health.failures_in_window() <= 3);
            now_ms += 20_000;
        }
        // After a quiet window, the back-off starts over.
        let quiet = now_ms + POLICY.window_ms;
        assert_eq!(restart_delay(health.record_failure(quiet), quiet), 1_000);
        // The window boundary: a failure exactly window_ms old is out.
        let mut health = Health::new(POLICY);
        health.record_failure(0);
        health.record_failure(POLICY.window_ms);
        assert_eq!(health.failures_in_window(), 1);
    }

    #[test]
    fn one_allowed_failure_gives_up_at_once() {
        let mut health = Health::new(HealthPolicy { max_failures: 1, ..POLICY });
        assert_eq!(health.record_failure(7), Verdict::GiveUp { failures_in_window: 1 });
    }

    #[test]
    fn huge_failure_counts_do_not_overflow() {
        let policy = HealthPolicy { backoff_max_ms: u64::MAX, ..POLICY };
        assert_eq!(policy.backoff_ms(64), u64::MAX);
        assert_eq!(policy.backoff_ms(u32::MAX), u64::MAX);
        assert_eq!(POLICY.backoff_ms(200), 8_000);
        let mut health = Health::new(HealthPolicy { max_failures: u32::MAX, ..policy });
        assert!(matches!(health.record_failure(u64::MAX - 1), Verdict::Restart { at_ms: u64::MAX, .. }));
    }

    #[test]
    fn bad_policies_say_what_to_change() {
        assert!(HealthPolicy::default().validate().is_ok());
        let err = HealthPolicy { max_failures: 0, ..POLICY }.validate().unwrap_err();
        assert!(err.contains("max_failures"), "{err}");
        let err = HealthPolicy { backoff_initial_ms: 9_000, ..POLICY }.validate().unwrap_err();
        assert!(err.contains("backoff_max_ms"), "{err}");
        assert!(HealthPolicy { window_ms: 0, ..POLICY }.validate().is_err());
    }

    #[test]
    #[should_panic(expected = "time went backwards")]
    fn time_going_backwards_is_a_bug() {
        let mut health = Health::new(POLICY);
        health.record_failure(10);
        health.record_failure(9);
    }
}
