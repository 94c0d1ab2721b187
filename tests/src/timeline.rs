//! Which host ran which guest when, and the check that no guest ever ran on two hosts at
//! once, by two observers.
//!
//! - [`cgroups`]: the direct one. A thread of the test process reads, [`cgroups::PERIOD`]
//!   apart (about 50 times a second), whether each guest's unit cgroup in each host has a
//!   process, and no read may find one guest with processes on two hosts. It costs a few
//!   file reads per round, so it keeps its rate on a loaded machine; it is sampled.
//! - [`Sampler`] and [`Timeline`], below: the exact one, from systemd's own transition
//!   timestamps, read by a `systemctl show` loop inside every host; its rate does not
//!   matter to its exactness, and on a loaded 2-core machine it managed only 2.6 to 6
//!   samples a second per host.
//!
//! A [`Sampler`] asks every host's systemd for the state of the `microvm@` units of a set
//! of guests, [`SAMPLE_PERIOD`] apart (it aims at 10 to 12 times a second), from inside
//! every host. Each sample carries more than the state at that instant: systemd's own
//! monotonic timestamps of the unit's last transitions. Every host of a bed runs on this
//! machine's kernel, so these timestamps, the test process's [`monotonic_us`] and the
//! agents' clocks are one clock. A [`Timeline`] turns the samples into exact intervals
//! during which a copy of a guest existed on a host, from the moment its unit left
//! `inactive` to the moment it was `inactive` or `failed` again (after every process of
//! it was gone), or to the moment its host lost power. Two intervals of one guest on two
//! hosts that overlap are two copies at once. (systemd stamps the start just after it
//! forks the unit's first process, not before: on a loaded machine the cgroup rounds
//! have seen that process up to 20 ms before the stamp. Handovers take hundreds of
//! milliseconds.)
//!
//! Sampling only has to see every transition, not catch the overlap itself: a unit that
//! went up and down twice between two samples would hide one interval, so the timeline
//! cross-checks the number of starts it saw against the fake guest's own log
//! ([`Timeline::starts`]).
//!
//! Ends need one more source. systemd unloads an inactive `microvm@` unit nothing refers
//! to soon after it stops, and a unit loaded again has forgotten its timestamps; so a
//! sample may never show the moment a copy ended. The host's journal keeps it: systemd
//! logs `Stopping`, `Stopped`, `Deactivated successfully` and `Failed with result` for the
//! unit as it happens, and journald stamps each line on the same monotonic clock when it
//! receives it, a little after the fact. A copy's end is the earliest of what the samples
//! and the journal say, so it is never earlier than the truth: any error makes two copies
//! look closer, never further apart.

pub mod cgroups;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};

pub use cgroups::{CgroupSampler, CgroupSamples, SeenCopy};

use crate::Testbed;
use crate::guest;

/// The sampler's pause between two samples: with the sample itself, 10 to 12 samples a
/// second per host on an idle machine. Not more: three hosts' `systemctl` runs cost CPU
/// the agents need on a loaded 2-core machine, and the check's exactness does not depend
/// on the rate.
pub const SAMPLE_PERIOD: Duration = Duration::from_millis(70);
/// Bound on one query of a host's units from the test process.
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// The unit properties one sample reads.
const PROPERTIES: &str = "Id,ActiveState,SubState,MainPID,ActiveEnterTimestampMonotonic,\
ActiveExitTimestampMonotonic,InactiveEnterTimestampMonotonic,InactiveExitTimestampMonotonic";

/// Microseconds of CLOCK_MONOTONIC: the clock systemd's `*TimestampMonotonic`
/// properties use, in every host of a bed alike (containers share the kernel's clock).
pub fn monotonic_us() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec we pass and nothing else.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_MONOTONIC) cannot fail");
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000
}

/// One guest unit as one `systemctl show` saw it. Timestamps are CLOCK_MONOTONIC
/// microseconds, 0 when the transition never happened in this boot of the host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Unit {
    pub vm: String,
    pub active_state: String,
    pub sub_state: String,
    pub main_pid: u32,
    pub active_enter_us: u64,
    pub active_exit_us: u64,
    pub inactive_enter_us: u64,
    pub inactive_exit_us: u64,
}

