//! The direct observation: a thread of the test process that looks, about 50 times a
//! second, at whether each guest's unit cgroup in each host has a process.
//!
//! A guest's copy on a host is the processes of its `microvm@NAME.service`, and the
//! host's systemd keeps every one of them in that unit's cgroup. The hosts' cgroups are
//! directories of this machine's cgroup2 tree (see `testbed::cgroup`), so the test process
//! can read them without entering the host or spawning anything: one [`Round`] reads the
//! `cgroup.procs` of every guest on every host, a few dozen microseconds for the whole
//! bed, [`PERIOD`] apart. A unit that is not loaded has no cgroup, and a host whose power
//! was cut has none left either: a missing cgroup is a guest with no process there, which
//! is the truth.
//!
//! A copy counts from the first round that shows its cgroup with a process to the first
//! that shows it without. The check is that no round shows one guest with processes on
//! two hosts. It is sampled, not exact (the systemd [`super::Timeline`] is exact), and
//! a round is not atomic: its reads follow one another within microseconds, while a
//! handover takes the agents a Raft commit and a unit start, milliseconds at least.

use std::fmt::Write as _;
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};

use super::monotonic_us;
use crate::{Testbed, guest};

/// The pause between the starts of two rounds: 50 rounds a second when the thread gets
/// the CPU on time. A round costs a few file reads, so this costs the agents nothing.
pub const PERIOD: Duration = Duration::from_millis(20);
/// The rate the scenario test requires, in rounds (samples of every host) per second.
pub const REQUIRED_RATE: f64 = 10.0;

/// One pass over every host: which guests had a process where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Round {
    /// When the pass began ([`monotonic_us`]); its reads all follow within microseconds.
    pub at_us: u64,
    /// `live[host][guest]`: the guest's unit cgroup on the host had a process.
    pub live: Vec<Vec<bool>>,
}

/// Everything the cgroup sampler has seen: rounds in order.
#[derive(Debug, Clone, Default)]
pub struct CgroupSamples {
    pub guests: Vec<String>,
    pub rounds: Vec<Round>,
    /// Reads that failed for another reason than a missing cgroup, and the last error:
    /// rounds that could not see everything they should have.
    pub failed_reads: usize,
    pub last_error: Option<String>,
}

/// A copy of a guest on a host as the rounds saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeenCopy {
    pub host: usize,
    /// The first round with a process.
    pub from_us: u64,
    /// The first round without one after that; `None` if it was there at the last round.
    pub until_us: Option<u64>,
}

impl CgroupSamples {
    fn guest_index(&self, vm: &str) -> Option<usize> {
        self.guests.iter().position(|g| g == vm)
    }

    /// Every copy of `vm` the rounds saw, by host then start.
    pub fn copies(&self, vm: &str) -> Vec<SeenCopy> {
        let Some(guest) = self.guest_index(vm) else { return Vec::new() };
        let hosts = self.rounds.iter().map(|r| r.live.len()).max().unwrap_or(0);
        let mut copies = Vec::new();
        for host in 0..hosts {
            let mut open: Option<u64> = None;
            for round in &self.rounds {
                let live = round.live.get(host).and_then(|l| l.get(guest)) == Some(&true);
                match (live, open) {
                    (true, None) => open = Some(round.at_us),
                    (false, Some(from_us)) => {
                        copies.push(SeenCopy { host, from_us, until_us: Some(round.at_us) });
                        open = None;
                    }
                    _ => {}
                }
            }
            if let Some(from_us) = open {
                copies.push(SeenCopy { host, from_us, until_us: None });
            }
        }
        copies
    }

    /// The rounds that saw `vm` with processes on more than one host: (when, which hosts).
    pub fn two_copies(&self, vm: &str) -> Vec<(u64, Vec<usize>)> {
        let Some(guest) = self.guest_index(vm) else { return Vec::new() };
        self.rounds
            .iter()
            .filter_map(|round| {
                let hosts: Vec<usize> = round
                    .live
                    .iter()
                    .enumerate()
                    .filter(|(_, live)| live.get(guest) == Some(&true))
                    .map(|(host, _)| host)
                    .collect();
                (hosts.len() > 1).then_some((round.at_us, hosts))
            })
            .collect()
    }

    /// Samples per second per host (every round samples every host), over the whole run,
    /// and the longest time between two consecutive rounds.
    pub fn rate(&self) -> (f64, Duration) {
        let (Some(first), Some(last)) = (self.rounds.first(), self.rounds.last()) else {
            return (0.0, Duration::ZERO);
        };
        let span_us = last.at_us.saturating_sub(first.at_us);
        let rate = if span_us == 0 { 0.0 } else { (self.rounds.len() - 1) as f64 * 1e6 / span_us as f64 };
        let longest = self.rounds.windows(2).map(|w| w[1].at_us.saturating_sub(w[0].at_us)).max().unwrap_or(0);
        (rate, Duration::from_micros(longest))
    }

    /// A readable account of `vm`'s copies, for assertion messages.
    pub fn describe(&self, vm: &str) -> String {
        let mut text = format!("copies of {vm} the cgroup rounds saw (CLOCK_MONOTONIC µs):");
        for c in self.copies(vm) {
            let until = c.until_us.map_or("still there".to_owned(), |u| u.to_string());
            let _ = write!(text, "\n  h{}: {} .. {until}", c.host, c.from_us);
        }
        text
    }
}

struct Shared {
    stop: AtomicBool,
    samples: Mutex<CgroupSamples>,
}

