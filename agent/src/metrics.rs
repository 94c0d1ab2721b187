//! Prometheus metrics (`GET /metrics` on the HTTP listener).
//!
//! One [`Metrics`] per agent, shared as an `Arc`: the raft thread, the
//! leader duties and the reconciler update counters and histograms as
//! things happen; gauges that mirror state (Raft indexes, VMs per state per
//! host) are filled in at scrape time from the node's status and its local
//! state, so they can never drift from what the agent would answer.
//!
//! A counter of cluster-wide decisions (failovers, scheduler decisions,
//! vouched fencing) is kept by the leader that made them: summing the
//! series of every member gives the cluster's total.
//!
//! Names (all prefixed `blixard_`):
//!
//! | metric | type | meaning |
//! |---|---|---|
//! | `raft_term` | gauge | the current Raft term |
//! | `raft_commit_index`, `raft_applied_index` | gauge | this member's commit and applied index |
//! | `raft_leader_changes_total` | counter | times this member saw the leader change |
//! | `raft_proposal_duration_seconds` | histogram | propose-to-applied latency of proposals made on this member |
//! | `raft_reachable_peers` | gauge | peers heard from within an election timeout (the leader sees every peer; a follower counts its leader) |
//! | `raft_is_leader` | gauge | 1 on the leader |
//! | `vms{host,state}` | gauge | VMs placed on each host, by observed state (`host=""`: unplaced) |
//! | `reconcile_duration_seconds` | histogram | one reconciler pass on this host |
//! | `contact_reads_total` | counter | quorum-contact reads this host sent itself because the leader's confirmations stopped (none at rest) |
//! | `peer_messages_refused_total` | counter | Raft messages from peers the raft thread refused by the trust table (`crate::trust`; none at rest) |
//! | `failovers_total` | counter | VMs this leader moved off a fenced (down) host |
//! | `fencing_events_total{kind}` | counter | `self`: this host fenced itself (lost quorum); `vouched`: this leader cleared a fenced host's handoff |
//! | `scheduler_decisions_total{kind}` | counter | decisions this leader proposed: `place`, `move`, `unplace`, `host_down`, `host_up`, `clear_handoff` |