impl Unit {
    pub fn is_active(&self) -> bool {
        self.active_state == "active"
    }
}

/// Reads the units of `vms` on one host, in one `systemctl show`.
pub fn query_units(bed: &Testbed, host: usize, vms: &[String]) -> Result<Vec<Unit>> {
    let units: Vec<String> = vms.iter().map(|vm| guest::unit(vm)).collect();
    let mut argv = vec!["systemctl", "show", "--property", PROPERTIES];
    argv.extend(units.iter().map(String::as_str));
    let output = bed.host(host).exec_timeout(&argv, QUERY_TIMEOUT)?;
    if !output.status.success() {
        bail!("systemctl show on h{host} failed: {}", String::from_utf8_lossy(&output.stderr).trim());
    }
    parse_show(&String::from_utf8_lossy(&output.stdout), vms)
}

/// Parses `systemctl show` of several units: blocks of `Key=value` lines, one block per
/// unit, separated by empty lines.
fn parse_show(text: &str, vms: &[String]) -> Result<Vec<Unit>> {
    let mut units = Vec::new();
    for block in text.split("\n\n").filter(|b| !b.trim().is_empty()) {
        let mut unit = Unit::default();
        for line in block.lines() {
            let Some((key, value)) = line.split_once('=') else { continue };
            let number = || value.parse::<u64>().unwrap_or(0);
            match key {
                "Id" => match value.strip_prefix("microvm@").and_then(|v| v.strip_suffix(".service")) {
                    Some(vm) => unit.vm = vm.to_owned(),
                    None => bail!("systemctl show printed unit {value:?}, not a guest"),
                },
                "ActiveState" => unit.active_state = value.to_owned(),
                "SubState" => unit.sub_state = value.to_owned(),
                "MainPID" => unit.main_pid = value.parse().unwrap_or(0),
                "ActiveEnterTimestampMonotonic" => unit.active_enter_us = number(),
                "ActiveExitTimestampMonotonic" => unit.active_exit_us = number(),
                "InactiveEnterTimestampMonotonic" => unit.inactive_enter_us = number(),
                "InactiveExitTimestampMonotonic" => unit.inactive_exit_us = number(),
                _ => {}
            }
        }
        if unit.vm.is_empty() {
            bail!("a block of systemctl show without an Id: {block:?}");
        }
        units.push(unit);
    }
    let seen: BTreeSet<&str> = units.iter().map(|u| u.vm.as_str()).collect();
    let wanted: BTreeSet<&str> = vms.iter().map(String::as_str).collect();
    if seen != wanted {
        bail!("systemctl show described {seen:?}, not {wanted:?}");
    }
    Ok(units)
}

/// One host's units at one moment.
#[derive(Debug, Clone)]
pub struct Sample {
    pub host: usize,
    /// When the sample was asked for ([`monotonic_us`]).
    pub at_us: u64,
    pub units: Vec<Unit>,
}

/// A span of time during which one copy of a guest existed on a host: from its unit
/// leaving `inactive` to its unit being inactive again or the host losing power.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopySpan {
    pub host: usize,
    pub from_us: u64,
    /// `None`: still there at the last sample.
    pub until_us: Option<u64>,
    /// When the unit became `active` (0 if never seen active) and stopped being
    /// active (0 if not yet).
    pub active_from_us: u64,
    pub active_until_us: u64,
}

impl CopySpan {
    fn end(&self) -> u64 {
        self.until_us.unwrap_or(u64::MAX)
    }

    fn overlaps(&self, other: &CopySpan) -> bool {
        self.from_us < other.end() && other.from_us < self.end()
    }
}

/// A transition of a guest unit as the host's journal recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Logged {
    pub host: usize,
    pub vm: String,
    /// When journald received the line ([`monotonic_us`]'s clock): at or after the fact.
    pub at_us: u64,
    pub what: Transition,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// A stop job began: the unit leaves `active`.
    Stopping,
    /// The unit is inactive or failed: every process of the copy is gone.
    Ended,
}

