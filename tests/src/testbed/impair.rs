//! A lossy, jittery network between the bed's hosts, as `tc qdisc ... netem loss 10%
//! delay 50ms 50ms` would make it, on a kernel without `sch_netem` (this machine's has
//! none): every packet a host sends to another host goes through an NFQUEUE (an
//! `iptables` rule in the host's network namespace, on `OUTPUT`, so each packet meets it
//! once, at its sender), and a thread of the test process drops it with the given
//! probability or holds it for a delay drawn uniformly from `0..=jitter_max` before it
//! lets it go. Packets overtake each other, as with netem's jitter. Traffic between a
//! host and the test process (the bridge address) is not touched.
//!
//! The rules carry `--queue-bypass`: once the test process is gone (or [`Impaired`] is
//! dropped), packets pass untouched instead of being lost.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd as _;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use rand::Rng as _;

use super::Testbed;
use super::cmd;

/// The queue every host's rule sends its packets to (queues are per network namespace).
const QUEUE: u16 = 0;
/// Packets the kernel holds for the queue before it lets them pass (fail-open).
const QUEUE_LEN_MAX: u32 = 16_384;
/// The thread's longest sleep while nothing is due: the delays' resolution.
const IDLE_SLEEP: Duration = Duration::from_millis(1);

/// How the network between hosts misbehaves.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Impairment {
    /// The share of packets dropped, 0.0..=1.0.
    pub loss: f64,
    /// Every other packet is delayed by a uniform draw from `0..=jitter_max`.
    pub jitter_max: Duration,
}

impl Impairment {
    /// 10% loss, up to 100 ms of delay (issue 21's soak).
    pub const LOSSY: Impairment = Impairment { loss: 0.10, jitter_max: Duration::from_millis(100) };
}

/// What the queues did, over all hosts.
#[derive(Debug, Default)]
pub struct Counts {
    pub packets: AtomicU64,
    pub dropped: AtomicU64,
    /// Sum of the delays given, in microseconds.
    pub delay_us: AtomicU64,
}

impl Counts {
    pub fn summary(&self) -> String {
        let packets = self.packets.load(Ordering::Relaxed);
        let dropped = self.dropped.load(Ordering::Relaxed);
        let passed = packets.saturating_sub(dropped).max(1);
        format!(
            "{packets} packets between hosts, {dropped} dropped ({:.1}%), mean delay {:.1} ms",
            100.0 * dropped as f64 / packets.max(1) as f64,
            self.delay_us.load(Ordering::Relaxed) as f64 / passed as f64 / 1000.0
        )
    }
}

/// The impairment in force; dropping it (or [`Impaired::stop`]) heals the network.
pub struct Impaired {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Result<()>>>,
    /// (host leader pid, rule arguments) to delete.
    rules: Vec<(u32, Vec<String>)>,
    counts: Arc<Counts>,
}

impl Impaired {
    pub fn counts(&self) -> &Counts {
        &self.counts
    }

