//! The cluster on four hosts with real systemd: each host is a container of the test bed
//! running `blixard-agent.service` with the systemd runtime, and guests are microvm.nix's
//! `microvm@NAME.service` units (fake runners, see `blixard_systests::guest`). With
//! `raft.voters = 3`, one host is a learner: it runs VMs and fences like the voters.
//!
//! One bed serves every scenario, in order, because booting and forming is most of the
//! cost; each scenario starts from the placements the previous one left. Two observers
//! watch the guests for the whole run (see `blixard_systests::timeline`): systemd's own
//! transition timestamps, read inside every host, give exact intervals; and the test
//! process looks about 50 times a second at whether each guest's unit cgroup on each host
//! has a process. The test ends by checking, over all of it and with both, that no guest
//! ever had copies on two hosts at once, and that the cgroup sampling ran at least
//! [`REQUIRED_RATE`] times a second per host.
//!
//! Waits are conditions with deadlines; the deadlines are generous (a loaded 2-core CI
//! machine), the properties are asserted strictly.

use std::collections::BTreeMap;
use std::time::Duration;

use blixard_systests::bedcluster::{AGENT_UNIT, BedCluster};
use blixard_systests::timeline::CopySpan;
use blixard_systests::timeline::cgroups::REQUIRED_RATE;
use blixard_systests::{Probe, wait_for};

const VMS: [&str; 5] = ["a", "b", "c", "d", "e"];
const ALL: [usize; 4] = [0, 1, 2, 3];
/// Three voters of four hosts: the fourth is a learner. No voter is replaced within the
/// run (a host is cut off or powered off for seconds), so the learner stays the one.
const CONFIG: &str = "[raft]\nvoters = 3\nreplace_voter_after_ms = 60000\n";

fn others(host: usize) -> Vec<usize> {
    ALL.into_iter().filter(|&h| h != host).collect()
}