/// Parses `journalctl --output=short-monotonic --no-hostname -u microvm@...` into the
/// transitions of guest units. Lines look like
/// `[ 1234.567890] systemd[1]: Stopped microvm@a.service - MicroVM 'a'.`
pub fn parse_journal(host: usize, text: &str) -> Vec<Logged> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((stamp, rest)) = line.strip_prefix('[').and_then(|l| l.split_once(']')) else { continue };
        let Some(message) = rest.trim_start().strip_prefix("systemd[1]: ") else { continue };
        let Some((secs, micros)) = stamp.trim().split_once('.') else { continue };
        let (Ok(secs), Ok(micros)) = (secs.parse::<u64>(), micros.parse::<u64>()) else { continue };
        let at_us = secs * 1_000_000 + micros;
        let (what, unit) = if let Some(rest) = message.strip_prefix("Stopping ") {
            (Transition::Stopping, rest)
        } else if let Some(rest) = message.strip_prefix("Stopped ") {
            (Transition::Ended, rest)
        } else if message.contains(": Deactivated successfully") || message.contains(": Failed with result") {
            (Transition::Ended, message)
        } else {
            continue;
        };
        let Some(vm) = unit.strip_prefix("microvm@").and_then(|u| u.split_once(".service")).map(|(vm, _)| vm) else {
            continue;
        };
        out.push(Logged { host, vm: vm.to_owned(), at_us, what });
    }
    out
}

/// Samples, power cuts and journal lines, and what follows from them.
#[derive(Debug, Clone, Default)]
pub struct Timeline {
    pub samples: Vec<Sample>,
    /// (host, a moment by which every process of the host was dead).
    pub power_cuts: Vec<(usize, u64)>,
    /// Transitions the hosts' journals recorded.
    pub logged: Vec<Logged>,
    /// Sampler records that could not be parsed (a `systemctl show` that failed).
    pub failed_samples: usize,
}

impl Timeline {
    /// `vm`'s copy on `host` that was there at `at_us`, or the first one after it.
    /// Panics (with the guest's timeline) when there is none: a test asks for a copy it
    /// has seen run.
    pub fn copy_at(&self, vm: &str, host: usize, at_us: u64) -> CopySpan {
        self.copies(vm)
            .iter()
            .find(|c| c.host == host && c.until_us.is_none_or(|u| u >= at_us))
            .copied()
            .unwrap_or_else(|| panic!("no copy of {vm} on h{host} at {at_us}: {}", self.describe(vm)))
    }

    /// Every copy of `vm`, by host then start.
    pub fn copies(&self, vm: &str) -> Vec<CopySpan> {
        let mut hosts: BTreeSet<usize> = self.samples.iter().map(|s| s.host).collect();
        hosts.extend(self.power_cuts.iter().map(|(h, _)| *h));
        let mut copies = Vec::new();
        for host in hosts {
            let units: Vec<&Unit> =
                self.samples.iter().filter(|s| s.host == host).flat_map(|s| &s.units).filter(|u| u.vm == vm).collect();
            let logged = |what: Transition| {
                self.logged.iter().filter(move |l| l.host == host && l.vm == vm && l.what == what).map(|l| l.at_us)
            };
            let starts: BTreeSet<u64> = units.iter().map(|u| u.inactive_exit_us).filter(|&t| t > 0).collect();
            let mut ends: BTreeSet<u64> = units.iter().map(|u| u.inactive_enter_us).filter(|&t| t > 0).collect();
            ends.extend(logged(Transition::Ended));
            let cuts: BTreeSet<u64> = self.power_cuts.iter().filter(|(h, _)| *h == host).map(|(_, t)| *t).collect();
            let active_enters: BTreeSet<u64> = units.iter().map(|u| u.active_enter_us).filter(|&t| t > 0).collect();
            let mut active_exits: BTreeSet<u64> = units.iter().map(|u| u.active_exit_us).filter(|&t| t > 0).collect();
            active_exits.extend(logged(Transition::Stopping));
            for &from_us in &starts {
                let next = |set: &BTreeSet<u64>| set.range(from_us + 1..).next().copied();
                let until_us = match (next(&ends), next(&cuts)) {
                    (Some(end), Some(cut)) => Some(end.min(cut)),
                    (end, cut) => end.or(cut),
                };
                let within = |t: u64| t >= from_us && until_us.is_none_or(|u| t <= u);
                let active_from_us = next(&active_enters).filter(|&t| within(t)).unwrap_or(0);
                let active_until_us = next(&active_exits).filter(|&t| within(t)).unwrap_or(0);
                copies.push(CopySpan { host, from_us, until_us, active_from_us, active_until_us });
            }
        }
        copies
    }

