//! Named crash points, for the tests that kill an agent at an exact step
//! (a join interrupted between its steps): with `BLIXARD_FAILPOINT=NAME`
//! in its environment, the agent sends itself SIGKILL when it reaches the
//! point NAME, as a power cut there would. Unset (always, outside tests),
//! a point costs one environment lookup on a path that runs a few times
//! per process.
//!
//! Points: `join-before-admit` (the joiner's id and key are on disk, no
//! request sent), `join-after-admit` (the cluster admitted it, nothing of
//! the answer kept), `join-after-certificate` (its certificate is on disk,
//! the store does not know it is a member yet).

/// The environment variable naming the point to crash at.
pub const ENV: &str = "BLIXARD_FAILPOINT";

/// Crashes here (SIGKILL) if `ENV` names `point`.
pub fn hit(point: &str) {
    if std::env::var(ENV).is_ok_and(|v| v == point) {
        tracing::warn!(point, "failpoint reached; killing this process");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}