    /// Removes the rules and stops the queues' threads (releasing what they hold).
    pub fn stop(mut self) -> Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<()> {
        let mut first_error = None;
        for (pid, rule) in std::mem::take(&mut self.rules) {
            if let Err(e) = iptables(pid, "-D", &rule) {
                first_error.get_or_insert(e);
            }
        }
        self.stop.store(true, Ordering::Relaxed);
        for thread in std::mem::take(&mut self.threads) {
            match thread.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                Err(_) => {
                    first_error.get_or_insert(anyhow::anyhow!("an impairment thread panicked"));
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl Drop for Impaired {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            eprintln!("testbed: healing the network: {e:#}");
        }
    }
}

fn iptables(pid: u32, action: &str, rule: &[String]) -> Result<()> {
    let mut command = Command::new(cmd::tool("nsenter")?);
    command
        .arg(format!("--target={pid}"))
        .args(["--net", "--"])
        .arg(cmd::tool("iptables")?)
        .args(["-w", action])
        .args(rule);
    let output = cmd::output_within(&mut command, Duration::from_secs(30))
        .with_context(|| format!("iptables {action} {rule:?} in pid {pid}'s network namespace"))?;
    cmd::check_success(&format!("iptables {action} {rule:?}"), &output)
}

impl Testbed {
    /// Makes every packet between two running hosts of this bed go through `impairment`
    /// until the returned guard is stopped or dropped. Needs `iptables` (and the
    /// kernel's NFQUEUE target) on this machine.
    pub fn impair(&self, impairment: Impairment) -> Result<Impaired> {
        if !(0.0..=1.0).contains(&impairment.loss) {
            bail!("loss must be between 0 and 1, not {}", impairment.loss);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(Counts::default());
        let mut impaired =
            Impaired { stop: stop.clone(), threads: Vec::new(), rules: Vec::new(), counts: counts.clone() };
        for host in self.hosts() {
            let pid = host.leader_pid().with_context(|| format!("{} is not running", host.name()))?;
            let netns = File::open(format!("/proc/{pid}/ns/net"))
                .with_context(|| format!("{}'s network namespace", host.name()))?;
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let (stop, counts) = (stop.clone(), counts.clone());
            let thread = std::thread::Builder::new()
                .name(format!("impair-{}", host.name()))
                .spawn(move || run_queue(netns, impairment, &stop, &counts, ready_tx))?;
            let ready = ready_rx.recv().unwrap_or_else(|_| Err(anyhow::anyhow!("the queue thread died")));
            impaired.threads.push(thread);
            ready.with_context(|| format!("opening {}'s queue", host.name()))?;
            for other in self.hosts().iter().filter(|h| h.index() != host.index()) {
                let rule: Vec<String> = ["OUTPUT", "-d", &format!("{}/32", other.addr()), "-j", "NFQUEUE"]
                    .into_iter()
                    .map(String::from)
                    .chain(["--queue-num".into(), QUEUE.to_string(), "--queue-bypass".into()])
                    .collect();
                iptables(pid, "-A", &rule)?;
                impaired.rules.push((pid, rule));
            }
        }
        Ok(impaired)
    }
}

/// One host's queue: enters its network namespace (this thread only), binds the queue,
/// then drops, holds and releases packets until `stop`.
fn run_queue(
    netns: File,
    impairment: Impairment,
    stop: &AtomicBool,
    counts: &Counts,
    ready: std::sync::mpsc::Sender<Result<()>>,
) -> Result<()> {
    let opened = (|| -> Result<nfq::Queue> {
        // SAFETY: setns on a file descriptor we own; it changes only this thread's
        // network namespace, which nothing else in this thread depends on.
        if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error()).context("setns");
        }
        let mut queue = nfq::Queue::open().context("opening an NFQUEUE socket")?;
        queue.bind(QUEUE).context("binding the queue")?;
        queue.set_copy_range(QUEUE, 0).context("setting the copy range")?;
        queue.set_queue_max_len(QUEUE, QUEUE_LEN_MAX).context("setting the queue length")?;
        queue.set_fail_open(QUEUE, true).context("setting fail-open")?;
        queue.set_nonblocking(true);
        Ok(queue)
    })();
    let mut queue = match opened {
        Ok(queue) => {
            let _ = ready.send(Ok(()));
            queue
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return Ok(());
        }
    };
    let mut rng = rand::rng();
    let mut held: BTreeMap<(Instant, u64), nfq::Message> = BTreeMap::new();
    let mut seq = 0u64;
    let jitter_us = impairment.jitter_max.as_micros() as u64;
    while !stop.load(Ordering::Relaxed) {
        loop {
            match queue.recv() {
                Ok(mut msg) => {
                    counts.packets.fetch_add(1, Ordering::Relaxed);
                    if rng.random_bool(impairment.loss) {
                        counts.dropped.fetch_add(1, Ordering::Relaxed);
                        msg.set_verdict(nfq::Verdict::Drop);
                        queue.verdict(msg).context("dropping a packet")?;
                    } else {
                        let delay = rng.random_range(0..=jitter_us);
                        counts.delay_us.fetch_add(delay, Ordering::Relaxed);
                        seq += 1;
                        held.insert((Instant::now() + Duration::from_micros(delay), seq), msg);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e).context("receiving from the queue"),
            }
        }
        let now = Instant::now();
        while let Some(entry) = held.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let mut msg = entry.remove();
            msg.set_verdict(nfq::Verdict::Accept);
            queue.verdict(msg).context("releasing a packet")?;
        }
        let next = held.first_key_value().map_or(IDLE_SLEEP, |((due, _), _)| due.saturating_duration_since(now));
        std::thread::sleep(next.min(IDLE_SLEEP));
    }
    for (_, mut msg) in std::mem::take(&mut held) {
        msg.set_verdict(nfq::Verdict::Accept);
        queue.verdict(msg).context("releasing a packet")?;
    }
    Ok(())
}
