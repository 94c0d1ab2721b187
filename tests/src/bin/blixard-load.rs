//! `blixard-load`: the load client and measurements behind issue 3's
//! benchmarks (results in BENCHMARKS.md; `scripts/bench.sh` runs them all).
//!
//! - `throughput`: 1, 16 and 64 concurrent clients (`--clients`) doing
//!   `VmCreate` against a 3-member cluster of real `blixard-agent run`
//!   processes on loopback, authenticated as in production (mutual TLS from
//!   a cluster secret, each client with its certificate; `--auth insecure`
//!   for plain text), then the same concurrency doing `Put` against a
//!   3-member etcd cluster (Debian's etcd 3.4, over its gRPC KV API), in
//!   one run; prints throughput, p50/p99 latency and the ratio per level.
//! - `idle`: RSS and CPU per member of an idle 3-member cluster (and of an
//!   idle 3-member etcd cluster, for scale), from `/proc/<pid>/status` and
//!   `/proc/<pid>/stat`.
//! - `restart`: fills a cluster with 100,000 VMs (so the restarted member's
//!   snapshot and log hold them), then restarts a follower several times
//!   (SIGTERM and SIGKILL) and times from spawning it to its first
//!   `ClusterStatus` as a member with a leader, and to its first
//!   linearizable read (`VmStatus`) served through it.
//! - `scale`: `--agents` (100) agents on one machine, 3 from
//!   `initial_members` and the others joining through `join` seeds at once
//!   (`blixard_systests::cluster::Cluster::configure_joined`): formation
//!   time, `--vms` VMs placed and running as real guest processes, the
//!   leader's idle CPU and its raft thread's (from
//!   `/proc/<pid>/task/<tid>/stat`, the thread named `raft`) against a
//!   voter's and a learner's, `vm create` p50/p99 at `--clients` (16)
//!   against the big cluster and a 3-member one in the same run, and the
//!   failover of a SIGKILLed non-voter's VMs (until each runs once
//!   elsewhere, seen in `/proc`).
//!
//! Agents are the workspace's `blixard-agent` (`$BLIXARD_AGENT_BIN`
//! overrides it) with the harness config of `blixard_systests::cluster`
//! (default Raft timing, process runtime). No guest runner is installed, so
//! created VMs stay pending: the benchmark measures the replicated record,
//! not guests starting. Data directories are temporary directories under
//! `$TMPDIR` (default /tmp): put that on the disk you mean to measure.

use std::fmt::Write as _;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use blixard::api::context::leader_hint;
use blixard::api::pb;
use blixard::api::pb::blixard_client::BlixardClient;
use blixard_systests::cluster::{Auth, Cluster, Options};
use blixard_systests::etcd::{self, EtcdCluster};
use blixard_systests::{Probe, wait_for};
use clap::{Parser, Subcommand, ValueEnum};
use tonic::transport::Channel;