use std::collections::BTreeMap;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::node::NodeStatus;
use crate::state::State;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VmLabels {
    pub host: String,
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

/// Every metric of one agent.
pub struct Metrics {
    registry: Registry,
    raft_term: Gauge,
    raft_commit_index: Gauge,
    raft_applied_index: Gauge,
    raft_reachable_peers: Gauge,
    raft_is_leader: Gauge,
    vms: Family<VmLabels, Gauge>,
    pub leader_changes: Counter,
    pub proposal_seconds: Histogram,
    pub reconcile_seconds: Histogram,
    pub plan_seconds: Histogram,
    pub blocked_vms: Gauge,
    pub failovers: Counter,
    pub contact_reads: Counter,
    pub peer_messages_refused: Counter,
    fencing: Family<KindLabel, Counter>,
    decisions: Family<KindLabel, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Latency buckets from 0.5 ms to about 16 s (a proposal waits at most the
/// request timeout; a reconciler pass should take milliseconds).
fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.0005, 2.0, 16)
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("blixard");
        let m = Metrics {
            raft_term: Gauge::default(),
            raft_commit_index: Gauge::default(),
            raft_applied_index: Gauge::default(),
            raft_reachable_peers: Gauge::default(),
            raft_is_leader: Gauge::default(),
            vms: Family::default(),
            leader_changes: Counter::default(),
            proposal_seconds: Histogram::new(latency_buckets()),
            reconcile_seconds: Histogram::new(latency_buckets()),
            plan_seconds: Histogram::new(latency_buckets()),
            blocked_vms: Gauge::default(),
            failovers: Counter::default(),
            contact_reads: Counter::default(),
            peer_messages_refused: Counter::default(),
            fencing: Family::default(),
            decisions: Family::default(),
            registry: Registry::default(),
        };
        registry.register("raft_term", "The current Raft term", m.raft_term.clone());
        registry.register("raft_commit_index", "This member's Raft commit index", m.raft_commit_index.clone());
        registry.register("raft_applied_index", "This member's applied index", m.raft_applied_index.clone());
        registry.register(
            "raft_reachable_peers",
            "Peers heard from within an election timeout (a follower counts its leader)",
            m.raft_reachable_peers.clone(),
        );
        registry.register("raft_is_leader", "1 when this member is the leader", m.raft_is_leader.clone());
        registry.register("raft_leader_changes", "Times this member saw the leader change", m.leader_changes.clone());
        registry.register(
            "raft_proposal_duration_seconds",
            "Latency from proposing a command on this member to its being applied",
            m.proposal_seconds.clone(),
        );
        registry.register("vms", "VMs per host (empty: unplaced) and observed state", m.vms.clone());
        registry.register(
            "reconcile_duration_seconds",
            "Duration of one reconciler pass on this host",
            m.reconcile_seconds.clone(),
        );
        registry.register("failovers", "VMs this leader moved off a fenced host", m.failovers.clone());
        registry.register(
            "contact_reads",
            "Quorum-contact reads this host sent itself because the leader's confirmations stopped",
            m.contact_reads.clone(),
        );
        registry.register(
            "peer_messages_refused",
            "Raft messages from peers the raft thread refused by the trust table",
            m.peer_messages_refused.clone(),
        );
        registry.register(
            "fencing_events",
            "self: this host fenced itself; vouched: this leader cleared a fenced host's handoff",
            m.fencing.clone(),
        );
        registry.register("scheduler_decisions", "Decisions this leader proposed, by kind", m.decisions.clone());
        registry.register(
            "scheduler_plan_duration_seconds",
            "Duration of one scheduler plan on this leader (it runs on the Raft thread)",
            m.plan_seconds.clone(),
        );
        registry.register(
            "scheduler_blocked_vms",
            "Desired-running unplaced VMs this leader's last plan found fit on no host",
            m.blocked_vms.clone(),
        );
        Metrics { registry, ..m }
    }

    pub fn observe_proposal(&self, elapsed: Duration) {
        self.proposal_seconds.observe(elapsed.as_secs_f64());
    }

    pub fn observe_reconcile(&self, elapsed: Duration) {
        self.reconcile_seconds.observe(elapsed.as_secs_f64());
    }

    pub fn fencing_event(&self, kind: &str) {
        self.fencing.get_or_create(&KindLabel { kind: kind.to_string() }).inc();
    }

    pub fn decision(&self, kind: &str) {
        self.decisions.get_or_create(&KindLabel { kind: kind.to_string() }).inc();
    }

    /// Sets the gauges that mirror the node's status.
    pub fn set_status(&self, status: &NodeStatus) {
        self.raft_term.set(clamp(status.term));
        self.raft_commit_index.set(clamp(status.commit));
        self.raft_applied_index.set(clamp(status.applied));
        let leader = status.leader.as_ref().map(|l| l.id);
        let is_leader = leader == Some(status.id);
        self.raft_is_leader.set(i64::from(is_leader));
        let reachable = if is_leader {
            status.active_peers.iter().filter(|&&p| p != status.id).count()
        } else {
            usize::from(leader.is_some())
        };
        self.raft_reachable_peers.set(reachable as i64);
    }

    /// Replaces the VM gauges with `counts` (series that disappeared go).
    pub fn set_vms(&self, counts: &BTreeMap<(String, String), u64>) {
        self.vms.clear();
        for ((host, state), n) in counts {
            self.vms.get_or_create(&VmLabels { host: host.clone(), state: state.clone() }).set(clamp(*n));
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// VMs counted by (host name, shown state (`lost` on a host that is down)); unplaced VMs under host "".
pub fn vm_counts(state: &State) -> BTreeMap<(String, String), u64> {
    let mut counts = BTreeMap::new();
    for vm in state.vms().values() {
        let host = vm.placement.and_then(|p| state.member(p.node)).map(|m| m.name.clone()).unwrap_or_default();
        *counts.entry((host, state.vm_state(vm).to_string())).or_insert(0) += 1;
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_every_family_in_text_format() {
        let m = Metrics::new();
        m.leader_changes.inc();
        m.decision("place");
        m.fencing_event("self");
        m.observe_proposal(Duration::from_millis(3));
        m.set_vms(&[(("h1".to_string(), "running".to_string()), 2)].into());
        let text = m.encode();
        for needle in [
            "blixard_raft_term ",
            "blixard_raft_leader_changes_total 1",
            "blixard_scheduler_decisions_total{kind=\"place\"} 1",
            "blixard_fencing_events_total{kind=\"self\"} 1",
            "blixard_vms{host=\"h1\",state=\"running\"} 2",
            "blixard_raft_proposal_duration_seconds_count 1",
        ] {
            assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
        }
        m.set_vms(&BTreeMap::new());
        assert!(!m.encode().contains("blixard_vms{"), "stale VM series are removed");
    }
}
