//! Failover benchmark (issue 4): how long from a host losing power until its VM runs on
//! a survivor, in the container test bed (three hosts, real systemd, the agent's systemd
//! runtime, default failure timing).
//!
//!     cargo build --release --bin blixard-agent --bin failover-bench
//!     sudo target/release/failover-bench [--trials N] [--fault power|partition|freeze]   # 12, power
//!     sudo target/release/failover-bench --soak SECS    # no trials: a healthy cluster on a bad network
//!
//! `--fault partition` takes the host's link down instead (it stays up, fences itself,
//! and rejoins when the link is back).
//!
//! `--soak SECS` runs no trials: the three hosts, with a guest each, lose 10% of the
//! packets between them and see the rest delayed by up to 100 ms for SECS seconds
//! (`Testbed::impair`, netem's `loss 10% delay 50ms 50ms` by other means), and it counts
//! what a healthy cluster must not do: fences, guest restarts, hosts marked down, VMs
//! moved (and elections, which it may do). It fails if any of the former happened, or if
//! a guest ever ran twice.
//!
//! `--fault freeze` freezes the host's agent (SIGSTOP) instead of cutting its power: the
//! host stays up and only its fence guard can stop the guest. It also measures `guest
//! stopped`: from the freeze until the frozen host's `microvm@bench.service` is inactive
//! (systemd's InactiveEnterTimestamp), which the guard must keep within `fence_after` +
//! the stop bound of the host's last quorum contact.
//!
//! (It uses the `blixard-agent` next to itself, or `$BLIXARD_AGENT_BIN`.) Each trial
//! places the VM `bench` on a host (by `vm migrate` when needed), cuts that host's power
//! (the whole container dies at once) and measures, from the cut:
//!
//! - `unit active`: until `microvm@bench.service` is active on a survivor, from that
//!   systemd's own ActiveEnterTimestampMonotonic (exact: the hosts share this machine's
//!   clock);
//! - `running`: until a survivor's agent reports the VM `running` on the survivor
//!   (`vm list`, polled every 20 ms).
//!
//! Trials alternate between losing a follower and losing the leader, which adds a Raft
//! election. The lost host boots again and rejoins before the next trial. At the end it
//! checks that the VM never ran on two hosts at once, and prints a Markdown table.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use blixard_systests::bedcluster::{BedCluster, SETTLE_TIMEOUT};
use blixard_systests::timeline::monotonic_us;

const VM: &str = "bench";
const TRIALS_DEFAULT: usize = 12;
/// How often the API is asked whether the VM runs again.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

struct Trial {
    lost: String,
    was_leader: bool,
    unit_active_ms: f64,
    running_ms: f64,
    /// `--fault freeze`: until the frozen host's copy was stopped.
    stopped_ms: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Power,
    Partition,
    Freeze,
}

/// The soak's guests: one per host under the spread strategy.
const SOAK_VMS: [&str; 3] = ["soak-a", "soak-b", "soak-c"];