#[derive(Parser)]
#[command(about = "Load client and measurements for Blixard's benchmarks (see BENCHMARKS.md)")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// `vm create` against 3 agents and `put` against 3 etcd members, same concurrency.
    Throughput {
        /// Concurrent clients; a list runs each level in turn on the same clusters.
        #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
        clients: Vec<usize>,
        /// How the agents authenticate: mutual TLS from one cluster secret (clients
        /// with certificates), or plain text (`insecure`) to compare with.
        #[arg(long, value_enum, default_value_t = AuthArg::Secret)]
        auth: AuthArg,
        /// Measured seconds per system.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Unmeasured seconds of the same load first.
        #[arg(long, default_value_t = 2.0)]
        warmup_seconds: f64,
        /// Which members the clients talk to.
        #[arg(long, value_enum, default_value_t = Target::All)]
        target: Target,
        #[arg(long)]
        skip_etcd: bool,
    },
    /// RSS and CPU of each member of an idle 3-member cluster.
    Idle {
        /// Seconds of sampling.
        #[arg(long, default_value_t = 30.0)]
        seconds: f64,
        /// Seconds to wait after the cluster formed, before sampling.
        #[arg(long, default_value_t = 5.0)]
        settle_seconds: f64,
        #[arg(long)]
        skip_etcd: bool,
    },
    /// Restart time of a member whose log and snapshot hold `--vms` VMs.
    Restart {
        #[arg(long, default_value_t = 100_000)]
        vms: usize,
        /// Restarts per signal (SIGTERM, then SIGKILL).
        #[arg(long, default_value_t = 3)]
        trials: usize,
        /// Concurrent clients filling the cluster.
        #[arg(long, default_value_t = 64)]
        clients: usize,
        /// Seconds of idle sampling of the full cluster afterwards.
        #[arg(long, default_value_t = 10.0)]
        idle_seconds: f64,
    },
    /// Many agents on one machine: formation, idle CPU, commit latency
    /// against a 3-member cluster, a non-voter's failover.
    Scale {
        #[arg(long, default_value_t = 100)]
        agents: usize,
        /// VMs placed and running (real guest processes) before measuring.
        #[arg(long, default_value_t = 1000)]
        vms: usize,
        /// Concurrent `vm create` clients for the commit latency.
        #[arg(long, default_value_t = 16)]
        clients: usize,
        /// Measured seconds of `vm create` per cluster.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Seconds of idle sampling.
        #[arg(long, default_value_t = 20.0)]
        idle_seconds: f64,
        /// `raft.tick_ms` of the many agents (the failure timing scaled
        /// with it, see `Options::with_tick_ms`); the 3-member cluster
        /// compared against keeps the default.
        #[arg(long, default_value_t = 25)]
        tick_ms: u64,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum AuthArg {
    Secret,
    Insecure,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Target {
    /// Client i talks to member i mod 3 (followers forward to the leader).
    All,
    /// Every client talks to the leader.
    Leader,
    /// Client i starts at member i mod 3 and sends its next requests to
    /// the leader a reply names (`x-blixard-leader`, on a write answered
    /// by a follower). etcd's answers name no leader: its clients talk to
    /// the leader (`leader`).
    Follow,
}

/// One request of the load; its outcome.
type Outcome = Result<(), tonic::Status>;

/// Completed requests of one measured run.
struct Stats {
    ok: usize,
    errors: usize,
    first_error: Option<String>,
    elapsed: Duration,
    /// Latencies of the successful requests, sorted.
    latencies: Vec<Duration>,
}

impl Stats {
    fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile_ms(&self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        let rank = ((p / 100.0) * (self.latencies.len() - 1) as f64).round() as usize;
        self.latencies[rank.min(self.latencies.len() - 1)].as_secs_f64() * 1e3
    }
}

/// What one client loop saw.
#[derive(Default)]
struct Tally {
    latencies: Vec<Duration>,
    errors: usize,
    first_error: Option<String>,
}

impl Tally {
    /// Records one operation sent at `sent` that ended with `outcome`.
    fn record(&mut self, sent: Instant, outcome: Outcome) {
        match outcome {
            Ok(()) => self.latencies.push(sent.elapsed()),
            Err(status) => {
                self.errors += 1;
                self.first_error.get_or_insert_with(|| format!("{:?}: {}", status.code(), status.message()));
            }
        }
    }
}

/// Waits for every client loop and adds up what they saw.
async fn gather(started: Instant, tasks: Vec<tokio::task::JoinHandle<Tally>>) -> Stats {
    let mut stats = Stats { ok: 0, errors: 0, first_error: None, elapsed: Duration::ZERO, latencies: Vec::new() };
    for task in tasks {
        let tally = task.await.expect("a load task");
        stats.ok += tally.latencies.len();
        stats.latencies.extend(tally.latencies);
        stats.errors += tally.errors;
        if stats.first_error.is_none() {
            stats.first_error = tally.first_error;
        }
    }
    stats.elapsed = started.elapsed();
    stats.latencies.sort_unstable();
    stats
}

/// Runs `clients` loops for `duration`; loop `c` calls `op(c, seq)` with
/// `seq` = 0, 1, 2, ... and waits for each before the next.
async fn drive<F, Fut>(clients: usize, duration: Duration, op: F) -> Stats
where
    F: Fn(usize, u64) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Outcome> + Send,
{
    let started = Instant::now();
    let deadline = started + duration;
    let tasks = (0..clients)
        .map(|c| {
            let op = op.clone();
            tokio::spawn(async move {
                let mut tally = Tally::default();
                let mut seq = 0u64;
                while Instant::now() < deadline {
                    let sent = Instant::now();
                    tally.record(sent, op(c, seq).await);
                    seq += 1;
                }
                tally
            })
        })
        .collect();
    gather(started, tasks).await
}

/// Drives `count` operations in total from `clients` loops, as fast as they
/// complete (client `c` does operations c, c + clients, ...).
async fn drive_count<F, Fut>(clients: usize, count: usize, op: F) -> Stats
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Outcome> + Send,
{
    let started = Instant::now();
    let tasks = (0..clients)
        .map(|c| {
            let op = op.clone();
            tokio::spawn(async move {
                let mut tally = Tally::default();
                for i in (c..count).step_by(clients) {
                    let sent = Instant::now();
                    tally.record(sent, op(i).await);
                }
                tally
            })
        })
        .collect();
    gather(started, tasks).await
}

/// A channel to agent `address` of `cluster`, with its client certificate
/// unless it runs insecure.
fn channel_to(cluster: &Cluster, address: &str) -> Channel {
    blixard_systests::cluster::channel(address, cluster.credentials(), Duration::from_secs(30))
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

/// A formed 3-member agent cluster with the harness's default options
/// (mutual TLS from a cluster secret, unless `auth` says otherwise).
fn agents(test: &str, auth: Auth) -> Result<(Cluster, usize)> {
    let cluster = Cluster::start(test, 3, Options { auth, ..Options::default() })?;
    let leader = cluster.wait_formed(&[0, 1, 2])?;
    Ok((cluster, leader))
}

/// Member index each client talks to.
fn targets(clients: usize, target: Target, members: usize, leader: usize) -> Vec<usize> {
    (0..clients).map(|c| if target == Target::Leader { leader } else { c % members }).collect()
}

fn create_request(name: String) -> pb::VmCreateRequest {
    // The smallest VM the state accepts: capacity is never what limits the run.
    pb::VmCreateRequest { name, vcpu: 1, memory_mib: 16, ..Default::default() }
}

fn print_header() {
    println!(
        "{:<26} {:>7} {:>10} {:>9} {:>9} {:>9} {:>7}",
        "system", "clients", "requests/s", "p50 ms", "p99 ms", "max ms", "errors"
    );
}

fn print_row(system: &str, clients: usize, stats: &Stats) {
    println!(
        "{:<26} {:>7} {:>10.0} {:>9.2} {:>9.2} {:>9.2} {:>7}",
        system,
        clients,
        stats.rate(),
        stats.percentile_ms(50.0),
        stats.percentile_ms(99.0),
        stats.percentile_ms(100.0),
        stats.errors
    );
    if let Some(error) = &stats.first_error {
        println!("  first error: {error}");
    }
}

fn throughput(
    levels: &[usize],
    auth: AuthArg,
    seconds: f64,
    warmup_seconds: f64,
    target: Target,
    skip_etcd: bool,
) -> Result<()> {
    let rt = runtime()?;
    let measured = Duration::from_secs_f64(seconds);
    let warmup = Duration::from_secs_f64(warmup_seconds);
    let auth = match auth {
        AuthArg::Secret => Auth::Secret,
        AuthArg::Insecure => Auth::Insecure,
    };

    // Each level on the same cluster, one after the other: its own clients
    // (each on its own connection), warm-up, then the measured run.
    let (cluster, leader) = agents("load", auth)?;
    let addresses: Vec<String> = (0..cluster.len()).map(|i| cluster.agent(i).address.clone()).collect();
    let follow = target == Target::Follow;
    // Clients that followed a leader hint to another member.
    let moved = Arc::new(AtomicUsize::new(0));
    let mut blixard = Vec::new();
    for (level, &clients) in levels.iter().enumerate() {
        let to = targets(clients, target, addresses.len(), leader);
        let stats = rt.block_on(async {
            // Each client its own connection to each member it talks to
            // (lazy: only those it uses connect).
            let clients: Arc<Vec<Vec<BlixardClient<Channel>>>> = Arc::new(
                to.iter()
                    .map(|_| addresses.iter().map(|a| BlixardClient::new(channel_to(&cluster, a))).collect())
                    .collect(),
            );
            let at: Arc<Vec<AtomicUsize>> = Arc::new(to.iter().map(|&i| AtomicUsize::new(i)).collect());
            let addresses = Arc::new(addresses.clone());
            let moved = moved.clone();
            let op = move |phase: &'static str| {
                let (clients, at, addresses, moved) = (clients.clone(), at.clone(), addresses.clone(), moved.clone());
                move |c: usize, seq: u64| {
                    let (at, addresses, moved) = (at.clone(), addresses.clone(), moved.clone());
                    let mut client = clients[c][at[c].load(Ordering::Relaxed)].clone();
                    let name = format!("{phase}{level}x{c}-{seq}");
                    async move {
                        let response = client.vm_create(create_request(name)).await?;
                        if follow
                            && let Some(leader) = leader_hint(&response)
                            && let Some(i) = addresses.iter().position(|a| *a == leader)
                        {
                            at[c].store(i, Ordering::Relaxed);
                            moved.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(())
                    }
                }
            };
            drive(to.len(), warmup, op("w")).await;
            drive(to.len(), measured, op("m")).await
        });
        blixard.push(stats);
    }
    drop(cluster);

    let mut etcd_stats = Vec::new();
    if !skip_etcd {
        // With the same authentication as the agents: mutual TLS between
        // members and with clients.
        let etcd = EtcdCluster::start(3, auth == Auth::Secret)?;
        etcd.wait_ready(&rt)?;
        let leader = rt.block_on(etcd_leader(&etcd))?;
        let target = if target == Target::Follow { Target::Leader } else { target };
        for (level, &clients) in levels.iter().enumerate() {
            let to = targets(clients, target, etcd.members.len(), leader);
            let stats = rt.block_on(async {
                let clients: Vec<_> = to.iter().map(|&i| etcd::pb::kv_client::KvClient::new(etcd.channel(i))).collect();
                let op = move |phase: &'static str| {
                    let clients = clients.clone();
                    move |c: usize, seq: u64| {
                        let mut client = clients[c].clone();
                        // Key and value about the size of a VM's name and record.
                        let request = etcd::pb::PutRequest {
                            key: format!("/vms/{phase}{level}x{c}-{seq}").into_bytes(),
                            value: vec![b'x'; 64],
                            ..Default::default()
                        };
                        async move { client.put(request).await.map(|_| ()) }
                    }
                };
                drive(to.len(), warmup, op("w")).await;
                drive(to.len(), measured, op("m")).await
            });
            etcd_stats.push(stats);
        }
    }

    let target_name = match target {
        Target::All => "clients spread over the 3 members",
        Target::Leader => "every client at the leader",
        Target::Follow => {
            "blixard's clients start spread over the 3 members and follow the leader hint, etcd's at the leader"
        }
    };
    let auth_name = match auth {
        Auth::Secret => "mutual TLS between members and with clients (agents: cluster secret; etcd: one CA)",
        Auth::Insecure => "plain text (agents: insecure; etcd: its default)",
    };
    println!("3 members on loopback, {auth_name}; {target_name}; {seconds} s measured per level");
    // At 1 client the one client talks to member 0: whether that is the
    // leader decides whether a write takes two trips between members or four.
    println!("blixard's leader: member {leader}; clients moved by a leader hint: {}", moved.load(Ordering::Relaxed));
    print_header();
    for (i, &clients) in levels.iter().enumerate() {
        print_row("blixard-agent vm create", clients, &blixard[i]);
        if let Some(etcd) = etcd_stats.get(i) {
            print_row("etcd 3.4 put", clients, etcd);
            println!(
                "  ratio blixard/etcd at {clients}: throughput {:.2}x, p50 {:.2}x, p99 {:.2}x",
                blixard[i].rate() / etcd.rate(),
                blixard[i].percentile_ms(50.0) / etcd.percentile_ms(50.0),
                blixard[i].percentile_ms(99.0) / etcd.percentile_ms(99.0)
            );
        }
    }
    Ok(())
}

/// Index of etcd's leader among `etcd.members`.
async fn etcd_leader(etcd: &EtcdCluster) -> Result<usize> {
    for i in 0..etcd.members.len() {
        let mut client = etcd::pb::maintenance_client::MaintenanceClient::new(etcd.channel(i));
        let status = client.status(etcd::pb::StatusRequest {}).await?.into_inner();
        if status.header.is_some_and(|h| h.member_id == status.leader) {
            return Ok(i);
        }
    }
    bail!("no etcd member says it is the leader")
}

/// CPU time (user + system) of a process, from `/proc/<pid>/stat`.
fn cpu_time(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(')').context("malformed /proc/pid/stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 here.
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Ok(Duration::from_secs_f64(ticks as f64 / per_second as f64))
}

/// The machine's CPU time so far, from `/proc/stat`'s first line.
struct MachineCpu {
    /// Every state but idle and iowait, s.
    busy_s: f64,
    /// System, irq and softirq, s.
    kernel_s: f64,
    cores: usize,
}

impl MachineCpu {
    fn since(&self, before: &MachineCpu) -> MachineCpu {
        MachineCpu { busy_s: self.busy_s - before.busy_s, kernel_s: self.kernel_s - before.kernel_s, cores: self.cores }
    }
}

fn machine_cpu() -> Result<MachineCpu> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let ticks: Vec<u64> = line.split_whitespace().skip(1).map(str::parse).collect::<Result<_, _>>()?;
    if ticks.len() < 8 {
        bail!("/proc/stat's cpu line has {} fields", ticks.len());
    }
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    // user nice system idle iowait irq softirq steal
    let total: u64 = ticks[..8].iter().sum();
    Ok(MachineCpu {
        busy_s: (total - ticks[3] - ticks[4]) as f64 / per_second,
        kernel_s: (ticks[2] + ticks[5] + ticks[6]) as f64 / per_second,
        cores: stat.lines().filter(|l| l.starts_with("cpu") && !l.starts_with("cpu ")).count(),
    })
}

/// A `kB` field (VmRSS, VmHWM) of `/proc/<pid>/status`, in MiB, and the thread count.
fn status_field(pid: u32, field: &str) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with(field)).with_context(|| format!("no {field} for {pid}"))?;
    let value: f64 = line[field.len()..].trim_start_matches(':').split_whitespace().next().unwrap_or("0").parse()?;
    Ok(if field == "Threads" { value } else { value / 1024.0 })
}

