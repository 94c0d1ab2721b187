//! A healthy cluster on a bad network (issue 21): the bed's hosts lose 10% of the packets
//! between them and delay the rest by up to 100 ms ([`crate::testbed::Impairment`]),
//! while [`soak`] watches for what must not happen to a healthy cluster: a host fencing
//! itself, a guest restarted or moved, a host marked down. Elections are counted too
//! (Raft may elect again on such a network; a new leader must not cost a fence).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};

use crate::bedcluster::{AGENT_UNIT, BedCluster, GUARD_UNIT};
use crate::testbed::Impairment;

/// What the agents log (agent and guard alike) each time a host fences itself.
const FENCE_LINE: &str = "no quorum contact: fencing";
/// Peer batches an agent accepted over the QUIC datagram path (`api::datagram`).
pub const DATAGRAM_METRIC: &str = "blixard_peer_datagram_batches_total";

/// What one soak saw.
#[derive(Debug)]
pub struct SoakReport {
    pub duration: Duration,
    /// `host_fenced` events (each host's own) plus the guards' fencing log lines.
    pub fences: usize,
    /// Raft terms that began during the soak (elections won).
    pub elections: u64,
    /// Replicated events during the soak, by kind (`leader_changed`, `host_down`,
    /// `vm_moved`, ...), as the first host's event log has them.
    pub events: BTreeMap<String, usize>,
    /// Guest starts during the soak, over every guest and host (the fake guests' logs).
    pub guest_starts: usize,
    /// Peer batches each host accepted over the datagram path during the soak
    /// ([`DATAGRAM_METRIC`]): none means its peers reached it over TCP alone.
    pub datagram_batches: Vec<u64>,
    /// What the network did.
    pub network: String,
}

impl SoakReport {
    /// Nothing a healthy cluster must not do: no fence, no guest started again, no host
    /// marked down, no VM moved.
    pub fn healthy(&self) -> bool {
        self.fences == 0
            && self.guest_starts == 0
            && !self.events.contains_key("host_down")
            && !self.events.contains_key("vm_moved")
            && !self.events.contains_key("host_fenced")
    }

    pub fn describe(&self) -> String {
        format!(
            "{:.0} s: {} fences, {} elections, {} guest starts, events {:?}; datagram batches accepted per host \
             {:?}; {}",
            self.duration.as_secs_f64(),
            self.fences,
            self.elections,
            self.guest_starts,
            self.events,
            self.datagram_batches,
            self.network
        )
    }
}

fn fence_lines(cluster: &BedCluster, host: usize) -> Result<usize> {
    let journal = cluster.bed().host(host).journal_args(&["--no-hostname", "-u", AGENT_UNIT, "-u", GUARD_UNIT])?;
    Ok(journal.lines().filter(|l| l.contains(FENCE_LINE)).count())
}

fn last_seq(cluster: &BedCluster, host: usize) -> Result<u64> {
    let events = cluster.events(host).map_err(|s| anyhow::anyhow!("events of h{host}: {}", s.message()))?;
    Ok(events.last().map_or(0, |e| e.seq))
}

fn term(cluster: &BedCluster, hosts: &[usize]) -> Result<u64> {
    let mut best = 0;
    for &h in hosts {
        if let Ok(status) = cluster.status(h) {
            best = best.max(status.term);
        }
    }
    Ok(best)
}

/// Runs the formed, settled `cluster` (every host up, its guests running) on an
/// impaired network for `duration`, then heals it and reports. The caller checks
/// [`SoakReport::healthy`] and, if it wants, never-two-copies.
pub fn soak(cluster: &BedCluster, impairment: Impairment, duration: Duration) -> Result<SoakReport> {
    let hosts: Vec<usize> = (0..cluster.bed().hosts().len()).collect();
    let guests: Vec<String> = cluster.guests().to_vec();
    let starts_before = guest_starts(cluster, &hosts, &guests)?;
    let fences_before: Vec<usize> = hosts.iter().map(|&h| fence_lines(cluster, h)).collect::<Result<_>>()?;
    let seq_before: Vec<u64> = hosts.iter().map(|&h| last_seq(cluster, h)).collect::<Result<_>>()?;
    let term_before = term(cluster, &hosts)?;
    let datagrams_before: Vec<f64> =
        hosts.iter().map(|&h| cluster.metric(h, DATAGRAM_METRIC)).collect::<Result<_>>()?;

    let started = Instant::now();
    let impaired = cluster.bed().impair(impairment).context("impairing the network")?;
    while started.elapsed() < duration {
        std::thread::sleep(Duration::from_millis(500).min(duration.saturating_sub(started.elapsed())));
    }
    let network = impaired.counts().summary();
    // Read while the network is still impaired: what came over datagrams in the soak.
    let datagram_batches: Vec<u64> = hosts
        .iter()
        .zip(&datagrams_before)
        .map(|(&h, before)| Ok((cluster.metric(h, DATAGRAM_METRIC)? - before).max(0.0) as u64))
        .collect::<Result<_>>()?;
    impaired.stop().context("healing the network")?;
    let elapsed = started.elapsed();

    let mut fences = 0;
    let mut events = BTreeMap::new();
    for (i, &h) in hosts.iter().enumerate() {
        fences += fence_lines(cluster, h)?.saturating_sub(fences_before[i]);
        let log = cluster.events(h).map_err(|s| anyhow::anyhow!("events of h{h}: {}", s.message()))?;
        for event in log.iter().filter(|e| e.seq > seq_before[i]) {
            if event.kind == "host_fenced" {
                fences += 1;
            }
            if i == 0 || event.kind == "host_fenced" {
                *events.entry(event.kind.clone()).or_insert(0) += 1;
            }
        }
    }
    let elections = term(cluster, &hosts)?.saturating_sub(term_before);
    let starts_after = guest_starts(cluster, &hosts, &guests)?;
    Ok(SoakReport {
        duration: elapsed,
        fences,
        elections,
        events,
        guest_starts: starts_after.saturating_sub(starts_before),
        datagram_batches,
        network,
    })
}

fn guest_starts(cluster: &BedCluster, hosts: &[usize], guests: &[String]) -> Result<usize> {
    let mut n = 0;
    for &h in hosts {
        for vm in guests {
            n += cluster.guest_starts(h, vm)?;
        }
    }
    Ok(n)
}
