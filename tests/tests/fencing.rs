//! Never two copies, whatever happens to the agent (issue 16): on three container hosts
//! with real systemd and the systemd runtime, each way an agent (or its fence guard) can
//! stop working is done to the host that runs the most VMs. Its guests must stop by the
//! fence deadline without the agent's help, the affected VMs must run on exactly one
//! other host, and once the fault ends every VM has exactly one copy and the host takes
//! nothing back. A restart that completes within `fence_after` (as `nixos-rebuild
//! switch` does with the NixOS unit) moves nothing.
//!
//! It begins with the opposite (issue 21): a healthy cluster on a network that loses 10% of
//! the packets between hosts and delays the rest by up to 100 ms, where no host may fence
//! and no guest stop or move.
//!
//! One bed serves every scenario, in order; both observers of `blixard_systests::timeline`
//! watch the guests throughout, and the test ends by checking that no guest ever had
//! copies on two hosts at once.

use std::collections::BTreeMap;
use std::time::Duration;

use blixard::api::pb;
use blixard_systests::bedcluster::{AGENT_UNIT, BedCluster, GUARD_UNIT};
use blixard_systests::soak::soak;
use blixard_systests::testbed::Impairment;
use blixard_systests::timeline::cgroups::REQUIRED_RATE;
use blixard_systests::timeline::monotonic_us;
use blixard_systests::{Probe, agent_binary, wait_for};

const VMS: [&str; 5] = ["a", "b", "c", "d", "e"];
const ALL: [usize; 3] = [0, 1, 2];

fn others(host: usize) -> Vec<usize> {
    ALL.into_iter().filter(|&h| h != host).collect()
}

/// The host that runs the most VMs (ties: the lowest index) and its VMs.
fn busiest(placed: &BTreeMap<String, usize>) -> (usize, Vec<String>) {
    ALL.into_iter()
        .map(|h| (h, placed.iter().filter(|(_, p)| **p == h).map(|(vm, _)| vm.clone()).collect::<Vec<_>>()))
        .max_by_key(|(h, vms)| (vms.len(), std::cmp::Reverse(*h)))
        .expect("hosts")
}

/// What a failed step leaves to read: every host's view of the VMs and the tail of
/// every agent's and guard's journal.
fn diagnose(c: &BedCluster) -> String {
    let mut out = String::new();
    for host in ALL {
        let vms = match c.vm_list(host) {
            Ok(vms) => vms.iter().map(|v| format!("{} {}/{} on {:?}", v.name, v.state, v.desired, v.node)).collect(),
            Err(e) => vec![format!("vm list: {}", e.message())],
        };
        out.push_str(&format!("--- {} sees: {}\n", c.name(host), vms.join("; ")));
        let journal = c.bed().host(host).journal_args(&["-n", "60", "-u", AGENT_UNIT, "-u", GUARD_UNIT]);
        out.push_str(&journal.unwrap_or_else(|e| format!("journal: {e:#}\n")));
    }
    out
}

fn secs(us: u64) -> f64 {
    us as f64 / 1e6
}

/// What one scenario measured, for the summary at the end.
struct Measured {
    scenario: &'static str,
    host: String,
    vms: usize,
    stopped_s: f64,
    moved_s: f64,
}

