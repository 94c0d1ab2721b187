//! 100 agents on one machine (issue 21): 100 real `blixard-agent run`
//! processes on loopback (process runtime, mutual TLS from one cluster
//! secret) form one cluster, 3 from `initial_members` and 97 joining through
//! `join` seeds all at once; 10,000 VMs are created through the API by
//! concurrent clients, placed, and run as real guest processes (a
//! `sleep`, 10,000 of them, about 110 KiB of memory each); then a voter is
//! SIGKILLed and a non-voter cut off (SIGSTOP: alive, holding its guests,
//! silent), and each time its guests stop by the fence, its VMs run
//! elsewhere, and no VM ever has two copies.
//!
//! "Running" is checked outside the agents, in `/proc`
//! ([`blixard_systests::cluster::GuestScanner`]): a guest is a live process
//! whose working directory is its guest directory on some host, so a copy
//! that outlived its agent counts. A thread scans throughout the faults
//! (each pass reads every process of the machine, a few per second) and
//! fails the test if any pass finds a VM on two hosts.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use blixard::api::pb;
use blixard_systests::cluster::{Cluster, GuestScanner, Options};
use blixard_systests::{Probe, wait_for};
use tonic::Code;

const AGENTS: usize = 100;
/// Agents in `initial_members`; the others join.
const INITIAL: usize = 3;
const VMS: usize = 10_000;
/// Hosts with each VM's runner: VM i's on hosts i, i + 1, i + 2 (mod 100).
const RUNNER_HOSTS: usize = 3;
/// Concurrent clients creating the VMs, spread over the agents.
const CLIENTS: usize = 32;
/// Forming 100 agents on a loaded 2-core machine.
const FORM_TIMEOUT: Duration = Duration::from_secs(180);
/// 10,000 creates, placements and guest starts.
const PLACE_TIMEOUT: Duration = Duration::from_secs(300);
/// A lost host's guests stopped and its VMs running elsewhere (the
/// defaults aim at 5 s; generous for a loaded machine).
const FAILOVER_TIMEOUT: Duration = Duration::from_secs(60);

/// `raft.tick_ms` of the 100 agents (see the test).
const SCALE_TICK_MS: u64 = 100;

/// Pause between two scans for copies on two hosts. A handover takes
/// `reschedule_after - fence_after` (over a second by default): an overlap
/// that long cannot fall between two scans.
const SCAN_PERIOD: Duration = Duration::from_millis(100);

fn vm_name(i: usize) -> String {
    format!("vm-{i:05}")
}

/// The VMs whose runner agent `host` has.
fn runners_of(host: usize) -> Vec<String> {
    (0..VMS).filter(|i| (0..RUNNER_HOSTS).any(|k| (i + k) % AGENTS == host)).map(vm_name).collect()
}

