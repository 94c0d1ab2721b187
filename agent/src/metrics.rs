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
//! | `peer_datagram_batches_total` | counter | peer batches this member accepted over the QUIC datagram path (`api::datagram`; flat while peers are up: they reach it over TCP alone) |
//! | `failovers_total` | counter | VMs this leader moved off a fenced (down) host |
//! | `fencing_events_total{kind}` | counter | `self`: this host fenced itself (lost quorum); `vouched`: this leader cleared a fenced host's handoff |
//! | `scheduler_decisions_total{kind}` | counter | decisions this leader proposed: `place`, `move`, `unplace`, `host_down`, `host_up`, `clear_handoff` |
//! | `scheduler_plan_duration_seconds` | histogram | one scheduler plan on this leader |
//! | `scheduler_blocked_vms` | gauge | desired-running unplaced VMs that fit on no host (leader) |
//! | `build_info{version,revision}` | info | the agent's version (always 1) |
//! | `start_time_seconds` | gauge | when this agent started (Unix seconds) |
//! | `host_status{host,status}` | gauge | 1 for each host's status (`up`, `down`, `draining`), 0 for the other two |
//! | `host_vcpus`, `host_vcpus_used` `{host}` | gauge | each host's schedulable vcpu (overcommit included) and the vcpu placed on it |
//! | `host_memory_bytes`, `host_memory_used_bytes` `{host}` | gauge | the same for memory |
//! | `host_vms{host}` | gauge | VMs placed on each host |
//! | `guest_starts_total` | counter | guests this host started (started successfully) |
//! | `guest_stops_total{reason}` | counter | guests this host stopped: `desired_stopped`, `moved`, `not_in_state`, `fenced`, `removed`, `runner_changed` |
//! | `guest_failures_total` | counter | guests that exited on their own or failed to start on this host |
//! | `guest_restarts_total` | counter | starts of a guest after it failed here (after the back-off) |
//! | `fenced` | gauge | 1 while this host is fenced (no quorum contact: its guests are stopped) |
//! | `quorum` | gauge | 1 while this host has quorum contact |
//! | `quorum_contact_age_seconds` | gauge | time since this host's last confirmed quorum contact (none since the agent started: the time since it started) |
//! | `disk_errors_total{file}` | counter | failed writes to this agent's files: `store` (fatal: the member stops), `fence-contact`, `fence-exempt` |
//! | `events_total{level}` | counter | cluster events this member recorded (`info`, `warning`, `error`) |
//! | `dashboard_streams` | gauge | live dashboard pages connected to this agent |
//!
//! The host and VM gauges are every member's view of the whole cluster:
//! a member without quorum shows what it last knew. Alert on the leader's
//! (`and on(instance) blixard_raft_is_leader == 1`), as
//! `monitoring/prometheus/blixard.rules.yml` does.