/// A fault that leaves the host up but its agent (or guard) unable to act: its guests
/// stop without the agent, the VMs run elsewhere, and once `heal` ends the fault the host
/// rejoins and takes nothing back.
fn agent_fault(
    c: &BedCluster,
    placed: BTreeMap<String, usize>,
    scenario: &'static str,
    inject: impl FnOnce(usize),
    heal: impl FnOnce(usize),
    measured: &mut Vec<Measured>,
) -> BTreeMap<String, usize> {
    let (host, vms) = busiest(&placed);
    assert!(!vms.is_empty(), "{scenario}: no host runs a VM: {placed:?}");
    let starts: Vec<usize> = VMS.iter().map(|vm| c.guest_starts(host, vm).unwrap()).collect();
    let at = monotonic_us();
    inject(host);
    let stopped = c.wait_no_guests(host).unwrap();
    let moved = c.wait_settled_where(&VMS, &others(host), |_, h| h != host).unwrap();
    let moved_at = monotonic_us();
    measured.push(Measured {
        scenario,
        host: c.name(host).to_string(),
        vms: vms.len(),
        stopped_s: secs(stopped - at),
        moved_s: secs(moved_at - at),
    });
    eprintln!(
        "{scenario} on {}: its {} guests stopped {:.2} s after the fault; all ran elsewhere within {:.2} s",
        c.name(host),
        vms.len(),
        secs(stopped - at),
        secs(moved_at - at)
    );
    heal(host);
    c.wait_formed(&ALL).unwrap();
    c.wait_reconciled(host).unwrap();
    assert_eq!(
        c.wait_settled(&VMS, &ALL).unwrap(),
        moved,
        "{scenario}: after healing, one copy each, where they moved"
    );
    for (vm, before) in VMS.iter().zip(&starts) {
        assert_eq!(c.guest_starts(host, vm).unwrap(), *before, "{scenario}: {} restarted {vm}", c.name(host));
    }
    moved
}

/// Migrates VMs onto `host` until it runs `n` of them (so each scenario has guests to
/// fence), returning the new placements.
fn load(c: &BedCluster, placed: BTreeMap<String, usize>, host: usize, n: usize) -> BTreeMap<String, usize> {
    let mut on: Vec<String> = placed.iter().filter(|(_, h)| **h == host).map(|(vm, _)| vm.clone()).collect();
    for (vm, _) in placed.iter().filter(|(_, h)| **h != host) {
        if on.len() >= n {
            break;
        }
        c.migrate(host, vm, c.name(host)).unwrap();
        on.push(vm.clone());
    }
    c.wait_settled_where(&VMS, &ALL, |vm, h| !on.iter().any(|v| v == vm) || h == host).unwrap()
}

fn join_token(c: &BedCluster, host: usize) -> String {
    let mut client = c.client(host);
    c.block_on(async move {
        client.cluster_join_token(pb::ClusterJoinTokenRequest { ttl_seconds: 600 }).await.map(|r| r.into_inner().token)
    })
    .unwrap()
}

/// How long phase 0 soaks: long enough for TCP's backed-off retransmissions to outlast
/// `fence_after` many times over (9–24 fences in 30 s before the datagram path).
const SOAK: Duration = Duration::from_secs(60);

/// Phase 0: `soak` on the lossy network; every guest keeps running where it ran, the same
/// process throughout, and every host accepted batches over the datagram path during it
/// (at least one a second: heartbeats go every 100 ms), so a silent fallback to TCP
/// fails the test.
fn lossy_network(c: &BedCluster, placed: BTreeMap<String, usize>) -> BTreeMap<String, usize> {
    let started = std::time::Instant::now();
    let before: Vec<_> = ALL.into_iter().map(|h| c.units(h).unwrap()).collect();
    let report = soak(c, Impairment::LOSSY, SOAK).unwrap();
    eprintln!("lossy network: {}", report.describe());
    assert!(
        report.healthy(),
        "a healthy cluster fenced, restarted or moved a guest: {}\n{}",
        report.describe(),
        diagnose(c)
    );
    for (host, batches) in ALL.into_iter().zip(&report.datagram_batches) {
        assert!(
            *batches >= SOAK.as_secs(),
            "{} accepted {batches} batches over the datagram path in {SOAK:?}: {}",
            c.name(host),
            report.describe()
        );
    }
    assert_eq!(c.wait_settled(&VMS, &ALL).unwrap(), placed, "nothing moved on the lossy network");
    for (host, before) in ALL.into_iter().zip(before) {
        let after = c.units(host).unwrap();
        for (old, new) in before.iter().zip(&after) {
            assert_eq!(
                (new.is_active(), new.main_pid, new.active_enter_us),
                (old.is_active(), old.main_pid, old.active_enter_us),
                "{} on {}: the lossy network stopped or restarted it",
                old.vm,
                c.name(host)
            );
        }
    }
    eprintln!("lossy network phase: {:.1} s", started.elapsed().as_secs_f64());
    placed
}