/// Creates every VM from [`CLIENTS`] concurrent clients; an answer that
/// leaves the outcome open (timed out, leader changed) or says it was not
/// applied (dropped by a leader change: `Aborted`) is retried, and
/// "already exists" after a retry means the first attempt went through.
fn create_all(cluster: &Cluster) -> Result<()> {
    let clients: Vec<_> = (0..CLIENTS).map(|c| cluster.client(c * AGENTS / CLIENTS)).collect();
    cluster.block_on(async move {
        let tasks: Vec<_> = clients
            .into_iter()
            .enumerate()
            .map(|(c, mut client)| {
                tokio::spawn(async move {
                    for i in (c..VMS).step_by(CLIENTS) {
                        let request =
                            pb::VmCreateRequest { name: vm_name(i), vcpu: 1, memory_mib: 16, ..Default::default() };
                        let mut retried = false;
                        let deadline = tokio::time::Instant::now() + PLACE_TIMEOUT;
                        loop {
                            match client.vm_create(request.clone()).await {
                                Ok(_) => break,
                                Err(e) if retried && e.code() == Code::AlreadyExists => break,
                                Err(e)
                                    if matches!(
                                        e.code(),
                                        // Cancelled: the channel's own timeout
                                        // expired (tonic's TimeoutExpired);
                                        // Unknown: the connection broke under
                                        // the call (a broken pipe). Both leave
                                        // the outcome open, as DeadlineExceeded.
                                        Code::Unavailable
                                            | Code::DeadlineExceeded
                                            | Code::Aborted
                                            | Code::Cancelled
                                            | Code::Unknown
                                    ) && tokio::time::Instant::now() < deadline =>
                                {
                                    retried = true;
                                    tokio::time::sleep(Duration::from_millis(100)).await;
                                }
                                Err(e) => bail!("creating {}: {e}", request.name),
                            }
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        for task in tasks {
            task.await.context("a create task")??;
        }
        Ok(())
    })
}

/// Every VM with its node and state, paged through `VmList` at agent `at`.
fn vm_list(cluster: &Cluster, at: usize) -> Result<Vec<pb::VmInfo>, tonic::Status> {
    let mut client = cluster.client(at);
    cluster.block_on(async move {
        let mut vms = Vec::new();
        let mut page_token = String::new();
        loop {
            let page =
                client.vm_list(pb::VmListRequest { page_token, page_size: 10_000, ..Default::default() }).await?;
            let page = page.into_inner();
            vms.extend(page.vms);
            if page.next_page_token.is_empty() {
                return Ok(vms);
            }
            page_token = page.next_page_token;
        }
    })
}

/// Waits until every VM runs as exactly one guest process on a host in
/// `hosts`, and agent `at` shows each one running on that host; returns
/// where each runs.
fn wait_running(
    cluster: &Cluster,
    at: usize,
    hosts: &BTreeSet<usize>,
    timeout: Duration,
) -> Result<BTreeMap<String, usize>> {
    wait_for(&format!("{VMS} VMs running once each on {} hosts", hosts.len()), timeout, || {
        let guests = cluster.running_guests()?;
        let once: BTreeMap<String, usize> = guests
            .iter()
            .filter_map(|(vm, on)| match on.as_slice() {
                [h] if hosts.contains(h) => Some((vm.clone(), *h)),
                _ => None,
            })
            .collect();
        if once.len() < VMS {
            return Ok(Probe::NotYet(format!(
                "{} of {VMS} run once on those hosts ({} VMs run)",
                once.len(),
                guests.len()
            )));
        }
        let vms = match vm_list(cluster, at) {
            Ok(vms) => vms,
            Err(e) => return Ok(Probe::NotYet(e.message().to_string())),
        };
        let agrees = |vm: &pb::VmInfo| {
            vm.state == "running" && once.get(&vm.name).is_some_and(|&h| cluster.agent(h).name == vm.node)
        };
        let agreeing = vms.iter().filter(|vm| agrees(vm)).count();
        Ok(if vms.len() == VMS && agreeing == VMS {
            Probe::Ready(once)
        } else {
            Probe::NotYet(format!("{agreeing} of {} VMs listed running where they run", vms.len()))
        })
    })
}

/// Scans `/proc` until told to stop; the VMs it ever saw on two hosts.
fn watch_copies(scanner: GuestScanner, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Result<(usize, Vec<String>)>> {
    std::thread::spawn(move || {
        let mut twice = BTreeSet::new();
        let mut passes = 0;
        while !stop.load(Ordering::Relaxed) {
            for (vm, on) in scanner.scan()? {
                if on.len() > 1 {
                    twice.insert(format!("{vm} on {on:?}"));
                }
            }
            passes += 1;
            // A sampling period, not a wait: a pass reads every process of
            // the machine, and the agents need the cores.
            std::thread::sleep(SCAN_PERIOD);
        }
        Ok((passes, twice.into_iter().collect()))
    })
}

/// Role of agent `index` as the leader `at` reports it.
fn role_of(cluster: &Cluster, at: usize, index: usize) -> Result<String> {
    let status = cluster.status(at)?;
    let name = &cluster.agent(index).name;
    let member = status.members.iter().find(|m| &m.name == name).with_context(|| format!("{name} not a member"))?;
    Ok(member.role.clone())
}

/// Loses `victim` (`cut`: SIGSTOP, else SIGKILL); waits for its guests to
/// stop and its VMs to run once each elsewhere; returns the seconds to each
/// and where everything runs afterwards.
fn lose(
    cluster: &mut Cluster,
    observer: usize,
    victim: usize,
    cut: bool,
    alive: &mut BTreeSet<usize>,
) -> Result<(f64, f64, BTreeMap<String, usize>)> {
    let before = cluster.running_guests()?;
    let its: BTreeSet<String> =
        before.iter().filter(|(_, on)| on.contains(&victim)).map(|(vm, _)| vm.clone()).collect();
    assert!(!its.is_empty(), "{} runs no VM", cluster.agent(victim).name);
    let started = Instant::now();
    if cut {
        let pid = cluster.agent(victim).pid().context("the victim runs")?;
        // SAFETY: kill(2) on our own, not yet reaped, child.
        unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
    } else {
        cluster.agent_mut(victim).kill();
    }
    alive.remove(&victim);
    wait_for(&format!("the {} guests of {} to stop", its.len(), cluster.agent(victim).name), FAILOVER_TIMEOUT, || {
        let left = cluster.running_guests()?.values().filter(|on| on.contains(&victim)).count();
        Ok(if left == 0 { Probe::Ready(()) } else { Probe::NotYet(format!("{left} still run")) })
    })?;
    let stopped = started.elapsed().as_secs_f64();
    let placed = wait_running(cluster, observer, alive, FAILOVER_TIMEOUT + PLACE_TIMEOUT)?;
    let moved = started.elapsed().as_secs_f64();
    for vm in &its {
        assert_ne!(placed.get(vm), Some(&victim), "{vm} still on the lost host");
    }
    // Nothing else moved: placement is stable.
    for (vm, on) in &before {
        if !its.contains(vm) {
            assert_eq!(placed.get(vm), on.first(), "{vm} moved though its host was not lost");
        }
    }
    eprintln!(
        "{} ({}) {}: its {} guests stopped after {stopped:.2} s; all ran elsewhere after {moved:.2} s",
        cluster.agent(victim).name,
        if cut { "cut off" } else { "killed" },
        if cut { "SIGSTOP" } else { "SIGKILL" },
        its.len()
    );
    Ok((stopped, moved, placed))
}

#[test]
#[ignore = "minutes on a 2-core machine (10,000 VMs created at about 60/s through 100 agents) and it needs the whole machine (BENCHMARKS.md, issue 21c); run with --run-ignored under the heavy-run lock"]
fn a_hundred_agents_run_ten_thousand_vms_and_survive_losing_a_voter_and_a_non_voter() -> Result<()> {
    let started = Instant::now();
    // Raft ticks of 100 ms, not 25 (with the failure timing scaled, see
    // `Options::with_tick_ms`): 100 agents share this machine's 2 cores, and
    // a voter's raft thread measured 1.4 s late at p99 while the VMs were
    // placed (BENCHMARKS.md, issue 21c), beyond the 300..600 ms election
    // timeout of 25 ms ticks; a real host has its own cores.
    let options = Options { vcpu: 1024, ..Options::default() }.with_tick_ms(SCALE_TICK_MS);
    let mut cluster = Cluster::configure_joined("scale", AGENTS, INITIAL, options)?;
    for host in 0..AGENTS {
        cluster.install_shared_runners(host, &runners_of(host))?;
    }
    cluster.start_all()?;
    let all: Vec<usize> = (0..AGENTS).collect();
    let leader = cluster.wait_members(&all, FORM_TIMEOUT)?;
    let formed = started.elapsed().as_secs_f64();
    cluster.wait_reported(leader, &all)?;
    eprintln!("{AGENTS} agents formed after {formed:.1} s (leader {})", cluster.agent(leader).name);

    let placing = Instant::now();
    create_all(&cluster)?;
    let created = placing.elapsed().as_secs_f64();
    let mut alive: BTreeSet<usize> = all.iter().copied().collect();
    let placed = wait_running(&cluster, leader, &alive, PLACE_TIMEOUT)?;
    let per_host: Vec<usize> = all.iter().map(|h| placed.values().filter(|p| *p == h).count()).collect();
    eprintln!(
        "{VMS} VMs created in {created:.1} s, all running after {:.1} s; {}..{} per host",
        placing.elapsed().as_secs_f64(),
        per_host.iter().min().unwrap_or(&0),
        per_host.iter().max().unwrap_or(&0)
    );
    assert!(per_host.iter().all(|&n| n > 0), "spread placement leaves no host empty: {per_host:?}");

    let stop = Arc::new(AtomicBool::new(false));
    let watcher = watch_copies(cluster.guest_scanner()?, stop.clone());

    // A voter that is not the leader, and a member that does not vote (a
    // learner: `raft.voters` keeps 5 voters, the other 95 hosts learn).
    let status = cluster.status(leader)?;
    let with_role = |role: &str| -> Vec<usize> {
        status.members.iter().filter(|m| m.role == role).filter_map(|m| cluster.index_of(&m.name)).collect()
    };
    let voters = with_role("follower");
    let learners = with_role("learner");
    eprintln!("{} voters besides the leader, {} learners", voters.len(), learners.len());
    let voter = *voters.first().context("a voter besides the leader")?;
    assert_eq!((voters.len(), learners.len()), (4, AGENTS - 5), "5 voters (the default raft.voters) and learners");
    let non_voter = learners[0];
    let observer = leader;

    let (voter_stopped, voter_moved, _) = lose(&mut cluster, observer, voter, false, &mut alive)?;
    let non_voter_role = role_of(&cluster, observer, non_voter)?;
    let (cut_stopped, cut_moved, _) = lose(&mut cluster, observer, non_voter, true, &mut alive)?;

    stop.store(true, Ordering::Relaxed);
    let (passes, twice) = watcher.join().expect("the watcher")?;
    assert!(twice.is_empty(), "VMs ran on two hosts at once: {twice:?}");
    eprintln!(
        "no VM on two hosts in {passes} scans of /proc; voter: stopped {voter_stopped:.2} s, moved {voter_moved:.2} s; \
         {non_voter_role}: stopped {cut_stopped:.2} s, moved {cut_moved:.2} s; test took {:.0} s",
        started.elapsed().as_secs_f64()
    );
    if passes < 2 {
        bail!("the watcher scanned only {passes} times");
    }
    Ok(())
}