/// Samples `pids` over `duration`; prints one line per process.
fn idle_sample(what: &str, pids: &[(String, u32)], duration: Duration) -> Result<()> {
    let before: Vec<Duration> = pids.iter().map(|(_, pid)| cpu_time(*pid)).collect::<Result<_>>()?;
    let started = Instant::now();
    std::thread::sleep(duration);
    let elapsed = started.elapsed();
    println!("{what}: {:.0} s idle", elapsed.as_secs_f64());
    println!("{:<8} {:>8} {:>10} {:>10} {:>10} {:>8}", "member", "pid", "RSS MiB", "peak MiB", "CPU %core", "threads");
    for ((name, pid), before) in pids.iter().zip(before) {
        let cpu = cpu_time(*pid)?.saturating_sub(before);
        println!(
            "{:<8} {:>8} {:>10.1} {:>10.1} {:>10.2} {:>8}",
            name,
            pid,
            status_field(*pid, "VmRSS")?,
            status_field(*pid, "VmHWM")?,
            100.0 * cpu.as_secs_f64() / elapsed.as_secs_f64(),
            status_field(*pid, "Threads")?
        );
    }
    Ok(())
}

fn agent_pids(cluster: &Cluster) -> Result<Vec<(String, u32)>> {
    (0..cluster.len())
        .map(|i| {
            let agent = cluster.agent(i);
            Ok((agent.name.clone(), agent.pid().with_context(|| format!("{} is not running", agent.name))?))
        })
        .collect()
}

