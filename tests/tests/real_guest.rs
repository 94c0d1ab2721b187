//! A real guest on the container test bed: qemu (TCG) booting Debian's kernel and a
//! tiny initramfs, laid out as a microvm.nix qemu runner and run by the hosts'
//! `microvm@.service` (microvm.nix's, see `tests/testbed/prepare.sh`), with the agents'
//! systemd runtime. One guest, one bed of three hosts, in order: start; a clean stop
//! through `microvm-shutdown` within the stop timeout; a start again; a roll to a new
//! runner when `current` changes; a cold migration; a cut-off host's fence killing its
//! qemu within its bound, and the guest starting elsewhere; a power cut and failover.
//! Throughout, `vm logs` shows the guest's console, and at the end the guest's own
//! serial counter shows it never ran on two hosts at once (besides the systemd and
//! cgroup observers of `blixard_systests::timeline`).
//!
//! Needs `tests/testbed/prepare-guest.sh` (scripts/test.sh runs it).

use std::time::{Duration, Instant};

use blixard::failure::Timing;
use blixard_systests::bedcluster::BedCluster;
use blixard_systests::guest::{self, ConsoleRun};
use blixard_systests::timeline::monotonic_us;
use blixard_systests::{Probe, wait_for};

const VM: &str = "rg";
const ALL: [usize; 3] = [0, 1, 2];
/// A TCG boot on a loaded 2-core machine: ~10 s; the margin is for the load.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// Beyond the fence's bound: systemd reaping the killed qemu and its unit going
/// inactive on a loaded machine (the timeline ends a copy only then).
const FENCE_SLACK_MS: u64 = 1000;
/// The agent kills a guest that has not stopped gracefully by then
/// (`runtime::STOP_TIMEOUT_DEFAULT`); a clean stop must finish well before.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

