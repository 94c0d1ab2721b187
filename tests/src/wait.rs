//! Waiting on conditions with a deadline.
//!
//! System tests never sleep for a fixed time: a fixed sleep is either too short on a
//! loaded CI machine (a flaky test) or too long everywhere else (a slow suite). They poll
//! a condition until it holds or a deadline passes, and the error says what was awaited
//! and what was last seen.

use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

/// First pause between two probes; it doubles up to [`POLL_INTERVAL_MAX`]. Short at first
/// because most conditions (a unit becoming active, a boot finishing) hold within
/// milliseconds to a second.
const POLL_INTERVAL_MIN: Duration = Duration::from_millis(10);
/// Longest pause between two probes: bounds how late a wait notices its condition.
const POLL_INTERVAL_MAX: Duration = Duration::from_millis(200);

/// Outcome of one probe of a condition.
pub enum Probe<T> {
    /// The condition holds; the wait returns this value.
    Ready(T),
    /// Not yet. The text describes what was seen, for the timeout error.
    NotYet(String),
}

/// Polls `probe` until it returns [`Probe::Ready`] or `timeout` passes. An `Err` from
/// the probe ends the wait at once: it means the condition can no longer become true
/// (a host that was supposed to boot has exited, say).
pub fn wait_for<T>(what: &str, timeout: Duration, mut probe: impl FnMut() -> Result<Probe<T>>) -> Result<T> {
    let started = Instant::now();
    let deadline = started + timeout;
    let mut interval = POLL_INTERVAL_MIN;
    loop {
        let seen = match probe()? {
            Probe::Ready(value) => return Ok(value),
            Probe::NotYet(seen) => seen,
        };
        let now = Instant::now();
        if now >= deadline {
            bail!("timed out after {:.1} s waiting for {what}; last seen: {seen}", started.elapsed().as_secs_f64());
        }
        thread::sleep(interval.min(deadline - now));
        interval = (interval * 2).min(POLL_INTERVAL_MAX);
    }
}

/// [`wait_for`] a condition that is only true or false.
pub fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> Result<bool>) -> Result<()> {
    wait_for(what, timeout, || Ok(if condition()? { Probe::Ready(()) } else { Probe::NotYet("false".into()) }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_the_value_once_ready() {
        let mut calls = 0;
        let value = wait_for("three calls", Duration::from_secs(5), || {
            calls += 1;
            Ok(if calls == 3 { Probe::Ready(calls) } else { Probe::NotYet(format!("{calls} calls")) })
        })
        .unwrap();
        assert_eq!(value, 3);
    }

    #[test]
    fn times_out_with_what_was_last_seen() {
        let err = wait_for::<()>("never", Duration::from_millis(50), || Ok(Probe::NotYet("nope".into())))
            .unwrap_err()
            .to_string();
        assert!(err.contains("waiting for never") && err.contains("last seen: nope"), "{err}");
    }

    #[test]
    fn a_probe_error_ends_the_wait_at_once() {
        let started = Instant::now();
        let err = wait_until("an error", Duration::from_secs(60), || bail!("gone")).unwrap_err();
        assert_eq!(err.to_string(), "gone");
        assert!(started.elapsed() < Duration::from_secs(1));
    }
}