    /// How many times `vm`'s unit on `host` was seen leaving `inactive`.
    pub fn starts(&self, vm: &str, host: usize) -> usize {
        self.copies(vm).iter().filter(|c| c.host == host).count()
    }

    /// Pairs of copies of `vm` on two hosts that existed at the same moment.
    pub fn overlaps(&self, vm: &str) -> Vec<(CopySpan, CopySpan)> {
        let copies = self.copies(vm);
        let mut out = Vec::new();
        for (i, a) in copies.iter().enumerate() {
            for b in &copies[i + 1..] {
                if a.host != b.host && a.overlaps(b) {
                    out.push((*a, *b));
                }
            }
        }
        out
    }

    /// The shortest time between one copy of `vm` ending and the next one starting on
    /// another host, in microseconds (`None` if it never moved).
    pub fn closest_handover_us(&self, vm: &str) -> Option<u64> {
        let mut copies = self.copies(vm);
        copies.sort_by_key(|c| c.from_us);
        copies
            .windows(2)
            .filter(|w| w[0].host != w[1].host)
            .filter_map(|w| w[0].until_us.map(|until| w[1].from_us.saturating_sub(until)))
            .min()
    }

    /// The longest gap between two consecutive samples of a host while it was running
    /// (power cuts excepted), and the mean sampling rate over all hosts, in samples per
    /// second per host.
    pub fn sampling(&self) -> (Duration, f64) {
        let mut by_host: BTreeMap<usize, Vec<u64>> = BTreeMap::new();
        for sample in &self.samples {
            by_host.entry(sample.host).or_default().push(sample.at_us);
        }
        let mut longest = 0;
        let (mut count, mut span) = (0u64, 0u64);
        for (host, mut times) in by_host {
            times.sort_unstable();
            for w in times.windows(2) {
                let cut_between = self.power_cuts.iter().any(|&(h, t)| h == host && t >= w[0] && t <= w[1]);
                if !cut_between {
                    longest = longest.max(w[1] - w[0]);
                    count += 1;
                    span += w[1] - w[0];
                }
            }
        }
        let rate = if span == 0 { 0.0 } else { count as f64 * 1e6 / span as f64 };
        (Duration::from_micros(longest), rate)
    }

    /// A readable account of `vm`'s copies, for assertion messages.
    pub fn describe(&self, vm: &str) -> String {
        let mut text = format!("copies of {vm} (CLOCK_MONOTONIC µs):");
        for c in self.copies(vm) {
            let until = c.until_us.map_or("still there".to_owned(), |u| u.to_string());
            let _ = write!(
                text,
                "\n  h{}: {} .. {until} (active {} .. {})",
                c.host, c.from_us, c.active_from_us, c.active_until_us
            );
        }
        text
    }
}

/// Where each host's sampler appends its samples, inside the host.
pub const SAMPLES_PATH: &str = "/var/lib/blixard-sampler/samples";
const SAMPLER_UNIT: &str = "blixard-sampler.service";