fn main() -> ExitCode {
    let (trials, fault, soak) = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!(
                "failover-bench: {e}\nusage: failover-bench [--trials N] [--fault power|partition|freeze] | --soak SECS"
            );
            return ExitCode::from(2);
        }
    };
    let result = match soak {
        Some(secs) => run_soak(Duration::from_secs(secs)),
        None => run(trials, fault),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("failover-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn parse_args() -> Result<(usize, Fault, Option<u64>)> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mut trials, mut fault, mut soak) = (TRIALS_DEFAULT, Fault::Power, None);
    let mut rest = args.iter();
    while let Some(flag) = rest.next() {
        let value = rest.next().with_context(|| format!("{flag} takes a value"))?;
        match flag.as_str() {
            "--trials" => match value.parse() {
                Ok(n) if n > 0 => trials = n,
                _ => bail!("--trials takes a positive number, not {value:?}"),
            },
            "--fault" => match value.as_str() {
                "power" => fault = Fault::Power,
                "partition" => fault = Fault::Partition,
                "freeze" => fault = Fault::Freeze,
                _ => bail!("--fault takes power, partition or freeze, not {value:?}"),
            },
            "--soak" => match value.parse() {
                Ok(n) if n > 0 => soak = Some(n),
                _ => bail!("--soak takes a positive number of seconds, not {value:?}"),
            },
            _ => bail!("unexpected argument {flag:?}"),
        }
    }
    Ok((trials, fault, soak))
}

fn use_sibling_agent() -> Result<()> {
    if std::env::var_os("BLIXARD_AGENT_BIN").is_none() {
        let sibling = std::env::current_exe()?.with_file_name("blixard-agent");
        if !sibling.is_file() {
            bail!("no agent at {}: build it alongside (see --help) or set BLIXARD_AGENT_BIN", sibling.display());
        }
        // SAFETY: still single-threaded; nothing reads the environment concurrently.
        unsafe { std::env::set_var("BLIXARD_AGENT_BIN", &sibling) };
    }
    Ok(())
}

fn run_soak(duration: Duration) -> Result<()> {
    use_sibling_agent()?;
    let load_before = loadavg();
    let started = Instant::now();
    let cluster = BedCluster::start(3, &SOAK_VMS)?;
    let all = [0, 1, 2];
    let leader = cluster.wait_formed(&all)?;
    for host in all {
        cluster.wait_capacity_reported(host)?;
    }
    for vm in SOAK_VMS {
        cluster.create_vm(leader, vm).map_err(|s| anyhow::anyhow!("creating {vm}: {}", s.message()))?;
    }
    let placed = cluster.wait_settled(&SOAK_VMS, &all)?;
    for host in all {
        cluster.wait_reconciled(host)?;
    }
    eprintln!("cluster up in {:.1} s, guests on {placed:?}; soaking for {duration:?}", started.elapsed().as_secs_f64());
    let report = blixard_systests::soak::soak(&cluster, blixard_systests::testbed::Impairment::LOSSY, duration)?;
    println!("soak (10% loss, 0-100 ms delay between hosts): {}", report.describe());
    let after = cluster.wait_settled(&SOAK_VMS, &all)?;
    let observed = cluster.assert_never_two_copies()?;
    println!(
        "guests on {after:?} (before: {placed:?}); never two copies over {} unit samples and {} cgroup rounds; \
         load average {load_before} before, {} after",
        observed.timeline.samples.len(),
        observed.cgroups.rounds.len(),
        loadavg()
    );
    if !report.healthy() || after != placed {
        bail!("a healthy cluster fenced, restarted or moved a guest: {}", report.describe());
    }
    Ok(())
}

fn run(trials: usize, fault: Fault) -> Result<()> {
    use_sibling_agent()?;
    let load_before = loadavg();
    let started = Instant::now();
    let cluster = BedCluster::start(3, &[VM])?;
    let all = [0, 1, 2];
    let leader = cluster.wait_formed(&all)?;
    cluster.create_vm(leader, VM).map_err(|s| anyhow::anyhow!("creating {VM}: {}", s.message()))?;
    cluster.wait_settled(&[VM], &all)?;
    eprintln!("cluster up in {:.1} s", started.elapsed().as_secs_f64());

    let mut results = Vec::new();
    for trial in 0..trials {
        let lose_leader = trial % 2 == 1;
        let result = run_trial(&cluster, lose_leader, fault).with_context(|| format!("trial {}", trial + 1))?;
        eprintln!(
            "trial {:2}: lost {} ({}): {}unit active after {:.0} ms, running after {:.0} ms",
            trial + 1,
            result.lost,
            if result.was_leader { "leader" } else { "follower" },
            result.stopped_ms.map(|ms| format!("guest stopped after {ms:.0} ms, ")).unwrap_or_default(),
            result.unit_active_ms,
            result.running_ms
        );
        results.push(result);
    }
    let observed = cluster.assert_never_two_copies()?;
    let timeline = &observed.timeline;
    let (longest_gap, rate) = timeline.sampling();
    let (cgroup_rate, cgroup_gap) = observed.cgroups.rate();
    let load_after = loadavg();

    println!("fault: {fault:?}\n");
    println!(
        "| host lost | trials | unit active: median | max | `running`: median | max | guest stopped: median | max |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    // (label, which trials: lost the leader or not, or all)
    let rows = [("follower", Some(false)), ("leader", Some(true)), ("any", None)];
    for (label, lost_leader) in rows {
        let chosen: Vec<&Trial> = results.iter().filter(|t| lost_leader.is_none_or(|l| t.was_leader == l)).collect();
        if chosen.is_empty() {
            continue;
        }
        let unit: Vec<f64> = chosen.iter().map(|t| t.unit_active_ms).collect();
        let running: Vec<f64> = chosen.iter().map(|t| t.running_ms).collect();
        let stopped: Vec<f64> = chosen.iter().filter_map(|t| t.stopped_ms).collect();
        let stopped = if stopped.is_empty() {
            "- | -".to_string()
        } else {
            format!("{:.2} s | {:.2} s", median(&stopped) / 1000.0, max(&stopped) / 1000.0)
        };
        println!(
            "| {label} | {} | {:.2} s | {:.2} s | {:.2} s | {:.2} s | {stopped} |",
            chosen.len(),
            median(&unit) / 1000.0,
            max(&unit) / 1000.0,
            median(&running) / 1000.0,
            max(&running) / 1000.0
        );
    }
    println!(
        "\nnever two copies: checked over {} unit samples ({rate:.1}/s per host, longest gap {longest_gap:?}) \
         and {} cgroup rounds ({cgroup_rate:.1}/s per host, longest gap {cgroup_gap:?}); \
         load average {load_before} before, {load_after} after; {:.0} s in all",
        timeline.samples.len(),
        observed.cgroups.rounds.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Puts the VM on the leader (or a follower), cuts that host's power, measures, and
/// boots it again.
fn run_trial(cluster: &BedCluster, lose_leader: bool, fault: Fault) -> Result<Trial> {
    let all = [0, 1, 2];
    let leader = cluster.wait_formed(&all)?;
    let placed = cluster.wait_settled(&[VM], &all)?[VM];
    let target = if lose_leader {
        leader
    } else if placed != leader {
        placed
    } else {
        (leader + 1) % 3
    };
    if placed != target {
        let api = all.into_iter().find(|&h| h != placed).expect("three hosts");
        cluster
            .migrate(api, VM, cluster.name(target))
            .map_err(|s| anyhow::anyhow!("migrating {VM}: {}", s.message()))?;
        cluster.wait_settled_where(&[VM], &all, |_, h| h == target)?;
    }
    for host in all {
        cluster.wait_reconciled(host)?;
    }
    let was_leader = cluster.leader_seen_by(target) == Some(target);
    let survivors: Vec<usize> = all.into_iter().filter(|&h| h != target).collect();

    let cut_us = monotonic_us();
    match fault {
        Fault::Power => cluster.power_off(target)?,
        Fault::Partition => cluster.cut_link(target)?,
        Fault::Freeze => cluster.signal(target, blixard_systests::bedcluster::AGENT_UNIT, "SIGSTOP")?,
    }
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    let mut active_us = None;
    let running_us = loop {
        if Instant::now() > deadline {
            bail!("{VM} did not run on a survivor within {SETTLE_TIMEOUT:?} of losing {}", cluster.name(target));
        }
        if active_us.is_none() {
            for &s in &survivors {
                let unit = cluster.unit(s, VM)?;
                if unit.is_active() && unit.active_enter_us > cut_us {
                    active_us = Some((s, unit.active_enter_us));
                }
            }
        }
        if let Some((host, _)) = active_us {
            let now = monotonic_us();
            let listed = cluster.vm_list(host).unwrap_or_default();
            if listed.iter().any(|i| i.name == VM && i.node == cluster.name(host) && i.state == "running") {
                break now;
            }
        }
        std::thread::sleep(POLL_INTERVAL);
    };
    let (_, active_us) = active_us.expect("set before running is seen");

    let stopped_ms = match fault {
        Fault::Power => {
            cluster.boot(target)?;
            None
        }
        Fault::Partition => {
            cluster.heal_link(target)?;
            None
        }
        Fault::Freeze => {
            let unit = cluster.unit(target, VM)?;
            if unit.is_active() || unit.inactive_enter_us < cut_us {
                bail!("the frozen host's copy of {VM} is not stopped: {unit:?}");
            }
            cluster.signal(target, blixard_systests::bedcluster::AGENT_UNIT, "SIGCONT")?;
            Some((unit.inactive_enter_us - cut_us) as f64 / 1000.0)
        }
    };
    cluster.wait_formed(&all)?;
    cluster.wait_reconciled(target)?;
    Ok(Trial {
        lost: cluster.name(target).to_owned(),
        was_leader,
        unit_active_ms: (active_us - cut_us) as f64 / 1000.0,
        running_ms: (running_us - cut_us) as f64 / 1000.0,
        stopped_ms,
    })
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    if n % 2 == 1 { sorted[n / 2] } else { (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0 }
}

fn max(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::MIN, f64::max)
}

/// The 1-minute load average of this machine.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split(' ').next().map(str::to_owned))
        .unwrap_or_default()
}