#[test]
fn guests_stop_without_a_live_agent_and_run_once_elsewhere() {
    let Some(cluster) = BedCluster::start_or_skip(3, &VMS) else { return };
    let started = std::time::Instant::now();
    let c = &cluster;
    let leader = c.wait_formed(&ALL).unwrap();
    for host in ALL {
        c.wait_reconciled(host).unwrap();
        c.wait_guard(host).unwrap();
    }
    // The agent set the guard up itself: a transient unit and the guests' drop-in.
    // (/run is the host's own tmpfs: read it from inside.)
    let dropin = c.bed().host(0).run(&["cat", "/run/systemd/system/microvm@.service.d/50-blixard-guard.conf"]).unwrap();
    assert!(dropin.contains("ExecStartPre=systemctl is-active --quiet blixard-guard.service"), "{dropin}");
    // Ahead of the guests on a contended CPU.
    let weight =
        c.bed().host(0).run(&["systemctl", "show", "--property=CPUWeight", "--value", "blixard-guard.service"]);
    assert_eq!(weight.unwrap().trim(), "1000");
    wait_for("every host to report its capacity", Duration::from_secs(60), || {
        let mut client = c.client(leader);
        let nodes = match c.block_on(client.node_list(pb::NodeListRequest {})) {
            Ok(nodes) => nodes.into_inner().nodes,
            Err(e) => return Ok(Probe::NotYet(e.message().to_string())),
        };
        Ok(if nodes.len() == ALL.len() && nodes.iter().all(|n| n.vcpu_total > 0) {
            Probe::Ready(())
        } else {
            Probe::NotYet(format!("{nodes:?}"))
        })
    })
    .unwrap();
    for vm in VMS {
        c.create_vm(others(leader)[0], vm).unwrap();
    }
    let mut placed = c.wait_settled(&VMS, &ALL).unwrap();
    let mut measured = Vec::new();

    // 0. A healthy cluster on a bad network (issue 21): 10% of the packets between hosts
    //    lost, the rest delayed by up to 100 ms. No host fences, no guest stops or
    //    moves, and the datagram path carries the heartbeats and confirmations.
    placed = lossy_network(c, placed);

    // 1. The agent frozen (SIGSTOP). Its unit's watchdog (10 s) ends a freeze with
    //    SIGABRT and a restart, but only after the VMs have moved.
    let freeze = |h: usize| c.signal(h, AGENT_UNIT, "SIGSTOP").unwrap();
    let thaw = |h: usize| c.signal(h, AGENT_UNIT, "SIGCONT").unwrap();
    placed = agent_fault(c, placed, "agent frozen", freeze, thaw, &mut measured);

    // 2. The agent stopped (`systemctl stop`, maintenance): the fence stops its guests.
    placed = agent_fault(
        c,
        placed,
        "agent stopped",
        |h| drop(c.bed().host(h).run(&["systemctl", "stop", AGENT_UNIT]).unwrap()),
        |h| drop(c.bed().host(h).run(&["systemctl", "start", AGENT_UNIT]).unwrap()),
        &mut measured,
    );

    // 3. The agent crash-looping: a config it refuses, then SIGKILL; systemd restarts it
    //    again and again.
    placed = agent_fault(
        c,
        placed,
        "agent crash-looping",
        |h| {
            c.write_config(h, "this is = not a config the agent accepts\n").unwrap();
            c.signal(h, AGENT_UNIT, "SIGKILL").unwrap();
        },
        |h| {
            c.restore_config(h).unwrap();
            drop(c.bed().host(h).run(&["systemctl", "restart", AGENT_UNIT]));
        },
        &mut measured,
    );

    // 4. The agent killed and not restarted.
    placed = agent_fault(
        c,
        placed,
        "agent SIGKILLed, no restart",
        |h| {
            c.agent_dropin(h, Some("[Service]\nRestart=no\n")).unwrap();
            c.signal(h, AGENT_UNIT, "SIGKILL").unwrap();
        },
        |h| {
            c.agent_dropin(h, None).unwrap();
            drop(c.bed().host(h).run(&["systemctl", "start", AGENT_UNIT]).unwrap());
        },
        &mut measured,
    );

    // 5. The agent frozen and then its guard frozen too: systemd's watchdog kills the
    //    guard at the fence deadline and the guard's stop-post fences.
    let guard_before = std::cell::Cell::new(0);
    placed = agent_fault(
        c,
        placed,
        "agent and guard frozen",
        |h| {
            guard_before.set(c.main_pid(h, GUARD_UNIT).unwrap());
            freeze(h);
            c.signal(h, GUARD_UNIT, "SIGSTOP").unwrap();
        },
        |h| {
            let guard_now = c.wait_guard(h).unwrap();
            assert_ne!(guard_now, guard_before.get(), "the frozen guard was killed and started again");
            thaw(h);
        },
        &mut measured,
    );

    // 6. The agent frozen and its guard killed while the contact is still fresh: the
    //    guard's stop-post finds nothing to fence, systemd starts a new guard, and that
    //    one fences at the deadline.
    placed = agent_fault(
        c,
        placed,
        "agent frozen, guard killed",
        |h| {
            freeze(h);
            c.signal(h, GUARD_UNIT, "SIGKILL").unwrap();
        },
        thaw,
        &mut measured,
    );

    // 7. Only the guard killed, the agent working: the guard comes back, nothing moves.
    let host = busiest(&placed).0;
    placed = load(c, placed, host, 2);
    let before = c.units(host).unwrap();
    let guard_pid = c.main_pid(host, GUARD_UNIT).unwrap();
    c.signal(host, GUARD_UNIT, "SIGKILL").unwrap();
    wait_for("the guard to be started again", Duration::from_secs(30), || {
        let pid = c.main_pid(host, GUARD_UNIT)?;
        Ok(if pid != 0 && pid != guard_pid { Probe::Ready(()) } else { Probe::NotYet(format!("pid {pid}")) })
    })
    .unwrap();
    c.wait_reconciled(host).unwrap();
    let after = c.units(host).unwrap();
    for (old, new) in before.iter().zip(&after).filter(|(old, _)| old.is_active()) {
        assert_eq!((new.main_pid, new.active_enter_us), (old.main_pid, old.active_enter_us), "{} restarted", old.vm);
    }
    assert_eq!(c.wait_settled(&VMS, &ALL).unwrap(), placed, "nothing moved when only the guard was killed");

    // 8. A `nixos-rebuild switch`-style restart: stop, a new binary, start, within
    //    fence_after. Guests keep running (same processes), nothing moves, the guard stays.
    let host = busiest(&placed).0;
    let before = c.units(host).unwrap();
    let guard_pid = c.main_pid(host, GUARD_UNIT).unwrap();
    let h = c.bed().host(host);
    // As a switch does: the new binary is in place (the new system is built) before
    // the unit restarts; here it is renamed over the old one in between.
    let binary = std::fs::read(agent_binary().unwrap()).unwrap();
    h.write_file("/usr/local/bin/blixard-agent.next", binary, 0o755).unwrap();
    let restart_at = monotonic_us();
    h.run(&["systemctl", "stop", AGENT_UNIT]).unwrap();
    h.run(&["mv", "/usr/local/bin/blixard-agent.next", "/usr/local/bin/blixard-agent"]).unwrap();
    h.run(&["systemctl", "start", AGENT_UNIT]).unwrap();
    eprintln!("restart with a new binary took {:.2} s", secs(monotonic_us() - restart_at));
    c.wait_formed(&ALL).unwrap();
    c.wait_reconciled(host).unwrap();
    let after = c.units(host).unwrap();
    for (old, new) in before.iter().zip(&after).filter(|(old, _)| old.is_active()) {
        assert_eq!((new.main_pid, new.active_enter_us), (old.main_pid, old.active_enter_us), "{} restarted", old.vm);
    }
    assert_eq!(c.main_pid(host, GUARD_UNIT).unwrap(), guard_pid, "the guard outlived the agent restart");
    assert_eq!(c.wait_settled(&VMS, &ALL).unwrap(), placed, "nothing moved across a quick restart");

    // 9. `cluster leave` of a busy host: it is drained first (each VM runs elsewhere
    //    before it goes), the removed agent says how to come back, and it can.
    let (host, vms) = busiest(&placed);
    let name = c.name(host).to_string();
    let api = others(host)[0];
    let mut client = c.client(api);
    let refused = c
        .block_on(client.cluster_leave(pb::ClusterLeaveRequest { node: name.clone(), force: false }))
        .expect_err("a busy member may not simply leave");
    assert!(refused.message().contains("drain it first"), "{}", refused.message());
    // The drain waits for every VM to stop here and run elsewhere; on a loaded
    // machine that can take a while. The CLI gives up first (exit 1, saying what
    // still drains), and then the cluster's view and the agents' journals say why.
    let drain_started = std::time::Instant::now();
    let out = c
        .cli_within(api, &["cluster", "leave", &name, "--wait-timeout", "90"], Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("cluster leave {name}: {e:#}\n{}", diagnose(c)));
    assert!(out.contains("left the cluster"), "{out}");
    eprintln!("cluster leave: the drain and removal took {:.2} s", drain_started.elapsed().as_secs_f64());
    placed = c.wait_settled_where(&VMS, &others(host), |_, h| h != host).unwrap();
    eprintln!("cluster leave drained {name} ({} VMs) and removed it", vms.len());
    let journal = c.bed().host(host).journal(AGENT_UNIT).unwrap();
    assert!(journal.contains("cluster join ADDRESS"), "the removed agent says how to come back:\n{journal}");
    // The drain stopped each guest cleanly: its hypervisor exited on its shutdown
    // request, and the agent never had to kill one for outliving the stop timeout.
    assert!(!journal.contains("did not stop within"), "a drained guest was killed:\n{journal}");
    let token = join_token(c, api);
    c.bed().host(host).write_file("/etc/blixard/join-token", &token, 0o600).unwrap();
    let seed = format!("{}:{}", c.bed().host(api).addr(), blixard_systests::bedcluster::PORT);
    let out = c.cli(host, &["cluster", "join", &seed, "--token-file", "/etc/blixard/join-token"]).unwrap();
    assert!(out.contains("joined"), "{out}");
    c.wait_formed(&ALL).unwrap();
    c.wait_reconciled(host).unwrap();
    assert_eq!(c.wait_settled(&VMS, &ALL).unwrap(), placed, "rejoining moved nothing");

    // 10. `cluster leave --force` of a host that runs guests: the removed agent stops
    //     them at once, and they run on exactly one other host.
    load(c, placed, host, 2);
    let at = monotonic_us();
    let out = c.cli(api, &["cluster", "leave", &name, "--force"]).unwrap();
    assert!(out.contains("left the cluster"), "{out}");
    let stopped = c.wait_no_guests(host).unwrap();
    let moved = c.wait_settled_where(&VMS, &others(host), |_, h| h != host).unwrap();
    eprintln!(
        "cluster leave --force {name}: its guests stopped {:.2} s after, ran elsewhere within {:.2} s",
        secs(stopped - at),
        secs(monotonic_us() - at)
    );
    assert_eq!(moved.len(), VMS.len());

    // Over the whole run: never two copies of a guest at once.
    let observed = c.assert_never_two_copies().unwrap();
    let (rate, longest_gap) = observed.cgroups.rate();
    assert!(rate >= REQUIRED_RATE, "the cgroup sampler took {rate:.1} samples a second per host");
    eprintln!("cgroup sampler: {rate:.1}/s per host, longest gap {longest_gap:?}");
    eprintln!("scenario                       host  vms  guests stopped  VMs running elsewhere");
    for m in &measured {
        eprintln!("{:<30} {:<5} {:>3}  {:>12.2} s  {:>19.2} s", m.scenario, m.host, m.vms, m.stopped_s, m.moved_s);
    }
    eprintln!("total {:.1} s", started.elapsed().as_secs_f64());
}