/// Samples the guest units of every host of a bed, up to 10 to 12 times a second (fewer
/// when the machine is loaded: see [`cgroups`] for the sampler that keeps its rate), from
/// inside the hosts: each runs `blixard-sampler.service`, a shell loop around one `systemctl show`
/// of every guest unit, appending to [`SAMPLES_PATH`]. It starts again when its host
/// boots, and its file survives power cuts, so the samples of a host that lost power
/// stay readable. (Sampling from the test process through `nsenter` costs a process
/// tree and a cgroup per sample, and managed about 2 samples a second on a loaded
/// 2-core machine.) Power cuts made through [`Sampler::power_cut`] enter the timeline
/// too.
pub struct Sampler {
    vms: Vec<String>,
    power_cuts: Mutex<Vec<(usize, u64)>>,
}

impl Sampler {
    /// Installs and starts the sampler in every host of `bed`.
    pub fn start(bed: &Testbed, vms: Vec<String>) -> Result<Sampler> {
        let units: Vec<String> = vms.iter().map(|vm| guest::unit(vm)).collect();
        let period = format!("{:.3}", SAMPLE_PERIOD.as_secs_f64());
        let script = format!(
            "#!/bin/sh\n# Samples the guest units for the never-two-copies check (blixard-systests).\n\
             mkdir -p {dir}\nwhile :; do\n  read up _ < /proc/uptime\n  echo \"@ $up\"\n  \
             systemctl show --property={PROPERTIES} {units}\n  echo\n  sleep {period}\ndone >> {SAMPLES_PATH}\n",
            dir = SAMPLES_PATH.rsplit_once('/').expect("an absolute path").0,
            units = units.join(" "),
        );
        let unit = "[Unit]\nDescription=Guest unit sampler (blixard-systests)\n\n[Service]\n\
                    ExecStart=/usr/local/bin/blixard-sampler\nRestart=always\nRestartSec=100ms\n\
                    # Below the agents: the sampler must not starve what it observes.\nNice=10\n\n\
                    [Install]\nWantedBy=multi-user.target\n";
        for host in bed.hosts() {
            host.write_file("/usr/local/bin/blixard-sampler", &script, 0o755)?;
            host.write_file(&format!("/etc/systemd/system/{SAMPLER_UNIT}"), unit, 0o644)?;
            host.run(&["systemctl", "daemon-reload"])?;
            host.run(&["systemctl", "enable", "--now", SAMPLER_UNIT])?;
        }
        Ok(Sampler { vms, power_cuts: Mutex::new(Vec::new()) })
    }

    /// Records that every process of `host` was dead by now: call it right after the
    /// host's power was cut.
    pub fn power_cut(&self, host: usize) {
        self.cuts().push((host, monotonic_us()));
    }

    /// Every sample every host has written so far.
    pub fn timeline(&self, bed: &Testbed) -> Result<Timeline> {
        let offset_us = boottime_offset_us();
        let mut timeline = Timeline { power_cuts: self.cuts().clone(), ..Timeline::default() };
        for host in bed.hosts() {
            let path = host.path(SAMPLES_PATH);
            let text = match std::fs::read_to_string(&path) {
                Ok(text) => text,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
            };
            let (samples, failed) = parse_samples(host.index(), &text, &self.vms, offset_us);
            timeline.samples.extend(samples);
            timeline.failed_samples += failed;
        }
        Ok(timeline)
    }

    /// Waits until every running host has written two more samples than it had, so that
    /// the timeline covers what happened before this call.
    pub fn catch_up(&self, bed: &Testbed, timeout: Duration) -> Result<()> {
        let count = |host: usize| self.timeline(bed).map(|t| t.samples.iter().filter(|s| s.host == host).count());
        let running: Vec<usize> = bed.hosts().iter().filter(|h| h.is_running()).map(|h| h.index()).collect();
        let before: Vec<usize> = running.iter().map(|&h| count(h)).collect::<Result<_>>()?;
        crate::wait_until("two more samples of every running host", timeout, || {
            for (&host, &was) in running.iter().zip(&before) {
                if bed.host(host).is_running() && count(host)? < was + 2 {
                    return Ok(false);
                }
            }
            Ok(true)
        })
    }

