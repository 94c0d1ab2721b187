//! The dashboard's graphs over time, from the agent's own recent samples
//! (no external database): every [`HISTORY_INTERVAL`] the dashboard takes
//! one [`Sample`] — each host's capacity and use, the VMs by state, and
//! how many events of each level this agent has recorded — and keeps the
//! last [`HISTORY_LEN`] (an hour). A restarted agent starts a new history.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use serde::Serialize;

use crate::state::State;

/// How often a sample is taken.
pub const HISTORY_INTERVAL: Duration = Duration::from_secs(10);
/// Samples kept: an hour at [`HISTORY_INTERVAL`].
pub const HISTORY_LEN: usize = 360;

/// One host in one sample.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostSample {
    pub name: String,
    pub status: &'static str,
    pub vcpu_used: u64,
    pub vcpu_total: u64,
    pub memory_mib_used: u64,
    pub memory_mib_total: u64,
}

/// The cluster at one moment, as this agent saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Sample {
    pub at_unix_ms: u64,
    pub hosts: Vec<HostSample>,
    /// VMs by shown state (`lost` included).
    pub vms: BTreeMap<&'static str, u64>,
    /// Events this agent recorded so far, by level (`info`, `warning`,
    /// `error`): the rate between two samples is their difference.
    pub events: BTreeMap<&'static str, u64>,
}

/// The hosts and VM counts of one sample, from the applied state (the
/// events are the caller's: they are this agent's, not the state's).
pub fn take(state: &State, at_unix_ms: u64) -> Sample {
    let hosts = crate::metrics::host_rows(state)
        .into_iter()
        .map(|row| HostSample {
            name: row.host,
            status: row.status,
            vcpu_used: row.vcpus_used,
            vcpu_total: row.vcpus,
            memory_mib_used: row.memory_mib_used,
            memory_mib_total: row.memory_mib,
        })
        .collect();
    let mut vms: BTreeMap<&'static str, u64> = BTreeMap::new();
    for vm in state.vms().values() {
        *vms.entry(state.vm_state(vm).as_str()).or_default() += 1;
    }
    Sample { at_unix_ms, hosts, vms, events: BTreeMap::new() }
}

/// The last [`HISTORY_LEN`] samples, oldest first.
#[derive(Debug, Default)]
pub struct History {
    samples: VecDeque<Sample>,
}

#[derive(Serialize)]
struct Wire<'a> {
    interval_ms: u64,
    samples: &'a VecDeque<Sample>,
}

impl History {
    pub fn push(&mut self, sample: Sample) {
        if self.samples.len() == HISTORY_LEN {
            self.samples.pop_front();
        }
        self.samples.push_back(sample);
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// `{"interval_ms": ..., "samples": [...]}` (`GET /api/history`).
    pub fn to_json(&self) -> String {
        let wire = Wire { interval_ms: HISTORY_INTERVAL.as_millis() as u64, samples: &self.samples };
        serde_json::to_string(&wire).expect("a history always encodes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_history_is_bounded_and_oldest_first() {
        let mut history = History::default();
        for i in 0..(HISTORY_LEN as u64 + 3) {
            history.push(Sample { at_unix_ms: i, hosts: vec![], vms: BTreeMap::new(), events: BTreeMap::new() });
        }
        assert_eq!(history.len(), HISTORY_LEN);
        let json: serde_json::Value = serde_json::from_str(&history.to_json()).unwrap();
        assert_eq!(json["samples"][0]["at_unix_ms"], 3);
        assert_eq!(json["interval_ms"], 10_000);
    }
}