fn others(host: usize) -> Vec<usize> {
    ALL.into_iter().filter(|&h| h != host).collect()
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// Waits until the guest has booted on `host` since `since_us` (a console run that
/// began then and ticked), and returns that run.
fn wait_booted(c: &BedCluster, host: usize, since_us: u64) -> ConsoleRun {
    wait_for(&format!("{VM} to boot on {}", c.name(host)), BOOT_TIMEOUT, || {
        let runs = guest::console_runs(c.bed(), VM)?;
        Ok(match runs.iter().find(|r| r.host == host && r.first_us >= since_us && r.ticks >= 2) {
            Some(run) => Probe::Ready(run.clone()),
            None => Probe::NotYet(format!("{runs:?}")),
        })
    })
    .unwrap()
}

#[test]
fn a_real_qemu_guest_starts_stops_rolls_migrates_is_fenced_and_fails_over() {
    let Some(cluster) = BedCluster::start_real_or_skip(3, &[VM]) else { return };
    let c = &cluster;
    let started = Instant::now();
    let timing = Timing::default();

    let leader = c.wait_formed(&ALL).unwrap();
    for host in ALL {
        c.wait_reconciled(host).unwrap();
    }
    c.wait_capacity_reported(leader).unwrap();

    // Start: the guest boots on the host the cluster placed it on.
    let t0 = monotonic_us();
    c.create_vm(others(leader)[0], VM).unwrap();
    let home = c.wait_settled(&[VM], &ALL).unwrap()[VM];
    let run = wait_booted(c, home, t0);
    assert_eq!(run.runner, Some(1), "{run:?}");
    eprintln!("{VM} booted on {} in {:.1} s", c.name(home), ms(run.first_us - t0) / 1000.0);

    // `vm logs`, asked of another host, shows the guest's own console.
    let lines = c.vm_logs(others(home)[0], VM, 200).unwrap();
    assert!(lines.iter().all(|l| l.node == c.name(home)), "{lines:?}");
    assert!(
        lines.iter().any(|l| l.line.contains(&format!("blixard-guest {VM} tick"))),
        "no console output in vm logs: {lines:?}"
    );

    // A clean stop: microvm-shutdown sends ctrl-alt-del, the guest reboots, qemu exits
    // by itself (-no-reboot), well within the stop timeout and without a kill.
    let stop_at = Instant::now();
    c.set_running(home, VM, false).unwrap();
    wait_for("the guest to stop", STOP_TIMEOUT, || {
        let unit = c.unit(home, VM)?;
        // Not just not `active`: stopped (`deactivating` is still stopping).
        Ok(if matches!(unit.active_state.as_str(), "inactive" | "failed" | "") {
            Probe::Ready(())
        } else {
            Probe::NotYet(format!("{unit:?}"))
        })
    })
    .unwrap();
    let stop_took = stop_at.elapsed();
    let runs = guest::console_runs(c.bed(), VM).unwrap();
    let last = runs.iter().rfind(|r| r.host == home).unwrap();
    assert!(last.shut_down, "the guest was not asked to shut down: {last:?}");
    let log = c.bed().host(home).fake_guest_log(VM).unwrap();
    assert!(log.iter().any(|l| l.starts_with("shutdown ")), "microvm-shutdown did not run: {log:?}");
    let journal = c.bed().host(home).journal(&guest::unit(VM)).unwrap();
    for bad in ["Killing process", "timed out", "Failed with result"] {
        assert!(!journal.contains(bad), "{VM}'s stop was not clean ({bad:?}):\n{journal}");
    }
    assert!(stop_took < STOP_TIMEOUT, "the clean stop took {stop_took:?}");
    eprintln!("clean stop through microvm-shutdown in {stop_took:.1?}");

    // Started again.
    let t1 = monotonic_us();
    c.set_running(others(home)[1], VM, true).unwrap();
    let home = c.wait_settled(&[VM], &ALL).unwrap()[VM];
    wait_booted(c, home, t1);

    // A switch installs a new runner on every host (`current` moves): the agent rolls
    // the guest to it, on its host, through a clean stop.
    let t2 = monotonic_us();
    let new_runner = c.install_runner(VM, 2).unwrap();
    let run = wait_booted(c, home, t2);
    assert_eq!(run.runner, Some(2), "not booted from the new runner: {run:?}");
    assert_eq!(c.bed().host(home).booted_runner(VM).as_deref(), Some(new_runner.as_str()));
    assert_eq!(c.wait_settled(&[VM], &ALL).unwrap()[VM], home, "the roll moved the guest");
    let rolled_from = guest::console_runs(c.bed(), VM).unwrap();
    assert!(
        rolled_from.iter().any(|r| r.host == home && r.last_us <= run.first_us && r.shut_down && r.runner == Some(1)),
        "the old runner's guest was not shut down cleanly before the new one booted: {rolled_from:?}"
    );
    eprintln!("rolled to runner 2 on {}", c.name(home));

    // Cold migration: stopped here, booted there, never both.
    let target = others(home)[0];
    let t3 = monotonic_us();
    c.migrate(others(home)[1], VM, c.name(target)).unwrap();
    assert_eq!(c.wait_settled(&[VM], &ALL).unwrap()[VM], target);
    wait_booted(c, target, t3);
    let timeline = c.timeline().unwrap();
    let (old, new) = (timeline.copy_at(VM, home, t3), timeline.copy_at(VM, target, t3));
    assert!(old.until_us.is_some_and(|u| u < new.from_us), "{}", timeline.describe(VM));
    eprintln!("migrated {} -> {}", c.name(home), c.name(target));

    // The fence: the host cut off from the others kills its qemu within the bound the
    // guard and the agent keep (fence_after + check_interval + stop_max after its last
    // quorum contact; the leader reschedules only reschedule_after later), and the guest
    // boots elsewhere, after it.
    let cut = target;
    let t4 = monotonic_us();
    c.cut_link(cut).unwrap();
    let moved = c.wait_settled_where(&[VM], &others(cut), |_, h| h != cut).unwrap()[VM];
    wait_booted(c, moved, t4);
    let timeline = c.timeline().unwrap();
    let (fenced, next) = (timeline.copy_at(VM, cut, t4), timeline.copy_at(VM, moved, t4));
    let fenced_at_ms = fenced.until_us.expect("the cut-off copy ended") / 1000;
    assert!(fenced_at_ms * 1000 < next.from_us, "started elsewhere before the fence:\n{}", timeline.describe(VM));
    // No contact after the cut: what the record holds now is the last one before it.
    let contact_ms = c.last_contact_ms(cut).expect("the cut-off host recorded a contact");
    let bound_ms = timing.fence_after_ms + timing.check_interval_ms + timing.stop_max_ms;
    let fence_took_ms = fenced_at_ms.saturating_sub(contact_ms);
    assert!(
        fence_took_ms <= bound_ms + FENCE_SLACK_MS,
        "the fence ended qemu {fence_took_ms} ms after the last contact, beyond {bound_ms} ms (+{FENCE_SLACK_MS}):\n{}",
        timeline.describe(VM)
    );
    eprintln!(
        "{} fenced its qemu {fence_took_ms} ms after its last contact ({} ms after the cut; bound {bound_ms} ms); {} booted it",
        c.name(cut),
        fenced_at_ms.saturating_sub(t4 / 1000),
        c.name(moved)
    );
    c.heal_link(cut).unwrap();
    c.wait_formed(&ALL).unwrap();
    c.wait_reconciled(cut).unwrap();
    assert_eq!(c.wait_settled(&[VM], &ALL).unwrap()[VM], moved, "the healed host took the guest back");

    // Power loss: the host running the guest dies; a survivor boots it.
    let lost = moved;
    let t5 = monotonic_us();
    c.power_off(lost).unwrap();
    let survivor = c.wait_settled_where(&[VM], &others(lost), |_, h| h != lost).unwrap()[VM];
    let run = wait_booted(c, survivor, t5);
    eprintln!(
        "{} lost power; {VM} booted on {} {:.1} s later",
        c.name(lost),
        c.name(survivor),
        ms(run.first_us - t5) / 1000.0
    );
    c.boot(lost).unwrap();
    c.wait_formed(&ALL).unwrap();
    c.wait_reconciled(lost).unwrap();
    assert_eq!(c.wait_settled(&[VM], &ALL).unwrap()[VM], survivor, "the returning host took the guest back");

    // The guest's own word: its console ran on one host at a time.
    let runs = guest::console_runs(c.bed(), VM).unwrap();
    let overlaps = guest::overlapping_runs(&runs);
    assert!(overlaps.is_empty(), "the guest's console ran on two hosts at once: {overlaps:?}\nall runs: {runs:?}");
    assert!(runs.len() >= 6, "expected at least six boots: {runs:?}");
    // And systemd's and the cgroups' word.
    c.assert_never_two_copies().unwrap();
    eprintln!("{} boots of {VM}, never two at once; total {:.1} s", runs.len(), started.elapsed().as_secs_f64());
}