    fn cuts(&self) -> MutexGuard<'_, Vec<(usize, u64)>> {
        self.power_cuts.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// CLOCK_BOOTTIME minus CLOCK_MONOTONIC (time the machine spent suspended), to put the
/// samplers' `/proc/uptime` stamps on the monotonic clock.
fn boottime_offset_us() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec we pass and nothing else.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_BOOTTIME) cannot fail");
    (ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000).saturating_sub(monotonic_us())
}

/// Parses a sampler's file: records of `@ <uptime seconds>` and a `systemctl show` of
/// every guest unit. The last record may be half-written and is left for the next read;
/// returns the samples and how many complete records could not be parsed.
fn parse_samples(host: usize, text: &str, vms: &[String], offset_us: u64) -> (Vec<Sample>, usize) {
    let mut records: Vec<&str> = text.split("@ ").skip(1).collect();
    records.pop();
    let (mut samples, mut failed) = (Vec::new(), 0);
    for record in records {
        let Some((stamp, body)) = record.split_once('\n') else {
            failed += 1;
            continue;
        };
        let Ok(uptime) = stamp.trim().parse::<f64>() else {
            failed += 1;
            continue;
        };
        match parse_show(body, vms) {
            Ok(units) => {
                let at_us = ((uptime * 1e6) as u64).saturating_sub(offset_us);
                samples.push(Sample { host, at_us, units });
            }
            Err(_) => failed += 1,
        }
    }
    (samples, failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(vm: &str, exit: u64, enter: u64) -> Unit {
        Unit {
            vm: vm.into(),
            active_state: if exit > enter { "active" } else { "inactive" }.into(),
            inactive_exit_us: exit,
            inactive_enter_us: enter,
            active_enter_us: if exit > 0 { exit + 1 } else { 0 },
            active_exit_us: if enter > exit { enter - 1 } else { 0 },
            ..Unit::default()
        }
    }

    fn sample(host: usize, at_us: u64, units: Vec<Unit>) -> Sample {
        Sample { host, at_us, units }
    }

    #[test]
    fn parses_systemctl_show_of_several_units() {
        let text = "Id=microvm@a.service\nActiveState=active\nSubState=running\nMainPID=42\n\
                    ActiveEnterTimestampMonotonic=200\nActiveExitTimestampMonotonic=0\n\
                    InactiveEnterTimestampMonotonic=0\nInactiveExitTimestampMonotonic=150\n\n\
                    MainPID=0\nId=microvm@b.service\nActiveState=inactive\nSubState=dead\n";
        let units = parse_show(text, &["a".into(), "b".into()]).unwrap();
        assert_eq!(units[0].main_pid, 42);
        assert_eq!((units[0].inactive_exit_us, units[0].active_enter_us), (150, 200));
        assert!(units[0].is_active() && !units[1].is_active());
        assert!(parse_show(text, &["a".into()]).is_err(), "an unexpected unit is an error");
    }

    #[test]
    fn a_handover_with_a_gap_is_not_an_overlap() {
        let timeline = Timeline {
            samples: vec![
                sample(0, 100, vec![unit("a", 10, 0)]),
                sample(1, 100, vec![unit("a", 0, 0)]),
                sample(0, 200, vec![unit("a", 10, 150)]),
                sample(1, 200, vec![unit("a", 160, 0)]),
            ],
            ..Timeline::default()
        };
        assert!(timeline.overlaps("a").is_empty(), "{}", timeline.describe("a"));
        assert_eq!(timeline.closest_handover_us("a"), Some(10));
        let copies = timeline.copies("a");
        assert_eq!(copies.len(), 2);
        assert_eq!(copies[0].until_us, Some(150));
        assert_eq!(copies[1].until_us, None);
    }

    #[test]
    fn two_copies_at_once_are_found_even_between_samples() {
        // Host 1 starts at 140 while host 0's copy only ends at 150; no single sample
        // shows both active.
        let timeline = Timeline {
            samples: vec![
                sample(0, 100, vec![unit("a", 10, 0)]),
                sample(1, 100, vec![unit("a", 0, 0)]),
                sample(0, 200, vec![unit("a", 10, 150)]),
                sample(1, 200, vec![unit("a", 140, 0)]),
            ],
            ..Timeline::default()
        };
        assert_eq!(timeline.overlaps("a").len(), 1);
    }

    #[test]
    fn a_power_cut_ends_a_copy_and_a_later_boot_starts_afresh() {
        let timeline = Timeline {
            samples: vec![
                sample(0, 100, vec![unit("a", 10, 0)]),
                // Booted again: a new systemd that never ran the unit.
                sample(0, 900, vec![unit("a", 0, 0)]),
                sample(1, 600, vec![unit("a", 500, 0)]),
            ],
            power_cuts: vec![(0, 300)],
            ..Timeline::default()
        };
        let copies = timeline.copies("a");
        assert_eq!(
            copies[0],
            CopySpan { host: 0, from_us: 10, until_us: Some(300), active_from_us: 11, active_until_us: 0 }
        );
        assert!(timeline.overlaps("a").is_empty());
        assert_eq!(timeline.starts("a", 0), 1);
    }

    #[test]
    fn a_copy_without_a_cut_or_an_end_lasts_forever() {
        let timeline = Timeline {
            samples: vec![sample(0, 100, vec![unit("a", 10, 0)]), sample(1, 100, vec![unit("a", 50, 0)])],
            ..Timeline::default()
        };
        assert_eq!(timeline.overlaps("a").len(), 1);
    }

    #[test]
    fn journal_lines_end_copies_that_samples_never_saw_end() {
        let journal = "[  0.000100] systemd[1]: Starting microvm@a.service - MicroVM 'a'...\n\
                       [  0.000150] systemd[1]: Started microvm@a.service - MicroVM 'a'.\n\
                       [  0.000300] microvm@a[77]: shutdown 1.5\n\
                       [  0.000290] systemd[1]: Stopping microvm@a.service - MicroVM 'a'...\n\
                       [  0.000310] systemd[1]: microvm@a.service: Deactivated successfully.\n\
                       [  0.000320] systemd[1]: Stopped microvm@a.service - MicroVM 'a'.\n\
                       [  0.000330] systemd[1]: Stopped microvm@b.service - MicroVM 'b'.\n";
        let logged = parse_journal(0, journal);
        assert_eq!(logged.len(), 4, "{logged:?}");
        assert_eq!(logged[0], Logged { host: 0, vm: "a".into(), at_us: 290, what: Transition::Stopping });
        let timeline = Timeline {
            // Unloaded after it stopped: the second sample shows a fresh unit.
            samples: vec![sample(0, 200, vec![unit("a", 110, 0)]), sample(0, 400, vec![unit("a", 0, 0)])],
            logged,
            ..Timeline::default()
        };
        let copies = timeline.copies("a");
        assert_eq!(copies.len(), 1);
        assert_eq!((copies[0].until_us, copies[0].active_until_us), (Some(310), 290));
    }

    #[test]
    fn sampler_files_parse_up_to_the_last_complete_record() {
        let text = "@ 10.50\nId=microvm@a.service\nActiveState=active\nInactiveExitTimestampMonotonic=7\n\n\
                    @ 10.55\nFailed to connect to bus\n\n@ 10.60\nId=microvm@a.service\nActiveState=inac";
        let (samples, failed) = parse_samples(2, text, &["a".into()], 500_000);
        assert_eq!(failed, 1);
        assert_eq!(samples.len(), 1);
        assert_eq!((samples[0].host, samples[0].at_us, samples[0].units[0].inactive_exit_us), (2, 10_000_000, 7));
    }

    #[test]
    fn sampling_gaps_skip_power_cuts() {
        let timeline = Timeline {
            samples: vec![sample(0, 0, vec![]), sample(0, 50_000, vec![]), sample(0, 2_000_000, vec![])],
            power_cuts: vec![(0, 60_000)],
            ..Timeline::default()
        };
        let (longest, rate) = timeline.sampling();
        assert_eq!(longest, Duration::from_millis(50));
        assert!((rate - 20.0).abs() < 0.01, "{rate}");
    }
}
