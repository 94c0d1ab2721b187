//! Clocks, on the ground floor: every layer that needs the time of this
//! host reads it here, and nothing here depends on anything else.
//!
//! The fence (`failure`, `guard`, the reconciler) and the leader's contact
//! confirmations (`node::contact`) measure durations on the boot-wide
//! monotonic clock: it never jumps with the wall clock, and it is shared by
//! every process of one boot, so a restarted agent or the separate guard
//! process can compare times the agent recorded. A record from another boot
//! means nothing; [`boot_id`] tells boots apart.

/// Milliseconds of the boot-wide monotonic clock (`CLOCK_MONOTONIC`).
pub fn monotonic_ms() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map_or(0, |t| t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000)
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`), if the kernel has one.
pub fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok().map(|s| s.trim().to_string())
}