use std::collections::BTreeMap;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HostLabel {
    pub host: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HostStatusLabels {
    pub host: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
    revision: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FileLabel {
    pub file: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LevelLabel {
    pub level: String,
}

/// The files `disk_errors_total` counts failed writes to.
pub const DISK_FILES: [&str; 3] = ["store", "fence-contact", "fence-exempt"];
/// The reasons `guest_stops_total` counts stops by.
pub const STOP_REASONS: [&str; 6] = ["desired_stopped", "moved", "not_in_state", "fenced", "removed", "runner_changed"];

/// The statuses `host_status` has a series for, per host.
pub const HOST_STATUSES: [&str; 3] = ["up", "down", "draining"];

/// One host, as the host gauges show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRow {
    pub host: String,
    /// `up`, `down` or `draining`.
    pub status: &'static str,
    pub vcpus: u64,
    pub vcpus_used: u64,
    pub memory_mib: u64,
    pub memory_mib_used: u64,
    pub vms: u64,
}

type FloatGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

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
    pub peer_datagram_batches: Counter,
    fencing: Family<KindLabel, Counter>,
    decisions: Family<KindLabel, Counter>,
    start_time_seconds: FloatGauge,
    host_status: Family<HostStatusLabels, Gauge>,
    host_vcpus: Family<HostLabel, Gauge>,
    host_vcpus_used: Family<HostLabel, Gauge>,
    host_memory_bytes: Family<HostLabel, Gauge>,
    host_memory_used_bytes: Family<HostLabel, Gauge>,
    host_vms: Family<HostLabel, Gauge>,
    pub guest_starts: Counter,
    guest_stops: Family<ReasonLabel, Counter>,
    pub guest_failures: Counter,
    pub guest_restarts: Counter,
    fenced: Gauge,
    quorum: Gauge,
    quorum_contact_age_seconds: FloatGauge,
    disk_errors: Family<FileLabel, Counter>,
    events: Family<LevelLabel, Counter>,
    pub dashboard_streams: Gauge,
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
            peer_datagram_batches: Counter::default(),
            fencing: Family::default(),
            decisions: Family::default(),
            start_time_seconds: FloatGauge::default(),
            host_status: Family::default(),
            host_vcpus: Family::default(),
            host_vcpus_used: Family::default(),
            host_memory_bytes: Family::default(),
            host_memory_used_bytes: Family::default(),
            host_vms: Family::default(),
            guest_starts: Counter::default(),
            guest_stops: Family::default(),
            guest_failures: Counter::default(),
            guest_restarts: Counter::default(),
            fenced: Gauge::default(),
            quorum: Gauge::default(),
            quorum_contact_age_seconds: FloatGauge::default(),
            disk_errors: Family::default(),
            events: Family::default(),
            dashboard_streams: Gauge::default(),
            registry: Registry::default(),
        };
        let build = BuildLabels {
            version: env!("CARGO_PKG_VERSION").to_string(),
            revision: option_env!("BLIXARD_REVISION").unwrap_or("unknown").to_string(),
        };
        registry.register("build", "The agent's version (always 1)", Info::new(build));
        m.start_time_seconds.set(unix_seconds_now());
        registry.register("start_time_seconds", "When this agent started (Unix seconds)", m.start_time_seconds.clone());
        registry.register(
            "host_status",
            "1 for each host's status (up, down, draining), 0 for the other two",
            m.host_status.clone(),
        );
        registry.register("host_vcpus", "Each host's schedulable vcpu, overcommit included", m.host_vcpus.clone());
        registry.register("host_vcpus_used", "vcpu of the VMs placed on each host", m.host_vcpus_used.clone());
        registry.register(
            "host_memory_bytes",
            "Each host's schedulable memory, overcommit included",
            m.host_memory_bytes.clone(),
        );
        registry.register(
            "host_memory_used_bytes",
            "Memory of the VMs placed on each host",
            m.host_memory_used_bytes.clone(),
        );
        registry.register("host_vms", "VMs placed on each host", m.host_vms.clone());
        registry.register("guest_starts", "Guests this host started", m.guest_starts.clone());
        registry.register("guest_stops", "Guests this host stopped, by reason", m.guest_stops.clone());
        registry.register(
            "guest_failures",
            "Guests that exited on their own or failed to start on this host",
            m.guest_failures.clone(),
        );
        registry.register("guest_restarts", "Starts of a guest after it failed on this host", m.guest_restarts.clone());
        registry.register("fenced", "1 while this host is fenced (no quorum contact)", m.fenced.clone());
        registry.register("quorum", "1 while this host has quorum contact", m.quorum.clone());
        registry.register(
            "quorum_contact_age_seconds",
            "Time since this host's last confirmed quorum contact (or since the agent started, without one)",
            m.quorum_contact_age_seconds.clone(),
        );
        registry.register("disk_errors", "Failed writes to this agent's files", m.disk_errors.clone());
        registry.register("events", "Cluster events this member recorded, by level", m.events.clone());
        registry.register(
            "dashboard_streams",
            "Live dashboard pages connected to this agent",
            m.dashboard_streams.clone(),
        );
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
            "peer_datagram_batches",
            "Peer batches this member accepted over the QUIC datagram path",
            m.peer_datagram_batches.clone(),
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
        // Series an alert takes `increase()` of exist from the start at 0:
        // a counter that appears at 1 shows no increase to Prometheus.
        for kind in ["self", "vouched"] {
            let _ = m.fencing.get_or_create(&KindLabel { kind: kind.to_string() });
        }
        for file in DISK_FILES {
            let _ = m.disk_errors.get_or_create(&FileLabel { file: file.to_string() });
        }
        for reason in STOP_REASONS {
            let _ = m.guest_stops.get_or_create(&ReasonLabel { reason: reason.to_string() });
        }
        for level in ["info", "warning", "error"] {
            let _ = m.events.get_or_create(&LevelLabel { level: level.to_string() });
        }
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

    /// A guest stop this host's reconciler made, and why (a few fixed words).
    pub fn guest_stop(&self, reason: &str) {
        self.guest_stops.get_or_create(&ReasonLabel { reason: reason.to_string() }).inc();
    }

    /// A write to one of this agent's files failed.
    pub fn disk_error(&self, file: &str) {
        self.disk_errors.get_or_create(&FileLabel { file: file.to_string() }).inc();
    }

    /// An event was recorded at `level`.
    pub fn event(&self, level: &str) {
        self.events.get_or_create(&LevelLabel { level: level.to_string() }).inc();
    }

    pub fn set_fenced(&self, fenced: bool) {
        self.fenced.set(i64::from(fenced));
    }

    /// Whether this host is fenced now (the reconciler says so).
    pub fn is_fenced(&self) -> bool {
        self.fenced.get() != 0
    }

    /// This host's quorum contact: whether it has it, and how old the last
    /// one is (`None`: none since the agent started, which then counts as
    /// the age: it is at least that old).
    pub fn set_contact(&self, has_quorum: bool, age_ms: Option<u64>) {
        self.quorum.set(i64::from(has_quorum));
        let age_s = match age_ms {
            Some(ms) => ms as f64 / 1000.0,
            None => (unix_seconds_now() - self.start_time_seconds.get()).max(0.0),
        };
        self.quorum_contact_age_seconds.set(age_s);
    }

    /// Replaces the host gauges with `rows` (hosts that left go).
    pub fn set_hosts(&self, rows: &[HostRow]) {
        for family in [&self.host_vcpus, &self.host_vcpus_used, &self.host_memory_bytes, &self.host_memory_used_bytes] {
            family.clear();
        }
        self.host_vms.clear();
        self.host_status.clear();
        const MIB: u64 = 1024 * 1024;
        for row in rows {
            let host = HostLabel { host: row.host.clone() };
            for status in HOST_STATUSES {
                let labels = HostStatusLabels { host: row.host.clone(), status: status.to_string() };
                self.host_status.get_or_create(&labels).set(i64::from(status == row.status));
            }
            self.host_vcpus.get_or_create(&host).set(clamp(row.vcpus));
            self.host_vcpus_used.get_or_create(&host).set(clamp(row.vcpus_used));
            self.host_memory_bytes.get_or_create(&host).set(clamp(row.memory_mib.saturating_mul(MIB)));
            self.host_memory_used_bytes.get_or_create(&host).set(clamp(row.memory_mib_used.saturating_mul(MIB)));
            self.host_vms.get_or_create(&host).set(clamp(row.vms));
        }
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

fn unix_seconds_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
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

/// Every host as the host gauges show it (status, capacity, usage).
pub fn host_rows(state: &State) -> Vec<HostRow> {
    state
        .members()
        .values()
        .map(|m| {
            let limit = m.capacity.limit();
            let used = state.used_on(m.id, None);
            HostRow {
                host: m.name.clone(),
                status: m.status_word(),
                vcpus: limit.vcpu,
                vcpus_used: used.vcpu,
                memory_mib: limit.memory_mib,
                memory_mib_used: used.memory_mib,
                vms: state.vms_on(m.id).count() as u64,
            }
        })
        .collect()
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

    #[test]
    fn hosts_build_fence_and_guests() {
        let m = Metrics::new();
        let row = |host: &str, status| HostRow {
            host: host.into(),
            status,
            vcpus: 8,
            vcpus_used: 2,
            memory_mib: 1024,
            memory_mib_used: 512,
            vms: 1,
        };
        m.set_hosts(&[row("h1", "up"), row("h2", "down")]);
        m.set_contact(false, None);
        m.set_fenced(true);
        m.guest_stop("fenced");
        m.guest_restarts.inc();
        m.disk_error("fence-contact");
        m.event("error");
        let text = m.encode();
        for needle in [
            "blixard_host_status{host=\"h2\",status=\"down\"} 1",
            "blixard_host_status{host=\"h2\",status=\"up\"} 0",
            "blixard_host_status{host=\"h1\",status=\"up\"} 1",
            "blixard_host_vcpus{host=\"h1\"} 8",
            "blixard_host_memory_used_bytes{host=\"h1\"} 536870912",
            "blixard_host_vms{host=\"h2\"} 1",
            "blixard_build_info{version=\"",
            "blixard_fenced 1",
            "blixard_quorum 0",
            "blixard_guest_stops_total{reason=\"fenced\"} 1",
            "blixard_guest_restarts_total 1",
            "blixard_disk_errors_total{file=\"fence-contact\"} 1",
            "blixard_events_total{level=\"error\"} 1",
        ] {
            assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
        }
        m.set_contact(true, Some(250));
        assert!(m.encode().contains("blixard_quorum_contact_age_seconds 0.25"));
        m.set_hosts(&[row("h1", "draining")]);
        let text = m.encode();
        assert!(!text.contains("host=\"h2\""), "a host that left has no series:\n{text}");
        assert!(text.contains("blixard_host_status{host=\"h1\",status=\"draining\"} 1"));
    }

    /// The series names `encode` can produce: each family's name with the
    /// suffixes its type adds.
    fn series_names(text: &str) -> std::collections::BTreeSet<String> {
        let mut names = std::collections::BTreeSet::new();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("# TYPE ") else { continue };
            let (name, kind) = rest.split_once(' ').unwrap();
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                "info" => &["_info"],
                _ => &[""],
            };
            names.extend(suffixes.iter().map(|s| format!("{name}{s}")));
        }
        names
    }

    /// Every `blixard_*` name in `expr`.
    fn referenced(expr: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut rest = expr;
        while let Some(at) = rest.find("blixard_") {
            let tail = &rest[at..];
            let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
            out.push(tail[..end].to_string());
            rest = &tail[end..];
        }
        out
    }

    /// The shipped alert rules and Grafana board use only metrics the agent
    /// exports (`promtool` checks their syntax and behaviour in CI), and the
    /// board is a well-formed dashboard: unique panel ids, a grid position
    /// each, every query on the board's data source variable.
    #[test]
    fn the_shipped_rules_and_dashboard_name_real_metrics() {
        let m = Metrics::new();
        // Families without a series yet are not encoded at all.
        let row = HostRow {
            host: "h1".into(),
            status: "up",
            vcpus: 1,
            vcpus_used: 0,
            memory_mib: 1,
            memory_mib_used: 0,
            vms: 0,
        };
        m.set_hosts(&[row]);
        m.set_vms(&[(("h1".to_string(), "running".to_string()), 1)].into());
        m.decision("place");
        let exported = series_names(&m.encode());
        assert!(exported.contains("blixard_host_status") && exported.contains("blixard_build_info"), "{exported:?}");
        let rules = include_str!("../../monitoring/prometheus/blixard.rules.yml");
        let mut exprs: Vec<String> =
            rules.lines().filter_map(|l| l.trim().strip_prefix("expr: ")).map(str::to_string).collect();
        assert!(exprs.len() >= 10, "the rules have their expressions on one line each: {exprs:?}");
        let board: serde_json::Value =
            serde_json::from_str(include_str!("../../monitoring/grafana/blixard.json")).expect("the board is JSON");
        for key in ["title", "uid", "schemaVersion", "panels", "templating"] {
            assert!(!board[key].is_null(), "the board has no {key}");
        }
        let variables: Vec<&str> =
            board["templating"]["list"].as_array().unwrap().iter().filter_map(|v| v["name"].as_str()).collect();
        assert!(variables.contains(&"datasource") && variables.contains(&"job"), "{variables:?}");
        let mut ids = std::collections::BTreeSet::new();
        for panel in board["panels"].as_array().unwrap() {
            let title = panel["title"].as_str().expect("every panel has a title");
            assert!(ids.insert(panel["id"].as_u64().expect("a numeric id")), "panel id of {title} repeats");
            for key in ["h", "w", "x", "y"] {
                assert!(panel["gridPos"][key].is_u64(), "{title}: gridPos.{key}");
            }
            let x_end = panel["gridPos"]["x"].as_u64().unwrap() + panel["gridPos"]["w"].as_u64().unwrap();
            assert!(x_end <= 24, "{title} is wider than the grid");
            if panel["type"] == "row" {
                continue;
            }
            assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}");
            let targets = panel["targets"].as_array().expect("targets");
            assert!(!targets.is_empty(), "{title} has no query");
            for target in targets {
                assert_eq!(target["datasource"]["uid"], "${datasource}", "{title}");
                let expr = target["expr"].as_str().expect("a PromQL expression");
                assert!(expr.contains("job=\"$job\""), "{title}: {expr} ignores $job");
                exprs.push(expr.to_string());
            }
        }
        for expr in &exprs {
            for name in referenced(expr) {
                assert!(exported.contains(&name), "{name} (in {expr}) is not a metric the agent exports");
            }
        }
    }
}