fn idle(seconds: f64, settle_seconds: f64, skip_etcd: bool) -> Result<()> {
    let duration = Duration::from_secs_f64(seconds);
    let (cluster, _) = agents("idle", Auth::Secret)?;
    std::thread::sleep(Duration::from_secs_f64(settle_seconds));
    idle_sample("blixard-agent, 3-member cluster, no VMs", &agent_pids(&cluster)?, duration)?;
    drop(cluster);
    if !skip_etcd {
        let rt = runtime()?;
        let etcd = EtcdCluster::start(3, true)?;
        etcd.wait_ready(&rt)?;
        std::thread::sleep(Duration::from_secs_f64(settle_seconds));
        let pids: Vec<(String, u32)> = etcd
            .members
            .iter()
            .map(|m| Ok((m.name.clone(), m.pid().context("etcd member not running")?)))
            .collect::<Result<_>>()?;
        idle_sample("etcd 3.4, 3-member cluster, empty (for scale)", &pids, duration)?;
    }
    Ok(())
}

fn vm_name(i: usize) -> String {
    format!("vm-{i:06}")
}

/// Spawns agent `index` again and times how long until it answers as a
/// member with a leader, and until a linearizable read through it succeeds.
fn time_restart(cluster: &mut Cluster, index: usize, probe_vm: &str) -> Result<(Duration, Duration)> {
    let rt = runtime()?;
    let address = cluster.agent(index).address.clone();
    let started = Instant::now();
    cluster.agent_mut(index).start()?;
    let deadline = started + Duration::from_secs(120);
    let member = rt.block_on(async {
        loop {
            let mut client = BlixardClient::new(channel_to(cluster, &address));
            if let Ok(status) = client.cluster_status(pb::ClusterStatusRequest {}).await
                && status.get_ref().member
                && !status.get_ref().leader.is_empty()
            {
                return Ok(started.elapsed());
            }
            if Instant::now() > deadline {
                bail!("{address} did not serve cluster status within 120 s");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })?;
    let read = rt.block_on(async {
        let mut client = BlixardClient::new(channel_to(cluster, &address));
        loop {
            if client.vm_status(pb::VmRequest { name: probe_vm.to_string() }).await.is_ok() {
                return Ok(started.elapsed());
            }
            if Instant::now() > deadline {
                bail!("{address} did not serve a linearizable read within 120 s");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })?;
    Ok((member, read))
}

fn restart(vms: usize, trials: usize, clients: usize, idle_seconds: f64) -> Result<()> {
    let rt = runtime()?;
    let (mut cluster, leader) = agents("restart", Auth::Secret)?;
    let addresses: Vec<String> = (0..cluster.len()).map(|i| cluster.agent(i).address.clone()).collect();
    let leader_address = addresses[leader].clone();
    println!("filling a 3-member cluster with {vms} VMs from {clients} clients at the leader");
    let fill = rt.block_on(async {
        let client = BlixardClient::new(channel_to(&cluster, &leader_address));
        drive_count(clients, vms, move |i| {
            let mut client = client.clone();
            async move { client.vm_create(create_request(vm_name(i))).await.map(|_| ()) }
        })
        .await
    });
    print_header();
    print_row("fill: vm create", clients, &fill);
    if fill.errors > 0 {
        bail!("{} creates failed while filling", fill.errors);
    }

    let follower = (0..cluster.len()).find(|&i| i != leader).expect("3 members");
    let commit = cluster.status(leader)?.commit_index;
    wait_for("the follower to apply everything", Duration::from_secs(120), || {
        Ok(match cluster.status(follower) {
            Ok(s) if s.applied_index >= commit => Probe::Ready(()),
            Ok(s) => Probe::NotYet(format!("applied {} of {commit}", s.applied_index)),
            Err(e) => Probe::NotYet(e.message().to_string()),
        })
    })?;
    let store = cluster.agent(follower).data_dir().join(blixard::node::STORE_FILE);
    let store_mib = std::fs::metadata(&store).map(|m| m.len() as f64 / 1048576.0).unwrap_or(f64::NAN);
    println!(
        "restarting follower {} ({vms} VMs, commit index {commit}, redb file {store_mib:.0} MiB), {trials} times per signal",
        cluster.agent(follower).name
    );
    println!("{:<8} {:>6} {:>20} {:>24}", "signal", "trial", "member+leader ms", "linearizable read ms");
    let probe_vm = vm_name(vms - 1);
    let mut report = String::new();
    for signal in ["SIGTERM", "SIGKILL"] {
        let mut reads = Vec::new();
        for trial in 1..=trials {
            if signal == "SIGTERM" {
                cluster.agent_mut(follower).stop()?;
            } else {
                cluster.agent_mut(follower).kill();
            }
            let (member, read) = time_restart(&mut cluster, follower, &probe_vm)?;
            println!(
                "{:<8} {:>6} {:>20.0} {:>24.0}",
                signal,
                trial,
                member.as_secs_f64() * 1e3,
                read.as_secs_f64() * 1e3
            );
            reads.push(read);
        }
        reads.sort_unstable();
        let median = reads[reads.len() / 2];
        let max = reads[reads.len() - 1];
        writeln!(
            report,
            "{signal}: to serving a linearizable read, median {:.0} ms, max {:.0} ms",
            median.as_secs_f64() * 1e3,
            max.as_secs_f64() * 1e3
        )?;
    }
    print!("{report}");
    if idle_seconds > 0.0 {
        std::thread::sleep(Duration::from_secs(2));
        let what = format!("blixard-agent, 3-member cluster holding {vms} VMs");
        idle_sample(&what, &agent_pids(&cluster)?, Duration::from_secs_f64(idle_seconds))?;
    }
    Ok(())
}

/// CPU time of the thread named `name` of process `pid` (the first one),
/// from `/proc/<pid>/task/<tid>/stat`.
fn thread_cpu_time(pid: u32, name: &str) -> Result<Duration> {
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))?.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim_end() == name {
            let stat = std::fs::read_to_string(task.path().join("stat"))?;
            return ticks_of(&stat);
        }
    }
    bail!("process {pid} has no thread named {name}")
}

/// utime + stime of a `/proc/.../stat` line.
fn ticks_of(stat: &str) -> Result<Duration> {
    let rest = stat.rsplit_once(')').context("malformed stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Ok(Duration::from_secs_f64(ticks as f64 / per_second as f64))
}

/// Process and raft-thread CPU of `pids` over `duration`, in % of a core.
fn cpu_over(pids: &[u32], duration: Duration) -> Result<Vec<(f64, f64)>> {
    let before: Vec<(Duration, Duration)> =
        pids.iter().map(|&p| Ok((cpu_time(p)?, thread_cpu_time(p, "raft")?))).collect::<Result<_>>()?;
    let started = Instant::now();
    std::thread::sleep(duration);
    let elapsed = started.elapsed().as_secs_f64();
    pids.iter()
        .zip(before)
        .map(|(&p, (process, raft))| {
            let process = cpu_time(p)?.saturating_sub(process).as_secs_f64();
            let raft = thread_cpu_time(p, "raft")?.saturating_sub(raft).as_secs_f64();
            Ok((100.0 * process / elapsed, 100.0 * raft / elapsed))
        })
        .collect()
}

/// `vm create` from `clients` loops for `seconds`, client `c` at agent
/// `c % targets`.
fn commit_latency(
    rt: &tokio::runtime::Runtime,
    cluster: &Cluster,
    targets: usize,
    clients: usize,
    seconds: f64,
    tag: &'static str,
) -> Stats {
    // Lazy channels are made inside a runtime.
    let _entered = rt.enter();
    let channels: Vec<BlixardClient<Channel>> =
        (0..clients).map(|c| BlixardClient::new(channel_to(cluster, &cluster.agent(c % targets).address))).collect();
    rt.block_on(async move {
        let op = move |phase: &'static str| {
            let channels = channels.clone();
            move |c: usize, seq: u64| {
                let mut client = channels[c].clone();
                let name = format!("{tag}{phase}{c}-{seq}");
                async move { client.vm_create(create_request(name)).await.map(|_| ()) }
            }
        };
        drive(clients, Duration::from_secs(2), op("w")).await;
        drive(clients, Duration::from_secs_f64(seconds), op("m")).await
    })
}

/// Waits until each of `vms` runs as exactly one guest on a host other
/// than `lost` (seen in `/proc`); the time since `since`.
fn wait_moved(cluster: &Cluster, vms: &[String], lost: usize, since: Instant) -> Result<Duration> {
    wait_for(&format!("{} VMs to run once elsewhere", vms.len()), Duration::from_secs(120), || {
        let guests = cluster.running_guests()?;
        let moved = vms.iter().filter(|vm| guests.get(*vm).is_some_and(|on| on.len() == 1 && on[0] != lost)).count();
        Ok(if moved == vms.len() { Probe::Ready(since.elapsed()) } else { Probe::NotYet(format!("{moved} moved")) })
    })
}

fn scale(agents: usize, vms: usize, clients: usize, seconds: f64, idle_seconds: f64, tick_ms: u64) -> Result<()> {
    let rt = runtime()?;
    let options = Options { vcpu: 4096, ..Options::default() }.with_tick_ms(tick_ms);
    let mut cluster = Cluster::configure_joined("scale", agents, 3, options)?;
    // VM i's runner on hosts i, i + 1 and i + 2 (mod agents).
    let names: Vec<String> = (0..vms).map(vm_name).collect();
    for host in 0..agents {
        let here: Vec<String> = names
            .iter()
            .enumerate()
            .filter(|(i, _)| (0..3).any(|k| (i + k) % agents == host))
            .map(|(_, n)| n.clone())
            .collect();
        cluster.install_shared_runners(host, &here)?;
    }
    let all: Vec<usize> = (0..agents).collect();
    let started = Instant::now();
    cluster.start_all()?;
    let leader = cluster.wait_members(&all, Duration::from_secs(600))?;
    let formed = started.elapsed();
    cluster.wait_reported(leader, &all)?;
    let status = cluster.status(leader)?;
    let role = |i: usize| {
        status.members.iter().find(|m| m.name == cluster.agent(i).name).map_or("?".to_string(), |m| m.role.clone())
    };
    let voters: Vec<usize> = all.iter().copied().filter(|&i| role(i) == "follower").collect();
    let learners: Vec<usize> = all.iter().copied().filter(|&i| role(i) == "learner").collect();
    println!(
        "{agents} agents formed in {:.2} s (spawn to every agent a member seeing all {agents} healthy and one leader); leader {}, {} other voters, {} learners",
        formed.as_secs_f64(),
        cluster.agent(leader).name,
        voters.len(),
        learners.len()
    );

    let placing = Instant::now();
    let leader_address = cluster.agent(leader).address.clone();
    let fill = rt.block_on(async {
        let client = BlixardClient::new(channel_to(&cluster, &leader_address));
        let names = names.clone();
        drive_count(64, vms, move |i| {
            let mut client = client.clone();
            let name = names[i].clone();
            async move { client.vm_create(create_request(name)).await.map(|_| ()) }
        })
        .await
    });
    if fill.errors > 0 {
        bail!("{} creates failed: {:?}", fill.errors, fill.first_error);
    }
    wait_for(&format!("{vms} guests running once each"), Duration::from_secs(600), || {
        let guests = cluster.running_guests()?;
        let once = guests.values().filter(|on| on.len() == 1).count();
        Ok(if once == vms { Probe::Ready(()) } else { Probe::NotYet(format!("{once} run")) })
    })?;
    println!(
        "{vms} VMs created (64 clients) and running as guest processes in {:.1} s",
        placing.elapsed().as_secs_f64()
    );

    std::thread::sleep(Duration::from_secs(3));
    let pid = |i: usize| cluster.agent(i).pid().with_context(|| format!("{} is not running", cluster.agent(i).name));
    let mut sampled = vec![(format!("leader {}", cluster.agent(leader).name), pid(leader)?)];
    if let Some(&v) = voters.first() {
        sampled.push((format!("voter {}", cluster.agent(v).name), pid(v)?));
    }
    if let Some(&l) = learners.first() {
        sampled.push((format!("learner {}", cluster.agent(l).name), pid(l)?));
    }
    let pids: Vec<u32> = sampled.iter().map(|(_, p)| *p).collect();
    let cpu = cpu_over(&pids, Duration::from_secs_f64(idle_seconds))?;
    println!("idle {idle_seconds:.0} s, {agents} agents, {vms} VMs running:");
    println!("{:<14} {:>10} {:>16} {:>9}", "agent", "CPU %core", "raft thread %core", "RSS MiB");
    for ((what, pid), (process, raft)) in sampled.iter().zip(&cpu) {
        println!("{what:<14} {process:>10.2} {raft:>16.2} {:>9.1}", status_field(*pid, "VmRSS")?);
    }
    let rss: f64 = all.iter().map(|&i| status_field(pid(i)?, "VmRSS")).sum::<Result<f64>>()?;
    println!("all {agents} agents: {rss:.0} MiB RSS");

    // Clients at the 3 initial members (voters or the leader), as in the
    // 3-member run below; where the machine's CPU went meanwhile.
    let agent_pids: Vec<u32> = all.iter().map(|&i| pid(i)).collect::<Result<_>>()?;
    let cpu_before: Vec<Duration> = agent_pids.iter().map(|&p| cpu_time(p)).collect::<Result<_>>()?;
    let machine_before = machine_cpu()?;
    let loaded = Instant::now();
    let big = commit_latency(&rt, &cluster, 3, clients, seconds, "b");
    let loaded_s = loaded.elapsed().as_secs_f64();
    let machine = machine_cpu()?.since(&machine_before);
    let mut by_role = [0.0f64; 3];
    for ((&i, &p), before) in all.iter().zip(&agent_pids).zip(&cpu_before) {
        let used = cpu_time(p)?.saturating_sub(*before).as_secs_f64();
        by_role[if i == leader {
            0
        } else if voters.contains(&i) {
            1
        } else {
            2
        }] += used;
    }
    let agents_s: f64 = by_role.iter().sum();
    // Per commit at the measured rate (the warm-up ran at about the same).
    let per_commit_ms = |cpu_s: f64| 1000.0 * cpu_s / loaded_s / big.rate().max(f64::MIN_POSITIVE);
    println!(
        "while {clients} clients created VMs ({loaded_s:.1} s with the warm-up): the machine busy {:.0}% of {} cores \
         ({:.0}% of it in the kernel); the agents' own CPU {:.2} cores: leader {:.2}, {} voters {:.2}, {} learners {:.2}; \
         per commit {:.1} ms of agent CPU (leader {:.1}, voters {:.1}, learners {:.1}), {:.1} ms of the machine's",
        100.0 * machine.busy_s / loaded_s / machine.cores as f64,
        machine.cores,
        100.0 * machine.kernel_s / machine.busy_s.max(f64::MIN_POSITIVE),
        agents_s / loaded_s,
        by_role[0] / loaded_s,
        voters.len(),
        by_role[1] / loaded_s,
        learners.len(),
        by_role[2] / loaded_s,
        per_commit_ms(agents_s),
        per_commit_ms(by_role[0]),
        per_commit_ms(by_role[1]),
        per_commit_ms(by_role[2]),
        per_commit_ms(machine.busy_s),
    );

    // A learner's VMs (a voter's when there is no learner), after SIGKILL.
    let victim = learners.first().or(voters.first()).copied().context("a member besides the leader")?;
    let its: Vec<String> =
        cluster.running_guests()?.into_iter().filter(|(_, on)| on.contains(&victim)).map(|(vm, _)| vm).collect();
    let victim_role = role(victim);
    let lost_at = Instant::now();
    cluster.agent_mut(victim).kill();
    let moved = wait_moved(&cluster, &its, victim, lost_at)?;
    println!(
        "failover: {} ({}) SIGKILLed with {} VMs; all ran once elsewhere after {:.2} s",
        cluster.agent(victim).name,
        victim_role,
        its.len(),
        moved.as_secs_f64()
    );
    drop(cluster);

    let (small, _) = crate::agents("scale3", Auth::Secret)?;
    let machine_before = machine_cpu()?;
    let loaded = Instant::now();
    let three = commit_latency(&rt, &small, 3, clients, seconds, "s");
    let loaded_s = loaded.elapsed().as_secs_f64();
    let machine = machine_cpu()?.since(&machine_before);
    drop(small);
    println!(
        "while {clients} clients created VMs at 3 agents: the machine busy {:.0}% of {} cores; per commit {:.2} ms of the machine's CPU",
        100.0 * machine.busy_s / loaded_s / machine.cores as f64,
        machine.cores,
        1000.0 * machine.busy_s / loaded_s / three.rate().max(f64::MIN_POSITIVE),
    );
    println!("vm create, {clients} clients spread over 3 voters, {seconds} s measured:");
    print_header();
    print_row(&format!("{agents} agents"), clients, &big);
    print_row("3 agents", clients, &three);
    println!(
        "  ratio {agents}/3: p50 {:.2}x, p99 {:.2}x, throughput {:.2}x",
        big.percentile_ms(50.0) / three.percentile_ms(50.0),
        big.percentile_ms(99.0) / three.percentile_ms(99.0),
        big.rate() / three.rate()
    );
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Throughput { clients, auth, seconds, warmup_seconds, target, skip_etcd } => {
            if clients.is_empty() || clients.contains(&0) {
                bail!("--clients needs one or more counts above 0, such as 1,16,64");
            }
            throughput(&clients, auth, seconds, warmup_seconds, target, skip_etcd)
        }
        Cmd::Idle { seconds, settle_seconds, skip_etcd } => idle(seconds, settle_seconds, skip_etcd),
        Cmd::Restart { vms, trials, clients, idle_seconds } => restart(vms, trials, clients, idle_seconds),
        Cmd::Scale { agents, vms, clients, seconds, idle_seconds, tick_ms } => {
            if !(4..=blixard_systests::cluster::AGENTS_MAX).contains(&agents) || clients == 0 || vms < agents {
                bail!(
                    "--agents must be 4 to {}, --clients above 0 and --vms at least --agents",
                    blixard_systests::cluster::AGENTS_MAX
                );
            }
            if !(10..=1000).contains(&tick_ms) {
                bail!("--tick-ms must be 10 to 1000");
            }
            scale(agents, vms, clients, seconds, idle_seconds, tick_ms)
        }
    }
}