/// The hosts ordered by how many of the VMs they run, most first.
fn by_load(placed: &BTreeMap<String, usize>) -> Vec<(usize, Vec<String>)> {
    let mut hosts: Vec<(usize, Vec<String>)> = ALL
        .into_iter()
        .map(|h| (h, placed.iter().filter(|(_, p)| **p == h).map(|(vm, _)| vm.clone()).collect()))
        .collect();
    hosts.sort_by_key(|(h, vms)| (std::cmp::Reverse(vms.len()), *h));
    hosts
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Cuts `cut` (running `cut_vms`, `who` says what it is in messages) off the others:
/// its guests stop before they start elsewhere; healed, it rejoins and starts none of
/// them again. Returns where the VMs run.
fn cut_off_and_heal(c: &BedCluster, cut: usize, cut_vms: &[String], who: &str) -> BTreeMap<String, usize> {
    let starts_on_cut: Vec<usize> = VMS.iter().map(|vm| c.guest_starts(cut, vm).unwrap()).collect();
    let cut_at = blixard_systests::timeline::monotonic_us();
    c.cut_link(cut).unwrap();
    let moved = c.wait_settled_where(&VMS, &others(cut), |_, h| h != cut).unwrap();
    let timeline = c.timeline().unwrap();
    for vm in cut_vms {
        let (old, new) = (timeline.copy_at(vm, cut, cut_at), timeline.copy_at(vm, moved[vm], cut_at));
        let stopped = old.until_us.expect("the cut-off copy ended");
        assert!(
            stopped < new.from_us,
            "{vm} started elsewhere before {who}{} stopped it:\n{}",
            c.name(cut),
            timeline.describe(vm)
        );
        eprintln!(
            "{vm}: {who}{} fenced it {:.0} ms after the cut; {} started it {:.0} ms after that",
            c.name(cut),
            ms(stopped.saturating_sub(cut_at)),
            c.name(moved[vm]),
            ms(new.from_us.saturating_sub(stopped))
        );
    }
    c.heal_link(cut).unwrap();
    c.wait_formed(&ALL).unwrap();
    c.wait_reconciled(cut).unwrap();
    assert_eq!(
        c.wait_settled(&VMS, &ALL).unwrap(),
        moved,
        "after healing {who}{}, one copy each, where they moved",
        c.name(cut)
    );
    for (vm, before) in VMS.iter().zip(&starts_on_cut) {
        assert_eq!(c.guest_starts(cut, vm).unwrap(), *before, "{who}{} restarted {vm} after healing", c.name(cut));
    }
    moved
}

/// The one learner, as `host` sees the cluster.
fn learner_of(c: &BedCluster, host: usize) -> usize {
    let status = c.status(host).unwrap();
    let learners: Vec<&str> = status.members.iter().filter(|m| !m.voter).map(|m| m.name.as_str()).collect();
    assert_eq!(learners.len(), 1, "one learner of four hosts with raft.voters = 3: {status:?}");
    c.index_of(learners[0]).expect("a host of the bed")
}

#[test]
fn placement_restart_drain_migrate_partition_and_power_loss_on_systemd_hosts() {
    let Some(cluster) = BedCluster::start_configured_or_skip(ALL.len(), &VMS, CONFIG) else { return };
    let started = std::time::Instant::now();
    let c = &cluster;

    // The cluster forms from three identical configs.
    let leader = c.wait_formed(&ALL).unwrap();
    eprintln!("formed in {:.1} s, leader {}", started.elapsed().as_secs_f64(), c.name(leader));
    // A new member reports its capacity and its installed runners once it has reached a
    // quorum; until then the scheduler cannot place on it (and placements never move
    // without a reason), so the VMs are created once every host has reported.
    for host in ALL {
        c.wait_reconciled(host).unwrap();
    }
    c.wait_capacity_reported(leader).unwrap();

    // Each created VM's unit is active on exactly one host, where the cluster says.
    for vm in VMS {
        let info = c.create_vm(others(leader)[0], vm).unwrap();
        assert_eq!((info.desired.as_str(), info.state.as_str()), ("running", "pending"), "{info:?}");
    }
    let placed = c.wait_settled(&VMS, &ALL).unwrap();
    eprintln!("placed: {placed:?}");
    let loads = by_load(&placed);
    assert!(loads.iter().all(|(_, vms)| !vms.is_empty()), "spread placement uses every host: {loads:?}");

    // A guest's journal, from its host, through an agent that is not its host.
    let (vm, host) = placed.iter().next().map(|(vm, h)| (vm.clone(), *h)).expect("placed VMs");
    let lines = c.vm_logs(others(host)[0], &vm, 50).unwrap();
    assert!(lines.iter().all(|l| l.node == c.name(host)), "{lines:?}");
    assert!(lines.iter().any(|l| l.line.contains("Started")), "no start in {vm}'s journal: {lines:?}");

    // An agent restart leaves its guests running: same processes, never restarted. A
    // follower's: restarting the leader's adds an election, which on a starved machine
    // can outlast fence_after and fence every host (see the power-loss scenario for a
    // lost leader).
    let (host, host_vms) =
        loads.iter().find(|(h, vms)| *h != leader && !vms.is_empty()).expect("two followers run VMs").clone();
    let before = c.units(host).unwrap();
    let pid = c.agent_pid(host).unwrap();
    c.restart_agent(host).unwrap();
    assert_ne!(c.agent_pid(host).unwrap(), pid, "systemctl restart started a new agent");
    c.wait_formed(&ALL).unwrap();
    c.wait_reconciled(host).unwrap();
    let after = c.units(host).unwrap();
    for (old, new) in before.iter().zip(&after).filter(|(old, _)| old.is_active()) {
        assert!(new.is_active(), "{} stopped across the agent restart: {new:?}", old.vm);
        assert_eq!(
            (new.main_pid, new.active_enter_us),
            (old.main_pid, old.active_enter_us),
            "{} was restarted across the agent restart",
            old.vm
        );
    }
    assert_eq!(c.wait_settled(&VMS, &ALL).unwrap(), placed, "nothing moved across an agent restart");
    eprintln!("agent restart on {} kept {host_vms:?} running", c.name(host));

    // Drain moves every VM off the host, one at a time: each runs on its new host before
    // the next one stops.
    let (drained, moving) = loads[0].clone();
    let api = others(drained)[0];
    let drain_at = blixard_systests::timeline::monotonic_us();
    assert_eq!(c.drain(api, c.name(drained)).unwrap().status, "draining");
    let placed = c.wait_settled_where(&VMS, &ALL, |_, h| h != drained).unwrap();
    let timeline = c.timeline().unwrap();
    let mut moves: Vec<(String, CopySpan, CopySpan)> = moving
        .iter()
        .map(|vm| {
            let old = timeline.copy_at(vm, drained, drain_at);
            let new = timeline.copy_at(vm, placed[vm], drain_at);
            (vm.clone(), old, new)
        })
        .collect();
    moves.sort_by_key(|(_, _, new)| new.from_us);
    for pair in moves.windows(2) {
        let ((first, _, first_new), (next, next_old, _)) = (&pair[0], &pair[1]);
        assert!(
            first_new.active_from_us > 0 && next_old.active_until_us >= first_new.active_from_us,
            "drain moved {next} before {first} ran on its new host:\n{}\n{}",
            timeline.describe(first),
            timeline.describe(next)
        );
    }
    assert_eq!(c.undrain(api, c.name(drained)).unwrap().status, "up");
    eprintln!("drained {}: {moving:?} moved one at a time", c.name(drained));

    // Migrate stops the VM on its host, then starts it on the target; nothing else moves.
    let vm = "a";
    let (from, to) = (placed[vm], others(placed[vm])[0]);
    let migrate_at = blixard_systests::timeline::monotonic_us();
    c.migrate(api, vm, c.name(to)).unwrap();
    let after = c.wait_settled_where(&VMS, &ALL, |v, h| v != vm || h == to).unwrap();
    for (other, host) in &placed {
        if other != vm {
            assert_eq!(after[other], *host, "{other} moved when only {vm} was migrated");
        }
    }
    let placed = after;
    let timeline = c.timeline().unwrap();
    let (old, new) = (timeline.copy_at(vm, from, migrate_at), timeline.copy_at(vm, to, migrate_at));
    let handover = new.from_us.saturating_sub(old.until_us.expect("the old copy ended"));
    eprintln!("migrated {vm} {} -> {}: {:.1} ms between the copies", c.name(from), c.name(to), ms(handover));

    // A host cut off from the others stops its guests before they start elsewhere, and
    // does not start them again when it comes back. The leader when it runs VMs: the
    // hardest case (the deposed leader must fence, a new one reschedule).
    let loads = by_load(&placed);
    let leader = c.leader_seen_by(api).unwrap_or(leader);
    let (cut, cut_vms) = loads.iter().find(|(h, vms)| *h == leader && !vms.is_empty()).unwrap_or(&loads[0]).clone();
    let survivors = others(cut);
    let placed = cut_off_and_heal(c, cut, &cut_vms, "");

    // A learner cut off fences by the same quorum contact as a voter: its guests stop
    // before they start elsewhere, and it takes nothing back when it returns. Healthy
    // until then (through the leader's loss above), it never fenced.
    let learner = learner_of(c, survivors[0]);
    let fenced = |host: usize| -> Vec<u64> {
        let events = c.events(host).unwrap();
        events.iter().filter(|e| e.kind == "host_fenced").map(|e| e.at_unix_ms).collect()
    };
    assert_eq!(fenced(learner), Vec::<u64>::new(), "{}, a healthy learner, fenced", c.name(learner));
    let placed = if placed.values().any(|&h| h == learner) {
        placed
    } else {
        let vm = placed.keys().next().expect("placed VMs").clone();
        c.migrate(others(learner)[0], &vm, c.name(learner)).unwrap();
        c.wait_settled_where(&VMS, &ALL, |v, h| v != vm || h == learner).unwrap()
    };
    let learner_vms: Vec<String> = placed.iter().filter(|(_, h)| **h == learner).map(|(vm, _)| vm.clone()).collect();
    let cut_at_unix_ms = unix_ms();
    let moved = cut_off_and_heal(c, learner, &learner_vms, "the learner ");
    // It fenced itself (its own event, at its own wall clock: a second's slack), while
    // cut off, and only then.
    let fences = fenced(learner);
    assert!(!fences.is_empty() && fences.iter().all(|&at| at + 1000 >= cut_at_unix_ms), "{fences:?}");
    eprintln!("the learner {} fenced while cut off: {} time(s)", c.name(learner), fences.len());
    let placed = moved;

    // A host that loses power has its VMs run on the survivors; booted again, it rejoins
    // and starts none of them.
    let loads = by_load(&placed);
    let leader = c.leader_seen_by(survivors[0]).unwrap_or(leader);
    let (lost, lost_vms) = loads.iter().find(|(h, vms)| *h != leader && !vms.is_empty()).unwrap_or(&loads[0]).clone();
    let starts_on_lost: Vec<usize> = VMS.iter().map(|vm| c.guest_starts(lost, vm).unwrap()).collect();
    let lost_at = blixard_systests::timeline::monotonic_us();
    c.power_off(lost).unwrap();
    let moved = c.wait_settled_where(&VMS, &others(lost), |_, h| h != lost).unwrap();
    let timeline = c.timeline().unwrap();
    for vm in &lost_vms {
        let new = timeline.copy_at(vm, moved[vm], lost_at);
        eprintln!(
            "{vm}: running on {} {:.0} ms after {} lost power",
            c.name(moved[vm]),
            ms(new.active_from_us.saturating_sub(lost_at)),
            c.name(lost)
        );
    }
    // The survivors' event logs tell the story: the host went down, its VMs moved.
    for survivor in others(lost) {
        let lost_name = c.name(lost).to_string();
        wait_for("the failover's events", Duration::from_secs(30), || {
            let seen = match c.events(survivor) {
                Ok(seen) => seen,
                Err(e) => return Ok(Probe::NotYet(e.message().to_string())),
            };
            let down = seen.iter().any(|e| e.kind == "host_down" && e.node == lost_name);
            let unmoved: Vec<&String> = lost_vms
                .iter()
                .filter(|vm| !seen.iter().any(|e| e.kind == "vm_moved" && &e.vm == *vm && e.from == lost_name))
                .collect();
            Ok(if down && unmoved.is_empty() {
                Probe::Ready(())
            } else {
                Probe::NotYet(format!("host_down seen: {down}; no vm_moved from {lost_name} yet for {unmoved:?}"))
            })
        })
        .unwrap();
    }
    c.boot(lost).unwrap();
    c.wait_formed(&ALL).unwrap();
    c.wait_reconciled(lost).unwrap();
    assert_eq!(c.wait_settled(&VMS, &ALL).unwrap(), moved, "the returning host took nothing back");
    for (vm, before) in VMS.iter().zip(&starts_on_lost) {
        assert_eq!(c.guest_starts(lost, vm).unwrap(), *before, "{} started {vm} after booting", c.name(lost));
    }

    // Under systemd the agent logs to the journal natively, with tracing's fields.
    let journal = c
        .bed()
        .host(lost)
        .run(&["journalctl", "--unit", AGENT_UNIT, "--output", "verbose", "--no-pager", "--lines", "300"])
        .unwrap();
    assert!(journal.contains("TARGET=blixard"), "no structured agent entries in the journal:\n{journal}");

    // Over the whole run: never two copies of a guest at once, by systemd's exact
    // timeline and by cgroup rounds at least REQUIRED_RATE times a second.
    let observed = c.assert_never_two_copies().unwrap();
    let (rate, longest_gap) = observed.cgroups.rate();
    eprintln!(
        "cgroup sampler: {} rounds of every host, {rate:.1}/s per host, longest gap {longest_gap:?}",
        observed.cgroups.rounds.len()
    );
    assert!(rate >= REQUIRED_RATE, "the cgroup sampler took {rate:.1} samples a second per host");
    let timeline = &observed.timeline;
    let (longest_gap, rate) = timeline.sampling();
    eprintln!(
        "systemd sampler: {} samples ({rate:.1}/s per host, longest gap {longest_gap:?}, {} failed); \
         closest handovers: {}; total {:.1} s",
        timeline.samples.len(),
        timeline.failed_samples,
        VMS.iter()
            .filter_map(|vm| timeline.closest_handover_us(vm).map(|g| format!("{vm} {:.1} ms", ms(g))))
            .collect::<Vec<_>>()
            .join(", "),
        started.elapsed().as_secs_f64()
    );
}