impl Shared {
    fn samples(&self) -> MutexGuard<'_, CgroupSamples> {
        // Every update under the lock is a push or an increment: a panic cannot leave
        // it half done.
        self.samples.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The sampling thread; it stops when this is dropped.
pub struct CgroupSampler {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl CgroupSampler {
    /// Starts sampling the unit cgroups of `guests` on every host of `bed`.
    pub fn start(bed: &Testbed, guests: Vec<String>) -> Result<CgroupSampler> {
        let procs: Vec<Vec<PathBuf>> = bed
            .hosts()
            .iter()
            .map(|host| guests.iter().map(|g| host.unit_cgroup(&guest::cgroup(g)).join("cgroup.procs")).collect())
            .collect();
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            samples: Mutex::new(CgroupSamples { guests, ..CgroupSamples::default() }),
        });
        let thread = thread::Builder::new()
            .name("cgroup-sampler".into())
            .spawn({
                let shared = Arc::clone(&shared);
                move || sample(&shared, &procs)
            })
            .context("starting the cgroup sampler thread")?;
        Ok(CgroupSampler { shared, thread: Some(thread) })
    }

    /// Everything sampled so far.
    pub fn samples(&self) -> CgroupSamples {
        self.shared.samples().clone()
    }

    /// Waits until two more rounds have been taken, so that the samples cover what
    /// happened before this call.
    pub fn catch_up(&self, timeout: Duration) -> Result<()> {
        let before = self.shared.samples().rounds.len();
        crate::wait_until("two more rounds of the cgroup sampler", timeout, || {
            Ok(self.shared.samples().rounds.len() >= before + 2)
        })
    }
}

impl Drop for CgroupSampler {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The thread: a round every [`PERIOD`] (or at once when late, never a burst).
fn sample(shared: &Shared, procs: &[Vec<PathBuf>]) {
    let mut next = Instant::now();
    while !shared.stop.load(Ordering::Relaxed) {
        let at_us = monotonic_us();
        let mut errors = Vec::new();
        let live: Vec<Vec<bool>> = procs
            .iter()
            .map(|host| {
                host.iter()
                    .map(|path| {
                        has_process(path).unwrap_or_else(|e| {
                            errors.push(format!("{}: {e}", path.display()));
                            false
                        })
                    })
                    .collect()
            })
            .collect();
        {
            let mut samples = shared.samples();
            samples.rounds.push(Round { at_us, live });
            samples.failed_reads += errors.len();
            if let Some(error) = errors.pop() {
                samples.last_error = Some(error);
            }
        }
        next += PERIOD;
        let now = Instant::now();
        match next.checked_duration_since(now) {
            Some(pause) => thread::sleep(pause),
            None => next = now,
        }
    }
}

/// Whether the cgroup whose `cgroup.procs` is `procs` has a process. A cgroup that does
/// not exist (`ENOENT`), or was removed while being read (`ENODEV`), has none: cgroup2
/// only removes an empty cgroup.
fn has_process(procs: &Path) -> std::io::Result<bool> {
    match fs::read_to_string(procs) {
        Ok(text) => Ok(!text.trim().is_empty()),
        Err(e) if e.kind() == ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENODEV) => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(at_us: u64, live: &[&[bool]]) -> Round {
        Round { at_us, live: live.iter().map(|h| h.to_vec()).collect() }
    }

    fn samples(rounds: Vec<Round>) -> CgroupSamples {
        CgroupSamples { guests: vec!["a".into(), "b".into()], rounds, ..CgroupSamples::default() }
    }

    #[test]
    fn a_copy_lasts_from_the_first_round_with_a_process_to_the_first_without() {
        let s = samples(vec![
            round(0, &[&[false, false], &[false, false]]),
            round(20, &[&[true, false], &[false, false]]),
            round(40, &[&[true, false], &[false, true]]),
            round(60, &[&[false, false], &[true, true]]),
        ]);
        assert_eq!(
            s.copies("a"),
            vec![
                SeenCopy { host: 0, from_us: 20, until_us: Some(60) },
                SeenCopy { host: 1, from_us: 60, until_us: None }
            ]
        );
        assert!(s.two_copies("a").is_empty(), "a handover between two rounds is not two copies");
        assert_eq!(s.copies("b"), vec![SeenCopy { host: 1, from_us: 40, until_us: None }]);
        assert!(s.copies("c").is_empty());
    }

    #[test]
    fn a_round_with_a_guest_on_two_hosts_is_two_copies() {
        let s = samples(vec![
            round(0, &[&[true, false], &[false, false], &[false, false]]),
            round(20, &[&[true, false], &[false, false], &[true, false]]),
        ]);
        assert_eq!(s.two_copies("a"), vec![(20, vec![0, 2])]);
        assert!(s.two_copies("b").is_empty());
    }

    #[test]
    fn the_rate_counts_rounds_over_the_run() {
        // Ten gaps: nine of 20 ms and one of 50 ms.
        let s = samples((0..11).map(|i| round(i * 20_000 + if i >= 5 { 30_000 } else { 0 }, &[])).collect());
        let (rate, longest) = s.rate();
        assert!((rate - 10.0 / 0.23).abs() < 0.01, "{rate}");
        assert_eq!(longest, Duration::from_millis(50));
        assert_eq!(samples(vec![]).rate(), (0.0, Duration::ZERO));
    }

    #[test]
    fn a_missing_or_empty_cgroup_has_no_process() {
        let dir = tempfile::tempdir().unwrap();
        let procs = dir.path().join("cgroup.procs");
        assert!(!has_process(&procs).unwrap(), "missing");
        fs::write(&procs, "").unwrap();
        assert!(!has_process(&procs).unwrap(), "empty");
        fs::write(&procs, "1234\n").unwrap();
        assert!(has_process(&procs).unwrap());
        assert!(has_process(dir.path()).is_err(), "a directory is not a cgroup.procs");
    }
}
